//! The generated gRPC API (`src/proto/linkmesh/v1/fleet.proto`), checked in so
//! that no build needs `protoc`; `tests/proto_bootstrap.rs` keeps it current.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!("proto/gen/linkmesh.v1.rs");

pub use fleet_client::FleetClient as Client;
#[cfg(feature = "server")]
pub use fleet_server::{Fleet, FleetServer as Server};
