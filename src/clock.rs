//! Wall-clock and randomness helpers shared by the timers: Unix milliseconds
//! and uniform jitter samples for backoff and renewal.

use std::time::SystemTime;

/// Milliseconds since the Unix epoch (0 for a time before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// [`unix_ms`] of now.
pub fn now_unix_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// RFC 3339, as every record and JSON document writes times.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// [`rfc3339`] of Unix seconds; `None` out of range.
pub fn rfc3339_unix_s(secs: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .map(rfc3339)
}

/// [`rfc3339`] of Unix milliseconds (the epoch for one out of range).
pub fn rfc3339_unix_ms(ms: u64) -> String {
    let ns = i128::from(ms) * 1_000_000;
    rfc3339(
        time::OffsetDateTime::from_unix_timestamp_nanos(ns)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
    )
}

/// A uniform sample in `[-1, 1]` for jitter (0 if the system RNG fails).
pub fn jitter() -> f64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) * 2.0 - 1.0
}

/// A random 64-bit number from the system RNG, mixed with the time and pid
/// should the RNG fail (what it serves, a run id, needs only be distinct).
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        let t = unix_ms(std::time::SystemTime::now());
        return t.rotate_left(20) ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// Formats 16 bytes as a UUID string (8-4-4-4-12 lowercase hex).
pub fn uuid_string(b: &[u8; 16]) -> String {
    let h = crate::hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn jitter_is_in_range_and_uuid_formats() {
        for _ in 0..1000 {
            let j = super::jitter();
            assert!((-1.0..=1.0).contains(&j));
        }
        assert_eq!(
            super::uuid_string(&[0xab; 16]),
            "abababab-abab-abab-abab-abababababab"
        );
        assert!(super::now_unix_ms() > 1_700_000_000_000);
    }
}
