//! A steady OTLP/HTTP log sender for the upgrade drill: one numbered log
//! record per request (`lm-seq-N` in its body) at a fixed rate, retried the
//! way OpenTelemetry SDKs retry (connection refused or reset, 429, 502, 503,
//! 504: the same record again after a short backoff) until it is accepted.
//!
//! It rewrites its report (JSON) after every accepted record and once more
//! when SIGTERM or SIGINT stops it; the report says how many records were
//! accepted, which requests were ambiguous (sent, but no answer read: the
//! collector may have kept the record, so a retry may duplicate it), and
//! every window during which the port refused connections.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// host:port of the collector's OTLP/HTTP receiver.
    #[arg(long, default_value = "127.0.0.1:4318")]
    target: String,
    /// Records per second.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Where the report goes.
    #[arg(long)]
    report: PathBuf,
    /// Stop after this many records (0: until SIGTERM).
    #[arg(long, default_value_t = 0)]
    count: u64,
}

#[derive(Default, serde::Serialize)]
struct Report {
    /// Records accepted (2xx), numbered 1..=accepted.
    accepted: u64,
    /// Requests sent.
    attempts: u64,
    /// Requests sent whose answer was never read.
    ambiguous: u64,
    /// Requests answered with a retryable status.
    retryable_status: u64,
    /// Windows (ms) during which connections were refused.
    refused_windows_ms: Vec<u64>,
    /// The longest gap (ms) between two accepted records.
    longest_gap_ms: u64,
    /// The sender stopped cleanly (its last record accepted, none in flight).
    finished: bool,
}

enum Outcome {
    Accepted,
    Refused,
    Ambiguous,
    Retryable,
    Rejected(u16),
}

fn body(seq: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"resourceLogs":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"lm-drill"}}}}]}},"scopeLogs":[{{"logRecords":[{{"timeUnixNano":"{}","body":{{"stringValue":"lm-seq-{seq}"}}}}]}}]}}]}}"#,
        linkmesh_agent::clock::now_unix_ms().saturating_mul(1_000_000)
    ))
}

async fn send(target: &str, seq: u64) -> Outcome {
    let stream =
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => return Outcome::Refused,
        };
    let io = hyper_util::rt::TokioIo::new(stream);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return Outcome::Refused;
    };
    let driver = tokio::spawn(conn);
    let req = match http::Request::post(format!("http://{target}/v1/logs"))
        .header("content-type", "application/json")
        .header("host", target)
        .body(Full::new(body(seq)))
    {
        Ok(r) => r,
        Err(_) => return Outcome::Rejected(0),
    };
    let out = match tokio::time::timeout(Duration::from_secs(5), sender.send_request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            match status {
                200..=299 => Outcome::Accepted,
                429 | 502 | 503 | 504 => Outcome::Retryable,
                s => Outcome::Rejected(s),
            }
        }
        // Sent (or partly sent) with no answer: the collector may have it.
        _ => Outcome::Ambiguous,
    };
    driver.abort();
    out
}

fn write(report: &Report, path: &PathBuf) {
    if let Ok(bytes) = serde_json::to_vec_pretty(report) {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut report = Report::default();
    let period = Duration::from_secs(1) / args.rate.max(1);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_accept = Instant::now();
    let mut refused_since: Option<Instant> = None;
    let mut stopping = false;
    let mut seq = 1;
    while args.count == 0 || seq <= args.count {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => stopping = true,
            _ = int.recv() => stopping = true,
        }
        if stopping {
            break;
        }
        // One record, retried until accepted (or a stop is asked for).
        let mut backoff = Duration::from_millis(20);
        loop {
            report.attempts += 1;
            match send(&args.target, seq).await {
                Outcome::Accepted => {
                    if let Some(t) = refused_since.take() {
                        report
                            .refused_windows_ms
                            .push(t.elapsed().as_millis() as u64);
                    }
                    report.longest_gap_ms = report
                        .longest_gap_ms
                        .max(last_accept.elapsed().as_millis() as u64);
                    last_accept = Instant::now();
                    report.accepted = seq;
                    seq += 1;
                    break;
                }
                Outcome::Refused => {
                    refused_since.get_or_insert_with(Instant::now);
                }
                Outcome::Ambiguous => report.ambiguous += 1,
                Outcome::Retryable => report.retryable_status += 1,
                Outcome::Rejected(s) => anyhow::bail!("record {seq} rejected with HTTP {s}"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = term.recv() => stopping = true,
                _ = int.recv() => stopping = true,
            }
            if stopping {
                break;
            }
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        if report.accepted % 10 == 0 {
            write(&report, &args.report);
        }
        if stopping {
            break;
        }
    }
    report.finished = !stopping || refused_since.is_none();
    write(&report, &args.report);
    Ok(())
}
