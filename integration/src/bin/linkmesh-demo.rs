//! `linkmesh-demo`: a local end-to-end run on loopback. Starts the reference
//! fleet server, creates a token, enrols an agent into a scratch directory
//! (twice, to show the second is a no-op), and shows what each side knows.
//! Every step prints the command a person would type.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use linkmesh_integration::harness::{Fleet, TokenInfo, binary};

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
            .arg(&fleet_state),
    )?;

    step("Start the fleet server on loopback (a free port)");
    println!(
        "$ linkmesh-fleet serve --state {} --listen 127.0.0.1:0 &",
        fleet_state.display()
    );
    let fleet = Fleet::start(&fleet_state, &[])?;
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
