//! The collector outlives the agent: the upgrade drill under live OTLP
//! load, and the faults around the collector runtime's own unit.

use linkmesh_integration::drill::{Drill, check};

type R = anyhow::Result<()>;

/// The seeds' upgrade order walked with a steady load into the collector:
/// server, runtime, the agent by every install method, the agent killed,
/// the server away for a minute. Nothing is lost, the collector restarts
/// only for its own upgrade, the identity and instance uid never change.
#[test]
fn the_upgrade_drill_loses_no_telemetry() -> R {
    let drill = Drill::setup("lm-drill")?;
    let outcome = drill.run()?;
    eprintln!("{}", serde_json::to_string_pretty(&outcome.figures())?);
    check(&outcome)
}

use std::time::{Duration, Instant};

use linkmesh_integration::{
    harness::{SERVER_IN_HOST, enrol_in_host, install_agent_server_and_runtime},
    testhost::TestHost,
};

/// Waits (at most `limit`) until `script`'s output satisfies `ok`.
fn wait_for(
    host: &TestHost,
    limit: Duration,
    script: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let out = host.exec(script)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if ok(&text) {
            return Ok(text);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "waited {limit:?} on `{script}`, last: {text}\nagent:\n{}\ncollector:\n{}",
            host.journal(Some("linkmesh-agent"), "-n 30"),
            host.journal(Some("linkmesh-collector"), "-n 15")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A host running the shipped agent unit, enrolled with a reference server
/// on its own loopback (started with `serve_args`), its collector up.
fn agent_host(name: &str, serve_args: &str) -> anyhow::Result<TestHost> {
    let host = TestHost::boot(name)?;
    install_agent_server_and_runtime(&host)?;
    linkmesh_integration::harness::install_agent_unit(
        &host,
        "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:4318\nexporters:\n  nop:\nservice:\n  pipelines:\n    logs: {receivers: [otlp], exporters: [nop]}\n",
    )?;
    enrol_in_host(&host, serve_args)?;
    host.sh("systemctl daemon-reload && systemctl enable --now linkmesh-agent")?;
    collector(&host)?;
    Ok(host)
}

/// The supervisor's and the collector's pids once both run: the collector
/// is the supervisor's child listening on the local config's OTLP port
/// (its short bootstrap run, also the supervisor's child, listens on
/// nothing, so it is never taken for the collector).
fn collector(host: &TestHost) -> anyhow::Result<(String, String)> {
    let text = wait_for(
        host,
        Duration::from_secs(60),
        "p=$(systemctl show -p MainPID --value linkmesh-collector); c=$(ss -Hltnp 'sport = :4318' | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2); test -n \"$c\" && test \"$(ps -o ppid= -p $c | tr -d ' ')\" = \"$p\" && echo $p $c",
        |t| t.split_whitespace().count() == 2 && !t.starts_with("0 "),
    )?;
    let mut w = text.split_whitespace().map(str::to_owned);
    Ok((w.next().unwrap_or_default(), w.next().unwrap_or_default()))
}

fn status(host: &TestHost) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &host.sh("linkmesh-agent status --json")?,
    )?)
}

/// The collector runtime's unit under everything that happens to the agent,
/// and the faults the issue lists: a second agent, an agent killed in a
/// reload, `runtime stop`/`start`, a supervisor that cannot start, and a
/// reboot with the server down and the agent disabled.
#[test]
fn the_collector_unit_survives_the_agent_and_its_faults() -> R {
    let mut host = agent_host("lm-cont", "")?;
    let (sup, col) = collector(&host)?;
    let s = status(&host)?;
    assert_eq!(
        s["runtime"]["supervision"]["unit"], "linkmesh-collector.service",
        "{s}"
    );
    assert_eq!(s["runtime"]["supervision"]["state"], "running", "{s}");
    assert_eq!(
        s["runtime"]["supervision"]["pid"].to_string(),
        sup,
        "the agent reads the supervisor's pid from systemd: {s}"
    );
    wait_for(
        &host,
        Duration::from_secs(10),
        "linkmesh-agent status --json",
        |t| {
            serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| {
                v["runtime"]["supervision"]["collector_pid"] == col.parse::<u64>().unwrap_or(0)
            })
        },
    )?;
    let enabled = host.sh("systemctl is-enabled linkmesh-collector")?;
    assert_eq!(enabled.trim(), "enabled");

    // Restart, stop and start, SIGKILL: the collector is untouched.
    for step in [
        "systemctl restart linkmesh-agent",
        "systemctl stop linkmesh-agent && systemctl start linkmesh-agent",
        "systemctl kill -s SIGKILL linkmesh-agent && sleep 3",
    ] {
        host.sh(step)?;
        if !step.contains("SIGKILL") {
            // `systemctl start` returns at READY (Type=notify): by then the
            // status file already names the new agent, so the one-liner's
            // `check` right after a restart sees it running.
            let s = status(&host)?;
            let main_pid = host.sh("systemctl show -p MainPID --value linkmesh-agent")?;
            assert_eq!(s["runtime"]["agent_running"], true, "{step}: {s}");
            assert_eq!(
                s["runtime"]["agent_pid"].to_string(),
                main_pid.trim(),
                "{step}: {s}"
            );
        }
        wait_for(
            &host,
            Duration::from_secs(30),
            "systemctl is-active linkmesh-agent",
            |t| t.trim() == "active",
        )?;
        assert_eq!(collector(&host)?, (sup.clone(), col.clone()), "{step}");
    }

    // Two agents at once: the second refuses, one supervisor runs.
    let out = host.exec("linkmesh-agent run")?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another linkmesh-agent run already manages"),
        "{err}"
    );
    assert_eq!(host.sh("pgrep -c -x opampsupervisor")?.trim(), "1");

    // Killed in the middle of a reload that restarts the runtime: the next
    // agent finds the unit, and one supervisor runs the new configuration.
    std::fs::copy(
        host.path("/etc/linkmesh/collector.yaml"),
        host.path("/etc/linkmesh/other.yaml"),
    )?;
    std::fs::write(
        host.path("/etc/linkmesh/agent.toml"),
        "[runtime]\ncollector_config = \"/etc/linkmesh/other.yaml\"\n",
    )?;
    host.sh("systemctl kill -s SIGHUP linkmesh-agent; sleep 0.3; systemctl kill -s SIGKILL linkmesh-agent",
    )?;
    wait_for(
        &host,
        Duration::from_secs(30),
        "systemctl is-active linkmesh-agent",
        |t| t.trim() == "active",
    )?;
    collector(&host)?;
    wait_for(
        &host,
        Duration::from_secs(30),
        "pgrep -c -x opampsupervisor; cat /proc/$(systemctl show -p MainPID --value linkmesh-collector)/cmdline | tr '\\0' ' '",
        |t| t.starts_with("1\n"),
    )?;
    assert!(
        host.sh("cat /var/lib/linkmesh-agent/supervisor.yaml")?
            .contains("/etc/linkmesh/other.yaml")
    );

    // runtime stop: gone, and it stays gone across an agent restart.
    let out = host.sh("linkmesh-agent runtime stop")?;
    assert!(out.contains("stopped and disabled"), "{out}");
    host.sh("systemctl restart linkmesh-agent")?;
    wait_for(
        &host,
        Duration::from_secs(20),
        "linkmesh-agent status --json",
        |t| t.contains("\"state\":\"stopped\""),
    )?;
    assert_eq!(
        host.exec("pgrep -c -x opampsupervisor")?.stdout,
        b"0\n",
        "runtime stop did not stop it"
    );
    assert_eq!(
        String::from_utf8_lossy(&host.exec("systemctl is-enabled linkmesh-collector")?.stdout)
            .trim(),
        "disabled"
    );
    host.sh("linkmesh-agent runtime start")?;
    collector(&host)?;

    // A supervisor that cannot start: systemd gives up, the agent says why
    // and does not start it again by itself.
    std::fs::write(
        host.path("/usr/local/bin/broken-supervisor"),
        "#!/bin/sh\necho 'error: bad configuration' >&2\nexit 1\n",
    )?;
    host.sh("chmod 755 /usr/local/bin/broken-supervisor")?;
    std::fs::write(
        host.path("/etc/linkmesh/agent.toml"),
        "[runtime]\nsupervisor = \"/usr/local/bin/broken-supervisor\"\n",
    )?;
    host.sh("systemctl reload linkmesh-agent")?;
    let s = wait_for(
        &host,
        Duration::from_secs(60),
        "linkmesh-agent status --json",
        |t| t.contains("\"state\":\"failed\""),
    )?;
    let v: serde_json::Value = serde_json::from_str(&s)?;
    let reason = v["runtime"]["supervision"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("start limit") && reason.contains("exit code 1"),
        "{}",
        v["runtime"]["supervision"]
    );
    let before = host.sh("systemctl show -p NRestarts,ActiveState linkmesh-collector")?;
    std::thread::sleep(Duration::from_secs(6));
    let after = host.sh("systemctl show -p NRestarts,ActiveState linkmesh-collector")?;
    assert_eq!(before, after, "the failed unit was started again");
    assert!(after.contains("ActiveState=failed"), "{after}");
    let check = host.exec("linkmesh-agent check")?;
    assert!(!check.status.success());
    // Fixed and reloaded: running again.
    std::fs::remove_file(host.path("/etc/linkmesh/agent.toml"))?;
    host.sh("systemctl reload linkmesh-agent")?;
    let (_, col) = collector(&host)?;

    // Rebooted with the server down and the agent disabled: the collector
    // comes up on its own with its last configuration.
    host.sh("systemctl stop lm-fleet; systemctl disable --quiet linkmesh-agent")?;
    host.reboot()?;
    let (_, col_after) = collector(&host)?;
    assert_ne!(col_after, col, "a new boot, a new process");
    assert_eq!(
        host.sh("systemctl is-active linkmesh-agent || true")?
            .trim(),
        "inactive"
    );
    wait_for(
        &host,
        Duration::from_secs(30),
        "curl -s -o /dev/null -w '%{http_code}' -H 'Content-Type: application/json' --data-binary '{\"resourceLogs\":[]}' http://127.0.0.1:4318/v1/logs || true",
        |t| t.trim() == "200",
    )?;
    Ok(())
}

/// Renewal does not restart the supervisor: it re-reads the files at its
/// next handshake (`reload_interval` in its TLS settings). Proved with the
/// real one: after the agent renews, the server restarts, and the same
/// supervisor process reconnects presenting the new certificate's serial.
/// A new remote configuration does not restart it either.
#[test]
fn the_supervisor_presents_the_renewed_certificate_without_a_restart() -> R {
    let host = agent_host("lm-renew", "--cert-lifetime 40s")?;
    let (sup, _) = collector(&host)?;
    let serial = |h: &TestHost| -> anyhow::Result<String> {
        Ok(
            h.sh("openssl x509 -noout -serial -in /var/lib/linkmesh-agent/identity/cert.pem")?
                .trim()
                .trim_start_matches("serial=")
                .to_owned(),
        )
    };
    let first = serial(&host)?;
    let renewed = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = serial(&host)?;
            if now != first {
                break now;
            }
            anyhow::ensure!(Instant::now() < deadline, "no renewal within 60 s");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    // The supervisor re-reads its certificate files every 5 s (its TLS
    // `reload_interval`). Each restart of the server makes it connect
    // again; once it has re-read them, that connection presents the
    // renewed certificate. A few restarts at most, bounded.
    let presented = |h: &TestHost| -> Vec<String> {
        h.journal(Some("lm-fleet"), "-o cat")
            .lines()
            .filter(|l| l.contains("OpAMP connection opened"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("cert_serial="))
                    .map(|s| s.trim_matches('"').to_ascii_uppercase())
            })
            .collect()
    };
    // The first connection presented the first certificate (and so the
    // server's serials and openssl's are written alike).
    let first = first.to_ascii_uppercase();
    anyhow::ensure!(
        presented(&host).contains(&first),
        "no connection presented {first}: {:?}",
        presented(&host)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let before = presented(&host).len();
        host.sh(&format!(
            "systemctl stop lm-fleet; {SERVER_IN_HOST} --cert-lifetime 40s"
        ))?;
        let new = loop {
            let all = presented(&host);
            if all.len() > before {
                break all[before..].to_vec();
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the supervisor did not connect again:\n{}",
                host.journal(Some("lm-fleet"), "-n 20")
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // A renewed one (`renewed`, or a later renewal's).
        if new.iter().any(|s| *s != first) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the supervisor kept presenting {first}, not the renewed {renewed}"
        );
    }
    assert_eq!(collector(&host)?.0, sup, "the supervisor was restarted");

    // A new remote configuration travels over OpAMP: applied, and the same
    // supervisor still runs.
    std::fs::write(
        host.path("/root/remote.yaml"),
        "exporters:\n  debug:\n    verbosity: basic\nservice:\n  pipelines:\n    logs: {receivers: [otlp], exporters: [nop, debug]}\n",
    )?;
    host.sh("linkmesh-fleet collector-config set --state /var/lib/fleet --file /root/remote.yaml")?;
    wait_for(
        &host,
        Duration::from_secs(60),
        "linkmesh-fleet hosts --state /var/lib/fleet --json",
        |t| {
            serde_json::from_str::<serde_json::Value>(t).is_ok_and(|v| {
                v.as_array()
                    .and_then(|h| h.first())
                    .is_some_and(|h| h["opamp"]["remote_config_status"] == "applied")
            })
        },
    )?;
    assert_eq!(
        collector(&host)?.0,
        sup,
        "a remote configuration restarted the supervisor"
    );
    Ok(())
}
