//! One-time enrolment: a token and a CSR for a key pair made on this host
//! become a host identity signed by the fleet's CA.
//!
//! ```text
//! lock ─ clear staging ─ load identity ─ decide ─┬─ already enrolled: done, nothing written
//!                                                ├─ refuse (other server / CA, no --force)
//!                                                └─ pending key ─ connect (pin checked in the
//!                                                   handshake) ─ ServerInfo (skew) ─ Enroll ─
//!                                                   verify response ─ commit (atomic swap)
//! ```
//! The token is read only when it is about to be sent, and only after the
//! server proved it holds a key the pinned CA certified.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::{
    endpoint::ServerUrl,
    host::HostFacts,
    identity::{HostId, Identity, IdentityError, IdentityStore, StoreError, StoreLock},
    proto,
    tls::{Trust, enrol_client_config},
    token::{Token, TokenError},
    transport::{ConnectError, connect_once},
    version::{self, SkewVerdict, Version},
};

/// Default bound on each network step of enrolment.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct EnrollOptions {
    /// The server to enrol with.
    pub server: ServerUrl,
    /// How to trust it.
    pub trust: Trust,
    /// Replace an identity with another server or CA.
    pub force: bool,
    /// Bound on each network step.
    pub timeout: Duration,
    /// The HTTP CONNECT proxy to reach the server through (the rule every
    /// connection follows: [`crate::transport::proxy_for`]).
    pub proxy: Option<crate::transport::Proxy>,
}

/// What enrolment did.
#[derive(Debug, PartialEq, Eq)]
pub enum EnrollOutcome {
    /// The host was already enrolled with this server; nothing was changed.
    AlreadyEnrolled {
        /// Its host id.
        host_id: HostId,
        /// The server.
        server: ServerUrl,
    },
    /// A new identity is in place.
    Enrolled {
        /// The new host id.
        host_id: HostId,
        /// The server.
        server: ServerUrl,
        /// Expiry of the new certificate.
        not_after: OffsetDateTime,
        /// The identity it replaced, if any.
        replaced: Option<HostId>,
    },
}

impl EnrollOutcome {
    /// `enroll --json`'s document.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Self::AlreadyEnrolled { host_id, server } => serde_json::json!({
                "changed": false,
                "host_id": host_id.as_str(),
                "server": server.to_string(),
            }),
            Self::Enrolled {
                host_id,
                server,
                not_after,
                replaced,
            } => serde_json::json!({
                "changed": true,
                "host_id": host_id.as_str(),
                "server": server.to_string(),
                "certificate_not_after": crate::clock::rfc3339(*not_after),
                "replaced_host_id": replaced.as_ref().map(HostId::as_str),
            }),
        }
    }

    /// `enroll`'s lines.
    pub fn human(&self) -> String {
        match self {
            Self::AlreadyEnrolled { host_id, server } => {
                format!("already enrolled with {server} as host {host_id}; nothing changed\n")
            }
            Self::Enrolled {
                host_id,
                server,
                not_after,
                replaced,
            } => {
                let mut out = format!(
                    "enrolled with {server} as host {host_id}; certificate valid until {}\n",
                    crate::clock::rfc3339(*not_after)
                );
                if let Some(old) = replaced {
                    out.push_str(&format!("replaced the previous identity (host {old})\n"));
                }
                out
            }
        }
    }
}

/// The decision taken before anything is sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do.
    AlreadyEnrolled,
    /// Enrol (first time, or replacing with `--force`).
    Enroll,
    /// Enrolled with another server; `--force` is needed.
    RefuseOtherServer,
    /// Enrolled with this server but under a CA the operator's pin or file
    /// does not name; `--force` is needed.
    RefuseOtherCa,
}

/// Decides what to do given the current identity (its server and whether
/// its CA is the one the operator trusts). Pure.
pub fn decide(current: Option<(&ServerUrl, bool)>, requested: &ServerUrl, force: bool) -> Decision {
    match current {
        None => Decision::Enroll,
        Some(_) if force => Decision::Enroll,
        Some((server, _)) if server != requested => Decision::RefuseOtherServer,
        Some((_, false)) => Decision::RefuseOtherCa,
        Some((_, true)) => Decision::AlreadyEnrolled,
    }
}

/// Why enrolment failed. No variant ever carries the token.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The identity store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No usable token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Enrolled with another server.
    #[error(
        "this host is already enrolled with {current} as host {host_id}; to enrol with {requested} instead, run again with --force (the current identity stays in place until the new one is complete)"
    )]
    OtherServer {
        /// The current server.
        current: ServerUrl,
        /// The current host id.
        host_id: HostId,
        /// The requested server.
        requested: ServerUrl,
    },
    /// Enrolled with this server under another CA.
    #[error(
        "this host is enrolled with {server} as host {host_id}, but under a CA that --ca-pin/--ca-file does not name; check the pin, or run again with --force to re-enrol"
    )]
    OtherCa {
        /// The server.
        server: ServerUrl,
        /// The current host id.
        host_id: HostId,
    },
    /// The server could not be reached or verified; the token was not sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Versions do not allow enrolment.
    #[error("refusing to enrol with {server}: {explanation}")]
    Skew {
        /// The server.
        server: ServerUrl,
        /// Why.
        explanation: String,
    },
    /// The server refused the request.
    #[error("{server} refused enrolment: {message}")]
    Rejected {
        /// The server.
        server: ServerUrl,
        /// gRPC status code.
        code: tonic::Code,
        /// The server's explanation.
        message: String,
    },
    /// The server's answer is unusable.
    #[error("{server} sent an unusable enrolment answer: {reason}")]
    BadResponse {
        /// The server.
        server: ServerUrl,
        /// What is wrong with it.
        reason: String,
    },
    /// A key or request could not be made.
    #[error("cannot create the certificate request: {0}")]
    Csr(String),
}

/// Enrols this host as `opts` asks. The caller holds the store's exclusive
/// lock; `token` is called only when a token is about to be sent.
///
/// # Errors
/// [`EnrollError`]; on every error the previous identity (if any) is intact.
pub async fn enroll(
    store: &IdentityStore,
    lock: &StoreLock,
    opts: &EnrollOptions,
    token: impl FnOnce() -> Result<Token, TokenError>,
    facts: &HostFacts,
) -> Result<EnrollOutcome, EnrollError> {
    store.clear_staging(lock)?;
    let current = store.load(lock)?;
    if let Some(c) = &current {
        store.clear_committed_pending(lock, c)?;
        match decide(
            Some((&c.server, opts.trust.accepts_ca(&c.ca))),
            &opts.server,
            opts.force,
        ) {
            Decision::AlreadyEnrolled => {
                return Ok(EnrollOutcome::AlreadyEnrolled {
                    host_id: c.host_id.clone(),
                    server: c.server.clone(),
                });
            }
            Decision::RefuseOtherServer => {
                return Err(EnrollError::OtherServer {
                    current: c.server.clone(),
                    host_id: c.host_id.clone(),
                    requested: opts.server.clone(),
                });
            }
            Decision::RefuseOtherCa => {
                return Err(EnrollError::OtherCa {
                    server: c.server.clone(),
                    host_id: c.host_id.clone(),
                });
            }
            Decision::Enroll => {}
        }
    }
    let token = token()?;
    let tls = Arc::new(enrol_client_config(&opts.trust)?);
    let channel = connect_once(&opts.server, tls, opts.proxy.as_ref(), opts.timeout).await?;
    let mut client = proto::Client::new(channel);
    let rejected = |s: tonic::Status| EnrollError::Rejected {
        server: opts.server.clone(),
        code: s.code(),
        message: s.message().to_owned(),
    };

    // Refuse before the token is spent when the versions cannot work together.
    let info = client
        .server_info(proto::ServerInfoRequest {})
        .await
        .map_err(rejected)?
        .into_inner();
    let bad = |reason: String| EnrollError::BadResponse {
        server: opts.server.clone(),
        reason,
    };
    let server_version: Version = info
        .server_version
        .parse()
        .map_err(|e: version::VersionError| bad(e.to_string()))?;
    let behind = proto::SkewPolicy::window(info.skew_policy.as_ref());
    let agent = version::agent_version();
    let verdict = version::skew(&agent, &server_version, behind);
    match verdict {
        SkewVerdict::Ahead | SkewVerdict::Incompatible => {
            return Err(EnrollError::Skew {
                server: opts.server.clone(),
                explanation: verdict.explain(&agent, &server_version),
            });
        }
        SkewVerdict::Behind => tracing::warn!(
            agent_version = %agent,
            server_version = %server_version,
            "Agent is behind the server's version window; enrolling anyway, upgrade the agent"
        ),
        SkewVerdict::InWindow => {}
    }

    // Only now, with the server verified and willing, does key material get made.
    let key = store.pending_key(lock, &opts.server)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| EnrollError::Csr(e.to_string()))?;
    tracing::info!(server = %opts.server, token_id = token.id(), "Sending enrolment request");
    let response = client
        .enroll(proto::EnrollRequest {
            token: token.expose(),
            csr_der: csr.der().to_vec(),
            host: Some(facts.into()),
            agent_version: version::AGENT_VERSION.to_owned(),
        })
        .await
        .map_err(rejected)?
        .into_inner();

    let host_id = HostId::new(&response.host_id).map_err(|e| bad(e.to_string()))?;
    let ca = CertificateDer::from(response.ca_certificate_der);
    if !opts.trust.accepts_ca(&ca) {
        return Err(bad(
            "the CA it returned is not the one --ca-pin/--ca-file names".into(),
        ));
    }
    let certs: Vec<CertificateDer<'static>> = response
        .certificate_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let enrolled_at = crate::clock::rfc3339(
        OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc()),
    );
    let identity = Identity::new(
        host_id.clone(),
        opts.server.clone(),
        enrolled_at,
        key_der,
        certs,
        ca,
    )
    .map_err(|e: IdentityError| bad(e.to_string()))?;
    let not_after = identity.validity.not_after;
    store.commit(lock, &identity)?;
    // A revocation recorded for the host this enrolment replaces no longer
    // applies (it names the old host id, so keeping it would be harmless).
    let _ = std::fs::remove_file(store.state_dir().join(crate::reporter::REVOKED_FILE));
    // The machine this identity belongs to (a copy of the state elsewhere is
    // then a clone: crate::fingerprint). A failure costs only that: the
    // first run records it.
    if let Err(e) = crate::fingerprint::write(
        store.state_dir(),
        host_id.as_str(),
        &crate::fingerprint::Machine::of(facts),
    ) {
        tracing::warn!(error = %e, "Cannot record this machine's fingerprint");
    }
    // The server's version from the start, for the server-first check of
    // an upgrade made while the server is away. Not part of the identity:
    // a failure here costs only that.
    if let Some(r) = crate::upgrade::updated_record(
        None,
        &opts.server.to_string(),
        &server_version.to_string(),
        behind,
        crate::clock::now_unix_ms(),
    ) && let Err(e) = crate::upgrade::write_record(store.state_dir(), &r)
    {
        tracing::warn!(error = %e, "Cannot record the server's version");
    }
    Ok(EnrollOutcome::Enrolled {
        host_id,
        server: opts.server.clone(),
        not_after,
        replaced: current.map(|c| c.host_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_render_from_the_values() {
        let server: ServerUrl = "https://fleet.example:8443".parse().unwrap();
        let same = EnrollOutcome::AlreadyEnrolled {
            host_id: HostId::new("h1").unwrap(),
            server: server.clone(),
        };
        assert_eq!(
            same.human(),
            "already enrolled with https://fleet.example:8443 as host h1; nothing changed\n"
        );
        assert_eq!(same.json()["changed"], false);
        let new = EnrollOutcome::Enrolled {
            host_id: HostId::new("h2").unwrap(),
            server,
            not_after: time::macros::datetime!(2027-01-02 03:04:05 UTC),
            replaced: Some(HostId::new("h1").unwrap()),
        };
        assert!(new.human().ends_with(
            "valid until 2027-01-02T03:04:05Z\nreplaced the previous identity (host h1)\n"
        ));
        let json = new.json();
        assert_eq!(json["certificate_not_after"], "2027-01-02T03:04:05Z");
        assert_eq!(json["replaced_host_id"], "h1");
    }

    #[test]
    fn decisions() {
        let a: ServerUrl = "https://a.example".parse().unwrap();
        let b: ServerUrl = "https://b.example".parse().unwrap();
        assert_eq!(decide(None, &a, false), Decision::Enroll);
        assert_eq!(
            decide(Some((&a, true)), &a, false),
            Decision::AlreadyEnrolled
        );
        assert_eq!(
            decide(Some((&a, true)), &b, false),
            Decision::RefuseOtherServer
        );
        assert_eq!(
            decide(Some((&a, false)), &a, false),
            Decision::RefuseOtherCa
        );
        assert_eq!(decide(Some((&a, true)), &a, true), Decision::Enroll);
        assert_eq!(decide(Some((&a, false)), &b, true), Decision::Enroll);
    }
}
