//! The command-line contract: exit codes (0, 1, 2, 64), configuration errors
//! that name file and key, stable JSON.

use linkmesh_integration::harness::{AgentEnv, scratch, text};

type R = anyhow::Result<()>;

#[test]
fn bad_configuration_exits_64_naming_every_file_and_key() -> R {
    let dir = scratch("cfg")?;
    let agent = AgentEnv::new(dir.path())?;
    let etc = agent.config.parent().unwrap_or(dir.path()).to_owned();
    std::fs::create_dir_all(etc.join("agent.d"))?;
    std::fs::write(
        &agent.config,
        "server = \"https://fleet.example:8443\"\n[runtime]\nkind = \"podman\"\n",
    )?;
    std::fs::write(
        etc.join("agent.d/10-report.toml"),
        "[report]\ninterval = \"fast\"\nextra = 1\n",
    )?;
    std::fs::write(etc.join("agent.d/20-log.toml"), "[log]\nlevel = \"loud\"\n")?;

    for args in [
        vec!["config", "check"],
        vec!["status"],
        vec!["enroll", "--ca-pin", "sha256:00"],
    ] {
        let out = agent.cmd()?.args(&args).output()?;
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in [
            "invalid configuration (4 problems)",
            "agent.toml: key `runtime.kind`: \"podman\" is not one of auto, otelcol, alloy, none",
            "10-report.toml: key `report.interval`: invalid duration \"fast\"",
            "10-report.toml: key `report.extra`: unknown key",
            "20-log.toml: key `log.level`",
        ] {
            assert!(err.contains(needle), "{args:?} missing {needle:?}:\n{err}");
        }
    }

    // Fixed, the same command passes and lists the files it read.
    std::fs::write(
        &agent.config,
        "server = \"https://fleet.example:8443\"\n[runtime]\nkind = \"otelcol\"\n",
    )?;
    std::fs::write(
        etc.join("agent.d/10-report.toml"),
        "[report]\ninterval = \"1m\"\n",
    )?;
    std::fs::write(
        etc.join("agent.d/20-log.toml"),
        "[log]\nlevel = \"debug\"\n",
    )?;
    let out = agent.cmd()?.args(["config", "check"]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("configuration ok") && stdout.contains("20-log.toml"),
        "{stdout}"
    );
    Ok(())
}

#[test]
fn a_missing_config_file_means_defaults() -> R {
    let dir = scratch("cfg-none")?;
    let agent = AgentEnv::new(dir.path())?;
    let out = agent.cmd()?.args(["config", "check"]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("defaults apply"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn usage_errors_exit_2_and_name_the_flag() -> R {
    let dir = scratch("usage")?;
    let agent = AgentEnv::new(dir.path())?;
    let cases: [(&[&str], &str); 5] = [
        (&["enroll", "--server", "https://x.example"], "--ca-pin"),
        (
            &[
                "enroll",
                "--server",
                "http://x.example",
                "--ca-pin",
                "sha256:00",
            ],
            "--server: invalid server URL",
        ),
        (
            &[
                "enroll",
                "--server",
                "https://x.example",
                "--ca-pin",
                "sha256:00",
            ],
            "--ca-pin: invalid CA pin",
        ),
        (
            &["enroll", "--ca-pin", &format!("sha256:{}", "0".repeat(64))],
            "no server: pass --server",
        ),
        (&["frobnicate"], "unrecognized subcommand"),
    ];
    for (args, needle) in cases {
        let out = agent.cmd()?.args(args).output()?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            text(&out)
        );
    }
    Ok(())
}

#[test]
fn version_and_status_json_are_stable() -> R {
    let dir = scratch("json")?;
    let agent = AgentEnv::new(dir.path())?;
    let out = agent.cmd()?.args(["version", "--json"]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["version"], linkmesh_agent::version::AGENT_VERSION);
    assert_eq!(v["api_version"], 1);
    assert!(v["git_revision"].as_str().is_some_and(|r| !r.is_empty()));

    let status = agent.status()?;
    assert_eq!(status["enrolled"], false);
    assert_eq!(status["state_dir"], agent.state.display().to_string());
    // Reading status creates nothing.
    assert!(!agent.state.exists());
    Ok(())
}

/// The upgrade watcher is the previous agent: a key only the new version
/// knows must not keep it from judging (and rolling back) the new one.
#[test]
fn the_upgrade_watcher_runs_with_a_configuration_it_does_not_understand() -> R {
    let dir = scratch("watch-cfg")?;
    let agent = AgentEnv::new(dir.path())?;
    std::fs::create_dir_all(agent.config.parent().unwrap_or(dir.path()))?;
    std::fs::write(&agent.config, "[future]\nsetting = 1\n")?;
    let out = agent.cmd()?.args(["status"]).output()?;
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = agent.cmd()?.args(["upgrade", "watch"]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no upgrade on probation"),
        "{}",
        text(&out)
    );
    Ok(())
}
