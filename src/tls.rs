//! TLS for talks with the fleet server: rustls (ring, TLS 1.3 only), CA pins
//! in the kubeadm convention, and the verifier that checks a server against a
//! pin before an enrolment token leaves the host.

use std::{fmt, str::FromStr, sync::Arc};

use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use rustls_pki_types::pem::PemObject;

/// The ALPN protocol gRPC runs on.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate that x509 parsing rejects.
    #[error("cannot parse certificate: {0}")]
    BadCertificate(String),
    /// A PEM file without usable certificates.
    #[error("{path}: {reason}")]
    BadPemFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A CA pin: SHA-256 over the DER SubjectPublicKeyInfo of a CA certificate,
/// written `sha256:<64 hex digits>` (kubeadm's `--discovery-token-ca-cert-hash`).
/// Recompute with `openssl x509 -pubkey -in ca.pem | openssl pkey -pubin
/// -outform der | sha256sum`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaPin([u8; 32]);

/// A pin that is not `sha256:` followed by 64 hex digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid CA pin {input:?}: expected sha256: followed by 64 hex digits")]
pub struct CaPinError {
    input: String,
}

// === impl CaPin ===

impl CaPin {
    /// The pin of a certificate's public key.
    ///
    /// # Errors
    /// When the certificate cannot be parsed.
    pub fn of_certificate(cert: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            parsed.tbs_certificate.subject_pki.raw,
        );
        let mut pin = [0u8; 32];
        pin.copy_from_slice(digest.as_ref());
        Ok(Self(pin))
    }
}

impl FromStr for CaPin {
    type Err = CaPinError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || CaPinError {
            input: input.to_owned(),
        };
        let hex = input.trim().strip_prefix("sha256:").ok_or_else(err)?;
        let bytes = crate::hex::decode(hex).ok_or_else(err)?;
        let pin: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        Ok(Self(pin))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How the agent decides to trust a fleet server it has no identity for yet.
#[derive(Clone, Debug)]
pub enum Trust {
    /// One or more CA pins; the server's chain must include a certificate
    /// with a matching public key, and verify up to it.
    Pins(Vec<CaPin>),
    /// CA certificates from a file (`--ca-file`).
    CaCerts(Vec<CertificateDer<'static>>),
}

// === impl Trust ===

impl Trust {
    /// Reads CA certificates from a PEM file.
    ///
    /// # Errors
    /// When the file cannot be read or holds no certificate.
    pub fn from_ca_file(path: &std::path::Path) -> Result<Self, TlsError> {
        let bad = |reason: String| TlsError::BadPemFile {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(bad("contains no PEM certificate".to_owned()));
        }
        for c in &certs {
            CaPin::of_certificate(c).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Self::CaCerts(certs))
    }

    /// Whether a CA certificate returned by the server is one this trust
    /// names (same public key as a pin, or byte-equal to a file's certificate).
    pub fn accepts_ca(&self, ca: &CertificateDer<'_>) -> bool {
        match self {
            Self::Pins(pins) => CaPin::of_certificate(ca).is_ok_and(|p| pins.contains(&p)),
            Self::CaCerts(certs) => certs.iter().any(|c| c.as_ref() == ca.as_ref()),
        }
    }
}

/// The crypto provider every connection uses: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration for enrolment: TLS 1.3, no client certificate,
/// the server verified against `trust`.
///
/// # Errors
/// When rustls rejects the configuration or the CA certificates.
pub fn enrol_client_config(trust: &Trust) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match trust {
        Trust::Pins(pins) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pins: pins.clone(),
                provider,
            }))
            .with_no_client_auth(),
        Trust::CaCerts(certs) => {
            let mut roots = RootCertStore::empty();
            for c in certs {
                roots.add(c.clone())?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// No certificate in the server's chain matched a CA pin.
#[derive(Debug, thiserror::Error)]
#[error("no certificate in the server's chain matches the CA pin")]
pub struct PinMismatch;

/// Verifies a server whose CA the agent knows only by pin: some certificate
/// sent by the server must carry a pinned public key, and the server's own
/// certificate must verify (name, validity, signature) up to it.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<CaPin>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor = intermediates
            .iter()
            .find(|c| CaPin::of_certificate(c).is_ok_and(|p| self.pins.contains(&p)))
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(PinMismatch)),
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered; a TLS 1.2 handshake never gets here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server's certificate does not chain to the CA this host enrolled
/// with: the server's CA changed. Never answered by re-enrolment.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate is not issued by the fleet CA this host enrolled with")]
pub struct CaChanged {
    /// The CA this host trusts.
    pub enrolled: CaPin,
    /// The CA the server presented in its chain, if it sent one.
    pub presented: Option<CaPin>,
}

impl CaChanged {
    /// For people: what changed and what to do.
    pub fn explain(&self) -> String {
        format!(
            "the server's certificate is not issued by the fleet CA this host enrolled with ({}){}: the server's certificate authority changed (a server set up afresh, or another server at this address). This agent does not re-enrol by itself and keeps its collector running: restore the server's state from its backup and start it with its secret, or enrol this host again with a new token (linkmesh-agent enroll --force)",
            self.enrolled,
            self.presented
                .map(|p| format!("; the server presents a CA with pin {p}"))
                .unwrap_or_default()
        )
    }
}

/// Verifies the server against the CA of this host's identity, saying
/// [`CaChanged`] when its chain leads elsewhere.
#[derive(Debug)]
struct EnrolledVerifier {
    inner: Arc<WebPkiServerVerifier>,
    enrolled: CaPin,
}

impl ServerCertVerifier for EnrolledVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                    | rustls::CertificateError::BadSignature,
                ) => rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(CaChanged {
                        enrolled: self.enrolled,
                        presented: intermediates
                            .last()
                            .and_then(|c| CaPin::of_certificate(c).ok()),
                    })),
                )),
                other => other,
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Explains a failed TLS handshake in terms an operator can act on.
pub fn explain_handshake_error(err: &std::io::Error) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return err.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
            if o.0.downcast_ref::<PinMismatch>().is_some() =>
        {
            "the server's CA does not match the CA pin: check --ca-pin against the pin printed by the server (`linkmesh-fleet token create`)".to_owned()
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))
            if o.0.downcast_ref::<CaChanged>().is_some() =>
        {
            o.0.downcast_ref::<CaChanged>()
                .map(CaChanged::explain)
                .unwrap_or_default()
        }
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        ) => {
            "the server's certificate is not signed by the trusted CA (--ca-file)".to_owned()
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }) => {
            "the server's certificate is not valid for this host name: use the address the server's certificate names".to_owned()
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext {
            time,
            not_after,
        }) => {
            let at = |t: &rustls_pki_types::UnixTime| {
                crate::clock::rfc3339_unix_s(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
                    .unwrap_or_else(|| format!("unix {}", t.as_secs()))
            };
            format!(
                "the fleet server's own TLS certificate expired at {} (this host's clock says {}); this host's certificate is not the one at fault: the server must renew its certificate (restarting linkmesh-fleet issues a new one), or, if the host's clock is wrong, fix the clock",
                at(not_after),
                at(time)
            )
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::Expired) => {
            "the fleet server's own TLS certificate has expired, or this host's clock is ahead: check the server's certificate and this host's clock".to_owned()
        }
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet)
        | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYetContext { .. }) => {
            "the server's certificate is not valid yet, or this host's clock is behind: check the clock".to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The client configuration for everything after enrolment: TLS 1.3, the
/// fleet CA as the only root, the host certificate and key as the client
/// identity.
///
/// # Errors
/// When rustls rejects the CA, certificate or key.
pub fn mtls_client_config(
    identity: &crate::identity::Identity,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca.clone())?;
    let provider = provider();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EnrolledVerifier {
            inner,
            enrolled: identity.ca_pin,
        }))
        .with_client_auth_cert(identity.certs.clone(), identity.key().clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_round_trip_and_rejects() {
        let s = format!("sha256:{}", "ab".repeat(32));
        let pin: CaPin = s.parse().unwrap();
        assert_eq!(pin.to_string(), s);
        assert_eq!(
            format!("sha256:{}", "AB".repeat(32))
                .parse::<CaPin>()
                .unwrap(),
            pin
        );
        for bad in [
            "",
            "sha256:",
            "sha1:abcd",
            &"ab".repeat(32),
            &format!("sha256:{}", "ab".repeat(31)),
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(bad.parse::<CaPin>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pin_matches_openssl_convention() {
        // The pin is over the SPKI, so the same key in two certificates pins the same.
        let key = rcgen::KeyPair::generate().unwrap();
        let a = rcgen::CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let b = rcgen::CertificateParams::new(vec!["b.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pa = CaPin::of_certificate(a.der()).unwrap();
        assert_eq!(pa, CaPin::of_certificate(b.der()).unwrap());
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        );
        assert_eq!(pa.0.as_slice(), digest.as_ref());
        assert!(Trust::Pins(vec![pa]).accepts_ca(a.der()));
        let other = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&other)
            .unwrap();
        assert!(!Trust::Pins(vec![pa]).accepts_ca(c.der()));
    }

    #[test]
    fn a_server_of_another_ca_is_a_changed_ca_never_a_reason_to_re_enrol() {
        let ca = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let cert = p.self_signed(&key).unwrap();
            (rcgen::Issuer::new(p, key), cert)
        };
        let (_, ours) = ca("ours");
        let (theirs_issuer, theirs) = ca("theirs");
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["fleet.example".into()])
            .unwrap()
            .signed_by(&leaf_key, &theirs_issuer)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ours.der().clone()).unwrap();
        let verifier = EnrolledVerifier {
            inner: WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap(),
            enrolled: CaPin::of_certificate(ours.der()).unwrap(),
        };
        let err = verifier
            .verify_server_cert(
                leaf.der(),
                &[theirs.der().clone()],
                &ServerName::try_from("fleet.example").unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_err();
        let m = explain_handshake_error(&std::io::Error::other(err));
        assert!(
            m.contains("the server's certificate authority changed"),
            "{m}"
        );
        assert!(m.contains("does not re-enrol by itself"), "{m}");
        assert!(
            m.contains(&CaPin::of_certificate(theirs.der()).unwrap().to_string()),
            "names the CA the server presents: {m}"
        );
    }

    #[test]
    fn an_expired_server_certificate_is_named_with_its_date() {
        let err = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ExpiredContext {
                time: rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                    1_796_169_600,
                )),
                not_after: rustls_pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(1_796_083_200),
                ),
            },
        ));
        let m = explain_handshake_error(&err);
        assert!(
            m.starts_with("the fleet server's own TLS certificate expired at 2026-12-01T00:00:00Z (this host's clock says 2026-12-02T00:00:00Z)"),
            "{m}"
        );
        assert!(
            m.contains("this host's certificate is not the one at fault"),
            "{m}"
        );
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "nothing here").unwrap();
        let e = Trust::from_ca_file(&p).unwrap_err().to_string();
        assert!(
            e.contains("ca.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = Trust::from_ca_file(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
    }
}
