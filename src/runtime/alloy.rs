//! Grafana Alloy: the installed build (`alloy --version`), its configuration
//! file and `remotecfg` block, and the build actually running (the
//! `alloy_build_info` metric on its HTTP endpoint), so "upgraded but not
//! restarted" shows. The agent never runs Alloy; it watches and reports it.

use std::path::{Path, PathBuf};

use super::{AlloyInfo, Executable, Probes, parse_alloy_version};

/// Environment files of the packages (deb, rpm).
pub const ENV_FILES: &[&str] = &["/etc/default/alloy", "/etc/sysconfig/alloy"];
/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/alloy/config.alloy";
/// Default HTTP listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:12345";

/// The parts of a `remotecfg` block the agent reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteCfg {
    /// `url`: a string literal's value, or the expression as written.
    pub url: Option<String>,
    /// `id`: a string literal's value, or the expression (e.g. `constants.hostname`).
    pub id: Option<String>,
}

/// Inspects an Alloy installation.
pub fn inspect(mut exe: Executable, probes: &dyn Probes) -> AlloyInfo {
    let build = match probes.run(&exe.path, &["--version"]) {
        Ok(out) => {
            let b = parse_alloy_version(&out);
            if b.is_none() {
                exe.version_error = Some(format!(
                    "unrecognised --version output: {:?}",
                    out.lines().next().unwrap_or("")
                ));
            }
            b
        }
        Err(e) => {
            exe.version_error = Some(e.to_string());
            None
        }
    };
    if let Some(b) = &build {
        exe.version = Some(b.version.clone());
        exe.version_source = Some(super::VersionSource::VersionFlag);
    }
    let env = ENV_FILES
        .iter()
        .find_map(|f| probes.read_file(Path::new(f)))
        .unwrap_or_default();
    let vars = parse_env_file(&env);
    let var = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let config_file = var("CONFIG_FILE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
    let listen = var("CUSTOM_ARGS")
        .and_then(|a| listen_addr(&a))
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let remotecfg = probes
        .read_file(&config_file)
        .and_then(|t| find_remotecfg(&t));
    let (running_version, running_error) = match probes.http_get(&listen, "/metrics") {
        Ok(body) => match build_info_version(&body) {
            Some(v) => (Some(v), None),
            None => (
                None,
                Some(format!("no alloy_build_info on http://{listen}/metrics")),
            ),
        },
        Err(e) => (None, Some(format!("http://{listen}/metrics: {e}"))),
    };
    let restart_pending =
        matches!((&build, &running_version), (Some(b), Some(r)) if &b.version != r);
    AlloyInfo {
        executable: exe,
        build,
        config_file,
        remotecfg,
        running_version,
        running_error,
        restart_pending,
    }
}

/// `KEY=value` lines of a shell environment file, quotes removed
/// ([`crate::kv::assignments`]).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    crate::kv::assignments(text)
}

/// The value of `--server.http.listen-addr` in Alloy's arguments.
pub fn listen_addr(args: &str) -> Option<String> {
    let mut words = args.split_whitespace();
    while let Some(w) = words.next() {
        if let Some(v) = w.strip_prefix("--server.http.listen-addr=") {
            return Some(v.to_owned());
        }
        if w == "--server.http.listen-addr" {
            return words.next().map(str::to_owned);
        }
    }
    None
}

/// The `version` label of `alloy_build_info` in Prometheus text format.
pub fn build_info_version(body: &str) -> Option<String> {
    let line = body.lines().find(|l| l.starts_with("alloy_build_info{"))?;
    let labels = &line["alloy_build_info{".len()..line.rfind('}')?];
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, e)) = chars.next() {
                        value.push(match e {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if key.trim().trim_start_matches(',') == "version" {
            return Some(value);
        }
        rest = after[end + 1..].trim_start_matches(',');
    }
    None
}

/// Finds the top-level `remotecfg` block of an Alloy configuration and its
/// `url` and `id` attributes. Comments and strings are skipped properly, so
/// a commented-out block does not count.
pub fn find_remotecfg(text: &str) -> Option<RemoteCfg> {
    let tokens = tokenize(text);
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Tok::Open => depth += 1,
            Tok::Close => depth = depth.saturating_sub(1),
            Tok::Ident(name) if depth == 0 && name == "remotecfg" => {
                if matches!(tokens.get(i + 1), Some(Tok::Open)) {
                    return Some(block_attributes(&tokens[i + 2..]));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn block_attributes(tokens: &[Tok]) -> RemoteCfg {
    let mut cfg = RemoteCfg::default();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Tok::Open => depth += 1,
            Tok::Close if depth == 0 => break,
            Tok::Close => depth -= 1,
            Tok::Ident(name) if depth == 0 && matches!(tokens.get(i + 1), Some(Tok::Eq)) => {
                let value = match tokens.get(i + 2) {
                    Some(Tok::Str(s)) => Some(s.clone()),
                    Some(Tok::Expr(e)) | Some(Tok::Ident(e)) => Some(e.clone()),
                    _ => None,
                };
                match name.as_str() {
                    "url" => cfg.url = value,
                    "id" => cfg.id = value,
                    _ => {}
                }
                i += 2;
            }
            _ => {}
        }
        i += 1;
    }
    cfg
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    /// Anything else on a line after `=` that is not a string (an expression).
    Expr(String),
    Eq,
    Open,
    Close,
}

fn tokenize(text: &str) -> Vec<Tok> {
    let b: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            '/' if b.get(i + 1) == Some(&'/') => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            }
            '#' => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            }
            '/' if b.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' && i + 1 < b.len() {
                        i += 1;
                        s.push(match b[i] {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                    } else {
                        s.push(b[i]);
                    }
                    i += 1;
                }
                out.push(Tok::Str(s));
                i += 1;
            }
            '`' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != '`' {
                    i += 1;
                }
                out.push(Tok::Str(b[start..i.min(b.len())].iter().collect()));
                i += 1;
            }
            '{' => {
                out.push(Tok::Open);
                i += 1;
            }
            '}' => {
                out.push(Tok::Close);
                i += 1;
            }
            '=' if b.get(i + 1) != Some(&'=') => {
                out.push(Tok::Eq);
                i += 1;
                // An expression value: up to the end of the line.
                let mut j = i;
                while j < b.len() && (b[j] == ' ' || b[j] == '\t') {
                    j += 1;
                }
                if j < b.len() && b[j] != '"' && b[j] != '`' && b[j] != '{' && b[j] != '\n' {
                    let start = j;
                    while j < b.len()
                        && b[j] != '\n'
                        && !(b[j] == '/' && b.get(j + 1) == Some(&'/'))
                    {
                        j += 1;
                    }
                    let expr: String = b[start..j].iter().collect();
                    out.push(Tok::Expr(expr.trim().trim_end_matches(',').to_owned()));
                    i = j;
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_' || b[i] == '.') {
                    i += 1;
                }
                out.push(Tok::Ident(b[start..i].iter().collect()));
            }
            _ => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotecfg_blocks() {
        let cases: &[(&str, Option<RemoteCfg>)] = &[
            (
                "remotecfg {\n  url = \"https://fm.example/api\"\n  id = constants.hostname\n  basic_auth {\n    username = \"u\"\n  }\n}\n",
                Some(RemoteCfg {
                    url: Some("https://fm.example/api".into()),
                    id: Some("constants.hostname".into()),
                }),
            ),
            (
                "// remotecfg { url = \"commented\" }\nlogging { level = \"info\" }\n",
                None,
            ),
            (
                "/* remotecfg {\n url = \"x\" } */\nremotecfg {\n  id = \"host-7\" // trailing comment\n  url = `https://raw.example`\n}\n",
                Some(RemoteCfg {
                    url: Some("https://raw.example".into()),
                    id: Some("host-7".into()),
                }),
            ),
            (
                "prometheus.scrape \"remotecfg\" {\n  targets = []\n}\n",
                None,
            ),
            (
                "remotecfg {\n  url = sys.env(\"FM_URL\")\n}\n",
                Some(RemoteCfg {
                    url: Some("sys.env(\"FM_URL\")".into()),
                    id: None,
                }),
            ),
            (
                "otelcol.receiver.otlp \"in\" {\n  remotecfg {\n    url = \"nested, not top level\"\n  }\n}\n",
                None,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(&find_remotecfg(text), want, "{text}");
        }
    }

    #[test]
    fn build_info() {
        let body = "# HELP alloy_build_info A metric with a constant '1' value\n# TYPE alloy_build_info gauge\nalloy_build_info{branch=\"HEAD\",goarch=\"amd64\",goos=\"linux\",goversion=\"go1.26.1\",revision=\"6012ec4a\",tags=\"netgo\",version=\"v1.18.1\"} 1\nalloy_other 2\n";
        assert_eq!(build_info_version(body), Some("v1.18.1".into()));
        assert_eq!(build_info_version("up 1\n"), None);
    }

    #[test]
    fn env_and_args() {
        let env = parse_env_file(
            "# comment\nCONFIG_FILE=\"/etc/alloy/config.alloy\"\nCUSTOM_ARGS=\"--server.http.listen-addr=0.0.0.0:9090 --stability.level=public-preview\"\nRESTART_ON_UPGRADE=true\n",
        );
        assert_eq!(
            env[0],
            ("CONFIG_FILE".into(), "/etc/alloy/config.alloy".into())
        );
        assert_eq!(listen_addr(&env[1].1), Some("0.0.0.0:9090".into()));
        assert_eq!(
            listen_addr("--server.http.listen-addr 127.0.0.1:1 x"),
            Some("127.0.0.1:1".into())
        );
        assert_eq!(listen_addr(""), None);
    }
}
