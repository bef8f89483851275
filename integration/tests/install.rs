//! install/install.sh on throw-away hosts with real systemd, fetching from the
//! reference server across the test network.

use std::{collections::BTreeMap, path::Path, time::Duration};

use linkmesh_fleet::server::Script;
use linkmesh_integration::{
    harness::{
        DEB_ARCH, Fleet, TokenInfo, binary, install_one_liner, publish_binary, scratch, snapshot,
    },
    testhost::{SERVER_ADDR, TestHost, TestNet},
};

type R = anyhow::Result<()>;

struct Bed {
    _dir: tempfile::TempDir,
    net: TestNet,
    fleet: Fleet,
    artifacts: std::path::PathBuf,
}

fn bed(name: &str) -> anyhow::Result<Bed> {
    let dir = scratch(name)?;
    let artifacts = dir.path().join("artifacts");
    std::fs::create_dir_all(&artifacts)?;
    publish_binary(
        &artifacts,
        linkmesh_agent::version::AGENT_VERSION,
        &std::fs::read(binary("linkmesh-agent")?)?,
        None,
    )?;
    let net = TestNet::new()?;
    let fleet = Fleet::start_for_hosts(&dir.path().join("fleet"), net.netns(), &artifacts)?;
    Ok(Bed {
        _dir: dir,
        net,
        fleet,
        artifacts,
    })
}

/// What an install owns on the host, with modes and hashes: the binary, the
/// unit, configuration, identity and install record. (The running agent's
/// status file is its live state, not the installation.)
fn host_files(host: &TestHost) -> BTreeMap<std::path::PathBuf, (u32, String)> {
    let mut all = BTreeMap::new();
    for p in ["/etc/linkmesh", "/var/lib/linkmesh-agent/identity"] {
        for (k, v) in snapshot(&host.path(p)) {
            all.insert(Path::new(p).join(k), v);
        }
    }
    for f in [
        "/usr/bin/linkmesh-agent",
        "/etc/systemd/system/linkmesh-agent.service",
        "/var/lib/linkmesh-agent/install-method",
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(bytes) = std::fs::read(host.path(f)) {
            let mode = std::fs::metadata(host.path(f))
                .map(|m| m.permissions().mode())
                .unwrap_or(0);
            let hash = linkmesh_agent::hex::encode(
                ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
            );
            all.insert(f.into(), (mode, hash));
        }
    }
    all
}

fn token_file(host: &TestHost, t: &TokenInfo) -> anyhow::Result<()> {
    std::fs::write(host.path("/root/token"), &t.token)?;
    Ok(())
}

#[test]
fn installs_enrols_starts_and_a_rerun_changes_nothing() -> R {
    let mut bed = bed("inst-main")?;
    let host = TestHost::boot("lm-inst")?;
    bed.net.attach(&host)?;
    let t = bed.fleet.token(1, "1h")?;
    token_file(&host, &t)?;
    let start = std::time::Instant::now();
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token", t.ca_pin),
    )?;
    let fresh = start.elapsed();
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("Status check results are"),
        "ends with linkmesh-agent check:\n{text}"
    );
    assert!(!text.contains(&t.token), "the token was shown:\n{text}");
    let out = host.exec("systemctl is-active linkmesh-agent; cat /var/lib/linkmesh-agent/install-method; cat /etc/linkmesh/agent.toml")?;
    let state = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(state.starts_with("active\nscript\n"), "{state}");
    assert!(
        state.contains(&format!("server = \"{}\"", bed.fleet.url)),
        "{state}"
    );
    let hosts = bed.fleet.hosts()?;
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["hostname"], "lm-inst");
    // The token is on disk only where the operator put it.
    let out = host.exec(&format!(
        "grep -rl {} /etc /var/lib /usr/bin /tmp 2>/dev/null || true",
        t.token.rsplit('_').next().unwrap_or("x")
    ))?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "token found on disk"
    );

    // A re-run (same inputs, the token already spent): nothing changes.
    let before = host_files(&host);
    let pid = host
        .exec("systemctl show -p MainPID --value linkmesh-agent")?
        .stdout;
    let start = std::time::Instant::now();
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token", t.ca_pin),
    )?;
    let rerun = start.elapsed();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("already enrolled"), "{text}");
    assert!(
        text.contains("token given was not used"),
        "a given token must not be ignored silently:\n{text}"
    );
    assert_eq!(host_files(&host), before, "a re-run changed files");
    assert_eq!(
        host.exec("systemctl show -p MainPID --value linkmesh-agent")?
            .stdout,
        pid,
        "the service was restarted needlessly"
    );
    assert_eq!(bed.fleet.hosts()?.len(), 1);
    eprintln!("fresh install {fresh:?}, re-run {rerun:?}");

    // Checksum mismatch: refused, the installation untouched.
    publish_binary(
        &bed.artifacts,
        "0.0.1",
        b"not the agent",
        Some(&"0".repeat(64)),
    )?;
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --version 0.0.1", t.ca_pin),
    )?;
    assert_eq!(code, 7, "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert_eq!(host_files(&host), before);

    // Another CA than the pin: refused before any download.
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin sha256:{}", "ab".repeat(32)),
    )?;
    assert_eq!(code, 6, "{text}");
    assert_eq!(host_files(&host), before);

    // Another server without --force: says what differs and which flag forces it.
    let (code, text) = (|| -> anyhow::Result<(i32, String)> {
        let out = host.exec(&format!(
            "{} && echo same",
            bed.fleet.one_liner(
                Script::Install,
                &format!("--server https://{SERVER_ADDR}:8443/ --ca-pin {}", t.ca_pin)
            )?
        ))?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    })()?;
    assert_eq!(code, 0, "a trailing slash is the same server: {text}");

    dry_run_check(&host, &bed, &t)?;

    // Another server: refused with what differs and the flag that forces it;
    // with --force the identity is replaced, still one agent.
    let other = Fleet::start_in_netns(
        &bed._dir.path().join("fleet-2"),
        bed.net.netns(),
        &format!("{SERVER_ADDR}:8444"),
        &["--artifacts", bed.artifacts.to_str().unwrap_or_default()],
    )?;
    let t2 = other.token(1, "1h")?;
    std::fs::write(host.path("/root/token2"), &t2.token)?;
    let out = host.exec(&other.one_liner(
        Script::Install,
        &format!("--ca-pin {} --token-file /root/token2", t2.ca_pin),
    )?)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(9), "{err}");
    assert!(
        err.contains(&format!("enrolled with {}", bed.fleet.url)) && err.contains("--force"),
        "{err}"
    );
    assert_eq!(host_files(&host), before, "a refused re-run changed files");
    let out = host.exec(&other.one_liner(
        Script::Install,
        &format!("--ca-pin {} --token-file /root/token2 --force", t2.ca_pin),
    )?)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(other.hosts()?.len(), 1);
    let st = host.exec("linkmesh-agent status --json")?;
    assert!(String::from_utf8_lossy(&st.stdout).contains(&format!("\"server\":\"{}\"", other.url)));
    drop(other);
    Ok(())
}

fn dry_run_check(host: &TestHost, bed: &Bed, t: &TokenInfo) -> R {
    let before = host_files(host);
    // --dry-run on the installed host changes nothing and says what it would do.
    let (code, text) = install_one_liner(
        host,
        &bed.fleet,
        &format!("--ca-pin {} --dry-run", t.ca_pin),
    )?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("dry run: nothing was changed"), "{text}");
    assert_eq!(host_files(host), before);
    Ok(())
}

#[test]
fn a_fresh_host_dry_run_bad_token_and_unreachable_server() -> R {
    let mut bed = bed("inst-fail")?;
    let host = TestHost::boot("lm-inst-fail")?;
    bed.net.attach(&host)?;
    let t = bed.fleet.token(1, "1h")?;
    token_file(&host, &t)?;

    let before = host_files(&host);
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token --dry-run", t.ca_pin),
    )?;
    assert_eq!(code, 0, "{text}");
    for step in [
        "would run: install -m 0755",
        "would write: /etc/linkmesh/agent.toml",
        "enroll --server",
        "would run: systemctl enable",
    ] {
        assert!(text.contains(step), "missing {step:?}:\n{text}");
    }
    assert_eq!(host_files(&host), before, "--dry-run changed the host");
    assert!(
        bed.fleet.token_record(&t.token_id)?.uses.is_empty(),
        "--dry-run spent the token"
    );

    std::fs::write(
        host.path("/root/bad"),
        "lmt_0000000000000000_000000000000000000000000000000000000000000000000",
    )?;
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/bad", t.ca_pin),
    )?;
    assert_eq!(code, 8, "{text}");
    assert!(text.contains("token not recognised"), "{text}");
    assert!(!host.path("/var/lib/linkmesh-agent/identity").exists());
    assert_eq!(
        host.exec("systemctl is-active linkmesh-agent || true")?
            .stdout,
        b"inactive\n"
    );

    let out = host.exec(&bed.fleet.one_liner(
        Script::Install,
        &format!(
            "--server https://{SERVER_ADDR}:9 --ca-pin {} --token-file /root/token",
            t.ca_pin
        ),
    )?)?;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("cannot reach https://{SERVER_ADDR}:9"))
    );

    // Then the right token works on the same host.
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token", t.ca_pin),
    )?;
    assert_eq!(code, 0, "{text}");
    bed.fleet
        .wait_drift(Duration::from_secs(20), "the install method", |h| {
            h["install_method"] == "script"
        })?;
    Ok(())
}

#[test]
fn the_installers_are_posix_sh_and_shellcheck_clean() -> R {
    for name in ["install.sh", "install-opamp.sh"] {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../install")
            .join(name);
        let out = std::process::Command::new("shellcheck")
            .args(["--shell=sh", "--severity=style"])
            .arg(&script)
            .output()
            .map_err(|e| {
                anyhow::anyhow!("shellcheck is required (scripts/test installs it): {e}")
            })?;
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let text = std::fs::read_to_string(&script)?;
        assert!(text.starts_with("#!/bin/sh\n"), "{name}");
        assert_eq!(
            text.trim_end().lines().last(),
            Some("main \"$@\""),
            "{name}: main must be the last line"
        );
    }
    Ok(())
}

#[test]
fn install_opamp_installs_the_pinned_runtime_in_both_checksum_formats() -> R {
    let mut bed = bed("inst-opamp")?;
    linkmesh_integration::harness::publish_runtime(&bed.artifacts, "0.158.0", true)?;
    linkmesh_integration::harness::publish_runtime(&bed.artifacts, "0.157.0", false)?;
    let host = TestHost::boot("lm-opamp")?;
    bed.net.attach(&host)?;
    linkmesh_integration::harness::install_real_runtime_for_releases(&host)?;
    let t = bed.fleet.token(1, "1h")?;
    token_file(&host, &t)?;
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token", t.ca_pin),
    )?;
    assert_eq!(code, 0, "{text}");
    // A packaged standalone collector service, enabled and running.
    std::fs::write(
        host.path("/etc/systemd/system/otelcol-contrib.service"),
        "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    )?;
    host.exec("systemctl daemon-reload && systemctl enable --now otelcol-contrib.service")?;

    let opamp = |args: &str| -> anyhow::Result<(i32, String)> {
        let out = host.exec(&bed.fleet.one_liner(
            Script::InstallOpamp,
            &format!("--ca-pin {} --probation 5s {args}", t.ca_pin),
        )?)?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // What the agent said, for a failure that names the service.
            text += &host.service_failure("linkmesh-agent");
        }
        Ok((out.status.code().unwrap_or(-1), text))
    };
    let (code, text) = opamp("")?;
    assert_eq!(code, 0, "{text}");
    let out = host.exec("cat /var/lib/linkmesh-agent/runtime/versions.toml; systemctl is-enabled otelcol-contrib.service; systemctl is-active otelcol-contrib.service; true")?;
    let state = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        state.starts_with(
            "otelcol-contrib = \"0.158.0\"\nopampsupervisor = \"0.158.0\"\ndisabled\ninactive"
        ),
        "{state}"
    );
    // The agent is reloaded (not restarted) after install-opamp.sh, and
    // `systemctl reload` returns before the reload is done: wait for the
    // installed supervisor version too, not only for a running collector.
    let status_at = |host: &TestHost, version: &str| -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let out = host.exec("linkmesh-agent status --json")?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if v["runtime"]["supervision"]["state"] == "running"
                && v["runtime"]["supervision"]["collector_pid"].is_u64()
                && v["runtime"]["detection"]["supervisor"]["version"] == version
            {
                return Ok(v);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "not supervising: {v}\n{}",
                host.journal(Some("linkmesh-agent"), "")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let s = status_at(&host, "0.158.0")?;
    let d = &s["runtime"]["detection"];
    assert_eq!(d["supervisor"]["version"], "0.158.0");
    assert_eq!(d["supervisor"]["version_source"], "install record");
    // The collector's version is its own word (`--version`), not the release's name.
    assert_eq!(d["collector"]["version"], "0.158.0");
    assert_eq!(d["collector"]["version_source"], "--version");
    let instance_id = std::fs::read_to_string(
        host.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml"),
    )?;

    // Idempotent: nothing changes, nothing restarts.
    let files = |host: &TestHost| -> BTreeMap<String, Vec<u8>> {
        [
            "/usr/bin/otelcol-contrib",
            "/usr/bin/opampsupervisor",
            "/var/lib/linkmesh-agent/runtime/versions.toml",
        ]
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                std::fs::read(host.path(f)).unwrap_or_default(),
            )
        })
        .collect()
    };
    let before = files(&host);
    let sup_pid = s["runtime"]["supervision"]["pid"].clone();
    let (code, text) = opamp("")?;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("up to date"), "{text}");
    assert_eq!(files(&host), before);
    assert_eq!(
        status_at(&host, "0.158.0")?["runtime"]["supervision"]["pid"],
        sup_pid,
        "restarted although nothing changed"
    );

    // An older release, with the combined checksum files: installed, the agent
    // restarted onto it, the collector's instance id kept.
    let (code, text) = opamp("--otelcol-version 0.157.0 --supervisor-version 0.157.0")?;
    assert_eq!(code, 0, "{text}");
    let s = status_at(&host, "0.157.0")?;
    assert_eq!(
        s["runtime"]["detection"]["supervisor"]["version"], "0.157.0",
        "{s}"
    );
    assert_ne!(s["runtime"]["supervision"]["pid"], sup_pid);
    assert_eq!(
        std::fs::read_to_string(
            host.path("/var/lib/linkmesh-agent/supervisor/persistent_state.yaml")
        )?,
        instance_id
    );
    let d = bed
        .fleet
        .wait_drift(Duration::from_secs(20), "the collector in drift", |h| {
            h["runtime_version"] == "0.158.0"
        })?;
    assert_eq!(d["hosts"][0]["runtime_at_pin"], true, "{d}");

    // A corrupted artifact: refused, the installed runtime untouched.
    let before = files(&host);
    linkmesh_integration::harness::publish_runtime(&bed.artifacts, "0.150.0", true)?;
    std::fs::write(
        bed.artifacts
            .join(format!("opampsupervisor_0.150.0_linux_{DEB_ARCH}")),
        "tampered",
    )?;
    let (code, text) = opamp("--otelcol-version 0.150.0 --supervisor-version 0.150.0")?;
    assert_eq!(code, 7, "{text}");
    assert_eq!(files(&host), before);
    Ok(())
}

#[test]
fn an_install_killed_at_any_step_completes_on_a_rerun_with_one_identity() -> R {
    let mut bed = bed("inst-kill")?;
    let host = TestHost::boot("lm-inst-kill")?;
    bed.net.attach(&host)?;
    host.copy_in(&bed.fleet.ca_file(), "/root/fleet-ca.pem", 0o644)?;
    let out = host.exec(&format!(
        "curl -fsS --cacert /root/fleet-ca.pem -o /root/install.sh {}/install.sh",
        bed.fleet.url
    ))?;
    anyhow::ensure!(out.status.success(), "cannot fetch install.sh");
    let reset = "systemctl disable --now linkmesh-agent >/dev/null 2>&1; rm -rf /usr/bin/linkmesh-agent /usr/bin/.linkmesh-agent.new /etc/linkmesh /var/lib/linkmesh-agent /etc/systemd/system/linkmesh-agent.service /etc/systemd/system/linkmesh-upgrade.service /etc/systemd/system/linkmesh-enroll.service; systemctl daemon-reload";
    let mut killed = 0;
    for n in 1..=120 {
        host.exec(reset)?;
        let t = bed.fleet.token(1, "1h")?;
        token_file(&host, &t)?;
        let args = format!(
            "--server {} --ca-pin {} --token-file /root/token",
            bed.fleet.url, t.ca_pin
        );
        // The installer announces each step that changes the host on stderr
        // ("linkmesh-install: + ...") just before running it; SIGKILL its
        // whole process group when the Nth announcement appears.
        let out = host.exec(&format!(
            "setsid sh -c 'echo $$ > /root/pgid; exec sh /root/install.sh {args}' 2>&1 >/dev/null | \
             awk -v n={n} '/^linkmesh-install: [+] / {{ c++; if (c == n) {{ getline pg < \"/root/pgid\"; system(\"kill -9 -\" pg); print \"killed\"; exit 0 }} }}'; sleep 0.2"
        ))?;
        if !String::from_utf8_lossy(&out.stdout).contains("killed") {
            break; // fewer than n steps: every step was covered
        }
        killed += 1;
        let out = host.exec(&format!("sh /root/install.sh {args}"))?;
        assert!(
            out.status.success(),
            "re-run after a kill at exec #{n} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hosts: Vec<_> = bed
            .fleet
            .hosts()?
            .into_iter()
            .filter(|h| h["token_id"] == t.token_id.as_str())
            .collect();
        assert_eq!(hosts.len(), 1, "exec #{n}: one host per install");
        let out = host.exec("systemctl is-active linkmesh-agent; linkmesh-agent status --json")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.starts_with("active\n") && text.contains("\"enrolled\":true"),
            "exec #{n}: {text}"
        );
        assert!(
            text.contains(hosts[0]["host_id"].as_str().unwrap_or("?")),
            "exec #{n}: the agent's identity is not the server's host"
        );
    }
    eprintln!("install killed at {killed} distinct steps; every re-run completed");
    assert!(killed >= 10, "only {killed} kill points");
    Ok(())
}

#[test]
fn a_rerun_pinned_to_an_older_build_downgrades_and_keeps_the_identity() -> R {
    let (older, old_version) = linkmesh_integration::harness::older_agent()?;
    let current = linkmesh_agent::version::AGENT_VERSION;
    let mut bed = bed("inst-down")?;
    publish_binary(&bed.artifacts, old_version, &std::fs::read(&older)?, None)?;
    let host = TestHost::boot("lm-inst-down")?;
    bed.net.attach(&host)?;
    let t = bed.fleet.token(1, "1h")?;
    token_file(&host, &t)?;
    let (code, text) = install_one_liner(
        &host,
        &bed.fleet,
        &format!("--ca-pin {} --token-file /root/token", t.ca_pin),
    )?;
    assert_eq!(code, 0, "{text}");
    let identity = snapshot(&host.path("/var/lib/linkmesh-agent/identity"));
    let version = |host: &TestHost| -> anyhow::Result<String> {
        let out = host.exec("linkmesh-agent version --json; systemctl is-active linkmesh-agent")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(version(&host)?.contains(&format!("\"version\":\"{current}\"")));

    for (target, label) in [(old_version, "downgrade"), (current, "upgrade back")] {
        let (code, text) = install_one_liner(
            &host,
            &bed.fleet,
            &format!("--ca-pin {} --version {target}", t.ca_pin),
        )?;
        assert_eq!(code, 0, "{label}: {text}");
        let v = version(&host)?;
        assert!(
            v.contains(&format!("\"version\":\"{target}\"")) && v.ends_with("active\n"),
            "{label}: {v}"
        );
        assert_eq!(
            snapshot(&host.path("/var/lib/linkmesh-agent/identity")),
            identity,
            "{label}: identity changed"
        );
        assert_eq!(bed.fleet.hosts()?.len(), 1, "{label}");
        let d = bed.fleet.wait_drift(Duration::from_secs(20), target, |h| {
            h["agent_version"] == target
        })?;
        assert_eq!(d["hosts"][0]["verdict"], "in_window", "{label}: {d}");
    }
    Ok(())
}

/// The one-liner `token create` prints checks the script against the
/// SHA-256 its server computed before a line of it runs: a tampered copy
/// and a truncated one (served where install.sh would be, from the same
/// server over the same verified TLS) are refused with exit 7 and run
/// nothing. `token create` prints that one-liner, with the token kept off
/// the command line of the script.
#[test]
fn the_printed_one_liner_refuses_a_tampered_or_truncated_script_before_it_runs() -> R {
    use linkmesh_fleet::server::{INSTALL_SH, verified_one_liner};
    let mut bed = bed("inst-verified")?;
    let host = TestHost::boot("lm-inst-verified")?;
    bed.net.attach(&host)?;
    let ca = std::fs::read_to_string(bed.fleet.ca_file())?;
    let mid = INSTALL_SH.len() / 2;
    for (label, text) in [
        (
            "tampered",
            INSTALL_SH.replacen("set -eu\n", "set -eu\ntouch /root/ran\n", 1),
        ),
        (
            "truncated",
            format!("{}\ntouch /root/ran\n", &INSTALL_SH[..mid]),
        ),
    ] {
        std::fs::write(bed.artifacts.join("install.sh"), &text)?;
        // The same server, the script from its artifacts instead.
        let cmd = verified_one_liner(
            &format!("{}/artifacts", bed.fleet.url),
            &ca,
            Script::Install,
            "LINKMESH_TOKEN=unused",
            "--ca-pin sha256:00",
        );
        let (code, out) = host.run(&cmd)?;
        assert_eq!(code, 7, "{label}: {out}");
        assert!(out.contains("does not match the SHA-256"), "{label}: {out}");
        assert!(
            !host.path("/root/ran").exists(),
            "{label}: a line of it ran"
        );
        assert!(!host.path("/etc/linkmesh").exists(), "{label}");
    }
    // What token create prints is the command the harness runs.
    let state = bed._dir.path().join("fleet");
    let out = std::process::Command::new(binary("linkmesh-fleet")?)
        .args(["token", "create", "--json", "--state"])
        .arg(&state)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let token = doc["token"].as_str().unwrap_or_default();
    let printed = doc["install_command"].as_str().unwrap_or_default();
    assert_eq!(
        printed,
        verified_one_liner(
            &bed.fleet.url,
            &ca,
            Script::Install,
            &format!("LINKMESH_TOKEN={token}"),
            ""
        )
    );
    assert!(
        !printed.contains(" -k") && !printed.contains("--insecure"),
        "{printed}"
    );
    let (code, out) = host.run(printed)?;
    assert_eq!(code, 0, "{out}");
    assert!(bed.fleet.hosts()?.len() == 1, "{out}");
    Ok(())
}
