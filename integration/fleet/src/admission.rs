//! Which client certificates the server admits: only a host's current
//! certificate, or the one its last renewal issued (which then becomes the
//! current one), never a superseded one, never a revoked host's. One pure
//! judge for Report, Renew, ServerInfo's standing and OpAMP connections.
//!
//! A renewal racing a crash on the host: the server records the renewed
//! certificate as *pending* and keeps admitting the current one until the
//! host first presents the pending one. A host that crashed before storing
//! the renewed certificate still holds the current one, so its next Renew
//! is admitted and replaces the pending certificate it never stored.

use linkmesh_agent::{identity::HostId, proto::Standing};

use crate::state::{CertRef, HostRecord, RevocationRecord};

/// The verified client certificate of a connection, as the judge needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presented {
    /// The host its subject names.
    pub host: HostId,
    /// SHA-256 of its SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
    /// Its serial, hex.
    pub serial: String,
    /// Its expiry, Unix seconds.
    pub not_after: i64,
}

/// Why a certificate is not admitted, with the words for the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// What the agent decides on.
    pub standing: Standing,
    /// For people.
    pub message: String,
}

impl Refused {
    fn new(standing: Standing, message: String) -> Self {
        Self { standing, message }
    }

    /// As a gRPC status carrying a [`linkmesh_agent::proto::Refusal`] detail.
    pub fn status(&self) -> tonic::Status {
        let code = match self.standing {
            Standing::Expired | Standing::Unspecified => tonic::Code::Unauthenticated,
            Standing::NotEnrolled => tonic::Code::NotFound,
            Standing::ClonePending | Standing::NotAClone => tonic::Code::FailedPrecondition,
            Standing::Revoked
            | Standing::Superseded
            | Standing::Current
            | Standing::InUseElsewhere => tonic::Code::PermissionDenied,
        };
        self.status_with(code)
    }

    /// As a gRPC status with `code`, carrying the typed detail.
    pub fn status_with(&self, code: tonic::Code) -> tonic::Status {
        let detail = linkmesh_agent::proto::Refusal {
            standing: self.standing as i32,
        };
        tonic::Status::with_details(
            code,
            self.message.clone(),
            prost::Message::encode_to_vec(&detail).into(),
        )
    }
}

/// How an admitted certificate stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// The host's current certificate.
    Current,
    /// The certificate its last renewal issued, presented for the first
    /// time: it becomes current and the previous one is refused from now.
    Renewed,
}

/// Reads what the judge needs from a DER certificate (already verified
/// against the CA by the TLS handshake).
///
/// # Errors
/// When it names no host or does not parse.
pub fn presented(leaf: &[u8]) -> Result<Presented, Refused> {
    let host = linkmesh_agent::identity::host_id_of_certificate(
        &rustls_pki_types::CertificateDer::from(leaf),
    )
    .ok_or_else(|| {
        Refused::new(
            Standing::Unspecified,
            "the client certificate names no LinkMesh host".into(),
        )
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|_| {
        Refused::new(
            Standing::Unspecified,
            "unparsable client certificate".into(),
        )
    })?;
    Ok(Presented {
        host,
        spki_sha256: crate::ca::spki_sha256(parsed.public_key().raw),
        serial: linkmesh_agent::hex::encode(parsed.raw_serial()),
        not_after: parsed.validity().not_after.timestamp(),
    })
}

/// Serials compared as numbers: without leading zeros, in one case.
fn same_serial(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.trim_start_matches('0').to_ascii_lowercase();
    norm(a) == norm(b)
}

fn is(cert: &Presented, spki: &str, serial: &str) -> bool {
    cert.spki_sha256 == spki && same_serial(&cert.serial, serial)
}

/// Judges `cert` against the host's record and revocation at `now` (Unix
/// seconds); an expired certificate is admitted up to `grace_secs` after its
/// expiry (Renew's grace; 0 everywhere else). Pure.
///
/// # Errors
/// [`Refused`] with the standing and the words for the peer.
pub fn judge(
    record: Option<&HostRecord>,
    revoked: Option<&RevocationRecord>,
    cert: &Presented,
    now: i64,
    grace_secs: i64,
) -> Result<Admitted, Refused> {
    let host = &cert.host;
    if let Some(r) = revoked {
        return Err(Refused::new(
            Standing::Revoked,
            format!(
                "host {host} was revoked at {}{}: enrol again with a new token (linkmesh-agent enroll --force)",
                crate::service::rfc3339(r.revoked_at),
                if r.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", crate::text::safe(&r.reason))
                }
            ),
        ));
    }
    let Some(rec) = record else {
        return Err(Refused::new(
            Standing::NotEnrolled,
            format!(
                "host {host} is not enrolled with this server: enrol again with a new token (linkmesh-agent enroll --force)"
            ),
        ));
    };
    let admitted = if is(cert, &rec.spki_sha256, &rec.cert_serial) {
        Admitted::Current
    } else if rec
        .pending_cert
        .as_ref()
        .is_some_and(|p| is(cert, &p.spki_sha256, &p.serial))
    {
        Admitted::Renewed
    } else {
        return Err(Refused::new(
            Standing::Superseded,
            format!(
                "certificate {} of host {host} was replaced by a renewal (the current one is {}): this host's identity is older than the one it last used (restored from a backup?); enrol again with a new token (linkmesh-agent enroll --force)",
                cert.serial, rec.cert_serial
            ),
        ));
    };
    if now > cert.not_after.saturating_add(grace_secs) {
        return Err(Refused::new(
            Standing::Expired,
            if grace_secs > 0 {
                format!(
                    "client certificate expired at {}, beyond the renewal grace of {}: enrol again with a new token (linkmesh-agent enroll --force)",
                    crate::service::rfc3339(cert.not_after),
                    linkmesh_agent::config::format_duration(std::time::Duration::from_secs(
                        grace_secs.unsigned_abs()
                    ))
                )
            } else {
                format!(
                    "client certificate expired at {}: renew it (linkmesh-agent renews within the grace window)",
                    crate::service::rfc3339(cert.not_after)
                )
            },
        ));
    }
    Ok(admitted)
}

/// Makes the pending certificate the current one (after
/// [`Admitted::Renewed`]).
pub fn promote(rec: &mut HostRecord) {
    if let Some(CertRef {
        spki_sha256,
        serial,
        not_after,
    }) = rec.pending_cert.take()
    {
        rec.spki_sha256 = spki_sha256;
        rec.cert_serial = serial;
        rec.cert_not_after = not_after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "0f3c2a9e-1b7d-4c5e-9a2f-6d8b3e1c4f70";

    fn record() -> HostRecord {
        HostRecord {
            host_id: HOST.into(),
            hostname: "web-1".into(),
            agent_version: "0.1.0".into(),
            spki_sha256: "aa".into(),
            cert_serial: "0102".into(),
            cert_not_after: 1000,
            ..HostRecord::default()
        }
    }

    fn cert(spki: &str, serial: &str, not_after: i64) -> Presented {
        Presented {
            host: HostId::new(HOST).unwrap(),
            spki_sha256: spki.into(),
            serial: serial.into(),
            not_after,
        }
    }

    fn standing(r: Result<Admitted, Refused>) -> Standing {
        match r {
            Ok(_) => Standing::Current,
            Err(e) => e.standing,
        }
    }

    #[test]
    fn only_the_current_certificate_is_admitted() {
        let rec = record();
        assert_eq!(
            judge(Some(&rec), None, &cert("aa", "102", 1000), 10, 0),
            Ok(Admitted::Current),
            "serials compare as numbers"
        );
        let old = cert("bb", "0a0b", 1000);
        assert_eq!(
            standing(judge(Some(&rec), None, &old, 10, 0)),
            Standing::Superseded
        );
        // The same key under another serial is another certificate.
        assert_eq!(
            standing(judge(Some(&rec), None, &cert("aa", "0103", 1000), 10, 0)),
            Standing::Superseded
        );
    }

    #[test]
    fn a_superseded_certificate_is_refused_even_within_the_grace() {
        let mut rec = record();
        rec.spki_sha256 = "new".into();
        rec.cert_serial = "0200".into();
        let expired_old = cert("aa", "0102", 1000);
        let e = judge(Some(&rec), None, &expired_old, 1500, 30 * 86_400).unwrap_err();
        assert_eq!(e.standing, Standing::Superseded);
        assert!(e.message.contains("replaced by a renewal"), "{e}");
    }

    #[test]
    fn the_renewed_certificate_is_admitted_and_then_the_only_one() {
        let mut rec = record();
        rec.pending_cert = Some(CertRef {
            spki_sha256: "bb".into(),
            serial: "0300".into(),
            not_after: 2000,
        });
        // The host crashed before storing the renewal: its current
        // certificate is still admitted (and may renew again).
        assert_eq!(
            judge(Some(&rec), None, &cert("aa", "0102", 1000), 10, 0),
            Ok(Admitted::Current)
        );
        let renewed = cert("bb", "0300", 2000);
        assert_eq!(
            judge(Some(&rec), None, &renewed, 10, 0),
            Ok(Admitted::Renewed)
        );
        promote(&mut rec);
        assert!(rec.pending_cert.is_none());
        assert_eq!(
            judge(Some(&rec), None, &renewed, 10, 0),
            Ok(Admitted::Current)
        );
        assert_eq!(
            standing(judge(Some(&rec), None, &cert("aa", "0102", 1000), 10, 0)),
            Standing::Superseded
        );
    }

    #[test]
    fn expiry_and_grace() {
        let rec = record();
        let c = cert("aa", "0102", 1000);
        assert_eq!(
            standing(judge(Some(&rec), None, &c, 1001, 0)),
            Standing::Expired
        );
        assert_eq!(judge(Some(&rec), None, &c, 1001, 60), Ok(Admitted::Current));
        let e = judge(Some(&rec), None, &c, 1061, 60).unwrap_err();
        assert_eq!(e.standing, Standing::Expired);
        assert!(e.message.contains("beyond the renewal grace of 1m"), "{e}");
    }

    #[test]
    fn revocation_comes_first_and_unknown_hosts_are_not_enrolled() {
        let rec = record();
        let c = cert("aa", "0102", 1000);
        let r = RevocationRecord {
            host_id: HOST.into(),
            revoked_at: 5,
            reason: "stolen\x1b[2J".into(),
        };
        let e = judge(Some(&rec), Some(&r), &c, 10, 0).unwrap_err();
        assert_eq!(e.standing, Standing::Revoked);
        assert!(e.message.contains("enrol again with a new token"), "{e}");
        assert!(!e.message.contains('\x1b'), "{e:?}");
        assert_eq!(
            standing(judge(None, None, &c, 10, 0)),
            Standing::NotEnrolled
        );
    }

    #[test]
    fn refusals_carry_a_typed_detail() {
        let e = Refused::new(Standing::Revoked, "revoked".into());
        let s = e.status();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        let d: linkmesh_agent::proto::Refusal = prost::Message::decode(s.details()).unwrap();
        assert_eq!(d.standing(), Standing::Revoked);
    }
}
