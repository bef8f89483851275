//! Stand-in for opampsupervisor v0.159.0, reproducing what
//! `shared/reference/runtimes.md` records of the real one:
//! - Go `flag` parsing: only `-config`/`--config` (`=` or a separate
//!   argument); any other flag prints "flag provided but not defined" and the
//!   usage, exit 2. There is no `--version`.
//! - The config is decoded strictly: an unknown key is fatal ("'agent' has
//!   invalid keys: run_as"), `server.endpoint` must have an http/https/ws/wss
//!   scheme, `agent.executable` must exist. Startup errors go to stderr as a
//!   Go `log` line, exit 1.
//! - `persistent_state.yaml` (mode 0600, UUIDv7 `instance_id`) is created in
//!   `storage.directory` on first start and reused after.
//! - The collector runs as `<executable> --config <storage>/effective.yaml
//!   <args…>`; effective.yaml carries the opamp extension's `ppid` and
//!   `ppid_poll_interval` (orphan detection). With `passthrough_logs` its
//!   output is logged, else it goes to `<storage>/agent.log`.
//! - A collector that exits on its own is reported ("Agent process PID=%d
//!   exited unexpectedly, exit code=%d. Will restart in a bit...") and
//!   restarted after 5 s.
//! - Logs are zap production JSON lines on stdout.
//! - Only SIGINT is handled (stop the collector: SIGTERM, 10 s, SIGKILL;
//!   exit 0). SIGTERM and SIGHUP keep their default action: the process dies
//!   at once and the collector is left to notice its parent is gone.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    time::Duration,
};

use yaml_rust2::{Yaml, YamlLoader};

const USAGE: &str =
    "Usage of opampsupervisor:\n  -config string\n    \tPath to a supervisor configuration file\n";
const RESTART_DELAY: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_flags(&args) {
        Ok(Some(c)) => c,
        Ok(None) => {
            fatal("failed to load config: config path is empty: pass -config");
            return ExitCode::from(1);
        }
        Err(code) => return ExitCode::from(code),
    };
    let cfg = match load(&config) {
        Ok(c) => c,
        Err(e) => {
            fatal(&format!("failed to load config: {e}"));
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fatal(&format!("runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cfg))
}

/// Go's flag package: `-config x`, `-config=x`, `--config x`, `--config=x`.
fn parse_flags(args: &[String]) -> Result<Option<String>, u8> {
    let mut config = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if !a.starts_with('-') || a == "-" {
            break; // positional arguments end flag parsing
        }
        if a == "--" {
            break;
        }
        let name = a.trim_start_matches('-');
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (name, None),
        };
        match name {
            "config" => {
                let v = match value {
                    Some(v) => v,
                    None => {
                        i += 1;
                        match args.get(i) {
                            Some(v) => v.clone(),
                            None => {
                                eprint!("flag needs an argument: -config\n{USAGE}");
                                return Err(2);
                            }
                        }
                    }
                };
                config = Some(v);
            }
            "h" | "help" => {
                eprint!("{USAGE}");
                return Err(0);
            }
            other => {
                eprint!("flag provided but not defined: -{other}\n{USAGE}");
                return Err(2);
            }
        }
        i += 1;
    }
    Ok(config.filter(|c| !c.is_empty()))
}

fn fatal(msg: &str) {
    let now = time::OffsetDateTime::now_utc();
    let ts = format!(
        "{:04}/{:02}/{:02} {:02}:{:02}:{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let _ = writeln!(std::io::stderr(), "{ts} {msg}");
}

// === Configuration ===

enum Schema {
    /// A scalar or list, not checked further.
    Leaf,
    /// A map whose keys are not checked (headers, attributes, extension configs).
    AnyMap,
    /// A map with exactly these keys.
    Map(&'static [(&'static str, Schema)]),
}

const TLS: Schema = Schema::Map(&[
    ("insecure", Schema::Leaf),
    ("insecure_skip_verify", Schema::Leaf),
    ("server_name_override", Schema::Leaf),
    ("ca_file", Schema::Leaf),
    ("ca_pem", Schema::Leaf),
    ("cert_file", Schema::Leaf),
    ("cert_pem", Schema::Leaf),
    ("key_file", Schema::Leaf),
    ("key_pem", Schema::Leaf),
    ("include_system_ca_certs_pool", Schema::Leaf),
    ("min_version", Schema::Leaf),
    ("max_version", Schema::Leaf),
    ("cipher_suites", Schema::Leaf),
    ("curve_preferences", Schema::Leaf),
    ("include_insecure_cipher_suites", Schema::Leaf),
    ("reload_interval", Schema::Leaf),
    ("tpm", Schema::AnyMap),
]);

/// opampsupervisor v0.159.0's keys ([V] in runtimes.md).
const ROOT: Schema = Schema::Map(&[
    (
        "server",
        Schema::Map(&[
            ("endpoint", Schema::Leaf),
            ("headers", Schema::AnyMap),
            ("tls", TLS),
            ("auth", Schema::Leaf),
        ]),
    ),
    ("extensions", Schema::AnyMap),
    (
        "capabilities",
        Schema::Map(&[
            ("accepts_remote_config", Schema::Leaf),
            ("accepts_restart_command", Schema::Leaf),
            ("accepts_opamp_connection_settings", Schema::Leaf),
            ("reports_effective_config", Schema::Leaf),
            ("reports_own_metrics", Schema::Leaf),
            ("reports_own_logs", Schema::Leaf),
            ("reports_own_traces", Schema::Leaf),
            ("reports_health", Schema::Leaf),
            ("reports_remote_config", Schema::Leaf),
            ("reports_available_components", Schema::Leaf),
            ("reports_heartbeat", Schema::Leaf),
            ("accepts_packages", Schema::Leaf),
        ]),
    ),
    ("storage", Schema::Map(&[("directory", Schema::Leaf)])),
    (
        "agent",
        Schema::Map(&[
            ("executable", Schema::Leaf),
            ("args", Schema::Leaf),
            ("env", Schema::AnyMap),
            ("config_files", Schema::Leaf),
            (
                "description",
                Schema::Map(&[
                    ("identifying_attributes", Schema::AnyMap),
                    ("non_identifying_attributes", Schema::AnyMap),
                ]),
            ),
            ("orphan_detection_interval", Schema::Leaf),
            ("config_apply_timeout", Schema::Leaf),
            ("bootstrap_timeout", Schema::Leaf),
            ("opamp_server_port", Schema::Leaf),
            ("passthrough_logs", Schema::Leaf),
            ("use_hup_config_reload", Schema::Leaf),
            ("package", Schema::AnyMap),
        ]),
    ),
    ("healthcheck", Schema::AnyMap),
    (
        "telemetry",
        Schema::Map(&[
            (
                "logs",
                Schema::Map(&[
                    ("level", Schema::Leaf),
                    ("output_paths", Schema::Leaf),
                    ("error_output_paths", Schema::Leaf),
                    ("processors", Schema::Leaf),
                ]),
            ),
            ("metrics", Schema::AnyMap),
            ("traces", Schema::AnyMap),
            ("resource", Schema::AnyMap),
        ]),
    ),
]);

fn check(value: &Yaml, schema: &Schema, path: &str, errors: &mut Vec<String>) {
    let Schema::Map(keys) = schema else { return };
    let Yaml::Hash(map) = value else {
        if !matches!(value, Yaml::Null) {
            errors.push(format!("'{path}' expected a map, got '{}'", kind(value)));
        }
        return;
    };
    let mut invalid = Vec::new();
    for (k, v) in map {
        let name = k.as_str().unwrap_or("?");
        match keys.iter().find(|(n, _)| *n == name) {
            Some((_, sub)) => {
                let p = if path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{path}::{name}")
                };
                check(v, sub, &p, errors);
            }
            None => invalid.push(name.to_owned()),
        }
    }
    if !invalid.is_empty() {
        errors.push(format!("'{path}' has invalid keys: {}", invalid.join(", ")));
    }
}

fn kind(y: &Yaml) -> &'static str {
    match y {
        Yaml::Array(_) => "slice",
        Yaml::String(_) => "string",
        Yaml::Integer(_) => "int",
        Yaml::Boolean(_) => "bool",
        _ => "other",
    }
}

struct Config {
    endpoint: String,
    storage: PathBuf,
    executable: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    orphan_interval: Duration,
    passthrough: bool,
    min_level: u8,
}

fn load(path: &str) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot retrieve the configuration: open {path}: {e}"))?;
    let docs = YamlLoader::load_from_str(&text).map_err(|e| {
        format!("cannot retrieve the configuration: unable to read the file {path}: {e}")
    })?;
    let root = docs.into_iter().next().unwrap_or(Yaml::Null);
    let mut errors = Vec::new();
    check(&root, &ROOT, "", &mut errors);
    if !errors.is_empty() {
        return Err(format!(
            "decoding failed due to the following error(s):\n\n{}",
            errors.join("\n")
        ));
    }
    let endpoint = root["server"]["endpoint"].as_str().unwrap_or("").to_owned();
    if endpoint.is_empty() {
        return Err("server::endpoint must be specified".into());
    }
    let scheme = endpoint.split("://").next().unwrap_or("");
    if !["http", "https", "ws", "wss"].contains(&scheme) || !endpoint.contains("://") {
        return Err(format!(
            "invalid scheme {scheme:?} for server::endpoint, must be one of \"http\", \"https\", \"ws\", or \"wss\""
        ));
    }
    let executable = root["agent"]["executable"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    if executable.is_empty() {
        return Err("agent::executable must be specified".into());
    }
    std::fs::metadata(&executable).map_err(|_| {
        format!(
            "could not stat agent::executable path: stat {executable}: no such file or directory"
        )
    })?;
    let orphan = match root["agent"]["orphan_detection_interval"].as_str() {
        Some(d) => go_duration(d).ok_or_else(|| {
            format!("agent::orphan_detection_interval: time: invalid duration {d:?}")
        })?,
        None => Duration::from_secs(5),
    };
    if orphan.is_zero() {
        return Err("agent::orphan_detection_interval must be positive".into());
    }
    let storage = root["storage"]["directory"]
        .as_str()
        .unwrap_or("/var/lib/otelcol/supervisor")
        .to_owned();
    let args = root["agent"]["args"]
        .as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let env = root["agent"]["env"]
        .as_hash()
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let min_level = match root["telemetry"]["logs"]["level"]
        .as_str()
        .unwrap_or("info")
    {
        "debug" => 0,
        "warn" => 2,
        "error" => 3,
        _ => 1,
    };
    Ok(Config {
        endpoint,
        storage: storage.into(),
        executable: executable.into(),
        args,
        env,
        orphan_interval: orphan,
        passthrough: root["agent"]["passthrough_logs"].as_bool().unwrap_or(false),
        min_level,
    })
}

fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.')?);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ns" => n / 1e9,
        "us" | "µs" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

// === Running ===

fn log(cfg_level: u8, level: &str, msg: &str, extra: &[(&str, serde_json::Value)]) {
    let rank = match level {
        "debug" => 0,
        "info" => 1,
        "warn" => 2,
        _ => 3,
    };
    if rank < cfg_level {
        return;
    }
    let mut obj = serde_json::Map::new();
    obj.insert("level".into(), level.into());
    let ts = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;
    obj.insert("ts".into(), ts.into());
    obj.insert("caller".into(), "supervisor/supervisor.go:1".into());
    obj.insert("msg".into(), msg.into());
    for (k, v) in extra {
        obj.insert((*k).into(), v.clone());
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::Value::Object(obj));
    let _ = out.flush();
}

async fn run(cfg: Config) -> ExitCode {
    let lvl = cfg.min_level;
    if let Err(e) = std::fs::create_dir_all(&cfg.storage) {
        fatal(&format!("error creating storage dir: {e}"));
        return ExitCode::from(1);
    }
    let instance_id = match persistent_instance_id(&cfg.storage) {
        Ok(id) => id,
        Err(e) => {
            fatal(&format!("failed to load persistent state: {e}"));
            return ExitCode::from(1);
        }
    };
    log(
        lvl,
        "info",
        "Supervisor starting",
        &[
            ("id", instance_id.clone().into()),
            ("endpoint", cfg.endpoint.clone().into()),
        ],
    );
    let effective = cfg.storage.join("effective.yaml");
    let interval_ms = cfg.orphan_interval.as_millis();
    let effective_yaml = format!(
        "extensions:\n  opamp:\n    instance_uid: {instance_id}\n    server:\n      ws:\n        endpoint: ws://127.0.0.1:0/v1/opamp\n        tls:\n          insecure: true\n    ppid: {}\n    ppid_poll_interval: {interval_ms}ms\nservice:\n  extensions: [opamp]\n",
        std::process::id()
    );
    if let Err(e) = std::fs::write(&effective, effective_yaml) {
        fatal(&format!("failed to write effective config: {e}"));
        return ExitCode::from(1);
    }
    let Ok(mut interrupt) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    else {
        return ExitCode::from(1);
    };
    loop {
        log(
            lvl,
            "info",
            "Starting agent",
            &[("path", cfg.executable.display().to_string().into())],
        );
        let mut cmd = tokio::process::Command::new(&cfg.executable);
        cmd.arg("--config")
            .arg(&effective)
            .args(&cfg.args)
            .envs(cfg.env.iter().cloned())
            .stdin(Stdio::null());
        if cfg.passthrough {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cfg.storage.join("agent.log"))
            {
                Ok(f) => {
                    let f2 = f.try_clone().ok();
                    cmd.stdout(f);
                    cmd.stderr(f2.map_or_else(Stdio::null, Stdio::from));
                }
                Err(_) => {
                    cmd.stdout(Stdio::null()).stderr(Stdio::null());
                }
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                log(lvl, "error", &format!("Cannot start the agent: {e}"), &[]);
                tokio::select! {
                    () = tokio::time::sleep(RESTART_DELAY) => continue,
                    _ = interrupt.recv() => return shutdown(lvl, None).await,
                }
            }
        };
        let pid = child.id().unwrap_or(0);
        log(lvl, "info", "Agent process started", &[("pid", pid.into())]);
        if cfg.passthrough {
            forward(child.stdout.take(), lvl);
            forward(child.stderr.take(), lvl);
        }
        tokio::select! {
            status = child.wait() => {
                let code = status.ok().and_then(|s| s.code()).unwrap_or(-1);
                log(lvl, "error", &format!("Agent process PID={pid} exited unexpectedly, exit code={code}. Will restart in a bit..."), &[]);
                log(lvl, "info", "Setting health", &[("healthy", false.into())]);
                tokio::select! {
                    () = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = interrupt.recv() => return shutdown(lvl, None).await,
                }
            }
            _ = interrupt.recv() => return shutdown(lvl, Some(child)).await,
        }
    }
}

fn forward(stream: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>, lvl: u8) {
    let Some(stream) = stream else { return };
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt as _;
        let mut lines = tokio::io::BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            log(lvl, "info", &line, &[("component", "agent".into())]);
        }
    });
}

async fn shutdown(lvl: u8, child: Option<tokio::process::Child>) -> ExitCode {
    log(lvl, "info", "Supervisor shutting down...", &[]);
    if let Some(mut child) = child {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(_) => log(lvl, "info", "Agent process successfully stopped.", &[]),
            Err(_) => {
                log(
                    lvl,
                    "warn",
                    "Agent process is not responding to SIGTERM. Sending SIGKILL to kill forcedly.",
                    &[],
                );
                let _ = child.kill().await;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Reads or creates `persistent_state.yaml` (0600) with a UUIDv7 instance id.
fn persistent_instance_id(storage: &Path) -> Result<String, String> {
    let path = storage.join("persistent_state.yaml");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some(id) = text
            .lines()
            .find_map(|l| l.strip_prefix("instance_id:"))
            .map(|s| s.trim().to_owned())
        && !id.is_empty()
    {
        return Ok(id);
    }
    let id = uuid_v7();
    let body = format!("instance_id: {id}\nlast_remote_config_status: null\n");
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(body.as_bytes()).map_err(|e| e.to_string())?;
    Ok(id)
}

fn uuid_v7() -> String {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    linkmesh_agent::clock::uuid_string(&b)
}
