//! OpAMP over WebSocket at `/v1/opamp`, on the same TLS port as the agent
//! API. Only a client certificate the fleet CA issued (to a host still
//! enrolled here, and not expired) is admitted; the host id comes from that
//! certificate, and a collector describing itself as another host is
//! refused. Per host the server records what the supervisor says (see
//! [`crate::state::OpampRecord`]) and hands out the collector configuration
//! `linkmesh-fleet collector-config set` stored: at once to connected
//! supervisors, on connect to the others.

pub mod session;
pub mod store;
pub mod wire;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{
        State as AxumState,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::watch;

use crate::{peer::PeerInfo, service::FleetService, state::State};

use self::{session::Session, store::ConfigSet};

/// The path supervisors connect to.
pub const PATH: &str = "/v1/opamp";
/// Largest message accepted from a supervisor (effective configs included).
const MAX_MESSAGE: usize = 16 << 20;
/// A connection silent this long is closed: supervisors send a heartbeat
/// every 30 s.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the stored configurations are checked for changes.
const CONFIG_POLL: Duration = Duration::from_millis(100);

/// Shared by every OpAMP connection.
#[derive(Clone)]
pub struct Hub {
    service: FleetService,
    configs: watch::Receiver<Arc<ConfigSet>>,
    connections: Arc<std::sync::Mutex<HashMap<String, u32>>>,
}

impl Hub {
    /// A hub over `service`, whose configurations follow `state` (checked
    /// every 100 ms by a task this spawns).
    ///
    /// # Errors
    /// When the stored configurations cannot be read.
    pub fn start(service: FleetService, state: State) -> Result<Self, store::ConfigStoreError> {
        let (tx, configs) = watch::channel(Arc::new(ConfigSet::load(&state)?));
        service.set_configs(configs.clone());
        tokio::spawn(async move {
            let mut last = store::signature(&state);
            let mut tick = tokio::time::interval(CONFIG_POLL);
            loop {
                tick.tick().await;
                if tx.is_closed() {
                    return;
                }
                let now = store::signature(&state);
                if now == last {
                    continue;
                }
                match ConfigSet::load(&state) {
                    Ok(set) => {
                        last = now;
                        tx.send_if_modified(|old| {
                            let changed = **old != set;
                            if changed {
                                tracing::info!(
                                    fleet = set.fleet.as_ref().map(store::RemoteConfig::hash_hex),
                                    hosts = set.hosts.len(),
                                    "Collector configuration changed"
                                );
                                *old = Arc::new(set);
                            }
                            changed
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "Cannot read collector configurations"),
                }
            }
        });
        Ok(Self {
            service,
            configs,
            connections: Arc::default(),
        })
    }

    /// The `/v1/opamp` route.
    pub fn routes(self) -> axum::Router {
        axum::Router::new()
            .route(PATH, get(upgrade))
            .with_state(self)
    }

    fn connected(&self, host: &str, delta: i32) -> bool {
        let Ok(mut c) = self.connections.lock() else {
            return false;
        };
        let n = c.entry(host.to_owned()).or_default();
        *n = n.saturating_add_signed(delta);
        let now = *n > 0;
        if !now {
            c.remove(host);
        }
        now
    }
}

async fn upgrade(
    AxumState(hub): AxumState<Hub>,
    peer: Option<axum::Extension<PeerInfo>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let remote = peer.as_ref().map(|p| p.remote);
    let (host, serial) = match admit(&hub, peer.as_ref().map(|p| &p.0)).await {
        Ok(h) => h,
        Err((code, why)) => {
            tracing::warn!(?remote, status = code.as_u16(), reason = %why, "OpAMP connection refused");
            return (code, format!("{why}\n")).into_response();
        }
    };
    match ws {
        Ok(ws) => ws
            .max_message_size(MAX_MESSAGE)
            .on_upgrade(move |socket| run(hub, socket, host, serial, remote))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// The host a connection may speak for and its certificate's serial (hex,
/// as `openssl x509 -serial` prints it), or the HTTP refusal.
async fn admit(
    hub: &Hub,
    peer: Option<&PeerInfo>,
) -> Result<(String, String), (StatusCode, String)> {
    let unauthorized = |m: &str| (StatusCode::UNAUTHORIZED, m.to_owned());
    let certs = peer
        .and_then(|p| p.certs.clone())
        .ok_or_else(|| unauthorized("a client certificate issued by this fleet is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| unauthorized("empty client certificate chain"))?;
    let host = hub.service.admit(leaf, Duration::ZERO).await.map_err(|r| {
        let code = match r.standing {
            linkmesh_agent::proto::Standing::Expired
            | linkmesh_agent::proto::Standing::Unspecified => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        (code, r.message)
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|_| unauthorized("unparsable client certificate"))?;
    let serial = linkmesh_agent::hex::encode(parsed.raw_serial()).to_uppercase();
    let serial = serial.trim_start_matches("00").to_owned();
    Ok((host.to_string(), serial))
}

async fn run(
    hub: Hub,
    mut socket: WebSocket,
    host: String,
    serial: String,
    remote: Option<SocketAddr>,
) {
    let mut configs = hub.configs.clone();
    configs.mark_unchanged();
    let mut revocations = hub.service.revocations();
    revocations.mark_unchanged();
    let mut session = Session::new(&host);
    let mut counted = false;
    // A clone's collector whose own identity is still pending connects
    // over the copied certificate and says whose copy it is: answered,
    // never recorded on (or counted for) the original's row.
    let mut clone_pending = false;
    let mut scratch = crate::state::OpampRecord::default();
    tracing::info!(host_id = %host, cert_serial = %serial, ?remote, "OpAMP connection opened");
    let end = loop {
        tokio::select! {
            msg = tokio::time::timeout(IDLE_TIMEOUT, socket.recv()) => {
                let bytes = match msg {
                    Err(_) => break "idle",
                    Ok(None) => break "closed",
                    Ok(Some(Err(_))) => break "read error",
                    Ok(Some(Ok(Message::Close(_)))) => break "closed by the agent",
                    Ok(Some(Ok(Message::Binary(b)))) => b,
                    Ok(Some(Ok(Message::Text(_)))) => {
                        close(&mut socket, 1003, "OpAMP messages are binary").await;
                        break "text message";
                    }
                    Ok(Some(Ok(_))) => continue, // ping/pong, answered by the socket
                };
                let msg = match wire::decode_frame(&bytes) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(host_id = %host, error = %e, "Bad OpAMP message");
                        close(&mut socket, 1002, &e.to_string()).await;
                        break "bad message";
                    }
                };
                let desired = configs.borrow().for_host(&host).cloned();
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                if let Some(d) = &msg.agent_description {
                    let was = clone_pending;
                    clone_pending = d.non_identifying(session::CLONE_OF_ATTRIBUTE).is_some();
                    if clone_pending && !was {
                        tracing::info!(host_id = %host, "OpAMP connection of a copy of this host awaiting its own identity; kept off the host's row");
                    }
                }
                let verdict = if clone_pending {
                    Some(session.on_message(&msg, &mut scratch, desired.as_ref(), now))
                } else {
                    None
                };
                if clone_pending && counted {
                    counted = false;
                    let still = hub.connected(&host, -1);
                    hub.service.with_opamp(&host, |rec| rec.connected = still);
                }
                if !clone_pending && !counted {
                    counted = true;
                    hub.connected(&host, 1);
                }
                let verdict = verdict.or_else(|| hub.service.with_opamp(&host, |rec| {
                    let before = (rec.reported_config_hash.clone(), rec.reported_config_status.clone());
                    let out = session.on_message(&msg, rec, desired.as_ref(), now);
                    if out.is_ok() {
                        if !rec.connected {
                            rec.connected_at = now;
                        }
                        rec.connected = true;
                        if (&rec.reported_config_hash, &rec.reported_config_status) != (&before.0, &before.1)
                            && rec.reported_config_status != "unset"
                        {
                            tracing::info!(
                                host_id = %host,
                                hash = %rec.reported_config_hash,
                                status = %crate::text::safe(&rec.reported_config_status),
                                error = %crate::text::safe(&rec.reported_config_error),
                                "Remote configuration status"
                            );
                        }
                    }
                    out
                }));
                match verdict {
                    None => {
                        close(&mut socket, 1008, "host no longer enrolled").await;
                        break "host gone";
                    }
                    Some(Err(refusal)) => {
                        tracing::warn!(host_id = %host, reason = %crate::text::safe(&refusal.to_string()), "OpAMP message refused");
                        let reply = refusal.response(&msg.instance_uid);
                        let _ = socket.send(Message::Binary(wire::encode_frame(&reply).into())).await;
                        close(&mut socket, 1008, &refusal.0).await;
                        break "refused";
                    }
                    Some(Ok(reply)) => {
                        if let Some(rc) = &reply.remote_config {
                            tracing::info!(host_id = %host, hash = %linkmesh_agent::hex::encode(&rc.config_hash), "Sending remote configuration");
                        }
                        if socket.send(Message::Binary(wire::encode_frame(&reply).into())).await.is_err() {
                            break "write error";
                        }
                    }
                }
                if msg.agent_disconnect.is_some() {
                    // The agent closes the socket next; reading on sees its Close.
                    tracing::debug!(host_id = %host, "Agent announced a disconnect");
                }
            }
            changed = revocations.changed() => {
                if changed.is_err() {
                    break "server stopping";
                }
                if revocations.borrow_and_update().contains_key(&host) {
                    close(&mut socket, 1008, "host revoked: enrol again with a new token").await;
                    break "host revoked";
                }
            }
            changed = configs.changed() => {
                if changed.is_err() {
                    break "server stopping";
                }
                let desired = configs.borrow_and_update().for_host(&host).cloned();
                let push = if clone_pending {
                    session.on_config_change(&scratch, desired.as_ref())
                } else {
                    hub.service
                        .with_opamp(&host, |rec| session.on_config_change(rec, desired.as_ref()))
                        .flatten()
                };
                if let Some(push) = push {
                    tracing::info!(host_id = %host, hash = desired.as_ref().map(store::RemoteConfig::hash_hex), "Sending remote configuration");
                    if socket.send(Message::Binary(wire::encode_frame(&push).into())).await.is_err() {
                        break "write error";
                    }
                }
            }
        }
    };
    if counted {
        let still = hub.connected(&host, -1);
        hub.service.with_opamp(&host, |rec| rec.connected = still);
    }
    tracing::info!(host_id = %host, ?remote, reason = end, "OpAMP connection closed");
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    // A close reason must fit a control frame (125 bytes, 2 for the code).
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason[..end].into(),
        })))
        .await;
}
