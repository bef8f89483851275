//! Every input the fuzzers keep (the seeds in `fuzz/corpus` and the inputs
//! of past findings in `fuzz/regressions`) replayed through the same target
//! bodies on every test run, without the fuzzing build (scripts/fuzz).

use std::path::Path;

#[test]
fn kept_fuzz_inputs_pass_every_target() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (name, target) in linkmesh_fleet::fuzzing::TARGETS {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(name);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let path = entry?.path();
                let data = std::fs::read(&path)?;
                let outcome = std::panic::catch_unwind(|| target(&data));
                assert!(outcome.is_ok(), "{} fails {name}", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= 15, "only {replayed} kept inputs found");
    Ok(())
}

/// `fuzz/` is its own workspace with its own lock file (scripts/fuzz builds
/// it `--locked`): a package both locks hold must be at a version the main
/// lock pins, or the fuzzing pass would fail (or fuzz other code) after a
/// dependency change.
#[test]
fn the_fuzz_lock_file_follows_the_main_one() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let packages = |text: &str| -> std::collections::BTreeSet<(String, String)> {
        let mut out = std::collections::BTreeSet::new();
        let mut name = None;
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("name = ") {
                name = Some(n.trim_matches('"').to_owned());
            } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take()) {
                out.insert((n, v.trim_matches('"').to_owned()));
            }
        }
        out
    };
    let main = packages(&std::fs::read_to_string(root.join("Cargo.lock"))?);
    let fuzz = packages(&std::fs::read_to_string(root.join("fuzz/Cargo.lock"))?);
    // The fuzz workspace needs only part of the main one, plus libFuzzer's
    // own crates; what both have must be the same versions.
    let missing: Vec<_> = fuzz
        .iter()
        .filter(|p| !main.contains(p) && main.iter().any(|(n, _)| *n == p.0))
        .collect();
    assert!(
        missing.is_empty(),
        "fuzz/Cargo.lock pins other versions than Cargo.lock for {missing:?}: run `cp Cargo.lock fuzz/ && cargo metadata --manifest-path fuzz/Cargo.toml >/dev/null` and commit fuzz/Cargo.lock"
    );
    Ok(())
}
