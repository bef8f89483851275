//! Signed package repositories generated from the release artifacts: a
//! Debian repository (`apt/`) and an RPM repository (`yum/`), so
//! `apt-get upgrade` and `dnf upgrade` reach the fleet's packages.
//!
//! The formats come from the tools made for them: `apt-ftparchive` (Debian's
//! apt-utils) writes `Packages` and `Release`, `createrepo_c` writes
//! `repodata/`. Everything is signed here with the archive keys
//! ([`keys`]): `InRelease` (cleartext), `Release.gpg` and `repomd.xml.asc`
//! (detached), and every RPM's header (so `gpgcheck=1` holds).
//!
//! A generation is built in a scratch directory beside the published ones
//! and only then named `gen-N`; requests are answered from the newest
//! complete one. It is rebuilt when the `.deb` and `.rpm` files in the
//! artifacts directory change (names, sizes, modification times), checked
//! when a client asks for metadata, so a package published a moment ago is
//! in the next `apt-get update`. The previous generation stays on disk for
//! clients in the middle of a download.

pub mod keys;

use std::{
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Instant,
};

pub use keys::{ArchiveKeys, KeyError};

/// The generated repositories' directory inside a state directory (not
/// backed up: it is rebuilt from the artifacts).
pub const REPOSITORIES_DIR: &str = "repositories";

/// The Debian suite and component served.
pub const SUITE: &str = "stable";
/// The component.
pub const COMPONENT: &str = "main";
/// The architectures the Debian repository lists (an empty index for one
/// without packages).
pub const DEB_ARCHES: [&str; 2] = ["amd64", "arm64"];

/// Failures generating the repositories.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A tool the format needs is not installed.
    #[error(
        "{tool} is needed to serve the {format} repository and was not found on PATH: install the Debian package {package} (scripts/install-test-deps does)"
    )]
    ToolMissing {
        /// The command.
        tool: &'static str,
        /// Which repository.
        format: &'static str,
        /// The Debian package providing it.
        package: &'static str,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: &'static str,
        /// Its exit status.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// A file.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// An RPM in the artifacts could not be signed.
    #[error("cannot sign {path}: {reason} (is it an RPM?)")]
    Rpm {
        /// The package.
        path: String,
        /// Why.
        reason: String,
    },
    /// Signing.
    #[error(transparent)]
    Keys(#[from] KeyError),
}

fn io(path: &Path, e: impl std::fmt::Display) -> RepoError {
    RepoError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// What a generation was built from: every `.deb` and `.rpm` in the
/// artifacts directory with its size, modification time and inode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs(Vec<(String, u64, i64, i64, u64)>);

impl Inputs {
    /// Reads `dir` (a missing directory has none).
    ///
    /// # Errors
    /// When it cannot be listed.
    pub fn scan(dir: &Path) -> Result<Self, RepoError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self(out)),
            Err(e) => return Err(io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !(name.ends_with(".deb") || name.ends_with(".rpm")) {
                continue;
            }
            // Regular files only, never through a symlink.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.is_file() {
                out.push((
                    name,
                    meta.len(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ino(),
                ));
            }
        }
        out.sort();
        Ok(Self(out))
    }

    fn names<'a>(&'a self, ext: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .map(|(n, ..)| n.as_str())
            .filter(move |n| n.ends_with(ext))
    }
}

/// The tools, found once.
#[derive(Clone, Debug)]
struct Tools {
    ftparchive: Option<PathBuf>,
    createrepo: Option<PathBuf>,
}

impl Tools {
    fn find() -> Self {
        Self {
            ftparchive: which::which("apt-ftparchive").ok(),
            createrepo: which::which("createrepo_c").ok(),
        }
    }
}

struct Generation {
    inputs: Inputs,
    dir: PathBuf,
    n: u64,
}

/// The repositories of one artifacts directory.
pub struct Repositories {
    artifacts: PathBuf,
    out: PathBuf,
    keys: ArchiveKeys,
    keyring: Vec<u8>,
    keyring_armored: String,
    tools: Tools,
    current: Mutex<Option<Generation>>,
}

impl std::fmt::Debug for Repositories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repositories")
            .field("artifacts", &self.artifacts)
            .field("out", &self.out)
            .finish_non_exhaustive()
    }
}

/// Runs `cmd`, returning its standard output.
fn run(tool: &'static str, cmd: &mut Command) -> Result<Vec<u8>, RepoError> {
    let out = cmd.output().map_err(|e| RepoError::Tool {
        tool,
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(RepoError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), RepoError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    std::fs::write(path, bytes).map_err(|e| io(path, e))
}

/// A hard link when the artifacts share the file system, else a copy.
fn place(from: &Path, to: &Path) -> Result<(), RepoError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    }
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map(|_| ()).map_err(|e| io(from, e))
}

/// Fsyncs every regular file below `dir`, then each directory.
fn fsync_tree(dir: &Path) -> Result<(), RepoError> {
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| io(&path, e))?;
        if kind.is_dir() {
            fsync_tree(&path)?;
        } else if kind.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&path, e))?;
        }
    }
    linkmesh_agent::fs::fsync_dir(dir).map_err(|e| io(dir, e))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes)?;
    enc.finish()
}

impl Repositories {
    /// The repositories of `artifacts`, generated into `out` (made 0700;
    /// what an earlier server left there is removed) and signed with `keys`.
    ///
    /// # Errors
    /// When `out` cannot be made or cleared.
    pub fn new(artifacts: &Path, out: &Path, keys: ArchiveKeys) -> Result<Self, RepoError> {
        linkmesh_agent::fs::ensure_private_dir(out, 0o700).map_err(|e| io(out, e))?;
        for entry in std::fs::read_dir(out).map_err(|e| io(out, e))? {
            let entry = entry.map_err(|e| io(out, e))?;
            std::fs::remove_dir_all(entry.path()).map_err(|e| io(&entry.path(), e))?;
        }
        Ok(Self {
            artifacts: artifacts.to_owned(),
            out: out.to_owned(),
            keyring: keys.keyring()?,
            keyring_armored: keys.keyring_armored()?,
            keys,
            tools: Tools::find(),
            current: Mutex::new(None),
        })
    }

    /// The archive keys that sign, oldest first.
    pub fn keys(&self) -> Vec<keys::KeyRecord> {
        self.keys.records()
    }

    /// The archive keys' public halves, a binary keyring
    /// (`/keys/linkmesh-archive.gpg`).
    pub fn keyring(&self) -> &[u8] {
        &self.keyring
    }

    /// The same, ASCII-armoured (`/keys/linkmesh-archive.asc`).
    pub fn keyring_armored(&self) -> &str {
        &self.keyring_armored
    }

    /// What is missing to serve the packages in the artifacts now (a tool
    /// for a format present), for a warning at start.
    ///
    /// # Errors
    /// When the artifacts cannot be listed.
    pub fn missing_tools(&self) -> Result<Vec<RepoError>, RepoError> {
        let inputs = Inputs::scan(&self.artifacts)?;
        let mut out = Vec::new();
        if inputs.names(".deb").next().is_some() && self.tools.ftparchive.is_none() {
            out.push(ftparchive_missing());
        }
        if inputs.names(".rpm").next().is_some() && self.tools.createrepo.is_none() {
            out.push(createrepo_missing());
        }
        Ok(out)
    }

    /// The newest generation's directory (holding `apt/` and `yum/`),
    /// rebuilt first if the artifacts changed since. Blocking: call it off
    /// the async runtime.
    ///
    /// # Errors
    /// When a rebuild fails; the previous generation is kept but not served,
    /// since it no longer says what the artifacts hold.
    pub fn current(&self) -> Result<PathBuf, RepoError> {
        let inputs = Inputs::scan(&self.artifacts)?;
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(g) = current.as_ref()
            && g.inputs == inputs
        {
            return Ok(g.dir.clone());
        }
        let n = current.as_ref().map_or(1, |g| g.n + 1);
        let started = Instant::now();
        let dir = self.generate(&inputs, n)?;
        tracing::info!(
            generation = n,
            packages = inputs.0.len(),
            ms = started.elapsed().as_millis() as u64,
            "package repositories generated"
        );
        if let Some(old) = current.replace(Generation {
            inputs,
            dir: dir.clone(),
            n,
        }) && old.n > 1
        {
            // The one before the previous: no client is still reading it.
            let older = self.out.join(format!("gen-{}", old.n - 1));
            let _ = std::fs::remove_dir_all(older);
        }
        Ok(dir)
    }

    /// Writes an offline bundle of the repositories to `out`, a directory
    /// that must not exist yet: `apt/`, `yum/` and `keys/` as the server
    /// serves them under those paths, so the directory itself (`file://`)
    /// or any static web server holding it is a mirror for `install.sh
    /// --mirror`. The generation (whole once made) gets the keys, is
    /// fsynced and is renamed to `out`, so `out` is whole or absent; it
    /// must be on the file system of this repositories' output directory.
    /// Its `.deb` files are hard links of the artifacts' where they share
    /// a file system (as served); copy the bundle to carry it away.
    /// Returns the number of packages in it.
    ///
    /// # Errors
    /// When `out` exists, or generating or writing fails.
    pub fn bundle(self, out: &Path) -> Result<usize, RepoError> {
        if out.exists() {
            return Err(RepoError::Io {
                path: out.display().to_string(),
                reason: "already exists: a bundle is written to a new directory (remove it, or name another)".into(),
            });
        }
        let generation = self.current()?;
        write(&generation.join("keys/linkmesh-archive.gpg"), &self.keyring)?;
        write(
            &generation.join("keys/linkmesh-archive.asc"),
            self.keyring_armored.as_bytes(),
        )?;
        fsync_tree(&generation)?;
        std::fs::rename(&generation, out).map_err(|e| io(out, e))?;
        if let Some(parent) = out.parent() {
            let _ = linkmesh_agent::fs::fsync_dir(parent);
        }
        Ok(Inputs::scan(&self.artifacts)?.0.len())
    }

    fn generate(&self, inputs: &Inputs, n: u64) -> Result<PathBuf, RepoError> {
        let build = self.out.join(format!(".build-{n}"));
        let _ = std::fs::remove_dir_all(&build);
        std::fs::create_dir(&build).map_err(|e| io(&build, e))?;
        let result = (|| {
            self.apt(inputs, &build.join("apt"))?;
            self.yum(inputs, &build.join("yum"))?;
            let dir = self.out.join(format!("gen-{n}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&build, &dir).map_err(|e| io(&dir, e))?;
            Ok(dir)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&build);
        }
        result
    }

    /// `apt/`: `pool/main/*.deb`, per architecture `Packages` and
    /// `Packages.gz`, `Release` signed as `InRelease` and `Release.gpg`.
    fn apt(&self, inputs: &Inputs, root: &Path) -> Result<(), RepoError> {
        let debs: Vec<&str> = inputs.names(".deb").collect();
        let Some(tool) = self.tools.ftparchive.as_deref() else {
            if debs.is_empty() {
                // No .deb and no tool: no Debian repository.
                return Ok(());
            }
            return Err(ftparchive_missing());
        };
        let pool = format!("pool/{COMPONENT}");
        for name in &debs {
            place(&self.artifacts.join(name), &root.join(&pool).join(name))?;
        }
        std::fs::create_dir_all(root.join(&pool)).map_err(|e| io(root, e))?;
        let dist = root.join("dists").join(SUITE);
        for arch in DEB_ARCHES {
            let packages = run(
                "apt-ftparchive",
                Command::new(tool)
                    .current_dir(root)
                    .args(["--arch", arch, "packages", "pool"]),
            )?;
            let index = dist.join(COMPONENT).join(format!("binary-{arch}"));
            write(&index.join("Packages"), &packages)?;
            let gz = gzip(&packages).map_err(|e| io(&index, e))?;
            write(&index.join("Packages.gz"), &gz)?;
        }
        let field = |name: &str, value: &str| format!("APT::FTPArchive::Release::{name}={value}");
        let mut cmd = Command::new(tool);
        cmd.current_dir(&dist);
        for (name, value) in [
            ("Origin", "LinkMesh"),
            ("Label", "LinkMesh"),
            ("Suite", SUITE),
            ("Codename", SUITE),
            ("Architectures", &DEB_ARCHES.join(" ")),
            ("Components", COMPONENT),
            ("Description", "LinkMesh agent packages of this fleet"),
        ] {
            cmd.arg("-o").arg(field(name, value));
        }
        let release = run("apt-ftparchive", cmd.args(["release", "."]))?;
        let release = String::from_utf8(release).map_err(|e| io(&dist, e))?;
        write(&dist.join("Release"), release.as_bytes())?;
        write(
            &dist.join("Release.gpg"),
            self.keys.sign_detached(release.as_bytes())?.as_bytes(),
        )?;
        write(
            &dist.join("InRelease"),
            self.keys.clearsign(&release)?.as_bytes(),
        )?;
        Ok(())
    }

    /// `yum/`: `packages/*.rpm` signed with the newest key, `repodata/`
    /// with `repomd.xml.asc` beside `repomd.xml`.
    fn yum(&self, inputs: &Inputs, root: &Path) -> Result<(), RepoError> {
        let rpms: Vec<&str> = inputs.names(".rpm").collect();
        let packages = root.join("packages");
        std::fs::create_dir_all(&packages).map_err(|e| io(&packages, e))?;
        if !rpms.is_empty() {
            let signer = self.keys.rpm_signer()?;
            for name in &rpms {
                let to = packages.join(name);
                std::fs::copy(self.artifacts.join(name), &to).map_err(|e| io(&to, e))?;
                rpm::Package::resign_in_place(&to, &signer).map_err(|e| RepoError::Rpm {
                    path: self.artifacts.join(name).display().to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        let Some(tool) = self.tools.createrepo.as_deref() else {
            if rpms.is_empty() {
                // No RPM and no tool: no RPM repository.
                let _ = std::fs::remove_dir_all(root);
                return Ok(());
            }
            return Err(createrepo_missing());
        };
        run(
            "createrepo_c",
            Command::new(tool)
                .args(["--quiet", "--no-database", "--workers", "1"])
                .arg(root),
        )?;
        let repomd = root.join("repodata").join("repomd.xml");
        let bytes = std::fs::read(&repomd).map_err(|e| io(&repomd, e))?;
        write(
            &root.join("repodata").join("repomd.xml.asc"),
            self.keys.sign_detached(&bytes)?.as_bytes(),
        )?;
        write(
            &root.join("repodata").join("repomd.xml.key"),
            self.keyring_armored.as_bytes(),
        )?;
        Ok(())
    }
}

fn ftparchive_missing() -> RepoError {
    RepoError::ToolMissing {
        tool: "apt-ftparchive",
        format: "Debian",
        package: "apt-utils",
    }
}

fn createrepo_missing() -> RepoError {
    RepoError::ToolMissing {
        tool: "createrepo_c",
        format: "RPM",
        package: "createrepo-c",
    }
}

/// Whether `path` (below `/apt/` or `/yum/`) is one this server could have
/// written: segments of `[A-Za-z0-9._+~-]`, none empty or starting with a
/// dot.
pub fn servable_path(path: &str) -> bool {
    !path.is_empty()
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+~-".contains(&b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_this_server_writes_are_served() {
        for ok in [
            "dists/stable/InRelease",
            "pool/main/linkmesh-agent_0.1.0-1_amd64.deb",
            "repodata/repomd.xml.asc",
            "packages/linkmesh-agent-0.1.0-1.x86_64.rpm",
        ] {
            assert!(servable_path(ok), "{ok}");
        }
        for bad in [
            "",
            "../ca/ca.key.sealed",
            "dists//InRelease",
            ".build-1/apt",
            "dists/stable/",
            "a b",
            "pool/%2e%2e",
        ] {
            assert!(!servable_path(bad), "{bad}");
        }
    }

    #[test]
    fn inputs_see_packages_only_and_a_change_in_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Inputs::scan(&dir.path().join("none")).unwrap(),
            Inputs::default()
        );
        std::fs::write(dir.path().join("a.deb"), b"1").unwrap();
        std::fs::write(dir.path().join("a.deb.sha256"), b"x").unwrap();
        std::fs::write(dir.path().join(".b.rpm.tmp"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("c.rpm")).unwrap();
        let first = Inputs::scan(dir.path()).unwrap();
        assert_eq!(first.names(".deb").collect::<Vec<_>>(), ["a.deb"]);
        assert_eq!(first.names(".rpm").count(), 0);
        std::fs::write(dir.path().join("a.deb"), b"22").unwrap();
        assert_ne!(Inputs::scan(dir.path()).unwrap(), first);
    }
}
