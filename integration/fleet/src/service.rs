//! The agent API as the reference server implements it. Identity comes from
//! TLS (the client certificate), never from a request body.

use std::{sync::Arc, time::Duration};

use linkmesh_agent::{
    identity::HostId,
    proto,
    token::{Token, hashes_equal},
    version::{self, SkewVerdict, Version},
};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::{
    admission::{self, Admitted, Refused},
    ca::{Ca, csr_spki_sha256},
    state::{CertRef, HostRecord, RevocationRecord, State, TokenUse},
};

/// Revoked hosts by id.
pub type Revocations = std::collections::HashMap<String, RevocationRecord>;

/// How often `serve` looks for new revocations.
pub const REVOCATION_POLL: Duration = Duration::from_millis(200);

/// Settings of the service.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The version the server reports (tests set older or newer ones).
    pub version: Version,
    /// The agent version offered to hosts (`/agent/latest`).
    pub latest_agent: Version,
    /// Lifetime of host certificates.
    pub cert_lifetime: Duration,
    /// How many minor versions agents may lag.
    pub minor_versions_behind: u32,
    /// The report interval agents are told to use.
    pub report_interval: Duration,
    /// How long after expiry a certificate may still be renewed.
    pub renew_grace: Duration,
    /// Runtime versions the fleet pins.
    pub runtime_pins: Vec<proto::RuntimePin>,
    /// What a clone's re-key gets.
    pub clone_policy: ClonePolicy,
    /// The package repositories' archive keys, as `ServerInfo` tells them;
    /// `None` when no repositories are served.
    pub archive_keys: Option<proto::ArchiveKeys>,
}

/// What the server does with a clone's request for an identity of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClonePolicy {
    /// Issue it at once (a new host id, `cloned_from` the original).
    #[default]
    Rekey,
    /// Hold it until `linkmesh-fleet hosts approve ID`.
    Quarantine,
}

/// The reference implementation of `linkmesh.v1.Fleet`.
#[derive(Clone)]
pub struct FleetService {
    inner: Arc<Inner>,
}

struct Inner {
    /// Refused enrolments are logged at most once per 10 s (a client may
    /// try tokens in a loop).
    refusals: std::sync::Mutex<crate::text::Every>,
    state: State,
    ca: Arc<Ca>,
    config: ServiceConfig,
    /// Every host as last known, kept in memory so a heartbeat costs no I/O;
    /// changed hosts are written back by [`FleetService::flush`].
    live: std::sync::Mutex<Live>,
    /// The collector configurations in force (set by the OpAMP hub).
    configs:
        std::sync::Mutex<Option<tokio::sync::watch::Receiver<Arc<crate::opamp::store::ConfigSet>>>>,
    /// Revoked hosts as last read from the state (`hosts revoke` writes
    /// them beside a running server; [`FleetService::spawn_revocation_watch`]
    /// reads them back).
    revoked: tokio::sync::watch::Sender<Arc<Revocations>>,
}

/// Most collector log lines kept per problem.
const MAX_TAIL_LINES: usize = 50;
/// Longest reason or log line kept, in bytes.
const MAX_PROBLEM_TEXT: usize = 2048;

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_PROBLEM_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[derive(Default)]
struct Live {
    hosts: std::collections::HashMap<String, HostRecord>,
    dirty: std::collections::HashSet<String>,
    /// Recent run ids per host (memory only).
    runs: std::collections::HashMap<String, crate::duplicate::Runs>,
}

/// A duplicate flag is dropped once this many report intervals pass
/// without a returning run id.
const DUPLICATE_CLEARS_AFTER: u32 = 10;

/// What the agents of a duplicated identity are told.
fn in_use_elsewhere(host: &str, d: &crate::state::DuplicateRecord) -> String {
    format!(
        "the identity of host {host} is in use on another machine too: the server has seen {} agents report as this host at once since {} (run ids {}). One of the machines is a copy (an image or clone whose machine-id was not regenerated). On the copy: linkmesh-agent image-prep, give it a new machine-id (systemd-machine-id-setup), and enrol it with a new token; the original keeps its identity",
        d.run_ids.len(),
        rfc3339(d.since),
        d.run_ids.join(", ")
    )
}

impl FleetService {
    /// A service over `state`, signing with `ca`.
    ///
    /// # Errors
    /// When the enrolled hosts cannot be read.
    pub fn new(
        state: State,
        ca: Arc<Ca>,
        config: ServiceConfig,
    ) -> Result<Self, crate::state::StateError> {
        let hosts = state
            .hosts()?
            .into_iter()
            .map(|mut h| {
                // A server that just started has no OpAMP connections.
                if let Some(o) = h.opamp.as_mut() {
                    o.connected = false;
                }
                (h.host_id.clone(), h)
            })
            .collect();
        let hosts: std::collections::HashMap<String, HostRecord> = hosts;
        // Records a crashed server left as connected are written back.
        let dirty = hosts
            .values()
            .filter(|h| h.opamp.is_some())
            .map(|h| h.host_id.clone())
            .collect();
        let live = std::sync::Mutex::new(Live {
            hosts,
            dirty,
            runs: Default::default(),
        });
        let (revoked, _) = tokio::sync::watch::channel(Arc::new(state.revocations()?));
        Ok(Self {
            inner: Arc::new(Inner {
                refusals: std::sync::Mutex::new(crate::text::Every::new(
                    std::time::Duration::from_secs(10),
                )),
                state,
                ca,
                config,
                live,
                configs: std::sync::Mutex::new(None),
                revoked,
            }),
        })
    }

    /// Writes hosts changed by reports to the state directory.
    ///
    /// # Errors
    /// When the state cannot be locked or written.
    pub fn flush(&self) -> Result<usize, crate::state::StateError> {
        let changed: Vec<HostRecord> = {
            let Ok(mut live) = self.inner.live.lock() else {
                return Ok(0);
            };
            let dirty = std::mem::take(&mut live.dirty);
            dirty
                .iter()
                .filter_map(|id| live.hosts.get(id).cloned())
                .collect()
        };
        if changed.is_empty() {
            return Ok(0);
        }
        let lock = self.inner.state.lock()?;
        for h in &changed {
            self.inner.state.put_host(&lock, h)?;
        }
        Ok(changed.len())
    }

    /// Admits a connection's verified client certificate (DER), an expired
    /// one up to `grace` past its expiry: see [`crate::admission`]. A
    /// renewed certificate presented for the first time becomes the host's
    /// current one here, and is recorded before this returns (a server
    /// that crashes next still refuses the superseded one).
    ///
    /// # Errors
    /// [`Refused`] with the standing and the words for the peer.
    pub async fn admit(&self, leaf: &[u8], grace: Duration) -> Result<HostId, Refused> {
        let (host, admitted) = self.inner.admit(leaf, grace)?;
        if admitted == Admitted::Renewed {
            let inner = self.inner.clone();
            let id = host.to_string();
            let stored = tokio::task::spawn_blocking(move || inner.store_host(&id)).await;
            if let Ok(Err(e)) | Err(e) = stored.map_err(|e| e.to_string()) {
                // The flusher writes it within a second anyway.
                tracing::error!(host_id = %host, error = %e, "Cannot record the renewed certificate now");
            }
        }
        Ok(host)
    }

    /// What the agents of `host` are told when its identity is in use on two
    /// machines at once.
    pub fn duplicate(&self, host: &str) -> Option<String> {
        let live = self.inner.live.lock().ok()?;
        let d = live.hosts.get(host)?.duplicate.as_ref()?;
        Some(in_use_elsewhere(host, d))
    }

    /// Revocations as they change (OpAMP sessions close on their host's).
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<Arc<Revocations>> {
        self.inner.revoked.subscribe()
    }

    /// Reads new revocations every [`REVOCATION_POLL`] until the process
    /// ends.
    pub fn spawn_revocation_watch(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut last = inner.state.revocations_signature();
            let mut tick = tokio::time::interval(REVOCATION_POLL);
            loop {
                tick.tick().await;
                let state = inner.state.clone();
                let Ok((now, read)) = tokio::task::spawn_blocking(move || {
                    let sig = state.revocations_signature();
                    (sig, state.revocations())
                })
                .await
                else {
                    continue;
                };
                if now == last {
                    continue;
                }
                match read {
                    Ok(set) => {
                        last = now;
                        inner.revoked.send_if_modified(|old| {
                            let added: Vec<&String> =
                                set.keys().filter(|k| !old.contains_key(*k)).collect();
                            for host in &added {
                                tracing::warn!(host_id = %host, "Host revoked: its connections are refused from now on");
                            }
                            let changed = !added.is_empty() || old.len() != set.len();
                            if changed {
                                *old = Arc::new(set);
                            }
                            changed
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "Cannot read revocations"),
                }
            }
        })
    }

    /// Runs `f` on `host`'s OpAMP record (made on first use) and marks the
    /// host for the next flush; `None` when the host is not enrolled.
    pub fn with_opamp<T>(
        &self,
        host: &str,
        f: impl FnOnce(&mut crate::state::OpampRecord) -> T,
    ) -> Option<T> {
        let mut live = self.inner.live.lock().ok()?;
        let rec = live.hosts.get_mut(host)?;
        let out = f(rec.opamp.get_or_insert_with(Default::default));
        live.dirty.insert(host.to_owned());
        Some(out)
    }

    /// Sets the source of the configuration each host should run, so
    /// reports can say whether it is applied.
    pub fn set_configs(
        &self,
        configs: tokio::sync::watch::Receiver<Arc<crate::opamp::store::ConfigSet>>,
    ) {
        if let Ok(mut c) = self.inner.configs.lock() {
            *c = Some(configs);
        }
    }

    fn opamp_view(&self, host: &str, o: &crate::state::OpampRecord) -> proto::OpampView {
        let desired = self
            .inner
            .configs
            .lock()
            .ok()
            .and_then(|c| {
                c.as_ref()
                    .map(|rx| rx.borrow().for_host(host).map(|d| d.hash_hex()))
            })
            .flatten();
        let (status, error) = crate::opamp::session::config_standing(Some(o), desired.as_deref());
        proto::OpampView {
            connected: o.connected,
            instance_uid: o.instance_uid.clone(),
            collector_name: o.collector_name.clone(),
            collector_version: o.collector_version.clone(),
            healthy: o.healthy.unwrap_or(false),
            last_error: o.last_error.clone(),
            remote_config_hash: desired.unwrap_or_default(),
            remote_config_status: status.to_owned(),
            remote_config_error: error,
        }
    }

    /// Flushes every `every` until the process ends.
    pub fn spawn_flusher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let m = me.clone();
                match tokio::task::spawn_blocking(move || m.flush()).await {
                    Ok(Err(e)) => tracing::error!(error = %e, "Cannot write host records"),
                    Err(e) => tracing::error!(error = %e, "Flush task failed"),
                    Ok(Ok(_)) => {}
                }
            }
        })
    }
}

fn upgrade_record(u: &proto::UpgradeOutcome) -> crate::state::UpgradeRecord {
    crate::state::UpgradeRecord {
        outcome: u.outcome.clone(),
        from: u.from_version.clone(),
        to: u.to_version.clone(),
        reason: bounded(&u.reason),
        at_unix_ms: u.at_unix_ms,
    }
}

#[tonic::async_trait]
impl proto::Fleet for FleetService {
    async fn server_info(
        &self,
        request: Request<proto::ServerInfoRequest>,
    ) -> Result<Response<proto::ServerInfoResponse>, Status> {
        let (standing, detail) = match peer_leaf(&request) {
            None => (proto::Standing::Unspecified, String::new()),
            Some(leaf) => match self.admit(&leaf, Duration::ZERO).await {
                Ok(host) => match self.duplicate(host.as_str()) {
                    Some(words) => (proto::Standing::InUseElsewhere, words),
                    None => (
                        proto::Standing::Current,
                        format!("host {host}: the current certificate"),
                    ),
                },
                Err(r) => (r.standing, r.message),
            },
        };
        let c = &self.inner.config;
        Ok(Response::new(proto::ServerInfoResponse {
            server_version: c.version.to_string(),
            api_version: version::API_VERSION,
            skew_policy: Some(proto::SkewPolicy {
                minor_versions_behind: c.minor_versions_behind,
            }),
            runtime_pins: c.runtime_pins.clone(),
            server_time_unix_ms: now_unix_ms(),
            latest_agent_version: c.latest_agent.to_string(),
            client_standing: standing as i32,
            client_standing_detail: detail,
            archive_keys: c.archive_keys.clone(),
        }))
    }

    async fn enroll(
        &self,
        request: Request<proto::EnrollRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let req = request.into_inner();
        crate::text::check_enroll(&req)
            .map_err(|e| Status::invalid_argument(format!("enrolment request refused: {e}")))?;
        let token = Token::parse(&req.token, "the request")
            .map_err(|_| Status::unauthenticated("malformed enrolment token"))?;
        let agent: Version = req
            .agent_version
            .parse()
            .map_err(|e: version::VersionError| Status::invalid_argument(e.to_string()))?;
        let c = &self.inner.config;
        let verdict = version::skew(&agent, &c.version, c.minor_versions_behind);
        if matches!(verdict, SkewVerdict::Ahead | SkewVerdict::Incompatible) {
            return Err(Status::failed_precondition(
                verdict.explain(&agent, &c.version),
            ));
        }
        let spki =
            csr_spki_sha256(&req.csr_der).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.enroll(&token, &req, &spki))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))?
            .map(Response::new)
    }

    async fn report(
        &self,
        request: Request<proto::ReportRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        let leaf = peer_leaf(&request).ok_or_else(no_certificate)?;
        let host = self
            .admit(&leaf, Duration::ZERO)
            .await
            .map_err(|r| r.status())?;
        let now = OffsetDateTime::now_utc();
        let req = request.into_inner();
        crate::text::check_report(&req)
            .map_err(|e| Status::invalid_argument(format!("report refused: {e}")))?;
        if !req.host_id.is_empty() && req.host_id != host.as_str() {
            tracing::warn!(cert_host = %host, claimed = %crate::text::safe(&req.host_id), "Report claiming another host refused");
            return Err(Status::permission_denied(format!(
                "the report claims host {} but the client certificate is for host {host}",
                req.host_id
            )));
        }
        let c = &self.inner.config;
        let mut send_full = false;
        let window_ms = i64::try_from(c.report_interval.as_millis() * 10)
            .unwrap_or(i64::MAX)
            .max(10_000);
        let (agent_version, opamp, duplicate) = {
            let Ok(mut live) = self.inner.live.lock() else {
                return Err(Status::internal("host table poisoned"));
            };
            let Some(rec) = live.hosts.get_mut(host.as_str()) else {
                return Err(Status::not_found(format!(
                    "host {host} is not enrolled with this server: re-enrol with a new token (enroll --force)"
                )));
            };
            let now_s = now.unix_timestamp();
            rec.last_seen = now_s;
            let evidence = live_runs_observe(&mut live, host.as_str(), req.run_id, now, window_ms);
            let Some(rec) = live.hosts.get_mut(host.as_str()) else {
                return Err(Status::internal("host table changed"));
            };
            match evidence {
                Some(e) => {
                    let run_ids: Vec<String> =
                        e.run_ids.iter().map(|r| format!("{r:016x}")).collect();
                    let d = rec.duplicate.get_or_insert_with(|| {
                        tracing::warn!(host_id = %host, run_ids = ?run_ids, "One identity reported by two machines at once: flagged duplicate_identity");
                        crate::state::DuplicateRecord {
                            since: now_s,
                            ..Default::default()
                        }
                    });
                    d.last_seen = now_s;
                    d.run_ids = run_ids;
                }
                None => {
                    let clear_after = i64::try_from(
                        c.report_interval.as_secs() * u64::from(DUPLICATE_CLEARS_AFTER),
                    )
                    .unwrap_or(i64::MAX);
                    if rec
                        .duplicate
                        .as_ref()
                        .is_some_and(|d| now_s.saturating_sub(d.last_seen) > clear_after)
                    {
                        tracing::info!(host_id = %host, "One machine per identity again: duplicate_identity cleared");
                        rec.duplicate = None;
                    }
                }
            }
            let report = rec.report.get_or_insert_with(Default::default);
            report.reports += 1;
            if req.full {
                let rt = req.runtime.clone().unwrap_or_default();
                let hostname = req
                    .host
                    .as_ref()
                    .map(|h| h.hostname.clone())
                    .unwrap_or_default();
                let reports = report.reports;
                *report = crate::state::ReportRecord {
                    agent_version: req.agent_version.clone(),
                    git_revision: req.git_revision.clone(),
                    install_method: req.install_method.clone(),
                    runtime_kind: rt.kind,
                    runtime_version: rt.version,
                    supervisor_version: rt.supervisor_version,
                    runtime_state: rt.state,
                    restarts: rt.restarts,
                    last_exit: rt.last_exit,
                    collector_crashes: rt.collector_crashes,
                    runtime_error: rt.error,
                    running_version: rt.running_version,
                    restart_pending: rt.restart_pending,
                    hostname,
                    agent_skew_verdict: req.skew_verdict.clone(),
                    clock_offset_ms: req.clock_offset_ms,
                    state_digest: req.state_digest,
                    full_report_at: now_s,
                    reports,
                    heartbeats_since_full: 0,
                    collector_problem: rt.collector_problem.map(|p| {
                        crate::state::CollectorProblemRecord {
                            reason: bounded(&p.reason),
                            at_unix_ms: p.at_unix_ms,
                            log_tail: p
                                .log_tail
                                .iter()
                                .take(MAX_TAIL_LINES)
                                .map(|l| bounded(l))
                                .collect(),
                        }
                    }),
                    last_upgrade: req.last_upgrade.as_ref().map(upgrade_record),
                    last_runtime_upgrade: req.last_runtime_upgrade.as_ref().map(upgrade_record),
                };
                if !report.hostname.is_empty() {
                    rec.hostname = report.hostname.clone();
                }
                rec.agent_version = req.agent_version.clone();
            } else {
                report.heartbeats_since_full += 1;
                report.clock_offset_ms = req.clock_offset_ms;
                send_full = report.state_digest != req.state_digest || report.full_report_at == 0;
            }
            let v = (
                rec.agent_version.clone(),
                rec.opamp.clone(),
                rec.duplicate
                    .as_ref()
                    .map(|d| in_use_elsewhere(host.as_str(), d)),
            );
            live.dirty.insert(host.to_string());
            v
        };
        let opamp = opamp.map(|o| self.opamp_view(host.as_str(), &o));
        let verdict = agent_version
            .parse::<Version>()
            .map(|a| {
                version::skew(&a, &c.version, c.minor_versions_behind)
                    .as_str()
                    .to_owned()
            })
            .unwrap_or_default();
        Ok(Response::new(proto::ReportResponse {
            server_version: c.version.to_string(),
            skew_policy: Some(proto::SkewPolicy {
                minor_versions_behind: c.minor_versions_behind,
            }),
            runtime_pins: c.runtime_pins.clone(),
            report_interval_seconds: u32::try_from(c.report_interval.as_secs())
                .unwrap_or(30)
                .max(1),
            server_time_unix_ms: now_unix_ms(),
            skew_verdict: verdict,
            send_full_report: send_full,
            opamp,
            identity_in_use_elsewhere: duplicate.unwrap_or_default(),
        }))
    }

    async fn rekey(
        &self,
        request: Request<proto::RekeyRequest>,
    ) -> Result<Response<proto::EnrollResponse>, Status> {
        let leaf = peer_leaf(&request).ok_or_else(no_certificate)?;
        // The copied certificate must be the original's current one: a
        // revoked or superseded copy gets nothing.
        let original = self
            .admit(&leaf, Duration::ZERO)
            .await
            .map_err(|r| r.status())?;
        let req = request.into_inner();
        crate::text::check_enroll(&proto::EnrollRequest {
            host: req.host.clone(),
            agent_version: req.agent_version.clone(),
            ..Default::default()
        })
        .map_err(|e| Status::invalid_argument(format!("re-key request refused: {e}")))?;
        let spki =
            csr_spki_sha256(&req.csr_der).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.rekey(&original, &req, &spki))
            .await
            .map_err(|e| Status::internal(format!("re-key task failed: {e}")))?
            .map(Response::new)
    }

    async fn renew(
        &self,
        request: Request<proto::RenewRequest>,
    ) -> Result<Response<proto::RenewResponse>, Status> {
        let leaf = peer_leaf(&request).ok_or_else(no_certificate)?;
        // Only the current certificate renews (or the renewed one, which
        // becomes current): never a superseded one, even within the grace.
        let host = self
            .admit(&leaf, self.inner.config.renew_grace)
            .await
            .map_err(|r| r.status())?;
        let req = request.into_inner();
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.renew(&host, &req.csr_der))
            .await
            .map_err(|e| Status::internal(format!("renewal task failed: {e}")))?
            .map(Response::new)
    }
}

fn live_runs_observe(
    live: &mut Live,
    host: &str,
    run_id: u64,
    now: OffsetDateTime,
    window_ms: i64,
) -> Option<crate::duplicate::Evidence> {
    let now_ms = (now.unix_timestamp_nanos() / 1_000_000) as i64;
    live.runs
        .entry(host.to_owned())
        .or_default()
        .observe(run_id, now_ms, window_ms)
}

/// The verified client certificate of a request's connection (DER), if it
/// presented one.
fn peer_leaf<T>(request: &Request<T>) -> Option<Vec<u8>> {
    request
        .extensions()
        .get::<crate::peer::PeerInfo>()
        .and_then(|p| p.certs.clone())
        .and_then(|c| c.first().map(|l| l.to_vec()))
}

fn no_certificate() -> Status {
    Status::unauthenticated("a client certificate is required: enrol this host first")
}

impl Inner {
    /// Writes `host`'s live record now.
    fn store_host(&self, host: &str) -> Result<(), String> {
        let lock = self.state.lock().map_err(|e| e.to_string())?;
        let rec = {
            let live = self
                .live
                .lock()
                .map_err(|_| "host table poisoned".to_owned())?;
            live.hosts.get(host).cloned()
        };
        match rec {
            Some(r) => self.state.put_host(&lock, &r).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// The answer to an enrolment or a re-key that issued `cert` at `now`.
    fn issued(
        &self,
        host_id: String,
        cert: &crate::ca::HostCert,
        now: i64,
    ) -> proto::EnrollResponse {
        let lifetime = self.config.cert_lifetime.as_secs() as i64;
        proto::EnrollResponse {
            host_id,
            certificate_chain_der: vec![cert.der.to_vec()],
            ca_certificate_der: self.ca.cert().to_vec(),
            server_version: self.config.version.to_string(),
            renew_after_unix: now + lifetime * 2 / 3,
            server_time_unix_ms: now_unix_ms(),
        }
    }

    /// Issues a clone of `original` its own identity (see the Rekey RPC).
    fn rekey(
        &self,
        original: &HostId,
        req: &proto::RekeyRequest,
        spki: &str,
    ) -> Result<proto::EnrollResponse, Status> {
        let internal = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "Re-key failed");
            Status::internal("the server could not record the re-key; see its log")
        };
        let refusal = |standing: proto::Standing, code: tonic::Code, message: String| {
            Refused { standing, message }.status_with(code)
        };
        let facts = req.host.clone().unwrap_or_default();
        let lock = self.state.lock().map_err(|e| internal(&e))?;
        let (record, retry) = {
            let live = self
                .live
                .lock()
                .map_err(|_| Status::internal("host table poisoned"))?;
            let rec = live
                .hosts
                .get(original.as_str())
                .cloned()
                .ok_or_else(|| Status::not_found(format!("host {original} is not enrolled")))?;
            let retry = live
                .hosts
                .values()
                .find(|h| {
                    h.cloned_from.as_deref() == Some(original.as_str()) && h.spki_sha256 == spki
                })
                .map(|h| h.host_id.clone());
            (rec, retry)
        };
        let same_machine = !record.machine_id_hash.is_empty()
            && facts.machine_id_hash == record.machine_id_hash
            && (record.product_uuid_hash.is_empty()
                || facts.product_uuid_hash.is_empty()
                || facts.product_uuid_hash == record.product_uuid_hash);
        if same_machine && retry.is_none() {
            return Err(refusal(
                proto::Standing::NotAClone,
                tonic::Code::FailedPrecondition,
                format!(
                    "not a clone: this machine's fingerprint is the one host {original} enrolled with; it keeps its identity"
                ),
            ));
        }
        let host_id = match retry {
            Some(id) => id,
            None => {
                if self.config.clone_policy == ClonePolicy::Quarantine {
                    let id: String = spki.chars().take(16).collect();
                    let held = self.state.clone_request(&id).map_err(|e| internal(&e))?;
                    let approved = held.as_ref().is_some_and(|r| r.approved);
                    if !approved {
                        if held.is_none() {
                            self.state
                                .put_clone_request(
                                    &lock,
                                    &crate::state::CloneRequest {
                                        id: id.clone(),
                                        cloned_from: original.to_string(),
                                        spki_sha256: spki.to_owned(),
                                        hostname: facts.hostname.clone(),
                                        requested_at: OffsetDateTime::now_utc().unix_timestamp(),
                                        approved: false,
                                    },
                                )
                                .map_err(|e| internal(&e))?;
                            tracing::warn!(cloned_from = %original, request = %id, hostname = %crate::text::safe(&facts.hostname), "Clone held for approval (--clone-policy quarantine): linkmesh-fleet hosts approve {id}");
                        }
                        return Err(refusal(
                            proto::Standing::ClonePending,
                            tonic::Code::FailedPrecondition,
                            format!(
                                "this clone of host {original} awaits an operator's approval: on the server, linkmesh-fleet hosts approve {id} --state DIR"
                            ),
                        ));
                    }
                }
                new_host_id().map_err(|e| internal(&e))?
            }
        };
        let host = HostId::new(&host_id).map_err(|e| internal(&e))?;
        let cert = self
            .ca
            .sign_host(&req.csr_der, &host, self.config.cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let new = HostRecord {
            host_id: host_id.clone(),
            hostname: facts.hostname.clone(),
            os: facts.os_pretty_name.clone(),
            arch: facts.arch.clone(),
            machine_id_hash: facts.machine_id_hash.clone(),
            product_uuid_hash: facts.product_uuid_hash.clone(),
            duplicate: None,
            cloned_from: Some(original.to_string()),
            agent_version: req.agent_version.clone(),
            token_id: record.token_id.clone(),
            spki_sha256: cert.spki_sha256.clone(),
            cert_serial: cert.serial.clone(),
            cert_not_after: cert.not_after.unix_timestamp(),
            pending_cert: None,
            enrolled_at: now,
            last_seen: now,
            report: None,
            opamp: None,
        };
        self.state.put_host(&lock, &new).map_err(|e| internal(&e))?;
        if let Ok(mut live) = self.live.lock() {
            live.hosts.insert(host_id.clone(), new);
        }
        tracing::warn!(cloned_from = %original, host_id = %host_id, hostname = %crate::text::safe(&facts.hostname), "Clone re-keyed as a host of its own; the original keeps its identity");
        Ok(self.issued(host_id, &cert, now))
    }

    fn admit(&self, leaf: &[u8], grace: Duration) -> Result<(HostId, Admitted), Refused> {
        let cert = admission::presented(leaf)?;
        let revoked = self.revoked.borrow().get(cert.host.as_str()).cloned();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let grace = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
        let Ok(mut live) = self.live.lock() else {
            return Err(Refused {
                standing: proto::Standing::Unspecified,
                message: "host table poisoned".into(),
            });
        };
        let rec = live.hosts.get_mut(cert.host.as_str());
        let admitted = admission::judge(rec.as_deref(), revoked.as_ref(), &cert, now, grace)?;
        if admitted == Admitted::Renewed
            && let Some(rec) = rec
        {
            let old = rec.cert_serial.clone();
            admission::promote(rec);
            live.dirty.insert(cert.host.to_string());
            tracing::info!(host_id = %cert.host, cert_serial = %cert.serial, superseded = %old, "Host presented its renewed certificate; the previous one is refused from now on");
        }
        Ok((cert.host, admitted))
    }

    fn renew(&self, host: &HostId, csr_der: &[u8]) -> Result<proto::RenewResponse, Status> {
        let internal = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "Renewal failed");
            Status::internal("the server could not record the renewal; see its log")
        };
        let cert = self
            .ca
            .sign_host(csr_der, host, self.config.cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let lock = self.state.lock().map_err(|e| internal(&e))?;
        let record = {
            let Ok(mut live) = self.live.lock() else {
                return Err(Status::internal("host table poisoned"));
            };
            let Some(rec) = live.hosts.get_mut(host.as_str()) else {
                return Err(Status::not_found(format!(
                    "host {host} is not enrolled with this server"
                )));
            };
            // Current until the host presents the new one (see
            // crate::admission): a host that crashed before storing it
            // renews again with the current one.
            rec.pending_cert = Some(CertRef {
                spki_sha256: cert.spki_sha256.clone(),
                serial: cert.serial.clone(),
                not_after: cert.not_after.unix_timestamp(),
            });
            rec.last_seen = OffsetDateTime::now_utc().unix_timestamp();
            rec.clone()
        };
        self.state
            .put_host(&lock, &record)
            .map_err(|e| internal(&e))?;
        tracing::info!(host_id = %host, cert_serial = %cert.serial, not_after = %rfc3339(cert.not_after.unix_timestamp()), "Renewed host certificate");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let lifetime = self.config.cert_lifetime.as_secs() as i64;
        Ok(proto::RenewResponse {
            certificate_chain_der: vec![cert.der.to_vec()],
            ca_certificate_der: self.ca.cert().to_vec(),
            renew_after_unix: now + lifetime * 2 / 3,
            server_time_unix_ms: now_unix_ms(),
        })
    }

    /// Checks and spends the token, signs the certificate and records the
    /// host, all under the state lock. A retry with the same key and token
    /// (an agent killed after the server answered) gets the same host back
    /// without spending another use.
    fn enroll(
        &self,
        token: &Token,
        req: &proto::EnrollRequest,
        spki: &str,
    ) -> Result<proto::EnrollResponse, Status> {
        let internal = |e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "Enrolment failed");
            Status::internal("the server could not record the enrolment; see its log")
        };
        let lock = self.state.lock().map_err(|e| internal(&e))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let refused = |why: &str| {
            if let Some(suppressed) = self.refusals.lock().ok().and_then(|mut e| e.allow()) {
                tracing::warn!(
                    token_id = token.id(),
                    suppressed,
                    "Enrolment refused: {why}"
                );
            }
        };
        let unknown = || {
            refused("unknown token");
            Status::unauthenticated(
                "token not recognised by this server: check it, or create one with `linkmesh-fleet token create`",
            )
        };
        let mut record = self
            .state
            .token(token.id())
            .map_err(|e| internal(&e))?
            .ok_or_else(unknown)?;
        if !hashes_equal(&record.secret_sha256, &token.secret_hash()) {
            return Err(unknown());
        }
        if now >= record.expires_at {
            refused("expired token");
            return Err(Status::unauthenticated(format!(
                "token expired at {}: create a new one with `linkmesh-fleet token create`",
                rfc3339(record.expires_at)
            )));
        }
        let retry = record
            .uses
            .iter()
            .find(|u| u.spki_sha256 == spki)
            .map(|u| u.host_id.clone());
        let host_id = match retry {
            Some(id) if self.revoked.borrow().contains_key(&id) => {
                refused("key of a revoked host");
                return Err(Status::permission_denied(format!(
                    "host {id}, enrolled with this key, was revoked: enrol with a new key and a new token (linkmesh-agent enroll --force)"
                )));
            }
            Some(id) => id,
            None => {
                if record.uses.len() >= record.max_uses as usize {
                    refused("token used up");
                    return Err(Status::permission_denied(format!(
                        "token already used {} of {} time{}: create a new one with `linkmesh-fleet token create`",
                        record.uses.len(),
                        record.max_uses,
                        if record.max_uses == 1 { "" } else { "s" }
                    )));
                }
                let id = new_host_id().map_err(|e| internal(&e))?;
                record.uses.push(TokenUse {
                    spki_sha256: spki.to_owned(),
                    host_id: id.clone(),
                    at: now,
                });
                // The use is recorded before the host: a crash in between is
                // healed by the agent's retry with the same key.
                self.state
                    .put_token(&lock, &record)
                    .map_err(|e| internal(&e))?;
                id
            }
        };
        let host = HostId::new(&host_id).map_err(|e| internal(&e))?;
        let cert = self
            .ca
            .sign_host(&req.csr_der, &host, self.config.cert_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let facts = req.host.clone().unwrap_or_default();
        let previous = self.state.host(&host_id).map_err(|e| internal(&e))?;
        let record = HostRecord {
            host_id: host_id.clone(),
            hostname: facts.hostname,
            os: facts.os_pretty_name,
            arch: facts.arch,
            machine_id_hash: facts.machine_id_hash,
            product_uuid_hash: facts.product_uuid_hash,
            duplicate: None,
            cloned_from: previous.as_ref().and_then(|p| p.cloned_from.clone()),
            agent_version: req.agent_version.clone(),
            token_id: token.id().to_owned(),
            spki_sha256: cert.spki_sha256.clone(),
            cert_serial: cert.serial.clone(),
            cert_not_after: cert.not_after.unix_timestamp(),
            pending_cert: None,
            enrolled_at: previous.as_ref().map_or(now, |p| p.enrolled_at),
            last_seen: now,
            report: previous.as_ref().and_then(|p| p.report.clone()),
            opamp: previous.as_ref().and_then(|p| p.opamp.clone()),
        };
        self.state
            .put_host(&lock, &record)
            .map_err(|e| internal(&e))?;
        if let Ok(mut live) = self.live.lock() {
            live.hosts.insert(host_id.clone(), record.clone());
        }
        tracing::info!(
            host_id = %host_id,
            hostname = %crate::text::safe(&record.hostname),
            token_id = token.id(),
            retry = previous.is_some(),
            "Enrolled host"
        );
        Ok(self.issued(host_id, &cert, now))
    }
}

fn new_host_id() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40; // UUID version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    Ok(linkmesh_agent::clock::uuid_string(&b))
}

fn now_unix_ms() -> i64 {
    i64::try_from(linkmesh_agent::clock::now_unix_ms()).unwrap_or(i64::MAX)
}

/// Unix seconds as RFC 3339.
pub fn rfc3339(unix: i64) -> String {
    linkmesh_agent::clock::rfc3339_unix_s(unix).unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_ids_are_uuid_v4() {
        let id = super::new_host_id().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(linkmesh_agent::identity::HostId::new(&id).is_ok());
        assert_ne!(id, super::new_host_id().unwrap());
    }
}
