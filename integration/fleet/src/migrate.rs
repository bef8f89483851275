//! The state's format, recorded in `STATE/format.json`, and the forward
//! migrations `serve` and `init` apply. A state written by a newer format is
//! never opened (a rollback across a format change): the operator restores
//! the backup taken before the upgrade.
//!
//! Formats:
//! - 1: what servers before the record wrote (no `format.json`): the CA key
//!   in plaintext (`ca/ca.key`), no `revoked/`.
//! - 2: the CA key sealed with the server secret (`ca/ca.key.sealed`),
//!   `revoked/`, and this record.
//!
//! Each migration is safe to cut at any point: it writes the new files
//! first, then the record, then removes what the old format had; a re-run
//! completes it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{
    ca::{self, Ca, CaError},
    sealed::Secret,
    state::{State, StateError},
};

/// The format this server writes.
pub const CURRENT: u32 = 2;

/// The record's file in the state directory.
pub const FORMAT_FILE: &str = "format.json";

/// The record of the state's format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FormatRecord {
    /// The format of the state.
    pub format: u32,
    /// The server version that last opened it.
    pub server_version: String,
    /// Unix seconds of that.
    pub opened_at: i64,
    /// Every migration applied, oldest first.
    #[serde(default)]
    pub migrations: Vec<Migration>,
}

/// One applied migration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Migration {
    /// From this format.
    pub from: u32,
    /// To this one.
    pub to: u32,
    /// By this server version.
    pub server_version: String,
    /// Unix seconds.
    pub at: i64,
}

/// Failures of opening a state.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Written by a newer format.
    #[error(
        "{path} says state format {found}, written by linkmesh-fleet {by}; this server ({ours}) reads formats up to {CURRENT}. This is a rollback across a state format change: restore the backup taken before the upgrade (linkmesh-fleet restore --from FILE --state DIR), or run linkmesh-fleet {by} or newer"
    )]
    Newer {
        /// The record.
        path: String,
        /// Its format.
        found: u32,
        /// The version that wrote it.
        by: String,
        /// This server's version.
        ours: String,
    },
    /// Not a state directory.
    #[error(
        "{path} holds no fleet state (no ca/ca.pem): run `linkmesh-fleet init --state {path}` first"
    )]
    NotInitialised {
        /// The directory.
        path: String,
    },
    /// The record cannot be read.
    #[error("{path}: {reason}")]
    Record {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The state.
    #[error(transparent)]
    State(#[from] StateError),
    /// The CA.
    #[error(transparent)]
    Ca(#[from] CaError),
}

/// The steps from `found` to [`CURRENT`]. Pure.
///
/// # Errors
/// `Err(found)` when `found` is newer than [`CURRENT`].
pub fn plan(found: u32) -> Result<Vec<(u32, u32)>, u32> {
    if found > CURRENT {
        return Err(found);
    }
    Ok((found.max(1)..CURRENT).map(|f| (f, f + 1)).collect())
}

/// The record, or the format a state without one has (1 when a CA is
/// there, `None` for no state at all).
///
/// # Errors
/// When the record exists but cannot be read.
pub fn found(state: &State) -> Result<Option<(u32, Option<FormatRecord>)>, FormatError> {
    let path = state.dir().join(FORMAT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let r: FormatRecord =
                serde_json::from_slice(&bytes).map_err(|e| FormatError::Record {
                    path: path.display().to_string(),
                    reason: format!("not a format record ({e}); restore it from the backup"),
                })?;
            Ok(Some((r.format, Some(r))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(state
            .ca_dir()
            .join(ca::CA_CERT)
            .exists()
            .then_some((1, None))),
        Err(e) => Err(FormatError::Record {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Refuses a state written by a newer format; for the commands that only
/// read or add records beside `serve` (`hosts`, `drift`, `token create`...).
///
/// # Errors
/// [`FormatError::Newer`], or an unreadable record.
pub fn check_readable(state: &State, ours: &str) -> Result<(), FormatError> {
    match found(state)? {
        Some((f, r)) if f > CURRENT => Err(newer(state, f, r.as_ref(), ours)),
        _ => Ok(()),
    }
}

fn newer(state: &State, found: u32, r: Option<&FormatRecord>, ours: &str) -> FormatError {
    FormatError::Newer {
        path: state.dir().join(FORMAT_FILE).display().to_string(),
        found,
        by: r.map_or_else(|| "?".to_owned(), |r| r.server_version.clone()),
        ours: ours.to_owned(),
    }
}

/// Opens the state for `serve` or `init` as server version `ours`: refuses
/// a newer format, applies the forward migrations under the state lock,
/// records the format and version, and loads the CA with `secret`.
///
/// # Errors
/// [`FormatError`]; a wrong secret is [`CaError::WrongSecret`], which
/// never leads to a new CA.
pub fn open(state: &State, secret: &Secret, ours: &str) -> Result<Ca, FormatError> {
    let lock = state.lock()?;
    let Some((format, record)) = found(state)? else {
        return Err(FormatError::NotInitialised {
            path: state.dir().display().to_string(),
        });
    };
    let steps = plan(format).map_err(|f| newer(state, f, record.as_ref(), ours))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut record = record.unwrap_or(FormatRecord {
        format,
        server_version: String::new(),
        opened_at: now,
        migrations: Vec::new(),
    });
    for (from, to) in steps {
        match (from, to) {
            (1, 2) => seal_plain_key(state, secret)?,
            _ => unreachable_step(from, to)?,
        }
        record.format = to;
        record.migrations.push(Migration {
            from,
            to,
            server_version: ours.to_owned(),
            at: now,
        });
        // The record after the step's files: a cut here re-runs the step.
        write_record(state, &record)?;
        tracing::info!(from, to, "Migrated the state format");
    }
    finish_seal(state)?;
    let ca = Ca::load(&state.ca_dir(), secret)?;
    if record.server_version != ours {
        record.server_version = ours.to_owned();
        record.opened_at = now;
        write_record(state, &record)?;
    }
    drop(lock);
    Ok(ca)
}

/// Records a new state as [`CURRENT`] (by `init`).
///
/// # Errors
/// When it cannot be written.
pub fn record_new(state: &State, ours: &str) -> Result<(), FormatError> {
    write_record(
        state,
        &FormatRecord {
            format: CURRENT,
            server_version: ours.to_owned(),
            opened_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            migrations: Vec::new(),
        },
    )
}

fn unreachable_step(from: u32, to: u32) -> Result<(), FormatError> {
    Err(FormatError::Record {
        path: format!("migration {from} -> {to}"),
        reason: "this server has no such migration".into(),
    })
}

fn write_record(state: &State, r: &FormatRecord) -> Result<(), FormatError> {
    let path = state.dir().join(FORMAT_FILE);
    let mut bytes = serde_json::to_vec_pretty(r).map_err(|e| FormatError::Record {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    linkmesh_agent::fs::write_atomic(&path, &bytes, 0o600).map_err(|e| FormatError::Record {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// 1 -> 2: seals the plaintext CA key with the secret and adds `revoked/`.
/// The plaintext key is removed by [`finish_seal`] once the record says 2.
fn seal_plain_key(state: &State, secret: &Secret) -> Result<(), FormatError> {
    state.create_layout()?;
    let dir = state.ca_dir();
    if dir.join(ca::PLAIN_KEY).exists() {
        let (ca, key_pem) = Ca::load_plain(&dir)?;
        ca::seal_key(&dir, secret, &key_pem, ca.cert())?;
    }
    Ok(())
}

/// Removes a plaintext CA key left beside its sealed copy (a migration cut
/// after its record was written). Only once the sealed copy opens.
fn finish_seal(state: &State) -> Result<(), FormatError> {
    let dir = state.ca_dir();
    let plain = dir.join(ca::PLAIN_KEY);
    if plain.exists() && dir.join(ca::SEALED_KEY).exists() {
        std::fs::remove_file(&plain).map_err(|e| FormatError::Record {
            path: plain.display().to_string(),
            reason: e.to_string(),
        })?;
        linkmesh_agent::fs::fsync_dir(&dir).map_err(|e| FormatError::Record {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        tracing::info!(path = %plain.display(), "Removed the plaintext CA key (sealed with the server secret now)");
    }
    Ok(())
}

/// Whether `dir` holds a sealed CA key (for `init` on an existing state).
pub fn has_sealed_key(dir: &Path) -> bool {
    dir.join(ca::SEALED_KEY).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_go_forward_one_format_at_a_time_and_never_back() {
        assert_eq!(plan(1), Ok(vec![(1, 2)]));
        assert_eq!(plan(CURRENT), Ok(vec![]));
        assert_eq!(plan(CURRENT + 1), Err(CURRENT + 1));
    }
}
