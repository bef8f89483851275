//! The fleet-drift report: every host's agent version against the server's
//! (the shared skew rule), its runtime version against the pin, when it was
//! last seen, and for a host outside the window the exact command that
//! upgrades it for the way it was installed. Built from what agents report;
//! one row per host id, so a reinstalled host (same identity) stays one row.

use crate::text::safe;
use std::collections::BTreeMap;

use linkmesh_agent::version::{self, SkewVerdict, Version};

use crate::{
    ca::Ca,
    service::rfc3339,
    state::{HostRecord, ServeRecord, State},
};

/// A host is stale when not seen for this many report intervals.
pub const STALE_INTERVALS: i64 = 3;

/// One row of the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DriftRow {
    /// Host id.
    pub host_id: String,
    /// Host name.
    pub hostname: String,
    /// Agent version.
    pub agent_version: String,
    /// How the agent was installed.
    pub install_method: String,
    /// Skew verdict against the server.
    pub verdict: String,
    /// otelcol, alloy or none.
    pub runtime_kind: String,
    /// Runtime version reported.
    pub runtime_version: String,
    /// The pinned version for that runtime.
    pub runtime_pin: String,
    /// Whether the runtime is at the pin (`None`: no runtime or no pin).
    pub runtime_at_pin: Option<bool>,
    /// Last contact, RFC 3339.
    pub last_seen: String,
    /// Not seen for [`STALE_INTERVALS`] report intervals.
    pub stale: bool,
    /// What to run to bring it into the window.
    pub action: Option<String>,
    /// How the host's last agent upgrade ended: a rollback, its reason and
    /// time, shows here.
    pub last_upgrade: Option<UpgradeView>,
    /// How the host's last collector runtime upgrade ended.
    pub last_runtime_upgrade: Option<UpgradeView>,
    /// Two machines present this host's identity at once: since when
    /// (RFC 3339). The row is both of them: its facts alternate.
    pub duplicate_identity_since: Option<String>,
    /// The host this one was cloned from (its lineage).
    pub cloned_from: Option<String>,
}

/// The last agent upgrade of a host, for the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UpgradeView {
    /// confirmed, rolled_back, rollback_failed, not_rolled_back.
    pub outcome: String,
    /// For a rollback: the version that failed.
    pub from: String,
    /// For a rollback: the version put back.
    pub to: String,
    /// Why.
    pub reason: String,
    /// When, RFC 3339.
    pub at: String,
}

impl UpgradeView {
    fn of(u: &crate::state::UpgradeRecord) -> Self {
        Self {
            outcome: u.outcome.clone(),
            from: u.from.clone(),
            to: u.to.clone(),
            reason: u.reason.clone(),
            at: rfc3339(u.at_unix_ms.div_euclid(1000)),
        }
    }
}

/// Builds the rows. Pure.
pub fn rows(
    hosts: &[HostRecord],
    server_version: &Version,
    minor_versions_behind: u32,
    pins: &BTreeMap<String, String>,
    report_interval_secs: u64,
    now: i64,
    install_one_liner: &str,
) -> Vec<DriftRow> {
    hosts
        .iter()
        .map(|h| {
            let report = h.report.clone().unwrap_or_default();
            let agent_version = if report.agent_version.is_empty() { h.agent_version.clone() } else { report.agent_version.clone() };
            let verdict = agent_version
                .parse::<Version>()
                .map_or("unknown".to_owned(), |a| version::skew(&a, server_version, minor_versions_behind).as_str().to_owned());
            let install_method = if report.install_method.is_empty() { "unknown".to_owned() } else { report.install_method.clone() };
            let kind = if report.runtime_kind.is_empty() { "unknown".to_owned() } else { report.runtime_kind.clone() };
            let pin = pins.get(&kind).cloned().unwrap_or_default();
            let runtime_version = report.runtime_version.clone();
            let runtime_at_pin = (!pin.is_empty() && !runtime_version.is_empty()).then(|| {
                runtime_version.trim_start_matches('v') == pin.trim_start_matches('v')
            });
            let stale = now - h.last_seen > STALE_INTERVALS * i64::try_from(report_interval_secs.max(1)).unwrap_or(30);
            let action = match verdict.as_str() {
                v if v == SkewVerdict::Behind.as_str() || v == SkewVerdict::Incompatible.as_str() => {
                    Some(upgrade_command(&install_method, install_one_liner))
                }
                v if v == SkewVerdict::Ahead.as_str() => Some(format!(
                    "upgrade the server to {agent_version} or later first (server, then runtimes, then agents)"
                )),
                _ => None,
            };
            DriftRow {
                host_id: h.host_id.clone(),
                hostname: if report.hostname.is_empty() { h.hostname.clone() } else { report.hostname.clone() },
                agent_version,
                install_method,
                verdict,
                runtime_kind: kind,
                runtime_version,
                runtime_pin: pin,
                runtime_at_pin,
                last_seen: rfc3339(h.last_seen),
                stale,
                action,
                last_upgrade: report.last_upgrade.as_ref().map(UpgradeView::of),
                last_runtime_upgrade: report.last_runtime_upgrade.as_ref().map(UpgradeView::of),
                duplicate_identity_since: h.duplicate.as_ref().map(|d| rfc3339(d.since)),
                cloned_from: h.cloned_from.clone(),
            }
        })
        .collect()
}

/// The command that upgrades the agent for an install method.
pub fn upgrade_command(install_method: &str, install_one_liner: &str) -> String {
    match install_method {
        "deb" => "apt upgrade linkmesh-agent".to_owned(),
        "rpm" => "yum update linkmesh-agent".to_owned(),
        _ => install_one_liner.to_owned(),
    }
}

/// Prints the report for the state directory of a server.
///
/// # Errors
/// When the state cannot be read.
pub fn print(state: &State, json: bool) -> anyhow::Result<()> {
    let serve: ServeRecord = state.serve()?.ok_or_else(|| {
        anyhow::anyhow!(
            "no server record in {}: start `linkmesh-fleet serve` on it first",
            state.dir().display()
        )
    })?;
    let server_version: Version = serve.version.parse()?;
    let pin = Ca::certificate(&state.ca_dir())?.1;
    let one_liner = format!(
        "curl -fsSL {0}/install.sh | sudo sh -s -- --server {0} --ca-pin {pin}",
        serve.url
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let rows = rows(
        &state.hosts()?,
        &server_version,
        serve.minor_versions_behind.max(1),
        &serve.runtime_pins,
        serve.report_interval_secs,
        now,
        &one_liner,
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "server_version": server_version.to_string(),
                "minor_versions_behind": serve.minor_versions_behind.max(1),
                "runtime_pins": serve.runtime_pins,
                "hosts": rows,
            })
        );
        return Ok(());
    }
    println!(
        "server {server_version}; agents in window: {}.{}.x back to {}.{}.x",
        server_version.major,
        server_version.minor,
        server_version.major,
        server_version.minor.saturating_sub(1)
    );
    println!(
        "{:<36}  {:<16}  {:<8}  {:<12}  {:<8}  {:<22}  {:<20}",
        "HOST ID", "HOSTNAME", "AGENT", "VERDICT", "INSTALL", "RUNTIME (PIN)", "LAST SEEN"
    );
    for r in &rows {
        let runtime = match r.runtime_at_pin {
            Some(true) => format!("{} {} (=)", r.runtime_kind, r.runtime_version),
            Some(false) => format!(
                "{} {} (pin {})",
                r.runtime_kind, r.runtime_version, r.runtime_pin
            ),
            None => r.runtime_kind.clone(),
        };
        // Everything an agent sent is escaped: no ESC or CR/LF reaches the terminal.
        println!(
            "{:<36}  {:<16}  {:<8}  {:<12}  {:<8}  {:<22}  {}{}",
            r.host_id,
            safe(&r.hostname),
            safe(&r.agent_version),
            r.verdict,
            safe(&r.install_method),
            safe(&runtime),
            r.last_seen,
            if r.stale { " STALE" } else { "" }
        );
        if let Some(a) = &r.action {
            println!("    -> {}", safe(a));
        }
        if let Some(from) = &r.cloned_from {
            println!("    clone of {from}");
        }
        if let Some(since) = &r.duplicate_identity_since {
            println!(
                "    DUPLICATE IDENTITY since {since}: two machines report as this host; on the copy run linkmesh-agent image-prep and enrol it anew"
            );
        }
        for (what, u) in [
            ("agent", &r.last_upgrade),
            ("runtime", &r.last_runtime_upgrade),
        ] {
            if let Some(u) = u.as_ref().filter(|u| u.outcome != "confirmed") {
                println!(
                    "    last {what} upgrade {} {} -> {} at {}: {}",
                    safe(&u.outcome),
                    safe(&u.from),
                    safe(&u.to),
                    u.at,
                    safe(&u.reason)
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ReportRecord;

    fn host(
        id: &str,
        agent: &str,
        method: &str,
        kind: &str,
        runtime: &str,
        last_seen: i64,
    ) -> HostRecord {
        HostRecord {
            host_id: id.into(),
            hostname: format!("{id}.example"),
            agent_version: agent.into(),
            last_seen,
            report: Some(ReportRecord {
                agent_version: agent.into(),
                install_method: method.into(),
                runtime_kind: kind.into(),
                runtime_version: runtime.into(),
                ..Default::default()
            }),
            ..HostRecord::default()
        }
    }

    #[test]
    fn a_rollback_shows_with_its_reason_and_time() {
        let mut h = host("a", "1.4.0", "deb", "otelcol", "0.159.0", 1000);
        if let Some(r) = h.report.as_mut() {
            r.last_upgrade = Some(crate::state::UpgradeRecord {
                outcome: "rolled_back".into(),
                from: "1.5.0".into(),
                to: "1.4.0".into(),
                reason: "the new agent did not reach READY within 60 s".into(),
                at_unix_ms: 1_796_136_812_164,
            });
        }
        let rows = rows(
            &[h],
            &"1.5.0".parse().unwrap(),
            1,
            &BTreeMap::new(),
            30,
            1000,
            "",
        );
        let u = rows[0].last_upgrade.as_ref().unwrap();
        assert_eq!(
            (u.outcome.as_str(), u.from.as_str(), u.to.as_str()),
            ("rolled_back", "1.5.0", "1.4.0")
        );
        assert_eq!(u.at, "2026-12-01T14:53:32Z");
        assert!(rows[0].last_runtime_upgrade.is_none());
    }

    #[test]
    fn verdicts_pins_staleness_and_commands() {
        let pins: BTreeMap<String, String> = [
            ("otelcol".to_owned(), "0.159.0".to_owned()),
            ("alloy".to_owned(), "v1.18.1".to_owned()),
        ]
        .into();
        let hosts = [
            host("a", "1.4.0", "deb", "otelcol", "0.159.0", 1000),
            host("b", "1.2.0", "deb", "otelcol", "0.158.0", 1000),
            host("c", "1.2.0", "rpm", "alloy", "v1.18.1", 1000),
            host("d", "1.1.9", "script", "none", "", 1000),
            host("e", "1.5.0", "binary", "otelcol", "0.159.0", 900),
        ];
        let rows = rows(
            &hosts,
            &"1.4.2".parse().unwrap(),
            1,
            &pins,
            30,
            1000,
            "curl … | sh",
        );
        let v: Vec<(&str, &str, Option<&str>)> = rows
            .iter()
            .map(|r| (r.host_id.as_str(), r.verdict.as_str(), r.action.as_deref()))
            .collect();
        assert_eq!(
            v,
            [
                ("a", "in_window", None),
                ("b", "behind", Some("apt upgrade linkmesh-agent")),
                ("c", "behind", Some("yum update linkmesh-agent")),
                ("d", "behind", Some("curl … | sh")),
                (
                    "e",
                    "ahead",
                    Some(
                        "upgrade the server to 1.5.0 or later first (server, then runtimes, then agents)"
                    )
                ),
            ]
        );
        assert_eq!(rows[0].runtime_at_pin, Some(true));
        assert_eq!(rows[1].runtime_at_pin, Some(false));
        assert_eq!(rows[2].runtime_at_pin, Some(true));
        assert_eq!(rows[3].runtime_at_pin, None);
        assert!(!rows[0].stale);
        assert!(rows[4].stale, "not seen for 100 s at a 30 s interval");
    }
}
