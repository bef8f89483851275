//! The fleet server's address: an `https://host[:port]` URL, normalised so two
//! spellings of the same server compare equal.

use std::{fmt, str::FromStr};

/// A validated, normalised fleet server URL (`https://host:port`, no path).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServerUrl {
    host: String,
    port: u16,
}

/// A server URL that is not `https://host[:port]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid server URL {input:?}: {reason} (expected https://HOST[:PORT])")]
pub struct ServerUrlError {
    input: String,
    reason: &'static str,
}

// === impl ServerUrl ===

impl ServerUrl {
    /// The host name or IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port (443 when the URL gave none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, with brackets around an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for ServerUrl {
    type Err = ServerUrlError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| ServerUrlError {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
            Some(_) => return Err(err("the scheme must be https")),
            None => return Err(err("missing https:// scheme")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(err("a path, query or fragment is not allowed"));
        }
        if authority.contains('@') {
            return Err(err("user information is not allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unclosed '[' in host"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(err("invalid IPv6 address"));
            }
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(p.strip_prefix(':').ok_or_else(|| err("junk after ']'"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                // "a:b:c" is neither a name with a port nor an IPv6 address
                // (those need brackets); found by fuzzing, it used to be
                // taken as host "a:b" and printed as "[a:b]:c".
                Some((h, _)) if h.contains(':') => {
                    return Err(err(
                        "an IPv6 address needs brackets: https://[ADDRESS]:PORT",
                    ));
                }
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(err("missing host"));
        }
        if !host.contains(':')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(err("invalid character in host"));
        }
        let port = match port {
            None => 443,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(err("invalid port")),
            },
        };
        Ok(ServerUrl {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

impl serde::Serialize for ServerUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ServerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        let cases = [
            ("https://fleet.example", "https://fleet.example:443"),
            ("HTTPS://Fleet.Example:8443/", "https://fleet.example:8443"),
            ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
            ("https://[::1]:9000", "https://[::1]:9000"),
            ("https://[2001:db8::1]", "https://[2001:db8::1]:443"),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<ServerUrl>().unwrap().to_string(),
                want,
                "{input}"
            );
        }
        let a: ServerUrl = "https://fleet.example".parse().unwrap();
        let b: ServerUrl = "https://FLEET.example:443/".parse().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects() {
        for (input, reason) in [
            ("http://fleet.example", "scheme must be https"),
            ("fleet.example:8443", "missing https://"),
            ("https://fleet.example/api", "path"),
            ("https://:8443", "missing host"),
            ("https://fleet.example:0", "invalid port"),
            ("https://fleet.example:99999", "invalid port"),
            ("https://user@fleet.example", "user information"),
            ("https://[::1", "unclosed"),
            ("https://fle et", "invalid character"),
            // Found by fuzzing (fuzz/regressions/versions).
            ("https://sha2sha256:56:3", "needs brackets"),
            ("https://::1", "needs brackets"),
        ] {
            let err = input.parse::<ServerUrl>().unwrap_err().to_string();
            assert!(err.contains(reason), "{input}: {err}");
        }
    }
}
