//! Every input that once crashed a fuzz target, replayed through the same harness in the
//! normal test run, plus the seed corpus of each target.
//!
//! A crash found by `cargo fuzz run <target>` (in `fuzz/artifacts/<target>/`) is added by
//! copying it to `tests/fuzz-regressions/<target>/<what-it-was>`.

use std::path::Path;

use lepus::fuzzing::TARGETS;

/// Rust's default stack for spawned threads: lepus decodes on its 8 MiB I/O thread, but
/// the handshake (the server's properties table) runs on the caller's thread, which may
/// be any spawned thread. Debug builds need the most stack: this is the worst case.
const STACK: usize = 2 * 1024 * 1024;

/// Replay every file under `dir/<target>/`; returns how many, panics naming every input
/// that fails.
fn replay_dir(dir: &Path) -> usize {
    let mut n = 0;
    let mut failed = Vec::new();
    for (target, harness) in TARGETS {
        let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for path in files {
            let data = std::fs::read(&path).unwrap();
            let name = path.display().to_string();
            let harness = *harness;
            let r = std::thread::Builder::new()
                .name(name.clone())
                .stack_size(STACK)
                .spawn(move || harness(&data))
                .unwrap()
                .join();
            if r.is_err() {
                failed.push(name);
            }
            n += 1;
        }
    }
    assert!(failed.is_empty(), "failing inputs: {failed:#?}");
    n
}

#[test]
fn crashes_found_by_fuzzing_stay_fixed() {
    let n = replay_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions"));
    assert!(n > 0, "no regression inputs found");
}

#[test]
fn seed_corpus_passes_every_harness() {
    let n = replay_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"));
    assert!(n >= 5, "seed corpus missing");
}
