//! The fleet's internal certificate authority: an ECDSA P-256 key made at
//! `init`, kept sealed with the server secret (see [`crate::sealed`]) in a
//! 0600 file of the state directory, that signs the server's TLS certificate
//! and every host certificate.

use std::{path::Path, time::Duration};

use linkmesh_agent::{fs::write_atomic, identity::HostId, tls::CaPin};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// The CA key as state format 1 kept it: plaintext PEM (migrated away).
pub const PLAIN_KEY: &str = "ca.key";
/// The CA key sealed with the server secret.
pub const SEALED_KEY: &str = "ca.key.sealed";
/// The CA certificate (public).
pub const CA_CERT: &str = "ca.pem";

/// Tolerance for clocks that run slightly behind the server's: certificates
/// are valid from this long before they were issued.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// Failures of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Files could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        reason: String,
    },
    /// rcgen failed.
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A CSR the CA will not sign.
    #[error("{0}")]
    BadCsr(String),
    /// The secret does not open the CA's key.
    #[error(
        "the certificate authority's private key ({path}) cannot be opened with the server secret from {source_name}: start the server with the secret it was set up with. The server never makes a new certificate authority: every enrolled host trusts only this one ({pin})"
    )]
    WrongSecret {
        /// The sealed key file.
        path: String,
        /// Where the secret came from.
        source_name: String,
        /// The CA's pin.
        pin: CaPin,
    },
    /// Sealing or the secret failed otherwise.
    #[error(transparent)]
    Seal(#[from] crate::sealed::SealError),
}

/// A loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pin: CaPin,
}

/// A certificate signed for a host.
pub struct HostCert {
    /// DER of the certificate.
    pub der: CertificateDer<'static>,
    /// SHA-256 of the host's SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
    /// Serial number, hex.
    pub serial: String,
    /// Expiry.
    pub not_after: OffsetDateTime,
}

impl Ca {
    /// Creates a new CA in `dir` (which must not hold one already), its
    /// key sealed with `secret`.
    ///
    /// # Errors
    /// When a CA exists there already, or files cannot be written.
    pub fn create(dir: &Path, secret: &crate::sealed::Secret) -> Result<Self, CaError> {
        let io = |path: &Path, e: &dyn std::fmt::Display| CaError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        for existing in [CA_CERT, SEALED_KEY, PLAIN_KEY] {
            if dir.join(existing).exists() {
                return Err(io(
                    &dir.join(existing),
                    &"a CA already exists here; refusing to replace it",
                ));
            }
        }
        linkmesh_agent::fs::ensure_private_dir(dir, 0o700).map_err(|e| io(dir, &e))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "LinkMesh");
        dn.push(DnType::CommonName, "LinkMesh fleet CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(3650);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        // The key first: a CA certificate without its key is never left.
        seal_key(dir, secret, &key.serialize_pem(), cert.der())?;
        write_atomic(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)
            .map_err(|e| io(&dir.join(CA_CERT), &e))?;
        Self::load(dir, secret)
    }

    /// The CA certificate and pin in `dir`, without the key (what `token
    /// create` and `drift` need: no secret).
    ///
    /// # Errors
    /// When the certificate is missing or corrupt.
    pub fn certificate(dir: &Path) -> Result<(CertificateDer<'static>, CaPin), CaError> {
        let path = dir.join(CA_CERT);
        let cert_pem = std::fs::read_to_string(&path).map_err(|e| CaError::Io {
            path: path.display().to_string(),
            reason: format!("{e} (run `linkmesh-fleet init` first)"),
        })?;
        let cert = pem::parse(&cert_pem)
            .map(|p| CertificateDer::from(p.into_contents()))
            .map_err(|e| CaError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let pin = CaPin::of_certificate(&cert).map_err(|e| CaError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok((cert, pin))
    }

    /// Loads the CA from `dir`, opening its sealed key with `secret`.
    ///
    /// # Errors
    /// When its files are missing or corrupt, or [`CaError::WrongSecret`].
    pub fn load(dir: &Path, secret: &crate::sealed::Secret) -> Result<Self, CaError> {
        let (cert, pin) = Self::certificate(dir)?;
        let path = dir.join(SEALED_KEY);
        let bytes = std::fs::read(&path).map_err(|e| CaError::Io {
            path: path.display().to_string(),
            reason: format!("{e} (run `linkmesh-fleet init` first)"),
        })?;
        let sealed: crate::sealed::Sealed =
            serde_json::from_slice(&bytes).map_err(|e| CaError::Io {
                path: path.display().to_string(),
                reason: format!("not a sealed key: {e}"),
            })?;
        let key_pem = crate::sealed::open(secret, &sealed, &key_purpose(&cert), &path).map_err(
            |e| match e {
                crate::sealed::SealError::WrongSecret { .. } => CaError::WrongSecret {
                    path: path.display().to_string(),
                    source_name: secret.source.clone(),
                    pin,
                },
                other => CaError::Seal(other),
            },
        )?;
        let key_pem = String::from_utf8(key_pem).map_err(|_| CaError::Io {
            path: path.display().to_string(),
            reason: "the sealed key is not PEM".into(),
        })?;
        Self::from_pem(&key_pem, cert, pin)
    }

    /// Loads a CA whose key is plaintext PEM (state format 1), for the
    /// migration that seals it.
    ///
    /// # Errors
    /// When its files are missing or corrupt.
    pub fn load_plain(dir: &Path) -> Result<(Self, String), CaError> {
        let (cert, pin) = Self::certificate(dir)?;
        let path = dir.join(PLAIN_KEY);
        let key_pem = std::fs::read_to_string(&path).map_err(|e| CaError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok((Self::from_pem(&key_pem, cert, pin)?, key_pem))
    }

    fn from_pem(key_pem: &str, cert: CertificateDer<'static>, pin: CaPin) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()));
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { issuer, cert, pin })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA pin agents are given.
    pub fn pin(&self) -> CaPin {
        self.pin
    }

    /// A fresh TLS server certificate (chain: leaf, CA) and key for `names`
    /// (DNS names or IP addresses), valid for `lifetime`.
    ///
    /// # Errors
    /// When a name is invalid or signing fails.
    pub fn server_cert(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "LinkMesh fleet server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE.min(lifetime / 4);
        params.not_after = now + lifetime;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert.clone()], key))
    }

    /// Verifies a CSR (its signature proves possession of the key) and signs
    /// a client certificate for `host` valid for `lifetime`. Whatever names
    /// the CSR asks for are ignored: the CA decides the subject.
    ///
    /// # Errors
    /// [`CaError::BadCsr`] for an unparsable or forged CSR or an unsupported key.
    pub fn sign_host(
        &self,
        csr_der: &[u8],
        host: &HostId,
        lifetime: Duration,
    ) -> Result<HostCert, CaError> {
        let (csr, spki) = check_csr(csr_der)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, host.as_str());
        params.subject_alt_names = vec![SanType::URI(host.uri().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        // Backdating tolerates clocks slightly behind, but must stay small
        // against the lifetime or two thirds of it would lie in the past.
        params.not_before = now - BACKDATE.min(lifetime / 4);
        let not_after = now + lifetime;
        params.not_after = not_after;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        // The certificate must carry exactly the key the CSR proved.
        let issued = x509_parser::parse_x509_certificate(cert.der())
            .map_err(|e| CaError::BadCsr(format!("issued certificate does not parse: {e}")))?
            .1
            .public_key()
            .raw
            .to_vec();
        if issued != spki {
            return Err(CaError::BadCsr(
                "the certificate would not carry the request's key; refused".into(),
            ));
        }
        Ok(HostCert {
            der: cert.der().clone(),
            spki_sha256: spki_sha256(&spki),
            serial: linkmesh_agent::hex::encode(serial.as_ref()),
            not_after,
        })
    }
}

/// What the CA key's seal is bound to: the CA certificate it belongs to.
pub fn key_purpose(cert: &CertificateDer<'_>) -> Vec<u8> {
    let mut p = b"linkmesh-fleet CA key for certificate sha256:".to_vec();
    p.extend_from_slice(
        linkmesh_agent::hex::encode(ring::digest::digest(&ring::digest::SHA256, cert).as_ref())
            .as_bytes(),
    );
    p
}

/// Seals `key_pem` (the key of CA certificate `cert`) into `dir`.
///
/// # Errors
/// When it cannot be sealed or written.
pub fn seal_key(
    dir: &Path,
    secret: &crate::sealed::Secret,
    key_pem: &str,
    cert: &[u8],
) -> Result<(), CaError> {
    let sealed = crate::sealed::seal(
        secret,
        key_pem.as_bytes(),
        &key_purpose(&CertificateDer::from(cert)),
    )?;
    let path = dir.join(SEALED_KEY);
    let mut bytes = serde_json::to_vec_pretty(&sealed).map_err(|e| CaError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(&path, &bytes, 0o600).map_err(|e| CaError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Everything the CA requires of a CSR, checked before anything is spent:
/// it parses, its signature verifies (possession of the key), and its
/// SubjectPublicKeyInfo itself, not the signature algorithm, is an ECDSA
/// P-256 point or an Ed25519 key. Returns the parsed request and the DER
/// SubjectPublicKeyInfo.
///
/// # Errors
/// [`CaError::BadCsr`] naming what is wrong.
pub fn check_csr(
    csr_der: &[u8],
) -> Result<(rcgen::CertificateSigningRequestParams, Vec<u8>), CaError> {
    use x509_parser::{
        oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ED25519},
        prelude::FromDer as _,
    };
    let csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| CaError::BadCsr(format!("invalid certificate request: {e}")))?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&csr.public_key);
    // rcgen names the key after the CSR's signature algorithm; the key is
    // what the certificate will carry, so it is read on its own.
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki)
        .map_err(|e| CaError::BadCsr(format!("invalid public key in the request: {e}")))?;
    let key = &info.subject_public_key.data;
    let alg = &info.algorithm;
    let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
    let ok = (alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && curve.as_ref() == Some(&OID_EC_P256)
        && key.len() == 65
        && key.first() == Some(&4))
        || (alg.algorithm == OID_SIG_ED25519 && alg.parameters.is_none() && key.len() == 32);
    if !ok {
        let what = match &curve {
            Some(c) if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY => {
                format!("an EC key on curve {c}")
            }
            _ => format!("a key of algorithm {}", alg.algorithm),
        };
        return Err(CaError::BadCsr(format!(
            "unsupported key type ({what}): use ECDSA P-256 or Ed25519"
        )));
    }
    Ok((csr, spki))
}

/// SHA-256 of a DER SubjectPublicKeyInfo, hex.
pub fn spki_sha256(spki: &[u8]) -> String {
    linkmesh_agent::hex::sha256(spki)
}

/// SHA-256 of a CSR's public key, hex, once [`check_csr`] accepts the
/// request: a request the CA would refuse is refused here, before an
/// enrolment spends a token use on it.
///
/// # Errors
/// [`CaError::BadCsr`] naming what is wrong.
pub fn csr_spki_sha256(csr_der: &[u8]) -> Result<String, CaError> {
    Ok(spki_sha256(&check_csr(csr_der)?.1))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::BadCsr("system random number generator failed".into()))?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}
