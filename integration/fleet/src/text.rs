//! Strings that come from agents, made safe to keep, print and log: every
//! field has a bound (a request over it is refused, naming the field), and
//! control characters are escaped wherever a person or a log reads them,
//! so an ESC sequence or a CR/LF cannot forge a table row or a log line.

use linkmesh_agent::proto;

/// The bound of each string field an agent sends, in bytes.
pub mod bounds {
    /// A DNS name (RFC 1035).
    pub const HOSTNAME: usize = 253;
    /// A version, a git revision or a verdict.
    pub const VERSION: usize = 64;
    /// `os-release` values and the kernel release.
    pub const OS: usize = 256;
    /// An architecture, install method, runtime kind or state.
    pub const WORD: usize = 32;
    /// A hash in hex.
    pub const HASH: usize = 128;
    /// The last exit of the supervised runtime.
    pub const EXIT: usize = 256;
    /// A runtime error (it names paths).
    pub const ERROR: usize = 2048;
}

/// A field over its bound.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes; at most {max} are accepted")]
pub struct TooLong {
    /// The field, dotted.
    pub field: &'static str,
    /// Its length.
    pub len: usize,
    /// The bound.
    pub max: usize,
}

fn check(field: &'static str, value: &str, max: usize) -> Result<(), TooLong> {
    if value.len() > max {
        Err(TooLong {
            field,
            len: value.len(),
            max,
        })
    } else {
        Ok(())
    }
}

/// Checks the host facts of an enrolment or a report.
///
/// # Errors
/// The first field over its bound.
pub fn check_host(h: &proto::HostFacts) -> Result<(), TooLong> {
    use bounds::*;
    check("host.hostname", &h.hostname, HOSTNAME)?;
    check("host.os_id", &h.os_id, OS)?;
    check("host.os_version", &h.os_version, OS)?;
    check("host.os_pretty_name", &h.os_pretty_name, OS)?;
    check("host.kernel_release", &h.kernel_release, OS)?;
    check("host.arch", &h.arch, WORD)?;
    check("host.machine_id_hash", &h.machine_id_hash, HASH)
}

/// Checks an enrolment request's strings (the token and CSR are checked
/// by their own parsers).
///
/// # Errors
/// The first field over its bound.
pub fn check_enroll(r: &proto::EnrollRequest) -> Result<(), TooLong> {
    check("agent_version", &r.agent_version, bounds::VERSION)?;
    r.host.as_ref().map_or(Ok(()), check_host)
}

/// Checks a report's strings (the collector problem is cut to its own
/// bounds where it is stored).
///
/// # Errors
/// The first field over its bound.
pub fn check_report(r: &proto::ReportRequest) -> Result<(), TooLong> {
    use bounds::*;
    check("host_id", &r.host_id, WORD + 8)?;
    check("agent_version", &r.agent_version, VERSION)?;
    check("git_revision", &r.git_revision, VERSION)?;
    check("install_method", &r.install_method, WORD)?;
    check("skew_verdict", &r.skew_verdict, WORD)?;
    if let Some(h) = &r.host {
        check_host(h)?;
    }
    if let Some(rt) = &r.runtime {
        check("runtime.kind", &rt.kind, WORD)?;
        check("runtime.version", &rt.version, VERSION)?;
        check(
            "runtime.supervisor_version",
            &rt.supervisor_version,
            VERSION,
        )?;
        check("runtime.state", &rt.state, WORD)?;
        check("runtime.last_exit", &rt.last_exit, EXIT)?;
        check("runtime.error", &rt.error, ERROR)?;
        check("runtime.running_version", &rt.running_version, VERSION)?;
    }
    for (field, u) in [
        ("last_upgrade", &r.last_upgrade),
        ("last_runtime_upgrade", &r.last_runtime_upgrade),
    ] {
        if let Some(u) = u {
            check(field, &u.outcome, WORD)?;
            check(field, &u.from_version, VERSION)?;
            check(field, &u.to_version, VERSION)?;
            check(field, &u.reason, ERROR)?;
        }
    }
    Ok(())
}

/// Lets a repeated log line through at most once per interval, counting
/// the ones it held back, so a flood of refusals writes a line every few
/// seconds instead of one per request.
#[derive(Debug)]
pub struct Every {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Every {
    /// At most one line per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may be written now (`n` were held back since
    /// the last one), `None` when it is held back.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(std::time::Instant::now())
    }

    /// [`Every::allow`] at a given time.
    pub fn allow_at(&mut self, now: std::time::Instant) -> Option<u64> {
        if self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
        {
            self.last = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// `s` with control characters escaped (`\u{1b}`, `\n`, `\r`…), for a
/// terminal or a log line.
pub fn safe(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_rows_or_lines() {
        assert_eq!(safe("web-1"), "web-1");
        assert_eq!(
            safe("evil\r\n0000  forged\u{1b}[2J"),
            "evil\\r\\n0000  forged\\u{1b}[2J"
        );
        assert_eq!(safe("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
    }

    #[test]
    fn repeated_lines_are_held_back_and_counted() {
        let t0 = std::time::Instant::now();
        let s = std::time::Duration::from_secs(1);
        let mut e = Every::new(10 * s);
        assert_eq!(e.allow_at(t0), Some(0));
        assert_eq!(e.allow_at(t0 + s), None);
        assert_eq!(e.allow_at(t0 + 2 * s), None);
        assert_eq!(e.allow_at(t0 + 10 * s), Some(2));
        assert_eq!(e.allow_at(t0 + 11 * s), None);
    }

    #[test]
    fn fields_over_their_bounds_are_named() {
        let mut h = proto::HostFacts {
            hostname: "a".repeat(253),
            ..Default::default()
        };
        assert_eq!(check_host(&h), Ok(()));
        h.hostname.push('a');
        assert_eq!(
            check_host(&h),
            Err(TooLong {
                field: "host.hostname",
                len: 254,
                max: 253
            })
        );
        let r = proto::ReportRequest {
            runtime: Some(proto::RuntimeStatus {
                version: "9".repeat(65),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            check_report(&r).unwrap_err().to_string(),
            "runtime.version is 65 bytes; at most 64 are accepted"
        );
        let e = proto::EnrollRequest {
            agent_version: "1".repeat(4 << 20),
            ..Default::default()
        };
        assert_eq!(check_enroll(&e).unwrap_err().field, "agent_version");
    }
}
