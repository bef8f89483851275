//! The collector runtime's probation after `install-opamp.sh` put new
//! binaries in place: watched through the agent's published state (the
//! supervisor's state and restarts, the collector's pid and crashes, the
//! server's view over OpAMP), judged by [`super::probation::assess_runtime`].
//! The script keeps the previous binaries and restores them on a failure;
//! the outcome is recorded here and reported like the agent's own.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    probation::{self, Outcome, RuntimeCounters, RuntimeObservation, Verdict},
    watch::UpgradeError,
};
use crate::supervisor::State;

/// `STATE/runtime/outcome.json`: how the last runtime upgrade ended.
pub fn outcome_path(state_dir: &Path) -> PathBuf {
    state_dir.join("runtime").join("outcome.json")
}

/// The last runtime upgrade's outcome.
///
/// # Errors
/// When it cannot be read or parsed.
pub fn read_outcome(state_dir: &Path) -> Result<Option<Outcome>, UpgradeError> {
    Ok(super::read_json(&outcome_path(state_dir))?)
}

/// Records the outcome (atomically).
///
/// # Errors
/// When it cannot be written.
pub fn write_outcome(state_dir: &Path, o: &Outcome) -> Result<(), UpgradeError> {
    let path = outcome_path(state_dir);
    crate::fs::ensure_private_dir(path.parent().unwrap_or(state_dir), 0o700)?;
    Ok(super::write_json(&path, o)?)
}

/// One look, from the status file the agent publishes.
pub fn observe(state_dir: &Path, since_unix_ms: u64) -> RuntimeObservation {
    let Some(snap) = crate::published::read(state_dir).filter(|s| s.agent_running) else {
        return RuntimeObservation::default();
    };
    let Some(sup) = snap.state.runtime.supervision.as_ref() else {
        return RuntimeObservation {
            agent_running: true,
            state: "none".into(),
            ..Default::default()
        };
    };
    let reporter = &snap.state.reporter;
    let fresh = reporter.last_report_unix_ms.unwrap_or(0) >= since_unix_ms;
    RuntimeObservation {
        agent_running: true,
        state: crate::published::state_name(&sup.state).to_owned(),
        error: match &sup.state {
            State::NotRunnable { error } => error.clone(),
            State::Failed { reason } => reason.clone(),
            _ => sup.last_exit.clone().unwrap_or_default(),
        },
        restarts: sup.restarts,
        collector_pid: sup.collector_pid,
        crashes: sup.collector_crashes,
        problem: sup.collector_problem.as_ref().map(|p| p.reason.clone()),
        opamp: reporter
            .opamp
            .as_ref()
            .filter(|_| fresh)
            .map(|v| (v.connected, v.healthy, v.last_error.clone())),
    }
}

/// Watches the runtime for `window` (or until it fails), looking every
/// `poll`; the verdict.
pub fn probation(state_dir: &Path, window: Duration, poll: Duration) -> Verdict {
    let since = crate::clock::now_unix_ms();
    let started = Instant::now();
    // Counters are compared only between looks the agent published: the
    // first such look is the baseline (an agent restarting in the window
    // starts its counts again, and only a rise counts).
    let mut prev: Option<RuntimeCounters> = None;
    loop {
        let obs = observe(state_dir, since);
        let base = prev.unwrap_or(RuntimeCounters {
            restarts: obs.restarts,
            crashes: obs.crashes,
        });
        let (v, next) = probation::assess_runtime(&obs, base, started.elapsed(), window);
        if obs.agent_running {
            prev = Some(next);
        }
        match v {
            Verdict::Wait => std::thread::sleep(poll),
            v => return v,
        }
    }
}
