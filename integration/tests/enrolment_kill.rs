//! `kill -9` of the agent at every step of enrolment: afterwards the host is
//! fully enrolled or not at all, and a re-run completes with the same token
//! (the server recognises the retry by the pending key) and makes one host.
//!
//! The kill points are exact: strace delivers SIGKILL on entry to the Nth
//! call of one syscall (that call never runs), for every N the enrolment
//! reaches, for each syscall that changes state on disk or on the wire.
//! Requires strace (scripts/test installs it).

use std::process::Command;

use linkmesh_integration::harness::{AgentEnv, Fleet, binary, scratch, text};

/// Syscalls at which to kill: the network conversation and every step of
/// writing the identity.
const KILL_AT: &[&str] = &[
    "connect",
    "writev",
    "recvfrom",
    "mkdir",
    "write",
    "fchmod",
    "fsync",
    "rename",
    "renameat2",
    "unlinkat",
];

/// Upper bound on calls of one syscall in an enrolment (about 20 for fsync).
const MAX_N: u32 = 60;

#[test]
fn kill_minus_nine_at_every_step_leaves_all_or_nothing_and_a_rerun_completes() -> anyhow::Result<()>
{
    let dir = scratch("kill")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let killed = walk_kill_points(dir.path(), &fleet, None)?;
    assert!(killed >= 40, "only {killed} kill points reached");
    Ok(())
}

#[test]
fn kill_minus_nine_during_a_forced_re_enrolment_always_leaves_a_complete_identity()
-> anyhow::Result<()> {
    let dir = scratch("kill-force")?;
    let old = Fleet::start(&dir.path().join("fleet-old"), &[])?;
    let new = Fleet::start(&dir.path().join("fleet-new"), &[])?;
    let killed = walk_kill_points(dir.path(), &new, Some(&old))?;
    assert!(killed >= 40, "only {killed} kill points reached");
    Ok(())
}

/// Enrols with `fleet` under strace, killing at each kill point in turn.
/// With `previous`, each agent is first enrolled there and the killed run
/// is `enroll --force` to `fleet`; the host must then hold the old identity
/// or the new one at every point. Returns how many runs were killed.
fn walk_kill_points(
    root: &std::path::Path,
    fleet: &Fleet,
    previous: Option<&Fleet>,
) -> anyhow::Result<u32> {
    let strace = linkmesh_integration::harness::tool("strace")?;
    let agent_bin = binary("linkmesh-agent")?;
    let mut killed_runs = 0;
    let mut scenario = 0;
    for syscall in KILL_AT {
        for n in 1..=MAX_N {
            scenario += 1;
            let agent = AgentEnv::new(&root.join(format!("agent-{scenario}")))?;
            if let Some(prev) = previous {
                let pt = prev.token(1, "1h")?;
                let out = agent.enroll(&prev.url, &pt.token, &["--ca-pin", &pt.ca_pin])?;
                assert!(out.status.success(), "{}", text(&out));
            }
            let t = fleet.token(1, "1h")?;
            let mut args = vec!["enroll", "--server", &fleet.url, "--ca-pin", &t.ca_pin];
            if previous.is_some() {
                args.push("--force");
            }
            let out = Command::new(&strace)
                .args(["-f", "-qq", "-o", "/dev/null", "-e"])
                .arg(format!("trace={syscall}"))
                .arg("-e")
                .arg(format!("inject={syscall}:signal=KILL:when={n}"))
                .arg(&agent_bin)
                .args(&args)
                .env("LINKMESH_CONFIG", &agent.config)
                .env("LINKMESH_STATE_DIR", &agent.state)
                .env("LINKMESH_TOKEN", &t.token)
                .output()?;
            if out.status.success() {
                // Fewer than n calls of this syscall: every kill point of it was covered.
                break;
            }
            killed_runs += 1;
            // All or nothing: status reads a complete identity or none, and
            // while replacing, always a complete one (old or new).
            let status = agent
                .status()
                .map_err(|e| anyhow::anyhow!("{syscall} #{n}: {e}"))?;
            if previous.is_some() {
                assert_eq!(
                    status["enrolled"], true,
                    "{syscall} #{n}: identity lost while replacing it"
                );
            }
            // The operator re-runs: --force while the old identity is still in
            // place, a plain enrol otherwise; the one-use token suffices.
            let still_old = previous.is_some_and(|p| status["server"] == p.url.as_str());
            let mut rerun_args = vec!["--ca-pin", t.ca_pin.as_str()];
            if still_old {
                rerun_args.push("--force");
            }
            let rerun = agent.enroll(&fleet.url, &t.token, &rerun_args)?;
            assert!(
                rerun.status.success(),
                "{syscall} #{n} re-run:\n{}",
                text(&rerun)
            );
            let status = agent.status()?;
            assert_eq!(status["enrolled"], true, "{syscall} #{n}");
            assert_eq!(status["server"], fleet.url.as_str(), "{syscall} #{n}");
            let hosts: Vec<_> = fleet
                .hosts()?
                .into_iter()
                .filter(|h| h["token_id"] == t.token_id.as_str())
                .collect();
            assert_eq!(hosts.len(), 1, "{syscall} #{n}: one host per enrolment");
            assert_eq!(hosts[0]["host_id"], status["host_id"], "{syscall} #{n}");
            let leftovers: Vec<String> = std::fs::read_dir(&agent.state)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("identity."))
                .collect();
            assert!(leftovers.is_empty(), "{syscall} #{n}: {leftovers:?}");
            let _ = std::fs::remove_dir_all(&agent.root);
        }
    }
    eprintln!("killed {killed_runs} enrolments at distinct steps; every one recovered");
    Ok(killed_runs)
}
