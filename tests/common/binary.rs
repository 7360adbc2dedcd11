//! Helpers for the tests that drive the `espalier` binary (`cli.rs`, `hardening_cli.rs`):
//! a command with a clean environment, its output as text, files written for it.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary, with no plugin folder, log filter or colours inherited from the caller.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_espalier"));
    c.env_remove("ESPALIER_PLUGIN_DIR")
        .env_remove("ESPALIER_LOG")
        // Tables fit $COLUMNS: a test sets it where it checks widths, nowhere else.
        .env_remove("COLUMNS")
        .env("NO_COLOR", "1");
    c
}

/// Runs the binary with `args` in `cwd` and waits for it.
pub fn espalier(args: &[&str], cwd: &Path) -> Output {
    bin()
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run espalier")
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A test plugin built by `host/build.rs`.
pub fn wasm(stem: &str) -> PathBuf {
    PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join(format!("espalier_test_{stem}.wasm"))
}

/// (stdout, stderr), lossily decoded.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Writes `body` to `dir/name`.
pub fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}
