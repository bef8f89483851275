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
    facts: &crate::host::HostFacts,
) -> Result<(), crate::upgrade::RecordError> {
    crate::upgrade::write_json(
        &state_dir.join(FILE),
        &Recorded {
            host_id: host_id.to_owned(),
            machine_id_hash: facts.machine_id_hash.clone(),
            product_uuid_hash: facts.product_uuid_hash.clone(),
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
}
