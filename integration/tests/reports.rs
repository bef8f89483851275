//! Version reports over mutual TLS, renewal, skew, drift, the server away,
//! the clock off and a proxy in between: the real agent and server binaries.

use std::{os::unix::process::CommandExt as _, path::Path, process::Stdio, time::Duration};

use linkmesh_agent::{proto, tls::mtls_client_config, transport::Dialer};
use linkmesh_integration::harness::{
    AgentEnv, Fleet, alive, enrolled_agent, fleet_with_agent, snapshot, text,
};
use serde_json::Value;

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(20);

fn reports(s: &Value) -> u64 {
    s["reporter"]["reports"].as_u64().unwrap_or(0)
}

/// The enrolled certificate's expiry, as `status` reads it.
fn cert_not_after(agent: &AgentEnv) -> anyhow::Result<time::OffsetDateTime> {
    let s = agent.status()?;
    Ok(time::OffsetDateTime::parse(
        s["certificate"]["not_after"].as_str().unwrap_or_default(),
        &time::format_description::well_known::Rfc3339,
    )?)
}

/// Sleeps until the wall clock is past `t` (a certificate's validity is
/// wall-clock time, so this waits for the event itself).
fn sleep_past(t: time::OffsetDateTime) {
    while time::OffsetDateTime::now_utc() <= t {
        let left = t - time::OffsetDateTime::now_utc();
        std::thread::sleep(
            Duration::try_from(left)
                .unwrap_or_default()
                .max(Duration::from_millis(10)),
        );
    }
}

#[test]
fn reports_reach_the_drift_report_with_heartbeats_between() -> R {
    let (_dir, fleet, agent) = fleet_with_agent("rep-basic", &[])?;
    std::fs::write(agent.state.join("install-method"), "deb\n")?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "three reports", |s| {
        reports(s) >= 3 && s["supervision"]["state"] == "running"
    })?;
    assert_eq!(s["reporter"]["skew_verdict"], "in_window");
    assert_eq!(s["reporter"]["report_interval_secs"], 1);
    let d = fleet.wait_drift(T, "runtime reported", |h| h["runtime_version"] == "0.158.0")?;
    let h = &d["hosts"][0];
    assert_eq!(h["verdict"], "in_window");
    assert_eq!(h["install_method"], "deb");
    assert_eq!(h["runtime_kind"], "otelcol");
    assert_eq!(h["runtime_at_pin"], true);
    assert_eq!(h["stale"], false);
    assert_eq!(h["action"], Value::Null);
    // Heartbeats, not full reports, once nothing changes: the server's
    // record counts those since the last full report.
    let record = fleet.state().join("hosts").join(format!(
        "{}.json",
        h["host_id"].as_str().unwrap_or_default()
    ));
    let deadline = std::time::Instant::now() + T;
    let raw = loop {
        let raw: Value = serde_json::from_slice(&std::fs::read(&record)?)?;
        if raw["report"]["heartbeats_since_full"].as_u64() >= Some(3) {
            break raw;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no three heartbeats in a row within {T:?}: {raw}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(fleet.hosts()?.len(), 1);
    assert!(raw["report"]["reports"].as_u64() >= Some(4), "{raw}");
    Ok(())
}

#[test]
fn the_server_away_and_back_never_touches_the_collector() -> R {
    let (_dir, mut fleet, agent) = fleet_with_agent("rep-away", &[])?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "reporting", |s| {
        reports(s) >= 1 && s["supervision"]["collector_pid"].as_u64().is_some()
    })?;
    let (sup, col) = (
        s["supervision"]["pid"].clone(),
        s["supervision"]["collector_pid"].clone(),
    );
    fleet.stop();
    let s = run.wait_status(T, "failures noticed", |s| {
        s["reporter"]["consecutive_failures"].as_u64() >= Some(2)
    })?;
    let err = s["reporter"]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        err.contains(&fleet.addr),
        "the error names the address: {err}"
    );
    // Away for several attempts: backoff, not a tight loop. Each failure
    // the status shows carries the agent's own times; the wait it chose
    // is the reporter's policy (1 s × 1.6ⁿ⁻¹ ± 20 %), and the failures
    // really are that far apart.
    let mut seen: Vec<(u64, u64, u64)> = Vec::new();
    let s = run.wait_status(Duration::from_secs(60), "four failures", |s| {
        let r = &s["reporter"];
        if let (Some(n), Some(at), Some(retry)) = (
            r["consecutive_failures"].as_u64(),
            r["last_failure_unix_ms"].as_u64(),
            r["retry_at_unix_ms"].as_u64(),
        ) && seen.last().is_none_or(|l| l.0 < n)
        {
            seen.push((n, at, retry));
        }
        r["consecutive_failures"].as_u64() >= Some(4)
    })?;
    let policy = |n: u64, jitter: f64| {
        linkmesh_agent::reporter::retry_delay(u32::try_from(n).unwrap_or(u32::MAX), jitter)
            .as_millis() as u64
    };
    for &(n, at, retry) in &seen {
        let wait = retry - at;
        assert!(
            (policy(n, -1.0)..=policy(n, 1.0) + 1).contains(&wait),
            "after failure {n} the reporter waits {wait} ms: {seen:?}"
        );
    }
    for w in seen.windows(2) {
        let ((a, at_a, _), (b, at_b, _)) = (w[0], w[1]);
        let least: u64 = (a..b).map(|n| policy(n, -1.0)).sum();
        assert!(
            at_b - at_a >= least,
            "failures {a} and {b} only {} ms apart (at least {least}): {seen:?}",
            at_b - at_a
        );
    }
    assert!(seen.len() >= 2, "{seen:?}");
    eprintln!("failures seen (count, failed at, retry at; Unix ms): {seen:?}");
    assert_eq!(s["supervision"]["pid"], sup);
    assert_eq!(s["supervision"]["collector_pid"], col);
    fleet.restart(None)?;
    let before = reports(&s);
    let s = run.wait_status(T, "reconnected", |s| {
        reports(s) > before && s["reporter"]["consecutive_failures"] == 0
    })?;
    assert_eq!(s["supervision"]["pid"], sup);
    assert_eq!(s["supervision"]["collector_pid"], col);
    Ok(())
}

#[test]
fn an_upgraded_server_flags_the_agent_behind_with_its_upgrade_command() -> R {
    let (_dir, mut fleet, agent) = fleet_with_agent("rep-upgrade", &[])?;
    let v = linkmesh_agent::version::agent_version();
    let newer = format!("{}.{}.0", v.major, v.minor + 2);
    run_agent_once(&agent)?;
    fleet.wait_drift(T, "in window", |h| h["verdict"] == "in_window")?;
    fleet.restart(Some(&[
        "--report-interval",
        "1s",
        "--server-version",
        &newer,
    ]))?;
    for (method, command) in [
        ("rpm", "yum update linkmesh-agent"),
        ("deb", "apt upgrade linkmesh-agent"),
    ] {
        // The install method is read at start, as after a reinstall.
        std::fs::write(agent.state.join("install-method"), method)?;
        run_agent_once(&agent)?;
        let d = fleet.wait_drift(T, "behind", |h| {
            h["verdict"] == "behind" && h["install_method"] == method
        })?;
        assert_eq!(d["hosts"][0]["action"], command);
        assert_eq!(fleet.hosts()?.len(), 1, "a reinstall is the same row");
    }
    std::fs::remove_file(agent.state.join("install-method"))?;
    run_agent_once(&agent)?;
    let d = fleet.wait_drift(T, "binary install", |h| h["install_method"] == "binary")?;
    let action = d["hosts"][0]["action"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        action.starts_with(&format!(
            "curl -fsSL {0}/install.sh | sudo sh -s -- --server {0} --ca-pin sha256:",
            fleet.url
        )),
        "{action}"
    );
    Ok(())
}

/// Runs the agent until it has reported once, then stops it.
fn run_agent_once(agent: &AgentEnv) -> anyhow::Result<()> {
    let mut run = agent.spawn_run(&[], &[])?;
    run.wait_status(T, "a report", |s| {
        reports(s) >= 1 && s["supervision"]["state"] == "running"
    })?;
    run.signal(nix::sys::signal::Signal::SIGTERM);
    run.wait_exit(T);
    Ok(())
}

#[test]
fn a_rolled_back_server_makes_the_agent_ahead_and_it_keeps_supervising() -> R {
    let v = linkmesh_agent::version::agent_version();
    if v.minor == 0 {
        return Ok(()); // no older minor to roll back to
    }
    let (_dir, mut fleet, agent) = fleet_with_agent("rep-rollback", &[])?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "reporting", |s| {
        reports(s) >= 1 && s["supervision"]["state"] == "running"
    })?;
    let sup = s["supervision"]["pid"].clone();
    let older = format!("{}.{}.0", v.major, v.minor - 1);
    fleet.restart(Some(&[
        "--report-interval",
        "1s",
        "--server-version",
        &older,
    ]))?;
    let s = run.wait_status(T, "ahead", |s| s["reporter"]["skew_verdict"] == "ahead")?;
    assert_eq!(
        s["supervision"]["pid"], sup,
        "still supervising the same process"
    );
    assert!(
        run.log_text().contains("upgrade the server first"),
        "{}",
        run.log_text()
    );
    let d = fleet.wait_drift(T, "ahead in drift", |h| h["verdict"] == "ahead")?;
    assert!(
        d["hosts"][0]["action"]
            .as_str()
            .unwrap_or_default()
            .contains("upgrade the server")
    );
    let st = agent.status()?;
    assert_eq!(st["runtime"]["reporter"]["skew_verdict"], "ahead");
    Ok(())
}

/// A mutual-TLS client with the agent's identity, for sending crafted requests.
async fn client_for(agent: &AgentEnv) -> anyhow::Result<proto::Client<tonic::transport::Channel>> {
    let identity = agent.identity()?;
    let tls = std::sync::Arc::new(mtls_client_config(&identity)?);
    let dialer = Dialer::new(identity.server.clone(), tls, None, Duration::from_secs(5));
    Ok(proto::Client::new(dialer.channel()?))
}

#[test]
fn identity_comes_from_the_certificate_never_the_body() -> R {
    let (dir, mut fleet, agent) = fleet_with_agent("rep-identity", &[])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = client_for(&agent).await?;
        // A report claiming another host is refused.
        let err = client
            .report(proto::ReportRequest {
                full: true,
                host_id: "someone-else".into(),
                agent_version: "0.1.0".into(),
                ..Default::default()
            })
            .await
            .expect_err("claim accepted");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(
            err.message().contains("claims host someone-else"),
            "{err:?}"
        );
        // The same report without the claim is accepted, as the certificate's host.
        client
            .report(proto::ReportRequest {
                full: true,
                agent_version: "0.1.0".into(),
                ..Default::default()
            })
            .await?;
        anyhow::Ok(())
    })?;

    // A certificate from another fleet's CA is refused in the handshake.
    let other = Fleet::start(&dir.path().join("other-fleet"), &[])?;
    let stranger = enrolled_agent(
        &dir.path().join("stranger"),
        &other,
        &dir.path().join("bin"),
        "",
    )?;
    let (ours, theirs) = (agent.identity()?, stranger.identity()?);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ours.ca.clone())?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(linkmesh_agent::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(theirs.certs.clone(), theirs.key().clone_key())?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let hosts_before = fleet.hosts()?.len();
    rt.block_on(async {
        let dialer = Dialer::new(
            ours.server.clone(),
            std::sync::Arc::new(cfg),
            None,
            Duration::from_secs(5),
        );
        let mut client = proto::Client::new(dialer.channel()?);
        let result = client
            .report(proto::ReportRequest {
                full: true,
                ..Default::default()
            })
            .await;
        assert!(
            result.is_err(),
            "a foreign certificate was accepted: {result:?}"
        );
        anyhow::Ok(())
    })?;
    assert_eq!(fleet.hosts()?.len(), hosts_before);
    assert!(
        fleet.log().contains("TLS handshake failed"),
        "{}",
        fleet.log()
    );
    drop(other);

    // A valid certificate for a host this server no longer knows: NotFound.
    let host_id = agent.status()?["host_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    fleet.stop();
    std::fs::remove_file(fleet.state().join("hosts").join(format!("{host_id}.json")))?;
    fleet.restart(None)?;
    rt.block_on(async {
        let mut client = client_for(&agent).await?;
        let err = client
            .report(proto::ReportRequest {
                full: true,
                ..Default::default()
            })
            .await
            .expect_err("unknown host accepted");
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        anyhow::Ok(())
    })?;
    Ok(())
}

#[test]
fn certificates_renew_in_place_and_an_expired_one_within_grace() -> R {
    // Lifetime 6 s: renewal about every 4 s.
    let (_dir, fleet, agent) = fleet_with_agent(
        "rep-renew",
        &["--cert-lifetime", "6s", "--renew-grace", "1h"],
    )?;
    let host_id = agent.status()?["host_id"].clone();
    let first_cert = std::fs::read(agent.state.join("identity/cert.pem"))?;
    let first_key = std::fs::read(agent.state.join("identity/key.pem"))?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "a renewal", |s| {
        s["reporter"]["renewals"].as_u64() >= Some(1) && reports(s) >= 2
    })?;
    assert_eq!(s["reporter"]["consecutive_failures"], 0);
    let st = agent.status()?;
    assert_eq!(st["host_id"], host_id, "same host after renewal");
    assert_ne!(
        std::fs::read(agent.state.join("identity/cert.pem"))?,
        first_cert
    );
    assert_ne!(
        std::fs::read(agent.state.join("identity/key.pem"))?,
        first_key,
        "a new key made on the host"
    );
    drop(run);
    assert_eq!(fleet.hosts()?.len(), 1);

    // The host is off past expiry; on return it renews without a token.
    let not_after = cert_not_after(&agent)?;
    sleep_past(not_after);
    assert!(
        cert_not_after(&agent)? < time::OffsetDateTime::now_utc(),
        "certificate should have expired"
    );
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "renewed after expiry", |s| {
        s["reporter"]["renewals"].as_u64() >= Some(1) && reports(s) >= 1
    })?;
    assert_eq!(s["reporter"]["consecutive_failures"], 0);
    assert_eq!(agent.status()?["host_id"], host_id);
    Ok(())
}

#[test]
fn beyond_the_grace_window_renewal_is_refused_and_nothing_re_enrols() -> R {
    let (_dir, _fleet, agent) = fleet_with_agent(
        "rep-grace",
        &["--cert-lifetime", "2s", "--renew-grace", "1s"],
    )?;
    // Off past expiry and clearly past the 1 s grace after it.
    sleep_past(cert_not_after(&agent)? + time::Duration::seconds(2));
    let before = snapshot(&agent.state.join("identity"));
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "refusal", |s| {
        s["reporter"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("beyond the renewal grace"))
    })?;
    assert!(
        s["reporter"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("enrol again with a new token")
    );
    // The collector keeps running; the identity is untouched.
    assert_eq!(s["supervision"]["state"], "running");
    assert_eq!(snapshot(&agent.state.join("identity")), before);
    Ok(())
}

#[test]
fn a_host_clock_an_hour_off_is_measured_and_reported_as_skew() -> R {
    let faketime = linkmesh_integration::harness::tool("faketime")?;
    let (_dir, _fleet, agent) = fleet_with_agent("rep-clock", &[])?;
    let identity_before = snapshot(&agent.state.join("identity"));
    let agent_bin = linkmesh_integration::harness::binary("linkmesh-agent")?;

    // An hour ahead: certificates still valid both ways; the offset is measured.
    let ahead = AgentCmd::new(&agent, &faketime, "+1h", &agent_bin)?;
    let s = ahead.wait(|s| {
        s["reporter"]["clock_offset_ms"]
            .as_i64()
            .is_some_and(|o| (3_590_000..3_610_000).contains(&o))
    })?;
    assert_eq!(s["reporter"]["consecutive_failures"], 0, "{s}");
    assert!(
        ahead
            .log()
            .contains("Host clock differs from the server's by more than a minute"),
        "{}",
        ahead.log()
    );
    drop(ahead);

    // An hour behind: the server's certificate is not valid yet on this host.
    let behind = AgentCmd::new(&agent, &faketime, "-1h", &agent_bin)?;
    let s = behind.wait(|s| {
        s["reporter"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("clock"))
    })?;
    let err = s["reporter"]["last_error"].as_str().unwrap_or_default();
    assert!(
        err.contains("not valid yet, or this host's clock is behind"),
        "{err}"
    );
    assert_eq!(s["supervision"]["state"], "running", "supervision goes on");
    drop(behind);
    assert_eq!(
        snapshot(&agent.state.join("identity")),
        identity_before,
        "no re-enrolment"
    );
    Ok(())
}

/// `linkmesh-agent run` under faketime.
struct AgentCmd {
    child: std::process::Child,
    log: std::path::PathBuf,
    status: std::path::PathBuf,
}

impl AgentCmd {
    fn new(agent: &AgentEnv, faketime: &Path, offset: &str, bin: &Path) -> anyhow::Result<Self> {
        // faketime runs the agent as its child: the status file of an earlier
        // run must not be mistaken for this one's.
        let _ = std::fs::remove_file(agent.state.join("runtime-status.json"));
        let log = agent.root.join(format!("faketime{offset}.log"));
        let f = std::fs::File::create(&log)?;
        // Its own process group: faketime forks the agent, and SIGTERM to
        // faketime alone would leave the agent (and its runtime) running.
        let child = std::process::Command::new(faketime)
            .process_group(0)
            .args(["-f", offset])
            .arg(bin)
            .arg("run")
            .env("LINKMESH_CONFIG", &agent.config)
            .env("LINKMESH_STATE_DIR", &agent.state)
            .stdout(f.try_clone()?)
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(Self {
            child,
            log,
            status: agent.state.join("runtime-status.json"),
        })
    }

    fn wait(&self, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(s) = std::fs::read(&self.status)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                && pred(&s)
            {
                return Ok(s);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "timed out; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentCmd {
    fn drop(&mut self) {
        // faketime and the agent it forked; the agent stops its supervisor.
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            let gone = nix::sys::signal::killpg(group, None).is_err();
            if let Ok(Some(_)) = self.child.try_wait()
                && gone
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn enrolment_and_reports_go_through_an_http_connect_proxy() -> R {
    let (dir, fleet, agent) = fleet_with_agent("rep-proxy", &[])?;
    let proxy_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let fleet_port = fleet.addr.rsplit(':').next().unwrap_or("0").to_owned();
    let mut proxy = linkmesh_integration::harness::Tinyproxy::start(
        dir.path(),
        "127.0.0.1",
        proxy_port,
        "127.0.0.1",
        &fleet_port,
        None,
    )?;
    let connects = |proxy: &linkmesh_integration::harness::Tinyproxy| {
        proxy
            .log_text()
            .matches("Established connection to host \"127.0.0.1\"")
            .count()
    };
    let cfg = std::fs::read_to_string(&agent.config)?;
    let with_proxy = format!("{cfg}[proxy]\nurl = \"{}\"\n", proxy.url);

    // Enrolment dials through the proxy as every other connection does:
    // the configured one, and HTTPS_PROXY.
    for (config, env) in [
        (Some(with_proxy.as_str()), None),
        (None, Some(proxy.url.as_str())),
    ] {
        let other = AgentEnv::new(&dir.path().join(format!("enrol-{}", connects(&proxy))))?;
        if let Some(c) = config {
            other.write_config(c)?;
        }
        let t = fleet.token(1, "1h")?;
        let before = connects(&proxy);
        let mut cmd = other.cmd()?;
        cmd.args(["enroll", "--server", &fleet.url, "--ca-pin", &t.ca_pin])
            .env("LINKMESH_TOKEN", &t.token)
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        if let Some(url) = env {
            cmd.env("HTTPS_PROXY", url);
        }
        let out = cmd.output()?;
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            connects(&proxy) > before,
            "enrolment bypassed the proxy: {}",
            proxy.log_text()
        );
    }

    agent.write_config(&with_proxy)?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "reports via proxy", |s| reports(s) >= 2)?;
    assert_eq!(
        s["reporter"]["proxy"],
        format!("127.0.0.1:{proxy_port} via proxy.url").as_str()
    );
    assert!(connects(&proxy) >= 3, "{}", proxy.log_text());
    drop(run);
    // The environment works too, and NO_PROXY exempts the server.
    agent.write_config(&cfg)?;
    let run = agent.spawn_run(&[], &[("HTTPS_PROXY", &proxy.url), ("NO_PROXY", "")])?;
    let s = run.wait_status(T, "reports via HTTPS_PROXY", |s| reports(s) >= 1)?;
    assert_eq!(
        s["reporter"]["proxy"],
        format!("127.0.0.1:{proxy_port} via HTTPS_PROXY").as_str()
    );
    drop(run);
    let run = agent.spawn_run(
        &[],
        &[("HTTPS_PROXY", &proxy.url), ("NO_PROXY", "127.0.0.1")],
    )?;
    let s = run.wait_status(T, "direct", |s| reports(s) >= 1)?;
    assert_eq!(s["reporter"]["proxy"], Value::Null);
    // A proxy that is down is named in the error, for reports and enrolment.
    proxy.stop();
    drop(run);
    let run = agent.spawn_run(&[], &[("HTTPS_PROXY", &proxy.url)])?;
    run.wait_status(T, "proxy error", |s| {
        s["reporter"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("proxy 127.0.0.1:{proxy_port} is unreachable")))
    })?;
    assert!(alive(run.pid()));
    let other = AgentEnv::new(&dir.path().join("enrol-proxy-down"))?;
    let t = fleet.token(1, "1h")?;
    let out = other
        .cmd()?
        .args(["enroll", "--server", &fleet.url, "--ca-pin", &t.ca_pin])
        .env("LINKMESH_TOKEN", &t.token)
        .env("HTTPS_PROXY", &proxy.url)
        .env_remove("NO_PROXY")
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("proxy 127.0.0.1:{proxy_port} is unreachable")),
        "{}",
        text(&out)
    );
    assert!(!other.state.join("identity").exists());
    Ok(())
}

#[test]
fn check_passes_on_a_healthy_host_and_names_each_failure() -> R {
    let (_dir, mut fleet, agent) = fleet_with_agent("rep-check", &[])?;
    let run = agent.spawn_run(&[], &[])?;
    run.wait_status(T, "running, reporting, and seen over OpAMP", |s| {
        reports(s) >= 1
            && s["supervision"]["state"] == "running"
            && s["reporter"]["opamp"]["connected"] == true
    })?;
    let out = agent.cmd()?.args(["check", "--json"]).output()?;
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    assert!(out.status.success(), "{}", text(&out));
    let opamp = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == "opamp"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(opamp["outcome"], "ok", "{opamp}");
    assert!(
        opamp["detail"]
            .as_str()
            .is_some_and(|d| d.contains("otelcol-linkmesh 0.158.0")),
        "{opamp}"
    );
    assert_eq!(doc["ok"], true, "{doc}");
    let ids: Vec<&str> = doc["checks"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [
            "config",
            "state_dir",
            "identity",
            "key_permissions",
            "certificate",
            "machine",
            "server",
            "standing",
            "clock",
            "version",
            "runtime_version",
            "archive_keys",
            "supervisor",
            "opamp",
            "conflicts",
            "upgrade"
        ]
    );
    let server = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == "server"))
        .cloned()
        .unwrap_or_default();
    assert!(
        server["detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("(no proxy)"),
        "{server}"
    );
    let human = agent.cmd()?.arg("check").output()?;
    let human_text = String::from_utf8_lossy(&human.stdout);
    assert!(
        human_text.contains("\u{221a} server is reachable")
            && human_text.contains("Status check results are \u{221a}"),
        "{human_text}"
    );

    // Server down: a cross with the address, and the dependent checks skipped.
    fleet.stop();
    let out = agent.cmd()?.args(["check", "--json"]).output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout)?;
    let find = |id: &str| {
        doc["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(find("server")["outcome"], "fail");
    assert!(
        find("server")["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&fleet.addr),
        "{}",
        find("server")
    );
    assert_eq!(find("version")["outcome"], "skipped");
    assert_eq!(find("archive_keys")["outcome"], "skipped");
    fleet.restart(None)?;

    // A world-readable key and a stopped agent.
    drop(run);
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        agent.state.join("identity/key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let out = agent.cmd()?.arg("check").output()?;
    assert_eq!(out.status.code(), Some(1));
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("\u{d7} host identity is present and consistent")
            && human.contains("chmod 600"),
        "{human}"
    );
    std::fs::set_permissions(
        agent.state.join("identity/key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    let out = agent.cmd()?.arg("check").output()?;
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("\u{d7} supervisor is running")
            && human.contains("hint: systemctl start linkmesh-agent"),
        "{human}"
    );
    Ok(())
}
