//! `linkmesh-fleet backup` and `restore`: the state directory as one
//! gzipped tar with a manifest of every file's SHA-256.
//!
//! A backup is consistent while `serve` runs: it is taken under the state
//! lock, which every write that matters for identity (enrolment, renewal,
//! a renewed certificate's first use, revocation, token creation, the
//! flush of reports) also takes; the files outside it (collector
//! configurations, `server.json`) are each replaced atomically, so a backup
//! holds whole files. Reports held in memory and not yet flushed (at most
//! a second) are not in it: they are refreshed by the hosts' next reports.
//!
//! The CA key stays sealed in the backup: restoring it needs the server
//! secret to serve again, and the secret is never written into a backup.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Component, Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{migrate, state::State};

/// The manifest's name inside the archive.
pub const MANIFEST: &str = "linkmesh-fleet-backup.json";

/// Largest archive member accepted on restore.
const MAX_MEMBER: u64 = 64 << 20;

/// What a backup holds: the state's top-level entries that are state (the
/// lock, logs and anything else are left out).
const ENTRIES: [&str; 9] = [
    "clones",
    crate::repository::keys::KEYS_DIR,
    migrate::FORMAT_FILE,
    "server.json",
    "ca",
    "tokens",
    "hosts",
    "revoked",
    "collector-config",
];

/// The manifest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// `linkmesh-fleet-backup`.
    pub kind: String,
    /// The state format backed up.
    pub format: u32,
    /// The server version that last opened the state.
    pub server_version: String,
    /// The CA's pin: the trust every enrolled host holds.
    pub ca_pin: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Every file, by path relative to the state directory: SHA-256 hex.
    pub files: BTreeMap<String, String>,
}

/// Failures of backup and restore, naming the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The archive is not a whole, untouched backup.
    #[error("{path} is not a usable backup: {reason}; nothing was changed")]
    Invalid {
        /// The archive.
        path: String,
        /// Why.
        reason: String,
    },
    /// The target holds state already.
    #[error("{path} holds a state already: pass --force to replace it (it is kept as {aside})")]
    Exists {
        /// The state directory.
        path: String,
        /// Where `--force` keeps it.
        aside: String,
    },
    /// A server runs on the target.
    #[error("a server is running on {path} (it holds serving.lock): stop it before restoring")]
    Busy {
        /// The state directory.
        path: String,
    },
    /// The state's format or lock.
    #[error(transparent)]
    Format(#[from] migrate::FormatError),
    /// The state.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

fn io(path: &Path, e: impl std::fmt::Display) -> BackupError {
    BackupError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Every regular file below `dir`, relative to `root` (symlinks and other
/// kinds are not state and are skipped).
fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), BackupError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir, e)),
    };
    if meta.is_file() {
        out.push(dir.strip_prefix(root).map_err(|e| io(dir, e))?.to_owned());
    } else if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io(dir, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(|e| io(dir, e))?;
        entries.sort();
        for e in entries {
            files(root, &e, out)?;
        }
    }
    Ok(())
}

/// Backs up `state` into `out` (written atomically, 0600).
///
/// # Errors
/// [`BackupError`] naming the file.
pub fn backup(state: &State, out: &Path, ours: &str) -> Result<Manifest, BackupError> {
    migrate::check_readable(state, ours)?;
    let Some((format, record)) = migrate::found(state)? else {
        return Err(migrate::FormatError::NotInitialised {
            path: state.dir().display().to_string(),
        }
        .into());
    };
    let (_, pin) = crate::ca::Ca::certificate(&state.ca_dir()).map_err(migrate::FormatError::Ca)?;
    let lock = state.lock()?;
    let mut paths = Vec::new();
    for e in ENTRIES {
        files(state.dir(), &state.dir().join(e), &mut paths)?;
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut manifest = Manifest {
        kind: "linkmesh-fleet-backup".into(),
        format,
        server_version: record.map(|r| r.server_version).unwrap_or_default(),
        ca_pin: pin.to_string(),
        created_at: now,
        files: BTreeMap::new(),
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    {
        let mut tar = tar::Builder::new(&mut gz);
        let mut add = |name: &str, bytes: &[u8], mode: u32| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(mode);
            h.set_mtime(u64::try_from(now).unwrap_or(0));
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, bytes)
        };
        for rel in &paths {
            let path = state.dir().join(rel);
            let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
            let name = rel.to_string_lossy().into_owned();
            add(&name, &bytes, 0o600).map_err(|e| io(out, e))?;
            manifest
                .files
                .insert(name, linkmesh_agent::hex::sha256(&bytes));
        }
        drop(lock);
        let m = serde_json::to_vec_pretty(&manifest).map_err(|e| io(out, e))?;
        add(MANIFEST, &m, 0o600).map_err(|e| io(out, e))?;
        tar.finish().map_err(|e| io(out, e))?;
    }
    let bytes = gz.finish().map_err(|e| io(out, e))?;
    linkmesh_agent::fs::write_atomic(out, &bytes, 0o600).map_err(|e| io(out, e))?;
    Ok(manifest)
}

/// Reads and verifies a backup: every member a plain relative path under a
/// state entry, every file in the manifest with its hash, nothing else.
///
/// # Errors
/// [`BackupError::Invalid`].
pub fn read(archive: &Path) -> Result<(Manifest, BTreeMap<String, Vec<u8>>), BackupError> {
    let invalid = |reason: String| BackupError::Invalid {
        path: archive.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(archive).map_err(|e| io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut members = BTreeMap::new();
    let mut manifest = None;
    for entry in tar.entries().map_err(|e| invalid(e.to_string()))? {
        let mut entry = entry.map_err(|e| invalid(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| invalid(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(invalid(format!("{name:?} is not a regular file")));
        }
        if entry.size() > MAX_MEMBER {
            return Err(invalid(format!("{name:?} is {} bytes", entry.size())));
        }
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| invalid(e.to_string()))?;
        if name == MANIFEST {
            manifest = Some(
                serde_json::from_slice::<Manifest>(&bytes)
                    .map_err(|e| invalid(format!("manifest: {e}")))?,
            );
            continue;
        }
        let p = Path::new(&name);
        let plain = p.components().all(|c| matches!(c, Component::Normal(_)));
        let under = p
            .components()
            .next()
            .is_some_and(|c| ENTRIES.iter().any(|e| c.as_os_str() == *e));
        if !plain || !under {
            return Err(invalid(format!("member {name:?} is not part of a state")));
        }
        if members.insert(name.clone(), bytes).is_some() {
            return Err(invalid(format!("member {name:?} appears twice")));
        }
    }
    let manifest = manifest.ok_or_else(|| invalid("no manifest (cut short?)".into()))?;
    if manifest.kind != "linkmesh-fleet-backup" {
        return Err(invalid(format!("manifest kind {:?}", manifest.kind)));
    }
    if manifest.files.len() != members.len() {
        return Err(invalid(format!(
            "the manifest lists {} files, the archive holds {}",
            manifest.files.len(),
            members.len()
        )));
    }
    for (name, hash) in &manifest.files {
        match members.get(name) {
            Some(b) if linkmesh_agent::hex::sha256(b) == *hash => {}
            Some(_) => return Err(invalid(format!("{name} does not match its SHA-256"))),
            None => return Err(invalid(format!("{name} is missing"))),
        }
    }
    if !members.contains_key("ca/ca.pem") {
        return Err(invalid("it holds no CA certificate".into()));
    }
    Ok((manifest, members))
}

/// Restores `archive` into `dir`. An existing state is replaced only with
/// `force`, never while a server holds its lock, and is kept beside it.
/// The new state is written whole beside `dir`, then renamed into place.
///
/// # Errors
/// [`BackupError`]; on any error `dir` is as it was.
pub fn restore(
    archive: &Path,
    dir: &Path,
    force: bool,
) -> Result<(Manifest, Option<PathBuf>), BackupError> {
    let (manifest, members) = read(archive)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let sibling = |tag: &str| {
        let mut name = dir.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{tag}"));
        dir.with_file_name(name)
    };
    let aside = sibling(&format!("before-restore-{now}"));
    let occupied = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    let _held = if occupied {
        if !force {
            return Err(BackupError::Exists {
                path: dir.display().to_string(),
                aside: aside.display().to_string(),
            });
        }
        let lock = dir.join(crate::state::SERVING_LOCK);
        match linkmesh_agent::fs::try_lock_exclusive(&lock) {
            Ok(Some(l)) => Some(l),
            Ok(None) => {
                return Err(BackupError::Busy {
                    path: dir.display().to_string(),
                });
            }
            Err(e) => return Err(io(&lock, e)),
        }
    } else {
        None
    };
    let staging = sibling(&format!("restoring-{}", std::process::id()));
    linkmesh_agent::fs::remove_dir_all_if_exists(&staging).map_err(|e| io(&staging, e))?;
    let written = (|| {
        linkmesh_agent::fs::ensure_private_dir(&staging, 0o700).map_err(|e| io(&staging, e))?;
        for e in ["tokens", "hosts", "revoked", "ca"] {
            let d = staging.join(e);
            linkmesh_agent::fs::ensure_private_dir(&d, 0o700).map_err(|e| io(&d, e))?;
        }
        for (name, bytes) in &members {
            let path = staging.join(name);
            if let Some(parent) = path.parent() {
                linkmesh_agent::fs::ensure_private_dir(parent, 0o700).map_err(|e| io(parent, e))?;
            }
            let mode = if name == "ca/ca.pem" { 0o644 } else { 0o600 };
            linkmesh_agent::fs::write_atomic(&path, bytes, mode).map_err(|e| io(&path, e))?;
        }
        Ok::<(), BackupError>(())
    })();
    if let Err(e) = written {
        let _ = linkmesh_agent::fs::remove_dir_all_if_exists(&staging);
        return Err(e);
    }
    let kept = if dir.exists() {
        std::fs::rename(dir, &aside).map_err(|e| io(dir, e))?;
        Some(aside)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&staging, dir) {
        // Put the old state back: nothing lost.
        if let Some(a) = &kept {
            let _ = std::fs::rename(a, dir);
        }
        return Err(io(dir, e));
    }
    if let Some(parent) = dir.parent() {
        linkmesh_agent::fs::fsync_dir(parent).map_err(|e| io(parent, e))?;
    }
    Ok((manifest, kept))
}

/// Writes `manifest`'s summary for people.
pub fn describe(manifest: &Manifest, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "state format {}, last opened by linkmesh-fleet {}, CA {}, {} files",
        manifest.format,
        if manifest.server_version.is_empty() {
            "?"
        } else {
            &manifest.server_version
        },
        manifest.ca_pin,
        manifest.files.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tampered_or_foreign_archive_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let evil = dir.path().join("evil.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        {
            let mut tar = tar::Builder::new(&mut gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, "etc/passwd", &b"x:0"[..]).unwrap();
            tar.finish().unwrap();
        }
        std::fs::write(&evil, gz.finish().unwrap()).unwrap();
        let e = read(&evil).unwrap_err().to_string();
        assert!(e.contains("not part of a state"), "{e}");
        let target = dir.path().join("state");
        assert!(restore(&evil, &target, false).is_err());
        assert!(!target.exists());
        std::fs::write(dir.path().join("cut.tar.gz"), [0x1f, 0x8b, 0x08]).unwrap();
        assert!(read(&dir.path().join("cut.tar.gz")).is_err());
    }
}
