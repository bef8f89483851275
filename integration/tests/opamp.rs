//! OpAMP between the real opampsupervisor (run by the agent) and the
//! reference server: mutual TLS on `/v1/opamp`, the collector's state in
//! `hosts --json`, remote configuration applied over the local one, a bad
//! one failing with the collector's reason while the previous keeps
//! running, the server away at start, and connections the server refuses.

use std::{net::TcpListener, path::Path, sync::Arc, time::Duration};

use linkmesh_agent::identity::Identity;
use linkmesh_integration::harness::{
    AgentEnv, Fleet, RunningAgent, alive, enrolled_agent, runtime_bin_dir, scratch, text,
};
use serde_json::Value;

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(60);

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A local collector config with an OTLP/HTTP receiver on `port`.
fn local_config(port: u16) -> String {
    format!(
        "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\nexporters:\n  nop: {{}}\nservice:\n  pipelines:\n    logs:\n      receivers: [otlp]\n      exporters: [nop]\n  telemetry:\n    metrics:\n      level: none\n"
    )
}

/// A remote config adding a second receiver on `port` (merged over the local one).
fn remote_config(port: u16) -> String {
    format!(
        "receivers:\n  otlp/remote:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp/remote]\n      exporters: [nop]\n"
    )
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn wait_listening(port: u16, want: bool, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if listening(port) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

struct Bed {
    dir: tempfile::TempDir,
    fleet: Fleet,
    agent: AgentEnv,
    local_port: u16,
}

fn bed(name: &str) -> anyhow::Result<Bed> {
    let dir = scratch(name)?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "1s"])?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let local_port = free_port()?;
    let root = dir.path().join("agent");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("collector.yaml"), local_config(local_port))?;
    let agent = enrolled_agent(&root, &fleet, &bins, "")?;
    Ok(Bed {
        dir,
        fleet,
        agent,
        local_port,
    })
}

/// The one host's `opamp` object once `pred` holds.
fn wait_opamp(fleet: &Fleet, what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let hosts = fleet.hosts()?;
        if let Some(h) = hosts.first()
            && pred(h)
        {
            return Ok(h.clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {hosts:?}\nserver log:\n{}",
            fleet.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_config(
    fleet: &Fleet,
    dir: &Path,
    name: &str,
    body: &str,
    extra: &[&str],
) -> anyhow::Result<String> {
    let file = dir.join(name);
    std::fs::write(&file, body)?;
    let mut args = vec![
        "collector-config",
        "set",
        "--file",
        file.to_str().unwrap_or_default(),
    ];
    args.extend_from_slice(extra);
    let out = fleet.admin(&args)?;
    anyhow::ensure!(out.status.success(), "{}", text(&out));
    // "stored collector configuration HASH for ..."
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_owned())
}

fn collector_pid(run: &RunningAgent) -> u32 {
    run.status()
        .and_then(|s| s["supervision"]["collector_pid"].as_u64())
        .unwrap_or(0) as u32
}

#[test]
fn the_collector_reports_over_opamp_and_runs_the_servers_config_over_its_own() -> R {
    let b = bed("opamp-config")?;
    let run = b.agent.spawn_run(&[], &[])?;
    let host_id = b.agent.status()?["host_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // Connected, described, healthy; no remote config yet: the local one runs.
    let h = wait_opamp(&b.fleet, "connected and healthy", |h| {
        h["opamp"]["connected"] == true && h["opamp"]["healthy"] == true
    })?;
    let o = &h["opamp"];
    assert_eq!(o["collector_name"], "otelcol-linkmesh", "{h}");
    assert_eq!(o["collector_version"], "0.158.0", "{h}");
    assert_eq!(o["remote_config_status"], "none", "{h}");
    let uid = o["instance_uid"].as_str().unwrap_or_default().to_owned();
    let persisted =
        std::fs::read_to_string(b.agent.state.join("supervisor/persistent_state.yaml"))?;
    assert!(persisted.contains(&uid), "{uid} vs {persisted}");
    assert!(
        wait_listening(b.local_port, true, T),
        "local config not running"
    );

    // The fleet's config reaches the connected supervisor and is merged
    // over the local one: both receivers listen.
    let remote_port = free_port()?;
    let started = std::time::Instant::now();
    let hash = set_config(
        &b.fleet,
        b.dir.path(),
        "good.yaml",
        &remote_config(remote_port),
        &[],
    )?;
    let h = wait_opamp(&b.fleet, "applied", |h| {
        h["opamp"]["remote_config_status"] == "applied"
    })?;
    let took = started.elapsed();
    assert_eq!(h["opamp"]["remote_config_hash"], hash.as_str(), "{h}");
    assert!(listening(remote_port) && listening(b.local_port));
    eprintln!("collector-config set -> applied: {took:?}");
    // The agent sees the server's view too.
    run.wait_status(T, "the agent's view", |s| {
        s["reporter"]["opamp"]["remote_config_status"] == "applied"
    })?;
    let pid = collector_pid(&run);
    assert!(alive(pid));

    // A config the collector rejects: failed, with its reason; the previous
    // keeps running (same collector, both receivers).
    let bad = "receivers:\n  nosuch: {}\nservice:\n  pipelines:\n    logs:\n      receivers: [nosuch]\n      exporters: [nop]\n";
    set_config(&b.fleet, b.dir.path(), "bad.yaml", bad, &[])?;
    let h = wait_opamp(&b.fleet, "failed", |h| {
        h["opamp"]["remote_config_status"] == "failed"
    })?;
    let err = h["opamp"]["remote_config_error"]
        .as_str()
        .unwrap_or_default();
    assert!(err.contains("unknown type: \"nosuch\""), "{h}");
    assert!(listening(remote_port) && listening(b.local_port));
    assert_eq!(collector_pid(&run), pid, "the collector was restarted");
    // The agent's report carries the rejection and the collector's last lines.
    let h = wait_opamp(&b.fleet, "problem reported", |h| {
        h["collector_problem"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rejected") && r.contains("nosuch"))
    })?;
    assert!(
        h["collector_problem"]["log_tail"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{h}"
    );

    // Not YAML at all (stored with --force; refused without it): failed too.
    let file = b.dir.path().join("broken.yaml");
    std::fs::write(&file, "receivers: [unclosed\n")?;
    let out = b.fleet.admin(&[
        "collector-config",
        "set",
        "--file",
        file.to_str().unwrap_or_default(),
    ])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken.yaml: not valid YAML"),
        "{}",
        text(&out)
    );
    let broken_hash = set_config(
        &b.fleet,
        b.dir.path(),
        "broken.yaml",
        "receivers: [unclosed\n",
        &["--force"],
    )?;
    let h = wait_opamp(&b.fleet, "failed on bad YAML", |h| {
        h["opamp"]["remote_config_status"] == "failed"
            && h["opamp"]["remote_config_hash"] == broken_hash.as_str()
    })?;
    assert!(
        !h["opamp"]["remote_config_error"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{h}"
    );
    assert!(listening(remote_port) && listening(b.local_port));

    // A per-host config replaces the fleet's for that host.
    let host_port = free_port()?;
    set_config(
        &b.fleet,
        b.dir.path(),
        "host.yaml",
        &remote_config(host_port),
        &["--host", &host_id],
    )?;
    wait_opamp(&b.fleet, "host config applied", |h| {
        h["opamp"]["remote_config_status"] == "applied"
    })?;
    assert!(wait_listening(host_port, true, T));
    assert!(
        wait_listening(remote_port, false, T),
        "the fleet config still runs"
    );

    // Kept across a server restart.
    let mut fleet = b.fleet;
    fleet.restart(None)?;
    let h = wait_opamp(&fleet, "reconnected", |h| h["opamp"]["connected"] == true)?;
    assert_eq!(h["opamp"]["instance_uid"], uid.as_str());
    assert_eq!(h["opamp"]["remote_config_status"], "applied");
    drop(run);
    Ok(())
}

#[test]
fn with_the_server_away_the_collector_runs_its_local_and_last_remote_config() -> R {
    let mut b = bed("opamp-away")?;
    let remote_port = free_port()?;
    set_config(
        &b.fleet,
        b.dir.path(),
        "fleet.yaml",
        &remote_config(remote_port),
        &[],
    )?;
    // Server down at the collector's first start: the local config runs.
    b.fleet.stop();
    let run = b.agent.spawn_run(&[], &[])?;
    assert!(wait_listening(b.local_port, true, T), "{}", run.log_text());
    assert!(!listening(remote_port));
    // Back: the current config arrives on connect.
    b.fleet.restart(None)?;
    wait_opamp(&b.fleet, "applied on reconnect", |h| {
        h["opamp"]["remote_config_status"] == "applied"
    })?;
    assert!(wait_listening(remote_port, true, T));
    drop(run);
    // Down again at the next start: the last remote config runs with the local one.
    b.fleet.stop();
    let run = b.agent.spawn_run(&[], &[])?;
    assert!(wait_listening(b.local_port, true, T), "{}", run.log_text());
    assert!(
        wait_listening(remote_port, true, T),
        "last remote config not used:\n{}",
        run.log_text()
    );
    Ok(())
}

/// A TLS client for `server`'s CA, presenting `client` (or no certificate).
fn tls(server: &Identity, client: Option<&Identity>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.ca.clone())?;
    let b = rustls::ClientConfig::builder_with_provider(linkmesh_agent::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    Ok(Arc::new(match client {
        Some(c) => b.with_client_auth_cert(c.certs.clone(), c.key().clone_key())?,
        None => b.with_no_client_auth(),
    }))
}

/// Opens `/v1/opamp` on `addr` with `cfg`: the WebSocket, or why not.
async fn open(
    addr: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<
    Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        tokio_tungstenite::tungstenite::Error,
    >,
> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await?;
    let req = format!("wss://{addr}/v1/opamp");
    Ok(tokio_tungstenite::client_async(req, stream)
        .await
        .map(|(ws, _)| ws))
}

#[test]
fn the_opamp_endpoint_admits_only_this_fleets_hosts_speaking_for_themselves() -> R {
    use futures_util::{SinkExt as _, StreamExt as _};
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::Message;
    let b = bed("opamp-refuse")?;
    let other_dir = b.dir.path().join("other");
    let other = Fleet::start(&other_dir.join("fleet"), &[])?;
    let stranger = enrolled_agent(
        &other_dir.join("agent"),
        &other,
        &b.dir.path().join("bin"),
        "",
    )?;
    let (ours, theirs) = (b.agent.identity()?, stranger.identity()?);
    let addr = b.fleet.url.trim_start_matches("https://").to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // No client certificate: the handshake succeeds (enrolment needs
        // none), the upgrade is refused with 401.
        match open(&addr, tls(&ours, None)?).await? {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 401, "{resp:?}");
            }
            other => anyhow::bail!("upgrade without a certificate: {:?}", other.map(|_| ())),
        }
        // Another fleet's certificate: refused in the TLS handshake.
        let r = open(&addr, tls(&ours, Some(&theirs))?).await;
        assert!(
            matches!(&r, Err(_) | Ok(Err(_))),
            "a foreign certificate was admitted"
        );
        // Our certificate, but a description naming another host: refused, closed.
        let mut ws = open(&addr, tls(&ours, Some(&ours))?).await??;
        let kv = |k: &str, v: &str| linkmesh_fleet::opamp::wire::KeyValue {
            key: k.into(),
            value: Some(linkmesh_fleet::opamp::wire::AnyValue {
                value: Some(linkmesh_fleet::opamp::wire::any_value::Value::String(
                    v.into(),
                )),
            }),
        };
        let msg = linkmesh_fleet::opamp::wire::AgentToServer {
            instance_uid: vec![9; 16],
            agent_description: Some(linkmesh_fleet::opamp::wire::AgentDescription {
                identifying_attributes: vec![kv("linkmesh.host.id", "someone-else")],
                non_identifying_attributes: vec![],
            }),
            ..Default::default()
        };
        let mut frame = vec![0u8];
        msg.encode(&mut frame)?;
        ws.send(Message::Binary(frame.into())).await?;
        let mut refused = None;
        let mut closed = false;
        while let Some(m) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await? {
            match m {
                Ok(Message::Binary(b)) => {
                    let reply = linkmesh_fleet::opamp::wire::ServerToAgent::decode(&b[1..])?;
                    refused = reply.error_response.map(|e| e.error_message);
                }
                Ok(Message::Close(_)) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        let refused = refused.unwrap_or_default();
        assert!(refused.contains("claims host someone-else"), "{refused}");
        assert!(closed);
        anyhow::Ok(())
    })?;
    // Nothing recorded for any of them; the refusals are logged.
    let hosts = b.fleet.hosts()?;
    assert_eq!(hosts.len(), 1);
    assert!(hosts[0]["opamp"]["instance_uid"] == "", "{hosts:?}");
    let log = b.fleet.log();
    assert!(
        log.contains("OpAMP connection refused") && log.contains("status=401"),
        "{log}"
    );
    assert!(log.contains("OpAMP message refused"), "{log}");
    Ok(())
}
