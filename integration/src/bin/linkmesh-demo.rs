//! `linkmesh-demo`: a local end-to-end run on loopback. Starts the reference
//! fleet server, creates a token, enrols an agent into a scratch directory
//! (twice, to show the second is a no-op), runs the agent supervising the
//! stand-in collector runtime, and shows what each side knows.
//! Every step prints the command a person would type.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use linkmesh_integration::harness::{COLLECTOR, Fleet, TokenInfo, binary, runtime_bin_dir};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("linkmesh-demo"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let fleet_state = dir.join("fleet");
    let agent_config = dir.join("agent/etc/agent.toml");
    let agent_state = dir.join("agent/state");
    let fleet_bin = binary("linkmesh-fleet")?;
    let agent_bin = binary("linkmesh-agent")?;

    step("Create the fleet server's state and internal CA");
    show(
        Command::new(&fleet_bin)
            .arg("init")
            .arg("--state")
            .arg(&fleet_state)
            .arg("--secret-file")
            .arg(Fleet::secret_file_for(&fleet_state)),
    )?;

    step("Start the fleet server on loopback (a free port)");
    println!(
        "$ linkmesh-fleet serve --state {} --secret-file {} --listen 127.0.0.1:0 &",
        fleet_state.display(),
        Fleet::secret_file_for(&fleet_state).display()
    );
    let fleet = Fleet::start(&fleet_state, &["--report-interval", "2s"])?;
    println!("listening at {}", fleet.url);

    step("Create a one-time enrolment token");
    let mut create = Command::new(&fleet_bin);
    create
        .args(["token", "create", "--json", "--state"])
        .arg(&fleet_state);
    let json = show(&mut create)?;
    let token: TokenInfo = serde_json::from_slice(&json).context("token create --json")?;
    let token_file = dir.join("token");
    linkmesh_agent::fs::write_atomic(&token_file, token.token.as_bytes(), 0o600)?;
    println!(
        "(the token goes to {}, mode 0600, so it stays off command lines)",
        token_file.display()
    );

    let agent = |args: &[&str]| {
        let mut c = Command::new(&agent_bin);
        c.args(args)
            .env("LINKMESH_CONFIG", &agent_config)
            .env("LINKMESH_STATE_DIR", &agent_state);
        c
    };
    println!(
        "\nThe agent runs with LINKMESH_CONFIG={} LINKMESH_STATE_DIR={}",
        agent_config.display(),
        agent_state.display()
    );

    step("Enrol the agent: key made here, server checked against the CA pin, CSR signed");
    let enroll_args = [
        "enroll",
        "--server",
        &fleet.url,
        "--ca-pin",
        &token.ca_pin,
        "--token-file",
    ];
    show(agent(&enroll_args).arg(&token_file))?;

    step("Enrol again: already enrolled with this server, nothing changes");
    show(agent(&enroll_args).arg(&token_file))?;

    step("The agent's view");
    show(&mut agent(&["status"]))?;
    list(&agent_state.join("identity"))?;

    step("The server's view");
    show(
        Command::new(&fleet_bin)
            .args(["hosts", "--state"])
            .arg(&fleet_state),
    )?;

    step("Run the agent: it supervises the real opampsupervisor and collector, and reports");
    let bins = runtime_bin_dir(&dir.join("runtime-bin"))?;
    std::fs::create_dir_all(agent_config.parent().unwrap_or(&dir))?;
    let otlp_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let collector_config = dir.join("collector.yaml");
    std::fs::write(
        &collector_config,
        format!(
            "# The host's own collector config: OTLP/HTTP in, the collector's log out.\nreceivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{otlp_port}\nexporters:\n  debug: {{}}\nservice:\n  pipelines:\n    logs:\n      receivers: [otlp]\n      exporters: [debug]\n"
        ),
    )?;
    std::fs::write(
        &agent_config,
        format!(
            "[runtime]\nsupervisor = \"{}\"\ncollector = \"{}\"\ncollector_config = \"{}\"\n",
            bins.join("opampsupervisor").display(),
            bins.join(COLLECTOR).display(),
            collector_config.display()
        ),
    )?;
    println!(
        "$ linkmesh-agent run &    (config: {})",
        agent_config.display()
    );
    let log_path = dir.join("agent-run.log");
    let log = std::fs::File::create(&log_path)?;
    let mut run = agent(&["run"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let status_file = agent_state.join("runtime-status.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s: Option<serde_json::Value> = std::fs::read(&status_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if s.as_ref().is_some_and(|s| {
            s["supervision"]["collector_pid"].is_u64()
                && s["reporter"]["reports"].as_u64() >= Some(2)
        }) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = run.kill();
            bail!(
                "the agent did not come up; its log is in {}",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    show(&mut agent(&["status"]))?;
    step("Check the host");
    show(&mut agent(&["check"]))?;
    step("The server's fleet-drift report, built from what the agent sent");
    // The server writes report data to its state files within a second.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let out = Command::new(&fleet_bin)
            .args(["drift", "--json", "--state"])
            .arg(&fleet_state)
            .output()?;
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if d["hosts"][0]["runtime_kind"] == "otelcol" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    show(
        Command::new(&fleet_bin)
            .args(["drift", "--state"])
            .arg(&fleet_state),
    )?;

    step("The server drives the collector's configuration over OpAMP (merged over the host's own)");
    let remote = dir.join("fleet-collector.yaml");
    std::fs::write(
        &remote,
        "receivers:\n  hostmetrics:\n    collection_interval: 10s\n    scrapers:\n      load: {}\nservice:\n  pipelines:\n    metrics:\n      receivers: [hostmetrics]\n      exporters: [debug]\n",
    )?;
    show(
        Command::new(&fleet_bin)
            .args(["collector-config", "set", "--state"])
            .arg(&fleet_state)
            .arg("--file")
            .arg(&remote),
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let opamp = loop {
        let out = Command::new(&fleet_bin)
            .args(["hosts", "--json", "--state"])
            .arg(&fleet_state)
            .output()?;
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let o = h[0]["opamp"].clone();
        if o["remote_config_status"] == "applied" || std::time::Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    println!("$ linkmesh-fleet hosts --json   (the host's \"opamp\" object)");
    println!("{}", serde_json::to_string_pretty(&opamp)?);

    step("Stop the agent (SIGTERM): SIGINT to the supervisor, which stops its collector");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = run.wait();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    for line in text.lines().filter(|l| !l.contains("child=\"")) {
        println!("  {line}");
    }
    println!(
        "  (the supervisor's own lines, under child=opampsupervisor, are in {})",
        log_path.display()
    );

    drop(fleet);
    println!(
        "\nDone. The server was stopped; everything is left in {} to inspect.",
        dir.display()
    );
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn show(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let name = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("$ {name} {}", args.join(" "));
    let out = cmd.output()?;
    std::io::stdout().write_all(&out.stdout)?;
    std::io::stdout().write_all(&out.stderr)?;
    if !out.status.success() {
        bail!("{name} exited with {:?}", out.status.code());
    }
    Ok(out.stdout)
}

fn list(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    println!("$ ls -l {}", dir.display());
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let m = e.metadata()?;
        println!(
            "{:04o} {:>6} {}",
            m.permissions().mode() & 0o7777,
            m.len(),
            e.file_name().to_string_lossy()
        );
    }
    Ok(())
}
