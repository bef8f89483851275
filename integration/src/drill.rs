//! The upgrade drill: the seeds' upgrade order walked on a throw-away host
//! while a steady OTLP load runs into its collector the whole time.
//!
//! The bed: the reference server in its own namespace across a veth (with
//! the agent builds, packages and runtime releases as artifacts), one host
//! running the shipped agent unit and the real supervisor and collector,
//! the collector's OTLP/HTTP receiver writing to its file exporter (the
//! sink: on the host, outside the fleet server), and `linkmesh-otlp-load`
//! in a unit of its own sending numbered records at a fixed rate, retrying
//! refused and unanswered requests as SDKs do.
//!
//! After each step every record the sender had accepted so far is looked
//! for in the sink: none may be missing; a record may appear twice only as
//! often as the sender saw requests go unanswered (at-least-once: such a
//! request may have been kept, and is sent again). The step's longest
//! refusal window, the collector's pid, the host's identity and instance
//! uid and the server's drift row are checked too.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    harness::{
        Fleet, Packages, base_system_rpm, binary, build_packages, install_one_liner,
        install_real_runtime_for_releases, older_agent, publish_binary, publish_runtime, scratch,
    },
    testhost::{TestHost, TestNet},
};

/// Records per second the sender sends.
pub const RATE: u32 = 50;
/// Where the collector writes what it receives.
pub const SINK: &str = "/var/lib/linkmesh-collector/drill.jsonl";
const REPORT: &str = "/root/load.json";

/// One step's outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Step {
    /// What was done.
    pub label: String,
    /// Which part moved: `server`, `runtime`, `agent`.
    pub part: &'static str,
    /// Records accepted by the end of the step.
    pub accepted: u64,
    /// Records accepted but not in the sink.
    pub lost: u64,
    /// Extra copies in the sink of records of this step.
    pub duplicated: u64,
    /// Unanswered requests during the step (the duplicates allowed).
    pub ambiguous: u64,
    /// Longest time the OTLP port refused connections (ms).
    pub refused_ms: u64,
    /// Whether the collector process changed.
    pub collector_restarted: bool,
    /// How long the step took (ms).
    pub took_ms: u64,
}

/// The whole drill's outcome.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    /// Every step in order.
    pub steps: Vec<Step>,
}

impl Outcome {
    fn of<'a>(&'a self, part: &'a str) -> impl Iterator<Item = &'a Step> + 'a {
        self.steps.iter().filter(move |s| s.part == part)
    }

    /// The figures the benchmark prints, by name.
    pub fn figures(&self) -> BTreeMap<&'static str, f64> {
        let sum = |part: &str, f: fn(&Step) -> u64| self.of(part).map(f).sum::<u64>() as f64;
        let max = |part: &str, f: fn(&Step) -> u64| self.of(part).map(f).max().unwrap_or(0) as f64;
        BTreeMap::from([
            (
                "agent_upgrade_collector_restarts",
                sum("agent", |s| u64::from(s.collector_restarted)),
            ),
            ("agent_upgrade_records_lost", sum("agent", |s| s.lost)),
            (
                "agent_restart_otlp_refused_ms",
                max("agent", |s| s.refused_ms),
            ),
            (
                "runtime_upgrade_otlp_refused_ms",
                max("runtime", |s| s.refused_ms),
            ),
            ("runtime_upgrade_records_lost", sum("runtime", |s| s.lost)),
            ("server_upgrade_records_lost", sum("server", |s| s.lost)),
        ])
    }
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct Load {
    accepted: u64,
    ambiguous: u64,
    refused_windows_ms: Vec<u64>,
}

/// The bed and host of one drill.
pub struct Drill {
    _dir: tempfile::TempDir,
    // Kept for the drill's length: the veth and namespace go with it.
    _net: TestNet,
    fleet: Fleet,
    host: TestHost,
    old_version: &'static str,
    /// The older and this version's packages: published into the served
    /// artifacts (the repositories) when the package steps begin.
    packages: [Packages; 2],
    ca_pin: String,
    last_accepted: u64,
    last_windows: usize,
    last_ambiguous: u64,
    collector: String,
    identity: String,
    outcome: Outcome,
}

impl Drill {
    /// Builds the bed, installs the agent with the one-liner (the older
    /// build) and the runtime with install-opamp.sh (release 0.157.0), and
    /// starts the load.
    ///
    /// # Errors
    /// When any part of the bed cannot be set up.
    pub fn setup(name: &str) -> anyhow::Result<Self> {
        let dir = scratch(name)?;
        let artifacts = dir.path().join("artifacts");
        std::fs::create_dir_all(&artifacts)?;
        let (older, old_version) = older_agent()?;
        let current = binary("linkmesh-agent")?;
        publish_binary(
            &artifacts,
            linkmesh_agent::version::AGENT_VERSION,
            &std::fs::read(&current)?,
            None,
        )?;
        publish_binary(&artifacts, old_version, &std::fs::read(&older)?, None)?;
        // Packages go beside the bed until the package steps publish them:
        // the one-liner would take a served .deb for its binary steps.
        let pkgs = dir.path().join("packages");
        let old = build_packages(&older, &pkgs.join("old"), 1)?;
        let new = build_packages(&current, &pkgs.join("new"), 1)?;
        publish_runtime(&artifacts, "0.158.0", true)?;
        publish_runtime(&artifacts, "0.157.0", false)?;
        let net = TestNet::new()?;
        let mut fleet = Fleet::start_for_hosts(&dir.path().join("fleet"), net.netns(), &artifacts)?;
        let args = pin_args(&artifacts, "0.157.0");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fleet.restart(Some(&args))?;
        let mut net = net;
        let host = TestHost::boot(name)?;
        net.attach(&host)?;
        install_real_runtime_for_releases(&host)?;
        host.copy_in(
            &binary("linkmesh-otlp-load")?,
            "/usr/local/bin/linkmesh-otlp-load",
            0o755,
        )?;
        // apt and dnf see the fleet's repositories only (the test network
        // reaches nothing else).
        host.sh(
            "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/yum.repos.d/*; \
             rm -rf /var/lib/apt/lists/*; mkdir -p /var/lib/apt/lists/partial",
        )?;
        std::fs::create_dir_all(host.path("/etc/linkmesh"))?;
        std::fs::write(
            host.path("/etc/linkmesh/collector.yaml"),
            format!(
                "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:4318\nexporters:\n  file:\n    path: {SINK}\n    flush_interval: 100ms\n    append: true\nservice:\n  pipelines:\n    logs: {{receivers: [otlp], exporters: [file]}}\n"
            ),
        )?;
        // Each agent step opens an upgrade probation (the next step
        // supersedes it); a short one lets the drill wait for the last to
        // close before it kills the agent, which a watcher would take for
        // the new version crashing.
        std::fs::create_dir_all(host.path("/etc/linkmesh/agent.d"))?;
        std::fs::write(
            host.path("/etc/linkmesh/agent.d/90-probation.toml"),
            "[upgrade]\nprobation = \"5s\"\n",
        )?;
        let t = fleet.token(1, "1h")?;
        std::fs::write(host.path("/root/token"), &t.token)?;
        let (code, text) = install_one_liner(
            &host,
            &fleet,
            &format!(
                "--method binary --version {old_version} --ca-pin {} --token-file /root/token",
                t.ca_pin
            ),
        )?;
        ensure!(code == 0, "one-liner: {text}");
        let mut d = Self {
            _dir: dir,
            _net: net,
            fleet,
            host,
            old_version,
            packages: [old, new],
            ca_pin: t.ca_pin,
            last_accepted: 0,
            last_windows: 0,
            last_ambiguous: 0,
            collector: String::new(),
            identity: String::new(),
            outcome: Outcome::default(),
        };
        d.install_opamp()?;
        d.collector = d.wait_collector(None)?;
        d.identity = d.identity_now()?;
        d.host.sh(&format!(
                "systemd-run --unit lm-load --quiet /usr/local/bin/linkmesh-otlp-load --rate {RATE} --report {REPORT}"
            ),
        )?;
        // The load is flowing before the first step.
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.load()?.accepted < u64::from(RATE) {
            ensure!(Instant::now() < deadline, "the load never flowed");
            std::thread::sleep(Duration::from_millis(200));
        }
        d.last_accepted = d.load()?.accepted;
        Ok(d)
    }

    fn install_opamp(&self) -> anyhow::Result<String> {
        self.host.sh(&self.fleet.one_liner(
            linkmesh_fleet::server::Script::InstallOpamp,
            &format!("--ca-pin {} --probation 5s", self.ca_pin),
        )?)
    }

    fn load(&self) -> anyhow::Result<Load> {
        let text = std::fs::read_to_string(self.host.path(REPORT)).unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or_default())
    }

    /// The collector's pid once the supervisor runs one, other than `not`.
    fn wait_collector(&self, not: Option<&str>) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let pid = self.collector_pid();
            if !pid.is_empty() && Some(pid.as_str()) != not {
                return Ok(pid);
            }
            ensure!(
                Instant::now() < deadline,
                "no collector (not {not:?}): {}",
                self.host.journal(Some("linkmesh-collector"), "-n 20")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The collector's pid (the supervisor's child), empty when none runs.
    fn collector_pid(&self) -> String {
        self.host
            .sh("p=$(systemctl show -p MainPID --value linkmesh-collector); pgrep -P \"$p\" | head -1")
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The host id, certificate and collector instance uid, as one string.
    fn identity_now(&self) -> anyhow::Result<String> {
        self.host.sh(
            "cat /var/lib/linkmesh-agent/identity/identity.toml /var/lib/linkmesh-agent/supervisor/persistent_state.yaml",
        )
    }

    /// Runs one step and checks it.
    fn step(
        &mut self,
        label: &str,
        part: &'static str,
        restarts_collector: bool,
        expect: Option<(&str, &str)>,
        action: impl FnOnce(&mut Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let before = self.load()?;
        self.last_windows = before.refused_windows_ms.len();
        action(self).with_context(|| format!("step {label}"))?;
        if let Some((version, method)) = expect {
            self.fleet
                .wait_drift(Duration::from_secs(60), label, |h| {
                    h["agent_version"] == version
                        && h["install_method"] == method
                        && h["runtime_kind"] == "otelcol"
                })
                .with_context(|| format!("step {label}: drift"))?;
        }
        let collector = if restarts_collector {
            self.wait_collector(Some(&self.collector.clone()))?
        } else {
            self.collector_pid()
        };
        // The load flows again: a second's worth of records past the step.
        let target = self.load()?.accepted + u64::from(RATE);
        let deadline = Instant::now() + Duration::from_secs(90);
        let after = loop {
            let l = self.load()?;
            if l.accepted >= target {
                break l;
            }
            ensure!(
                Instant::now() < deadline,
                "step {label}: the load did not resume ({} accepted)",
                l.accepted
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // Every accepted record reaches the sink (flushed every 100 ms).
        let (lost, duplicated) = {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let counts = sink_counts(&self.host.path(SINK));
                let lost = (self.last_accepted + 1..=after.accepted)
                    .filter(|n| !counts.contains_key(n))
                    .count() as u64;
                let duplicated = (self.last_accepted + 1..=after.accepted)
                    .map(|n| u64::from(counts.get(&n).copied().unwrap_or(1).saturating_sub(1)))
                    .sum::<u64>();
                if lost == 0 || Instant::now() >= deadline {
                    break (lost, duplicated);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        let refused_ms = after
            .refused_windows_ms
            .iter()
            .skip(self.last_windows)
            .copied()
            .max()
            .unwrap_or(0);
        let step = Step {
            label: label.to_owned(),
            part,
            accepted: after.accepted,
            lost,
            duplicated,
            ambiguous: after.ambiguous - self.last_ambiguous.min(after.ambiguous),
            refused_ms,
            collector_restarted: collector != self.collector,
            took_ms: started.elapsed().as_millis() as u64,
        };
        eprintln!(
            "drill {label}: lost {} duplicated {} (ambiguous {}) refused {} ms collector {} -> {collector} ({} ms)",
            step.lost,
            step.duplicated,
            step.ambiguous,
            step.refused_ms,
            self.collector,
            step.took_ms
        );
        self.last_accepted = after.accepted;
        self.last_windows = after.refused_windows_ms.len();
        self.last_ambiguous = after.ambiguous;
        self.collector = collector;
        ensure!(
            self.identity_now()? == self.identity,
            "step {label}: identity or instance uid changed"
        );
        self.outcome.steps.push(step);
        Ok(())
    }

    /// Walks every step.
    ///
    /// # Errors
    /// When a step fails to complete (its checks are in the outcome).
    pub fn run(mut self) -> anyhow::Result<Outcome> {
        let current = linkmesh_agent::version::AGENT_VERSION;
        let old = self.old_version;
        let artifacts = self._dir.path().join("artifacts");
        // (a) The server first: stopped and started again on its state.
        for label in ["server upgrade", "server rollback"] {
            self.step(label, "server", false, Some((old, "script")), |d| {
                d.fleet.restart(None)
            })?;
        }
        // (b) The collector runtime, to the server's new pin and back.
        for (label, pin) in [
            ("runtime upgrade", "0.158.0"),
            ("runtime rollback", "0.157.0"),
        ] {
            let args = pin_args(&artifacts, pin);
            self.step(label, "runtime", true, Some((old, "script")), |d| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                d.fleet.restart(Some(&args))?;
                d.install_opamp()?;
                let record = d
                    .host
                    .sh("cat /var/lib/linkmesh-agent/runtime/versions.toml")?;
                ensure!(
                    record.contains(&format!("otelcol-contrib = \"{pin}\"")),
                    "install-opamp.sh did not install {pin}: {record}"
                );
                Ok(())
            })?;
        }
        // (c) The agent, through each method.
        for (label, version) in [("one-liner upgrade", current), ("one-liner rollback", old)] {
            let cmd = self.fleet.one_liner(
                linkmesh_fleet::server::Script::Install,
                &format!(
                    "--ca-pin {} --method binary --version {version}",
                    self.ca_pin
                ),
            )?;
            self.step(label, "agent", false, Some((version, "script")), |d| {
                d.host.sh(&cmd).map(drop)
            })?;
        }
        // Through the fleet's signed repositories, with what an operator
        // types. The host's edited configuration is kept (--force-confold),
        // as an unattended upgrade keeps it.
        self.packages[0].copy_into(&artifacts)?;
        let apt = "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Options::=--force-confold";
        let one_liner = |method: &str| {
            self.fleet.one_liner(
                linkmesh_fleet::server::Script::Install,
                &format!("--ca-pin {} --method {method} --version {old}", self.ca_pin),
            )
        };
        let deb = one_liner("deb")?;
        let rpm = one_liner("rpm")?;
        self.step(
            "deb install (one-liner, repository)",
            "agent",
            false,
            Some((old, "deb")),
            |d| d.host.sh(&deb).map(drop),
        )?;
        self.packages[1].copy_into(&artifacts)?;
        for (label, cmd, version) in [
            (
                "deb upgrade (apt-get upgrade)",
                format!("{apt} update && {apt} upgrade"),
                current,
            ),
            (
                "deb rollback (apt-get install =VERSION)",
                format!("{apt} install --allow-downgrades linkmesh-agent={old}-1"),
                old,
            ),
        ] {
            self.step(label, "agent", false, Some((version, "deb")), |d| {
                d.host.sh(&cmd).map(drop)
            })?;
        }
        let base = self._dir.path().join("testhost-base.rpm");
        base_system_rpm(&base)?;
        self.host.copy_in(&base, "/root/base.rpm", 0o644)?;
        self.host.sh("rpm --initdb && rpm -i /root/base.rpm")?;
        for (label, cmd, version) in [
            (
                "deb removed, rpm installed (one-liner, repository)",
                format!("{apt} remove linkmesh-agent && {rpm}"),
                old,
            ),
            (
                "rpm upgrade (dnf upgrade)",
                "dnf -y -q upgrade linkmesh-agent".to_owned(),
                current,
            ),
            (
                "rpm rollback (dnf downgrade)",
                format!("dnf -y -q downgrade linkmesh-agent-{old}-1"),
                old,
            ),
            (
                "rpm upgrade again (dnf upgrade)",
                "dnf -y -q upgrade linkmesh-agent".to_owned(),
                current,
            ),
        ] {
            self.step(label, "agent", false, Some((version, "rpm")), |d| {
                d.host.sh(&cmd).map(drop)
            })?;
        }
        // (d) The agent killed; systemd starts it again.
        self.step(
            "agent SIGKILL",
            "agent",
            false,
            Some((current, "rpm")),
            |d| {
                // The last upgrade's probation closes first (5 s, above).
                let deadline = Instant::now() + Duration::from_secs(60);
                while d
                    .host
                    .path("/var/lib/linkmesh-agent/upgrade/probation.json")
                    .exists()
                {
                    ensure!(
                        Instant::now() < deadline,
                        "the last upgrade's probation did not close"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                let pid = d
                    .host
                    .sh("systemctl show -p MainPID --value linkmesh-agent")?;
                d.host.sh("systemctl kill -s SIGKILL linkmesh-agent")?;
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let now = d
                        .host
                        .sh("systemctl show -p MainPID,ActiveState linkmesh-agent")?;
                    if now.contains("ActiveState=active")
                        && !now.contains(&format!("MainPID={}", pid.trim()))
                    {
                        return Ok(());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "the agent did not come back: {now}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            },
        )?;
        // (e) The server away for a minute.
        self.step(
            "server down 60 s",
            "server",
            false,
            Some((current, "rpm")),
            |d| {
                d.fleet.stop();
                std::thread::sleep(Duration::from_secs(60));
                d.fleet.restart(None)
            },
        )?;
        self.host.sh("systemctl stop lm-load")?;
        Ok(self.outcome)
    }
}

fn pin_args(artifacts: &Path, pin: &str) -> Vec<String> {
    vec![
        "--report-interval".into(),
        "1s".into(),
        "--artifacts".into(),
        artifacts.display().to_string(),
        "--pin-otelcol".into(),
        pin.into(),
        "--pin-supervisor".into(),
        pin.into(),
    ]
}

/// How often each record number is in the sink.
pub fn sink_counts(path: &Path) -> BTreeMap<u64, u32> {
    let mut counts = BTreeMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("lm-seq-") {
        rest = &rest[i + 7..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if let Ok(n) = rest[..end].parse::<u64>() {
            *counts.entry(n).or_insert(0) += 1;
        }
        rest = &rest[end..];
    }
    counts
}

/// Fails with every step that broke a goal.
///
/// # Errors
/// Naming each step and what it broke.
pub fn check(outcome: &Outcome) -> anyhow::Result<()> {
    let mut bad = Vec::new();
    for s in &outcome.steps {
        if s.lost > 0 {
            bad.push(format!("{}: {} records lost", s.label, s.lost));
        }
        if s.duplicated > s.ambiguous {
            bad.push(format!(
                "{}: {} duplicates beyond the {} unanswered requests",
                s.label, s.duplicated, s.ambiguous
            ));
        }
        if s.part != "runtime" && s.collector_restarted {
            bad.push(format!("{}: the collector restarted", s.label));
        }
        if s.part != "runtime" && s.refused_ms > 0 {
            bad.push(format!("{}: OTLP refused for {} ms", s.label, s.refused_ms));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        bail!("{}", bad.join("\n"))
    }
}
