//! The upgrade guardrails' rules, pure: "server first" (an agent is never
//! installed ahead of its fleet server), judged by the one skew function in
//! [`crate::version`], and the record of the server's version the agent last
//! saw, for when the server cannot be asked.
//!
//! The judge runs in three places, always as a `linkmesh-agent` binary:
//! `install.sh` (the target version's own binary, before anything is
//! installed), the deb `preinst` and the rpm `%pre` (the installed agent,
//! before the package's files are unpacked). See [`gate`] for the I/O.

pub mod gate;
pub mod probation;
pub mod runtime;
pub mod view;
pub mod watch;

use std::path::Path;

use crate::{
    fs::{FsError, write_atomic},
    version::{self, SkewVerdict, Version},
};

/// The environment switch that lets an agent ahead of its server be
/// installed anyway (labs); `install.sh --allow-ahead` sets it.
pub const ALLOW_AHEAD_ENV: &str = "LINKMESH_ALLOW_AHEAD";

/// The exit code of a refusal, the same in `install.sh` and the agent.
pub const EXIT_REFUSED: u8 = 12;

/// `STATE/server-version.json`: the fleet server's version and window as
/// the agent last heard them.
pub const SERVER_RECORD: &str = "server-version.json";

/// Whether `LINKMESH_ALLOW_AHEAD` asks for the override (`1`, `true`, `yes`).
pub fn allow_ahead_from(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

/// What the agent last heard from its server about versions.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerRecord {
    /// The server it was heard from (`https://HOST:PORT`).
    pub server: String,
    /// The server's version.
    pub version: String,
    /// The server's window: how many minor versions agents may lag.
    pub minor_versions_behind: u32,
    /// When this version was first heard (Unix ms).
    pub seen_unix_ms: u64,
}

/// A JSON record of the upgrade machinery (the server's version, a
/// probation, an outcome) that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not such a record.
    #[error("{path} is not a valid record ({reason}); remove it to start over")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file cannot be written.
    #[error(transparent)]
    Write(#[from] FsError),
}

/// Reads a JSON record; `None` when the file does not exist.
///
/// # Errors
/// [`RecordError`] when it exists but cannot be read or parsed.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, RecordError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RecordError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RecordError::Read {
            path: path.display().to_string(),
            source: e,
        }),
    }
}

/// Writes a JSON record atomically (0600).
///
/// # Errors
/// [`RecordError::Write`] when it cannot be written.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), RecordError> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o600)?;
    Ok(())
}

/// Reads `STATE/server-version.json`; `None` when there is none.
///
/// # Errors
/// [`RecordError`] when it exists but cannot be read or parsed.
pub fn read_record(state_dir: &Path) -> Result<Option<ServerRecord>, RecordError> {
    read_json(&state_dir.join(SERVER_RECORD))
}

/// Writes the record atomically (0600).
///
/// # Errors
/// [`RecordError::Write`] when it cannot be written.
pub fn write_record(state_dir: &Path, record: &ServerRecord) -> Result<(), RecordError> {
    write_json(&state_dir.join(SERVER_RECORD), record)
}

/// The record to keep after hearing `version`/`window` from `server`:
/// `None` when `current` already says so (the file is not rewritten at
/// every report).
pub fn updated_record(
    current: Option<&ServerRecord>,
    server: &str,
    version: &str,
    window: u32,
    now_unix_ms: u64,
) -> Option<ServerRecord> {
    let same = current.is_some_and(|r| {
        r.server == server && r.version == version && r.minor_versions_behind == window
    });
    (!same).then(|| ServerRecord {
        server: server.to_owned(),
        version: version.to_owned(),
        minor_versions_behind: window,
        seen_unix_ms: now_unix_ms,
    })
}

/// Where the server's version came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Asked just now (ServerInfo over the pinned TLS).
    Asked {
        /// The server.
        server: String,
    },
    /// The server could not be asked; the agent's record.
    Recorded {
        /// The server.
        server: String,
        /// When the agent heard it (RFC 3339).
        seen_at: String,
        /// Why the server was not asked.
        unreachable: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Asked { server } => write!(f, "asked {server} just now"),
            Self::Recorded {
                server, seen_at, ..
            } => write!(f, "as {server} said at {seen_at}; it cannot be reached now"),
        }
    }
}

/// The server's side of the judgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSide {
    /// Its version.
    pub version: Version,
    /// Its window (minor versions agents may lag).
    pub minor_versions_behind: u32,
    /// Where that came from.
    pub source: Source,
}

/// The verdict on installing a version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Within the server's window.
    InWindow,
    /// Older than the window (or an older major): installed, with a warning.
    Behind,
    /// Newer than the server, let through by `LINKMESH_ALLOW_AHEAD`.
    AheadAllowed,
    /// Newer than the server: refused.
    Refused,
    /// No server version known (none reachable, none recorded): installed,
    /// with a warning.
    Unchecked,
}

impl Admission {
    /// Whether the install goes ahead.
    pub fn proceeds(self) -> bool {
        self != Self::Refused
    }
}

/// The judgement, with what to tell the operator.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Judgement {
    /// The verdict.
    pub admission: Admission,
    /// The version to be installed.
    pub target: String,
    /// The server's version, when known.
    pub server_version: Option<String>,
    /// Where it came from.
    pub source: Option<Source>,
    /// One paragraph for people: the rule, both versions, the fix.
    pub message: String,
}

/// Judges installing `target` against the server (when known). Only an
/// agent ahead of its server is refused; behind the window and unknown
/// server are warnings (a rollback below the window must stay possible).
pub fn judge(target: &Version, server: Option<&ServerSide>, allow_ahead: bool) -> Judgement {
    let Some(s) = server else {
        return Judgement {
            admission: Admission::Unchecked,
            target: target.to_string(),
            server_version: None,
            source: None,
            message: format!(
                "warning: the fleet server's version is unknown (no server reachable and none recorded on this host); installing linkmesh-agent {target} without the server-first check"
            ),
        };
    };
    let sv = &s.version;
    let ahead = match version::skew(target, sv, s.minor_versions_behind) {
        SkewVerdict::Ahead => true,
        SkewVerdict::Incompatible => target.major > sv.major,
        SkewVerdict::InWindow | SkewVerdict::Behind => false,
    };
    let (admission, message) = if ahead && allow_ahead {
        (
            Admission::AheadAllowed,
            format!(
                "warning: linkmesh-agent {target} is newer than the fleet server {sv} ({}); installing it anyway because {ALLOW_AHEAD_ENV}=1: the agent will report itself `ahead` and the server refuses it a fresh enrolment",
                s.source
            ),
        )
    } else if ahead {
        (
            Admission::Refused,
            format!(
                "refused: linkmesh-agent {target} is newer than the fleet server {sv} ({}). The rule: the fleet server is upgraded first, then the collector runtimes, then the agents. Fix: upgrade the fleet server to {}.{} or later first, then run this again; for a lab, {ALLOW_AHEAD_ENV}=1 (install.sh --allow-ahead) installs it anyway.",
                s.source, target.major, target.minor
            ),
        )
    } else if version::skew(target, sv, s.minor_versions_behind) == SkewVerdict::InWindow {
        (
            Admission::InWindow,
            format!(
                "linkmesh-agent {target} is within the window of the fleet server {sv} ({})",
                s.source
            ),
        )
    } else {
        let oldest = sv.minor.saturating_sub(u64::from(s.minor_versions_behind));
        (
            Admission::Behind,
            format!(
                "warning: linkmesh-agent {target} is older than the fleet server {sv} supports ({}): it serves agents {}.{oldest} to {}.{}; installing it anyway (a rollback may need it), but upgrade to {}.{} soon",
                s.source, sv.major, sv.major, sv.minor, sv.major, sv.minor
            ),
        )
    };
    Judgement {
        admission,
        target: target.to_string(),
        server_version: Some(sv.to_string()),
        source: Some(s.source.clone()),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn asked(version: &str) -> ServerSide {
        ServerSide {
            version: v(version),
            minor_versions_behind: 1,
            source: Source::Asked {
                server: "https://fleet.example:8443".into(),
            },
        }
    }

    #[test]
    fn ahead_is_refused_with_the_rule_both_versions_and_the_fix() {
        let j = judge(&v("0.3.0"), Some(&asked("0.2.4")), false);
        assert_eq!(j.admission, Admission::Refused);
        assert!(!j.admission.proceeds());
        for part in [
            "0.3.0",
            "0.2.4",
            "fleet server is upgraded first",
            "upgrade the fleet server to 0.3 or later first",
            "LINKMESH_ALLOW_AHEAD=1",
            "asked https://fleet.example:8443 just now",
        ] {
            assert!(j.message.contains(part), "{part:?} not in {}", j.message);
        }
        // A newer major is ahead too.
        assert_eq!(
            judge(&v("1.0.0"), Some(&asked("0.9.0")), false).admission,
            Admission::Refused
        );
    }

    #[test]
    fn the_override_lets_ahead_through_and_says_so() {
        let j = judge(&v("0.3.0"), Some(&asked("0.2.4")), true);
        assert_eq!(j.admission, Admission::AheadAllowed);
        assert!(j.admission.proceeds());
        assert!(j.message.contains("`ahead`"), "{}", j.message);
    }

    #[test]
    fn the_window_patch_levels_and_behind() {
        for target in ["0.2.0", "0.2.9", "0.1.7"] {
            assert_eq!(
                judge(&v(target), Some(&asked("0.2.4")), false).admission,
                Admission::InWindow,
                "{target}"
            );
        }
        let j = judge(&v("0.0.9"), Some(&asked("0.2.4")), false);
        assert_eq!(j.admission, Admission::Behind);
        assert!(j.admission.proceeds());
        assert!(
            j.message.contains("serves agents 0.1 to 0.2"),
            "{}",
            j.message
        );
        // An older major: a warning, never a refusal.
        assert_eq!(
            judge(&v("0.9.0"), Some(&asked("1.0.0")), false).admission,
            Admission::Behind
        );
    }

    #[test]
    fn unknown_server_goes_ahead_with_a_warning() {
        let j = judge(&v("0.3.0"), None, false);
        assert_eq!(j.admission, Admission::Unchecked);
        assert!(j.admission.proceeds());
        assert!(j.message.starts_with("warning:"), "{}", j.message);
    }

    #[test]
    fn a_recorded_version_says_when_and_why() {
        let s = ServerSide {
            source: Source::Recorded {
                server: "https://fleet.example:8443".into(),
                seen_at: "2026-11-30T10:00:00Z".into(),
                unreachable: "connection refused".into(),
            },
            ..asked("0.2.4")
        };
        let j = judge(&v("0.3.0"), Some(&s), false);
        assert!(
            j.message
                .contains("as https://fleet.example:8443 said at 2026-11-30T10:00:00Z"),
            "{}",
            j.message
        );
    }

    #[test]
    fn the_record_is_rewritten_only_on_change() {
        let server = "https://fleet.example:8443";
        let first = updated_record(None, server, "0.2.4", 1, 10).unwrap();
        assert_eq!(first.seen_unix_ms, 10);
        assert_eq!(updated_record(Some(&first), server, "0.2.4", 1, 20), None);
        assert_eq!(
            updated_record(Some(&first), server, "0.3.0", 1, 30).map(|r| r.seen_unix_ms),
            Some(30)
        );
        assert!(updated_record(Some(&first), server, "0.2.4", 2, 40).is_some());
        assert!(updated_record(Some(&first), "https://other:8443", "0.2.4", 1, 40).is_some());
    }

    #[test]
    fn the_record_round_trips_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_record(dir.path()).unwrap().is_none());
        let r = updated_record(None, "https://f:8443", "0.2.4", 1, 5).unwrap();
        write_record(dir.path(), &r).unwrap();
        assert_eq!(read_record(dir.path()).unwrap(), Some(r));
        std::fs::write(dir.path().join(SERVER_RECORD), b"{").unwrap();
        let e = read_record(dir.path()).unwrap_err().to_string();
        assert!(e.contains(SERVER_RECORD), "{e}");
    }

    #[test]
    fn the_override_switch() {
        assert!(allow_ahead_from(Some("1")));
        assert!(allow_ahead_from(Some("true")));
        assert!(!allow_ahead_from(Some("0")));
        assert!(!allow_ahead_from(Some("")));
        assert!(!allow_ahead_from(None));
    }
}
