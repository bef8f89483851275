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
    /// The HTTP CONNECT proxy could not be reached or refused the tunnel.
    #[error("cannot reach {server} through the proxy: {reason}")]
    Proxy {
        /// The server URL.
        server: String,
        /// The proxy's failure, naming the proxy.
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

/// Opens a TLS connection to `server`: directly (resolve, then each address
/// in turn) or through the HTTP CONNECT `proxy`, then the handshake with
/// `tls`. Every step is bounded by `timeout`. The one way the agent reaches
/// the server: enrolment, reports, renewal, re-key and `check` all dial here.
///
/// # Errors
/// [`ConnectError`] for the step that failed.
pub async fn dial_tls(
    server: &ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    proxy: Option<&Proxy>,
    timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let authority = server.authority();
    let tcp = match proxy {
        Some(p) => connect_via_proxy(p, &authority, timeout)
            .await
            .map_err(|e| ConnectError::Proxy {
                server: server.to_string(),
                reason: e.to_string(),
            })?,
        None => connect_direct(server, timeout).await?,
    };
    let _ = tcp.set_nodelay(true);
    let handshake_err = |reason: String| ConnectError::Handshake {
        server: server.to_string(),
        reason,
    };
    let name = rustls::pki_types::ServerName::try_from(server.host().to_owned())
        .map_err(|e| handshake_err(format!("invalid server name: {e}")))?;
    match tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(handshake_err(explain_handshake_error(&e))),
        Err(_) => Err(handshake_err(format!(
            "handshake timed out after {timeout:?}"
        ))),
    }
}

/// Resolves `server` and connects to the first address that accepts.
async fn connect_direct(server: &ServerUrl, timeout: Duration) -> Result<TcpStream, ConnectError> {
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
    for addr in &addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = format!("connect timed out after {timeout:?}"),
        }
    }
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    Err(ConnectError::Unreachable {
        server: server.to_string(),
        addrs: if list.is_empty() {
            authority
        } else {
            list.join(", ")
        },
        reason: last,
    })
}

/// Connects to `server` (through `proxy` when given) with `tls` and returns
/// a gRPC channel over that one connection, whose requests time out after
/// `timeout`.
///
/// # Errors
/// [`ConnectError`] for the step that failed.
pub async fn connect_once(
    server: &ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    proxy: Option<&Proxy>,
    timeout: Duration,
) -> Result<Channel, ConnectError> {
    let authority = server.authority();
    let tls_stream = dial_tls(server, tls, proxy, timeout).await?;
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

/// An HTTP CONNECT proxy (`http://host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub authority: String,
    /// Where the setting came from (`proxy.url`, `HTTPS_PROXY`…), for `check`.
    pub source: String,
}

/// Picks the proxy for `server_host`: the configured `proxy.url` first, else
/// `HTTPS_PROXY`/`https_proxy`, unless `NO_PROXY`/`no_proxy` exempts the
/// host (comma-separated names, `.suffix` or `suffix` domain matches, exact
/// IPs, `*` for all). Pure; the caller passes the environment.
pub fn proxy_for(
    server_host: &str,
    configured: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<Proxy> {
    let (url, source) = match configured {
        Some(u) => (u.to_owned(), "proxy.url".to_owned()),
        None => ["HTTPS_PROXY", "https_proxy"].iter().find_map(|k| {
            env(k)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (v, (*k).to_owned()))
        })?,
    };
    let no_proxy = env("NO_PROXY")
        .or_else(|| env("no_proxy"))
        .unwrap_or_default();
    let host = server_host.to_ascii_lowercase();
    let exempt = no_proxy
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|e| {
            let e = e.split(':').next().unwrap_or("").to_owned();
            e == "*"
                || host == e.trim_start_matches('.')
                || host.ends_with(&format!(".{}", e.trim_start_matches('.')))
        });
    if exempt && configured.is_none() {
        return None;
    }
    let rest = url.trim().strip_prefix("http://").unwrap_or(url.trim());
    let authority = rest
        .split('/')
        .next()
        .unwrap_or("")
        .rsplit('@')
        .next()
        .unwrap_or("")
        .to_owned();
    if authority.is_empty() {
        return None;
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority
    } else {
        format!("{authority}:80")
    };
    Some(Proxy { authority, source })
}

/// The environment a Go program (opampsupervisor: gorilla/websocket with
/// `http.ProxyFromEnvironment`) needs to reach the server the way the agent
/// does: through `proxy`'s authority when there is one, else directly.
/// Each entry sets a variable (`Some`) or removes it (`None`). Go reads
/// the upper-case name first and skips empty values, so the lower-case
/// spellings are removed rather than emptied. Pure.
pub fn proxy_environment(proxy: Option<&Proxy>) -> Vec<(&'static str, Option<String>)> {
    match proxy {
        Some(p) => vec![
            ("HTTPS_PROXY", Some(format!("http://{}", p.authority))),
            ("https_proxy", None),
            ("NO_PROXY", None),
            ("no_proxy", None),
        ],
        None => vec![("HTTPS_PROXY", None), ("https_proxy", None)],
    }
}

/// Opens a tunnel to `target` (`host:port`) through an HTTP CONNECT proxy.
///
/// # Errors
/// Connection failures, or a non-2xx answer from the proxy.
pub async fn connect_via_proxy(
    proxy: &Proxy,
    target: &str,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let io_err = |m: String| std::io::Error::other(m);
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect(proxy.authority.as_str()))
        .await
        .map_err(|_| {
            io_err(format!(
                "proxy {} did not accept a connection within {timeout:?}",
                proxy.authority
            ))
        })?
        .map_err(|e| io_err(format!("proxy {} is unreachable: {e}", proxy.authority)))?;
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: linkmesh-agent/{}\r\n\r\n",
        crate::version::AGENT_VERSION
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 8192 {
                return Err(io_err("proxy answer too long".into()));
            }
            if stream.read(&mut byte).await? == 0 {
                return Err(io_err(format!(
                    "proxy {} closed the connection",
                    proxy.authority
                )));
            }
            head.push(byte[0]);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| io_err("proxy answer timed out".into()))??;
    let status_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    match status_line.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(stream),
        _ => Err(io_err(format!(
            "proxy {} refused CONNECT {target}: {status_line}",
            proxy.authority
        ))),
    }
}

/// Dials the server for a long-lived channel: every (re)connect resolves,
/// connects (directly or through the proxy) and handshakes with the current
/// TLS configuration, which renewal replaces in place.
#[derive(Clone)]
pub struct Dialer {
    server: ServerUrl,
    tls: Arc<std::sync::RwLock<Arc<rustls::ClientConfig>>>,
    proxy: Option<Proxy>,
    timeout: Duration,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl Dialer {
    /// A dialer for `server` with `tls`.
    pub fn new(
        server: ServerUrl,
        tls: Arc<rustls::ClientConfig>,
        proxy: Option<Proxy>,
        timeout: Duration,
    ) -> Self {
        Self {
            server,
            tls: Arc::new(std::sync::RwLock::new(tls)),
            proxy,
            timeout,
            last_error: Arc::default(),
        }
    }

    /// Replaces the TLS configuration for the next connections.
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        if let Ok(mut t) = self.tls.write() {
            *t = tls;
        }
    }

    /// The last dial failure, explained, if the last dial failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The proxy in use.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }

    async fn dial(&self) -> std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let result = self.dial_inner().await;
        if let Ok(mut e) = self.last_error.lock() {
            *e = result.as_ref().err().map(ToString::to_string);
        }
        result
    }

    async fn dial_inner(
        &self,
    ) -> std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
        let tls = self
            .tls
            .read()
            .map(|t| t.clone())
            .map_err(|_| std::io::Error::other("TLS configuration lock poisoned"))?;
        dial_tls(&self.server, tls, self.proxy.as_ref(), self.timeout)
            .await
            .map(TokioIo::new)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// A lazily connecting channel that redials through this dialer whenever
    /// its connection is lost.
    ///
    /// # Errors
    /// When the endpoint URI is invalid.
    pub fn channel(&self) -> Result<Channel, ConnectError> {
        let me = self.clone();
        let connector = tower::service_fn(move |_: http::Uri| {
            let me = me.clone();
            async move { me.dial().await }
        });
        Ok(
            Endpoint::from_shared(format!("http://{}", self.server.authority()))
                .map_err(|error| ConnectError::Channel {
                    server: self.server.to_string(),
                    error,
                })?
                .timeout(self.timeout)
                .connect_timeout(self.timeout)
                .connect_with_connector_lazy(connector),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_supervisor_gets_the_agents_proxy_and_nothing_else() {
        let p = Proxy {
            authority: "proxy.corp:3128".into(),
            source: "proxy.url".into(),
        };
        let env = proxy_environment(Some(&p));
        assert_eq!(
            env[0],
            ("HTTPS_PROXY", Some("http://proxy.corp:3128".into()))
        );
        assert!(env[1..].iter().all(|(_, v)| v.is_none()), "{env:?}");
        assert!(env.iter().any(|(k, _)| *k == "no_proxy"));
        let direct = proxy_environment(None);
        assert!(direct.iter().all(|(_, v)| v.is_none()), "{direct:?}");
        assert!(direct.iter().any(|(k, _)| *k == "https_proxy"));
    }

    #[test]
    fn proxy_selection() {
        let p = proxy_for(
            "fleet.example",
            None,
            env(&[("HTTPS_PROXY", "http://proxy.corp:3128")]),
        )
        .unwrap();
        assert_eq!(
            (p.authority.as_str(), p.source.as_str()),
            ("proxy.corp:3128", "HTTPS_PROXY")
        );
        let p = proxy_for(
            "fleet.example",
            None,
            env(&[("https_proxy", "http://user:pw@proxy.corp/")]),
        )
        .unwrap();
        assert_eq!(p.authority, "proxy.corp:80");
        let p = proxy_for(
            "fleet.example",
            Some("http://127.0.0.1:8888"),
            env(&[("HTTPS_PROXY", "http://other:1"), ("NO_PROXY", "*")]),
        )
        .unwrap();
        assert_eq!(
            (p.authority.as_str(), p.source.as_str()),
            ("127.0.0.1:8888", "proxy.url")
        );
        for no_proxy in [
            "fleet.example",
            ".example",
            "example",
            "other,fleet.example:8443",
            "*",
        ] {
            assert_eq!(
                proxy_for(
                    "fleet.example",
                    None,
                    env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", no_proxy)])
                ),
                None,
                "{no_proxy}"
            );
        }
        assert!(
            proxy_for(
                "fleet.example",
                None,
                env(&[
                    ("HTTPS_PROXY", "http://p:1"),
                    ("no_proxy", "xample,other.example")
                ])
            )
            .is_some()
        );
        assert_eq!(proxy_for("fleet.example", None, env(&[])), None);
    }
}
