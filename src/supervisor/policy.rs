//! When to restart a child that exited: capped exponential backoff with
//! jitter, reset after a run that lasted long enough to count as stable, and
//! a crash-loop flag after several short runs in a row. No I/O and no clock:
//! the run time and the jitter sample are passed in.

use std::time::Duration;

/// The restart policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart after a stable run.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Jitter as a fraction of the delay, in per cent (20 = ±20 %).
    pub jitter_percent: u32,
    /// A run at least this long resets the backoff.
    pub stable_after: Duration,
    /// This many short runs in a row is a crash loop.
    pub crash_loop_after: u32,
}

impl Default for RestartPolicy {
    /// 100 ms doubling to 60 s, ±20 % jitter, reset after 60 s of running,
    /// crash loop after 5 short runs. The first restart comes within 120 ms;
    /// a child that dies at once is restarted at most about 11 times in the
    /// first two minutes, then once a minute.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(60),
            jitter_percent: 20,
            stable_after: Duration::from_secs(60),
            crash_loop_after: 5,
        }
    }
}

impl RestartPolicy {
    /// The delays: doubling from `initial` to `max`, ± `jitter_percent`.
    pub fn backoff(&self) -> crate::backoff::Exponential {
        crate::backoff::Exponential {
            initial: self.initial,
            factor: 2.0,
            max: self.max,
            jitter_percent: self.jitter_percent,
        }
    }
}

/// What to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restart {
    /// Wait this long, then start again.
    pub delay: Duration,
    /// Short runs in a row, this one included (0 after a stable run).
    pub consecutive_failures: u32,
    /// The child is crash-looping.
    pub crash_loop: bool,
}

/// Backoff state across restarts of one child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    policy: RestartPolicy,
    consecutive: u32,
}

impl Backoff {
    /// Fresh state.
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            consecutive: 0,
        }
    }

    /// The child exited after running `ran_for`; `jitter` is a uniform
    /// sample in `[-1.0, 1.0]`.
    pub fn on_exit(&mut self, ran_for: Duration, jitter: f64) -> Restart {
        if ran_for >= self.policy.stable_after {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        Restart {
            delay: self.policy.backoff().delay(self.consecutive, jitter),
            consecutive_failures: self.consecutive,
            crash_loop: self.consecutive >= self.policy.crash_loop_after,
        }
    }

    /// Short runs in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(10);

    #[test]
    fn grows_to_the_cap_and_flags_a_crash_loop() {
        let mut b = Backoff::new(RestartPolicy::default());
        let delays: Vec<u64> = (0..14)
            .map(|_| b.on_exit(SHORT, 0.0).delay.as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 60000, 60000, 60000,
                60000
            ]
        );
        let mut b = Backoff::new(RestartPolicy::default());
        let flags: Vec<bool> = (0..6).map(|_| b.on_exit(SHORT, 0.0).crash_loop).collect();
        assert_eq!(flags, [false, false, false, false, true, true]);
    }

    #[test]
    fn a_stable_run_resets() {
        let mut b = Backoff::new(RestartPolicy::default());
        for _ in 0..7 {
            b.on_exit(SHORT, 0.0);
        }
        let r = b.on_exit(Duration::from_secs(61), 0.0);
        assert_eq!(
            (r.delay, r.consecutive_failures, r.crash_loop),
            (Duration::from_millis(100), 1, false)
        );
    }

    #[test]
    fn jitter_stays_within_bounds() {
        for j in [-1.0, -0.5, 0.0, 0.5, 1.0, 7.0, -7.0] {
            let mut b = Backoff::new(RestartPolicy::default());
            let d = b.on_exit(SHORT, j).delay.as_secs_f64();
            assert!((0.08..=0.12).contains(&d), "{j}: {d}");
            for _ in 0..20 {
                b.on_exit(SHORT, j);
            }
            let d = b.on_exit(SHORT, j).delay.as_secs_f64();
            assert!((48.0..=72.0).contains(&d), "{j}: {d}");
        }
    }

    #[test]
    fn never_a_tight_loop() {
        // However many failures, the delay never falls below the initial one.
        let mut b = Backoff::new(RestartPolicy::default());
        for _ in 0..10_000 {
            assert!(b.on_exit(Duration::ZERO, -1.0).delay >= Duration::from_millis(80));
        }
    }
}
