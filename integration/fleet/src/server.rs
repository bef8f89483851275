//! The server's network edge: a TLS 1.3 listener (client certificates
//! optional at the TLS layer, checked per RPC) feeding tonic. Handshakes run
//! in their own tasks so a slow client cannot stall accepts.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use linkmesh_agent::{proto, tls::ALPN_H2};
use rustls::{
    RootCertStore, ServerConfig,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::Connected;

use crate::{ca::Ca, peer::PeerInfo, service::FleetService};

/// Bound on a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
    /// Set once the client has sent application data after the handshake.
    spoke: Arc<std::sync::atomic::AtomicBool>,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let certs = self
            .inner
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>()));
        PeerInfo {
            remote: self.remote,
            certs,
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.spoke.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The server's own certificate, replaced while the server runs: new
/// handshakes get the current one, connections already open keep theirs.
pub struct ServerCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    lifetime: Duration,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCert {
    /// Issues the first certificate.
    ///
    /// # Errors
    /// When it cannot be made.
    pub fn new(ca: Arc<Ca>, names: &[String], lifetime: Duration) -> anyhow::Result<Arc<Self>> {
        let key = Self::issue(&ca, names, lifetime)?;
        Ok(Arc::new(Self {
            ca,
            names: names.to_vec(),
            lifetime,
            current: std::sync::RwLock::new(Arc::new(key)),
        }))
    }

    fn issue(
        ca: &Ca,
        names: &[String],
        lifetime: Duration,
    ) -> anyhow::Result<rustls::sign::CertifiedKey> {
        let (chain, key) = ca.server_cert(names, lifetime)?;
        let provider = linkmesh_agent::tls::provider();
        Ok(rustls::sign::CertifiedKey::from_der(chain, key, &provider)?)
    }

    /// Replaces the certificate with a fresh one.
    ///
    /// # Errors
    /// When it cannot be made; the current one stays.
    pub fn renew(&self) -> anyhow::Result<()> {
        let key = Arc::new(Self::issue(&self.ca, &self.names, self.lifetime)?);
        if let Ok(mut cur) = self.current.write() {
            *cur = key;
        }
        Ok(())
    }

    /// Renews the certificate at two thirds of its lifetime, for as long as
    /// the server runs (a failure is retried a minute later, or sooner for
    /// short lifetimes).
    pub async fn keep_fresh(self: Arc<Self>) {
        let every = self.lifetime.mul_f64(2.0 / 3.0).max(Duration::from_secs(1));
        let retry = (self.lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.renew()).await {
                Ok(Ok(())) => {
                    tracing::info!(
                        lifetime_s = self.lifetime.as_secs(),
                        "Renewed the server's certificate"
                    );
                    wait = every;
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, retry_s = retry.as_secs(), "Cannot renew the server's certificate");
                    wait = retry;
                }
                Err(e) => {
                    tracing::error!(error = %e, "Server certificate renewal task failed");
                    wait = retry;
                }
            }
        }
    }
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("names", &self.names)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

/// The server's TLS configuration: its certificate from `cert` (renewed
/// while it runs), TLS 1.3 only, h2, client certificates from `ca` accepted but not
/// required (enrolment has none yet). An expired client certificate signed by
/// the CA still completes the handshake (it proves the host holds the key);
/// each RPC decides: Report refuses it, Renew accepts it within the grace
/// window and otherwise says what to do.
///
/// # Errors
/// When rustls rejects the configuration.
pub fn tls_config(ca: &Ca, cert: Arc<ServerCert>) -> anyhow::Result<ServerConfig> {
    let provider = linkmesh_agent::tls::provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert().clone())?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ExpiredOkVerifier { inner }))
        .with_cert_resolver(cert);
    // h2 for gRPC; http/1.1 for curl fetching the installer and artifacts.
    config.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Verifies client certificates like webpki, except that an expired one is
/// verified as of the last moment it was valid.
#[derive(Debug)]
struct ExpiredOkVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for ExpiredOkVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) => {
                let not_after = x509_parser::parse_x509_certificate(end_entity)
                    .map(|(_, c)| c.validity().not_after.timestamp())
                    .map_err(|_| {
                        rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
                    })?;
                let last_valid = UnixTime::since_unix_epoch(Duration::from_secs(
                    u64::try_from(not_after).unwrap_or(0),
                ));
                self.inner
                    .verify_client_cert(end_entity, intermediates, last_valid)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the server offers for download next to the API: the installer, the
/// CA (so the installer can check it against the pin), the unit file and
/// release artifacts from a directory.
#[derive(Clone, Debug)]
pub struct Downloads {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// Directory of artifacts (`linkmesh-agent-VERSION-linux-ARCH` and
    /// `.sha256` files beside them); `None` serves none.
    pub artifacts: Option<std::path::PathBuf>,
    /// The signed package repositories generated from the artifacts,
    /// served at `/apt/`, `/yum/` and `/keys/`.
    pub repositories: Option<std::sync::Arc<crate::repository::Repositories>>,
    /// The agent version `/agent/latest` names.
    pub latest_agent: String,
    /// Runtime pins served at `/runtime/pins` as `NAME VERSION` lines.
    pub pins: Vec<(String, String)>,
}

/// The installer script, as built into this server.
pub const INSTALL_SH: &str = include_str!("../../../install/install.sh");
/// The systemd unit the installer puts in place.
pub const AGENT_UNIT: &str = include_str!("../../../systemd/linkmesh-agent.service");
/// The upgrade watcher's unit the installer's binary method puts in place.
pub const UPGRADE_UNIT: &str = include_str!("../../../systemd/linkmesh-upgrade.service");
/// The first-boot enrolment unit the installer's binary method puts in place.
pub const ENROLL_UNIT: &str = include_str!("../../../systemd/linkmesh-enroll.service");
/// The default local collector configuration the installer puts in place.
pub const COLLECTOR_YAML: &str = include_str!("../../../packaging/collector.yaml");
/// The collector-runtime installer.
pub const INSTALL_OPAMP_SH: &str = include_str!("../../../install/install-opamp.sh");

/// The scripts the server serves for hosts to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// `install.sh`, the agent.
    Install,
    /// `install-opamp.sh`, the collector runtime.
    InstallOpamp,
}

impl Script {
    /// Its name on the server.
    pub fn name(self) -> &'static str {
        match self {
            Self::Install => "install.sh",
            Self::InstallOpamp => "install-opamp.sh",
        }
    }

    /// The bytes served.
    pub fn text(self) -> &'static str {
        match self {
            Self::Install => INSTALL_SH,
            Self::InstallOpamp => INSTALL_OPAMP_SH,
        }
    }

    /// SHA-256 of what is served, hex.
    pub fn sha256(self) -> String {
        linkmesh_agent::hex::sha256(self.text().as_bytes())
    }
}

/// The one-liner a host runs (as root) to install from `url`, every step
/// verified: the fleet's CA (`ca_pem`) is carried inside it, so the first
/// download already checks the server's certificate; the script is saved,
/// not piped, and checked against the SHA-256 of the one this server
/// serves before a line of it runs (a tampered or truncated download is
/// refused with exit 7); it then runs with `--ca-file` and `args`, with
/// `env` (`NAME=value ...`, e.g. the token, kept off the command line)
/// before it. Runs in a subshell; the scratch directory goes with it.
pub fn verified_one_liner(
    url: &str,
    ca_pem: &str,
    script: Script,
    env: &str,
    args: &str,
) -> String {
    let url = url.trim_end_matches('/');
    let ca: Vec<String> = ca_pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("'{l}'"))
        .collect();
    let env = if env.is_empty() {
        String::new()
    } else {
        format!("{env} ")
    };
    let args = if args.is_empty() {
        String::new()
    } else {
        format!(" {args}")
    };
    format!(
        "(set -e; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT; printf '%s\\n' {ca} >\"$d/ca.pem\"; \
         curl -fsS --cacert \"$d/ca.pem\" -o \"$d/{name}\" {url}/{name}; \
         echo '{sha}  '\"$d/{name}\" | sha256sum -c --quiet - >/dev/null 2>&1 || \
         {{ echo '{name} from {url} does not match the SHA-256 its server gave; nothing was run' >&2; exit 7; }}; \
         {env}sh \"$d/{name}\" --server {url} --ca-file \"$d/ca.pem\"{args})",
        ca = ca.join(" "),
        name = script.name(),
        sha = script.sha256(),
    )
}

fn download_routes(d: Downloads) -> axum::Router {
    use axum::{extract::Path as UrlPath, routing::get};
    let text = |body: String| {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            )],
            body,
        )
    };
    let ca = d.ca_pem.clone();
    let latest = d.latest_agent.clone();
    let pins: String = d.pins.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let dir = d.artifacts.clone();
    let repos = d.repositories.clone();
    let router = axum::Router::new()
        .route(
            "/install.sh",
            get(move || async move { text(INSTALL_SH.to_owned()) }),
        )
        .route(
            "/install-opamp.sh",
            get(move || async move { text(INSTALL_OPAMP_SH.to_owned()) }),
        )
        .route("/runtime/pins", get(move || async move { text(pins) }))
        .route(
            "/linkmesh-agent.service",
            get(move || async move { text(AGENT_UNIT.to_owned()) }),
        )
        .route(
            "/linkmesh-upgrade.service",
            get(move || async move { text(UPGRADE_UNIT.to_owned()) }),
        )
        .route(
            "/linkmesh-enroll.service",
            get(move || async move { text(ENROLL_UNIT.to_owned()) }),
        )
        .route(
            "/collector.yaml",
            get(move || async move { text(COLLECTOR_YAML.to_owned()) }),
        )
        .route("/ca.pem", get(move || async move { text(ca) }))
        .route(
            "/agent/latest",
            get(move || async move { text(format!("{latest}\n")) }),
        )
        .route(
            "/artifacts/{name}",
            get(
                move |UrlPath(name): UrlPath<String>, headers: axum::http::HeaderMap| async move {
                    let ok = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                        && !name.starts_with('.');
                    match dir.filter(|_| ok) {
                        Some(dir) => artifact(&dir.join(&name), &headers).await,
                        None => not_found(),
                    }
                },
            ),
        );
    match repos {
        Some(repos) => router.merge(repository_routes(repos)),
        None => router,
    }
}

/// `/apt/…` and `/yum/…` from the newest generation (rebuilt first when the
/// artifacts changed), and the archive keys at `/keys/`.
fn repository_routes(repos: std::sync::Arc<crate::repository::Repositories>) -> axum::Router {
    use axum::{
        extract::Path as UrlPath,
        http::{StatusCode, header},
        response::IntoResponse as _,
        routing::get,
    };
    let keyring = axum::body::Bytes::from(repos.keyring().to_vec());
    let armored = axum::body::Bytes::from(repos.keyring_armored().to_owned());
    let key = |body: axum::body::Bytes| {
        move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/pgp-keys")], body).into_response() }
        }
    };
    let file = |kind: &'static str| {
        let repos = repos.clone();
        move |UrlPath(path): UrlPath<String>, headers: axum::http::HeaderMap| {
            let repos = repos.clone();
            async move {
                if !crate::repository::servable_path(&path) {
                    return not_found();
                }
                match tokio::task::spawn_blocking(move || repos.current()).await {
                    Ok(Ok(generation)) => {
                        artifact(&generation.join(kind).join(&path), &headers).await
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("package repositories: {e}");
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("the package repositories could not be generated: {e}\n"),
                        )
                            .into_response()
                    }
                    Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }
    };
    axum::Router::new()
        .route("/apt/{*path}", get(file("apt")))
        .route("/yum/{*path}", get(file("yum")))
        .route("/keys/linkmesh-archive.gpg", get(key(keyring)))
        .route("/keys/linkmesh-archive.asc", get(key(armored)))
}

fn not_found() -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (axum::http::StatusCode::NOT_FOUND, "no such artifact\n").into_response()
}

/// Bytes read from an artifact per chunk: the memory one download holds,
/// whatever the file's size.
const ARTIFACT_CHUNK: usize = 64 * 1024;

/// Streams one artifact: a regular file opened without following a
/// symlink (nothing outside the directory is served), with
/// `Content-Length`, an `ETag` from its size and modification time, and
/// `304 Not Modified` for a matching `If-None-Match`.
async fn artifact(
    path: &std::path::Path,
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};

    use axum::{
        http::{StatusCode, header},
        response::IntoResponse as _,
    };
    use tokio::io::AsyncReadExt as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits());
    let path = path.to_owned();
    let Ok(Ok((file, meta))) = tokio::task::spawn_blocking(move || {
        let f = opts.open(&path)?;
        let m = f.metadata()?;
        Ok::<_, io::Error>((f, m))
    })
    .await
    else {
        return not_found();
    };
    if !meta.is_file() {
        return not_found();
    }
    let etag = format!(
        "\"{:x}-{:x}.{:x}-{:x}\"",
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.len()
    );
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let len = meta.len();
    let file = tokio::fs::File::from_std(file);
    let stream = futures_util::stream::unfold((file, len), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let want = usize::try_from(left)
            .unwrap_or(ARTIFACT_CHUNK)
            .min(ARTIFACT_CHUNK);
        let mut buf = vec![0u8; want];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok::<_, io::Error>(axum::body::Bytes::from(buf)),
                    (file, left - n as u64),
                ))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (header::ETAG, etag),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Paths nobody serves: a real 404 for HTTP clients, gRPC's own
/// `UNIMPLEMENTED` for gRPC calls to a method that does not exist.
async fn fallback(req: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented(format!("no method {}", req.uri().path()))
            .into_http::<axum::body::Body>()
            .into_response()
    } else {
        (axum::http::StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}

/// Bounds that keep one client from starving the others.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections in all (kept below the file-descriptor limit).
    pub max_connections: usize,
    /// Open connections from one source address.
    pub max_per_address: usize,
    /// How long a client has after its TLS handshake to send its first
    /// request bytes (and an HTTP/1 client to send a request's headers).
    pub first_request: Duration,
    /// HTTP/2 keepalive: a ping after this much quiet…
    pub keepalive_interval: Duration,
    /// …unanswered for this long closes the connection.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_address: 64,
            first_request: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Raises this process's open-file soft limit to its hard limit; returns
/// the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "Cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// Log lines about refused connections and failed accepts, at most one per
/// [`LOG_EVERY`] per kind, with how many happened meanwhile.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Open connections per source address; a slot is given back when its
/// guard drops.
#[derive(Clone, Default)]
struct PerAddress(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>);

struct Slot(PerAddress, std::net::IpAddr);

impl PerAddress {
    fn take(&self, ip: std::net::IpAddr, max: usize) -> Option<Slot> {
        let mut m = self.0.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = (self.0).0.lock()
            && let Some(n) = m.get_mut(&self.1)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// How long open connections get to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the agent API, the downloads and OpAMP on `listener` until
/// `shutdown` completes, then drains open connections (bounded).
///
/// Connections are served by hyper directly (HTTP/2 for gRPC, HTTP/1.1 for
/// downloads and the OpAMP WebSocket upgrade, which tonic's own server does
/// not allow); each request carries the connection's [`PeerInfo`].
///
/// # Errors
/// Never once listening; the signature keeps room for bind-time failures.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: FleetService,
    downloads: Downloads,
    opamp: crate::opamp::Hub,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo, TokioTimer},
        server::conn::auto,
        service::TowerToHyperService,
    };
    let router = tonic::service::Routes::new(proto::Server::new(service))
        .prepare()
        .into_axum_router()
        .merge(download_routes(downloads))
        .merge(opamp.routes())
        .fallback(fallback);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let per_address = PerAddress::default();
    let every = || crate::text::Every::new(LOG_EVERY);
    let (mut accept_log, mut full_log, mut address_log) = (every(), every(), every());
    let mut accept_backoff = Duration::from_millis(10);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => {
                    accept_backoff = Duration::from_millis(10);
                    c
                }
                Err(e) => {
                    // Out of descriptors or memory: wait (longer each time)
                    // for connections to end; log it once in a while.
                    if let Some(suppressed) = accept_log.allow() {
                        tracing::warn!(error = %e, suppressed, retry_ms = accept_backoff.as_millis() as u64, "Accept failed");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(accept_backoff) => {}
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        if conns.len() >= limits.max_connections {
            if let Some(suppressed) = full_log.allow() {
                tracing::warn!(%remote, open = conns.len(), suppressed, "Connection refused: the server is at its connection limit");
            }
            continue;
        }
        let Some(slot) = per_address.take(remote.ip(), limits.max_per_address) else {
            if let Some(suppressed) = address_log.allow() {
                tracing::warn!(address = %remote.ip(), limit = limits.max_per_address, suppressed, "Connection refused: too many from one address");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, router, mut stop) = (acceptor.clone(), router.clone(), stop_rx.clone());
        conns.spawn(async move {
            let _slot = slot;
            let spoke = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(inner)) => TlsConn { inner, remote, spoke: spoke.clone() },
                Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
            };
            let peer = tls.connect_info();
            let svc = tower::ServiceExt::map_request(
                router,
                move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req
                },
            );
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.first_request);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(limits.keepalive_interval))
                .keep_alive_timeout(limits.keepalive_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), TowerToHyperService::new(svc));
            let mut conn = std::pin::pin!(conn);
            let silent = tokio::time::sleep(limits.first_request);
            tokio::pin!(silent);
            let mut checked = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r { tracing::debug!(%remote, error = %e, "Connection ended with an error"); }
                        return;
                    }
                    () = &mut silent, if !checked => {
                        if !spoke.load(std::sync::atomic::Ordering::Relaxed) {
                            return tracing::debug!(%remote, "Closed a connection that sent nothing after its handshake");
                        }
                        checked = true;
                    }
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            open = conns.len(),
            "Closing connections that did not finish in time"
        );
        conns.abort_all();
    }
    Ok(())
}
