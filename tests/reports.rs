//! End-to-end: reports and output a newcomer can trust. One evaluation protocol for `eval`,
//! `run` and the report; reports that rerun to the same masks (`run --from`) and refuse a
//! changed plugin or text; `compare` and several pipelines in one run; heads by count with a
//! summary that adds up; tables that fit the terminal width they are given.

use std::path::Path;

#[path = "common/binary.rs"]
mod binary;
use binary::{bin, espalier, repo, text, write};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A pipeline on the built-in model with `[evaluate]` left to the protocol's defaults.
const DEFAULT_EVAL: &str = "name = \"defaults\"\nmodel = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[evaluate]\n";

#[test]
fn eval_run_and_the_report_give_the_same_dense_perplexity_under_one_protocol() {
    let dir = tmp();
    let pipeline = write(dir.path(), "p.toml", DEFAULT_EVAL);
    let out = dir.path().join("out");
    let o = espalier(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    // The table shows the protocol: the shipped text by name and hash, window and stride.
    assert!(
        stdout.contains("data/eval.txt (shipped)") && stdout.contains("window / stride"),
        "{stdout}"
    );
    let report = json(&out.join("report.json"));
    let dense = &report["evaluation"]["dense"];
    // `[evaluate]` without `text` measured perplexity on the default text.
    let from_run = dense["perplexity"]["perplexity"].as_f64().unwrap();

    // `espalier eval` from another folder: the same defaults, the same text (built in).
    let o = espalier(&["eval", "builtin:tiny-llama", "--json"], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let eval: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let from_eval = eval["perplexity"]["perplexity"].as_f64().unwrap();
    assert_eq!(eval["protocol"], dense["protocol"], "protocols differ");
    assert!(
        (from_eval - from_run).abs() <= 1e-9 * from_run,
        "eval {from_eval} vs run {from_run}"
    );
    let protocol = &dense["protocol"];
    assert_eq!(protocol["window"], 256, "capped at the model's positions");
    assert_eq!(protocol["stride"], 256);
    assert_eq!(protocol["max_tokens"], 4096);
    assert_eq!(protocol["prompt_tokens"], 128);
    assert_eq!(protocol["new_tokens"], 64);
    assert_eq!(protocol["text_sha256"].as_str().unwrap().len(), 64);
    // Memory per model: the weights each forward pass holds, and each model's own peak.
    assert!(dense["memory"]["weight_bytes"].as_u64().unwrap() > 0);
    assert!(dense["memory"]["peak_rss_bytes"].as_u64().is_some());
    // Every linear is accounted for, and every dense one says why.
    let kernels = &report["evaluation"]["pruned"]["kernels"];
    let layers: u64 = kernels["layers"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let dense_layers = kernels["layers"]["dense"].as_u64().unwrap_or(0);
    let explained: u64 = kernels["dense_because"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(layers, 15, "{kernels}"); // 14 block linears and the LM head
    assert_eq!(explained, dense_layers, "{kernels}");
}

/// Wanda (calibration) then 2:4, evaluated in bf16 storage, exported; the calibration text is
/// a copy the test can change.
fn reproducible_pipeline(dir: &Path) -> std::path::PathBuf {
    let calib = dir.join("calib.txt");
    std::fs::copy(repo().join("data/calibration.txt"), &calib).unwrap();
    write(
        dir,
        "repro.toml",
        &format!(
            "name = \"repro\"\nmodel = \"builtin:tiny-llama\"\n[calibration]\ntext = {:?}\nsamples = 4\nseq_len = 64\n[[stage]]\nplugin = \"wanda\"\ndensity = 0.6\nprotect = [\"*.layers.0.self_attn.q_proj*\"]\n[[stage]]\nplugin = \"n-m\"\ntargets = [\"*.mlp.*\"]\nn = 2\nm = 4\n[evaluate]\nmax_tokens = 300\nlatency = false\nstorage = \"bf16\"\n[export]\ndir = \"a\"\n",
            calib.display().to_string()
        ),
    )
}

#[test]
fn a_report_reruns_to_the_same_masks_bit_for_bit_and_refuses_a_changed_text() {
    let dir = tmp();
    let pipeline = reproducible_pipeline(dir.path());
    let o = espalier(&["run", pipeline.to_str().unwrap()], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let report_path = dir.path().join("a/report.json");
    let report = json(&report_path);

    // Complete: resolved parameters with defaults, patterns and matches, calibration and its
    // hash, protocol, sandbox, export folder, version and build, plugin hashes.
    let wanda = &report["stages"][0];
    // Wanda's defaults, written out although the pipeline sets none of them.
    assert_eq!(wanda["params"]["m"], 0, "{wanda}");
    assert_eq!(wanda["protect_patterns"][0], "*.layers.0.self_attn.q_proj*");
    assert_eq!(wanda["matched_layers"].as_array().unwrap().len(), 13);
    assert_eq!(report["stages"][1]["params"]["n"], 2);
    assert_eq!(report["stages"][1]["target_patterns"][0], "*.mlp.*");
    assert_eq!(wanda["plugin_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(report["calibration"]["samples"], 4);
    assert_eq!(
        report["calibration"]["text_sha256"].as_str().unwrap().len(),
        64
    );
    assert!(report["sandbox"]["timeout_s"].as_f64().unwrap() > 0.0);
    assert!(report["export_dir"].as_str().unwrap().ends_with('a'));
    assert!(!report["build"].as_str().unwrap().is_empty());
    assert!(report["evaluation"]["pruned"]["protocol"]["text_sha256"].is_string());
    let resolved = report["resolved_pipeline"].as_str().unwrap();
    assert!(resolved.contains("wanda@sha256:"), "{resolved}");

    // `eval` of the export gives the run's pruned column: in the storage the run evaluated it
    // in (read from the report) unless --storage says otherwise.
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "a",
            "--max-tokens",
            "300",
            "--new-tokens",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = espalier(&args, dir.path());
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let evaluated = eval(&[]);
    let pruned = &report["evaluation"]["pruned"];
    assert_eq!(
        evaluated["perplexity"]["perplexity"], pruned["perplexity"]["perplexity"],
        "{evaluated}"
    );
    assert_eq!(evaluated["kernels"], pruned["kernels"], "{evaluated}");
    // `generate` runs it in that storage too.
    let kernels_line = |extra: &[&str]| {
        let mut args = vec!["generate", "a", "--prompt", "hi", "--max-tokens", "3"];
        args.extend_from_slice(extra);
        let o = espalier(&args, dir.path());
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        stderr.lines().next().unwrap_or_default().to_string()
    };
    let line = kernels_line(&[]);
    assert!(
        line.contains("/bf16") && line.contains("KV cache f16"),
        "{line}"
    );
    let line = kernels_line(&["--storage", "f32"]);
    assert!(
        !line.contains("/bf16") && line.contains("KV cache f32"),
        "{line}"
    );
    let in_f32 = eval(&["--storage", "f32"]);
    assert!(
        in_f32["kernels"]["layers"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.ends_with("/bf16")),
        "{in_f32}"
    );

    // `bench decode` times it in that storage too, packed as the run packed it.
    let o = espalier(
        &[
            "bench",
            "decode",
            "a",
            "--new-tokens",
            "2",
            "--prompt-tokens",
            "8",
            "--rounds",
            "1",
            "--json",
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let timed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(timed["pipeline"], "the export's masks", "{timed}");
    assert_eq!(
        (&timed["storage"], &timed["dense_storage"]),
        (&"bf16".into(), &"bf16".into()),
        "{timed}"
    );
    assert_eq!(
        timed["weight_bytes"]["pruned"], pruned["memory"]["weight_bytes"],
        "{timed}"
    );

    // Rerun from the report into another folder: the same masks and weights, bit for bit.
    let o = espalier(
        &["run", "--from", report_path.to_str().unwrap(), "--out", "b"],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    for f in ["masks.safetensors", "model.safetensors"] {
        let a = std::fs::read(dir.path().join("a").join(f)).unwrap();
        let b = std::fs::read(dir.path().join("b").join(f)).unwrap();
        assert!(a == b, "{f} differs between the run and its rerun");
    }
    // Evaluated as the run was: in the same storage, to the same perplexity.
    assert!(resolved.contains("storage = \"bf16\""), "{resolved}");
    let rerun = json(&dir.path().join("b/report.json"));
    let pruned = |r: &serde_json::Value| r["evaluation"]["pruned"].clone();
    assert_eq!(
        pruned(&rerun)["perplexity"]["perplexity"],
        pruned(&report)["perplexity"]["perplexity"]
    );
    let kernels = pruned(&rerun)["kernels"]["layers"].clone();
    assert!(
        kernels
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k == "dense" || k.ends_with("/bf16")),
        "{kernels}"
    );

    // A changed calibration text is refused before anything runs, with both hashes.
    std::fs::write(dir.path().join("calib.txt"), "another text ".repeat(2000)).unwrap();
    let o = espalier(
        &[
            "run",
            "--from",
            report_path.to_str().unwrap(),
            "--no-export",
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("calibration.sha256")
            && stderr.contains(report["calibration"]["text_sha256"].as_str().unwrap()),
        "{stderr}"
    );
}

#[test]
fn a_pinned_plugin_refuses_any_other_build_with_both_hashes() {
    let dir = tmp();
    let pinned = "0".repeat(64);
    let p = write(
        dir.path(),
        "pinned.toml",
        &format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude@sha256:{pinned}\"\ndensity = 0.5\n"
        ),
    );
    let o = espalier(&["run", p.to_str().unwrap(), "--no-export"], dir.path());
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("pinned.toml:3:")
            && stderr.contains(&pinned)
            && stderr.contains("has sha256"),
        "{stderr}"
    );
}

#[test]
fn several_pipelines_share_one_dense_evaluation_and_compare_side_by_side() {
    let dir = tmp();
    let a = write(
        dir.path(),
        "half.toml",
        "name = \"half\"\nmodel = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[evaluate]\nmax_tokens = 300\nlatency = false\nstorage = \"bf16\"\n[export]\ndir = \"out/half\"\n",
    );
    let b = write(
        dir.path(),
        "blocks.toml",
        "name = \"blocks\"\nmodel = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = 0.25\nblock = [16, 16]\n[evaluate]\nmax_tokens = 300\nlatency = false\nstorage = \"bf16\"\n[export]\ndir = \"out/blocks\"\n",
    );
    let o = espalier(
        &["run", a.to_str().unwrap(), b.to_str().unwrap(), "--json"],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let runs: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (first, second) = (&runs[0]["evaluation"], &runs[1]["evaluation"]);
    assert_eq!(first["dense_shared"], false);
    assert_eq!(
        second["dense_shared"], true,
        "the dense model was evaluated twice"
    );
    assert_eq!(first["dense"]["perplexity"], second["dense"]["perplexity"]);

    let o = espalier(
        &["compare", "out/half/report.json", "out/blocks/report.json"],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    for expected in [
        "half",
        "blocks",
        "stage 1 plugin",
        "stage 1 density",
        "perplexity pruned",
        "kept in mlp-up",
    ] {
        assert!(stdout.contains(expected), "{expected} missing:\n{stdout}");
    }
    // The block size is a parameter only one run has: it is listed as a difference.
    assert!(stdout.contains("stage 1 block"), "{stdout}");
}

#[test]
fn heads_by_count_prune_and_the_summary_adds_up() {
    let dir = tmp();
    let p = write(
        dir.path(),
        "heads.toml",
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"heads\"\ntargets = [\"*.self_attn.*\"]\nheads = 2\n[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.5\n",
    );
    let o = espalier(
        &["run", p.to_str().unwrap(), "--no-export", "--json"],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let s = &r["summary"];
    assert_eq!(s["heads"]["heads_after"], 2);
    let layers = r["layers"].as_array().unwrap();
    let changed = layers
        .iter()
        .filter(|l| l["kept"].as_u64() < l["original_numel"].as_u64() || l["structure"].is_string())
        .count() as u64;
    // 2 blocks x (q, o) shrunk (each K/V group keeps one query head, so k and v keep their
    // size), 2 blocks x (gate, up, down) masked.
    assert_eq!(s["shrunk_layers"], 4, "{s}");
    assert_eq!(s["pruned_layers"], 6, "{s}");
    assert_eq!(
        s["pruned_layers"].as_u64().unwrap() + s["shrunk_layers"].as_u64().unwrap(),
        changed
    );
    assert!(
        r["stages"][0]["density_from"]
            .as_str()
            .unwrap()
            .contains("2 per block")
    );

    let o = espalier(&["run", p.to_str().unwrap(), "--no-export"], dir.path());
    let (stdout, _) = text(&o);
    assert!(stdout.contains("10 (6 / 4)"), "{stdout}");

    // More heads than the model has, and a count on a mask plugin: refused at the line.
    for (stage, needle) in [
        (
            "plugin = \"heads\"\ntargets = [\"*.self_attn.*\"]\nheads = 5\n",
            "the model has 4",
        ),
        (
            "plugin = \"magnitude\"\nheads = 2\n",
            "give `density` instead",
        ),
    ] {
        let bad = write(
            dir.path(),
            "bad.toml",
            &format!("model = \"builtin:tiny-llama\"\n[[stage]]\n{stage}"),
        );
        let o = espalier(&["run", bad.to_str().unwrap(), "--no-export"], dir.path());
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("bad.toml:") && stderr.contains(needle),
            "{stderr}"
        );
    }
}

/// Lines of table output (box-drawing borders) wider than `columns`.
fn too_wide(stdout: &str, columns: usize) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.contains(['│', '┆', '╞', '├', '┌', '└']))
        .filter(|l| l.chars().count() > columns)
        .map(str::to_string)
        .collect()
}

#[test]
fn every_table_fits_the_terminal_width_it_is_given() {
    let dir = tmp();
    let p = write(
        dir.path(),
        "p.toml",
        "name = \"widths\"\nmodel = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = 0.25\nblock = [16, 16]\n[evaluate]\nmax_tokens = 300\n[export]\ndir = \"out/w\"\n",
    );
    let q = write(
        dir.path(),
        "q.toml",
        "name = \"widths-2\"\nmodel = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[evaluate]\nmax_tokens = 300\n[export]\ndir = \"out/w2\"\n",
    );
    let block80 = repo().join("pipelines/block80.toml").display().to_string();
    let runs: &[&[&str]] = &[
        &["run", p.to_str().unwrap(), "--layers"],
        &["run", q.to_str().unwrap(), "--no-export"],
        &[
            "eval",
            "builtin:tiny-llama",
            "--max-tokens",
            "300",
            "--new-tokens",
            "4",
        ],
        &["plugins", "list"],
        &["plugins", "inspect", "sensitivity"],
        &["model", "layers", "builtin:tiny-llama"],
        &["bench", "kernels", "--quick"],
        &["compare", "out/w/report.json", "out/w2/report.json"],
        &[
            "bench",
            "plugins",
            "--model",
            "builtin:tiny-llama",
            "--repeat",
            "1",
        ],
        &[
            "bench",
            "decode",
            "builtin:tiny-llama",
            "--pipeline",
            &block80,
            "--new-tokens",
            "4",
            "--prompt-tokens",
            "8",
        ],
    ];
    let o = espalier(&["run", q.to_str().unwrap()], dir.path());
    assert!(o.status.success(), "{}", text(&o).1);
    for columns in [80usize, 100, 160] {
        for args in runs {
            let o = bin()
                .args(*args)
                .env("COLUMNS", columns.to_string())
                .current_dir(dir.path())
                .output()
                .unwrap();
            let (stdout, stderr) = text(&o);
            assert!(o.status.success(), "{args:?}: {stderr}");
            assert!(stdout.contains('│'), "{args:?} printed no table:\n{stdout}");
            let wide = too_wide(&stdout, columns);
            assert!(
                wide.is_empty(),
                "{args:?} at COLUMNS={columns}: {} lines too wide, e.g.\n{}",
                wide.len(),
                wide[0]
            );
        }
    }
}
