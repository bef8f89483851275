//! The archive signing keys: OpenPGP keys the server signs its package
//! repositories (and the RPMs in them) with.
//!
//! `STATE/archive-keys/` (0700) holds `keys.json`, the list of keys in the
//! order they were made, and per key its secret half sealed with the server
//! secret (`FINGERPRINT.key.sealed`, the same envelope as the CA key, bound
//! to the fingerprint) and its public half (`FINGERPRINT.pub`, binary). Keys
//! are RSA-3072 so that every rpm (4.11 onwards) and gpgv a host may run can
//! check them. OpenPGP is rpgp's (`pgp`, pure Rust), the crate `rpm` signs
//! packages with.
//!
//! A key expires (its self-signature says when; [`DEFAULT_LIFETIME`] unless
//! `init` or `rotate` is told otherwise): apt and dnf refuse metadata signed
//! only by expired keys, so `ServerInfo` carries every key's expiry and
//! `linkmesh-agent check` warns 30 days ahead. `keys.json` also records
//! every keyring it has published (the hashes of its binary and armoured
//! forms, and the keys in it): a host's keyring file, hashed, tells `check`
//! which keys that host trusts without an OpenPGP parser in the agent.

use std::path::{Path, PathBuf};

use pgp::{
    composed::{
        CleartextSignedMessage, Deserializable as _, DetachedSignature, EncryptionCaps, KeyType,
        SecretKeyParamsBuilder, SignedPublicKey, SignedSecretKey,
    },
    crypto::hash::HashAlgorithm,
    packet::{PacketTrait as _, SignatureConfig, SignatureType, Subpacket, SubpacketData},
    ser::Serialize as _,
    types::{KeyDetails as _, KeyVersion, Password, Timestamp},
};
use serde::{Deserialize, Serialize};

use crate::sealed::{SealError, Secret};

/// The keys' directory inside a state directory.
pub const KEYS_DIR: &str = "archive-keys";
const INDEX: &str = "keys.json";
const USER_ID: &str = "LinkMesh fleet archive <archive@linkmesh.invalid>";
const RSA_BITS: u32 = 3072;
/// How long a new key is valid unless told otherwise: three years, rotated
/// well before (the server warns 30 days ahead, as `check` does).
pub const DEFAULT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3 * 365 * 86_400);

/// Failures of the archive keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file cannot be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The state has no archive key.
    #[error(
        "{path} holds no archive signing key: run `linkmesh-fleet init --state STATE` (it adds one to an existing state) before serving package repositories"
    )]
    Missing {
        /// The keys' directory.
        path: String,
    },
    /// A key file does not hold what its name says.
    #[error("{path}: {reason}; restore the state's archive-keys/ from its backup")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Retiring the only key.
    #[error(
        "{path} holds one archive key: `repo-key rotate` first (and let hosts fetch the new keyring) before the old one is retired"
    )]
    OnlyKey {
        /// The keys' directory.
        path: String,
    },
    /// Sealing or opening a secret key.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// OpenPGP refused an operation.
    #[error("OpenPGP: {0}")]
    Pgp(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> KeyError {
    KeyError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn pgp_err(e: impl std::fmt::Display) -> KeyError {
    KeyError::Pgp(e.to_string())
}

/// One key as `keys.json` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    /// Upper-case hex, as gpg prints it.
    pub fingerprint: String,
    /// RFC 3339.
    pub created: String,
    /// RFC 3339; none for a key that never expires (keys made before
    /// expiry was set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

impl KeyRecord {
    /// When the key was made, Unix seconds; `None` when `created` does not
    /// parse (a hand-edited list).
    pub fn created_unix_s(&self) -> Option<i64> {
        unix_s(&self.created)
    }

    /// When the key expires, Unix seconds; `None` when it never does.
    pub fn expires_unix_s(&self) -> Option<i64> {
        self.expires.as_deref().and_then(unix_s)
    }

    /// The key's expiry as seen at `now_s` (Unix seconds).
    pub fn expiry(&self, now_s: i64) -> Expiry {
        match self.expires_unix_s() {
            None => Expiry::Never,
            Some(at) if at <= now_s => Expiry::Expired,
            Some(at) => Expiry::In {
                seconds: at - now_s,
                days: (at - now_s) / 86_400,
            },
        }
    }
}

/// A key's expiry, seen at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// It never expires.
    Never,
    /// It has expired.
    Expired,
    /// It expires after this long.
    In {
        /// Seconds left.
        seconds: i64,
        /// Whole days left.
        days: i64,
    },
}

fn unix_s(rfc3339: &str) -> Option<i64> {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(time::OffsetDateTime::unix_timestamp)
}

/// A keyring the server has published: what a host's keyring file holds
/// when it was fetched then.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// SHA-256 of the binary form (`/keys/linkmesh-archive.gpg`), hex.
    pub binary_sha256: String,
    /// SHA-256 of the armoured form (`/keys/linkmesh-archive.asc`), hex.
    pub armored_sha256: String,
    /// The keys in it, oldest first.
    pub fingerprints: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    keys: Vec<KeyRecord>,
    /// Every keyring published, oldest first (states made before this was
    /// kept start with their current one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    published: Vec<Published>,
}

/// The loaded keys: every one listed signs, and every one is published.
pub struct ArchiveKeys {
    keys: Vec<(KeyRecord, SignedSecretKey)>,
}

impl std::fmt::Debug for ArchiveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveKeys")
            .field(
                "keys",
                &self.keys.iter().map(|(r, _)| r).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn purpose(fingerprint: &str) -> Vec<u8> {
    format!("linkmesh-fleet archive key {fingerprint}").into_bytes()
}

fn index_path(dir: &Path) -> PathBuf {
    dir.join(INDEX)
}

fn read_index(dir: &Path) -> Result<Option<Index>, KeyError> {
    let path = index_path(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KeyError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path, e)),
    }
}

/// Whether `dir` (a state's [`KEYS_DIR`]) lists at least one key.
///
/// # Errors
/// When the list cannot be read.
pub fn exists(dir: &Path) -> Result<bool, KeyError> {
    Ok(read_index(dir)?.is_some_and(|i| !i.keys.is_empty()))
}

/// Makes a new key in `dir`, valid for `lifetime` (`None`: forever), and
/// lists it after the others; returns it. Its files are written before the
/// list names it, so a crash leaves the list as it was.
///
/// # Errors
/// When the key cannot be made, sealed or written, or `lifetime` is more
/// than OpenPGP can say (136 years).
pub fn add(
    dir: &Path,
    secret: &Secret,
    lifetime: Option<std::time::Duration>,
) -> Result<KeyRecord, KeyError> {
    linkmesh_agent::fs::ensure_private_dir(dir, 0o700).map_err(|e| io(dir, e))?;
    let mut index = read_index(dir)?.unwrap_or_default();
    let now = Timestamp::now();
    let mut params = SecretKeyParamsBuilder::default();
    params
        .key_type(KeyType::Rsa(RSA_BITS))
        .can_certify(true)
        .can_sign(true)
        .can_encrypt(EncryptionCaps::None)
        .created_at(now)
        .primary_user_id(USER_ID.into());
    let mut key = params
        .build()
        .map_err(pgp_err)?
        .generate(rand::thread_rng())
        .map_err(pgp_err)?;
    let expires = match lifetime {
        Some(life) => {
            let life = pgp::types::Duration::try_from(life).map_err(pgp_err)?;
            set_expiry(&mut key, life)?;
            Some(i64::from(now.as_secs()) + i64::from(life.as_secs()))
        }
        None => None,
    };
    let fingerprint = hex_upper(key.fingerprint().as_bytes());
    let plain = zeroize::Zeroizing::new(key.to_bytes().map_err(pgp_err)?);
    let sealed = crate::sealed::seal(secret, &plain, &purpose(&fingerprint))?;
    write_json(&dir.join(format!("{fingerprint}.key.sealed")), &sealed)?;
    let pub_path = dir.join(format!("{fingerprint}.pub"));
    let public = SignedPublicKey::from(key);
    linkmesh_agent::fs::write_atomic(&pub_path, &public.to_bytes().map_err(pgp_err)?, 0o644)
        .map_err(|e| io(&pub_path, e))?;
    let rfc3339 = |secs: i64| {
        linkmesh_agent::clock::rfc3339_unix_s(secs)
            .ok_or_else(|| KeyError::Pgp(format!("a key time out of range: {secs} s after 1970")))
    };
    let record = KeyRecord {
        fingerprint,
        created: rfc3339(i64::from(now.as_secs()))?,
        expires: expires.map(rfc3339).transpose()?,
    };
    index.keys.push(record.clone());
    note_published(dir, &mut index)?;
    write_json(&index_path(dir), &index)?;
    Ok(record)
}

/// Re-signs `key`'s user ids with the same self-signature plus a key
/// expiration time `life` after its creation (rpgp's key builder sets
/// none).
fn set_expiry(key: &mut SignedSecretKey, life: pgp::types::Duration) -> Result<(), KeyError> {
    let primary = &key.primary_key;
    let public = primary.public_key();
    for user in &mut key.details.users {
        let old = user
            .signatures
            .first()
            .and_then(|s| s.config())
            .ok_or_else(|| KeyError::Pgp("a new key's user id has no self-signature".into()))?;
        let mut config =
            SignatureConfig::from_key(rand::thread_rng(), primary, SignatureType::CertPositive)
                .map_err(pgp_err)?;
        config.hashed_subpackets = old
            .hashed_subpackets
            .iter()
            .filter(|p| !matches!(p.data, SubpacketData::KeyExpirationTime(_)))
            .cloned()
            .collect();
        config
            .hashed_subpackets
            .push(Subpacket::regular(SubpacketData::KeyExpirationTime(life)).map_err(pgp_err)?);
        config.unhashed_subpackets = old.unhashed_subpackets.clone();
        let sig = config
            .sign_certification(
                primary,
                &public,
                &Password::empty(),
                user.id.tag(),
                &user.id,
            )
            .map_err(pgp_err)?;
        user.signatures = vec![sig];
    }
    Ok(())
}

/// The public keys `index` lists, from their `.pub` files.
fn public_keys(dir: &Path, index: &Index) -> Result<Vec<SignedPublicKey>, KeyError> {
    index
        .keys
        .iter()
        .map(|r| {
            let path = dir.join(format!("{}.pub", r.fingerprint));
            let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
            SignedPublicKey::from_bytes(&bytes[..]).map_err(|e| KeyError::Corrupt {
                path: path.display().to_string(),
                reason: format!("not an OpenPGP public key: {e}"),
            })
        })
        .collect()
}

/// `public` as a binary keyring (apt's `Signed-By:` file).
fn binary_keyring(public: &[SignedPublicKey]) -> Result<Vec<u8>, KeyError> {
    public.to_bytes().map_err(pgp_err)
}

/// `public` in one ASCII-armoured block (rpm's and dnf's `gpgkey=`).
fn armored_keyring(public: &[SignedPublicKey]) -> Result<String, KeyError> {
    armored(&public, pgp::armor::BlockType::PublicKey)
}

impl Published {
    /// The record of the keyring of `public`, whose fingerprints these are.
    fn of(public: &[SignedPublicKey], fingerprints: Vec<String>) -> Result<Self, KeyError> {
        Ok(Self {
            binary_sha256: linkmesh_agent::hex::sha256(&binary_keyring(public)?),
            armored_sha256: linkmesh_agent::hex::sha256(armored_keyring(public)?.as_bytes()),
            fingerprints,
        })
    }
}

/// Adds the keyring of `index`'s keys to its published list, unless there.
fn note_published(dir: &Path, index: &mut Index) -> Result<(), KeyError> {
    if index.keys.is_empty() {
        return Ok(());
    }
    let fingerprints = index.keys.iter().map(|k| k.fingerprint.clone()).collect();
    let record = Published::of(&public_keys(dir, index)?, fingerprints)?;
    if !index.published.contains(&record) {
        index.published.push(record);
    }
    Ok(())
}

/// Every keyring `dir` has published, oldest first, the current one last
/// (no secret needed).
///
/// # Errors
/// When the list or a public key cannot be read.
pub fn published(dir: &Path) -> Result<Vec<Published>, KeyError> {
    let Some(mut index) = read_index(dir)? else {
        return Ok(Vec::new());
    };
    note_published(dir, &mut index)?;
    Ok(index.published)
}

/// The keys `dir` lists, oldest first (no secret needed).
///
/// # Errors
/// When the list cannot be read.
pub fn list(dir: &Path) -> Result<Vec<KeyRecord>, KeyError> {
    Ok(read_index(dir)?.map(|i| i.keys).unwrap_or_default())
}

/// What `ServerInfo` says of the keys in `dir`: those that sign, and every
/// keyring published (no secret needed).
///
/// # Errors
/// When the list or a public key cannot be read.
pub fn announced(dir: &Path) -> Result<linkmesh_agent::proto::ArchiveKeys, KeyError> {
    use linkmesh_agent::proto;
    Ok(proto::ArchiveKeys {
        signing: list(dir)?
            .iter()
            .map(|k| proto::ArchiveKey {
                fingerprint: k.fingerprint.clone(),
                created_unix_s: k.created_unix_s().unwrap_or_default(),
                expires_unix_s: k.expires_unix_s().unwrap_or_default(),
            })
            .collect(),
        published: published(dir)?
            .into_iter()
            .map(|p| proto::PublishedKeyring {
                binary_sha256: p.binary_sha256,
                armored_sha256: p.armored_sha256,
                fingerprints: p.fingerprints,
            })
            .collect(),
    })
}

/// Drops the oldest key once a newer one has been published beside it
/// (`rotate`, then a window in which hosts fetch the new keyring): it no
/// longer signs and leaves the published keyring. The list is rewritten
/// first, then its files are removed (a crash leaves orphan files, never a
/// listed key without them). Returns the retired key.
///
/// # Errors
/// When it is the only key (the repositories would be unsigned), or files
/// cannot be written.
pub fn retire_oldest(dir: &Path) -> Result<KeyRecord, KeyError> {
    let mut index = read_index(dir)?.unwrap_or_default();
    if index.keys.len() < 2 {
        return Err(KeyError::OnlyKey {
            path: dir.display().to_string(),
        });
    }
    let old = index.keys.remove(0);
    note_published(dir, &mut index)?;
    write_json(&index_path(dir), &index)?;
    for ext in ["key.sealed", "pub"] {
        let f = dir.join(format!("{}.{ext}", old.fingerprint));
        let _ = std::fs::remove_file(&f);
    }
    let _ = linkmesh_agent::fs::fsync_dir(dir);
    Ok(old)
}

/// `value` as pretty JSON in `path`, written atomically, 0600.
fn write_json(path: &Path, value: &impl Serialize) -> Result<(), KeyError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| io(path, e))?;
    bytes.push(b'\n');
    linkmesh_agent::fs::write_atomic(path, &bytes, 0o600).map_err(|e| io(path, e))
}

/// `packets` in one ASCII-armoured block of kind `kind`.
fn armored(
    packets: &impl pgp::ser::Serialize,
    kind: pgp::armor::BlockType,
) -> Result<String, KeyError> {
    let mut out = Vec::new();
    pgp::armor::write(packets, kind, &mut out, None, true).map_err(pgp_err)?;
    String::from_utf8(out).map_err(pgp_err)
}

fn hex_upper(b: &[u8]) -> String {
    linkmesh_agent::hex::encode(b).to_ascii_uppercase()
}

impl ArchiveKeys {
    /// Opens every key listed in `dir` with `secret`.
    ///
    /// # Errors
    /// [`KeyError::Missing`] when none is listed; a wrong secret, or a key
    /// file that is not the key its name says, named.
    pub fn load(dir: &Path, secret: &Secret) -> Result<Self, KeyError> {
        let index = read_index(dir)?
            .filter(|i| !i.keys.is_empty())
            .ok_or_else(|| KeyError::Missing {
                path: dir.display().to_string(),
            })?;
        let mut keys = Vec::with_capacity(index.keys.len());
        for record in index.keys {
            let path = dir.join(format!("{}.key.sealed", record.fingerprint));
            let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
            let sealed = serde_json::from_slice(&text).map_err(|e| KeyError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let plain = zeroize::Zeroizing::new(crate::sealed::open(
                secret,
                &sealed,
                &purpose(&record.fingerprint),
                &path,
            )?);
            let key = SignedSecretKey::from_bytes(&plain[..]).map_err(|e| KeyError::Corrupt {
                path: path.display().to_string(),
                reason: format!("not an OpenPGP secret key: {e}"),
            })?;
            if hex_upper(key.fingerprint().as_bytes()) != record.fingerprint {
                return Err(KeyError::Corrupt {
                    path: path.display().to_string(),
                    reason: format!("holds another key than {}", record.fingerprint),
                });
            }
            keys.push((record, key));
        }
        Ok(Self { keys })
    }

    /// The keys, oldest first.
    pub fn records(&self) -> Vec<KeyRecord> {
        self.keys.iter().map(|(r, _)| r.clone()).collect()
    }

    fn public(&self) -> Vec<SignedPublicKey> {
        self.keys
            .iter()
            .map(|(_, k)| SignedPublicKey::from(k.clone()))
            .collect()
    }

    /// The public keys as a binary keyring (apt's `Signed-By:` file).
    ///
    /// # Errors
    /// When a key cannot be serialised.
    pub fn keyring(&self) -> Result<Vec<u8>, KeyError> {
        binary_keyring(&self.public())
    }

    /// The public keys in one ASCII-armoured block (rpm's and dnf's
    /// `gpgkey=`).
    ///
    /// # Errors
    /// When a key cannot be serialised.
    pub fn keyring_armored(&self) -> Result<String, KeyError> {
        armored_keyring(&self.public())
    }

    /// A detached, armoured signature of `data` by every key
    /// (`Release.gpg`, `repomd.xml.asc`).
    ///
    /// # Errors
    /// When signing fails.
    pub fn sign_detached(&self, data: &[u8]) -> Result<String, KeyError> {
        let mut sigs = Vec::with_capacity(self.keys.len());
        for (_, key) in &self.keys {
            let s = DetachedSignature::sign_binary_data(
                rand::thread_rng(),
                &**key,
                &Password::empty(),
                HashAlgorithm::Sha256,
                data,
            )
            .map_err(pgp_err)?;
            sigs.push(s);
        }
        armored(&sigs, pgp::armor::BlockType::Signature)
    }

    /// `text` in a cleartext-signed message by every key (`InRelease`).
    ///
    /// # Errors
    /// When signing fails.
    pub fn clearsign(&self, text: &str) -> Result<String, KeyError> {
        let msg = CleartextSignedMessage::new_many(text, |normalised| {
            let mut sigs = Vec::with_capacity(self.keys.len());
            for (_, key) in &self.keys {
                let mut config =
                    SignatureConfig::from_key(rand::thread_rng(), &**key, SignatureType::Text)?;
                config.hashed_subpackets = vec![
                    Subpacket::regular(SubpacketData::SignatureCreationTime(Timestamp::now()))?,
                    Subpacket::regular(SubpacketData::IssuerFingerprint(key.fingerprint()))?,
                ];
                if key.version() <= KeyVersion::V4 {
                    config.unhashed_subpackets = vec![Subpacket::regular(
                        SubpacketData::IssuerKeyId(key.legacy_key_id()),
                    )?];
                }
                sigs.push(config.sign(&**key, &Password::empty(), normalised.as_bytes())?);
            }
            Ok(sigs)
        })
        .map_err(pgp_err)?;
        msg.to_armored_string(Default::default()).map_err(pgp_err)
    }

    /// The signer for RPM headers: the oldest key. An RPM carries one
    /// OpenPGP signature, and during a rotation every host still knows the
    /// old key; after `retire` the new one is the oldest.
    ///
    /// # Errors
    /// When the key cannot be handed to `rpm`.
    pub fn rpm_signer(&self) -> Result<rpm::signature::pgp::Signer, KeyError> {
        let (_, key) = self.keys.first().ok_or_else(|| KeyError::Missing {
            path: KEYS_DIR.into(),
        })?;
        let armored =
            zeroize::Zeroizing::new(key.to_armored_string(Default::default()).map_err(pgp_err)?);
        rpm::signature::pgp::Signer::from_asc(&armored).map_err(pgp_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"correct horse battery staple", "test").unwrap()
    }

    #[test]
    fn a_key_made_here_opens_with_its_secret_only_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join(KEYS_DIR);
        assert!(!exists(&keys_dir).unwrap());
        assert!(matches!(
            ArchiveKeys::load(&keys_dir, &secret()),
            Err(KeyError::Missing { .. })
        ));
        let record = add(&keys_dir, &secret(), None).unwrap();
        assert!(exists(&keys_dir).unwrap());
        assert_eq!(record.fingerprint.len(), 40);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys_dir), 0o700);
        assert_eq!(
            mode(&keys_dir.join(format!("{}.key.sealed", record.fingerprint))),
            0o600
        );
        let keys = ArchiveKeys::load(&keys_dir, &secret()).unwrap();
        assert_eq!(keys.records(), vec![record.clone()]);
        let other = Secret::new(b"another secret of some length", "test").unwrap();
        assert!(matches!(
            ArchiveKeys::load(&keys_dir, &other),
            Err(KeyError::Seal(SealError::WrongSecret { .. }))
        ));
        // What is published parses back to the same key.
        let ring = keys.keyring().unwrap();
        let mut parsed = SignedPublicKey::from_bytes_many(&ring[..]).unwrap();
        let first = parsed.next().unwrap().unwrap();
        assert_eq!(
            hex_upper(first.fingerprint().as_bytes()),
            record.fingerprint
        );
        assert!(
            keys.keyring_armored()
                .unwrap()
                .starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----")
        );
        // Signatures verify with the public key, and not over other bytes.
        let sig = keys.sign_detached(b"Origin: LinkMesh\n").unwrap();
        let (sig, _) = DetachedSignature::from_string(&sig).unwrap();
        sig.verify(&first, b"Origin: LinkMesh\n").unwrap();
        assert!(sig.verify(&first, b"Origin: Elsewhere\n").is_err());
        let signed = keys.clearsign("Suite: stable\n").unwrap();
        let (msg, _) = CleartextSignedMessage::from_string(&signed).unwrap();
        msg.verify(&first).unwrap();
        assert_eq!(msg.signed_text(), "Suite: stable\r\n");
    }

    #[test]
    fn a_rotation_signs_with_both_keys_until_the_old_one_is_retired() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join(KEYS_DIR);
        let old = add(&d, &secret(), None).unwrap();
        assert!(matches!(retire_oldest(&d), Err(KeyError::OnlyKey { .. })));
        let new = add(&d, &secret(), None).unwrap();
        assert_eq!(list(&d).unwrap(), vec![old.clone(), new.clone()]);
        let keys = ArchiveKeys::load(&d, &secret()).unwrap();
        let ring = keys.keyring().unwrap();
        let public: Vec<SignedPublicKey> = SignedPublicKey::from_bytes_many(&ring[..])
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(public.len(), 2);
        // Each key's signature is in the one detached block.
        let sig = keys.sign_detached(b"x").unwrap();
        let sigs: Vec<DetachedSignature> = DetachedSignature::from_string_many(&sig)
            .unwrap()
            .0
            .map(Result::unwrap)
            .collect();
        assert_eq!(sigs.len(), 2);
        for (s, k) in sigs.iter().zip(&public) {
            s.verify(k, b"x").unwrap();
        }
        // The published list names what is served, in both forms, and the
        // keyring before the rotation stays in it.
        let history = published(&d).unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].fingerprints, vec![old.fingerprint.clone()]);
        assert_eq!(
            history[1].binary_sha256,
            linkmesh_agent::hex::sha256(&keys.keyring().unwrap())
        );
        assert_eq!(
            history[1].armored_sha256,
            linkmesh_agent::hex::sha256(keys.keyring_armored().unwrap().as_bytes())
        );
        assert_eq!(retire_oldest(&d).unwrap(), old);
        assert_eq!(list(&d).unwrap(), vec![new.clone()]);
        let history = published(&d).unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(history[2].fingerprints, vec![new.fingerprint.clone()]);
        let said = announced(&d).unwrap();
        assert_eq!(said.signing.len(), 1);
        assert_eq!(said.signing[0].expires_unix_s, 0);
        assert_eq!(said.published.len(), 3);
        assert!(!d.join(format!("{}.key.sealed", old.fingerprint)).exists());
        let keys = ArchiveKeys::load(&d, &secret()).unwrap();
        assert_eq!(keys.records(), vec![new]);
    }

    #[test]
    fn a_key_made_with_a_lifetime_says_when_it_expires_in_its_self_signature() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join(KEYS_DIR);
        let life = std::time::Duration::from_secs(20 * 86_400);
        let k = add(&d, &secret(), Some(life)).unwrap();
        let created = k.created_unix_s().unwrap();
        assert_eq!(k.expires_unix_s(), Some(created + 20 * 86_400));
        let bytes = std::fs::read(d.join(format!("{}.pub", k.fingerprint))).unwrap();
        let public = SignedPublicKey::from_bytes(&bytes[..]).unwrap();
        public.verify_bindings().unwrap();
        let sig = &public.details.users[0].signatures[0];
        assert_eq!(
            sig.key_expiration_time().map(|d| d.as_secs()),
            Some(20 * 86_400)
        );
        let said = announced(&d).unwrap();
        assert_eq!(said.signing[0].expires_unix_s, created + 20 * 86_400);
        // The secret half signs as before.
        let keys = ArchiveKeys::load(&d, &secret()).unwrap();
        let s = keys.sign_detached(b"x").unwrap();
        let (s, _) = DetachedSignature::from_string(&s).unwrap();
        s.verify(&public, b"x").unwrap();
    }

    #[test]
    fn a_key_file_swapped_for_another_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = add(&dir.path().join("a"), &secret(), None).unwrap();
        let b = add(&dir.path().join("b"), &secret(), None).unwrap();
        // b's sealed key under a's name: sealed for b's fingerprint, so the
        // envelope does not open for a's.
        std::fs::copy(
            dir.path()
                .join("b")
                .join(format!("{}.key.sealed", b.fingerprint)),
            dir.path()
                .join("a")
                .join(format!("{}.key.sealed", a.fingerprint)),
        )
        .unwrap();
        let e = ArchiveKeys::load(&dir.path().join("a"), &secret()).unwrap_err();
        assert!(e.to_string().contains(&a.fingerprint), "{e}");
    }
}
