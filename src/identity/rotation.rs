//! When to renew the host certificate: at two thirds of its lifetime, with
//! jitter of ±5 % of the lifetime so hosts enrolled together do not renew
//! together (cert-manager renews at 2/3, kubelet at 70-90 % jittered). Pure:
//! the validity, the clock and the jitter sample are passed in.

use time::{Duration, OffsetDateTime};

use super::Validity;

/// The moment to renew a certificate valid over `validity`; `jitter` is a
/// uniform sample in `[-1, 1]`.
pub fn renew_at(validity: &Validity, jitter: f64) -> OffsetDateTime {
    let lifetime = validity.not_after - validity.not_before;
    let base = lifetime * 2 / 3;
    let spread = lifetime.as_seconds_f64() * 0.05 * jitter.clamp(-1.0, 1.0);
    validity.not_before + base + Duration::seconds_f64(spread)
}

/// What to do about the certificate now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Nothing until then.
    Wait(OffsetDateTime),
    /// Renew now; the certificate is still valid.
    Due,
    /// Renew now; the certificate has expired (the server accepts that only
    /// within its grace window).
    Expired,
}

/// Decides, given the current time.
pub fn renewal(validity: &Validity, now: OffsetDateTime, jitter: f64) -> Renewal {
    if now >= validity.not_after {
        return Renewal::Expired;
    }
    let at = renew_at(validity, jitter);
    if now >= at {
        Renewal::Due
    } else {
        Renewal::Wait(at)
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn day() -> Validity {
        Validity {
            not_before: datetime!(2026-01-01 0:00 UTC),
            not_after: datetime!(2026-01-02 0:00 UTC),
        }
    }

    #[test]
    fn two_thirds_with_bounded_jitter() {
        assert_eq!(renew_at(&day(), 0.0), datetime!(2026-01-01 16:00 UTC));
        // ±5 % of 24 h is ±72 min.
        assert_eq!(renew_at(&day(), 1.0), datetime!(2026-01-01 17:12 UTC));
        assert_eq!(renew_at(&day(), -1.0), datetime!(2026-01-01 14:48 UTC));
        assert_eq!(renew_at(&day(), 9.0), datetime!(2026-01-01 17:12 UTC));
    }

    #[test]
    fn decisions() {
        let v = day();
        assert_eq!(
            renewal(&v, datetime!(2026-01-01 10:00 UTC), 0.0),
            Renewal::Wait(datetime!(2026-01-01 16:00 UTC))
        );
        assert_eq!(
            renewal(&v, datetime!(2026-01-01 16:00 UTC), 0.0),
            Renewal::Due
        );
        assert_eq!(
            renewal(&v, datetime!(2026-01-02 0:00 UTC), 0.0),
            Renewal::Expired
        );
        assert_eq!(
            renewal(&v, datetime!(2026-03-01 0:00 UTC), 0.0),
            Renewal::Expired
        );
    }
}
