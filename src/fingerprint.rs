//! The host's fingerprint: which machine an identity belongs to.
//!
//! Inputs, each as an app-specific HMAC (see [`crate::host::id_hash`]; the
//! raw ids never leave the host):
//! - `/etc/machine-id`: made once per installation, kept across reboots,
//!   kernel and package upgrades and NIC changes, restored with a snapshot
//!   of the same machine; regenerated on a clone when the image was
//!   generalised (or by `systemd-machine-id-setup`).
//! - the DMI product UUID (`/sys/class/dmi/id/product_uuid`, root only):
//!   the hypervisor's or the board's id of the machine, new for every VM
//!   clone, the same after a snapshot restore, a reboot or a disk move; not
//!   there on every machine (containers, some boards, non-root).
//!
//! Left out on purpose: MAC addresses (a NIC change is not a clone), the
//! hostname (renamed legitimately, often the same on clones), the root
//! filesystem's UUID (copied with the disk), CPU and memory (change on
//! resize and migration), the boot id (new on every boot: it tells two
//! running copies apart on the server, not a clone at start).
//!
//! A clone is a machine whose machine-id differs from the one recorded with
//! its identity, or whose product UUID differs when both are known. The
//! record (`STATE/fingerprint.json`) is written at enrolment and re-key;
//! an identity without one (enrolled by an older agent) records the machine
//! it first runs on.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The record's file in the state directory.
pub const FILE: &str = "fingerprint.json";
/// Written once the collector's copied OpAMP instance uid was reset on a
/// clone: for which identity and which machine.
pub const RESET_FILE: &str = "clone-reset.json";
/// The supervisor's file holding the collector's OpAMP instance uid,
/// relative to the state directory.
pub const INSTANCE_UID_FILE: &str = "supervisor/persistent_state.yaml";

/// This machine's fingerprint inputs, hashed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// HMAC of the machine-id, hex (empty: none).
    pub machine_id_hash: String,
    /// HMAC of the DMI product UUID, hex (empty: unreadable).
    #[serde(default)]
    pub product_uuid_hash: String,
}

impl Machine {
    /// The hashes in `facts`.
    pub fn of(facts: &crate::host::HostFacts) -> Self {
        Self {
            machine_id_hash: facts.machine_id_hash.clone(),
            product_uuid_hash: facts.product_uuid_hash.clone(),
        }
    }

    /// This machine's, read now.
    pub fn now() -> Self {
        let (machine_id_hash, product_uuid_hash) = crate::host::machine_hashes();
        Self {
            machine_id_hash,
            product_uuid_hash,
        }
    }
}

/// The fingerprint recorded with an identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// The identity it belongs to.
    pub host_id: String,
    /// HMAC of the machine-id, hex (empty: none).
    pub machine_id_hash: String,
    /// HMAC of the DMI product UUID, hex (empty: unreadable).
    #[serde(default)]
    pub product_uuid_hash: String,
}

/// This machine against the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The machine the identity was recorded on.
    Same,
    /// No record for this identity yet: record this machine.
    Unrecorded,
    /// Another machine: the identity was copied here.
    Clone {
        /// Which input differs, for people.
        reason: String,
    },
}

/// Compares this machine's hashes with the record for `host_id`. Pure.
pub fn judge(
    recorded: Option<&Recorded>,
    host_id: &str,
    machine_id_hash: &str,
    product_uuid_hash: &str,
) -> Verdict {
    let Some(r) = recorded.filter(|r| r.host_id == host_id) else {
        return Verdict::Unrecorded;
    };
    if !r.machine_id_hash.is_empty() && r.machine_id_hash != machine_id_hash {
        return Verdict::Clone {
            reason: "its machine-id differs from the one this identity was enrolled on".into(),
        };
    }
    if !r.product_uuid_hash.is_empty()
        && !product_uuid_hash.is_empty()
        && r.product_uuid_hash != product_uuid_hash
    {
        return Verdict::Clone {
            reason: "its DMI product UUID differs from the one this identity was enrolled on"
                .into(),
        };
    }
    Verdict::Same
}

/// Where an identity stands on this machine: the record in `state_dir`
/// against `machine`.
pub fn check(state_dir: &Path, host_id: &str, machine: &Machine) -> Verdict {
    judge(
        read(state_dir).as_ref(),
        host_id,
        &machine.machine_id_hash,
        &machine.product_uuid_hash,
    )
}

/// The uid reset a clone made, for which identity and machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Reset {
    host_id: String,
    #[serde(flatten)]
    machine: Machine,
}

/// Removes the collector's OpAMP instance uid copied with the disk, once
/// per copied identity and machine (so the uid the supervisor makes next
/// is kept), and records that it did. Returns whether it removed one now.
///
/// # Errors
/// When the uid or the record cannot be removed or written.
pub fn reset_copied_uid(
    state_dir: &Path,
    host_id: &str,
    machine: &Machine,
) -> Result<bool, crate::upgrade::RecordError> {
    let done = Reset {
        host_id: host_id.to_owned(),
        machine: machine.clone(),
    };
    let marker = state_dir.join(RESET_FILE);
    if crate::upgrade::read_json::<Reset>(&marker).ok().flatten() == Some(done.clone()) {
        return Ok(false);
    }
    let uid = state_dir.join(INSTANCE_UID_FILE);
    let removed = match std::fs::remove_file(&uid) {
        Ok(()) => {
            if let Some(dir) = uid.parent() {
                crate::fs::fsync_dir(dir)?;
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(crate::fs::FsError::new("remove", &uid, e).into());
        }
    };
    crate::upgrade::write_json(&marker, &done)?;
    Ok(removed)
}

/// The collector may not start yet: this machine is a copy of `host_id`
/// whose copied OpAMP instance uid the agent has not reset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "this machine is a copy of host {host_id} ({reason}); the collector starts once linkmesh-agent has reset the copied OpAMP instance uid"
)]
pub struct CopyPending {
    /// The host the identity belongs to.
    pub host_id: String,
    /// Why this machine is another (the fingerprint that differs).
    pub reason: String,
}

/// Whether the collector runtime's unit may start now: not on a clone
/// whose copied instance uid the agent has not reset yet (its unit would
/// otherwise connect as the original's collector before the agent runs).
/// Pure but for reading the two records.
pub fn collector_may_start(state_dir: &Path, machine: &Machine) -> Result<(), CopyPending> {
    let Some(recorded) = read(state_dir) else {
        return Ok(());
    };
    let host_id = recorded.host_id.clone();
    match judge(
        Some(&recorded),
        &host_id,
        &machine.machine_id_hash,
        &machine.product_uuid_hash,
    ) {
        Verdict::Same | Verdict::Unrecorded => Ok(()),
        Verdict::Clone { reason } => {
            let reset = crate::upgrade::read_json::<Reset>(&state_dir.join(RESET_FILE))
                .ok()
                .flatten();
            if reset
                == Some(Reset {
                    host_id: host_id.clone(),
                    machine: machine.clone(),
                })
            {
                Ok(())
            } else {
                Err(CopyPending { host_id, reason })
            }
        }
    }
}

/// The record in `state_dir`, if readable.
pub fn read(state_dir: &Path) -> Option<Recorded> {
    crate::upgrade::read_json(&state_dir.join(FILE))
        .ok()
        .flatten()
}

/// Records this machine's fingerprint for `host_id` (atomically).
///
/// # Errors
/// When it cannot be written.
pub fn write(
    state_dir: &Path,
    host_id: &str,
    machine: &Machine,
) -> Result<(), crate::upgrade::RecordError> {
    crate::upgrade::write_json(
        &state_dir.join(FILE),
        &Recorded {
            host_id: host_id.to_owned(),
            machine_id_hash: machine.machine_id_hash.clone(),
            product_uuid_hash: machine.product_uuid_hash.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(mid: &str, uuid: &str) -> Recorded {
        Recorded {
            host_id: "h".into(),
            machine_id_hash: mid.into(),
            product_uuid_hash: uuid.into(),
        }
    }

    #[test]
    fn a_new_machine_id_or_product_uuid_is_a_clone_and_nothing_else_is() {
        let r = rec("m1", "u1");
        assert_eq!(judge(Some(&r), "h", "m1", "u1"), Verdict::Same);
        // Reboot, kernel upgrade, NIC change, snapshot restore: same ids.
        assert_eq!(
            judge(Some(&r), "h", "m1", ""),
            Verdict::Same,
            "UUID unreadable now"
        );
        assert!(matches!(
            judge(Some(&r), "h", "m2", "u1"),
            Verdict::Clone { .. }
        ));
        let Verdict::Clone { reason } = judge(Some(&r), "h", "m1", "u2") else {
            panic!("a new product UUID is a clone");
        };
        assert!(reason.contains("product UUID"), "{reason}");
        assert_eq!(
            judge(Some(&rec("m1", "")), "h", "m1", "u9"),
            Verdict::Same,
            "no UUID at enrolment: machine-id decides"
        );
        assert_eq!(judge(None, "h", "m1", "u1"), Verdict::Unrecorded);
        assert_eq!(
            judge(Some(&r), "another-host", "m2", "u2"),
            Verdict::Unrecorded,
            "a record of an older identity does not count"
        );
    }

    #[test]
    fn the_copied_uid_is_reset_once_per_copy_and_the_collector_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let here = Machine {
            machine_id_hash: "m1".into(),
            product_uuid_hash: "u1".into(),
        };
        let elsewhere = Machine {
            machine_id_hash: "m2".into(),
            product_uuid_hash: "u2".into(),
        };
        // No record (never enrolled, or an older agent): it starts.
        assert_eq!(collector_may_start(state, &elsewhere), Ok(()));
        write(state, "h", &here).unwrap();
        assert_eq!(collector_may_start(state, &here), Ok(()));
        // The disk copied elsewhere: not before the reset.
        let uid = state.join(INSTANCE_UID_FILE);
        std::fs::create_dir_all(uid.parent().unwrap()).unwrap();
        std::fs::write(&uid, "instance_id: copied\n").unwrap();
        let why = collector_may_start(state, &elsewhere).unwrap_err();
        assert_eq!(why.host_id, "h");
        assert!(why.to_string().contains("copy of host h ("), "{why}");
        assert!(reset_copied_uid(state, "h", &elsewhere).unwrap());
        assert!(!uid.exists());
        assert_eq!(collector_may_start(state, &elsewhere), Ok(()));
        // The uid the supervisor makes next is kept: once per copy.
        std::fs::write(&uid, "instance_id: its own\n").unwrap();
        assert!(!reset_copied_uid(state, "h", &elsewhere).unwrap());
        assert!(uid.exists());
        // A copy of that copy (another machine again) is reset again.
        let third = Machine {
            machine_id_hash: "m3".into(),
            product_uuid_hash: String::new(),
        };
        assert!(collector_may_start(state, &third).is_err());
        assert!(reset_copied_uid(state, "h", &third).unwrap());
    }
}
