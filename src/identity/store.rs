//! The identity on disk, under the state directory (0700):
//!
//! ```text
//! identity/            complete identity: key.pem (0600), cert.pem, ca.pem, identity.toml
//! identity.new/        being written; never read as an identity
//! identity.pending/    key pair of an enrolment in progress (0600), reused by a re-run
//! enroll.lock          flock: one enrolment at a time, readers see no swap half-done
//! ```
//!
//! A directory only ever becomes `identity/` by an atomic rename after every
//! file in it was written and fsynced, so a crash at any point leaves either
//! the previous identity or the new one. Replacing an identity exchanges the
//! two directories with `renameat2(RENAME_EXCHANGE)`; the old one is removed
//! only after the new one is in place.

use std::{
    fs::File,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, RenameFlags, renameat2};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{HostId, Identity, IdentityError};
use crate::{
    endpoint::ServerUrl,
    fs::{FsError, ensure_private_dir, fsync_dir, remove_dir_all_if_exists, write_atomic},
};

const IDENTITY: &str = "identity";
const STAGING: &str = "identity.new";
const PENDING: &str = "identity.pending";
const LOCK: &str = "enroll.lock";

/// File names inside the identity directory.
pub const KEY_FILE: &str = "key.pem";
/// The certificate chain, leaf first.
pub const CERT_FILE: &str = "cert.pem";
/// The fleet CA.
pub const CA_FILE: &str = "ca.pem";
/// Host id, server URL, CA pin, enrolment time.
pub const META_FILE: &str = "identity.toml";

/// Failures of the identity store; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A file of the identity is missing, unreadable or corrupt.
    #[error(
        "{path}: {reason}; the identity was left untouched (inspect the file, restore it from backup, or re-enrol with --force)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Something to be stored could not be made or encoded (a key pair, a
    /// record): nothing on disk is at fault, and nothing was replaced.
    #[error("cannot write {path}: {reason}; the identity in place was left untouched")]
    Unwritable {
        /// The file it was for.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The identity's parts do not fit together.
    #[error(
        "identity in {dir} is inconsistent: {error}; the identity was left untouched (re-enrol with --force to replace it)"
    )]
    Inconsistent {
        /// The identity directory.
        dir: PathBuf,
        /// The mismatch.
        error: IdentityError,
    },
    /// The private key is readable by others.
    #[error(
        "private key {path} has mode {mode:04o}, readable by other users; fix with: chmod 600 {path}"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Metadata stored beside the key and certificates.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    host_id: String,
    server_url: ServerUrl,
    ca_pin: String,
    enrolled_at: String,
}

/// The identity store of one state directory.
#[derive(Clone, Debug)]
pub struct IdentityStore {
    root: PathBuf,
}

/// Proof that the store's lock is held (exclusively or shared).
#[derive(Debug)]
pub struct StoreLock {
    _lock: Flock<File>,
}

// === impl IdentityStore ===

impl IdentityStore {
    /// The store in `state_dir`. Nothing is touched until a method is called.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            root: state_dir.into(),
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.root
    }

    /// The directory of the complete identity.
    pub fn identity_dir(&self) -> PathBuf {
        self.root.join(IDENTITY)
    }

    /// Creates the state directory (0700) if needed and takes the lock
    /// exclusively, waiting for another holder to finish.
    ///
    /// # Errors
    /// When the directory or lock file cannot be made or locked.
    pub fn lock_exclusive(&self) -> Result<StoreLock, StoreError> {
        ensure_private_dir(&self.root, 0o700)?;
        self.lock(true)
    }

    /// Takes the lock shared, for reading a consistent identity. Returns
    /// `None` when the state directory does not exist (nothing to read).
    ///
    /// # Errors
    /// When the lock file cannot be made or locked.
    pub fn lock_shared(&self) -> Result<Option<StoreLock>, StoreError> {
        if !self.root.is_dir() {
            return Ok(None);
        }
        self.lock(false).map(Some)
    }

    fn lock(&self, exclusive: bool) -> Result<StoreLock, StoreError> {
        let path = self.root.join(LOCK);
        let lock = crate::fs::lock_file(&path, exclusive)?;
        Ok(StoreLock { _lock: lock })
    }

    /// Reads the complete identity, if there is one.
    ///
    /// # Errors
    /// When a file of the identity is missing, unreadable or corrupt, the
    /// key's permissions are too wide, or the parts do not fit together.
    /// Nothing is changed on disk in any case.
    pub fn load(&self, _lock: &StoreLock) -> Result<Option<Identity>, StoreError> {
        let dir = self.identity_dir();
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StoreError::Corrupt {
                    path: dir,
                    reason: "is not a directory".into(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FsError::new("stat", &dir, e).into()),
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| StoreError::Corrupt {
                path,
                reason: format!("cannot read: {e}"),
            })
        };
        let corrupt = |name: &str, reason: String| StoreError::Corrupt {
            path: dir.join(name),
            reason,
        };

        let meta_text = read(META_FILE)?;
        let meta: Meta = std::str::from_utf8(&meta_text)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str(t).map_err(|e| e.to_string()))
            .map_err(|e| {
                corrupt(
                    META_FILE,
                    format!("not a valid identity record: {}", e.trim()),
                )
            })?;
        let host_id = HostId::new(&meta.host_id).map_err(|e| corrupt(META_FILE, e.to_string()))?;

        let key_path = dir.join(KEY_FILE);
        let key_meta = std::fs::metadata(&key_path)
            .map_err(|e| corrupt(KEY_FILE, format!("cannot read: {e}")))?;
        if !key_meta.is_file() {
            return Err(corrupt(KEY_FILE, "is not a regular file".into()));
        }
        let mode = key_meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(StoreError::KeyPermissions {
                path: key_path,
                mode: mode & 0o7777,
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&read(KEY_FILE)?)
            .map_err(|e| corrupt(KEY_FILE, format!("not a PEM private key: {e}")))?;
        super::key_spki(&key).map_err(|e| corrupt(KEY_FILE, e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&read(CERT_FILE)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(CERT_FILE, format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(corrupt(CERT_FILE, "contains no PEM certificate".into()));
        }
        let ca = CertificateDer::from_pem_slice(&read(CA_FILE)?)
            .map_err(|e| corrupt(CA_FILE, format!("not a PEM certificate: {e}")))?;
        for (name, der) in [(CERT_FILE, &certs[0]), (CA_FILE, &ca)] {
            x509_parser::parse_x509_certificate(der)
                .map_err(|e| corrupt(name, format!("not a valid X.509 certificate: {e}")))?;
        }

        let identity = Identity::new(host_id, meta.server_url, meta.enrolled_at, key, certs, ca)
            .map_err(|error| StoreError::Inconsistent {
                dir: dir.clone(),
                error,
            })?;
        if identity.ca_pin.to_string() != meta.ca_pin {
            return Err(corrupt(META_FILE, "ca_pin does not match ca.pem".into()));
        }
        Ok(Some(identity))
    }

    /// Removes what an interrupted enrolment left in the staging directory.
    ///
    /// # Errors
    /// When it cannot be removed.
    pub fn clear_staging(&self, _lock: &StoreLock) -> Result<(), StoreError> {
        remove_dir_all_if_exists(&self.root.join(STAGING))?;
        Ok(())
    }

    /// Removes the pending key when it is the key of `identity`: an
    /// enrolment that committed but was killed before cleaning up. A pending
    /// key for another enrolment (say a `--force` to a new server that was
    /// interrupted) is kept for its retry.
    ///
    /// # Errors
    /// When it cannot be removed.
    pub fn clear_committed_pending(
        &self,
        _lock: &StoreLock,
        identity: &Identity,
    ) -> Result<(), StoreError> {
        let dir = self.root.join(PENDING);
        if !dir.exists() {
            return Ok(());
        }
        // A pending directory without a usable key (killed while it was being
        // made or removed) is of no use to anyone either.
        let pending = std::fs::read_to_string(dir.join(KEY_FILE))
            .ok()
            .and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok());
        let stale = pending.is_none_or(|pending| {
            super::key_spki(identity.key())
                .is_ok_and(|live| live == rcgen::PublicKeyData::subject_public_key_info(&pending))
        });
        if stale {
            remove_dir_all_if_exists(&dir)?;
            fsync_dir(&self.root)?;
        }
        Ok(())
    }

    /// The key pair for an enrolment with `server`: the one an interrupted
    /// enrolment with the same server left, or a new ECDSA P-256 pair,
    /// stored (0600) before it is used so that a re-run after a crash sends
    /// the same public key and the server recognises the retry.
    ///
    /// # Errors
    /// When the key cannot be generated or stored.
    pub fn pending_key(
        &self,
        _lock: &StoreLock,
        server: &ServerUrl,
    ) -> Result<rcgen::KeyPair, StoreError> {
        let dir = self.root.join(PENDING);
        let key_path = dir.join(KEY_FILE);
        let server_path = dir.join("server");
        let same_server =
            std::fs::read_to_string(&server_path).is_ok_and(|s| s.trim() == server.to_string());
        if same_server
            && let Ok(pem) = std::fs::read_to_string(&key_path)
            && let Ok(pair) = rcgen::KeyPair::from_pem(&pem)
        {
            return Ok(pair);
        }
        remove_dir_all_if_exists(&dir)?;
        ensure_private_dir(&dir, 0o700)?;
        let pair = rcgen::KeyPair::generate().map_err(|e| StoreError::Unwritable {
            path: key_path.clone(),
            reason: format!("cannot generate a key pair: {e}"),
        })?;
        write_atomic(&key_path, pair.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&server_path, format!("{server}\n").as_bytes(), 0o600)?;
        Ok(pair)
    }

    /// Makes `identity` the host's identity: writes it to the staging
    /// directory, fsyncs everything, then swaps it into place atomically and
    /// removes the previous identity and the pending key.
    ///
    /// # Errors
    /// On any I/O failure; the previous identity is then still in place.
    pub fn commit(&self, _lock: &StoreLock, identity: &Identity) -> Result<(), StoreError> {
        let staging = self.root.join(STAGING);
        let live = self.identity_dir();
        remove_dir_all_if_exists(&staging)?;
        ensure_private_dir(&staging, 0o700)?;

        let key_pem = key_pem(identity.key()).ok_or_else(|| StoreError::Unwritable {
            path: staging.join(KEY_FILE),
            reason: "only PKCS#8 private keys can be stored".into(),
        })?;
        write_atomic(&staging.join(KEY_FILE), key_pem.as_bytes(), 0o600)?;
        let mut chain = String::new();
        for c in &identity.certs {
            chain.push_str(&pem(c));
        }
        write_atomic(&staging.join(CERT_FILE), chain.as_bytes(), 0o644)?;
        write_atomic(&staging.join(CA_FILE), pem(&identity.ca).as_bytes(), 0o644)?;
        let meta = Meta {
            host_id: identity.host_id.to_string(),
            server_url: identity.server.clone(),
            ca_pin: identity.ca_pin.to_string(),
            enrolled_at: identity.enrolled_at.clone(),
        };
        let meta = toml::to_string(&meta).map_err(|e| StoreError::Unwritable {
            path: staging.join(META_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(&staging.join(META_FILE), meta.as_bytes(), 0o644)?;
        fsync_dir(&staging)?;

        let replacing = live.exists();
        let flags = if replacing {
            RenameFlags::RENAME_EXCHANGE
        } else {
            RenameFlags::RENAME_NOREPLACE
        };
        renameat2(
            nix::fcntl::AT_FDCWD,
            &staging,
            nix::fcntl::AT_FDCWD,
            &live,
            flags,
        )
        .map_err(|e| FsError::new("rename", &live, io::Error::from(e)))?;
        fsync_dir(&self.root)?;

        // After an exchange the staging directory holds the previous identity.
        remove_dir_all_if_exists(&staging)?;
        remove_dir_all_if_exists(&self.root.join(PENDING))?;
        fsync_dir(&self.root)?;
        Ok(())
    }
}

/// PEM text of a certificate.
pub fn pem(cert: &CertificateDer<'_>) -> String {
    pem_lf(&pem::Pem::new("CERTIFICATE", cert.to_vec()))
}

/// PEM text of a PKCS#8 private key (the only kind the agent generates).
fn key_pem(key: &PrivateKeyDer<'_>) -> Option<String> {
    match key {
        PrivateKeyDer::Pkcs8(k) => Some(pem_lf(&pem::Pem::new(
            "PRIVATE KEY",
            k.secret_pkcs8_der().to_vec(),
        ))),
        _ => None,
    }
}

/// PEM with Unix line endings (the `pem` crate defaults to CRLF).
fn pem_lf(p: &pem::Pem) -> String {
    pem::encode_config(
        p,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}
