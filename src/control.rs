//! `linkmesh-agent runtime stop|start`: the operator's explicit switch for
//! the collector runtime, the one way (besides purging the package) to stop
//! it. The choice is kept in the state directory, so neither an agent
//! restart nor a reboot undoes it: in unit mode the unit is also disabled
//! (stop) or enabled (start); a running agent is told with SIGHUP.

use std::path::{Path, PathBuf};

use crate::{
    config::Settings,
    fs::{FsError, fsync_dir, write_atomic},
    supervisor::{
        service::{STOPPED_FILE, unit_mode},
        unit::{UNIT_DIR, UNIT_NAME},
    },
};

/// Why the runtime could not be switched.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The choice could not be recorded.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// systemctl failed.
    #[error("systemctl {args} failed: {detail}")]
    Systemctl {
        /// Its arguments.
        args: String,
        /// What it said.
        detail: String,
    },
}

/// What was done, for the operator.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// One line per action.
    pub lines: Vec<String>,
}

fn systemctl(args: &[&str]) -> Result<(), ControlError> {
    let out = std::process::Command::new("systemctl")
        .arg("--no-ask-password")
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| ControlError::Systemctl {
            args: args.join(" "),
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ControlError::Systemctl {
            args: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The running agent's pid, by the published state's one rule.
fn running_agent(state_dir: &Path) -> Option<i32> {
    let s = crate::published::read(state_dir)?;
    s.agent_running
        .then(|| i32::try_from(s.state.runtime.agent_pid).ok())
        .flatten()
}

fn tell_agent(state_dir: &Path, lines: &mut Vec<String>) {
    if let Some(pid) = running_agent(state_dir) {
        match nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        ) {
            Ok(()) => lines.push(format!("told the running agent (pid {pid}) with SIGHUP")),
            Err(e) => lines.push(format!("could not signal the agent (pid {pid}): {e}")),
        }
    }
}

fn marker(settings: &Settings) -> PathBuf {
    settings.state_dir.join(STOPPED_FILE)
}

/// Stops the collector runtime until [`start`].
///
/// # Errors
/// [`ControlError`] when the choice cannot be recorded or systemd refuses.
pub fn stop(settings: &Settings) -> Result<Outcome, ControlError> {
    let mut lines = Vec::new();
    write_atomic(
        &marker(settings),
        b"stopped by `linkmesh-agent runtime stop`\n",
        0o600,
    )?;
    lines.push(format!(
        "recorded in {}: the agent will not start the collector runtime",
        marker(settings).display()
    ));
    if unit_mode(settings.runtime.mode) && Path::new(UNIT_DIR).join(UNIT_NAME).exists() {
        systemctl(&["disable", "--now", "--quiet", UNIT_NAME])?;
        lines.push(format!(
            "{UNIT_NAME} stopped and disabled (it will not start at boot)"
        ));
    }
    tell_agent(&settings.state_dir, &mut lines);
    Ok(Outcome { lines })
}

/// Undoes [`stop`]: the runtime runs again.
///
/// # Errors
/// [`ControlError`] when the choice cannot be recorded or systemd refuses.
pub fn start(settings: &Settings) -> Result<Outcome, ControlError> {
    let mut lines = Vec::new();
    let m = marker(settings);
    match std::fs::remove_file(&m) {
        Ok(()) => {
            fsync_dir(&settings.state_dir)?;
            lines.push(format!("removed {}", m.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(FsError::new("remove", &m, e).into()),
    }
    if unit_mode(settings.runtime.mode) && Path::new(UNIT_DIR).join(UNIT_NAME).exists() {
        // A failed unit (systemd gave up restarting it) starts afresh.
        let _ = systemctl(&["reset-failed", UNIT_NAME]);
        systemctl(&["enable", "--now", "--quiet", UNIT_NAME])?;
        lines.push(format!("{UNIT_NAME} enabled and started"));
    } else if running_agent(&settings.state_dir).is_none() {
        lines.push(
            "the agent starts the collector runtime when it runs: systemctl start linkmesh-agent"
                .to_owned(),
        );
    }
    tell_agent(&settings.state_dir, &mut lines);
    Ok(Outcome { lines })
}
