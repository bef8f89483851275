//! Stand-in for Grafana Alloy as `shared/reference/runtimes.md` records it:
//! `alloy --version` prints the exact multi-line prometheus/common template
//! (`LINKMESH_STANDIN_ALLOY_VERSION` overrides the version, default
//! v1.18.1); `alloy run [--server.http.listen-addr=ADDR] CONFIG` serves
//! `/metrics` with `alloy_build_info{…,version="…"} 1` for the version it
//! started as, `/-/ready` and `/-/healthy`, until SIGTERM or SIGINT.

use std::process::ExitCode;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn version() -> String {
    std::env::var("LINKMESH_STANDIN_ALLOY_VERSION").unwrap_or_else(|_| "v1.18.1".to_owned())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-v") {
        print!(
            "alloy, version {} (branch: HEAD, revision: 6012ec4a)\n  build user:       root@buildkitsandbox\n  build date:       2026-08-06T13:11:14Z\n  go version:       go1.26.1\n  platform:         linux/amd64\n  tags:             netgo,builtinassets,promtail_journal_enabled\n",
            version()
        );
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) != Some("run") {
        eprintln!("Error: unknown command; use \"alloy run\"");
        return ExitCode::from(1);
    }
    let mut listen = "127.0.0.1:12345".to_owned();
    let mut iter = args.iter().skip(1);
    while let Some(a) = iter.next() {
        if let Some(v) = a.strip_prefix("--server.http.listen-addr=") {
            listen = v.to_owned();
        } else if a == "--server.http.listen-addr" {
            listen = iter.next().cloned().unwrap_or(listen);
        }
    }
    let running = version();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return ExitCode::from(1);
    };
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("Error: listen tcp {listen}: {e}");
                return ExitCode::from(1);
            }
        };
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return ExitCode::from(1);
        };
        eprintln!("ts={} level=info msg=\"now listening for http traffic\" addr={}", time::OffsetDateTime::now_utc().unix_timestamp(), listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        loop {
            tokio::select! {
                _ = term.recv() => return ExitCode::SUCCESS,
                _ = int.recv() => return ExitCode::SUCCESS,
                conn = listener.accept() => {
                    let Ok((mut sock, _)) = conn else { continue };
                    let running = running.clone();
                    tokio::spawn(async move {
                        // Read the whole request head, however it was segmented.
                        let mut buf = Vec::with_capacity(1024);
                        let mut chunk = [0u8; 1024];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                            match sock.read(&mut chunk).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let req = String::from_utf8_lossy(&buf);
                        let path = req.split_whitespace().nth(1).unwrap_or("/");
                        let (status, body) = match path {
                            "/metrics" => ("200 OK", format!(
                                "# HELP alloy_build_info A metric with a constant '1' value labeled by version, revision, branch, goversion from which alloy was built, and the goos and goarch for the build.\n# TYPE alloy_build_info gauge\nalloy_build_info{{branch=\"HEAD\",goarch=\"amd64\",goos=\"linux\",goversion=\"go1.26.1\",revision=\"6012ec4a\",tags=\"netgo\",version=\"{running}\"}} 1\n")),
                            "/-/ready" => ("200 OK", "Alloy is ready.\n".to_owned()),
                            "/-/healthy" => ("200 OK", "All Alloy components are healthy.\n".to_owned()),
                            _ => ("404 Not Found", "404 page not found\n".to_owned()),
                        };
                        let resp = format!("HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                        let _ = sock.write_all(resp.as_bytes()).await;
                    });
                }
            }
        }
    })
}
