//! The real [`Probes`]: `which`, running `--version` with a time limit,
//! dpkg/rpm queries, `systemctl`, file reads, and a minimal HTTP GET for
//! Alloy's metrics. Every external call is bounded.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{ProbeError, Probes, UnitState, parse_package_version};
use crate::systemd::{ActiveState, UnitFileState};

/// Bound on any one external command or HTTP request.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most output read from a command or HTTP response.
const MAX_OUTPUT: u64 = 4 << 20;

/// Probes of the running host.
#[derive(Clone, Debug)]
pub struct HostProbes {
    /// The agent's state directory, where install records live.
    pub state_dir: PathBuf,
}

impl Probes for HostProbes {
    fn is_executable(&self, path: &Path) -> bool {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }

    fn which(&self, name: &str) -> Option<PathBuf> {
        which::which(name).ok()
    }

    fn run(&self, exe: &Path, args: &[&str]) -> Result<String, ProbeError> {
        run_bounded(exe, args)
    }

    fn package_version(&self, package: &str) -> Option<String> {
        let dpkg = || {
            run_bounded(
                Path::new("dpkg-query"),
                &["-W", "-f=${Status} ${Version}", package],
            )
            .ok()
        };
        if let Some(out) = dpkg() {
            // "install ok installed 0.159.0"
            if let Some(v) = out.strip_prefix("install ok installed ") {
                return parse_package_version(v);
            }
        }
        let rpm = run_bounded(Path::new("rpm"), &["-q", "--qf", "%{VERSION}", package]).ok()?;
        if rpm.contains("not installed") {
            return None;
        }
        parse_package_version(&rpm)
    }

    fn install_record(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.state_dir.join("runtime/versions.toml")).ok()?;
        let table: toml::Table = text.parse().ok()?;
        table.get(name)?.as_str().map(str::to_owned)
    }

    fn unit(&self, unit: &str) -> Option<UnitState> {
        if !Path::new("/run/systemd/system").is_dir() {
            return None;
        }
        let query = |verb: &str| {
            // Both commands exit non-zero for disabled/inactive units and
            // still print the state on stdout; errors (a unit that does not
            // exist) go to stderr and are not a state.
            run_capture(Path::new("systemctl"), &[verb, unit])
                .map(|(_, stdout, _)| stdout.lines().next().unwrap_or("").trim().to_owned())
                .ok()
        };
        let enabled = query("is-enabled")?;
        let active = query("is-active")?;
        let enabled = if enabled.is_empty() {
            UnitFileState::NotFound
        } else {
            UnitFileState::parse(&enabled)
        };
        Some(UnitState {
            enabled,
            active: ActiveState::parse(&active),
        })
    }

    fn read_file(&self, path: &Path) -> Option<String> {
        let mut s = String::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_OUTPUT)
            .read_to_string(&mut s)
            .ok()?;
        Some(s)
    }

    fn http_get(&self, addr: &str, path: &str) -> Result<String, ProbeError> {
        http_get(addr, path, PROBE_TIMEOUT).map_err(ProbeError::from)
    }
}

fn run_bounded(exe: &Path, args: &[&str]) -> Result<String, ProbeError> {
    let (ok, stdout, stderr) = run_capture(exe, args)?;
    let out = stdout + &stderr;
    if ok {
        Ok(out)
    } else {
        Err(ProbeError::Failed {
            command: format!("{} {}", exe.display(), args.join(" ")),
            output: out.trim().to_owned(),
        })
    }
}

/// Runs a command with a deadline; returns whether it succeeded, its stdout
/// and its stderr.
fn run_capture(exe: &Path, args: &[&str]) -> Result<(bool, String, String), ProbeError> {
    // Children never speak to systemd for the agent.
    let mut child = Command::new(exe)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ProbeError::Spawn {
            command: exe.display().to_string(),
            reason: e.to_string(),
        })?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.take(MAX_OUTPUT).read_to_end(&mut buf);
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(MAX_OUTPUT).read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ProbeError::Timeout {
                    command: exe.display().to_string(),
                    after: PROBE_TIMEOUT,
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return Err(ProbeError::Spawn {
                    command: exe.display().to_string(),
                    reason: format!("waiting for it: {e}"),
                });
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok((status.success(), stdout, stderr))
}

/// Why [`http_get`] got no usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The address does not resolve (or resolves to nothing).
    #[error("cannot resolve {addr}{}", .reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Resolve {
        /// host:port.
        addr: String,
        /// The resolver's words.
        reason: Option<String>,
    },
    /// Connecting, sending or reading failed (a timeout among them). The
    /// caller names the URL.
    #[error("{reason}")]
    Io {
        /// The class (`TimedOut`, `ConnectionRefused`...).
        kind: std::io::ErrorKind,
        /// The socket's words.
        reason: String,
    },
    /// No header/body separator in what came back.
    #[error("malformed HTTP response")]
    Malformed,
    /// An answer other than 200.
    #[error("HTTP status {status:?}")]
    Status {
        /// The status line.
        status: String,
    },
}

/// A minimal HTTP/1.1 GET (Alloy's local endpoint is plain HTTP on loopback).
///
/// # Errors
/// Connection, timeout, a non-200 status or an unparsable response.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<String, HttpError> {
    let io = |e: std::io::Error| HttpError::Io {
        kind: e.kind(),
        reason: e.to_string(),
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| HttpError::Resolve {
            addr: addr.to_owned(),
            reason: Some(e.to_string()),
        })?
        .next()
        .ok_or_else(|| HttpError::Resolve {
            addr: addr.to_owned(),
            reason: None,
        })?;
    let mut stream = TcpStream::connect_timeout(&sock, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    // One write: `write!` would send each formatted piece separately.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: text/plain\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    stream.take(MAX_OUTPUT).read_to_end(&mut raw).map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(HttpError::Malformed)?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(HttpError::Status {
            status: status.to_owned(),
        });
    }
    if head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    }) {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
    }

    #[test]
    fn commands_are_bounded_and_report_failures() {
        let ok = run_bounded(Path::new("sh"), &["-c", "echo out; echo err >&2"]).unwrap();
        assert_eq!(ok, "out\nerr\n");
        let err = run_bounded(Path::new("sh"), &["-c", "echo nope; exit 3"]).unwrap_err();
        assert!(
            matches!(&err, ProbeError::Failed { output, .. } if output == "nope"),
            "{err:?}"
        );
        assert!(err.to_string().contains("failed: nope"), "{err}");
        let err = run_bounded(Path::new("/nonexistent/bin"), &[]).unwrap_err();
        assert!(matches!(err, ProbeError::Spawn { .. }), "{err:?}");
        assert!(
            err.to_string().contains("cannot run /nonexistent/bin"),
            "{err}"
        );
    }
}
