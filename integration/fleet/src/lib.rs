//! The reference LinkMesh fleet server (`linkmesh-fleet`): the control plane
//! the agent enrols with and reports to, over the same gRPC and OpAMP an
//! operator's server speaks.
//!
//! Where things live:
//! - [`server`]: the network edge (TLS listener, downloads, the one-liner) and
//!   [`service`]: the gRPC API behind it (enrol, report, renew, re-key, info);
//! - [`opamp`]: the OpAMP endpoint the supervisors connect to; [`peer`]: what
//!   the edge tells both about a request's peer;
//! - [`state`]: hosts, tokens and serve records on disk, with [`migrate`] and
//!   [`backup`];
//! - [`ca`] and [`sealed`]: the internal certificate authority and the
//!   sealing of its key; [`admission`]: who may enrol, renew or re-key;
//! - [`repository`]: the signed apt and yum repositories and their keys;
//! - [`drift`]: the fleet-drift report built from what agents send.
//!
//! The test harness (`linkmesh-integration`) depends on this crate, never the
//! other way round.

#![deny(rust_2018_idioms, missing_docs)]
#![forbid(unsafe_code)]

pub mod admission;
pub mod backup;
pub mod ca;
pub mod drift;
pub mod duplicate;
pub mod fuzzing;
pub mod migrate;
pub mod opamp;
pub mod peer;
pub mod repository;
pub mod sealed;
pub mod server;
pub mod service;
pub mod state;
pub mod text;
