//! The .rpm, built with the `rpm` crate (pure Rust, rpm v4 format, gzip
//! payload so rpm 4.14 and later read it).

use crate::spec::{Package, parse_requirement};

/// RPM's name for the architecture Rust calls `arch` (the same two).
pub fn rpm_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("x86_64"),
        "aarch64" => Some("aarch64"),
        _ => None,
    }
}

/// `NAME-VERSION-RELEASE.ARCH.rpm`, the RPM file-name convention.
pub fn file_name(pkg: &Package, rpm_arch: &str) -> String {
    format!(
        "{}-{}-{}.{}.rpm",
        pkg.name, pkg.version, pkg.release, rpm_arch
    )
}

/// Why the .rpm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RpmError {
    #[error(transparent)]
    Build(#[from] rpm::Error),
    #[error("rpm.requires: {0}")]
    Requirement(String),
}

/// `NAME` or `NAME OP VERSION` as an rpm dependency.
pub fn dependency(s: &str) -> Result<rpm::Dependency, String> {
    let (name, constraint) = parse_requirement(s)?;
    Ok(match constraint {
        None => rpm::Dependency::any(name),
        Some(("=", v)) => rpm::Dependency::eq(name, v),
        Some(("<", v)) => rpm::Dependency::less(name, v),
        Some(("<=", v)) => rpm::Dependency::less_eq(name, v),
        Some((">", v)) => rpm::Dependency::greater(name, v),
        Some((_, v)) => rpm::Dependency::greater_eq(name, v),
    })
}

/// Builds the package; `level` is the gzip level (0–9).
pub fn build(pkg: &Package, rpm_arch: &str, level: u32) -> Result<rpm::Package, RpmError> {
    let date = u32::try_from(pkg.source_date).unwrap_or(u32::MAX);
    let config = rpm::BuildConfig::v4()
        .compression(rpm::CompressionWithLevel::Gzip(level))
        .source_date(date);
    let mut b = rpm::PackageBuilder::new(
        &pkg.name,
        &pkg.version,
        &pkg.license,
        rpm_arch,
        &pkg.summary,
    );
    b.using_config(config)
        .release(pkg.release.clone())
        .description(pkg.description.clone())
        .url(pkg.homepage.clone())
        .packager(pkg.maintainer.clone())
        .vendor(pkg.maintainer.clone())
        .group(pkg.rpm.group.clone())
        .build_host("linkmesh-package");
    for d in &pkg.dirs {
        let mode = u16::try_from(d.mode).unwrap_or(0o755);
        b.with_dir_entry(
            rpm::FileOptions::dir(d.dest.clone())
                .permissions(mode)
                .user("root")
                .group("root"),
        )?;
    }
    for f in &pkg.files {
        let mode = u16::try_from(f.mode).unwrap_or(0o644);
        let mut opts = rpm::FileOptions::new(f.dest.clone())
            .permissions(mode)
            .user("root")
            .group("root");
        if f.config {
            // %config(noreplace): an edited file is kept on upgrade (the new
            // one lands beside it as .rpmnew) and saved as .rpmsave on erase.
            opts = opts.config().noreplace();
        }
        b.with_file_contents(f.data.clone(), opts)?;
    }
    for r in &pkg.rpm.requires {
        b.requires(dependency(r).map_err(RpmError::Requirement)?);
    }
    let s = &pkg.rpm_scripts;
    b.pre_install_script(s.pre.clone())
        .post_install_script(s.post.clone())
        .pre_uninstall_script(s.preun.clone())
        .post_uninstall_script(s.postun.clone());
    Ok(b.build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_round_trips_through_the_parser() {
        let pkg = crate::deb::tests::sample();
        let built = build(&pkg, "x86_64", 1).unwrap();
        let mut bytes = Vec::new();
        built.write(&mut bytes).unwrap();
        let parsed = rpm::Package::parse(&mut &bytes[..]).unwrap();
        let md = &parsed.metadata;
        assert_eq!(md.get_name().unwrap(), "linkmesh-agent");
        assert_eq!(md.get_version().unwrap(), "1.2.3");
        assert_eq!(md.get_release().unwrap(), "1");
        assert_eq!(md.get_arch().unwrap(), "x86_64");
        let files = md.get_file_entries().unwrap();
        let conf = files
            .iter()
            .find(|f| f.path().to_string_lossy() == "/etc/linkmesh/agent.toml")
            .unwrap();
        assert!(
            conf.flags()
                .contains(rpm::FileFlags::CONFIG | rpm::FileFlags::NOREPLACE)
        );
        let bin = files
            .iter()
            .find(|f| f.path().to_string_lossy() == "/usr/bin/linkmesh-agent")
            .unwrap();
        assert_eq!(bin.mode().permissions(), 0o755);
        assert_eq!(bin.size(), 2049);
        assert_eq!(md.get_pre_install_script().unwrap().script, "echo pre\n");
        assert_eq!(md.get_post_install_script().unwrap().script, "echo post\n");
        assert_eq!(
            md.get_pre_uninstall_script().unwrap().script,
            "echo preun\n"
        );
        assert_eq!(
            file_name(&pkg, "x86_64"),
            "linkmesh-agent-1.2.3-1.x86_64.rpm"
        );
    }
}
