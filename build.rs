//! Build information only: the git revision the agent was built from. Never protoc.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LINKMESH_GIT_REV");
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
}
