//! The server secret, and files sealed with it: the CA private key is kept
//! encrypted at rest so a copied state directory or backup alone cannot
//! mint host certificates.
//!
//! A sealed file is JSON: PBKDF2-HMAC-SHA256 over the secret with a random
//! 16-byte salt (iterations stored, so they can rise later), then
//! AES-256-GCM with a random 96-bit nonce; the associated data binds the
//! plaintext to its purpose (for the CA key: the CA certificate's SHA-256,
//! so a key and a certificate from two CAs never pair). ring provides every
//! primitive; nothing here is hand-rolled beyond the envelope.

use std::{num::NonZeroU32, path::Path};

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    pbkdf2,
    rand::{SecureRandom, SystemRandom},
};
use serde::{Deserialize, Serialize};

/// The environment variable holding the server secret.
pub const SECRET_ENV: &str = "LINKMESH_FLEET_SECRET";

/// Shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;

/// PBKDF2 rounds for new files (OWASP's 2023 figure for HMAC-SHA256).
pub const ITERATIONS: u32 = 600_000;

const ENVELOPE: &str = "linkmesh-fleet-sealed-v1";

/// Failures of the secret and of sealed files.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// No secret given.
    #[error(
        "no server secret: set {SECRET_ENV} or pass --secret-file FILE (make one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE; chmod 600 FILE`, or `linkmesh-fleet init --secret-file FILE` on a new state); keep it apart from the state's backups"
    )]
    Missing,
    /// The secret is too short.
    #[error(
        "the server secret from {source_name} is {len} bytes; at least {MIN_SECRET} are required"
    )]
    TooShort {
        /// Where it came from.
        source_name: String,
        /// Its length.
        len: usize,
    },
    /// The secret file cannot be read or written.
    #[error("secret file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The secret does not open the file: another secret sealed it, or it
    /// was altered.
    #[error("{path} cannot be opened with this secret")]
    WrongSecret {
        /// The sealed file.
        path: String,
    },
    /// The file is not a sealed file this version reads.
    #[error("{path} is not a sealed file this server reads: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
}

/// The server secret. Its bytes are never printed.
pub struct Secret {
    bytes: Vec<u8>,
    /// Where it came from (`LINKMESH_FLEET_SECRET` or the file's path).
    pub source: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(from {}, redacted)", self.source)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.iter_mut().for_each(|b| *b = 0);
    }
}

impl Secret {
    /// A secret from its text (one trailing newline dropped, as `echo`
    /// writes it).
    ///
    /// # Errors
    /// [`SealError::TooShort`].
    pub fn new(text: &[u8], source: &str) -> Result<Self, SealError> {
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.len() < MIN_SECRET {
            return Err(SealError::TooShort {
                source_name: source.to_owned(),
                len: text.len(),
            });
        }
        Ok(Self {
            bytes: text.to_vec(),
            source: source.to_owned(),
        })
    }

    /// The secret from `--secret-file` if given, else from
    /// [`SECRET_ENV`] (read with `env`).
    ///
    /// # Errors
    /// [`SealError::Missing`], an unreadable file, or a short secret.
    pub fn from_file_or_env(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SealError> {
        match file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| SealError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Self::new(&bytes, &path.display().to_string())
            }
            None => match env(SECRET_ENV) {
                Some(v) => Self::new(v.as_bytes(), SECRET_ENV),
                None => Err(SealError::Missing),
            },
        }
    }

    /// Makes a new random secret (32 bytes, hex) in `path`, 0600, written
    /// atomically; refuses to replace an existing file.
    ///
    /// # Errors
    /// When the file exists or cannot be written.
    pub fn create_file(path: &Path) -> Result<Self, SealError> {
        let file_error = |reason: String| SealError::File {
            path: path.display().to_string(),
            reason,
        };
        if path.exists() {
            return Err(file_error("exists already; refusing to replace it".into()));
        }
        // A missing directory is made private; an existing one is left as is.
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            linkmesh_agent::fs::ensure_private_dir(dir, 0o700)
                .map_err(|e| file_error(e.to_string()))?;
        }
        let mut raw = [0u8; 32];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| SealError::Random)?;
        let mut text = linkmesh_agent::hex::encode(&raw).into_bytes();
        raw.iter_mut().for_each(|b| *b = 0);
        text.push(b'\n');
        let written = linkmesh_agent::fs::write_atomic(path, &text, 0o600)
            .map_err(|e| file_error(e.to_string()));
        let secret = Self::new(&text, &path.display().to_string());
        text.iter_mut().for_each(|b| *b = 0);
        written?;
        secret
    }
}

/// A sealed file's contents.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sealed {
    /// [`ENVELOPE`].
    pub envelope: String,
    /// `pbkdf2-hmac-sha256`.
    pub kdf: String,
    /// PBKDF2 rounds.
    pub iterations: u32,
    /// Hex.
    pub salt: String,
    /// `aes-256-gcm`.
    pub aead: String,
    /// Hex.
    pub nonce: String,
    /// Hex, tag included.
    pub ciphertext: String,
}

fn key(secret: &Secret, salt: &[u8], iterations: NonZeroU32) -> Result<LessSafeKey, SealError> {
    let mut k = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        &secret.bytes,
        &mut k,
    );
    let unbound = UnboundKey::new(&AES_256_GCM, &k).map_err(|_| SealError::Random);
    k.iter_mut().for_each(|b| *b = 0);
    Ok(LessSafeKey::new(unbound?))
}

/// Seals `plaintext` for `purpose` (the associated data).
///
/// # Errors
/// [`SealError::Random`].
pub fn seal(secret: &Secret, plaintext: &[u8], purpose: &[u8]) -> Result<Sealed, SealError> {
    seal_with(secret, plaintext, purpose, ITERATIONS)
}

fn seal_with(
    secret: &Secret,
    plaintext: &[u8],
    purpose: &[u8],
    iterations: u32,
) -> Result<Sealed, SealError> {
    let rng = SystemRandom::new();
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt).map_err(|_| SealError::Random)?;
    rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
    let rounds = NonZeroU32::new(iterations).ok_or(SealError::Random)?;
    let key = key(secret, &salt, rounds)?;
    let mut buf = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(purpose),
        &mut buf,
    )
    .map_err(|_| SealError::Random)?;
    Ok(Sealed {
        envelope: ENVELOPE.into(),
        kdf: "pbkdf2-hmac-sha256".into(),
        iterations,
        salt: linkmesh_agent::hex::encode(&salt),
        aead: "aes-256-gcm".into(),
        nonce: linkmesh_agent::hex::encode(&nonce),
        ciphertext: linkmesh_agent::hex::encode(&buf),
    })
}

/// Opens `sealed` (read from `path`, named in errors) for `purpose`.
///
/// # Errors
/// [`SealError::WrongSecret`] when the secret, the purpose or the bytes do
/// not match; [`SealError::Corrupt`] for an envelope this does not read.
pub fn open(
    secret: &Secret,
    sealed: &Sealed,
    purpose: &[u8],
    path: &Path,
) -> Result<Vec<u8>, SealError> {
    let corrupt = |reason: &str| SealError::Corrupt {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    };
    if sealed.envelope != ENVELOPE
        || sealed.kdf != "pbkdf2-hmac-sha256"
        || sealed.aead != "aes-256-gcm"
    {
        return Err(corrupt(&format!(
            "envelope {:?}, kdf {:?}, aead {:?}",
            sealed.envelope, sealed.kdf, sealed.aead
        )));
    }
    let rounds = NonZeroU32::new(sealed.iterations).ok_or_else(|| corrupt("zero iterations"))?;
    if sealed.iterations > 100_000_000 {
        return Err(corrupt("implausible iteration count"));
    }
    let salt = linkmesh_agent::hex::decode(&sealed.salt).ok_or_else(|| corrupt("salt"))?;
    let nonce: [u8; NONCE_LEN] = linkmesh_agent::hex::decode(&sealed.nonce)
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| corrupt("nonce"))?;
    let mut buf =
        linkmesh_agent::hex::decode(&sealed.ciphertext).ok_or_else(|| corrupt("ciphertext"))?;
    let key = key(secret, &salt, rounds)?;
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(purpose),
            &mut buf,
        )
        .map_err(|_| SealError::WrongSecret {
            path: path.display().to_string(),
        })?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes(), "test").unwrap()
    }

    #[test]
    fn sealed_opens_only_with_its_secret_and_purpose() {
        let s = secret("correct horse battery staple");
        let sealed = seal_with(&s, b"-----BEGIN PRIVATE KEY-----", b"ca", 1000).unwrap();
        assert!(
            !sealed
                .ciphertext
                .contains(&linkmesh_agent::hex::encode(b"BEGIN"))
        );
        let p = Path::new("ca.key.sealed");
        assert_eq!(
            open(&s, &sealed, b"ca", p).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        assert!(matches!(
            open(&secret("another secret of length"), &sealed, b"ca", p),
            Err(SealError::WrongSecret { .. })
        ));
        assert!(matches!(
            open(&s, &sealed, b"other purpose", p),
            Err(SealError::WrongSecret { .. })
        ));
        let mut tampered = sealed.clone();
        tampered.ciphertext.replace_range(0..2, "00");
        if tampered.ciphertext != sealed.ciphertext {
            assert!(matches!(
                open(&s, &tampered, b"ca", p),
                Err(SealError::WrongSecret { .. })
            ));
        }
        let mut odd = sealed;
        odd.aead = "rot13".into();
        assert!(matches!(
            open(&s, &odd, b"ca", p),
            Err(SealError::Corrupt { .. })
        ));
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert!(matches!(
            Secret::new(b"short\n", "FILE"),
            Err(SealError::TooShort { len: 5, .. })
        ));
        let s = Secret::new(b"0123456789abcdef\n", "FILE").unwrap();
        assert_eq!(s.bytes, b"0123456789abcdef");
        assert!(!format!("{s:?}").contains("0123"));
        assert!(matches!(
            Secret::from_file_or_env(None, |_| None),
            Err(SealError::Missing)
        ));
        let from_env = Secret::from_file_or_env(None, |k| {
            (k == SECRET_ENV).then(|| "from-the-environment".to_owned())
        })
        .unwrap();
        assert_eq!(from_env.source, SECRET_ENV);
    }

    #[test]
    fn a_new_secret_file_is_private_and_never_replaced() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/linkmesh-fleet/secret");
        let s = Secret::create_file(&path).unwrap();
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert_eq!(s.bytes.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(Secret::create_file(&path).is_err());
        let again = Secret::from_file_or_env(Some(&path), |_| None).unwrap();
        assert_eq!(again.bytes, s.bytes);
    }
}
