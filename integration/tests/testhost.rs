//! Throw-away hosts with real systemd, and the agent as a systemd service on
//! one: Type=notify readiness, journald logging with structured fields.

use std::time::Duration;

use linkmesh_integration::{
    harness::{enrol_in_host, install_agent_server_and_runtime},
    testhost::TestHost,
};

type R = anyhow::Result<()>;

#[test]
fn a_throw_away_host_boots_systemd_and_leaves_no_trace() -> R {
    let before = std::fs::read_to_string("/etc/hostname")?;
    let host = TestHost::boot("lm-boot")?;
    let out = host.exec("systemctl is-system-running; hostname; cat /proc/1/comm; test -f /run/systemd/system && echo systemd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("systemd\n") && text.contains("lm-boot"),
        "{text}"
    );
    // Writes go to the host's overlay, never to this machine.
    host.exec("echo changed > /etc/linkmesh-probe")?;
    assert!(!std::path::Path::new("/etc/linkmesh-probe").exists());
    assert_eq!(
        std::fs::read_to_string(host.path("/etc/linkmesh-probe"))?,
        "changed\n"
    );
    // Its own cgroups, so two hosts' systemd never share unit cgroups.
    let pid1 = host.pid1();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid1}/cgroup"))?;
    let own: Vec<String> = cgroups
        .lines()
        .filter_map(|l| l.split(':').nth(2))
        .filter(|p| p.contains("/linkmesh-testhost-lm-boot-"))
        .map(str::to_owned)
        .collect();
    assert!(
        cgroups.contains("name=systemd:/linkmesh-testhost-lm-boot-"),
        "{cgroups}"
    );
    let mounted: Vec<std::path::PathBuf> = ["systemd", "unified", "pids"]
        .iter()
        .filter_map(|h| {
            let line = cgroups.lines().find(|l| {
                let ctrl = l.split(':').nth(1).unwrap_or_default();
                ctrl == *h || ctrl == format!("name={h}") || (ctrl.is_empty() && *h == "unified")
            })?;
            let path = line.split(':').nth(2)?;
            Some(std::path::PathBuf::from(format!(
                "/sys/fs/cgroup/{h}{path}"
            )))
        })
        .collect();
    assert!(
        !own.is_empty() && mounted.iter().all(|d| d.is_dir()),
        "{mounted:?}"
    );
    drop(host);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid1}")).exists(),
        "PID 1 of the host survived"
    );
    for d in &mounted {
        assert!(!d.exists(), "{} survived the host", d.display());
    }
    assert_eq!(std::fs::read_to_string("/etc/hostname")?, before);
    Ok(())
}

#[test]
fn the_agent_runs_as_a_notify_service_and_logs_to_journald() -> R {
    let host = TestHost::boot("lm-agent")?;
    install_agent_server_and_runtime(&host)?;
    enrol_in_host(&host, "")?;
    // Child mode, the fallback where systemd is not the service manager,
    // chosen here under systemd: the supervisor's output is the agent's.
    std::fs::create_dir_all(host.path("/etc/linkmesh"))?;
    std::fs::write(
        host.path("/etc/linkmesh/agent.toml"),
        "[runtime]\nmode = \"child\"\n",
    )?;

    let unit = "[Unit]\nDescription=LinkMesh agent (probe unit)\n[Service]\nType=notify\nExecStartPre=/usr/bin/linkmesh-agent config check\nExecStart=/usr/bin/linkmesh-agent run\nExecReload=/bin/kill -HUP $MAINPID\nWatchdogSec=10\nKillMode=mixed\nRestartPreventExitStatus=64\n";
    std::fs::write(host.path("/etc/systemd/system/lm-agent.service"), unit)?;
    let out = host.exec("systemctl daemon-reload && systemctl start lm-agent.service && systemctl show -p ActiveState,SubState,StatusText lm-agent.service")?;
    let show = String::from_utf8_lossy(&out.stdout).into_owned();
    // `systemctl start` of a notify unit returns once READY=1 arrived.
    assert!(
        out.status.success() && show.contains("ActiveState=active"),
        "{show}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        show.contains("StatusText=opampsupervisor running"),
        "READY came before the runtime started: {show}"
    );

    // Reports reach the server; the agent's records go to journald with fields.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = host.exec("linkmesh-fleet drift --state /var/lib/fleet --json")?;
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if d["hosts"][0]["runtime_kind"] == "otelcol" {
            assert_eq!(d["hosts"][0]["hostname"], "lm-agent");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report reached the server: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let journal = host.journal(Some("lm-agent.service"), "-o verbose");
    assert!(journal.contains("MESSAGE=Agent ready"), "{journal}");
    assert!(
        journal.contains("SYSLOG_IDENTIFIER=linkmesh-agent"),
        "{journal}"
    );
    assert!(
        journal.contains("CHILD=opampsupervisor"),
        "child output lacks its structured field:\n{journal}"
    );
    assert!(journal.contains("PRIORITY=6"), "{journal}");

    // systemctl stop: clean, and the supervisor and collector are gone.
    let out = host.exec("systemctl stop lm-agent.service; systemctl show -p ActiveState,Result lm-agent.service; pgrep -c -f '[o]pampsupervisor|[o]telcol-contrib' || true")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("ActiveState=inactive") && text.contains("Result=success"),
        "{text}"
    );
    assert!(
        text.trim_end().ends_with('0'),
        "processes left behind: {text}"
    );
    let journal = host.journal(Some("lm-agent.service"), "-o verbose");
    assert!(
        journal.contains("MESSAGE=Stopped child") && journal.contains("SIGNAL=SIGINT"),
        "{journal}"
    );
    Ok(())
}

#[test]
fn hosts_enrol_over_a_veth_link_to_the_server_namespace() -> R {
    use linkmesh_integration::{harness::binary, testhost::SERVER_ADDR};
    let (_dir, mut net, fleet) =
        linkmesh_integration::testhost::server_across_the_veth("veth", &[])?;
    assert_eq!(fleet.url, format!("https://{SERVER_ADDR}:8443"));
    let mut hosts = Vec::new();
    for name in ["lm-net-a", "lm-net-b"] {
        let host = TestHost::boot(name)?;
        let addr = net.attach(&host)?;
        host.copy_in(&binary("linkmesh-agent")?, "/usr/bin/linkmesh-agent", 0o755)?;
        let t = fleet.token(1, "1h")?;
        std::fs::write(host.path("/root/token"), &t.token)?;
        let out = host.exec(&format!(
            "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token",
            fleet.url, t.ca_pin
        ))?;
        assert!(
            out.status.success(),
            "{name} ({addr}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        hosts.push((host, addr));
    }
    let listed = fleet.hosts()?;
    let names: Vec<&str> = listed
        .iter()
        .filter_map(|h| h["hostname"].as_str())
        .collect();
    assert_eq!(names.len(), 2, "{listed:?}");
    assert!(
        names.contains(&"lm-net-a") && names.contains(&"lm-net-b"),
        "{names:?}"
    );
    // The hosts see nothing but the test network: no route elsewhere.
    let out = hosts[0].0.exec("ip route")?;
    let routes = String::from_utf8_lossy(&out.stdout);
    assert!(!routes.contains("default"), "{routes}");
    Ok(())
}

/// One proxy rule for every connection (issue 16, item 1): with `[proxy]
/// url` set, enrolment, reports and the supervisor's OpAMP connection all
/// reach the server through the HTTP CONNECT proxy. The proxy runs in the
/// server's namespace, so the server sees what came through it from the
/// proxy's address and what came directly from the host's.
#[test]
fn enrolment_reports_and_the_supervisor_all_go_through_the_proxy() -> R {
    use linkmesh_integration::{
        harness::{QUIET_COLLECTOR_CONFIG, Tinyproxy, binary, install_runtime},
        testhost::SERVER_ADDR,
    };
    let (dir, mut net, fleet) =
        linkmesh_integration::testhost::server_across_the_veth("proxy", &[])?;
    let proxy = Tinyproxy::start(
        dir.path(),
        SERVER_ADDR,
        3128,
        "192.0.2.0/24",
        "8443",
        Some(net.netns()),
    )?;
    let host = TestHost::boot("lm-proxy")?;
    let host_addr = net.attach(&host)?;
    host.copy_in(&binary("linkmesh-agent")?, "/usr/bin/linkmesh-agent", 0o755)?;
    install_runtime(&host)?;
    linkmesh_integration::harness::install_agent_unit(&host, QUIET_COLLECTOR_CONFIG)?;
    std::fs::write(
        host.path("/etc/linkmesh/agent.toml"),
        format!("[proxy]\nurl = \"{}\"\n", proxy.url),
    )?;
    let t = fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    host.sh(&format!(
        "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && systemctl daemon-reload && systemctl enable --now linkmesh-agent",
        fleet.url, t.ca_pin
    ))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let hosts = fleet.hosts()?;
        if hosts
            .first()
            .is_some_and(|h| h["opamp"]["connected"] == true)
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no OpAMP connection through the proxy: {hosts:?}\nproxy:\n{}\ncollector:\n{}",
            proxy.log_text(),
            host.journal(Some("linkmesh-collector"), "-n 30")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let unit_text =
        std::fs::read_to_string(host.path("/etc/systemd/system/linkmesh-collector.service"))?;
    assert!(
        unit_text.contains(&format!("Environment=\"HTTPS_PROXY={}\"", proxy.url)),
        "{unit_text}"
    );
    // The server saw the supervisor's OpAMP connections come from the
    // proxy, never from the host itself.
    let log = fleet.log();
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("OpAMP connection opened"))
        .collect();
    assert!(!opened.is_empty(), "{log}");
    let host_ip = host_addr.split('/').next().unwrap_or(&host_addr).to_owned();
    for line in &opened {
        assert!(
            line.contains(&format!("Some({SERVER_ADDR}:")),
            "not through the proxy: {line}"
        );
        assert!(!line.contains(&format!("Some({host_ip}:")), "{line}");
    }
    // Enrolment, reports and OpAMP: at least three tunnels.
    let tunnels = proxy
        .log_text()
        .matches(&format!("Established connection to host \"{SERVER_ADDR}\""))
        .count();
    assert!(tunnels >= 3, "{}", proxy.log_text());
    let st: serde_json::Value = serde_json::from_str(&host.sh("linkmesh-agent status --json")?)?;
    assert!(
        st["runtime"]["reporter"]["reports"].as_u64() >= Some(1),
        "{st}"
    );
    assert_eq!(
        st["runtime"]["reporter"]["proxy"],
        format!("{SERVER_ADDR}:3128 via proxy.url").as_str(),
        "{st}"
    );
    Ok(())
}

#[test]
fn alloy_is_detected_watched_and_an_upgrade_without_restart_shows() -> R {
    use linkmesh_integration::harness::binary;
    let host = TestHost::boot("lm-alloy")?;
    host.copy_in(&binary("linkmesh-agent")?, "/usr/bin/linkmesh-agent", 0o755)?;
    host.copy_in(&binary("standin-alloy")?, "/usr/bin/alloy", 0o755)?;
    // As the Alloy package lays it out (runtimes.md §3.2), on a non-default port.
    std::fs::write(
        host.path("/etc/default/alloy"),
        "CONFIG_FILE=\"/etc/alloy/config.alloy\"\nCUSTOM_ARGS=\"--server.http.listen-addr=127.0.0.1:12399\"\nRESTART_ON_UPGRADE=true\n",
    )?;
    std::fs::create_dir_all(host.path("/etc/alloy"))?;
    std::fs::write(
        host.path("/etc/alloy/config.alloy"),
        "// managed remotely\nremotecfg {\n  url = \"https://fleet.example/api\"\n  id  = constants.hostname\n}\n",
    )?;
    let out = host.exec(
        "systemd-run --unit alloy --quiet --setenv=LINKMESH_STANDIN_ALLOY_VERSION=v1.17.0 \
         /usr/bin/alloy run --server.http.listen-addr=127.0.0.1:12399 /etc/alloy/config.alloy && \
         for i in $(seq 50); do curl -fs http://127.0.0.1:12399/-/ready >/dev/null 2>&1 && break; sleep 0.1; done; \
         linkmesh-agent detect --json",
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(d["kind"], "alloy", "{d}");
    let a = &d["alloy"];
    // The binary on disk is v1.18.1 (the stand-in's default); the running one started as v1.17.0.
    assert_eq!(a["executable"]["version"], "v1.18.1", "{a}");
    assert_eq!(a["running_version"], "v1.17.0", "{a}");
    assert_eq!(a["restart_pending"], true, "{a}");
    assert_eq!(a["remotecfg"]["url"], "https://fleet.example/api");
    assert_eq!(a["remotecfg"]["id"], "constants.hostname");
    assert_eq!(a["executable"]["unit"]["active"], "active", "{a}");
    let human = host.exec("linkmesh-agent detect")?;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("restart pending"), "{text}");
    // After a restart the running version matches.
    let out = host.exec(
        "systemctl stop alloy && systemd-run --unit alloy2 --quiet /usr/bin/alloy run --server.http.listen-addr=127.0.0.1:12399 /etc/alloy/config.alloy && \
         for i in $(seq 50); do curl -fs http://127.0.0.1:12399/-/ready >/dev/null 2>&1 && break; sleep 0.1; done; linkmesh-agent detect --json",
    )?;
    let d: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(d["alloy"]["running_version"], "v1.18.1", "{d}");
    assert_eq!(d["alloy"]["restart_pending"], false);
    // The transient alloy.service is gone now: a state, not systemctl's error text.
    assert_eq!(
        d["alloy"]["executable"]["unit"]["enabled"], "not-found",
        "{d}"
    );

    // `run` watches Alloy (never runs it) and reports it to the server.
    host.copy_in(
        &binary("linkmesh-fleet")?,
        "/usr/local/bin/linkmesh-fleet",
        0o755,
    )?;
    enrol_in_host(&host, "--pin-alloy v1.18.1")?;
    let out =
        host.exec("systemd-run --unit lm-agent --quiet linkmesh-agent run --alloy-poll 1s")?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = host.exec("linkmesh-fleet drift --state /var/lib/fleet --json")?;
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let h = &d["hosts"][0];
        if h["runtime_kind"] == "alloy" {
            assert_eq!(h["runtime_version"], "v1.18.1", "{d}");
            assert_eq!(h["runtime_at_pin"], true, "{d}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no Alloy report reached the server: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = host.exec("linkmesh-agent status --json")?;
    let st: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(st["runtime"]["kind"], "alloy", "{st}");
    assert_eq!(
        st["runtime"]["supervision"],
        serde_json::Value::Null,
        "the agent must not run Alloy"
    );
    Ok(())
}

#[test]
fn the_shipped_unit_runs_the_agent_sandboxed_and_scores_low_exposure() -> R {
    let unit =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/linkmesh-agent.service");
    // The exposure score of the shipped file (systemd-analyze scores it offline).
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("linkmesh-agent.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no exposure score in:\n{text}"))?;
    assert!(score <= 2.0, "exposure {score}");
    // The collector runtime's unit, as the agent renders it.
    let collector = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../src/supervisor/testdata/linkmesh-collector.golden.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&collector)
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let collector_score: f64 = text
        .lines()
        .find_map(|l| l.split("linkmesh-collector.golden.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no exposure score in:\n{text}"))?;
    eprintln!("exposure: agent {score}, collector runtime {collector_score}");
    assert!(
        collector_score <= 2.5,
        "collector exposure {collector_score}"
    );

    let host = TestHost::boot("lm-unit")?;
    install_agent_server_and_runtime(&host)?;
    host.copy_in(&unit, "/etc/systemd/system/linkmesh-agent.service", 0o644)?;
    // Not enrolled: the unit is skipped by its condition, not failed.
    let out = host.exec("systemctl daemon-reload && systemctl start linkmesh-agent; systemctl show -p ActiveState,ConditionResult,Result linkmesh-agent")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("ConditionResult=no")
            && text.contains("ActiveState=inactive")
            && text.contains("Result=success"),
        "{text}"
    );

    enrol_in_host(&host, "")?;
    let out = host.exec("systemctl start linkmesh-agent && systemctl show -p ActiveState,StatusText,MainPID linkmesh-agent")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && text.contains("ActiveState=active")
            && text.contains("StatusText=opampsupervisor running"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main_pid = text
        .lines()
        .find_map(|l| l.strip_prefix("MainPID="))
        .unwrap_or("0")
        .to_owned();

    // Under the sandbox it still supervises, writes its state and reports.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = host.exec("linkmesh-fleet drift --state /var/lib/fleet --json")?;
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if d["hosts"][0]["runtime_kind"] == "otelcol" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no report under the sandbox: {d}\n{}",
            host.journal(Some("linkmesh-agent"), "")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        host.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml")
            .exists()
    );

    // Reload: configuration checked, same process, supervisor left alone.
    // `systemctl reload` returns once SIGHUP is sent; the agent's own line
    // says the reload is done, then the unit is active again, same process.
    const UNCHANGED: &str = "Collector runtime's unit unchanged; not restarting it";
    let seen = host
        .journal(Some("linkmesh-agent"), "")
        .matches(UNCHANGED)
        .count();
    host.sh("systemctl reload linkmesh-agent")?;
    host.wait_journal(
        "linkmesh-agent",
        "the reload's line",
        Duration::from_secs(10),
        |j| j.matches(UNCHANGED).count() > seen,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = host.sh("systemctl show -p ActiveState,MainPID linkmesh-agent")?;
        assert!(text.contains(&format!("MainPID={main_pid}")), "{text}");
        if text.contains("ActiveState=active") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let collector_before = host.exec("systemctl show -p MainPID --value linkmesh-collector")?;
    let collector_before = String::from_utf8_lossy(&collector_before.stdout)
        .trim()
        .to_owned();
    assert_ne!(collector_before, "0");

    // Bad configuration: exit 64 from the pre-start check, no restart loop.
    std::fs::write(
        host.path("/etc/linkmesh/agent.toml"),
        "[report]\ninterval = \"never\"\n",
    )?;
    let out = host.exec("systemctl restart linkmesh-agent; sleep 3; systemctl show -p ActiveState,NRestarts,ExecMainStatus linkmesh-agent")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("ActiveState=failed") && text.contains("NRestarts=0"),
        "{text}"
    );
    assert!(
        host.journal(Some("linkmesh-agent"), "")
            .contains("report.interval"),
        "the journal names the bad key"
    );
    // The collector runtime has a unit of its own: the failed agent left it.
    let out = host.exec("systemctl show -p ActiveState,MainPID linkmesh-collector")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("ActiveState=active")
            && text.contains(&format!("MainPID={collector_before}")),
        "{text}"
    );
    Ok(())
}

/// OTLP traces, metrics and logs sent to the collector the agent supervises
/// on a throw-away host (the shipped unit, the real supervisor and
/// collector, the fleet server in its own namespace across the veth) land
/// at the collector's file exporter, and nowhere in the fleet server: the
/// server configures the collector, telemetry never passes through it.
#[test]
fn telemetry_flows_from_the_collector_to_its_sink_never_through_the_server() -> R {
    use linkmesh_integration::harness::{binary, install_runtime};
    let (_dir, mut net, fleet) =
        linkmesh_integration::testhost::server_across_the_veth("telemetry", &[])?;
    let host = TestHost::boot("lm-telemetry")?;
    net.attach(&host)?;
    host.copy_in(&binary("linkmesh-agent")?, "/usr/bin/linkmesh-agent", 0o755)?;
    install_runtime(&host)?;
    let unit =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/linkmesh-agent.service");
    host.copy_in(&unit, "/etc/systemd/system/linkmesh-agent.service", 0o644)?;
    let sink = "/var/lib/linkmesh-collector/telemetry.jsonl";
    std::fs::create_dir_all(host.path("/etc/linkmesh"))?;
    std::fs::write(
        host.path("/etc/linkmesh/collector.yaml"),
        format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:4318\nexporters:\n  file:\n    path: {sink}\n    flush_interval: 100ms\nservice:\n  pipelines:\n    traces: {{receivers: [otlp], exporters: [file]}}\n    metrics: {{receivers: [otlp], exporters: [file]}}\n    logs: {{receivers: [otlp], exporters: [file]}}\n"
        ),
    )?;
    let t = fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let out = host.exec(&format!(
        "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && systemctl daemon-reload && systemctl start linkmesh-agent",
        fleet.url, t.ca_pin
    ))?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let marker = format!("lm-marker-{}", std::process::id());
    let bodies = [
        (
            "traces",
            format!(
                r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"{marker}-svc"}}}}]}},"scopeSpans":[{{"spans":[{{"traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174","name":"{marker}-span","kind":1,"startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000001000000000"}}]}}]}}]}}"#
            ),
        ),
        (
            "metrics",
            format!(
                r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"{marker}-metric","gauge":{{"dataPoints":[{{"asInt":"42","timeUnixNano":"1700000000000000000"}}]}}}}]}}]}}]}}"#
            ),
        ),
        (
            "logs",
            format!(
                r#"{{"resourceLogs":[{{"scopeLogs":[{{"logRecords":[{{"timeUnixNano":"1700000000000000000","body":{{"stringValue":"{marker}-log"}}}}]}}]}}]}}"#
            ),
        ),
    ];
    // The receiver listens once the supervisor has bootstrapped the collector.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (signal, body) in &bodies {
        std::fs::write(host.path(&format!("/root/{signal}.json")), body)?;
        loop {
            let out = host.exec(&format!(
                "curl -fsS -m 5 -H 'Content-Type: application/json' --data-binary @/root/{signal}.json http://127.0.0.1:4318/v1/{signal}"
            ))?;
            if out.status.success() {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "OTLP {signal} not accepted: {}\n{}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                host.journal(Some("linkmesh-agent"), ""),
                host.journal(Some("linkmesh-collector"), "-n 60"),
                host.exec("ls -la /var/lib/linkmesh-agent/ /var/lib/linkmesh-agent/supervisor; cat /etc/systemd/system/linkmesh-collector.service | grep -v ^#").map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let want = [
        format!("{marker}-span"),
        format!("{marker}-metric"),
        format!("{marker}-log"),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = std::fs::read_to_string(host.path(sink)).unwrap_or_default();
        if want.iter().all(|w| got.contains(w.as_str())) {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "sink has {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The server saw the collector (OpAMP) but none of its telemetry.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while fleet.hosts()?[0]["opamp"]["connected"] != true {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never connected over OpAMP: {:?}\n{}",
            fleet.hosts()?,
            fleet.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut seen = fleet.log();
    for entry in walk(fleet.state()) {
        seen.push_str(&String::from_utf8_lossy(
            &std::fs::read(entry).unwrap_or_default(),
        ));
    }
    assert!(
        !seen.contains(&marker),
        "telemetry reached the fleet server"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
