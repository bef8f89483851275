//! The fleet server's persistent state: plain JSON files written atomically
//! (temp, fsync, rename, fsync dir), mutations serialised by an flock so the
//! operator commands can run beside `serve` on the same directory.
//!
//! ```text
//! STATE/ca/{ca.key,ca.pem}   the CA
//! STATE/server.json          the URL `serve` advertises (for `token create`)
//! STATE/tokens/<id>.json     enrolment tokens: only the secret's hash is kept
//! STATE/hosts/<id>.json      enrolled hosts
//! STATE/revoked/<id>.json    revoked hosts (`hosts revoke`), apart from the
//!                            host records so `serve`'s write-back of a
//!                            record can never undo a revocation
//! STATE/lock                 flock for read-modify-write
//! ```

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use linkmesh_agent::fs::{ensure_private_dir, write_atomic};
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Failures of the state store, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct StateError {
    path: String,
    reason: String,
}

impl StateError {
    fn new(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self {
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// An enrolment token as the server keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// How many enrolments it allows.
    pub max_uses: u32,
    /// Enrolments done with it.
    pub uses: Vec<TokenUse>,
}

/// One enrolment done with a token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenUse {
    /// The enrolled key, so a retry with the same key is recognised.
    pub spki_sha256: String,
    /// The host it made.
    pub host_id: String,
    /// Unix seconds.
    pub at: i64,
}

/// An enrolled host.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    /// Server-assigned id.
    pub host_id: String,
    /// Host name at enrolment.
    pub hostname: String,
    /// os-release PRETTY_NAME.
    pub os: String,
    /// Architecture.
    pub arch: String,
    /// App-specific machine-id hash.
    pub machine_id_hash: String,
    /// App-specific hash of the DMI product UUID (empty where unreadable).
    #[serde(default)]
    pub product_uuid_hash: String,
    /// Set while two machines present this host's identity at once.
    #[serde(default)]
    pub duplicate: Option<DuplicateRecord>,
    /// The host this one is a clone of (it re-keyed with that host's
    /// copied certificate).
    #[serde(default)]
    pub cloned_from: Option<String>,
    /// Agent version at enrolment.
    pub agent_version: String,
    /// Token used.
    pub token_id: String,
    /// Current key.
    pub spki_sha256: String,
    /// Current certificate serial, hex.
    pub cert_serial: String,
    /// Current certificate expiry, Unix seconds.
    pub cert_not_after: i64,
    /// The certificate the last renewal issued, until the host first
    /// presents it: then it becomes the current one and the old one is
    /// refused. Until then the current one stays admitted, so a host that
    /// crashed before storing the renewed certificate renews again.
    #[serde(default)]
    pub pending_cert: Option<CertRef>,
    /// Unix seconds.
    pub enrolled_at: i64,
    /// Unix seconds of the last contact.
    pub last_seen: i64,
    /// What the last full report said (absent until the first report).
    #[serde(default)]
    pub report: Option<ReportRecord>,
    /// What the host's collector last said over OpAMP (absent until its
    /// supervisor first connects).
    #[serde(default)]
    pub opamp: Option<OpampRecord>,
}

/// One certificate of a host, as the server tells it from the others.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertRef {
    /// SHA-256 of its SubjectPublicKeyInfo, hex.
    pub spki_sha256: String,
    /// Its serial, hex.
    pub serial: String,
    /// Its expiry, Unix seconds.
    pub not_after: i64,
}

/// One identity seen on two machines at once (see [`crate::duplicate`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DuplicateRecord {
    /// When first seen, Unix seconds.
    pub since: i64,
    /// When last seen, Unix seconds.
    pub last_seen: i64,
    /// The alternating run ids, hex.
    pub run_ids: Vec<String>,
}

/// A clone's request for an identity of its own, held for an operator
/// under `--clone-policy quarantine`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CloneRequest {
    /// What `hosts approve` takes: the first 16 hex digits of the key's hash.
    pub id: String,
    /// The host whose certificate it presented.
    pub cloned_from: String,
    /// SHA-256 of the clone's new key, hex.
    pub spki_sha256: String,
    /// The clone's host name.
    pub hostname: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// Approved by the operator.
    pub approved: bool,
}

/// A revoked host.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The host.
    pub host_id: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// Why, in the operator's words (may be empty).
    #[serde(default)]
    pub reason: String,
}

/// A collector as its supervisor describes it over OpAMP.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct OpampRecord {
    /// Whether a supervisor of this host is connected now.
    pub connected: bool,
    /// The collector's OpAMP instance uid.
    pub instance_uid: String,
    /// `service.name` from the agent description (the distribution).
    pub collector_name: String,
    /// `service.version` from the agent description: the running version.
    pub collector_version: String,
    /// Health as last reported.
    pub healthy: Option<bool>,
    /// Why it is unhealthy (the supervisor's words, with the collector's
    /// log tail when it crashed).
    pub last_error: String,
    /// When the collector started, Unix ns (0 when not running).
    pub started_at_unix_nano: u64,
    /// SHA-256 of the effective configuration.
    pub effective_config_hash: String,
    /// Hash of the remote configuration the agent last reported on.
    pub reported_config_hash: String,
    /// Its status: applied, applying, failed or unset.
    pub reported_config_status: String,
    /// Why it failed.
    pub reported_config_error: String,
    /// Sequence number of the last message.
    pub sequence_num: u64,
    /// Unix seconds of the last message.
    pub last_message_at: i64,
    /// Unix seconds of the last connect.
    pub connected_at: i64,
}

/// What an agent last reported.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReportRecord {
    /// Agent version.
    pub agent_version: String,
    /// Agent git revision.
    pub git_revision: String,
    /// deb, rpm, script or binary.
    pub install_method: String,
    /// otelcol, alloy or none.
    pub runtime_kind: String,
    /// Runtime (collector or Alloy) version.
    pub runtime_version: String,
    /// opampsupervisor version.
    pub supervisor_version: String,
    /// Supervision state.
    pub runtime_state: String,
    /// Supervisor restarts.
    pub restarts: u32,
    /// Last exit of the supervisor.
    pub last_exit: String,
    /// Collector crashes seen by the supervisor.
    pub collector_crashes: u32,
    /// Why the runtime is not running.
    pub runtime_error: String,
    /// Alloy's running version.
    pub running_version: String,
    /// Alloy upgraded but not restarted.
    pub restart_pending: bool,
    /// Host name now.
    pub hostname: String,
    /// The agent's own skew verdict.
    pub agent_skew_verdict: String,
    /// Host clock minus server clock, ms.
    pub clock_offset_ms: i64,
    /// Digest of the full report.
    pub state_digest: u64,
    /// Unix seconds of the last full report.
    pub full_report_at: i64,
    /// Reports received (full and heartbeats).
    pub reports: u64,
    /// Heartbeats since the last full report.
    #[serde(default)]
    pub heartbeats_since_full: u64,
    /// The collector's last crash or rejected configuration, as the agent
    /// reported it.
    #[serde(default)]
    pub collector_problem: Option<CollectorProblemRecord>,
    /// How the host's last agent upgrade ended (its probation).
    #[serde(default)]
    pub last_upgrade: Option<UpgradeRecord>,
    /// How the host's last collector runtime upgrade ended.
    #[serde(default)]
    pub last_runtime_upgrade: Option<UpgradeRecord>,
}

/// An agent upgrade's outcome, as the agent reported it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpgradeRecord {
    /// confirmed, rolled_back, rollback_failed, not_rolled_back.
    pub outcome: String,
    /// For a rollback: the version that failed.
    pub from: String,
    /// For a rollback: the version put back.
    pub to: String,
    /// Why.
    pub reason: String,
    /// When it was decided, Unix ms.
    pub at_unix_ms: i64,
}

/// A collector problem as reported by the agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CollectorProblemRecord {
    /// What happened.
    pub reason: String,
    /// When, Unix ms.
    pub at_unix_ms: i64,
    /// The collector's last output lines (bounded and escaped by the agent;
    /// bounded again here).
    pub log_tail: Vec<String>,
}

/// Where the server is reachable, written by `serve`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServeRecord {
    /// The URL agents use.
    pub url: String,
    /// The version the server reports.
    #[serde(default)]
    pub version: String,
    /// The report interval agents are told.
    #[serde(default)]
    pub report_interval_secs: u64,
    /// The skew window (the agent's default when an older record has none).
    #[serde(default = "default_window")]
    pub minor_versions_behind: u32,
    /// Runtime pins: kind -> version.
    #[serde(default)]
    pub runtime_pins: std::collections::BTreeMap<String, String>,
}

/// The lock `serve` holds while it runs.
pub const SERVING_LOCK: &str = "serving.lock";

/// The state directory.
#[derive(Clone, Debug)]
pub struct State {
    dir: PathBuf,
}

/// Proof that the state lock is held.
pub struct StateLock {
    _lock: Flock<File>,
}

impl State {
    /// The state in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Creates the directory layout.
    ///
    /// # Errors
    /// When directories cannot be created.
    pub fn create_layout(&self) -> Result<(), StateError> {
        for d in [
            self.dir.clone(),
            self.dir.join("tokens"),
            self.dir.join("hosts"),
            self.dir.join("revoked"),
        ] {
            ensure_private_dir(&d, 0o700).map_err(|e| StateError::new(&d, e))?;
        }
        Ok(())
    }

    /// Takes the exclusive lock, waiting for another holder.
    ///
    /// # Errors
    /// When the lock file cannot be opened or locked.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let path = self.dir.join("lock");
        let lock = linkmesh_agent::fs::lock_file(&path, true).map_err(|e| {
            StateError::new(
                &path,
                format!("{e} (is this a state directory made by `linkmesh-fleet init`?)"),
            )
        })?;
        Ok(StateLock { _lock: lock })
    }

    /// Marks the state as served by this process until the returned lock is
    /// dropped (`serving.lock`): a second `serve`, and `restore`, see it.
    /// `None` when another process holds it.
    ///
    /// # Errors
    /// When the lock file cannot be opened.
    pub fn serving(&self) -> Result<Option<StateLock>, StateError> {
        let path = self.dir.join(SERVING_LOCK);
        Ok(linkmesh_agent::fs::try_lock_exclusive(&path)
            .map_err(|e| StateError::new(&path, e))?
            .map(|l| StateLock { _lock: l }))
    }

    /// A token by id.
    ///
    /// # Errors
    /// When its file exists but cannot be read.
    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StateError> {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        read_json(&self.dir.join("tokens").join(format!("{id}.json")))
    }

    /// Stores a token.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn put_token(&self, _lock: &StateLock, t: &TokenRecord) -> Result<(), StateError> {
        write_json(&self.dir.join("tokens").join(format!("{}.json", t.id)), t)
    }

    /// A host by id.
    ///
    /// # Errors
    /// When its file exists but cannot be read.
    pub fn host(&self, id: &str) -> Result<Option<HostRecord>, StateError> {
        read_json(&self.dir.join("hosts").join(format!("{id}.json")))
    }

    /// Stores a host.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn put_host(&self, _lock: &StateLock, h: &HostRecord) -> Result<(), StateError> {
        write_json(
            &self.dir.join("hosts").join(format!("{}.json", h.host_id)),
            h,
        )
    }

    /// Every host, ordered by enrolment time.
    ///
    /// # Errors
    /// When the directory or a file cannot be read.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StateError> {
        let dir = self.dir.join("hosts");
        let mut hosts = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| StateError::new(&dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| StateError::new(&dir, e))?.path();
            if path.extension().is_some_and(|x| x == "json")
                && let Some(h) = read_json::<HostRecord>(&path)?
            {
                hosts.push(h);
            }
        }
        hosts.sort_by(|a, b| (a.enrolled_at, &a.host_id).cmp(&(b.enrolled_at, &b.host_id)));
        Ok(hosts)
    }

    /// Revokes a host: kept across restarts, refused by a running `serve`
    /// within its revocation poll (200 ms). Revoking again keeps the first
    /// record.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn revoke(
        &self,
        _lock: &StateLock,
        r: &RevocationRecord,
    ) -> Result<RevocationRecord, StateError> {
        let dir = self.revoked_dir();
        ensure_private_dir(&dir, 0o700).map_err(|e| StateError::new(&dir, e))?;
        let path = dir.join(format!("{}.json", r.host_id));
        if let Some(first) = read_json::<RevocationRecord>(&path)? {
            return Ok(first);
        }
        write_json(&path, r)?;
        Ok(r.clone())
    }

    /// Every revoked host by id (none when the directory is missing, as in
    /// a state made before revocation existed).
    ///
    /// # Errors
    /// When the directory or a file cannot be read.
    pub fn revocations(
        &self,
    ) -> Result<std::collections::HashMap<String, RevocationRecord>, StateError> {
        let dir = self.revoked_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Default::default()),
            Err(e) => return Err(StateError::new(&dir, e)),
        };
        let mut out = std::collections::HashMap::new();
        for entry in entries {
            let path = entry.map_err(|e| StateError::new(&dir, e))?.path();
            if path.extension().is_some_and(|x| x == "json")
                && let Some(r) = read_json::<RevocationRecord>(&path)?
            {
                out.insert(r.host_id.clone(), r);
            }
        }
        Ok(out)
    }

    /// A held clone request by id.
    ///
    /// # Errors
    /// When its file exists but cannot be read.
    pub fn clone_request(&self, id: &str) -> Result<Option<CloneRequest>, StateError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        read_json(&self.dir.join("clones").join(format!("{id}.json")))
    }

    /// Stores a clone request.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn put_clone_request(&self, _lock: &StateLock, r: &CloneRequest) -> Result<(), StateError> {
        let dir = self.dir.join("clones");
        ensure_private_dir(&dir, 0o700).map_err(|e| StateError::new(&dir, e))?;
        write_json(&dir.join(format!("{}.json", r.id)), r)
    }

    /// Every held clone request, oldest first.
    ///
    /// # Errors
    /// When the directory or a file cannot be read.
    pub fn clone_requests(&self) -> Result<Vec<CloneRequest>, StateError> {
        let dir = self.dir.join("clones");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StateError::new(&dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| StateError::new(&dir, e))?.path();
            if path.extension().is_some_and(|x| x == "json")
                && let Some(r) = read_json::<CloneRequest>(&path)?
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        Ok(out)
    }

    /// Changes whenever a revocation is added: the directory's modification
    /// time and entry count (cheap enough to poll).
    pub fn revocations_signature(&self) -> Option<(std::time::SystemTime, usize)> {
        let dir = self.revoked_dir();
        let modified = std::fs::metadata(&dir).ok()?.modified().ok()?;
        Some((modified, std::fs::read_dir(&dir).ok()?.count()))
    }

    fn revoked_dir(&self) -> PathBuf {
        self.dir.join("revoked")
    }

    /// Records where `serve` listens.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn put_serve(&self, r: &ServeRecord) -> Result<(), StateError> {
        write_json(&self.dir.join("server.json"), r)
    }

    /// The directory of collector configurations (`fleet.yaml`, `hosts/ID.yaml`).
    pub fn collector_config_dir(&self) -> PathBuf {
        self.dir.join("collector-config")
    }

    /// Where `serve` last said it listens.
    ///
    /// # Errors
    /// When the file exists but cannot be read.
    pub fn serve(&self) -> Result<Option<ServeRecord>, StateError> {
        read_json(&self.dir.join("server.json"))
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StateError::new(path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::new(path, e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::new(path, e))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o600).map_err(|e| StateError::new(path, e))
}

fn default_window() -> u32 {
    linkmesh_agent::version::DEFAULT_MINOR_VERSIONS_BEHIND
}
