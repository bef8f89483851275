//! The collector configurations the server hands out over OpAMP: a fleet
//! default (`STATE/collector-config/fleet.yaml`) and per-host ones
//! (`STATE/collector-config/hosts/ID.yaml`, which replace the default for
//! that host). `linkmesh-fleet collector-config set` writes them; a running
//! server notices the change and pushes it to connected supervisors.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use crate::{opamp::wire, state::State};

/// The YAML file name of the fleet default.
pub const FLEET_FILE: &str = "fleet.yaml";
/// Largest configuration accepted (the OpAMP message carrying it must fit
/// well within the frame limits of both sides).
pub const MAX_CONFIG_BYTES: usize = 4 << 20;

/// One collector configuration and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteConfig {
    /// The YAML.
    pub body: Arc<[u8]>,
    /// SHA-256 of the body, sent as the OpAMP config hash.
    pub hash: [u8; 32],
}

impl RemoteConfig {
    /// A configuration from its bytes.
    pub fn new(body: Vec<u8>) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, &body);
        let mut hash = [0; 32];
        hash.copy_from_slice(d.as_ref());
        Self {
            body: body.into(),
            hash,
        }
    }

    /// The hash in hex, as `hosts --json` shows it.
    pub fn hash_hex(&self) -> String {
        linkmesh_agent::hex::encode(&self.hash)
    }

    /// The OpAMP message: the instance's own ("") file.
    pub fn to_wire(&self) -> wire::AgentRemoteConfig {
        let file = wire::AgentConfigFile {
            body: self.body.to_vec(),
            content_type: "text/yaml".into(),
        };
        wire::AgentRemoteConfig {
            config: Some(wire::AgentConfigMap {
                config_map: [(String::new(), file)].into_iter().collect(),
            }),
            config_hash: self.hash.to_vec(),
        }
    }
}

/// Every stored configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigSet {
    /// The fleet default.
    pub fleet: Option<RemoteConfig>,
    /// Per-host configurations, by host id.
    pub hosts: BTreeMap<String, RemoteConfig>,
}

impl ConfigSet {
    /// The configuration `host` should run.
    pub fn for_host(&self, host: &str) -> Option<&RemoteConfig> {
        self.hosts.get(host).or(self.fleet.as_ref())
    }

    /// Reads the stored configurations.
    ///
    /// # Errors
    /// When a file exists but cannot be read.
    pub fn load(state: &State) -> Result<Self, ConfigStoreError> {
        let dir = state.collector_config_dir();
        let fleet = read(&dir.join(FLEET_FILE))?.map(RemoteConfig::new);
        let mut hosts = BTreeMap::new();
        let hdir = dir.join("hosts");
        match std::fs::read_dir(&hdir) {
            Ok(entries) => {
                for e in entries {
                    let path = e.map_err(|e| ConfigStoreError::io(&hdir, e))?.path();
                    let Some(id) = host_of(&path) else { continue };
                    if let Some(body) = read(&path)? {
                        hosts.insert(id, RemoteConfig::new(body));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ConfigStoreError::io(&hdir, e)),
        }
        Ok(Self { fleet, hosts })
    }
}

/// What identifies the stored files' current contents cheaply: names,
/// sizes and modification times. A change means [`ConfigSet::load`] again.
pub fn signature(state: &State) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let dir = state.collector_config_dir();
    let mut out = Vec::new();
    for d in [dir.clone(), dir.join("hosts")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(m) = e.metadata()
                && m.is_file()
            {
                out.push((e.path(), m.len(), m.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// Why a configuration was not stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigStoreError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The configuration is not one a collector could take.
    #[error("{file}: {reason}; fix the file (or pass --force to store it anyway)")]
    Invalid {
        /// The file given.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The host is not enrolled.
    #[error("no host {0} is enrolled with this server: see `linkmesh-fleet hosts`")]
    UnknownHost(String),
}

impl ConfigStoreError {
    fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

/// Checks that `body` is a collector configuration in shape: non-empty
/// UTF-8 YAML whose top level is a mapping, within the size bound. (An
/// empty configuration would make the supervisor stop the collector.)
/// Whether the collector accepts its components is for the collector to
/// say: it reports that back as the remote config status.
///
/// # Errors
/// The reason, in words.
pub fn check_shape(body: &[u8]) -> Result<(), String> {
    if body.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "{} bytes is larger than the {} byte limit",
            body.len(),
            MAX_CONFIG_BYTES
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    let docs =
        yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    match docs.as_slice() {
        [yaml_rust2::Yaml::Hash(h)] if !h.is_empty() => Ok(()),
        [] | [yaml_rust2::Yaml::Null] => Err("empty: a collector needs at least one key".into()),
        [yaml_rust2::Yaml::Hash(_)] => {
            Err("empty mapping: a collector needs at least one key".into())
        }
        [_] => Err("the top level is not a mapping of collector sections".into()),
        _ => Err("more than one YAML document".into()),
    }
}

/// Stores `body` as the fleet default (`host` = `None`) or as `host`'s
/// configuration, atomically. Unless `force`, [`check_shape`] first.
///
/// # Errors
/// [`ConfigStoreError`] naming the file and the fix; nothing is written then.
pub fn set(
    state: &State,
    host: Option<&str>,
    file: &Path,
    body: &[u8],
    force: bool,
) -> Result<RemoteConfig, ConfigStoreError> {
    if !force {
        check_shape(body).map_err(|reason| ConfigStoreError::Invalid {
            file: file.to_owned(),
            reason,
        })?;
    }
    let dir = state.collector_config_dir();
    let path = match host {
        None => dir.join(FLEET_FILE),
        Some(id) => {
            let known = state
                .host(id)
                .map_err(|e| ConfigStoreError::io(state.dir(), e))?
                .is_some();
            if !known {
                return Err(ConfigStoreError::UnknownHost(id.to_owned()));
            }
            dir.join("hosts").join(format!("{id}.yaml"))
        }
    };
    let parent = path.parent().unwrap_or(&dir);
    for d in [dir.as_path(), parent] {
        linkmesh_agent::fs::ensure_private_dir(d, 0o700).map_err(|e| ConfigStoreError::io(d, e))?;
    }
    linkmesh_agent::fs::write_atomic(&path, body, 0o600)
        .map_err(|e| ConfigStoreError::io(&path, e))?;
    Ok(RemoteConfig::new(body.to_vec()))
}

fn host_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let id = name.strip_suffix(".yaml")?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        .then(|| id.to_owned())
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, ConfigStoreError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigStoreError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(check_shape(b"receivers:\n  otlp: {}\n").is_ok());
        for (body, want) in [
            (&b""[..], "empty"),
            (b"{}", "empty mapping"),
            (b"- a\n- b\n", "not a mapping"),
            (b"receivers: [unclosed\n", "not valid YAML"),
            (b"a: 1\n---\nb: 2\n", "more than one"),
            (b"\xff\xfe", "not UTF-8"),
        ] {
            let err = check_shape(body).unwrap_err();
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn set_load_and_per_host_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::new(dir.path());
        state.create_layout().unwrap();
        let f = Path::new("collector.yaml");
        let err = set(&state, None, f, b"- x\n", false).unwrap_err();
        assert!(err.to_string().starts_with("collector.yaml: "), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(ConfigSet::load(&state).unwrap(), ConfigSet::default());
        let err = set(&state, Some("h-1"), f, b"a: 1\n", false).unwrap_err();
        assert!(matches!(err, ConfigStoreError::UnknownHost(_)), "{err}");

        let before = signature(&state);
        let fleet = set(&state, None, f, b"a: 1\n", false).unwrap();
        assert_ne!(signature(&state), before);
        let set_ = ConfigSet::load(&state).unwrap();
        assert_eq!(set_.for_host("any"), Some(&fleet));
        // --force stores what the collector will reject, to exercise that path.
        let forced = set(&state, None, f, b"[unclosed\n", true).unwrap();
        assert_eq!(ConfigSet::load(&state).unwrap().fleet, Some(forced));
        assert_eq!(
            std::fs::metadata(state.collector_config_dir().join(FLEET_FILE))
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                .unwrap(),
            0o600
        );
        assert_eq!(
            host_of(Path::new("/x/hosts/ab-12.yaml")).as_deref(),
            Some("ab-12")
        );
        assert_eq!(host_of(Path::new("/x/hosts/.yaml")), None);
        assert_eq!(host_of(Path::new("/x/hosts/a.yaml.tmp")), None);
    }
}
