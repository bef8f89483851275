//! Enrolment end to end: the real agent binary against the reference fleet
//! server, with a real CA over real TLS on loopback.

use std::{os::unix::fs::PermissionsExt, path::Path};

use linkmesh_integration::harness::{AgentEnv, Fleet, scratch, snapshot, text};

type R = anyhow::Result<()>;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn enrols_and_a_rerun_is_a_byte_identical_no_op() -> R {
    let dir = scratch("noop")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(1, "1h")?;

    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let status = agent.status()?;
    assert_eq!(status["enrolled"], true);
    assert_eq!(status["server"], fleet.url.as_str());
    let host_id = status["host_id"].as_str().unwrap_or_default().to_owned();
    let hosts = fleet.hosts()?;
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["host_id"], host_id.as_str());

    // Key 0600, directories 0700.
    let id_dir = agent.state.join("identity");
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777);
    assert_eq!(mode(&agent.state)?, 0o700);
    assert_eq!(mode(&id_dir)?, 0o700);
    assert_eq!(mode(&id_dir.join("key.pem"))?, 0o600);

    let before = snapshot(&agent.state);
    // Same server, used-up token: nothing is sent, nothing changes.
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already enrolled"),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&agent.state), before);
    assert_eq!(fleet.hosts()?.len(), 1);
    Ok(())
}

#[test]
fn ca_file_trust_works_like_a_pin() -> R {
    let dir = scratch("cafile")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(1, "1h")?;
    let ca = fleet.state().join("ca/ca.pem");
    let out = agent.enroll(
        &fleet.url,
        &t.token,
        &["--ca-file", ca.to_str().unwrap_or_default()],
    )?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.status()?["ca_pin"], t.ca_pin.as_str());
    Ok(())
}

#[test]
fn wrong_pin_is_refused_before_the_token_is_sent() -> R {
    let dir = scratch("pin")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(1, "1h")?;
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &wrong])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("does not match the CA pin"),
        "{}",
        text(&out)
    );
    assert!(stderr(&out).contains("nothing was sent"), "{}", text(&out));
    // The server saw no use of the token, and the host holds no key material.
    assert!(fleet.token_record(&t.token_id)?.uses.is_empty());
    assert!(!agent.state.join("identity").exists());
    assert!(!agent.state.join("identity.pending").exists());
    // Another CA file is refused the same way.
    let other = scratch("pin-other")?;
    Fleet::init(other.path())?;
    let other_ca = other.path().join("ca/ca.pem");
    let out = agent.enroll(
        &fleet.url,
        &t.token,
        &["--ca-file", other_ca.to_str().unwrap_or_default()],
    )?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("not signed by the trusted CA"),
        "{}",
        text(&out)
    );
    assert!(fleet.token_record(&t.token_id)?.uses.is_empty());
    // The right pin then works with the same, unspent token.
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    Ok(())
}

#[test]
fn expired_unknown_and_used_up_tokens_are_named() -> R {
    let dir = scratch("tokens")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let pin_of = |t: &linkmesh_integration::harness::TokenInfo| t.ca_pin.clone();

    let expired = fleet.token(1, "1s")?;
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let a = AgentEnv::new(&dir.path().join("a"))?;
    let out = a.enroll(&fleet.url, &expired.token, &["--ca-pin", &pin_of(&expired)])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("token expired at"), "{}", text(&out));

    let unknown = linkmesh_agent::token::Token::generate()
        .map_err(|_| anyhow::anyhow!("rng"))?
        .expose();
    let out = a.enroll(&fleet.url, &unknown, &["--ca-pin", &pin_of(&expired)])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("token not recognised"),
        "{}",
        text(&out)
    );

    let out = a.enroll(&fleet.url, "not-a-token", &["--ca-pin", &pin_of(&expired)])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("malformed enrolment token from LINKMESH_TOKEN"),
        "{}",
        text(&out)
    );

    let once = fleet.token(1, "1h")?;
    let out = a.enroll(&fleet.url, &once.token, &["--ca-pin", &once.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let b = AgentEnv::new(&dir.path().join("b"))?;
    let out = b.enroll(&fleet.url, &once.token, &["--ca-pin", &once.ca_pin])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("token already used 1 of 1 time"),
        "{}",
        text(&out)
    );
    assert_eq!(fleet.hosts()?.len(), 1);

    // No token at all: the error names every way to give one.
    let c = AgentEnv::new(&dir.path().join("c"))?;
    let out = c
        .cmd()?
        .args(["enroll", "--server", &fleet.url, "--ca-pin", &once.ca_pin])
        .output()?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("--token-file FILE, set LINKMESH_TOKEN"),
        "{}",
        text(&out)
    );
    Ok(())
}

#[test]
fn unreachable_server_names_the_address() -> R {
    let dir = scratch("unreach")?;
    let agent = AgentEnv::new(dir.path())?;
    // A port that was free a moment ago and has nobody listening now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let pin = format!("sha256:{}", "00".repeat(32));
    let url = format!("https://127.0.0.1:{port}");
    let token = linkmesh_agent::token::Token::generate()
        .map_err(|_| anyhow::anyhow!("rng"))?
        .expose();
    let out = agent.enroll(&url, &token, &["--ca-pin", &pin, "--timeout", "2s"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("unreachable at 127.0.0.1:{port}")),
        "{}",
        text(&out)
    );
    assert!(!stderr(&out).contains(&token));
    Ok(())
}

#[test]
fn the_token_never_reaches_logs_files_or_errors() -> R {
    let dir = scratch("secret")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(1, "1h")?;
    let token_file = dir.path().join("operator/token");
    std::fs::create_dir_all(token_file.parent().unwrap_or(dir.path()))?;
    std::fs::write(&token_file, &t.token)?;
    let secret = t.token.rsplit('_').next().unwrap_or_default().to_owned();
    assert_eq!(secret.len(), 48);

    let mut outputs = Vec::new();
    let wrong = format!("sha256:{}", "cd".repeat(32));
    for pin in [wrong.as_str(), t.ca_pin.as_str(), t.ca_pin.as_str()] {
        let out = agent
            .cmd()?
            .args(["enroll", "--server", &fleet.url, "--ca-pin", pin])
            .arg("--token-file")
            .arg(&token_file)
            .env("LINKMESH_LOG", "trace")
            .output()?;
        outputs.push(out);
    }
    // A second host tries the used-up token: an error path on both sides.
    let other = AgentEnv::new(&dir.path().join("other"))?;
    outputs.push(
        other
            .cmd()?
            .args(["enroll", "--server", &fleet.url, "--ca-pin", &t.ca_pin])
            .arg("--token-file")
            .arg(&token_file)
            .env("LINKMESH_LOG", "trace")
            .output()?,
    );
    for out in &outputs {
        let all = text(out);
        assert!(
            !all.contains(&secret),
            "token secret in agent output:\n{all}"
        );
    }
    assert!(outputs[1].status.success(), "{}", text(&outputs[1]));
    assert!(!fleet.log().contains(&secret), "token secret in server log");
    // Only the operator's file holds it.
    for (path, _) in snapshot(dir.path()) {
        let full = dir.path().join(&path);
        if full.is_file() && full != token_file {
            let bytes = std::fs::read(&full)?;
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&secret),
                "token secret found in {}",
                full.display()
            );
        }
    }
    Ok(())
}

#[test]
fn corrupt_or_unreadable_identity_is_named_and_left_alone() -> R {
    let dir = scratch("corrupt")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(5, "1h")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let id = agent.state.join("identity");

    type Breaker<'a> = Box<dyn Fn() -> std::io::Result<()> + 'a>;
    let cases: Vec<(&str, Breaker<'_>, &str)> = vec![
        (
            "cert.pem",
            Box::new(|| std::fs::write(id.join("cert.pem"), "garbage")),
            "cert.pem: contains no PEM certificate",
        ),
        (
            "key.pem",
            Box::new(|| {
                std::fs::write(
                    id.join("key.pem"),
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                )
            }),
            "key.pem",
        ),
        (
            "key.pem",
            Box::new(|| {
                std::fs::set_permissions(id.join("key.pem"), std::fs::Permissions::from_mode(0o644))
            }),
            "chmod 600",
        ),
        (
            "key.pem",
            Box::new(|| {
                std::fs::remove_file(id.join("key.pem"))?;
                std::fs::create_dir(id.join("key.pem"))
            }),
            "key.pem: is not a regular file",
        ),
        (
            "ca.pem",
            Box::new(|| std::fs::remove_file(id.join("ca.pem"))),
            "ca.pem: cannot read",
        ),
        (
            "identity.toml",
            Box::new(|| std::fs::write(id.join("identity.toml"), "host_id = 7\n")),
            "identity.toml: not a valid identity record",
        ),
    ];
    for (name, break_it, expect) in cases {
        let backup = dir.path().join("backup");
        let _ = std::fs::remove_dir_all(&backup);
        copy_dir(&id, &backup)?;
        break_it()?;
        let broken = snapshot(&agent.state);
        let hosts_before = fleet.hosts()?.len();
        for args in [
            vec!["--ca-pin", t.ca_pin.as_str()],
            vec!["--ca-pin", t.ca_pin.as_str(), "--timeout", "5s"],
        ] {
            let out = agent.enroll(&fleet.url, &t.token, &args)?;
            assert_eq!(out.status.code(), Some(1), "{name}: {}", text(&out));
            assert!(stderr(&out).contains(expect), "{name}: {}", text(&out));
            assert!(!stderr(&out).contains(&t.token));
        }
        let st = agent.cmd()?.args(["status", "--json"]).output()?;
        assert_eq!(st.status.code(), Some(1), "{name}: {}", text(&st));
        // Nothing was overwritten and no silent re-enrolment happened.
        assert_eq!(snapshot(&agent.state), broken, "{name}");
        assert_eq!(fleet.hosts()?.len(), hosts_before, "{name}");
        std::fs::remove_dir_all(&id)?;
        copy_dir(&backup, &id)?;
    }
    assert_eq!(agent.status()?["enrolled"], true);
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        std::fs::copy(e.path(), &dest)?;
    }
    Ok(())
}

#[test]
fn concurrent_enrolments_make_one_identity() -> R {
    let dir = scratch("concurrent")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(8, "1h")?;
    let children: Vec<_> = (0..6)
        .map(|_| {
            agent.cmd().and_then(|mut c| {
                Ok(c.args([
                    "enroll", "--json", "--server", &fleet.url, "--ca-pin", &t.ca_pin,
                ])
                .env("LINKMESH_TOKEN", &t.token)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?)
            })
        })
        .collect::<Result<_, _>>()?;
    let mut host_ids = std::collections::BTreeSet::new();
    let mut changed = 0;
    for c in children {
        let out = c.wait_with_output()?;
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        host_ids.insert(v["host_id"].as_str().unwrap_or_default().to_owned());
        changed += usize::from(v["changed"] == true);
    }
    assert_eq!(host_ids.len(), 1, "{host_ids:?}");
    assert_eq!(changed, 1);
    assert_eq!(fleet.hosts()?.len(), 1);
    assert_eq!(fleet.token_record(&t.token_id)?.uses.len(), 1);
    Ok(())
}

#[test]
fn another_server_needs_force_and_the_old_identity_survives_until_the_new_one_is_complete() -> R {
    let dir = scratch("force")?;
    let a = Fleet::start(&dir.path().join("fleet-a"), &[])?;
    let b = Fleet::start(&dir.path().join("fleet-b"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let ta = a.token(1, "1h")?;
    let tb = b.token(1, "1h")?;
    let out = agent.enroll(&a.url, &ta.token, &["--ca-pin", &ta.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let first = agent.status()?;
    let enrolled_a = snapshot(&agent.state.join("identity"));

    // Another server without --force: refused, says how.
    let out = agent.enroll(&b.url, &tb.token, &["--ca-pin", &tb.ca_pin])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("--force"), "{}", text(&out));
    assert!(
        stderr(&out).contains(first["host_id"].as_str().unwrap_or("?")),
        "{}",
        text(&out)
    );
    // Same server, a pin for another CA: refused too.
    let out = agent.enroll(&a.url, &ta.token, &["--ca-pin", &tb.ca_pin])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("under a CA"), "{}", text(&out));
    // --force with a failing enrolment (wrong pin for B): the old identity stays.
    let out = agent.enroll(&b.url, &tb.token, &["--ca-pin", &ta.ca_pin, "--force"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(snapshot(&agent.state.join("identity")), enrolled_a);
    assert!(tb.token_id.len() == 16 && b.token_record(&tb.token_id)?.uses.is_empty());

    let out = agent.enroll(&b.url, &tb.token, &["--ca-pin", &tb.ca_pin, "--force"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replaced the previous identity"),
        "{}",
        text(&out)
    );
    let second = agent.status()?;
    assert_eq!(second["server"], b.url.as_str());
    assert_ne!(second["host_id"], first["host_id"]);
    let left: Vec<String> = std::fs::read_dir(&agent.state)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.starts_with("identity.")),
        "leftovers: {left:?}"
    );
    Ok(())
}

#[test]
fn version_skew_decides_enrolment() -> R {
    let dir = scratch("skew")?;
    let agent_version = linkmesh_agent::version::agent_version();
    let (major, minor) = (agent_version.major, agent_version.minor);
    let older = format!("{major}.{}.0", minor.saturating_sub(1));
    let newer_by_two = format!("{major}.{}.0", minor + 2);
    let next_major = format!("{}.0.0", major + 1);
    for (server_version, ok, expect) in [
        (older.as_str(), minor == 0, "upgrade the server first"),
        (
            newer_by_two.as_str(),
            true,
            "behind the server's version window",
        ),
        (next_major.as_str(), false, "different major versions"),
    ] {
        if minor == 0 && server_version == older {
            continue; // no older minor to test against
        }
        let fleet = Fleet::start(
            &dir.path().join(format!("fleet-{server_version}")),
            &["--server-version", server_version],
        )?;
        let agent = AgentEnv::new(&dir.path().join(format!("agent-{server_version}")))?;
        let t = fleet.token(1, "1h")?;
        let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
        assert_eq!(
            out.status.success(),
            ok,
            "server {server_version}: {}",
            text(&out)
        );
        assert!(
            stderr(&out).contains(expect),
            "server {server_version}: {}",
            text(&out)
        );
        if !ok {
            // Refused before the token was spent.
            assert!(fleet.token_record(&t.token_id)?.uses.is_empty());
        }
    }
    Ok(())
}

#[test]
fn the_server_restarts_with_everything_it_knew() -> R {
    let dir = scratch("restart")?;
    let mut fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let t = fleet.token(1, "1h")?;
    let later = fleet.token(1, "1h")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    let hosts = fleet.hosts()?;

    let url = fleet.url.clone();
    fleet.restart(None)?;
    assert_eq!(fleet.url, url);
    assert_eq!(fleet.hosts()?, hosts);
    // A token made before the restart still works; the CA is the same.
    let other = AgentEnv::new(&dir.path().join("other"))?;
    let out = other.enroll(&fleet.url, &later.token, &["--ca-pin", &later.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fleet.hosts()?.len(), 2);
    // The used token stays used.
    let third = AgentEnv::new(&dir.path().join("third"))?;
    let out = third.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(stderr(&out).contains("already used"), "{}", text(&out));
    Ok(())
}

/// Sends an enrolment request with `csr_der` straight to the server (as a
/// client we did not write would), trusting its CA by `pin`.
fn raw_enroll(
    server: &str,
    pin: &str,
    token: &str,
    csr_der: Vec<u8>,
) -> anyhow::Result<Result<(), tonic::Status>> {
    raw_enroll_as(server, pin, token, csr_der, None)
}

/// [`raw_enroll`] with host facts.
fn raw_enroll_as(
    server: &str,
    pin: &str,
    token: &str,
    csr_der: Vec<u8>,
    host: Option<linkmesh_agent::proto::HostFacts>,
) -> anyhow::Result<Result<(), tonic::Status>> {
    use linkmesh_agent::{proto, tls, transport};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let trust = tls::Trust::Pins(vec![pin.parse()?]);
        let config = std::sync::Arc::new(tls::enrol_client_config(&trust)?);
        let channel = transport::connect_once(
            &server.parse()?,
            config,
            None,
            std::time::Duration::from_secs(10),
        )
        .await?;
        let mut client = proto::Client::new(channel);
        Ok(client
            .enroll(proto::EnrollRequest {
                token: token.to_owned(),
                csr_der,
                agent_version: linkmesh_agent::version::AGENT_VERSION.to_owned(),
                host,
            })
            .await
            .map(drop))
    })
}

/// openssl's options for an ECDSA P-256 key signed with SHA-256: the CSR
/// the CA signs.
const P256: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-sha256",
];

/// A CSR made by openssl with `args` (key options and digest), DER.
fn openssl_csr(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out_path = dir.join(format!("{name}.der"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-new",
            "-nodes",
            "-subj",
            "/CN=probe",
            "-outform",
            "DER",
        ])
        .args(args)
        .arg("-keyout")
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(&out_path)
        .output()?;
    anyhow::ensure!(out.status.success(), "openssl: {}", stderr(&out));
    Ok(std::fs::read(out_path)?)
}

/// The CA checks the key itself, not the CSR's signature algorithm (a P-384
/// key signed with SHA-256 once got a certificate claiming P-256), and a
/// refused CSR spends no token use: a one-use token still enrols afterwards.
#[test]
fn a_refused_csr_spends_no_token_use_and_only_p256_or_ed25519_keys_are_signed() -> R {
    let dir = scratch("csr-keys")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let t = fleet.token(1, "1h")?;
    for (name, args) in [
        (
            "p384-sha256",
            vec![
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-sha256",
            ],
        ),
        (
            "p384-sha384",
            vec![
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-sha384",
            ],
        ),
        ("rsa", vec!["-newkey", "rsa:2048", "-sha256"]),
    ] {
        let csr = openssl_csr(dir.path(), name, &args)?;
        let err = raw_enroll(&fleet.url, &t.ca_pin, &t.token, csr)?
            .expect_err(&format!("{name}: signed"));
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
        assert!(
            err.message().contains("unsupported key") || err.message().contains("invalid"),
            "{name}: {}",
            err.message()
        );
        let record = fleet.token_record(&t.token_id)?;
        assert!(record.uses.is_empty(), "{name} spent a use: {record:?}");
    }
    // The one use is still there for a real enrolment.
    let agent = AgentEnv::new(&dir.path().join("agent"))?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin])?;
    assert!(out.status.success(), "{}", text(&out));
    // And a P-256 key made by openssl is signed, with the very key it sent.
    let t2 = fleet.token(1, "1h")?;
    let csr = openssl_csr(dir.path(), "p256", &P256)?;
    raw_enroll(&fleet.url, &t2.ca_pin, &t2.token, csr)?
        .map_err(|e| anyhow::anyhow!("P-256 refused: {e:?}"))?;
    Ok(())
}

/// Strings from agents are bounded and never reach a terminal or a log raw:
/// an over-long hostname is refused naming the field (and spends no token
/// use); ESC and CR/LF in an accepted one are escaped by `hosts`, `drift`
/// and the server's log.
#[test]
fn agent_strings_are_bounded_and_escaped_in_tables_and_logs() -> R {
    let dir = scratch("strings")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let t = fleet.token(1, "1h")?;
    let facts = |hostname: String| linkmesh_agent::proto::HostFacts {
        hostname,
        ..Default::default()
    };
    let csr = openssl_csr(dir.path(), "long", &P256)?;
    let err = raw_enroll_as(
        &fleet.url,
        &t.ca_pin,
        &t.token,
        csr,
        Some(facts("h".repeat(1 << 20))),
    )?
    .expect_err("a 1 MiB hostname was accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("host.hostname is 1048576 bytes; at most 253"),
        "{}",
        err.message()
    );
    assert!(fleet.token_record(&t.token_id)?.uses.is_empty());

    let evil = "web\u{1b}[2J\r\n00000000-0000-4000-8000-000000000000  forged".to_owned();
    let csr = openssl_csr(dir.path(), "evil", &P256)?;
    raw_enroll_as(&fleet.url, &t.ca_pin, &t.token, csr, Some(facts(evil)))?
        .map_err(|e| anyhow::anyhow!("refused: {e:?}"))?;
    for args in [&["hosts"][..], &["drift"][..]] {
        let out = fleet.admin(args)?;
        let shown = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{shown}");
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\r'),
            "{args:?} printed control characters: {shown:?}"
        );
        assert!(shown.contains("web\\u{1b}[2J\\r\\n"), "{args:?}: {shown}");
        assert_eq!(
            shown.lines().filter(|l| l.contains("forged")).count(),
            1,
            "{shown}"
        );
    }
    let log = fleet.log();
    assert!(
        !log.contains('\u{1b}') && log.contains("web\\u{1b}[2J\\r\\n"),
        "the server logged the hostname raw: {log:?}"
    );
    Ok(())
}

/// A client trying tokens in a loop gets each refused, and the server's log
/// a line every 10 s (with a count), not one per attempt.
#[test]
fn refused_enrolments_are_logged_at_a_bounded_rate() -> R {
    let dir = scratch("refusal-log")?;
    let fleet = Fleet::start(&dir.path().join("fleet"), &[])?;
    let t = fleet.token(1, "1h")?;
    // The real id with a wrong secret: "unknown token" every time.
    let (head, secret) = t.token.rsplit_once('_').unwrap_or_default();
    let wrong: String = secret
        .chars()
        .map(|c| if c == '0' { '1' } else { '0' })
        .collect();
    let bogus = format!("{head}_{wrong}");
    let csr = openssl_csr(dir.path(), "probe", &P256)?;
    for _ in 0..50 {
        let err = raw_enroll(&fleet.url, &t.ca_pin, &bogus, csr.clone())?
            .expect_err("a wrong secret enrolled");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    let log = fleet.log();
    let lines = log.matches("Enrolment refused: unknown token").count();
    assert_eq!(lines, 1, "{log}");
    assert!(fleet.token_record(&t.token_id)?.uses.is_empty());
    Ok(())
}
