//! One capped exponential backoff with jitter, for the supervisor's
//! restarts and the reporter's retries (each with its own parameters). Pure:
//! the attempt and the jitter sample are passed in.

use std::time::Duration;

/// `initial × factorⁿ⁻¹`, capped at `max`, then ± `jitter_percent`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exponential {
    /// The first delay.
    pub initial: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// Longest delay before jitter.
    pub max: Duration,
    /// Jitter as a fraction of the delay, in per cent (20 = ±20 %).
    pub jitter_percent: u32,
}

impl Exponential {
    /// The delay before attempt `n` (1-based; 0 counts as 1), `jitter` a
    /// uniform sample in `[-1, 1]` (clamped).
    pub fn delay(&self, n: u32, jitter: f64) -> Duration {
        let exponent = i32::try_from(n.saturating_sub(1))
            .unwrap_or(i32::MAX)
            .min(1000);
        let base = (self.initial.as_nanos() as f64 * self.factor.powi(exponent))
            .min(self.max.as_nanos() as f64);
        let spread = f64::from(self.jitter_percent) / 100.0 * jitter.clamp(-1.0, 1.0);
        Duration::from_nanos((base * (1.0 + spread)).max(0.0).round() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_caps_and_jitters_within_bounds() {
        let b = Exponential {
            initial: Duration::from_millis(100),
            factor: 2.0,
            max: Duration::from_secs(60),
            jitter_percent: 20,
        };
        let d: Vec<u128> = (1..=12).map(|n| b.delay(n, 0.0).as_millis()).collect();
        assert_eq!(
            d,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 60000, 60000
            ]
        );
        assert_eq!(b.delay(0, 0.0), b.delay(1, 0.0));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(120));
        assert_eq!(b.delay(1, -7.0), Duration::from_millis(80));
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(72));
    }
}
