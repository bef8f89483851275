//! The host's identity: a key pair made on the host, the certificate the
//! fleet's CA signed for it, the CA, the host id and the server it belongs to.
//! [`store`] keeps it on disk.

pub mod rotation;
pub mod store;

use std::fmt;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::{endpoint::ServerUrl, tls::CaPin};

pub use store::{IdentityStore, StoreError, StoreLock};

/// The URI SAN prefix of host certificates: `urn:linkmesh:host:<host id>`.
pub const HOST_URI_PREFIX: &str = "urn:linkmesh:host:";

/// A host id assigned by the fleet server (lowercase letters, digits and
/// dashes, at most 64).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostId(String);

/// Problems with identity material, whether received from a server or read
/// back from disk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The host id has characters or a length the agent does not accept.
    #[error("invalid host id {0:?}")]
    InvalidHostId(String),
    /// A certificate could not be parsed.
    #[error("cannot parse {what}: {reason}")]
    Unparsable {
        /// Which certificate or key.
        what: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// The certificate is for another key.
    #[error("the certificate's public key does not match the private key")]
    KeyMismatch,
    /// The certificate is not signed by the CA.
    #[error("the certificate is not signed by the CA")]
    NotSignedByCa,
    /// The certificate names another host.
    #[error("the certificate names host {found:?}, expected {expected:?}")]
    WrongHost {
        /// The URI SAN found, if any.
        found: String,
        /// The host id expected.
        expected: String,
    },
    /// No certificate at all.
    #[error("the certificate chain is empty")]
    EmptyChain,
}

// === impl HostId ===

impl HostId {
    /// Validates a host id.
    ///
    /// # Errors
    /// [`IdentityError::InvalidHostId`].
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdentityError::InvalidHostId(s.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URI SAN a certificate for this host carries.
    pub fn uri(&self) -> String {
        format!("{HOST_URI_PREFIX}{}", self.0)
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A complete host identity, as enrolment produces it and the store keeps it.
pub struct Identity {
    /// The host id the server assigned.
    pub host_id: HostId,
    /// The server this identity belongs to.
    pub server: ServerUrl,
    /// Pin of the CA (for display and comparison with `--ca-pin`).
    pub ca_pin: CaPin,
    /// When enrolment completed (RFC 3339).
    pub enrolled_at: String,
    /// Certificate chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The fleet CA.
    pub ca: CertificateDer<'static>,
    /// Validity of the leaf certificate.
    pub validity: Validity,
    key: PrivateKeyDer<'static>,
}

/// The validity window of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

// === impl Identity ===

impl Identity {
    /// Assembles an identity after checking that its parts fit together (see
    /// [`verify_material`]).
    ///
    /// # Errors
    /// [`IdentityError`] when they do not.
    pub fn new(
        host_id: HostId,
        server: ServerUrl,
        enrolled_at: String,
        key: PrivateKeyDer<'static>,
        certs: Vec<CertificateDer<'static>>,
        ca: CertificateDer<'static>,
    ) -> Result<Self, IdentityError> {
        let key_spki = key_spki(&key)?;
        let validity = verify_material(&key_spki, &certs, &ca, &host_id)?;
        let ca_pin = CaPin::of_certificate(&ca).map_err(|e| IdentityError::Unparsable {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        Ok(Self {
            host_id,
            server,
            ca_pin,
            enrolled_at,
            certs,
            ca,
            validity,
            key,
        })
    }

    /// The private key. Never log it.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("host_id", &self.host_id)
            .field("server", &self.server)
            .field("ca_pin", &self.ca_pin)
            .field("not_after", &self.validity.not_after)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The DER SubjectPublicKeyInfo of a private key.
///
/// # Errors
/// When the key is not one rcgen can load (ECDSA P-256/P-384, Ed25519).
pub fn key_spki(key: &PrivateKeyDer<'_>) -> Result<Vec<u8>, IdentityError> {
    let pair = rcgen::KeyPair::try_from(key).map_err(|e| IdentityError::Unparsable {
        what: "private key",
        reason: e.to_string(),
    })?;
    Ok(rcgen::PublicKeyData::subject_public_key_info(&pair))
}

/// Checks that a leaf certificate carries `key_spki`, names `host_id` in its
/// URI SAN, and is signed by `ca`; returns the leaf's validity.
///
/// # Errors
/// [`IdentityError`] naming the first mismatch.
pub fn verify_material(
    key_spki: &[u8],
    certs: &[CertificateDer<'_>],
    ca: &CertificateDer<'_>,
    host_id: &HostId,
) -> Result<Validity, IdentityError> {
    let leaf_der = certs.first().ok_or(IdentityError::EmptyChain)?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(leaf_der).map_err(|e| IdentityError::Unparsable {
            what: "certificate",
            reason: e.to_string(),
        })?;
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(ca).map_err(|e| IdentityError::Unparsable {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
    if leaf.tbs_certificate.subject_pki.raw != key_spki {
        return Err(IdentityError::KeyMismatch);
    }
    // Intermediates are not issued today; the leaf is signed by the CA directly.
    leaf.verify_signature(Some(&ca_cert.tbs_certificate.subject_pki))
        .map_err(|_| IdentityError::NotSignedByCa)?;
    let found = host_uri(&leaf);
    if found.as_deref() != Some(host_id.uri().as_str()) {
        return Err(IdentityError::WrongHost {
            found: found.unwrap_or_default(),
            expected: host_id.to_string(),
        });
    }
    Ok(Validity {
        not_before: leaf.validity().not_before.to_datetime(),
        not_after: leaf.validity().not_after.to_datetime(),
    })
}

/// The host id a certificate names in its `urn:linkmesh:host:` URI SAN.
pub fn host_id_of_certificate(cert: &CertificateDer<'_>) -> Option<HostId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let uri = host_uri(&parsed)?;
    HostId::new(uri.strip_prefix(HOST_URI_PREFIX)?).ok()
}

fn host_uri(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with(HOST_URI_PREFIX) => {
            Some((*u).to_owned())
        }
        _ => None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA and a host certificate for `host`, as a fleet server would make them.
    pub(crate) fn issue(
        host: &str,
    ) -> (
        rcgen::KeyPair,
        Vec<CertificateDer<'static>>,
        CertificateDer<'static>,
    ) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            format!("{HOST_URI_PREFIX}{host}").try_into().unwrap(),
        )];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (key, vec![cert.der().clone()], ca.der().clone())
    }

    #[test]
    fn host_ids() {
        assert!(HostId::new("0b6c1a9e-4f1d-4d0e-9a51-2f3c6c1f0e77").is_ok());
        for bad in ["", "UPPER", "a/b", "a b", &"a".repeat(65)] {
            assert!(HostId::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn verifies_matching_material() {
        let (key, certs, ca) = issue("h1");
        let host = HostId::new("h1").unwrap();
        let v = verify_material(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            &certs,
            &ca,
            &host,
        )
        .unwrap();
        assert!(v.not_after > v.not_before);
        assert_eq!(host_id_of_certificate(&certs[0]), Some(host.clone()));

        let other = rcgen::KeyPair::generate().unwrap();
        assert_eq!(
            verify_material(
                &rcgen::PublicKeyData::subject_public_key_info(&other),
                &certs,
                &ca,
                &host
            ),
            Err(IdentityError::KeyMismatch)
        );
        let (_, _, other_ca) = issue("h1");
        assert_eq!(
            verify_material(
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                &certs,
                &other_ca,
                &host
            ),
            Err(IdentityError::NotSignedByCa)
        );
        assert!(matches!(
            verify_material(
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                &certs,
                &ca,
                &HostId::new("h2").unwrap()
            ),
            Err(IdentityError::WrongHost { .. })
        ));
        assert_eq!(
            verify_material(
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                &[],
                &ca,
                &host
            ),
            Err(IdentityError::EmptyChain)
        );
    }

    #[test]
    fn debug_redacts_the_key() {
        let (key, certs, ca) = issue("h1");
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let id = Identity::new(
            HostId::new("h1").unwrap(),
            "https://fleet.example".parse().unwrap(),
            "2026-01-01T00:00:00Z".into(),
            der,
            certs,
            ca,
        )
        .unwrap();
        let dbg = format!("{id:?}");
        assert!(dbg.contains("<redacted>") && dbg.contains("h1"), "{dbg}");
    }
}
