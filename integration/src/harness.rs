//! Test harness: runs the real `linkmesh-fleet` and `linkmesh-agent`
//! binaries in scratch directories on loopback. Every wait is bounded;
//! servers are killed when their handle drops.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// How long a server may take to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The directory cargo put the binaries in (the test executable lives in
/// its `deps/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A binary of this workspace: `$LINKMESH_<NAME>_BIN` if set, else cargo's
/// output directory.
///
/// # Errors
/// When it does not exist, with the command that builds it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let var = format!(
        "LINKMESH_{}_BIN",
        name.trim_start_matches("linkmesh-").to_ascii_uppercase()
    );
    let path = std::env::var_os(&var).map_or_else(|| target_dir().join(name), PathBuf::from);
    if !path.is_file() {
        bail!(
            "{name} not found at {}: run `cargo build --workspace` first (scripts/test does), or set {var}",
            path.display()
        );
    }
    Ok(path)
}

/// What `linkmesh-fleet token create --json` prints.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct TokenInfo {
    /// The token.
    pub token: String,
    /// Its public id.
    pub token_id: String,
    /// The CA pin.
    pub ca_pin: String,
    /// The server URL.
    pub server_url: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// A running reference server.
pub struct Fleet {
    state: PathBuf,
    child: Option<Child>,
    /// Where it listens.
    pub addr: String,
    /// The URL agents use.
    pub url: String,
    extra: Vec<String>,
    log: PathBuf,
    netns: Option<String>,
}

impl Fleet {
    /// Initialises `state` (CA and layout) without starting a server.
    ///
    /// # Errors
    /// When `init` fails.
    pub fn init(state: &Path) -> anyhow::Result<()> {
        let out = Command::new(binary("linkmesh-fleet")?)
            .arg("init")
            .arg("--state")
            .arg(state)
            .arg("--secret-file")
            .arg(Self::secret_file_for(state))
            .output()?;
        if !out.status.success() {
            bail!(
                "linkmesh-fleet init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The server secret's file the harness uses for `state`: beside it
    /// (`STATE.secret`), made by the first `init`.
    pub fn secret_file_for(state: &Path) -> PathBuf {
        let mut name = state.file_name().unwrap_or_default().to_os_string();
        name.push(".secret");
        state.with_file_name(name)
    }

    /// The verified one-liner running `script` from this server with
    /// `args` (see [`linkmesh_fleet::server::verified_one_liner`]).
    ///
    /// # Errors
    /// When the CA cannot be read.
    pub fn one_liner(
        &self,
        script: linkmesh_fleet::server::Script,
        args: &str,
    ) -> anyhow::Result<String> {
        let ca = std::fs::read_to_string(self.ca_file())?;
        Ok(linkmesh_fleet::server::verified_one_liner(
            &self.url, &ca, script, "", args,
        ))
    }

    /// This server's CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.state.join("ca").join("ca.pem")
    }

    /// This server's secret file.
    pub fn secret_file(&self) -> PathBuf {
        Self::secret_file_for(&self.state)
    }

    /// Initialises `state` if needed and starts `serve` on a free loopback
    /// port, with `extra` arguments.
    ///
    /// # Errors
    /// When the server does not come up within [`START_TIMEOUT`].
    pub fn start(state: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::init(state)?;
        let mut fleet = Self {
            state: state.to_owned(),
            child: None,
            addr: "127.0.0.1:0".into(),
            url: String::new(),
            extra: extra.iter().map(ToString::to_string).collect(),
            log: state.join("serve.log"),
            netns: None,
        };
        fleet.spawn()?;
        Ok(fleet)
    }

    /// Like [`Fleet::start`], but inside network namespace `netns`
    /// listening on `listen` (`ip netns exec`).
    ///
    /// # Errors
    /// When the server does not come up.
    pub fn start_in_netns(
        state: &Path,
        netns: &str,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::init(state)?;
        let mut fleet = Self {
            state: state.to_owned(),
            child: None,
            addr: listen.to_owned(),
            url: String::new(),
            extra: extra.iter().map(ToString::to_string).collect(),
            log: state.join("serve.log"),
            netns: Some(netns.to_owned()),
        };
        fleet.spawn()?;
        Ok(fleet)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary("linkmesh-fleet")?);
                c
            }
            None => Command::new(binary("linkmesh-fleet")?),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--state")
            .arg(&self.state)
            .arg("--secret-file")
            .arg(self.secret_file())
            .arg("--listen")
            .arg(&self.addr)
            .args(&self.extra)
            .env("LINKMESH_FLEET_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let line = rx.recv_timeout(START_TIMEOUT).map_err(|_| {
            anyhow::anyhow!(
                "linkmesh-fleet did not start within {START_TIMEOUT:?}; log:\n{}",
                self.log()
            )
        })?;
        // "linkmesh-fleet X listening on ADDR as URL"
        let mut words = line.split_whitespace().skip_while(|w| *w != "on").skip(1);
        let (Some(addr), Some("as"), Some(url)) = (words.next(), words.next(), words.next()) else {
            bail!("unexpected start line from linkmesh-fleet: {line}");
        };
        self.addr = addr.to_owned();
        self.url = url.to_owned();
        Ok(())
    }

    /// The server throw-away hosts install from: in the test network's
    /// server namespace on `SERVER_ADDR:8443`, asking for a report every
    /// second, offering the files in `artifacts` (install.sh and the unit
    /// are always served).
    ///
    /// # Errors
    /// When it does not start.
    pub fn start_for_hosts(state: &Path, netns: &str, artifacts: &Path) -> anyhow::Result<Self> {
        Self::start_in_netns(
            state,
            netns,
            &format!("{}:8443", crate::testhost::SERVER_ADDR),
            &[
                "--report-interval",
                "1s",
                "--artifacts",
                artifacts.to_str().unwrap_or_default(),
            ],
        )
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts the server on the same address and state, optionally with
    /// other arguments.
    ///
    /// # Errors
    /// When it does not come back.
    pub fn restart(&mut self, extra: Option<&[&str]>) -> anyhow::Result<()> {
        self.stop();
        if let Some(extra) = extra {
            self.extra = extra.iter().map(ToString::to_string).collect();
        }
        self.spawn()
    }

    /// The state directory.
    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The server process's pid (the `ip netns exec` wrapper execs it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `linkmesh-fleet ARGS --state STATE` and returns its output.
    ///
    /// # Errors
    /// When it cannot be run.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(binary("linkmesh-fleet")?)
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()?)
    }

    /// Creates a token with `uses` and `ttl`.
    ///
    /// # Errors
    /// When `token create` fails.
    pub fn token(&self, uses: u32, ttl: &str) -> anyhow::Result<TokenInfo> {
        let out = self.admin(&[
            "token",
            "create",
            "--json",
            "--uses",
            &uses.to_string(),
            "--ttl",
            ttl,
        ])?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The enrolled hosts, as `hosts --json` prints them.
    ///
    /// # Errors
    /// When `hosts` fails.
    pub fn hosts(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.admin(&["hosts", "--json"])?;
        if !out.status.success() {
            bail!("hosts failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The fleet-drift report, as `drift --json` prints it.
    ///
    /// # Errors
    /// When `drift` fails or prints something else.
    pub fn drift(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.admin(&["drift", "--json"])?;
        if !out.status.success() {
            bail!("drift failed: {}", text(&out));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Polls the drift report until `pred` holds for its first host, for at
    /// most `limit` (reports reach the state files within a second).
    ///
    /// # Errors
    /// On timeout, with the last report.
    pub fn wait_drift(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let d = self.drift()?;
            if d["hosts"].get(0).is_some_and(&pred) {
                return Ok(d);
            }
            if std::time::Instant::now() >= deadline {
                bail!("timed out after {limit:?} waiting for {what}: {d}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's record of a token (uses and all).
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn token_record(&self, id: &str) -> anyhow::Result<linkmesh_fleet::state::TokenRecord> {
        linkmesh_fleet::state::State::new(&self.state)
            .token(id)?
            .with_context(|| format!("no token {id}"))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An agent's scratch environment: its own config file and state directory,
/// so nothing touches the real `/etc` or `/var/lib`.
pub struct AgentEnv {
    /// Root of the scratch directory.
    pub root: PathBuf,
    /// `LINKMESH_CONFIG`.
    pub config: PathBuf,
    /// `LINKMESH_STATE_DIR`.
    pub state: PathBuf,
}

impl AgentEnv {
    /// An environment under `root` (created if missing).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_owned(),
            config: root.join("etc/agent.toml"),
            state: root.join("state"),
        })
    }

    /// A `linkmesh-agent` command in this environment (no token in its
    /// environment unless the caller adds one).
    ///
    /// # Errors
    /// When the binary is missing.
    pub fn cmd(&self) -> anyhow::Result<Command> {
        let mut c = Command::new(binary("linkmesh-agent")?);
        c.env("LINKMESH_CONFIG", &self.config)
            .env("LINKMESH_STATE_DIR", &self.state)
            .env_remove("LINKMESH_TOKEN")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET");
        Ok(c)
    }

    /// The identity enrolment stored, read as the agent reads it.
    ///
    /// # Errors
    /// When it cannot be read or the host is not enrolled.
    pub fn identity(&self) -> anyhow::Result<linkmesh_agent::identity::Identity> {
        let store = linkmesh_agent::identity::IdentityStore::new(&self.state);
        let lock = store
            .lock_shared()?
            .ok_or_else(|| anyhow::anyhow!("no state in {}", self.state.display()))?;
        store
            .load(&lock)?
            .ok_or_else(|| anyhow::anyhow!("not enrolled"))
    }

    /// `enroll` with the token in `LINKMESH_TOKEN` and `args` after it.
    ///
    /// # Errors
    /// When it cannot be run.
    pub fn enroll(&self, server: &str, token: &str, args: &[&str]) -> anyhow::Result<Output> {
        Ok(self
            .cmd()?
            .args(["enroll", "--server", server])
            .args(args)
            .env("LINKMESH_TOKEN", token)
            .output()?)
    }

    /// `status --json`, parsed.
    ///
    /// # Errors
    /// When it fails or prints something else.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.cmd()?.args(["status", "--json"]).output()?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// Every regular file below `dir` with its mode and SHA-256, to show that
/// something left a tree byte-identical.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let rel = p.strip_prefix(dir).unwrap_or(&p).to_owned();
            if meta.is_dir() {
                out.insert(rel, (meta.permissions().mode(), String::from("<dir>")));
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap_or_default();
                let hash = linkmesh_agent::hex::encode(
                    ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
                );
                out.insert(rel, (meta.permissions().mode(), hash));
            }
        }
    }
    out
}

/// Output of a command as text, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A scratch directory under cargo's target directory, removed when the
/// handle drops, so test state never lands in the real `/etc` or `/var/lib`.
///
/// # Errors
/// When it cannot be created.
pub fn scratch(label: &str) -> anyhow::Result<tempfile::TempDir> {
    let parent = target_dir().join("scratch");
    std::fs::create_dir_all(&parent)?;
    Ok(tempfile::Builder::new()
        .prefix(&format!("{label}-"))
        .tempdir_in(parent)?)
}

/// The test bed's collector distribution, as scripts/build-runtimes names it.
pub const COLLECTOR: &str = "otelcol-linkmesh";

/// The directory of the real runtimes `scripts/build-runtimes` built
/// (opampsupervisor and [`COLLECTOR`]): `$LINKMESH_RUNTIMES` when set, else
/// the directory `scripts/install-test-deps` recorded in
/// `target/runtimes.path`, else the script is run now (a cached build costs
/// nothing). There is no fallback to stand-ins: without the real runtimes
/// the tests fail, saying how to build them.
///
/// # Errors
/// When the runtimes are not built and cannot be.
pub fn real_runtimes() -> anyhow::Result<PathBuf> {
    static DIR: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let usable = |d: &Path| d.join("opampsupervisor").is_file() && d.join(COLLECTOR).is_file();
        if let Some(d) = std::env::var_os("LINKMESH_RUNTIMES").map(PathBuf::from) {
            return if usable(&d) {
                Ok(d)
            } else {
                Err(format!(
                    "LINKMESH_RUNTIMES={} holds no opampsupervisor and {COLLECTOR}",
                    d.display()
                ))
            };
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .to_owned();
        if let Ok(recorded) = std::fs::read_to_string(root.join("target/runtimes.path")) {
            let d = PathBuf::from(recorded.trim());
            if usable(&d) {
                return Ok(d);
            }
        }
        let out = Command::new(root.join("scripts/build-runtimes"))
            .current_dir(&root)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run scripts/build-runtimes: {e}"))?;
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned();
        let d = PathBuf::from(last);
        if out.status.success() && usable(&d) {
            Ok(d)
        } else {
            Err(format!(
                "the real collector runtimes are not built and scripts/build-runtimes failed ({}): it needs Go 1.26 and the Go module proxy",
                out.status
            ))
        }
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// A directory holding the runtime binaries a local test points the agent
/// at: the real `opampsupervisor` and [`COLLECTOR`] (see [`real_runtimes`])
/// and the Alloy stand-in (Alloy cannot be built here: runtimes.md §5), as
/// symlinks.
///
/// # Errors
/// When a binary is missing or a link cannot be made.
pub fn runtime_bin_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let real = real_runtimes()?;
    for (name, target) in [
        ("opampsupervisor", real.join("opampsupervisor")),
        (COLLECTOR, real.join(COLLECTOR)),
        ("alloy", binary("standin-alloy")?),
    ] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link)?;
    }
    Ok(dir.to_owned())
}

/// A local collector configuration for tests that only need a collector
/// running: a nop pipeline, no ports, no internal metrics listener (tests
/// run many collectors at once).
pub const QUIET_COLLECTOR_CONFIG: &str = "receivers:\n  nop: {}\nexporters:\n  nop: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [nop]\n      exporters: [nop]\n  telemetry:\n    metrics:\n      level: none\n";

/// Installs the real opampsupervisor and collector in a throw-away host
/// where the upstream packages put theirs: `/usr/bin/opampsupervisor`, and
/// the collector at otelcol-contrib's path `/usr/bin/otelcol-contrib` (the
/// agent reads whatever distribution's `NAME version X` it prints).
///
/// # Errors
/// When a binary is missing or cannot be copied in.
pub fn install_runtime(host: &crate::testhost::TestHost) -> anyhow::Result<()> {
    let real = real_runtimes()?;
    host.copy_in(
        &real.join("opampsupervisor"),
        "/usr/bin/opampsupervisor",
        0o755,
    )?;
    host.copy_in(&real.join(COLLECTOR), "/usr/bin/otelcol-contrib", 0o755)?;
    Ok(())
}

/// Puts the shipped agent unit in a throw-away host and `collector_config`
/// as its local collector configuration (`/etc/linkmesh/collector.yaml`).
///
/// # Errors
/// When a file cannot be written.
pub fn install_agent_unit(
    host: &crate::testhost::TestHost,
    collector_config: &str,
) -> anyhow::Result<()> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/linkmesh-agent.service");
    host.copy_in(&unit, "/etc/systemd/system/linkmesh-agent.service", 0o644)?;
    std::fs::create_dir_all(host.path("/etc/linkmesh"))?;
    std::fs::write(host.path("/etc/linkmesh/collector.yaml"), collector_config)?;
    Ok(())
}

/// Debian's name for this machine's architecture, as artifacts are named.
pub const DEB_ARCH: &str = if cfg!(target_arch = "aarch64") {
    "arm64"
} else {
    "amd64"
};

/// Puts an agent build in an artifacts directory as the server offers it
/// (`linkmesh-agent-VERSION-linux-ARCH`) with its `.sha256` file, or with
/// `wrong_sum` in it.
///
/// # Errors
/// When the files cannot be written.
pub fn publish_binary(
    dir: &Path,
    version: &str,
    bytes: &[u8],
    wrong_sum: Option<&str>,
) -> anyhow::Result<()> {
    let name = format!("linkmesh-agent-{version}-linux-{DEB_ARCH}");
    std::fs::write(dir.join(&name), bytes)?;
    let sum = wrong_sum.map_or_else(
        || linkmesh_agent::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()),
        str::to_owned,
    );
    std::fs::write(
        dir.join(format!("{name}.sha256")),
        format!("{sum}  {name}\n"),
    )?;
    Ok(())
}

/// Runs the install one-liner inside `host` against `fleet`, the one
/// `linkmesh-fleet token create` prints (the fleet CA carried inside it, the
/// script checked against its SHA-256 before it runs); returns the exit
/// code and stdout+stderr. When the service failed to start (exit 10),
/// systemd's view of it is appended.
///
/// # Errors
/// When the command cannot be run in the host.
pub fn install_one_liner(
    host: &crate::testhost::TestHost,
    fleet: &Fleet,
    args: &str,
) -> anyhow::Result<(i32, String)> {
    let (code, mut text) =
        host.run(&fleet.one_liner(linkmesh_fleet::server::Script::Install, args)?)?;
    if code == 10 {
        text += &host.service_failure("linkmesh-agent");
    }
    Ok((code, text))
}

/// The .deb and .rpm of one agent build.
#[derive(Clone, Debug)]
pub struct Packages {
    /// `linkmesh-agent_VERSION-1_ARCH.deb`
    pub deb: PathBuf,
    /// `linkmesh-agent-VERSION-1.ARCH.rpm`
    pub rpm: PathBuf,
}

impl Packages {
    /// Copies both packages into `dir` (a server's artifacts: published in
    /// its repositories at the next request).
    ///
    /// # Errors
    /// When a copy fails.
    pub fn copy_into(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for f in [&self.deb, &self.rpm] {
            let name = f
                .file_name()
                .ok_or_else(|| anyhow::anyhow!("{} names no file", f.display()))?;
            std::fs::copy(f, dir.join(name))?;
        }
        Ok(())
    }
}

/// Builds the .deb and .rpm of `agent` into `out` with `linkmesh-package`,
/// with `.sha256` files; `level` is the gzip level (tests use 1: their
/// packages hold the 46 MB debug binary).
///
/// # Errors
/// When the packager is missing or fails.
pub fn build_packages(agent: &Path, out: &Path, level: u32) -> anyhow::Result<Packages> {
    let res = Command::new(binary("linkmesh-package")?)
        .arg("--binary")
        .arg(agent)
        .arg("--out")
        .arg(out)
        .arg("--level")
        .arg(level.to_string())
        .output()?;
    if !res.status.success() {
        bail!("linkmesh-package failed: {}", text(&res));
    }
    let listed = String::from_utf8_lossy(&res.stdout).into_owned();
    let find = |ext: &str| {
        listed
            .lines()
            .filter_map(|l| l.split('\t').next())
            .find(|p| p.ends_with(ext))
            .map(PathBuf::from)
            .with_context(|| format!("no {ext} in linkmesh-package output: {listed}"))
    };
    Ok(Packages {
        deb: find(".deb")?,
        rpm: find(".rpm")?,
    })
}

/// A fixture script from `integration/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A `linkmesh-agent run` in the background; SIGKILLed (with everything in
/// its process groups) when dropped.
pub struct RunningAgent {
    child: Option<Child>,
    /// Its log (stderr and stdout).
    pub log: PathBuf,
    status_file: PathBuf,
}

impl AgentEnv {
    /// Writes the agent's configuration file.
    ///
    /// # Errors
    /// When it cannot be written.
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        if let Some(p) = self.config.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// Makes its configuration run `supervisor` in place of the real
    /// opampsupervisor in `bins` (a fixture standing in for it).
    ///
    /// # Errors
    /// When the configuration cannot be read or written.
    pub fn use_supervisor(&self, bins: &Path, supervisor: &Path) -> anyhow::Result<()> {
        let cfg = std::fs::read_to_string(&self.config)?.replace(
            &bins.join("opampsupervisor").display().to_string(),
            &supervisor.display().to_string(),
        );
        self.write_config(&cfg)
    }

    /// Starts `linkmesh-agent run ARGS` with `env` added.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn_run(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<RunningAgent> {
        let log = self.root.join(format!(
            "run-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let file = std::fs::File::create(&log)?;
        let mut cmd = self.cmd()?;
        cmd.arg("run")
            .args(args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        Ok(RunningAgent {
            child: Some(child),
            log,
            status_file: self.state.join("runtime-status.json"),
        })
    }
}

impl RunningAgent {
    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The status file `run` publishes, if readable.
    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(&self.status_file).ok()?).ok()
    }

    /// Polls the status file until `pred` holds, for at most `limit`.
    ///
    /// # Errors
    /// On timeout, with the last status and the log.
    pub fn wait_status(
        &self,
        limit: Duration,
        what: &str,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.status()
                && s["agent_pid"].as_u64() == Some(u64::from(self.pid()))
                && pred(&s)
            {
                return Ok(s);
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {limit:?} waiting for {what}; status: {:?}\nlog:\n{}",
                    self.status(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Polls the log until it contains `needle`, for at most `limit`;
    /// returns the log then.
    ///
    /// # Errors
    /// On timeout, with the log's first 2000 characters.
    pub fn wait_log(&self, limit: Duration, needle: &str) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return Ok(log);
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "no {needle:?} in the agent's log within {limit:?}:\n{}",
                    log.chars().take(2000).collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig);
    }

    /// Waits for the agent to exit, at most `limit`; `None` on timeout.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        // Kill the supervisor's group too, should the agent not have.
        if let Some(pid) = self.status().and_then(|s| s["supervision"]["pid"].as_u64()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A copy of `agent`'s directories at `dir`, as a disk image carries them,
/// without the run lock and the status file of the agent that ran there.
///
/// # Errors
/// When the copy fails.
pub fn copy_agent(agent: &AgentEnv, dir: &Path) -> anyhow::Result<AgentEnv> {
    let _ = std::fs::remove_dir_all(dir);
    let out = Command::new("cp")
        .arg("-a")
        .arg(&agent.root)
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!("cp -a {}: {}", agent.root.display(), text(&out));
    }
    let _ = std::fs::remove_file(dir.join("state").join(linkmesh_agent::app::RUN_LOCK));
    let _ = std::fs::remove_file(dir.join("state/runtime-status.json"));
    AgentEnv::new(dir)
}

/// Writes a machine-id (32 hex digits, distinct for each `n` and from any
/// real one's pattern) to `path`.
///
/// # Errors
/// When it cannot be written.
pub fn write_machine_id(path: &Path, n: u64) -> anyhow::Result<()> {
    std::fs::write(path, format!("c0ffee{n:026x}\n"))?;
    Ok(())
}

/// `linkmesh-agent run` in `agent`'s directories as on the machine whose
/// `/etc/machine-id` is the file `machine_id` (bound over it in a mount
/// namespace of its own), after `wrapper` (a tracer, say) when not empty;
/// in a process group of its own, its log in `run.log` beside it. Needs root.
///
/// # Errors
/// When it cannot be started.
pub fn run_on_machine(
    agent: &AgentEnv,
    machine_id: &Path,
    wrapper: &[std::ffi::OsString],
) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount --bind \"$1\" /etc/machine-id && shift && exec \"$@\"",
        "sh",
    ])
    .arg(machine_id)
    .args(wrapper)
    .arg(binary("linkmesh-agent")?)
    .arg("run")
    .env("LINKMESH_CONFIG", &agent.config)
    .env("LINKMESH_STATE_DIR", &agent.state)
    .env_remove("LINKMESH_TOKEN")
    .env_remove("NOTIFY_SOCKET")
    .env_remove("JOURNAL_STREAM")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(agent.root.join("run.log"))?)
    .process_group(0);
    Ok(cmd.spawn()?)
}

/// SIGKILL to `child`'s process group (it leads one), then reaps it.
pub fn kill_group(mut child: Child) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

/// An executable the tests need, from the PATH.
///
/// # Errors
/// When it is not installed, naming the script that installs it.
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} is required: run scripts/test (scripts/install-test-deps installs it)"
            )
        })
}

/// A real HTTP CONNECT proxy (tinyproxy) for a test, stopped when dropped.
pub struct Tinyproxy {
    child: Option<Child>,
    /// `http://LISTEN:PORT`.
    pub url: String,
    /// Its log (connections at `LogLevel Connect`).
    pub log: PathBuf,
}

impl Tinyproxy {
    /// Starts tinyproxy on `listen`:`port` (in the network namespace
    /// `netns` when given), admitting clients from `allow` (an address or
    /// CIDR) and tunnels to port `connect_port` only; its files in `dir`.
    ///
    /// # Errors
    /// When tinyproxy is missing or does not start listening.
    pub fn start(
        dir: &Path,
        listen: &str,
        port: u16,
        allow: &str,
        connect_port: &str,
        netns: Option<&str>,
    ) -> anyhow::Result<Self> {
        let bin = tool("tinyproxy")?;
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen {listen}\nTimeout 30\nLogLevel Connect\nMaxClients 50\nAllow {allow}\nConnectPort {connect_port}\n"
            ),
        )?;
        let log = dir.join("tinyproxy.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["-d", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()?;
        let me = Self {
            child: Some(child),
            url: format!("http://{listen}:{port}"),
            log,
        };
        // Ready once it accepts a connection (from its namespace).
        let probe = format!("exec 3<>/dev/tcp/{listen}/{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = match netns {
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "bash", "-c", &probe]);
                    c
                }
                None => {
                    let mut c = Command::new("bash");
                    c.args(["-c", &probe]);
                    c
                }
            };
            if c.stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                return Ok(me);
            }
            if std::time::Instant::now() > deadline {
                bail!("tinyproxy did not start listening: {}", me.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Stops it (as a proxy that went down).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The row of host `id` in a `hosts --json` listing (`Null` when absent).
pub fn host_row(hosts: &[serde_json::Value], id: &str) -> serde_json::Value {
    hosts
        .iter()
        .find(|h| h["host_id"] == id)
        .cloned()
        .unwrap_or_default()
}

/// A gRPC client of the server presenting `id` (mutual TLS), as the
/// agent's reporter dials.
///
/// # Errors
/// When the TLS configuration or the channel cannot be made.
pub fn mtls_client(
    id: &linkmesh_agent::identity::Identity,
) -> anyhow::Result<linkmesh_agent::proto::Client<tonic::transport::Channel>> {
    let tls = std::sync::Arc::new(linkmesh_agent::tls::mtls_client_config(id)?);
    let dialer = linkmesh_agent::transport::Dialer::new(
        id.server.clone(),
        tls,
        None,
        Duration::from_secs(5),
    );
    Ok(linkmesh_agent::proto::Client::new(dialer.channel()?))
}

/// A `Rekey` as a copy of `id` on the machine whose machine-id hashes to
/// `machine_id_hash` sends it, for `key`.
///
/// # Errors
/// The server's refusal, or `unavailable` when it cannot be dialled.
pub async fn rekey_as_copy(
    id: &linkmesh_agent::identity::Identity,
    key: &rcgen::KeyPair,
    machine_id_hash: &str,
) -> Result<linkmesh_agent::proto::EnrollResponse, tonic::Status> {
    use linkmesh_agent::proto;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(key)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut facts: proto::HostFacts = (&linkmesh_agent::host::collect()).into();
    facts.machine_id_hash = machine_id_hash.to_owned();
    facts.hostname = "the-clone".into();
    mtls_client(id)
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?
        .rekey(proto::RekeyRequest {
            csr_der: csr.der().to_vec(),
            host: Some(facts),
            agent_version: linkmesh_agent::version::AGENT_VERSION.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls until `pid` is gone, for at most `limit`; whether it went.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while alive(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// An enrolled agent environment under `root` with `fleet`, using the
/// runtime binaries in `bins`, and extra configuration lines.
///
/// # Errors
/// When enrolment fails.
pub fn enrolled_agent(
    root: &Path,
    fleet: &Fleet,
    bins: &Path,
    extra_config: &str,
) -> anyhow::Result<AgentEnv> {
    let agent = AgentEnv::new(root)?;
    let collector_config = root.join("collector.yaml");
    if !collector_config.exists() {
        std::fs::write(&collector_config, QUIET_COLLECTOR_CONFIG)?;
    }
    agent.write_config(&format!(
        "[runtime]\nsupervisor = \"{}\"\ncollector = \"{}\"\ncollector_config = \"{}\"\nalloy = \"{}\"\n{extra_config}",
        bins.join("opampsupervisor").display(),
        bins.join(COLLECTOR).display(),
        collector_config.display(),
        bins.join("alloy-not-installed").display(),
    ))?;
    let t = fleet.token(1, "1h")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    if !out.status.success() {
        bail!("enrol failed: {}", text(&out));
    }
    Ok(agent)
}

/// An agent enrolled with `fleet` under `root` that manages no collector
/// runtime (`kind = "none"`): for what is about the identity alone.
///
/// # Errors
/// When the enrolment fails.
pub fn idle_enrolled_agent(root: &Path, fleet: &Fleet) -> anyhow::Result<AgentEnv> {
    let agent = AgentEnv::new(root)?;
    agent.write_config("[runtime]\nkind = \"none\"\n")?;
    let t = fleet.token(1, "1h")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    if !out.status.success() {
        bail!("enrol failed: {}", text(&out));
    }
    Ok(agent)
}

/// A scratch directory named after `name`, a server asking for a report
/// every second (with `fleet_args` after that) and one agent enrolled with it,
/// supervising the real runtimes.
///
/// # Errors
/// When the server does not start or the enrolment fails.
pub fn fleet_with_agent(
    name: &str,
    fleet_args: &[&str],
) -> anyhow::Result<(tempfile::TempDir, Fleet, AgentEnv)> {
    let dir = scratch(name)?;
    let mut args = vec!["--report-interval", "1s"];
    args.extend_from_slice(fleet_args);
    let fleet = Fleet::start(&dir.path().join("fleet"), &args)?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let agent = enrolled_agent(&dir.path().join("agent"), &fleet, &bins, "")?;
    Ok((dir, fleet, agent))
}

/// The older agent build the downgrade tests install: `$LINKMESH_OLDER_AGENT_BIN`,
/// else `target/older/linkmesh-agent-0.0.9` (scripts/test builds it with
/// `LINKMESH_VERSION=0.0.9`).
///
/// # Errors
/// When it does not exist, with the command that builds it.
pub fn older_agent() -> anyhow::Result<(PathBuf, &'static str)> {
    const VERSION: &str = "0.0.9";
    let path = std::env::var_os("LINKMESH_OLDER_AGENT_BIN").map_or_else(
        || {
            target_dir()
                .parent()
                .map(|t| t.join("older").join(format!("linkmesh-agent-{VERSION}")))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    if !path.is_file() {
        bail!(
            "no older agent build at {}: scripts/test builds it (LINKMESH_VERSION={VERSION} cargo build -p linkmesh-agent --bin linkmesh-agent, then copy to target/older/linkmesh-agent-{VERSION})",
            path.display()
        );
    }
    Ok((path, VERSION))
}

/// The bad release the rollback tests upgrade to: a build of this tree as
/// 0.1.1 with fault injection (`target/faulty/linkmesh-agent-0.1.1`;
/// scripts/test builds it with `LINKMESH_VERSION=0.1.1
/// LINKMESH_FAULT_INJECTION=1`). Which fault it shows is chosen by
/// `LINKMESH_FAULT` in its unit's environment (src/fault.rs).
///
/// # Errors
/// When it does not exist, with the command that builds it.
pub fn faulty_agent() -> anyhow::Result<(PathBuf, &'static str)> {
    const VERSION: &str = "0.1.1";
    let path = target_dir()
        .parent()
        .map(|t| t.join("faulty").join(format!("linkmesh-agent-{VERSION}")))
        .unwrap_or_default();
    if !path.is_file() {
        bail!(
            "no faulty agent build at {}: scripts/test builds it (LINKMESH_VERSION={VERSION} LINKMESH_FAULT_INJECTION=1 cargo build -p linkmesh-agent --bin linkmesh-agent, then copy to target/faulty/linkmesh-agent-{VERSION})",
            path.display()
        );
    }
    Ok((path, VERSION))
}

/// An rpm standing for the base system of an RPM-based host. On RHEL the
/// rpm database lists bash (which provides /bin/sh) and glibc; a throw-away
/// host is Debian underneath, so its fresh rpm database is told what the
/// host really has: /bin/sh and this machine's glibc version.
///
/// # Errors
/// When it cannot be built.
pub fn base_system_rpm(path: &std::path::Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let glibc = text
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("getconf GNU_LIBC_VERSION: {text:?}"))?;
    rpm::PackageBuilder::new(
        "testhost-base",
        "1.0",
        "MIT",
        "noarch",
        "What this throw-away host's base system provides",
    )
    .provides(rpm::Dependency::any("/bin/sh"))
    .provides(rpm::Dependency::eq("glibc", glibc))
    .build()?
    .write_file(path)?;
    Ok(())
}

/// Where [`publish_runtime`]'s release wrappers find the real binaries on a
/// host: copies them to `/usr/local/lib/real/`.
///
/// # Errors
/// When a binary is missing or cannot be copied in.
pub fn install_real_runtime_for_releases(host: &crate::testhost::TestHost) -> anyhow::Result<()> {
    let real = real_runtimes()?;
    for name in [COLLECTOR, "opampsupervisor"] {
        host.copy_in(
            &real.join(name),
            &format!("/usr/local/lib/real/{name}"),
            0o755,
        )?;
    }
    Ok(())
}

/// Copies the agent, the reference server and the real runtime into
/// `host` at the paths the packages use.
///
/// # Errors
/// When a binary is missing or cannot be copied in.
pub fn install_agent_server_and_runtime(host: &crate::testhost::TestHost) -> anyhow::Result<()> {
    for (bin, dest) in [
        ("linkmesh-agent", "/usr/bin/linkmesh-agent"),
        ("linkmesh-fleet", "/usr/local/bin/linkmesh-fleet"),
    ] {
        host.copy_in(&binary(bin)?, dest, 0o755)?;
    }
    install_runtime(host)
}

/// How [`enrol_in_host`] starts the reference server inside a host: on its
/// loopback, as the transient unit `lm-fleet`, asking for a report every
/// second; append more `serve` arguments.
pub const SERVER_IN_HOST: &str = "systemd-run --unit lm-fleet --quiet linkmesh-fleet serve --state /var/lib/fleet --secret-file /etc/linkmesh-fleet.secret --listen 127.0.0.1:8443 --report-interval 1s";

/// Runs a reference server inside `host` ([`SERVER_IN_HOST`] plus
/// `serve_args`) and enrols the agent installed at /usr/bin/linkmesh-agent.
///
/// # Errors
/// When the server or the enrolment fails, with what they said.
pub fn enrol_in_host(host: &crate::testhost::TestHost, serve_args: &str) -> anyhow::Result<()> {
    host.sh(&format!(
        "linkmesh-fleet init --state /var/lib/fleet --secret-file /etc/linkmesh-fleet.secret >/dev/null && {SERVER_IN_HOST} {serve_args} && \
         for i in $(seq 50); do test -f /var/lib/fleet/server.json && break; sleep 0.1; done; \
         linkmesh-fleet token create --state /var/lib/fleet --json > /root/token.json"
    ))
    .context("server in host")?;
    let token: serde_json::Value =
        serde_json::from_slice(&std::fs::read(host.path("/root/token.json"))?)?;
    std::fs::write(
        host.path("/root/token"),
        token["token"].as_str().unwrap_or_default(),
    )?;
    host.sh(&format!(
        "linkmesh-agent enroll --server https://127.0.0.1:8443 --ca-pin {} --token-file /root/token",
        token["ca_pin"].as_str().unwrap_or_default()
    ))
    .context("enrol in host")?;
    Ok(())
}

/// Runtime artifacts as the releases ship them: v0.158.0 with one `.sha256`
/// per artifact, v0.157.0 with the older combined checksum files. Only one
/// real build of each runtime exists here (scripts/build-runtimes, 0.158.0),
/// so each release's artifact is a small wrapper naming its release that
/// execs the real binary: install-opamp.sh sees distinct files per release,
/// and what runs is the real supervisor and collector (whose `--version`
/// says 0.158.0 whatever the release's name).
///
/// # Errors
/// When the files cannot be written.
pub fn publish_runtime(dir: &Path, version: &str, split_sums: bool) -> anyhow::Result<()> {
    publish_runtime_release(dir, version, split_sums, true)
}

/// A release whose collector cannot run: it answers `--version` (so the
/// agent's detection still reads it) and exits 1 otherwise, as a broken
/// build would. The runtime-rollback test pins it.
///
/// # Errors
/// When the files cannot be written.
pub fn publish_broken_runtime(dir: &Path, version: &str) -> anyhow::Result<()> {
    publish_runtime_release(dir, version, true, false)
}

fn publish_runtime_release(
    dir: &Path,
    version: &str,
    split_sums: bool,
    works: bool,
) -> anyhow::Result<()> {
    let work = dir.join(format!("build-{version}"));
    std::fs::create_dir_all(&work)?;
    let col = work.join("otelcol-contrib");
    let body = if works {
        format!("exec /usr/local/lib/real/{COLLECTOR} \"$@\"\n")
    } else {
        format!(
            "[ \"$1\" = --version ] && exec /usr/local/lib/real/{COLLECTOR} --version\necho 'broken build: cannot start' >&2\nexit 1\n"
        )
    };
    std::fs::write(
        &col,
        format!("#!/bin/sh\n# otelcol-contrib release {version}\n{body}"),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&col, std::fs::Permissions::from_mode(0o755))?;
    let archive = format!("otelcol-contrib_{version}_linux_{DEB_ARCH}.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(dir.join(&archive))
        .arg("-C")
        .arg(&work)
        .arg("otelcol-contrib")
        .status()?;
    anyhow::ensure!(st.success(), "tar failed");
    let sup = format!("opampsupervisor_{version}_linux_{DEB_ARCH}");
    std::fs::write(
        dir.join(&sup),
        format!(
            "#!/bin/sh\n# opampsupervisor release {version}\nexec /usr/local/lib/real/opampsupervisor \"$@\"\n"
        ),
    )?;
    let sum = |name: &str| -> anyhow::Result<String> {
        Ok(linkmesh_agent::hex::encode(
            ring::digest::digest(&ring::digest::SHA256, &std::fs::read(dir.join(name))?).as_ref(),
        ))
    };
    if split_sums {
        for name in [&archive, &sup] {
            std::fs::write(
                dir.join(format!("{name}.sha256")),
                format!("{}  {name}\n", sum(name)?),
            )?;
        }
    } else {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("opentelemetry-collector-releases_otelcol-contrib_checksums.txt"))?;
        writeln!(f, "{}  {archive}", sum(&archive)?)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("checksums.txt"))?;
        writeln!(f, "{}  {sup}", sum(&sup)?)?;
    }
    Ok(())
}
