//! Every file the host reads for a user (pipeline, plugin, calibration text) must be a regular
//! file of bounded size: `/dev/zero`, a FIFO or a directory is refused at once with an error
//! that names the path, instead of a read without end or a hang.

#![cfg(unix)]

use std::path::{Path, PathBuf};

use espalier::calibration::{CalibrationSet, CalibrationSpec};
use espalier::pipeline::Pipeline;
use espalier::plugin::{Runtime, registry};

/// `/dev/zero`, a FIFO with no writer, and a directory, inside `dir`.
fn hostile_paths(dir: &Path) -> Vec<PathBuf> {
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let zero = dir.join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let sub = dir.join("folder");
    std::fs::create_dir(&sub).unwrap();
    vec![PathBuf::from("/dev/zero"), zero, fifo, sub]
}

fn assert_refused(err: &str, path: &Path) {
    assert!(
        err.contains(&path.display().to_string()) && err.contains("not a regular file"),
        "{}: {err}",
        path.display()
    );
}

#[test]
fn pipeline_files_must_be_regular_and_small() {
    let dir = tempfile::tempdir().unwrap();
    for path in hostile_paths(dir.path()) {
        let err = Pipeline::load(&path).unwrap_err().to_string();
        assert_refused(&err, &path);
    }
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(2 << 20)).unwrap();
    let err = Pipeline::load(&big).unwrap_err().to_string();
    assert!(
        err.contains("big.toml") && err.contains("too large"),
        "{err}"
    );
}

#[test]
fn plugin_files_must_be_regular() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new().unwrap();
    for path in hostile_paths(dir.path()) {
        let err = registry::load_file(&runtime, &path)
            .err()
            .expect("refused")
            .to_string();
        assert_refused(&err, &path);
    }
}

#[test]
fn calibration_texts_must_be_regular() {
    let dir = tempfile::tempdir().unwrap();
    let model = espalier_engine::builtin_model("tiny-llama").unwrap();
    for path in hostile_paths(dir.path()) {
        let spec = CalibrationSpec {
            text: path.clone(),
            samples: 1,
            seq_len: 8,
            sequential: false,
        };
        let err = CalibrationSet::load(&spec, &model).unwrap_err().to_string();
        assert_refused(&err, &path);
    }
}
