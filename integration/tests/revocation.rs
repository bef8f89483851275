//! The server admits only a host's current certificate (issue 15, defect 2):
//! a superseded one fails Report, Renew (even within the grace window) and
//! OpAMP; a renewal the host never stored is completed by renewing again;
//! `hosts revoke` refuses a host at once, across restarts, and its agent
//! stops reporting while its collector keeps running.

use std::time::Duration;

use linkmesh_agent::{identity::Identity, proto, reporter::refusal_standing};
use linkmesh_integration::harness::{AgentEnv, Fleet, alive, fleet_with_agent, text};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

type R = anyhow::Result<()>;

const T: Duration = Duration::from_secs(20);

use linkmesh_integration::harness::mtls_client as client;

/// Renews `id` with a new key, as the agent does, and returns the identity
/// the server's answer makes (not stored anywhere).
async fn renew(id: &Identity) -> anyhow::Result<Identity> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let resp = client(id)?
        .renew(proto::RenewRequest {
            csr_der: csr.der().to_vec(),
        })
        .await?
        .into_inner();
    Ok(Identity::new(
        id.host_id.clone(),
        id.server.clone(),
        id.enrolled_at.clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        resp.certificate_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        CertificateDer::from(resp.ca_certificate_der),
    )?)
}

async fn report(id: &Identity) -> Result<(), tonic::Status> {
    let mut c = client(id).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    c.report(proto::ReportRequest {
        full: true,
        agent_version: linkmesh_agent::version::AGENT_VERSION.into(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn standing(id: &Identity) -> anyhow::Result<proto::Standing> {
    let info = client(id)?
        .server_info(proto::ServerInfoRequest {})
        .await?
        .into_inner();
    Ok(info.client_standing())
}

fn refused_as(r: Result<impl std::fmt::Debug, tonic::Status>, want: proto::Standing) {
    match r {
        Ok(v) => panic!("accepted, wanted a refusal as {want:?}: {v:?}"),
        Err(s) => assert_eq!(refusal_standing(&s), want, "{s:?}"),
    }
}

/// A renewal refused because the certificate was superseded: its status.
fn superseded_renewal(r: anyhow::Result<Identity>) -> tonic::Status {
    let err = r.expect_err("a superseded certificate renewed");
    let status = err
        .downcast_ref::<tonic::Status>()
        .cloned()
        .unwrap_or_else(|| tonic::Status::unknown(err.to_string()));
    assert_eq!(
        refusal_standing(&status),
        proto::Standing::Superseded,
        "{status:?}"
    );
    status
}

/// The serial the server records as the host's current certificate.
fn recorded_serial(fleet: &Fleet) -> anyhow::Result<String> {
    Ok(fleet.hosts()?[0]["cert_serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

fn serial_of(id: &Identity) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(&id.certs[0]).expect("own certificate");
    linkmesh_agent::hex::encode(c.raw_serial())
}

fn same_serial(a: &str, b: &str) -> bool {
    a.trim_start_matches('0') == b.trim_start_matches('0')
}

#[test]
fn a_superseded_certificate_is_refused_everywhere_and_an_unstored_renewal_is_renewed_again() -> R {
    // Certificates of 6 s with a grace of an hour: the old one expires
    // during the test and must still not renew.
    let (_dir, mut fleet, agent) = fleet_with_agent(
        "rev-superseded",
        &["--cert-lifetime", "6s", "--renew-grace", "1h"],
    )?;
    let old = agent.identity()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        assert_eq!(standing(&old).await?, proto::Standing::Current);
        // A renewal the host never stored (it crashed after the answer):
        // the current certificate still works and renews again.
        let lost = renew(&old).await?;
        report(&old).await.map_err(anyhow::Error::new)?;
        let kept = renew(&old).await?;
        refused_as(report(&lost).await, proto::Standing::Superseded);
        // The host stores and uses the renewed certificate: from then on
        // the old one is refused by Report, Renew and ServerInfo's standing.
        report(&kept).await.map_err(anyhow::Error::new)?;
        assert!(same_serial(&recorded_serial(&fleet)?, &serial_of(&kept)));
        refused_as(report(&old).await, proto::Standing::Superseded);
        let status = superseded_renewal(renew(&old).await);
        assert!(
            status.message().contains("replaced by a renewal"),
            "{status:?}"
        );
        // Nor does a copy holding the superseded certificate get an
        // identity of its own (issue 14).
        let k = rcgen::KeyPair::generate()?;
        refused_as(
            linkmesh_integration::harness::rekey_as_copy(&old, &k, &"ab".repeat(32)).await,
            proto::Standing::Superseded,
        );
        assert_eq!(standing(&old).await?, proto::Standing::Superseded);
        assert_eq!(standing(&kept).await?, proto::Standing::Current);
        assert!(
            same_serial(&recorded_serial(&fleet)?, &serial_of(&kept)),
            "the server must not record the old key as current"
        );
        anyhow::Ok(kept)
    })
    .and_then(|kept| {
        // Across a crash of the server (SIGKILL: nothing flushed at exit).
        fleet.restart(None)?;
        rt.block_on(async {
            refused_as(report(&old).await, proto::Standing::Superseded);
            report(&kept).await.map_err(anyhow::Error::new)?;
            // Expired and superseded: not renewed, even within the grace.
            let wait = old.validity.not_after - time::OffsetDateTime::now_utc();
            tokio::time::sleep(
                Duration::try_from(wait).unwrap_or(Duration::ZERO) + Duration::from_secs(1),
            )
            .await;
            superseded_renewal(renew(&old).await);
            // The current one renews (expired or not: within the grace).
            renew(&kept).await?;
            anyhow::Ok(())
        })
    })?;
    Ok(())
}

fn check_item(agent: &AgentEnv, id: &str) -> anyhow::Result<(Option<i32>, Value)> {
    let out = agent.cmd()?.args(["check", "--json"]).output()?;
    let doc: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("check --json: {e}: {}", text(&out)))?;
    let item = doc["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["id"] == id))
        .cloned()
        .unwrap_or_default();
    Ok((out.status.code(), item))
}

#[test]
fn a_revoked_host_is_refused_at_once_and_its_agent_stops_reporting_keeping_the_collector() -> R {
    let (_dir, mut fleet, agent) = fleet_with_agent("rev-revoke", &[])?;
    let id = agent.identity()?;
    let host = id.host_id.to_string();
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(
        T,
        "reporting, the collector running, seen over OpAMP",
        |s| {
            s["reporter"]["reports"].as_u64() >= Some(1)
                && s["supervision"]["collector_pid"].as_u64().is_some()
                && s["reporter"]["opamp"]["connected"] == true
        },
    )?;
    let collector = s["supervision"]["collector_pid"].as_u64().unwrap_or(0) as u32;
    let (_, item) = check_item(&agent, "standing")?;
    assert_eq!(item["outcome"], "ok", "{item}");

    // Unknown ids are named, and nothing is written.
    let out = fleet.admin(&["hosts", "revoke", "no-such-host"])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no enrolled host no-such-host"),
        "{}",
        text(&out)
    );

    let out = fleet.admin(&["hosts", "revoke", &host, "--reason", "laptop stolen"])?;
    assert!(out.status.success(), "{}", text(&out));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Refused at once: within the server's 200 ms poll (bounded wait for
    // the refusal itself).
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match report(&id).await {
                Err(s) if refusal_standing(&s) == proto::Standing::Revoked => {
                    assert!(s.message().contains("laptop stolen"), "{s:?}");
                    assert!(
                        s.message().contains("enrol again with a new token"),
                        "{s:?}"
                    );
                    break;
                }
                other if tokio::time::Instant::now() > deadline => {
                    anyhow::bail!("not refused as revoked: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert_eq!(standing(&id).await?, proto::Standing::Revoked);
        anyhow::Ok(())
    })?;
    // The agent is told, stops reporting and keeps its collector.
    let s = run.wait_status(T, "the agent told it is revoked", |s| {
        s["reporter"]["revoked"] == true
    })?;
    assert!(
        s["reporter"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("revoked: enrol again with a new token"),
        "{s}"
    );
    assert_eq!(s["supervision"]["state"], "running", "{s}");
    assert_eq!(
        s["supervision"]["collector_pid"],
        u64::from(collector),
        "{s}"
    );
    assert!(alive(collector));
    // Its supervisor's OpAMP connection was closed by the server.
    let deadline = std::time::Instant::now() + T;
    while !fleet.log().contains("reason=\"host revoked\"")
        && !fleet.log().contains("reason=host revoked")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "OpAMP session not closed: {}",
            fleet.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, item) = check_item(&agent, "standing")?;
    assert_eq!(code, Some(1));
    assert_eq!(item["outcome"], "fail", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .unwrap_or_default()
            .starts_with("revoked:"),
        "{item}"
    );
    let out = agent.cmd()?.arg("status").output()?;
    assert!(
        text(&out).contains("standing:     revoked: enrol again with a new token"),
        "{}",
        text(&out)
    );
    let listed = fleet.hosts()?;
    assert!(listed[0]["revoked_at"].is_string(), "{listed:?}");

    // Kept across a restart of the server and of the agent: the restarted
    // agent does not report, and its collector keeps running.
    fleet.restart(None)?;
    rt.block_on(async {
        refused_as(report(&id).await, proto::Standing::Revoked);
        anyhow::Ok(())
    })?;
    drop(run);
    let run = agent.spawn_run(&[], &[])?;
    let s = run.wait_status(T, "restarted, still revoked", |s| {
        s["reporter"]["revoked"] == true && s["supervision"]["state"] == "running"
    })?;
    assert_eq!(s["reporter"]["reports"], 0, "{s}");
    assert!(
        !run.log_text().contains("Report failed"),
        "a revoked agent must not try: {}",
        run.log_text()
    );
    // Revoking again keeps the first record.
    let first = listed[0]["revoked_at"].clone();
    let out = fleet.admin(&["hosts", "revoke", &host])?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(fleet.hosts()?[0]["revoked_at"], first);

    // A new enrolment makes a new host, which reports.
    drop(run);
    let t = fleet.token(1, "1h")?;
    let out = agent.enroll(&fleet.url, &t.token, &["--ca-pin", &t.ca_pin, "--force"])?;
    assert!(out.status.success(), "{}", text(&out));
    let run = agent.spawn_run(&[], &[])?;
    run.wait_status(T, "the new host reporting", |s| {
        s["reporter"]["reports"].as_u64() >= Some(1) && s["reporter"]["revoked"] == false
    })?;
    assert_ne!(agent.identity()?.host_id.to_string(), host);
    Ok(())
}
