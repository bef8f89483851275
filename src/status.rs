//! `linkmesh-agent status`: what this host is (its identity, its standing)
//! and what the running agent last published, gathered once into typed
//! values and rendered from them, as JSON or for people.

use std::{fmt::Write as _, path::PathBuf};

use crate::{
    clock::rfc3339,
    identity::{Identity, IdentityStore, store::StoreError},
    published::Snapshot,
    reporter::Revoked,
    supervisor::State,
    version,
};

/// What `status` shows.
#[derive(Debug)]
pub struct Status {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The configured server (shown when not enrolled).
    pub configured_server: Option<String>,
    /// The identity, when enrolled.
    pub identity: Option<Identity>,
    /// The revocation recorded for it, if any.
    pub revoked: Option<Revoked>,
    /// What the agent last published, and whether it still runs.
    pub runtime: Option<Snapshot>,
}

impl Status {
    /// Reads it from `settings`' state directory.
    ///
    /// # Errors
    /// When the identity exists but cannot be read.
    pub fn gather(settings: &crate::config::Settings) -> Result<Self, StoreError> {
        let store = IdentityStore::new(&settings.state_dir);
        let identity = match store.lock_shared()? {
            Some(lock) => store.load(&lock)?,
            None => None,
        };
        let revoked = identity
            .as_ref()
            .and_then(|id| crate::reporter::read_revoked(&settings.state_dir, id.host_id.as_str()));
        Ok(Self {
            state_dir: settings.state_dir.clone(),
            configured_server: settings.server.as_ref().map(ToString::to_string),
            identity,
            revoked,
            runtime: crate::published::read(&settings.state_dir),
        })
    }

    /// The stable JSON document (`status --json`).
    pub fn json(&self) -> serde_json::Value {
        let state_dir = self.state_dir.display().to_string();
        let runtime = self.runtime.as_ref().map(|s| RuntimeJson {
            state: &s.state,
            agent_running: s.agent_running,
        });
        let doc = match &self.identity {
            Some(id) => serde_json::to_value(Enrolled {
                enrolled: true,
                host_id: id.host_id.as_str(),
                server: id.server.to_string(),
                ca_pin: id.ca_pin.to_string(),
                enrolled_at: &id.enrolled_at,
                certificate: Validity {
                    not_before: rfc3339(id.validity.not_before),
                    not_after: rfc3339(id.validity.not_after),
                },
                state_dir,
                agent_version: version::AGENT_VERSION,
                revoked: self.revoked.as_ref(),
                runtime,
            }),
            None => serde_json::to_value(NotEnrolled {
                enrolled: false,
                server: self.configured_server.as_deref(),
                state_dir,
                agent_version: version::AGENT_VERSION,
                runtime,
            }),
        };
        doc.unwrap_or_default()
    }

    /// For people.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let Some(id) = &self.identity else {
            let _ = writeln!(
                out,
                "not enrolled (state directory {})",
                self.state_dir.display()
            );
            let _ = writeln!(
                out,
                "enrol with: linkmesh-agent enroll --server URL --token-file FILE --ca-pin sha256:HEX"
            );
            return out;
        };
        let mut line = |k: &str, v: &str| {
            let _ = writeln!(out, "{:<14}{v}", format!("{k}:"));
        };
        line("host id", id.host_id.as_str());
        line("server", &id.server.to_string());
        line("CA pin", &id.ca_pin.to_string());
        line("enrolled at", &id.enrolled_at);
        line(
            "certificate",
            &format!(
                "valid {} to {}",
                rfc3339(id.validity.not_before),
                rfc3339(id.validity.not_after)
            ),
        );
        line("agent", version::AGENT_VERSION);
        if let Some(r) = &self.revoked {
            line("standing", &r.explain());
        }
        match &self.runtime {
            Some(snap) if snap.agent_running => running(snap, &mut line),
            Some(_) => line(
                "runtime",
                &format!(
                    "agent not running (last state in {})",
                    self.state_dir.join(crate::published::STATUS_FILE).display()
                ),
            ),
            None => line("runtime", "agent not running"),
        }
        out
    }
}

/// The lines about a running agent's runtime and reports.
fn running(snap: &Snapshot, line: &mut impl FnMut(&str, &str)) {
    let r = &snap.state.runtime;
    let runtime = match &r.supervision {
        Some(sup) => {
            let detail = match &sup.state {
                State::NotRunnable { error } => format!("; {error}"),
                State::Failed { reason } => format!("; {reason}"),
                _ => String::new(),
            };
            let pid = match &sup.state {
                State::Running { pid, .. } => pid.to_string(),
                _ => "none".into(),
            };
            format!(
                "{} {} (pid {pid}{}, {} restarts, collector pid {}, {} collector crashes{detail})",
                sup.name,
                crate::published::state_name(&sup.state),
                sup.unit
                    .as_deref()
                    .map(|u| format!(" in {u}"))
                    .unwrap_or_default(),
                sup.restarts,
                sup.collector_pid
                    .map_or_else(|| "none".into(), |p| p.to_string()),
                sup.collector_crashes,
            )
        }
        None => format!("{} (not supervised)", r.kind.as_str()),
    };
    line("runtime", &runtime);
    let sup = r.supervision.as_ref();
    if let Some(v) = sup.and_then(|s| s.collector_version.as_deref()) {
        line("collector", &format!("version {v} running"));
    }
    if let Some(p) = sup.and_then(|s| s.collector_problem.as_ref()) {
        line("last problem", &p.reason);
    }
    let rep = &snap.state.reporter;
    if let Some(o) = &rep.opamp {
        line(
            "opamp",
            &format!(
                "{} as seen by the server; remote config {}{}",
                if o.connected {
                    "connected"
                } else {
                    "not connected"
                },
                if o.remote_config_status.is_empty() {
                    "none"
                } else {
                    &o.remote_config_status
                },
                Some(&o.remote_config_error)
                    .filter(|e| !e.is_empty())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        );
    }
    let last = rep.last_report_unix_ms.map(|ms| {
        crate::clock::rfc3339_unix_s(i64::try_from(ms / 1000).unwrap_or(0)).unwrap_or_default()
    });
    line(
        "last report",
        &format!(
            "{}{}",
            last.unwrap_or_else(|| "none yet".into()),
            rep.last_error
                .as_deref()
                .map(|e| format!(" (last attempt failed: {e})"))
                .unwrap_or_default()
        ),
    );
    if let Some(at) = rep
        .retry_at_unix_ms
        .filter(|_| rep.consecutive_failures > 0)
    {
        line(
            "next attempt",
            &format!(
                "{} (after {} failed in a row)",
                crate::clock::rfc3339_unix_ms(at),
                rep.consecutive_failures
            ),
        );
    }
    if let Some(v) = rep.skew_verdict {
        line(
            "version skew",
            &format!(
                "{} (server {})",
                v.as_str(),
                rep.server_version.as_deref().unwrap_or("?")
            ),
        );
    }
    if let Some(o) = rep.clock_offset_ms {
        line("clock offset", &format!("{o} ms"));
    }
}

#[derive(serde::Serialize)]
struct Validity {
    not_before: String,
    not_after: String,
}

#[derive(serde::Serialize)]
struct RuntimeJson<'a> {
    #[serde(flatten)]
    state: &'a crate::published::Published,
    agent_running: bool,
}

#[derive(serde::Serialize)]
struct Enrolled<'a> {
    enrolled: bool,
    host_id: &'a str,
    server: String,
    ca_pin: String,
    enrolled_at: &'a str,
    certificate: Validity,
    state_dir: String,
    agent_version: &'a str,
    revoked: Option<&'a Revoked>,
    runtime: Option<RuntimeJson<'a>>,
}

#[derive(serde::Serialize)]
struct NotEnrolled<'a> {
    enrolled: bool,
    server: Option<&'a str>,
    state_dir: String,
    agent_version: &'a str,
    runtime: Option<RuntimeJson<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::HostId;

    fn identity() -> Identity {
        let (key, certs, ca) = crate::identity::tests::issue("h1");
        Identity::new(
            HostId::new("h1").unwrap(),
            "https://fleet.example:8443".parse().unwrap(),
            "2026-01-01T00:00:00Z".into(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            certs,
            ca,
        )
        .unwrap()
    }

    fn status(identity: Option<Identity>, revoked: Option<Revoked>) -> Status {
        Status {
            state_dir: "/var/lib/linkmesh-agent".into(),
            configured_server: Some("https://fleet.example:8443".into()),
            identity,
            revoked,
            runtime: None,
        }
    }

    #[test]
    fn not_enrolled() {
        let s = status(None, None);
        let doc = s.json();
        assert_eq!(doc["enrolled"], false);
        assert_eq!(doc["server"], "https://fleet.example:8443");
        assert!(doc["runtime"].is_null());
        assert!(doc.get("host_id").is_none() && doc.get("revoked").is_none());
        let text = s.human();
        assert!(text.starts_with("not enrolled (state directory /var/lib/linkmesh-agent)"));
        assert!(text.contains("linkmesh-agent enroll --server URL"));
    }

    #[test]
    fn enrolled_with_the_agent_stopped() {
        let s = status(Some(identity()), None);
        let doc = s.json();
        assert_eq!(doc["enrolled"], true);
        assert_eq!(doc["host_id"], "h1");
        assert_eq!(doc["server"], "https://fleet.example:8443");
        assert!(doc["revoked"].is_null() && doc.get("revoked").is_some());
        assert!(
            doc["certificate"]["not_after"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        let text = s.human();
        assert!(text.contains("host id:      h1\n"), "{text}");
        assert!(text.contains("runtime:      agent not running\n"), "{text}");
        assert!(!text.contains("standing:"), "{text}");
    }

    #[test]
    fn a_failing_reporter_says_when_it_tries_again() {
        use crate::{
            config::RuntimeKind,
            published::{Published, ReporterStatus, RuntimeReport},
            runtime::Detection,
        };
        let mut s = status(Some(identity()), None);
        let mut published = Published {
            runtime: RuntimeReport {
                agent_pid: 1,
                updated_unix_ms: 0,
                kind: RuntimeKind::None,
                supervision: None,
                detection: Detection {
                    kind: RuntimeKind::None,
                    collector: None,
                    supervisor: None,
                    alloy: None,
                    conflicts: vec![],
                    notes: vec![],
                },
            },
            reporter: ReporterStatus {
                consecutive_failures: 4,
                last_error: Some("connection refused".into()),
                last_failure_unix_ms: Some(1_796_000_000_000),
                retry_at_unix_ms: Some(1_796_000_004_096),
                ..ReporterStatus::default()
            },
        };
        s.runtime = Some(Snapshot {
            state: published.clone(),
            agent_running: true,
        });
        let text = s.human();
        assert!(
            text.contains("next attempt: 2026-11-30T00:53:24.096Z (after 4 failed in a row)\n"),
            "{text}"
        );
        assert_eq!(
            s.json()["runtime"]["reporter"]["retry_at_unix_ms"],
            1_796_000_004_096_u64
        );
        // Reporting again: no next attempt to show.
        published.reporter.consecutive_failures = 0;
        s.runtime = Some(Snapshot {
            state: published,
            agent_running: true,
        });
        assert!(!s.human().contains("next attempt"));
    }

    #[test]
    fn a_revoked_host_says_what_to_do() {
        let r = Revoked {
            host_id: "h1".into(),
            at_unix_ms: 0,
            message: "revoked by the operator".into(),
        };
        let text = status(Some(identity()), Some(r)).human();
        assert!(text.contains("standing:     revoked"), "{text}");
    }
}
