//! `linkmesh-agent image-prep`: generalise a host before its disk becomes an
//! image (a golden image, an AMI, a VDI template), so that no two machines
//! made from it present one identity. It removes what belongs to this
//! machine and keeps what belongs to the image: the configuration, the
//! binaries, the unit (still enabled) and the install method.
//!
//! Removed, under the state directory:
//! - `identity/` and an interrupted enrolment's `identity.new/` and
//!   `identity.pending/` (the key, the certificate, the host id);
//! - `supervisor/persistent_state.yaml`, the collector's OpAMP instance uid
//!   (the rest of the supervisor's storage, its configuration, is kept);
//! - this machine's records: `fingerprint.json`, `revoked.json`, `server-version.json`,
//!   `runtime-status.json`, `upgrade/` (probation and outcome) and
//!   `runtime/outcome.json`.
//!
//! It refuses while the agent runs (it holds `run.lock`) and takes the
//! enrolment lock, so neither starts half-way. The identity is first renamed
//! to the staging name enrolment never reads, then removed: a cut leaves a
//! whole identity or none.

use std::path::{Path, PathBuf};

use crate::fs::{FsError, fsync_dir, remove_dir_all_if_exists};

/// What image-prep removes, relative to the state directory.
pub const REMOVED: [&str; 10] = [
    "identity",
    crate::fingerprint::FILE,
    "identity.new",
    "identity.pending",
    "supervisor/persistent_state.yaml",
    crate::reporter::REVOKED_FILE,
    crate::upgrade::SERVER_RECORD,
    crate::published::STATUS_FILE,
    "upgrade",
    "runtime/outcome.json",
];

/// Failures of image-prep.
#[derive(Debug, thiserror::Error)]
pub enum ImagePrepError {
    /// The agent is running.
    #[error(
        "linkmesh-agent run is running on {0} (it holds run.lock): stop it first (systemctl stop linkmesh-agent); the collector may keep running"
    )]
    Running(PathBuf),
    /// A file operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The identity store.
    #[error(transparent)]
    Store(#[from] crate::identity::store::StoreError),
}

/// What is there to remove under `state_dir`. Pure but for `exists`.
pub fn present(state_dir: &Path, exists: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    REMOVED
        .iter()
        .map(|r| state_dir.join(r))
        .filter(|p| exists(p))
        .collect()
}

/// Removes what [`present`] finds (nothing with `dry_run`) and returns it.
///
/// # Errors
/// [`ImagePrepError`]; what was removed before the error stays removed, the
/// identity whole or gone.
pub fn run(state_dir: &Path, dry_run: bool) -> Result<Prepared, ImagePrepError> {
    let found = present(state_dir, |p| std::fs::symlink_metadata(p).is_ok());
    let prepared = |removed| Prepared {
        state_dir: state_dir.to_owned(),
        dry_run,
        removed,
    };
    if !state_dir.exists() {
        return Ok(prepared(found));
    }
    let run_lock = state_dir.join(crate::app::RUN_LOCK);
    let Some(_running) = crate::fs::try_lock_exclusive(&run_lock)? else {
        return Err(ImagePrepError::Running(state_dir.to_owned()));
    };
    if dry_run {
        return Ok(prepared(found));
    }
    let store = crate::identity::IdentityStore::new(state_dir);
    let _enrolling = store.lock_exclusive()?;
    // The identity goes whole: renamed where nothing reads it, then removed.
    let identity = state_dir.join("identity");
    let staging = state_dir.join("identity.new");
    if identity.exists() {
        remove_dir_all_if_exists(&staging)?;
        std::fs::rename(&identity, &staging).map_err(|e| FsError::new("rename", &identity, e))?;
        fsync_dir(state_dir)?;
    }
    for path in &found {
        let path = if *path == identity { &staging } else { path };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => remove_dir_all_if_exists(path)?,
            Ok(_) => std::fs::remove_file(path).map_err(|e| FsError::new("remove", path, e))?,
            Err(_) => {}
        }
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
    }
    Ok(prepared(found))
}

/// What `image-prep` removed (or, with `--dry-run`, would remove).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Nothing was removed.
    pub dry_run: bool,
    /// The paths removed or to be removed.
    pub removed: Vec<PathBuf>,
}

impl Prepared {
    /// `image-prep --json`'s document.
    pub fn json(&self) -> serde_json::Value {
        let removed: Vec<String> = self
            .removed
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        serde_json::json!({ "dry_run": self.dry_run, "removed": removed })
    }

    /// `image-prep`'s lines, with what to do before capturing the image.
    pub fn human(&self) -> String {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        let mut out = String::new();
        if self.removed.is_empty() {
            out.push_str(&format!(
                "nothing to remove: {} holds no machine identity\n",
                self.state_dir.display()
            ));
        }
        for p in &self.removed {
            out.push_str(&format!("{verb} {}\n", p.display()));
        }
        out.push_str(
            "kept: the configuration, the binaries, the install method and the enabled unit\n",
        );
        out.push_str("before you capture the image, also empty /etc/machine-id (truncate -s 0 /etc/machine-id) so each machine gets its own\n");
        out.push_str("each machine made from it enrols on first boot: echo $TOKEN | linkmesh-agent enroll --server URL --ca-pin sha256:HEX --token-file /dev/stdin && systemctl start linkmesh-agent\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_what_belongs_to_the_machine_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        for d in [
            "identity",
            "identity.pending",
            "supervisor",
            "upgrade",
            "runtime",
        ] {
            std::fs::create_dir_all(s.join(d)).unwrap();
        }
        for f in [
            "identity/identity.toml",
            "identity/key.pem",
            "identity.pending/key.pem",
            "supervisor/persistent_state.yaml",
            "supervisor/effective.yaml",
            "upgrade/outcome.json",
            "runtime/outcome.json",
            "runtime/pin",
            "install-method",
            "server-version.json",
            "runtime-status.json",
        ] {
            std::fs::write(s.join(f), "x").unwrap();
        }
        let planned = run(s, true).unwrap();
        assert!(planned.dry_run && planned.human().contains("would remove "));
        let planned = planned.removed;
        assert!(
            s.join("identity/key.pem").exists(),
            "a dry run removes nothing"
        );
        let removed = run(s, false).unwrap();
        assert_eq!(
            removed.json()["removed"].as_array().map(Vec::len),
            Some(planned.len())
        );
        let removed = removed.removed;
        assert_eq!(planned, removed);
        for gone in [
            "identity",
            "identity.new",
            "identity.pending",
            "supervisor/persistent_state.yaml",
            "upgrade",
            "runtime/outcome.json",
            "server-version.json",
            "runtime-status.json",
        ] {
            assert!(!s.join(gone).exists(), "{gone} left");
        }
        for kept in ["supervisor/effective.yaml", "runtime/pin", "install-method"] {
            assert!(s.join(kept).exists(), "{kept} removed");
        }
        let again = run(s, false).unwrap();
        assert_eq!(again.removed, Vec::<PathBuf>::new(), "a re-run is a no-op");
        assert!(again.human().starts_with("nothing to remove: "));
    }

    #[test]
    fn refuses_while_the_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("identity")).unwrap();
        let _held = crate::fs::try_lock_exclusive(&dir.path().join(crate::app::RUN_LOCK))
            .unwrap()
            .unwrap();
        let e = run(dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("stop it first"), "{e}");
        assert!(dir.path().join("identity").exists());
    }
}
