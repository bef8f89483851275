//! The server's downloads: artifacts with `Content-Length` and `ETag`,
//! nothing outside `--artifacts DIR` served, and a real 404 for paths
//! nobody serves. (Its memory while streaming is the benchmark's.)

use std::process::Command;

use linkmesh_integration::harness::{Fleet, scratch};

type R = anyhow::Result<()>;

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "30"])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn artifacts_have_a_length_and_a_validator_and_unknown_paths_are_404() -> R {
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

    // The server's memory while it streams this file to slow readers is a
    // figure of the benchmark (`download_rss_growth`, release build).
    Ok(())
}
