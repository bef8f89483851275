//! Supervision of opampsupervisor (which in turn runs otelcol-contrib): one
//! tokio task owns the child, streams its output into the agent's logs,
//! restarts it by [`policy`], publishes its state, and stops it on request.
//!
//! ```text
//!            spawn ok                 exit
//! Starting ───────────► Running ─────────────► Backoff ──(delay)──► Starting
//!    │ not executable                              │ 5 short runs in a row
//!    ▼                                             ▼
//! NotRunnable ──(delay, re-check)──► Starting   CrashLoop (same, flagged)
//! any state ──stop──► Stopped        any state ──apply(new spec)──► Starting (no delay)
//! ```

pub mod child;
pub mod output;
pub mod policy;
pub mod render;
pub mod service;
pub mod unit;

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use self::{
    child::{ChildSpec, Event, Running, SpawnError, StopTimeouts, describe_exit},
    output::{CollectorEvent, Level, LineSplitter, collector_event, parse_record},
    policy::{Backoff, RestartPolicy},
};

/// The supervised child's state, as published.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum State {
    /// Being started.
    Starting,
    /// Running.
    Running {
        /// Its pid.
        pid: u32,
        /// When it started (Unix ms).
        since_unix_ms: u64,
    },
    /// Exited; restarting after a delay.
    Backoff {
        /// The delay (ms).
        delay_ms: u64,
        /// Short runs in a row.
        consecutive_failures: u32,
    },
    /// Exited after several short runs in a row; still restarted, at the capped delay.
    CrashLoop {
        /// The delay (ms).
        delay_ms: u64,
        /// Short runs in a row.
        consecutive_failures: u32,
    },
    /// The executable is missing or unusable; checked again after a delay.
    NotRunnable {
        /// What is wrong, naming the path.
        error: String,
    },
    /// Its systemd unit failed and systemd stopped restarting it (unit
    /// mode); started again only on a change or a request.
    Failed {
        /// systemd's reason and the last exit.
        reason: String,
    },
    /// Stopped on request.
    Stopped,
}

/// Everything published about supervision.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// The child's name.
    pub name: String,
    /// Current state.
    #[serde(flatten)]
    pub state: State,
    /// Restarts since the agent started.
    pub restarts: u32,
    /// How the child last exited.
    pub last_exit: Option<String>,
    /// The collector's pid as the supervisor reports it.
    pub collector_pid: Option<u32>,
    /// Collector crashes the supervisor reported (it restarts the collector itself).
    pub collector_crashes: u32,
    /// The collector version running, from its own telemetry resource.
    pub collector_version: Option<String>,
    /// The collector's last crash or rejected configuration.
    pub collector_problem: Option<CollectorProblem>,
    /// The systemd unit running the supervisor (unit mode); `None` when it
    /// is the agent's child.
    pub unit: Option<String>,
}

/// A collector crash or a configuration it rejected, with the last lines of
/// its output, for the server (so nobody has to log in to read them).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CollectorProblem {
    /// What happened, in the supervisor's words.
    pub reason: String,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The collector's last output lines, oldest first, each bounded and
    /// with control characters escaped.
    pub log_tail: Vec<String>,
}

/// What a collector crash is followed by: opampsupervisor (v0.158.0)
/// restarts its collector after a fixed delay of its own, which the agent
/// cannot shorten; it is said, not hidden.
pub const COLLECTOR_RESTART_NOTE: &str = "; opampsupervisor restarts it after its fixed 5 s delay";

/// How many of the collector's last lines a problem carries.
pub const PROBLEM_TAIL_LINES: usize = 20;

impl Status {
    /// A fresh status: starting, nothing seen yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: State::Starting,
            restarts: 0,
            last_exit: None,
            collector_pid: None,
            collector_crashes: 0,
            collector_version: None,
            collector_problem: None,
            unit: None,
        }
    }

    /// A one-line summary for systemd's STATUS= and logs.
    pub fn summary(&self) -> String {
        match &self.state {
            State::Starting => format!("starting {}", self.name),
            State::Running { pid, .. } => match &self.unit {
                Some(u) => format!(
                    "{} running in {u} (pid {pid}, {} restarts)",
                    self.name, self.restarts
                ),
                None => format!(
                    "{} running (pid {pid}, {} restarts)",
                    self.name, self.restarts
                ),
            },
            State::Backoff { delay_ms, .. } => format!(
                "{} exited ({}); restarting in {delay_ms} ms",
                self.name,
                self.last_exit.as_deref().unwrap_or("?")
            ),
            State::CrashLoop {
                delay_ms,
                consecutive_failures,
            } => format!(
                "{} is crash-looping ({consecutive_failures} short runs); next start in {delay_ms} ms",
                self.name
            ),
            State::NotRunnable { error } => error.clone(),
            State::Failed { reason } => reason.clone(),
            State::Stopped => match &self.unit {
                Some(u) => format!(
                    "{} stopped ({u}; `linkmesh-agent runtime start` starts it)",
                    self.name
                ),
                None => format!("{} stopped", self.name),
            },
        }
    }
}

enum Request {
    Apply(ChildSpec),
    Stop(oneshot::Sender<()>),
}

/// Handle to a supervision task.
pub struct Supervisor {
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<Status>,
    task: tokio::task::JoinHandle<()>,
}

/// Settings of a supervision task.
#[derive(Clone, Copy, Debug)]
pub struct SupervisorOptions {
    /// Restart policy.
    pub policy: RestartPolicy,
    /// Stop escalation.
    pub stop: StopTimeouts,
}

impl Supervisor {
    /// Starts supervising `spec` on the current tokio runtime.
    pub fn start(spec: ChildSpec, options: SupervisorOptions) -> Self {
        let (requests, rx) = mpsc::channel(4);
        let (tx, status) = watch::channel(Status::new(&spec.name));
        let task = tokio::spawn(supervise(spec, options, rx, tx));
        Self {
            requests,
            status,
            task,
        }
    }

    /// A receiver of status changes.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits (at most `limit`) until the first start attempt has an outcome:
    /// running, or not runnable.
    pub async fn started(&self, limit: Duration) {
        let mut rx = self.status.clone();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.state != State::Starting)).await;
    }

    /// Replaces the child's spec: the running child is stopped and the new
    /// one started without delay.
    pub async fn apply(&self, spec: ChildSpec) {
        let _ = self.requests.send(Request::Apply(spec)).await;
    }

    /// Stops the child and ends the task.
    pub async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Request::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// Streams a child's output into tracing and notes collector events.
struct Sink {
    name: String,
    /// Whether lines go to the agent's own log (child mode); in unit mode
    /// they are in the unit's journal already.
    echo: bool,
    stdout: LineSplitter,
    stderr: LineSplitter,
    /// The collector's last lines, for a problem report.
    tail: std::collections::VecDeque<String>,
    /// The supervisor has finished bootstrapping: before that, the
    /// collector it runs only tells it its description and is stopped.
    bootstrapped: bool,
}

impl Sink {
    fn new(name: &str, echo: bool) -> Self {
        Self {
            name: name.to_owned(),
            echo,
            stdout: LineSplitter::default(),
            stderr: LineSplitter::default(),
            tail: std::collections::VecDeque::with_capacity(PROBLEM_TAIL_LINES),
            bootstrapped: false,
        }
    }

    fn handle(&mut self, event: &Event, status: &watch::Sender<Status>) {
        let (lines, default) = match event {
            Event::Stdout(b) => (self.stdout.push(b), Level::Info),
            Event::Stderr(b) => (self.stderr.push(b), Level::Warn),
            Event::Exited(_) => {
                let mut rest: Vec<_> = self
                    .stdout
                    .flush()
                    .into_iter()
                    .map(|l| (l, Level::Info))
                    .collect();
                rest.extend(self.stderr.flush().into_iter().map(|l| (l, Level::Warn)));
                for (line, level) in rest {
                    self.emit(&line, level, status);
                }
                return;
            }
        };
        for line in lines {
            self.emit(&line, default, status);
        }
    }

    fn emit(&mut self, line: &output::Line, default: Level, status: &watch::Sender<Status>) {
        let text = String::from_utf8_lossy(&line.bytes);
        let record = parse_record(&text, default);
        let child = if record.collector {
            "collector"
        } else {
            self.name.as_str()
        };
        let fields = record.fields.as_deref();
        let truncated = (line.truncated > 0).then_some(line.truncated);
        match record.level {
            _ if !self.echo => {}
            Level::Debug => tracing::debug!(child, fields, truncated, "{}", record.message),
            Level::Info => tracing::info!(child, fields, truncated, "{}", record.message),
            Level::Warn => tracing::warn!(child, fields, truncated, "{}", record.message),
            Level::Error => tracing::error!(child, fields, truncated, "{}", record.message),
        }
        if record.collector {
            if self.tail.len() == PROBLEM_TAIL_LINES {
                self.tail.pop_front();
            }
            self.tail
                .push_back(output::escape_for_report(&record.message));
            if let Some((_, version)) = &record.service {
                status.send_if_modified(|s| {
                    let changed = s.collector_version.as_ref() != Some(version);
                    if changed {
                        s.collector_version = Some(version.clone());
                    }
                    changed
                });
            }
            return;
        }
        let problem = |reason: String| CollectorProblem {
            reason: output::escape_for_report(&reason),
            at_unix_ms: crate::clock::now_unix_ms(),
            log_tail: self.tail.iter().cloned().collect(),
        };
        match collector_event(&record.message, record.fields.as_deref()) {
            Some(CollectorEvent::Bootstrapped) => self.bootstrapped = true,
            Some(CollectorEvent::Started(pid)) if self.bootstrapped => {
                status.send_modify(|s| s.collector_pid = pid.or(s.collector_pid))
            }
            Some(CollectorEvent::Started(_)) => {}
            Some(CollectorEvent::Crashed(code)) => {
                let reason = match code {
                    Some(c) => format!("the collector exited unexpectedly with exit code {c}"),
                    None => "the collector exited unexpectedly".to_owned(),
                } + COLLECTOR_RESTART_NOTE;
                let p = problem(reason);
                status.send_modify(|s| {
                    s.collector_crashes += 1;
                    s.collector_pid = None;
                    s.collector_problem = Some(p);
                });
            }
            Some(CollectorEvent::ConfigRejected(reason)) => {
                let p = problem(format!("a new configuration was rejected: {reason}"));
                status.send_modify(|s| s.collector_problem = Some(p));
            }
            None => {}
        }
    }
}

async fn supervise(
    mut spec: ChildSpec,
    options: SupervisorOptions,
    mut requests: mpsc::Receiver<Request>,
    status: watch::Sender<Status>,
) {
    let mut backoff = Backoff::new(options.policy);
    loop {
        status.send_modify(|s| s.state = State::Starting);
        let started = Instant::now();
        let delay = match child::spawn(&spec) {
            Ok(running) => {
                let pid = running.pid;
                tracing::info!(child = %spec.name, pid, "Started child");
                status.send_modify(|s| {
                    s.state = State::Running {
                        pid,
                        since_unix_ms: crate::clock::now_unix_ms(),
                    };
                    s.collector_pid = None;
                });
                match run_until_exit(running, &spec, options, &mut requests, &status).await {
                    Outcome::Exited(exit) => {
                        let restart = backoff.on_exit(started.elapsed(), crate::clock::jitter());
                        let delay_ms = restart.delay.as_millis() as u64;
                        let consecutive_failures = restart.consecutive_failures;
                        tracing::warn!(child = %spec.name, exit = %exit, delay_ms, consecutive_failures, crash_loop = restart.crash_loop, "Child exited; restarting");
                        status.send_modify(|s| {
                            s.restarts += 1;
                            s.last_exit = Some(exit);
                            s.state = if restart.crash_loop {
                                State::CrashLoop {
                                    delay_ms,
                                    consecutive_failures,
                                }
                            } else {
                                State::Backoff {
                                    delay_ms,
                                    consecutive_failures,
                                }
                            };
                        });
                        restart.delay
                    }
                    Outcome::Apply(new) => {
                        spec = new;
                        continue;
                    }
                    Outcome::Stop(done) => {
                        status.send_modify(|s| s.state = State::Stopped);
                        let _ = done.send(());
                        return;
                    }
                }
            }
            Err(e) => {
                let restart = backoff.on_exit(Duration::ZERO, crate::clock::jitter());
                let error = e.to_string();
                match &e {
                    SpawnError::NotExecutable { .. }
                        if status.borrow().state
                            == State::NotRunnable {
                                error: error.clone(),
                            } => {}
                    _ => {
                        tracing::error!(child = %spec.name, error = %error, retry_ms = restart.delay.as_millis() as u64, "Cannot start child")
                    }
                }
                status.send_modify(|s| s.state = State::NotRunnable { error });
                restart.delay
            }
        };
        // Wait out the delay, still answering requests.
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            req = requests.recv() => match req {
                Some(Request::Apply(new)) => spec = new,
                Some(Request::Stop(done)) => {
                    status.send_modify(|s| s.state = State::Stopped);
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
        }
    }
}

enum Outcome {
    Exited(String),
    Apply(ChildSpec),
    Stop(oneshot::Sender<()>),
}

async fn run_until_exit(
    mut running: Running,
    spec: &ChildSpec,
    options: SupervisorOptions,
    requests: &mut mpsc::Receiver<Request>,
    status: &watch::Sender<Status>,
) -> Outcome {
    let mut sink = Sink::new(&spec.name, true);
    loop {
        tokio::select! {
            event = running.next() => match event {
                Some(Event::Exited(st)) => {
                    sink.handle(&Event::Exited(st), status);
                    return Outcome::Exited(describe_exit(&st));
                }
                Some(e) => sink.handle(&e, status),
                None => return Outcome::Exited("output closed".into()),
            },
            req = requests.recv() => {
                let pid = running.pid;
                let (exit, signal) = running
                    .stop(options.stop, |e| sink.handle(&e, status))
                    .await;
                tracing::info!(child = %spec.name, pid, exit = %describe_exit(&exit), signal = signal.as_str(), "Stopped child");
                return match req {
                    Some(Request::Apply(new)) => Outcome::Apply(new),
                    Some(Request::Stop(done)) => Outcome::Stop(done),
                    None => Outcome::Stop(oneshot::channel().0),
                };
            }
        }
    }
}
