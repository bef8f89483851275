//! When the reporter acts next, as a pure function of the current time, the
//! certificate's validity and the last exchange's result. The reporter's
//! loop only performs what this says: renew, report, or wait.

use std::time::Duration;

use crate::identity::{
    Validity,
    rotation::{self, Renewal},
};

use super::{Failure, retry_delay};

/// How the last exchange ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Exchange {
    /// The report was answered; the server asks for this interval.
    Reported {
        /// The server's report interval.
        interval: Duration,
    },
    /// The RPC failed, classified.
    Failed(Failure),
    /// No answer within the exchange bound.
    NoAnswer,
    /// A renewal failed (the server is away, or refused it).
    RenewalFailed,
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Renew the certificate first.
    Renew,
    /// Send a report.
    Report,
}

/// How long a server refusal waits: it will not change by itself.
pub const REJECTED_WAIT: Duration = Duration::from_secs(120);
/// The least wait before a renewal that is due (a renewal that keeps
/// failing is not retried in a hot loop).
pub const MIN_WAIT: Duration = Duration::from_secs(1);

/// The reporter's memory between exchanges.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Failed attempts in a row.
    pub failures: u32,
    /// The server said the certificate expired: renew before anything else.
    pub force_renew: bool,
    /// The wait the last result called for.
    wait: Duration,
    /// The jitter sample that spreads this host's renewal time.
    renew_jitter: f64,
}

impl Schedule {
    /// A fresh schedule: report at once.
    pub fn new(renew_jitter: f64) -> Self {
        Self {
            failures: 0,
            force_renew: false,
            wait: Duration::ZERO,
            renew_jitter,
        }
    }

    /// What to do at `now`.
    pub fn next(&self, now: time::OffsetDateTime, validity: &Validity) -> Next {
        if self.force_renew
            || matches!(
                rotation::renewal(validity, now, self.renew_jitter),
                Renewal::Due | Renewal::Expired
            )
        {
            Next::Renew
        } else {
            Next::Report
        }
    }

    /// A renewal succeeded.
    pub fn renewed(&mut self) {
        self.force_renew = false;
    }

    /// Takes in how an exchange ended; `jitter` is a uniform sample in
    /// `[-1, 1]` for the retry delay or the report interval's spread.
    pub fn record(&mut self, result: Exchange, jitter: f64) {
        match result {
            Exchange::Reported { interval } => {
                self.failures = 0;
                self.wait = interval.mul_f64(1.0 + 0.1 * jitter.clamp(-1.0, 1.0));
            }
            Exchange::Failed(Failure::Renew) => {
                self.failures += 1;
                self.force_renew = true;
                self.wait = Duration::ZERO;
            }
            // The reporter stops on a revocation; should it go on, it waits
            // as for any refusal.
            Exchange::Failed(Failure::Rejected | Failure::Revoked) => {
                self.failures += 1;
                self.wait = REJECTED_WAIT;
            }
            Exchange::Failed(Failure::Retry) | Exchange::NoAnswer | Exchange::RenewalFailed => {
                self.failures += 1;
                self.wait = retry_delay(self.failures, jitter);
            }
        }
    }

    /// How long to wait from `now`: what the last result called for, but no
    /// later than the renewal time (and at least [`MIN_WAIT`] when that has
    /// come, unless the server asked for a renewal at once).
    pub fn wait(&self, now: time::OffsetDateTime, validity: &Validity) -> Duration {
        if self.force_renew {
            return Duration::ZERO;
        }
        let until_renewal = match rotation::renewal(validity, now, self.renew_jitter) {
            Renewal::Wait(at) => Duration::try_from(at - now).unwrap_or(Duration::ZERO),
            Renewal::Due | Renewal::Expired => Duration::ZERO,
        };
        self.wait.min(until_renewal.max(MIN_WAIT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// A certificate valid for 24 h from midnight; renewal comes at some
    /// fraction of it (rotation's policy), never before it is issued.
    fn validity() -> Validity {
        Validity {
            not_before: datetime!(2026-12-01 00:00 UTC),
            not_after: datetime!(2026-12-02 00:00 UTC),
        }
    }

    #[test]
    fn reports_at_once_then_at_the_servers_interval() {
        let v = validity();
        let t0 = datetime!(2026-12-01 01:00 UTC);
        let mut s = Schedule::new(0.0);
        assert_eq!(s.next(t0, &v), Next::Report);
        assert_eq!(s.wait(t0, &v), Duration::ZERO);
        s.record(
            Exchange::Reported {
                interval: Duration::from_secs(30),
            },
            0.0,
        );
        assert_eq!(s.wait(t0, &v), Duration::from_secs(30));
        // Jitter spreads it by ±10 %.
        s.record(
            Exchange::Reported {
                interval: Duration::from_secs(30),
            },
            1.0,
        );
        assert_eq!(s.wait(t0, &v), Duration::from_secs(33));
    }

    #[test]
    fn failures_back_off_and_a_success_resets_them() {
        let v = validity();
        let t0 = datetime!(2026-12-01 01:00 UTC);
        let mut s = Schedule::new(0.0);
        let mut waits = Vec::new();
        for _ in 0..4 {
            s.record(Exchange::Failed(Failure::Retry), 0.0);
            waits.push(s.wait(t0, &v).as_millis());
        }
        assert_eq!(waits, [1000, 1600, 2560, 4096]);
        assert_eq!(s.failures, 4);
        s.record(Exchange::NoAnswer, 0.0);
        assert_eq!(s.failures, 5);
        s.record(
            Exchange::Reported {
                interval: Duration::from_secs(30),
            },
            0.0,
        );
        assert_eq!(s.failures, 0);
        s.record(Exchange::Failed(Failure::Rejected), 0.0);
        assert_eq!(s.wait(t0, &v), REJECTED_WAIT);
    }

    #[test]
    fn an_expired_answer_renews_at_once_then_reports() {
        let v = validity();
        let t0 = datetime!(2026-12-01 01:00 UTC);
        let mut s = Schedule::new(0.0);
        s.record(Exchange::Failed(Failure::Renew), 0.0);
        assert_eq!(s.next(t0, &v), Next::Renew);
        assert_eq!(s.wait(t0, &v), Duration::ZERO);
        s.renewed();
        assert_eq!(s.next(t0, &v), Next::Report);
    }

    #[test]
    fn the_wait_never_runs_past_the_renewal_time() {
        let v = validity();
        let s = {
            let mut s = Schedule::new(0.0);
            s.record(Exchange::Failed(Failure::Rejected), 0.0);
            s
        };
        let renew_at = rotation::renew_at(&v, 0.0);
        // A minute before renewal: wait a minute, not the refusal's two.
        let before = renew_at - time::Duration::seconds(60);
        assert_eq!(s.next(before, &v), Next::Report);
        assert_eq!(s.wait(before, &v), Duration::from_secs(60));
        // At renewal time: renew, and a failing renewal waits at least 1 s.
        assert_eq!(s.next(renew_at, &v), Next::Renew);
        assert_eq!(s.wait(renew_at, &v), MIN_WAIT);
        let mut failing = s.clone();
        failing.record(Exchange::RenewalFailed, 0.0);
        assert_eq!(failing.next(renew_at, &v), Next::Renew);
        assert_eq!(failing.wait(renew_at, &v), MIN_WAIT);
        // Expired: still renew (the server has a grace window).
        assert_eq!(s.next(datetime!(2026-12-03 00:00 UTC), &v), Next::Renew);
    }

    /// The loop's wait on tokio's paused clock: the wait ends exactly when
    /// the schedule says, or at once on a runtime change.
    #[tokio::test(start_paused = true)]
    async fn the_loop_wakes_on_the_schedule_or_a_change() {
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let start = tokio::time::Instant::now();
        assert!(!super::super::wait_or_change(Duration::from_secs(30), &mut rx).await);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        let start = tokio::time::Instant::now();
        let send = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = tx.send(None);
            tx
        });
        assert!(super::super::wait_or_change(Duration::from_secs(30), &mut rx).await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(send);
    }
}
