//! The bodies of the fuzz targets (`fuzz/`, libFuzzer through
//! `libfuzzer-sys`): every parser that takes outside input, on both sides.
//! They live here so the workspace's tests replay the kept inputs
//! (`fuzz/corpus`, `fuzz/regressions`) through the same code on every run,
//! without the fuzzing build. Each must never panic, whatever the bytes,
//! and checks what must hold of what it accepts (a parsed value prints back
//! to itself, a bounded message stays bounded...).

use linkmesh_agent::{
    config, endpoint::ServerUrl, host, proto, runtime, supervisor, tls::CaPin, token::Token,
    version::Version,
};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name, as `fuzz/fuzz_targets/NAME.rs` calls it.
pub const TARGETS: [(&str, Target); 7] = [
    ("server_messages", server_messages),
    ("csr", csr),
    ("opamp_frame", opamp_frame),
    ("agent_config", agent_config),
    ("versions", versions),
    ("runtime_output", runtime_output),
    ("os_release", os_release),
];

/// Enroll, Report and Renew requests as the server receives them (first
/// byte picks which), through the server's own checks.
pub fn server_messages(data: &[u8]) {
    use prost::Message as _;
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let Ok(r) = proto::EnrollRequest::decode(body) {
                if crate::text::check_enroll(&r).is_ok() {
                    assert!(r.host.as_ref().is_none_or(|h| h.hostname.len() <= 253));
                }
                let _ = Token::parse(&r.token, "the request");
                let _ = r.agent_version.parse::<Version>();
                let _ = crate::ca::csr_spki_sha256(&r.csr_der);
            }
        }
        1 => {
            if let Ok(r) = proto::ReportRequest::decode(body) {
                let _ = crate::text::check_report(&r);
                let _ = linkmesh_agent::reporter::digest(&r);
            }
        }
        _ => {
            if let Ok(r) = proto::RenewRequest::decode(body) {
                let _ = crate::ca::check_csr(&r.csr_der);
            }
        }
    }
}

/// A CSR as DER: what the CA checks before it spends a token use. What it
/// accepts is a P-256 or Ed25519 key whose hash is stable.
pub fn csr(data: &[u8]) {
    if let Ok((_, spki)) = crate::ca::check_csr(data) {
        assert_eq!(
            crate::ca::csr_spki_sha256(data).ok(),
            Some(crate::ca::spki_sha256(&spki))
        );
    }
}

/// An OpAMP WebSocket message from a supervisor, decoded and taken in by a
/// session as the server does.
pub fn opamp_frame(data: &[u8]) {
    let Ok(msg) = crate::opamp::wire::decode_frame(data) else {
        return;
    };
    let mut session = crate::opamp::session::Session::new("fuzz-host");
    let mut record = crate::state::OpampRecord::default();
    if session.on_message(&msg, &mut record, None, 0).is_ok() {
        // The record keeps what the server shows and logs bounded.
        assert!(
            record.last_error.len() <= 64 * 1024,
            "{}",
            record.last_error.len()
        );
    }
}

/// The agent's configuration: two fragments (split at the first NUL) merged
/// as the main file and a drop-in; every problem reported, never a panic,
/// and no error echoing more than a bounded part of the input.
pub fn agent_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));
    let fragments = [
        ("/etc/linkmesh-agent/agent.toml".into(), a.to_owned()),
        (
            "/etc/linkmesh-agent/agent.d/10-fuzz.toml".into(),
            b.to_owned(),
        ),
    ];
    if let Err(e) = config::from_texts(&fragments, |_| None) {
        let shown = e.to_string();
        // Each problem names its file; values are cut to a bounded echo.
        assert!(
            shown.len() <= 2048 + 600 * e.problems.len(),
            "an error of {} bytes for {} bytes of input",
            shown.len(),
            data.len()
        );
    }
}

/// Version strings, durations, pins, server URLs and tokens: what parses
/// prints back to what parses to the same value.
pub fn versions(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(v) = s.parse::<Version>() {
        assert_eq!(v.to_string().parse::<Version>().ok(), Some(v));
    }
    if let Ok(d) = config::parse_duration(s) {
        assert_eq!(
            config::parse_duration(&config::format_duration(d)).ok(),
            Some(d)
        );
    }
    if let Ok(p) = s.parse::<CaPin>() {
        assert_eq!(p.to_string().parse::<CaPin>().ok(), Some(p));
    }
    if let Ok(u) = s.parse::<ServerUrl>() {
        assert_eq!(
            u.to_string()
                .parse::<ServerUrl>()
                .ok()
                .map(|u| u.to_string()),
            Some(u.to_string())
        );
    }
    let _ = Token::parse(s, "fuzz");
}

/// What the runtimes print: `--version` of otelcol-contrib,
/// opampsupervisor and Alloy, `dpkg-query`/`rpm` versions, the
/// supervisor's log lines, `systemctl show` output and Alloy's env file.
pub fn runtime_output(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = runtime::parse_otelcol_version(&text);
    let _ = runtime::parse_alloy_version(&text);
    let _ = runtime::parse_package_version(&text);
    let _ = runtime::alloy::parse_env_file(&text);
    let _ = supervisor::unit::parse_show(&text);
    for line in text.lines() {
        let r = supervisor::output::parse_record(line, supervisor::output::Level::Info);
        let _ = format!("{r:?}");
    }
}

/// `/etc/os-release`.
pub fn os_release(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let r = host::parse_os_release(&text);
    let _ = format!("{r:?}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_target_takes_the_empty_input_and_junk() {
        for (name, f) in super::TARGETS {
            for input in [
                &b""[..],
                b"\0",
                b"\xff\xfe",
                b"{\"level\":",
                b"[runtime]\nkind=1",
            ] {
                f(input);
            }
            assert!(!name.is_empty());
        }
    }
}
