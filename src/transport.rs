//! Connections to the fleet server: DNS, TCP and the TLS handshake done here,
//! so each failure gets an error that names the address and the cause, then
//! the established stream handed to tonic as a gRPC channel.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::{endpoint::ServerUrl, tls::explain_handshake_error};

/// Why the agent could not get a channel to the server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The host name did not resolve.
    #[error("cannot resolve {authority}: {reason}")]
    Resolve {
        /// `host:port`.
        authority: String,
        /// The resolver's message.
        reason: String,
    },
    /// No address accepted a TCP connection.
    #[error("server {server} is unreachable at {addrs}: {reason}")]
    Unreachable {
        /// The server URL.
        server: String,
        /// The addresses tried.
        addrs: String,
        /// The last error.
        reason: String,
    },
    /// The TLS handshake failed; the token was not sent.
    #[error("TLS with {server} failed, nothing was sent: {reason}")]
    Handshake {
        /// The server URL.
        server: String,
        /// What went wrong, in an operator's terms.
        reason: String,
    },
    /// tonic could not set up the HTTP/2 channel.
    #[error("cannot open a gRPC channel to {server}: {error}")]
    Channel {
        /// The server URL.
        server: String,
        /// The error.
        error: tonic::transport::Error,
    },
}

/// Connects to `server` with `tls` and returns a gRPC channel over that one
/// connection, whose requests time out after `timeout`. Every step (resolve,
/// connect, handshake) is bounded by `timeout` too.
///
/// # Errors
/// [`ConnectError`] for the step that failed.
pub async fn connect_once(
    server: &ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Channel, ConnectError> {
    let authority = server.authority();
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host(authority.clone())).await;
    let addrs: Vec<SocketAddr> = match resolved {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            return Err(ConnectError::Resolve {
                authority,
                reason: e.to_string(),
            });
        }
        Err(_) => {
            let reason = format!("timed out after {timeout:?}");
            return Err(ConnectError::Resolve { authority, reason });
        }
    };
    let mut last = String::from("no addresses");
    let mut tcp = None;
    for addr in &addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("connect timed out after {timeout:?}"),
        }
    }
    let Some(tcp) = tcp else {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        return Err(ConnectError::Unreachable {
            server: server.to_string(),
            addrs: if list.is_empty() {
                authority
            } else {
                list.join(", ")
            },
            reason: last,
        });
    };
    let _ = tcp.set_nodelay(true);

    let handshake_err = |reason: String| ConnectError::Handshake {
        server: server.to_string(),
        reason,
    };
    let name = rustls::pki_types::ServerName::try_from(server.host().to_owned())
        .map_err(|e| handshake_err(format!("invalid server name: {e}")))?;
    let tls_stream = match tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(handshake_err(explain_handshake_error(&e))),
        Err(_) => {
            return Err(handshake_err(format!(
                "handshake timed out after {timeout:?}"
            )));
        }
    };

    // Hand the established stream to tonic exactly once.
    let slot = Arc::new(std::sync::Mutex::new(Some(TokioIo::new(tls_stream))));
    let connector = tower::service_fn(move |_: http::Uri| {
        let io = slot.lock().ok().and_then(|mut s| s.take());
        async move {
            io.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotConnected, "connection already used")
            })
        }
    });
    let channel_err = |error| ConnectError::Channel {
        server: server.to_string(),
        error,
    };
    Endpoint::from_shared(format!("http://{authority}"))
        .map_err(channel_err)?
        .timeout(timeout)
        .connect_with_connector(connector)
        .await
        .map_err(channel_err)
}
