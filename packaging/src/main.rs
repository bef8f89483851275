//! `linkmesh-package`: builds the .deb and .rpm of an agent binary.
//!
//!     linkmesh-package --binary target/release/linkmesh-agent --out target/packages
//!
//! The version is the binary's own (`linkmesh-agent version --json`), so a
//! package can never claim another version than the agent inside it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::Parser;
use linkmesh_packaging::{deb, rpm, spec::Package};
use sha2::{Digest, Sha256};

#[derive(Parser)]
#[command(
    name = "linkmesh-package",
    about = "Build the linkmesh-agent .deb and .rpm"
)]
struct Args {
    /// The agent binary to package.
    #[arg(long)]
    binary: PathBuf,
    /// Where the packages and their .sha256 files go.
    #[arg(long, default_value = "target/packages")]
    out: PathBuf,
    /// The package description.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/package.toml"))]
    spec: PathBuf,
    /// Which packages: deb, rpm or all.
    #[arg(long, default_value = "all", value_parser = ["deb", "rpm", "all"])]
    format: String,
    /// Target architecture (Rust's name: x86_64, aarch64).
    #[arg(long, default_value = std::env::consts::ARCH)]
    arch: String,
    /// gzip level, 0-9 (1 for quick test builds).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(0..=9))]
    level: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let version = binary_version(&args.binary)?;
    let source_date = source_date(&args.binary)?;
    let pkg = Package::load(&args.spec, &args.binary, &version, source_date)
        .with_context(|| format!("reading the package description {}", args.spec.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating --out {}", args.out.display()))?;
    if matches!(args.format.as_str(), "deb" | "all") {
        let Some(arch) = deb::deb_arch(&args.arch) else {
            bail!(
                "--arch {}: no Debian architecture for it (x86_64, aarch64)",
                args.arch
            );
        };
        let bytes = deb::build(&pkg, arch, args.level).context("building the .deb")?;
        write_artifact(&args.out, &deb::file_name(&pkg, arch), &bytes)?;
    }
    if matches!(args.format.as_str(), "rpm" | "all") {
        let Some(arch) = rpm::rpm_arch(&args.arch) else {
            bail!(
                "--arch {}: no RPM architecture for it (x86_64, aarch64)",
                args.arch
            );
        };
        let built = rpm::build(&pkg, arch, args.level).context("building the .rpm")?;
        let mut bytes = Vec::new();
        built.write(&mut bytes).context("encoding the .rpm")?;
        write_artifact(&args.out, &rpm::file_name(&pkg, arch), &bytes)?;
    }
    Ok(())
}

/// The version the binary reports about itself.
fn binary_version(binary: &Path) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .args(["version", "--json"])
        .output()
        .with_context(|| format!("running --binary {} version --json", binary.display()))?;
    if !out.status.success() {
        bail!(
            "--binary {}: 'version --json' failed ({}); is it a linkmesh-agent binary?",
            binary.display(),
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // {"api_version":1,"git_revision":"…","version":"X.Y.Z"}
    let version = text
        .split("\"version\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .filter(|v| !v.is_empty());
    match version {
        Some(v) => Ok(v.to_owned()),
        None => bail!(
            "--binary {}: no version in its output {text:?}",
            binary.display()
        ),
    }
}

/// SOURCE_DATE_EPOCH when set (reproducible builds), else the binary's mtime.
fn source_date(binary: &Path) -> anyhow::Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    let mtime = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the mtime of {}", binary.display()))?;
    Ok(mtime
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
}

/// Writes NAME and NAME.sha256 ("HEX  NAME"), each whole or not at all.
fn write_artifact(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let sum = linkmesh_packaging::hex(&Sha256::digest(bytes));
    write_atomic(&dir.join(name), bytes)?;
    write_atomic(
        &dir.join(format!("{name}.sha256")),
        format!("{sum}  {name}\n").as_bytes(),
    )?;
    println!("{}\t{}\t{sum}", dir.join(name).display(), bytes.len());
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
