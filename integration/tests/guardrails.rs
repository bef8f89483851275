//! Upgrade guardrails on throw-away hosts with real systemd and the real
//! package managers: "server first" refused by every install path (the
//! one-liner by each method, dpkg and apt, rpm) before anything on the host
//! changes, judged from the server or, with the server away, from the
//! version the agent recorded; the lab override; `check --pre-upgrade`.

use std::time::Duration;

use linkmesh_fleet::server::Script;
use linkmesh_integration::harness::{
    Fleet, Packages, base_system_rpm, binary, build_packages, install_one_liner, older_agent,
    publish_binary, scratch, snapshot,
};
use linkmesh_integration::testhost::{SERVER_ADDR, TestHost, TestNet};

type R = anyhow::Result<()>;

const IDENTITY: &str = "/var/lib/linkmesh-agent/identity";

struct Bed {
    dir: tempfile::TempDir,
    net: TestNet,
    fleet: Fleet,
    old: Packages,
    new: Packages,
    old_version: &'static str,
}

/// A fleet server that runs the older version (0.0.9) and, as an operator
/// might by mistake, offers this build (0.1.0) as its latest agent; both
/// builds' packages and binaries in its artifacts.
fn bed(name: &str) -> anyhow::Result<Bed> {
    let dir = scratch(name)?;
    let (older, old_version) = older_agent()?;
    let artifacts = dir.path().join("artifacts");
    let old = build_packages(&older, &artifacts, 1)?;
    let new = build_packages(&binary("linkmesh-agent")?, &artifacts, 1)?;
    publish_binary(&artifacts, old_version, &std::fs::read(&older)?, None)?;
    publish_binary(
        &artifacts,
        linkmesh_agent::version::AGENT_VERSION,
        &std::fs::read(binary("linkmesh-agent")?)?,
        None,
    )?;
    let net = TestNet::new()?;
    let fleet = Fleet::start_in_netns(
        &dir.path().join("fleet"),
        net.netns(),
        &format!("{SERVER_ADDR}:8443"),
        &[
            "--report-interval",
            "1s",
            "--artifacts",
            artifacts.to_str().unwrap_or_default(),
            "--server-version",
            old_version,
            "--latest-agent",
            linkmesh_agent::version::AGENT_VERSION,
        ],
    )?;
    Ok(Bed {
        dir,
        net,
        fleet,
        old,
        new,
        old_version,
    })
}

fn host(bed: &mut Bed, name: &str) -> anyhow::Result<TestHost> {
    let host = TestHost::boot(name)?;
    bed.net.attach(&host)?;
    host.copy_in(&bed.old.deb, "/root/old.deb", 0o644)?;
    host.copy_in(&bed.new.deb, "/root/new.deb", 0o644)?;
    host.copy_in(&bed.old.rpm, "/root/old.rpm", 0o644)?;
    host.copy_in(&bed.new.rpm, "/root/new.rpm", 0o644)?;
    Ok(host)
}

/// What must not change when an install is refused: the agent binary, the
/// identity, the configuration, the package database's version, the
/// running agent.
fn fingerprint(host: &TestHost, packaged: &str) -> anyhow::Result<String> {
    let ids = snapshot(&host.path(IDENTITY));
    let conf = snapshot(&host.path("/etc/linkmesh"));
    let rest = host.sh(&format!(
        "sha256sum /usr/bin/linkmesh-agent; {packaged}; systemctl show -p MainPID --value linkmesh-agent"
    ))?;
    Ok(format!("{ids:?}\n{conf:?}\n{rest}"))
}

fn assert_refusal(text: &str, old: &str) {
    let new = linkmesh_agent::version::AGENT_VERSION;
    for part in [
        format!("linkmesh-agent {new} is newer than the fleet server {old}"),
        "the fleet server is upgraded first".to_owned(),
        "upgrade the fleet server to 0.1 or later first".to_owned(),
        "LINKMESH_ALLOW_AHEAD=1".to_owned(),
    ] {
        assert!(text.contains(&part), "{part:?} missing from:\n{text}");
    }
}

/// Waits until the server's drift report shows this host `ahead`.
fn wait_ahead(fleet: &Fleet) -> R {
    let new = linkmesh_agent::version::AGENT_VERSION;
    fleet.wait_drift(Duration::from_secs(30), "ahead", |h| {
        h["agent_version"] == new && h["verdict"] == "ahead"
    })?;
    Ok(())
}

/// Debian family: the one-liner (deb and binary methods, the version from
/// the server's own `/agent/latest`), `dpkg -i` and `apt-get install` of a
/// newer package on an enrolled host, with the server up and away; then the
/// override.
#[test]
fn server_first_is_enforced_on_a_debian_host() -> R {
    let mut bed = bed("guard-deb")?;
    let host = host(&mut bed, "lm-guard-deb")?;
    let t = bed.fleet.token(1, "1h")?;
    let pin = t.ca_pin.clone();
    std::fs::write(host.path("/root/token"), &t.token)?;

    // A fresh host: whatever the method, refused before anything is put.
    for method in ["auto", "binary"] {
        let (code, text) = install_one_liner(
            &host,
            &bed.fleet,
            &format!("--ca-pin {pin} --token-file /root/token --method {method}"),
        )?;
        assert_eq!(code, 12, "--method {method}:\n{text}");
        assert_refusal(&text, bed.old_version);
        assert!(text.contains("nothing on this host was changed"), "{text}");
        for absent in [
            "/usr/bin/linkmesh-agent",
            "/etc/linkmesh",
            "/var/lib/linkmesh-agent",
        ] {
            assert!(
                !host.path(absent).exists(),
                "{method}: {absent} was created"
            );
        }
    }

    // The server's own version installs and enrols.
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!(
            "--ca-pin {pin} --token-file /root/token --version {}",
            bed.old_version
        ),
    )?;
    assert_eq!(code, 0, "{text}");
    let dpkg = "dpkg-query -W -f='${Version} ${db:Status-Status}\\n' linkmesh-agent";
    let before = fingerprint(&host, dpkg)?;
    let identity = snapshot(&host.path(IDENTITY));
    assert!(
        before.contains(&format!("{}-1 installed", bed.old_version)),
        "{before}"
    );
    assert!(
        host.path("/var/lib/linkmesh-agent/server-version.json")
            .exists()
    );

    // dpkg and apt on the enrolled host: the installed agent judges in the
    // preinst, and the package manager gives up with the old one in place.
    let apt = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades";
    for cmd in [
        "dpkg -i /root/new.deb".to_owned(),
        format!("{apt} /root/new.deb"),
        bed.fleet
            .one_liner(Script::Install, &format!("--ca-pin {pin}"))?,
    ] {
        let (code, text) = host.run(&cmd)?;
        assert_ne!(code, 0, "`{cmd}` went ahead:\n{text}");
        assert_refusal(&text, bed.old_version);
        assert!(text.contains("asked https://"), "{text}");
        assert_eq!(
            fingerprint(&host, dpkg)?,
            before,
            "`{cmd}` changed the host"
        );
    }

    // The server away: the version the agent recorded judges.
    bed.fleet.stop();
    let (code, text) = host.run("dpkg -i /root/new.deb")?;
    assert_ne!(code, 0, "{text}");
    assert_refusal(&text, bed.old_version);
    assert!(
        text.contains("said at") && text.contains("it cannot be reached now"),
        "{text}"
    );
    assert_eq!(fingerprint(&host, dpkg)?, before);
    bed.fleet.restart(None)?;

    // The lab override: installed, the agent runs and reports itself ahead.
    let (code, text) =
        install_one_liner(&host, &bed.fleet, &format!("--ca-pin {pin} --allow-ahead"))?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("installing it anyway because LINKMESH_ALLOW_AHEAD=1"),
        "{text}"
    );
    let after = host.sh(dpkg)?;
    assert!(
        after.contains(&format!(
            "{}-1 installed",
            linkmesh_agent::version::AGENT_VERSION
        )),
        "{after}"
    );
    assert_eq!(
        snapshot(&host.path(IDENTITY)),
        identity,
        "the identity changed"
    );
    wait_ahead(&bed.fleet)?;
    assert_eq!(bed.fleet.hosts()?.len(), 1);
    drop(bed.dir);
    Ok(())
}

fn agent_cmd(
    agent: &linkmesh_integration::harness::AgentEnv,
    args: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<(i32, String, String)> {
    let out = agent.cmd()?.args(args).envs(env.iter().copied()).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The judge itself, on this machine against a local server: asked,
/// recorded when the server is away, unknown on a host that never heard of
/// one; the override; and `check --pre-upgrade` around it.
#[test]
fn the_server_first_judge_and_the_pre_upgrade_check() -> R {
    let dir = scratch("guard-judge")?;
    let mut fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = linkmesh_integration::harness::AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(1, "1h")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(
        out.status.success(),
        "{}",
        linkmesh_integration::harness::text(&out)
    );
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(
        dir.path().join("agent/state/server-version.json"),
    )?)?;
    assert_eq!(
        record["version"],
        linkmesh_agent::version::AGENT_VERSION,
        "{record}"
    );

    let v = linkmesh_agent::version::agent_version();
    let ahead = format!("{}.{}.0", v.major, v.minor + 1);
    let (code, _, err) = agent_cmd(&agent, &["server-first", "--to", &ahead], &[])?;
    assert_eq!(code, 12, "{err}");
    assert!(
        err.contains(&format!("asked {} just now", fleet.url)),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "upgrade the fleet server to {}.{} or later first",
            v.major,
            v.minor + 1
        )),
        "{err}"
    );
    let (code, out, _) = agent_cmd(&agent, &["server-first", "--to", &ahead, "--json"], &[])?;
    assert_eq!(code, 12);
    let j: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(j["admission"], "refused", "{j}");
    assert_eq!(j["source"]["kind"], "asked", "{j}");
    let (code, _, err) = agent_cmd(
        &agent,
        &["server-first", "--to", &ahead],
        &[("LINKMESH_ALLOW_AHEAD", "1")],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("installing it anyway"), "{err}");
    let (code, _, err) = agent_cmd(&agent, &["server-first"], &[])?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("within the window"), "{err}");

    // check --pre-upgrade: the server's offer is the target by default.
    let (code, out, err) = agent_cmd(&agent, &["check", "--pre-upgrade", "--json"], &[])?;
    let doc: serde_json::Value = serde_json::from_str(&out)?;
    let by_id = |id: &str| {
        doc["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .cloned()
            .unwrap_or_default()
    };
    for id in ["identity", "server", "target_version", "space", "rollback"] {
        assert_eq!(by_id(id)["outcome"], "ok", "{id}: {doc} {err}");
    }
    assert!(
        by_id("rollback")["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("--version {} --method binary", v)),
        "{doc}"
    );
    let _ = code;
    let (code, out, _) = agent_cmd(
        &agent,
        &["check", "--pre-upgrade", "--to", &ahead, "--json"],
        &[],
    )?;
    assert_eq!(code, 1, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(doc["ok"], false);
    assert!(
        doc["checks"].as_array().is_some_and(|a| a
            .iter()
            .any(|c| c["id"] == "target_version" && c["outcome"] == "fail")),
        "{doc}"
    );

    // The server away: the record judges, and says so.
    fleet.stop();
    let (code, _, err) = agent_cmd(
        &agent,
        &["server-first", "--to", &ahead, "--timeout", "2s"],
        &[],
    )?;
    assert_eq!(code, 12, "{err}");
    assert!(
        err.contains("said at") && err.contains("cannot ask"),
        "{err}"
    );
    let (code, out, _) = agent_cmd(&agent, &["check", "--pre-upgrade", "--json"], &[])?;
    assert_eq!(code, 1, "{out}");

    // A host that never heard of a server: a warning, not a refusal.
    let fresh = linkmesh_integration::harness::AgentEnv::new(&dir.path().join("fresh"))?;
    let (code, _, err) = agent_cmd(&fresh, &["server-first", "--to", "9.0.0"], &[])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: the fleet server's version is unknown"),
        "{err}"
    );
    let (code, _, err) = agent_cmd(&fresh, &["server-first", "--server", "https://x:1"], &[])?;
    assert_eq!(code, 2, "{err}");
    Ok(())
}

/// RPM family: `rpm -U`, `dnf upgrade` and the one-liner's rpm method
/// (whose judge is the binary inside the package, read with rpm2archive),
/// then the override through the package manager's environment.
#[test]
fn server_first_is_enforced_on_an_rpm_host() -> R {
    let mut bed = bed("guard-rpm")?;
    let host = host(&mut bed, "lm-guard-rpm")?;
    let base = bed.dir.path().join("testhost-base.rpm");
    base_system_rpm(&base)?;
    host.copy_in(&base, "/root/base.rpm", 0o644)?;
    host.sh("rpm --initdb && rpm -i /root/base.rpm && rpm -i /root/old.rpm")?;
    let t = bed.fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    host.sh(&format!(
        "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && systemctl start linkmesh-agent",
        bed.fleet.url, t.ca_pin
    ))?;
    let rpmq = "rpm -q linkmesh-agent";
    let before = fingerprint(&host, rpmq)?;
    assert!(
        before.contains(&format!("linkmesh-agent-{}-1", bed.old_version)),
        "{before}"
    );
    for cmd in [
        "rpm -U /root/new.rpm".to_owned(),
        "dnf -y --disablerepo='*' upgrade /root/new.rpm".to_owned(),
        bed.fleet.one_liner(
            Script::Install,
            &format!("--ca-pin {} --method rpm", t.ca_pin),
        )?,
    ] {
        let (code, text) = host.run(&cmd)?;
        assert_ne!(code, 0, "`{cmd}` went ahead:\n{text}");
        assert_refusal(&text, bed.old_version);
        assert_eq!(
            fingerprint(&host, rpmq)?,
            before,
            "`{cmd}` changed the host"
        );
    }
    let (code, text) = host.run("LINKMESH_ALLOW_AHEAD=1 rpm -U /root/new.rpm")?;
    assert_eq!(code, 0, "{text}");
    let after = host.sh(rpmq)?;
    assert!(
        after.contains(&format!(
            "linkmesh-agent-{}-1",
            linkmesh_agent::version::AGENT_VERSION
        )),
        "{after}"
    );
    wait_ahead(&bed.fleet)?;
    Ok(())
}
