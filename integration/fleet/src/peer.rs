//! What the network edge ([`crate::server`]) tells the API ([`crate::service`])
//! and the OpAMP endpoint ([`crate::opamp`]) about a request's peer: the one
//! type they share, so neither imports the other.

use std::{net::SocketAddr, sync::Arc};

use rustls_pki_types::CertificateDer;

/// What the server knows about the peer of a request, from TLS.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: SocketAddr,
    /// Its verified certificate chain, when it presented one.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}
