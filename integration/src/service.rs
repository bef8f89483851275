//! The agent API as the reference server implements it. Identity comes from
//! TLS (the client certificate), never from a request body.

use std::{sync::Arc, time::Duration};

use linkmesh_agent::{
    identity::HostId,
    proto,
    token::{Token, hashes_equal},
    version::{self, SkewVerdict, Version},
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::{
    ca::{Ca, csr_spki_sha256},
    state::{HostRecord, State, TokenUse},
};

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The version the server reports (tests set older or newer ones).
    pub version: Version,
    /// Lifetime of host certificates.
    pub cert_lifetime: Duration,
    /// How many minor versions agents may lag.
    pub minor_versions_behind: u32,
}

/// The reference implementation of `linkmesh.v1.Fleet`.
#[derive(Clone)]
pub struct FleetService {
    inner: Arc<Inner>,
}

struct Inner {
    state: State,
    ca: Ca,
    config: ServiceConfig,
}

impl FleetService {
    /// A service over `state`, signing with `ca`.
    pub fn new(state: State, ca: Ca, config: ServiceConfig) -> Self {
        Self {
            inner: Arc::new(Inner { state, ca, config }),
        }
    }
}

#[tonic::async_trait]
impl proto::Fleet for FleetService {
    async fn server_info(
        &self,
        _request: Request<proto::ServerInfoRequest>,
    ) -> Result<Response<proto::ServerInfoResponse>, Status> {
        let c = &self.inner.config;
        Ok(Response::new(proto::ServerInfoResponse {
            server_version: c.version.to_string(),
            api_version: version::API_VERSION,
            skew_policy: Some(proto::SkewPolicy {
                minor_versions_behind: c.minor_versions_behind,
            }),
            runtime_pins: Vec::new(),
            server_time_unix_ms: now_unix_ms(),
        }))
    }

    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let req = request.into_inner();
        let token = Token::parse(&req.token, "the request")
            .map_err(|_| Status::unauthenticated("malformed enrolment token"))?;
        let agent: Version = req
            .agent_version
            .parse()
            .map_err(|e: version::VersionError| Status::invalid_argument(e.to_string()))?;
        let c = &self.inner.config;
        let verdict = version::skew(&agent, &c.version, c.minor_versions_behind);
        if matches!(verdict, SkewVerdict::Ahead | SkewVerdict::Incompatible) {
            return Err(Status::failed_precondition(
                verdict.explain(&agent, &c.version),
            ));
        }
        let spki =
            csr_spki_sha256(&req.csr_der).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.enroll(&token, &req, &spki))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?
            .map(Response::new)
    }
}

impl Inner {
    /// Checks and spends the token, signs the certificate and records the
    /// host, all under the state lock. A retry with the same key and token
    /// (an agent killed after the server answered) gets the same host back
    /// without spending another use.
    fn enroll(
        &self,
        token: &Token,
        req: &proto::EnrollRequest,
        spki: &str,
    ) -> Result<proto::EnrollResponse, Status> {
        let internal = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "Enrolment failed");
            Status::internal("the server could not record the enrolment; see its log")
        };
        let lock = self.state.lock().map_err(|e| internal(&e))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let unknown = || {
            tracing::warn!(
                token_id = token.id(),
                "Enrolment with an unknown token refused"
            );
            Status::unauthenticated(
                "token not recognised by this server: check it, or create one with `linkmesh-fleet token create`",
            )
        };
        let mut record = self
            .state
            .token(token.id())
            .map_err(|e| internal(&e))?
            .ok_or_else(unknown)?;
        if !hashes_equal(&record.secret_sha256, &token.secret_hash()) {
            return Err(unknown());
        }
        if now >= record.expires_at {
            tracing::warn!(
                token_id = token.id(),
                "Enrolment with an expired token refused"
            );
            return Err(Status::unauthenticated(format!(
                "token expired at {}: create a new one with `linkmesh-fleet token create`",
                rfc3339(record.expires_at)
            )));
        }
        let retry = record
            .uses
            .iter()
            .find(|u| u.spki_sha256 == spki)
            .map(|u| u.host_id.clone());
        let host_id = match retry {
            Some(id) => id,
            None => {
                if record.uses.len() >= record.max_uses as usize {
                    tracing::warn!(
                        token_id = token.id(),
                        "Enrolment with a used-up token refused"
                    );
                    return Err(Status::permission_denied(format!(
                        "token already used {} of {} time{}: create a new one with `linkmesh-fleet token create`",
                        record.uses.len(),
                        record.max_uses,
                        if record.max_uses == 1 { "" } else { "s" }
                    )));
                }
                let id = new_host_id().map_err(|e| internal(&e))?;
                record.uses.push(TokenUse {
                    spki_sha256: spki.to_owned(),
                    host_id: id.clone(),
                    at: now,
                });
                // The use is recorded before the host: a crash in between is
                // healed by the agent's retry with the same key.
                self.state
                    .put_token(&lock, &record)
                    .map_err(|e| internal(&e))?;
                id
            }
        };
        let host = HostId::new(&host_id).map_err(|e| internal(&e))?;
        let cert = self
            .ca
            .sign_host(&req.csr_der, &host, self.config.cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let facts = req.host.clone().unwrap_or_default();
        let previous = self.state.host(&host_id).map_err(|e| internal(&e))?;
        let record = HostRecord {
            host_id: host_id.clone(),
            hostname: facts.hostname,
            os: facts.os_pretty_name,
            arch: facts.arch,
            machine_id_hash: facts.machine_id_hash,
            agent_version: req.agent_version.clone(),
            token_id: token.id().to_owned(),
            spki_sha256: cert.spki_sha256.clone(),
            cert_serial: cert.serial.clone(),
            cert_not_after: cert.not_after.unix_timestamp(),
            enrolled_at: previous.as_ref().map_or(now, |p| p.enrolled_at),
            last_seen: now,
        };
        self.state
            .put_host(&lock, &record)
            .map_err(|e| internal(&e))?;
        tracing::info!(
            host_id = %host_id,
            hostname = %record.hostname,
            token_id = token.id(),
            retry = previous.is_some(),
            "Enrolled host"
        );
        let lifetime = self.config.cert_lifetime.as_secs() as i64;
        Ok(proto::EnrollResponse {
            host_id,
            certificate_chain_der: vec![cert.der.to_vec()],
            ca_certificate_der: self.ca.cert().to_vec(),
            server_version: self.config.version.to_string(),
            renew_after_unix: now + lifetime * 2 / 3,
            server_time_unix_ms: now_unix_ms(),
        })
    }
}

fn new_host_id() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40; // UUID version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let h = linkmesh_agent::hex::encode(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn now_unix_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_ids_are_uuid_v4() {
        let id = super::new_host_id().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(linkmesh_agent::identity::HostId::new(&id).is_ok());
        assert_ne!(id, super::new_host_id().unwrap());
    }
}
