//! Stand-in for otelcol-contrib v0.159.0 as `shared/reference/runtimes.md`
//! records it: `--version` prints `otelcol-contrib version 0.159.0` (cobra's
//! template; `LINKMESH_STANDIN_OTELCOL_VERSION` overrides the number to
//! simulate other builds); `--config FILE` runs it, logging zap console lines
//! on stderr; the opamp extension's `ppid`/`ppid_poll_interval` from the
//! config is orphan detection: when that process is gone the collector shuts
//! down. SIGTERM and SIGINT shut it down cleanly, SIGHUP reloads.

use std::{io::Write as _, process::ExitCode, time::Duration};

fn version() -> String {
    std::env::var("LINKMESH_STANDIN_OTELCOL_VERSION").unwrap_or_else(|_| "0.159.0".to_owned())
}

fn log(level: &str, msg: &str) {
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "{ts}\t{level}\tservice@v{}/service.go:1\t{msg}",
        version()
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--version" | "-v" => {
                println!("otelcol-contrib version {}", version());
                return ExitCode::SUCCESS;
            }
            "--config" | "-c" => {
                i += 1;
                config = args.get(i).cloned();
            }
            a if a.starts_with("--config=") => config = Some(a["--config=".len()..].to_owned()),
            a if a.starts_with("--") => {}
            other => {
                eprintln!("Error: unknown command {other:?} for \"otelcol-contrib\"");
                return ExitCode::from(1);
            }
        }
        i += 1;
    }
    let Some(config) = config else {
        eprintln!("Error: at least one config flag must be provided");
        return ExitCode::from(1);
    };
    let text = match std::fs::read_to_string(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "Error: failed to get config: cannot resolve the configuration: open {config}: {e}"
            );
            return ExitCode::from(1);
        }
    };
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
    };
    let ppid: Option<i32> = field("ppid:").and_then(|v| v.parse().ok());
    let poll = field("ppid_poll_interval:")
        .and_then(|v| v.strip_suffix("ms").and_then(|n| n.parse().ok()))
        .map_or(Duration::from_secs(5), Duration::from_millis);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::from(1);
    };
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return ExitCode::from(1);
        };
        log("info", "Starting otelcol-contrib...");
        log(
            "info",
            "Everything is ready. Begin running and processing data.",
        );
        let mut tick = tokio::time::interval(poll);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => log("info", "Received hangup signal; reloading configuration"),
                _ = tick.tick() => {
                    if let Some(p) = ppid
                        && (nix::unistd::getppid().as_raw() != p
                            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_err())
                    {
                        log("info", "Parent process is gone; shutting down (orphan detection)");
                        break;
                    }
                }
            }
        }
        log("info", "Shutdown complete.");
        ExitCode::SUCCESS
    })
}
