//! `linkmesh-agent run` supervising the real opampsupervisor and collector
//! (built by scripts/build-runtimes, see `harness::real_runtimes`); faults
//! are real signals. Fixture scripts stand in for the supervisor only where
//! a real one cannot be made to show the fault (dying at once, ignoring
//! SIGINT and SIGTERM, writing hostile output); each test says so.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use linkmesh_integration::harness::{
    AgentEnv, COLLECTOR, Fleet, alive, enrolled_agent, fixture, real_runtimes, runtime_bin_dir,
    scratch, text, wait_gone,
};
use nix::sys::signal::Signal;
use serde_json::Value;

type R = anyhow::Result<()>;

/// Bound on waits: the real supervisor bootstraps its collector before it
/// runs it, and tests run side by side on two cores.
const T: Duration = Duration::from_secs(40);

/// A reference server and an agent enrolled with it, using the real runtime
/// binaries in the returned directory.
fn setup(name: &str) -> anyhow::Result<(tempfile::TempDir, Fleet, std::path::PathBuf, AgentEnv)> {
    let dir = scratch(name)?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "1s"])?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let agent = enrolled_agent(&dir.path().join("agent"), &fleet, &bins, "")?;
    Ok((dir, fleet, bins, agent))
}

/// Points the agent's configuration at a fixture script as its supervisor.
fn use_fixture_supervisor(agent: &AgentEnv, bins: &std::path::Path, name: &str) -> R {
    agent.use_supervisor(bins, &fixture(name))
}

fn running(s: &Value) -> bool {
    s["supervision"]["state"] == "running"
}

fn pid_of(s: &Value, key: &str) -> u32 {
    s["supervision"][key].as_u64().unwrap_or(0) as u32
}

#[test]
fn supervises_streams_logs_and_stops_cleanly() -> R {
    let (_dir, _fleet, _bins, agent) = setup("sup-basic")?;
    let mut run = agent.spawn_run(&[], &[])?;

    let s = run.wait_status(T, "collector running", |s| {
        running(s) && pid_of(s, "collector_pid") > 0
    })?;
    let (sup, col) = (pid_of(&s, "pid"), pid_of(&s, "collector_pid"));
    assert!(alive(sup) && alive(col));
    assert_eq!(s["kind"], "otelcol");
    assert_eq!(s["detection"]["collector"]["version"], "0.158.0");
    // The running version comes from the collector's own telemetry resource.
    run.wait_status(T, "running version seen", |s| {
        s["supervision"]["collector_version"] == "0.158.0"
    })?;
    // The supervisor runs in its own process group.
    let stat = std::fs::read_to_string(format!("/proc/{sup}/stat"))?;
    let pgid: u32 = stat
        .rsplit_once(") ")
        .and_then(|(_, r)| r.split_whitespace().nth(2))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert_eq!(pgid, sup);
    // The supervisor's JSON lines arrive in the agent's log with its name
    // and level; the collector's own lines, which the supervisor passes
    // through at "error" (stderr) or "info" (stdout), with theirs.
    let log = run.wait_log(T, "Everything is ready")?;
    assert!(
        log.lines().any(|l| l.contains(" INFO ")
            && l.contains("Everything is ready. Begin running and processing data.")
            && l.contains("child=\"collector\"")),
        "{log}"
    );
    assert!(log.contains("child=\"opampsupervisor\""), "{log}");
    // The collector's instance id persists in the supervisor's storage, 0600.
    let state = agent.state.join("supervisor/persistent_state.yaml");
    let first_id = std::fs::read_to_string(&state)?;
    assert!(first_id.starts_with("instance_id: "), "{first_id}");
    assert_eq!(
        std::fs::metadata(&state)?.permissions().mode() & 0o777,
        0o600
    );
    // The supervisor's storage is 0700 and the merged config it runs the
    // collector with is 0600 (real-runtimes.md 3.5).
    let storage = agent.state.join("supervisor");
    assert_eq!(
        std::fs::metadata(&storage)?.permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(storage.join("effective.yaml"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    run.signal(Signal::SIGTERM);
    let st = run
        .wait_exit(T)
        .ok_or_else(|| anyhow::anyhow!("agent did not stop:\n{}", run.log_text()))?;
    assert!(st.success(), "{st:?}\n{}", run.log_text());
    assert!(
        wait_gone(sup, Duration::from_secs(2)),
        "supervisor {sup} left running"
    );
    assert!(
        wait_gone(col, Duration::from_secs(2)),
        "collector {col} left running"
    );
    assert_eq!(
        run.status().map(|s| s["supervision"]["state"].clone()),
        Some(Value::from("stopped"))
    );
    let log = run.log_text();
    // SIGINT was the first signal, and the supervisor stopped on it with
    // exit code 0 after its collector (gone, above). The collector's own
    // "Shutdown complete." is not asserted: the supervisor's passthrough of
    // its output races its own exit and dropped that line once in nine runs.
    assert!(log.contains("signal=\"SIGINT\""), "{log}");
    assert!(log.contains("exit=exit code 0"), "{log}");

    // A second run keeps the same collector instance id.
    let run = agent.spawn_run(&[], &[])?;
    run.wait_status(T, "running again", running)?;
    assert_eq!(std::fs::read_to_string(&state)?, first_id);
    Ok(())
}

#[test]
fn a_crashed_supervisor_is_restarted_and_counted() -> R {
    let (_dir, _fleet, _bins, agent) = setup("sup-crash")?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "running", |s| {
        running(s) && pid_of(s, "collector_pid") > 0
    })?;
    let (first, col) = (pid_of(&s, "pid"), pid_of(&s, "collector_pid"));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL);
    let s = run.wait_status(T, "restarted", |s| running(s) && pid_of(s, "pid") != first)?;
    assert_eq!(s["supervision"]["restarts"], 1);
    assert_eq!(s["supervision"]["last_exit"], "killed by SIGKILL");
    // The orphaned collector exits by its own check (every 5 s); the new
    // supervisor runs a new one.
    assert!(
        wait_gone(col, Duration::from_secs(7)),
        "collector {col} orphaned"
    );
    let s = run.wait_status(T, "a new collector", |s| {
        let c = pid_of(s, "collector_pid");
        c > 0 && c != col
    })?;
    assert!(alive(pid_of(&s, "collector_pid")));
    Ok(())
}

#[test]
fn a_crashed_collector_is_restarted_by_the_supervisor_and_shows() -> R {
    let (_dir, _fleet, _bins, agent) = setup("col-crash")?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "collector running", |s| {
        running(s) && pid_of(s, "collector_pid") > 0
    })?;
    let (sup, col) = (pid_of(&s, "pid"), pid_of(&s, "collector_pid"));
    let killed = std::time::Instant::now();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(col as i32), Signal::SIGKILL);
    let s = run.wait_status(T, "crash seen", |s| {
        s["supervision"]["collector_crashes"] == 1
    })?;
    assert_eq!(pid_of(&s, "pid"), sup, "the supervisor itself kept running");
    // opampsupervisor restarts its collector after its own fixed delay
    // (5 s at v0.158.0), which the agent does not shorten and says.
    assert!(
        s["supervision"]["collector_problem"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarts it after its fixed 5 s delay")),
        "{s}"
    );
    let s = run.wait_status(T, "collector back", |s| {
        pid_of(s, "collector_pid") > 0 && pid_of(s, "collector_pid") != col
    })?;
    let delay = killed.elapsed();
    eprintln!("collector SIGKILL to its replacement: {delay:?}");
    assert!(delay >= Duration::from_millis(4500), "{delay:?}");
    assert!(alive(pid_of(&s, "collector_pid")));
    assert_eq!(s["supervision"]["restarts"], 0);
    // The crash and the collector's last lines are kept for the server.
    let p = &s["supervision"]["collector_problem"];
    assert_eq!(
        p["reason"],
        "the collector exited unexpectedly with exit code -1; opampsupervisor restarts it after its fixed 5 s delay",
        "{s}"
    );
    let tail = p["log_tail"].as_array().cloned().unwrap_or_default();
    assert!(!tail.is_empty() && tail.len() <= 20, "log tail: {tail:?}");
    Ok(())
}

/// A fixture stands in for the supervisor: the real one cannot be made to
/// die at once on every start.
#[test]
fn a_crash_loop_backs_off_and_is_flagged() -> R {
    let (_dir, _fleet, bins, agent) = setup("sup-loop")?;
    use_fixture_supervisor(&agent, &bins, "fail_fast.sh")?;
    let run = agent.spawn_run(&[], &[])?;
    let start = std::time::Instant::now();
    let s = run.wait_status(T, "crash loop", |s| {
        s["supervision"]["state"] == "crash_loop"
    })?;
    let elapsed = start.elapsed();
    assert_eq!(s["supervision"]["consecutive_failures"], 5);
    // 100 + 200 + 400 + 800 ms (±20 %) elapse before the fifth start: no tight loop.
    assert!(elapsed >= Duration::from_millis(1200), "{elapsed:?}");
    let delay = s["supervision"]["delay_ms"].as_u64().unwrap_or(0);
    assert!((1280..=1920).contains(&delay), "fifth delay {delay} ms");
    assert!(
        run.log_text().contains("fixture always fails"),
        "{}",
        run.log_text()
    );
    // Still restarting, at growing delays.
    let s = run.wait_status(T, "sixth failure", |s| {
        s["supervision"]["consecutive_failures"] == 6
    })?;
    assert!(s["supervision"]["delay_ms"].as_u64().unwrap_or(0) >= 2560);
    Ok(())
}

/// A fixture stands in for the supervisor: the real one stops on SIGINT
/// (and, at v0.158.0, on SIGTERM too).
#[test]
fn a_supervisor_ignoring_sigint_and_sigterm_is_killed_within_the_grace_period() -> R {
    let (_dir, _fleet, bins, agent) = setup("sup-stubborn")?;
    use_fixture_supervisor(&agent, &bins, "ignore_signals.sh")?;
    let mut run = agent.spawn_run(&["--stop-timeout", "1500ms"], &[])?;
    let s = run.wait_status(T, "running", running)?;
    let sup = pid_of(&s, "pid");
    // The fixture says so once its trap is installed.
    run.wait_log(T, "Ignoring SIGINT and SIGTERM")?;
    let start = std::time::Instant::now();
    run.signal(Signal::SIGTERM);
    // Killed, not waited on forever: the agent exits within a bound well
    // past the grace period, and never before the grace has passed.
    let st = run
        .wait_exit(Duration::from_secs(10))
        .ok_or_else(|| anyhow::anyhow!("agent hung:\n{}", run.log_text()))?;
    let took = start.elapsed();
    assert!(st.success(), "{st:?}");
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    assert!(!alive(sup), "fixture survived");
    assert!(
        run.log_text().contains("signal=\"SIGKILL\""),
        "{}",
        run.log_text()
    );
    Ok(())
}

#[test]
fn sigkill_of_the_agent_leaves_no_orphan_collector() -> R {
    let (_dir, _fleet, _bins, agent) = setup("sup-orphan")?;
    let mut run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "collector running", |s| {
        running(s) && pid_of(s, "collector_pid") > 0
    })?;
    let (sup, col) = (pid_of(&s, "pid"), pid_of(&s, "collector_pid"));
    run.signal(Signal::SIGKILL);
    run.wait_exit(Duration::from_secs(5));
    // The kernel kills the supervisor with the agent (parent-death signal)...
    assert!(
        wait_gone(sup, Duration::from_secs(2)),
        "supervisor {sup} outlived the agent"
    );
    // ...and the collector notices within its orphan-detection interval (5 s).
    assert!(
        wait_gone(col, Duration::from_secs(7)),
        "collector {col} orphaned"
    );
    Ok(())
}

#[test]
fn a_missing_runtime_is_reported_and_picked_up_once_installed() -> R {
    let dir = scratch("sup-missing")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let later = dir.path().join("later");
    std::fs::create_dir_all(&later)?;
    let agent = enrolled_agent(&dir.path().join("agent"), &fleet, &bins, "")?;
    let missing = later.join("opampsupervisor");
    let cfg = std::fs::read_to_string(&agent.config)?
        .replace("[runtime]\n", "[runtime]\nkind = \"otelcol\"\n")
        .replace(
            &bins.join("opampsupervisor").display().to_string(),
            &missing.display().to_string(),
        );
    agent.write_config(&cfg)?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "not runnable", |s| {
        s["supervision"]["state"] == "not_runnable"
    })?;
    let error = s["supervision"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains(&format!("{} does not exist", missing.display())),
        "{error}"
    );
    // Not executable: named too.
    std::fs::write(&missing, "#!/bin/sh\n")?;
    run.wait_status(T, "not executable", |s| {
        s["supervision"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("is not executable"))
    })?;
    // Installed: picked up on a retry, no restart of the agent needed.
    std::fs::remove_file(&missing)?;
    std::os::unix::fs::symlink(bins.join("opampsupervisor"), &missing)?;
    run.wait_status(Duration::from_secs(30), "running once installed", running)?;
    assert!(alive(run.pid()));
    Ok(())
}

/// A fixture stands in for the supervisor: the real one never writes
/// 32 MiB lines or invalid UTF-8.
#[test]
fn hostile_output_is_logged_safely_in_bounded_lines() -> R {
    let (_dir, _fleet, bins, agent) = setup("sup-noisy")?;
    use_fixture_supervisor(&agent, &bins, "noisy.sh")?;
    let run = agent.spawn_run(&[], &[])?;
    let log = run.wait_log(Duration::from_secs(30), "after the flood")?;
    assert!(
        log.contains("bad utf8: \u{fffd}\u{fffd} end"),
        "invalid UTF-8 not replaced"
    );
    assert!(
        log.contains("truncated=1032192"),
        "1 MiB line not truncated to 16 KiB"
    );
    assert!(
        log.contains("truncated=33538048"),
        "32 MiB line not truncated"
    );
    assert!(
        log.contains("WARN after the flood"),
        "level of the JSON line after the flood"
    );
    // Its memory over the flood is a figure of the benchmark
    // (`flood_peak_rss`, release build), not a bound of this debug build.
    Ok(())
}

#[test]
fn sighup_restarts_the_supervisor_only_when_its_configuration_changed() -> R {
    let (dir, _fleet, bins, agent) = setup("sup-hup")?;
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "running", running)?;
    let first = pid_of(&s, "pid");
    let rendered = agent.state.join("supervisor.yaml");
    let before = std::fs::read_to_string(&rendered)?;

    run.signal(Signal::SIGHUP);
    let deadline = std::time::Instant::now() + T;
    while !run
        .log_text()
        .contains("Supervisor configuration unchanged")
    {
        assert!(std::time::Instant::now() < deadline, "{}", run.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(pid_of(&run.status().unwrap_or_default(), "pid"), first);
    assert_eq!(std::fs::read_to_string(&rendered)?, before);

    // Point the agent at another collector path: the rendered config changes.
    let other = dir.path().join("bin2");
    runtime_bin_dir(&other)?;
    let cfg = std::fs::read_to_string(&agent.config)?.replace(
        &bins.join(COLLECTOR).display().to_string(),
        &other.join(COLLECTOR).display().to_string(),
    );
    agent.write_config(&cfg)?;
    run.signal(Signal::SIGHUP);
    let s = run.wait_status(T, "restarted with new config", |s| {
        running(s) && pid_of(s, "pid") != first
    })?;
    assert!(alive(pid_of(&s, "pid")));
    assert!(!alive(first) || wait_gone(first, Duration::from_secs(2)));
    let after = std::fs::read_to_string(&rendered)?;
    assert!(
        after.contains(&other.join(COLLECTOR).display().to_string()),
        "{after}"
    );

    // A broken configuration on reload is refused; the runtime keeps running.
    agent.write_config("[runtime]\nkind = \"docker\"\n")?;
    run.signal(Signal::SIGHUP);
    let deadline = std::time::Instant::now() + T;
    while !run
        .log_text()
        .contains("Reload failed; keeping the running configuration")
    {
        assert!(std::time::Instant::now() < deadline, "{}", run.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(alive(pid_of(&s, "pid")));
    Ok(())
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() -> R {
    let (dir, _fleet, _bins, agent) = setup("sup-notify")?;
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut run = agent.spawn_run(
        &[],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap_or_default()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )?;
    let mut got: Vec<String> = Vec::new();
    let recv_until = |want: &str, got: &mut Vec<String>| -> bool {
        let deadline = std::time::Instant::now() + T;
        let mut buf = [0u8; 4096];
        while std::time::Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.contains(want);
                got.push(msg);
                if hit {
                    return true;
                }
            }
        }
        false
    };
    assert!(recv_until("READY=1", &mut got), "{got:?}");
    let ready = got
        .iter()
        .find(|m| m.contains("READY=1"))
        .cloned()
        .unwrap_or_default();
    assert!(
        ready.contains("STATUS=opampsupervisor running"),
        "READY before the runtime started: {ready}"
    );
    assert!(recv_until("WATCHDOG=1", &mut got), "{got:?}");
    run.signal(Signal::SIGTERM);
    assert!(recv_until("STOPPING=1", &mut got), "{got:?}");
    assert!(run.wait_exit(T).is_some_and(|s| s.success()));
    Ok(())
}

#[test]
fn run_refuses_an_unenrolled_host_and_bad_configuration() -> R {
    let dir = scratch("sup-refuse")?;
    let agent = AgentEnv::new(dir.path())?;
    let out = agent.cmd()?.arg("run").output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not enrolled"),
        "{}",
        text(&out)
    );
    agent.write_config("[report]\ninterval = \"never\"\n")?;
    let out = agent.cmd()?.arg("run").output()?;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    Ok(())
}

/// What the agent relies on in the real binaries, and what runtimes.md
/// records about them, checked against the pinned builds.
#[test]
fn the_real_runtimes_behave_as_the_agent_expects() -> R {
    let dir = scratch("real-facts")?;
    let real = real_runtimes()?;
    let sup = real.join("opampsupervisor");
    let col = real.join(COLLECTOR);
    // No --version: Go's flag package refuses it with exit 2.
    let out = std::process::Command::new(&sup).arg("--version").output()?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("flag provided but not defined: -version"),
        "{err}"
    );
    // --config and --feature-gates are its flags (runtimes.md had the second as unconfirmed).
    assert!(
        err.contains("-config string") && err.contains("-feature-gates"),
        "{err}"
    );
    // The collector prints cobra's `NAME version X`, which the agent parses for any distribution.
    let out = std::process::Command::new(&col).arg("--version").output()?;
    let v = String::from_utf8_lossy(&out.stdout);
    assert_eq!(v, format!("{COLLECTOR} version 0.158.0\n"));
    assert_eq!(
        linkmesh_agent::runtime::parse_otelcol_version(&v),
        Some((COLLECTOR.to_owned(), "0.158.0".to_owned()))
    );
    // It has the featuregate subcommand the supervisor probes, with the gate it looks for.
    let out = std::process::Command::new(&col)
        .arg("featuregate")
        .output()?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("service.AllowNoPipelines"),
        "{}",
        text(&out)
    );
    // Unknown keys are fatal (exit 1, the key named): the agent emits only known ones.
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "server:\n  endpoint: wss://127.0.0.1:1/v1/opamp\nagent:\n  executable: {}\n  run_as: nobody\nstorage:\n  directory: {}\n",
            col.display(),
            dir.path().join("s").display()
        ),
    )?;
    let out = std::process::Command::new(&sup)
        .arg(format!("-config={}", cfg.display()))
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("run_as"),
        "{}",
        text(&out)
    );
    std::fs::write(
        &cfg,
        format!(
            "server:\n  endpoint: tcp://x:1\nagent:\n  executable: {}\n",
            col.display()
        ),
    )?;
    let out = std::process::Command::new(&sup)
        .args(["--config", cfg.to_str().unwrap_or_default()])
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid scheme \"tcp\""),
        "{}",
        text(&out)
    );
    Ok(())
}

/// runtimes.md said SIGTERM kills the supervisor without cleanup; at
/// v0.158.0 it traps SIGTERM like SIGINT and shuts down cleanly, collector
/// first. SIGHUP is not trapped: it kills the supervisor, and the collector
/// exits by its orphan check. Both seen here with the real binaries.
#[test]
fn the_real_supervisor_stops_cleanly_on_sigterm_and_dies_on_sighup() -> R {
    let dir = scratch("real-signals")?;
    let real = real_runtimes()?;
    let local = dir.path().join("local.yaml");
    std::fs::write(
        &local,
        linkmesh_integration::harness::QUIET_COLLECTOR_CONFIG,
    )?;
    for (signal, clean) in [(Signal::SIGTERM, true), (Signal::SIGHUP, false)] {
        let storage = dir.path().join(format!("s-{signal}"));
        let cfg = dir.path().join(format!("{signal}.yaml"));
        // An unreachable server: the collector starts anyway, on the local config.
        std::fs::write(
            &cfg,
            format!(
                "server:\n  endpoint: ws://127.0.0.1:9/v1/opamp\ncapabilities:\n  reports_own_metrics: false\nagent:\n  executable: {}\n  config_files: [{}]\n  orphan_detection_interval: 1s\n  bootstrap_timeout: 30s\n  passthrough_logs: true\nstorage:\n  directory: {}\ntelemetry:\n  logs:\n    level: debug\n",
                real.join(COLLECTOR).display(),
                local.display(),
                storage.display()
            ),
        )?;
        let log = dir.path().join(format!("{signal}.log"));
        let mut child = std::process::Command::new(real.join("opampsupervisor"))
            .arg(format!("--config={}", cfg.display()))
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(
                dir.path().join(format!("{signal}.err")),
            )?)
            .spawn()?;
        let deadline = std::time::Instant::now() + T;
        // Signals are trapped only once bootstrap is over ("Supervisor
        // starting"): before that, SIGTERM and SIGINT kill it outright.
        let col = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let after = text
                .split_once("\"msg\":\"Supervisor starting\"")
                .map_or("", |(_, a)| a);
            let pid = after
                .lines()
                .filter(|l| l.contains("Agent process started"))
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| v["pid"].as_u64())
                .next_back();
            if let Some(p) = pid
                && after.contains("Everything is ready")
            {
                break p as u32;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "collector never ran:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
        let status = child.wait()?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if clean {
            assert_eq!(status.code(), Some(0), "{text}");
            assert!(text.contains("Supervisor shutting down"), "{text}");
            assert!(
                !alive(col),
                "the supervisor returned before its collector stopped"
            );
        } else {
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(Signal::SIGHUP as i32),
                "{text}"
            );
            assert!(!text.contains("Supervisor shutting down"), "{text}");
            assert!(
                wait_gone(col, Duration::from_secs(5)),
                "collector {col} orphaned"
            );
        }
    }
    Ok(())
}

#[test]
fn alloy_build_info_is_read_over_http_from_a_running_alloy() -> R {
    let dir = scratch("alloy")?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(bins.join("alloy"))
        .args([
            "run",
            &format!("--server.http.listen-addr={addr}"),
            "/etc/alloy/config.alloy",
        ])
        .env("LINKMESH_STANDIN_ALLOY_VERSION", "v1.17.0")
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + T;
    let body = loop {
        match linkmesh_agent::runtime::probe::http_get(&addr, "/metrics", Duration::from_secs(2)) {
            Ok(b) => break b,
            Err(e) if std::time::Instant::now() > deadline => anyhow::bail!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        linkmesh_agent::runtime::alloy::build_info_version(&body).as_deref(),
        Some("v1.17.0")
    );
    let out = std::process::Command::new(bins.join("alloy"))
        .arg("--version")
        .output()?;
    let build = linkmesh_agent::runtime::parse_alloy_version(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(build.map(|b| b.version).as_deref(), Some("v1.18.1"));
    Ok(())
}

#[test]
fn status_shows_the_supervised_runtime() -> R {
    let (_dir, _fleet, _bins, agent) = setup("sup-status")?;
    let mut run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "collector running and seen over OpAMP", |s| {
        running(s)
            && pid_of(s, "collector_pid") > 0
            && s["supervision"]["collector_version"].is_string()
            && s["reporter"]["opamp"]["connected"] == true
    })?;
    let st = agent.status()?;
    assert_eq!(st["runtime"]["agent_running"], true, "{st}");
    assert_eq!(st["runtime"]["supervision"]["pid"], s["supervision"]["pid"]);
    let out = agent.cmd()?.arg("status").output()?;
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("runtime:      opampsupervisor running")
            && human.contains("collector:    version 0.158.0 running")
            && human.contains("opamp:        connected as seen by the server; remote config none"),
        "{human}"
    );
    // detect says what runs, from the collector itself and from the server's view.
    let out = agent.cmd()?.args(["detect", "--json"]).output()?;
    let d: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(d["collector_running"]["version"], "0.158.0", "{d}");
    assert_eq!(
        d["collector_running"]["opamp"]["collector_version"], "0.158.0",
        "{d}"
    );
    let out = agent.cmd()?.arg("detect").output()?;
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(
        human.contains("collector runs   version 0.158.0 (its own telemetry); the server sees otelcol-linkmesh 0.158.0 over OpAMP"),
        "{human}"
    );
    run.signal(Signal::SIGTERM);
    run.wait_exit(T);
    let st = agent.status()?;
    assert_eq!(st["runtime"]["agent_running"], false, "{st}");
    Ok(())
}
