//! Health-gated rollback, the pure half: the probation record an upgrade
//! leaves for the watcher, what the watcher sees of the new agent at each
//! look, and the verdict. Teleport's lesson holds: a start that fails
//! (exits, crash-loops, never reaches READY, or is refused by the server)
//! is rolled back; a server that is merely unreachable is not a reason.

use std::time::Duration;

use crate::systemd::ActiveState;

/// How long a new agent is on probation unless `[upgrade] probation` says
/// otherwise.
pub const DEFAULT_PROBATION: Duration = Duration::from_secs(60);

/// How an agent was installed, for putting the previous one back the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The deb package (dpkg, apt).
    Deb,
    /// The rpm package (rpm, dnf, yum).
    Rpm,
    /// `install.sh --method binary`: `/usr/bin/linkmesh-agent` by rename.
    Binary,
}

impl std::str::FromStr for Method {
    type Err = String;

    /// The `--method` words: `deb`, `rpm`, `binary` (or `script`, the
    /// one-liner's name for it).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deb" => Ok(Self::Deb),
            "rpm" => Ok(Self::Rpm),
            "binary" | "script" => Ok(Self::Binary),
            other => Err(format!("must be deb, rpm or binary, got {other:?}")),
        }
    }
}

impl Method {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deb => "deb",
            Self::Rpm => "rpm",
            Self::Binary => "binary",
        }
    }
}

/// Where a probation stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Phase {
    /// Armed before the new version's files landed; nobody watches yet.
    Pending,
    /// The watcher runs: since when, and the agent unit's restart count
    /// when it began.
    Watching {
        /// Start of the window (Unix ms).
        since_unix_ms: u64,
        /// systemd's `NRestarts` of the agent unit then.
        restarts: u32,
    },
    /// The verdict was "roll back"; the rollback is under way (a watcher
    /// killed here finishes it at its next start: boot or a re-run of the
    /// installer).
    RollingBack {
        /// Why.
        reason: String,
    },
}

/// `STATE/upgrade/probation.json`: one upgrade under watch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probation {
    /// The version that ran before (known good: it was running).
    pub from: String,
    /// The version installed.
    pub to: String,
    /// How, and so how to put `from` back.
    pub method: Method,
    /// The previous version's package file or binary, kept on the host.
    pub rollback: Option<std::path::PathBuf>,
    /// The window, seconds.
    pub probation_secs: u64,
    /// Where it stands.
    pub phase: Phase,
}

/// What became of an upgrade: `STATE/upgrade/outcome.json`, and reported.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    /// `confirmed`, `rolled_back`, `rollback_failed` or `not_rolled_back`
    /// (failed, but nothing to roll back to).
    pub outcome: String,
    /// The version upgraded from (for a rollback: the one rolled back to).
    pub from: String,
    /// The version upgraded to (for a rollback: the one rolled back from).
    pub to: String,
    /// Why (empty when confirmed).
    pub reason: String,
    /// When it was decided (Unix ms).
    pub at_unix_ms: u64,
}

/// One look at the new agent.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Observation {
    /// systemd's `ActiveState` of the agent unit (`active` only after READY).
    pub active_state: ActiveState,
    /// `Result` (`success`, `exit-code`, `signal`, `timeout`, `start-limit-hit`...).
    pub result: String,
    /// `NRestarts`.
    pub restarts: u32,
    /// The unit's main process was started after the window opened: the
    /// new agent (or a restart of it) ran, so its failures are its own.
    pub started_in_window: bool,
    /// systemd shows no start time for the main process: between an
    /// automatic restart's scheduling (which already counted it in
    /// `NRestarts`) and the new main process, while `ExecStartPre` runs.
    pub start_unknown: bool,
    /// `ExecMainStatus`: the last exit status of the main process.
    pub exit_status: i32,
    /// `MainPID` (0 when none).
    pub main_pid: u32,
    /// The status file was written by that main process: it started, read
    /// its identity and supervises.
    pub published_by_main: bool,
    /// A report by that process was accepted after the window opened.
    pub report_accepted: bool,
    /// The server refused its reports (not: could not be reached), with why.
    pub report_refused: Option<String>,
}

/// What to do after a look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Look again.
    Wait,
    /// Probation passed; the note says on what grounds.
    Healthy(String),
    /// Roll back, for this reason.
    RollBack(String),
    /// Could not be judged (nothing to watch it with); not rolled back.
    Unjudged(String),
}

/// Judges one look, `elapsed` into a window of `window`; `prev` is the
/// restart count of the look before (systemd resets it on a manual start,
/// so only a rise counts). Returns the verdict and the count to pass next.
/// A failure is decided at once; health only at the end of the window (a
/// build that crashes after a few seconds must not pass on its first
/// report). Nothing from before the new agent started counts against it.
pub fn assess(obs: &Observation, prev: u32, elapsed: Duration, window: Duration) -> (Verdict, u32) {
    let secs = |d: Duration| d.as_secs();
    let rose = obs.restarts > prev;
    // A look that cannot tell whose restart it counts (no start time: the
    // restart is under way) keeps the count, so the next look that can tell
    // still sees the rise. Passing it on lost crash-loops under load, when
    // ExecStartPre is slow enough for a look to land in that gap.
    let next = if obs.start_unknown && !obs.started_in_window {
        prev
    } else {
        obs.restarts
    };
    if obs.started_in_window && obs.active_state == ActiveState::Failed {
        return (
            Verdict::RollBack(format!(
                "linkmesh-agent.service failed ({}, exit status {}) {} s into probation",
                obs.result,
                obs.exit_status,
                secs(elapsed)
            )),
            next,
        );
    }
    if obs.started_in_window && rose {
        return (
            Verdict::RollBack(format!(
                "the new agent crashed and was restarted by systemd in {} s of probation (last exit status {}, {})",
                secs(elapsed),
                obs.exit_status,
                obs.result
            )),
            next,
        );
    }
    if elapsed < window {
        return (Verdict::Wait, next);
    }
    let verdict = if !obs.started_in_window {
        Verdict::RollBack(format!(
            "the new agent was not started within {} s",
            secs(window)
        ))
    } else if obs.active_state != ActiveState::Active {
        Verdict::RollBack(format!(
            "the new agent did not reach READY within {} s (linkmesh-agent.service is {})",
            secs(window),
            obs.active_state
        ))
    } else if let Some(why) = obs.report_refused.as_ref().filter(|_| !obs.report_accepted) {
        Verdict::RollBack(format!(
            "the fleet server refused the new agent's reports: {why}"
        ))
    } else if !obs.published_by_main {
        Verdict::RollBack(format!(
            "the new agent runs (pid {}) but never published its state in {} s",
            obs.main_pid,
            secs(window)
        ))
    } else if obs.report_accepted {
        Verdict::Healthy(format!(
            "READY, no restart in {} s, a report accepted by the server",
            secs(window)
        ))
    } else {
        Verdict::Healthy(format!(
            "READY, no restart in {} s, supervising; the server was not reachable (not a reason to roll back)",
            secs(window)
        ))
    };
    (verdict, next)
}

/// One look at the collector runtime after `install-opamp.sh` put new
/// binaries in place (from the agent's published state).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RuntimeObservation {
    /// The agent runs and published this.
    pub agent_running: bool,
    /// opampsupervisor's state (`running`, `backoff`, `failed`...).
    pub state: String,
    /// Why it is not running, when it is not.
    pub error: String,
    /// Supervisor restarts.
    pub restarts: u32,
    /// The collector's pid, when it runs.
    pub collector_pid: Option<u32>,
    /// Collector crashes seen.
    pub crashes: u32,
    /// The collector's last problem, in the supervisor's words.
    pub problem: Option<String>,
    /// The server's view over OpAMP when it is fresh: (connected, healthy,
    /// last error).
    pub opamp: Option<(bool, bool, String)>,
}

/// The counters a runtime look is compared with: the last look's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuntimeCounters {
    /// Supervisor restarts.
    pub restarts: u32,
    /// Collector crashes.
    pub crashes: u32,
}

/// Judges the new collector runtime as [`assess`] judges a new agent: a
/// crash or a supervisor that fails decides at once; health (the collector
/// runs, and the server does not see it unhealthy over OpAMP) only at the
/// end of the window. An agent that is not running cannot judge: that is
/// [`Verdict::Unjudged`], never a rollback.
pub fn assess_runtime(
    obs: &RuntimeObservation,
    prev: RuntimeCounters,
    elapsed: Duration,
    window: Duration,
) -> (Verdict, RuntimeCounters) {
    let next = RuntimeCounters {
        restarts: obs.restarts,
        crashes: obs.crashes,
    };
    let secs = |d: Duration| d.as_secs();
    if obs.agent_running {
        if obs.crashes > prev.crashes {
            return (
                Verdict::RollBack(format!(
                    "the new collector crashed {} s into probation{}",
                    secs(elapsed),
                    obs.problem
                        .as_deref()
                        .map(|p| format!(": {p}"))
                        .unwrap_or_default()
                )),
                next,
            );
        }
        if matches!(obs.state.as_str(), "failed" | "not_runnable" | "crash_loop") {
            return (
                Verdict::RollBack(format!(
                    "opampsupervisor is {}{}",
                    obs.state,
                    if obs.error.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", obs.error)
                    }
                )),
                next,
            );
        }
        if obs.restarts > prev.restarts {
            return (
                Verdict::RollBack(format!(
                    "the new opampsupervisor was restarted {} s into probation",
                    secs(elapsed)
                )),
                next,
            );
        }
    }
    if elapsed < window {
        return (Verdict::Wait, next);
    }
    let verdict = if !obs.agent_running {
        Verdict::Unjudged(
            "linkmesh-agent is not running, so the new runtime could not be watched".into(),
        )
    } else if obs.state != "running" || obs.collector_pid.is_none() {
        Verdict::RollBack(format!(
            "the new collector was not running {} s after the upgrade (opampsupervisor {})",
            secs(window),
            obs.state
        ))
    } else if let Some((true, false, why)) = &obs.opamp {
        Verdict::RollBack(format!(
            "the new collector reports itself unhealthy over OpAMP: {why}"
        ))
    } else {
        Verdict::Healthy(format!(
            "the collector ran {} s without a crash{}",
            secs(window),
            if matches!(obs.opamp, Some((true, true, _))) {
                ", healthy over OpAMP"
            } else {
                " (the server's view over OpAMP was not available)"
            }
        ))
    };
    (verdict, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    fn healthy() -> Observation {
        Observation {
            active_state: ActiveState::Active,
            result: "success".into(),
            restarts: 2,
            started_in_window: true,
            start_unknown: false,
            exit_status: 0,
            main_pid: 42,
            published_by_main: true,
            report_accepted: true,
            report_refused: None,
        }
    }

    fn verdict(obs: &Observation, prev: u32, at: u64) -> Verdict {
        assess(obs, prev, Duration::from_secs(at), W).0
    }

    #[test]
    fn health_is_decided_only_at_the_end_of_the_window() {
        assert_eq!(verdict(&healthy(), 2, 5), Verdict::Wait);
        let v = verdict(&healthy(), 2, 60);
        assert!(
            matches!(&v, Verdict::Healthy(n) if n.contains("report accepted")),
            "{v:?}"
        );
    }

    #[test]
    fn failures_are_decided_at_once() {
        let exit1 = Observation {
            active_state: ActiveState::Activating,
            result: "exit-code".into(),
            restarts: 3,
            exit_status: 1,
            main_pid: 0,
            ..healthy()
        };
        let v = verdict(&exit1, 2, 3);
        assert!(
            matches!(&v, Verdict::RollBack(r) if r.contains("restarted by systemd") && r.contains("exit status 1")),
            "{v:?}"
        );
        let failed = Observation {
            active_state: ActiveState::Failed,
            result: "start-limit-hit".into(),
            ..exit1
        };
        let v = verdict(&failed, 3, 9);
        assert!(
            matches!(&v, Verdict::RollBack(r) if r.contains("start-limit-hit")),
            "{v:?}"
        );
    }

    #[test]
    fn a_restart_seen_while_its_start_time_is_unknown_still_counts() {
        // The crash-loop CI saw confirmed: the look after the crash lands
        // while the restart runs ExecStartPre (NRestarts already 1, no start
        // time); the next look sees the new process started in the window.
        let gap = Observation {
            restarts: 1,
            started_in_window: false,
            start_unknown: true,
            active_state: ActiveState::Activating,
            ..healthy()
        };
        let (v, next) = assess(&gap, 0, Duration::from_secs(6), W);
        assert_eq!((v, next), (Verdict::Wait, 0));
        let restarted = Observation {
            restarts: 1,
            ..healthy()
        };
        assert!(matches!(verdict(&restarted, next, 7), Verdict::RollBack(_)));
        // Restarts of an agent that started before the window still do not.
        let old = Observation {
            restarts: 3,
            started_in_window: false,
            ..healthy()
        };
        assert_eq!(assess(&old, 0, Duration::from_secs(1), W).1, 3);
    }

    #[test]
    fn a_manual_restart_resetting_the_count_is_not_a_crash() {
        let reset = Observation {
            restarts: 0,
            ..healthy()
        };
        let (v, next) = assess(&reset, 5, Duration::from_secs(1), W);
        assert_eq!((v, next), (Verdict::Wait, 0));
        // A rise from there is.
        let crash = Observation {
            restarts: 1,
            ..healthy()
        };
        assert!(matches!(verdict(&crash, next, 7), Verdict::RollBack(_)));
    }

    #[test]
    fn what_happened_before_the_new_agent_started_does_not_count() {
        let old_failure = Observation {
            active_state: ActiveState::Failed,
            restarts: 9,
            started_in_window: false,
            ..healthy()
        };
        assert_eq!(verdict(&old_failure, 2, 3), Verdict::Wait);
        let v = verdict(&old_failure, 9, 60);
        assert!(
            matches!(&v, Verdict::RollBack(r) if r.contains("was not started")),
            "{v:?}"
        );
    }

    #[test]
    fn never_ready_is_rolled_back_at_the_deadline() {
        let stuck = Observation {
            active_state: ActiveState::Activating,
            published_by_main: false,
            report_accepted: false,
            ..healthy()
        };
        assert_eq!(verdict(&stuck, 2, 59), Verdict::Wait);
        let v = verdict(&stuck, 2, 60);
        assert!(
            matches!(&v, Verdict::RollBack(r) if r.contains("did not reach READY within 60 s")),
            "{v:?}"
        );
    }

    #[test]
    fn an_unreachable_server_is_not_a_reason_but_a_refusing_one_is() {
        let away = Observation {
            report_accepted: false,
            report_refused: None,
            ..healthy()
        };
        let v = verdict(&away, 2, 60);
        assert!(
            matches!(&v, Verdict::Healthy(n) if n.contains("not reachable")),
            "{v:?}"
        );
        let refused = Observation {
            report_accepted: false,
            report_refused: Some("permission denied".into()),
            ..healthy()
        };
        let v = verdict(&refused, 2, 60);
        assert!(
            matches!(&v, Verdict::RollBack(r) if r.contains("permission denied")),
            "{v:?}"
        );
        let silent = Observation {
            published_by_main: false,
            report_accepted: false,
            ..healthy()
        };
        assert!(matches!(verdict(&silent, 2, 60), Verdict::RollBack(_)));
    }

    fn collector_up() -> RuntimeObservation {
        RuntimeObservation {
            agent_running: true,
            state: "running".into(),
            restarts: 1,
            collector_pid: Some(7),
            crashes: 0,
            ..Default::default()
        }
    }

    fn counters(restarts: u32, crashes: u32) -> RuntimeCounters {
        RuntimeCounters { restarts, crashes }
    }

    #[test]
    fn a_new_runtime_that_crashes_is_rolled_back_at_once() {
        let crashed = RuntimeObservation {
            crashes: 1,
            collector_pid: None,
            problem: Some("exit status 1".into()),
            ..collector_up()
        };
        let (v, _) = assess_runtime(&crashed, counters(1, 0), Duration::from_secs(6), W);
        assert!(
            matches!(&v, Verdict::RollBack(r) if r.contains("crashed") && r.contains("exit status 1")),
            "{v:?}"
        );
        let (v, _) = assess_runtime(&collector_up(), counters(1, 0), Duration::from_secs(6), W);
        assert_eq!(v, Verdict::Wait);
    }

    #[test]
    fn a_new_runtime_is_healthy_only_at_the_end_and_not_if_opamp_says_otherwise() {
        let (v, _) = assess_runtime(&collector_up(), counters(1, 0), W, W);
        assert!(
            matches!(&v, Verdict::Healthy(n) if n.contains("not available")),
            "{v:?}"
        );
        let healthy = RuntimeObservation {
            opamp: Some((true, true, String::new())),
            ..collector_up()
        };
        assert!(
            matches!(assess_runtime(&healthy, counters(1, 0), W, W).0, Verdict::Healthy(n) if n.contains("healthy over OpAMP"))
        );
        let sick = RuntimeObservation {
            opamp: Some((true, false, "exporter failed".into())),
            ..collector_up()
        };
        assert!(
            matches!(assess_runtime(&sick, counters(1, 0), W, W).0, Verdict::RollBack(r) if r.contains("exporter failed"))
        );
        let down = RuntimeObservation {
            collector_pid: None,
            ..collector_up()
        };
        assert!(matches!(
            assess_runtime(&down, counters(1, 0), W, W).0,
            Verdict::RollBack(_)
        ));
    }

    #[test]
    fn without_the_agent_the_runtime_is_not_judged() {
        let blind = RuntimeObservation {
            agent_running: false,
            crashes: 9,
            ..Default::default()
        };
        assert_eq!(
            assess_runtime(&blind, counters(0, 0), Duration::from_secs(3), W).0,
            Verdict::Wait
        );
        assert!(matches!(
            assess_runtime(&blind, counters(0, 0), W, W).0,
            Verdict::Unjudged(_)
        ));
    }

    #[test]
    fn methods_and_records_round_trip() {
        use crate::app::InstallMethod;
        assert_eq!(InstallMethod::parse("deb\n").rollback(), Method::Deb);
        assert_eq!(InstallMethod::parse("script").rollback(), Method::Binary);
        assert_eq!(InstallMethod::parse("").rollback(), Method::Binary);
        assert_eq!(InstallMethod::parse("script").as_str(), "script");
        assert_eq!(InstallMethod::parse("dunno").as_str(), "binary");
        let p = Probation {
            from: "0.1.0".into(),
            to: "0.2.0".into(),
            method: Method::Rpm,
            rollback: Some("/var/lib/linkmesh-agent/upgrade/packages/x.rpm".into()),
            probation_secs: 60,
            phase: Phase::Watching {
                since_unix_ms: 5,
                restarts: 1,
            },
        };
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.contains(r#""phase":{"kind":"watching""#), "{text}");
        assert_eq!(serde_json::from_str::<Probation>(&text).unwrap(), p);
    }
}
