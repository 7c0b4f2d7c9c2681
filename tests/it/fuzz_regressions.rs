//! Replays fuzz inputs through the fuzz targets' own checks (`fuzz/src/checks.rs`, compiled
//! in here): the minimised crashes in `tests/data/fuzz/<target>/` (each once a panic, a
//! wrong error or a broken invariant, now fixed) and the committed seed corpora in
//! `fuzz/corpus/<target>/`, so the normal test suite keeps both passing without libFuzzer.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use crate::util::repo;

/// Runs every file of `dir/<target>/` whose name starts with `prefix` through that target's
/// check; returns how many ran.
fn replay(dir: &str, prefix: &str) -> usize {
    let mut ran = 0;
    for (target, check) in checks::TARGETS {
        let Ok(entries) = std::fs::read_dir(repo().join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .collect();
        paths.sort();
        for path in paths {
            let bytes = std::fs::read(&path).unwrap();
            // Name the input if its check panics.
            eprintln!("replaying {}", path.display());
            check(&bytes);
            ran += 1;
        }
    }
    ran
}

#[test]
fn minimised_fuzz_crashes_stay_fixed() {
    replay("tests/data/fuzz", "");
}

#[test]
fn seed_corpora_pass_every_target_check() {
    // One folder per target, none empty: a target without seeds would start from nothing.
    for (target, _) in checks::TARGETS {
        let dir = repo().join("fuzz/corpus").join(target);
        let seeds = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert!(seeds > 0, "no seeds in {}", dir.display());
    }
    // Only the committed `seed_*` files: a local run may have grown the folder.
    assert!(replay("fuzz/corpus", "seed_") >= checks::TARGETS.len());
}
