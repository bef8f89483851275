//! Build information only: the agent's version and the git revision it was
//! built from. Never protoc.
//!
//! `LINKMESH_VERSION=X.Y.Z` builds the agent as another version (packaging
//! and the upgrade/downgrade tests build two); otherwise Cargo's version.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LINKMESH_GIT_REV");
    println!("cargo:rerun-if-env-changed=LINKMESH_VERSION");
    // Test builds only (the rollback tests): `LINKMESH_FAULT_INJECTION=1`
    // makes `run` honour `LINKMESH_FAULT` (src/fault.rs). Release builds
    // never set it, so they have no fault to inject.
    println!("cargo:rerun-if-env-changed=LINKMESH_FAULT_INJECTION");
    if std::env::var("LINKMESH_FAULT_INJECTION").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-env=LINKMESH_FAULT_INJECTION=1");
    }
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let rev = std::env::var("LINKMESH_GIT_REV")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        });
    println!(
        "cargo:rustc-env=LINKMESH_GIT_REV={}",
        rev.as_deref().unwrap_or("unknown")
    );
    let version = match std::env::var("LINKMESH_VERSION") {
        Ok(v) if !v.is_empty() => {
            let core = v.split(['-', '+']).next().unwrap_or("");
            let parts: Vec<&str> = core.split('.').collect();
            if parts.len() != 3
                || parts
                    .iter()
                    .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
            {
                panic!("LINKMESH_VERSION={v:?} is not MAJOR.MINOR.PATCH");
            }
            v
        }
        _ => std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
    };
    println!("cargo:rustc-env=LINKMESH_AGENT_VERSION={version}");
}
