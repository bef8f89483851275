//! `linkmesh-agent server-first --to VERSION`: the I/O around
//! [`super::judge`]. The server's version comes from ServerInfo over TLS
//! verified against the fleet CA (the one given, or the identity's), else
//! from the agent's record; it never writes anything.

use std::{path::Path, sync::Arc, time::Duration};

use super::{ServerSide, Source, read_record};
use crate::{
    endpoint::ServerUrl,
    identity::{IdentityStore, store::StoreError},
    proto,
    tls::{Trust, enrol_client_config},
    version::{Version, VersionError},
};

/// Whom to ask.
#[derive(Clone, Debug)]
pub struct Ask {
    /// The server.
    pub server: ServerUrl,
    /// How to verify it.
    pub trust: Trust,
}

/// The server and CA of this host's identity, when it is enrolled; what
/// went wrong reading it otherwise (`Ok(None)`: not enrolled).
///
/// # Errors
/// Why the identity could not be read.
pub fn ask_from_identity(state_dir: &Path) -> Result<Option<Ask>, StoreError> {
    let store = IdentityStore::new(state_dir);
    let Some(lock) = store.lock_shared()? else {
        return Ok(None);
    };
    let id = store.load(&lock)?;
    Ok(id.map(|id| Ask {
        server: id.server.clone(),
        trust: Trust::CaCerts(vec![id.ca.clone()]),
    }))
}

/// What is known of the server's version: asked (`ask`), else recorded in
/// `state_dir` for that server; with notes on what failed on the way.
pub fn server_side(
    ask: Option<&Ask>,
    state_dir: &Path,
    proxy_url: Option<&str>,
    timeout: Duration,
) -> (Option<ServerSide>, Vec<String>) {
    let mut notes = Vec::new();
    let Some(ask) = ask else {
        return (None, notes);
    };
    let server = ask.server.to_string();
    let unreachable = match enrol_client_config(&ask.trust) {
        Ok(tls) => {
            match crate::check::server_info(&ask.server, Arc::new(tls), proxy_url, timeout) {
                Ok(view) => match asked(&view.info, &server) {
                    Ok(side) => return (Some(side), notes),
                    Err(e) => format!("{server} answered with {e}"),
                },
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    };
    notes.push(format!("cannot ask {server}: {unreachable}"));
    let side = recorded(state_dir, &server, unreachable, &mut notes);
    (side, notes)
}

/// The server's side from its ServerInfo answer, asked just now.
///
/// # Errors
/// When the server's version does not parse.
pub fn asked(info: &proto::ServerInfoResponse, server: &str) -> Result<ServerSide, VersionError> {
    Ok(ServerSide {
        version: info.server_version.parse()?,
        minor_versions_behind: proto::SkewPolicy::window(info.skew_policy.as_ref()),
        source: Source::Asked {
            server: server.to_owned(),
        },
    })
}

/// The server's side from the agent's record, when `server` could not be
/// asked (`unreachable` says why) and the record is about that server; what
/// kept it from being used goes to `notes`.
pub fn recorded(
    state_dir: &Path,
    server: &str,
    unreachable: String,
    notes: &mut Vec<String>,
) -> Option<ServerSide> {
    match read_record(state_dir) {
        Ok(Some(r)) if r.server == server => match r.version.parse::<Version>() {
            Ok(v) => Some(ServerSide {
                version: v,
                minor_versions_behind: r.minor_versions_behind,
                source: Source::Recorded {
                    server: server.to_owned(),
                    seen_at: crate::clock::rfc3339_unix_ms(r.seen_unix_ms),
                    unreachable,
                },
            }),
            Err(e) => {
                notes.push(format!("the recorded server version is unusable: {e}"));
                None
            }
        },
        Ok(Some(r)) => {
            notes.push(format!(
                "the recorded server version is from {}, not {server}",
                r.server
            ));
            None
        }
        Ok(None) => None,
        Err(e) => {
            notes.push(e.to_string());
            None
        }
    }
}
