//! The reference LinkMesh fleet server (`linkmesh-fleet`) and the harness the
//! end-to-end tests, the demo and the benchmarks drive it with.

#![deny(rust_2018_idioms, missing_docs)]
#![forbid(unsafe_code)]

pub mod admission;
pub mod backup;
pub mod ca;
pub mod drift;
pub mod drill;
pub mod duplicate;
pub mod fuzzing;
pub mod harness;
pub mod migrate;
pub mod opamp;
pub mod repository;
pub mod sealed;
pub mod server;
pub mod service;
pub mod state;
pub mod testhost;
pub mod text;
