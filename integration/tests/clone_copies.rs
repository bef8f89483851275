//! Copies of one enrolled host's state on other machines (issue 14):
//! - `kill -9` of a clone's agent at every step of its re-key: afterwards
//!   the copy holds the whole copied identity or the whole new one, and a
//!   plain re-run completes with one new host per copy (the server
//!   recognises the retry by the key kept in `identity.pending/`);
//! - fifty copies of one image starting at once, each supervising the real
//!   runtime: fifty hosts, fifty distinct collector instance uids.
//!
//! Each copy is the enrolled state copied to another directory and run in
//! a mount namespace whose `/etc/machine-id` is another machine's, so the
//! agent reads a real machine-id that is not the one it was enrolled on.
//! The kill points are exact, as in `enrolment_kill.rs`: strace delivers
//! SIGKILL on entry to the Nth call of one syscall (that call never runs),
//! for every N the run reaches before its new identity is committed.
//! Requires root (namespaces) and strace (scripts/test installs both).

use std::{
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use linkmesh_integration::harness::{
    AgentEnv, Fleet, copy_agent, run_on_machine, scratch, write_machine_id,
};

/// Syscalls at which to kill: the conversation with the server and every
/// step of writing the pending key and the new identity.
const KILL_AT: &[&str] = &[
    "connect",
    "writev",
    "recvfrom",
    "write",
    "mkdir",
    "fsync",
    "rename",
    "renameat2",
    "unlinkat",
];

/// The two tests run one at a time: fifty collectors starting on two cores
/// would slow every step of the walk.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Upper bound on calls of one syscall before the new identity is in place.
const MAX_N: u32 = 40;

/// How long a run may take to re-key (it takes well under a second).
const LIMIT: Duration = Duration::from_secs(20);

/// A copy of `original`'s directory under `root`, and another machine's
/// machine-id beside it.
fn copy_of(original: &AgentEnv, root: &Path, n: u32) -> anyhow::Result<(AgentEnv, PathBuf)> {
    let copy = copy_agent(original, &root.join(format!("copy-{n}")))?;
    let machine_id = copy.root.join("machine-id");
    write_machine_id(&machine_id, u64::from(n))?;
    Ok((copy, machine_id))
}

/// `linkmesh-agent run` on the machine whose id is in `machine_id`, under
/// strace with `strace_args` when given.
fn run_on(
    agent: &AgentEnv,
    machine_id: &Path,
    strace_args: Option<&[String]>,
) -> anyhow::Result<Child> {
    let wrapper: Vec<std::ffi::OsString> = match strace_args {
        Some(a) => std::iter::once(linkmesh_integration::harness::tool("strace")?.into_os_string())
            .chain(a.iter().map(Into::into))
            .collect(),
        None => Vec::new(),
    };
    run_on_machine(agent, machine_id, &wrapper)
}

/// The host id on disk, read as the agent reads it: `Err` when the
/// identity is not whole.
fn host_on_disk(agent: &AgentEnv) -> anyhow::Result<String> {
    Ok(agent.identity()?.host_id.to_string())
}

/// Waits until `child` exits (`true`) or the copy has re-keyed and
/// reported as its new host (`false`): the identity swap and its clean-up
/// are over by then.
fn killed_or_rekeyed(child: &mut Child, agent: &AgentEnv, original: &str) -> anyhow::Result<bool> {
    let deadline = Instant::now() + LIMIT;
    let status_file = agent.state.join("runtime-status.json");
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        let reported = std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|s| {
                s["reporter"]["reports"].as_u64() >= Some(1)
                    && s["reporter"]["clone_pending"].is_null()
            });
        if reported && host_on_disk(agent).is_ok_and(|h| h != original) {
            return Ok(false);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "neither killed nor re-keyed within {LIMIT:?}:\n{}",
            std::fs::read_to_string(agent.root.join("run.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stop(child: Child) {
    linkmesh_integration::harness::kill_group(child);
}

#[test]
fn kill_minus_nine_at_every_step_of_a_re_key_leaves_one_whole_identity_and_a_rerun_completes()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = scratch("rekey-kill")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "1s"])?;
    let original =
        linkmesh_integration::harness::idle_enrolled_agent(&dir.path().join("original"), &fleet)?;
    let original_id = host_on_disk(&original)?;
    let original_files = linkmesh_integration::harness::snapshot(&original.state.join("identity"));

    let mut copies = 0u32;
    let mut killed = 0u32;
    let mut new_ids = std::collections::BTreeSet::new();
    let mut per_syscall = Vec::new();
    for syscall in KILL_AT {
        let before = killed;
        for n in 1..=MAX_N {
            copies += 1;
            let (copy, machine_id) = copy_of(&original, dir.path(), copies)?;
            let args: Vec<String> = [
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                &format!("trace={syscall}"),
                "-e",
                &format!("inject={syscall}:signal=KILL:when={n}"),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            let mut child = run_on(&copy, &machine_id, Some(&args))?;
            let was_killed = killed_or_rekeyed(&mut child, &copy, &original_id)?;
            stop(child);
            let _ = std::fs::remove_file(copy.state.join("runtime-status.json"));
            // Whole, whichever it is.
            let on_disk = host_on_disk(&copy)
                .map_err(|e| anyhow::anyhow!("{syscall} #{n}: the identity is not whole: {e}"))?;
            if was_killed {
                killed += 1;
                // A plain re-run completes the re-key.
                let mut rerun = run_on(&copy, &machine_id, None)?;
                let ended = killed_or_rekeyed(&mut rerun, &copy, &original_id)?;
                stop(rerun);
                anyhow::ensure!(
                    !ended,
                    "{syscall} #{n}: the re-run exited:\n{}",
                    std::fs::read_to_string(copy.root.join("run.log")).unwrap_or_default()
                );
            }
            let now = host_on_disk(&copy)?;
            assert_ne!(now, original_id, "{syscall} #{n}");
            if on_disk != original_id {
                assert_eq!(
                    now, on_disk,
                    "{syscall} #{n}: a committed identity was replaced"
                );
            }
            let leftovers: Vec<String> = std::fs::read_dir(&copy.state)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with("identity."))
                .collect();
            assert!(leftovers.is_empty(), "{syscall} #{n}: {leftovers:?}");
            assert!(
                new_ids.insert(now.clone()),
                "{syscall} #{n}: {now} issued twice"
            );
            let _ = std::fs::remove_dir_all(&copy.root);
            if !was_killed {
                // Fewer than n calls of this syscall before the new identity.
                break;
            }
        }
        per_syscall.push(format!("{syscall} {}", killed - before));
    }
    // One new host per copy, each a clone of the original; the original untouched.
    let hosts = fleet.hosts()?;
    let clones: Vec<_> = hosts
        .iter()
        .filter(|h| h["cloned_from"] == original_id.as_str())
        .collect();
    assert_eq!(clones.len() as u32, copies, "one host per copy: {hosts:?}");
    assert_eq!(
        linkmesh_integration::harness::snapshot(&original.state.join("identity")),
        original_files
    );
    assert!(killed >= 20, "only {killed} kill points reached");
    eprintln!(
        "killed {killed} re-keys at distinct steps of {copies} copies ({}); every one recovered",
        per_syscall.join(", ")
    );
    Ok(())
}

/// Fifty copies of one enrolled host with its collector (the disk of a
/// golden image that was not generalised), started at once, each on a
/// machine of its own: fifty new hosts cloned from the original, fifty
/// collectors with distinct instance uids (none the original's), and the
/// original's row unchanged.
#[test]
fn fifty_copies_of_one_image_starting_at_once_become_fifty_hosts() -> anyhow::Result<()> {
    use linkmesh_integration::harness::{enrolled_agent, runtime_bin_dir};
    const COPIES: u32 = 50;
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = scratch("fifty-clones")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "2s"])?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let original = enrolled_agent(&dir.path().join("original"), &fleet, &bins, "")?;
    let original_id = host_on_disk(&original)?;
    let (original_uid, copied) = {
        let run = original.spawn_run(&[], &[])?;
        let s = run.wait_status(Duration::from_secs(60), "the original's collector", |s| {
            s["reporter"]["opamp"]["connected"] == true
        })?;
        let uid = s["reporter"]["opamp"]["instance_uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        drop(run);
        (
            uid,
            std::fs::read_to_string(original.state.join("supervisor/persistent_state.yaml"))?,
        )
    };
    assert!(!original_uid.is_empty());
    assert!(copied.contains(&original_uid), "{copied}");

    let copies: Vec<(AgentEnv, PathBuf)> = (1..=COPIES)
        .map(|n| copy_of(&original, dir.path(), 1000 + n))
        .collect::<anyhow::Result<_>>()?;
    let started = Instant::now();
    let mut children = Vec::new();
    for (copy, machine_id) in &copies {
        children.push(run_on(copy, machine_id, None)?);
    }
    let deadline = started + Duration::from_secs(240);
    let hosts = loop {
        let hosts = fleet.hosts()?;
        let ready = hosts
            .iter()
            .filter(|h| {
                h["cloned_from"] == original_id.as_str()
                    && h["opamp"]["connected"] == true
                    && h["opamp"]["instance_uid"]
                        .as_str()
                        .is_some_and(|u| !u.is_empty())
            })
            .count();
        if ready == COPIES as usize {
            break hosts;
        }
        if Instant::now() > deadline {
            for c in children {
                stop(c);
            }
            anyhow::bail!(
                "{ready} of {COPIES} copies have a host and a collector of their own: {hosts:?}\nfirst copy's log:\n{}",
                std::fs::read_to_string(copies[0].0.root.join("run.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let took = started.elapsed();
    for c in &children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for c in children {
        let mut c = c;
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop(c);
    }
    let clones: Vec<&serde_json::Value> = hosts
        .iter()
        .filter(|h| h["cloned_from"] == original_id.as_str())
        .collect();
    let ids: std::collections::BTreeSet<&str> = clones
        .iter()
        .filter_map(|h| h["host_id"].as_str())
        .collect();
    let uids: std::collections::BTreeSet<&str> = clones
        .iter()
        .filter_map(|h| h["opamp"]["instance_uid"].as_str())
        .collect();
    assert_eq!(ids.len(), COPIES as usize, "{hosts:?}");
    assert_eq!(uids.len(), COPIES as usize, "a duplicate uid: {hosts:?}");
    assert!(!uids.contains(original_uid.as_str()), "{hosts:?}");
    assert!(!ids.contains(original_id.as_str()));
    let orig = linkmesh_integration::harness::host_row(&hosts, &original_id);
    assert_eq!(
        orig["opamp"]["instance_uid"],
        original_uid.as_str(),
        "{orig}"
    );
    assert_eq!(hosts.len(), COPIES as usize + 1, "{hosts:?}");
    eprintln!(
        "{COPIES} copies started at once: all with a host and a collector of their own after {} ms",
        took.as_millis()
    );
    Ok(())
}

/// A running agent whose machine becomes another one under it (a live
/// clone, a snapshot with its memory booted elsewhere): the next report
/// finds the fingerprint changed, stops reporting as the original and
/// re-keys, without a restart.
#[test]
fn a_machine_that_changes_under_a_running_agent_is_re_keyed_at_the_next_report()
-> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = scratch("live-clone")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "1s"])?;
    let original =
        linkmesh_integration::harness::idle_enrolled_agent(&dir.path().join("original"), &fleet)?;
    let original_id = host_on_disk(&original)?;
    // The copy starts on the machine it was enrolled on (this one's id)...
    let copy = copy_agent(&original, &dir.path().join("live"))?;
    let machine_id = copy.root.join("machine-id");
    std::fs::copy("/etc/machine-id", &machine_id)?;
    let child = run_on_machine(&copy, &machine_id, &[])?;
    let status_file = copy.state.join("runtime-status.json");
    let reports = || {
        std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|s| s["reporter"]["reports"].as_u64())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + LIMIT;
    while reports() < 2 {
        if Instant::now() > deadline {
            stop(child);
            anyhow::bail!(
                "no reports as the original:\n{}",
                std::fs::read_to_string(copy.root.join("run.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host_on_disk(&copy)?, original_id);
    // ...then the machine under it changes (the bound file is rewritten).
    write_machine_id(&machine_id, 4242)?;
    let mut child = child;
    let rekeyed = killed_or_rekeyed(&mut child, &copy, &original_id);
    let log = std::fs::read_to_string(copy.root.join("run.log")).unwrap_or_default();
    stop(child);
    anyhow::ensure!(!rekeyed?, "the agent exited:\n{log}");
    assert!(log.contains("This machine became a copy of host"), "{log}");
    let hosts = fleet.hosts()?;
    let clone = linkmesh_integration::harness::host_row(&hosts, &host_on_disk(&copy)?);
    assert_eq!(clone["cloned_from"], original_id.as_str(), "{hosts:?}");
    Ok(())
}
