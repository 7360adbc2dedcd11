//! Builds the plugin workspace (`plugins/`) to `wasm32-wasip2` components and embeds the
//! built-in criteria in the binary, so an installed `espalier` needs no extra files.
//!
//! The nested cargo uses its own target directory (`target/wasm-plugins`) so it never waits on
//! the lock of the build that runs this script, and is shared by every host profile.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Built-in criteria: (name shown to users, crate's artifact stem).
const BUILTINS: &[(&str, &str)] = &[
    ("magnitude", "espalier_criterion_magnitude"),
    ("block", "espalier_criterion_block"),
    ("n-m", "espalier_criterion_n_m"),
    ("heads", "espalier_criterion_heads"),
    ("wanda", "espalier_criterion_wanda"),
    ("taylor", "espalier_criterion_taylor"),
    ("sensitivity", "espalier_criterion_sensitivity"),
    ("sparsegpt", "espalier_criterion_sparsegpt"),
    ("reconstruct", "espalier_criterion_reconstruct"),
    ("rigl", "espalier_criterion_rigl"),
    ("set", "espalier_criterion_set"),
];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("host/ sits in the workspace root")
        .to_path_buf();
    let plugins = root.join("plugins");
    println!("cargo:rerun-if-changed={}", plugins.display());
    println!("cargo:rerun-if-changed={}", root.join("wit").display());

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-plugins");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    ensure_wasm_target();
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // Flags and wrappers meant for the host build (clippy, coverage, sanitizers) must not leak
    // into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the plugin workspace");
    if !status.success() {
        panic!(
            "building the plugins (cargo build --target wasm32-wasip2 in {}) failed; \
             is the wasm32-wasip2 target installed? (`rustup target add wasm32-wasip2`)",
            plugins.display()
        );
    }
    let wasm_dir = target_dir.join("wasm32-wasip2").join("release");

    let mut code =
        String::from("/// Built-in criteria compiled from `plugins/`: (name, component bytes).\n");
    code.push_str("pub static BUILTIN_PLUGINS: &[(&str, &[u8])] = &[\n");
    for (name, stem) in BUILTINS {
        let path = wasm_dir.join(format!("{stem}.wasm"));
        assert!(
            path.is_file(),
            "plugin build did not produce {}",
            path.display()
        );
        writeln!(
            code,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("write to String");
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo")).join("builtin_plugins.rs");
    std::fs::write(&out, code).expect("write builtin_plugins.rs");
    // Tests load the hostile test plugins from here.
    println!(
        "cargo:rustc-env=ESPALIER_PLUGIN_WASM_DIR={}",
        display(&wasm_dir)
    );
}

/// rustup installs the targets listed in rust-toolchain.toml only when it installs the
/// toolchain itself; on a machine that already had the toolchain the wasm target is missing.
/// Install it here so `cargo build` on a fresh clone needs no extra step.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = sysroot
        .as_ref()
        .is_some_and(|s| s.join("lib/rustlib/wasm32-wasip2").is_dir());
    if installed {
        return;
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", "wasm32-wasip2"]);
    if let Ok(toolchain) = env::var("RUSTUP_TOOLCHAIN") {
        cmd.args(["--toolchain", &toolchain]);
    }
    match cmd.status() {
        Ok(s) if s.success() => {
            println!(
                "cargo:warning=installed the wasm32-wasip2 target with rustup (needed to build the built-in plugins)"
            );
        }
        _ => println!(
            "cargo:warning=the wasm32-wasip2 target is missing and `rustup target add wasm32-wasip2` failed; the plugin build will fail"
        ),
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
