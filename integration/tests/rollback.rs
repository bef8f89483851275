//! Health-gated rollback on throw-away hosts with real systemd and the real
//! package managers: a bad release (one test build, src/fault.rs, whose
//! fault is picked per test) that exits at start, never reaches READY, or
//! crashes after 5 s is put back by linkmesh-upgrade.service through the
//! method it came by, within its probation; identity, configuration, the
//! server's host row and the collector are untouched and the server shows
//! the rollback. A good upgrade with the server away is not rolled back.

use std::time::{Duration, Instant};

use linkmesh_fleet::server::Script;
use linkmesh_integration::harness::{
    Fleet, Packages, base_system_rpm, binary, build_packages, faulty_agent, install_one_liner,
    install_runtime, older_agent, publish_binary, scratch, snapshot,
};
use linkmesh_integration::testhost::{TestHost, TestNet};

type R = anyhow::Result<()>;

const IDENTITY: &str = "/var/lib/linkmesh-agent/identity";
/// The probation the tests run with (the default is 60 s).
const PROBATION: &str = "15s";

struct Bed {
    dir: tempfile::TempDir,
    net: TestNet,
    fleet: Fleet,
    current: Packages,
    faulty: Packages,
    older: Packages,
    faulty_version: &'static str,
    older_version: &'static str,
    /// Last: released after everything else of the bed is gone.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One bed at a time: each boots a host and judges a probation by its
/// timing, which seven beds on two cores at once made unreliable (CI saw a
/// crash-looping build confirmed).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bed(name: &str) -> anyhow::Result<Bed> {
    let serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = scratch(name)?;
    let artifacts = dir.path().join("artifacts");
    let (faulty_bin, faulty_version) = faulty_agent()?;
    let (older_bin, older_version) = older_agent()?;
    let current = build_packages(&binary("linkmesh-agent")?, &artifacts, 1)?;
    let faulty = build_packages(&faulty_bin, &artifacts, 1)?;
    let older = build_packages(&older_bin, &artifacts, 1)?;
    for (version, bin) in [
        (
            linkmesh_agent::version::AGENT_VERSION,
            binary("linkmesh-agent")?,
        ),
        (faulty_version, faulty_bin),
    ] {
        publish_binary(&artifacts, version, &std::fs::read(bin)?, None)?;
    }
    let net = TestNet::new()?;
    let fleet = Fleet::start_for_hosts(&dir.path().join("fleet"), net.netns(), &artifacts)?;
    Ok(Bed {
        dir,
        net,
        fleet,
        current,
        faulty,
        older,
        faulty_version,
        older_version,
        _serial: serial,
    })
}

/// A host on the bed's network with the real collector runtime, the
/// packages in /root, and a short probation.
fn host(bed: &mut Bed, name: &str) -> anyhow::Result<TestHost> {
    let host = TestHost::boot(name)?;
    bed.net.attach(&host)?;
    install_runtime(&host)?;
    for (p, prefix) in [
        (&bed.current, "current"),
        (&bed.faulty, "faulty"),
        (&bed.older, "older"),
    ] {
        // Where apt's unprivileged _apt user can read them (not /root,
        // 0700): with the fleet's repository listing the same version,
        // apt fetches a local .deb as _apt.
        host.copy_in(&p.deb, &format!("/var/tmp/{prefix}.deb"), 0o644)?;
        host.copy_in(&p.rpm, &format!("/root/{prefix}.rpm"), 0o644)?;
    }
    Ok(host)
}

/// The one-liner on a fresh host with a new token and `extra` arguments;
/// the CA pin, for later runs.
fn enrolled_by_one_liner(bed: &Bed, host: &TestHost, extra: &str) -> anyhow::Result<String> {
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let (code, text) = install_one_liner(
        host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token {extra}", t.ca_pin),
    )?;
    anyhow::ensure!(code == 0, "the first install failed ({code}):\n{text}");
    Ok(t.ca_pin)
}

const APT_INSTALL: &str =
    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confold";

fn short_probation(host: &TestHost) -> R {
    host.sh(&format!(
        "mkdir -p /etc/linkmesh/agent.d && printf '[upgrade]\\nprobation = \"{PROBATION}\"\\n' > /etc/linkmesh/agent.d/90-probation.toml"
    ))?;
    Ok(())
}

/// The fault the bad build shows, in its unit's environment (the good
/// builds ignore it).
fn inject(host: &TestHost, fault: &str) -> R {
    host.sh(&format!(
        "mkdir -p /etc/systemd/system/linkmesh-agent.service.d && printf '[Service]\\nEnvironment=LINKMESH_FAULT={fault}\\n' > /etc/systemd/system/linkmesh-agent.service.d/90-fault.conf && systemctl daemon-reload"
    ))?;
    Ok(())
}

/// What a rollback must leave as it was.
fn kept(host: &TestHost) -> String {
    format!(
        "{:?}\n{:?}",
        snapshot(&host.path(IDENTITY)),
        snapshot(&host.path("/etc/linkmesh"))
    )
}

fn runtime_pids(host: &TestHost) -> String {
    // The collector is the supervisor's child, whatever its name (the
    // release wrappers exec the real binary).
    host.exec("s=$(pgrep -x opampsupervisor); echo $s $(pgrep -P \"${s:-0}\")")
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn wait_runtime(host: &TestHost) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pids = runtime_pids(host);
        if pids.split_whitespace().count() == 2 {
            return Ok(pids);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the runtime did not come up: {pids}\n{}\n{}",
            host.journal(Some("linkmesh-collector"), "-n 15"),
            host.journal(Some("linkmesh-agent"), "-n 15")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits (bounded) until the watcher has decided; its outcome.
fn wait_outcome(host: &TestHost, limit: Duration) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let out = host.exec("linkmesh-agent upgrade status --json")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["probation"].is_null()
            && !v["last"].is_null()
        {
            return Ok(v["last"].clone());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no outcome within {limit:?}: {text}\nwatcher:\n{}\nagent:\n{}",
            host.journal(Some("linkmesh-upgrade"), "-n 30"),
            host.journal(Some("linkmesh-agent"), "-n 20")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// After a rollback: the previous version runs (and reports), the outcome
/// names both versions and the reason, the host row on the server is the
/// same one and shows it.
fn assert_rolled_back(
    bed: &Bed,
    host: &TestHost,
    outcome: &serde_json::Value,
    reason: &str,
    packaged: &str,
) -> R {
    let current = linkmesh_agent::version::AGENT_VERSION;
    assert_eq!(
        outcome["outcome"],
        "rolled_back",
        "{outcome}\nagent:\n{}\nwatcher:\n{}",
        host.journal(Some("linkmesh-agent"), "-n 40"),
        host.journal(Some("linkmesh-upgrade"), "-n 20")
    );
    assert_eq!(outcome["from"], bed.faulty_version, "{outcome}");
    assert_eq!(outcome["to"], current, "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(reason),
        "{reason:?} not in {outcome}"
    );
    let out = host.sh(&format!("linkmesh-agent --version; {packaged}"))?;
    assert!(out.contains(&format!("linkmesh-agent {current}")), "{out}");
    let d = bed
        .fleet
        .wait_drift(Duration::from_secs(30), "the rollback", |h| {
            h["agent_version"] == current && h["last_upgrade"]["outcome"] == "rolled_back"
        })?;
    assert_eq!(bed.fleet.hosts()?.len(), 1, "{d}");
    let row = &d["hosts"][0]["last_upgrade"];
    assert_eq!(row["from"], bed.faulty_version, "{d}");
    assert!(
        row["reason"].as_str().unwrap_or_default().contains(reason),
        "{d}"
    );
    assert!(!row["at"].as_str().unwrap_or_default().is_empty(), "{d}");
    assert_eq!(
        host.sh("systemctl is-active linkmesh-agent")?.trim(),
        "active"
    );
    Ok(())
}

/// deb, by apt: a release that exits 1 at start.
#[test]
fn a_deb_upgrade_that_exits_at_start_is_rolled_back() -> R {
    let mut bed = bed("rb-deb")?;
    let host = host(&mut bed, "lm-rb-deb")?;
    enrolled_by_one_liner(&bed, &host, "")?;
    short_probation(&host)?;
    inject(&host, "exit-at-start")?;
    let pids = wait_runtime(&host)?;
    let before = kept(&host);

    let started = Instant::now();
    let (code, text) = host.run(&format!("{APT_INSTALL} /var/tmp/faulty.deb"))?;
    assert_eq!(code, 0, "the package manager itself succeeds:\n{text}");
    assert!(text.contains("is on probation"), "{text}");
    let outcome = wait_outcome(&host, Duration::from_secs(90))?;
    eprintln!(
        "deb exit-at-start: rolled back {:?} after the upgrade began",
        started.elapsed()
    );
    assert_rolled_back(
        &bed,
        &host,
        &outcome,
        "restarted by systemd",
        "dpkg-query -W -f='${Version}\\n' linkmesh-agent",
    )?;
    let v = host.sh("dpkg-query -W -f='${Version}' linkmesh-agent")?;
    assert_eq!(v, format!("{}-1", linkmesh_agent::version::AGENT_VERSION));
    assert_eq!(kept(&host), before, "the identity or configuration changed");
    assert_eq!(runtime_pids(&host), pids, "the collector was touched");
    drop(bed.dir);
    Ok(())
}

/// The one-liner's binary method: a release that never tells systemd READY.
#[test]
fn a_binary_upgrade_that_never_reaches_ready_is_rolled_back() -> R {
    let mut bed = bed("rb-bin")?;
    let host = host(&mut bed, "lm-rb-bin")?;
    let pin = enrolled_by_one_liner(&bed, &host, "--method binary")?;
    let args = format!("--ca-pin {pin} --method binary");
    short_probation(&host)?;
    inject(&host, "never-ready")?;
    let pids = wait_runtime(&host)?;
    let before = kept(&host);

    let started = Instant::now();
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("{args} --version {}", bed.faulty_version),
    )?;
    // The watcher rolled back within the run (the restart waits up to the
    // unit's 30 s start timeout; the probation is 15 s): exit 13, and the
    // installer says what happened.
    assert_eq!(code, 13, "{text}");
    assert!(
        text.contains("failed its probation and was rolled back"),
        "{text}"
    );
    let outcome = wait_outcome(&host, Duration::from_secs(90))?;
    eprintln!(
        "binary never-ready: rolled back {:?} after the upgrade began",
        started.elapsed()
    );
    assert_rolled_back(&bed, &host, &outcome, "did not reach READY", "true")?;
    assert_eq!(kept(&host), before, "the identity or configuration changed");
    assert_eq!(runtime_pids(&host), pids, "the collector was touched");
    // A re-run of the one-liner finds nothing open and installs nothing new.
    let (code, text) = install_one_liner(&host, &bed.fleet, &args)?;
    assert_eq!(code, 0, "{text}");
    Ok(())
}

/// rpm, by `rpm -U` on a host whose agent came from `rpm -i` (so the
/// previous package is fetched from the server by the installed agent): a
/// release that crashes 5 s after it started.
#[test]
fn an_rpm_upgrade_that_crashes_after_five_seconds_is_rolled_back() -> R {
    let mut bed = bed("rb-rpm")?;
    let host = host(&mut bed, "lm-rb-rpm")?;
    let base = bed.dir.path().join("testhost-base.rpm");
    base_system_rpm(&base)?;
    host.copy_in(&base, "/root/base.rpm", 0o644)?;
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    host.sh(&format!(
        "rpm --initdb && rpm -i /root/base.rpm && rpm -i /root/current.rpm && linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && systemctl start linkmesh-agent",
        bed.fleet.url, t.ca_pin
    ))?;
    short_probation(&host)?;
    inject(&host, "crash-after-5s")?;
    let pids = wait_runtime(&host)?;
    let before = kept(&host);

    let started = Instant::now();
    let out = host.sh("rpm -U /root/faulty.rpm 2>&1")?;
    assert!(
        out.contains("rollback copy"),
        "the previous rpm was not kept: {out}"
    );
    let outcome = wait_outcome(&host, Duration::from_secs(90))?;
    eprintln!(
        "rpm crash-after-5s: rolled back {:?} after the upgrade began",
        started.elapsed()
    );
    assert_rolled_back(&bed, &host, &outcome, "crashed", "rpm -q linkmesh-agent")?;
    let q = host.sh("rpm -q linkmesh-agent")?;
    assert!(
        q.contains(&format!(
            "linkmesh-agent-{}-1",
            linkmesh_agent::version::AGENT_VERSION
        )),
        "{q}"
    );
    assert_eq!(kept(&host), before, "the identity or configuration changed");
    assert_eq!(runtime_pids(&host), pids, "the collector was touched");
    Ok(())
}

/// A good upgrade while the server is away: started, identity read,
/// supervising is enough; no rollback.
#[test]
fn a_good_upgrade_with_the_server_away_is_confirmed() -> R {
    let mut bed = bed("rb-away")?;
    let host = host(&mut bed, "lm-rb-away")?;
    enrolled_by_one_liner(&bed, &host, &format!("--version {}", bed.older_version))?;
    short_probation(&host)?;
    wait_runtime(&host)?;
    bed.fleet.stop();
    let out = host.sh(&format!("{APT_INSTALL} /var/tmp/current.deb 2>&1"))?;
    assert!(out.contains("is on probation"), "{out}");
    let outcome = wait_outcome(&host, Duration::from_secs(90))?;
    assert_eq!(outcome["outcome"], "confirmed", "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not reachable"),
        "{outcome}"
    );
    let v = host.sh("linkmesh-agent --version")?;
    assert!(v.contains(linkmesh_agent::version::AGENT_VERSION), "{v}");
    // The server back: the confirmation reaches it.
    bed.fleet.restart(None)?;
    bed.fleet
        .wait_drift(Duration::from_secs(30), "the confirmation", |h| {
            h["last_upgrade"]["outcome"] == "confirmed"
        })?;
    Ok(())
}

/// A deb host on the current version with a short probation, then an
/// upgrade to the bad build (exit at start) begun; returns when the
/// watcher has started putting the previous version back, with what the
/// rollback must keep.
fn begin_bad_deb_upgrade(bed: &Bed, host: &TestHost) -> anyhow::Result<(String, String)> {
    enrolled_by_one_liner(bed, host, "")?;
    short_probation(host)?;
    inject(host, "exit-at-start")?;
    let pids = wait_runtime(host)?;
    let before = kept(host);
    host.sh(&format!("{APT_INSTALL} /var/tmp/faulty.deb"))?;
    let record = host.path("/var/lib/linkmesh-agent/upgrade/probation.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&record).is_ok_and(|r| r.contains("rolling_back")) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the watcher did not start a rollback:\n{}",
            host.journal(Some("linkmesh-upgrade"), "-n 20")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((before, pids))
}

/// The power cut in the middle of a rollback (dpkg killed with everything
/// else): at the next boot the watcher finishes it.
#[test]
fn a_rollback_cut_by_a_power_loss_is_finished_at_boot() -> R {
    let mut bed = bed("rb-boot")?;
    let mut host = host(&mut bed, "lm-rb-boot")?;
    let (before, _) = begin_bad_deb_upgrade(&bed, &host)?;
    host.reboot()?;
    bed.net.attach(&host)?;
    let record =
        std::fs::read_to_string(host.path("/var/lib/linkmesh-agent/upgrade/probation.json"))
            .unwrap_or_default();
    let outcome = wait_outcome(&host, Duration::from_secs(120))?;
    assert_rolled_back(
        &bed,
        &host,
        &outcome,
        "restarted by systemd",
        "dpkg-query -W -f='${Version}\\n' linkmesh-agent",
    )?;
    // It was this boot's watcher that put the previous version back.
    let journal = host.journal(Some("linkmesh-upgrade"), "-b");
    assert!(
        journal.contains("Rolled back"),
        "not finished at boot (record after boot: {record}):\n{journal}"
    );
    assert_eq!(host.sh("dpkg --audit")?.trim(), "", "dpkg left half-done");
    assert_eq!(kept(&host), before, "the identity or configuration changed");
    Ok(())
}

/// The watcher killed in the middle of a rollback: a re-run of the
/// one-liner lets it finish before it does anything else.
#[test]
fn a_rollback_whose_watcher_was_killed_is_finished_by_the_one_liner() -> R {
    let mut bed = bed("rb-rerun")?;
    let host = host(&mut bed, "lm-rb-rerun")?;
    let (before, _) = begin_bad_deb_upgrade(&bed, &host)?;
    host.sh("systemctl kill -s SIGKILL linkmesh-upgrade.service; sleep 0.5")?;
    let record =
        std::fs::read_to_string(host.path("/var/lib/linkmesh-agent/upgrade/probation.json"))
            .unwrap_or_default();
    assert!(
        record.contains("rolling_back"),
        "the kill missed the rollback: {record}"
    );
    let pin = bed.fleet.token(1, "1h")?.ca_pin;
    let (code, text) = install_one_liner(&host, &bed.fleet, &format!("--ca-pin {pin}"))?;
    assert!(text.contains("letting its watcher finish first"), "{text}");
    assert_eq!(code, 0, "{text}");
    let outcome = wait_outcome(&host, Duration::from_secs(10))?;
    assert_rolled_back(
        &bed,
        &host,
        &outcome,
        "restarted by systemd",
        "dpkg-query -W -f='${Version}\\n' linkmesh-agent",
    )?;
    assert_eq!(host.sh("dpkg --audit")?.trim(), "", "dpkg left half-done");
    assert_eq!(kept(&host), before, "the identity or configuration changed");
    Ok(())
}

/// install-opamp.sh to a new pin whose collector cannot start: the previous
/// runtime binaries are put back within the probation, the collector runs
/// on them again, and the server shows the runtime rollback.
#[test]
fn a_runtime_upgrade_whose_collector_cannot_start_is_rolled_back() -> R {
    let mut bed = bed("rb-runtime")?;
    let artifacts = bed.dir.path().join("artifacts");
    linkmesh_integration::harness::publish_runtime(&artifacts, "0.157.0", true)?;
    // The server pins 0.158.0 (its default); that release is broken.
    linkmesh_integration::harness::publish_broken_runtime(&artifacts, "0.158.0")?;
    let host = TestHost::boot("lm-rb-runtime")?;
    bed.net.attach(&host)?;
    linkmesh_integration::harness::install_real_runtime_for_releases(&host)?;
    let pin = enrolled_by_one_liner(&bed, &host, "")?;
    let opamp = |args: &str| {
        host.run(
            &bed.fleet
                .one_liner(Script::InstallOpamp, &format!("--ca-pin {pin} {args}"))?,
        )
    };
    let (code, text) = opamp("--otelcol-version 0.157.0 --supervisor-version 0.157.0")?;
    assert_eq!(code, 0, "{text}");
    wait_runtime(&host)?;
    let good = std::fs::read(host.path("/usr/bin/otelcol-contrib"))?;
    let instance_id = std::fs::read_to_string(
        host.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml"),
    )?;

    let started = Instant::now();
    let (code, text) = opamp("--probation 30s")?;
    eprintln!(
        "runtime: rolled back {:?} after install-opamp.sh began",
        started.elapsed()
    );
    assert_eq!(code, 8, "{text}");
    assert!(text.contains("failed its probation"), "{text}");
    assert_eq!(
        std::fs::read(host.path("/usr/bin/otelcol-contrib"))?,
        good,
        "not restored"
    );
    let versions = host.sh("cat /var/lib/linkmesh-agent/runtime/versions.toml")?;
    assert!(
        versions.contains("otelcol-contrib = \"0.157.0\""),
        "{versions}"
    );
    wait_runtime(&host)?;
    assert_eq!(
        std::fs::read_to_string(
            host.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml")
        )?,
        instance_id,
        "the collector's instance id changed"
    );
    let outcome: serde_json::Value =
        serde_json::from_str(&host.sh("cat /var/lib/linkmesh-agent/runtime/outcome.json")?)?;
    eprintln!("runtime outcome: {outcome}");
    assert_eq!(outcome["outcome"], "rolled_back", "{outcome}");
    assert_eq!(
        (outcome["from"].as_str(), outcome["to"].as_str()),
        (Some("0.158.0"), Some("0.157.0"))
    );
    let d = bed
        .fleet
        .wait_drift(Duration::from_secs(30), "the runtime rollback", |h| {
            h["last_runtime_upgrade"]["outcome"] == "rolled_back"
        })?;
    assert!(
        d["hosts"][0]["last_runtime_upgrade"]["reason"]
            .as_str()
            .unwrap_or_default()
            .len()
            > 5,
        "{d}"
    );
    Ok(())
}
