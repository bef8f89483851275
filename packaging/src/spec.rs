//! `packaging/package.toml`: the one description both packages are built
//! from, read, checked and resolved into a [`Package`] (every file's bytes
//! in memory, every maintainer script assembled).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A problem with the description or a file it names.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    summary: String,
    description: String,
    maintainer: String,
    homepage: String,
    license: String,
    release: String,
    deb: DebMeta,
    rpm: RpmMeta,
    files: Vec<RawFile>,
    #[serde(default)]
    dirs: Vec<RawDir>,
    scripts: RawScripts,
}

/// Fields only the .deb has.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebMeta {
    pub section: String,
    pub priority: String,
    pub depends: Vec<String>,
}

/// Fields only the .rpm has.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RpmMeta {
    pub group: String,
    pub requires: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    source: String,
    dest: String,
    mode: String,
    #[serde(default)]
    config: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDir {
    dest: String,
    mode: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScripts {
    common: String,
    deb: DebScripts<String>,
    rpm: RpmScripts<String>,
}

/// The deb maintainer scripts (paths in the description, text once resolved).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DebScripts<T> {
    pub preinst: T,
    pub postinst: T,
    pub prerm: T,
    pub postrm: T,
}

/// The rpm scriptlets (paths in the description, text once resolved).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RpmScripts<T> {
    pub pre: T,
    pub post: T,
    pub preun: T,
    pub postun: T,
}

/// One regular file of the package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// Absolute path on the installed host.
    pub dest: String,
    pub mode: u32,
    /// A configuration file: never replaced once edited.
    pub config: bool,
    pub data: Vec<u8>,
}

/// One directory the package owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub dest: String,
    pub mode: u32,
}

/// Everything needed to write either package.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    /// Upstream version (the agent's own, X.Y.Z).
    pub version: String,
    pub release: String,
    pub summary: String,
    pub description: String,
    pub maintainer: String,
    pub homepage: String,
    pub license: String,
    pub deb: DebMeta,
    pub rpm: RpmMeta,
    pub files: Vec<FileEntry>,
    pub dirs: Vec<DirEntry>,
    pub deb_scripts: DebScripts<String>,
    pub rpm_scripts: RpmScripts<String>,
    /// Timestamp of every file and of the build (seconds since the epoch).
    pub source_date: u64,
}

/// The word in `source` that stands for the binary given on the command line.
pub const BINARY_SOURCE: &str = "@binary";

impl Package {
    /// Reads the description at `spec_path` and every file it names.
    pub fn load(
        spec_path: &Path,
        binary: &Path,
        version: &str,
        source_date: u64,
    ) -> Result<Self, SpecError> {
        let text = read_string(spec_path)?;
        let base = spec_path.parent().unwrap_or(Path::new("."));
        let raw: RawSpec = toml::from_str(&text).map_err(|e| SpecError::Invalid {
            path: spec_path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| SpecError::Invalid {
            path: spec_path.to_owned(),
            message,
        };
        validate_name(&raw.name).map_err(&invalid)?;
        validate_version(version).map_err(&invalid)?;
        if raw.release.is_empty() || !raw.release.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(invalid(format!(
                "release {:?} must be letters and digits only",
                raw.release
            )));
        }

        let mut files = Vec::with_capacity(raw.files.len());
        for f in &raw.files {
            validate_dest(&f.dest).map_err(&invalid)?;
            let mode = parse_mode(&f.mode).map_err(|m| invalid(format!("{}: {m}", f.dest)))?;
            let source = if f.source == BINARY_SOURCE {
                binary.to_owned()
            } else {
                base.join(&f.source)
            };
            let data = std::fs::read(&source).map_err(|e| SpecError::Read {
                path: source.clone(),
                source: e,
            })?;
            files.push(FileEntry {
                dest: f.dest.clone(),
                mode,
                config: f.config,
                data,
            });
        }
        let mut dirs = Vec::with_capacity(raw.dirs.len());
        for d in &raw.dirs {
            validate_dest(&d.dest).map_err(&invalid)?;
            let mode = parse_mode(&d.mode).map_err(|m| invalid(format!("{}: {m}", d.dest)))?;
            dirs.push(DirEntry {
                dest: d.dest.clone(),
                mode,
            });
        }
        for r in &raw.rpm.requires {
            parse_requirement(r).map_err(|m| invalid(format!("rpm.requires: {m}")))?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for dest in files
            .iter()
            .map(|f| &f.dest)
            .chain(dirs.iter().map(|d| &d.dest))
        {
            if !seen.insert(dest.as_str()) {
                return Err(invalid(format!("{dest} is listed twice")));
            }
        }

        let common = read_string(&base.join(&raw.scripts.common))?;
        let script = |rel: &str| -> Result<String, SpecError> {
            let body = read_string(&base.join(rel))?;
            Ok(assemble_script(
                &raw.scripts.common,
                &common,
                rel,
                &body,
                version,
            ))
        };
        Ok(Self {
            deb_scripts: DebScripts {
                preinst: script(&raw.scripts.deb.preinst)?,
                postinst: script(&raw.scripts.deb.postinst)?,
                prerm: script(&raw.scripts.deb.prerm)?,
                postrm: script(&raw.scripts.deb.postrm)?,
            },
            rpm_scripts: RpmScripts {
                pre: script(&raw.scripts.rpm.pre)?,
                post: script(&raw.scripts.rpm.post)?,
                preun: script(&raw.scripts.rpm.preun)?,
                postun: script(&raw.scripts.rpm.postun)?,
            },
            name: raw.name,
            version: version.to_owned(),
            release: raw.release,
            summary: raw.summary,
            description: raw.description.trim().to_owned(),
            maintainer: raw.maintainer,
            homepage: raw.homepage,
            license: raw.license,
            deb: raw.deb,
            rpm: raw.rpm,
            files,
            dirs,
            source_date,
        })
    }

    /// Files marked as configuration.
    pub fn config_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.config)
    }
}

fn read_string(path: &Path) -> Result<String, SpecError> {
    std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.to_owned(),
        source: e,
    })
}

/// One maintainer script: the package's version (`LM_VERSION`, which the
/// server-first check judges), the shared functions, then the format's
/// dispatch.
pub fn assemble_script(
    common_name: &str,
    common: &str,
    name: &str,
    body: &str,
    version: &str,
) -> String {
    format!(
        "#!/bin/sh\n# Generated by linkmesh-package from packaging/{common_name} and packaging/{name}.\nset -e\n\nLM_VERSION={version}\n\n{common}\n{body}"
    )
}

/// Octal permission bits, as written in the description ("0755").
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s, 8).map_err(|_| format!("mode {s:?} is not octal"))?;
    if mode > 0o7777 {
        return Err(format!("mode {s:?} has bits beyond 07777"));
    }
    Ok(mode)
}

fn validate_dest(dest: &str) -> Result<(), String> {
    if !dest.starts_with('/') || dest.len() < 2 || dest.ends_with('/') {
        return Err(format!(
            "dest {dest:?} must be an absolute path without a trailing slash"
        ));
    }
    if dest.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!("dest {dest:?} must not contain . or .."));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?}: lower-case letters, digits, + - . only, starting with a letter"
        ))
    }
}

/// A version constraint: (operator, version).
pub type Constraint<'a> = (&'a str, &'a str);

/// A requirement as written in the description: `NAME` or `NAME OP VERSION`.
pub fn parse_requirement(s: &str) -> Result<(&str, Option<Constraint<'_>>), String> {
    match s.split_whitespace().collect::<Vec<_>>().as_slice() {
        [name] => Ok((name, None)),
        [name, op, version] if ["=", "<", "<=", ">", ">="].contains(op) => {
            Ok((name, Some((op, version))))
        }
        _ => Err(format!(
            "{s:?} must be NAME or NAME OP VERSION with OP one of = < <= > >="
        )),
    }
}

/// Versions both formats take without escaping: X.Y.Z of digits.
pub fn validate_version(version: &str) -> Result<(), String> {
    let parts: Vec<&str> = version.split('.').collect();
    if parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    {
        Ok(())
    } else {
        Err(format!("version {version:?} must be X.Y.Z (digits)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_and_bounded() {
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0855").is_err());
        assert!(parse_mode("17777").is_err());
    }

    #[test]
    fn versions_and_names() {
        assert!(validate_version("0.1.0").is_ok());
        assert!(validate_version("10.20.30").is_ok());
        for bad in ["0.1", "0.1.0-rc1", "v0.1.0", "0..1", ""] {
            assert!(validate_version(bad).is_err(), "{bad}");
        }
        assert!(validate_name("linkmesh-agent").is_ok());
        assert!(validate_name("Linkmesh").is_err());
        assert!(validate_name("-x").is_err());
    }

    #[test]
    fn requirements() {
        assert_eq!(parse_requirement("glibc"), Ok(("glibc", None)));
        assert_eq!(
            parse_requirement("glibc >= 2.34"),
            Ok(("glibc", Some((">=", "2.34"))))
        );
        assert!(parse_requirement("glibc => 2.34").is_err());
        assert!(parse_requirement("glibc >=").is_err());
    }

    #[test]
    fn the_installer_asks_for_the_release_this_description_builds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let spec = std::fs::read_to_string(root.join("package.toml")).unwrap();
        let raw: RawSpec = toml::from_str(&spec).unwrap();
        let installer = std::fs::read_to_string(root.join("../install/install.sh")).unwrap();
        assert!(
            installer.contains(&format!("\nPKG_RELEASE={}\n", raw.release)),
            "install/install.sh PKG_RELEASE must match packaging/package.toml release"
        );
    }

    #[test]
    fn dest_paths() {
        assert!(validate_dest("/usr/bin/x").is_ok());
        for bad in ["usr/bin/x", "/", "/etc/", "/etc/../x"] {
            assert!(validate_dest(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scripts_put_the_shared_functions_first() {
        let s = assemble_script(
            "scripts/common.sh",
            "f() { :; }\n",
            "scripts/deb/postinst",
            "f\n",
            "0.3.1",
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        let f = s.find("f() { :; }").unwrap_or(usize::MAX);
        let call = s.rfind("\nf\n").unwrap_or(0);
        assert!(s.contains("\nset -e\n"));
        assert!(s.contains("\nLM_VERSION=0.3.1\n"), "{s}");
        assert!(f < call, "{s}");
    }

    #[test]
    fn the_real_description_loads_and_names_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("agent");
        std::fs::write(&bin, b"\x7fELF stand-in").unwrap();
        let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("package.toml");
        let p = Package::load(&spec, &bin, "1.2.3", 1_700_000_000).unwrap();
        assert_eq!(p.name, "linkmesh-agent");
        let agent = p
            .files
            .iter()
            .find(|f| f.dest == "/usr/bin/linkmesh-agent")
            .unwrap();
        assert_eq!(agent.data, b"\x7fELF stand-in");
        assert_eq!(agent.mode, 0o755);
        let conf: Vec<_> = p.config_files().map(|f| f.dest.as_str()).collect();
        assert_eq!(
            conf,
            ["/etc/linkmesh/agent.toml", "/etc/linkmesh/collector.yaml"]
        );
        assert!(p.deb_scripts.postinst.contains("lm_configure deb"));
        assert!(p.rpm_scripts.post.contains("lm_configure rpm"));
        assert!(p.deb_scripts.postrm.contains("lm_purge"));
        assert!(
            !p.rpm_scripts.postun.contains("lm_purge\n"),
            "rpm has no purge"
        );
    }

    #[test]
    fn bad_descriptions_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("package.toml");
        std::fs::write(&spec, "name = \"x\"\nsurprise = 1\n").unwrap();
        let e = Package::load(&spec, &spec, "1.2.3", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("package.toml") && e.contains("surprise"), "{e}");
        let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("package.toml");
        let e = Package::load(&real, Path::new("/nonexistent/agent"), "1.2.3", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/agent"), "{e}");
        let e = Package::load(&real, &real, "1.2", 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("X.Y.Z"), "{e}");
    }
}
