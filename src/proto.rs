//! The generated gRPC API (`src/proto/linkmesh/v1/fleet.proto`), checked in so
//! that no build needs `protoc`; `tests/proto_bootstrap.rs` keeps it current.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!("proto/gen/linkmesh.v1.rs");

pub use fleet_client::FleetClient as Client;
#[cfg(feature = "server")]
pub use fleet_server::{Fleet, FleetServer as Server};

impl SkewPolicy {
    /// The skew window a server's answer sets: its minor versions behind,
    /// or the agent's default when it sends no policy.
    pub fn window(policy: Option<&SkewPolicy>) -> u32 {
        policy.map_or(crate::version::DEFAULT_MINOR_VERSIONS_BEHIND, |p| {
            p.minor_versions_behind
        })
    }
}
