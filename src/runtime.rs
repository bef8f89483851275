//! What collector runtime a host has: otelcol-contrib run by opampsupervisor,
//! or Grafana Alloy. [`detect`] is pure over injected [`Probes`]; the real
//! probes (`which`, `--version`, package databases, systemd, Alloy's HTTP
//! endpoint) live in [`probe`].
//!
//! Lookup order for each executable: the configured `[runtime]` path, then
//! `PATH`, then the paths the official packages install to.

pub mod alloy;
pub mod probe;

use std::path::{Path, PathBuf};

use crate::{
    config::{RuntimeChoice, RuntimeKind, RuntimeSettings},
    systemd::{ActiveState, UnitFileState},
};

/// Paths the official packages install each executable to.
pub const PACKAGE_PATHS_COLLECTOR: &[&str] = &[
    "/usr/bin/otelcol-contrib",
    "/etc/opampsupervisor/otelcol-contrib",
];
/// opampsupervisor package path.
pub const PACKAGE_PATHS_SUPERVISOR: &[&str] = &["/usr/bin/opampsupervisor"];
/// Alloy package path.
pub const PACKAGE_PATHS_ALLOY: &[&str] = &["/usr/bin/alloy"];

/// The packaged systemd units of the runtimes.
pub const UNIT_COLLECTOR: &str = "otelcol-contrib.service";
/// opampsupervisor's packaged unit.
pub const UNIT_SUPERVISOR: &str = "opampsupervisor.service";
/// Alloy's packaged unit.
pub const UNIT_ALLOY: &str = "alloy.service";

/// Parses `otelcol-contrib --version` output (`otelcol-contrib version
/// 0.159.0`, cobra's default template) into `(command, version)`.
pub fn parse_otelcol_version(output: &str) -> Option<(String, String)> {
    output.lines().map(str::trim).find_map(|line| {
        let mut words = line.split_whitespace();
        let (cmd, kw, ver) = (words.next()?, words.next()?, words.next()?);
        (kw == "version" && words.next().is_none()).then(|| (cmd.to_owned(), ver.to_owned()))
    })
}

/// Alloy's build information from its `--version` output.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AlloyBuild {
    /// e.g. `v1.18.1`.
    pub version: String,
    /// e.g. `HEAD`.
    pub branch: String,
    /// Short git revision.
    pub revision: String,
}

/// Parses the first line of `alloy --version`:
/// `alloy, version v1.18.1 (branch: HEAD, revision: 6012ec4a)`.
pub fn parse_alloy_version(output: &str) -> Option<AlloyBuild> {
    let line = output
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("alloy, version "))?;
    let rest = line.strip_prefix("alloy, version ")?;
    let (version, rest) = rest.split_once(' ')?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    let (branch, revision) = inner.split_once(", ")?;
    Some(AlloyBuild {
        version: version.to_owned(),
        branch: branch.strip_prefix("branch: ")?.to_owned(),
        revision: revision.strip_prefix("revision: ")?.to_owned(),
    })
}

/// Parses the version from a package database query (`dpkg-query -W
/// -f='${Version}'` prints `0.159.0` or `0.159.0-1`; rpm prints `0.159.0`).
pub fn parse_package_version(output: &str) -> Option<String> {
    let v = output.trim();
    if v.is_empty() || v.contains(char::is_whitespace) {
        return None;
    }
    let v = v.split_once(':').map_or(v, |(_, rest)| rest); // Debian epoch
    let upstream = v.rsplit_once('-').map_or(v, |(u, _)| u); // Debian revision
    upstream
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit())
        .then(|| upstream.to_owned())
}

/// A systemd unit's state, as `systemctl is-enabled` / `is-active` print it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnitState {
    /// `is-enabled`: `enabled`, `disabled`, `masked`, `not-found`…
    pub enabled: UnitFileState,
    /// `is-active`: `active`, `inactive`, `failed`…
    pub active: ActiveState,
}

impl UnitState {
    /// Whether systemd would start it at boot or runs it now.
    pub fn in_use(&self) -> bool {
        self.enabled == UnitFileState::Enabled
            || matches!(self.active, ActiveState::Active | ActiveState::Activating)
    }
}

/// Why a probe got no answer; its text is what detection records
/// (`version_error`, `running_error`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The command could not be started or waited for.
    #[error("cannot run {command}: {reason}")]
    Spawn {
        /// The executable.
        command: String,
        /// Why.
        reason: String,
    },
    /// It ran and failed.
    #[error("{command} failed: {output}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// It did not finish in time (it was killed).
    #[error("{command} did not finish within {after:?}")]
    Timeout {
        /// The executable.
        command: String,
        /// The bound.
        after: std::time::Duration,
    },
    /// An HTTP probe got no usable answer.
    #[error(transparent)]
    Http(#[from] probe::HttpError),
    /// Detection could not run at all.
    #[error("detection unavailable")]
    Unavailable,
}

/// The I/O detection needs, injected so [`detect`] is testable.
pub trait Probes {
    /// Whether `path` is an executable regular file.
    fn is_executable(&self, path: &Path) -> bool;
    /// `name` resolved through `PATH`.
    fn which(&self, name: &str) -> Option<PathBuf>;
    /// Output (stdout then stderr) of `exe args…`, or why it failed.
    fn run(&self, exe: &Path, args: &[&str]) -> Result<String, ProbeError>;
    /// Installed version of a package from dpkg or rpm.
    fn package_version(&self, package: &str) -> Option<String>;
    /// Version recorded by `install-opamp.sh` for `name`.
    fn install_record(&self, name: &str) -> Option<String>;
    /// State of a systemd unit, `None` without systemd.
    fn unit(&self, unit: &str) -> Option<UnitState>;
    /// Contents of a text file.
    fn read_file(&self, path: &Path) -> Option<String>;
    /// Body of `GET http://{addr}{path}`, or why it failed.
    fn http_get(&self, addr: &str, path: &str) -> Result<String, ProbeError>;
}

/// Where an executable was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The configured `[runtime]` path.
    Config,
    /// `PATH`.
    Path,
    /// A package's install path.
    Package,
}

/// Where an executable's version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VersionSource {
    /// Its own `--version` output.
    #[serde(rename = "--version")]
    VersionFlag,
    /// The package database (dpkg or rpm).
    #[serde(rename = "package")]
    Package,
    /// The install record `install-opamp.sh` writes.
    #[serde(rename = "install record")]
    InstallRecord,
}

impl std::fmt::Display for VersionSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::VersionFlag => "--version",
            Self::Package => "package",
            Self::InstallRecord => "install record",
        })
    }
}

/// One executable found on the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Executable {
    /// Its path.
    pub path: PathBuf,
    /// How it was found.
    pub origin: Origin,
    /// Its version, when known.
    pub version: Option<String>,
    /// Where the version came from.
    pub version_source: Option<VersionSource>,
    /// Why the version is unknown.
    pub version_error: Option<String>,
    /// Its packaged systemd unit, when systemd is present.
    pub unit: Option<UnitState>,
}

/// Grafana Alloy as found on the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AlloyInfo {
    /// The executable.
    pub executable: Executable,
    /// Build information of the installed binary.
    pub build: Option<AlloyBuild>,
    /// The configuration file in use.
    pub config_file: PathBuf,
    /// Its `remotecfg` block, if any.
    pub remotecfg: Option<alloy::RemoteCfg>,
    /// The version the running Alloy reports (`alloy_build_info`), if reachable.
    pub running_version: Option<String>,
    /// Why the running version is unknown.
    pub running_error: Option<String>,
    /// Installed and running versions differ: upgraded but not restarted.
    pub restart_pending: bool,
}

/// Something on the host that will cause trouble.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Conflict {
    /// Stable identifier.
    pub code: std::borrow::Cow<'static, str>,
    /// What and how to fix it.
    pub message: String,
}

/// Everything detection found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    /// The runtime the agent will manage (`none` when nothing usable).
    pub kind: RuntimeKind,
    /// otelcol-contrib.
    pub collector: Option<Executable>,
    /// opampsupervisor.
    pub supervisor: Option<Executable>,
    /// Grafana Alloy.
    pub alloy: Option<AlloyInfo>,
    /// Conflicts found.
    pub conflicts: Vec<Conflict>,
    /// Configuration that did not match the host (a configured path missing…).
    pub notes: Vec<String>,
}

/// Detects the runtimes. Pure given `probes`.
pub fn detect(settings: &RuntimeSettings, probes: &dyn Probes) -> Detection {
    let mut notes = Vec::new();
    let collector = find(
        &settings.collector,
        "otelcol-contrib",
        PACKAGE_PATHS_COLLECTOR,
        probes,
        &mut notes,
    )
    .map(|(path, origin)| {
        let mut e = executable(path, origin, probes, UNIT_COLLECTOR);
        match probes.run(&e.path, &["--version"]) {
            Ok(out) => match parse_otelcol_version(&out) {
                Some((_, v)) => {
                    e.version = Some(v);
                    e.version_source = Some(VersionSource::VersionFlag);
                }
                None => {
                    e.version_error = Some(format!(
                        "unrecognised --version output: {:?}",
                        first_line(&out)
                    ))
                }
            },
            Err(err) => e.version_error = Some(err.to_string()),
        }
        e
    });
    let supervisor = find(&settings.supervisor, "opampsupervisor", PACKAGE_PATHS_SUPERVISOR, probes, &mut notes)
        .map(|(path, origin)| {
            // opampsupervisor has no --version: ask the package database,
            // then the install record of install-opamp.sh.
            let mut e = executable(path, origin, probes, UNIT_SUPERVISOR);
            if let Some(v) = probes.package_version("opampsupervisor") {
                e.version = Some(v);
                e.version_source = Some(VersionSource::Package);
            } else if let Some(v) = probes.install_record("opampsupervisor") {
                e.version = Some(v);
                e.version_source = Some(VersionSource::InstallRecord);
            } else {
                e.version_error = Some("opampsupervisor has no --version and no package or install record names its version".into());
            }
            e
        });
    let alloy = find(
        &settings.alloy,
        "alloy",
        PACKAGE_PATHS_ALLOY,
        probes,
        &mut notes,
    )
    .map(|(path, origin)| alloy::inspect(executable(path, origin, probes, UNIT_ALLOY), probes));

    let kind = match settings.kind {
        RuntimeChoice::Auto if collector.is_some() && supervisor.is_some() => RuntimeKind::Otelcol,
        RuntimeChoice::Auto if alloy.is_some() => RuntimeKind::Alloy,
        RuntimeChoice::Auto => RuntimeKind::None,
        RuntimeChoice::Only(k) => k,
    };
    if settings.kind == RuntimeChoice::Only(RuntimeKind::Otelcol)
        && (collector.is_none() || supervisor.is_none())
    {
        notes.push("runtime.kind is otelcol but opampsupervisor or otelcol-contrib is missing: install them with install-opamp.sh".into());
    }
    if settings.kind == RuntimeChoice::Only(RuntimeKind::Alloy) && alloy.is_none() {
        notes.push("runtime.kind is alloy but no alloy executable was found".into());
    }

    let mut conflicts = Vec::new();
    if kind == RuntimeKind::Otelcol {
        if let Some(u) = collector
            .as_ref()
            .and_then(|c| c.unit.as_ref())
            .filter(|u| u.in_use())
        {
            conflicts.push(Conflict {
                code: "standalone_collector_service".into(),
                message: format!(
                    "{UNIT_COLLECTOR} is {}/{} beside the supervised collector: two collectors fight over ports; run `systemctl disable --now {UNIT_COLLECTOR}`",
                    u.enabled, u.active
                ),
            });
        }
        if let Some(u) = supervisor
            .as_ref()
            .and_then(|s| s.unit.as_ref())
            .filter(|u| u.in_use())
        {
            conflicts.push(Conflict {
                code: "standalone_supervisor_service".into(),
                message: format!(
                    "{UNIT_SUPERVISOR} is {}/{} while linkmesh-agent runs the supervisor: run `systemctl disable --now {UNIT_SUPERVISOR}`",
                    u.enabled, u.active
                ),
            });
        }
    }
    Detection {
        kind,
        collector,
        supervisor,
        alloy,
        conflicts,
        notes,
    }
}

fn executable(path: PathBuf, origin: Origin, probes: &dyn Probes, unit: &str) -> Executable {
    Executable {
        path,
        origin,
        version: None,
        version_source: None,
        version_error: None,
        unit: probes.unit(unit),
    }
}

/// Finds an executable: configured path, `PATH`, package paths.
fn find(
    configured: &Path,
    name: &str,
    package_paths: &[&str],
    probes: &dyn Probes,
    notes: &mut Vec<String>,
) -> Option<(PathBuf, Origin)> {
    if probes.is_executable(configured) {
        return Some((configured.to_owned(), Origin::Config));
    }
    let default = package_paths.first().map(Path::new);
    let explicit = default != Some(configured);
    let found = probes
        .which(name)
        .filter(|p| probes.is_executable(p))
        .map(|p| (p, Origin::Path))
        .or_else(|| {
            package_paths
                .iter()
                .map(PathBuf::from)
                .find(|p| probes.is_executable(p))
                .map(|p| (p, Origin::Package))
        });
    if explicit {
        notes.push(match &found {
            Some((p, _)) => format!(
                "configured {name} {} is not an executable file; using {}",
                configured.display(),
                p.display()
            ),
            None => format!(
                "configured {name} {} is not an executable file",
                configured.display()
            ),
        });
    }
    found
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{DEFAULT_ALLOY, DEFAULT_COLLECTOR, DEFAULT_SUPERVISOR};

    /// Version outputs recorded in shared/reference/runtimes.md.
    const OTELCOL_OUT: &str = "otelcol-contrib version 0.159.0\n";
    const ALLOY_OUT: &str = "alloy, version v1.18.1 (branch: HEAD, revision: 6012ec4a)\n  build user:       root@buildkitsandbox\n  build date:       2026-08-06T13:11:14Z\n  go version:       go1.26.1\n  platform:         linux/amd64\n  tags:             netgo,builtinassets\n";
    const SUPERVISOR_VERSION_OUT: &str = "flag provided but not defined: -version\nUsage of opampsupervisor:\n  -config string\n    \tPath to a supervisor configuration file\n";

    #[derive(Default)]
    struct Fake {
        files: BTreeMap<PathBuf, String>,
        exes: BTreeMap<PathBuf, Result<String, ProbeError>>,
        path: BTreeMap<&'static str, PathBuf>,
        packages: BTreeMap<&'static str, String>,
        records: BTreeMap<&'static str, String>,
        units: BTreeMap<&'static str, UnitState>,
        http: Option<Result<String, ProbeError>>,
    }

    impl Probes for Fake {
        fn is_executable(&self, p: &Path) -> bool {
            self.exes.contains_key(p)
        }
        fn which(&self, name: &str) -> Option<PathBuf> {
            self.path.get(name).cloned()
        }
        fn run(&self, exe: &Path, args: &[&str]) -> Result<String, ProbeError> {
            assert_eq!(args, ["--version"]);
            self.exes
                .get(exe)
                .cloned()
                .unwrap_or(Err(ProbeError::Spawn {
                    command: exe.display().to_string(),
                    reason: "not found".into(),
                }))
        }
        fn package_version(&self, p: &str) -> Option<String> {
            self.packages.get(p).cloned()
        }
        fn install_record(&self, n: &str) -> Option<String> {
            self.records.get(n).cloned()
        }
        fn unit(&self, u: &str) -> Option<UnitState> {
            self.units.get(u).cloned()
        }
        fn read_file(&self, p: &Path) -> Option<String> {
            self.files.get(p).cloned()
        }
        fn http_get(&self, addr: &str, path: &str) -> Result<String, ProbeError> {
            assert_eq!((addr, path), ("127.0.0.1:12345", "/metrics"));
            self.http
                .clone()
                .unwrap_or(Err(ProbeError::Http(probe::HttpError::Io {
                    kind: std::io::ErrorKind::ConnectionRefused,
                    reason: "connection refused".into(),
                })))
        }
    }

    fn settings(kind: RuntimeChoice) -> RuntimeSettings {
        RuntimeSettings {
            kind,
            mode: crate::config::RuntimeMode::Auto,
            supervisor: DEFAULT_SUPERVISOR.into(),
            collector: DEFAULT_COLLECTOR.into(),
            collector_config: crate::config::DEFAULT_COLLECTOR_CONFIG.into(),
            alloy: DEFAULT_ALLOY.into(),
        }
    }

    fn unit(enabled: &str, active: &str) -> UnitState {
        UnitState {
            enabled: UnitFileState::parse(enabled),
            active: ActiveState::parse(active),
        }
    }

    fn otel_host() -> Fake {
        let mut f = Fake::default();
        f.exes
            .insert(DEFAULT_COLLECTOR.into(), Ok(OTELCOL_OUT.into()));
        f.exes
            .insert(DEFAULT_SUPERVISOR.into(), Ok(SUPERVISOR_VERSION_OUT.into()));
        f.packages.insert("opampsupervisor", "0.159.0".into());
        f
    }

    #[test]
    fn version_outputs() {
        assert_eq!(
            parse_otelcol_version(OTELCOL_OUT),
            Some(("otelcol-contrib".into(), "0.159.0".into()))
        );
        assert_eq!(
            parse_otelcol_version("otelcol-contrib version 0.130.1"),
            Some(("otelcol-contrib".into(), "0.130.1".into()))
        );
        assert_eq!(parse_otelcol_version(SUPERVISOR_VERSION_OUT), None);
        assert_eq!(parse_otelcol_version(""), None);
        let b = parse_alloy_version(ALLOY_OUT).unwrap();
        assert_eq!(
            (b.version.as_str(), b.branch.as_str(), b.revision.as_str()),
            ("v1.18.1", "HEAD", "6012ec4a")
        );
        assert_eq!(parse_alloy_version("alloy version 1.0"), None);
        assert_eq!(parse_package_version("0.159.0-1\n"), Some("0.159.0".into()));
        assert_eq!(parse_package_version("1:0.159.0-2"), Some("0.159.0".into()));
        assert_eq!(
            parse_package_version("package opampsupervisor is not installed"),
            None
        );
    }

    #[test]
    fn supervised_otelcol_from_package_paths() {
        let d = detect(&settings(RuntimeChoice::Auto), &otel_host());
        assert_eq!(d.kind, RuntimeKind::Otelcol);
        let c = d.collector.unwrap();
        assert_eq!(
            (c.version.as_deref(), c.origin),
            (Some("0.159.0"), Origin::Config)
        );
        let s = d.supervisor.unwrap();
        assert_eq!(
            (s.version.as_deref(), s.version_source),
            (Some("0.159.0"), Some(VersionSource::Package))
        );
        assert!(d.conflicts.is_empty() && d.notes.is_empty());
    }

    #[test]
    fn supervisor_version_from_install_record_else_unknown() {
        let mut f = otel_host();
        f.packages.clear();
        f.records.insert("opampsupervisor", "0.158.0".into());
        let s = detect(&settings(RuntimeChoice::Auto), &f)
            .supervisor
            .unwrap();
        assert_eq!(
            (s.version.as_deref(), s.version_source),
            (Some("0.158.0"), Some(VersionSource::InstallRecord))
        );
        // Detection's JSON names the source in the words it always used.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["version_source"], "install record");
        f.records.clear();
        let s = detect(&settings(RuntimeChoice::Auto), &f)
            .supervisor
            .unwrap();
        assert_eq!(s.version, None);
        assert!(s.version_error.unwrap().contains("no --version"));
    }

    #[test]
    fn path_lookup_when_the_configured_path_is_missing() {
        let mut f = Fake::default();
        f.exes
            .insert("/opt/otel/otelcol-contrib".into(), Ok(OTELCOL_OUT.into()));
        f.path
            .insert("otelcol-contrib", "/opt/otel/otelcol-contrib".into());
        f.exes
            .insert("/usr/local/bin/opampsupervisor".into(), Ok(String::new()));
        f.path
            .insert("opampsupervisor", "/usr/local/bin/opampsupervisor".into());
        let mut s = settings(RuntimeChoice::Auto);
        s.collector = "/srv/custom/otelcol".into();
        let d = detect(&s, &f);
        assert_eq!(d.kind, RuntimeKind::Otelcol);
        assert_eq!(d.collector.as_ref().map(|c| c.origin), Some(Origin::Path));
        assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
        assert!(d.notes[0].contains(
            "/srv/custom/otelcol is not an executable file; using /opt/otel/otelcol-contrib"
        ));
    }

    #[test]
    fn standalone_services_beside_the_supervisor_are_flagged() {
        let mut f = otel_host();
        f.units.insert(UNIT_COLLECTOR, unit("enabled", "active"));
        f.units
            .insert(UNIT_SUPERVISOR, unit("disabled", "inactive"));
        let d = detect(&settings(RuntimeChoice::Auto), &f);
        let codes: Vec<_> = d.conflicts.iter().map(|c| c.code.as_ref()).collect();
        assert_eq!(codes, ["standalone_collector_service"]);
        assert!(
            d.conflicts[0]
                .message
                .contains("systemctl disable --now otelcol-contrib.service")
        );
        f.units.insert(UNIT_COLLECTOR, unit("disabled", "inactive"));
        f.units.insert(UNIT_SUPERVISOR, unit("enabled", "inactive"));
        let d = detect(&settings(RuntimeChoice::Auto), &f);
        let codes: Vec<_> = d.conflicts.iter().map(|c| c.code.as_ref()).collect();
        assert_eq!(codes, ["standalone_supervisor_service"]);
    }

    #[test]
    fn a_collector_without_supervisor_is_not_the_otelcol_runtime() {
        let mut f = otel_host();
        f.exes.remove(Path::new(DEFAULT_SUPERVISOR));
        let d = detect(&settings(RuntimeChoice::Auto), &f);
        assert_eq!(d.kind, RuntimeKind::None);
        let d = detect(&settings(RuntimeChoice::Only(RuntimeKind::Otelcol)), &f);
        assert_eq!(d.kind, RuntimeKind::Otelcol);
        assert!(d.notes[0].contains("install-opamp.sh"));
    }

    #[test]
    fn alloy_upgraded_but_not_restarted() {
        let mut f = Fake::default();
        f.exes.insert(DEFAULT_ALLOY.into(), Ok(ALLOY_OUT.into()));
        f.files.insert(
            "/etc/default/alloy".into(),
            "CONFIG_FILE=\"/etc/alloy/config.alloy\"\nCUSTOM_ARGS=\"\"\n".into(),
        );
        f.files.insert(
            "/etc/alloy/config.alloy".into(),
            "remotecfg {\n  url = \"https://fm.example\"\n  id = constants.hostname\n}\n".into(),
        );
        f.http = Some(Ok(
            "alloy_build_info{branch=\"HEAD\",version=\"v1.17.0\"} 1\n".into(),
        ));
        let d = detect(&settings(RuntimeChoice::Auto), &f);
        assert_eq!(d.kind, RuntimeKind::Alloy);
        let a = d.alloy.unwrap();
        assert_eq!(a.executable.version.as_deref(), Some("v1.18.1"));
        assert_eq!(a.running_version.as_deref(), Some("v1.17.0"));
        assert!(a.restart_pending);
        let r = a.remotecfg.unwrap();
        assert_eq!(
            (r.url.as_deref(), r.id.as_deref()),
            (Some("https://fm.example"), Some("constants.hostname"))
        );

        f.http = None;
        let a = detect(&settings(RuntimeChoice::Auto), &f).alloy.unwrap();
        assert_eq!(a.running_version, None);
        assert!(!a.restart_pending);
        assert!(a.running_error.unwrap().contains("connection refused"));
    }

    #[test]
    fn nothing_installed() {
        let d = detect(&settings(RuntimeChoice::Auto), &Fake::default());
        assert_eq!(d.kind, RuntimeKind::None);
        assert!(d.collector.is_none() && d.supervisor.is_none() && d.alloy.is_none());
    }
}
