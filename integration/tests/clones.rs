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
