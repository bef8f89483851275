//! systemd integration without libsystemd: `sd_notify` datagrams (READY,
//! STATUS, WATCHDOG, STOPPING) to `$NOTIFY_SOCKET`, all no-ops when it is
//! unset. Failures are logged, never returned: notification must not take the
//! agent down. The environment is read, never modified. Also the words systemd
//! uses for a unit's states, as types ([`ActiveState`], [`LoadState`]...).

use std::{os::unix::net::UnixDatagram, time::Duration};

mod states;
pub use states::{ActiveState, LoadState, SubState, UnitFileState};

/// Sends notifications to systemd's service manager.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
    /// namespace); a no-op one when it is unset or unusable.
    pub fn from_env() -> Self {
        let target = std::env::var("NOTIFY_SOCKET").ok().and_then(|s| match Self::connect(&s) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(socket = %s, error = %e, "Cannot use NOTIFY_SOCKET; systemd will not be notified");
                None
            }
        });
        Self { target }
    }

    fn connect(spec: &str) -> std::io::Result<Target> {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = match spec.strip_prefix('@') {
            Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
            None => std::os::unix::net::SocketAddr::from_pathname(spec)?,
        };
        Ok(Target {
            socket: UnixDatagram::unbound()?,
            addr,
        })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    fn send(&self, msg: &str) {
        if let Some(t) = &self.target
            && let Err(e) = t.socket.send_to_addr(msg.as_bytes(), &t.addr)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STATUS=…`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `RELOADING=1`.
    pub fn reloading(&self) {
        self.send("RELOADING=1");
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is set
/// and `WATCHDOG_PID` (if set) is this process.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(p) = pid
        && p.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// [`watchdog_interval`] from the environment.
pub fn watchdog_interval_from_env() -> Option<Duration> {
    watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 1),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
    }

    #[test]
    fn notifies_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Notifier::connect(path.to_str().unwrap()).unwrap()),
        };
        n.ready("running\nfine");
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=running fine");
        assert!(!Notifier { target: None }.enabled());
    }
}
