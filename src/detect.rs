//! `linkmesh-agent detect`: the collector runtime found on this host, and
//! what a running agent knows of the one that runs, rendered from typed
//! values as JSON or for people.

use std::fmt::Write as _;

use crate::{
    published::OpampView,
    runtime::{Detection, Executable},
};

/// What `detect` shows.
#[derive(Debug, serde::Serialize)]
pub struct Detected {
    /// What detection found.
    #[serde(flatten)]
    pub detection: Detection,
    /// What runs, when an agent runs and knows.
    #[serde(rename = "collector_running", skip_serializing_if = "Option::is_none")]
    pub running: Option<Running>,
}

/// The running collector as the agent last published it.
#[derive(Debug, serde::Serialize)]
pub struct Running {
    /// Its version, from its own telemetry.
    pub version: Option<String>,
    /// The server's OpAMP view, from the last report.
    pub opamp: Option<OpampView>,
}

impl Detected {
    /// Detects now, with the last published state of a running agent.
    pub fn gather(settings: &crate::config::Settings) -> Self {
        let probes = crate::runtime::probe::HostProbes {
            state_dir: settings.state_dir.clone(),
        };
        let detection = crate::runtime::detect(&settings.runtime, &probes);
        let running = crate::published::read(&settings.state_dir)
            .filter(|s| s.agent_running)
            .map(|s| Running {
                version: s
                    .state
                    .runtime
                    .supervision
                    .and_then(|sup| sup.collector_version),
                opamp: s.state.reporter.opamp,
            });
        Self { detection, running }
    }

    /// For people.
    pub fn human(&self) -> String {
        let d = &self.detection;
        let mut out = String::new();
        let _ = writeln!(out, "runtime: {}", d.kind.as_str());
        show(&mut out, "collector", d.collector.as_ref());
        if let Some(r) = &self.running {
            let seen = match &r.opamp {
                Some(o) if !o.collector_version.is_empty() => format!(
                    "; the server sees {} {} over OpAMP",
                    o.collector_name, o.collector_version
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  collector runs   version {} (its own telemetry){seen}",
                r.version.as_deref().unwrap_or("unknown")
            );
        }
        show(&mut out, "opampsupervisor", d.supervisor.as_ref());
        show(&mut out, "alloy", d.alloy.as_ref().map(|a| &a.executable));
        if let Some(a) = &d.alloy {
            let _ = writeln!(out, "  alloy config     {}", a.config_file.display());
            let _ = match &a.remotecfg {
                Some(r) => writeln!(
                    out,
                    "  alloy remotecfg  url {}, id {}",
                    r.url.as_deref().unwrap_or("(unset)"),
                    r.id.as_deref().unwrap_or("(unset)")
                ),
                None => writeln!(out, "  alloy remotecfg  none"),
            };
            match (&a.running_version, &a.running_error) {
                (Some(v), _) => {
                    let _ = writeln!(
                        out,
                        "  alloy running    {v}{}",
                        if a.restart_pending {
                            " (installed build differs: restart pending)"
                        } else {
                            ""
                        }
                    );
                }
                (None, Some(e)) => {
                    let _ = writeln!(out, "  alloy running    unknown: {e}");
                }
                (None, None) => {}
            }
        }
        for c in &d.conflicts {
            let _ = writeln!(out, "conflict: {}", c.message);
        }
        for n in &d.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

fn show(out: &mut String, name: &str, e: Option<&Executable>) {
    let Some(e) = e else {
        let _ = writeln!(out, "  {name:<16} not found");
        return;
    };
    let version = match (&e.version, &e.version_error) {
        (Some(v), _) => format!(
            "{v} (from {})",
            e.version_source
                .map_or_else(|| "?".to_owned(), |s| s.to_string())
        ),
        (None, Some(err)) => format!("unknown: {err}"),
        (None, None) => "unknown".to_owned(),
    };
    let unit = e
        .unit
        .as_ref()
        .map(|u| format!(", unit {}/{}", u.enabled, u.active))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  {name:<16} {}  version {version}{unit}",
        e.path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::RuntimeKind, runtime::Origin};

    fn exe(path: &str, version: Option<&str>) -> Executable {
        Executable {
            path: path.into(),
            origin: Origin::Package,
            version: version.map(str::to_owned),
            version_source: version.map(|_| crate::runtime::VersionSource::VersionFlag),
            version_error: version
                .is_none()
                .then(|| "opampsupervisor has no --version".to_owned()),
            unit: None,
        }
    }

    fn detected(running: Option<Running>) -> Detected {
        Detected {
            detection: Detection {
                kind: RuntimeKind::Otelcol,
                collector: Some(exe("/usr/bin/otelcol-contrib", Some("0.158.0"))),
                supervisor: Some(exe("/usr/bin/opampsupervisor", None)),
                alloy: None,
                conflicts: Vec::new(),
                notes: vec!["a note".into()],
            },
            running,
        }
    }

    #[test]
    fn what_was_found_and_what_runs() {
        let d = detected(Some(Running {
            version: Some("0.158.0".into()),
            opamp: Some(OpampView {
                connected: true,
                collector_name: "otelcol-contrib".into(),
                collector_version: "0.158.0".into(),
                ..OpampView::default()
            }),
        }));
        let text = d.human();
        assert!(text.starts_with("runtime: otelcol\n"), "{text}");
        assert!(
            text.contains(
                "  collector        /usr/bin/otelcol-contrib  version 0.158.0 (from --version)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  collector runs   version 0.158.0 (its own telemetry); the server sees otelcol-contrib 0.158.0 over OpAMP\n"),
            "{text}"
        );
        assert!(
            text.contains("version unknown: opampsupervisor has no --version"),
            "{text}"
        );
        assert!(
            text.contains("  alloy            not found\n") && text.ends_with("note: a note\n")
        );
        let doc = serde_json::to_value(&d).unwrap();
        assert_eq!(doc["kind"], "otelcol");
        assert_eq!(doc["collector_running"]["version"], "0.158.0");
        assert_eq!(doc["collector_running"]["opamp"]["connected"], true);
        let idle = serde_json::to_value(detected(None)).unwrap();
        assert!(idle.get("collector_running").is_none(), "{idle}");
    }
}
