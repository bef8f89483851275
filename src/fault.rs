//! Faults for the rollback tests, compiled in only when the build sets
//! `LINKMESH_FAULT_INJECTION=1` (build.rs): such a build's `run` honours
//! `LINKMESH_FAULT` = `exit-at-start`, `crash-after-5s` or `never-ready`,
//! so one test build stands for three bad releases. Every other build
//! ignores `LINKMESH_FAULT` entirely.

use std::time::Duration;

/// A bad release's behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `run` exits 1 once it has read its identity.
    ExitAtStart,
    /// `run` aborts (SIGABRT) this long after it started.
    CrashAfter(Duration),
    /// `run` works but never tells systemd READY.
    NeverReady,
}

/// Whether this build takes faults at all.
pub const INJECTABLE: bool = option_env!("LINKMESH_FAULT_INJECTION").is_some();

/// Parses a `LINKMESH_FAULT` value.
pub fn parse(value: &str) -> Option<Fault> {
    match value.trim() {
        "exit-at-start" => Some(Fault::ExitAtStart),
        "crash-after-5s" => Some(Fault::CrashAfter(Duration::from_secs(5))),
        "never-ready" => Some(Fault::NeverReady),
        _ => None,
    }
}

/// The fault this process is to show: always `None` in a build without
/// injection.
pub fn active() -> Option<Fault> {
    if !INJECTABLE {
        return None;
    }
    std::env::var("LINKMESH_FAULT")
        .ok()
        .as_deref()
        .and_then(parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_the_build_gate() {
        assert_eq!(parse("exit-at-start"), Some(Fault::ExitAtStart));
        assert_eq!(
            parse("crash-after-5s"),
            Some(Fault::CrashAfter(Duration::from_secs(5)))
        );
        assert_eq!(parse("never-ready"), Some(Fault::NeverReady));
        assert_eq!(parse("other"), None);
        // A build without injection has no fault, whatever the environment.
        if !INJECTABLE {
            assert_eq!(active(), None);
        }
    }
}
