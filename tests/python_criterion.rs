//! A criterion written in Python (plugins/examples/wanda-py, built with componentize-py against
//! the 0.4 WIT) runs unchanged in Espalier's sandbox and gives exactly the masks of the built-in
//! Rust `wanda` it reimplements: per-row unstructured, N:M and blocks, on the same calibration.
//!
//! Needs `componentize-py` (from PyPI): `$ESPALIER_COMPONENTIZE_PY`, else on `PATH`. Without it
//! the test says so and skips, unless `ESPALIER_REQUIRE_COMPONENTIZE_PY=1` (set by `.ci/run`,
//! which installs it), where it fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[path = "common/binary.rs"]
mod binary;
use binary::{bin, repo, text, write};

/// The componentize-py to build with, or why there is none.
fn componentize_py() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ESPALIER_COMPONENTIZE_PY") {
        return Ok(PathBuf::from(p));
    }
    let found = Command::new("componentize-py").arg("--version").output();
    match found {
        Ok(o) if o.status.success() => Ok(PathBuf::from("componentize-py")),
        _ => Err(
            "componentize-py is not on PATH and ESPALIER_COMPONENTIZE_PY is not set \
                  (install it with `pip install -r plugins/examples/wanda-py/requirements.txt`)"
                .into(),
        ),
    }
}

/// Builds the Python plugin into `out` exactly as the README says, from the repository root.
fn build_python_plugin(tool: &Path, out: &Path) {
    let started = Instant::now();
    let o = Command::new(tool)
        .args([
            "-d",
            "wit/since_v0.4.0",
            "-w",
            "criterion",
            "componentize",
            "app",
        ])
        .args(["-p", "plugins/examples/wanda-py", "-o"])
        .arg(out)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(repo())
        .output()
        .expect("run componentize-py");
    let (stdout, stderr) = text(&o);
    assert!(
        o.status.success(),
        "componentize-py failed:\n{stdout}\n{stderr}"
    );
    eprintln!(
        "built {} ({} bytes) in {:.1?}",
        out.display(),
        std::fs::metadata(out).unwrap().len(),
        started.elapsed()
    );
}

/// A pipeline over the tiny LLaMA with the same three selections, run by `plugin`.
fn pipeline(plugin: &str, export: &str) -> String {
    format!(
        "name = \"wanda-{export}\"\nmodel = \"builtin:tiny-llama\"\n\
         [calibration]\ntext = \"calib.txt\"\nsamples = 4\nseq_len = 32\n\
         [[stage]]\nname = \"rows\"\nplugin = \"{plugin}\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.4\n\
         [[stage]]\nname = \"two-of-four\"\nplugin = \"{plugin}\"\ntargets = [\"*.q_proj.*\", \"*.k_proj.*\"]\nn = 2\nm = 4\n\
         [[stage]]\nname = \"blocks\"\nplugin = \"{plugin}\"\ntargets = [\"*.v_proj.*\", \"*.o_proj.*\"]\ndensity = 0.5\nblock = [4, 4]\n\
         [export]\ndir = \"out/{export}\"\n"
    )
}

#[test]
fn a_python_wanda_gives_the_masks_of_the_rust_wanda() {
    let tool = match componentize_py() {
        Ok(t) => t,
        Err(why)
            if std::env::var_os("ESPALIER_REQUIRE_COMPONENTIZE_PY").is_some_and(|v| v == "1") =>
        {
            panic!("ESPALIER_REQUIRE_COMPONENTIZE_PY=1 but {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("espalier-python-")
        .tempdir()
        .unwrap();
    let wasm = dir.path().join("wanda-py.wasm");
    build_python_plugin(&tool, &wasm);
    let words = ["prune", "the", "model", "with", "care", "and", "measure"];
    let calibration: Vec<&str> = (0..600).map(|i| words[(i * 5 + i / 7) % 7]).collect();
    write(dir.path(), "calib.txt", &calibration.join(" "));
    write(dir.path(), "rust.toml", &pipeline("wanda", "rust"));
    write(
        dir.path(),
        "python.toml",
        &pipeline(wasm.to_str().unwrap(), "python"),
    );

    for p in ["rust.toml", "python.toml"] {
        let o = bin()
            .args(["run", p])
            .env("ESPALIER_CACHE", dir.path().join("cache"))
            .current_dir(dir.path())
            .output()
            .expect("run espalier");
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{p}\n{stdout}\n{stderr}");
    }
    let masks =
        |run: &str| std::fs::read(dir.path().join(format!("out/{run}/masks.safetensors"))).unwrap();
    assert!(
        masks("rust") == masks("python"),
        "the Python wanda's masks differ from the Rust wanda's"
    );
    // The report pins the Python component by its hash and shows it ran in the sandbox like
    // any other plugin.
    let report = std::fs::read_to_string(dir.path().join("out/python/report.json")).unwrap();
    let sha = espalier::plugin::runtime::sha256_hex(&std::fs::read(&wasm).unwrap());
    assert!(
        report.contains(&sha),
        "report.json does not pin the plugin's sha256"
    );
    assert!(
        report.contains("wanda-py"),
        "report.json does not name wanda-py"
    );
}
