//! One supervisor's OpAMP connection as pure logic: what an `AgentToServer`
//! changes in the host's record, what the server answers, when it pushes a
//! remote configuration, and which messages it refuses. No I/O, no clock.

use crate::{
    opamp::{
        store::RemoteConfig,
        wire::{
            AgentRemoteConfig, AgentToServer, ERROR_BAD_REQUEST, FLAG_REPORT_FULL_STATE,
            SERVER_CAPABILITIES, ServerErrorResponse, ServerToAgent,
        },
    },
    state::OpampRecord,
};

/// The identifying attribute that ties a collector to its host.
pub const HOST_ID_ATTRIBUTE: &str = "linkmesh.host.id";
/// The non-identifying attribute of a clone's collector whose own identity
/// is pending (the agent's `supervisor::render::CLONE_OF_ATTRIBUTE`).
pub const CLONE_OF_ATTRIBUTE: &str = linkmesh_agent::supervisor::render::CLONE_OF_ATTRIBUTE;

/// Why a message was refused; the connection is closed after it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl Refusal {
    /// The error response sent before closing.
    pub fn response(&self, instance_uid: &[u8]) -> ServerToAgent {
        ServerToAgent {
            instance_uid: instance_uid.to_vec(),
            error_response: Some(ServerErrorResponse {
                r#type: ERROR_BAD_REQUEST,
                error_message: self.0.clone(),
            }),
            ..Default::default()
        }
    }
}

/// The server's side of one connection.
#[derive(Clone, Debug)]
pub struct Session {
    host_id: String,
    instance_uid: Option<Vec<u8>>,
    last_sequence: Option<u64>,
    described: bool,
    sent_hash: Option<[u8; 32]>,
}

impl Session {
    /// A connection whose client certificate names `host_id`.
    pub fn new(host_id: &str) -> Self {
        Self {
            host_id: host_id.to_owned(),
            instance_uid: None,
            last_sequence: None,
            described: false,
            sent_hash: None,
        }
    }

    /// The collector's instance uid, once known.
    pub fn instance_uid(&self) -> Option<&[u8]> {
        self.instance_uid.as_deref()
    }

    /// Applies `msg` to `record` and returns the answer. Nothing in
    /// `record` changes when the message is refused.
    ///
    /// # Errors
    /// [`Refusal`] for a malformed uid, a uid that changes within the
    /// connection, or a description naming another host (or none).
    pub fn on_message(
        &mut self,
        msg: &AgentToServer,
        record: &mut OpampRecord,
        desired: Option<&RemoteConfig>,
        now_unix: i64,
    ) -> Result<ServerToAgent, Refusal> {
        if msg.instance_uid.len() != 16 {
            return Err(Refusal(format!(
                "instance_uid must be 16 bytes, got {}",
                msg.instance_uid.len()
            )));
        }
        if let Some(uid) = &self.instance_uid
            && *uid != msg.instance_uid
        {
            return Err(Refusal(format!(
                "instance_uid changed within one connection (from {} to {})",
                uuid_string(uid),
                uuid_string(&msg.instance_uid)
            )));
        }
        let mut next = record.clone();
        if let Some(d) = &msg.agent_description {
            match d.identifying(HOST_ID_ATTRIBUTE) {
                Some(h) if h == self.host_id => {}
                Some(h) => {
                    return Err(Refusal(format!(
                        "the agent description claims host {h} but the client certificate is for host {}",
                        self.host_id
                    )));
                }
                None => {
                    return Err(Refusal(format!(
                        "the agent description has no {HOST_ID_ATTRIBUTE} identifying attribute"
                    )));
                }
            }
            next.collector_name = d.identifying("service.name").unwrap_or_default();
            next.collector_version = d.identifying("service.version").unwrap_or_default();
        }
        let full_state_needed = (!self.described && msg.agent_description.is_none())
            || self
                .last_sequence
                .is_some_and(|s| msg.sequence_num != s.wrapping_add(1));
        next.instance_uid = uuid_string(&msg.instance_uid);
        next.sequence_num = msg.sequence_num;
        next.last_message_at = now_unix;
        if let Some(h) = &msg.health {
            next.healthy = Some(h.healthy);
            next.last_error = h.last_error.clone();
            next.started_at_unix_nano = h.start_time_unix_nano;
        }
        if let Some(e) = &msg.effective_config {
            next.effective_config_hash = effective_config_hash(e);
        }
        if let Some(s) = &msg.remote_config_status {
            next.reported_config_hash = linkmesh_agent::hex::encode(&s.last_remote_config_hash);
            next.reported_config_status = status_word(s.status).to_owned();
            next.reported_config_error = s.error_message.clone();
        }

        self.instance_uid = Some(msg.instance_uid.clone());
        self.last_sequence = Some(msg.sequence_num);
        self.described |= msg.agent_description.is_some();
        let remote_config = self.offer(&next, desired);
        *record = next;
        Ok(ServerToAgent {
            instance_uid: msg.instance_uid.clone(),
            remote_config,
            flags: if full_state_needed {
                FLAG_REPORT_FULL_STATE
            } else {
                0
            },
            capabilities: SERVER_CAPABILITIES,
            ..Default::default()
        })
    }

    /// The message to push when the desired configuration changed, if any.
    pub fn on_config_change(
        &mut self,
        record: &OpampRecord,
        desired: Option<&RemoteConfig>,
    ) -> Option<ServerToAgent> {
        let uid = self.instance_uid.clone()?;
        let remote_config = self.offer(record, desired)?;
        Some(ServerToAgent {
            instance_uid: uid,
            remote_config: Some(remote_config),
            capabilities: SERVER_CAPABILITIES,
            ..Default::default()
        })
    }

    /// The remote configuration to send: the desired one, unless the agent
    /// already has it or this connection already sent it.
    fn offer(
        &mut self,
        record: &OpampRecord,
        desired: Option<&RemoteConfig>,
    ) -> Option<AgentRemoteConfig> {
        let d = desired?;
        if record.reported_config_hash == d.hash_hex() || self.sent_hash == Some(d.hash) {
            return None;
        }
        self.sent_hash = Some(d.hash);
        Some(d.to_wire())
    }
}

/// `RemoteConfigStatuses` as the server shows it.
pub fn status_word(status: i32) -> &'static str {
    match status {
        1 => "applied",
        2 => "applying",
        3 => "failed",
        _ => "unset",
    }
}

/// Where a host's remote configuration stands: the agent's own report when
/// it concerns the desired configuration, else `applying` (sent or to be
/// sent on connect), and `none` when the fleet sets none.
pub fn config_status(record: Option<&OpampRecord>, desired_hash: Option<&str>) -> &'static str {
    match (record, desired_hash) {
        (Some(r), Some(h)) if r.reported_config_hash == h => {
            match r.reported_config_status.as_str() {
                "applied" => "applied",
                "failed" => "failed",
                _ => "applying",
            }
        }
        (_, Some(_)) => "applying",
        (Some(r), None) if !r.reported_config_status.is_empty() => {
            match r.reported_config_status.as_str() {
                "applied" => "applied",
                "failed" => "failed",
                "applying" => "applying",
                _ => "none",
            }
        }
        _ => "none",
    }
}

/// [`config_status`] with the collector's reason when it failed (empty otherwise).
pub fn config_standing(
    record: Option<&OpampRecord>,
    desired_hash: Option<&str>,
) -> (&'static str, String) {
    let status = config_status(record, desired_hash);
    let error = match record {
        Some(r) if status == "failed" => r.reported_config_error.clone(),
        _ => String::new(),
    };
    (status, error)
}

/// SHA-256 over the effective configuration's files in name order.
fn effective_config_hash(e: &crate::opamp::wire::EffectiveConfig) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    if let Some(m) = &e.config_map {
        let mut names: Vec<&String> = m.config_map.keys().collect();
        names.sort();
        for n in names {
            ctx.update(n.as_bytes());
            ctx.update(&[0]);
            if let Some(f) = m.config_map.get(n) {
                ctx.update(&(f.body.len() as u64).to_be_bytes());
                ctx.update(&f.body);
            }
        }
    }
    linkmesh_agent::hex::encode(ctx.finish().as_ref())
}

/// 16 bytes as a canonical UUID string (hex otherwise).
pub fn uuid_string(b: &[u8]) -> String {
    match <[u8; 16]>::try_from(b) {
        Ok(a) => linkmesh_agent::clock::uuid_string(&a),
        Err(_) => linkmesh_agent::hex::encode(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opamp::wire::{
        AgentDescription, AnyValue, ComponentHealth, KeyValue, RemoteConfigStatus, any_value,
    };

    const HOST: &str = "0b6c1a9e-4f1d-4d0e-9a51-2f3c6c1f0e77";

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::String(v.into())),
            }),
        }
    }

    fn first(host: &str) -> AgentToServer {
        AgentToServer {
            instance_uid: vec![1; 16],
            sequence_num: 0,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![
                    kv("service.name", "otelcol-linkmesh"),
                    kv("service.version", "0.158.0"),
                    kv(HOST_ID_ATTRIBUTE, host),
                ],
                non_identifying_attributes: vec![],
            }),
            health: Some(ComponentHealth {
                healthy: false,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn config(body: &str) -> RemoteConfig {
        RemoteConfig::new(body.as_bytes().to_vec())
    }

    #[test]
    fn records_the_collector_and_sends_the_desired_config_once() {
        let mut s = Session::new(HOST);
        let mut rec = OpampRecord::default();
        let c = config("receivers: {}\n");
        let reply = s.on_message(&first(HOST), &mut rec, Some(&c), 100).unwrap();
        assert_eq!(reply.instance_uid, vec![1; 16]);
        assert_eq!(reply.capabilities, SERVER_CAPABILITIES);
        assert_eq!(reply.flags, 0);
        let sent = reply.remote_config.unwrap();
        assert_eq!(sent.config_hash, c.hash.to_vec());
        assert_eq!(
            sent.config.unwrap().config_map[""].body,
            b"receivers: {}\n".to_vec()
        );
        assert_eq!(
            (rec.collector_name.as_str(), rec.collector_version.as_str()),
            ("otelcol-linkmesh", "0.158.0")
        );
        assert_eq!(rec.instance_uid, "01010101-0101-0101-0101-010101010101");
        assert_eq!(rec.healthy, Some(false));
        assert_eq!(config_status(Some(&rec), Some(&c.hash_hex())), "applying");

        // Not sent twice on one connection, even before the agent reports it.
        let mut m = AgentToServer {
            instance_uid: vec![1; 16],
            sequence_num: 1,
            remote_config_status: Some(RemoteConfigStatus {
                last_remote_config_hash: c.hash.to_vec(),
                status: 2,
                error_message: String::new(),
            }),
            ..Default::default()
        };
        let reply = s.on_message(&m, &mut rec, Some(&c), 101).unwrap();
        assert!(reply.remote_config.is_none());
        assert_eq!(config_status(Some(&rec), Some(&c.hash_hex())), "applying");
        m.sequence_num = 2;
        m.remote_config_status.as_mut().unwrap().status = 1;
        m.health = Some(ComponentHealth {
            healthy: true,
            start_time_unix_nano: 5,
            ..Default::default()
        });
        s.on_message(&m, &mut rec, Some(&c), 102).unwrap();
        assert_eq!(config_status(Some(&rec), Some(&c.hash_hex())), "applied");
        assert_eq!((rec.healthy, rec.started_at_unix_nano), (Some(true), 5));

        // A new desired config is pushed; a reconnecting agent that already
        // runs it is not sent it again.
        let c2 = config("receivers: {otlp: {}}\n");
        let push = s.on_config_change(&rec, Some(&c2)).unwrap();
        assert_eq!(push.remote_config.unwrap().config_hash, c2.hash.to_vec());
        assert!(s.on_config_change(&rec, Some(&c2)).is_none());
        let mut fresh = Session::new(HOST);
        let reply = fresh
            .on_message(&first(HOST), &mut rec, Some(&c), 103)
            .unwrap();
        assert!(reply.remote_config.is_none(), "agent reports it has c");
    }

    #[test]
    fn refusals_change_nothing() {
        let mut s = Session::new(HOST);
        let mut rec = OpampRecord::default();
        let err = s
            .on_message(&first("another-host"), &mut rec, None, 1)
            .unwrap_err();
        assert!(err.0.contains("claims host another-host"), "{err}");
        assert_eq!(rec, OpampRecord::default());

        let mut no_host = first(HOST);
        no_host
            .agent_description
            .as_mut()
            .unwrap()
            .identifying_attributes
            .retain(|kv| kv.key != HOST_ID_ATTRIBUTE);
        let err = s.on_message(&no_host, &mut rec, None, 1).unwrap_err();
        assert!(err.0.contains("no linkmesh.host.id"), "{err}");

        let mut short = first(HOST);
        short.instance_uid = vec![1; 4];
        assert!(s.on_message(&short, &mut rec, None, 1).is_err());
        assert_eq!(rec, OpampRecord::default());

        s.on_message(&first(HOST), &mut rec, None, 1).unwrap();
        let mut other = first(HOST);
        other.instance_uid = vec![2; 16];
        other.sequence_num = 1;
        let before = rec.clone();
        assert!(s.on_message(&other, &mut rec, None, 2).is_err());
        assert_eq!(rec, before);
        let r = err.response(&[1; 16]);
        assert_eq!(r.error_response.unwrap().r#type, ERROR_BAD_REQUEST);
    }

    #[test]
    fn gaps_and_missing_descriptions_ask_for_full_state() {
        let mut s = Session::new(HOST);
        let mut rec = OpampRecord::default();
        let bare = AgentToServer {
            instance_uid: vec![1; 16],
            sequence_num: 4,
            ..Default::default()
        };
        let r = s.on_message(&bare, &mut rec, None, 1).unwrap();
        assert_eq!(r.flags, FLAG_REPORT_FULL_STATE);
        let mut m = first(HOST);
        m.sequence_num = 5;
        assert_eq!(s.on_message(&m, &mut rec, None, 1).unwrap().flags, 0);
        m.sequence_num = 9;
        assert_eq!(
            s.on_message(&m, &mut rec, None, 1).unwrap().flags,
            FLAG_REPORT_FULL_STATE
        );
    }

    #[test]
    fn failed_configs_keep_the_collectors_reason() {
        let mut rec = OpampRecord {
            reported_config_hash: "ab".into(),
            reported_config_status: "failed".into(),
            reported_config_error: "unknown type: \"nosuch\"".into(),
            ..Default::default()
        };
        assert_eq!(config_status(Some(&rec), Some("ab")), "failed");
        assert_eq!(
            config_standing(Some(&rec), Some("ab")),
            ("failed", "unknown type: \"nosuch\"".to_owned())
        );
        assert_eq!(
            config_standing(Some(&rec), Some("cd")),
            ("applying", String::new())
        );
        assert_eq!(config_status(Some(&rec), Some("cd")), "applying");
        assert_eq!(config_status(None, Some("cd")), "applying");
        assert_eq!(config_status(None, None), "none");
        rec.reported_config_status = "unset".into();
        assert_eq!(config_status(Some(&rec), None), "none");
        assert_eq!(status_word(3), "failed");
    }
}
