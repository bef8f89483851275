//! The agent's published state: one typed record that `run` writes to
//! `STATE/runtime-status.json` (atomically, on every change) and that
//! `status`, `check`, `detect` and `runtime stop|start` read back, with one
//! rule for whether the agent that wrote it still runs.
//!
//! The runtime half ([`RuntimeReport`]) comes from supervision, the reporter
//! half ([`ReporterStatus`]) from the reporter; neither module imports the
//! other, both import this one.

use std::path::Path;

use crate::{
    config::RuntimeKind,
    fs::write_atomic,
    runtime::Detection,
    supervisor::{self, State},
    version::SkewVerdict,
};

/// File in the state directory where `run` publishes its state.
pub const STATUS_FILE: &str = "runtime-status.json";

/// What `run` publishes about the runtime it manages.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeReport {
    /// The agent's pid, so readers can tell a stale file.
    pub agent_pid: u32,
    /// When this was written (Unix ms).
    pub updated_unix_ms: u64,
    /// The runtime managed.
    pub kind: RuntimeKind,
    /// Supervision state, for otelcol.
    pub supervision: Option<supervisor::Status>,
    /// What detection found.
    pub detection: Detection,
}

impl RuntimeReport {
    /// One line for systemd's STATUS=.
    pub fn summary(&self) -> String {
        match (&self.kind, &self.supervision, &self.detection.alloy) {
            (RuntimeKind::Otelcol, Some(s), _) => s.summary(),
            (RuntimeKind::Alloy, _, Some(a)) => format!(
                "watching alloy {}{}",
                a.executable
                    .version
                    .as_deref()
                    .unwrap_or("(version unknown)"),
                if a.restart_pending {
                    " (upgraded, restart pending)"
                } else {
                    ""
                }
            ),
            _ => "no collector runtime found; enrolled and idle".to_owned(),
        }
    }
}

/// What the reporter publishes about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReporterStatus {
    /// Last successful report (Unix ms).
    pub last_report_unix_ms: Option<u64>,
    /// Reports sent successfully since start.
    pub reports: u64,
    /// Failed attempts in a row.
    pub consecutive_failures: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the last attempt failed (Unix ms); kept after a success.
    #[serde(default)]
    pub last_failure_unix_ms: Option<u64>,
    /// When the reporter tries again after that failure (Unix ms): the
    /// backoff in force, None while reporting works.
    #[serde(default)]
    pub retry_at_unix_ms: Option<u64>,
    /// The last failure was the server refusing the report (not the server
    /// being unreachable): what an upgrade's probation rolls back on.
    pub last_error_rejected: bool,
    /// The server revoked this host: reporting stopped (the collector keeps
    /// running) until it enrols again.
    #[serde(default)]
    pub revoked: bool,
    /// The server sees this host's identity on two machines at once: its
    /// words (None when not).
    #[serde(default)]
    pub identity_in_use_elsewhere: Option<String>,
    /// This machine is a clone waiting for an identity of its own: why and
    /// what the server said (None when not a clone, or done).
    #[serde(default)]
    pub clone_pending: Option<String>,
    /// The server's version, as it last said.
    pub server_version: Option<String>,
    /// This agent against the server (`in_window`, `behind`, `ahead`, `incompatible`).
    pub skew_verdict: Option<SkewVerdict>,
    /// Host clock minus server clock, ms, from the last exchange.
    pub clock_offset_ms: Option<i64>,
    /// The report interval in force, seconds.
    pub report_interval_secs: u64,
    /// Runtime pins the server sent (kind -> version).
    pub runtime_pins: Vec<(String, String)>,
    /// When the certificate will be renewed (RFC 3339).
    pub renew_at: Option<String>,
    /// Expiry of the current certificate (RFC 3339).
    pub cert_not_after: Option<String>,
    /// Renewals done since start.
    pub renewals: u32,
    /// The HTTP CONNECT proxy used, if any (`host:port via SOURCE`).
    pub proxy: Option<String>,
    /// This host's collector as the server sees it over OpAMP, as of the
    /// last report.
    pub opamp: Option<OpampView>,
}

/// The server's OpAMP view of this host's collector.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct OpampView {
    /// Its supervisor is connected to the server.
    pub connected: bool,
    /// The collector's OpAMP instance uid.
    pub instance_uid: String,
    /// The distribution (`service.name`).
    pub collector_name: String,
    /// The version running (`service.version`).
    pub collector_version: String,
    /// Healthy, as the supervisor last said.
    pub healthy: bool,
    /// Why not.
    pub last_error: String,
    /// The configuration the server wants it to run.
    pub remote_config_hash: String,
    /// none, applying, applied or failed.
    pub remote_config_status: String,
    /// Why it failed.
    pub remote_config_error: String,
}

/// The whole record, as the file holds it: the runtime's fields at the top
/// level and the reporter's under `reporter`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// The runtime half.
    #[serde(flatten)]
    pub runtime: RuntimeReport,
    /// The reporter half.
    #[serde(default)]
    pub reporter: ReporterStatus,
}

/// A record read back, and whether its writer still runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// What was published.
    pub state: Published,
    /// The agent that wrote it is alive.
    pub agent_running: bool,
}

impl Snapshot {
    /// The supervision state, while the agent that published it runs.
    pub fn live_supervision(&self) -> Option<&supervisor::Status> {
        self.agent_running
            .then_some(self.state.runtime.supervision.as_ref())
            .flatten()
    }
}

/// Why the record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// It could not be encoded.
    #[error("cannot encode the agent's status: {0}")]
    Encode(#[from] serde_json::Error),
    /// It could not be written.
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
}

/// Writes the record to `STATE/runtime-status.json`, atomically (0600).
///
/// # Errors
/// [`PublishError`] when it cannot be encoded or written.
pub fn write(state_dir: &Path, state: &Published) -> Result<(), PublishError> {
    let mut bytes = serde_json::to_vec_pretty(state)?;
    bytes.push(b'\n');
    write_atomic(&state_dir.join(STATUS_FILE), &bytes, 0o600)?;
    Ok(())
}

/// Reads the record back; `None` when there is none or it does not parse
/// (an agent of another version may have written it).
pub fn read(state_dir: &Path) -> Option<Snapshot> {
    let bytes = std::fs::read(state_dir.join(STATUS_FILE)).ok()?;
    let state: Published = serde_json::from_slice(&bytes).ok()?;
    let agent_running = agent_alive(state.runtime.agent_pid);
    Some(Snapshot {
        state,
        agent_running,
    })
}

/// The one rule for "is the agent running": the pid exists and is a
/// `linkmesh-agent` executable (also after an upgrade replaced the file,
/// when the kernel names it `linkmesh-agent (deleted)`), so a reused pid
/// is not taken for the agent.
pub fn agent_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_err() {
        return false;
    }
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        std::fs::read_link("/proc/self/exe").is_ok_and(|me| me == exe)
            || exe
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("linkmesh-agent"))
    })
}

/// What a state is called in the record (`running`, `crash_loop`…).
pub fn state_name(state: &State) -> &'static str {
    match state {
        State::Starting => "starting",
        State::Running { .. } => "running",
        State::Backoff { .. } => "backoff",
        State::CrashLoop { .. } => "crash_loop",
        State::NotRunnable { .. } => "not_runnable",
        State::Failed { .. } => "failed",
        State::Stopped => "stopped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Published {
        let mut sup = supervisor::Status::new("opampsupervisor");
        sup.state = State::Failed {
            reason: "linkmesh-collector.service failed".into(),
        };
        sup.unit = Some("linkmesh-collector.service".into());
        Published {
            runtime: RuntimeReport {
                agent_pid: std::process::id(),
                updated_unix_ms: 7,
                kind: RuntimeKind::Otelcol,
                supervision: Some(sup),
                detection: Detection {
                    kind: RuntimeKind::Otelcol,
                    collector: None,
                    supervisor: None,
                    alloy: None,
                    conflicts: vec![crate::runtime::Conflict {
                        code: "standalone_collector_service".into(),
                        message: "m".into(),
                    }],
                    notes: vec![],
                },
            },
            reporter: ReporterStatus {
                reports: 3,
                opamp: Some(OpampView {
                    connected: true,
                    ..OpampView::default()
                }),
                ..ReporterStatus::default()
            },
        }
    }

    #[test]
    fn written_and_read_back_typed() {
        let dir = tempfile::tempdir().unwrap();
        let r = record();
        write(dir.path(), &r).unwrap();
        let text = std::fs::read_to_string(dir.path().join(STATUS_FILE)).unwrap();
        // The layout readers of earlier versions know: runtime fields at the
        // top, the reporter under `reporter`, the state as a tag.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["supervision"]["state"], "failed");
        assert_eq!(v["reporter"]["reports"], 3);
        let back = read(dir.path()).unwrap();
        assert_eq!(back.state, r);
        // The reader's own process counts: it is the same executable.
        assert_eq!(
            back.agent_running,
            std::fs::read_link("/proc/self/exe").is_ok()
        );
        assert_eq!(
            state_name(&back.state.runtime.supervision.unwrap().state),
            "failed"
        );
    }

    #[test]
    fn a_gone_or_foreign_pid_is_not_the_agent() {
        assert!(!agent_alive(0));
        assert!(!agent_alive(u32::MAX));
        // pid 1 exists but is not a linkmesh-agent.
        assert!(!agent_alive(1) || std::fs::read_link("/proc/1/exe").is_err());
    }
}
