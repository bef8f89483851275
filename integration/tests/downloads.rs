//! The server's downloads: artifacts streamed with bounded memory, with
//! `Content-Length` and `ETag`, nothing outside `--artifacts DIR` served,
//! and a real 404 for paths nobody serves.

use std::{process::Command, time::Duration};

use linkmesh_integration::harness::{Fleet, scratch};

type R = anyhow::Result<()>;

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "30"])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn artifacts_stream_with_bounded_memory_and_unknown_paths_are_404() -> R {
    let dir = scratch("downloads")?;
    let artifacts = dir.path().join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let big = artifacts.join("linkmesh-agent_9.9.9-1_amd64.deb");
    let f = std::fs::File::create(&big)?;
    f.set_len(64 << 20)?;
    drop(f);
    std::os::unix::fs::symlink("/etc/passwd", artifacts.join("passwd"))?;
    let fleet = Fleet::start(
        &dir.path().join("fleet"),
        &["--artifacts", artifacts.to_str().unwrap_or_default()],
    )?;
    let url = format!("{}/artifacts/linkmesh-agent_9.9.9-1_amd64.deb", fleet.url);

    // Headers: the length and a validator; a matching If-None-Match is 304.
    let head = curl(&["-o", "/dev/null", "-D", "-", &url])?;
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/2 200"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-length: 67108864"), "{head}");
    let etag = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("etag: ")
                .or_else(|| l.strip_prefix("ETag: "))
        })
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| anyhow::anyhow!("no ETag: {head}"))?;
    let code = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("If-None-Match: {etag}"),
        &url,
    ])?;
    assert_eq!(code, "304");

    // Nothing outside the directory; paths nobody serves are a real 404.
    // (A path under the gRPC service itself gets gRPC's own UNIMPLEMENTED.)
    for path in ["/artifacts/passwd", "/artifacts/nope", "/nope", "/v1/nope"] {
        let code = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{}{path}", fleet.url),
        ])?;
        assert_eq!(code, "404", "{path}");
    }
    let body = curl(&[&format!("{}/artifacts/passwd", fleet.url)])?;
    assert!(
        !body.contains("root:"),
        "a symlink out of the directory was followed"
    );

    // Sixteen slow downloads of 64 MiB hold chunks, not files.
    let before = rss_kib(fleet.pid());
    let mut slow: Vec<_> = (0..16)
        .map(|_| {
            Command::new("curl")
                .args(["-sk", "--limit-rate", "256k", "-o", "/dev/null", &url])
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_kib(fleet.pid());
    for c in &mut slow {
        let _ = c.kill();
        let _ = c.wait();
    }
    eprintln!("server RSS {before} KiB before, {during} KiB during 16 slow downloads");
    assert!(
        during < before + 64 * 1024,
        "16 downloads of a 64 MiB file grew the server from {before} to {during} KiB"
    );
    Ok(())
}
