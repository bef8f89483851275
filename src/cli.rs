//! The command line: parsing with clap, dispatch, and exit codes
//! (0 ok, 1 runtime failure, 2 usage, 64 bad configuration).

use std::{io::Write, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::{
    config::{self, ConfigPaths, Settings},
    endpoint::ServerUrl,
    enrollment::{self, EnrollOptions},
    host,
    identity::IdentityStore,
    tls::{CaPin, Trust},
    token::Token,
    version,
};

/// Exit code for a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage (clap uses it too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for bad configuration (`RestartPreventExitStatus=64`).
pub const EXIT_CONFIG: u8 = 64;

/// linkmesh-agent: enrols this host into a LinkMesh fleet, supervises its
/// OpenTelemetry collector and reports versions.
#[derive(Debug, Parser)]
#[command(name = "linkmesh-agent", version = version::AGENT_VERSION, disable_help_subcommand = true)]
pub struct Cli {
    /// Configuration file [default: $LINKMESH_CONFIG, else /etc/linkmesh/agent.toml];
    /// drop-ins are read from agent.d/ beside it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol this host with a fleet server (a no-op when already enrolled with it).
    Enroll(EnrollArgs),
    /// The daemon: supervise the collector runtime (systemd's ExecStart).
    Run {
        /// Grace period for stopping the supervisor: SIGINT, then SIGTERM to
        /// its process group after two thirds of it, then SIGKILL.
        #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration)]
        stop_timeout: Duration,
        /// How often a watched Alloy is re-inspected.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
        alloy_poll: Duration,
    },
    /// Pre-flight and health checks; exits non-zero when any fails.
    Check {
        /// The pre-upgrade checklist instead: the server's version and the
        /// target's place in its window, the identity and the collector's
        /// instance id, free space, the way back, the runtime pin.
        #[arg(long)]
        pre_upgrade: bool,
        /// The version to upgrade to [default: the one the server offers].
        #[arg(long, value_name = "X.Y.Z", requires = "pre_upgrade")]
        to: Option<version::Version>,
        /// Print stable JSON.
        #[arg(long)]
        json: bool,
    },
    /// The server-first rule: exit 0 when VERSION may be installed here,
    /// 12 when it is newer than the fleet server (upgrade the server first).
    /// install.sh and the packages run it before changing anything.
    ServerFirst(ServerFirstArgs),
    /// Show which collector runtime this host has, with versions, paths and services.
    Detect {
        /// Print stable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Internal: run PROGRAM so that the kernel kills it if the agent dies.
    #[command(hide = true)]
    Launch {
        /// The agent's pid; the program is not started if it is gone already.
        #[arg(long)]
        parent_pid: i32,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Show this host's identity and server.
    Status {
        /// Print stable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generalise this host before its disk becomes an image: remove its
    /// identity, the collector's OpAMP instance id and this machine's
    /// records; keep configuration, binaries and the enabled unit. The
    /// agent must be stopped.
    ImagePrep {
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print stable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Stop or start the collector runtime (it otherwise outlives the agent).
    #[command(subcommand)]
    Runtime(RuntimeCommand),
    /// Upgrade probation and rollback (run by install.sh, the package
    /// scripts and linkmesh-upgrade.service).
    #[command(subcommand)]
    Upgrade(UpgradeCommand),
    /// Print the agent's version, git revision and API version.
    Version {
        /// Print stable JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct ServerFirstArgs {
    /// The agent version about to be installed [default: this agent's].
    #[arg(long, value_name = "X.Y.Z")]
    to: Option<version::Version>,
    /// Ask this fleet server [default: the one this host is enrolled with].
    #[arg(long, value_name = "URL", requires = "ca_file")]
    server: Option<String>,
    /// PEM file with the fleet CA to verify --server with.
    #[arg(long, value_name = "FILE", requires = "server")]
    ca_file: Option<PathBuf>,
    /// Install even when VERSION is ahead of the server (labs); also
    /// LINKMESH_ALLOW_AHEAD=1.
    #[arg(long)]
    allow_ahead: bool,
    /// Bound on each network step.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    timeout: Duration,
    /// Print stable JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum UpgradeCommand {
    /// Before VERSION's files land: keep this (installed) agent as the
    /// watcher and its package or binary for a rollback, and open the
    /// probation.
    Keep {
        /// The version being installed.
        #[arg(long, value_name = "X.Y.Z")]
        to: version::Version,
        /// How it is installed [default: the recorded install method].
        #[arg(long, value_name = "deb|rpm|binary")]
        method: Option<crate::upgrade::probation::Method>,
    },
    /// Keep FILE (the package just installed) for a later rollback to it.
    KeepPackage {
        /// The package file.
        file: PathBuf,
    },
    /// Watch the open probation to its verdict; roll back a failing upgrade.
    Watch,
    /// Print the open probation and the last outcome.
    Status {
        /// Print stable JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RuntimeCommand {
    /// Stop the collector runtime and keep it stopped (across agent restarts and reboots).
    Stop,
    /// Start it again after `runtime stop`.
    Start,
    /// Whether the collector runtime's unit may start (its ExecCondition=):
    /// exit 1 on a clone whose copied OpAMP instance uid the agent has not
    /// reset yet, 0 otherwise (an unreadable record never keeps it down).
    /// Reads no configuration, so a broken one cannot stop the collector.
    MayStart {
        /// The agent's state directory.
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Watch newly installed runtime binaries for WINDOW (install-opamp.sh
    /// runs it): exit 0 and record `confirmed` when the collector stays up,
    /// exit 1 with the reason on stdout when it should be rolled back.
    Probation {
        /// The versions before (`otelcol-contrib X`), for the record.
        #[arg(long)]
        from: String,
        /// The versions installed.
        #[arg(long)]
        to: String,
        /// How long the new runtime must stay healthy.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
        window: Duration,
    },
    /// Record how a runtime upgrade ended (install-opamp.sh, after it put
    /// the previous binaries back).
    Outcome {
        /// confirmed, rolled_back, rollback_failed.
        #[arg(long, value_parser = ["confirmed", "rolled_back", "rollback_failed"])]
        outcome: String,
        /// The version upgraded from (for a rollback: the one that failed).
        #[arg(long)]
        from: String,
        /// The version upgraded to (for a rollback: the one put back).
        #[arg(long)]
        to: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and its drop-ins; exit 64 on any problem.
    Check,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("trust").required(true).args(["ca_pin", "ca_file"]))]
struct EnrollArgs {
    /// Fleet server URL, https://HOST[:PORT] [default: `server` from the configuration].
    #[arg(long, value_name = "URL", env = "LINKMESH_SERVER")]
    server: Option<String>,
    /// File holding the enrolment token (preferred: keeps it off the command line).
    #[arg(long, value_name = "FILE", env = "LINKMESH_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The enrolment token; prefer --token-file or LINKMESH_TOKEN, as argv is visible to other users.
    #[arg(long, value_name = "TOKEN", hide_default_value = true)]
    token: Option<String>,
    /// Pin of the server's CA, sha256:HEX (repeat for several; in the
    /// environment, separated by commas).
    #[arg(
        long,
        value_name = "sha256:HEX",
        env = "LINKMESH_CA_PIN",
        value_delimiter = ','
    )]
    ca_pin: Vec<String>,
    /// PEM file with the server's CA certificate, instead of a pin.
    #[arg(long, value_name = "FILE", conflicts_with = "ca_pin")]
    ca_file: Option<PathBuf>,
    /// Replace an identity issued by another server or CA.
    #[arg(long)]
    force: bool,
    /// Bound on each network step.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration)]
    timeout: Duration,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

/// A duration flag, read by the configuration's parser (`500ms`, `15s`,
/// `2m`, `1h`, `1d`); clap names the flag in the error and exits 2.
fn duration(text: &str) -> Result<Duration, String> {
    config::parse_duration(text).map_err(|e| e.to_string())
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn usage(msg: String) -> Self {
        Self {
            code: EXIT_USAGE,
            error: anyhow::anyhow!(msg),
        }
    }

    /// Prints the error chain to stderr and returns the exit code.
    pub fn report(self) -> ExitCode {
        let _ = writeln!(std::io::stderr(), "error: {:#}", self.error);
        ExitCode::from(self.code)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_FAILURE,
            error,
        }
    }
}

fn server_first(paths: &ConfigPaths, args: ServerFirstArgs) -> Result<(), Failure> {
    use crate::upgrade::{self, gate};
    let target = args.to.clone().unwrap_or_else(version::agent_version);
    let timeout = args.timeout;
    let mut notes = Vec::new();
    let (state_dir, proxy_url) = match config::load(paths, |k| std::env::var(k).ok()) {
        Ok(s) => (s.state_dir, s.proxy_url),
        Err(e) => {
            notes.push(format!(
                "the configuration has errors ({e}); using {}",
                config::DEFAULT_STATE_DIR
            ));
            (PathBuf::from(config::DEFAULT_STATE_DIR), None)
        }
    };
    let ask = match (&args.server, &args.ca_file) {
        (Some(url), Some(file)) => Some(gate::Ask {
            server: url
                .parse::<ServerUrl>()
                .map_err(|e| Failure::usage(format!("--server: {e}")))?,
            trust: Trust::from_ca_file(file)
                .map_err(|e| Failure::usage(format!("--ca-file: {e}")))?,
        }),
        _ => gate::ask_from_identity(&state_dir).unwrap_or_else(|e| {
            notes.push(format!("cannot read this host's identity: {e}"));
            None
        }),
    };
    let (server, more) = gate::server_side(ask.as_ref(), &state_dir, proxy_url.as_deref(), timeout);
    notes.extend(more);
    let allow_ahead = args.allow_ahead
        || upgrade::allow_ahead_from(std::env::var(upgrade::ALLOW_AHEAD_ENV).ok().as_deref());
    let judgement = upgrade::judge(&target, server.as_ref(), allow_ahead);
    if args.json {
        let mut doc = serde_json::to_value(&judgement).unwrap_or_default();
        if let Some(o) = doc.as_object_mut() {
            o.insert("notes".into(), notes.clone().into());
        }
        println!("{doc}");
    } else {
        let mut err = std::io::stderr().lock();
        for n in &notes {
            let _ = writeln!(err, "linkmesh-agent: note: {n}");
        }
        let _ = writeln!(err, "linkmesh-agent: {}", judgement.message);
    }
    if judgement.admission.proceeds() {
        Ok(())
    } else {
        Err(Failure {
            code: crate::upgrade::EXIT_REFUSED,
            error: anyhow::anyhow!("linkmesh-agent {target} refused by the server-first rule"),
        })
    }
}

/// Runs the parsed command.
///
/// # Errors
/// A [`Failure`] carrying the exit code.
pub fn run(cli: Cli) -> Result<(), Failure> {
    let paths = match &cli.config {
        Some(f) => ConfigPaths::for_file(f.clone()),
        None => ConfigPaths::from_env(|k| std::env::var(k).ok()),
    };
    match cli.command {
        Command::Version { json } => {
            let b = version::BUILD;
            println!("{}", if json { b.json() } else { b.human() });
            return Ok(());
        }
        Command::Check {
            json,
            pre_upgrade,
            to,
        } => {
            // Checks report bad configuration themselves instead of exiting 64.
            let checks = if pre_upgrade {
                crate::check::pre_upgrade::run(&paths, to.as_ref())
            } else {
                crate::check::run(&paths)
            };
            return if crate::check::print(&checks, json) {
                Ok(())
            } else {
                Err(Failure {
                    code: EXIT_FAILURE,
                    error: anyhow::anyhow!(
                        "{} check(s) failed",
                        checks
                            .iter()
                            .filter(|c| c.outcome == crate::check::Outcome::Fail)
                            .count()
                    ),
                })
            };
        }
        Command::Launch {
            parent_pid,
            command,
        } => return launch(parent_pid, &command),
        Command::Runtime(RuntimeCommand::MayStart { state }) => {
            return match crate::fingerprint::collector_may_start(
                &state,
                &crate::fingerprint::Machine::now(),
            ) {
                Ok(()) => Ok(()),
                Err(why) => {
                    println!("{why}");
                    Err(Failure {
                        code: EXIT_FAILURE,
                        error: anyhow::anyhow!("not starting the collector yet"),
                    })
                }
            };
        }
        // Judged with a broken configuration too (a package upgrade may be
        // what fixes it): its errors become a note.
        Command::ServerFirst(args) => return server_first(&paths, args),
        // The watcher is the previous agent: a configuration the new one
        // brought (a key the old one does not know) must not stop the
        // rollback of the new one.
        Command::Upgrade(UpgradeCommand::Watch) => {
            let settings = match config::load(&paths, |k| std::env::var(k).ok()) {
                Ok(s) => s,
                Err(e) => {
                    crate::telemetry::init(config::DEFAULT_LOG_LEVEL);
                    tracing::warn!(error = %e, "The configuration does not load; watching with the default state directory");
                    let defaults =
                        config::from_texts(&[], |k| std::env::var(k).ok()).map_err(|e| {
                            Failure {
                                code: EXIT_CONFIG,
                                error: e.into(),
                            }
                        })?;
                    return upgrade(&defaults, UpgradeCommand::Watch);
                }
            };
            crate::telemetry::init(&settings.log_level);
            return upgrade(&settings, UpgradeCommand::Watch);
        }
        _ => {}
    }
    let settings = config::load(&paths, |k| std::env::var(k).ok()).map_err(|e| Failure {
        code: EXIT_CONFIG,
        error: e.into(),
    })?;
    crate::telemetry::init(&settings.log_level);
    match cli.command {
        Command::Version { .. }
        | Command::Launch { .. }
        | Command::Check { .. }
        | Command::ServerFirst(_) => Ok(()),
        Command::Run {
            stop_timeout,
            alloy_poll,
        } => {
            let options = crate::app::RunOptions {
                stop_timeout,
                alloy_poll,
            };
            runtime()?
                .block_on(crate::app::run(paths, settings, options))
                .map_err(|e| Failure::from(anyhow::Error::new(e)))
        }
        Command::Detect { json } => detect(&settings, json),
        Command::Config(ConfigCommand::Check) => {
            println!("{}", settings.checked(&paths.file));
            Ok(())
        }
        Command::Enroll(args) => enroll(&settings, args),
        Command::Runtime(RuntimeCommand::Probation { from, to, window }) => {
            runtime_probation(&settings, &from, &to, window)
        }
        Command::Runtime(RuntimeCommand::Outcome {
            outcome,
            from,
            to,
            reason,
        }) => crate::upgrade::runtime::write_outcome(
            &settings.state_dir,
            &crate::upgrade::probation::Outcome {
                outcome,
                from,
                to,
                reason,
                at_unix_ms: crate::clock::now_unix_ms(),
            },
        )
        .map_err(|e| Failure::from(anyhow::Error::new(e))),
        Command::Runtime(cmd) => {
            let outcome = match cmd {
                RuntimeCommand::Stop => crate::control::stop(&settings),
                RuntimeCommand::Start => crate::control::start(&settings),
                RuntimeCommand::Probation { .. }
                | RuntimeCommand::Outcome { .. }
                | RuntimeCommand::MayStart { .. } => {
                    return Ok(());
                }
            }
            .map_err(|e| Failure::from(anyhow::Error::new(e)))?;
            for line in outcome.lines {
                println!("{line}");
            }
            Ok(())
        }
        Command::Status { json } => status(&settings, json),
        Command::ImagePrep { dry_run, json } => {
            let prepared = crate::image_prep::run(&settings.state_dir, dry_run)
                .map_err(|e| Failure::from(anyhow::Error::new(e)))?;
            if json {
                println!("{}", prepared.json());
            } else {
                print!("{}", prepared.human());
            }
            Ok(())
        }
        Command::Upgrade(cmd) => upgrade(&settings, cmd),
    }
}

fn runtime_probation(
    settings: &Settings,
    from: &str,
    to: &str,
    window: std::time::Duration,
) -> Result<(), Failure> {
    let verdict = crate::upgrade::runtime::probation(
        &settings.state_dir,
        window,
        std::time::Duration::from_millis(500),
    );
    let judged = crate::upgrade::view::runtime_verdict(verdict);
    println!("{}", judged.as_ref().map_or_else(|r| r, |(_, line)| line));
    let Ok((outcome, reason)) = judged else {
        return Err(Failure {
            code: EXIT_FAILURE,
            error: anyhow::anyhow!("the new runtime failed its probation"),
        });
    };
    crate::upgrade::runtime::write_outcome(
        &settings.state_dir,
        &crate::upgrade::probation::Outcome {
            outcome: outcome.into(),
            from: from.into(),
            to: to.into(),
            reason,
            at_unix_ms: crate::clock::now_unix_ms(),
        },
    )
    .map_err(|e| Failure::from(anyhow::Error::new(e)))
}

fn upgrade(settings: &Settings, cmd: UpgradeCommand) -> Result<(), Failure> {
    use crate::upgrade::{view, watch};
    let fail = |e: watch::UpgradeError| Failure::from(anyhow::Error::new(e));
    match cmd {
        UpgradeCommand::Keep { to, method } => {
            let method = method
                .unwrap_or_else(|| crate::app::InstallMethod::read(&settings.state_dir).rollback());
            let ask = crate::upgrade::gate::ask_from_identity(&settings.state_dir)
                .ok()
                .flatten();
            let proxy = settings.proxy_url.clone();
            let fetch = |name: &str, dest: &std::path::Path| -> Result<(), watch::FetchError> {
                let ask = ask.as_ref().ok_or(watch::FetchError::NotEnrolled)?;
                let tls = crate::tls::enrol_client_config(&ask.trust)?;
                crate::upgrade::watch::fetch_artifact(
                    &ask.server,
                    std::sync::Arc::new(tls),
                    proxy.as_deref(),
                    name,
                    dest,
                )
            };
            let kept = watch::keep(
                &settings.state_dir,
                &to,
                method,
                settings.probation,
                &fetch,
                &watch::stop_watcher,
            )
            .map_err(fail)?;
            eprintln!("{}", view::kept(&kept, &to, settings.probation));
            Ok(())
        }
        UpgradeCommand::KeepPackage { file } => {
            watch::keep_installed_package(&settings.state_dir, &file).map_err(fail)
        }
        UpgradeCommand::Watch => {
            let outcome = watch::watch(&settings.state_dir, std::time::Duration::from_millis(500))
                .map_err(fail)?;
            println!("{}", view::watched(outcome.as_ref()));
            Ok(())
        }
        UpgradeCommand::Status { json } => {
            let status = view::UpgradeStatus::read(&settings.state_dir).map_err(fail)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_value(&status).context("encode the upgrade status")?
                );
            } else {
                print!("{}", status.human());
            }
            Ok(())
        }
    }
}

/// Sets SIGKILL as this process's parent-death signal, checks the agent is
/// still its parent, then becomes `command` (exec keeps the setting).
fn launch(parent_pid: i32, command: &[std::ffi::OsString]) -> Result<(), Failure> {
    use std::os::unix::process::CommandExt as _;
    nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
        .context("cannot set the parent-death signal")?;
    if nix::unistd::getppid().as_raw() != parent_pid {
        return Err(anyhow::anyhow!("the agent (pid {parent_pid}) is gone; not starting").into());
    }
    let (program, args) = command
        .split_first()
        .ok_or_else(|| Failure::usage("launch: no program".into()))?;
    let error = std::process::Command::new(program).args(args).exec();
    Err(Failure {
        code: 127,
        error: anyhow::anyhow!("cannot execute {}: {error}", program.to_string_lossy()),
    })
}

fn detect(settings: &Settings, json: bool) -> Result<(), Failure> {
    let d = crate::detect::Detected::gather(settings);
    if json {
        println!("{}", serde_json::to_value(&d).context("encode detection")?);
    } else {
        print!("{}", d.human());
    }
    Ok(())
}

fn enroll(settings: &Settings, args: EnrollArgs) -> Result<(), Failure> {
    let server: ServerUrl = match (&args.server, &settings.server) {
        (Some(s), _) => s
            .parse()
            .map_err(|e| Failure::usage(format!("--server: {e}")))?,
        (None, Some(s)) => s.clone(),
        (None, None) => {
            return Err(Failure::usage(
                "no server: pass --server https://HOST:PORT or set `server` in the configuration"
                    .into(),
            ));
        }
    };
    let trust = match &args.ca_file {
        Some(f) => Trust::from_ca_file(f).map_err(|e| Failure::usage(format!("--ca-file: {e}")))?,
        None => Trust::Pins(
            args.ca_pin
                .iter()
                .map(|p| p.parse::<CaPin>())
                .collect::<Result<_, _>>()
                .map_err(|e| Failure::usage(format!("--ca-pin: {e}")))?,
        ),
    };
    let timeout = args.timeout;
    let proxy = crate::transport::proxy_for(server.host(), settings.proxy_url.as_deref(), |k| {
        std::env::var(k).ok()
    });
    if let Some(p) = &proxy {
        tracing::info!(proxy = %p.authority, source = %p.source, "Enrolling through an HTTP proxy");
    }
    let opts = EnrollOptions {
        server,
        trust,
        force: args.force,
        timeout,
        proxy,
    };

    let store = IdentityStore::new(&settings.state_dir);
    let lock = store.lock_exclusive().with_context(|| {
        format!(
            "cannot prepare state directory {}",
            settings.state_dir.display()
        )
    })?;
    let facts = host::collect();
    let token_file = args.token_file.clone();
    let token_flag = args.token.clone();
    let outcome = runtime()?
        .block_on(enrollment::enroll(
            &store,
            &lock,
            &opts,
            move || {
                let env = std::env::var("LINKMESH_TOKEN").ok();
                Token::from_sources(token_file.as_deref(), token_flag.as_deref(), env.as_deref())
            },
            &facts,
        ))
        .map_err(|e| Failure::from(anyhow::Error::new(e)))?;
    if args.json {
        println!("{}", outcome.json());
    } else {
        print!("{}", outcome.human());
    }
    Ok(())
}

fn status(settings: &Settings, json: bool) -> Result<(), Failure> {
    let status = crate::status::Status::gather(settings).with_context(|| {
        format!(
            "cannot read state directory {}",
            settings.state_dir.display()
        )
    })?;
    if json {
        println!("{}", status.json());
    } else {
        print!("{}", status.human());
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::from)
}
