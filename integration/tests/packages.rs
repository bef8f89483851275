//! The .deb and .rpm on throw-away hosts with real systemd: install, enrol,
//! upgrade, downgrade, remove and reinstall keep the identity; purge
//! removes it; an edited configuration survives; the service restarts on
//! upgrade and never starts on a host that is not enrolled.

use std::time::Duration;

use linkmesh_integration::harness::{
    Fleet, Packages, TokenInfo, binary, build_packages, install_one_liner, install_runtime,
    older_agent, publish_binary, scratch, snapshot,
};
use linkmesh_integration::testhost::{TestHost, TestNet, restart_downtime};

type R = anyhow::Result<()>;

const IDENTITY: &str = "/var/lib/linkmesh-agent/identity";

struct Bed {
    dir: tempfile::TempDir,
    net: TestNet,
    fleet: Fleet,
    old: Packages,
    new: Packages,
    old_version: &'static str,
    artifacts: std::path::PathBuf,
}

/// Packages of the older build (0.0.9) and of this one, a reference server
/// on the test network offering them, and nothing else.
fn bed(name: &str) -> anyhow::Result<Bed> {
    let dir = scratch(name)?;
    let (older, old_version) = older_agent()?;
    let artifacts = dir.path().join("artifacts");
    let old = build_packages(&older, &artifacts, 1)?;
    let new = build_packages(&binary("linkmesh-agent")?, &artifacts, 1)?;
    let net = TestNet::new()?;
    let fleet = Fleet::start_for_hosts(&dir.path().join("fleet"), net.netns(), &artifacts)?;
    Ok(Bed {
        dir,
        net,
        fleet,
        old,
        new,
        old_version,
        artifacts,
    })
}

/// A fresh host on the bed's network with the collector runtime where the
/// real packages put it.
fn host(bed: &mut Bed, name: &str) -> anyhow::Result<TestHost> {
    let host = TestHost::boot(name)?;
    bed.net.attach(&host)?;
    install_runtime(&host)?;
    Ok(host)
}

/// Runs `script` in the host; fails with its output unless it exits 0.
fn sh(host: &TestHost, script: &str) -> anyhow::Result<String> {
    let out = host.exec(script)?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "`{script}` failed:\n{text}");
    Ok(text)
}

fn copy_packages(host: &TestHost, p: &Packages, prefix: &str) -> R {
    host.copy_in(&p.deb, &format!("/root/{prefix}.deb"), 0o644)?;
    host.copy_in(&p.rpm, &format!("/root/{prefix}.rpm"), 0o644)?;
    Ok(())
}

fn enrol(host: &TestHost, fleet: &Fleet, t: &TokenInfo) -> R {
    std::fs::write(host.path("/root/token"), &t.token)?;
    sh(
        host,
        &format!(
            "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && rm /root/token",
            fleet.url, t.ca_pin
        ),
    )?;
    Ok(())
}

/// `systemctl show` properties of the agent's unit.
fn unit(host: &TestHost) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    host.unit_properties(
        "linkmesh-agent.service",
        &[
            "ActiveState",
            "UnitFileState",
            "MainPID",
            "ActiveExitTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
            "NRestarts",
        ],
    )
}

/// What the running agent says its version is, once the server has it.
fn wait_reported(fleet: &Fleet, version: &str, method: &str) -> R {
    let d = fleet.wait_drift(Duration::from_secs(30), version, |h| {
        h["agent_version"] == version && h["install_method"] == method
    })?;
    assert_eq!(fleet.hosts()?.len(), 1, "{d}");
    Ok(())
}

/// Waits until the unit is active with a main pid other than `old_pid`.
fn wait_restarted(
    host: &TestHost,
    old_pid: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let u = unit(host)?;
        if u["ActiveState"] == "active" && u["MainPID"] != old_pid && u["MainPID"] != "0" {
            return Ok(u);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not come back: {u:?}\n{}",
            host.journal(Some("linkmesh-agent"), "-n 30")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The supervisor's and the collector's pids inside the host.
fn runtime_pids(host: &TestHost) -> String {
    host.exec("echo $(pgrep -x opampsupervisor) $(pgrep -x otelcol-contrib)")
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Waits until the supervisor and its collector both run; their pids.
fn wait_runtime(host: &TestHost) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pids = runtime_pids(host);
        if pids.split_whitespace().count() == 2 {
            return Ok(pids);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the collector runtime did not start: {pids:?}\n{}",
            host.journal(Some("linkmesh-collector"), "-n 30")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An enrolled host with an edited configuration, and what every package
/// operation must keep: the identity byte for byte, the edit, one host on
/// the server.
struct Enrolled<'a> {
    host: &'a TestHost,
    fleet: &'a Fleet,
    method: &'static str,
    identity: std::collections::BTreeMap<std::path::PathBuf, (u32, String)>,
    edited: Vec<u8>,
    /// The supervisor's and collector's pids: no package step changes them.
    runtime: String,
}

impl<'a> Enrolled<'a> {
    /// After a fresh install of the package with `install` (a host that is
    /// not enrolled): checks the agent was not started, then enrols it,
    /// starts it, waits for its report and edits the configuration.
    fn after_fresh_install(
        host: &'a TestHost,
        fleet: &'a Fleet,
        method: &'static str,
        install: &str,
        version: &str,
    ) -> anyhow::Result<Self> {
        let out = sh(host, install)?;
        assert!(out.contains("this host is not enrolled"), "{out}");
        let u = unit(host)?;
        assert_eq!(
            u["ActiveState"], "inactive",
            "not enrolled, not started: {u:?}"
        );
        assert_eq!(u["UnitFileState"], "enabled", "{u:?}");
        let out = sh(
            host,
            "stat -c '%a %U' /var/lib/linkmesh-agent; cat /var/lib/linkmesh-agent/install-method",
        )?;
        assert_eq!(out, format!("700 root\n{method}\n"));

        let t = fleet.token(1, "1h")?;
        enrol(host, fleet, &t)?;
        sh(host, "systemctl start linkmesh-agent")?;
        wait_reported(fleet, version, method)?;
        let identity = snapshot(&host.path(IDENTITY));
        assert!(!identity.is_empty());
        // The operator edits the configuration file.
        sh(
            host,
            "printf '\\n[log]\\nlevel = \"debug\"\\n' >> /etc/linkmesh/agent.toml",
        )?;
        let edited = std::fs::read(host.path("/etc/linkmesh/agent.toml"))?;
        let runtime = wait_runtime(host)?;
        Ok(Self {
            host,
            fleet,
            method,
            identity,
            edited,
            runtime,
        })
    }

    fn identity_kept(&self, label: &str) {
        assert_eq!(
            snapshot(&self.host.path(IDENTITY)),
            self.identity,
            "{label}: identity changed"
        );
    }

    /// `cmd` replaces the running agent (upgrade, downgrade): it restarts on
    /// `version` with the same identity and the edited configuration.
    fn replaced(&self, label: &str, cmd: &str, version: &str) -> R {
        let before = unit(self.host)?;
        sh(self.host, cmd)?;
        let after = wait_restarted(self.host, &before["MainPID"])?;
        eprintln!(
            "{} {label}: agent down {:?} (systemd: stop began to READY)",
            self.method,
            restart_downtime(&after),
        );
        self.running(label, version)?;
        assert_eq!(
            std::fs::read(self.host.path("/etc/linkmesh/agent.toml"))?,
            self.edited,
            "{label}: the edited configuration was replaced"
        );
        Ok(())
    }

    /// The agent runs `version`, with the same identity, and says so.
    fn running(&self, label: &str, version: &str) -> R {
        wait_restarted(self.host, "0")?;
        let v = sh(self.host, "linkmesh-agent version --json")?;
        assert!(
            v.contains(&format!("\"version\":\"{version}\"")),
            "{label}: {v}"
        );
        self.identity_kept(label);
        wait_reported(self.fleet, version, self.method)?;
        assert_eq!(
            runtime_pids(self.host),
            self.runtime,
            "{label}: the agent's {label} restarted the collector runtime\n{}",
            self.host.journal(Some("linkmesh-collector"), "-n 60")
        );
        Ok(())
    }

    /// `cmd` removes the package: stopped, binary gone, identity kept, the
    /// edited configuration kept at `config` (rpm moves it aside).
    fn removed(&self, label: &str, cmd: &str, config: &str) -> R {
        sh(self.host, cmd)?;
        let u = unit(self.host)?;
        assert_ne!(u["ActiveState"], "active", "{label}: {u:?}");
        assert!(!self.host.path("/usr/bin/linkmesh-agent").exists());
        assert_eq!(
            runtime_pids(self.host),
            self.runtime,
            "{label}: the collector runtime did not outlive the agent"
        );
        self.identity_kept(label);
        assert_eq!(
            std::fs::read(self.host.path(config))?,
            self.edited,
            "{label}"
        );
        Ok(())
    }
}

/// A host with an rpm database that lists its base system (rpm on Debian
/// warns that it is not the system's package manager).
fn rpm_database(bed: &Bed, host: &TestHost) -> R {
    let base = bed.dir.path().join("testhost-base.rpm");
    linkmesh_integration::harness::base_system_rpm(&base)?;
    host.copy_in(&base, "/root/base.rpm", 0o644)?;
    sh(host, "rpm --initdb && rpm -i /root/base.rpm")?;
    Ok(())
}

#[test]
fn deb_upgrade_downgrade_remove_reinstall_purge_keep_the_identity() -> R {
    let mut bed = bed("pkg-deb")?;
    let host = host(&mut bed, "lm-deb")?;
    copy_packages(&host, &bed.old, "old")?;
    copy_packages(&host, &bed.new, "new")?;
    let current = linkmesh_agent::version::AGENT_VERSION;
    let apt = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades";

    let e = Enrolled::after_fresh_install(
        &host,
        &bed.fleet,
        "deb",
        &format!("{apt} /root/old.deb"),
        bed.old_version,
    )?;
    e.replaced("upgrade", &format!("{apt} /root/new.deb"), current)?;
    e.replaced("downgrade", "dpkg -i /root/old.deb", bed.old_version)?;
    e.removed(
        "remove",
        "apt-get remove -y -q linkmesh-agent",
        "/etc/linkmesh/agent.toml",
    )?;
    sh(&host, &format!("{apt} /root/new.deb"))?;
    e.running("reinstall", current)?;

    // The service's records are in the journal with structured fields, the
    // supervisor's in its own unit's.
    let journal = host.journal(Some("linkmesh-agent"), "-o verbose");
    for field in ["SYSLOG_IDENTIFIER=linkmesh-agent", "TARGET=", "PRIORITY="] {
        assert!(journal.contains(field), "journal lacks {field}:\n{journal}");
    }
    let journal = host.journal(Some("linkmesh-collector"), "-o verbose -n 50");
    assert!(
        journal.contains("SYSLOG_IDENTIFIER=opampsupervisor"),
        "{journal}"
    );

    // Purge: the identity, state and configuration are gone.
    let out = sh(&host, "apt-get purge -y -q linkmesh-agent")?;
    assert!(out.contains("purged /var/lib/linkmesh-agent"), "{out}");
    assert!(
        out.contains("stopped and removed linkmesh-collector.service"),
        "{out}"
    );
    assert_eq!(runtime_pids(&host), "", "purge left the collector running");
    for gone in [
        "/var/lib/linkmesh-agent",
        "/etc/linkmesh",
        "/usr/lib/systemd/system/linkmesh-agent.service",
        "/etc/systemd/system/linkmesh-collector.service",
    ] {
        assert!(!host.path(gone).exists(), "{gone} survived purge");
    }
    let u = unit(&host)?;
    assert_ne!(u["ActiveState"], "active", "{u:?}");
    Ok(())
}

#[test]
fn rpm_upgrade_downgrade_erase_reinstall_keep_the_identity() -> R {
    let mut bed = bed("pkg-rpm")?;
    let host = host(&mut bed, "lm-rpm")?;
    copy_packages(&host, &bed.old, "old")?;
    copy_packages(&host, &bed.new, "new")?;
    let current = linkmesh_agent::version::AGENT_VERSION;
    rpm_database(&bed, &host)?;

    let e = Enrolled::after_fresh_install(
        &host,
        &bed.fleet,
        "rpm",
        "rpm -i /root/old.rpm",
        bed.old_version,
    )?;
    // dnf (what `yum update` runs on current RHEL-family hosts) sees what
    // rpm installed, and upgrades and downgrades it (local files: no repos
    // here).
    let out = sh(
        &host,
        "dnf -q --disablerepo='*' list --installed linkmesh-agent 2>&1",
    )?;
    assert!(out.contains(&format!("{}-1", bed.old_version)), "{out}");

    e.replaced(
        "upgrade",
        "dnf -y -q --disablerepo='*' upgrade /root/new.rpm",
        current,
    )?;
    e.replaced(
        "downgrade",
        "dnf -y -q --disablerepo='*' downgrade /root/old.rpm",
        bed.old_version,
    )?;
    let out = sh(&host, "rpm -q linkmesh-agent")?;
    assert_eq!(
        out.matches("linkmesh-agent-").count(),
        1,
        "one package: {out}"
    );
    // rpm has no purge: erase keeps the identity and moves the edited
    // configuration aside as .rpmsave.
    e.removed(
        "erase",
        "rpm -e linkmesh-agent",
        "/etc/linkmesh/agent.toml.rpmsave",
    )?;
    sh(&host, "rpm -i /root/new.rpm")?;
    e.running("reinstall", current)?;
    Ok(())
}

#[test]
fn the_one_liner_installs_the_deb_when_the_server_offers_it_and_moves_a_binary_install_onto_it() -> R
{
    let mut bed = bed("pkg-oneliner")?;
    // A binary-method install first: the server offers only the binary.
    let current = linkmesh_agent::version::AGENT_VERSION;
    let offered: Vec<_> = std::fs::read_dir(&bed.artifacts)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    let hidden = bed.artifacts.join("hidden");
    std::fs::create_dir_all(&hidden)?;
    for p in &offered {
        if let Some(name) = p.file_name() {
            std::fs::rename(p, hidden.join(name))?;
        }
    }
    publish_binary(
        &bed.artifacts,
        current,
        &std::fs::read(binary("linkmesh-agent")?)?,
        None,
    )?;

    let host = host(&mut bed, "lm-pkg-1l")?;
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let one_liner = |extra: &str| {
        install_one_liner(&host, &bed.fleet, &format!("--ca-pin {} {extra}", t.ca_pin))
    };
    let (code, text) = one_liner("--token-file /root/token")?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("offers no deb package"), "{text}");
    assert_eq!(
        std::fs::read_to_string(host.path("/var/lib/linkmesh-agent/install-method"))?,
        "script\n"
    );
    let identity = snapshot(&host.path(IDENTITY));
    let pid = unit(&host)?["MainPID"].clone();

    // Now the server offers the packages: a re-run moves the host onto the
    // deb (the script's unit in /etc is removed), keeping the identity.
    for p in std::fs::read_dir(&hidden)?.filter_map(Result::ok) {
        std::fs::rename(p.path(), bed.artifacts.join(p.file_name()))?;
    }
    let (code, text) = one_liner("--dry-run")?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("would run: env DEBIAN_FRONTEND=noninteractive apt-get install"),
        "{text}"
    );
    let (code, text) = one_liner("")?;
    assert_eq!(code, 0, "{text}");
    wait_restarted(&host, &pid)?;
    let out = sh(
        &host,
        "dpkg-query -W linkmesh-agent; cat /var/lib/linkmesh-agent/install-method; \
         test -e /etc/systemd/system/linkmesh-agent.service && echo shadowed || echo packaged-unit",
    )?;
    assert!(
        out.contains(&format!("{current}-1"))
            && out.contains("deb\n")
            && out.contains("packaged-unit"),
        "{out}"
    );
    assert_eq!(snapshot(&host.path(IDENTITY)), identity);
    wait_reported(&bed.fleet, current, "deb")?;

    // Idempotent on the package too: same pid, nothing reinstalled.
    let pid = unit(&host)?["MainPID"].clone();
    let (code, text) = one_liner("")?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("(deb package) is already installed"),
        "{text}"
    );
    assert_eq!(unit(&host)?["MainPID"], pid);

    // Rollback is a version pin; the package method follows it.
    let (code, text) = one_liner(&format!("--version {}", bed.old_version))?;
    assert_eq!(code, 0, "{text}");
    wait_reported(&bed.fleet, bed.old_version, "deb")?;
    assert_eq!(snapshot(&host.path(IDENTITY)), identity);
    // And a binary install over the package is refused, naming the way out.
    let (code, text) = one_liner("--method binary")?;
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("installed from the deb package"), "{text}");
    Ok(())
}

#[test]
fn the_maintainer_scripts_in_both_packages_are_shellcheck_clean() -> R {
    let dir = scratch("pkg-scripts")?;
    let p = build_packages(&binary("linkmesh-agent")?, dir.path(), 1)?;
    let control = dir.path().join("control");
    let out = std::process::Command::new("dpkg-deb")
        .arg("--control")
        .arg(&p.deb)
        .arg(&control)
        .output()?;
    anyhow::ensure!(out.status.success(), "dpkg-deb -e: {out:?}");
    let mut scripts = Vec::new();
    for name in ["postinst", "prerm", "postrm"] {
        scripts.push((
            format!("deb {name}"),
            std::fs::read_to_string(control.join(name))?,
        ));
    }
    for (name, tag) in [("post", "POSTIN"), ("preun", "PREUN"), ("postun", "POSTUN")] {
        let out = std::process::Command::new("rpm")
            .args(["-qp", "--qf", &format!("%{{{tag}}}")])
            .arg(&p.rpm)
            .output()?;
        scripts.push((format!("rpm %{name}"), String::from_utf8(out.stdout)?));
    }
    for (name, text) in scripts {
        assert!(text.starts_with("#!/bin/sh\n"), "{name}: {text}");
        let path = dir.path().join("script.sh");
        std::fs::write(&path, &text)?;
        let out = std::process::Command::new("shellcheck")
            .args(["--shell=sh", "--severity=style"])
            .arg(&path)
            .output()?;
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

#[test]
fn the_one_liner_installs_the_rpm_with_method_rpm() -> R {
    let mut bed = bed("pkg-oneliner-rpm")?;
    let host = host(&mut bed, "lm-pkg-1l-rpm")?;
    rpm_database(&bed, &host)?;
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!(
            "--ca-pin {} --token-file /root/token --method rpm",
            t.ca_pin
        ),
    )?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("+ dnf -y -q --disablerepo=* --enablerepo=linkmesh install linkmesh-agent-"),
        "{text}"
    );
    let current = linkmesh_agent::version::AGENT_VERSION;
    let out = sh(
        &host,
        "rpm -q linkmesh-agent; cat /var/lib/linkmesh-agent/install-method; systemctl is-active linkmesh-agent",
    )?;
    assert!(
        out.contains(&format!("linkmesh-agent-{current}-1")) && out.contains("rpm\nactive\n"),
        "{out}"
    );
    wait_reported(&bed.fleet, current, "rpm")?;
    let d = bed.fleet.drift()?;
    assert_eq!(d["hosts"][0]["verdict"], "in_window", "{d}");
    assert!(
        d["hosts"][0]["action"].is_null(),
        "in window, nothing to do: {d}"
    );
    Ok(())
}

#[test]
fn the_declared_glibc_floor_covers_every_symbol_the_agent_uses() -> R {
    // packaging/package.toml declares libc6 (>= 2.34) / glibc >= 2.34.
    let declared = (2u32, 34u32);
    let out = std::process::Command::new("objdump")
        .arg("-T")
        .arg(binary("linkmesh-agent")?)
        .output()
        .map_err(|e| {
            anyhow::anyhow!("objdump is required (scripts/test installs binutils): {e}")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let newest = text
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next().flatten().unwrap_or(0)))
        })
        .max()
        .ok_or_else(|| anyhow::anyhow!("no GLIBC_ symbols in objdump -T output"))?;
    assert!(
        newest <= declared,
        "the agent needs glibc {}.{}, the packages declare {}.{}: raise the floor in packaging/package.toml",
        newest.0,
        newest.1,
        declared.0,
        declared.1
    );
    let spec = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/package.toml"),
    )?;
    assert!(spec.contains("\"libc6 (>= 2.34)\"") && spec.contains("\"glibc >= 2.34\""));
    Ok(())
}

/// A host whose only package repositories are the fleet's (the throw-away
/// host starts from this machine's apt and yum configuration, whose
/// mirrors it cannot and must not reach).
fn only_the_fleets_repositories(host: &TestHost) -> R {
    sh(
        host,
        "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* /etc/yum.repos.d/*; \
         rm -rf /var/lib/apt/lists/*; mkdir -p /var/lib/apt/lists/partial",
    )?;
    Ok(())
}

/// The repository configuration the one-liner writes, every file's bytes.
const REPOSITORY_FILES: [&str; 6] = [
    "/etc/apt/sources.list.d/linkmesh.sources",
    "/etc/apt/apt.conf.d/60linkmesh",
    "/etc/apt/keyrings/linkmesh-archive.gpg",
    "/etc/linkmesh/fleet-ca.pem",
    "/etc/yum.repos.d/linkmesh.repo",
    "/etc/pki/rpm-gpg/RPM-GPG-KEY-linkmesh",
];

fn repository_files(host: &TestHost) -> Vec<(String, Option<Vec<u8>>)> {
    REPOSITORY_FILES
        .iter()
        .map(|f| (f.to_string(), std::fs::read(host.path(f)).ok()))
        .collect()
}

/// Moves `p`'s packages into the served artifacts: published.
fn publish(bed: &Bed, p: &Packages) -> R {
    p.copy_into(&bed.artifacts)
}

/// A bed whose server publishes only the older packages; this version's
/// are built beside, for [`publish`].
fn unpublished_bed(name: &str) -> anyhow::Result<Bed> {
    let dir = scratch(name)?;
    let (older, old_version) = older_agent()?;
    let artifacts = dir.path().join("artifacts");
    let old = build_packages(&older, &artifacts, 1)?;
    let new = build_packages(
        &binary("linkmesh-agent")?,
        &dir.path().join("unpublished"),
        1,
    )?;
    let net = TestNet::new()?;
    let fleet = Fleet::start_for_hosts(&dir.path().join("fleet"), net.netns(), &artifacts)?;
    Ok(Bed {
        dir,
        net,
        fleet,
        old,
        new,
        old_version,
        artifacts,
    })
}

/// The drill through the served repositories: the one-liner
/// installs 0.0.9 from the fleet's signed repository (and a re-run changes
/// nothing), the server then publishes this version, and the operator's
/// own commands upgrade the host and roll it back by a version pin, with
/// the identity and the edited configuration byte-identical throughout.
/// The collector runtime runs through every step (none restarts it), and
/// while the server is unreachable the operator's update changes nothing:
/// agent and collector keep running.
fn upgrade_through_the_repository(format: &str) -> R {
    let mut bed = unpublished_bed(&format!("pkg-repo-{format}"))?;
    let host = host(&mut bed, &format!("lm-repo-{format}"))?;
    only_the_fleets_repositories(&host)?;
    if format == "rpm" {
        rpm_database(&bed, &host)?;
    }
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let args = format!(
        "--ca-pin {} --method {format} --version {}",
        t.ca_pin, bed.old_version
    );
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("{args} --token-file /root/token"),
    )?;
    assert_eq!(code, 0, "{text}");
    let current = linkmesh_agent::version::AGENT_VERSION;
    wait_reported(&bed.fleet, bed.old_version, format)?;
    let files = repository_files(&host);
    let written: Vec<&str> = files
        .iter()
        .filter(|(_, b)| b.is_some())
        .map(|(f, _)| f.as_str())
        .collect();
    match format {
        "deb" => {
            assert_eq!(written, &REPOSITORY_FILES[..4], "{text}");
            let source = std::fs::read_to_string(host.path(REPOSITORY_FILES[0]))?;
            assert!(
                source.contains(&format!("URIs: {}/apt\n", bed.fleet.url))
                    && source.contains("Signed-By: /etc/apt/keyrings/linkmesh-archive.gpg\n"),
                "{source}"
            );
        }
        _ => {
            assert_eq!(
                written,
                [
                    REPOSITORY_FILES[3],
                    REPOSITORY_FILES[4],
                    REPOSITORY_FILES[5]
                ],
                "{text}"
            );
            let repo = std::fs::read_to_string(host.path(REPOSITORY_FILES[4]))?;
            for line in [
                "gpgcheck=1\n",
                "repo_gpgcheck=1\n",
                "sslcacert=/etc/linkmesh/fleet-ca.pem\n",
            ] {
                assert!(repo.contains(line), "{line}: {repo}");
            }
        }
    }
    sh(
        &host,
        "printf '\\n[log]\\nlevel = \"debug\"\\n' >> /etc/linkmesh/agent.toml",
    )?;
    let edited = std::fs::read(host.path("/etc/linkmesh/agent.toml"))?;
    let identity = snapshot(&host.path(IDENTITY));
    let pid = unit(&host)?["MainPID"].clone();
    let runtime = wait_runtime(&host)?;
    let runtime_kept = |label: &str| {
        assert_eq!(
            runtime_pids(&host),
            runtime,
            "{label} restarted the collector runtime\n{}",
            host.journal(Some("linkmesh-collector"), "-n 60")
        );
    };

    // A re-run is a no-op: nothing rewritten, nothing restarted.
    let (code, text) = install_one_liner(&host, &bed.fleet, &args)?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is already installed"), "{text}");
    assert!(
        !text.contains("+ apt-get") && !text.contains("+ dnf"),
        "{text}"
    );
    assert_eq!(
        repository_files(&host),
        files,
        "a re-run rewrote the repository files"
    );
    assert_eq!(unit(&host)?["MainPID"], pid);
    runtime_kept("the one-liner's re-run");

    // The server is away while the operator updates: the package manager
    // says it cannot reach it and installs nothing; agent and collector
    // keep running.
    publish(&bed, &bed.new)?;
    bed.fleet.stop();
    let upgrade = operator_upgrade(format);
    let out = host.exec(upgrade)?;
    let away =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        installed(&host, format).starts_with(&format!("{}-1", bed.old_version)),
        "installed with the server away: {away}"
    );
    let u = unit(&host)?;
    assert_eq!(
        (u["ActiveState"].as_str(), u["MainPID"].as_str()),
        ("active", pid.as_str()),
        "{away}"
    );
    runtime_kept("an update with the server away");
    assert_eq!(snapshot(&host.path(IDENTITY)), identity, "{away}");
    bed.fleet.restart(None)?;

    // The server is back and publishes this version; the operator
    // upgrades as usual.
    let out = sh(&host, upgrade)?;
    wait_restarted(&host, &pid)?;
    wait_reported(&bed.fleet, current, format)?;
    assert_eq!(snapshot(&host.path(IDENTITY)), identity, "{upgrade}: {out}");
    assert_eq!(
        std::fs::read(host.path("/etc/linkmesh/agent.toml"))?,
        edited,
        "{upgrade}"
    );
    assert_eq!(repository_files(&host), files, "{upgrade}");
    runtime_kept(upgrade);

    // Rollback is a version pin.
    let pid = unit(&host)?["MainPID"].clone();
    let rollback = match format {
        "deb" => format!(
            "apt-get install -y --allow-downgrades linkmesh-agent={}-1",
            bed.old_version
        ),
        _ => format!("dnf downgrade -y linkmesh-agent-{}-1", bed.old_version),
    };
    let out = sh(&host, &rollback)?;
    wait_restarted(&host, &pid)?;
    wait_reported(&bed.fleet, bed.old_version, format)?;
    assert_eq!(
        snapshot(&host.path(IDENTITY)),
        identity,
        "{rollback}: {out}"
    );
    assert_eq!(
        std::fs::read(host.path("/etc/linkmesh/agent.toml"))?,
        edited,
        "{rollback}"
    );
    runtime_kept(&rollback);
    Ok(())
}

#[test]
fn apt_get_upgrade_through_the_fleets_signed_repository_keeps_the_identity() -> R {
    upgrade_through_the_repository("deb")
}

#[test]
fn dnf_upgrade_through_the_fleets_signed_repository_keeps_the_identity() -> R {
    upgrade_through_the_repository("rpm")
}

/// The newest generation of the server's repositories (what it serves
/// until the artifacts change), after a client asked for it.
fn served_generation(bed: &Bed, host: &TestHost) -> anyhow::Result<std::path::PathBuf> {
    host.copy_in(&bed.fleet.ca_file(), "/root/fleet-ca.pem", 0o644)?;
    sh(
        host,
        &format!(
            "curl -fsS --cacert /root/fleet-ca.pem -o /dev/null {}/apt/dists/stable/InRelease",
            bed.fleet.url
        ),
    )?;
    let dir = bed.dir.path().join("fleet").join("repositories");
    std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("gen-")?
                .parse::<u64>()
                .ok()
                .map(|n| (n, e.path()))
        })
        .max()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow::anyhow!("no generation in {}", dir.display()))
}

/// Replaces the bytes of `path` with `with(old)` for as long as the guard
/// lives.
struct Tampered(std::path::PathBuf, Vec<u8>);

impl Tampered {
    fn new(path: std::path::PathBuf, with: impl FnOnce(&[u8]) -> Vec<u8>) -> anyhow::Result<Self> {
        let old = std::fs::read(&path)?;
        let new = with(&old);
        anyhow::ensure!(new != old, "{} was not changed", path.display());
        // A new file, not a write through it: the served pool's .deb files
        // are hard links to the artifacts.
        std::fs::remove_file(&path)?;
        std::fs::write(&path, new)?;
        Ok(Self(path, old))
    }
}

impl Drop for Tampered {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::write(&self.0, &self.1);
    }
}

/// The repository's signed metadata (`InRelease`, `repomd.xml`) with one
/// field changed, so its signature no longer matches.
fn signed_metadata_altered(served: &std::path::Path, format: &str) -> anyhow::Result<Tampered> {
    match format {
        "deb" => Tampered::new(
            served.join("apt/dists/stable/InRelease"),
            replace("Label: LinkMesh", "Label: LinkMess"),
        ),
        _ => Tampered::new(
            served.join("yum/repodata/repomd.xml"),
            replace("<revision>", "<revision>1"),
        ),
    }
}

/// What an operator types to upgrade the agent from the repository.
fn operator_upgrade(format: &str) -> &'static str {
    match format {
        "deb" => "apt-get update && apt-get upgrade -y",
        _ => "dnf upgrade -y linkmesh-agent",
    }
}

fn replace(from: &str, to: &str) -> impl FnOnce(&[u8]) -> Vec<u8> {
    let (from, to) = (from.to_owned(), to.to_owned());
    move |b| {
        String::from_utf8_lossy(b)
            .replacen(&from, &to, 1)
            .into_bytes()
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(b);
    e.finish().unwrap_or_default()
}

/// What the host has of the agent's package, if anything.
fn installed(host: &TestHost, format: &str) -> String {
    let cmd = match format {
        "deb" => "dpkg-query -W -f='${Version} ${db:Status-Status}' linkmesh-agent 2>/dev/null",
        _ => "rpm -q --qf '%{VERSION}-%{RELEASE}' linkmesh-agent 2>/dev/null",
    };
    host.exec(cmd)
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Every way the served repository can lie, for one format: the one-liner
/// refuses before the host changes (exit 7, no repository configured,
/// nothing installed), and on a host configured from it the package
/// manager's own upgrade refuses, the installed version unchanged.
fn tampered_repository_refused(format: &str) -> R {
    let mut bed = bed(&format!("pkg-tamper-{format}"))?;
    // This version is published only after the host installed the older
    // one, so no earlier signed index lists it.
    let unpublished = bed.dir.path().join("unpublished");
    std::fs::create_dir_all(&unpublished)?;
    for f in [&mut bed.new.deb, &mut bed.new.rpm] {
        let to = unpublished.join(f.file_name().unwrap_or_default());
        std::fs::rename(&*f, &to)?;
        *f = to;
    }
    let host = host(&mut bed, &format!("lm-tamper-{format}"))?;
    only_the_fleets_repositories(&host)?;
    if format == "rpm" {
        rpm_database(&bed, &host)?;
    }
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let served = served_generation(&bed, &host)?;
    let old = bed.old_version;
    let (old_pkg, new_pkg) = match format {
        "deb" => (bed.old.deb.clone(), bed.new.deb.clone()),
        _ => (bed.old.rpm.clone(), bed.new.rpm.clone()),
    };
    let name = |p: &std::path::Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let pool = |served: &std::path::Path, p: &std::path::Path| match format {
        "deb" => served.join("apt/pool/main").join(name(p)),
        _ => served.join("yum/packages").join(name(p)),
    };
    let packages = served.join("apt/dists/stable/main/binary-amd64");
    let args = format!(
        "--ca-pin {} --method {format} --version {old} --token-file /root/token",
        t.ca_pin
    );
    let refused = |what: &str| -> R {
        let (code, text) = install_one_liner(&host, &bed.fleet, &args)?;
        assert_eq!(code, 7, "{what}: {text}");
        assert!(text.contains("nothing was installed"), "{what}: {text}");
        assert_eq!(installed(&host, format), "", "{what}");
        for f in REPOSITORY_FILES {
            assert!(!host.path(f).exists(), "{what}: {f} was written");
        }
        Ok(())
    };
    {
        let _t = signed_metadata_altered(&served, format)?;
        refused("signed metadata altered")?;
    }
    if format == "deb" {
        let text = std::fs::read(packages.join("Packages"))?;
        let _a = Tampered::new(
            packages.join("Packages"),
            replace("Priority: optional", "Priority: required"),
        )?;
        let altered =
            String::from_utf8_lossy(&text).replacen("Priority: optional", "Priority: required", 1);
        let _b = Tampered::new(packages.join("Packages.gz"), |_| gzip(altered.as_bytes()))?;
        refused("Packages altered under a valid InRelease")?;
    }
    {
        // Another package under the listed one's name: its checksum (deb)
        // or its signature (rpm: the artifact as built, unsigned) is wrong.
        let bytes = std::fs::read(&new_pkg)?;
        let _t = Tampered::new(pool(&served, &old_pkg), |_| bytes)?;
        refused("package swapped")?;
    }

    // The honest repository installs; then the operator's upgrade meets a
    // lying one.
    let (code, text) = install_one_liner(&host, &bed.fleet, &args)?;
    assert_eq!(code, 0, "{text}");
    let before = installed(&host, format);
    assert!(before.starts_with(&format!("{old}-1")), "{before}");
    publish(&bed, &bed.new)?;
    let served = served_generation(&bed, &host)?;
    let upgrade = operator_upgrade(format);
    let operator = |what: &str| -> R {
        let out = host.exec(&format!("{upgrade} 2>&1"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(installed(&host, format), before, "{what}: {text}");
        assert!(
            [
                "GPG",
                "signature",
                "Hash Sum mismatch",
                "Hashes of expected file",
                "does not match",
                "checksum"
            ]
            .iter()
            .any(|w| text.contains(w)),
            "{what}: the package manager did not say why: {text}"
        );
        Ok(())
    };
    {
        let _t = signed_metadata_altered(&served, format)?;
        operator("signed metadata altered")?;
    }
    {
        let bytes = std::fs::read(&old_pkg)?;
        let _t = Tampered::new(pool(&served, &new_pkg), |_| bytes)?;
        operator("package swapped")?;
    }
    Ok(())
}

#[test]
fn a_tampered_apt_repository_or_package_is_refused_and_nothing_is_installed() -> R {
    tampered_repository_refused("deb")
}

#[test]
fn a_tampered_rpm_repository_or_package_is_refused_and_nothing_is_installed() -> R {
    tampered_repository_refused("rpm")
}

/// `linkmesh-fleet repo-key ARGS` on the bed's server state.
fn repo_key(bed: &Bed, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary("linkmesh-fleet")?)
        .arg("repo-key")
        .args(args)
        .arg("--state")
        .arg(bed.fleet.state())
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "repo-key {args:?}: {text}");
    Ok(text)
}

/// `linkmesh-agent check`'s `archive_keys` item on `host`: its outcome and
/// the item (`check` exits non-zero on a failure, which is asked about).
fn archive_check(host: &TestHost) -> anyhow::Result<(String, serde_json::Value)> {
    let out = host.exec("linkmesh-agent check --json")?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "check --json: {e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let item = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == "archive_keys"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("check has no archive_keys item: {doc}"))?;
    Ok((
        item["outcome"].as_str().unwrap_or_default().to_owned(),
        item,
    ))
}

/// A key rotation that breaks no host: a host configured before it keeps
/// upgrading through it (the metadata signed by both keys, RPMs by the old
/// one), its next one-liner run takes the new keyring, and after the old
/// key is retired it still installs (a version-pin rollback); a host that
/// never took the new keyring is refused by the package manager itself.
fn rotation(format: &str) -> R {
    let mut bed = unpublished_bed(&format!("pkg-rotate-{format}"))?;
    let host = host(&mut bed, &format!("lm-rotate-{format}"))?;
    only_the_fleets_repositories(&host)?;
    if format == "rpm" {
        rpm_database(&bed, &host)?;
    }
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let old = bed.old_version;
    let current = linkmesh_agent::version::AGENT_VERSION;
    let pinned = |v: &str| format!("--ca-pin {} --method {format} --version {v}", t.ca_pin);
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("{} --token-file /root/token", pinned(old)),
    )?;
    assert_eq!(code, 0, "{text}");
    wait_reported(&bed.fleet, old, format)?;
    let keyring = match format {
        "deb" => "/etc/apt/keyrings/linkmesh-archive.gpg",
        _ => "/etc/pki/rpm-gpg/RPM-GPG-KEY-linkmesh",
    };
    let old_keyring = std::fs::read(host.path(keyring))?;
    let (outcome, item) = archive_check(&host)?;
    assert_eq!(outcome, "ok", "{item}");

    let listed = repo_key(&bed, &["list"])?;
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let secret = bed.fleet.secret_file();
    // The new key is made to expire in under 20 days: once it is the only one,
    // `check` warns of it.
    repo_key(
        &bed,
        &[
            "rotate",
            "--secret-file",
            secret.to_str().unwrap_or_default(),
            // A second under 20 days: "in 19 days" however soon it is
            // read (20d would read "in 20 days" within its first second).
            "--key-lifetime",
            "1727999s",
        ],
    )?;
    let listed = repo_key(&bed, &["list"])?;
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.contains("(in 19 days)"), "{listed}");
    bed.fleet.restart(None)?;
    // Still trusted (the old key signs too), and told what the retire
    // will do to it.
    let (outcome, item) = archive_check(&host)?;
    assert_eq!(outcome, "warn", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("once the server retires the old key"),
        "{item}"
    );
    publish(&bed, &bed.new)?;
    let upgrade = operator_upgrade(format);
    let pid = unit(&host)?["MainPID"].clone();
    let out = sh(&host, upgrade)?;
    wait_restarted(&host, &pid)?;
    wait_reported(&bed.fleet, current, format)?;
    assert_eq!(std::fs::read(host.path(keyring))?, old_keyring, "{out}");

    // The next one-liner run takes the keyring with both keys.
    let (code, text) = install_one_liner(&host, &bed.fleet, &pinned(current))?;
    assert_eq!(code, 0, "{text}");
    let both = std::fs::read(host.path(keyring))?;
    assert_ne!(
        both, old_keyring,
        "the one-liner kept the old keyring: {text}"
    );
    let (outcome, item) = archive_check(&host)?;
    assert_eq!(outcome, "ok", "{item}");

    repo_key(&bed, &["retire"])?;
    assert_eq!(repo_key(&bed, &["list"])?.lines().count(), 1);
    bed.fleet.restart(None)?;
    // The key left signing expires within 30 days: a warning that says how
    // to rotate.
    let (outcome, item) = archive_check(&host)?;
    assert_eq!(outcome, "warn", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("(in 19 days)"),
        "{item}"
    );
    assert!(
        item["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("repo-key rotate"),
        "{item}"
    );
    let pid = unit(&host)?["MainPID"].clone();
    let rollback = match format {
        "deb" => format!(
            "apt-get update && apt-get install -y --allow-downgrades linkmesh-agent={old}-1"
        ),
        _ => format!("dnf downgrade -y linkmesh-agent-{old}-1"),
    };
    sh(&host, &rollback)?;
    wait_restarted(&host, &pid)?;
    wait_reported(&bed.fleet, old, format)?;

    // A host that never took the new keyring: the repository is now signed
    // only by a key it does not have, and its package manager refuses.
    std::fs::write(host.path(keyring), &old_keyring)?;
    let cmd = match format {
        // No index left from before (as on a host restored from an old
        // image): apt would otherwise keep using the last signed one.
        "deb" => {
            "rm -rf /var/lib/apt/lists/*; mkdir -p /var/lib/apt/lists/partial; \
             apt-get update 2>&1; apt-get install -y linkmesh-agent 2>&1"
        }
        _ => {
            "rpm -e --allmatches gpg-pubkey >/dev/null 2>&1; dnf clean all >/dev/null 2>&1; \
             dnf upgrade -y linkmesh-agent 2>&1"
        }
    };
    let out = host.exec(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        installed(&host, format).starts_with(&format!("{old}-1")),
        "an unknown key's repository was installed from: {text}"
    );
    assert!(
        ["NO_PUBKEY", "not signed", "GPG", "signature", "public key"]
            .iter()
            .any(|w| text.contains(w)),
        "the package manager did not say why: {text}"
    );
    // And `check` says why, and what to do.
    let (outcome, item) = archive_check(&host)?;
    assert_eq!(outcome, "fail", "{item}");
    let detail = item["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("NO_PUBKEY") && detail.contains(keyring),
        "{item}"
    );
    assert!(
        item["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("re-run the one-liner"),
        "{item}"
    );
    Ok(())
}

#[test]
fn an_archive_key_rotation_keeps_apt_hosts_upgrading() -> R {
    rotation("deb")
}

#[test]
fn an_archive_key_rotation_keeps_dnf_hosts_upgrading() -> R {
    rotation("rpm")
}

/// A plain static web server (python3's http.server) in the test
/// network's namespace: a mirror of the fleet's repositories. Stopped with
/// the guard.
struct Mirror(std::process::Child);

impl Mirror {
    fn start(netns: &str, dir: &std::path::Path, host: &TestHost) -> anyhow::Result<Self> {
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "python3",
                "-m",
                "http.server",
                "8080",
            ])
            .args([
                "--bind",
                linkmesh_integration::testhost::SERVER_ADDR,
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mirror = Self(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let probe = format!(
            "curl -fsS -o /dev/null http://{}:8080/apt/dists/stable/InRelease",
            linkmesh_integration::testhost::SERVER_ADDR
        );
        while !host.exec(&probe)?.status.success() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the mirror did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(mirror)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--mirror URL`: the repository comes from a mirror (here plain HTTP)
/// while trust stays with the fleet: the keyring is fetched from the
/// server itself, so the mirror's copy installs, and a mirror whose
/// metadata was altered is refused (exit 7), the installed version kept.
#[test]
fn a_mirror_serves_the_repository_and_cannot_change_what_is_trusted() -> R {
    let mut bed = bed("pkg-mirror")?;
    let host = host(&mut bed, "lm-mirror")?;
    only_the_fleets_repositories(&host)?;
    let served = served_generation(&bed, &host)?;
    let mirror_dir = bed.dir.path().join("mirror");
    std::fs::create_dir_all(&mirror_dir)?;
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(served.join("apt"))
        .arg(served.join("yum"))
        .arg(&mirror_dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _mirror = Mirror::start(bed.net.netns(), &mirror_dir, &host)?;
    let url = format!(
        "http://{}:8080",
        linkmesh_integration::testhost::SERVER_ADDR
    );
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let old = bed.old_version;
    let args = |v: &str| {
        format!(
            "--ca-pin {} --method deb --version {v} --mirror {url}",
            t.ca_pin
        )
    };
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("{} --token-file /root/token", args(old)),
    )?;
    assert_eq!(code, 0, "{text}");
    let source = std::fs::read_to_string(host.path(REPOSITORY_FILES[0]))?;
    assert!(source.contains(&format!("URIs: {url}/apt\n")), "{source}");
    assert!(installed(&host, "deb").starts_with(&format!("{old}-1")));

    let _t = signed_metadata_altered(&mirror_dir, "deb")?;
    let current = linkmesh_agent::version::AGENT_VERSION;
    let (code, text) = install_one_liner(&host, &bed.fleet, &args(current))?;
    assert_eq!(code, 7, "{text}");
    assert!(
        text.contains("not signed by the fleet's archive key"),
        "{text}"
    );
    assert!(installed(&host, "deb").starts_with(&format!("{old}-1")));
    Ok(())
}

/// `linkmesh-fleet repo-bundle` into `out`, from `artifacts`: its output.
fn repo_bundle(
    bed: &Bed,
    artifacts: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<std::process::Output> {
    let secret = bed.fleet.secret_file();
    bed.fleet.admin(&[
        "repo-bundle",
        "--secret-file",
        secret.to_str().unwrap_or_default(),
        "--artifacts",
        artifacts.to_str().unwrap_or_default(),
        "--out",
        out.to_str().unwrap_or_default(),
    ])
}

/// The same, which must succeed.
fn bundle(bed: &Bed, artifacts: &std::path::Path, out: &std::path::Path) -> R {
    let o = repo_bundle(bed, artifacts, out)?;
    anyhow::ensure!(
        o.status.success(),
        "repo-bundle: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// The offline bundle: `repo-bundle` writes the signed repositories and
/// keys into a directory; unpacked on the host, the one-liner installs
/// from it (`--mirror file:///DIR`) with the keys still from the server,
/// a newer bundle put in its place is what the operator's upgrade takes,
/// and a bundle whose metadata was altered is refused. `--out` that
/// exists is refused before anything is written.
fn offline_bundle(format: &str) -> R {
    let mut bed = unpublished_bed(&format!("pkg-bundle-{format}"))?;
    let host = host(&mut bed, &format!("lm-bundle-{format}"))?;
    only_the_fleets_repositories(&host)?;
    if format == "rpm" {
        rpm_database(&bed, &host)?;
    }
    let first = bed.dir.path().join("bundle-1");
    bundle(&bed, &bed.artifacts, &first)?;
    for f in [
        "apt/dists/stable/InRelease",
        "yum/repodata/repomd.xml.asc",
        "keys/linkmesh-archive.gpg",
        "keys/linkmesh-archive.asc",
    ] {
        assert!(first.join(f).is_file(), "the bundle has no {f}");
    }
    // An existing --out is refused, and left as it was.
    let again = repo_bundle(&bed, &bed.artifacts, &first)?;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(first.join("apt/dists/stable/InRelease").is_file());

    // The site copies the bundle onto the host (or a share it mounts).
    let unpack = |dir: &std::path::Path| -> R {
        sh(&host, "rm -rf /srv/linkmesh && mkdir -p /srv")?;
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir)
            .arg(host.path("/srv/linkmesh"))
            .output()?;
        anyhow::ensure!(out.status.success(), "cp: {out:?}");
        Ok(())
    };
    unpack(&first)?;
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let old = bed.old_version;
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!(
            "--ca-pin {} --method {format} --version {old} --mirror file:///srv/linkmesh --token-file /root/token",
            t.ca_pin
        ),
    )?;
    assert_eq!(code, 0, "{text}");
    wait_reported(&bed.fleet, old, format)?;
    let (source, line) = match format {
        "deb" => (REPOSITORY_FILES[0], "URIs: file:///srv/linkmesh/apt\n"),
        _ => (REPOSITORY_FILES[4], "baseurl=file:///srv/linkmesh/yum\n"),
    };
    let config = std::fs::read_to_string(host.path(source))?;
    assert!(config.contains(line), "{config}");
    let identity = snapshot(&host.path(IDENTITY));
    let runtime = wait_runtime(&host)?;

    // A newer bundle, made where the packages are, replaces the old one.
    let newer = bed.dir.path().join("artifacts-2");
    bed.old.copy_into(&newer)?;
    bed.new.copy_into(&newer)?;
    let second = bed.dir.path().join("bundle-2");
    bundle(&bed, &newer, &second)?;

    // Altered metadata in the bundle: refused, nothing installed.
    let altered = bed.dir.path().join("bundle-altered");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&second)
        .arg(&altered)
        .output()?;
    anyhow::ensure!(cp.status.success(), "cp: {cp:?}");
    let _altered = signed_metadata_altered(&altered, format)?;
    unpack(&altered)?;
    let pid = unit(&host)?["MainPID"].clone();
    let out = host.exec(operator_upgrade(format))?;
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        installed(&host, format).starts_with(&format!("{old}-1")),
        "installed from an altered bundle: {said}"
    );
    assert_eq!(unit(&host)?["MainPID"], pid, "{said}");

    unpack(&second)?;
    let upgrade = operator_upgrade(format);
    let out = sh(&host, upgrade)?;
    wait_restarted(&host, &pid)?;
    wait_reported(&bed.fleet, linkmesh_agent::version::AGENT_VERSION, format)?;
    assert_eq!(snapshot(&host.path(IDENTITY)), identity, "{upgrade}: {out}");
    assert_eq!(
        runtime_pids(&host),
        runtime,
        "{upgrade} restarted the collector runtime"
    );
    Ok(())
}

#[test]
fn an_offline_bundle_in_a_directory_installs_and_upgrades_an_apt_host() -> R {
    offline_bundle("deb")
}

#[test]
fn an_offline_bundle_in_a_directory_installs_and_upgrades_a_dnf_host() -> R {
    offline_bundle("rpm")
}
