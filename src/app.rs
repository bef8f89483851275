//! `linkmesh-agent run`: wiring only. Loads the identity, detects the
//! runtime, supervises opampsupervisor (or watches Alloy), publishes state to
//! systemd and to a status file, and handles signals: SIGHUP re-reads the
//! configuration and restarts the supervisor only when what it runs changed;
//! SIGTERM/SIGINT stop it within the grace period.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{self, ConfigPaths, RuntimeKind, Settings},
    fs::{FsError, ensure_private_dir, write_atomic},
    identity::{Identity, IdentityStore, StoreError},
    runtime::{self, Detection, probe::HostProbes},
    signal::{Signal, Signals},
    supervisor::{
        self, Supervisor, SupervisorOptions,
        child::{ChildSpec, StopTimeouts},
        policy::RestartPolicy,
        render::{SupervisorInputs, render},
        service::{self, UnitSupervisor},
        unit::UnitInputs,
    },
    systemd::{Notifier, watchdog_interval_from_env},
};

/// The rendered supervisor configuration, in the state directory.
pub const SUPERVISOR_CONFIG: &str = "supervisor.yaml";
/// The supervisor's storage directory (its `persistent_state.yaml` holds the
/// collector's instance id), in the state directory.
pub const SUPERVISOR_STORAGE: &str = "supervisor";
/// Where installers and packages record how the agent was installed.
pub const INSTALL_METHOD_FILE: &str = "install-method";
/// How often the collector checks that its supervisor is alive.
pub const ORPHAN_DETECTION_INTERVAL: Duration = Duration::from_secs(5);
/// How long the supervisor waits for a starting collector's first OpAMP
/// message (its default, 3 s, fails starts on a loaded 2-core host).
pub const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a remote configuration may take to become healthy. The pinned
/// supervisor reports a remote configuration `applied` only when this much
/// time has passed with the collector healthy, so it is also the least
/// time from `collector-config set` to `applied`: the upstream default.
pub const CONFIG_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `run` that are not configuration.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Total grace period for stopping the supervisor.
    pub stop_timeout: Duration,
    /// How often Alloy is re-inspected.
    pub alloy_poll: Duration,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No identity yet.
    #[error("this host is not enrolled (no identity in {0}): run `linkmesh-agent enroll` first")]
    NotEnrolled(PathBuf),
    /// The identity could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be written.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// Another `run` holds the state directory.
    #[error(
        "another linkmesh-agent run already manages {0} (it holds {1}); stop it first (systemctl stop linkmesh-agent)"
    )]
    AlreadyRunning(PathBuf, PathBuf),
}

/// The lock `run` holds in the state directory: one agent per host.
pub const RUN_LOCK: &str = "run.lock";

use crate::published::RuntimeReport;
use crate::reporter::HostView;

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// [`AppError`] when it cannot start; once running, problems are logged and
/// published, not returned.
pub async fn run(
    paths: ConfigPaths,
    mut settings: Settings,
    options: RunOptions,
) -> Result<(), AppError> {
    let started = Instant::now();
    let notifier = Notifier::from_env();
    let mut signals = Signals::new().map_err(AppError::Signals)?;
    let identity = load_identity(&settings)?;
    let lock_path = settings.state_dir.join(RUN_LOCK);
    let Some(_run_lock) = crate::fs::try_lock_exclusive(&lock_path)? else {
        return Err(AppError::AlreadyRunning(
            settings.state_dir.clone(),
            lock_path,
        ));
    };
    tidy_identity(&settings, &identity);
    tracing::info!(host_id = %identity.host_id, server = %identity.server, "Identity loaded");
    let facts = crate::host::collect();
    let clone = this_machine(&settings.state_dir, identity.host_id.as_str(), &facts);
    let fault = crate::fault::active();
    match fault {
        Some(crate::fault::Fault::ExitAtStart) => {
            tracing::error!("Injected fault: exiting 1 at start (a test build)");
            std::process::exit(1);
        }
        Some(crate::fault::Fault::CrashAfter(after)) => {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                tracing::error!("Injected fault: aborting (a test build)");
                std::process::abort();
            });
        }
        Some(crate::fault::Fault::NeverReady) | None => {}
    }
    let mut this_host = ThisHost {
        server: identity.server.clone(),
        view: HostView {
            host_id: identity.host_id.clone(),
            clone_pending: clone.is_some(),
        },
    };
    let (view_tx, mut view_rx) = watch::channel(this_host.view.clone());

    let (report_tx, mut report_rx) = watch::channel(None::<RuntimeReport>);
    let proxy = crate::transport::proxy_for(
        this_host.server.host(),
        settings.proxy_url.as_deref(),
        |k| std::env::var(k).ok(),
    );
    if let Some(p) = &proxy {
        tracing::info!(proxy = %p.authority, source = %p.source, "Connecting to the server through an HTTP proxy");
    }
    let (reporter, mut reporter_rx) = crate::reporter::spawn(crate::reporter::ReporterContext {
        store: IdentityStore::new(&settings.state_dir),
        identity,
        interval: settings.report_interval,
        proxy,
        install_method: InstallMethod::read(&settings.state_dir),
        host: facts,
        runtime: report_tx.subscribe(),
        clone,
        view: view_tx,
    });
    let mut managed = Managed::start(&settings, &this_host, options, report_tx.clone()).await?;
    let summary = managed.summary();
    // The status file describes this agent, not the one before it, by the
    // time systemd (and `systemctl restart`) hears READY; the publisher
    // rewrites it on every change from there.
    let state_dir = settings.state_dir.clone();
    publish_now(&mut report_rx, &mut reporter_rx, &state_dir).await;
    let publisher = tokio::spawn(publish(report_rx, reporter_rx, state_dir));
    if fault == Some(crate::fault::Fault::NeverReady) {
        tracing::error!("Injected fault: never telling systemd READY (a test build)");
    } else {
        notifier.ready(&summary);
    }
    tracing::info!(startup_ms = started.elapsed().as_millis() as u64, status = %summary, "Agent ready");

    let watchdog = watchdog_interval_from_env().map(|every| {
        let n = Notifier::from_env();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                n.watchdog();
            }
        })
    });
    let status_task = {
        let mut rx = report_tx.subscribe();
        let n = Notifier::from_env();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let line = rx.borrow_and_update().as_ref().map(RuntimeReport::summary);
                if let Some(line) = line {
                    n.status(&line);
                }
            }
        })
    };

    let mut reporter_views = true;
    loop {
        let reload = tokio::select! {
            sig = signals.recv() => {
                if sig != Signal::Reload {
                    break;
                }
                true
            }
            changed = view_rx.changed(), if reporter_views => {
                if changed.is_err() {
                    // The reporter ended (revoked, or no TLS): supervision goes on.
                    reporter_views = false;
                    continue;
                }
                false
            }
        };
        if reload {
            notifier.reloading();
            match config::load(&paths, |k| std::env::var(k).ok()) {
                Ok(new) => {
                    settings = new;
                    managed = managed
                        .reload(&settings, &this_host, options, report_tx.clone())
                        .await?;
                    tracing::info!(status = %managed.summary(), "Configuration reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "Reload failed; keeping the running configuration");
                }
            }
            notifier.ready(&managed.summary());
            continue;
        }
        let view = view_rx.borrow_and_update().clone();
        if view == this_host.view {
            continue;
        }
        if view.clone_pending {
            reset_copied_uid(
                &settings.state_dir,
                view.host_id.as_str(),
                &crate::fingerprint::Machine::now(),
            );
        }
        tracing::info!(host_id = %view.host_id, clone_pending = view.clone_pending, "The collector is presented as another identity; rewriting the supervisor's configuration");
        this_host.view = view;
        managed = managed
            .reload(&settings, &this_host, options, report_tx.clone())
            .await?;
    }
    tracing::info!("Shutting down");
    notifier.stopping();
    managed.stop().await;
    reporter.abort();
    for t in [Some(status_task), watchdog].into_iter().flatten() {
        t.abort();
    }
    drop(report_tx);
    let _ = publisher.await;
    tracing::info!("Stopped");
    Ok(())
}

/// What supervision needs of the identity. The reporter owns the identity
/// itself (it renews and re-keys it); the server never changes, the host id
/// only when a clone gets its own.
struct ThisHost {
    server: crate::endpoint::ServerUrl,
    view: HostView,
}

/// Whether this machine is the one the identity was recorded on (see
/// [`crate::fingerprint`]): `Some(reason)` for a clone, whose collector's
/// OpAMP instance uid is reset here, before the supervisor starts, so two
/// machines never present one. An identity without a record records this
/// machine.
fn this_machine(
    state_dir: &std::path::Path,
    host_id: &str,
    facts: &crate::host::HostFacts,
) -> Option<String> {
    use crate::fingerprint::{self, Machine, Verdict};
    let machine = Machine::of(facts);
    match fingerprint::check(state_dir, host_id, &machine) {
        Verdict::Same => None,
        Verdict::Unrecorded => {
            if let Err(e) = fingerprint::write(state_dir, host_id, &machine) {
                tracing::warn!(error = %e, "Cannot record this machine's fingerprint");
            }
            None
        }
        Verdict::Clone { reason } => {
            tracing::warn!(
                host_id,
                "This machine is a copy of host {host_id} ({reason}): it will not report as that host, and asks the server for an identity of its own"
            );
            reset_copied_uid(state_dir, host_id, &machine);
            Some(reason)
        }
    }
}

/// Resets the collector's OpAMP instance uid copied with the disk (once
/// per copy: the uid the supervisor makes next is kept).
fn reset_copied_uid(
    state_dir: &std::path::Path,
    host_id: &str,
    machine: &crate::fingerprint::Machine,
) {
    match crate::fingerprint::reset_copied_uid(state_dir, host_id, machine) {
        Ok(true) => {
            tracing::info!(path = %state_dir.join(crate::fingerprint::INSTANCE_UID_FILE).display(), "Reset the collector's OpAMP instance uid (copied with the disk)");
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "Cannot reset the collector's OpAMP instance uid");
        }
    }
}

/// Removes what an identity change killed after its swap left behind: the
/// previous identity in the staging directory (a copied private key, on a
/// clone) and the pending key of the identity now in place. A pending key
/// of an unfinished re-key is kept for its retry.
fn tidy_identity(settings: &Settings, identity: &Identity) {
    let store = IdentityStore::new(&settings.state_dir);
    let tidied = store.lock_exclusive().and_then(|lock| {
        store.clear_staging(&lock)?;
        store.clear_committed_pending(&lock, identity)
    });
    if let Err(e) = tidied {
        tracing::warn!(error = %e, "Cannot remove what an interrupted identity change left");
    }
}

fn load_identity(settings: &Settings) -> Result<Identity, AppError> {
    let store = IdentityStore::new(&settings.state_dir);
    let Some(lock) = store.lock_shared()? else {
        return Err(AppError::NotEnrolled(settings.state_dir.clone()));
    };
    store
        .load(&lock)?
        .ok_or_else(|| AppError::NotEnrolled(settings.state_dir.clone()))
}

/// How the supervisor runs: the agent's child, or its own systemd unit.
enum Runner {
    Child(Supervisor),
    Unit(UnitSupervisor),
}

impl Runner {
    fn start(settings: &Settings, spec: &ChildSpec, options: RunOptions) -> Self {
        if unit_mode(settings) {
            tracing::info!(
                unit = supervisor::unit::UNIT_NAME,
                "The collector runtime runs in its own systemd unit; it outlives the agent"
            );
            Self::Unit(UnitSupervisor::start(
                desired(settings, spec),
                RestartPolicy::default(),
            ))
        } else {
            Self::Child(Supervisor::start(
                spec.clone(),
                SupervisorOptions {
                    policy: RestartPolicy::default(),
                    stop: StopTimeouts::from_total(options.stop_timeout),
                },
            ))
        }
    }

    fn status(&self) -> watch::Receiver<supervisor::Status> {
        match self {
            Self::Child(s) => s.status(),
            Self::Unit(u) => u.status(),
        }
    }

    async fn started(&self, limit: Duration) {
        match self {
            Self::Child(s) => s.started(limit).await,
            Self::Unit(u) => u.started(limit).await,
        }
    }

    /// The agent is stopping: a child is stopped, a unit left running.
    async fn stop(self) {
        match self {
            Self::Child(s) => s.stop().await,
            Self::Unit(u) => u.detach().await,
        }
    }

    /// The runtime is no longer wanted: stopped in both modes.
    async fn shutdown(self) {
        match self {
            Self::Child(s) => s.stop().await,
            Self::Unit(u) => u.shutdown().await,
        }
    }
}

/// Whether the supervisor runs in its own systemd unit.
fn unit_mode(settings: &Settings) -> bool {
    service::unit_mode(settings.runtime.mode)
}

/// What the collector unit runs, from the supervisor's spec.
fn desired(settings: &Settings, spec: &ChildSpec) -> service::Desired {
    service::Desired {
        unit: UnitInputs {
            supervisor: spec.program.clone(),
            config: settings.state_dir.join(SUPERVISOR_CONFIG),
            storage_dir: settings.state_dir.join(SUPERVISOR_STORAGE),
            agent: agent_executable(),
            state_dir: settings.state_dir.clone(),
            environment: spec
                .env
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                .collect(),
        },
        collector: spec
            .requires
            .first()
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| settings.runtime.collector.clone()),
        state_dir: settings.state_dir.clone(),
        unit_dir: PathBuf::from(supervisor::unit::UNIT_DIR),
    }
}

/// This agent's executable, as the collector unit's start condition runs
/// it: the installed path, also while an upgrade has replaced the file
/// this process runs from.
fn agent_executable() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let s = p.to_string_lossy();
            PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned())
        }
        Err(_) => PathBuf::from("/usr/bin/linkmesh-agent"),
    }
}

/// The runtime the agent manages now.
enum Managed {
    Otelcol {
        supervisor: Runner,
        spec: ChildSpec,
        forward: JoinHandle<()>,
    },
    /// Stopped by the operator (`linkmesh-agent runtime stop`), child mode.
    Stopped,
    Alloy {
        watcher: JoinHandle<()>,
        detection: watch::Receiver<Detection>,
    },
    Idle,
}

impl Managed {
    async fn start(
        settings: &Settings,
        this_host: &ThisHost,
        options: RunOptions,
        report: watch::Sender<Option<RuntimeReport>>,
    ) -> Result<Self, AppError> {
        let detection = detect(settings).await;
        for note in &detection.notes {
            tracing::warn!(note = %note, "Runtime configuration");
        }
        for c in &detection.conflicts {
            tracing::warn!(code = %c.code, "{}", c.message);
        }
        match detection.kind {
            RuntimeKind::Otelcol => {
                let (spec, _) = prepare_supervisor(settings, this_host, &detection).await?;
                if !unit_mode(settings) && service::stopped_on_request(&settings.state_dir) {
                    tracing::info!(
                        "The collector runtime was stopped with `linkmesh-agent runtime stop`; `linkmesh-agent runtime start` starts it"
                    );
                    let mut st = supervisor::Status::new("opampsupervisor");
                    st.state = supervisor::State::Stopped;
                    let _ = report.send(Some(RuntimeReport {
                        agent_pid: std::process::id(),
                        updated_unix_ms: crate::clock::now_unix_ms(),
                        kind: RuntimeKind::Otelcol,
                        supervision: Some(st),
                        detection,
                    }));
                    return Ok(Self::Stopped);
                }
                let supervisor = Runner::start(settings, &spec, options);
                supervisor.started(Duration::from_secs(5)).await;
                let forward = forward_supervision(supervisor.status(), detection.clone(), report);
                Ok(Self::Otelcol {
                    supervisor,
                    spec,
                    forward,
                })
            }
            RuntimeKind::Alloy => {
                let (tx, rx) = watch::channel(detection.clone());
                let settings = settings.clone();
                let send = move |d: Detection| {
                    let _ = report.send(Some(RuntimeReport {
                        agent_pid: std::process::id(),
                        updated_unix_ms: crate::clock::now_unix_ms(),
                        kind: RuntimeKind::Alloy,
                        supervision: None,
                        detection: d,
                    }));
                };
                // The first report before READY, as for the supervisor.
                warn_if_restart_pending(detection.alloy.as_ref());
                send(detection.clone());
                let watcher = tokio::spawn(async move {
                    let mut last = detection.alloy;
                    loop {
                        tokio::time::sleep(options.alloy_poll).await;
                        let fresh = detect(&settings).await;
                        if fresh.alloy != last {
                            warn_if_restart_pending(fresh.alloy.as_ref());
                            last.clone_from(&fresh.alloy);
                        }
                        let _ = tx.send(fresh.clone());
                        send(fresh);
                    }
                });
                Ok(Self::Alloy {
                    watcher,
                    detection: rx,
                })
            }
            RuntimeKind::None => {
                tracing::info!(
                    "No collector runtime to manage; reload (SIGHUP) after installing one"
                );
                let _ = report.send(Some(RuntimeReport {
                    agent_pid: std::process::id(),
                    updated_unix_ms: crate::clock::now_unix_ms(),
                    kind: RuntimeKind::None,
                    supervision: None,
                    detection,
                }));
                Ok(Self::Idle)
            }
        }
    }

    /// Applies new settings: restarts the supervisor only when its spec or
    /// rendered configuration changed; switches runtimes when detection says so.
    async fn reload(
        self,
        settings: &Settings,
        this_host: &ThisHost,
        options: RunOptions,
        report: watch::Sender<Option<RuntimeReport>>,
    ) -> Result<Self, AppError> {
        match self {
            Self::Otelcol {
                supervisor,
                spec,
                forward,
                ..
            } => {
                let detection = detect(settings).await;
                if detection.kind != RuntimeKind::Otelcol {
                    forward.abort();
                    supervisor.shutdown().await;
                    return Self::start(settings, this_host, options, report).await;
                }
                if let Runner::Child(_) = &supervisor
                    && service::stopped_on_request(&settings.state_dir)
                {
                    forward.abort();
                    supervisor.stop().await;
                    return Self::start(settings, this_host, options, report).await;
                }
                let config_path = settings.state_dir.join(SUPERVISOR_CONFIG);
                let (new_spec, config_changed) = match prepare_supervisor(
                    settings, this_host, &detection,
                )
                .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "Reload failed; keeping the running supervisor");
                        return Ok(Self::Otelcol {
                            supervisor,
                            spec,
                            forward,
                        });
                    }
                };
                forward.abort();
                let forward = forward_supervision(supervisor.status(), detection.clone(), report);
                match &supervisor {
                    Runner::Child(child) if new_spec != spec || config_changed => {
                        tracing::info!(config = %config_path.display(), "Supervisor configuration changed; restarting it");
                        child.apply(new_spec.clone()).await;
                    }
                    Runner::Child(_) => {
                        tracing::info!("Supervisor configuration unchanged; not restarting it");
                    }
                    // The unit is restarted only when what it runs changed.
                    Runner::Unit(unit) => unit.apply(desired(settings, &new_spec)).await,
                }
                Ok(Self::Otelcol {
                    supervisor,
                    spec: new_spec,
                    forward,
                })
            }
            other => {
                other.stop().await;
                Self::start(settings, this_host, options, report).await
            }
        }
    }

    async fn stop(self) {
        match self {
            Self::Otelcol {
                supervisor,
                mut forward,
                ..
            } => {
                supervisor.stop().await;
                // The supervisor's task is gone, and with it its status
                // sender: the forwarder passes on the final state and ends.
                // Bounded, should anything else hold a sender.
                if tokio::time::timeout(Duration::from_secs(1), &mut forward)
                    .await
                    .is_err()
                {
                    forward.abort();
                }
            }
            Self::Alloy { watcher, .. } => watcher.abort(),
            Self::Idle | Self::Stopped => {}
        }
    }

    fn summary(&self) -> String {
        match self {
            Self::Otelcol { supervisor, .. } => supervisor.status().borrow().summary(),
            Self::Alloy { detection, .. } => {
                let d = detection.borrow();
                RuntimeReport {
                    agent_pid: 0,
                    updated_unix_ms: 0,
                    kind: RuntimeKind::Alloy,
                    supervision: None,
                    detection: d.clone(),
                }
                .summary()
            }
            Self::Idle => "no collector runtime found; enrolled and idle".to_owned(),
            Self::Stopped => {
                "collector runtime stopped (`linkmesh-agent runtime start` starts it)".to_owned()
            }
        }
    }
}

/// Detection off the async threads (its probes run commands).
async fn detect(settings: &Settings) -> Detection {
    let runtime = settings.runtime.clone();
    let probes = HostProbes {
        state_dir: settings.state_dir.clone(),
    };
    match tokio::task::spawn_blocking(move || runtime::detect(&runtime, &probes)).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "Runtime detection failed");
            runtime::detect(&settings.runtime, &NoProbes)
        }
    }
}

/// Renders the supervisor's configuration (written only when it changed,
/// off the async thread) and returns how to run it, and whether the file
/// changed.
async fn prepare_supervisor(
    settings: &Settings,
    this_host: &ThisHost,
    detection: &Detection,
) -> Result<(ChildSpec, bool), AppError> {
    let state = &settings.state_dir;
    let identity_dir = IdentityStore::new(state).identity_dir();
    let collector = detection
        .collector
        .as_ref()
        .map_or_else(|| settings.runtime.collector.clone(), |c| c.path.clone());
    let supervisor = detection
        .supervisor
        .as_ref()
        .map_or_else(|| settings.runtime.supervisor.clone(), |s| s.path.clone());
    let inputs = SupervisorInputs {
        server: this_host.server.clone(),
        host_id: this_host.view.host_id.clone(),
        hostname: crate::host::hostname(),
        clone_of: this_host
            .view
            .clone_pending
            .then(|| this_host.view.host_id.clone()),
        ca_file: identity_dir.join(crate::identity::store::CA_FILE),
        cert_file: identity_dir.join(crate::identity::store::CERT_FILE),
        key_file: identity_dir.join(crate::identity::store::KEY_FILE),
        storage_dir: state.join(SUPERVISOR_STORAGE),
        collector: collector.clone(),
        collector_config: settings.runtime.collector_config.clone(),
        bootstrap_timeout: BOOTSTRAP_TIMEOUT,
        config_apply_timeout: CONFIG_APPLY_TIMEOUT,
        orphan_detection_interval: ORPHAN_DETECTION_INTERVAL,
        // The supervisor tells of its collector starting and crashing only
        // at debug level; the agent needs those lines, and its own log filter
        // keeps them out of the journal unless it runs at debug itself.
        log_level: "debug",
    };
    let yaml = render(&inputs);
    let path = state.join(SUPERVISOR_CONFIG);
    let (dir, file) = (state.clone(), path.clone());
    let changed = tokio::task::spawn_blocking(move || -> Result<bool, AppError> {
        ensure_private_dir(&dir, 0o700)?;
        if std::fs::read(&file).ok().as_deref() == Some(yaml.as_bytes()) {
            return Ok(false);
        }
        write_atomic(&file, yaml.as_bytes(), 0o600)?;
        Ok(true)
    })
    .await
    .map_err(|e| {
        AppError::Fs(crate::fs::FsError::new(
            "write",
            &path,
            std::io::Error::other(e.to_string()),
        ))
    })??;
    if changed {
        tracing::info!(path = %path.display(), "Wrote supervisor configuration");
    }
    let spec = ChildSpec {
        name: "opampsupervisor".to_owned(),
        program: supervisor,
        args: vec!["--config".into(), path.into_os_string()],
        requires: vec![("collector".to_owned(), collector)],
        launcher: Some(PathBuf::from("/proc/self/exe")),
        // Its OpAMP connection follows the agent's proxy rule.
        env: crate::transport::proxy_environment(
            crate::transport::proxy_for(
                this_host.server.host(),
                settings.proxy_url.as_deref(),
                |k| std::env::var(k).ok(),
            )
            .as_ref(),
        )
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
    };
    Ok((spec, changed))
}

fn warn_if_restart_pending(alloy: Option<&runtime::AlloyInfo>) {
    if let Some(a) = alloy
        && a.restart_pending
    {
        tracing::warn!(installed = ?a.executable.version, running = ?a.running_version, "Alloy was upgraded but not restarted");
    }
}

/// Forwards the supervisor's status into the runtime report. The first
/// report is sent before this returns, so the status file `run` writes
/// before READY already names this agent (a spawned first send raced it,
/// and `check` right after `systemctl restart` read the previous agent's pid).
fn forward_supervision(
    mut status: watch::Receiver<supervisor::Status>,
    detection: Detection,
    report: watch::Sender<Option<RuntimeReport>>,
) -> JoinHandle<()> {
    let send = move |s: supervisor::Status| {
        let _ = report.send(Some(RuntimeReport {
            agent_pid: std::process::id(),
            updated_unix_ms: crate::clock::now_unix_ms(),
            kind: RuntimeKind::Otelcol,
            supervision: Some(s),
            detection: detection.clone(),
        }));
    };
    send(status.borrow_and_update().clone());
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            send(status.borrow_and_update().clone());
        }
    })
}

/// Writes the runtime's and the reporter's current state to the status
/// file (atomically, fsynced, off the async thread) and marks both as seen.
async fn publish_now(
    runtime: &mut watch::Receiver<Option<RuntimeReport>>,
    reporter: &mut watch::Receiver<crate::reporter::ReporterStatus>,
    state_dir: &Path,
) {
    let report = runtime.borrow_and_update().clone();
    let rep = reporter.borrow_and_update().clone();
    if let Some(r) = report {
        let state = crate::published::Published {
            runtime: r,
            reporter: rep,
        };
        let dir = state_dir.to_owned();
        let written =
            tokio::task::spawn_blocking(move || crate::published::write(&dir, &state)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Cannot write status file"),
            Err(e) => tracing::warn!(error = %e, "Cannot write status file"),
        }
    }
}

/// Rewrites the status file whenever the runtime's or the reporter's state
/// changes, until either side is gone.
async fn publish(
    mut runtime: watch::Receiver<Option<RuntimeReport>>,
    mut reporter: watch::Receiver<crate::reporter::ReporterStatus>,
    state_dir: PathBuf,
) {
    loop {
        tokio::select! {
            c = runtime.changed() => if c.is_err() { return },
            c = reporter.changed() => if c.is_err() { return },
        }
        publish_now(&mut runtime, &mut reporter, &state_dir).await;
    }
}

/// How the agent was installed, as the installer or package recorded it in
/// `STATE/install-method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallMethod {
    /// The deb package.
    Deb,
    /// The rpm package.
    Rpm,
    /// The one-liner's binary method (`install.sh` records `script`).
    Script,
    /// Nothing recorded: a binary put in place by hand.
    Unrecorded,
}

impl InstallMethod {
    /// From the record's text; anything else is [`Self::Unrecorded`].
    pub fn parse(recorded: &str) -> Self {
        match recorded.trim() {
            "deb" => Self::Deb,
            "rpm" => Self::Rpm,
            "script" => Self::Script,
            _ => Self::Unrecorded,
        }
    }

    /// The recorded method in `state_dir`.
    pub fn read(state_dir: &Path) -> Self {
        std::fs::read_to_string(state_dir.join(INSTALL_METHOD_FILE))
            .map_or(Self::Unrecorded, |s| Self::parse(&s))
    }

    /// The name reports and the fleet's drift use: deb, rpm, script, binary.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deb => "deb",
            Self::Rpm => "rpm",
            Self::Script => "script",
            Self::Unrecorded => "binary",
        }
    }

    /// How a previous version is put back: by the package, else by the
    /// one-liner's binary method.
    pub fn rollback(self) -> crate::upgrade::probation::Method {
        use crate::upgrade::probation::Method;
        match self {
            Self::Deb => Method::Deb,
            Self::Rpm => Method::Rpm,
            Self::Script | Self::Unrecorded => Method::Binary,
        }
    }
}

/// Probes that find nothing, when the real ones could not run.
struct NoProbes;

impl runtime::Probes for NoProbes {
    fn is_executable(&self, _: &Path) -> bool {
        false
    }
    fn which(&self, _: &str) -> Option<PathBuf> {
        None
    }
    fn run(&self, _: &Path, _: &[&str]) -> Result<String, runtime::ProbeError> {
        Err(runtime::ProbeError::Unavailable)
    }
    fn package_version(&self, _: &str) -> Option<String> {
        None
    }
    fn install_record(&self, _: &str) -> Option<String> {
        None
    }
    fn unit(&self, _: &str) -> Option<runtime::UnitState> {
        None
    }
    fn read_file(&self, _: &Path) -> Option<String> {
        None
    }
    fn http_get(&self, _: &str, _: &str) -> Result<String, runtime::ProbeError> {
        Err(runtime::ProbeError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run` writes the status file right after `Managed::start` and then
    /// tells systemd READY: the first report must be there by then, not in
    /// a task that has not run yet (on this current-thread runtime a
    /// spawned send would not have).
    #[tokio::test(flavor = "current_thread")]
    async fn the_first_supervision_report_is_sent_before_forwarding_returns() {
        let (_status_tx, status_rx) = watch::channel(supervisor::Status::new("opampsupervisor"));
        let (report_tx, report_rx) = watch::channel(None::<RuntimeReport>);
        let detection = Detection {
            kind: RuntimeKind::Otelcol,
            collector: None,
            supervisor: None,
            alloy: None,
            conflicts: Vec::new(),
            notes: Vec::new(),
        };
        let forward = forward_supervision(status_rx, detection, report_tx);
        let first = report_rx.borrow().clone();
        forward.abort();
        let first = first.map(|r| (r.agent_pid, r.kind));
        assert_eq!(first, Some((std::process::id(), RuntimeKind::Otelcol)));
    }
}
