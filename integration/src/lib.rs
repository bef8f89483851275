//! The harness the end-to-end tests, the demo and the benchmark drive the
//! real `linkmesh-agent` and the reference fleet server (`linkmesh-fleet`,
//! its own crate in `fleet/`) with: scratch directories, the server and
//! agents as processes, the real runtimes, throw-away hosts booting systemd,
//! and the continuity drill.

#![deny(rust_2018_idioms, missing_docs)]
#![forbid(unsafe_code)]

pub mod drill;
pub mod harness;
pub mod testhost;
