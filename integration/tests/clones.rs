//! Clones the host cannot tell (issue 14, item 4): a copy of an enrolled
//! host's state on a machine with the same machine-id presents the same
//! certificate. The server tells the two agents apart by their run ids,
//! flags the row `duplicate_identity` (never a silent merge), and both
//! agents' `check` say the identity is in use elsewhere and what to do.

use std::time::Duration;

use linkmesh_integration::harness::{AgentEnv, fleet_with_agent, text};
use serde_json::Value;

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(30);

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()?;
    anyhow::ensure!(out.status.success(), "cp -a: {}", text(&out));
    Ok(())
}

fn standing(agent: &AgentEnv) -> anyhow::Result<(Option<i32>, Value)> {
    let out = agent.cmd()?.args(["check", "--json"]).output()?;
    let doc: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("check --json: {e}: {}", text(&out)))?;
    let item = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == "standing"))
        .cloned()
        .unwrap_or_default();
    Ok((out.status.code(), item))
}

fn wait_hosts(
    fleet: &linkmesh_integration::harness::Fleet,
    pred: impl Fn(&[Value]) -> bool,
) -> anyhow::Result<Vec<Value>> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let hosts = fleet.hosts()?;
        if !hosts.is_empty() && pred(&hosts) {
            return Ok(hosts);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "hosts never matched: {hosts:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn one_identity_on_two_machines_is_flagged_on_the_server_and_in_both_checks() -> R {
    let (dir, fleet, original) = fleet_with_agent("clone-same-mid", &[])?;
    // The copy: the same state (identity, supervisor storage) and
    // configuration, as a disk image carries them.
    let copy = AgentEnv::new(&dir.path().join("copy"))?;
    copy_tree(&original.state, &copy.state)?;
    std::fs::create_dir_all(copy.config.parent().unwrap_or(&copy.root))?;
    std::fs::copy(&original.config, &copy.config)?;

    let a = original.spawn_run(&[], &[])?;
    a.wait_status(T, "the original reporting", |s| {
        s["reporter"]["reports"].as_u64() >= Some(2)
    })?;
    let (_, item) = standing(&original)?;
    assert_eq!(item["outcome"], "ok", "one machine: {item}");
    let b = copy.spawn_run(&[], &[])?;
    let flagged = |s: &Value| s["reporter"]["identity_in_use_elsewhere"].is_string();
    let sa = a.wait_status(T, "the original told", flagged)?;
    let sb = b.wait_status(T, "the copy told", flagged)?;
    for s in [&sa, &sb] {
        let words = s["reporter"]["identity_in_use_elsewhere"]
            .as_str()
            .unwrap_or_default();
        assert!(
            words.contains("is in use on another machine too") && words.contains("image-prep"),
            "{words}"
        );
        // Both keep their collectors.
        assert_eq!(s["supervision"]["state"], "running", "{s}");
    }
    // One row, flagged: never silently merged (the state files follow the
    // server's memory within a second).
    let hosts = wait_hosts(&fleet, |h| h[0]["duplicate_identity"].is_object())?;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert!(
        hosts[0]["duplicate_identity"]["run_ids"]
            .as_array()
            .is_some_and(|r| r.len() == 2),
        "{hosts:?}"
    );
    let drift = fleet.drift()?;
    assert!(
        drift["hosts"][0]["duplicate_identity_since"].is_string(),
        "{drift}"
    );
    let listing = fleet.admin(&["hosts"])?;
    assert!(
        text(&listing).contains("DUPLICATE IDENTITY since"),
        "{}",
        text(&listing)
    );
    assert!(
        fleet.log().contains("flagged duplicate_identity"),
        "{}",
        fleet.log()
    );
    for agent in [&original, &copy] {
        let (code, item) = standing(agent)?;
        assert_eq!(code, Some(1), "{item}");
        assert_eq!(item["outcome"], "fail", "{item}");
        assert!(
            item["detail"]
                .as_str()
                .unwrap_or_default()
                .starts_with("the identity is in use elsewhere"),
            "{item}"
        );
        assert!(
            item["hint"]
                .as_str()
                .unwrap_or_default()
                .contains("image-prep"),
            "{item}"
        );
    }

    // The fix: image-prep on the copy (refused while its agent runs), a
    // new enrolment, two rows with their own host ids and instance uids.
    let out = copy.cmd()?.arg("image-prep").output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("stop it first"), "{}", text(&out));
    drop(b);
    let out = copy.cmd()?.arg("image-prep").output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(!copy.state.join("identity").exists());
    assert!(!copy.state.join("supervisor/persistent_state.yaml").exists());
    assert!(copy.config.exists(), "configuration kept");
    let status = copy.status()?;
    assert_eq!(status["enrolled"], false, "{status}");
    let t = fleet.token(1, "1h")?;
    let out = copy.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let b = copy.spawn_run(&[], &[])?;
    let sb = b.wait_status(T, "the copy reporting as its own host", |s| {
        s["reporter"]["reports"].as_u64() >= Some(1) && s["reporter"]["opamp"]["connected"] == true
    })?;
    assert!(
        sb["reporter"]["identity_in_use_elsewhere"].is_null(),
        "{sb}"
    );
    // The original's flag clears after ten report intervals with one run id.
    a.wait_status(T, "the flag cleared", |s| {
        s["reporter"]["identity_in_use_elsewhere"].is_null()
    })?;
    let hosts = wait_hosts(&fleet, |h| {
        h.len() == 2
            && h.iter().all(|h| h["duplicate_identity"].is_null())
            && h.iter().all(|h| {
                h["opamp"]["instance_uid"]
                    .as_str()
                    .is_some_and(|u| !u.is_empty())
            })
    })?;
    assert_ne!(hosts[0]["host_id"], hosts[1]["host_id"]);
    assert_ne!(
        hosts[0]["opamp"]["instance_uid"], hosts[1]["opamp"]["instance_uid"],
        "{hosts:?}"
    );
    let (_, item) = standing(&original)?;
    assert_eq!(item["outcome"], "ok", "{item}");
    Ok(())
}

mod rekey {
    //! The Rekey RPC as the server judges it (the real agent's re-key at
    //! start, on a machine with another machine-id, is in
    //! `a_copied_state_on_another_machine_re_keys_itself` below).

    use std::time::Duration;

    use linkmesh_agent::{proto, reporter::refusal_standing};
    use linkmesh_integration::harness::{fleet_with_agent, text};

    use linkmesh_integration::harness::{mtls_client as client, rekey_as_copy as rekey};

    fn standing(r: Result<proto::EnrollResponse, tonic::Status>) -> proto::Standing {
        match r {
            Ok(_) => proto::Standing::Current,
            Err(s) => refusal_standing(&s),
        }
    }

    const OTHER_MACHINE: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_clone_gets_its_own_host_the_original_keeps_its_and_copies_that_are_not_clones_get_nothing()
    -> anyhow::Result<()> {
        let (_dir, fleet, agent) = fleet_with_agent("rekey-server", &[])?;
        let original = agent.identity()?;
        let serial_before = fleet.hosts()?[0]["cert_serial"].clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let key = rcgen::KeyPair::generate()?;
        let own = linkmesh_agent::host::collect().machine_id_hash;
        rt.block_on(async {
            // From the machine it was enrolled on: not a clone.
            let r = rekey(&original, &key, &own).await;
            assert_eq!(standing(r), proto::Standing::NotAClone);
            // From another machine: a host of its own, and the same one on
            // a retry with the same key (a clone killed after the answer).
            let first = rekey(&original, &key, OTHER_MACHINE).await?;
            assert_ne!(first.host_id, original.host_id.as_str());
            let again = rekey(&original, &key, OTHER_MACHINE).await?;
            assert_eq!(again.host_id, first.host_id);
            // The original is untouched: it reports with its certificate.
            let mut c = client(&original)?;
            c.report(proto::ReportRequest {
                full: true,
                agent_version: linkmesh_agent::version::AGENT_VERSION.into(),
                ..Default::default()
            })
            .await?;
            anyhow::Ok(first.host_id)
        })
        .and_then(|clone_id| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let hosts = loop {
                let hosts = fleet.hosts()?;
                if hosts.len() == 2 {
                    break hosts;
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "{hosts:?}");
                std::thread::sleep(Duration::from_millis(100));
            };
            let clone = hosts
                .iter()
                .find(|h| h["host_id"] == clone_id.as_str())
                .cloned()
                .unwrap_or_default();
            let orig = hosts
                .iter()
                .find(|h| h["host_id"] == original.host_id.as_str())
                .cloned()
                .unwrap_or_default();
            assert_eq!(clone["cloned_from"], original.host_id.as_str(), "{hosts:?}");
            assert_eq!(orig["cloned_from"], serde_json::Value::Null);
            assert_eq!(
                orig["cert_serial"], serial_before,
                "the original's certificate is unchanged"
            );
            let drift = fleet.drift()?;
            assert!(
                drift["hosts"].as_array().is_some_and(|a| a
                    .iter()
                    .any(|h| h["cloned_from"] == original.host_id.as_str())),
                "{drift}"
            );
            Ok(())
        })?;

        // A copy of a revoked identity gets nothing.
        let out = fleet.admin(&["hosts", "revoke", original.host_id.as_str()])?;
        assert!(out.status.success(), "{}", text(&out));
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let k = rcgen::KeyPair::generate()?;
                match standing(rekey(&original, &k, OTHER_MACHINE).await) {
                    proto::Standing::Revoked => break,
                    other if tokio::time::Instant::now() > deadline => {
                        anyhow::bail!("a revoked identity re-keyed: {other:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            anyhow::Ok(())
        })?;

        // Under quarantine a clone waits for the operator.
        let (_dir2, fleet2, agent2) =
            fleet_with_agent("rekey-quarantine", &["--clone-policy", "quarantine"])?;
        drop(fleet);
        let second = agent2.identity()?;
        let k = rcgen::KeyPair::generate()?;
        let err = rt
            .block_on(rekey(&second, &k, OTHER_MACHINE))
            .expect_err("issued under quarantine");
        assert_eq!(
            refusal_standing(&err),
            proto::Standing::ClonePending,
            "{err:?}"
        );
        let id = err
            .message()
            .split("hosts approve ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_owned();
        let listing = fleet2.admin(&["hosts"])?;
        assert!(
            text(&listing).contains(&format!("clone held for approval: {id}")),
            "{}",
            text(&listing)
        );
        let out = fleet2.admin(&["hosts", "approve", &id])?;
        assert!(out.status.success(), "{}", text(&out));
        let issued = rt.block_on(rekey(&second, &k, OTHER_MACHINE))?;
        assert_ne!(issued.host_id, second.host_id.as_str());
        let out = fleet2.admin(&["hosts", "approve", "0123456789abcdef"])?;
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        Ok(())
    }
}

/// The real agent on a machine with another machine-id than the one its
/// (copied) identity was enrolled on: at start it resets the collector's
/// instance uid, never reports as the original, and re-keys itself.
#[test]
fn a_copied_state_on_another_machine_re_keys_itself() -> R {
    use linkmesh_integration::{
        harness::{binary, snapshot},
        testhost::TestHost,
    };
    let (_dir, mut net, fleet) =
        linkmesh_integration::testhost::server_across_the_veth("clone-hosts", &[])?;
    let a = TestHost::boot("lm-clone-a")?;
    let b = TestHost::boot("lm-clone-b")?;
    for h in [&a, &b] {
        net.attach(h)?;
        h.copy_in(&binary("linkmesh-agent")?, "/usr/bin/linkmesh-agent", 0o755)?;
    }
    let t = fleet.token(1, "1h")?;
    std::fs::write(a.path("/root/token"), &t.token)?;
    a.sh(&format!(
        "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token",
        fleet.url, t.ca_pin
    ))?;
    // The disk copied: the whole state, supervisor storage included.
    a.sh("mkdir -p /var/lib/linkmesh-agent/supervisor && echo 'instance_id: 0190a6b2-5c1e-7d3f-8a4b-9c0d1e2f3a4b' > /var/lib/linkmesh-agent/supervisor/persistent_state.yaml")?;
    copy_tree(&a.path("/var/lib/linkmesh-agent"), &b.path("/var/lib/"))?;
    let original_identity = snapshot(&a.path("/var/lib/linkmesh-agent/identity"));
    let original: Value = serde_json::from_str(&a.sh("linkmesh-agent status --json")?)?;
    let started = std::time::Instant::now();
    b.sh("systemd-run --unit lm-agent --quiet linkmesh-agent run")?;
    let deadline = std::time::Instant::now() + T;
    let hosts = loop {
        let hosts = fleet.hosts()?;
        if hosts.len() == 2 && hosts.iter().any(|h| h["cloned_from"].is_string()) {
            break hosts;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no clone row: {hosts:?}\n{}",
            b.sh("journalctl -u lm-agent --no-pager | tail -n 30")
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let clone = hosts
        .iter()
        .find(|h| h["cloned_from"].is_string())
        .cloned()
        .unwrap_or_default();
    assert_eq!(clone["cloned_from"], original["host_id"], "{hosts:?}");
    assert_eq!(clone["hostname"], "lm-clone-b", "{hosts:?}");
    // The clone's own identity on its disk; the original's untouched.
    let deadline = std::time::Instant::now() + T;
    let st: Value = loop {
        let st: Value = serde_json::from_str(&b.sh("linkmesh-agent status --json")?)?;
        if st["host_id"] == clone["host_id"]
            && st["runtime"]["reporter"]["reports"].as_u64() >= Some(1)
        {
            break st;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st["runtime"]["reporter"]["clone_pending"].is_null(), "{st}");
    assert_eq!(
        snapshot(&a.path("/var/lib/linkmesh-agent/identity")),
        original_identity
    );
    // The copied instance uid is gone (the supervisor makes its own).
    assert!(
        !b.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml")
            .exists()
    );
    let journal = b.sh("journalctl -u lm-agent --no-pager")?;
    assert!(
        journal.contains("This machine is a copy of host"),
        "{journal}"
    );
    assert!(
        !journal.contains("Report failed"),
        "the copy must not report as the original: {journal}"
    );
    // A restart of the clone's agent keeps its new identity.
    b.sh("systemctl stop lm-agent; systemd-run --unit lm-agent2 --quiet linkmesh-agent run")?;
    let deadline = std::time::Instant::now() + T;
    loop {
        let st: Value = serde_json::from_str(&b.sh("linkmesh-agent status --json")?)?;
        let pid = b.sh("systemctl show -p MainPID --value lm-agent2")?;
        if st["runtime"]["agent_pid"].as_u64().map(|p| p.to_string()) == Some(pid.trim().to_owned())
            && st["runtime"]["reporter"]["reports"].as_u64() >= Some(1)
        {
            assert_eq!(st["host_id"], clone["host_id"], "{st}");
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "restarted clone: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fleet.hosts()?.len(), 2);
    eprintln!(
        "clone first start to its own identity: {} ms",
        took.as_millis()
    );
    Ok(())
}

/// The agent's and the collector's last journal lines, for a failure.
fn journals(host: &linkmesh_integration::testhost::TestHost) -> String {
    format!(
        "agent:\n{}\ncollector:\n{}",
        host.journal(Some("linkmesh-agent"), "-n 40"),
        host.journal(Some("linkmesh-collector"), "-n 20")
    )
}

/// A whole disk copied (identity, supervisor storage with the collector's
/// instance uid, the enabled agent and collector units) boots as a second
/// machine running the real supervisor and collector: its collector unit
/// waits for the agent to reset the copied uid (never connecting as the
/// original's collector), runs under the copied certificate marked as a
/// pending clone (kept off the original's row), and moves to the clone's
/// own identity once the re-key is done. The original's row keeps its
/// instance uid throughout.
#[test]
fn a_cloned_disk_boots_with_a_collector_of_its_own() -> R {
    use linkmesh_integration::{harness::install_runtime, testhost::TestHost};
    let (_dir, mut net, fleet) = linkmesh_integration::testhost::server_across_the_veth(
        "clone-disk",
        &["--clone-policy", "quarantine"],
    )?;
    let a = TestHost::boot("lm-disk-a")?;
    let mut b = TestHost::boot("lm-disk-b")?;
    net.attach(&a)?;
    a.copy_in(
        &linkmesh_integration::harness::binary("linkmesh-agent")?,
        "/usr/bin/linkmesh-agent",
        0o755,
    )?;
    install_runtime(&a)?;
    linkmesh_integration::harness::install_agent_unit(
        &a,
        linkmesh_integration::harness::QUIET_COLLECTOR_CONFIG,
    )?;
    let t = fleet.token(1, "1h")?;
    std::fs::write(a.path("/root/token"), &t.token)?;
    a.sh(&format!(
        "linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && rm /root/token && systemctl daemon-reload && systemctl enable --now linkmesh-agent",
        fleet.url, t.ca_pin
    ))?;
    let original: Value = serde_json::from_str(&a.sh("linkmesh-agent status --json")?)?;
    let original_id = original["host_id"].as_str().unwrap_or_default().to_owned();
    let hosts = wait_hosts(&fleet, |h| {
        h.iter()
            .any(|h| h["host_id"] == original_id.as_str() && h["opamp"]["connected"] == true)
    })?;
    let original_uid = hosts[0]["opamp"]["instance_uid"].clone();
    assert!(
        original_uid.as_str().is_some_and(|u| !u.is_empty()),
        "{hosts:?}"
    );

    // The disk, copied while the original runs (as a snapshot is taken).
    for path in [
        "/var/lib/linkmesh-agent",
        "/etc/linkmesh",
        "/etc/systemd/system",
        "/usr/bin/linkmesh-agent",
        "/usr/bin/opampsupervisor",
        "/usr/bin/otelcol-contrib",
    ] {
        let to = b.path(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let _ = std::fs::remove_dir_all(&to);
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(a.path(path))
            .arg(&to)
            .output()?;
        anyhow::ensure!(out.status.success(), "cp {path}: {}", text(&out));
    }
    let copied_uid = std::fs::read_to_string(
        b.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml"),
    )?;
    // The collector's unit will not start on the copy before the agent ran.
    b.sh("systemctl daemon-reload && systemctl start linkmesh-collector")?;
    let props = b.unit_properties("linkmesh-collector.service", &["ActiveState", "Result"])?;
    assert_eq!(
        props.get("ActiveState").map(String::as_str),
        Some("inactive"),
        "{props:?}"
    );
    assert_eq!(
        props.get("Result").map(String::as_str),
        Some("exec-condition"),
        "{props:?}"
    );
    assert!(
        b.journal(Some("linkmesh-collector"), "")
            .contains("this machine is a copy of host"),
        "{}",
        b.journal(Some("linkmesh-collector"), "")
    );

    // Its first boot. The original's row never takes the copy's collector.
    b.reboot()?;
    net.attach(&b)?;
    let original_row_kept = |hosts: &[Value]| {
        let orig = linkmesh_integration::harness::host_row(hosts, &original_id);
        assert_eq!(
            orig["opamp"]["instance_uid"], original_uid,
            "the original's row took another collector: {hosts:?}"
        );
        assert_eq!(orig["hostname"], "lm-disk-a", "{hosts:?}");
    };
    // Held for approval: the copy's collector runs meanwhile, under the
    // copied certificate, marked as a pending clone.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let held = loop {
        original_row_kept(&fleet.hosts()?);
        let st: Value =
            serde_json::from_str(&b.sh("linkmesh-agent status --json")?).unwrap_or_default();
        let pending = st["runtime"]["reporter"]["clone_pending"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if pending.contains("hosts approve ")
            && st["runtime"]["supervision"]["state"] == "running"
            && fleet.log().contains("awaiting its own identity")
        {
            break pending;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the copy never ran its collector while held: {st}\n{}",
            journals(&b)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let config = std::fs::read_to_string(b.path("/var/lib/linkmesh-agent/supervisor.yaml"))?;
    assert!(
        config.contains(&format!("linkmesh.clone_of: \"{original_id}\"")),
        "{config}"
    );
    let check = b.exec("linkmesh-agent check --json")?;
    let doc: Value = serde_json::from_slice(&check.stdout).unwrap_or_default();
    let machine = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == "machine"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(machine["outcome"], "warn", "{doc}");
    assert!(
        machine["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("hosts approve ID"),
        "{machine}"
    );
    let id = held
        .split("hosts approve ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .trim_end_matches([')', '.', ','])
        .to_owned();
    let out = fleet.admin(&["hosts", "approve", &id])?;
    assert!(out.status.success(), "{}", text(&out));

    // Approved: its own identity, and its collector moves to it.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (clone_id, clone_uid) = loop {
        let hosts = fleet.hosts()?;
        original_row_kept(&hosts);
        if let Some(c) = hosts
            .iter()
            .find(|h| h["cloned_from"] == original_id.as_str())
            && c["opamp"]["connected"] == true
            && c["opamp"]["instance_uid"]
                .as_str()
                .is_some_and(|u| !u.is_empty())
        {
            break (c["host_id"].clone(), c["opamp"]["instance_uid"].clone());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the clone's collector never connected as its own host: {hosts:?}\n{}",
            journals(&b)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(clone_uid, original_uid);
    let st: Value = serde_json::from_str(&b.sh("linkmesh-agent status --json")?)?;
    assert_eq!(st["host_id"], clone_id, "{st}");
    let uid_now = std::fs::read_to_string(
        b.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml"),
    )?;
    assert_ne!(uid_now, copied_uid);
    let supervisor_config =
        std::fs::read_to_string(b.path("/var/lib/linkmesh-agent/supervisor.yaml"))?;
    assert!(
        !supervisor_config.contains("linkmesh.clone_of")
            && supervisor_config.contains(clone_id.as_str().unwrap_or("?")),
        "{supervisor_config}"
    );
    // The original is untouched and still connected with its collector.
    let orig = linkmesh_integration::harness::host_row(&fleet.hosts()?, &original_id);
    assert_eq!(orig["opamp"]["connected"], true, "{orig}");
    assert_eq!(orig["opamp"]["instance_uid"], original_uid, "{orig}");
    Ok(())
}

/// The first-boot enrolment file, as cloud-init would write it.
fn write_enroll_env(
    h: &linkmesh_integration::testhost::TestHost,
    fleet: &linkmesh_integration::harness::Fleet,
    t: &linkmesh_integration::harness::TokenInfo,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(h.path("/etc/linkmesh"))?;
    std::fs::write(
        h.path("/etc/linkmesh/enroll.env"),
        format!(
            "LINKMESH_SERVER={}\nLINKMESH_CA_PIN={}\nLINKMESH_TOKEN={}\n",
            fleet.url, t.ca_pin, t.token
        ),
    )?;
    Ok(())
}

/// A host made from a generalised image enrols on its first boot from the
/// token its provisioning left in `/etc/linkmesh/enroll.env` (retrying
/// while the network is not up yet), removes the spent token, starts the
/// agent, and never enrols again on later boots. A refused token leaves no
/// identity and the agent stopped, and a corrected file then enrols.
#[test]
fn an_image_enrols_on_its_first_boot_from_its_token_file_and_never_again() -> R {
    use linkmesh_integration::testhost::TestHost;
    let (_dir, mut net, fleet) =
        linkmesh_integration::testhost::server_across_the_veth("first-boot", &[])?;
    let mut h = TestHost::boot("lm-first-boot")?;
    h.copy_in(
        &linkmesh_integration::harness::binary("linkmesh-agent")?,
        "/usr/bin/linkmesh-agent",
        0o755,
    )?;
    let systemd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in ["linkmesh-agent.service", "linkmesh-enroll.service"] {
        h.copy_in(
            &systemd.join(unit),
            &format!("/etc/systemd/system/{unit}"),
            0o644,
        )?;
    }
    h.sh("systemctl daemon-reload && systemctl enable --quiet linkmesh-agent linkmesh-enroll")?;
    let t = fleet.token(1, "1h")?;
    write_enroll_env(&h, &fleet, &t)?;

    // First boot; the network comes a moment later.
    h.reboot()?;
    std::thread::sleep(Duration::from_secs(1));
    net.attach(&h)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let active = h.sh("systemctl is-active linkmesh-agent || true")?;
        if active.trim() == "active"
            && h.path("/var/lib/linkmesh-agent/identity/identity.toml")
                .exists()
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no enrolment at first boot:\n{}",
            h.journal(Some("linkmesh-enroll"), "-n 30")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !h.path("/etc/linkmesh/enroll.env").exists(),
        "the spent token stays on disk"
    );
    let journal = h.journal(Some("linkmesh-enroll"), "");
    assert!(
        !journal.contains(&t.token),
        "the token in the journal: {journal}"
    );
    let hosts = wait_hosts(&fleet, |h| {
        h.len() == 1 && h[0]["hostname"] == "lm-first-boot"
    })?;
    let host_id = hosts[0]["host_id"].clone();

    // Every later boot: nothing to enrol, the same host.
    h.reboot()?;
    net.attach(&h)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while h.sh("systemctl is-active linkmesh-agent || true")?.trim() != "active" {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not start after a reboot"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let props = h.unit_properties(
        "linkmesh-enroll.service",
        &["ConditionResult", "ActiveState"],
    )?;
    assert_eq!(
        props.get("ConditionResult").map(String::as_str),
        Some("no"),
        "{props:?}"
    );
    let st: Value = serde_json::from_str(&h.sh("linkmesh-agent status --json")?)?;
    assert_eq!(st["host_id"], host_id, "{st}");
    assert_eq!(fleet.hosts()?.len(), 1);

    // Generalised again, with a token the server refuses: no identity, the
    // agent stays stopped, the unit says why.
    h.sh("systemctl stop linkmesh-agent && linkmesh-agent image-prep >/dev/null")?;
    write_enroll_env(&h, &fleet, &t)?;
    let (code, _) = h.run("systemctl start linkmesh-enroll")?;
    assert_ne!(code, 0);
    let journal = h.journal(Some("linkmesh-enroll"), "-n 20");
    assert!(journal.contains("refused enrolment"), "{journal}");
    assert!(!h.path("/var/lib/linkmesh-agent/identity").exists());
    assert!(
        h.path("/etc/linkmesh/enroll.env").exists(),
        "kept for a retry"
    );
    assert_eq!(
        h.sh("systemctl is-active linkmesh-agent || true")?.trim(),
        "inactive"
    );
    // Corrected: enrolled, and the agent started by the unit.
    let t2 = fleet.token(1, "1h")?;
    write_enroll_env(&h, &fleet, &t2)?;
    h.sh("systemctl restart linkmesh-enroll")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.sh("systemctl is-active linkmesh-agent || true")?.trim() != "active" {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not start after the corrected enrolment:\n{}",
            h.journal(Some("linkmesh-enroll"), "-n 20")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!h.path("/etc/linkmesh/enroll.env").exists());
    wait_hosts(&fleet, |h| h.len() == 2)?;
    Ok(())
}
