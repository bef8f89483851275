//! The OpAMP messages the reference server reads and writes, as hand-written
//! prost structs with the tags of `opamp-spec` `proto/opamp/v1/opamp.proto`
//! (package `opamp.proto.v1`). Only the fields the server uses are declared:
//! prost skips the others. Framing over WebSocket: one binary message is a
//! varint header (0) followed by the protobuf bytes.

use std::collections::HashMap;

/// What a supervisor sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentToServer {
    /// 16 bytes, the collector's instance uid.
    #[prost(bytes = "vec", tag = "1")]
    pub instance_uid: Vec<u8>,
    /// Increases by one per message; a gap means the server missed state.
    #[prost(uint64, tag = "2")]
    pub sequence_num: u64,
    /// Set on change (and on the first message).
    #[prost(message, optional, tag = "3")]
    pub agent_description: Option<AgentDescription>,
    /// Agent capabilities bitmask.
    #[prost(uint64, tag = "4")]
    pub capabilities: u64,
    /// The collector's health.
    #[prost(message, optional, tag = "5")]
    pub health: Option<ComponentHealth>,
    /// The configuration the collector runs.
    #[prost(message, optional, tag = "6")]
    pub effective_config: Option<EffectiveConfig>,
    /// Status of the last remote configuration received.
    #[prost(message, optional, tag = "7")]
    pub remote_config_status: Option<RemoteConfigStatus>,
    /// Sent before a clean disconnect.
    #[prost(message, optional, tag = "9")]
    pub agent_disconnect: Option<AgentDisconnect>,
    /// Agent-to-server flags.
    #[prost(uint64, tag = "10")]
    pub flags: u64,
}

/// An agent's announcement that it is going away.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentDisconnect {}

/// What the server sends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerToAgent {
    /// The agent's instance uid, echoed.
    #[prost(bytes = "vec", tag = "1")]
    pub instance_uid: Vec<u8>,
    /// Set when the server refuses the agent.
    #[prost(message, optional, tag = "2")]
    pub error_response: Option<ServerErrorResponse>,
    /// Configuration for the collector.
    #[prost(message, optional, tag = "3")]
    pub remote_config: Option<AgentRemoteConfig>,
    /// Server-to-agent flags ([`FLAG_REPORT_FULL_STATE`]).
    #[prost(uint64, tag = "6")]
    pub flags: u64,
    /// Server capabilities bitmask.
    #[prost(uint64, tag = "7")]
    pub capabilities: u64,
}

/// `ServerToAgentFlags_ReportFullState`.
pub const FLAG_REPORT_FULL_STATE: u64 = 0x1;
/// AcceptsStatus | OffersRemoteConfig | AcceptsEffectiveConfig.
pub const SERVER_CAPABILITIES: u64 = 0x1 | 0x2 | 0x4;
/// `ServerErrorResponseType_BadRequest`.
pub const ERROR_BAD_REQUEST: i32 = 1;

/// A refusal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerErrorResponse {
    /// 0 unknown, 1 bad request, 2 unavailable.
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    /// Why.
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// Remote configuration.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentRemoteConfig {
    /// The files.
    #[prost(message, optional, tag = "1")]
    pub config: Option<AgentConfigMap>,
    /// Identifies this configuration; echoed in [`RemoteConfigStatus`].
    #[prost(bytes = "vec", tag = "2")]
    pub config_hash: Vec<u8>,
}

/// Named configuration files.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentConfigMap {
    /// File name to file ("" is the instance's own).
    #[prost(map = "string, message", tag = "1")]
    pub config_map: HashMap<String, AgentConfigFile>,
}

/// One configuration file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentConfigFile {
    /// Its contents.
    #[prost(bytes = "vec", tag = "1")]
    pub body: Vec<u8>,
    /// e.g. `text/yaml`.
    #[prost(string, tag = "2")]
    pub content_type: String,
}

/// The configuration the collector runs.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EffectiveConfig {
    /// Its files.
    #[prost(message, optional, tag = "1")]
    pub config_map: Option<AgentConfigMap>,
}

/// What became of the last remote configuration.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoteConfigStatus {
    /// The hash it was sent with.
    #[prost(bytes = "vec", tag = "1")]
    pub last_remote_config_hash: Vec<u8>,
    /// 0 unset, 1 applied, 2 applying, 3 failed.
    #[prost(int32, tag = "2")]
    pub status: i32,
    /// Why it failed.
    #[prost(string, tag = "3")]
    pub error_message: String,
}

/// A collector's health.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ComponentHealth {
    /// Whether it is healthy.
    #[prost(bool, tag = "1")]
    pub healthy: bool,
    /// When it started, 0 when not running.
    #[prost(fixed64, tag = "2")]
    pub start_time_unix_nano: u64,
    /// Why it is unhealthy.
    #[prost(string, tag = "3")]
    pub last_error: String,
    /// Agent-specific status word.
    #[prost(string, tag = "4")]
    pub status: String,
}

/// How the agent describes itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentDescription {
    /// Attributes that identify it (`service.name`, `service.version`…).
    #[prost(message, repeated, tag = "1")]
    pub identifying_attributes: Vec<KeyValue>,
    /// Other attributes (`host.name`, `os.type`…).
    #[prost(message, repeated, tag = "2")]
    pub non_identifying_attributes: Vec<KeyValue>,
}

/// An attribute.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Its key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Its value.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// A scalar attribute value (arrays and maps are skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    /// The value.
    #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4, 7")]
    pub value: Option<any_value::Value>,
}

/// The scalar kinds of [`AnyValue`].
pub mod any_value {
    /// One scalar.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// A string.
        #[prost(string, tag = "1")]
        String(String),
        /// A bool.
        #[prost(bool, tag = "2")]
        Bool(bool),
        /// An integer.
        #[prost(int64, tag = "3")]
        Int(i64),
        /// A float.
        #[prost(double, tag = "4")]
        Double(f64),
        /// Bytes.
        #[prost(bytes = "vec", tag = "7")]
        Bytes(Vec<u8>),
    }
}

impl AgentDescription {
    /// An identifying attribute as a string.
    pub fn identifying(&self, key: &str) -> Option<String> {
        find(&self.identifying_attributes, key)
    }

    /// A non-identifying attribute as a string.
    pub fn non_identifying(&self, key: &str) -> Option<String> {
        find(&self.non_identifying_attributes, key)
    }
}

fn find(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            any_value::Value::String(s) => s.clone(),
            any_value::Value::Bool(b) => b.to_string(),
            any_value::Value::Int(i) => i.to_string(),
            any_value::Value::Double(d) => d.to_string(),
            any_value::Value::Bytes(b) => linkmesh_agent::hex::encode(b),
        })
}

/// Why a WebSocket message is not an OpAMP message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Empty message.
    #[error("empty OpAMP message")]
    Empty,
    /// The varint header is not 0.
    #[error("OpAMP message header is {0}, not 0")]
    Header(u64),
    /// The protobuf does not decode.
    #[error("OpAMP message does not decode: {0}")]
    Decode(String),
}

/// Decodes one binary WebSocket message: varint header 0, then the message.
///
/// # Errors
/// [`FrameError`] on a bad header or protobuf.
pub fn decode_frame(bytes: &[u8]) -> Result<AgentToServer, FrameError> {
    use prost::Message as _;
    if bytes.is_empty() {
        return Err(FrameError::Empty);
    }
    let mut buf = bytes;
    let header =
        prost::encoding::decode_varint(&mut buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    if header != 0 {
        return Err(FrameError::Header(header));
    }
    AgentToServer::decode(buf).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Encodes one message as a binary WebSocket message.
pub fn encode_frame(msg: &ServerToAgent) -> Vec<u8> {
    use prost::Message as _;
    let mut out = Vec::with_capacity(1 + msg.encoded_len());
    out.push(0);
    out.extend(msg.encode_to_vec());
    out
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::String(v.into())),
            }),
        }
    }

    #[test]
    fn frames_round_trip_and_bad_headers_are_refused() {
        let msg = AgentToServer {
            instance_uid: vec![7; 16],
            sequence_num: 3,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![kv("service.version", "0.158.0")],
                non_identifying_attributes: vec![kv("host.name", "web-1")],
            }),
            ..Default::default()
        };
        let mut bytes = vec![0];
        msg.encode(&mut bytes).unwrap();
        let back = decode_frame(&bytes).unwrap();
        assert_eq!(back, msg);
        let d = back.agent_description.unwrap();
        assert_eq!(d.identifying("service.version").as_deref(), Some("0.158.0"));
        assert_eq!(d.non_identifying("host.name").as_deref(), Some("web-1"));
        assert_eq!(d.identifying("host.name"), None);

        bytes[0] = 1;
        assert_eq!(decode_frame(&bytes), Err(FrameError::Header(1)));
        assert_eq!(decode_frame(&[]), Err(FrameError::Empty));
        assert!(matches!(
            decode_frame(&[0, 0x0a, 0xff]),
            Err(FrameError::Decode(_))
        ));

        let out = encode_frame(&ServerToAgent {
            instance_uid: vec![7; 16],
            capabilities: SERVER_CAPABILITIES,
            ..Default::default()
        });
        assert_eq!(out[0], 0);
        let s = ServerToAgent::decode(&out[1..]).unwrap();
        assert_eq!(s.capabilities, 7);
    }
}
