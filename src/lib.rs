//! linkmesh-agent: the host side of LinkMesh. Enrols a host into a fleet,
//! supervises its OpenTelemetry collector runtime and reports versions.

#![deny(rust_2018_idioms, missing_docs, clippy::disallowed_methods)]
#![forbid(unsafe_code)]

pub mod app;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod detect;
pub mod endpoint;
pub mod enrollment;
pub mod fault;
pub mod fingerprint;
pub mod fs;
pub mod hex;
pub mod host;
pub mod identity;
pub mod image_prep;
pub mod kv;
pub mod proto;
pub mod published;
pub mod reporter;
pub mod runtime;
pub mod signal;
pub mod status;
pub mod supervisor;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod transport;
pub mod upgrade;
pub mod version;
