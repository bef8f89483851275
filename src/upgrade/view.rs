//! What the `upgrade` and `runtime` commands print, rendered from the typed
//! records ([`Probation`], [`Outcome`], [`Kept`], [`Verdict`]); the CLI only
//! dispatches and prints.

use std::{path::Path, time::Duration};

use super::{
    probation::{Outcome, Probation, Verdict},
    watch::{self, Kept, UpgradeError},
};
use crate::version::{AGENT_VERSION, Version};

/// `upgrade keep`'s line (to stderr: the one-liner shows it).
pub fn kept(kept: &Kept, to: &Version, probation: Duration) -> String {
    let secs = probation.as_secs();
    match kept {
        Kept::Armed(Some(copy)) => format!(
            "linkmesh-agent: {AGENT_VERSION} -> {to} on probation for {secs} s; rollback copy {}",
            copy.display()
        ),
        Kept::Armed(None) => format!(
            "linkmesh-agent: warning: {AGENT_VERSION} -> {to} on probation for {secs} s, but no copy of {AGENT_VERSION} could be kept: a failing upgrade is reported, not rolled back"
        ),
        Kept::NotArmed(why) => format!("linkmesh-agent: no probation: {why}"),
    }
}

/// `upgrade watch`'s line: what the watch decided.
pub fn watched(outcome: Option<&Outcome>) -> String {
    match outcome {
        None => "no upgrade on probation".into(),
        Some(o) => format!(
            "{}: {} -> {}{}",
            o.outcome,
            o.from,
            o.to,
            if o.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", o.reason)
            }
        ),
    }
}

/// `upgrade status`: the open probation and the last outcome.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UpgradeStatus {
    /// The upgrade on probation, if any.
    pub probation: Option<Probation>,
    /// How the last one ended.
    pub last: Option<Outcome>,
}

impl UpgradeStatus {
    /// Reads both records from `state_dir`.
    ///
    /// # Errors
    /// [`UpgradeError`] for a record that cannot be read.
    pub fn read(state_dir: &Path) -> Result<Self, UpgradeError> {
        Ok(Self {
            probation: watch::read_probation(state_dir)?,
            last: watch::read_outcome(state_dir)?,
        })
    }

    /// The human lines.
    pub fn human(&self) -> String {
        let mut out = match &self.probation {
            Some(p) => format!(
                "on probation: {} -> {} ({})\n",
                p.from,
                p.to,
                p.method.as_str()
            ),
            None => "no upgrade on probation\n".into(),
        };
        if let Some(o) = &self.last {
            out.push_str(&format!(
                "last upgrade: {} {} -> {} at {}{}\n",
                o.outcome,
                o.from,
                o.to,
                crate::clock::rfc3339_unix_ms(o.at_unix_ms),
                if o.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", o.reason)
                }
            ));
        }
        out
    }
}

/// A runtime probation's verdict as `runtime probation` records and prints
/// it: `Ok((outcome, line))` when the new runtime stays (`confirmed`, or
/// `unverified` when nothing could judge it), `Err(reason)` when it must be
/// rolled back.
pub fn runtime_verdict(verdict: Verdict) -> Result<(&'static str, String), String> {
    match verdict {
        Verdict::Healthy(n) => Ok(("confirmed", n)),
        Verdict::Unjudged(n) => Ok(("unverified", n)),
        Verdict::RollBack(r) => Err(r),
        Verdict::Wait => Ok(("unverified", String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::probation::{Method, Phase};

    fn outcome(reason: &str) -> Outcome {
        Outcome {
            outcome: "rolled_back".into(),
            from: "0.1.0".into(),
            to: "0.0.9".into(),
            reason: reason.into(),
            at_unix_ms: 1_795_000_000_000,
        }
    }

    #[test]
    fn lines_from_the_records() {
        assert_eq!(watched(None), "no upgrade on probation");
        assert_eq!(
            watched(Some(&outcome("crashed"))),
            "rolled_back: 0.1.0 -> 0.0.9 (crashed)"
        );
        let status = UpgradeStatus {
            probation: Some(Probation {
                from: "0.0.9".into(),
                to: "0.1.0".into(),
                method: Method::Deb,
                rollback: None,
                probation_secs: 120,
                phase: Phase::Pending,
            }),
            last: Some(outcome("")),
        };
        assert_eq!(
            status.human(),
            "on probation: 0.0.9 -> 0.1.0 (deb)\nlast upgrade: rolled_back 0.1.0 -> 0.0.9 at 2026-11-18T11:06:40Z\n"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["probation"]["method"], "deb");
        assert_eq!(json["last"]["outcome"], "rolled_back");
        let to: Version = "0.2.0".parse().unwrap();
        assert!(
            kept(
                &Kept::NotArmed("no systemd".into()),
                &to,
                Duration::from_secs(5)
            )
            .ends_with("no probation: no systemd")
        );
        assert!(
            kept(&Kept::Armed(None), &to, Duration::from_secs(120))
                .contains("-> 0.2.0 on probation for 120 s, but no copy")
        );
    }

    #[test]
    fn a_runtime_verdict_keeps_or_rolls_back() {
        assert_eq!(
            runtime_verdict(Verdict::Healthy("stayed up".into())),
            Ok(("confirmed", "stayed up".into()))
        );
        assert_eq!(
            runtime_verdict(Verdict::RollBack("crashed".into())),
            Err("crashed".into())
        );
    }
}
