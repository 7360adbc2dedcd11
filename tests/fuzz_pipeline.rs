//! Replays the committed inputs of the `pipeline_parse` fuzz target
//! (`fuzz/regressions/pipeline_parse/`) through the driver the fuzzer runs, so every crash it
//! once found stays fixed without a nightly toolchain.
//!
//! File names say what is expected: `valid-*` must parse, `crash-*`, `oom-*`, `timeout-*` and
//! `invalid-*` must be refused with an error; anything else (coverage inputs) must merely not
//! panic. Every input must finish within a few seconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../fuzz/harness/pipeline_parse.rs"]
mod pipeline_parse;

#[test]
fn pipeline_parse_regressions_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The `valid-*` inputs are the example pipelines, whose text files are named relative to
    // the repository root (where the README runs them). This binary holds this one test, so
    // changing its working directory affects nothing else.
    std::env::set_current_dir(&root).unwrap();
    let dir = root.join("fuzz/regressions/pipeline_parse");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no pipeline_parse inputs");
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        let started = Instant::now();
        let result = pipeline_parse::run(&bytes);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name} took {:?}",
            started.elapsed()
        );
        let must_fail = ["crash-", "oom-", "timeout-", "invalid-"]
            .iter()
            .any(|p| name.starts_with(p));
        if name.starts_with("valid-") {
            assert!(result.is_ok(), "{name}: {result:?}");
        } else if must_fail {
            assert!(result.is_err(), "{name} was accepted");
        }
    }
}
