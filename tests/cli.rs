//! End-to-end: the `espalier` binary as a user runs it, on pipelines in `pipelines/` and on
//! broken inputs, checking exit codes, messages and what lands on disk.

use std::path::{Path, PathBuf};

#[path = "common/binary.rs"]
mod binary;
use binary::{espalier, repo, text, write};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The README's main pipeline fetches SmolLM2, which tests cannot: run the same file on a
/// built-in model instead, so a change that breaks it fails here.
#[test]
fn the_readme_quickstart_pipeline_is_valid_without_the_real_model() {
    let pipeline = repo().join("pipelines/quickstart.toml");
    let o = espalier(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--model",
            "builtin:tiny-llama",
            "--no-export",
        ],
        &repo(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("wanda") && stdout.contains("perplexity") && stdout.contains("peak RSS"),
        "{stdout}"
    );
}

#[test]
fn tiny_pipeline_runs_prints_the_table_and_exports() {
    let dir = tmp();
    let out = dir.path().join("q");
    let pipeline = repo().join("pipelines/tiny.toml");
    let o = espalier(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &repo(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("magnitude") && stdout.contains("50.00%"),
        "{stdout}"
    );
    assert!(
        stdout.contains("perplexity") && stdout.contains("ms / token"),
        "{stdout}"
    );
    for f in [
        "model.safetensors",
        "config.json",
        "masks.safetensors",
        "report.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["stages"][0]["plugin"], "magnitude");
    assert_eq!(
        report["stages"][0]["plugin_sha256"].as_str().unwrap().len(),
        64
    );
    assert!((report["summary"]["block_linear_density"].as_f64().unwrap() - 0.5).abs() < 1e-9);
    // The exported directory loads again as a model, with zeros in place.
    let model = espalier_engine::load_model(out.to_str().unwrap()).unwrap();
    let w = model.weight("model.layers.0.mlp.up_proj.weight").unwrap();
    let zeros = w
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .filter(|x| **x == 0.0)
        .count();
    assert_eq!(zeros, w.elem_count() / 2);
    // `espalier eval` of the export runs it on the kernels the run's pruned evaluation planned
    // (same perplexity to the last digit, same kernels, same bytes); `--dense` on the dense ones.
    let eval = |extra: &[&str]| -> serde_json::Value {
        let args = [
            &[
                "eval",
                out.to_str().unwrap(),
                "--window",
                "128",
                "--max-tokens",
                "4096",
                "--prompt-tokens",
                "32",
                "--new-tokens",
                "2",
                "--json",
            ][..],
            extra,
        ]
        .concat();
        let o = espalier(&args, &repo());
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{stdout}\n{stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let pruned = &report["evaluation"]["pruned"];
    let again = eval(&[]);
    assert_eq!(
        again["perplexity"]["perplexity"], pruned["perplexity"]["perplexity"],
        "{again}"
    );
    assert_eq!(again["kernels"], pruned["kernels"], "{again}");
    assert_eq!(
        again["memory"]["weight_bytes"], pruned["memory"]["weight_bytes"],
        "{again}"
    );
    let dense = eval(&["--dense"]);
    let layers = dense["kernels"]["layers"].as_object().unwrap();
    assert_eq!(layers.keys().collect::<Vec<_>>(), ["dense"], "{dense}");
    assert!(
        dense["memory"]["weight_bytes"].as_u64() > again["memory"]["weight_bytes"].as_u64(),
        "{dense}"
    );
    // No temporary directories are left next to the output.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn every_example_pipeline_runs() {
    for p in ["block80.toml", "2-4.toml", "heads.toml", "wanda.toml"] {
        let dir = tmp();
        let out = dir.path().join("o");
        let pipeline = repo().join("pipelines").join(p);
        let o = espalier(
            &[
                "run",
                pipeline.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &repo(),
        );
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{p}: {stdout}\n{stderr}");
        assert!(out.join("report.json").is_file());
    }
}

#[test]
fn heads_export_has_smaller_matrices_and_a_consistent_config() {
    let dir = tmp();
    let out = dir.path().join("h");
    let pipeline = repo().join("pipelines/heads.toml");
    let o = espalier(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &repo(),
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_attention_heads"], 2);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["head_dim"], 16);
    let model = espalier_engine::load_model(out.to_str().unwrap()).unwrap();
    assert_eq!(
        model
            .weight("model.layers.1.self_attn.q_proj.weight")
            .unwrap()
            .dims(),
        &[32, 64]
    );
    assert_eq!(
        model
            .weight("model.layers.1.self_attn.o_proj.weight")
            .unwrap()
            .dims(),
        &[64, 32]
    );
}

#[test]
fn pipeline_mistakes_name_file_line_and_field() {
    let dir = tmp();
    let cases = [
        (
            "unknown-plugin.toml",
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitud\"\ndensity = 0.5\n",
            ":3:",
            "did you mean `magnitude`",
        ),
        (
            "bad-param.toml",
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = 0.5\nblock = \"16x16\"\n",
            ":5:",
            "expected a list of integers",
        ),
        (
            "unknown-param.toml",
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = 0.5\nblok = [16, 16]\n",
            ":5:",
            "unknown key `blok` in [[stage]] `block`: did you mean `block`?",
        ),
        (
            "density.toml",
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = -0.1\n",
            ":4:",
            "outside [0, 1]",
        ),
        (
            "targets.toml",
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*.conv.*\"]\ndensity = 0.5\n",
            ":4:",
            "matches no layer",
        ),
        (
            "unknown-field.toml",
            "model = \"builtin:tiny-llama\"\nexprot = 1\n",
            ":2:",
            "unknown field",
        ),
        (
            "model.toml",
            "model = \"no/such/dir\"\n",
            ":1:",
            "no/such/dir",
        ),
    ];
    for (file, body, line, message) in cases {
        let p = write(dir.path(), file, body);
        let out = dir.path().join("out");
        let o = espalier(
            &["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()],
            dir.path(),
        );
        let (_, stderr) = text(&o);
        assert!(!o.status.success(), "{file} should fail");
        assert!(
            stderr.contains(&format!("{file}{line}")),
            "{file}: {stderr}"
        );
        assert!(stderr.contains(message), "{file}: {stderr}");
        assert!(!out.exists(), "{file}: nothing may be written");
    }
}

#[test]
fn a_failing_plugin_writes_nothing_and_keeps_the_previous_output() {
    let dir = tmp();
    let out = dir.path().join("out");
    // A previous export of Espalier's own (a foreign folder is refused at planning).
    let good = write(
        dir.path(),
        "good.toml",
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[export]\ndir = \"out\"\n",
    );
    assert!(
        espalier(&["run", good.to_str().unwrap()], dir.path())
            .status
            .success()
    );
    let previous = std::fs::read_to_string(out.join("report.json")).unwrap();
    let trap = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_hostile_trap.wasm");
    let p = write(
        dir.path(),
        "trap.toml",
        &format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n[export]\ndir = \"out\"\n",
            trap.display().to_string()
        ),
    );
    let o = espalier(&["run", p.to_str().unwrap()], dir.path());
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("crashed"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("report.json")).unwrap(),
        previous
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        3,
        "no temporary directory left (good.toml, trap.toml, out)"
    );
}

#[test]
fn model_layers_shows_attention_geometry_and_json() {
    let dir = tmp();
    let o = espalier(&["model", "layers", "builtin:tiny-llama"], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.lines().next().unwrap().contains("attention heads"),
        "{stdout}"
    );
    let o = espalier(
        &["model", "layers", "builtin:tiny-llama", "--json"],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (heads, kv, size) = (
        v["heads"].as_u64().unwrap(),
        v["kv_heads"].as_u64().unwrap(),
        v["head_size"].as_u64().unwrap(),
    );
    assert!(heads >= kv && kv >= 1 && size >= 1, "{v:#}");
    assert_eq!(heads * size, v["hidden_size"].as_u64().unwrap());
    assert!(
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["role"] == "attn-q"),
        "{v:#}"
    );
    // Unknown fetch: names are refused with the known ones listed.
    let o = espalier(&["model", "layers", "fetch:nothing"], dir.path());
    let (_, stderr) = text(&o);
    assert!(
        !o.status.success() && stderr.contains("smollm2-135m-instruct"),
        "{stderr}"
    );
}

#[test]
fn plugins_list_and_inspect() {
    let dir = tmp();
    let o = espalier(&["plugins", "list"], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    for name in ["magnitude", "block", "n-m", "heads"] {
        assert!(stdout.contains(name), "{stdout}");
    }
    let o = espalier(&["plugins", "inspect", "block", "--json"], dir.path());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["name"], "block");
    assert_eq!(v["params"][0]["name"], "block");
    // Defaults are typed JSON values.
    assert_eq!(v["params"][0]["default"], serde_json::json!([16, 16]));
    assert_eq!(v["params"][0]["type"], "[int]");
    // A .wasm file dropped in a plugin folder is registered under its described name.
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let src = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_hostile_density.wasm");
    std::fs::copy(&src, plugins.join("mine.wasm")).unwrap();
    let o = espalier(
        &["plugins", "list", "--plugin-dir", plugins.to_str().unwrap()],
        dir.path(),
    );
    assert!(text(&o).0.contains("hostile-density"));
}

#[test]
fn malformed_wasm_is_refused_clearly() {
    let dir = tmp();
    let garbage = write(dir.path(), "garbage.wasm", "definitely not wasm");
    let o = espalier(
        &["plugins", "inspect", garbage.to_str().unwrap()],
        dir.path(),
    );
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("not WebAssembly"), "{stderr}");
    // A truncated component: right header, broken body.
    let src = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_hostile_trap.wasm");
    let bytes = std::fs::read(src).unwrap();
    let cut = dir.path().join("cut.wasm");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = espalier(&["plugins", "inspect", cut.to_str().unwrap()], dir.path());
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(stderr.contains("cannot compile the component"), "{stderr}");
    // A core module (not a component) gets a hint about the target.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let o = espalier(&["plugins", "inspect", core.to_str().unwrap()], dir.path());
    assert!(text(&o).1.contains("wasm32-wasip2"), "{:?}", text(&o));
}

#[test]
fn corrupt_or_mismatched_models_are_refused_clearly() {
    let dir = tmp();
    let good = dir.path().join("good");
    let pipeline = repo().join("pipelines/tiny.toml");
    let o = espalier(
        &[
            "run",
            pipeline.to_str().unwrap(),
            "--out",
            good.to_str().unwrap(),
        ],
        &repo(),
    );
    assert!(o.status.success());
    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };
    let truncated = copy("truncated");
    let bytes = std::fs::read(truncated.join("model.safetensors")).unwrap();
    std::fs::write(truncated.join("model.safetensors"), &bytes[..1000]).unwrap();
    let mismatched = copy("mismatched");
    let config = std::fs::read_to_string(mismatched.join("config.json")).unwrap();
    std::fs::write(
        mismatched.join("config.json"),
        config.replace("\"hidden_size\": 64", "\"hidden_size\": 96"),
    )
    .unwrap();
    let no_config = copy("no-config");
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    for (d, expected) in [
        (&truncated, "not a valid safetensors file"),
        (&mismatched, "config.json implies"),
        (&no_config, "missing config.json"),
    ] {
        let o = espalier(
            &[
                "run",
                pipeline.to_str().unwrap(),
                "--model",
                d.to_str().unwrap(),
                "--no-export",
            ],
            &repo(),
        );
        let (_, stderr) = text(&o);
        assert!(!o.status.success());
        assert!(
            stderr.contains(expected) && stderr.contains(d.to_str().unwrap()),
            "{stderr}"
        );
    }
}

#[test]
fn eval_and_benchmarks_run_on_a_builtin_model() {
    let dir = tmp();
    let o = espalier(
        &[
            "eval",
            "builtin:tiny-llama",
            "--window",
            "128",
            "--max-tokens",
            "600",
            "--new-tokens",
            "4",
            "--json",
        ],
        &repo(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["perplexity"]["perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(v["latency"]["new_tokens"], 4);

    let o = espalier(
        &[
            "bench",
            "decode",
            "builtin:tiny-llama",
            "--pipeline",
            "pipelines/block80.toml",
            "--new-tokens",
            "4",
            "--prompt-tokens",
            "8",
            "--rounds",
            "2",
            "--json",
        ],
        &repo(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["pruned_formats"]["bsr16x16/f32"], 14, "{v}");
    // Both in f32, decoded twice each in turn.
    assert_eq!(
        (&v["dense_storage"], &v["storage"]),
        (&"f32".into(), &"f32".into())
    );
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(
        v["weight_bytes"]["pruned"].as_u64().unwrap()
            < v["weight_bytes"]["dense"].as_u64().unwrap()
    );

    let o = espalier(&["bench", "kernels", "--quick", "--json"], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).is_ok());

    // Bad input: a text shorter than one window, a missing GGUF.
    let short = write(dir.path(), "short.txt", "too short");
    let o = espalier(
        &[
            "eval",
            "builtin:tiny-llama",
            "--text",
            short.to_str().unwrap(),
            "--window",
            "128",
        ],
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("shorter than one evaluation window"),
        "{:?}",
        text(&o)
    );
    let out = dir.path().join("imported");
    let o = espalier(
        &["import", "missing.gguf", out.to_str().unwrap()],
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("missing.gguf"), "{:?}", text(&o));
    assert!(!out.exists());
}

/// `[export] format = "packed"` writes each linear as packed; `eval` and `generate` run the
/// folder on its kernels (what the run evaluated), a damaged file is refused naming it, and a
/// packed folder cannot be pruned again.
/// `bench serve` runs the daemon on loopback and compares each export with the dense model in
/// the storage the daemon serves the export in (its run's), so the ratio is the pruning's alone.
#[test]
fn bench_serve_compares_each_export_with_the_dense_model_in_its_storage() {
    let dir = tmp();
    let model = repo().join("engine/tests/fixtures/llama");
    for (name, storage) in [("half-bf16", "bf16"), ("half-f32", "f32")] {
        let pipeline = write(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "model = \"{}\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n\
                 [evaluate]\nwindow = 128\nmax_tokens = 300\nstorage = \"{storage}\"\n\
                 latency = false\n[export]\ndir = \"{name}\"\n",
                model.display()
            ),
        );
        let o = espalier(&["run", pipeline.to_str().unwrap()], dir.path());
        assert!(o.status.success(), "{:?}", text(&o));
    }
    let o = espalier(
        &[
            "bench",
            "serve",
            model.to_str().unwrap(),
            "--pruned",
            "half-bf16",
            "--pruned",
            "half-f32",
            "--streams",
            "1,2",
            "--max-tokens",
            "4",
            "--seconds",
            "300",
            "--json",
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rounds = v["rounds"].as_array().unwrap();
    let seen: Vec<(&str, u64, &str)> = rounds
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap(),
                r["streams"].as_u64().unwrap(),
                r["baseline"].as_str().unwrap(),
            )
        })
        .collect();
    // The dense model once more in bf16 (before the export compared with it), not in f32.
    assert_eq!(
        seen,
        [
            ("dense", 1, "dense"),
            ("dense", 2, "dense"),
            ("dense-bf16", 1, "dense-bf16"),
            ("dense-bf16", 2, "dense-bf16"),
            ("half-bf16", 1, "dense-bf16"),
            ("half-bf16", 2, "dense-bf16"),
            ("half-f32", 1, "dense"),
            ("half-f32", 2, "dense"),
        ],
        "{v:#}"
    );
    for r in rounds {
        let vs = r["vs_dense"].as_f64().unwrap_or(-1.0);
        assert!(vs > 0.0, "{r}");
        if r["model"] == r["baseline"] {
            assert_eq!(vs, 1.0, "{r}");
        }
        assert!(r["tokens"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(v["skipped"].as_array().unwrap().is_empty(), "{v:#}");
}

#[test]
fn a_packed_export_runs_as_evaluated_and_refuses_damage() {
    let dir = tmp();
    let out = dir.path().join("packed");
    let pipeline = write(
        dir.path(),
        "packed.toml",
        &format!(
            "model = \"{}\"\n[[stage]]\nplugin = \"n-m\"\nn = 2\nm = 4\n\
             [evaluate]\nwindow = 128\nmax_tokens = 600\nstorage = \"bf16\"\n\
             latency = {{ prompt_tokens = 8, new_tokens = 4 }}\n\
             [export]\ndir = \"{}\"\nformat = \"packed\"\n",
            // A Hugging Face folder with a tokenizer.json, which `eval` of the export needs.
            repo().join("engine/tests/fixtures/llama").display(),
            out.display()
        ),
    );
    let o = espalier(&["run", pipeline.to_str().unwrap(), "--json"], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    let run: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(out.join("packed.safetensors").is_file());
    let resolved = run["resolved_pipeline"].as_str().unwrap();
    assert!(
        resolved.contains("format = \"packed\"") && resolved.contains("storage = \"bf16\""),
        "{resolved}"
    );
    // The folder evaluates to exactly the run's pruned perplexity (same kernels, same storage).
    let o = espalier(
        &[
            "eval",
            out.to_str().unwrap(),
            "--window",
            "128",
            "--max-tokens",
            "600",
            "--new-tokens",
            "4",
            "--prompt-tokens",
            "8",
            "--json",
        ],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v["perplexity"]["perplexity"], run["evaluation"]["pruned"]["perplexity"]["perplexity"],
        "{v}"
    );
    // The 2:4 layers run a sparse kernel: the 2:4 one, or the bitmap where the CPU has
    // AVX512-VBMI2 (its bf16 GEMV is the faster of the two there, see `kernels/src/plan.rs`).
    let sparse: u64 = ["2:4/bf16", "bitmap/bf16"]
        .iter()
        .filter_map(|k| v["kernels"]["layers"][*k].as_u64())
        .sum();
    assert!(sparse > 0, "{v}");
    let o = espalier(
        &[
            "generate",
            out.to_str().unwrap(),
            "--prompt",
            "The",
            "--max-tokens",
            "4",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{:?}", text(&o));
    // A bf16 export keeps its KV cache in f16 unless told otherwise.
    assert!(text(&o).1.contains("KV cache f16"), "{:?}", text(&o));
    // `bench decode` with no pipeline times the export with its own masks, against the dense
    // model its report names (a packed export holds no dense weights).
    let bench = |model: &Path| {
        espalier(
            &[
                "bench",
                "decode",
                model.to_str().unwrap(),
                "--new-tokens",
                "2",
                "--prompt-tokens",
                "8",
                "--json",
            ],
            dir.path(),
        )
    };
    let o = bench(&out);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["pipeline"], "the export's masks", "{v}");
    assert_eq!(v["dense_model"], run["model"], "{v}");
    // The dense baseline is packed in the export's dtype, and both run the default 3 rounds.
    assert_eq!(v["dense_storage"], "bf16", "{v}");
    assert_eq!(v["storage"], "bf16", "{v}");
    assert_eq!(v["rounds"].as_array().map(Vec::len), Some(3), "{v}");
    let sparse: u64 = ["2:4/bf16", "bitmap/bf16"]
        .iter()
        .filter_map(|k| v["pruned_formats"][*k].as_u64())
        .sum();
    assert!(sparse > 0, "{v}");
    // A dense folder has no masks to time, and a packed export whose report is gone has no
    // dense baseline: both refused with the way out.
    let o = bench(&repo().join("engine/tests/fixtures/llama"));
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("no masks.safetensors") && text(&o).1.contains("--pipeline"),
        "{:?}",
        text(&o)
    );
    let report = out.join("report.json");
    let aside = dir.path().join("report.json.aside");
    std::fs::rename(&report, &aside).unwrap();
    let o = bench(&out);
    std::fs::rename(&aside, &report).unwrap();
    assert!(!o.status.success());
    assert!(text(&o).1.contains("report.json"), "{:?}", text(&o));
    // Pruning it again is refused with the way out.
    let o = espalier(
        &[
            "run",
            repo().join("pipelines/tiny.toml").to_str().unwrap(),
            "--model",
            out.to_str().unwrap(),
            "--no-export",
        ],
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("packed checkpoint"), "{:?}", text(&o));
    // A damaged packed file is refused naming it.
    let file = out.join("packed.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let o = espalier(
        &["eval", out.to_str().unwrap(), "--window", "128"],
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("packed.safetensors"), "{:?}", text(&o));
}

/// `espalier generate` streams text to stdout and its figures to stderr, greedily by default
/// (the same text twice), and refuses what it cannot do with the reason.
#[test]
fn generate_streams_text_and_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "generate",
        "builtin:tiny-llama",
        "--prompt",
        "Once",
        "--max-tokens",
        "8",
    ];
    let first = espalier(&args, dir.path());
    let (out, err) = text(&first);
    assert!(first.status.success(), "{err}");
    assert!(err.contains("8 tokens"), "{err}");
    assert!(err.contains("--max-tokens reached"), "{err}");
    let again = espalier(&args, dir.path());
    assert_eq!(text(&again).0, out, "greedy decoding is deterministic");
    // An f32 model's KV cache is f32 (exact) unless f16 is asked for; a type that does not
    // exist is refused with the ones that do.
    assert!(err.contains("KV cache f32"), "{err}");
    let half = espalier(&[&args[..], &["--kv-cache", "f16"]].concat(), dir.path());
    assert!(half.status.success(), "{:?}", text(&half));
    assert!(text(&half).1.contains("KV cache f16"), "{:?}", text(&half));
    let bad = espalier(&[&args[..], &["--kv-cache", "bf16"]].concat(), dir.path());
    assert!(!bad.status.success());
    assert!(
        text(&bad).1.contains("use auto, f32 or f16"),
        "{:?}",
        text(&bad)
    );

    let chat = espalier(
        &["generate", "builtin:tiny-llama", "--prompt", "Hi", "--chat"],
        dir.path(),
    );
    assert!(!chat.status.success());
    assert!(
        text(&chat).1.contains("no chat template"),
        "{:?}",
        text(&chat)
    );
    let hot = espalier(
        &[
            "generate",
            "builtin:tiny-llama",
            "--prompt",
            "Hi",
            "--temperature=-1",
        ],
        dir.path(),
    );
    assert!(!hot.status.success());
    assert!(text(&hot).1.contains("temperature"), "{:?}", text(&hot));
}

/// `[finetune]` after a magnitude stage: the export holds trained weights with every pruned
/// weight still zero, the report records the fine-tune, a rerun resumes from the last
/// checkpoint (and ends with the same weights), another run's checkpoint is refused untouched,
/// and a bad setting names its line and field.
#[test]
fn finetune_trains_holds_masks_checkpoints_and_resumes() {
    let dir = tmp();
    let body: String = (0..300)
        .map(|i| format!("sentence {i} of the training text, {} words. ", i % 11))
        .collect();
    write(dir.path(), "train.txt", &body);
    let pipeline = |seed: u64, extra: &str| {
        format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[finetune]\ntext = \"train.txt\"\nsteps = 3\nbatch = 2\nseq_len = 32\nlr = 0.003\nwarmup = 1\nseed = {seed}\ncheckpoint_dir = \"ckpt\"\ncheckpoint_every = 2\n{extra}[export]\ndir = \"out\"\nforce = true\n"
        )
    };
    let run = |name: &str, body: &str| {
        let file = write(dir.path(), name, body);
        espalier(&["run", file.to_str().unwrap()], dir.path())
    };
    let o = run("ft.toml", &pipeline(1, ""));
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("fine-tune (masks held)"), "{stdout}");
    // stderr is a pipe here, not a terminal: progress comes as plain lines (no bars drawn),
    // the last step and the finished stage and fine-tune among them.
    for line in [
        "stage 1/1 `magnitude`",
        "✓ magnitude (magnitude): density 0.5",
        "fine-tuning: 3 steps of 2 × 32 tokens",
        "3/3 loss ",
        "✓ fine-tuned 3 steps: loss ",
    ] {
        assert!(stderr.contains(line), "{line:?} not in {stderr}");
    }
    let out = dir.path().join("out");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let ft = &report["finetune"];
    assert_eq!(ft["spec"]["steps"], 3, "{ft}");
    assert_eq!(ft["loss_curve"].as_array().unwrap().len(), 3);
    assert_eq!(ft["tokens_trained"], 3 * 2 * 32);
    assert!(ft["resumed_from"].is_null());
    assert!(ft["final_loss"].as_f64().unwrap().is_finite());
    assert!(
        report["resolved_pipeline"]
            .as_str()
            .unwrap()
            .contains("[finetune]")
    );
    let checkpoint = dir.path().join("ckpt/finetune-checkpoint.safetensors");
    assert!(checkpoint.is_file());

    // The export: trained (unlike the dense model) where kept, exactly zero where pruned.
    let name = "model.layers.0.mlp.up_proj.weight";
    let dense = espalier_engine::builtin_model("tiny-llama").unwrap();
    let load = |dir: &std::path::Path| {
        let model = espalier_engine::load_model(dir.to_str().unwrap()).unwrap();
        let w = model.weight(name).unwrap().flatten_all().unwrap();
        w.to_vec1::<f32>().unwrap()
    };
    let trained = load(&out);
    let original = dense.weight(name).unwrap().flatten_all().unwrap();
    let original = original.to_vec1::<f32>().unwrap();
    let masks =
        candle_core::safetensors::load(out.join("masks.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let keep = masks[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mut moved = 0;
    for i in 0..trained.len() {
        if keep[i] == 0 {
            assert_eq!(trained[i].to_bits(), 0, "pruned weight {i} came back");
        } else {
            moved += usize::from(trained[i] != original[i]);
        }
    }
    assert!(
        moved > trained.len() / 4,
        "only {moved} kept weights were trained"
    );

    // A rerun finds its own final checkpoint: nothing left to train, the same weights.
    let o = run("ft.toml", &pipeline(1, ""));
    assert!(o.status.success(), "{:?}", text(&o));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["finetune"]["resumed_from"], 3);
    assert_eq!(load(&out), trained);

    // Another seed is another run: its checkpoint is refused, named, and left as it was.
    let before = std::fs::read(&checkpoint).unwrap();
    let o = run("ft.toml", &pipeline(2, ""));
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("finetune.checkpoint_dir") && stderr.contains("another run"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&checkpoint).unwrap(), before);

    // A setting out of range names the file, line and field before anything runs.
    let o = run("bad.toml", &pipeline(1, "decay = \"cubic\"\n"));
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:15:") && stderr.contains("finetune.decay"),
        "{stderr}"
    );

    // With distillation from the dense model (a new run: the old checkpoint removed), both
    // loss parts are in the table and in report.json, and pruned weights stay zero.
    std::fs::remove_file(&checkpoint).unwrap();
    let o = run(
        "distill.toml",
        &pipeline(1, "distill = { weight = 0.5, temperature = 2.0 }\n"),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("distillation (weight 0.5, T 2)"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let parts = report["finetune"]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert!(parts[0]["kl"].as_f64().unwrap() > 0.0, "{parts:?}");
    assert!(
        parts[0]["cross_entropy"].as_f64().unwrap() > 0.0,
        "{parts:?}"
    );
    let distilled = load(&out);
    assert!(
        distilled
            .iter()
            .zip(&keep)
            .all(|(w, k)| *k != 0 || w.to_bits() == 0)
    );
    assert_ne!(distilled, trained, "distillation changed nothing");
}

/// A `magnitude` stage with a linear schedule runs during `[finetune]` (not before it): events
/// at steps 0, 2 and 4 at the schedule's densities, reported in report.json and in the table;
/// the export holds the final masks (density 0.3) with every pruned weight zero; a rerun resumes
/// from the final checkpoint, repeats the event at step 4 and exports the same weights.
#[test]
fn scheduled_pruning_runs_during_finetune_and_resumes() {
    let dir = tmp();
    let body: String = (0..300)
        .map(|i| format!("sentence {i} of the training text, {} words. ", i % 11))
        .collect();
    write(dir.path(), "train.txt", &body);
    let file = write(
        dir.path(),
        "gradual.toml",
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.3\nschedule = { kind = \"linear\", start = 0, end = 4, every = 2 }\n[finetune]\ntext = \"train.txt\"\nsteps = 5\nbatch = 2\nseq_len = 32\nlr = 0.003\nwarmup = 1\ncheckpoint_dir = \"ckpt\"\ncheckpoint_every = 5\n[export]\ndir = \"out\"\nforce = true\n",
    );
    let run = || espalier(&["run", file.to_str().unwrap()], dir.path());
    let o = run();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("scheduled pruning"), "{stdout}");
    let out = dir.path().join("out");
    let read_report = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
    };
    let report = read_report();
    let events = report["finetune"]["prune_events"].as_array().unwrap();
    let steps: Vec<u64> = events.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![0, 2, 4], "{events:?}");
    for (e, want) in events.iter().zip([1.0, 0.65, 0.3]) {
        let target = e["target_density"].as_f64().unwrap();
        assert!((target - want).abs() < 1e-12, "{e}");
        assert!((e["density"].as_f64().unwrap() - want).abs() < 0.01, "{e}");
    }
    let stage = &report["stages"][0];
    assert!((stage["density_after"].as_f64().unwrap() - 0.3).abs() < 0.01);
    assert!(stage["density_from"].as_str().unwrap().contains("linear"));
    assert!(
        (report["summary"]["block_linear_density"].as_f64().unwrap() - 0.3).abs() < 0.01,
        "the layers' densities are the final masks'"
    );
    assert!(
        report["resolved_pipeline"]
            .as_str()
            .unwrap()
            .contains("schedule")
    );
    // The export: the final masks, zeros in place.
    let name = "model.layers.1.self_attn.q_proj.weight";
    let load = || {
        let model = espalier_engine::load_model(out.to_str().unwrap()).unwrap();
        let w = model.weight(name).unwrap().flatten_all().unwrap();
        w.to_vec1::<f32>().unwrap()
    };
    let trained = load();
    let masks =
        candle_core::safetensors::load(out.join("masks.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let keep = masks[name].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let kept = keep.iter().filter(|k| **k != 0).count();
    assert_eq!(kept, (0.3 * keep.len() as f64).round() as usize);
    for (w, k) in trained.iter().zip(&keep) {
        if *k == 0 {
            assert_eq!(w.to_bits(), 0);
        }
    }
    // The rerun resumes from step 5's checkpoint and ends the same.
    let o = run();
    assert!(o.status.success(), "{:?}", text(&o));
    let again = read_report();
    assert_eq!(again["finetune"]["resumed_from"], 5);
    assert_eq!(
        again["finetune"]["prune_events"].as_array().unwrap().len(),
        3
    );
    assert_eq!(load(), trained);
}

/// Lottery rounds through the binary: magnitude pruning to 0.25 in two rounds, late-rewound to
/// step 1, then the ticket trained. The report table lists each round, `report.json` has
/// `finetune.rounds` (3, 2 and 2 steps) and every trained token, and the exported masks keep
/// exactly a quarter of every layer. A pipeline with `lottery = { rounds = 0 }` is refused at its
/// `file:line:col`, naming the field, with exit 2 and the earlier export left as it was.
#[test]
fn lottery_rounds_run_report_and_refuse_bad_input_through_the_binary() {
    let dir = tmp();
    let body: String = (0..300)
        .map(|i| format!("sentence {i} of the training text, {} words. ", i % 11))
        .collect();
    write(dir.path(), "train.txt", &body);
    let pipeline = |lottery: &str| {
        format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.25\nlottery = {lottery}\n[finetune]\ntext = \"train.txt\"\nsteps = 3\nbatch = 2\nseq_len = 32\nlr = 0.003\nwarmup = 1\ncheckpoint_dir = \"ckpt\"\n[export]\ndir = \"out\"\nforce = true\n"
        )
    };
    let file = write(
        dir.path(),
        "lottery.toml",
        &pipeline("{ rounds = 2, rewind = { step = 1 } }"),
    );
    let o = espalier(&["run", file.to_str().unwrap()], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("lottery rounds"), "{stdout}");
    assert!(stdout.contains("rewound to step 1"), "{stdout}");
    let out = dir.path().join("out");
    let report_bytes = std::fs::read(out.join("report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report_bytes).unwrap();
    let ft = &report["finetune"];
    let rounds = ft["rounds"].as_array().unwrap();
    let steps: Vec<u64> = rounds
        .iter()
        .map(|r| r["steps"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [3, 2, 2], "{ft}");
    for (i, r) in rounds.iter().enumerate() {
        assert_eq!(r["round"], i + 1, "{r}");
        assert!(r["final_loss"].as_f64().unwrap().is_finite(), "{r}");
    }
    assert!(
        (rounds[0]["pruned_to"].as_f64().unwrap() - 0.5).abs() < 1e-3,
        "{ft}"
    );
    assert_eq!(rounds[1]["pruned_to"].as_f64(), Some(0.25), "{ft}");
    assert!(rounds[2]["pruned_to"].is_null(), "{ft}");
    assert_eq!(ft["tokens_trained"], 7 * 2 * 32);
    let masks =
        candle_core::safetensors::load(out.join("masks.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(!masks.is_empty());
    for (name, keep) in &masks {
        let keep = keep.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let kept = keep.iter().filter(|k| **k != 0).count();
        assert_eq!(kept, (0.25 * keep.len() as f64).round() as usize, "{name}");
    }
    // Bad input: refused at its key, nothing overwritten.
    let bad = write(dir.path(), "bad.toml", &pipeline("{ rounds = 0 }"));
    let o = espalier(&["run", bad.to_str().unwrap()], dir.path());
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.toml:5:13: stage[0].lottery.rounds"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("report.json")).unwrap(),
        report_bytes
    );
}
