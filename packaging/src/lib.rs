//! Builds the linkmesh-agent .deb and .rpm from `packaging/package.toml`.
#![forbid(unsafe_code)]

pub mod deb;
pub mod rpm;
pub mod spec;
