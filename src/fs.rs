//! Durable file writes: every file the agent writes for identity or
//! configuration goes through [`write_atomic`] (temp file, fsync, rename,
//! fsync the directory), so a crash leaves the old file or the new one,
//! never a torn one.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// A failed file-system operation, naming the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {error}")]
pub struct FsError {
    op: &'static str,
    path: PathBuf,
    error: io::Error,
}

impl FsError {
    /// Wraps `source` as the failure of `op` on `path`.
    pub fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self {
            op,
            path: path.to_owned(),
            error: source,
        }
    }

    /// The underlying I/O error kind.
    pub fn kind(&self) -> io::ErrorKind {
        self.error.kind()
    }
}

/// Writes `contents` to `path` atomically with permission bits `mode`: a temp
/// file beside it (created with `mode`, never wider), fsync, rename over
/// `path`, fsync of the parent directory.
///
/// # Errors
/// Any I/O failure, naming the path; the temp file is removed on failure and
/// `path` keeps its previous contents.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FsError> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| FsError::new("create", &tmp, e))?;
        // The umask may have narrowed the mode; make it exact.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::new("chmod", &tmp, e))?;
        f.write_all(contents)
            .map_err(|e| FsError::new("write", &tmp, e))?;
        f.sync_all().map_err(|e| FsError::new("fsync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| FsError::new("rename", path, e))?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] on a blocking thread, for async callers: its fsyncs
/// must not stall the (single-threaded) runtime.
///
/// # Errors
/// As [`write_atomic`].
pub async fn write_atomic_off_thread(
    path: PathBuf,
    bytes: Vec<u8>,
    mode: u32,
) -> Result<(), FsError> {
    off_thread(path.clone(), move || write_atomic(&path, &bytes, mode)).await
}

/// [`ensure_private_dir`] on a blocking thread, for async callers.
///
/// # Errors
/// As [`ensure_private_dir`].
pub async fn ensure_private_dir_off_thread(dir: PathBuf, mode: u32) -> Result<(), FsError> {
    off_thread(dir.clone(), move || ensure_private_dir(&dir, mode)).await
}

async fn off_thread(
    path: PathBuf,
    f: impl FnOnce() -> Result<(), FsError> + Send + 'static,
) -> Result<(), FsError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(FsError::new(
            "write",
            &path,
            io::Error::other(e.to_string()),
        ))
    })
}

/// Flushes a directory's entries (new, renamed or removed files) to disk.
///
/// # Errors
/// When the directory cannot be opened or synced.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FsError::new("fsync directory", dir, e))
}

/// Creates `dir` (and missing parents) with `mode` if it does not exist, and
/// narrows its mode to `mode` if it does. Parents get mode 0755.
///
/// # Errors
/// When a directory cannot be created or its mode set.
pub fn ensure_private_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    if let Some(p) = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(p)
            .map_err(|e| FsError::new("create directory", p, e))?;
    }
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => fsync_dir(parent(dir))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(FsError::new("create directory", dir, e)),
    }
    let meta = fs::metadata(dir).map_err(|e| FsError::new("stat", dir, e))?;
    if !meta.is_dir() {
        return Err(FsError::new(
            "use as directory",
            dir,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a directory",
            ),
        ));
    }
    if meta.permissions().mode() & 0o7777 != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .map_err(|e| FsError::new("chmod", dir, e))?;
    }
    Ok(())
}

/// Removes a directory tree if it exists.
///
/// # Errors
/// When something exists at `dir` but cannot be removed.
pub fn remove_dir_all_if_exists(dir: &Path) -> Result<(), FsError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(FsError::new("remove", dir, e)),
    }
}

/// Opens (creating it 0600 if needed) and flocks `path`, waiting for other
/// holders; shared or exclusive. The lock goes with the returned handle.
///
/// # Errors
/// When the file cannot be opened or locked.
pub fn lock_file(path: &Path, exclusive: bool) -> Result<nix::fcntl::Flock<File>, FsError> {
    let file = open_lock_file(path)?;
    let arg = if exclusive {
        nix::fcntl::FlockArg::LockExclusive
    } else {
        nix::fcntl::FlockArg::LockShared
    };
    nix::fcntl::Flock::lock(file, arg)
        .map_err(|(_, e)| FsError::new("lock", path, io::Error::from(e)))
}

/// Like [`lock_file`] (exclusive), but returns `None` at once when another
/// process holds the lock.
///
/// # Errors
/// When the file cannot be opened or locked for another reason.
pub fn try_lock_exclusive(path: &Path) -> Result<Option<nix::fcntl::Flock<File>>, FsError> {
    let file = open_lock_file(path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(FsError::new("lock", path, io::Error::from(e))),
    }
}

/// Opens a lock file, creating it 0600 (its content is never used).
fn open_lock_file(path: &Path) -> Result<File, FsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| FsError::new("open lock", path, e))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_with_exact_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_keeps_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub");
        fs::create_dir(&path).unwrap();
        // Renaming a file over a non-empty directory fails.
        fs::write(path.join("x"), b"x").unwrap();
        let err = write_atomic(&path, b"new", 0o644).unwrap_err();
        assert!(err.to_string().contains("rename"), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_dir_is_created_and_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/b/state");
        ensure_private_dir(&state, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&state, 0o700).unwrap();
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o7777,
            0o700
        );
    }
}
