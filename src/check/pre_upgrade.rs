//! `linkmesh-agent check --pre-upgrade [--to VERSION]`: the pre-upgrade
//! checklist as a command, in the manner of `linkerd check --pre`. The
//! fleet server's version and whether the target lies in its window (the
//! server-first rule of [`crate::upgrade`]); the identity and the collector's
//! instance id present and readable; room for the package and a rollback
//! copy; the current version and the exact command that rolls back to it;
//! the collector runtime against the server's pin. Pure checks over
//! gathered facts, as in the parent module.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::{
    Check, Outcome, bad, contact, identity_check, ok, runtime_version_check, settings_check,
};
use crate::{
    config::{ConfigPaths, RuntimeKind},
    identity::IdentityStore,
    runtime::{self, probe::HostProbes},
    upgrade::{self, Admission, ServerSide},
    version::{self, Version},
};

/// Free space kept beyond what an upgrade writes, per filesystem.
pub const SPACE_MARGIN: u64 = 16 * 1024 * 1024;

/// The pre-upgrade checks.
pub fn run(paths: &ConfigPaths, to: Option<&Version>) -> Vec<Check> {
    let mut checks = Vec::new();
    let Some(settings) = settings_check(paths, &mut checks) else {
        return checks;
    };
    let store = IdentityStore::new(&settings.state_dir);
    let identity = identity_check(&store, &mut checks);
    let detection = runtime::detect(
        &settings.runtime,
        &HostProbes {
            state_dir: settings.state_dir.clone(),
        },
    );
    let storage = settings
        .state_dir
        .join(crate::app::SUPERVISOR_STORAGE)
        .join(PERSISTENT_STATE);
    checks.push(instance_id_check(
        detection.kind,
        &storage,
        std::fs::read_to_string(&storage),
    ));

    let Some(id) = identity else {
        return checks;
    };
    let server = id.server.to_string();
    let view = contact(&id, &settings);
    let side = match &view {
        Ok(v) => {
            checks.push(ok(
                "server",
                "the fleet server is reachable",
                format!("{server} runs {}", v.info.server_version),
            ));
            upgrade::gate::asked(&v.info, &server).ok()
        }
        Err(e) => {
            checks.push(bad(
                "server",
                "the fleet server is reachable",
                Outcome::Fail,
                format!("{server}: {e}"),
                "the fleet server is upgraded first and must be up for that: check it and the network path",
            ));
            upgrade::gate::recorded(&settings.state_dir, &server, e.to_string(), &mut Vec::new())
        }
    };
    let offered = view
        .as_ref()
        .ok()
        .and_then(|v| v.info.latest_agent_version.parse::<Version>().ok());
    checks.push(target_check(to.or(offered.as_ref()), side.as_ref()));

    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/linkmesh-agent"));
    let size = std::fs::metadata(&exe).map_or(0, |m| m.len());
    let places = [
        ("the download", std::env::temp_dir()),
        (
            "the new binary",
            exe.parent()
                .map_or_else(|| PathBuf::from("/usr/bin"), Path::to_path_buf),
        ),
        ("the rollback copy", settings.state_dir.clone()),
    ];
    let gathered: Vec<Place> = places
        .into_iter()
        .map(|(what, path)| Place::gather(what, path, size))
        .collect();
    checks.push(space_check(&gathered));

    let method = crate::app::InstallMethod::read(&settings.state_dir);
    checks.push(ok(
        "rollback",
        "the way back is known",
        format!(
            "linkmesh-agent {} ({} install); to roll back to it: {}",
            version::AGENT_VERSION,
            method.as_str(),
            rollback_command(
                method.rollback(),
                &server,
                &store.identity_dir().join(crate::identity::store::CA_FILE),
                &id.ca_pin.to_string(),
                version::AGENT_VERSION
            )
        ),
    ));
    match &view {
        Ok(v) => checks.push(runtime_version_check(&detection, &v.info.runtime_pins)),
        Err(_) => checks.push(Check {
            id: "runtime_version",
            title: "runtime is installed at the pinned version",
            outcome: Outcome::Skipped,
            detail: "server not reachable".into(),
            hint: None,
        }),
    }
    checks
}

/// The supervisor's own record of the collector's instance id, in its
/// storage directory.
pub const PERSISTENT_STATE: &str = "persistent_state.yaml";

/// The `instance_id:` of the supervisor's `persistent_state.yaml`, when it
/// is a UUID (the supervisor replaces anything else with a new one, which
/// would make the collector a new agent to the server).
pub fn instance_id(text: &str) -> Option<&str> {
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("instance_id:"))?
        .trim()
        .trim_matches(|c| c == '"' || c == '\'');
    let groups: Vec<&str> = value.split('-').collect();
    let shape = groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12];
    (shape
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit())))
    .then_some(value)
}

/// The collector's instance id: what keeps it the same agent to the server
/// across the upgrade.
pub fn instance_id_check(kind: RuntimeKind, path: &Path, read: std::io::Result<String>) -> Check {
    const ID: &str = "instance_id";
    const TITLE: &str = "the collector's instance id is present and readable";
    if kind != RuntimeKind::Otelcol {
        return ok(ID, TITLE, "no supervised collector on this host");
    }
    match read {
        Ok(text) => match instance_id(&text) {
            Some(uid) => ok(ID, TITLE, format!("{uid} in {}", path.display())),
            None => bad(
                ID,
                TITLE,
                Outcome::Fail,
                format!("{} holds no valid instance_id", path.display()),
                "restore it from a backup before upgrading; otherwise the collector comes back as a new agent",
            ),
        },
        Err(e) => bad(
            ID,
            TITLE,
            Outcome::Fail,
            format!("cannot read {}: {e}", path.display()),
            "start the runtime once (`linkmesh-agent runtime start`) so the supervisor writes it, or restore it",
        ),
    }
}

/// The target version against the server's window.
pub fn target_check(target: Option<&Version>, server: Option<&ServerSide>) -> Check {
    const ID: &str = "target_version";
    const TITLE: &str = "the target version is within the fleet server's window";
    let Some(target) = target else {
        return bad(
            ID,
            TITLE,
            Outcome::Warn,
            "no target version: the server names none",
            "name it: linkmesh-agent check --pre-upgrade --to X.Y.Z",
        );
    };
    let j = upgrade::judge(target, server, false);
    match j.admission {
        Admission::InWindow => ok(ID, TITLE, j.message),
        Admission::Behind => bad(
            ID,
            TITLE,
            Outcome::Warn,
            j.message,
            "pick a version in the server's window",
        ),
        Admission::Refused | Admission::AheadAllowed => bad(
            ID,
            TITLE,
            Outcome::Fail,
            j.message,
            format!(
                "upgrade the fleet server to {}.{} or later first",
                target.major, target.minor
            ),
        ),
        Admission::Unchecked => bad(
            ID,
            TITLE,
            Outcome::Fail,
            format!(
                "linkmesh-agent {target} cannot be judged: the fleet server's version is unknown"
            ),
            "bring the fleet server up (it is upgraded first), then check again",
        ),
    }
}

/// One place an upgrade writes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// What is written there.
    pub what: &'static str,
    /// The directory.
    pub path: PathBuf,
    /// Its filesystem (`st_dev`), or `None` when it cannot be inspected.
    pub dev: Option<u64>,
    /// Bytes available to root there.
    pub free: u64,
    /// Bytes the upgrade writes there.
    pub need: u64,
}

impl Place {
    fn gather(what: &'static str, path: PathBuf, need: u64) -> Self {
        let dev = std::fs::metadata(&path).ok().map(|m| m.dev());
        let free = nix::sys::statvfs::statvfs(&path).map_or(0, |s| {
            s.blocks_available().saturating_mul(s.fragment_size())
        });
        Self {
            what,
            path,
            dev,
            free,
            need,
        }
    }
}

/// Room for everything the upgrade writes, summed per filesystem, with
/// [`SPACE_MARGIN`] to spare on each.
pub fn space_check(places: &[Place]) -> Check {
    const ID: &str = "space";
    const TITLE: &str = "there is room for the new version and a rollback copy";
    let mib = |b: u64| b.div_ceil(1024 * 1024);
    let mut short = Vec::new();
    let mut seen = Vec::new();
    for p in places {
        let Some(dev) = p.dev else {
            short.push(format!(
                "{} cannot be inspected ({})",
                p.path.display(),
                p.what
            ));
            continue;
        };
        if seen.contains(&dev) {
            continue;
        }
        seen.push(dev);
        let same: Vec<&Place> = places.iter().filter(|q| q.dev == Some(dev)).collect();
        let need = same.iter().map(|q| q.need).sum::<u64>() + SPACE_MARGIN;
        if p.free < need {
            short.push(format!(
                "{} has {} MiB free, {} MiB needed ({})",
                p.path.display(),
                mib(p.free),
                mib(need),
                same.iter().map(|q| q.what).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    if short.is_empty() {
        ok(
            ID,
            TITLE,
            places
                .iter()
                .map(|p| format!("{} {} MiB free", p.path.display(), mib(p.free)))
                .collect::<Vec<_>>()
                .join(", "),
        )
    } else {
        bad(
            ID,
            TITLE,
            Outcome::Fail,
            short.join("; "),
            "free space there (journalctl --vacuum-size, apt-get clean, dnf clean all) and check again",
        )
    }
}

/// The one command that puts `version` back on this host by its install
/// method: the installer with `--version`, which keeps a package-installed
/// host on its package (`dpkg`/`rpm` then downgrade) and a script-installed
/// one on the binary, verifying the server against the stored CA.
pub fn rollback_command(
    method: crate::upgrade::probation::Method,
    server: &str,
    ca_file: &Path,
    ca_pin: &str,
    version: &str,
) -> String {
    let method = method.as_str();
    format!(
        "curl -fsS --cacert {} {server}/install.sh | sh -s -- --server {server} --ca-pin {ca_pin} --version {version} --method {method}",
        ca_file.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::Source;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn side(version: &str) -> ServerSide {
        ServerSide {
            version: v(version),
            minor_versions_behind: 1,
            source: Source::Asked {
                server: "https://f:8443".into(),
            },
        }
    }

    #[test]
    fn the_instance_id_must_be_a_uuid() {
        let good =
            "instance_id: 019a2b3c-4d5e-7f60-8a9b-0c1d2e3f4a5b\nlast_remote_config_status: null\n";
        assert_eq!(
            instance_id(good),
            Some("019a2b3c-4d5e-7f60-8a9b-0c1d2e3f4a5b")
        );
        assert_eq!(instance_id("instance_id: \"\"\n"), None);
        assert_eq!(instance_id("instance_id: 12345\n"), None);
        assert_eq!(instance_id("other: x\n"), None);
        let p = Path::new("/s/persistent_state.yaml");
        assert_eq!(
            instance_id_check(RuntimeKind::Otelcol, p, Ok(good.into())).outcome,
            Outcome::Ok
        );
        let missing = instance_id_check(
            RuntimeKind::Otelcol,
            p,
            Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        );
        assert_eq!(missing.outcome, Outcome::Fail);
        assert!(missing.detail.contains("/s/persistent_state.yaml"));
        assert_eq!(
            instance_id_check(RuntimeKind::Alloy, p, Ok(String::new())).outcome,
            Outcome::Ok
        );
    }

    #[test]
    fn the_target_against_the_window() {
        assert_eq!(
            target_check(Some(&v("0.2.1")), Some(&side("0.2.0"))).outcome,
            Outcome::Ok
        );
        let ahead = target_check(Some(&v("0.3.0")), Some(&side("0.2.0")));
        assert_eq!(ahead.outcome, Outcome::Fail);
        assert_eq!(
            ahead.hint.as_deref(),
            Some("upgrade the fleet server to 0.3 or later first")
        );
        assert_eq!(
            target_check(Some(&v("0.0.1")), Some(&side("0.2.0"))).outcome,
            Outcome::Warn
        );
        assert_eq!(target_check(Some(&v("0.2.0")), None).outcome, Outcome::Fail);
        assert_eq!(
            target_check(None, Some(&side("0.2.0"))).outcome,
            Outcome::Warn
        );
    }

    #[test]
    fn space_is_summed_per_filesystem() {
        let mib = 1024 * 1024;
        let place = |what, dev, free| Place {
            what,
            path: PathBuf::from(format!("/d{dev}")),
            dev: Some(dev),
            free,
            need: 10 * mib,
        };
        // Three writes on one filesystem: 30 MiB + the margin.
        let one = [
            place("a", 1, 40 * mib),
            place("b", 1, 40 * mib),
            place("c", 1, 40 * mib),
        ];
        assert_eq!(space_check(&one).outcome, Outcome::Fail);
        let c = space_check(&one);
        assert!(c.detail.contains("46 MiB needed (a, b, c)"), "{}", c.detail);
        let apart = [
            place("a", 1, 40 * mib),
            place("b", 2, 40 * mib),
            place("c", 3, 40 * mib),
        ];
        assert_eq!(space_check(&apart).outcome, Outcome::Ok);
        let unknown = [Place {
            dev: None,
            ..place("a", 1, 0)
        }];
        assert_eq!(space_check(&unknown).outcome, Outcome::Fail);
    }

    #[test]
    fn the_rollback_command_keeps_the_method() {
        use crate::app::InstallMethod;
        let ca = Path::new("/var/lib/linkmesh-agent/identity/ca.pem");
        let c = rollback_command(
            InstallMethod::Deb.rollback(),
            "https://f:8443",
            ca,
            "sha256:ab",
            "0.2.0",
        );
        assert!(c.ends_with("--version 0.2.0 --method deb"), "{c}");
        assert!(c.contains(
            "--cacert /var/lib/linkmesh-agent/identity/ca.pem https://f:8443/install.sh"
        ));
        for m in ["script", "binary", "something"] {
            assert!(
                rollback_command(
                    InstallMethod::parse(m).rollback(),
                    "https://f",
                    ca,
                    "p",
                    "1.0.0"
                )
                .ends_with("--method binary")
            );
        }
    }
}
