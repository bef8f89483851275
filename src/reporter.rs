//! Reports to the fleet server over mutual TLS, and certificate renewal.
//!
//! A full report at start and whenever what it carries changes (compared by
//! digest), a heartbeat of a few bytes otherwise, at the interval the server
//! asks for with ±10 % jitter. When the server is away the reporter backs off
//! (1 s × 1.6 up to 120 s, ±20 %, gRPC's connection backoff) and keeps
//! nothing but a counter: reports are state, not a queue, so nothing grows.
//! Supervision never waits on the reporter.
//!
//! Renewal happens at two thirds of the certificate's lifetime (see
//! [`crate::identity::rotation`]), with a new key made on the host, over the
//! current mutual-TLS channel; an expired certificate is renewed the same way
//! within the server's grace window. Clock offset is measured on every
//! exchange; a certificate error caused by the clock is reported as clock
//! skew, never answered by re-enrolment.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::{
    clock::rfc3339,
    config::RuntimeKind,
    host::HostFacts,
    identity::{Identity, IdentityError, IdentityStore, StoreError, rotation},
    proto,
    published::RuntimeReport,
    tls::mtls_client_config,
    transport::{Dialer, Proxy},
    version::{self, SkewVerdict, Version},
};

/// A clock offset beyond this (ms) is warned about.
pub const MAX_CLOCK_OFFSET_MS: i64 = 60_000;

/// Bound on one report or renewal exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

pub mod schedule;

pub use crate::published::{OpampView, ReporterStatus};

use self::schedule::{Exchange, Next, Schedule};

impl From<&proto::OpampView> for OpampView {
    fn from(v: &proto::OpampView) -> Self {
        Self {
            connected: v.connected,
            instance_uid: v.instance_uid.clone(),
            collector_name: v.collector_name.clone(),
            collector_version: v.collector_version.clone(),
            healthy: v.healthy,
            last_error: v.last_error.clone(),
            remote_config_hash: v.remote_config_hash.clone(),
            remote_config_status: v.remote_config_status.clone(),
            remote_config_error: v.remote_config_error.clone(),
        }
    }
}

/// What the reporter needs.
pub struct ReporterContext {
    /// Where a renewed identity is stored.
    pub store: IdentityStore,
    /// The current identity.
    pub identity: Identity,
    /// Report interval until the server says otherwise.
    pub interval: Duration,
    /// The proxy to use, if any.
    pub proxy: Option<Proxy>,
    /// How the agent was installed.
    pub install_method: crate::app::InstallMethod,
    /// Facts about the host.
    pub host: HostFacts,
    /// The runtime's state.
    pub runtime: watch::Receiver<Option<RuntimeReport>>,
    /// This machine is a copy of the identity's (see
    /// [`crate::fingerprint`]): why. The reporter then re-keys before it
    /// reports anything.
    pub clone: Option<String>,
    /// Who supervision presents the collector as; the reporter sends a new
    /// view when a re-key gave this machine its own identity, or when a
    /// report finds the identity copied here while running.
    pub view: watch::Sender<HostView>,
}

/// Who the collector is presented as: the host id it claims, and whether
/// that identity was copied here and this machine's own is pending (see
/// [`crate::supervisor::render::CLONE_OF_ATTRIBUTE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// The identity's host id.
    pub host_id: crate::identity::HostId,
    /// A copy of that host waiting for its own identity.
    pub clone_pending: bool,
}

/// The reporter's retries: 1 s × 1.6ⁿ⁻¹ capped at 120 s, ±20 %.
pub const RETRY: crate::backoff::Exponential = crate::backoff::Exponential {
    initial: Duration::from_secs(1),
    factor: 1.6,
    max: Duration::from_secs(120),
    jitter_percent: 20,
};

/// The delay before retry `failures` (1-based), ±20 % from `jitter` in
/// `[-1, 1]` ([`RETRY`]).
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    RETRY.delay(failures, jitter)
}

/// Records that an attempt failed now and the next comes after `wait`.
fn failed_at(s: &mut ReporterStatus, wait: Duration) {
    let now = crate::clock::now_unix_ms();
    s.last_failure_unix_ms = Some(now);
    s.retry_at_unix_ms =
        Some(now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)));
}

/// What a failed exchange calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server is away or overloaded: retry with backoff.
    Retry,
    /// The certificate expired: renew, then retry.
    Renew,
    /// The server refuses this identity or request: retry slowly, it will
    /// not change by itself.
    Rejected,
    /// The operator revoked this host: stop reporting (the collector keeps
    /// running); only a new enrolment helps.
    Revoked,
}

/// Why a renewal or a re-key did not give this host a new identity.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The server could not be reached (the dialer's words: TLS, proxy, TCP).
    #[error("{0}")]
    Unreachable(String),
    /// It did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// It answered with a refusal, classified.
    #[error("{message}")]
    Refused {
        /// The server's words.
        message: String,
        /// What the refusal calls for.
        failure: Failure,
    },
    /// No key pair could be made here.
    #[error("cannot generate a key: {0}")]
    Key(rcgen::Error),
    /// No certificate request could be made for the key.
    #[error("cannot make a certificate request: {0}")]
    Csr(rcgen::Error),
    /// The answer names another CA than this identity's.
    #[error("the server answered with another CA; refusing the certificate")]
    OtherCa,
    /// The answer's host id is not one.
    #[error("the server sent an unusable host id: {0}")]
    HostId(IdentityError),
    /// The certificate does not make an identity with the key.
    #[error("unusable certificate: {0}")]
    Certificate(IdentityError),
    /// The state directory refused the key or the new identity.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The blocking task doing the store's work did not finish.
    #[error("the identity store's task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ExchangeError {
    /// What the failure calls for: only a refusal is anything but a retry.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Refused { failure, .. } => *failure,
            _ => Failure::Retry,
        }
    }
}

/// The standing a refusal carries in its details (servers say it as a
/// [`proto::Refusal`]); `Unspecified` when it carries none.
pub fn refusal_standing(status: &tonic::Status) -> proto::Standing {
    <proto::Refusal as prost::Message>::decode(status.details())
        .map_or(proto::Standing::Unspecified, |r| r.standing())
}

/// Classifies a failed RPC, by the refusal's typed standing first, then by
/// its code. Pure.
pub fn classify(status: &tonic::Status) -> Failure {
    use tonic::Code;
    match refusal_standing(status) {
        proto::Standing::Expired => return Failure::Renew,
        proto::Standing::Revoked => return Failure::Revoked,
        _ => {}
    }
    match status.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition => Failure::Rejected,
        _ => Failure::Retry,
    }
}

/// Where the reporter records that the server revoked this host, so a
/// restarted agent does not report again and `check`/`status` say it.
pub const REVOKED_FILE: &str = "revoked.json";

/// The server's word that this host is revoked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    /// The host it applies to (a new enrolment makes another host).
    pub host_id: String,
    /// When the server said so, Unix ms.
    pub at_unix_ms: u64,
    /// The server's words.
    pub message: String,
}

impl Revoked {
    /// What to tell people.
    pub fn explain(&self) -> String {
        format!(
            "revoked: enrol again with a new token (the server said at {}: {})",
            crate::clock::rfc3339_unix_ms(self.at_unix_ms),
            self.message
        )
    }
}

/// The revocation recorded for `host_id`, if any (one recorded for another
/// host, before a new enrolment, does not count).
pub fn read_revoked(state_dir: &std::path::Path, host_id: &str) -> Option<Revoked> {
    crate::upgrade::read_json::<Revoked>(&state_dir.join(REVOKED_FILE))
        .ok()
        .flatten()
        .filter(|r| r.host_id == host_id)
}

/// The runtime part of a report.
pub fn runtime_status(r: Option<&RuntimeReport>) -> proto::RuntimeStatus {
    let Some(r) = r else {
        return proto::RuntimeStatus {
            kind: "none".into(),
            ..Default::default()
        };
    };
    let kind = match r.kind {
        RuntimeKind::Otelcol => "otelcol",
        RuntimeKind::Alloy => "alloy",
        RuntimeKind::None => "none",
    };
    let d = &r.detection;
    let mut s = proto::RuntimeStatus {
        kind: kind.into(),
        ..Default::default()
    };
    match r.kind {
        RuntimeKind::Otelcol => {
            s.version = d
                .collector
                .as_ref()
                .and_then(|c| c.version.clone())
                .unwrap_or_default();
            s.supervisor_version = d
                .supervisor
                .as_ref()
                .and_then(|c| c.version.clone())
                .unwrap_or_default();
            if let Some(sup) = &r.supervision {
                let state = serde_json::to_value(&sup.state).ok();
                let field = |k: &str| state.as_ref().and_then(|v| v.get(k).cloned());
                s.state = field("state")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                s.pid = field("pid")
                    .and_then(|v| v.as_u64())
                    .and_then(|p| u32::try_from(p).ok())
                    .unwrap_or(0);
                s.error = field("error")
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                s.restarts = sup.restarts;
                s.last_exit = sup.last_exit.clone().unwrap_or_default();
                s.collector_pid = sup.collector_pid.unwrap_or(0);
                s.collector_crashes = sup.collector_crashes;
                s.running_version = sup.collector_version.clone().unwrap_or_default();
                s.collector_problem =
                    sup.collector_problem
                        .as_ref()
                        .map(|p| proto::CollectorProblem {
                            reason: p.reason.clone(),
                            at_unix_ms: i64::try_from(p.at_unix_ms).unwrap_or(i64::MAX),
                            log_tail: p.log_tail.clone(),
                        });
            }
        }
        RuntimeKind::Alloy => {
            if let Some(a) = &d.alloy {
                s.version = a.executable.version.clone().unwrap_or_default();
                s.running_version = a.running_version.clone().unwrap_or_default();
                s.restart_pending = a.restart_pending;
                s.state = if a.running_version.is_some() {
                    "watched".into()
                } else {
                    "not_running".into()
                };
            }
        }
        RuntimeKind::None => {}
    }
    s
}

/// How the host's last agent and runtime upgrades ended, as recorded by the
/// upgrade watcher and install-opamp.sh.
#[derive(Clone, Copy, Debug, Default)]
pub struct Upgrades<'a> {
    /// The agent's (`STATE/upgrade/outcome.json`).
    pub agent: Option<&'a crate::upgrade::probation::Outcome>,
    /// The runtime's (`STATE/runtime/outcome.json`).
    pub runtime: Option<&'a crate::upgrade::probation::Outcome>,
}

/// A full report (sequence and times left for the caller).
pub fn full_report(
    identity: &Identity,
    install_method: &str,
    host: &HostFacts,
    runtime: proto::RuntimeStatus,
    verdict: Option<SkewVerdict>,
    upgrades: Upgrades<'_>,
) -> proto::ReportRequest {
    let outcome = |o: &crate::upgrade::probation::Outcome| proto::UpgradeOutcome {
        outcome: o.outcome.clone(),
        from_version: o.from.clone(),
        to_version: o.to.clone(),
        reason: o.reason.clone(),
        at_unix_ms: i64::try_from(o.at_unix_ms).unwrap_or(i64::MAX),
    };
    let mut r = proto::ReportRequest {
        full: true,
        host_id: identity.host_id.to_string(),
        agent_version: version::AGENT_VERSION.to_owned(),
        git_revision: version::GIT_REVISION.to_owned(),
        install_method: install_method.to_owned(),
        runtime: Some(runtime),
        host: Some(host.into()),
        skew_verdict: verdict.map(|v| v.as_str().to_owned()).unwrap_or_default(),
        last_upgrade: upgrades.agent.map(outcome),
        last_runtime_upgrade: upgrades.runtime.map(outcome),
        ..Default::default()
    };
    r.state_digest = digest(&r);
    r
}

/// A digest of what a full report says (sequence, times and offset excluded).
pub fn digest(r: &proto::ReportRequest) -> u64 {
    let mut stable = r.clone();
    stable.sequence = 0;
    stable.agent_time_unix_ms = 0;
    stable.clock_offset_ms = 0;
    stable.state_digest = 0;
    stable.run_id = 0;
    let bytes = prost::Message::encode_to_vec(&stable);
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    u64::from_le_bytes(d.as_ref()[..8].try_into().unwrap_or([0; 8]))
}

/// A heartbeat: a few bytes that say "still here, still the same".
pub fn heartbeat(state_digest: u64) -> proto::ReportRequest {
    proto::ReportRequest {
        full: false,
        state_digest,
        ..Default::default()
    }
}

/// Starts the reporter. It runs until aborted.
pub fn spawn(
    ctx: ReporterContext,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<ReporterStatus>) {
    let (tx, rx) = watch::channel(ReporterStatus::default());
    (tokio::spawn(run(ctx, tx)), rx)
}

async fn run(mut ctx: ReporterContext, status: watch::Sender<ReporterStatus>) {
    let tls = match mtls_client_config(&ctx.identity) {
        Ok(t) => Arc::new(t),
        Err(e) => {
            tracing::error!(error = %e, "Cannot build the TLS client configuration; not reporting");
            status.send_modify(|s| s.last_error = Some(e.to_string()));
            return;
        }
    };
    let dialer = Dialer::new(
        ctx.identity.server.clone(),
        tls,
        ctx.proxy.clone(),
        EXCHANGE_TIMEOUT,
    );
    let Ok(channel) = dialer.channel() else {
        return;
    };
    let mut client = proto::Client::new(channel);
    let renew_jitter = crate::clock::jitter();
    let mut schedule = Schedule::new(renew_jitter);
    let mut interval = ctx.interval;
    let mut sequence = 0u64;
    let mut sent_digest: Option<u64> = None;
    let mut want_full = true;
    let mut verdict: Option<SkewVerdict> = None;
    // The server's version as last recorded for the server-first check of
    // an install that cannot reach the server (crate::upgrade).
    let mut recorded = crate::upgrade::read_record(ctx.store.state_dir())
        .ok()
        .flatten();
    let mut clock_warned = false;
    // Sent with every report: the server tells two agents presenting this
    // identity at once by their run ids (a clone it cannot tell by itself).
    let run_id = crate::clock::random_u64().max(1);
    let mut in_use_elsewhere: Option<String> = None;
    if let Some(r) = read_revoked(ctx.store.state_dir(), ctx.identity.host_id.as_str()) {
        tracing::warn!(host_id = %ctx.identity.host_id, "{}; not reporting (the collector keeps running)", r.explain());
        status.send_modify(|s| {
            s.last_error = Some(r.explain());
            s.last_error_rejected = true;
            s.revoked = true;
        });
        return;
    }
    if let Some(reason) = ctx.clone.take() {
        match rekey_until_done(&mut ctx, &dialer, &status, &reason).await {
            Some(c) => client = c,
            None => return,
        }
    }
    status.send_modify(|s| {
        s.report_interval_secs = interval.as_secs();
        s.proxy = ctx
            .proxy
            .as_ref()
            .map(|p| format!("{} via {}", p.authority, p.source));
        s.cert_not_after = Some(rfc3339(ctx.identity.validity.not_after));
        s.renew_at = Some(rfc3339(rotation::renew_at(
            &ctx.identity.validity,
            renew_jitter,
        )));
    });

    // The record changes only when this task re-keys: read once, and again
    // after a re-key.
    let mut fingerprint = crate::fingerprint::read(ctx.store.state_dir());
    loop {
        // The fingerprint at each report: a running machine can be copied
        // too (a live clone, a snapshot booted elsewhere with its memory).
        let machine = crate::fingerprint::Machine::now();
        if let Some(reason) = copied_here(fingerprint.as_ref(), &ctx, &machine) {
            tracing::warn!(host_id = %ctx.identity.host_id, "This machine became a copy of host {} ({reason}): it stops reporting as that host and asks the server for an identity of its own", ctx.identity.host_id);
            ctx.host = crate::host::collect();
            ctx.view.send_replace(HostView {
                host_id: ctx.identity.host_id.clone(),
                clone_pending: true,
            });
            match rekey_until_done(&mut ctx, &dialer, &status, &reason).await {
                Some(c) => client = c,
                None => return,
            }
            fingerprint = crate::fingerprint::read(ctx.store.state_dir());
            want_full = true;
            continue;
        }
        // Renewal first: a report with an expired certificate is refused.
        if schedule.next(time::OffsetDateTime::now_utc(), &ctx.identity.validity) == Next::Renew {
            match renew(&mut client, &ctx, &dialer).await {
                Ok(new) => {
                    tracing::info!(not_after = %rfc3339(new.validity.not_after), "Renewed the host certificate");
                    match mtls_client_config(&new) {
                        Ok(t) => dialer.set_tls(Arc::new(t)),
                        Err(e) => tracing::error!(error = %e, "Renewed identity unusable for TLS"),
                    }
                    // A fresh channel, so the next exchange uses the new certificate.
                    if let Ok(ch) = dialer.channel() {
                        client = proto::Client::new(ch);
                    }
                    ctx.identity = new;
                    schedule.renewed();
                    status.send_modify(|s| {
                        s.renewals += 1;
                        s.cert_not_after = Some(rfc3339(ctx.identity.validity.not_after));
                        s.renew_at = Some(rfc3339(rotation::renew_at(
                            &ctx.identity.validity,
                            renew_jitter,
                        )));
                    });
                }
                Err(e) if e.failure() == Failure::Revoked => {
                    stop_revoked(&ctx, &status, e.to_string());
                    return;
                }
                Err(e) => {
                    schedule.record(Exchange::RenewalFailed, crate::clock::jitter());
                    let wait =
                        schedule.wait(time::OffsetDateTime::now_utc(), &ctx.identity.validity);
                    tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "Certificate renewal failed; retrying");
                    status.send_modify(|s| {
                        s.consecutive_failures = schedule.failures;
                        s.last_error = Some(format!("renewal: {e}"));
                        failed_at(s, wait);
                    });
                    if wait_or_change(wait, &mut ctx.runtime).await {
                        want_full = true;
                    }
                    continue;
                }
            }
        }

        let runtime = ctx.runtime.borrow_and_update().clone();
        let full = full_report(
            &ctx.identity,
            ctx.install_method.as_str(),
            &ctx.host,
            runtime_status(runtime.as_ref()),
            verdict,
            // Written by the upgrade watcher and install-opamp.sh, which
            // decide while this agent runs; two small files read per report.
            Upgrades {
                agent: crate::upgrade::watch::read_outcome(ctx.store.state_dir())
                    .ok()
                    .flatten()
                    .as_ref(),
                runtime: crate::upgrade::runtime::read_outcome(ctx.store.state_dir())
                    .ok()
                    .flatten()
                    .as_ref(),
            },
        );
        let send_full = want_full || sent_digest != Some(full.state_digest);
        let mut request = if send_full {
            full.clone()
        } else {
            heartbeat(full.state_digest)
        };
        sequence += 1;
        request.sequence = sequence;
        request.run_id = run_id;
        let before = SystemTime::now();
        request.agent_time_unix_ms = crate::clock::unix_ms(before) as i64;
        request.clock_offset_ms = status.borrow().clock_offset_ms.unwrap_or(0);
        let result = tokio::time::timeout(EXCHANGE_TIMEOUT, client.report(request)).await;
        let after = SystemTime::now();
        let exchange = match result {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                let midpoint = (crate::clock::unix_ms(before) + crate::clock::unix_ms(after)) / 2;
                let offset = midpoint as i64 - resp.server_time_unix_ms;
                let new_verdict = resp.server_version.parse::<Version>().ok().map(|sv| {
                    let behind = proto::SkewPolicy::window(resp.skew_policy.as_ref());
                    (
                        version::skew(&version::agent_version(), &sv, behind),
                        sv,
                        behind,
                    )
                });
                if let Some((_, sv, behind)) = &new_verdict
                    && let Some(r) = crate::upgrade::updated_record(
                        recorded.as_ref(),
                        &ctx.identity.server.to_string(),
                        &sv.to_string(),
                        *behind,
                        crate::clock::unix_ms(after),
                    )
                {
                    match crate::upgrade::write_record(ctx.store.state_dir(), &r) {
                        Ok(()) => recorded = Some(r),
                        Err(e) => tracing::warn!(error = %e, "Cannot record the server's version"),
                    }
                }
                if let Some((v, sv, _)) = &new_verdict
                    && verdict != Some(*v)
                {
                    match v {
                        SkewVerdict::InWindow => {
                            tracing::info!(server_version = %sv, "Agent version is within the server's window")
                        }
                        _ => {
                            tracing::warn!(server_version = %sv, verdict = v.as_str(), "{}", v.explain(&version::agent_version(), sv))
                        }
                    }
                    verdict = Some(*v);
                    want_full = true; // the verdict is part of the report
                } else {
                    want_full = resp.send_full_report;
                }
                if send_full {
                    sent_digest = Some(full.state_digest);
                }
                let skewed = offset.abs() > MAX_CLOCK_OFFSET_MS;
                if skewed && !clock_warned {
                    tracing::warn!(
                        clock_offset_ms = offset,
                        "Host clock differs from the server's by more than a minute"
                    );
                } else if !skewed && clock_warned {
                    tracing::info!(
                        clock_offset_ms = offset,
                        "Host clock agrees with the server's again"
                    );
                }
                clock_warned = skewed;
                let elsewhere =
                    Some(resp.identity_in_use_elsewhere.clone()).filter(|w| !w.is_empty());
                if elsewhere.is_some() != in_use_elsewhere.is_some() {
                    match &elsewhere {
                        Some(w) => tracing::error!("{w}"),
                        None => {
                            tracing::info!("The server sees this identity on one machine again")
                        }
                    }
                }
                in_use_elsewhere.clone_from(&elsewhere);
                interval =
                    Duration::from_secs(u64::from(resp.report_interval_seconds).clamp(1, 3600));
                status.send_modify(|s| {
                    s.last_report_unix_ms = Some(crate::clock::unix_ms(after));
                    s.reports += 1;
                    s.consecutive_failures = 0;
                    s.last_error = None;
                    s.last_error_rejected = false;
                    s.retry_at_unix_ms = None;
                    s.server_version = Some(resp.server_version.clone());
                    s.skew_verdict = verdict;
                    s.clock_offset_ms = Some(offset);
                    s.report_interval_secs = interval.as_secs();
                    s.runtime_pins = resp
                        .runtime_pins
                        .iter()
                        .map(|p| (p.kind.clone(), p.version.clone()))
                        .collect();
                    s.opamp = resp.opamp.as_ref().map(OpampView::from);
                    s.identity_in_use_elsewhere.clone_from(&elsewhere);
                });
                Some(Exchange::Reported { interval })
            }
            Ok(Err(s)) => {
                let failure = classify(&s);
                if failure == Failure::Revoked {
                    stop_revoked(&ctx, &status, s.message().to_owned());
                    return;
                }
                let message = dialer
                    .last_error()
                    .filter(|_| s.code() == tonic::Code::Unavailable)
                    .unwrap_or_else(|| s.message().to_owned());
                want_full = true;
                let exchange = Exchange::Failed(failure);
                schedule.record(exchange, crate::clock::jitter());
                let failures = schedule.failures;
                let wait = schedule.wait(time::OffsetDateTime::now_utc(), &ctx.identity.validity);
                if failures == 1 || failure != Failure::Retry {
                    tracing::warn!(error = %message, code = ?s.code(), retry_ms = wait.as_millis() as u64, "Report failed");
                } else {
                    tracing::debug!(error = %message, failures, retry_ms = wait.as_millis() as u64, "Report failed");
                }
                status.send_modify(|st| {
                    st.consecutive_failures = failures;
                    st.last_error = Some(message.clone());
                    st.last_error_rejected = failure == Failure::Rejected;
                    failed_at(st, wait);
                });
                None
            }
            Err(_) => {
                want_full = true;
                Some(Exchange::NoAnswer)
            }
        };
        match exchange {
            Some(Exchange::NoAnswer) => {
                schedule.record(Exchange::NoAnswer, crate::clock::jitter());
                let wait = schedule.wait(time::OffsetDateTime::now_utc(), &ctx.identity.validity);
                status.send_modify(|st| {
                    st.consecutive_failures = schedule.failures;
                    st.last_error = Some(format!("no answer within {EXCHANGE_TIMEOUT:?}"));
                    st.last_error_rejected = false;
                    failed_at(st, wait);
                });
            }
            Some(e) => schedule.record(e, crate::clock::jitter()),
            None => {}
        }
        // The next report, a runtime change (reported promptly), or renewal time.
        let wait = schedule.wait(time::OffsetDateTime::now_utc(), &ctx.identity.validity);
        if wait_or_change(wait, &mut ctx.runtime).await {
            // Let a burst of state changes settle into one report.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A clone asks for an identity of its own until it has one (the copied
/// identity never reports): the new identity is committed, this machine's
/// fingerprint recorded for it, and a client over it returned. `None` when
/// the server revoked the copied identity (reporting stops).
async fn rekey_until_done(
    ctx: &mut ReporterContext,
    dialer: &Dialer,
    status: &watch::Sender<ReporterStatus>,
    reason: &str,
) -> Option<proto::Client<tonic::transport::Channel>> {
    let original = ctx.identity.host_id.to_string();
    let mut failures = 0u32;
    loop {
        let mut client = proto::Client::new(dialer.channel().ok()?);
        match rekey(&mut client, ctx, dialer).await {
            Ok(new) => {
                tracing::info!(cloned_from = %original, host_id = %new.host_id, "This clone has an identity of its own");
                if let Err(e) = crate::fingerprint::write(
                    ctx.store.state_dir(),
                    new.host_id.as_str(),
                    &crate::fingerprint::Machine::of(&ctx.host),
                ) {
                    tracing::warn!(error = %e, "Cannot record this machine's fingerprint");
                }
                match mtls_client_config(&new) {
                    Ok(t) => dialer.set_tls(Arc::new(t)),
                    Err(e) => tracing::error!(error = %e, "The new identity is unusable for TLS"),
                }
                ctx.identity = new;
                ctx.view.send_replace(HostView {
                    host_id: ctx.identity.host_id.clone(),
                    clone_pending: false,
                });
                status.send_modify(|s| {
                    s.clone_pending = None;
                    s.last_error = None;
                    s.cert_not_after = Some(rfc3339(ctx.identity.validity.not_after));
                });
                return dialer.channel().ok().map(proto::Client::new);
            }
            Err(e) if e.failure() == Failure::Revoked => {
                stop_revoked(ctx, status, e.to_string());
                return None;
            }
            Err(e) => {
                let failure = e.failure();
                failures += 1;
                let wait = if failure == Failure::Rejected {
                    schedule::REJECTED_WAIT.min(Duration::from_secs(10))
                } else {
                    retry_delay(failures, crate::clock::jitter())
                };
                if failures == 1 || failure == Failure::Rejected {
                    tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "Re-key of this clone failed");
                }
                status.send_modify(|s| {
                    s.clone_pending = Some(format!(
                        "this machine is a copy of host {original} ({reason}); its own identity is pending: {e}"
                    ));
                    s.consecutive_failures = failures;
                    s.last_error = Some(e.to_string());
                    s.last_error_rejected = failure == Failure::Rejected;
                    failed_at(s, wait);
                });
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Why this identity is a copy on `machine`, when it is one.
fn copied_here(
    recorded: Option<&crate::fingerprint::Recorded>,
    ctx: &ReporterContext,
    machine: &crate::fingerprint::Machine,
) -> Option<String> {
    match crate::fingerprint::judge(
        recorded,
        ctx.identity.host_id.as_str(),
        &machine.machine_id_hash,
        &machine.product_uuid_hash,
    ) {
        crate::fingerprint::Verdict::Clone { reason } => Some(reason),
        _ => None,
    }
}

/// Asks for a new identity for this clone with a key made here (the one an
/// interrupted re-key left, so the server recognises the retry) and commits
/// it; the copied identity stays in place until then.
async fn rekey(
    client: &mut proto::Client<tonic::transport::Channel>,
    ctx: &ReporterContext,
    dialer: &Dialer,
) -> Result<Identity, ExchangeError> {
    let store = ctx.store.clone();
    let server = ctx.identity.server.clone();
    let key = tokio::task::spawn_blocking(move || {
        let lock = store.lock_exclusive()?;
        store.pending_key(&lock, &server)
    })
    .await??;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(ExchangeError::Csr)?;
    let resp = tokio::time::timeout(
        EXCHANGE_TIMEOUT,
        client.rekey(proto::RekeyRequest {
            csr_der: csr.der().to_vec(),
            host: Some((&ctx.host).into()),
            agent_version: version::AGENT_VERSION.to_owned(),
        }),
    )
    .await
    .map_err(|_| ExchangeError::Timeout(EXCHANGE_TIMEOUT))?
    .map_err(|s| refused(dialer, &s))?
    .into_inner();
    let ca = same_ca(ctx, resp.ca_certificate_der)?;
    let host_id = crate::identity::HostId::new(&resp.host_id).map_err(ExchangeError::HostId)?;
    let identity = Identity::new(
        host_id,
        ctx.identity.server.clone(),
        rfc3339(time::OffsetDateTime::now_utc()),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        resp.certificate_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        ca,
    )
    .map_err(ExchangeError::Certificate)?;
    store_identity(&ctx.store, &identity).await?;
    Ok(identity)
}

/// A renewal's or re-key's failed RPC: the dial error when the server could
/// not be reached, else the server's words, classified.
fn refused(dialer: &Dialer, s: &tonic::Status) -> ExchangeError {
    match dialer.last_error() {
        Some(e) if s.code() == tonic::Code::Unavailable => ExchangeError::Unreachable(e),
        _ => ExchangeError::Refused {
            message: s.message().to_owned(),
            failure: classify(s),
        },
    }
}

/// The CA a renewal or re-key answered with, which must be this identity's.
fn same_ca(ctx: &ReporterContext, der: Vec<u8>) -> Result<CertificateDer<'static>, ExchangeError> {
    let ca = CertificateDer::from(der);
    if ca.as_ref() != ctx.identity.ca.as_ref() {
        return Err(ExchangeError::OtherCa);
    }
    Ok(ca)
}

/// Commits `identity` (a renewal's or a re-key's) atomically, off the async
/// runtime.
async fn store_identity(store: &IdentityStore, identity: &Identity) -> Result<(), ExchangeError> {
    let to_store = Identity::new(
        identity.host_id.clone(),
        identity.server.clone(),
        identity.enrolled_at.clone(),
        identity.key().clone_key(),
        identity.certs.clone(),
        identity.ca.clone(),
    )
    .map_err(ExchangeError::Certificate)?;
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let lock = store.lock_exclusive()?;
        store.commit(&lock, &to_store)
    })
    .await??;
    Ok(())
}

/// The server revoked this host: records it, publishes it and stops
/// reporting. Supervision goes on: the collector keeps running.
fn stop_revoked(ctx: &ReporterContext, status: &watch::Sender<ReporterStatus>, message: String) {
    let r = Revoked {
        host_id: ctx.identity.host_id.to_string(),
        at_unix_ms: crate::clock::unix_ms(SystemTime::now()),
        message: crate::config::cut(&message, 400, str::to_owned),
    };
    tracing::error!(host_id = %ctx.identity.host_id, "{}; reporting stops (the collector keeps running)", r.explain());
    if let Err(e) = crate::upgrade::write_json(&ctx.store.state_dir().join(REVOKED_FILE), &r) {
        tracing::warn!(error = %e, "Cannot record the revocation");
    }
    status.send_modify(|s| {
        s.last_error = Some(r.explain());
        s.last_error_rejected = true;
        s.revoked = true;
    });
}

/// Sleeps for `wait`, or until the runtime state changes (true).
async fn wait_or_change(
    wait: Duration,
    runtime: &mut watch::Receiver<Option<RuntimeReport>>,
) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => false,
        changed = runtime.changed() => changed.is_ok(),
    }
}

/// Renews the certificate with a new key made here.
async fn renew(
    client: &mut proto::Client<tonic::transport::Channel>,
    ctx: &ReporterContext,
    dialer: &Dialer,
) -> Result<Identity, ExchangeError> {
    let key = rcgen::KeyPair::generate().map_err(ExchangeError::Key)?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(ExchangeError::Csr)?;
    let resp = tokio::time::timeout(
        EXCHANGE_TIMEOUT,
        client.renew(proto::RenewRequest {
            csr_der: csr.der().to_vec(),
        }),
    )
    .await
    .map_err(|_| ExchangeError::Timeout(EXCHANGE_TIMEOUT))?
    .map_err(|s| refused(dialer, &s))?
    .into_inner();
    let ca = same_ca(ctx, resp.ca_certificate_der)?;
    let certs: Vec<CertificateDer<'static>> = resp
        .certificate_chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let identity = Identity::new(
        ctx.identity.host_id.clone(),
        ctx.identity.server.clone(),
        ctx.identity.enrolled_at.clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        certs,
        ca,
    )
    .map_err(ExchangeError::Certificate)?;
    store_identity(&ctx.store, &identity).await?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff() {
        let d: Vec<u64> = (1..=13)
            .map(|n| retry_delay(n, 0.0).as_millis() as u64)
            .collect();
        assert_eq!(
            d,
            [
                1000, 1600, 2560, 4096, 6553, 10485, 16777, 26843, 42949, 68719, 109951, 120000,
                120000
            ]
        );
        assert_eq!(retry_delay(1, 1.0), Duration::from_millis(1200));
        assert_eq!(retry_delay(1, -1.0), Duration::from_millis(800));
        assert_eq!(retry_delay(u32::MAX, 0.0), Duration::from_secs(120));
    }

    fn refusal(code: tonic::Code, message: &str, standing: proto::Standing) -> tonic::Status {
        let detail = proto::Refusal {
            standing: standing as i32,
        };
        tonic::Status::with_details(code, message, prost::Message::encode_to_vec(&detail).into())
    }

    #[test]
    fn only_a_refusal_is_more_than_a_retry() {
        let refused = ExchangeError::Refused {
            message: "host x was revoked".into(),
            failure: Failure::Revoked,
        };
        assert_eq!(refused.failure(), Failure::Revoked);
        assert_eq!(refused.to_string(), "host x was revoked");
        for e in [
            ExchangeError::Unreachable("cannot reach x: refused".into()),
            ExchangeError::Timeout(EXCHANGE_TIMEOUT),
            ExchangeError::OtherCa,
        ] {
            assert_eq!(e.failure(), Failure::Retry, "{e}");
        }
        assert_eq!(
            ExchangeError::Timeout(EXCHANGE_TIMEOUT).to_string(),
            "no answer within 10s"
        );
    }

    #[test]
    fn classification() {
        use tonic::{Code, Status};
        assert_eq!(
            classify(&Status::new(Code::Unavailable, "down")),
            Failure::Retry
        );
        // Decided by the typed detail, not by the words.
        assert_eq!(
            classify(&refusal(
                Code::Unauthenticated,
                "certificate out of date",
                proto::Standing::Expired
            )),
            Failure::Renew
        );
        assert_eq!(
            classify(&Status::new(
                Code::Unauthenticated,
                "client certificate expired at x"
            )),
            Failure::Rejected,
            "no detail, no renewal"
        );
        assert_eq!(
            classify(&refusal(
                Code::PermissionDenied,
                "host x was revoked",
                proto::Standing::Revoked
            )),
            Failure::Revoked
        );
        assert_eq!(
            classify(&refusal(
                Code::PermissionDenied,
                "replaced by a renewal",
                proto::Standing::Superseded
            )),
            Failure::Rejected
        );
        assert_eq!(
            refusal_standing(&Status::with_details(
                Code::PermissionDenied,
                "garbage detail",
                vec![0xff, 0xff, 0xff].into()
            )),
            proto::Standing::Unspecified
        );
        assert_eq!(
            classify(&Status::new(Code::PermissionDenied, "claims host")),
            Failure::Rejected
        );
        assert_eq!(
            classify(&Status::new(Code::NotFound, "not enrolled")),
            Failure::Rejected
        );
        assert_eq!(
            classify(&Status::new(Code::DeadlineExceeded, "slow")),
            Failure::Retry
        );
    }

    #[test]
    fn heartbeats_are_tiny_and_digests_ignore_timing() {
        let mut hb = heartbeat(u64::MAX);
        hb.sequence = u64::from(u32::MAX);
        hb.agent_time_unix_ms = 1_795_447_872_876;
        hb.clock_offset_ms = -3_600_000;
        hb.run_id = u64::MAX;
        assert!(
            prost::Message::encoded_len(&hb) <= 50,
            "{}",
            prost::Message::encoded_len(&hb)
        );
        let mut a = proto::ReportRequest {
            full: true,
            agent_version: "1.0.0".into(),
            ..Default::default()
        };
        let d = digest(&a);
        a.sequence = 9;
        a.agent_time_unix_ms = 5;
        assert_eq!(digest(&a), d);
        a.agent_version = "1.0.1".into();
        assert_ne!(digest(&a), d);
    }
}
