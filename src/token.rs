//! Enrolment tokens: `lmt_<id>_<secret>`. The id names the token in server
//! records and logs; the secret is only ever compared by hash and is never
//! printed by `Debug` or `Display`.

use std::{fmt, path::Path};

const PREFIX: &str = "lmt_";
const ID_LEN: usize = 16;
const SECRET_LEN: usize = 48;

/// A one-time enrolment token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    id: String,
    secret: String,
}

/// Why a token could not be read. The messages never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No source gave a token.
    #[error("no enrolment token: pass --token-file FILE, set LINKMESH_TOKEN, or pass --token")]
    Missing,
    /// The token file could not be read.
    #[error("cannot read token file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The text is not a LinkMesh token.
    #[error(
        "malformed enrolment token from {source_name}: expected lmt_ followed by {ID_LEN} and {SECRET_LEN} hex digits separated by _; copy it again from `linkmesh-fleet token create`"
    )]
    Malformed {
        /// Where it came from (flag, file or environment variable).
        source_name: String,
    },
}

// === impl Token ===

impl Token {
    /// Makes a new random token.
    ///
    /// # Errors
    /// When the system's random number generator fails.
    pub fn generate() -> Result<Self, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; ID_LEN / 2];
        let mut secret = [0u8; SECRET_LEN / 2];
        rng.fill(&mut id)?;
        rng.fill(&mut secret)?;
        Ok(Self {
            id: crate::hex::encode(&id),
            secret: crate::hex::encode(&secret),
        })
    }

    /// Parses a token; `source_name` says where it came from, for the error.
    ///
    /// # Errors
    /// [`TokenError::Malformed`], without echoing the input.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, TokenError> {
        let err = || TokenError::Malformed {
            source_name: source_name.to_owned(),
        };
        let body = text.trim().strip_prefix(PREFIX).ok_or_else(err)?;
        let (id, secret) = body.split_once('_').ok_or_else(err)?;
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(id, ID_LEN) || !hex(secret, SECRET_LEN) {
            return Err(err());
        }
        Ok(Self {
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    /// Reads the token from the first source that has one: `--token-file`,
    /// then `--token`, then the environment variable `LINKMESH_TOKEN`
    /// (passed in as `env_value`).
    ///
    /// # Errors
    /// [`TokenError`] naming the failing source.
    pub fn from_sources(
        file: Option<&Path>,
        flag: Option<&str>,
        env_value: Option<&str>,
    ) -> Result<Self, TokenError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| TokenError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            return Self::parse(&text, &format!("token file {}", path.display()));
        }
        if let Some(t) = flag {
            return Self::parse(t, "--token");
        }
        match env_value {
            Some(t) if !t.trim().is_empty() => Self::parse(t, "LINKMESH_TOKEN"),
            _ => Err(TokenError::Missing),
        }
    }

    /// The public id of the token, safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SHA-256 of the secret, hex: what a server stores instead of the secret.
    pub fn secret_hash(&self) -> String {
        crate::hex::encode(
            ring::digest::digest(&ring::digest::SHA256, self.secret.as_bytes()).as_ref(),
        )
    }

    /// The whole token, for sending to the server or showing once to the
    /// operator who asked for it. Never log it.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}_{}", self.id, self.secret)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({PREFIX}{}_<redacted>)", self.id)
    }
}

/// Compares two hex hashes without leaking where they differ.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_parse_round_trip() {
        let t = Token::generate().unwrap();
        let text = t.expose();
        assert_eq!(Token::parse(&format!("  {text}\n"), "x").unwrap(), t);
        assert_eq!(text.len(), PREFIX.len() + ID_LEN + 1 + SECRET_LEN);
        assert_ne!(Token::generate().unwrap(), t);
    }

    #[test]
    fn debug_and_errors_never_show_the_secret() {
        let t = Token::generate().unwrap();
        let dbg = format!("{t:?}");
        assert!(dbg.contains(t.id()) && !dbg.contains(&t.secret), "{dbg}");
        let mut bad = t.expose();
        bad.push('x');
        let err = Token::parse(&bad, "--token").unwrap_err().to_string();
        assert!(!err.contains(&t.secret) && err.contains("--token"), "{err}");
    }

    #[test]
    fn sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            Token::generate().unwrap(),
            Token::generate().unwrap(),
            Token::generate().unwrap(),
        );
        let f = dir.path().join("token");
        std::fs::write(&f, format!("{}\n", a.expose())).unwrap();
        let (be, ce) = (b.expose(), c.expose());
        assert_eq!(
            Token::from_sources(Some(&f), Some(&be), Some(&ce)).unwrap(),
            a
        );
        assert_eq!(Token::from_sources(None, Some(&be), Some(&ce)).unwrap(), b);
        assert_eq!(Token::from_sources(None, None, Some(&ce)).unwrap(), c);
        assert_eq!(
            Token::from_sources(None, None, Some("  ")),
            Err(TokenError::Missing)
        );
        let e = Token::from_sources(Some(&dir.path().join("nope")), None, None).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn constant_time_compare() {
        assert!(hashes_equal("abcd", "abcd"));
        assert!(!hashes_equal("abcd", "abce"));
        assert!(!hashes_equal("abcd", "abc"));
    }
}
