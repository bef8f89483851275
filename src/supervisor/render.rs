//! Renders opampsupervisor's configuration from the host's enrolment.
//!
//! Only keys the pinned supervisor (v0.158.0, the one the test bed builds
//! and runs) knows are emitted: it decodes with `ErrorUnused`, so an unknown
//! key stops it from starting. Every string is double-quoted and escaped, so
//! paths and ids with YAML-significant characters stay strings.
//!
//! The collector's configuration is the operator's local file
//! (`agent.config_files`) with the server's remote configuration merged
//! over it. A remote configuration is validated by the collector before it
//! is applied (`validate_config`) and rolled back when the collector fails
//! with it (`automatic_config_rollback`), so a bad one never stops
//! collection; a crash's last log lines go to the server in the health
//! message (`collector_crash_log_snippet_kib`).

use std::{fmt::Write as _, path::PathBuf, time::Duration};

use crate::{endpoint::ServerUrl, identity::HostId};

/// The OpAMP path on the fleet server.
pub const OPAMP_PATH: &str = "/v1/opamp";

/// The non-identifying attribute a pending clone's collector carries: the
/// host it was copied from.
pub const CLONE_OF_ATTRIBUTE: &str = "linkmesh.clone_of";

/// How much of the collector's last output the supervisor sends with a crash.
pub const CRASH_LOG_SNIPPET_KIB: u32 = 4;

/// What the supervisor configuration is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupervisorInputs {
    /// The fleet server.
    pub server: ServerUrl,
    /// The host id, tying the collector to this host.
    pub host_id: HostId,
    /// Host name, reported as a non-identifying attribute.
    pub hostname: String,
    /// This machine is a copy of that host and its own identity is still
    /// pending: the collector runs, and its OpAMP connection (over the
    /// copied certificate) says so, so the server keeps it off the
    /// original's row ([`CLONE_OF_ATTRIBUTE`]).
    pub clone_of: Option<HostId>,
    /// CA certificate file (`server.tls.ca_file`).
    pub ca_file: PathBuf,
    /// Client certificate file (the host's enrolment certificate).
    pub cert_file: PathBuf,
    /// Client key file.
    pub key_file: PathBuf,
    /// The supervisor's storage directory; its `persistent_state.yaml` holds
    /// the collector's OpAMP instance id and must persist.
    pub storage_dir: PathBuf,
    /// The collector executable.
    pub collector: PathBuf,
    /// The operator's local collector configuration.
    pub collector_config: PathBuf,
    /// How long the supervisor waits for a new collector's first OpAMP
    /// message (it must be generous on a loaded host: the start fails otherwise).
    pub bootstrap_timeout: Duration,
    /// How long a new remote configuration may take to become healthy
    /// before it is reported failed (and rolled back).
    pub config_apply_timeout: Duration,
    /// How often the collector checks that the supervisor is alive.
    pub orphan_detection_interval: Duration,
    /// The supervisor's own log level.
    pub log_level: &'static str,
}

/// The rendered YAML.
pub fn render(i: &SupervisorInputs) -> String {
    let mut y = String::new();
    let q = quote;
    let _ = writeln!(
        y,
        "# Written by linkmesh-agent from this host's enrolment; edits are overwritten."
    );
    let _ = writeln!(y, "server:");
    let _ = writeln!(
        y,
        "  endpoint: {}",
        q(&format!("wss://{}{OPAMP_PATH}", i.server.authority()))
    );
    let _ = writeln!(y, "  tls:");
    let _ = writeln!(y, "    ca_file: {}", q(&i.ca_file.display().to_string()));
    let _ = writeln!(
        y,
        "    cert_file: {}",
        q(&i.cert_file.display().to_string())
    );
    let _ = writeln!(y, "    key_file: {}", q(&i.key_file.display().to_string()));
    let _ = writeln!(y, "    min_version: \"1.3\"");
    // The agent renews the certificate in place. The supervisor re-reads
    // the files at its next TLS handshake once this long has passed since
    // it last read them (a check per handshake, not a timer), so a
    // reconnect after a renewal presents the new certificate.
    let _ = writeln!(y, "    reload_interval: \"5s\"");
    let _ = writeln!(y, "capabilities:");
    for (k, v) in [
        ("accepts_remote_config", true),
        ("reports_remote_config", true),
        ("reports_effective_config", true),
        ("reports_own_metrics", false),
        ("reports_own_logs", false),
        ("reports_own_traces", false),
        ("reports_health", true),
        ("reports_heartbeat", true),
        ("accepts_restart_command", true),
    ] {
        let _ = writeln!(y, "  {k}: {v}");
    }
    let _ = writeln!(y, "storage:");
    let _ = writeln!(
        y,
        "  directory: {}",
        q(&i.storage_dir.display().to_string())
    );
    let _ = writeln!(y, "agent:");
    let _ = writeln!(y, "  executable: {}", q(&i.collector.display().to_string()));
    let _ = writeln!(
        y,
        "  orphan_detection_interval: {}",
        q(&go_duration(i.orphan_detection_interval))
    );
    // The collector's own Prometheus endpoint (:8888 by default) is off in
    // every run, the supervisor's bootstrap run included, which no config
    // file reaches: with it on, anything else on :8888 (or a bootstrap
    // collector still releasing it) keeps the collector from ever starting.
    let _ = writeln!(
        y,
        "  args: [\"--set=service.telemetry.metrics.level=none\"]"
    );
    let _ = writeln!(
        y,
        "  config_files: [{}]",
        q(&i.collector_config.display().to_string())
    );
    let _ = writeln!(
        y,
        "  bootstrap_timeout: {}",
        q(&go_duration(i.bootstrap_timeout))
    );
    let _ = writeln!(
        y,
        "  config_apply_timeout: {}",
        q(&go_duration(i.config_apply_timeout))
    );
    let _ = writeln!(y, "  validate_config: true");
    let _ = writeln!(y, "  automatic_config_rollback: true");
    let _ = writeln!(
        y,
        "  collector_crash_log_snippet_kib: {CRASH_LOG_SNIPPET_KIB}"
    );
    let _ = writeln!(y, "  passthrough_logs: true");
    let _ = writeln!(y, "  description:");
    let _ = writeln!(y, "    identifying_attributes:");
    let _ = writeln!(y, "      linkmesh.host.id: {}", q(i.host_id.as_str()));
    let _ = writeln!(y, "    non_identifying_attributes:");
    let _ = writeln!(y, "      host.name: {}", q(&i.hostname));
    if let Some(original) = &i.clone_of {
        let _ = writeln!(y, "      {CLONE_OF_ATTRIBUTE}: {}", q(original.as_str()));
    }
    let _ = writeln!(y, "telemetry:");
    let _ = writeln!(y, "  logs:");
    let _ = writeln!(y, "    level: {}", q(i.log_level));
    let _ = writeln!(y, "    output_paths: [\"stdout\"]");
    let _ = writeln!(y, "    error_output_paths: [\"stderr\"]");
    y
}

/// A YAML double-quoted scalar.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A duration as Go's `time.ParseDuration` reads it (`5s`, `1500ms`, `2m`).
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn inputs() -> SupervisorInputs {
        SupervisorInputs {
            server: "https://fleet.example:8443".parse().unwrap(),
            host_id: HostId::new("0b6c1a9e-4f1d-4d0e-9a51-2f3c6c1f0e77").unwrap(),
            hostname: "web-1".into(),
            clone_of: None,
            ca_file: "/var/lib/linkmesh-agent/identity/ca.pem".into(),
            cert_file: "/var/lib/linkmesh-agent/identity/cert.pem".into(),
            key_file: "/var/lib/linkmesh-agent/identity/key.pem".into(),
            storage_dir: "/var/lib/linkmesh-agent/supervisor".into(),
            collector: "/usr/bin/otelcol-contrib".into(),
            collector_config: "/etc/linkmesh/collector.yaml".into(),
            bootstrap_timeout: Duration::from_secs(30),
            config_apply_timeout: Duration::from_secs(30),
            orphan_detection_interval: Duration::from_secs(5),
            log_level: "info",
        }
    }

    #[test]
    fn golden() {
        let got = render(&inputs());
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/supervisor/testdata/supervisor.golden.yaml"
        );
        if std::env::var_os("LINKMESH_UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &got).unwrap();
        }
        let want = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            got, want,
            "golden file differs; LINKMESH_UPDATE_GOLDEN=1 cargo test --lib render rewrites it"
        );
    }

    #[test]
    fn ipv6_servers_and_awkward_strings() {
        let mut i = inputs();
        i.server = "https://[2001:db8::7]:9443".parse().unwrap();
        i.hostname = "we\"ird: host #1\n".into();
        i.collector = "/opt/my otel/col: \\bin".into();
        let y = render(&i);
        assert!(
            y.contains("endpoint: \"wss://[2001:db8::7]:9443/v1/opamp\""),
            "{y}"
        );
        assert!(y.contains("host.name: \"we\\\"ird: host #1\\n\""), "{y}");
        assert!(
            y.contains("executable: \"/opt/my otel/col: \\\\bin\""),
            "{y}"
        );
    }

    #[test]
    fn a_pending_clone_says_whose_copy_it_is() {
        let mut i = inputs();
        assert!(!render(&i).contains(CLONE_OF_ATTRIBUTE));
        i.clone_of = Some(HostId::new("1b6c1a9e-4f1d-4d0e-9a51-2f3c6c1f0e77").unwrap());
        let y = render(&i);
        assert!(
            y.contains(
                "    non_identifying_attributes:\n      host.name: \"web-1\"\n      linkmesh.clone_of: \"1b6c1a9e-4f1d-4d0e-9a51-2f3c6c1f0e77\"\n"
            ),
            "{y}"
        );
        assert!(
            y.contains("linkmesh.host.id: \"0b6c1a9e-4f1d-4d0e-9a51-2f3c6c1f0e77\""),
            "the copied host id stays identifying: {y}"
        );
    }

    #[test]
    fn durations_in_go_syntax() {
        assert_eq!(go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_secs(120)), "2m");
        assert_eq!(quote("\u{1}"), "\"\\x01\"");
    }
}
