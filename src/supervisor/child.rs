//! One supervised child process: started in its own process group through
//! the agent's `launch` helper (which makes the kernel SIGKILL it if the
//! agent dies, then execs the program), its output streamed, and stopped the
//! way opampsupervisor handles it: SIGINT to the child, then SIGTERM to the
//! group, then SIGKILL to the group.

use std::{
    ffi::OsString,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use bytes::Bytes;
use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio_process_stream::{Item, ProcessChunkStream};
use tokio_stream::StreamExt as _;

/// How to start a child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildSpec {
    /// Name used in logs (`opampsupervisor`).
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Other executables it needs (name, path), checked before each start.
    pub requires: Vec<(String, PathBuf)>,
    /// The agent executable providing `launch`; `None` starts the program
    /// directly (it is then not killed when the agent dies).
    pub launcher: Option<PathBuf>,
    /// Changes to the inherited environment: set (`Some`) or removed.
    pub env: Vec<(String, Option<String>)>,
}

/// Bounds of each step of a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopTimeouts {
    /// After SIGINT to the child, before SIGTERM to its group.
    pub interrupt: Duration,
    /// After SIGTERM, before SIGKILL to the group.
    pub terminate: Duration,
}

impl StopTimeouts {
    /// Splits a total grace period: two thirds for SIGINT (the supervisor
    /// itself waits up to 10 s for its collector), one third for SIGTERM.
    pub fn from_total(total: Duration) -> Self {
        Self {
            interrupt: total.mul_f64(2.0 / 3.0),
            terminate: total.mul_f64(1.0 / 3.0),
        }
    }
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program is missing or not executable.
    #[error("{name} executable {path} {reason}")]
    NotExecutable {
        /// Child name.
        name: String,
        /// The path.
        path: PathBuf,
        /// `does not exist`, `is not executable`…
        reason: String,
    },
    /// The OS refused to start it.
    #[error("cannot start {name} ({path}): {error}")]
    Spawn {
        /// Child name.
        name: String,
        /// The path.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

/// Checks that `path` is an executable regular file.
///
/// # Errors
/// [`SpawnError::NotExecutable`] naming the path and what is wrong.
pub fn check_executable(name: &str, path: &Path) -> Result<(), SpawnError> {
    let err = |reason: &str| SpawnError::NotExecutable {
        name: name.to_owned(),
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(err("does not exist")),
        Err(e) => Err(err(&format!("cannot be read: {e}"))),
        Ok(m) if !m.is_file() => Err(err("is not a regular file")),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(err("is not executable (chmod +x it)")),
        Ok(_) => Ok(()),
    }
}

/// A running child.
pub struct Running {
    stream: ProcessChunkStream,
    /// Its pid (also its process group id).
    pub pid: u32,
}

/// Output or exit of a child.
pub enum Event {
    /// A chunk of stdout.
    Stdout(Bytes),
    /// A chunk of stderr.
    Stderr(Bytes),
    /// It exited.
    Exited(ExitStatus),
}

/// Starts a child in its own process group, stdin closed, output piped.
///
/// # Errors
/// [`SpawnError`] when it is not executable or cannot be started.
pub fn spawn(spec: &ChildSpec) -> Result<Running, SpawnError> {
    check_executable(&spec.name, &spec.program)?;
    for (name, path) in &spec.requires {
        check_executable(name, path)?;
    }
    let mut cmd = match &spec.launcher {
        Some(launcher) => {
            let mut c = tokio::process::Command::new(launcher);
            c.arg("launch")
                .arg("--parent-pid")
                .arg(std::process::id().to_string())
                .arg("--")
                .arg(&spec.program);
            c
        }
        None => tokio::process::Command::new(&spec.program),
    };
    for (k, v) in &spec.env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let spawn_err = |error| SpawnError::Spawn {
        name: spec.name.clone(),
        path: spec.program.clone(),
        error,
    };
    let stream = ProcessChunkStream::try_from(cmd).map_err(spawn_err)?;
    let pid = stream
        .child()
        .and_then(tokio::process::Child::id)
        .ok_or_else(|| {
            spawn_err(std::io::Error::other(
                "child exited before its pid was read",
            ))
        })?;
    Ok(Running { stream, pid })
}

impl Running {
    /// The next chunk of output, or the exit. `None` only after the exit
    /// was returned.
    pub async fn next(&mut self) -> Option<Event> {
        self.stream.next().await.map(|item| match item {
            Item::Stdout(b) => Event::Stdout(b),
            Item::Stderr(b) => Event::Stderr(b),
            Item::Done(status) => Event::Exited(status.unwrap_or_else(|_| failed_status())),
        })
    }

    /// Stops the child: SIGINT to it, then SIGTERM to its group, then
    /// SIGKILL to the group, each after its timeout; output keeps flowing to
    /// `on_output` meanwhile. Whatever is left of the group is killed at the
    /// end so no descendant outlives it. Returns the exit status and the
    /// last signal that was needed.
    pub async fn stop(
        mut self,
        timeouts: StopTimeouts,
        mut on_output: impl FnMut(Event),
    ) -> (ExitStatus, Signal) {
        let pid = Pid::from_raw(self.pid as i32);
        let steps = [
            (Signal::SIGINT, timeouts.interrupt, false),
            (Signal::SIGTERM, timeouts.terminate, true),
            (Signal::SIGKILL, Duration::from_secs(5), true),
        ];
        for (signal, wait, group) in steps {
            let _ = if group {
                killpg(pid, signal)
            } else {
                kill(pid, signal)
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, self.next()).await {
                    Ok(Some(Event::Exited(status))) => {
                        let _ = killpg(pid, Signal::SIGKILL);
                        return (status, signal);
                    }
                    Ok(Some(event)) => on_output(event),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let _ = killpg(pid, Signal::SIGKILL);
        (failed_status(), Signal::SIGKILL)
    }
}

fn failed_status() -> ExitStatus {
    std::os::unix::process::ExitStatusExt::from_raw(Signal::SIGKILL as i32)
}

/// Describes an exit for people: `exit code 2` or `killed by SIGKILL`.
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("killed by {}", sig.as_str()),
            Err(_) => format!("killed by signal {s}"),
        },
        _ => "unknown exit".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_split() {
        let t = StopTimeouts::from_total(Duration::from_secs(15));
        assert_eq!(
            (t.interrupt, t.terminate),
            (Duration::from_secs(10), Duration::from_secs(5))
        );
    }

    #[test]
    fn executable_checks_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sup");
        let e = check_executable("opampsupervisor", &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sup does not exist"), "{e}");
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        let e = check_executable("opampsupervisor", &p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not executable"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_executable("opampsupervisor", &p).is_ok());
        assert!(
            check_executable("x", dir.path())
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
    }

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(describe_exit(&ExitStatus::from_raw(2 << 8)), "exit code 2");
        assert_eq!(describe_exit(&ExitStatus::from_raw(9)), "killed by SIGKILL");
    }
}
