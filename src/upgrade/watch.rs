//! Health-gated rollback, the I/O half.
//!
//! - `linkmesh-agent upgrade keep --to NEW` is run by the *installed*
//!   agent before the new version's files land (deb `preinst`, rpm `%pre`,
//!   `install.sh`): it copies its own executable to `STATE/upgrade/watcher`
//!   (the watcher, and the binary method's rollback copy), keeps its own
//!   package file in `STATE/upgrade/packages/` (already kept by `install.sh`,
//!   from apt's cache, or fetched from the fleet server's artifacts over the
//!   pinned TLS and checked against its `.sha256`), and arms the probation.
//! - `linkmesh-upgrade.service` runs `STATE/upgrade/watcher upgrade watch`:
//!   started by the package scripts and `install.sh` after the new agent was
//!   started, and at boot while a probation is open. The watcher is the old,
//!   known-good binary, so a new build that cannot even start cannot stop
//!   its own rollback.
//!
//! Every record is written atomically; the rollback's phase is recorded
//! before it starts, so a watcher killed in the middle finishes it at its
//! next start.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    probation::{self, Method, Observation, Outcome, Phase, Probation, Verdict},
    read_json, write_json,
};
use crate::{
    fs::{FsError, ensure_private_dir, write_atomic},
    version::{self, Version},
};

/// `STATE/upgrade/`: the probation, its outcome, the watcher and the
/// rollback copies.
pub const UPGRADE_DIR: &str = "upgrade";
/// The open probation.
pub const PROBATION_FILE: &str = "probation.json";
/// The last decided outcome (reported to the server).
pub const OUTCOME_FILE: &str = "outcome.json";
/// The previous agent's executable: the watcher, and the binary rollback.
pub const WATCHER: &str = "watcher";
/// Package files kept for a rollback.
pub const PACKAGES: &str = "packages";
/// The watcher's unit.
pub const WATCH_UNIT: &str = "linkmesh-upgrade.service";
/// The agent's unit, watched.
pub const AGENT_UNIT: &str = "linkmesh-agent.service";
/// Set in the environment of a rollback's package manager run: the package
/// scripts then neither judge nor arm a new probation.
pub const ROLLBACK_ENV: &str = "LINKMESH_ROLLBACK";
/// The package revision `linkmesh-package` builds (packaging/package.toml).
pub const PACKAGE_RELEASE: &str = "1";

/// A failure of the upgrade machinery.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A file could not be written.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A record cannot be read, parsed or written.
    #[error(transparent)]
    Record(#[from] super::RecordError),
    /// A command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// What ran.
        command: String,
        /// How it ended, and its output.
        detail: String,
    },
}

/// `STATE/upgrade`.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join(UPGRADE_DIR)
}

/// The open probation, if any.
///
/// # Errors
/// When it cannot be read.
pub fn read_probation(state_dir: &Path) -> Result<Option<Probation>, UpgradeError> {
    Ok(read_json(&dir(state_dir).join(PROBATION_FILE))?)
}

/// The last outcome, if any.
///
/// # Errors
/// When it cannot be read.
pub fn read_outcome(state_dir: &Path) -> Result<Option<Outcome>, UpgradeError> {
    Ok(read_json(&dir(state_dir).join(OUTCOME_FILE))?)
}

fn write_probation(state_dir: &Path, p: &Probation) -> Result<(), UpgradeError> {
    Ok(write_json(&dir(state_dir).join(PROBATION_FILE), p)?)
}

fn close(state_dir: &Path, outcome: &Outcome) -> Result<(), UpgradeError> {
    write_json(&dir(state_dir).join(OUTCOME_FILE), outcome)?;
    let p = dir(state_dir).join(PROBATION_FILE);
    match std::fs::remove_file(&p) {
        Ok(()) => crate::fs::fsync_dir(&dir(state_dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FsError::new("remove", &p, e).into()),
    }
    Ok(())
}

/// The file name of this version's package for `method` on this machine.
pub fn package_name(method: Method, version: &str) -> Option<String> {
    let (deb, rpm) = if cfg!(target_arch = "aarch64") {
        ("arm64", "aarch64")
    } else {
        ("amd64", "x86_64")
    };
    match method {
        Method::Deb => Some(format!(
            "linkmesh-agent_{version}-{PACKAGE_RELEASE}_{deb}.deb"
        )),
        Method::Rpm => Some(format!(
            "linkmesh-agent-{version}-{PACKAGE_RELEASE}.{rpm}.rpm"
        )),
        Method::Binary => None,
    }
}

/// What `keep` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    /// The probation is armed; the rollback copy, if one could be kept.
    Armed(Option<PathBuf>),
    /// Not armed, and why.
    NotArmed(String),
}

/// Stops a running watcher (`systemctl stop linkmesh-upgrade.service`).
pub fn stop_watcher() {
    let _ = run(Command::new("systemctl").args(["stop", WATCH_UNIT]));
}

/// Copies `src` to `dest` durably (temp file, fsync, rename, dir fsync).
fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> Result<(), UpgradeError> {
    let bytes = std::fs::read(src).map_err(|e| FsError::new("read", src, e))?;
    write_atomic(dest, &bytes, mode)?;
    Ok(())
}

/// `upgrade keep --to NEW`, run by the installed agent (this process)
/// before NEW's files land. `fetch` gets a named artifact from the fleet
/// server (the package of this version, when it is not on the host yet).
///
/// # Errors
/// When the records or copies cannot be written.
pub fn keep(
    state_dir: &Path,
    to: &Version,
    method: Method,
    window: Duration,
    fetch: &dyn Fn(&str, &Path) -> Result<(), FetchError>,
    stop_watcher: &dyn Fn(),
) -> Result<Kept, UpgradeError> {
    let me = version::agent_version();
    if me.to_string() == to.to_string() {
        return Ok(Kept::NotArmed(format!(
            "{to} is the installed version: nothing to watch"
        )));
    }
    if let Some(o) = read_outcome(state_dir)?
        && o.outcome == "rolled_back"
        && o.from == to.to_string()
    {
        return Ok(Kept::NotArmed(format!(
            "{to} was rolled back on this host before ({}); installed again on purpose, it is not watched",
            o.reason
        )));
    }
    let up = dir(state_dir);
    ensure_private_dir(&up, 0o700)?;
    // This install supersedes an open probation: its watcher stops before
    // its binary and record are replaced.
    if read_probation(state_dir)?.is_some() {
        stop_watcher();
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    copy_atomic(&exe, &up.join(WATCHER), 0o700)?;
    let rollback = match package_name(method, &me.to_string()) {
        None => Some(up.join(WATCHER)),
        Some(name) => {
            let packages = up.join(PACKAGES);
            ensure_private_dir(&packages, 0o700)?;
            let kept = packages.join(&name);
            let apt_cache = Path::new("/var/cache/apt/archives").join(&name);
            if kept.is_file() {
                Some(kept)
            } else if method == Method::Deb && apt_cache.is_file() {
                copy_atomic(&apt_cache, &kept, 0o600)?;
                Some(kept)
            } else {
                match fetch(&name, &kept) {
                    Ok(()) => Some(kept),
                    Err(e) => {
                        tracing::warn!(package = %name, error = %e, "No rollback copy of the installed version's package");
                        None
                    }
                }
            }
        }
    };
    write_probation(
        state_dir,
        &Probation {
            from: me.to_string(),
            to: to.to_string(),
            method,
            rollback: rollback.clone(),
            probation_secs: window.as_secs(),
            phase: Phase::Pending,
        },
    )?;
    Ok(Kept::Armed(rollback))
}

/// Keeps `package` (just installed by `install.sh`) for a later rollback
/// to its version, and drops kept packages of other versions but the
/// rollback copy of an open probation.
///
/// # Errors
/// When it cannot be copied.
pub fn keep_installed_package(state_dir: &Path, package: &Path) -> Result<(), UpgradeError> {
    let packages = dir(state_dir).join(PACKAGES);
    ensure_private_dir(&packages, 0o700)?;
    let Some(name) = package.file_name() else {
        return Ok(());
    };
    let dest = packages.join(name);
    copy_atomic(package, &dest, 0o600)?;
    let open = read_probation(state_dir)?.and_then(|p| p.rollback);
    if let Ok(entries) = std::fs::read_dir(&packages) {
        for e in entries.flatten() {
            let p = e.path();
            if p != dest && Some(&p) != open.as_ref() {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<String, UpgradeError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| UpgradeError::Command {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(UpgradeError::Command {
            command: shown,
            detail: format!("{}: {}", out.status, text.trim()),
        })
    }
}

/// One look at the agent's unit and its published state.
fn observe(state_dir: &Path, since_unix_ms: u64) -> Observation {
    let props = crate::supervisor::unit::SHOW_PROPERTIES.join(",");
    let text =
        run(Command::new("systemctl").args(["show", "--timestamp=unix", "-p", &props, AGENT_UNIT]))
            .unwrap_or_default();
    let unit = crate::supervisor::unit::parse_show(&text);
    let published = crate::published::read(state_dir);
    let by_main = published
        .as_ref()
        .filter(|s| unit.main_pid != 0 && s.state.runtime.agent_pid == unit.main_pid);
    let reporter = by_main.map(|s| &s.state.reporter);
    Observation {
        active_state: unit.active_state,
        result: unit.result,
        restarts: unit.n_restarts,
        // Whole seconds: a start in the second the window opened counts.
        started_in_window: unit
            .started_unix_s
            .is_some_and(|t| t >= since_unix_ms / 1000),
        start_unknown: unit.started_unix_s.is_none(),
        exit_status: unit.exec_main_status,
        main_pid: unit.main_pid,
        published_by_main: by_main.is_some(),
        report_accepted: reporter
            .is_some_and(|r| r.reports > 0 && r.last_report_unix_ms.unwrap_or(0) >= since_unix_ms),
        // A revoked host is refused whatever version runs: no reason to
        // roll back.
        report_refused: reporter
            .filter(|r| r.last_error_rejected && !r.revoked)
            .and_then(|r| r.last_error.clone()),
    }
}

/// Puts `p.from` back by `p.method`.
fn roll_back(p: &Probation) -> Result<(), UpgradeError> {
    let Some(artifact) = &p.rollback else {
        return Err(UpgradeError::Command {
            command: "rollback".into(),
            detail: format!(
                "no copy of {} was kept on this host (the server did not offer its package)",
                p.from
            ),
        });
    };
    match p.method {
        Method::Binary => {
            let tmp = Path::new("/usr/bin/.linkmesh-agent.rollback");
            copy_atomic(artifact, tmp, 0o755)?;
            std::fs::rename(tmp, "/usr/bin/linkmesh-agent")
                .map_err(|e| FsError::new("rename", tmp, e))?;
            crate::fs::fsync_dir(Path::new("/usr/bin"))?;
        }
        Method::Deb => {
            // A rollback cut short (power, SIGKILL) may have left dpkg
            // half-way; it is completed first, or apt refuses to run.
            let _ = run(Command::new("dpkg")
                .args(["--configure", "-a", "--force-confold"])
                .env(ROLLBACK_ENV, "1"));
            // apt-get waits for the dpkg lock the upgrade's own apt may
            // still hold; dpkg alone does not.
            let mut cmd = if which::which("apt-get").is_ok() {
                let mut c = Command::new("apt-get");
                c.args([
                    "install",
                    "-y",
                    "-q",
                    "--allow-downgrades",
                    "-o",
                    "DPkg::Lock::Timeout=300",
                    "-o",
                    "Dpkg::Options::=--force-confold",
                    "-o",
                    "Dpkg::Options::=--force-confdef",
                    // The kept package only: no repository is asked (the
                    // fleet's may be the reason for the rollback, or away),
                    // and apt reads the file as root, since _apt cannot
                    // enter the 0700 state directory (with the fleet's
                    // repository listing the same version, apt would
                    // otherwise fetch it as _apt and fail).
                    "-o",
                    "Dir::Etc::SourceList=/dev/null",
                    "-o",
                    "Dir::Etc::SourceParts=/nonexistent",
                    "-o",
                    "APT::Sandbox::User=root",
                ])
                .arg(artifact)
                .env("DEBIAN_FRONTEND", "noninteractive");
                c
            } else {
                let mut c = Command::new("dpkg");
                c.args(["--force-confold", "--force-confdef", "-i"])
                    .arg(artifact);
                c
            };
            run(cmd.env(ROLLBACK_ENV, "1"))?;
        }
        Method::Rpm => {
            run(Command::new("rpm")
                .args(["-U", "--oldpackage", "--replacepkgs"])
                .arg(artifact)
                .env(ROLLBACK_ENV, "1"))?;
        }
    }
    let _ = run(Command::new("systemctl").args(["reset-failed", AGENT_UNIT]));
    run(Command::new("systemctl").args(["restart", AGENT_UNIT]))?;
    Ok(())
}

/// `upgrade watch`: watches an open probation to its verdict, rolls back
/// on a failure, records the outcome. Returns it (`None`: nothing open).
///
/// # Errors
/// When the records cannot be read or written.
pub fn watch(state_dir: &Path, poll: Duration) -> Result<Option<Outcome>, UpgradeError> {
    let Some(mut p) = read_probation(state_dir)? else {
        return Ok(None);
    };
    let window = Duration::from_secs(p.probation_secs.clamp(5, 3600));
    loop {
        match p.phase.clone() {
            Phase::Pending => {
                let unit = crate::supervisor::unit::parse_show(
                    &run(Command::new("systemctl").args(["show", "-p", "NRestarts", AGENT_UNIT]))
                        .unwrap_or_default(),
                );
                p.phase = Phase::Watching {
                    since_unix_ms: crate::clock::now_unix_ms(),
                    restarts: unit.n_restarts,
                };
                write_probation(state_dir, &p)?;
                tracing::info!(from = %p.from, to = %p.to, window_s = window.as_secs(), "Upgrade on probation");
            }
            Phase::Watching {
                since_unix_ms,
                restarts,
            } => {
                // A watcher started again (boot, re-run) counts from its
                // own start: the window is about this run of the agent.
                let started = Instant::now();
                // The window is the new agent's: it runs from the first
                // look that sees it started (a slow package manager or a
                // slow stop of the old agent must not eat into it), and
                // from the watcher's start while it has not started.
                let mut new_started: Option<Instant> = None;
                let mut prev = restarts;
                let verdict = loop {
                    // A newer install took over the probation (or the
                    // package was removed): this watcher has nothing left
                    // to judge.
                    let current = read_probation(state_dir)?;
                    if current.as_ref().map(|c| (&c.from, &c.to)) != Some((&p.from, &p.to)) {
                        tracing::info!(from = %p.from, to = %p.to, "Probation superseded by a newer install");
                        return Ok(None);
                    }
                    let obs = observe(state_dir, since_unix_ms);
                    if obs.started_in_window && new_started.is_none() {
                        new_started = Some(Instant::now());
                    }
                    let elapsed = new_started.unwrap_or(started).elapsed();
                    let (v, next) = probation::assess(&obs, prev, elapsed, window);
                    prev = next;
                    match v {
                        Verdict::Wait => std::thread::sleep(poll),
                        v => break v,
                    }
                };
                match verdict {
                    Verdict::Healthy(note) | Verdict::Unjudged(note) => {
                        tracing::info!(from = %p.from, to = %p.to, %note, "Upgrade confirmed");
                        let o = Outcome {
                            outcome: "confirmed".into(),
                            from: p.from.clone(),
                            to: p.to.clone(),
                            reason: note,
                            at_unix_ms: crate::clock::now_unix_ms(),
                        };
                        close(state_dir, &o)?;
                        return Ok(Some(o));
                    }
                    Verdict::RollBack(reason) => {
                        tracing::warn!(from = %p.to, to = %p.from, %reason, "Upgrade failed its probation; rolling back");
                        p.phase = Phase::RollingBack { reason };
                        write_probation(state_dir, &p)?;
                    }
                    Verdict::Wait => {}
                }
            }
            Phase::RollingBack { reason } => {
                let result = roll_back(&p);
                let o = Outcome {
                    outcome: match (&result, &p.rollback) {
                        (Ok(()), _) => "rolled_back",
                        (Err(_), None) => "not_rolled_back",
                        (Err(_), Some(_)) => "rollback_failed",
                    }
                    .into(),
                    // A rollback goes from the version that failed to the
                    // one that ran before it.
                    from: p.to.clone(),
                    to: p.from.clone(),
                    reason: match &result {
                        Ok(()) => reason,
                        Err(e) => format!("{reason}; the rollback failed: {e}"),
                    },
                    at_unix_ms: crate::clock::now_unix_ms(),
                };
                match &result {
                    Ok(()) => {
                        tracing::warn!(from = %o.from, to = %o.to, reason = %o.reason, "Rolled back")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "The rollback failed; the host needs a person")
                    }
                }
                close(state_dir, &o)?;
                return Ok(Some(o));
            }
        }
    }
}

/// Why an artifact could not be fetched from the fleet server.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No identity: no server to fetch from.
    #[error("this host is not enrolled: no server to fetch from")]
    NotEnrolled,
    /// The I/O runtime for the download could not start.
    #[error("cannot start an I/O runtime: {0}")]
    Runtime(std::io::Error),
    /// The identity's CA does not make a TLS configuration.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The server could not be reached (the dialer's words: proxy, TCP, TLS).
    #[error("{0}")]
    Unreachable(String),
    /// The server answered, not with the artifact.
    #[error("{url}: HTTP {status}")]
    Status {
        /// What was asked for.
        url: String,
        /// Its answer.
        status: http::StatusCode,
    },
    /// The body broke off.
    #[error("{url}: {reason}")]
    Body {
        /// What was asked for.
        url: String,
        /// Why.
        reason: String,
    },
    /// The artifact is not what its `.sha256` says.
    #[error("{name}: checksum mismatch (expected {want}, got {got})")]
    Checksum {
        /// The artifact.
        name: String,
        /// The published sum.
        want: String,
        /// The sum of what came.
        got: String,
    },
    /// Writing it to disk failed.
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Fetches artifact `name` (and its `.sha256`) from `server` over `tls`
/// into `dest`, streaming, checked against the sum before it is renamed
/// into place.
///
/// # Errors
/// Why, for people.
pub fn fetch_artifact(
    server: &crate::endpoint::ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    proxy_url: Option<&str>,
    name: &str,
    dest: &Path,
) -> Result<(), FetchError> {
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;
    use tower::ServiceExt as _;
    let proxy = crate::transport::proxy_for(server.host(), proxy_url, |k| std::env::var(k).ok());
    let dialer = crate::transport::Dialer::new(server.clone(), tls, proxy, Duration::from_secs(30));
    let tmp = dest.with_extension("part");
    let write_err = |op: &'static str| {
        let tmp = tmp.clone();
        move |e: std::io::Error| FetchError::Fs(FsError::new(op, &tmp, e))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(FetchError::Runtime)?;
    rt.block_on(async {
        let get = |path: String| {
            let dialer = dialer.clone();
            async move {
                let url = format!("{server}{path}");
                let channel = dialer
                    .channel()
                    .map_err(|e| FetchError::Unreachable(e.to_string()))?;
                let req = http::Request::get(format!("http://{}{path}", server.authority()))
                    .body(tonic::body::Body::empty())
                    .map_err(|e| FetchError::Body {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
                let resp = channel.oneshot(req).await.map_err(|e| {
                    FetchError::Unreachable(dialer.last_error().unwrap_or_else(|| e.to_string()))
                })?;
                if !resp.status().is_success() {
                    return Err(FetchError::Status {
                        url,
                        status: resp.status(),
                    });
                }
                Ok((url, resp.into_body()))
            }
        };
        let (sum_url, sum_body) = get(format!("/artifacts/{name}.sha256")).await?;
        let sum = sum_body
            .collect()
            .await
            .map_err(|e| FetchError::Body {
                url: sum_url,
                reason: e.to_string(),
            })?
            .to_bytes();
        let want = String::from_utf8_lossy(&sum)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let (url, mut body) = get(format!("/artifacts/{name}")).await?;
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(write_err("create"))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| FetchError::Body {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            if let Ok(data) = frame.into_data() {
                ctx.update(&data);
                file.write_all(&data).await.map_err(write_err("write"))?;
            }
        }
        file.sync_all().await.map_err(write_err("fsync"))?;
        drop(file);
        let got = crate::hex::encode(ctx.finish().as_ref());
        if want.is_empty() || got != want {
            let _ = std::fs::remove_file(&tmp);
            return Err(FetchError::Checksum {
                name: name.to_owned(),
                want,
                got,
            });
        }
        std::fs::rename(&tmp, dest).map_err(write_err("rename"))?;
        crate::fs::fsync_dir(dest.parent().unwrap_or(Path::new("/")))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_follow_the_packager() {
        let deb = package_name(Method::Deb, "0.2.0").unwrap();
        assert!(
            deb.starts_with("linkmesh-agent_0.2.0-1_") && deb.ends_with(".deb"),
            "{deb}"
        );
        let rpm = package_name(Method::Rpm, "0.2.0").unwrap();
        assert!(
            rpm.starts_with("linkmesh-agent-0.2.0-1.") && rpm.ends_with(".rpm"),
            "{rpm}"
        );
        assert_eq!(package_name(Method::Binary, "0.2.0"), None);
    }

    #[test]
    fn keep_arms_a_probation_with_the_watcher_and_a_rollback_copy() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let to: Version = "9.9.9".parse().unwrap();
        let no_server = |_: &str, _: &Path| Err(FetchError::Unreachable("offline".to_owned()));
        let kept = keep(
            state,
            &to,
            Method::Binary,
            Duration::from_secs(30),
            &no_server,
            &|| {},
        )
        .unwrap();
        let watcher = state.join("upgrade/watcher");
        assert_eq!(kept, Kept::Armed(Some(watcher.clone())));
        assert!(watcher.is_file());
        let p = read_probation(state).unwrap().unwrap();
        assert_eq!(
            (p.to.as_str(), p.phase, p.probation_secs),
            ("9.9.9", Phase::Pending, 30)
        );
        assert_eq!(p.from, version::AGENT_VERSION);

        // A package install with no copy anywhere: armed, nothing to roll back to.
        let kept = keep(
            state,
            &to,
            Method::Deb,
            Duration::from_secs(30),
            &no_server,
            &|| {},
        )
        .unwrap();
        assert_eq!(kept, Kept::Armed(None));
        // Fetched from the server when it offers it.
        let offer = |name: &str, dest: &Path| {
            assert!(name.ends_with(".rpm"));
            std::fs::write(dest, b"rpm").map_err(|e| FetchError::Fs(FsError::new("write", dest, e)))
        };
        let Kept::Armed(Some(path)) = keep(
            state,
            &to,
            Method::Rpm,
            Duration::from_secs(30),
            &offer,
            &|| {},
        )
        .unwrap() else {
            panic!("no copy");
        };
        assert_eq!(std::fs::read(path).unwrap(), b"rpm");

        // The installed version itself, and a version rolled back before.
        let me: Version = version::AGENT_VERSION.parse().unwrap();
        assert!(matches!(
            keep(
                state,
                &me,
                Method::Binary,
                Duration::from_secs(30),
                &no_server,
                &|| {}
            )
            .unwrap(),
            Kept::NotArmed(_)
        ));
        close(
            state,
            &Outcome {
                outcome: "rolled_back".into(),
                from: "9.9.9".into(),
                to: me.to_string(),
                reason: "exit 1".into(),
                at_unix_ms: 1,
            },
        )
        .unwrap();
        assert!(read_probation(state).unwrap().is_none());
        // 9.9.9 failed here once: installed again, it is not watched (no loop).
        let again = keep(
            state,
            &to,
            Method::Binary,
            Duration::from_secs(30),
            &no_server,
            &|| {},
        )
        .unwrap();
        assert!(
            matches!(&again, Kept::NotArmed(why) if why.contains("rolled back on this host before")),
            "{again:?}"
        );
    }
}
