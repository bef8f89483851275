//! `linkmesh-agent check`: pre-flight and health checks in the manner of
//! `linkerd check`. Each check is a line with a tick or a cross and, for a
//! failure, a hint; warnings do not fail the run. The checks are built from
//! gathered facts by pure functions; gathering is the only I/O.

use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    config::{self, ConfigPaths, RuntimeKind, Settings},
    identity::{Identity, IdentityStore, rotation},
    proto,
    runtime::{self, Detection, probe::HostProbes},
    tls::mtls_client_config,
    transport::{Dialer, proxy_for},
    version::{self, SkewVerdict, Version},
};

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Fine.
    Ok,
    /// Worth attention; does not fail the run.
    Warn,
    /// Broken.
    Fail,
    /// Not run because something it depends on failed.
    Skipped,
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// Stable id, for automation.
    pub id: &'static str,
    /// What is checked, for people.
    pub title: &'static str,
    /// The outcome.
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// What to do about a warning or failure.
    pub hint: Option<String>,
}

fn ok(id: &'static str, title: &'static str, detail: impl Into<String>) -> Check {
    Check {
        id,
        title,
        outcome: Outcome::Ok,
        detail: detail.into(),
        hint: None,
    }
}

fn bad(
    id: &'static str,
    title: &'static str,
    outcome: Outcome,
    detail: impl Into<String>,
    hint: impl Into<String>,
) -> Check {
    Check {
        id,
        title,
        outcome,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

/// What the server said, from a live exchange.
#[derive(Clone, Debug)]
pub struct ServerView {
    /// ServerInfo's answer.
    pub info: proto::ServerInfoResponse,
    /// Host clock minus server clock, ms.
    pub clock_offset_ms: i64,
}

pub mod archive;
pub mod pre_upgrade;

/// The configuration, as a check; `None` when it does not load.
fn settings_check(paths: &ConfigPaths, checks: &mut Vec<Check>) -> Option<Settings> {
    match config::load(paths, |k| std::env::var(k).ok()) {
        Ok(s) => {
            checks.push(ok(
                "config",
                "configuration is valid",
                format!("{} file(s) read", s.sources.len()),
            ));
            Some(s)
        }
        Err(e) => {
            checks.push(bad(
                "config",
                "configuration is valid",
                Outcome::Fail,
                e.to_string(),
                "fix the keys named above; `linkmesh-agent config check` re-validates",
            ));
            None
        }
    }
}

/// The host identity, as a check; `None` when there is none or it does
/// not read.
fn identity_check(store: &IdentityStore, checks: &mut Vec<Check>) -> Option<Identity> {
    match store
        .lock_shared()
        .and_then(|l| l.map(|l| store.load(&l)).transpose())
    {
        Ok(Some(Some(id))) => {
            checks.push(ok(
                "identity",
                "host identity is present and consistent",
                format!("host {} enrolled with {}", id.host_id, id.server),
            ));
            Some(id)
        }
        Ok(_) => {
            checks.push(bad("identity", "host identity is present and consistent", Outcome::Fail, format!("not enrolled (no identity in {})", store.state_dir().display()), "enrol: echo $TOKEN | linkmesh-agent enroll --server URL --ca-pin sha256:HEX --token-file /dev/stdin"));
            None
        }
        Err(e) => {
            checks.push(bad(
                "identity",
                "host identity is present and consistent",
                Outcome::Fail,
                e.to_string(),
                "see the file named above",
            ));
            None
        }
    }
}

/// Runs every check.
pub fn run(paths: &ConfigPaths) -> Vec<Check> {
    let mut checks = Vec::new();
    let Some(settings) = settings_check(paths, &mut checks) else {
        return checks;
    };
    checks.push(state_dir_check(
        &settings.state_dir,
        nix::unistd::geteuid().as_raw(),
    ));
    let store = IdentityStore::new(&settings.state_dir);
    let identity = identity_check(&store, &mut checks);
    let key_path = store.identity_dir().join(crate::identity::store::KEY_FILE);
    // Loading the identity already refuses a key readable by others and a
    // pin that does not match the stored CA; what it does not look at is
    // who owns the key.
    if identity.is_some() {
        use std::os::unix::fs::MetadataExt as _;
        checks.push(match std::fs::metadata(&key_path) {
            Ok(m) => key_owner_check(
                &key_path,
                m.mode(),
                m.uid(),
                nix::unistd::geteuid().as_raw(),
            ),
            Err(e) => bad(
                "key_permissions",
                KEY_TITLE,
                Outcome::Fail,
                format!("{}: {e}", key_path.display()),
                "re-enrol with --force if the identity is gone",
            ),
        });
    }
    // What the running agent published, read once for every check below.
    let published = crate::published::read(&settings.state_dir);
    if let Some(id) = &identity {
        checks.push(certificate_check(
            id,
            time::OffsetDateTime::now_utc(),
            published.as_ref().is_some_and(|s| s.agent_running),
        ));
        checks.push(machine_check(
            id.host_id.as_str(),
            &crate::fingerprint::check(
                &settings.state_dir,
                id.host_id.as_str(),
                &crate::fingerprint::Machine::now(),
            ),
            published
                .as_ref()
                .filter(|s| s.agent_running)
                .and_then(|s| s.state.reporter.clone_pending.as_deref()),
        ));
    }
    let detection = runtime::detect(
        &settings.runtime,
        &HostProbes {
            state_dir: settings.state_dir.clone(),
        },
    );
    let server = identity.as_ref().map(|id| contact(id, &settings));
    match (&identity, &server) {
        (Some(id), Some(Ok(view))) => {
            let proxy = proxy_for(id.server.host(), settings.proxy_url.as_deref(), |k| {
                std::env::var(k).ok()
            });
            checks.push(ok(
                "server",
                "server is reachable and its TLS identity verifies",
                match &proxy {
                    Some(p) => format!(
                        "{} via HTTP proxy {} ({})",
                        id.server, p.authority, p.source
                    ),
                    None => format!("{} (no proxy)", id.server),
                },
            ));
            checks.push(standing_check(
                Some(&view.info),
                crate::reporter::read_revoked(&settings.state_dir, id.host_id.as_str()).as_ref(),
            ));
            checks.push(clock_check(view.clock_offset_ms));
            checks.push(version_check(
                &view.info,
                crate::upgrade::allow_ahead_from(
                    std::env::var(crate::upgrade::ALLOW_AHEAD_ENV)
                        .ok()
                        .as_deref(),
                ),
            ));
            checks.push(runtime_version_check(&detection, &view.info.runtime_pins));
            checks.push(archive::check(
                archive::host_keyring(Path::new("/")).as_ref(),
                view.info.archive_keys.as_ref(),
                time::OffsetDateTime::now_utc().unix_timestamp(),
                &id.server.to_string(),
            ));
        }
        (Some(id), Some(Err(e))) => {
            checks.push(bad("server", "server is reachable and its TLS identity verifies", Outcome::Fail, format!("{}: {e}", id.server), "check the network path, the proxy settings ([proxy] url, HTTPS_PROXY, NO_PROXY) and the server"));
            checks.push(standing_check(
                None,
                crate::reporter::read_revoked(&settings.state_dir, id.host_id.as_str()).as_ref(),
            ));
            for (cid, title) in [
                ("clock", "host clock agrees with the server's"),
                ("version", "agent version is within the server's window"),
                (
                    "runtime_version",
                    "runtime is installed at the pinned version",
                ),
                (archive::ID, archive::TITLE),
            ] {
                checks.push(Check {
                    id: cid,
                    title,
                    outcome: Outcome::Skipped,
                    detail: "server not reachable".into(),
                    hint: None,
                });
            }
        }
        _ => {}
    }
    checks.push(supervision_check(&detection, published.as_ref()));
    let view = published.and_then(|s| s.state.reporter.opamp);
    checks.push(opamp_check(detection.kind, view.as_ref()));
    checks.push(conflicts_check(&detection));
    checks.push(upgrade_check(
        crate::upgrade::watch::read_probation(&settings.state_dir)
            .ok()
            .flatten()
            .as_ref(),
        crate::upgrade::watch::read_outcome(&settings.state_dir)
            .ok()
            .flatten()
            .as_ref(),
    ));
    checks
}

/// The last agent upgrade: on probation, confirmed, or rolled back (a
/// warning: the host runs the previous version, which works; a rollback
/// that failed is a failure).
pub fn upgrade_check(
    open: Option<&crate::upgrade::probation::Probation>,
    last: Option<&crate::upgrade::probation::Outcome>,
) -> Check {
    const ID: &str = "upgrade";
    const TITLE: &str = "the last agent upgrade passed its probation";
    if let Some(p) = open {
        return ok(ID, TITLE, format!("{} -> {} is on probation", p.from, p.to));
    }
    match last {
        None => ok(ID, TITLE, "no upgrade watched on this host yet"),
        Some(o) if o.outcome == "confirmed" => {
            ok(ID, TITLE, format!("{} -> {}: {}", o.from, o.to, o.reason))
        }
        Some(o) => bad(
            ID,
            TITLE,
            if o.outcome == "rolled_back" {
                Outcome::Warn
            } else {
                Outcome::Fail
            },
            format!(
                "{} {} -> {} at {}: {}",
                o.outcome,
                o.from,
                o.to,
                crate::clock::rfc3339_unix_ms(o.at_unix_ms),
                o.reason
            ),
            if o.outcome == "rolled_back" {
                format!(
                    "{} runs again; fix or skip {} before upgrading (journalctl -u linkmesh-upgrade)",
                    o.to, o.from
                )
            } else {
                "the previous version could not be put back: journalctl -u linkmesh-upgrade; reinstall a working version with the one-liner".to_owned()
            },
        ),
    }
}

/// The collector as the server sees it over OpAMP (from the agent's last
/// report): connected, and its remote configuration applied.
pub fn opamp_check(kind: RuntimeKind, view: Option<&crate::reporter::OpampView>) -> Check {
    const ID: &str = "opamp";
    const TITLE: &str = "collector is connected to the server over OpAMP and its config is applied";
    const LOGS: &str =
        "journalctl -u linkmesh-agent | grep -i opamp (the supervisor's connection errors)";
    if kind != RuntimeKind::Otelcol {
        return ok(ID, TITLE, "no supervised collector on this host");
    }
    let Some(v) = view else {
        return bad(
            ID,
            TITLE,
            Outcome::Warn,
            "the server has not reported this host's collector over OpAMP yet",
            format!("wait for the next report; if it stays so: {LOGS}"),
        );
    };
    if !v.connected {
        return bad(
            ID,
            TITLE,
            Outcome::Fail,
            "the supervisor is not connected to the server's /v1/opamp",
            LOGS,
        );
    }
    let collector = format!("{} {}", v.collector_name, v.collector_version);
    match v.remote_config_status.as_str() {
        "failed" => bad(
            ID,
            TITLE,
            Outcome::Fail,
            format!(
                "{collector}: the server's configuration {} failed: {}",
                short(&v.remote_config_hash),
                v.remote_config_error
            ),
            "fix it and store it again: linkmesh-fleet collector-config set (the previous configuration keeps running)",
        ),
        "applying" => bad(
            ID,
            TITLE,
            Outcome::Warn,
            format!(
                "{collector}: the server's configuration {} is being applied",
                short(&v.remote_config_hash)
            ),
            "check again in a few seconds",
        ),
        "applied" => ok(
            ID,
            TITLE,
            format!(
                "{collector}, running the server's configuration {}",
                short(&v.remote_config_hash)
            ),
        ),
        _ => ok(
            ID,
            TITLE,
            format!("{collector}, connected; the server sets no configuration (local only)"),
        ),
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The state directory: exists, 0700, owned by the agent's user.
pub fn state_dir_check(dir: &Path, euid: u32) -> Check {
    const TITLE: &str = "state directory has safe permissions";
    match std::fs::metadata(dir) {
        Err(e) => bad(
            "state_dir",
            TITLE,
            Outcome::Fail,
            format!("{}: {e}", dir.display()),
            "enrol to create it, or check LINKMESH_STATE_DIR / state_dir",
        ),
        Ok(m) if m.permissions().mode() & 0o077 != 0 => bad(
            "state_dir",
            TITLE,
            Outcome::Fail,
            format!(
                "{} has mode {:04o}",
                dir.display(),
                m.permissions().mode() & 0o7777
            ),
            format!("chmod 700 {}", dir.display()),
        ),
        Ok(m) if m.uid() != euid => bad(
            "state_dir",
            TITLE,
            Outcome::Fail,
            format!(
                "{} is owned by uid {}, the agent runs as {euid}",
                dir.display(),
                m.uid()
            ),
            format!("chown -R {euid} {}", dir.display()),
        ),
        Ok(_) => ok("state_dir", TITLE, format!("{} mode 0700", dir.display())),
    }
}

const KEY_TITLE: &str = "private key is readable only by the agent's user";

/// The key's owner and mode: owned by the user the agent runs as (root, or
/// the service user) and readable by nobody else. Pure.
pub fn key_owner_check(path: &std::path::Path, mode: u32, owner: u32, euid: u32) -> Check {
    let mode = mode & 0o7777;
    if owner != euid {
        return bad(
            "key_permissions",
            KEY_TITLE,
            Outcome::Fail,
            format!(
                "{} is owned by uid {owner}, not by the agent's uid {euid}",
                path.display()
            ),
            format!("chown {euid} {}", path.display()),
        );
    }
    if mode & 0o077 != 0 {
        return bad(
            "key_permissions",
            KEY_TITLE,
            Outcome::Fail,
            format!("{} has mode {mode:04o}", path.display()),
            format!("chmod 600 {}", path.display()),
        );
    }
    ok(
        "key_permissions",
        KEY_TITLE,
        format!("{} mode {mode:04o}, owned by uid {owner}", path.display()),
    )
}

/// Whether the identity belongs to this machine (see [`crate::fingerprint`]):
/// on a copy, what the running agent says of its own identity (held for
/// approval under the server's quarantine, say) or that `run` asks for one.
pub fn machine_check(
    host_id: &str,
    verdict: &crate::fingerprint::Verdict,
    pending: Option<&str>,
) -> Check {
    use crate::fingerprint::Verdict;
    const ID: &str = "machine";
    const TITLE: &str = "the identity was enrolled on this machine";
    match verdict {
        Verdict::Same => ok(ID, TITLE, "machine-id and product UUID match the enrolment's"),
        Verdict::Unrecorded => ok(
            ID,
            TITLE,
            "no fingerprint recorded yet (an older agent enrolled it); the next run records this machine",
        ),
        Verdict::Clone { reason } => bad(
            ID,
            TITLE,
            Outcome::Warn,
            pending.map_or_else(
                || format!("this machine is a copy of host {host_id} ({reason}); the agent asks the server for an identity of its own when it runs"),
                str::to_owned,
            ),
            if pending.is_some_and(|p| p.contains("hosts approve")) {
                "the server holds clones for approval: on the server, linkmesh-fleet hosts approve ID (the collector keeps running meanwhile)"
            } else {
                "start the agent (systemctl start linkmesh-agent): it re-keys this copy by itself; an image should be generalised with linkmesh-agent image-prep"
            },
        ),
    }
}

/// How the server regards this host's certificate: what it says over
/// ServerInfo when reachable, else what it said when it revoked the host.
pub fn standing_check(
    info: Option<&proto::ServerInfoResponse>,
    revoked: Option<&crate::reporter::Revoked>,
) -> Check {
    use proto::Standing;
    const ID: &str = "standing";
    const TITLE: &str = "the server accepts this host's certificate";
    const ENROL: &str = "enrol again with a new token: echo $TOKEN | linkmesh-agent enroll --force --server URL --ca-pin sha256:HEX --token-file /dev/stdin (the collector keeps running meanwhile)";
    let Some(info) = info else {
        return match revoked {
            Some(r) => bad(ID, TITLE, Outcome::Fail, r.explain(), ENROL),
            None => Check {
                id: ID,
                title: TITLE,
                outcome: Outcome::Skipped,
                detail: "server not reachable".into(),
                hint: None,
            },
        };
    };
    let detail = info.client_standing_detail.clone();
    match info.client_standing() {
        Standing::Current => ok(ID, TITLE, detail),
        Standing::Revoked => bad(
            ID,
            TITLE,
            Outcome::Fail,
            format!("revoked: {detail}"),
            ENROL,
        ),
        Standing::Superseded | Standing::NotEnrolled | Standing::NotAClone => {
            bad(ID, TITLE, Outcome::Fail, detail, ENROL)
        }
        Standing::ClonePending => bad(
            ID,
            TITLE,
            Outcome::Warn,
            detail,
            "the server holds clones for approval: on the server, linkmesh-fleet hosts approve ID (the collector keeps running meanwhile)",
        ),
        Standing::InUseElsewhere => bad(
            ID,
            TITLE,
            Outcome::Fail,
            format!("the identity is in use elsewhere: {detail}"),
            "on the machine that is the copy: linkmesh-agent image-prep, systemd-machine-id-setup (a new machine-id), then enrol with a new token; leave the original as it is",
        ),
        Standing::Expired => bad(
            ID,
            TITLE,
            Outcome::Warn,
            detail,
            "start the agent (`systemctl start linkmesh-agent`): it renews within the server's grace window",
        ),
        Standing::Unspecified => Check {
            id: ID,
            title: TITLE,
            outcome: Outcome::Skipped,
            detail: "the server does not say".into(),
            hint: None,
        },
    }
}

/// The certificate: valid, and not past its renewal time unless the agent
/// is running to renew it.
pub fn certificate_check(id: &Identity, now: time::OffsetDateTime, agent_running: bool) -> Check {
    const TITLE: &str = "certificate is valid and not near expiry";
    let v = &id.validity;
    let fmt = crate::clock::rfc3339;
    if now >= v.not_after {
        return bad(
            "certificate",
            TITLE,
            Outcome::Fail,
            format!("expired at {}", fmt(v.not_after)),
            "start the agent (`systemctl start linkmesh-agent`): it renews within the server's grace window; past that, enrol again with --force",
        );
    }
    if now < v.not_before {
        return bad(
            "certificate",
            TITLE,
            Outcome::Fail,
            format!("not valid until {}", fmt(v.not_before)),
            "this host's clock is behind: fix time synchronisation (timedatectl)",
        );
    }
    if now >= rotation::renew_at(v, 1.0) && !agent_running {
        return bad(
            "certificate",
            TITLE,
            Outcome::Warn,
            format!("expires at {}, past its renewal time", fmt(v.not_after)),
            "start the agent so it renews the certificate",
        );
    }
    ok(
        "certificate",
        TITLE,
        format!("valid until {}", fmt(v.not_after)),
    )
}

/// The clock offset measured against the server.
pub fn clock_check(offset_ms: i64) -> Check {
    const TITLE: &str = "host clock agrees with the server's";
    if offset_ms.abs() > crate::reporter::MAX_CLOCK_OFFSET_MS {
        let dir = if offset_ms > 0 { "ahead of" } else { "behind" };
        return bad(
            "clock",
            TITLE,
            Outcome::Fail,
            format!(
                "host clock is {} s {dir} the server's",
                offset_ms.abs() / 1000
            ),
            "fix time synchronisation (timedatectl status; chrony or systemd-timesyncd)",
        );
    }
    ok("clock", TITLE, format!("offset {offset_ms} ms"))
}

/// The skew rule against the server's version.
/// This agent against the server's window. An agent ahead of its server
/// fails, unless the lab override (`LINKMESH_ALLOW_AHEAD=1`, what
/// `install.sh --allow-ahead` sets) put it there on purpose: then it warns.
pub fn version_check(info: &proto::ServerInfoResponse, allow_ahead: bool) -> Check {
    const TITLE: &str = "agent version is within the server's window";
    let agent = version::agent_version();
    let Ok(server) = info.server_version.parse::<Version>() else {
        return bad(
            "version",
            TITLE,
            Outcome::Fail,
            format!(
                "server reports an unparsable version {:?}",
                info.server_version
            ),
            "check the server",
        );
    };
    let behind = proto::SkewPolicy::window(info.skew_policy.as_ref());
    let verdict = version::skew(&agent, &server, behind);
    let detail = verdict.explain(&agent, &server);
    match verdict {
        SkewVerdict::InWindow => ok("version", TITLE, detail),
        SkewVerdict::Behind => bad(
            "version",
            TITLE,
            Outcome::Fail,
            detail,
            "upgrade the agent: apt upgrade linkmesh-agent, yum update linkmesh-agent, or re-run the installer",
        ),
        SkewVerdict::Ahead => bad(
            "version",
            TITLE,
            if allow_ahead {
                Outcome::Warn
            } else {
                Outcome::Fail
            },
            detail,
            if allow_ahead {
                "installed ahead on purpose (LINKMESH_ALLOW_AHEAD=1); upgrade the server first; this agent keeps working meanwhile"
            } else {
                "upgrade the server first; this agent keeps working meanwhile"
            },
        ),
        SkewVerdict::Incompatible => bad(
            "version",
            TITLE,
            Outcome::Fail,
            detail,
            "install an agent of the server's major version",
        ),
    }
}

/// The runtime against the pins.
pub fn runtime_version_check(d: &Detection, pins: &[proto::RuntimePin]) -> Check {
    const TITLE: &str = "runtime is installed at the pinned version";
    let pin = |kind: &str| pins.iter().find(|p| p.kind == kind);
    let same = |a: &str, b: &str| a.trim_start_matches('v') == b.trim_start_matches('v');
    match d.kind {
        RuntimeKind::Otelcol => {
            let Some(p) = pin("otelcol") else {
                return ok(
                    "runtime_version",
                    TITLE,
                    "the server pins no otelcol version",
                );
            };
            let col = d
                .collector
                .as_ref()
                .and_then(|c| c.version.clone())
                .unwrap_or_default();
            let sup = d.supervisor.as_ref().and_then(|c| c.version.clone());
            let mut off = Vec::new();
            if !same(&col, &p.version) {
                off.push(format!(
                    "otelcol-contrib {} (pin {})",
                    if col.is_empty() { "unknown" } else { &col },
                    p.version
                ));
            }
            if let Some(s) = &sup
                && !p.supervisor_version.is_empty()
                && !same(s, &p.supervisor_version)
            {
                off.push(format!(
                    "opampsupervisor {s} (pin {})",
                    p.supervisor_version
                ));
            }
            if off.is_empty() {
                ok(
                    "runtime_version",
                    TITLE,
                    format!(
                        "otelcol-contrib {col}{}",
                        sup.map(|s| format!(", opampsupervisor {s}"))
                            .unwrap_or_default()
                    ),
                )
            } else {
                bad(
                    "runtime_version",
                    TITLE,
                    Outcome::Warn,
                    off.join("; "),
                    "install the pinned runtime with install-opamp.sh",
                )
            }
        }
        RuntimeKind::Alloy => {
            let a = d.alloy.as_ref();
            let installed = a
                .and_then(|a| a.executable.version.clone())
                .unwrap_or_default();
            match pin("alloy") {
                Some(p) if !same(&installed, &p.version) => bad(
                    "runtime_version",
                    TITLE,
                    Outcome::Warn,
                    format!("alloy {installed} (pin {})", p.version),
                    "upgrade Alloy with its package manager",
                ),
                _ if a.is_some_and(|a| a.restart_pending) => bad(
                    "runtime_version",
                    TITLE,
                    Outcome::Warn,
                    format!(
                        "alloy {installed} installed, {} running",
                        a.and_then(|a| a.running_version.clone())
                            .unwrap_or_default()
                    ),
                    "systemctl restart alloy",
                ),
                _ => ok("runtime_version", TITLE, format!("alloy {installed}")),
            }
        }
        RuntimeKind::None => bad(
            "runtime_version",
            TITLE,
            Outcome::Warn,
            "no collector runtime found",
            "install one with install-opamp.sh, then systemctl reload linkmesh-agent",
        ),
    }
}

fn supervision_check(d: &Detection, published: Option<&crate::published::Snapshot>) -> Check {
    const TITLE: &str = "supervisor is running";
    if d.kind != RuntimeKind::Otelcol {
        return ok("supervisor", TITLE, "no supervised runtime on this host");
    }
    let live = published.filter(|s| s.agent_running);
    match live.map(|s| s.state.runtime.supervision.as_ref()) {
        Some(Some(sup)) => match &sup.state {
            crate::supervisor::State::Running { pid, .. } => ok(
                "supervisor",
                TITLE,
                format!(
                    "opampsupervisor pid {pid}{}, {} restarts",
                    sup.unit
                        .as_deref()
                        .map(|u| format!(" in {u}"))
                        .unwrap_or_default(),
                    sup.restarts
                ),
            ),
            other => bad(
                "supervisor",
                TITLE,
                Outcome::Fail,
                format!(
                    "opampsupervisor is {}: {}",
                    crate::published::state_name(other),
                    match other {
                        crate::supervisor::State::NotRunnable { error } => error.clone(),
                        crate::supervisor::State::Failed { reason } => reason.clone(),
                        _ => sup.last_exit.clone().unwrap_or_default(),
                    }
                ),
                match (other, sup.unit.is_some()) {
                    (crate::supervisor::State::Stopped, _) => {
                        "stopped with `linkmesh-agent runtime stop`: `linkmesh-agent runtime start`"
                    }
                    (_, true) => {
                        "journalctl -u linkmesh-collector; `linkmesh-agent runtime start` once fixed"
                    }
                    (_, false) => "journalctl -u linkmesh-agent",
                },
            ),
        },
        Some(None) => bad(
            "supervisor",
            TITLE,
            Outcome::Fail,
            "the agent runs but supervises nothing yet",
            "journalctl -u linkmesh-agent",
        ),
        None => bad(
            "supervisor",
            TITLE,
            Outcome::Fail,
            "linkmesh-agent run is not running",
            "systemctl start linkmesh-agent",
        ),
    }
}

fn conflicts_check(d: &Detection) -> Check {
    const TITLE: &str = "no standalone collector service runs beside the supervisor";
    match d.conflicts.first() {
        None => ok("conflicts", TITLE, "none"),
        Some(_) => bad(
            "conflicts",
            TITLE,
            Outcome::Fail,
            d.conflicts
                .iter()
                .map(|c| c.message.clone())
                .collect::<Vec<_>>()
                .join("; "),
            "disable the service named above",
        ),
    }
}

/// Why the server could not be asked for its information.
#[derive(Debug, thiserror::Error)]
pub enum ContactError {
    /// This host's identity makes no TLS configuration.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// No async runtime for the exchange.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The channel could not be set up.
    #[error(transparent)]
    Connect(#[from] crate::transport::ConnectError),
    /// The server did not answer in time.
    #[error("{server} did not answer within {}s", .after.as_secs())]
    Timeout {
        /// The server.
        server: String,
        /// The bound.
        after: Duration,
    },
    /// The dial failed (explained) or the server refused (its words).
    #[error("{0}")]
    Refused(String),
}

/// Asks the server for its information over mutual TLS, measuring the
/// clock offset.
fn contact(id: &Identity, settings: &Settings) -> Result<ServerView, ContactError> {
    let tls = Arc::new(mtls_client_config(id)?);
    server_info(
        &id.server,
        tls,
        settings.proxy_url.as_deref(),
        Duration::from_secs(5),
    )
}

/// ServerInfo from `server` over `tls` (mutual, or server-authenticated
/// only), through the proxy the configuration or environment names, bounded
/// by `timeout` per step; the clock offset measured around it.
///
/// # Errors
/// [`ContactError`]: why the server could not be asked, for people.
pub fn server_info(
    server: &crate::endpoint::ServerUrl,
    tls: Arc<rustls::ClientConfig>,
    proxy_url: Option<&str>,
    timeout: Duration,
) -> Result<ServerView, ContactError> {
    let proxy = proxy_for(server.host(), proxy_url, |k| std::env::var(k).ok());
    let dialer = Dialer::new(server.clone(), tls, proxy, timeout);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ContactError::Runtime)?;
    rt.block_on(async {
        let mut client = proto::Client::new(dialer.channel()?);
        let before = SystemTime::now();
        let info =
            tokio::time::timeout(timeout * 2, client.server_info(proto::ServerInfoRequest {}))
                .await
                .map_err(|_| ContactError::Timeout {
                    server: server.to_string(),
                    after: timeout * 2,
                })?
                .map_err(|s| {
                    ContactError::Refused(
                        dialer
                            .last_error()
                            .unwrap_or_else(|| s.message().to_owned()),
                    )
                })?
                .into_inner();
        let after = SystemTime::now();
        let midpoint = (crate::clock::unix_ms(before) + crate::clock::unix_ms(after)) / 2;
        let offset = i64::try_from(midpoint).unwrap_or(i64::MAX) - info.server_time_unix_ms;
        Ok(ServerView {
            info,
            clock_offset_ms: offset,
        })
    })
}

/// Prints the checks; returns whether none failed.
pub fn print(checks: &[Check], json: bool) -> bool {
    let passed = !checks.iter().any(|c| c.outcome == Outcome::Fail);
    if json {
        println!("{}", serde_json::json!({ "ok": passed, "checks": checks }));
        return passed;
    }
    println!("linkmesh-agent\n--------------");
    for c in checks {
        let mark = match c.outcome {
            Outcome::Ok => "\u{221a}",
            Outcome::Warn => "\u{203c}",
            Outcome::Fail => "\u{d7}",
            Outcome::Skipped => "-",
        };
        println!("{mark} {}", c.title);
        if c.outcome != Outcome::Ok {
            println!("    {}", c.detail);
            if let Some(h) = &c.hint {
                println!("    hint: {h}");
            }
        }
    }
    println!(
        "\nStatus check results are {}",
        if passed { "\u{221a}" } else { "\u{d7}" }
    );
    passed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_must_be_the_agents_own() {
        let p = std::path::Path::new("/var/lib/linkmesh-agent/identity/key.pem");
        assert_eq!(key_owner_check(p, 0o100600, 0, 0).outcome, Outcome::Ok);
        let c = key_owner_check(p, 0o100600, 1000, 0);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("owned by uid 1000"), "{c:?}");
        assert_eq!(
            c.hint.as_deref(),
            Some("chown 0 /var/lib/linkmesh-agent/identity/key.pem")
        );
        let c = key_owner_check(p, 0o100640, 0, 0);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("mode 0640"), "{c:?}");
    }

    #[test]
    fn a_copy_says_so_and_what_it_waits_for() {
        use crate::fingerprint::Verdict;
        assert_eq!(
            machine_check("h", &Verdict::Same, None).outcome,
            Outcome::Ok
        );
        assert_eq!(
            machine_check("h", &Verdict::Unrecorded, None).outcome,
            Outcome::Ok
        );
        let copy = Verdict::Clone {
            reason: "its machine-id differs".into(),
        };
        let c = machine_check("h", &copy, None);
        assert_eq!(c.outcome, Outcome::Warn);
        assert!(
            c.detail.contains("copy of host h (its machine-id differs)"),
            "{c:?}"
        );
        assert!(
            c.hint
                .as_deref()
                .is_some_and(|h| h.contains("systemctl start"))
        );
        let c = machine_check(
            "h",
            &copy,
            Some(
                "this machine is a copy of host h (x); its own identity is pending: held: linkmesh-fleet hosts approve 1a2b",
            ),
        );
        assert!(c.detail.contains("hosts approve 1a2b"), "{c:?}");
        assert!(
            c.hint
                .as_deref()
                .is_some_and(|h| h.contains("hosts approve ID"))
        );
    }

    #[test]
    fn the_standing_check_says_what_the_server_said() {
        let info = |standing: proto::Standing, detail: &str| proto::ServerInfoResponse {
            client_standing: standing as i32,
            client_standing_detail: detail.into(),
            ..Default::default()
        };
        let c = standing_check(Some(&info(proto::Standing::Current, "host h")), None);
        assert_eq!(c.outcome, Outcome::Ok);
        let c = standing_check(
            Some(&info(proto::Standing::Revoked, "host h was revoked at t")),
            None,
        );
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.starts_with("revoked: host h"), "{}", c.detail);
        assert!(
            c.hint
                .as_deref()
                .unwrap_or_default()
                .contains("enroll --force"),
            "{c:?}"
        );
        for s in [
            proto::Standing::Superseded,
            proto::Standing::NotEnrolled,
            proto::Standing::InUseElsewhere,
        ] {
            assert_eq!(
                standing_check(Some(&info(s, "x")), None).outcome,
                Outcome::Fail
            );
        }
        assert_eq!(
            standing_check(Some(&info(proto::Standing::Expired, "x")), None).outcome,
            Outcome::Warn
        );
        assert_eq!(
            standing_check(Some(&info(proto::Standing::Unspecified, "")), None).outcome,
            Outcome::Skipped
        );
        // The server away: what it said when it revoked the host.
        let r = crate::reporter::Revoked {
            host_id: "h".into(),
            at_unix_ms: 0,
            message: "host h was revoked".into(),
        };
        let c = standing_check(None, Some(&r));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(
            c.detail
                .starts_with("revoked: enrol again with a new token"),
            "{}",
            c.detail
        );
        assert_eq!(standing_check(None, None).outcome, Outcome::Skipped);
    }

    #[test]
    fn clock_and_version_checks() {
        assert_eq!(clock_check(1500).outcome, Outcome::Ok);
        let c = clock_check(-3_600_000);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("3600 s behind"), "{}", c.detail);
        let v = version::agent_version();
        let info = |server: String| proto::ServerInfoResponse {
            server_version: server,
            skew_policy: Some(proto::SkewPolicy {
                minor_versions_behind: 1,
            }),
            ..Default::default()
        };
        assert_eq!(
            version_check(&info(v.to_string()), false).outcome,
            Outcome::Ok
        );
        let behind = version_check(&info(format!("{}.{}.0", v.major, v.minor + 2)), false);
        assert_eq!(behind.outcome, Outcome::Fail);
        assert!(behind.hint.unwrap().contains("upgrade the agent"));
        let other = version_check(&info(format!("{}.0.0", v.major + 1)), false);
        if v.minor > 0 {
            let older = info(format!("{}.{}.0", v.major, v.minor - 1));
            assert_eq!(version_check(&older, false).outcome, Outcome::Fail);
            assert_eq!(version_check(&older, true).outcome, Outcome::Warn);
        }
        assert!(other.detail.contains("different major"));
    }

    #[test]
    fn the_last_upgrade() {
        use crate::upgrade::probation::Outcome as Done;
        assert_eq!(upgrade_check(None, None).outcome, Outcome::Ok);
        let o = |outcome: &str| Done {
            outcome: outcome.into(),
            from: "0.2.0".into(),
            to: "0.1.0".into(),
            reason: "exit status 1".into(),
            at_unix_ms: 0,
        };
        let c = upgrade_check(None, Some(&o("rolled_back")));
        assert_eq!(c.outcome, Outcome::Warn);
        assert!(c.detail.contains("exit status 1") && c.hint.unwrap().contains("0.1.0 runs again"));
        assert_eq!(
            upgrade_check(None, Some(&o("rollback_failed"))).outcome,
            Outcome::Fail
        );
        assert_eq!(
            upgrade_check(None, Some(&o("confirmed"))).outcome,
            Outcome::Ok
        );
    }

    #[test]
    fn state_dir_permissions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = state_dir_check(dir.path(), nix::unistd::geteuid().as_raw());
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.hint.unwrap().starts_with("chmod 700"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(
            state_dir_check(dir.path(), nix::unistd::geteuid().as_raw()).outcome,
            Outcome::Ok
        );
        assert_eq!(state_dir_check(dir.path(), 4242).outcome, Outcome::Fail);
    }

    #[test]
    fn opamp_outcomes() {
        assert_eq!(opamp_check(RuntimeKind::Alloy, None).outcome, Outcome::Ok);
        assert_eq!(
            opamp_check(RuntimeKind::Otelcol, None).outcome,
            Outcome::Warn
        );
        let mut v = crate::reporter::OpampView {
            connected: true,
            collector_name: "otelcol-contrib".into(),
            collector_version: "0.158.0".into(),
            remote_config_hash: "0123456789abcdef".into(),
            remote_config_status: "applied".into(),
            ..Default::default()
        };
        let c = opamp_check(RuntimeKind::Otelcol, Some(&v));
        assert_eq!(c.outcome, Outcome::Ok);
        assert!(
            c.detail.contains("otelcol-contrib 0.158.0") && c.detail.contains("0123456789ab"),
            "{c:?}"
        );
        v.remote_config_status = "failed".into();
        v.remote_config_error = "unknown type: \"nosuch\"".into();
        let c = opamp_check(RuntimeKind::Otelcol, Some(&v));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("nosuch"), "{c:?}");
        v.connected = false;
        assert_eq!(
            opamp_check(RuntimeKind::Otelcol, Some(&v)).outcome,
            Outcome::Fail
        );
    }
}
