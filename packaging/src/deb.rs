//! The .deb: an `ar` archive of `debian-binary`, `control.tar.gz` and
//! `data.tar.gz` (deb(5)), written directly. The control file, conffiles
//! and md5sums are plain functions of the [`Package`].

use std::{collections::BTreeMap, io::Write};

use flate2::{Compression, write::GzEncoder};
use md5::{Digest, Md5};

use crate::spec::Package;

/// Debian's name for the architecture Rust calls `arch`.
pub fn deb_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        _ => None,
    }
}

/// `NAME_VERSION-RELEASE_ARCH.deb`, Debian's file-name convention.
pub fn file_name(pkg: &Package, deb_arch: &str) -> String {
    format!(
        "{}_{}-{}_{}.deb",
        pkg.name, pkg.version, pkg.release, deb_arch
    )
}

/// Installed size in KiB, as dpkg-gencontrol counts it: each file rounded up
/// to a KiB, plus one per directory.
pub fn installed_size_kib(pkg: &Package) -> u64 {
    let files: u64 = pkg
        .files
        .iter()
        .map(|f| (f.data.len() as u64).div_ceil(1024))
        .sum();
    files + directories(pkg).len() as u64
}

/// The `control` file.
pub fn control(pkg: &Package, deb_arch: &str) -> String {
    let mut out = format!(
        "Package: {}\nVersion: {}-{}\nArchitecture: {}\nMaintainer: {}\nInstalled-Size: {}\n",
        pkg.name,
        pkg.version,
        pkg.release,
        deb_arch,
        pkg.maintainer,
        installed_size_kib(pkg)
    );
    if !pkg.deb.depends.is_empty() {
        out.push_str(&format!("Depends: {}\n", pkg.deb.depends.join(", ")));
    }
    out.push_str(&format!(
        "Section: {}\nPriority: {}\nHomepage: {}\nDescription: {}\n",
        pkg.deb.section, pkg.deb.priority, pkg.homepage, pkg.summary
    ));
    // Extended description: every line indented by one space; an empty line
    // is written as " ." (deb-control(5)).
    for line in pkg.description.lines() {
        if line.trim().is_empty() {
            out.push_str(" .\n");
        } else {
            out.push(' ');
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    out
}

/// The `conffiles` list.
pub fn conffiles(pkg: &Package) -> String {
    pkg.config_files()
        .map(|f| format!("{}\n", f.dest))
        .collect()
}

/// The `md5sums` list (dpkg --verify reads it); configuration files are
/// left out, as dpkg tracks them through conffiles.
pub fn md5sums(pkg: &Package) -> String {
    pkg.files
        .iter()
        .filter(|f| !f.config)
        .map(|f| {
            let sum = Md5::digest(&f.data);
            format!("{}  {}\n", crate::hex(&sum), &f.dest[1..])
        })
        .collect()
}

/// Every directory in the data archive with its mode: the listed ones, and
/// every parent of a file (0755).
fn directories(pkg: &Package) -> BTreeMap<String, u32> {
    let mut dirs = BTreeMap::new();
    let add_parents = |path: &str, dirs: &mut BTreeMap<String, u32>| {
        let mut end = 0;
        while let Some(i) = path[end + 1..].find('/') {
            end += 1 + i;
            dirs.entry(path[..end].to_owned()).or_insert(0o755);
        }
    };
    for f in &pkg.files {
        add_parents(&f.dest, &mut dirs);
    }
    for d in &pkg.dirs {
        add_parents(&d.dest, &mut dirs);
        dirs.insert(d.dest.clone(), d.mode);
    }
    dirs
}

fn tar_entry(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    mode: u32,
    mtime: u64,
    data: Option<&[u8]>,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("root")?;
    h.set_groupname("root")?;
    h.set_mtime(mtime);
    // The name is written as given: the tar crate's set_path would drop the
    // leading "./" that dpkg-deb writes and tools expect.
    let name = path.as_bytes();
    let field = &mut h.as_old_mut().name;
    if name.len() >= field.len() {
        return Err(std::io::Error::other(format!(
            "{path}: longer than 99 bytes"
        )));
    }
    field.fill(0);
    field[..name.len()].copy_from_slice(name);
    match data {
        Some(data) => {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            h.set_cksum();
            tar.append(&h, data)
        }
        None => {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_cksum();
            tar.append(&h, std::io::empty())
        }
    }
}

fn gz_tar(
    level: u32,
    fill: impl FnOnce(&mut tar::Builder<GzEncoder<Vec<u8>>>) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::new(level)));
    tar.mode(tar::HeaderMode::Deterministic);
    fill(&mut tar)?;
    tar.into_inner()?.finish()
}

/// The whole .deb, in memory.
pub fn build(pkg: &Package, deb_arch: &str, level: u32) -> std::io::Result<Vec<u8>> {
    let mtime = pkg.source_date;
    let control_tar = gz_tar(level, |t| {
        tar_entry(t, "./", 0o755, mtime, None)?;
        tar_entry(
            t,
            "./control",
            0o644,
            mtime,
            Some(control(pkg, deb_arch).as_bytes()),
        )?;
        let conf = conffiles(pkg);
        if !conf.is_empty() {
            tar_entry(t, "./conffiles", 0o644, mtime, Some(conf.as_bytes()))?;
        }
        tar_entry(t, "./md5sums", 0o644, mtime, Some(md5sums(pkg).as_bytes()))?;
        let s = &pkg.deb_scripts;
        for (name, text) in [
            ("preinst", &s.preinst),
            ("postinst", &s.postinst),
            ("prerm", &s.prerm),
            ("postrm", &s.postrm),
        ] {
            tar_entry(t, &format!("./{name}"), 0o755, mtime, Some(text.as_bytes()))?;
        }
        Ok(())
    })?;
    let data_tar = gz_tar(level, |t| {
        tar_entry(t, "./", 0o755, mtime, None)?;
        for (dir, mode) in directories(pkg) {
            tar_entry(t, &format!(".{dir}/"), mode, mtime, None)?;
        }
        let mut files: Vec<_> = pkg.files.iter().collect();
        files.sort_by(|a, b| a.dest.cmp(&b.dest));
        for f in files {
            tar_entry(t, &format!(".{}", f.dest), f.mode, mtime, Some(&f.data))?;
        }
        Ok(())
    })?;
    let mut out = Vec::with_capacity(control_tar.len() + data_tar.len() + 256);
    out.extend_from_slice(b"!<arch>\n");
    ar_member(&mut out, "debian-binary", mtime, b"2.0\n");
    ar_member(&mut out, "control.tar.gz", mtime, &control_tar);
    ar_member(&mut out, "data.tar.gz", mtime, &data_tar);
    Ok(out)
}

/// One member of a common-format `ar` archive: a 60-byte header, the data,
/// and a newline pad to an even offset.
pub fn ar_member(out: &mut Vec<u8>, name: &str, mtime: u64, data: &[u8]) {
    let header = format!(
        "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
        name,
        mtime,
        0,
        0,
        "100644",
        data.len()
    );
    debug_assert_eq!(header.len(), 60);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(b'\n');
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spec::{DebMeta, DebScripts, DirEntry, FileEntry, RpmMeta, RpmScripts};
    use std::io::Read;

    pub(crate) fn sample() -> Package {
        Package {
            name: "linkmesh-agent".into(),
            version: "1.2.3".into(),
            release: "1".into(),
            summary: "An agent".into(),
            description: "First line.\n\nAfter a gap.".into(),
            maintainer: "M <m@example.com>".into(),
            homepage: "https://example.com".into(),
            license: "Apache-2.0".into(),
            deb: DebMeta {
                section: "admin".into(),
                priority: "optional".into(),
                depends: vec!["libc6 (>= 2.34)".into()],
            },
            rpm: RpmMeta {
                group: "System Environment/Daemons".into(),
                requires: vec!["glibc >= 2.34".into()],
            },
            files: vec![
                FileEntry {
                    dest: "/usr/bin/linkmesh-agent".into(),
                    mode: 0o755,
                    config: false,
                    data: vec![7; 2049],
                },
                FileEntry {
                    dest: "/etc/linkmesh/agent.toml".into(),
                    mode: 0o644,
                    config: true,
                    data: b"# conf\n".to_vec(),
                },
            ],
            dirs: vec![DirEntry {
                dest: "/etc/linkmesh/agent.d".into(),
                mode: 0o750,
            }],
            deb_scripts: DebScripts {
                preinst: "#!/bin/sh\necho preinst\n".into(),
                postinst: "#!/bin/sh\necho postinst\n".into(),
                prerm: "#!/bin/sh\n".into(),
                postrm: "#!/bin/sh\n".into(),
            },
            rpm_scripts: RpmScripts {
                pre: "echo pre\n".into(),
                post: "echo post\n".into(),
                preun: "echo preun\n".into(),
                postun: "echo postun\n".into(),
            },
            source_date: 1_700_000_000,
        }
    }

    #[test]
    fn control_file_follows_deb_control_5() {
        let c = control(&sample(), "amd64");
        // 3 KiB for the binary (2049 bytes), 1 for the config, 5 directories.
        assert_eq!(
            c,
            "Package: linkmesh-agent\nVersion: 1.2.3-1\nArchitecture: amd64\n\
             Maintainer: M <m@example.com>\nInstalled-Size: 9\nDepends: libc6 (>= 2.34)\n\
             Section: admin\nPriority: optional\nHomepage: https://example.com\n\
             Description: An agent\n First line.\n .\n After a gap.\n"
        );
        assert_eq!(
            file_name(&sample(), "amd64"),
            "linkmesh-agent_1.2.3-1_amd64.deb"
        );
    }

    #[test]
    fn conffiles_and_md5sums() {
        let p = sample();
        assert_eq!(conffiles(&p), "/etc/linkmesh/agent.toml\n");
        let sums = md5sums(&p);
        assert!(sums.ends_with("  usr/bin/linkmesh-agent\n"), "{sums}");
        assert_eq!(sums.lines().count(), 1, "conffiles are not in md5sums");
    }

    #[test]
    fn directories_include_every_parent_once() {
        let d = directories(&sample());
        let names: Vec<_> = d.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "/etc",
                "/etc/linkmesh",
                "/etc/linkmesh/agent.d",
                "/usr",
                "/usr/bin"
            ]
        );
        assert_eq!(d["/etc/linkmesh/agent.d"], 0o750);
    }

    /// Reads back an ar archive: (name, data) per member.
    fn ar_members(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
        assert!(b.starts_with(b"!<arch>\n"));
        b = &b[8..];
        let mut out = Vec::new();
        while !b.is_empty() {
            let h = std::str::from_utf8(&b[..60]).unwrap();
            assert_eq!(&h[58..], "`\n");
            let size: usize = h[48..58].trim().parse().unwrap();
            out.push((h[..16].trim().to_owned(), b[60..60 + size].to_vec()));
            b = &b[60 + size + size % 2..];
        }
        out
    }

    #[test]
    fn archive_layout_and_contents() {
        let deb = build(&sample(), "amd64", 1).unwrap();
        let m = ar_members(&deb);
        let names: Vec<_> = m.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["debian-binary", "control.tar.gz", "data.tar.gz"]);
        assert_eq!(m[0].1, b"2.0\n");
        let mut data = tar::Archive::new(flate2::read::GzDecoder::new(&m[2].1[..]));
        let mut seen = Vec::new();
        for e in data.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mode = e.header().mode().unwrap();
            assert_eq!(e.header().uid().unwrap(), 0);
            assert_eq!(e.header().mtime().unwrap(), 1_700_000_000);
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.push((path, mode, body.len()));
        }
        assert!(
            seen.contains(&("./usr/bin/linkmesh-agent".into(), 0o755, 2049)),
            "{seen:?}"
        );
        assert!(
            seen.contains(&("./etc/linkmesh/agent.d/".into(), 0o750, 0)),
            "{seen:?}"
        );
        let mut control = tar::Archive::new(flate2::read::GzDecoder::new(&m[1].1[..]));
        let names: Vec<_> = control
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "./",
                "./control",
                "./conffiles",
                "./md5sums",
                "./preinst",
                "./postinst",
                "./prerm",
                "./postrm"
            ]
        );
    }

    #[test]
    fn builds_are_reproducible() {
        assert_eq!(
            build(&sample(), "amd64", 6).unwrap(),
            build(&sample(), "amd64", 6).unwrap()
        );
    }

    #[test]
    fn ar_pads_odd_members() {
        let mut out = Vec::new();
        ar_member(&mut out, "a", 0, b"xyz");
        assert_eq!(out.len(), 60 + 4);
        assert_eq!(&out[..16], b"a               ");
    }
}
