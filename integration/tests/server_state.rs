//! The server side of the upgrade guide (issue 15, item 9): the state's
//! format recorded and migrated forward, a newer format refused, the CA key
//! sealed with the server secret (a wrong secret refuses to start and never
//! makes a new CA), backup and restore while serving, and agents failing
//! closed against a server whose CA changed.

use std::{path::Path, time::Duration};

use linkmesh_fleet::{
    ca,
    sealed::{self, Secret},
};
use linkmesh_integration::harness::{
    AgentEnv, Fleet, enrolled_agent, runtime_bin_dir, scratch, snapshot, text,
};
use serde_json::Value;

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(20);

fn reports(s: &Value) -> u64 {
    s["reporter"]["reports"].as_u64().unwrap_or(0)
}

/// `linkmesh-fleet serve` on `state` with `secret_env` and no secret file,
/// expected to refuse: its exit status and stderr.
fn serve_refused(state: &Path, secret_env: Option<&str>) -> anyhow::Result<(Option<i32>, String)> {
    let mut cmd =
        std::process::Command::new(linkmesh_integration::harness::binary("linkmesh-fleet")?);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(state)
        .env_remove(sealed::SECRET_ENV)
        .stdin(std::process::Stdio::null());
    if let Some(s) = secret_env {
        cmd.env(sealed::SECRET_ENV, s);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = std::time::Instant::now() + T;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("serve did not refuse within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    Ok((out.status.code(), text(&out)))
}

fn all_files_contain(dir: &Path, needle: &[u8]) -> Vec<String> {
    snapshot(dir)
        .keys()
        .filter(|p| {
            std::fs::read(dir.join(p)).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        })
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn the_ca_key_is_sealed_and_a_wrong_or_missing_secret_never_starts_a_server_or_makes_a_ca() -> R {
    let (_dir, mut fleet, agent) =
        linkmesh_integration::harness::fleet_with_agent("state-secret", &[])?;
    let state = fleet.state().to_owned();
    assert_eq!(
        all_files_contain(&state, b"PRIVATE KEY"),
        Vec::<String>::new(),
        "the CA key is never in the state in plaintext"
    );
    let format: Value = serde_json::from_slice(&std::fs::read(state.join("format.json"))?)?;
    assert_eq!(format["format"], 2, "{format}");
    let secret_text = std::fs::read_to_string(fleet.secret_file())?;
    let (code, err) = serve_refused(&state, Some(secret_text.trim()))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("another linkmesh-fleet serve runs on"),
        "{err}"
    );
    fleet.stop();
    let ca_before = snapshot(&state.join("ca"));

    let (code, err) = serve_refused(&state, Some("not the secret it was set up with"))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the certificate authority's private key")
            && err.contains("cannot be opened with the server secret from LINKMESH_FLEET_SECRET")
            && err.contains("never makes a new certificate authority"),
        "{err}"
    );
    let (code, err) = serve_refused(&state, None)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no server secret: set LINKMESH_FLEET_SECRET or pass --secret-file"),
        "{err}"
    );
    let (code, err) = serve_refused(&state, Some("short"))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is 5 bytes; at least 16 are required"),
        "{err}"
    );
    // `init` on the existing state with the wrong secret: the same refusal.
    let out = std::process::Command::new(linkmesh_integration::harness::binary("linkmesh-fleet")?)
        .args(["init", "--state"])
        .arg(&state)
        .env(sealed::SECRET_ENV, "not the secret it was set up with")
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("never makes a new certificate authority"),
        "{}",
        text(&out)
    );
    assert_eq!(
        snapshot(&state.join("ca")),
        ca_before,
        "the CA is untouched"
    );

    // With its secret it serves the enrolled host as before.
    fleet.restart(None)?;
    let run = agent.spawn_run(&[], &[])?;
    run.wait_status(T, "a report", |s| reports(s) >= 1)?;
    Ok(())
}

/// Turns `state` into what servers before the format record wrote (format
/// 1): no `format.json`, the CA key in plaintext at `ca/ca.key`, no
/// `revoked/`. No older server binary is built here, so the test makes the
/// old layout from a current state, with the secret.
fn as_format_1(state: &Path, secret_file: &Path) -> anyhow::Result<()> {
    let secret = Secret::from_file_or_env(Some(secret_file), |_| None)?;
    let (cert, _) = ca::Ca::certificate(&state.join("ca"))?;
    let path = state.join("ca").join(ca::SEALED_KEY);
    let sealed: sealed::Sealed = serde_json::from_slice(&std::fs::read(&path)?)?;
    let pem = sealed::open(&secret, &sealed, &ca::key_purpose(&cert), &path)?;
    linkmesh_agent::fs::write_atomic(&state.join("ca").join(ca::PLAIN_KEY), &pem, 0o600)?;
    std::fs::remove_file(&path)?;
    std::fs::remove_file(state.join("format.json"))?;
    std::fs::remove_dir_all(state.join("revoked"))?;
    Ok(())
}

#[test]
fn a_server_upgrade_migrates_the_state_forward_and_a_rollback_across_the_format_is_refused() -> R {
    let (_dir, mut fleet, agent) =
        linkmesh_integration::harness::fleet_with_agent("state-format", &[])?;
    let host = agent.identity()?.host_id.to_string();
    fleet.stop();
    let state = fleet.state().to_owned();
    as_format_1(&state, &fleet.secret_file())?;
    let pin_before = ca::Ca::certificate(&state.join("ca"))?.1;

    // Upgrade: the new server on the old state migrates it and serves the
    // enrolled host unchanged.
    fleet.restart(None)?;
    let format: Value = serde_json::from_slice(&std::fs::read(state.join("format.json"))?)?;
    assert_eq!(format["format"], 2, "{format}");
    assert_eq!(format["migrations"][0]["from"], 1, "{format}");
    assert_eq!(format["migrations"][0]["to"], 2, "{format}");
    assert_eq!(
        format["server_version"],
        linkmesh_agent::version::AGENT_VERSION,
        "{format}"
    );
    assert!(
        !state.join("ca").join(ca::PLAIN_KEY).exists(),
        "plaintext key left"
    );
    assert!(state.join("ca").join(ca::SEALED_KEY).exists());
    assert!(state.join("revoked").is_dir());
    assert_eq!(ca::Ca::certificate(&state.join("ca"))?.1, pin_before);
    assert!(
        fleet.log().contains("Migrated the state format"),
        "{}",
        fleet.log()
    );
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "the enrolled host reporting after the upgrade", |s| {
        reports(s) >= 1
    })?;
    assert_eq!(s["reporter"]["consecutive_failures"], 0, "{s}");
    assert_eq!(agent.identity()?.host_id.to_string(), host);
    drop(run);
    // A second start has nothing to migrate.
    fleet.restart(None)?;
    let again: Value = serde_json::from_slice(&std::fs::read(state.join("format.json"))?)?;
    assert_eq!(
        again["migrations"].as_array().map(Vec::len),
        Some(1),
        "{again}"
    );
    fleet.stop();

    // A migration cut after sealing, before its record (kill -9): both keys
    // on disk, no record. The next start completes it.
    as_format_1(&state, &fleet.secret_file())?;
    let (cert, _) = ca::Ca::certificate(&state.join("ca"))?;
    let secret = Secret::from_file_or_env(Some(&fleet.secret_file()), |_| None)?;
    let plain = std::fs::read_to_string(state.join("ca").join(ca::PLAIN_KEY))?;
    ca::seal_key(&state.join("ca"), &secret, &plain, &cert)?;
    fleet.restart(None)?;
    assert!(!state.join("ca").join(ca::PLAIN_KEY).exists());
    fleet.stop();

    // Rollback across a format change: a state a newer server wrote.
    let mut newer = again.clone();
    newer["format"] = 3.into();
    newer["server_version"] = "0.3.0".into();
    std::fs::write(
        state.join("format.json"),
        serde_json::to_vec_pretty(&newer)?,
    )?;
    let before = snapshot(&state);
    let secret_text = std::fs::read_to_string(fleet.secret_file())?;
    let (code, err) = serve_refused(&state, Some(secret_text.trim()))?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("says state format 3, written by linkmesh-fleet 0.3.0")
            && err.contains("restore the backup taken before the upgrade"),
        "{err}"
    );
    let out = fleet.admin(&["hosts"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("restore the backup taken before the upgrade"));
    let out = fleet.admin(&["token", "create"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(snapshot(&state), before, "a refused start changes nothing");
    Ok(())
}

fn check(agent: &AgentEnv) -> anyhow::Result<(Option<i32>, Value)> {
    let out = agent.cmd()?.args(["check", "--json"]).output()?;
    let doc: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("check --json: {e}: {}", text(&out)))?;
    Ok((out.status.code(), doc))
}

fn item(doc: &Value, id: &str) -> Value {
    doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_backup_taken_while_serving_restores_a_server_every_host_trusts_and_a_new_ca_fails_closed() -> R
{
    let dir = scratch("state-backup")?;
    let mut fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "1s"])?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let a = enrolled_agent(&dir.path().join("a"), &fleet, &bins, "")?;
    let b = enrolled_agent(&dir.path().join("b"), &fleet, &bins, "")?;
    let run = a.spawn_run(&[], &[])?;
    run.wait_status(T, "reporting", |s| reports(s) >= 1)?;
    // Taken while serving, with reports arriving.
    let archive = dir.path().join("fleet-backup.tar.gz");
    let out = fleet.admin(&["backup", "--out", archive.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("state format 2"), "{}", text(&out));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&archive)?.permissions());
    assert_eq!(mode & 0o777, 0o600);
    let listing = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(&archive)
        .output()?;
    let names = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(
        names.contains("ca/ca.key.sealed") && names.contains("linkmesh-fleet-backup.json"),
        "{names}"
    );
    assert!(
        !names.contains("serve.log") && !names.contains("lock"),
        "{names}"
    );
    let state = fleet.state().to_owned();

    // Refusals that keep the state: a running server, an occupied target.
    let from = archive.to_str().unwrap_or_default();
    let restore = |fleet: &Fleet, force: bool| -> anyhow::Result<std::process::Output> {
        let mut args = vec!["restore", "--from", from];
        if force {
            args.push("--force");
        }
        fleet.admin(&args)
    };
    let out = restore(&fleet, false)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("holds a state already: pass --force"),
        "{}",
        text(&out)
    );
    let out = restore(&fleet, true)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("a server is running on"),
        "{}",
        text(&out)
    );

    // The server's disk is lost: the backup and the secret bring it back.
    fleet.stop();
    drop(run);
    std::fs::remove_dir_all(&state)?;
    let out = restore(&fleet, false)?;
    assert!(out.status.success(), "{}", text(&out));
    fleet.restart(None)?;
    let run = a.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "the restored server accepting reports", |s| {
        reports(s) >= 1
    })?;
    assert_eq!(s["reporter"]["consecutive_failures"], 0, "{s}");
    let (code, doc) = check(&b)?;
    assert_eq!(item(&doc, "standing")["outcome"], "ok", "{doc}");
    assert_eq!(item(&doc, "server")["outcome"], "ok", "{doc}");
    assert_ne!(code, None);
    drop(run);

    // A server set up afresh (new CA, new secret) at the same address:
    // agents fail closed, say why, and never re-enrol by themselves.
    fleet.stop();
    std::fs::remove_dir_all(&state)?;
    std::fs::remove_file(fleet.secret_file())?;
    Fleet::init(&state)?;
    fleet.restart(None)?;
    let identity_before = snapshot(&a.state.join("identity"));
    let (code, doc) = check(&a)?;
    assert_eq!(code, Some(1), "{doc}");
    let server = item(&doc, "server");
    assert_eq!(server["outcome"], "fail", "{doc}");
    let detail = server["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("the server's certificate authority changed")
            && detail.contains("does not re-enrol by itself")
            && detail.contains("restore the server's state from its backup"),
        "{detail}"
    );
    let run = a.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "the reporter failing closed", |s| {
        s["reporter"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate authority changed"))
    })?;
    assert_eq!(s["supervision"]["state"], "running", "{s}");
    assert_eq!(reports(&s), 0, "{s}");
    assert_eq!(snapshot(&a.state.join("identity")), identity_before);
    assert!(
        fleet.hosts()?.is_empty(),
        "nothing enrolled on the new server"
    );
    Ok(())
}
