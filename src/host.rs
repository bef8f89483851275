//! Facts about the host sent at enrolment: hostname, os-release, kernel,
//! architecture, and an application-specific hash of the machine id (the raw
//! machine id never leaves the host).

use std::path::Path;

use crate::proto;

/// Key of the machine-id hash, so that LinkMesh's id for a machine cannot be
/// correlated with other applications' (systemd's app-specific id idea).
const APP_ID: &[u8] = b"linkmesh-agent/7c1f0b9e3d2a4e58";

/// What the agent knows about its host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// The kernel's host name.
    pub hostname: String,
    /// From os-release.
    pub os: OsRelease,
    /// `uname -r`.
    pub kernel_release: String,
    /// CPU architecture, Rust's name (`x86_64`, `aarch64`).
    pub arch: String,
    /// HMAC-SHA256 of the machine id, hex; empty when there is no machine id.
    pub machine_id_hash: String,
    /// HMAC-SHA256 of the DMI product UUID, hex; empty where unreadable
    /// (not root, no DMI, or a placeholder UUID).
    pub product_uuid_hash: String,
    /// HMAC-SHA256 of this boot's id, hex.
    pub boot_id_hash: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// Boot time, Unix seconds.
    pub boot_time_unix: i64,
}

/// The fields of os-release the agent uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID`, e.g. `debian`.
    pub id: String,
    /// `ID_LIKE`, e.g. `rhel fedora`.
    pub id_like: String,
    /// `VERSION_ID`, e.g. `12`.
    pub version_id: String,
    /// `PRETTY_NAME`.
    pub pretty_name: String,
}

/// Parses os-release text (shell-style `KEY=value`, values optionally quoted).
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut os = OsRelease::default();
    for (k, v) in crate::kv::assignments(text) {
        match k.as_str() {
            "ID" => os.id = v,
            "ID_LIKE" => os.id_like = v,
            "VERSION_ID" => os.version_id = v,
            "PRETTY_NAME" => os.pretty_name = v,
            _ => {}
        }
    }
    os
}

/// The application-specific hash of a machine id (32 hex digits expected);
/// `None` for an empty or malformed id.
pub fn machine_id_hash(machine_id: &str) -> Option<String> {
    id_hash(machine_id)
}

/// The application-specific hash of a 128-bit id written as 32 hex digits,
/// with or without the dashes of a UUID (`/etc/machine-id`, the DMI product
/// UUID, the boot id); `None` for an empty, malformed or placeholder id (all
/// zeros or all ones, which firmware writes when it has none).
pub fn id_hash(text: &str) -> Option<String> {
    let id: String = text.trim().chars().filter(|c| *c != '-').collect();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if id.bytes().all(|b| b == b'0') || id.bytes().all(|b| b == b'f' || b == b'F') {
        return None;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, id.to_ascii_lowercase().as_bytes());
    Some(crate::hex::encode(ring::hmac::sign(&key, APP_ID).as_ref()))
}

/// The kernel's host name now (empty when it cannot be read).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// The hashes of this machine's machine-id and DMI product UUID (each
/// empty when unreadable), read now: the fingerprint's inputs.
pub fn machine_hashes() -> (String, String) {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    (
        read("/etc/machine-id")
            .and_then(|m| machine_id_hash(&m))
            .unwrap_or_default(),
        read("/sys/class/dmi/id/product_uuid")
            .and_then(|u| id_hash(&u))
            .unwrap_or_default(),
    )
}

/// Reads the facts from the running host.
pub fn collect() -> HostFacts {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind};
    // Facts are best effort: a host where sysinfo cannot read them reports zeros.
    let sys = sysinfo::System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .ok();
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    let os = read("/etc/os-release")
        .or_else(|| read("/usr/lib/os-release"))
        .map(|t| parse_os_release(&t));
    let (machine_id_hash, product_uuid_hash) = machine_hashes();
    HostFacts {
        hostname: hostname(),
        os: os.unwrap_or_default(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.to_owned(),
        machine_id_hash,
        product_uuid_hash,
        boot_id_hash: read("/proc/sys/kernel/random/boot_id")
            .and_then(|b| id_hash(&b))
            .unwrap_or_default(),
        cpus: sys
            .as_ref()
            .map_or(0, |s| u32::try_from(s.cpus().len()).unwrap_or(u32::MAX)),
        memory_bytes: sys.as_ref().map_or(0, sysinfo::System::total_memory),
        boot_time_unix: sysinfo::System::boot_time()
            .ok()
            .and_then(|t| i64::try_from(t).ok())
            .unwrap_or(0),
    }
}

impl From<&HostFacts> for proto::HostFacts {
    fn from(h: &HostFacts) -> Self {
        proto::HostFacts {
            hostname: h.hostname.clone(),
            os_id: h.os.id.clone(),
            os_version: h.os.version_id.clone(),
            os_pretty_name: h.os.pretty_name.clone(),
            kernel_release: h.kernel_release.clone(),
            arch: h.arch.clone(),
            machine_id_hash: h.machine_id_hash.clone(),
            cpus: h.cpus,
            memory_bytes: h.memory_bytes,
            boot_time_unix: h.boot_time_unix,
            product_uuid_hash: h.product_uuid_hash.clone(),
            boot_id_hash: h.boot_id_hash.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_os_release() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n# comment\nID_LIKE='rhel fedora'\n",
        );
        assert_eq!(os.id, "debian");
        assert_eq!(os.version_id, "12");
        assert_eq!(os.pretty_name, "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os.id_like, "rhel fedora");
    }

    #[test]
    fn machine_id_is_hashed_not_sent() {
        let id = "0123456789abcdef0123456789abcdef";
        let h = machine_id_hash(id).unwrap();
        assert_eq!(h.len(), 64);
        assert!(!h.contains(id));
        assert_eq!(machine_id_hash(&id.to_ascii_uppercase()), Some(h));
        assert_eq!(machine_id_hash(""), None);
        assert_eq!(machine_id_hash("uninitialized"), None);
        // A UUID hashes like the same 32 digits; placeholders hash to nothing.
        assert_eq!(
            id_hash("01234567-89AB-CDEF-0123-456789ABCDEF"),
            machine_id_hash(id)
        );
        assert_eq!(id_hash("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(id_hash("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"), None);
    }
}

#[cfg(test)]
mod host_tests {
    #[test]
    fn collects_real_facts() {
        let h = super::collect();
        assert!(h.cpus >= 1, "{h:?}");
        assert!(h.memory_bytes > 1 << 20, "{h:?}");
        assert!(h.boot_time_unix > 1_000_000_000, "{h:?}");
        assert!(!h.kernel_release.is_empty());
    }
}
