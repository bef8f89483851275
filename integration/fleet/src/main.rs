//! `linkmesh-fleet`: the reference fleet server. A real CA, real tokens and
//! persistent state; operator commands work beside a running `serve`.

use std::{
    io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use linkmesh_agent::{
    config::parse_duration, endpoint::ServerUrl, proto, token::Token, version::Version,
};
use linkmesh_fleet::{
    ca::Ca,
    repository::{self, Repositories},
    sealed::Secret,
    server,
    service::{FleetService, ServiceConfig, rfc3339},
    state::{ServeRecord, State, TokenRecord},
    text::safe,
};
use time::OffsetDateTime;

#[derive(Debug, Parser)]
#[command(
    name = "linkmesh-fleet",
    version,
    about = "Reference LinkMesh fleet server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Create the state directory and the internal CA, its key sealed with
    /// the server secret (a no-op if it exists: the CA is never re-created).
    /// The server secret's file is made (random, 0600) when it does not
    /// exist yet and the state is new.
    Init(KeyArgs),
    /// Serve the agent API over TLS.
    Serve {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The server secret's file [default: $LINKMESH_FLEET_SECRET]: it
        /// opens the CA's sealed key.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// Address to listen on; port 0 picks a free port (printed on start).
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// URL agents use [default: https://LISTEN-ADDRESS].
        #[arg(long, value_name = "URL")]
        advertise_url: Option<String>,
        /// Extra DNS names or IPs for the server certificate.
        #[arg(long, value_name = "NAME")]
        san: Vec<String>,
        /// Lifetime of host certificates.
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        cert_lifetime: String,
        /// Version to report to agents [default: this build's].
        #[arg(long, value_name = "X.Y.Z")]
        server_version: Option<String>,
        /// The agent version offered to hosts (`/agent/latest`, ServerInfo)
        /// [default: the server's version]. Naming one newer than the
        /// server is allowed: the hosts' server-first rule refuses it.
        #[arg(long, value_name = "X.Y.Z")]
        latest_agent: Option<String>,
        /// Report interval agents are told to use.
        #[arg(long, value_name = "DURATION", default_value = "30s")]
        report_interval: String,
        /// How long after expiry a host certificate may still be renewed.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        renew_grace: String,
        /// otelcol-contrib version the fleet pins.
        #[arg(long, value_name = "X.Y.Z", default_value = "0.158.0")]
        pin_otelcol: String,
        /// opampsupervisor version the fleet pins.
        #[arg(long, value_name = "X.Y.Z", default_value = "0.158.0")]
        pin_supervisor: String,
        /// Grafana Alloy version the fleet pins.
        #[arg(long, value_name = "vX.Y.Z", default_value = "v1.18.1")]
        pin_alloy: String,
        /// Directory of release artifacts served under /artifacts/
        /// (linkmesh-agent-VERSION-linux-ARCH with .sha256 files).
        #[arg(long, value_name = "DIR")]
        artifacts: Option<PathBuf>,
        /// Open connections in all (capped below the open-file limit, which
        /// is raised to its hard limit at start).
        #[arg(long, value_name = "N", default_value_t = 4096)]
        max_connections: usize,
        /// Open connections from one source address.
        #[arg(long, value_name = "N", default_value_t = 64)]
        max_connections_per_address: usize,
        /// Time a client has after its TLS handshake to send a request.
        #[arg(long, value_name = "DURATION", default_value = "10s")]
        first_request_timeout: String,
        /// Lifetime of the server's own TLS certificate; it is renewed at
        /// two thirds of it while the server runs.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        server_cert_lifetime: String,
        /// What a clone (a machine presenting another host's copied
        /// certificate from another fingerprint) gets: an identity of its
        /// own at once, or one held until `hosts approve ID`.
        #[arg(long, value_enum, default_value = "rekey")]
        clone_policy: ClonePolicyArg,
    },
    /// Fleet drift: each host's agent and runtime versions against the server
    /// and the pins, with the upgrade command for hosts out of the window.
    Drift {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Back up the state (consistent while `serve` runs) into one file; the
    /// CA key stays sealed, the secret is not in it.
    Backup {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The archive to write (gzipped tar, 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Restore a backup into a state directory (the server stopped); serve
    /// it with the secret it was made with.
    Restore {
        /// The archive `backup` wrote.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// Replace a state already there (kept as DIR.before-restore-TIME).
        #[arg(long)]
        force: bool,
    },
    /// Enrolment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The archive keys the package repositories are signed with.
    #[command(subcommand)]
    RepoKey(RepoKeyCommand),
    /// Write an offline bundle of the package repositories (for sites the
    /// server's repositories do not reach): the signed `apt/` and `yum/`
    /// trees and the public keys, as `serve --artifacts DIR` serves them.
    /// Serve the directory with any static web server, or use it in place,
    /// and point hosts at it with `install.sh --mirror URL` (`file:///DIR`
    /// works); hosts still take the keys from the server.
    RepoBundle {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The server secret's file [default: $LINKMESH_FLEET_SECRET].
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
        /// The .deb and .rpm files, as given to `serve --artifacts`.
        #[arg(long, value_name = "DIR")]
        artifacts: PathBuf,
        /// The bundle's directory; must not exist yet.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// The collector configuration the server hands out over OpAMP.
    #[command(subcommand)]
    CollectorConfig(CollectorConfigCommand),
    /// List enrolled hosts (`hosts revoke ID` revokes one).
    #[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
    Hosts {
        #[arg(long, value_name = "DIR", required = true)]
        state: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<HostsCommand>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ClonePolicyArg {
    Rekey,
    Quarantine,
}

/// A `--key-lifetime`: a duration, or none for `never`.
#[derive(Clone, Copy, Debug)]
struct KeyLifetime(Option<Duration>);

impl std::fmt::Display for KeyLifetime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("never"),
            Some(d) => f.write_str(&linkmesh_agent::config::format_duration(d)),
        }
    }
}

fn key_lifetime(s: &str) -> Result<KeyLifetime, String> {
    if s == "never" {
        return Ok(KeyLifetime(None));
    }
    parse_duration(s)
        .map(|d| KeyLifetime(Some(d)))
        .map_err(|e| format!("{e}, or `never`"))
}

/// A state directory, its secret, and the lifetime of the archive signing
/// key made there (`init`'s first key, `repo-key rotate`'s next one).
#[derive(Debug, clap::Args)]
struct KeyArgs {
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// The server secret's file [default: $LINKMESH_FLEET_SECRET].
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// How long the archive signing key made is valid (`never`: no expiry);
    /// `repo-key rotate` well before it ends.
    #[arg(long, value_name = "DURATION|never", default_value_t = KeyLifetime(Some(repository::keys::DEFAULT_LIFETIME)), value_parser = key_lifetime)]
    key_lifetime: KeyLifetime,
}

#[derive(Debug, Subcommand)]
enum RepoKeyCommand {
    /// The keys, oldest first: each signs the repositories and is in the
    /// published keyring; RPMs carry the oldest one's signature.
    List {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Add a new key beside the current ones. Both sign from the next
    /// `serve` start; hosts take the new keyring on their next one-liner
    /// run. Retire the old key once they have.
    Rotate(KeyArgs),
    /// Drop the oldest key (from the next `serve` start): it no longer
    /// signs and leaves the published keyring. Refused for the only key.
    Retire {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum HostsCommand {
    /// Approve a clone held under `--clone-policy quarantine` (its id is
    /// in `hosts` and in the server's log): its next re-key is issued.
    Approve {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The clone request's id.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Revoke a host: its certificates are refused from now on (a running
    /// server within 200 ms, its open OpAMP connection closed), across
    /// restarts. The host keeps its collector running and must enrol again
    /// with a new token. There is no undo.
    Revoke {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The host id (`linkmesh-fleet hosts`).
        #[arg(value_name = "ID")]
        host: String,
        /// Why, kept with the revocation and shown to the host.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum CollectorConfigCommand {
    /// Store a collector configuration: the fleet default, or one host's
    /// (which replaces the default for it). Connected supervisors get it at
    /// once, the others when they connect. It is merged over each host's
    /// local collector config.
    Set {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// The collector configuration (YAML).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Only for this host [default: the whole fleet].
        #[arg(long, value_name = "ID")]
        host: Option<String>,
        /// Store it even if it is not a YAML mapping (the collector will
        /// reject it and report why; for exercising that path).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an enrolment token and print it with the CA pin and commands.
    Create {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
        /// How long the token is valid.
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        ttl: String,
        /// How many hosts may enrol with it.
        #[arg(long, value_name = "N", default_value_t = 1)]
        uses: u32,
        /// Server URL to print [default: the URL `serve` advertises].
        #[arg(long, value_name = "URL")]
        server_url: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LINKMESH_FLEET_LOG").unwrap_or_else(
                |_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,linkmesh_integration=info,linkmesh_fleet=info",
                    )
                },
            ),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init(KeyArgs {
            state,
            secret_file,
            key_lifetime,
        }) => init(&State::new(state), secret_file.as_deref(), key_lifetime),
        Command::Serve {
            state,
            secret_file,
            listen,
            advertise_url,
            san,
            cert_lifetime,
            server_version,
            latest_agent,
            report_interval,
            renew_grace,
            pin_otelcol,
            pin_supervisor,
            pin_alloy,
            artifacts,
            max_connections,
            max_connections_per_address,
            first_request_timeout,
            server_cert_lifetime,
            clone_policy,
        } => {
            let server_cert_lifetime =
                parse_duration(&server_cert_lifetime).context("--server-cert-lifetime")?;
            if server_cert_lifetime < Duration::from_secs(3) {
                bail!("--server-cert-lifetime must be at least 3s");
            }
            let first_request =
                parse_duration(&first_request_timeout).context("--first-request-timeout")?;
            // Descriptors for the state files, the CA and the log stay free.
            let fds = server::raise_fd_limit();
            let limits = server::Limits {
                max_connections: max_connections
                    .min(usize::try_from(fds.saturating_sub(64)).unwrap_or(usize::MAX))
                    .max(1),
                max_per_address: max_connections_per_address.max(1),
                first_request,
                ..server::Limits::default()
            };
            let version = match server_version {
                Some(v) => v.parse::<Version>().context("--server-version")?,
                None => linkmesh_agent::version::agent_version(),
            };
            let latest_agent = match latest_agent {
                Some(v) => v.parse::<Version>().context("--latest-agent")?,
                None => version.clone(),
            };
            let cert_lifetime = parse_duration(&cert_lifetime).context("--cert-lifetime")?;
            if cert_lifetime < Duration::from_secs(1) {
                bail!("--cert-lifetime must be at least 1s");
            }
            let report_interval = parse_duration(&report_interval).context("--report-interval")?;
            if report_interval < Duration::from_secs(1) {
                bail!("--report-interval must be at least 1s");
            }
            let renew_grace = parse_duration(&renew_grace).context("--renew-grace")?;
            let mut config = ServiceConfig {
                version,
                latest_agent,
                cert_lifetime,
                minor_versions_behind: linkmesh_agent::version::DEFAULT_MINOR_VERSIONS_BEHIND,
                report_interval,
                renew_grace,
                clone_policy: match clone_policy {
                    ClonePolicyArg::Rekey => linkmesh_fleet::service::ClonePolicy::Rekey,
                    ClonePolicyArg::Quarantine => linkmesh_fleet::service::ClonePolicy::Quarantine,
                },
                runtime_pins: vec![
                    proto::RuntimePin {
                        kind: "otelcol".into(),
                        version: pin_otelcol,
                        supervisor_version: pin_supervisor,
                    },
                    proto::RuntimePin {
                        kind: "alloy".into(),
                        version: pin_alloy,
                        supervisor_version: String::new(),
                    },
                ],
                archive_keys: None,
            };
            let state = State::new(state);
            if linkmesh_fleet::migrate::found(&state)?.is_none() {
                return Err(linkmesh_fleet::migrate::FormatError::NotInitialised {
                    path: state.dir().display().to_string(),
                }
                .into());
            }
            let Some(serving) = state.serving()? else {
                bail!(
                    "another linkmesh-fleet serve runs on {} (it holds serving.lock): one server per state directory",
                    state.dir().display()
                );
            };
            let secret = secret(secret_file.as_deref())?;
            let ca = linkmesh_fleet::migrate::open(&state, &secret, &config.version.to_string())?;
            let repositories = match &artifacts {
                Some(dir) => repositories(&state, dir, &secret)?,
                None => None,
            };
            if repositories.is_some() {
                config.archive_keys = Some(repository::keys::announced(
                    &state.dir().join(repository::keys::KEYS_DIR),
                )?);
            }
            drop(secret);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(
                    state,
                    serving,
                    ca,
                    config,
                    ServeOptions {
                        listen,
                        advertise_url,
                        san,
                        artifacts,
                        repositories,
                        limits,
                        server_cert_lifetime,
                    },
                ))
        }
        Command::Drift { state, json } => {
            let state = State::new(state);
            readable(&state)?;
            linkmesh_fleet::drift::print(&state, json)
        }
        Command::Backup { state, out } => {
            let m = linkmesh_fleet::backup::backup(
                &State::new(state),
                &out,
                linkmesh_agent::version::AGENT_VERSION,
            )?;
            print!("backed up into {}: ", out.display());
            linkmesh_fleet::backup::describe(&m, &mut std::io::stdout())?;
            Ok(())
        }
        Command::Restore { from, state, force } => {
            let (m, kept) = linkmesh_fleet::backup::restore(&from, &state, force)?;
            print!("restored {} from {}: ", state.display(), from.display());
            linkmesh_fleet::backup::describe(&m, &mut std::io::stdout())?;
            if let Some(k) = kept {
                println!("the state it replaced is kept in {}", k.display());
            }
            println!(
                "start the server with the secret this state was set up with: linkmesh-fleet serve --state {} --secret-file FILE",
                state.display()
            );
            Ok(())
        }
        Command::Token(TokenCommand::Create {
            state,
            ttl,
            uses,
            server_url,
            json,
        }) => token_create(&State::new(state), &ttl, uses, server_url, json),
        Command::RepoKey(cmd) => repo_key(cmd),
        Command::RepoBundle {
            state,
            secret_file,
            artifacts,
            out,
        } => repo_bundle(&State::new(state), secret_file.as_deref(), &artifacts, &out),
        Command::Hosts {
            action:
                Some(HostsCommand::Revoke {
                    state,
                    host,
                    reason,
                }),
            ..
        } => revoke(&State::new(state), &host, &reason),
        Command::Hosts {
            action: Some(HostsCommand::Approve { state, id }),
            ..
        } => approve(&State::new(state), &id),
        Command::Hosts {
            state,
            json,
            action: None,
        } => hosts(&State::new(state.context("--state DIR is required")?), json),
        Command::CollectorConfig(CollectorConfigCommand::Set {
            state,
            file,
            host,
            force,
        }) => {
            let body = std::fs::read(&file)
                .with_context(|| format!("cannot read --file {}", file.display()))?;
            let state = State::new(state);
            readable(&state)?;
            let stored =
                linkmesh_fleet::opamp::store::set(&state, host.as_deref(), &file, &body, force)?;
            println!(
                "stored collector configuration {} for {} ({} bytes)",
                stored.hash_hex(),
                host.as_deref()
                    .map_or_else(|| "the fleet".to_owned(), |h| format!("host {h}")),
                body.len()
            );
            Ok(())
        }
    }
}

fn repo_key(cmd: RepoKeyCommand) -> anyhow::Result<()> {
    use repository::keys;
    let dir = |state: &PathBuf| -> anyhow::Result<(State, PathBuf)> {
        let state = State::new(state);
        readable(&state)?;
        let d = state.dir().join(keys::KEYS_DIR);
        Ok((state, d))
    };
    match cmd {
        RepoKeyCommand::List { state } => {
            let (_, d) = dir(&state)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            for k in keys::list(&d)? {
                let at = k.expires.as_deref().unwrap_or_default();
                let expiry = match k.expiry(now) {
                    keys::Expiry::Never => "never expires".to_owned(),
                    keys::Expiry::Expired => format!("EXPIRED {at}"),
                    keys::Expiry::In { days, .. } => format!("expires {at} (in {days} days)"),
                };
                println!("{}  created {}  {expiry}", k.fingerprint, k.created);
            }
        }
        RepoKeyCommand::Rotate(KeyArgs {
            state,
            secret_file,
            key_lifetime,
        }) => {
            let (state, d) = dir(&state)?;
            let secret = secret(secret_file.as_deref())?;
            // The secret must open the keys already there: one secret seals
            // them all.
            repository::ArchiveKeys::load(&d, &secret)?;
            let _lock = state.lock()?;
            let k = keys::add(&d, &secret, key_lifetime.0)?;
            println!(
                "added archive key {}; restart serve to sign with it beside the others",
                k.fingerprint
            );
        }
        RepoKeyCommand::Retire { state } => {
            let (state, d) = dir(&state)?;
            let _lock = state.lock()?;
            let k = keys::retire_oldest(&d)?;
            println!(
                "retired archive key {} (created {}); restart serve to stop signing with it",
                k.fingerprint, k.created
            );
        }
    }
    Ok(())
}

/// `repo-bundle`: the repositories of `artifacts`, generated in a scratch
/// directory beside `out` (the same file system, so the bundle is renamed
/// into place) and signed with the state's archive keys.
fn repo_bundle(
    state: &State,
    secret_file: Option<&std::path::Path>,
    artifacts: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    readable(state)?;
    let secret = secret(secret_file)?;
    let keys =
        repository::ArchiveKeys::load(&state.dir().join(repository::keys::KEYS_DIR), &secret)?;
    drop(secret);
    let scratch = tempfile::Builder::new()
        .prefix(".linkmesh-bundle-")
        .tempdir_in(
            out.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new(".")),
        )
        .context("--out: its parent directory")?;
    let repos = Repositories::new(artifacts, scratch.path(), keys)?;
    if let Some(missing) = repos.missing_tools()?.into_iter().next() {
        bail!("{missing}");
    }
    let fingerprints: Vec<String> = repos.keys().into_iter().map(|k| k.fingerprint).collect();
    let n = repos
        .bundle(out)
        .with_context(|| format!("--out {}", out.display()))?;
    println!(
        "wrote the offline bundle {} ({n} packages, signed by {}): serve it, or use it in place, and install with --mirror URL",
        out.display(),
        fingerprints.join(", ")
    );
    Ok(())
}

/// The server secret from `--secret-file` or the environment.
fn secret(file: Option<&std::path::Path>) -> anyhow::Result<Secret> {
    Ok(Secret::from_file_or_env(file, |k| std::env::var(k).ok())?)
}

fn init(
    state: &State,
    secret_file: Option<&std::path::Path>,
    key_lifetime: KeyLifetime,
) -> anyhow::Result<()> {
    let ours = linkmesh_agent::version::AGENT_VERSION;
    if linkmesh_fleet::migrate::found(state)?.is_some() {
        // Existing state: never a new CA. The secret must open the one
        // there (and an older format is migrated).
        let secret = secret(secret_file)?;
        let ca = linkmesh_fleet::migrate::open(state, &secret, ours)?;
        println!(
            "state directory {} already initialised",
            state.dir().display()
        );
        println!("CA pin: {}", ca.pin());
        // A state made before package repositories: its first archive key.
        let keys_dir = state.dir().join(repository::keys::KEYS_DIR);
        if !repository::keys::exists(&keys_dir)? {
            let _lock = state.lock()?;
            let key = repository::keys::add(&keys_dir, &secret, key_lifetime.0)?;
            println!("archive signing key (new): {}", key.fingerprint);
        }
        return Ok(());
    }
    if state.ca_dir().join(linkmesh_fleet::ca::SEALED_KEY).exists()
        || state.ca_dir().join(linkmesh_fleet::ca::PLAIN_KEY).exists()
    {
        bail!(
            "{} holds a CA key but no CA certificate (ca.pem): restore the state from its backup; a new CA is never made over an old key",
            state.ca_dir().display()
        );
    }
    let secret = match secret_file {
        Some(f) if !f.exists() => {
            let s = Secret::create_file(f)?;
            println!(
                "wrote a new server secret to {} (0600): keep it apart from the state's backups; serve needs it",
                f.display()
            );
            s
        }
        f => secret(f)?,
    };
    state.create_layout()?;
    let ca = Ca::create(&state.ca_dir(), &secret)?;
    let key = repository::keys::add(
        &state.dir().join(repository::keys::KEYS_DIR),
        &secret,
        key_lifetime.0,
    )?;
    linkmesh_fleet::migrate::record_new(state, ours)?;
    println!("initialised {} with a new CA", state.dir().display());
    println!("CA pin: {}", ca.pin());
    println!("archive signing key: {}", key.fingerprint);
    Ok(())
}

/// How `serve` listens and what it serves besides the API.
struct ServeOptions {
    listen: SocketAddr,
    advertise_url: Option<String>,
    san: Vec<String>,
    artifacts: Option<PathBuf>,
    repositories: Option<Arc<Repositories>>,
    limits: server::Limits,
    server_cert_lifetime: Duration,
}

/// The package repositories of `artifacts`, signed with the state's archive
/// keys; none (with a warning naming the fix) on a state without one.
fn repositories(
    state: &State,
    artifacts: &std::path::Path,
    secret: &Secret,
) -> anyhow::Result<Option<Arc<Repositories>>> {
    let keys = match repository::ArchiveKeys::load(
        &state.dir().join(repository::keys::KEYS_DIR),
        secret,
    ) {
        Ok(k) => k,
        Err(e @ repository::KeyError::Missing { .. }) => {
            tracing::warn!("{e}; /apt and /yum are not served");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let repos = Repositories::new(
        artifacts,
        &state.dir().join(repository::REPOSITORIES_DIR),
        keys,
    )?;
    for missing in repos.missing_tools()? {
        tracing::warn!("{missing}");
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for key in repos.keys() {
        let at = key.expires.as_deref().unwrap_or_default();
        match key.expiry(now) {
            repository::keys::Expiry::Expired => tracing::error!(
                fingerprint = %key.fingerprint,
                "archive key expired on {at}: hosts refuse metadata signed by it alone; `linkmesh-fleet repo-key rotate` now",
            ),
            repository::keys::Expiry::In { seconds, days }
                if seconds <= linkmesh_agent::check::archive::EXPIRY_WARNING_S =>
            {
                tracing::warn!(
                    fingerprint = %key.fingerprint,
                    "archive key expires on {at} (in {days} days): `linkmesh-fleet repo-key rotate`, let hosts take the new keyring, then `repo-key retire`",
                );
            }
            _ => {}
        }
    }
    Ok(Some(Arc::new(repos)))
}

async fn serve(
    state: State,
    _serving: linkmesh_fleet::state::StateLock,
    ca: Ca,
    config: ServiceConfig,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let ca = Arc::new(ca);
    let listen = opts.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let url: ServerUrl = match &opts.advertise_url {
        Some(u) => u.parse().context("--advertise-url")?,
        None if addr.ip().is_unspecified() => {
            format!("https://127.0.0.1:{}", addr.port()).parse()?
        }
        None => format!("https://{addr}").parse()?,
    };
    let mut names = opts.san;
    names.push("localhost".into());
    names.push(url.host().to_owned());
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    } else {
        names.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
    }
    names.sort();
    names.dedup();
    let server_cert = server::ServerCert::new(ca.clone(), &names, opts.server_cert_lifetime)?;
    tokio::spawn(server_cert.clone().keep_fresh());
    let tls = Arc::new(server::tls_config(&ca, server_cert)?);
    let version = config.version.clone();
    state.put_serve(&ServeRecord {
        url: url.to_string(),
        version: version.to_string(),
        report_interval_secs: config.report_interval.as_secs(),
        minor_versions_behind: config.minor_versions_behind,
        runtime_pins: config
            .runtime_pins
            .iter()
            .map(|p| (p.kind.clone(), p.version.clone()))
            .collect(),
    })?;
    let downloads = server::Downloads {
        ca_pem: linkmesh_agent::identity::store::pem(ca.cert()),
        artifacts: opts.artifacts,
        repositories: opts.repositories,
        latest_agent: config.latest_agent.to_string(),
        pins: config
            .runtime_pins
            .iter()
            .flat_map(|p| {
                let name = if p.kind == "otelcol" {
                    "otelcol-contrib"
                } else {
                    p.kind.as_str()
                };
                let mut v = vec![(name.to_owned(), p.version.clone())];
                if !p.supervisor_version.is_empty() {
                    v.push(("opampsupervisor".to_owned(), p.supervisor_version.clone()));
                }
                v
            })
            .collect(),
    };
    let service = FleetService::new(state.clone(), ca, config)?;
    let opamp = linkmesh_fleet::opamp::Hub::start(service.clone(), state.clone())?;
    let flusher = service.spawn_flusher(Duration::from_secs(1));
    let revocations = service.spawn_revocation_watch();
    println!("linkmesh-fleet {version} listening on {addr} as {url}");
    std::io::stdout().flush()?;
    tracing::info!(%addr, %url, "Serving");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("Shutting down");
    };
    tracing::info!(
        max_connections = opts.limits.max_connections,
        max_per_address = opts.limits.max_per_address,
        "Connection limits"
    );
    server::serve(
        listener,
        tls,
        service.clone(),
        downloads,
        opamp,
        opts.limits,
        shutdown,
    )
    .await?;
    flusher.abort();
    revocations.abort();
    service.flush()?;
    Ok(())
}

fn token_create(
    state: &State,
    ttl: &str,
    uses: u32,
    server_url: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let ttl = parse_duration(ttl).context("--ttl")?;
    if uses == 0 {
        bail!("--uses must be at least 1");
    }
    readable(state)?;
    let pin = Ca::certificate(&state.ca_dir())?.1;
    let url: ServerUrl = match server_url {
        Some(u) => u.parse().context("--server-url")?,
        None => state
            .serve()?
            .context("no server URL known: start `linkmesh-fleet serve` on this state first, or pass --server-url")?
            .url
            .parse()?,
    };
    let token =
        Token::generate().map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    let record = TokenRecord {
        id: token.id().to_owned(),
        secret_sha256: token.secret_hash(),
        created_at: now,
        expires_at,
        max_uses: uses,
        uses: Vec::new(),
    };
    let lock = state.lock()?;
    state.put_token(&lock, &record)?;
    drop(lock);

    let secret = token.expose();
    // Keeps the token off the command line of the agent's process.
    let enroll = format!(
        "echo {secret} | linkmesh-agent enroll --server {url} --ca-pin {pin} --token-file /dev/stdin"
    );
    let ca_pem = std::fs::read_to_string(state.ca_dir().join(linkmesh_fleet::ca::CA_CERT))
        .with_context(|| format!("reading {}", state.ca_dir().display()))?;
    let install = server::verified_one_liner(
        &url.to_string(),
        &ca_pem,
        server::Script::Install,
        &format!("LINKMESH_TOKEN={secret}"),
        "",
    );
    if json {
        let doc = serde_json::json!({
            "token": secret,
            "token_id": token.id(),
            "ca_pin": pin.to_string(),
            "server_url": url.to_string(),
            "expires_at": rfc3339(expires_at),
            "max_uses": uses,
            "enroll_command": enroll,
            "install_command": install,
        });
        println!("{doc}");
    } else {
        println!("token:    {secret}");
        println!(
            "expires:  {} ({} use{})",
            rfc3339(expires_at),
            uses,
            if uses == 1 { "" } else { "s" }
        );
        println!("CA pin:   {pin}");
        println!("server:   {url}");
        println!();
        println!("Install the agent on a host and enrol it (as root; the fleet CA is carried");
        println!("inside, and the script is checked against its SHA-256 before it runs):");
        println!("  {install}");
        println!();
        println!("Enrol a host that has linkmesh-agent installed (as root):");
        println!("  {enroll}");
    }
    Ok(())
}

/// A host's collector as OpAMP shows it, for `hosts --json`.
fn opamp_json(
    h: &linkmesh_fleet::state::HostRecord,
    desired: Option<&linkmesh_fleet::opamp::store::RemoteConfig>,
) -> serde_json::Value {
    use linkmesh_fleet::opamp::session::config_standing;
    let o = h.opamp.clone().unwrap_or_default();
    let desired_hash = desired.map(|d| d.hash_hex());
    let (status, error) = config_standing(h.opamp.as_ref(), desired_hash.as_deref());
    serde_json::json!({
        "connected": o.connected,
        "instance_uid": o.instance_uid,
        "collector_name": o.collector_name,
        "collector_version": o.collector_version,
        "healthy": o.healthy,
        "last_error": o.last_error,
        "effective_config_hash": o.effective_config_hash,
        "remote_config_hash": desired_hash.clone().unwrap_or_else(|| o.reported_config_hash.clone()),
        "reported_config_hash": o.reported_config_hash,
        "remote_config_status": status,
        "remote_config_error": error,
        "last_message_at": (o.last_message_at > 0).then(|| rfc3339(o.last_message_at)),
    })
}

fn approve(state: &State, id: &str) -> anyhow::Result<()> {
    readable(state)?;
    let lock = state.lock()?;
    let Some(mut request) = state.clone_request(id)? else {
        bail!(
            "no clone request {} in {}: `linkmesh-fleet hosts --state {}` lists the held ones",
            safe(id),
            state.dir().display(),
            state.dir().display()
        );
    };
    if request.approved {
        println!("clone request {id} was approved already");
        return Ok(());
    }
    request.approved = true;
    state.put_clone_request(&lock, &request)?;
    println!(
        "approved clone request {id} (a copy of host {} on {}): its next re-key gets a host of its own",
        request.cloned_from,
        safe(&request.hostname)
    );
    Ok(())
}

fn revoke(state: &State, host: &str, reason: &str) -> anyhow::Result<()> {
    readable(state)?;
    const MAX_REASON: usize = 512;
    if reason.len() > MAX_REASON {
        bail!(
            "--reason is {} bytes; at most {MAX_REASON} are kept",
            reason.len()
        );
    }
    let lock = state.lock()?;
    if state.host(host).ok().flatten().is_none() {
        bail!(
            "no enrolled host {} in {}: see `linkmesh-fleet hosts --state {}`",
            safe(host),
            state.dir().display(),
            state.dir().display()
        );
    }
    let record = state.revoke(
        &lock,
        &linkmesh_fleet::state::RevocationRecord {
            host_id: host.to_owned(),
            revoked_at: OffsetDateTime::now_utc().unix_timestamp(),
            reason: reason.to_owned(),
        },
    )?;
    println!(
        "host {host} revoked at {}: its certificates are refused from now on; it must enrol again with a new token",
        rfc3339(record.revoked_at)
    );
    Ok(())
}

/// Refuses a state of a newer format (see `linkmesh_fleet::migrate`).
fn readable(state: &State) -> anyhow::Result<()> {
    Ok(linkmesh_fleet::migrate::check_readable(
        state,
        linkmesh_agent::version::AGENT_VERSION,
    )?)
}

fn hosts(state: &State, json: bool) -> anyhow::Result<()> {
    readable(state)?;
    let hosts = state.hosts()?;
    let revoked = state.revocations()?;
    let configs = linkmesh_fleet::opamp::store::ConfigSet::load(state)?;
    if json {
        let rows: Vec<serde_json::Value> = hosts
            .iter()
            .map(|h| {
                serde_json::json!({
                    "host_id": h.host_id,
                    "hostname": h.hostname,
                    "os": h.os,
                    "arch": h.arch,
                    "agent_version": h.agent_version,
                    "enrolled_at": rfc3339(h.enrolled_at),
                    "last_seen": rfc3339(h.last_seen),
                    "cert_not_after": rfc3339(h.cert_not_after),
                    "cert_serial": h.cert_serial,
                    "pending_cert_serial": h.pending_cert.as_ref().map(|p| p.serial.clone()),
                    "revoked_at": revoked.get(&h.host_id).map(|r| rfc3339(r.revoked_at)),
                    "cloned_from": h.cloned_from,
                    "duplicate_identity": h.duplicate.as_ref().map(|d| serde_json::json!({
                        "since": rfc3339(d.since),
                        "last_seen": rfc3339(d.last_seen),
                        "run_ids": d.run_ids,
                    })),
                    "token_id": h.token_id,
                    "opamp": opamp_json(h, configs.for_host(&h.host_id)),
                    "collector_problem": h.report.as_ref().and_then(|r| r.collector_problem.as_ref()).map(|p| serde_json::json!({
                        "reason": p.reason,
                        "at_unix_ms": p.at_unix_ms,
                        "log_tail": p.log_tail,
                    })),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    let held: Vec<_> = state
        .clone_requests()?
        .into_iter()
        .filter(|r| !r.approved)
        .collect();
    for r in &held {
        println!(
            "clone held for approval: {} (a copy of host {} on {}, since {}): linkmesh-fleet hosts approve {} --state {}",
            r.id,
            r.cloned_from,
            safe(&r.hostname),
            rfc3339(r.requested_at),
            r.id,
            state.dir().display()
        );
    }
    if hosts.is_empty() {
        println!("no hosts enrolled");
        return Ok(());
    }
    println!(
        "{:<36}  {:<20}  {:<8}  {:<20}  {:<20}  STANDING",
        "HOST ID", "HOSTNAME", "AGENT", "ENROLLED", "CERT EXPIRES"
    );
    for h in &hosts {
        println!(
            "{:<36}  {:<20}  {:<8}  {:<20}  {:<20}  {}",
            h.host_id,
            safe(&h.hostname),
            safe(&h.agent_version),
            rfc3339(h.enrolled_at),
            rfc3339(h.cert_not_after),
            match (revoked.get(&h.host_id), &h.duplicate, &h.cloned_from) {
                (Some(r), _, _) => format!("revoked {}", rfc3339(r.revoked_at)),
                (None, Some(d), _) => format!("DUPLICATE IDENTITY since {}", rfc3339(d.since)),
                (None, None, Some(from)) => format!("clone of {from}"),
                (None, None, None) => "enrolled".to_owned(),
            }
        );
    }
    Ok(())
}
