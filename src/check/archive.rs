//! `check`'s view of the fleet's package repository on this host: whether
//! the keyring apt or dnf checks the repository with still holds a key that
//! signs it, and how long that key is valid.
//!
//! The agent has no OpenPGP parser: it hashes the host's keyring file and
//! finds it among the keyrings the server says it has published
//! (`ServerInfo.archive_keys`), which names the keys in it.

use std::path::{Path, PathBuf};

use super::{Check, Outcome, bad, ok};
use crate::proto;

pub(super) const ID: &str = "archive_keys";
pub(super) const TITLE: &str = "the package repository's signing keys are trusted here";

/// How far ahead an expiring key is a warning.
pub const EXPIRY_WARNING_S: i64 = 30 * 86_400;

/// Where `install.sh` configures the repository, and the keyring that
/// source trusts (the paths are the installer's: a test holds them equal).
pub const CONFIGURED: [(&str, &str, Form); 2] = [
    (
        "/etc/apt/sources.list.d/linkmesh.sources",
        "/etc/apt/keyrings/linkmesh-archive.gpg",
        Form::Binary,
    ),
    (
        "/etc/yum.repos.d/linkmesh.repo",
        "/etc/pki/rpm-gpg/RPM-GPG-KEY-linkmesh",
        Form::Armored,
    ),
];

/// Which of the published forms a keyring file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// apt's `Signed-By:` file (`/keys/linkmesh-archive.gpg`).
    Binary,
    /// rpm's `gpgkey=` file (`/keys/linkmesh-archive.asc`).
    Armored,
}

/// The keyring a configured repository on this host trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostKeyring {
    /// The source (or repo) file that names it.
    pub source: PathBuf,
    /// The keyring file.
    pub path: PathBuf,
    /// Its form.
    pub form: Form,
    /// SHA-256 of its bytes, hex, or why it could not be read.
    pub sha256: Result<String, String>,
}

/// The configured repository's keyring, read under `root` (`/` on a host);
/// `None` when the installer configured no repository here.
pub fn host_keyring(root: &Path) -> Option<HostKeyring> {
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    CONFIGURED.iter().find_map(|(source, keyring, form)| {
        let source = under(source);
        source.exists().then(|| {
            let path = under(keyring);
            let sha256 = std::fs::read(&path)
                .map(|b| crate::hex::sha256(&b))
                .map_err(|e| e.to_string());
            HostKeyring {
                source,
                path,
                form: *form,
                sha256,
            }
        })
    })
}

/// A fingerprint's last 16 digits: the long key id gpg and apt print.
fn key_id(fpr: &str) -> &str {
    fpr.get(fpr.len().saturating_sub(16)..).unwrap_or(fpr)
}

fn names<'a>(fprs: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<&str> = fprs.into_iter().map(key_id).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn date(unix_s: i64) -> String {
    crate::clock::rfc3339_unix_s(unix_s).unwrap_or_else(|| format!("{unix_s} s after 1970"))
}

const ROTATE: &str = "on the server: `linkmesh-fleet repo-key rotate --state DIR` and restart serve; re-run the one-liner on each host (it installs the new keyring); then `linkmesh-fleet repo-key retire --state DIR`";

/// The check, from the host's keyring (`None`: no repository configured)
/// and what the server said of its keys (`None`: it serves none), at
/// `now_s` (Unix seconds). `server` is the server's URL, for the hint.
pub fn check(
    host: Option<&HostKeyring>,
    keys: Option<&proto::ArchiveKeys>,
    now_s: i64,
    server: &str,
) -> Check {
    let Some(host) = host else {
        return ok(
            ID,
            TITLE,
            "no LinkMesh package repository is configured on this host",
        );
    };
    let fix = |what: &str| {
        format!(
            "re-run the one-liner (`linkmesh-fleet token create` prints it): it rewrites {what}; or fetch {server}/keys/linkmesh-archive.{} into it over the fleet's TLS",
            match host.form {
                Form::Binary => "gpg",
                Form::Armored => "asc",
            }
        )
    };
    let hash = match &host.sha256 {
        Ok(h) => h,
        Err(e) => {
            return bad(
                ID,
                TITLE,
                Outcome::Fail,
                format!(
                    "{} (named by {}): {e}",
                    host.path.display(),
                    host.source.display()
                ),
                fix(&host.path.display().to_string()),
            );
        }
    };
    let Some(keys) = keys.filter(|k| !k.signing.is_empty()) else {
        return bad(
            ID,
            TITLE,
            Outcome::Warn,
            format!(
                "{} names the fleet's repository, and the server serves none (no archive keys)",
                host.source.display()
            ),
            "serve the repositories (`linkmesh-fleet serve --artifacts DIR`) or remove the source file",
        );
    };
    let signing: Vec<&str> = keys
        .signing
        .iter()
        .map(|k| k.fingerprint.as_str())
        .collect();
    let Some(found) = keys.published.iter().find(|p| match host.form {
        Form::Binary => p.binary_sha256 == *hash,
        Form::Armored => p.armored_sha256 == *hash,
    }) else {
        return bad(
            ID,
            TITLE,
            Outcome::Fail,
            format!(
                "{} is not a keyring this fleet published (sha256 {}); the repositories are signed by {}: apt or dnf refuses them unless it holds one of those keys",
                host.path.display(),
                key_id(hash),
                names(signing.iter().copied()),
            ),
            fix(&host.path.display().to_string()),
        );
    };
    // Keys this host trusts that sign now, and those of them not expired.
    let held: Vec<&proto::ArchiveKey> = keys
        .signing
        .iter()
        .filter(|k| found.fingerprints.contains(&k.fingerprint))
        .collect();
    let usable: Vec<&proto::ArchiveKey> = held
        .iter()
        .copied()
        .filter(|k| k.expires_unix_s == 0 || k.expires_unix_s > now_s)
        .collect();
    let trusted = names(found.fingerprints.iter().map(String::as_str));
    if usable.is_empty() {
        return match held.first() {
            Some(k) => bad(
                ID,
                TITLE,
                Outcome::Fail,
                format!(
                    "archive key {} expired on {}: apt and dnf refuse the repository's metadata (EXPKEYSIG) and this host takes no upgrade from it",
                    key_id(&k.fingerprint),
                    date(k.expires_unix_s)
                ),
                ROTATE,
            ),
            None => bad(
                ID,
                TITLE,
                Outcome::Fail,
                format!(
                    "this host trusts {trusted} ({}) and the repositories are signed by {} only: apt-get update refuses them (NO_PUBKEY), dnf says the signature cannot be verified",
                    host.path.display(),
                    names(signing.iter().copied())
                ),
                fix(&host.path.display().to_string()),
            ),
        };
    }
    // The longest any usable key lasts: when it ends, this host is cut off.
    let last = usable
        .iter()
        .map(|k| k.expires_unix_s)
        .try_fold(0, |acc: i64, e| (e != 0).then(|| acc.max(e)));
    if let Some(until) = last.filter(|u| u - now_s <= EXPIRY_WARNING_S) {
        return bad(
            ID,
            TITLE,
            Outcome::Warn,
            format!(
                "archive key {} expires on {} (in {} days): after that apt and dnf refuse the repository's metadata",
                names(usable.iter().map(|k| k.fingerprint.as_str())),
                date(until),
                (until - now_s) / 86_400
            ),
            ROTATE,
        );
    }
    let missing: Vec<&str> = signing
        .iter()
        .copied()
        .filter(|f| !found.fingerprints.iter().any(|t| t == f))
        .collect();
    let valid = match last {
        None => "no expiry".to_owned(),
        Some(u) => format!("valid until {}", date(u)),
    };
    if !missing.is_empty() {
        return bad(
            ID,
            TITLE,
            Outcome::Warn,
            format!(
                "this host trusts {trusted} and the repositories are also signed by {}, which it does not hold: once the server retires the old key this host is refused",
                names(missing)
            ),
            fix(&host.path.display().to_string()),
        );
    }
    ok(
        ID,
        TITLE,
        format!(
            "{} holds {trusted}, the keys that sign the repositories ({valid})",
            host.path.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "AAAAAAAAAAAAAAAAAAAAAAAA1111111111111111";
    const B: &str = "BBBBBBBBBBBBBBBBBBBBBBBB2222222222222222";
    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn key(f: &str, expires: i64) -> proto::ArchiveKey {
        proto::ArchiveKey {
            fingerprint: f.into(),
            created_unix_s: NOW - 100 * DAY,
            expires_unix_s: expires,
        }
    }

    fn ring(hash: &str, fprs: &[&str]) -> proto::PublishedKeyring {
        proto::PublishedKeyring {
            binary_sha256: format!("{hash}-bin"),
            armored_sha256: format!("{hash}-asc"),
            fingerprints: fprs.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    fn host(form: Form, hash: &str) -> HostKeyring {
        HostKeyring {
            source: "/etc/apt/sources.list.d/linkmesh.sources".into(),
            path: "/etc/apt/keyrings/linkmesh-archive.gpg".into(),
            form,
            sha256: Ok(format!(
                "{hash}-{}",
                if form == Form::Binary { "bin" } else { "asc" }
            )),
        }
    }

    fn keys(signing: Vec<proto::ArchiveKey>) -> proto::ArchiveKeys {
        proto::ArchiveKeys {
            signing,
            published: vec![ring("one", &[A]), ring("two", &[A, B]), ring("three", &[B])],
        }
    }

    fn run(h: &HostKeyring, k: &proto::ArchiveKeys) -> Check {
        check(Some(h), Some(k), NOW, "https://fleet:8443")
    }

    #[test]
    fn a_host_without_the_repository_is_fine_and_says_so() {
        let c = check(None, None, NOW, "https://fleet");
        assert_eq!(c.outcome, Outcome::Ok);
        assert!(c.detail.contains("no LinkMesh package repository"));
    }

    #[test]
    fn the_current_keyring_in_either_form_is_ok() {
        let k = keys(vec![key(B, NOW + 400 * DAY)]);
        for form in [Form::Binary, Form::Armored] {
            let c = run(&host(form, "three"), &k);
            assert_eq!(c.outcome, Outcome::Ok, "{c:?}");
            assert!(c.detail.contains("2222222222222222"), "{c:?}");
        }
        // A binary keyring's hash is not taken for the armoured one's.
        let mut h = host(Form::Armored, "three");
        h.sha256 = Ok("three-bin".into());
        assert_eq!(run(&h, &k).outcome, Outcome::Fail);
    }

    #[test]
    fn a_keyring_from_before_a_rotation_works_and_warns_of_the_retire() {
        let c = run(
            &host(Form::Binary, "one"),
            &keys(vec![key(A, 0), key(B, 0)]),
        );
        assert_eq!(c.outcome, Outcome::Warn, "{c:?}");
        assert!(c.detail.contains("once the server retires"), "{c:?}");
        assert!(c.hint.as_deref().unwrap().contains("re-run the one-liner"));
    }

    #[test]
    fn a_keyring_without_a_signing_key_fails_and_names_apts_words() {
        let c = run(&host(Form::Binary, "one"), &keys(vec![key(B, 0)]));
        assert_eq!(c.outcome, Outcome::Fail, "{c:?}");
        assert!(c.detail.contains("NO_PUBKEY"), "{c:?}");
        assert!(c.detail.contains("1111111111111111"), "{c:?}");
        assert!(
            c.hint
                .as_deref()
                .unwrap()
                .contains("https://fleet:8443/keys/linkmesh-archive.gpg")
        );
        // A file the fleet never published.
        let c = run(&host(Form::Binary, "forged"), &keys(vec![key(B, 0)]));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("not a keyring this fleet published"));
    }

    #[test]
    fn expiry_warns_thirty_days_ahead_and_fails_after() {
        let h = host(Form::Binary, "three");
        let at = |e| run(&h, &keys(vec![key(B, e)]));
        assert_eq!(at(NOW + 31 * DAY).outcome, Outcome::Ok);
        let c = at(NOW + 29 * DAY + 3600);
        assert_eq!(c.outcome, Outcome::Warn, "{c:?}");
        assert!(c.detail.contains("in 29 days"), "{c:?}");
        assert!(c.hint.as_deref().unwrap().contains("repo-key rotate"));
        let c = at(NOW - 1);
        assert_eq!(c.outcome, Outcome::Fail, "{c:?}");
        assert!(c.detail.contains("EXPKEYSIG"), "{c:?}");
        // During a rotation a host holding both keys lasts as long as the
        // newer one.
        let c = run(
            &host(Form::Binary, "two"),
            &keys(vec![key(A, NOW + 5 * DAY), key(B, NOW + 900 * DAY)]),
        );
        assert_eq!(c.outcome, Outcome::Ok, "{c:?}");
        // A key without expiry never warns.
        assert_eq!(at(0).outcome, Outcome::Ok);
    }

    #[test]
    fn a_configured_host_facing_a_server_without_keys_or_an_unreadable_keyring() {
        let mut h = host(Form::Binary, "three");
        let c = check(Some(&h), None, NOW, "https://fleet");
        assert_eq!(c.outcome, Outcome::Warn);
        h.sha256 = Err("No such file or directory (os error 2)".into());
        let c = run(&h, &keys(vec![key(B, 0)]));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("/etc/apt/keyrings/linkmesh-archive.gpg"));
    }

    #[test]
    fn the_paths_are_the_installers() {
        let script = include_str!("../../install/install.sh");
        for (source, keyring, _) in CONFIGURED {
            assert!(script.contains(source), "{source}");
            assert!(script.contains(keyring), "{keyring}");
        }
    }

    #[test]
    fn a_configured_source_is_found_under_a_root() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(host_keyring(root.path()), None);
        let etc = root.path().join("etc/yum.repos.d");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("linkmesh.repo"), "[linkmesh]\n").unwrap();
        let h = host_keyring(root.path()).unwrap();
        assert_eq!(h.form, Form::Armored);
        assert!(h.sha256.is_err());
        let keys = root.path().join("etc/pki/rpm-gpg");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::write(keys.join("RPM-GPG-KEY-linkmesh"), "abc").unwrap();
        assert_eq!(
            host_keyring(root.path()).unwrap().sha256,
            Ok(crate::hex::sha256(b"abc"))
        );
    }
}
