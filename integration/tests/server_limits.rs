//! The reference server under a client that opens connections and sends
//! nothing: it holds at most its per-address bound, closes the silent ones
//! after the first-request timeout, keeps serving everyone else, runs with
//! its open-file soft limit raised to the hard limit, and logs refusals at
//! a bounded rate.

use std::{sync::Arc, time::Duration};

use linkmesh_integration::harness::{AgentEnv, Fleet, scratch, text};
use tokio::io::AsyncReadExt as _;

type R = anyhow::Result<()>;

/// Opens `n` TLS connections from 127.0.0.2 that complete the handshake and
/// then send nothing; returns the ones the server let through.
async fn silent_clients(
    addr: std::net::SocketAddr,
    pin: &str,
    n: usize,
) -> anyhow::Result<Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>> {
    use linkmesh_agent::tls;
    let config = Arc::new(tls::enrol_client_config(&tls::Trust::Pins(vec![
        pin.parse()?,
    ]))?);
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut held = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        let Ok(tcp) = socket.connect(addr).await else {
            continue;
        };
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
        if let Ok(Ok(tls)) =
            tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await
        {
            held.push(tls);
        }
    }
    // A refused connection is accepted and dropped: its handshake fails, or
    // it ends at once. Keep only those still open a moment later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut open = Vec::new();
    for mut c in held {
        let mut b = [0u8; 1];
        // Nothing to read within 20 ms: still open. EOF or an error: the
        // server closed it.
        if tokio::time::timeout(Duration::from_millis(20), c.read(&mut b))
            .await
            .is_err()
        {
            open.push(c);
        }
    }
    Ok(open)
}

#[test]
fn silent_connections_are_bounded_and_closed_and_others_are_served() -> R {
    let dir = scratch("limits")?;
    let fleet = Fleet::start(
        &dir.path().join("fleet"),
        &[
            "--max-connections-per-address",
            "32",
            "--first-request-timeout",
            "2s",
        ],
    )?;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", fleet.pid()))?;
    let files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(
        files.first(),
        files.get(1),
        "soft limit not raised: {limits}"
    );

    let t = fleet.token(1, "1h")?;
    let addr: std::net::SocketAddr = fleet.url.trim_start_matches("https://").parse()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut held = rt.block_on(silent_clients(addr, &t.ca_pin, 200))?;
    assert!(
        !held.is_empty() && held.len() <= 32,
        "{} silent connections held from one address",
        held.len()
    );

    // Everyone else is served meanwhile.
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));

    // The silent ones are closed after the first-request timeout.
    rt.block_on(async {
        for c in &mut held {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await;
            anyhow::ensure!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "a silent connection stayed open: {r:?}"
            );
        }
        Ok(())
    })?;
    // 168 refusals, logged once (and a count), not 168 times.
    let log = fleet.log();
    let lines = log.matches("too many from one address").count();
    assert!((1..=2).contains(&lines), "{lines} refusal lines:\n{log}");
    Ok(())
}

/// The expiry of the certificate the server presents to a new handshake.
fn server_not_after(addr: std::net::SocketAddr, pin: &str) -> anyhow::Result<i64> {
    use linkmesh_agent::tls;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = Arc::new(tls::enrol_client_config(&tls::Trust::Pins(vec![
            pin.parse()?,
        ]))?);
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| anyhow::anyhow!("no server certificate"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)?;
        Ok(cert.validity().not_after.timestamp())
    })
}

/// The server's own certificate is renewed while it runs: a handshake after
/// the first certificate's expiry gets a newer one, the agent keeps
/// reporting across it, and a new enrolment works.
#[test]
fn the_servers_certificate_is_renewed_without_a_restart() -> R {
    let dir = scratch("server-cert")?;
    let fleet = Fleet::start(
        &dir.path().join("fleet"),
        &["--server-cert-lifetime", "6s", "--report-interval", "1s"],
    )?;
    let addr: std::net::SocketAddr = fleet.url.trim_start_matches("https://").parse()?;
    let t = fleet.token(2, "1h")?;
    let first = server_not_after(addr, &t.ca_pin)?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    agent.write_config("[runtime]\nkind = \"none\"\n")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let run = agent.spawn_run(&[], &[])?;
    // Past the first certificate's expiry (6 s, renewed every 4 s), the
    // agent's reports go on.
    let reports_at = |run: &linkmesh_integration::harness::RunningAgent| {
        run.status()
            .and_then(|s| s["reporter"]["reports"].as_u64())
            .unwrap_or(0)
    };
    while time::OffsetDateTime::now_utc().unix_timestamp() <= first {
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = reports_at(&run);
    run.wait_status(Duration::from_secs(20), "a report after the expiry", |s| {
        s["reporter"]["reports"].as_u64() > Some(before)
    })
    .map_err(|e| anyhow::anyhow!("reports stopped at {before} across the server's renewal: {e}"))?;
    let now = server_not_after(addr, &t.ca_pin)?;
    assert!(
        now > first,
        "the server still presents its first certificate"
    );
    assert!(
        now > time::OffsetDateTime::now_utc().unix_timestamp(),
        "the server presents an expired certificate"
    );
    let second = AgentEnv::new(&dir.path().join("second"))?;
    let out = second.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(fleet.log().contains("Renewed the server's certificate"));
    drop(run);
    Ok(())
}
