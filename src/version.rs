//! Build information and the version-skew rule shared by the agent and the
//! reference fleet server.
//!
//! The rule (design §5): the server is upgraded first, then runtimes, then
//! agents. An agent of the same major version whose minor version lies in
//! `[server_minor - behind, server_minor]` is in the window (`behind` is 1
//! unless the server says otherwise). An older agent is *behind*, a newer one
//! is *ahead* (the server must be upgraded first), and a different major
//! version is *incompatible*. Patch levels and pre-release tags never matter.

use std::{fmt, str::FromStr};

/// This agent's version: Cargo's, or `LINKMESH_VERSION` at build time.
pub const AGENT_VERSION: &str = env!("LINKMESH_AGENT_VERSION");

/// The git revision the agent was built from, or `unknown`.
pub const GIT_REVISION: &str = env!("LINKMESH_GIT_REV");

/// Version of the agent API (`proto/linkmesh/v1`) this build speaks.
pub const API_VERSION: u32 = 1;

/// This build as `linkmesh-agent version` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Build {
    /// [`AGENT_VERSION`].
    pub version: &'static str,
    /// [`GIT_REVISION`].
    pub git_revision: &'static str,
    /// [`API_VERSION`].
    pub api_version: u32,
}

/// The running build.
pub const BUILD: Build = Build {
    version: AGENT_VERSION,
    git_revision: GIT_REVISION,
    api_version: API_VERSION,
};

impl Build {
    /// `version --json`.
    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// One line for people.
    pub fn human(&self) -> String {
        format!(
            "linkmesh-agent {} (git {}, api v{})",
            self.version, self.git_revision, self.api_version
        )
    }
}

/// How many minor versions an agent may lag the server when the server does
/// not say otherwise.
pub const DEFAULT_MINOR_VERSIONS_BEHIND: u32 = 1;

/// A semantic version as far as the skew rule cares: `major.minor.patch`,
/// with an optional `v` prefix and pre-release or build suffix kept for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Patch version.
    pub patch: u64,
    /// Pre-release and build suffix after the patch number, without the separator.
    pub suffix: Option<String>,
}

/// A version string that is not `MAJOR.MINOR.PATCH`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid version {input:?}: expected MAJOR.MINOR.PATCH such as 1.4.0")]
pub struct VersionError {
    input: String,
}

/// The agent's own version, parsed.
///
/// # Panics
/// Never in practice: Cargo guarantees `CARGO_PKG_VERSION` is semver, and a
/// unit test parses it.
pub fn agent_version() -> Version {
    Version::from_str(AGENT_VERSION).unwrap_or(Version {
        major: 0,
        minor: 0,
        patch: 0,
        suffix: Some(AGENT_VERSION.to_owned()),
    })
}

// === impl Version ===

impl FromStr for Version {
    type Err = VersionError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || VersionError {
            input: input.to_owned(),
        };
        let s = input.trim();
        let s = s.strip_prefix('v').unwrap_or(s);
        let (core, suffix) = match s.find(['-', '+']) {
            Some(i) => (&s[..i], Some(&s[i + 1..])),
            None => (s, None),
        };
        let mut parts = core.split('.');
        let mut num = || -> Result<u64, VersionError> {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        let (major, minor, patch) = (num()?, num()?, num()?);
        if parts.next().is_some() || suffix.is_some_and(str::is_empty) {
            return Err(err());
        }
        Ok(Version {
            major,
            minor,
            patch,
            suffix: suffix.map(str::to_owned),
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(s) = &self.suffix {
            write!(f, "-{s}")?;
        }
        Ok(())
    }
}

/// Where an agent stands against its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkewVerdict {
    /// Same major, minor within the window: fully supported.
    InWindow,
    /// Older than the window allows: upgrade the agent.
    Behind,
    /// Newer than the server: upgrade the server first. The agent keeps
    /// working but refuses a fresh enrolment.
    Ahead,
    /// Different major version.
    Incompatible,
}

/// Decides where `agent` stands against `server` when agents may lag by
/// `minor_versions_behind` minor versions.
pub fn skew(agent: &Version, server: &Version, minor_versions_behind: u32) -> SkewVerdict {
    if agent.major != server.major {
        return SkewVerdict::Incompatible;
    }
    if agent.minor > server.minor {
        return SkewVerdict::Ahead;
    }
    if server.minor - agent.minor > u64::from(minor_versions_behind) {
        return SkewVerdict::Behind;
    }
    SkewVerdict::InWindow
}

// === impl SkewVerdict ===

impl SkewVerdict {
    /// The stable lowercase name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InWindow => "in_window",
            Self::Behind => "behind",
            Self::Ahead => "ahead",
            Self::Incompatible => "incompatible",
        }
    }

    /// A one-line explanation for people.
    pub fn explain(self, agent: &Version, server: &Version) -> String {
        match self {
            Self::InWindow => format!("agent {agent} is supported by server {server}"),
            Self::Behind => format!(
                "agent {agent} is more than one minor version behind server {server}: upgrade the agent"
            ),
            Self::Ahead => format!(
                "agent {agent} is newer than server {server}: upgrade the server first (server, then runtimes, then agents)"
            ),
            Self::Incompatible => format!(
                "agent {agent} and server {server} have different major versions and cannot work together"
            ),
        }
    }
}

impl fmt::Display for SkewVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn the_build_as_version_prints_it() {
        let b = Build {
            version: "1.4.0",
            git_revision: "0123abc",
            api_version: 1,
        };
        assert_eq!(b.human(), "linkmesh-agent 1.4.0 (git 0123abc, api v1)");
        assert_eq!(
            b.json(),
            r#"{"version":"1.4.0","git_revision":"0123abc","api_version":1}"#
        );
        assert_eq!(BUILD.version, AGENT_VERSION);
    }

    #[test]
    fn parses_versions() {
        assert_eq!(
            v("1.2.3"),
            Version {
                major: 1,
                minor: 2,
                patch: 3,
                suffix: None
            }
        );
        assert_eq!(v("v0.159.0").minor, 159);
        assert_eq!(v("1.18.1-rc.1").suffix.as_deref(), Some("rc.1"));
        assert_eq!(v("2.0.0+build.7").to_string(), "2.0.0-build.7");
        assert_eq!(v(AGENT_VERSION).to_string(), AGENT_VERSION);
        for bad in [
            "", "1", "1.2", "1.2.3.4", "a.b.c", "1.-2.3", "1.2.3-", " v", "1..3",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn skew_table() {
        use SkewVerdict::*;
        let cases = [
            // (agent, server, behind, verdict)
            ("1.4.0", "1.4.0", 1, InWindow),
            ("1.4.9", "1.4.0", 1, InWindow),
            ("1.3.0", "1.4.2", 1, InWindow),
            ("1.2.7", "1.4.0", 1, Behind),
            ("1.2.7", "1.4.0", 2, InWindow),
            ("1.0.0", "1.4.0", 0, Behind),
            ("1.4.0", "1.4.0", 0, InWindow),
            ("1.5.0", "1.4.0", 1, Ahead),
            ("1.5.0-rc.1", "1.4.3", 1, Ahead),
            ("2.0.0", "1.9.0", 1, Incompatible),
            ("1.9.0", "2.0.0", 1, Incompatible),
            ("0.1.0", "0.2.0", 1, InWindow),
            ("0.0.5", "0.2.0", 1, Behind),
        ];
        for (agent, server, behind, want) in cases {
            assert_eq!(
                skew(&v(agent), &v(server), behind),
                want,
                "agent {agent} server {server}"
            );
        }
    }

    #[test]
    fn verdict_names_are_stable() {
        assert_eq!(
            serde_json::to_string(&SkewVerdict::InWindow).unwrap(),
            "\"in_window\""
        );
        assert_eq!(SkewVerdict::Ahead.as_str(), "ahead");
        let msg = SkewVerdict::Ahead.explain(&v("1.5.0"), &v("1.4.0"));
        assert!(msg.contains("upgrade the server first"), "{msg}");
    }
}
