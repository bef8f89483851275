//! Unit mode: opampsupervisor in `linkmesh-collector.service`, driven
//! through `systemctl` and watched through the journal.
//!
//! The agent writes the unit (atomically, only when it changed), enables it
//! for boot and starts it; from then on systemd owns the process. The agent
//! learns of every change from the unit's journal, followed by one
//! long-lived `journalctl` child: systemd's own lines about the unit
//! ("Main process exited", "Scheduled restart job", "Started") make it read
//! `systemctl show` again, and the supervisor's lines go through the same
//! [`Sink`](super::Sink) as in child mode (collector crashes, rejected
//! configurations, the running version). Idle, nothing is polled but a
//! safety read every [`SAFETY_POLL`].
//!
//! When the agent stops, this task ends and the unit keeps running.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    sync::{mpsc, oneshot, watch},
};

use super::{
    Sink, State, Status,
    child::check_executable,
    policy::RestartPolicy,
    unit::{self, ShortRuns, Snapshot, UNIT_NAME, UnitInputs},
};
use crate::fs::write_atomic_off_thread;

/// How long one `systemctl` call may take.
pub const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(45);
/// How often the unit is read when nothing happens.
pub const SAFETY_POLL: Duration = Duration::from_secs(300);
/// How often it is read while it is between states, at first…
const TRANSITION_POLL: Duration = Duration::from_millis(500);
/// …and at most, while nothing changes.
const MAX_TRANSITION_POLL: Duration = Duration::from_secs(30);
/// The journal lines replayed when the agent starts.
const REPLAY_LINES: u32 = 1000;
/// File in the state directory: the hash of the unit and supervisor
/// configuration the running supervisor was started with.
pub const APPLIED_FILE: &str = "collector-unit.applied";
/// File in the state directory whose presence means the operator stopped
/// the runtime (`linkmesh-agent runtime stop`).
pub const STOPPED_FILE: &str = "runtime-stopped";

/// What the unit should run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// The unit file's inputs.
    pub unit: UnitInputs,
    /// The collector executable (checked before a start; its pid is the
    /// supervisor's child).
    pub collector: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Where the unit file goes.
    pub unit_dir: PathBuf,
}

impl Desired {
    fn unit_path(&self) -> PathBuf {
        self.unit_dir.join(UNIT_NAME)
    }

    /// The hash of what a started supervisor runs: the unit file and its
    /// configuration file.
    fn fingerprint(&self, unit_text: &str) -> String {
        let config = std::fs::read(&self.unit.config).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(unit::running_part(&self.unit, unit_text).as_bytes());
        ctx.update(&[0]);
        ctx.update(&config);
        crate::hex::encode(ctx.finish().as_ref())
    }
}

/// Why a `systemctl` call failed.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    /// It could not be run.
    #[error("cannot run systemctl {args}: {source}")]
    Spawn {
        /// Its arguments.
        args: String,
        /// Why.
        source: std::io::Error,
    },
    /// It failed.
    #[error("systemctl {args} failed ({status}): {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// Its exit.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// It did not finish in time.
    #[error("systemctl {args} did not finish within {} s", SYSTEMCTL_TIMEOUT.as_secs())]
    Timeout {
        /// Its arguments.
        args: String,
    },
    /// A file could not be written.
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
}

/// Runs `systemctl ARGS` (no password prompts), bounded in time.
///
/// # Errors
/// [`UnitError`] naming the call and what systemctl said.
pub async fn systemctl(args: &[&str]) -> Result<String, UnitError> {
    let joined = args.join(" ");
    let mut cmd = tokio::process::Command::new("systemctl");
    // Children never speak to systemd for the agent.
    cmd.arg("--no-ask-password")
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(SYSTEMCTL_TIMEOUT, cmd.output()).await {
        Err(_) => return Err(UnitError::Timeout { args: joined }),
        Ok(Err(source)) => {
            return Err(UnitError::Spawn {
                args: joined,
                source,
            });
        }
        Ok(Ok(o)) => o,
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(UnitError::Failed {
            args: joined,
            status: super::child::describe_exit(&out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Reads the unit's state.
///
/// # Errors
/// [`UnitError`] when systemctl cannot answer.
pub async fn show() -> Result<Snapshot, UnitError> {
    let props = unit::SHOW_PROPERTIES.join(",");
    let text = systemctl(&["show", "--timestamp=unix", "-p", &props, UNIT_NAME]).await?;
    Ok(unit::parse_show(&text))
}

/// Whether this host's service manager is systemd (sd_booted) with
/// `systemctl` on the path: unit mode is possible.
pub fn systemd_available() -> bool {
    Path::new("/run/systemd/system").is_dir() && which::which("systemctl").is_ok()
}

/// Whether the supervisor runs in its own systemd unit under `mode`.
pub fn unit_mode(mode: crate::config::RuntimeMode) -> bool {
    match mode {
        crate::config::RuntimeMode::Child => false,
        crate::config::RuntimeMode::Unit => true,
        crate::config::RuntimeMode::Auto => systemd_available(),
    }
}

/// Whether the operator stopped the runtime.
pub fn stopped_on_request(state_dir: &Path) -> bool {
    state_dir.join(STOPPED_FILE).exists()
}

enum Request {
    Apply(Box<Desired>, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Handle to the unit-mode task.
pub struct UnitSupervisor {
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<Status>,
    task: tokio::task::JoinHandle<()>,
}

impl UnitSupervisor {
    /// Takes charge of the unit: writes and enables it, starts it unless it
    /// runs what `desired` says already, and watches it.
    pub fn start(desired: Desired, policy: RestartPolicy) -> Self {
        let (requests, rx) = mpsc::channel(4);
        let mut initial = Status::new("opampsupervisor");
        initial.unit = Some(UNIT_NAME.to_owned());
        let (tx, status) = watch::channel(initial);
        let task = tokio::spawn(watch_unit(desired, policy, rx, tx));
        Self {
            requests,
            status,
            task,
        }
    }

    /// A receiver of status changes.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits (at most `limit`) for the first reading of the unit.
    pub async fn started(&self, limit: Duration) {
        let mut rx = self.status.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.state != State::Starting)).await;
    }

    /// New settings (a reload): the unit is rewritten and restarted when
    /// what it runs changed, and a failed unit is given another start.
    pub async fn apply(&self, desired: Desired) {
        let (tx, rx) = oneshot::channel();
        if self
            .requests
            .send(Request::Apply(Box::new(desired), tx))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// The agent is stopping: the unit is left running.
    pub async fn detach(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// The runtime is no longer wanted (another runtime was configured):
    /// the unit is stopped and disabled.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// One journal entry about the unit.
struct Entry {
    message: String,
    /// Written by systemd itself about the unit.
    from_manager: bool,
    /// The unit run the line belongs to.
    invocation: Option<String>,
}

fn parse_entry(line: &str) -> Option<Entry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = match v.get("MESSAGE")? {
        serde_json::Value::String(s) => s.clone(),
        // journald keeps non-UTF-8 messages as byte arrays.
        serde_json::Value::Array(bytes) => {
            let b: Vec<u8> = bytes
                .iter()
                .filter_map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            String::from_utf8_lossy(&b).into_owned()
        }
        _ => return None,
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    Some(Entry {
        message,
        from_manager: field("_PID").as_deref() == Some("1"),
        invocation: field("_SYSTEMD_INVOCATION_ID").or_else(|| field("INVOCATION_ID")),
    })
}

/// Follows the unit's journal into `tx`, restarting `journalctl` (with a
/// bounded delay) if it ends; replays the last lines only the first time.
async fn follow_journal(tx: mpsc::Sender<Entry>) {
    let mut lines = REPLAY_LINES;
    let mut delay = Duration::from_millis(500);
    loop {
        let mut cmd = tokio::process::Command::new("journalctl");
        cmd.args([
            "--follow",
            "--no-pager",
            "--output=json",
            "--unit",
            UNIT_NAME,
        ])
        .arg(format!("--lines={lines}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        match cmd.spawn() {
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    let mut reader = BufReader::new(out).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        if let Some(e) = parse_entry(&line)
                            && tx.send(e).await.is_err()
                        {
                            return;
                        }
                        delay = Duration::from_millis(500);
                    }
                }
                let _ = child.kill().await;
                tracing::warn!(
                    unit = UNIT_NAME,
                    "journalctl ended; following the journal again"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot run journalctl; the collector's problems will not be seen until it runs");
            }
        }
        lines = 0;
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The collector's pid: the supervisor's child (it runs nothing else; a
/// wrapper script that execs the collector is the same process). Read from
/// `/proc/*/stat`, which needs no ptrace access, so the agent's unit can
/// hold fewer capabilities than the collector's.
fn collector_child(supervisor_pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .is_some_and(|stat| {
                    parse_stat(&stat).is_some_and(|(_, ppid)| ppid == supervisor_pid)
                })
        })
}

/// The command name and parent pid from a `/proc/PID/stat` line.
fn parse_stat(stat: &str) -> Option<(&str, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    Some((comm, rest.next()?.parse().ok()?))
}

struct Watch {
    desired: Desired,
    policy: RestartPolicy,
    runs: ShortRuns,
    status: watch::Sender<Status>,
    sink: Sink,
    invocation: Option<String>,
    running_since: Option<Instant>,
    last: Snapshot,
}

impl Watch {
    /// Writes the unit when it differs, enables it, and starts (or
    /// restarts) it as needed. `retry_failed` gives a failed unit another
    /// start (a reload is an operator's action; the agent's own start is not).
    async fn ensure(&mut self, retry_failed: bool) -> Result<(), UnitError> {
        let d = &self.desired;
        if stopped_on_request(&d.state_dir) {
            return Ok(());
        }
        for (name, path) in [
            ("opampsupervisor", &d.unit.supervisor),
            ("collector", &d.collector),
        ] {
            if let Err(e) = check_executable(name, path) {
                self.status.send_modify(|s| {
                    s.state = State::NotRunnable {
                        error: e.to_string(),
                    }
                });
                return Ok(());
            }
        }
        // The unit's sandbox makes the storage writable; it must exist.
        crate::fs::ensure_private_dir_off_thread(d.unit.storage_dir.clone(), 0o700).await?;
        let text = unit::render_unit(&d.unit);
        let path = d.unit_path();
        let written = std::fs::read(&path).ok().as_deref() != Some(text.as_bytes());
        if written {
            write_atomic_off_thread(path.clone(), text.clone().into_bytes(), 0o644).await?;
            tracing::info!(path = %path.display(), "Wrote the collector runtime's unit");
            systemctl(&["daemon-reload"]).await?;
        }
        let snap = show().await?;
        if snap.unit_file_state != crate::systemd::UnitFileState::Enabled {
            systemctl(&["enable", "--quiet", UNIT_NAME]).await?;
            tracing::info!(
                unit = UNIT_NAME,
                "Enabled the collector runtime's unit for boot"
            );
        }
        let fingerprint = d.fingerprint(&text);
        let applied_path = d.state_dir.join(APPLIED_FILE);
        let applied = std::fs::read_to_string(&applied_path).unwrap_or_default();
        let failed = snap.active_state == crate::systemd::ActiveState::Failed;
        let action = if snap.up() && applied.trim() != fingerprint {
            Some("restart")
        } else if failed && !retry_failed {
            None
        } else if !snap.up() {
            Some("start")
        } else {
            None
        };
        if let Some(action) = action {
            if failed {
                systemctl(&["reset-failed", UNIT_NAME]).await?;
            }
            // Recorded first: a start that is interrupted is then not
            // repeated as a restart by the next agent.
            write_atomic_off_thread(
                applied_path.clone(),
                format!("{fingerprint}\n").into_bytes(),
                0o600,
            )
            .await?;
            tracing::info!(
                unit = UNIT_NAME,
                action,
                "Starting the collector runtime's unit"
            );
            systemctl(&["--no-block", action, UNIT_NAME]).await?;
        } else if !failed {
            tracing::info!(
                unit = UNIT_NAME,
                "Collector runtime's unit unchanged; not restarting it"
            );
        } else {
            tracing::warn!(unit = UNIT_NAME, reason = %unit::failure_reason(&snap), "The collector runtime's unit has failed; not starting it again until the configuration changes, the agent is reloaded, or `linkmesh-agent runtime start`");
        }
        Ok(())
    }

    /// Reads the unit and publishes what it says; true while it is between
    /// states (so it is read again soon).
    async fn refresh(&mut self) -> bool {
        let snap = match show().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the collector runtime's unit");
                return true;
            }
        };
        if snap.invocation_id != self.last.invocation_id || snap.main_pid != self.last.main_pid {
            self.running_since = (snap.main_pid != 0).then(Instant::now);
        }
        let running_for = self.running_since.map_or(Duration::ZERO, |t| t.elapsed());
        let consecutive = self.runs.observe(&snap, &self.policy, running_for);
        let stopped = stopped_on_request(&self.desired.state_dir);
        let state = unit::state_of(
            &snap,
            consecutive,
            &self.policy,
            stopped,
            crate::clock::now_unix_ms(),
        );
        let collector_pid = (snap.main_pid != 0)
            .then(|| collector_child(snap.main_pid))
            .flatten();
        if state != self.status.borrow().state && !matches!(state, State::Running { .. }) {
            tracing::info!(unit = UNIT_NAME, state = ?state, "Collector runtime's unit changed");
        }
        let transient =
            snap.active_state.changing() || (snap.main_pid != 0 && collector_pid.is_none());
        self.status.send_if_modified(|s| {
            let before = s.clone();
            s.state = state;
            s.restarts = snap.n_restarts;
            s.last_exit = snap.last_exit().or_else(|| s.last_exit.take());
            s.collector_pid = collector_pid;
            *s != before
        });
        self.last = snap;
        transient
    }

    fn line(&mut self, e: Entry) -> bool {
        if e.from_manager {
            return true;
        }
        if e.invocation.is_some() && e.invocation != self.invocation {
            self.invocation = e.invocation.clone();
            self.sink = Sink::new("opampsupervisor", false);
        }
        let mut bytes = e.message.into_bytes();
        bytes.push(b'\n');
        let seen = |s: &Status| (s.collector_crashes, s.collector_pid);
        let before = seen(&self.status.borrow());
        self.sink
            .handle(&super::child::Event::Stdout(bytes.into()), &self.status);
        // A collector that crashed or started: read its pid again.
        seen(&self.status.borrow()) != before
    }
}

async fn watch_unit(
    desired: Desired,
    policy: RestartPolicy,
    mut requests: mpsc::Receiver<Request>,
    status: watch::Sender<Status>,
) {
    let (tx, mut journal) = mpsc::channel(256);
    let follower = tokio::spawn(follow_journal(tx));
    let mut w = Watch {
        desired,
        policy,
        runs: ShortRuns::default(),
        status,
        sink: Sink::new("opampsupervisor", false),
        invocation: None,
        running_since: None,
        last: Snapshot::default(),
    };
    if let Err(e) = w.ensure(false).await {
        tracing::error!(error = %e, "Cannot set up the collector runtime's unit");
        w.status.send_modify(|s| {
            s.state = State::NotRunnable {
                error: e.to_string(),
            }
        });
    }
    let mut transient = w.refresh().await;
    // Between states the unit is read often, less and less often while
    // nothing changes (a collector that never starts is not polled fast
    // for ever).
    let mut poll = TRANSITION_POLL;
    loop {
        let wait = if transient { poll } else { SAFETY_POLL };
        let before = w.status.borrow().clone();
        tokio::select! {
            () = tokio::time::sleep(wait) => {
                transient = w.refresh().await;
                poll = if *w.status.borrow() == before {
                    (poll * 2).min(MAX_TRANSITION_POLL)
                } else {
                    TRANSITION_POLL
                };
            }
            e = journal.recv() => match e {
                Some(e) => {
                    if w.line(e) {
                        // Let a burst of lines settle before reading the unit.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        while let Ok(e) = journal.try_recv() {
                            w.line(e);
                        }
                        transient = w.refresh().await;
                        poll = TRANSITION_POLL;
                    }
                }
                None => transient = true,
            },
            req = requests.recv() => match req {
                Some(Request::Apply(d, done)) => {
                    w.desired = *d;
                    if let Err(e) = w.ensure(true).await {
                        tracing::error!(error = %e, "Cannot apply the collector runtime's unit");
                    }
                    transient = w.refresh().await;
                    poll = TRANSITION_POLL;
                    let _ = done.send(());
                }
                Some(Request::Shutdown(done)) => {
                    if let Err(e) = systemctl(&["disable", "--now", "--quiet", UNIT_NAME]).await {
                        tracing::error!(error = %e, "Cannot stop the collector runtime's unit");
                    }
                    w.status.send_modify(|s| s.state = State::Stopped);
                    let _ = done.send(());
                    break;
                }
                None => break,
            },
        }
    }
    follower.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines() {
        assert_eq!(
            parse_stat("4242 (otelcol-linkmes) S 4200 4200 4200 0 -1"),
            Some(("otelcol-linkmes", 4200))
        );
        assert_eq!(parse_stat("7 (a) b (c)) R 1 7 7"), Some(("a) b (c)", 1)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn journal_entries() {
        let e = parse_entry(r#"{"MESSAGE":"Main process exited, code=exited, status=1/FAILURE","_PID":"1","INVOCATION_ID":"aa"}"#).unwrap();
        assert!(e.from_manager);
        assert_eq!(e.invocation.as_deref(), Some("aa"));
        let e =
            parse_entry(r#"{"MESSAGE":[104,105,255],"_PID":"77","_SYSTEMD_INVOCATION_ID":"bb"}"#)
                .unwrap();
        assert!(!e.from_manager);
        assert_eq!(e.message, "hi\u{fffd}");
        assert_eq!(e.invocation.as_deref(), Some("bb"));
        assert!(parse_entry("not json").is_none());
        assert!(parse_entry(r#"{"_PID":"1"}"#).is_none());
    }
}
