//! `linkmesh-bench`: measurements of the agent against the reference server
//! on loopback. Prints one table and writes the same figures as JSON
//! (`target/bench/results.json` unless `--out` says otherwise) so runs can be
//! compared. Not part of the test suite: it asserts nothing.
//!
//! Figures:
//! - `binary_size`: bytes of the (stripped) `linkmesh-agent` next to this
//!   binary; release builds strip (Cargo.toml `[profile.release]`).
//! - `enrol_command`: wall time of `linkmesh-agent enroll` as a process, from
//!   spawn to exit, fresh state directory each run (exec, config, key
//!   generation, TLS 1.3 handshake with pin check, ServerInfo, Enroll, atomic
//!   writes with fsyncs).
//! - `enrol_in_process`: the same enrolment through the library in one
//!   process (no exec, no runtime start), isolating protocol and disk cost.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use linkmesh_agent::{
    enrollment::{self, EnrollOptions},
    host,
    identity::IdentityStore,
    tls::{CaPin, Trust},
    token::Token,
};
use linkmesh_integration::harness::{AgentEnv, Fleet, binary, scratch};

#[derive(Debug, Parser)]
#[command(
    name = "linkmesh-bench",
    about = "Benchmarks of linkmesh-agent; prints a table and writes JSON"
)]
struct Args {
    /// Runs per latency figure.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Where to write the JSON results.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// One measured figure.
#[derive(Debug, serde::Serialize)]
struct Figure {
    name: &'static str,
    unit: &'static str,
    how: &'static str,
    samples: usize,
    median: f64,
    p90: f64,
    p99: f64,
    min: f64,
    max: f64,
}

fn figure(name: &'static str, unit: &'static str, how: &'static str, mut xs: Vec<f64>) -> Figure {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if xs.is_empty() {
            return f64::NAN;
        }
        let i = ((xs.len() - 1) as f64 * q).round() as usize;
        xs[i.min(xs.len() - 1)]
    };
    Figure {
        name,
        unit,
        how,
        samples: xs.len(),
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        min: xs.first().copied().unwrap_or(f64::NAN),
        max: xs.last().copied().unwrap_or(f64::NAN),
    }
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let agent_bin = binary("linkmesh-agent")?;
    let dir = scratch("bench")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let mut figures = Vec::new();

    let size = std::fs::metadata(&agent_bin)?.len() as f64;
    figures.push(figure(
        "binary_size",
        "MiB",
        "size of the linkmesh-agent file (release profile strips)",
        vec![size / 1_048_576.0],
    ));

    // Tokens are made up front so the loop times enrolment only.
    let tokens: Vec<_> = (0..args.runs)
        .map(|_| fleet.token(1, "1h"))
        .collect::<Result<_, _>>()?;
    let mut command_ms = Vec::with_capacity(args.runs);
    for (i, t) in tokens.iter().enumerate() {
        let agent = AgentEnv::new(&dir.path().join(format!("cmd-{i}")))?;
        let start = Instant::now();
        let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
        command_ms.push(start.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    figures.push(figure(
        "enrol_command",
        "ms",
        "spawn to exit of `linkmesh-agent enroll`, loopback TLS 1.3, fresh state dir per run",
        command_ms,
    ));

    let tokens: Vec<_> = (0..args.runs)
        .map(|_| fleet.token(1, "1h"))
        .collect::<Result<_, _>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let facts = host::collect();
    let mut lib_ms = Vec::with_capacity(args.runs);
    for (i, t) in tokens.iter().enumerate() {
        let store = IdentityStore::new(dir.path().join(format!("lib-{i}")));
        let pin: CaPin = t.ca_pin.parse()?;
        let opts = EnrollOptions {
            server: t.server_url.parse()?,
            trust: Trust::Pins(vec![pin]),
            force: false,
            timeout: Duration::from_secs(10),
        };
        let token = Token::parse(&t.token, "bench")?;
        let start = Instant::now();
        let lock = store.lock_exclusive()?;
        runtime
            .block_on(enrollment::enroll(
                &store,
                &lock,
                &opts,
                move || Ok(token),
                &facts,
            ))
            .context("in-process enrolment")?;
        drop(lock);
        lib_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    figures.push(figure(
        "enrol_in_process",
        "ms",
        "linkmesh_agent::enrollment::enroll in one process, lock to commit, fresh state dir per run",
        lib_ms,
    ));

    print_table(&figures);
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("target/bench/results.json"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let doc = serde_json::json!({
        "agent_version": linkmesh_agent::version::AGENT_VERSION,
        "git_revision": linkmesh_agent::version::GIT_REVISION,
        "agent_binary": agent_bin.display().to_string(),
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "figures": figures,
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&doc)?)?;
    println!("\nresults written to {}", out.display());
    Ok(())
}

fn print_table(figures: &[Figure]) {
    println!(
        "{:<18} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "figure", "unit", "median", "p90", "p99", "min", "max", "samples"
    );
    for f in figures {
        println!(
            "{:<18} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            f.name, f.unit, f.median, f.p90, f.p99, f.min, f.max, f.samples
        );
    }
    println!();
    for f in figures {
        println!("{}: {}", f.name, f.how);
    }
}
