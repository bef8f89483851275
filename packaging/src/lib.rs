//! Builds the linkmesh-agent .deb and .rpm from `packaging/package.toml`.
#![forbid(unsafe_code)]

pub mod deb;
pub mod rpm;
pub mod spec;

/// Lower-case hex of a digest, as md5sums and .sha256 files write it.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
