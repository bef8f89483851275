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
//! - `run_to_ready`: from spawning `linkmesh-agent run` (enrolled host,
//!   real opampsupervisor and collector) to `READY=1` arriving on `NOTIFY_SOCKET`.
//! - `idle_rss_*`: the agent's memory while supervising the real
//!   supervisor and collector, sampled once a second over `--idle-secs`:
//!   `VmRSS`, `RssAnon` (heap and stacks) and `Pss` (from smaps_rollup).
//! - `idle_cpu`: the agent's CPU time (all threads, nanosecond schedstat)
//!   over `--idle-secs` of idle supervision, as a percentage of one core.
//! - `report_rtt`: round trip of a heartbeat Report on an established
//!   mutual-TLS channel (library client), `--reports` samples.
//! - `wire_heartbeat` / `wire_full_report`: bytes the client writes to the
//!   TCP socket per report on an established channel (TLS records, HTTP/2
//!   frames, HPACK-compressed headers, gRPC framing and protobuf), averaged;
//!   `payload_*` the protobuf message alone.
//! - `fleet_*`: `--fleet` simulated agents in this process, each enrolled
//!   through the real Enroll RPC (its own key and certificate) and each with
//!   its own mutual-TLS connection and report loop (a full report, then
//!   heartbeats every `--fleet-interval`, first sends spread over the
//!   interval), for `--fleet-secs`: enrolment rate, reports handled per
//!   second, the server's CPU (schedstat) and RSS, report round trip under
//!   that load, and agents per server core at that interval.
//! - `crash_to_restart`: SIGKILL of the supervisor to the agent's status file
//!   showing a new supervisor pid running (polled every millisecond). Each
//!   sample is a fresh agent, so it is the first restart (backoff 100 ms ±20 %).
//! - `deb_size` / `rpm_size`: the packages `linkmesh-package` builds of the
//!   release binary (gzip level 9), as shipped.
//! - `upgrade_downtime`: on a throw-away host with real systemd, the .deb
//!   installed and the host enrolled, then `dpkg -i` of the package again
//!   (`--upgrades` times): dpkg runs the upgrade path (prerm upgrade, unpack,
//!   postinst configure, which restarts the agent). Measured from systemd's
//!   own timestamps: leaving `active` (stop begins) to `active` again (the
//!   new agent's READY). Needs root; skipped with a note otherwise.
//! - `config_apply`: `linkmesh-fleet collector-config set` of a new fleet
//!   configuration (a distinct pipeline each time) to the reference server
//!   logging the real supervisor's `applied` status for its hash, on a host
//!   whose real opampsupervisor and collector are connected; `--applies`
//!   samples. The server's log timestamp is the end, the wall clock before
//!   spawning the command the start. The pinned supervisor reports
//!   `applied` only when its `config_apply_timeout` (5 s, rendered by the
//!   agent) has passed with the collector healthy, so that is the floor.
//! - `away_rss_growth`: the agent's `VmRSS` after the server has been away
//!   for `--away-secs` (the reporter retrying with backoff), minus before.
//! - `flood_peak_rss`: the agent's `VmHWM` (peak RSS) once a stand-in
//!   supervisor (`fixtures/noisy.sh`) has written invalid UTF-8, a 1 MiB
//!   line and 32 MiB without a newline, all of it logged in bounded chunks.
//! - `download_rss_growth`: the reference server's `VmRSS` while it
//!   streams a 64 MiB artifact to 16 clients reading at 256 KiB/s, minus
//!   before (chunks, not files, held in memory).
//!
//! The whole set is measured `--repeat` times. The table shows, per figure,
//! the median of the runs' medians and the spread of those medians (min–max
//! over runs), and the median of the runs' p99; the JSON keeps every run.

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
    /// Seconds of idle supervision over which RSS and CPU are measured.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Samples of crash-to-restart and exec-to-READY (one fresh agent each).
    #[arg(long, default_value_t = 20)]
    restarts: usize,
    /// Reports per report figure.
    #[arg(long, default_value_t = 1000)]
    reports: usize,
    /// Simulated agents for the fleet load (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    fleet: usize,
    /// Seconds the fleet reports for.
    #[arg(long, default_value_t = 60)]
    fleet_secs: u64,
    /// Report interval of the simulated fleet, seconds.
    #[arg(long, default_value_t = 30)]
    fleet_interval: u64,
    /// Package upgrades timed on a throw-away host (0 skips them).
    #[arg(long, default_value_t = 10)]
    upgrades: usize,
    /// Collector configurations applied through OpAMP (0 skips them).
    #[arg(long, default_value_t = 20)]
    applies: usize,
    /// Whole runs of every measurement; the table shows the spread over them.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Run only this measurement: `continuity` (the upgrade drill),
    /// `idle-conns` (the server holding idle TLS connections) or `rollback`
    /// (bad agent upgrades put back by the watcher, `--upgrades` of them),
    /// `clones` (a copied identity's first start to its own, `--clones`),
    /// `repositories` (the signed apt and yum repositories generated from
    /// `--repo-versions` versions' packages), `memory` (the agent with the
    /// server away and under an output flood, the server streaming
    /// downloads).
    #[arg(long, value_parser = ["continuity", "idle-conns", "rollback", "clones", "repositories", "memory"])]
    only: Option<String>,
    /// Versions (a .deb and an .rpm each) the repositories are generated
    /// from (0 skips it).
    #[arg(long, default_value_t = 10)]
    repo_versions: usize,
    /// Copies of an enrolled host started one after another on machines of
    /// their own, each timed to its own identity (0 skips them; needs root).
    #[arg(long, default_value_t = 10)]
    clones: usize,
    /// Seconds the server is away for `away_rss_growth`.
    #[arg(long, default_value_t = 30)]
    away_secs: u64,
    /// Idle TLS connections the server is made to hold (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_conns: usize,
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

/// One figure over all runs.
#[derive(Debug, serde::Serialize)]
struct Summary {
    name: &'static str,
    unit: &'static str,
    how: &'static str,
    runs: usize,
    samples_per_run: usize,
    /// Median of the runs' medians.
    median: f64,
    /// Lowest and highest of the runs' medians.
    run_median_min: f64,
    run_median_max: f64,
    /// Median of the runs' p99.
    p99: f64,
}

fn summarize(runs: &[Vec<Figure>]) -> Vec<Summary> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|f| {
            let same: Vec<&Figure> = runs
                .iter()
                .filter_map(|r| r.iter().find(|g| g.name == f.name))
                .collect();
            let medians = figure("", "", "", same.iter().map(|g| g.median).collect());
            let p99s = figure("", "", "", same.iter().map(|g| g.p99).collect());
            Summary {
                name: f.name,
                unit: f.unit,
                how: f.how,
                runs: same.len(),
                samples_per_run: f.samples,
                median: medians.median,
                run_median_min: medians.min,
                run_median_max: medians.max,
                p99: p99s.median,
            }
        })
        .collect()
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.runs == 0 || args.repeat == 0 {
        bail!("--runs and --repeat must be at least 1");
    }
    let agent_bin = binary("linkmesh-agent")?;
    let mut runs = Vec::with_capacity(args.repeat);
    for r in 1..=args.repeat {
        eprintln!("run {r} of {}", args.repeat);
        runs.push(match args.only.as_deref() {
            Some("continuity") => continuity()?,
            Some("idle-conns") => idle_connections(&args)?,
            Some("rollback") => rollback(&args)?,
            Some("clones") => clones(&args)?,
            Some("repositories") => repositories(&args)?,
            Some("memory") => memory(&args)?,
            _ => {
                let mut figures = one_run(&args, &agent_bin)?;
                figures.extend(idle_connections(&args)?);
                figures.extend(continuity()?);
                figures.extend(rollback(&args)?);
                figures.extend(repositories(&args)?);
                figures.extend(memory(&args)?);
                if nix::unistd::geteuid().is_root() {
                    figures.extend(clones(&args)?);
                } else {
                    eprintln!("skipping the clone figures: they need root (mount namespaces)");
                }
                figures
            }
        });
    }
    let summary = summarize(&runs);
    print_table(&summary);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/results.json"));
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let doc = serde_json::json!({
        "agent_version": linkmesh_agent::version::AGENT_VERSION,
        "git_revision": linkmesh_agent::version::GIT_REVISION,
        "agent_binary": agent_bin.display().to_string(),
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "summary": summary,
        "runs": runs,
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&doc)?)?;
    println!("\nresults written to {}", out.display());
    Ok(())
}

/// Memory under the three loads the agent and the server must bound: the
/// server away for `--away-secs`, a supervisor's hostile output, and 16
/// slow downloads of a 64 MiB artifact (figures in the module docs).
fn memory(args: &Args) -> anyhow::Result<Vec<Figure>> {
    use linkmesh_integration::harness::{enrolled_agent, fixture, runtime_bin_dir};
    let dir = scratch("bench-memory")?;
    let artifacts = dir.path().join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    std::fs::File::create(artifacts.join("big.deb"))?.set_len(64 << 20)?;
    let mut fleet = Fleet::start(
        &dir.path().join("fleet"),
        &[
            "--artifacts",
            artifacts.to_str().unwrap_or_default(),
            // Reports every second: the reporter is retrying, not waiting
            // out an interval, for the whole time the server is away.
            "--report-interval",
            "1s",
        ],
    )?;
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;
    let rss_mib = |pid: u32, key: &str| -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        Ok(kib(&status, key) / 1024.0)
    };
    let mut figures = Vec::new();

    // The server away: the reporter retries with backoff, the collector runs.
    let agent = enrolled_agent(&dir.path().join("away"), &fleet, &bins, "")?;
    let run = agent.spawn_run(&[], &[])?;
    run.wait_status(Duration::from_secs(20), "reporting", |s| {
        s["reporter"]["reports"].as_u64() >= Some(2)
            && s["supervision"]["collector_pid"].as_u64().is_some()
    })?;
    let before = rss_mib(run.pid(), "VmRSS:")?;
    fleet.stop();
    std::thread::sleep(Duration::from_secs(args.away_secs.max(1)));
    let after = rss_mib(run.pid(), "VmRSS:")?;
    let failures = run
        .status()
        .and_then(|s| s["reporter"]["consecutive_failures"].as_u64())
        .unwrap_or(0);
    eprintln!(
        "server away {} s: {failures} failed attempts, VmRSS {before:.2} -> {after:.2} MiB",
        args.away_secs
    );
    figures.push(figure(
        "away_rss_growth",
        "MiB",
        "agent VmRSS after the server was away --away-secs, minus before",
        vec![after - before],
    ));
    drop(run);
    fleet.restart(None)?;

    // Hostile supervisor output: logged in bounded chunks.
    let agent = enrolled_agent(&dir.path().join("flood"), &fleet, &bins, "")?;
    agent.use_supervisor(&bins, &fixture("noisy.sh"))?;
    let run = agent.spawn_run(&[], &[])?;
    run.wait_log(Duration::from_secs(60), "after the flood")?;
    figures.push(figure(
        "flood_peak_rss",
        "MiB",
        "agent VmHWM after 33 MiB of supervisor output (a 32 MiB line among it)",
        vec![rss_mib(run.pid(), "VmHWM:")?],
    ));
    drop(run);

    // Sixteen slow downloads of a 64 MiB artifact.
    let url = format!("{}/artifacts/big.deb", fleet.url);
    let before = rss_mib(fleet.pid(), "VmRSS:")?;
    let mut slow: Vec<_> = (0..16)
        .map(|_| {
            std::process::Command::new("curl")
                .args(["-sk", "--limit-rate", "256k", "-o", "/dev/null", &url])
                .stdin(std::process::Stdio::null())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .context("curl, for the downloads")?;
    let mut during = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        during.push(rss_mib(fleet.pid(), "VmRSS:")? - before);
    }
    for c in &mut slow {
        let _ = c.kill();
        let _ = c.wait();
    }
    figures.push(figure(
        "download_rss_growth",
        "MiB",
        "server VmRSS each second of 16 downloads of 64 MiB at 256 KiB/s, minus before",
        during,
    ));
    Ok(figures)
}

/// The reference server holding `--idle-conns` TLS connections that
/// completed their handshake and send nothing (spread over loopback source
/// addresses, 60 per address, under its per-address bound of 64, with the
/// first-request timeout raised so they stay): its RSS and open descriptors
/// while it holds them, and enrolment latency for everyone else meanwhile.
/// The fleet's package repositories generated from `--repo-versions`
/// versions: each version's .deb and .rpm built by `linkmesh-package` from
/// a stand-in binary the size of the release agent (a script that answers
/// `version --json`, padded with random bytes so it compresses as little
/// as a binary), then the whole generation (apt-ftparchive, every RPM
/// re-signed, createrepo_c, the signatures) timed five times, an artifact
/// touched before each so it is rebuilt; and the check a metadata request
/// makes when nothing changed, timed 200 times.
fn repositories(args: &Args) -> anyhow::Result<Vec<Figure>> {
    use linkmesh_fleet::repository::{self, ArchiveKeys, Repositories};
    if args.repo_versions == 0 {
        return Ok(Vec::new());
    }
    const AGENT_SIZE: usize = 5_800_000;
    let dir = scratch("bench-repos")?;
    let artifacts = dir.path().join("artifacts");
    for i in 0..args.repo_versions {
        let bin_dir = dir.path().join(format!("bin-{i}"));
        std::fs::create_dir_all(&bin_dir)?;
        let mut script = format!(
            "#!/bin/sh\nprintf '{{\"api_version\":1,\"git_revision\":\"bench\",\"version\":\"1.{i}.0\"}}\\n'\nexit 0\n"
        )
        .into_bytes();
        let mut pad = vec![0u8; AGENT_SIZE];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut pad)
            .map_err(|_| anyhow::anyhow!("random"))?;
        script.extend_from_slice(&pad);
        let bin = bin_dir.join("linkmesh-agent");
        std::fs::write(&bin, &script)?;
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        linkmesh_integration::harness::build_packages(&bin, &artifacts, 6)?;
    }
    let secret = linkmesh_fleet::sealed::Secret::new(b"benchmark secret, not a real one", "bench")?;
    let keys_dir = dir.path().join(repository::keys::KEYS_DIR);
    repository::keys::add(&keys_dir, &secret, None)?;
    let repos = Repositories::new(
        &artifacts,
        &dir.path().join("repositories"),
        ArchiveKeys::load(&keys_dir, &secret)?,
    )?;
    let touched = std::fs::read_dir(&artifacts)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("no .deb built")?;
    let mut generation = Vec::new();
    for _ in 0..5 {
        let f = std::fs::File::options().append(true).open(&touched)?;
        f.set_modified(std::time::SystemTime::now())?;
        drop(f);
        let t = Instant::now();
        repos.current()?;
        generation.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut unchanged = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        repos.current()?;
        unchanged.push(t.elapsed().as_secs_f64() * 1_000_000.0);
    }
    Ok(vec![
        figure(
            "repositories: generation from the packages",
            "ms",
            "--repo-versions versions' .deb and .rpm (stand-in binaries of the release agent's size): apt-ftparchive, every RPM re-signed, createrepo_c, InRelease, Release.gpg, repomd.xml.asc; 5 rebuilds",
            generation,
        ),
        figure(
            "repositories: a metadata request's freshness check",
            "µs",
            "the artifacts directory listed and compared with the served generation's, nothing changed; 200 calls",
            unchanged,
        ),
    ])
}

/// A clone's first start to an identity of its own: an enrolled host's
/// state copied `--clones` times, each copy's `run` started (idle runtime)
/// in a mount namespace whose `/etc/machine-id` is another machine's, timed
/// from the spawn to the new identity committed on disk, and to its first
/// report as the new host accepted. One copy at a time.
fn clones(args: &Args) -> anyhow::Result<Vec<Figure>> {
    use linkmesh_integration::harness::{copy_agent, kill_group, run_on_machine, write_machine_id};
    if args.clones == 0 {
        return Ok(Vec::new());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "--only clones needs root (each copy runs in a mount namespace); run as root or pass --clones 0"
        );
    }
    let dir = scratch("bench-clones")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &["--report-interval", "1s"])?;
    let original =
        linkmesh_integration::harness::idle_enrolled_agent(&dir.path().join("original"), &fleet)?;
    let original_id = original.identity()?.host_id.to_string();
    let (mut to_identity, mut to_report) = (Vec::new(), Vec::new());
    for n in 0..args.clones {
        let copy = copy_agent(&original, &dir.path().join(format!("copy-{n}")))?;
        let machine_id = copy.root.join("machine-id");
        write_machine_id(&machine_id, n as u64)?;
        let status_file = copy.state.join("runtime-status.json");
        let started = Instant::now();
        let child = run_on_machine(&copy, &machine_id, &[])?;
        let deadline = started + Duration::from_secs(30);
        let mut identity_at = None;
        let reported_at = loop {
            if identity_at.is_none()
                && copy
                    .identity()
                    .is_ok_and(|i| i.host_id.as_str() != original_id)
            {
                identity_at = Some(started.elapsed());
            }
            let reported = std::fs::read(&status_file)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|s| s["reporter"]["reports"].as_u64() >= Some(1));
            if identity_at.is_some() && reported {
                break started.elapsed();
            }
            if Instant::now() > deadline {
                kill_group(child);
                bail!(
                    "copy {n} had no identity of its own after 30 s: {}",
                    std::fs::read_to_string(copy.root.join("run.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        kill_group(child);
        to_identity.push(identity_at.unwrap_or(reported_at).as_secs_f64() * 1000.0);
        to_report.push(reported_at.as_secs_f64() * 1000.0);
        let _ = std::fs::remove_dir_all(&copy.root);
    }
    Ok(vec![
        figure(
            "clone_start_to_own_identity_ms",
            "ms",
            "a copied identity's `run` spawned in another machine's mount namespace to the re-keyed identity on disk (1 ms polls)",
            to_identity,
        ),
        figure(
            "clone_start_to_first_report_ms",
            "ms",
            "the same, to the status file showing the first report as the new host",
            to_report,
        ),
    ])
}

fn idle_connections(args: &Args) -> anyhow::Result<Vec<Figure>> {
    if args.idle_conns == 0 {
        return Ok(Vec::new());
    }
    // This process holds the client ends.
    linkmesh_fleet::server::raise_fd_limit();
    let dir = scratch("bench-idle")?;
    let fleet = Fleet::start(
        &dir.path().join("fleet"),
        &["--first-request-timeout", "10m"],
    )?;
    let addr: std::net::SocketAddr = fleet.url.trim_start_matches("https://").parse()?;
    let tokens: Vec<_> = (0..args.runs.min(50))
        .map(|_| fleet.token(1, "1h"))
        .collect::<Result<_, _>>()?;
    let pin = tokens.first().map(|t| t.ca_pin.clone()).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let held = rt.block_on(async {
        let config = std::sync::Arc::new(linkmesh_agent::tls::enrol_client_config(&Trust::Pins(
            vec![pin.parse()?],
        ))?);
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut held = Vec::with_capacity(args.idle_conns);
        for i in 0..args.idle_conns {
            let source =
                std::net::Ipv4Addr::new(127, 0, 1, u8::try_from(1 + i / 60).unwrap_or(255));
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(std::net::SocketAddr::from((source, 0)))?;
            let tcp = socket.connect(addr).await?;
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
            held.push(connector.connect(name, tcp).await?);
        }
        anyhow::Ok(held)
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = fleet.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as f64;
    let mut enrol_ms = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let agent = AgentEnv::new(&dir.path().join(format!("idle-{i}")))?;
        let start = Instant::now();
        let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
        enrol_ms.push(start.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!(
                "enroll beside idle connections failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let open = held.len() as f64;
    drop(held);
    Ok(vec![
        figure(
            "idle_conns_held",
            "count",
            "idle TLS connections (handshake done, nothing sent) the server held",
            vec![open],
        ),
        figure(
            "server_rss_idle_conns",
            "MiB",
            "server VmRSS while it holds them",
            vec![kib(&status, "VmRSS:") / 1024.0],
        ),
        figure(
            "server_fds_idle_conns",
            "count",
            "server open file descriptors while it holds them",
            vec![fds],
        ),
        figure(
            "enrol_ms_beside_idle_conns",
            "ms",
            "`linkmesh-agent enroll` as a command, run to completion, while they are held",
            enrol_ms,
        ),
    ])
}

/// Bad agent upgrades put back by the watcher: a deb host on this build,
/// then `--upgrades` times `apt-get install` of the fault-injection build
/// (0.1.1, exit 1 at start), timed to the previous version active again.
/// Between rounds the outcome record is removed, so the same bad version
/// is watched again (a host otherwise never watches a version it rolled
/// back once). Default probation (60 s): a start that exits is decided at
/// the first restart, not at the end of the window.
fn rollback(args: &Args) -> anyhow::Result<Vec<Figure>> {
    use linkmesh_integration::{
        harness::{build_packages, faulty_agent, install_one_liner, install_runtime},
        testhost::{TestHost, TestNet},
    };
    if args.upgrades == 0 {
        return Ok(Vec::new());
    }
    let dir = scratch("bench-rollback")?;
    let artifacts = dir.path().join("artifacts");
    let (faulty, _) = faulty_agent()?;
    // This build's packages are what the one-liner installs first.
    build_packages(&binary("linkmesh-agent")?, &artifacts, 6)?;
    let bad = build_packages(&faulty, &artifacts, 6)?;
    let mut net = TestNet::new()?;
    let fleet = Fleet::start_for_hosts(&dir.path().join("fleet"), net.netns(), &artifacts)?;
    let host = TestHost::boot("lm-bench-rollback")?;
    net.attach(&host)?;
    install_runtime(&host)?;
    host.copy_in(&bad.deb, "/root/bad.deb", 0o644)?;
    let t = fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let (code, text) = install_one_liner(
        &host,
        &fleet,
        &format!("--ca-pin {} --token-file /root/token", t.ca_pin),
    )?;
    if code != 0 {
        bail!("install failed: {text}");
    }
    host.sh(
        "mkdir -p /etc/systemd/system/linkmesh-agent.service.d && printf '[Service]\nEnvironment=LINKMESH_FAULT=exit-at-start\n' > /etc/systemd/system/linkmesh-agent.service.d/90-fault.conf && systemctl daemon-reload",
    )?;
    let version = linkmesh_agent::version::AGENT_VERSION;
    let mut secs = Vec::with_capacity(args.upgrades);
    for i in 0..args.upgrades {
        host.sh("rm -f /var/lib/linkmesh-agent/upgrade/outcome.json")?;
        let start = Instant::now();
        host.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o Dpkg::Options::=--force-confold /root/bad.deb")?;
        let deadline = start + Duration::from_secs(180);
        loop {
            let out = host.exec(
                "test ! -e /var/lib/linkmesh-agent/upgrade/probation.json && grep -q '\"rolled_back\"' /var/lib/linkmesh-agent/upgrade/outcome.json && systemctl is-active --quiet linkmesh-agent && linkmesh-agent --version",
            )?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(version) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "round {i}: not rolled back within 180 s:\n{}",
                    host.journal(Some("linkmesh-upgrade"), "-n 30")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        secs.push(start.elapsed().as_secs_f64());
    }
    Ok(vec![figure(
        "rollback_bad_upgrade",
        "s",
        "`apt-get install` of a release that exits 1 at start, to the previous version active again (deb, default 60 s probation; the watcher decides at the first systemd restart)",
        secs,
    )])
}

/// The upgrade drill once (linkmesh_integration::drill): one figure per
/// goal of the continuity issue, each one sample per run.
fn continuity() -> anyhow::Result<Vec<Figure>> {
    let drill = linkmesh_integration::drill::Drill::setup("lm-bench-drill")?;
    let outcome = drill.run()?;
    if let Err(e) = linkmesh_integration::drill::check(&outcome) {
        eprintln!("the drill broke a goal:\n{e}");
    }
    let how = |name: &str| -> &'static str {
        match name {
            "agent_upgrade_collector_restarts" => {
                "collector restarts over the 10 agent steps of the drill (one-liner, deb and rpm installs, upgrades and rollbacks, SIGKILL)"
            }
            "agent_upgrade_records_lost" => {
                "records accepted by the collector and missing from its sink, over the agent steps"
            }
            "agent_restart_otlp_refused_ms" => {
                "longest window the sender saw the OTLP port refuse connections during an agent step"
            }
            "runtime_upgrade_otlp_refused_ms" => {
                "longest refusal window during install-opamp.sh's upgrade and rollback of the runtime"
            }
            "runtime_upgrade_records_lost" => "records lost over the runtime upgrade and rollback",
            _ => "records lost over the server's restarts and its minute away",
        }
    };
    let unit = |name: &str| -> &'static str { if name.ends_with("_ms") { "ms" } else { "count" } };
    Ok(outcome
        .figures()
        .into_iter()
        .map(|(name, v)| figure(name, unit(name), how(name), vec![v]))
        .collect())
}

/// Every measurement once.
fn one_run(args: &Args, agent_bin: &std::path::Path) -> anyhow::Result<Vec<Figure>> {
    let dir = scratch("bench")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let mut figures = Vec::new();

    let size = std::fs::metadata(agent_bin)?.len() as f64;
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
            proxy: None,
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

    let packages = package_figures(&dir, agent_bin, &mut figures)?;
    report_figures(args, &dir, &fleet, &runtime, &mut figures)?;
    fleet_figures(args, &dir, &mut figures)?;
    supervision_figures(args, &dir, &fleet, &mut figures)?;
    if args.applies > 0 {
        config_apply_figures(args, &dir, &mut figures)?;
    }
    upgrade_figures(args, &dir, &packages, &mut figures)?;
    Ok(figures)
}

/// Builds the release packages; their sizes.
fn package_figures(
    dir: &tempfile::TempDir,
    agent_bin: &std::path::Path,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<linkmesh_integration::harness::Packages> {
    let packages =
        linkmesh_integration::harness::build_packages(agent_bin, &dir.path().join("packages"), 9)?;
    for (name, path) in [("deb_size", &packages.deb), ("rpm_size", &packages.rpm)] {
        figures.push(figure(
            name,
            "MiB",
            "size of the package linkmesh-package builds of the release binary (gzip -9)",
            vec![std::fs::metadata(path)?.len() as f64 / 1_048_576.0],
        ));
    }
    Ok(packages)
}

/// Package upgrades on a throw-away host: how long the agent is down.
fn upgrade_figures(
    args: &Args,
    dir: &tempfile::TempDir,
    packages: &linkmesh_integration::harness::Packages,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    use linkmesh_integration::testhost::{SERVER_ADDR, TestHost, TestNet, restart_downtime};
    if args.upgrades == 0 {
        return Ok(());
    }
    let host = match TestHost::boot("lm-bench") {
        Ok(h) => h,
        Err(e) => {
            eprintln!("note: upgrade_downtime skipped: no throw-away host ({e:#})");
            return Ok(());
        }
    };
    let mut net = TestNet::new()?;
    net.attach(&host)?;
    let fleet = Fleet::start_in_netns(
        &dir.path().join("fleet-upgrade"),
        net.netns(),
        &format!("{SERVER_ADDR}:8443"),
        &[],
    )?;
    host.copy_in(&packages.deb, "/root/agent.deb", 0o644)?;
    linkmesh_integration::harness::install_runtime(&host)?;
    let t = fleet.token(1, "1h")?;
    std::fs::write(host.path("/root/token"), &t.token)?;
    let sh = |script: &str| -> anyhow::Result<String> {
        let out = host.exec(script)?;
        if !out.status.success() {
            bail!("`{script}`: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    sh(&format!(
        "dpkg -i /root/agent.deb >/dev/null 2>&1 && linkmesh-agent enroll --server {} --ca-pin {} --token-file /root/token && systemctl start linkmesh-agent",
        fleet.url, t.ca_pin
    ))?;
    // The agent's main pid while it is active, and the unit's properties.
    let show =
        || -> anyhow::Result<(Option<String>, std::collections::BTreeMap<String, String>)> {
            let props = host.unit_properties(
                "linkmesh-agent",
                &[
                    "MainPID",
                    "ActiveState",
                    "ActiveExitTimestampMonotonic",
                    "ActiveEnterTimestampMonotonic",
                ],
            )?;
            let pid = (props["ActiveState"] == "active" && props["MainPID"] != "0")
                .then(|| props["MainPID"].clone());
            Ok((pid, props))
        };
    let mut down_ms = Vec::with_capacity(args.upgrades);
    for _ in 0..args.upgrades {
        let (before, _) = show()?;
        sh("dpkg -i /root/agent.deb >/dev/null 2>&1")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let props = loop {
            let (pid, props) = show()?;
            if pid.is_some() && pid != before {
                break props;
            }
            if Instant::now() > deadline {
                bail!("the agent did not come back after dpkg -i");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        down_ms.push(restart_downtime(&props).as_secs_f64() * 1e3);
    }
    figures.push(figure(
        "upgrade_downtime",
        "ms",
        "dpkg -i of the .deb on an enrolled throw-away host: systemd's stop-begins to READY",
        down_ms,
    ));
    Ok(())
}

/// `collector-config set` to `applied`, through the real supervisor.
fn config_apply_figures(
    args: &Args,
    dir: &tempfile::TempDir,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    use linkmesh_integration::harness::{enrolled_agent, runtime_bin_dir};
    let fleet = Fleet::start(&dir.path().join("fleet-opamp"), &[])?;
    let bins = runtime_bin_dir(&dir.path().join("bin-opamp"))?;
    let agent = enrolled_agent(&dir.path().join("opamp-agent"), &fleet, &bins, "")?;
    let run = agent.spawn_run(&[], &[])?;
    let connected = Instant::now() + Duration::from_secs(60);
    while !fleet.log().contains("OpAMP connection opened") {
        anyhow::ensure!(
            Instant::now() < connected,
            "the supervisor never connected:\n{}",
            run.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut ms = Vec::with_capacity(args.applies);
    for i in 0..args.applies {
        let file = dir.path().join(format!("apply-{i}.yaml"));
        std::fs::write(
            &file,
            format!(
                "receivers:\n  nop/bench{i}: {{}}\nexporters:\n  nop/bench{i}: {{}}\nservice:\n  pipelines:\n    logs/bench{i}:\n      receivers: [nop/bench{i}]\n      exporters: [nop/bench{i}]\n"
            ),
        )?;
        let start = time::OffsetDateTime::now_utc();
        let out = fleet.admin(&[
            "collector-config",
            "set",
            "--file",
            file.to_str().unwrap_or_default(),
        ])?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hash = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        let applied_at = loop {
            let log = fleet.log();
            let at = log
                .lines()
                .filter(|l| {
                    l.contains("Remote configuration status")
                        && l.contains(&hash)
                        && l.contains("status=applied")
                })
                .find_map(|l| {
                    l.split_whitespace().next().and_then(|ts| {
                        time::OffsetDateTime::parse(
                            ts,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                });
            if let Some(at) = at {
                break at;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "configuration {hash} never applied:\n{}",
                fleet.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ms.push((applied_at - start).as_seconds_f64() * 1e3);
    }
    drop(run);
    figures.push(figure(
        "config_apply",
        "ms",
        "`collector-config set` to the supervisor's `applied` in the server's log (real supervisor and collector, config_apply_timeout 5 s)",
        ms,
    ));
    Ok(())
}

fn supervision_figures(
    args: &Args,
    dir: &tempfile::TempDir,
    fleet: &Fleet,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    use linkmesh_integration::harness::{enrolled_agent, runtime_bin_dir};
    let bins = runtime_bin_dir(&dir.path().join("bin"))?;

    // exec → READY and crash → restart, one fresh agent per sample.
    let mut ready_ms = Vec::new();
    let mut restart_ms = Vec::new();
    for i in 0..args.restarts {
        let agent = enrolled_agent(&dir.path().join(format!("sup-{i}")), fleet, &bins, "")?;
        let sock_path = agent.root.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let start = Instant::now();
        let run = agent.spawn_run(
            &[],
            &[("NOTIFY_SOCKET", sock_path.to_str().unwrap_or_default())],
        )?;
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).context("no READY=1 within 10 s")?;
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        ready_ms.push(start.elapsed().as_secs_f64() * 1e3);
        let s = run.wait_status(Duration::from_secs(10), "running", |s| {
            s["supervision"]["state"] == "running"
        })?;
        let pid = s["supervision"]["pid"].as_u64().unwrap_or(0);
        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let deadline = killed + Duration::from_secs(10);
        loop {
            if let Some(s) = run.status()
                && s["supervision"]["state"] == "running"
                && s["supervision"]["pid"].as_u64().is_some_and(|p| p != pid)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("no restart within 10 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        restart_ms.push(killed.elapsed().as_secs_f64() * 1e3);
        drop(run);
    }
    figures.push(figure(
        "run_to_ready",
        "ms",
        "spawn of `linkmesh-agent run` to READY=1 on NOTIFY_SOCKET (enrolled, real runtimes)",
        ready_ms,
    ));
    figures.push(figure(
        "crash_to_restart",
        "ms",
        "SIGKILL of opampsupervisor to a new one running, first restart of a fresh agent",
        restart_ms,
    ));

    // Idle supervision: memory and CPU.
    let agent = enrolled_agent(&dir.path().join("idle"), fleet, &bins, "")?;
    let run = agent.spawn_run(&[], &[])?;
    run.wait_status(Duration::from_secs(10), "collector running", |s| {
        s["supervision"]["state"] == "running"
            && s["supervision"]["collector_pid"].as_u64().is_some()
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = run.pid();
    let (mut rss, mut anon, mut pss) = (Vec::new(), Vec::new(), Vec::new());
    let cpu0 = thread_cpu_ns(pid)?;
    let t0 = Instant::now();
    for _ in 0..args.idle_secs.max(1) {
        std::thread::sleep(Duration::from_secs(1));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        rss.push(kib(&status, "VmRSS:") / 1024.0);
        anon.push(kib(&status, "RssAnon:") / 1024.0);
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        pss.push(kib(&rollup, "Pss:") / 1024.0);
    }
    let cpu = cpu_between(&cpu0, &thread_cpu_ns(pid)?);
    let wall = t0.elapsed().as_secs_f64();
    figures.push(figure(
        "idle_rss",
        "MiB",
        "VmRSS of the agent, sampled each second while idle-supervising",
        rss,
    ));
    figures.push(figure(
        "idle_rss_anon",
        "MiB",
        "RssAnon (heap, stacks) of the same samples",
        anon,
    ));
    figures.push(figure(
        "idle_pss",
        "MiB",
        "Pss from smaps_rollup of the same samples",
        pss,
    ));
    figures.push(figure(
        "idle_cpu",
        "%core",
        "agent CPU time (all threads, /proc/PID/task/*/schedstat) over the idle period / wall time",
        vec![cpu / wall * 100.0],
    ));
    Ok(())
}

/// A TCP stream that counts the bytes written and read.
struct Counting {
    inner: tokio::net::TcpStream,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl tokio::io::AsyncRead for Counting {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counting {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.written
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn report_figures(
    args: &Args,
    dir: &tempfile::TempDir,
    fleet: &Fleet,
    runtime: &tokio::runtime::Runtime,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    use linkmesh_agent::{proto, reporter};
    use linkmesh_integration::harness::{enrolled_agent, runtime_bin_dir};
    let bins = runtime_bin_dir(&dir.path().join("bin-rep"))?;
    let agent = enrolled_agent(&dir.path().join("rep"), fleet, &bins, "")?;
    let store = IdentityStore::new(&agent.state);
    let lock = store.lock_shared()?.context("no state")?;
    let identity = store.load(&lock)?.context("not enrolled")?;
    drop(lock);
    // A realistic full report: a supervised otelcol runtime.
    let rt_status = proto::RuntimeStatus {
        kind: "otelcol".into(),
        version: "0.159.0".into(),
        supervisor_version: "0.159.0".into(),
        state: "running".into(),
        pid: 123_456,
        restarts: 2,
        last_exit: "exit code 1".into(),
        collector_pid: 123_470,
        collector_crashes: 1,
        ..Default::default()
    };
    let full = reporter::full_report(
        &identity,
        "deb",
        &host::collect(),
        rt_status,
        Some(linkmesh_agent::version::SkewVerdict::InWindow),
        reporter::Upgrades::default(),
    );
    let mut hb = reporter::heartbeat(full.state_digest);
    hb.sequence = 86_400;
    hb.agent_time_unix_ms = 1_795_447_872_876;
    hb.clock_offset_ms = 12;
    let mut full_sent = full.clone();
    full_sent.sequence = 86_400;
    full_sent.agent_time_unix_ms = hb.agent_time_unix_ms;
    figures.push(figure(
        "payload_heartbeat",
        "B",
        "protobuf encoding of a heartbeat ReportRequest",
        vec![prost::Message::encoded_len(&hb) as f64],
    ));
    figures.push(figure(
        "payload_full_report",
        "B",
        "protobuf encoding of a full ReportRequest (otelcol, supervised)",
        vec![prost::Message::encoded_len(&full_sent) as f64],
    ));

    let tls = std::sync::Arc::new(linkmesh_agent::tls::mtls_client_config(&identity)?);
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = identity.server.clone();
    let counter = written.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, server, counter) = (tls.clone(), server.clone(), counter.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(server.authority()).await?;
            tcp.set_nodelay(true)?; // as the agent's dialer does
            let name = rustls::pki_types::ServerName::try_from(server.host().to_owned())
                .map_err(std::io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(
                    name,
                    Counting {
                        inner: tcp,
                        written: counter,
                    },
                )
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let (rtt, hb_bytes, full_bytes) = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            identity.server.authority()
        ))?
        .connect_with_connector(connector)
        .await?;
        let mut client = proto::Client::new(channel);
        for _ in 0..5 {
            client.report(full_sent.clone()).await?;
            client.report(hb.clone()).await?;
        }
        let n = args.reports.max(1);
        let mut rtt = Vec::with_capacity(n);
        let before = written.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..n {
            let start = Instant::now();
            client.report(hb.clone()).await?;
            rtt.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let hb_bytes =
            (written.load(std::sync::atomic::Ordering::Relaxed) - before) as f64 / n as f64;
        let m = (n / 10).max(1);
        let before = written.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 0..m {
            client.report(full_sent.clone()).await?;
        }
        let full_bytes =
            (written.load(std::sync::atomic::Ordering::Relaxed) - before) as f64 / m as f64;
        anyhow::Ok((rtt, hb_bytes, full_bytes))
    })?;
    figures.push(figure(
        "report_rtt",
        "ms",
        "heartbeat Report round trip on an established mTLS channel, loopback",
        rtt,
    ));
    figures.push(figure(
        "wire_heartbeat",
        "B",
        "client bytes on TCP per heartbeat (TLS+HTTP/2+gRPC+protobuf), established channel",
        vec![hb_bytes],
    ));
    figures.push(figure(
        "wire_full_report",
        "B",
        "client bytes on TCP per full report, established channel",
        vec![full_bytes],
    ));
    Ok(())
}

fn fleet_figures(
    args: &Args,
    dir: &tempfile::TempDir,
    figures: &mut Vec<Figure>,
) -> anyhow::Result<()> {
    use linkmesh_agent::{identity::Identity, proto, reporter, tls};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    if args.fleet == 0 {
        return Ok(());
    }
    // Each agent holds a connection: raise the descriptor limit for this
    // process and the server it starts.
    let want = (args.fleet as u64) * 2 + 1024;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        want.min(hard),
        hard,
    )?;
    let interval = format!("{}s", args.fleet_interval.max(1));
    let fleet = Fleet::start(
        &dir.path().join("fleet-load"),
        &["--report-interval", &interval],
    )?;
    let server_pid = fleet.pid();
    let per_token = 100usize;
    let tokens: Vec<_> = (0..args.fleet.div_ceil(per_token))
        .map(|_| fleet.token(u32::try_from(per_token).unwrap_or(100), "2h"))
        .collect::<Result<_, _>>()?;
    let pin: CaPin = tokens[0].ca_pin.parse()?;
    let server: linkmesh_agent::endpoint::ServerUrl = fleet.url.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let facts = host::collect();

    // Enrolment, 16 at a time over one server-authenticated channel.
    let start = Instant::now();
    let identities: Vec<Identity> = rt.block_on(async {
        use futures_util::StreamExt as _;
        let tls_cfg = std::sync::Arc::new(tls::enrol_client_config(&Trust::Pins(vec![pin]))?);
        let channel = linkmesh_agent::transport::connect_once(
            &server,
            tls_cfg,
            None,
            Duration::from_secs(30),
        )
        .await?;
        let results: Vec<anyhow::Result<Identity>> = futures_util::stream::iter(0..args.fleet)
            .map(|i| {
                let mut client = proto::Client::new(channel.clone());
                let token = tokens[i / per_token].token.clone();
                let (server, facts) = (server.clone(), facts.clone());
                async move {
                    let key = rcgen::KeyPair::generate()?;
                    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
                    let mut host: proto::HostFacts = (&facts).into();
                    host.hostname = format!("sim-{i:05}");
                    let r = client
                        .enroll(proto::EnrollRequest {
                            token,
                            csr_der: csr.der().to_vec(),
                            host: Some(host),
                            agent_version: linkmesh_agent::version::AGENT_VERSION.into(),
                        })
                        .await?
                        .into_inner();
                    let host_id = linkmesh_agent::identity::HostId::new(&r.host_id)?;
                    let certs = r
                        .certificate_chain_der
                        .into_iter()
                        .map(CertificateDer::from)
                        .collect();
                    Ok(Identity::new(
                        host_id,
                        server,
                        String::new(),
                        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                        certs,
                        CertificateDer::from(r.ca_certificate_der),
                    )?)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect::<anyhow::Result<Vec<_>>>()
    })?;
    let enrol_secs = start.elapsed().as_secs_f64();
    figures.push(figure(
        "fleet_enrol_rate",
        "1/s",
        "agents enrolled per second (Enroll RPC, 16 in flight, server persists each)",
        vec![args.fleet as f64 / enrol_secs],
    ));

    // Report loops.
    let rtts = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs(args.fleet_interval.max(1));
    let window = Duration::from_secs(args.fleet_secs.max(1));
    let cpu0 = thread_cpu_ns(server_pid)?;
    let t0 = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(identities.len());
        for (i, id) in identities.into_iter().enumerate() {
            let (rtts, failures) = (rtts.clone(), failures.clone());
            let facts = facts.clone();
            let offset = interval.mul_f64(i as f64 / args.fleet as f64);
            tasks.push(tokio::spawn(async move {
                let Ok(cfg) = tls::mtls_client_config(&id) else {
                    return;
                };
                let dialer = linkmesh_agent::transport::Dialer::new(
                    id.server.clone(),
                    std::sync::Arc::new(cfg),
                    None,
                    Duration::from_secs(30),
                );
                let Ok(channel) = dialer.channel() else {
                    return;
                };
                let mut client = proto::Client::new(channel);
                let full = reporter::full_report(
                    &id,
                    "deb",
                    &facts,
                    reporter::runtime_status(None),
                    None,
                    reporter::Upgrades::default(),
                );
                let mut request = full.clone();
                tokio::time::sleep(offset).await;
                let mut seq = 0;
                while t0.elapsed() < window {
                    seq += 1;
                    request.sequence = seq;
                    let start = Instant::now();
                    match client.report(request.clone()).await {
                        Ok(_) => {
                            if let Ok(mut r) = rtts.lock() {
                                r.push(start.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                        Err(_) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    request = reporter::heartbeat(full.state_digest);
                    let left = window.saturating_sub(t0.elapsed());
                    tokio::time::sleep(interval.min(left)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_between(&cpu0, &thread_cpu_ns(server_pid)?);
    let status = std::fs::read_to_string(format!("/proc/{server_pid}/status"))?;
    let rtts = std::mem::take(&mut *rtts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let handled = rtts.len() as f64;
    let failed = failures.load(std::sync::atomic::Ordering::Relaxed);
    let cpu_frac = cpu / elapsed;
    figures.push(figure(
        "fleet_reports_per_sec",
        "1/s",
        "successful reports per second over the window",
        vec![handled / elapsed],
    ));
    figures.push(figure(
        "fleet_failed_reports",
        "count",
        "reports that failed during the window",
        vec![failed as f64],
    ));
    figures.push(figure(
        "fleet_server_cpu",
        "%core",
        "server CPU (schedstat, all threads) / wall time over the window",
        vec![cpu_frac * 100.0],
    ));
    figures.push(figure(
        "fleet_server_rss",
        "MiB",
        "server VmRSS at the end of the window",
        vec![kib(&status, "VmRSS:") / 1024.0],
    ));
    figures.push(figure(
        "fleet_server_peak_rss",
        "MiB",
        "server VmHWM (peak RSS, enrolment included)",
        vec![kib(&status, "VmHWM:") / 1024.0],
    ));
    figures.push(figure(
        "fleet_agents_per_core",
        "agents",
        "simulated agents / server cores used, at --fleet-interval",
        vec![if cpu_frac > 0.0 {
            args.fleet as f64 / cpu_frac
        } else {
            f64::INFINITY
        }],
    ));
    figures.push(figure(
        "fleet_report_rtt",
        "ms",
        "report round trip under the fleet load (client and server share 2 cores)",
        rtts,
    ));
    Ok(())
}

fn kib(text: &str, key: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// CPU time of each thread of `pid` (tid -> ns, schedstat's first field,
/// far finer than /proc/PID/stat's 10 ms ticks).
fn thread_cpu_ns(pid: u32) -> anyhow::Result<std::collections::HashMap<u32, u64>> {
    let mut out = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat"))
            && let Some(ns) = text.split_whitespace().next().and_then(|v| v.parse().ok())
        {
            out.insert(tid, ns);
        }
    }
    Ok(out)
}

/// CPU used by `pid` between two [`thread_cpu_ns`] samples, in seconds: a
/// thread born in between counts from zero; one that exited in between is
/// dropped (threads that exit are idle pool threads here).
fn cpu_between(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
) -> f64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 1e9
}

fn print_table(figures: &[Summary]) {
    println!(
        "{:<22} {:>6} {:>10} {:>23} {:>10} {:>12}",
        "figure", "unit", "median", "spread of run medians", "p99", "samples"
    );
    let num = |x: f64| {
        if x.abs() < 1.0 && x != 0.0 {
            format!("{x:.4}")
        } else {
            format!("{x:.2}")
        }
    };
    for f in figures {
        println!(
            "{:<22} {:>6} {:>10} {:>23} {:>10} {:>12}",
            f.name,
            f.unit,
            num(f.median),
            format!("{} – {}", num(f.run_median_min), num(f.run_median_max)),
            num(f.p99),
            format!("{} × {}", f.samples_per_run, f.runs)
        );
    }
    println!();
    for f in figures {
        println!("{}: {}", f.name, f.how);
    }
}
