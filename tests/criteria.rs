//! The built-in criteria, run as sandboxed plugins through the library, checked against
//! straightforward references written here (sorting, explicit loops); and the sandbox, with
//! hostile plugins that must fail their run while the process (and the next run) goes on;
//! and sequential calibration against the same stages run by hand, block by block.

use std::collections::BTreeMap;
use std::path::PathBuf;

use espalier_engine::Model;

mod common;
use common::{app, block_linears, mask_of, run, top_k};

fn tiny(name: &str) -> Model {
    espalier_engine::load_model(&format!("builtin:{name}")).expect("built-in model")
}

fn values(model: &Model, name: &str) -> (Vec<f32>, usize, usize) {
    let t = model.weight(name).expect("weight exists");
    let (r, c) = t.dims2().expect("2-D");
    (t.flatten_all().unwrap().to_vec1().unwrap(), r, c)
}

#[test]
fn magnitude_per_layer_matches_sorting_reference() {
    for arch in ["tiny-llama", "tiny-gpt2"] {
        let model = tiny(arch);
        let result = run(&format!(
            "model = \"builtin:{arch}\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.3\n"
        ))
        .unwrap();
        for name in block_linears(&model) {
            let (w, _, _) = values(&model, &name);
            let scores: Vec<f64> = w.iter().map(|x| f64::from(x.abs())).collect();
            let k = (0.3 * w.len() as f64).round() as usize;
            let expected = top_k(&scores, k);
            assert_eq!(mask_of(&result, &name), expected, "{arch} {name}");
            // The exported weights are the originals with zeros in place.
            let (pruned, _, _) = values(&result.state.model, &name);
            for ((p, o), k) in pruned.iter().zip(&w).zip(&expected) {
                assert_eq!(*p, if *k { *o } else { 0.0 });
            }
        }
    }
}

#[test]
fn magnitude_global_uses_one_threshold() {
    let model = tiny("tiny-llama");
    let result = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.25\nscope = \"global\"\n").unwrap();
    let names: Vec<String> = block_linears(&model)
        .into_iter()
        .filter(|n| n.contains(".mlp."))
        .collect();
    let mut all = Vec::new();
    for n in &names {
        all.extend(values(&model, n).0.iter().map(|x| f64::from(x.abs())));
    }
    let expected = top_k(&all, (0.25 * all.len() as f64).round() as usize);
    let mut got = Vec::new();
    for n in &names {
        got.extend(mask_of(&result, n));
    }
    assert_eq!(got, expected);
    let kept = got.iter().filter(|&&k| k).count();
    assert_eq!(kept, (0.25 * all.len() as f64).round() as usize);
}

#[test]
fn block_matches_reference_block_norms_exactly() {
    let model = tiny("tiny-llama");
    let result = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = 0.2\nblock = [16, 16]\n").unwrap();
    for name in block_linears(&model) {
        let (w, r, c) = values(&model, &name);
        let (gr, gc) = (r / 16, c / 16);
        let mut norms = vec![0f64; gr * gc];
        for i in 0..r {
            for j in 0..c {
                norms[(i / 16) * gc + j / 16] += f64::from(w[i * c + j]) * f64::from(w[i * c + j]);
            }
        }
        let k = (0.2 * (gr * gc) as f64).round() as usize;
        let keep_blocks = top_k(&norms, k);
        let mask = mask_of(&result, &name);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(
                    mask[i * c + j],
                    keep_blocks[(i / 16) * gc + j / 16],
                    "{name} [{i},{j}]"
                );
            }
        }
        assert_eq!(
            mask.iter().filter(|&&k| k).count(),
            k * 256,
            "{name}: exact count"
        );
    }
}

#[test]
fn block_refuses_shapes_it_does_not_tile_unless_ragged() {
    let err = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = 0.5\nblock = [24, 24]\n").err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("do not tile") && msg.contains("ragged"),
        "{msg}"
    );
    // Ragged: edge blocks are smaller groups, the count of kept blocks is still exact.
    let result = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ntargets = [\"*.k_proj.*\"]\ndensity = 0.5\nblock = [24, 24]\nragged = true\n").unwrap();
    let model = tiny("tiny-llama");
    let name = "model.layers.0.self_attn.k_proj.weight";
    let (w, r, c) = values(&model, name);
    let (gr, gc) = (r.div_ceil(24), c.div_ceil(24));
    let mut norms = vec![0f64; gr * gc];
    for i in 0..r {
        for j in 0..c {
            norms[(i / 24) * gc + j / 24] += f64::from(w[i * c + j]).powi(2);
        }
    }
    let keep_blocks = top_k(&norms, (0.5 * (gr * gc) as f64).round() as usize);
    let mask = mask_of(&result, name);
    for i in 0..r {
        for j in 0..c {
            assert_eq!(mask[i * c + j], keep_blocks[(i / 24) * gc + j / 24]);
        }
    }
}

#[test]
fn n_m_keeps_the_largest_n_of_every_m_consecutive_inputs() {
    for (n, m) in [(2usize, 4usize), (4, 8)] {
        let model = tiny("tiny-llama");
        let result = run(&format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"n-m\"\nn = {n}\nm = {m}\n"
        ))
        .unwrap();
        for name in block_linears(&model) {
            let (w, r, c) = values(&model, &name);
            let mask = mask_of(&result, &name);
            for i in 0..r {
                for g in 0..c / m {
                    let base = i * c + g * m;
                    let scores: Vec<f64> = w[base..base + m]
                        .iter()
                        .map(|x| f64::from(x.abs()))
                        .collect();
                    assert_eq!(
                        &mask[base..base + m],
                        top_k(&scores, n).as_slice(),
                        "{name} row {i} group {g}"
                    );
                }
            }
            assert_eq!(mask.iter().filter(|&&k| k).count() * m, mask.len() * n);
        }
    }
    // A density that disagrees with n/m is refused at planning (the plugin's `validate`), at
    // the density's line.
    let err = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"n-m\"\ndensity = 0.3\n")
        .err()
        .unwrap();
    assert_eq!(
        err.kind(),
        espalier::app::ErrorKind::InvalidPipeline,
        "{err}"
    );
    assert!(
        err.to_string().starts_with(
            "test.toml:4:1: stage[0].density: stage `n-m`: n = 2, m = 4 keeps exactly 0.5"
        ),
        "{err}"
    );
}

#[test]
fn heads_keeps_the_top_heads_and_cuts_them_out_bit_identically() {
    let model = tiny("tiny-llama");
    let cfg = model.config.clone();
    let result = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"heads\"\ntargets = [\"*.self_attn.*\"]\ndensity = 0.5\n").unwrap();
    let out = &result.state.model;
    assert_eq!(out.config.num_heads, 2);
    assert_eq!(out.config.num_kv_heads, 2);
    assert_eq!(out.config.raw["head_dim"], 16);
    let hd = cfg.head_dim;
    let per_group = cfg.num_heads / cfg.num_kv_heads;
    for b in 0..cfg.num_layers {
        let q = format!("model.layers.{b}.self_attn.q_proj.weight");
        let o = format!("model.layers.{b}.self_attn.o_proj.weight");
        let (qw, _, qc) = values(&model, &q);
        let (ow, or, oc) = values(&model, &o);
        // Reference importance: squared norm of the head's Q rows plus its O columns.
        let score: Vec<f64> = (0..cfg.num_heads)
            .map(|h| {
                let qs: f64 = qw[h * hd * qc..(h + 1) * hd * qc]
                    .iter()
                    .map(|x| f64::from(*x).powi(2))
                    .sum();
                let os: f64 = (0..or)
                    .flat_map(|i| (h * hd..(h + 1) * hd).map(move |j| (i, j)))
                    .map(|(i, j)| f64::from(ow[i * oc + j]).powi(2))
                    .sum();
                qs + os
            })
            .collect();
        let mut kept = Vec::new();
        for g in 0..cfg.num_kv_heads {
            let members = &score[g * per_group..(g + 1) * per_group];
            let keep = top_k(members, 1);
            kept.extend(
                keep.iter()
                    .enumerate()
                    .filter(|(_, k)| **k)
                    .map(|(i, _)| g * per_group + i),
            );
        }
        let (new_q, nr, _) = values(out, &q);
        assert_eq!(nr, kept.len() * hd);
        for (slot, &h) in kept.iter().enumerate() {
            assert_eq!(
                &new_q[slot * hd * qc..(slot + 1) * hd * qc],
                &qw[h * hd * qc..(h + 1) * hd * qc],
                "block {b} head {h}"
            );
        }
        let (new_o, _, noc) = values(out, &o);
        for i in 0..or {
            for (slot, &h) in kept.iter().enumerate() {
                assert_eq!(
                    &new_o[i * noc + slot * hd..i * noc + (slot + 1) * hd],
                    &ow[i * oc + h * hd..i * oc + (h + 1) * hd]
                );
            }
        }
    }
    let heads = result.report.summary.heads.as_ref().unwrap();
    assert_eq!((heads.heads_before, heads.heads_after), (4, 2));
}

#[test]
fn stages_compose_and_budgets_are_checked() {
    // 50% magnitude then 50% of what is left would be a second selection over masked weights:
    // the second stage sees zeros where the first pruned, so it keeps a subset.
    let result = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"block\"\ndensity = 0.25\nblock = [16, 16]\n").unwrap();
    for s in &result.report.stages {
        assert!(s.plugin_sha256.len() == 64 && !s.plugin_version.is_empty());
    }
    let m = mask_of(&result, "model.layers.0.mlp.up_proj.weight");
    let density = m.iter().filter(|&&k| k).count() as f64 / m.len() as f64;
    assert!(density <= 0.25 + 1e-9, "{density}");
    let err = run(
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = \"budget\"\n",
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("produces budgets"), "{err}");
}

fn hostile(name: &str) -> PathBuf {
    PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join(format!("espalier_test_hostile_{name}.wasm"))
}

fn hostile_run(name: &str) -> String {
    let path = hostile(name);
    assert!(path.is_file(), "{} was not built", path.display());
    let text = format!(
        "model = \"builtin:tiny-llama\"\n[sandbox]\ntimeout_s = 1.0\nmemory_mb = 64\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
        path.display().to_string()
    );
    let err = run(&text)
        .err()
        .expect("a hostile plugin must fail its run");
    err.to_string()
}

#[test]
fn hostile_plugins_fail_their_run_and_the_process_goes_on() {
    let cases = [
        ("loop", "time limit"),
        ("grow", "memory limit"),
        ("trap", "crashed"),
        ("shape", "has shape [2, 3]"),
        ("density", "asked for 50.00%"),
    ];
    for (name, expected) in cases {
        let msg = hostile_run(name);
        assert!(msg.contains(expected), "hostile-{name}: {msg}");
        // The same runtime still runs a good pipeline afterwards.
        let ok = run(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n",
        )
        .unwrap();
        assert_eq!(ok.report.stages.len(), 1);
    }
}

#[test]
fn host_tensor_budget_is_enforced() {
    // A plugin cannot make the host allocate without bound through kernel calls.
    let path = hostile("hoard");
    let text = format!(
        "model = \"builtin:tiny-llama\"\n[sandbox]\ntimeout_s = 20.0\nhost_memory_mb = 16\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
        path.display().to_string()
    );
    let err = run(&text).err().expect("the hoarding plugin must fail");
    assert!(
        err.to_string().contains("host tensor budget of 16 MiB"),
        "{err}"
    );
}

#[test]
fn densities_are_exact_per_layer() {
    let result =
        run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.37\n")
            .unwrap();
    let by_name: BTreeMap<&str, f64> = result
        .report
        .layers
        .iter()
        .map(|l| (l.name.as_str(), l.density))
        .collect();
    for name in block_linears(&tiny("tiny-llama")) {
        let layer = result
            .report
            .layers
            .iter()
            .find(|l| l.name == name)
            .unwrap();
        let expected = (0.37 * layer.original_numel as f64).round() / layer.original_numel as f64;
        assert_eq!(by_name[name.as_str()], expected, "{name}");
    }
}

/// The calibration section of the OBS tests: 4 sequences of 32 tokens of the shipped text.
fn obs_calibration() -> String {
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt");
    format!(
        "[calibration]\ntext = {:?}\nsamples = 4\nseq_len = 32\n",
        text.display().to_string()
    )
}

/// The input second moment `XᵀX / tokens` of every block linear of `model`, computed with the
/// calibration set of [`obs_calibration`].
fn dense_hessians(model: &Model) -> BTreeMap<String, (Vec<f64>, usize)> {
    use espalier::calibration::{CalibrationSet, Calibrator};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt");
    let text = std::fs::read_to_string(&path).unwrap();
    let tokenizer = espalier_engine::Tokenizer::for_model(model).unwrap();
    let set = CalibrationSet::from_text(&text, &path, &tokenizer, 4, 32).unwrap();
    let calibrator = Calibrator::new(model.clone(), std::sync::Arc::new(set));
    block_linears(model)
        .into_iter()
        .map(|name| {
            let h = calibrator.hessian(&name).unwrap();
            let cols = h.cols();
            (name, (h.mean(), cols))
        })
        .collect()
}

/// The layer-wise reconstruction error `tr((W − W′)·H·(W − W′)ᵀ)` = the mean over calibration
/// tokens of `‖(W − W′)·x‖²`, in f64.
fn reconstruction_error(w: &[f32], w2: &[f32], h: &[f64], cols: usize) -> f64 {
    let mut total = 0.0;
    for (a, b) in w.chunks(cols).zip(w2.chunks(cols)) {
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| f64::from(x - y)).collect();
        for i in 0..cols {
            let hi = &h[i * cols..(i + 1) * cols];
            total += d[i] * d.iter().zip(hi).map(|(x, y)| x * y).sum::<f64>();
        }
    }
    total
}

#[test]
fn sparsegpt_keeps_the_exact_structure_and_beats_the_same_mask_without_updates() {
    let model = tiny("tiny-llama");
    let hessians = dense_hessians(&model);
    // Unstructured with several mask and update blocks per layer, N:M, and blocks.
    let stages = [
        (
            "density = 0.5\nblocksize = 16\nmask_blocksize = 32\n",
            "unstructured",
        ),
        ("n = 2\nm = 4\nblocksize = 16\n", "2:4"),
        ("density = 0.5\nblock = [16, 16]\n", "blocks"),
    ];
    for (params, what) in stages {
        let result = run(&format!(
            "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"sparsegpt\"\n{params}",
            obs_calibration()
        ))
        .unwrap();
        // The dense originals the updates started from are not carried past the stages.
        assert!(!result.state.holds_stage_inputs(), "{what}");
        for name in block_linears(&model) {
            let (w, r, c) = values(&model, &name);
            let (pruned, _, _) = values(&result.state.model, &name);
            let keep = mask_of(&result, &name);
            // Exactly half survives, under the structure asked for.
            assert_eq!(
                keep.iter().filter(|&&k| k).count(),
                r * c / 2,
                "{what} {name}"
            );
            match what {
                "2:4" => {
                    for group in keep.chunks(4) {
                        assert_eq!(group.iter().filter(|&&k| k).count(), 2, "{name}");
                    }
                }
                "blocks" => {
                    for i in 0..r {
                        for j in 0..c {
                            let corner = (i / 16 * 16) * c + j / 16 * 16;
                            assert_eq!(keep[i * c + j], keep[corner], "{name} [{i}, {j}]");
                        }
                    }
                }
                _ => {}
            }
            // Removed weights are exact zeros; kept ones were updated.
            for (p, k) in pruned.iter().zip(&keep) {
                assert!(*k || *p == 0.0, "{what} {name}");
            }
            let masked: Vec<f32> = w
                .iter()
                .zip(&keep)
                .map(|(x, k)| if *k { *x } else { 0.0 })
                .collect();
            let (h, cols) = &hessians[&name];
            let updated = reconstruction_error(&w, &pruned, h, *cols);
            let plain = reconstruction_error(&w, &masked, h, *cols);
            assert!(
                updated < 0.9 * plain,
                "{what} {name}: error {updated} with updates, {plain} without"
            );
        }
    }
}

#[test]
fn sparsegpt_matches_the_pytorch_reference_on_the_golden_model() {
    // `scripts/sparsegpt_model.py --golden` (the paper's algorithm in PyTorch + transformers)
    // pruned the golden tiny LLaMA with the same calibration windows: masks must agree exactly
    // and updated weights within 1e-4 of each layer's largest weight.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let golden = candle_core::safetensors::load(
        root.join("host/tests/fixtures/sparsegpt_golden_llama.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let model_dir = root.join("engine/tests/fixtures/llama");
    let model = espalier_engine::load_model(&model_dir.display().to_string()).unwrap();
    let calibration = obs_calibration();
    let cases = [
        (
            "sequential-50",
            "sequential = true\n",
            "density = 0.5\nmask_blocksize = 16\n",
        ),
        ("sequential-2-4", "sequential = true\n", "n = 2\nm = 4\n"),
        ("whole-50", "", "density = 0.5\nmask_blocksize = 16\n"),
    ];
    for (case, sequential, params) in cases {
        let result = run(&format!(
            "model = {:?}\n{calibration}{sequential}[[stage]]\nplugin = \"sparsegpt\"\nblocksize = 16\n{params}",
            model_dir.display().to_string()
        ))
        .unwrap();
        let names = block_linears(&model);
        assert_eq!(names.len(), 14);
        for name in names {
            let want = &golden[&format!("{case}/{name}")];
            let want_keep: Vec<bool> = golden[&format!("{case}/{name}.keep")]
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
                .into_iter()
                .map(|k| k == 1)
                .collect();
            assert_eq!(mask_of(&result, &name), want_keep, "{case} {name}: masks");
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let (got, _, _) = values(&result.state.model, &name);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{case} {name}[{k}]: {a} vs PyTorch {b} (layer scale {scale})"
                );
            }
        }
    }
}

#[test]
fn reconstruct_keeps_earlier_masks_and_needs_them() {
    let model = tiny("tiny-llama");
    let wanda = format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"wanda\"\ndensity = 0.5\n",
        obs_calibration()
    );
    let before = run(&wanda).unwrap();
    let after = run(&format!("{wanda}[[stage]]\nplugin = \"reconstruct\"\n")).unwrap();
    // Reconstruction fits each layer to the inputs it sees after the Wanda stage: measure
    // the error on those.
    let hessians = dense_hessians(&before.state.model);
    for name in block_linears(&model) {
        let (w, _, _) = values(&model, &name);
        assert_eq!(mask_of(&before, &name), mask_of(&after, &name), "{name}");
        let (h, cols) = &hessians[&name];
        let plain = reconstruction_error(&w, &values(&before.state.model, &name).0, h, *cols);
        let updated = reconstruction_error(&w, &values(&after.state.model, &name).0, h, *cols);
        assert!(updated < 0.9 * plain, "{name}: {updated} vs {plain}");
    }
    // Alone there is nothing to reconstruct: refused at planning, at its stage's targets.
    let err = run(&format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"reconstruct\"\n",
        obs_calibration()
    ))
    .err()
    .expect("refused");
    assert!(err.to_string().contains("no earlier stage prunes"), "{err}");
}

#[test]
fn updated_weights_are_checked_before_any_is_applied() {
    let plugin = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_forge_weights.wasm");
    let pipeline = |mode: &str| {
        format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = {:?}\ntargets = [\"*.mlp.*\"]\nmode = {mode:?}\n",
            plugin.display().to_string()
        )
    };
    // A valid output replaces the weights.
    let model = tiny("tiny-llama");
    let ok = run(&pipeline("valid")).unwrap();
    let name = "model.layers.0.mlp.gate_proj.weight";
    let (w, _, _) = values(&model, name);
    let (got, _, _) = values(&ok.state.model, name);
    let half = w.len() / 2;
    for (i, (a, b)) in w.iter().zip(&got).enumerate() {
        assert_eq!(*b, if i < half { 2.0 * a } else { 0.0 });
    }
    for (mode, says) in [
        ("nan", "hold a non-finite value (NaN) at [0, 0]"),
        ("unmasked", "are not zero where the layer is masked"),
        ("shape", "the layer has ["),
    ] {
        let err = run(&pipeline(mode)).err().expect("refused").to_string();
        assert!(err.contains(says), "{mode}: {err}");
        assert!(err.contains("model.layers.0.mlp"), "{mode}: {err}");
    }
}

/// Plans and runs pipeline text on `model` as given (not loaded from the pipeline's `model`).
fn run_on(model: Model, text: &str) -> espalier::run::RunOutcome {
    let pipeline = espalier::pipeline::Pipeline::parse("test.toml", text).unwrap();
    let registry = app().registry();
    let plan = espalier::plan::plan(pipeline, &registry, &app().runtime, &model).unwrap();
    espalier::run::execute(
        &plan,
        &app().runtime,
        model,
        &mut espalier::events::Quiet,
        &espalier::cancel::CancelToken::new(),
    )
    .unwrap()
}

#[test]
fn sequential_calibration_equals_each_block_run_by_hand_on_the_pruned_inputs() {
    let dense = tiny("tiny-llama");
    let layers = dense.layers();
    let block_of = |name: &str| layers.iter().find(|l| l.name == name).and_then(|l| l.block);
    let blocks = dense.config.num_layers;
    assert!(blocks >= 2, "the test needs a block after the first");
    let calibration = obs_calibration();
    for stages in [
        "[[stage]]\nplugin = \"sparsegpt\"\ndensity = 0.5\nblocksize = 16\n",
        // Two stages per block: the second one's Hessians come from the block as the first
        // left it.
        "[[stage]]\nplugin = \"wanda\"\ndensity = 0.5\n[[stage]]\nplugin = \"reconstruct\"\n",
    ] {
        let sequential = run(&format!(
            "model = \"builtin:tiny-llama\"\n{}sequential = true\n{stages}",
            calibration
        ))
        .unwrap();
        assert!(sequential.report.calibration.as_ref().unwrap().sequential);
        let whole = run(&format!(
            "model = \"builtin:tiny-llama\"\n{calibration}{stages}"
        ))
        .unwrap();
        let mut differs = false;
        for block in 0..blocks {
            // By hand: the model with blocks before `block` as sequential calibration left
            // them and the rest dense, then the same stages on `block`'s linears alone, with
            // statistics from an ordinary whole-model pass.
            let mut model = dense.clone();
            for name in block_linears(&dense) {
                if block_of(&name).is_some_and(|b| b < block) {
                    let w = sequential.state.model.weight(&name).unwrap().clone();
                    model.set_weight(&name, w, false).unwrap();
                }
            }
            let targeted = stages.replace(
                "[[stage]]\n",
                &format!("[[stage]]\ntargets = [\"model.layers.{block}.*\"]\n"),
            );
            let by_hand = run_on(
                model,
                &format!("model = \"builtin:tiny-llama\"\n{calibration}{targeted}"),
            );
            for name in block_linears(&dense)
                .into_iter()
                .filter(|n| block_of(n) == Some(block))
            {
                assert_eq!(
                    by_hand.state.masks[&name].keep(),
                    sequential.state.masks[&name].keep(),
                    "{stages} {name}"
                );
                let (hand, _, _) = values(&by_hand.state.model, &name);
                let (seq, _, _) = values(&sequential.state.model, &name);
                assert_eq!(hand, seq, "{stages} {name}");
                differs |= values(&whole.state.model, &name).0 != seq;
            }
        }
        // Later blocks saw the pruned earlier ones: not what one whole-model pass gives.
        assert!(differs, "{stages}: sequential equals the whole-model run");
    }
}

#[test]
fn sequential_calibration_refuses_stages_that_decide_across_the_model() {
    let calibration = format!("{}sequential = true\n", obs_calibration());
    let refused = |stages: &str| {
        run(&format!(
            "model = \"builtin:tiny-llama\"\n{calibration}{stages}"
        ))
        .err()
        .expect("refused")
        .to_string()
    };
    // A weights-only criterion after a block-local one: it may rank across layers.
    let err = refused(
        "[[stage]]\nplugin = \"wanda\"\ndensity = 0.6\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n",
    );
    assert!(
        err.contains("stage `magnitude` (plugin `magnitude`) takes no calibration statistics")
            && err.contains("must come before stage `wanda`")
            && err.contains("stage[1].plugin"),
        "{err}"
    );
    // Nothing to run block by block.
    let err = refused("[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n");
    assert!(
        err.contains("calibration.sequential") && err.contains("nothing to run block by block"),
        "{err}"
    );
    // A target outside the blocks.
    let err = refused(
        "[[stage]]\nplugin = \"sparsegpt\"\ndensity = 0.5\ntargets = [\"embed_tokens\", \"*.mlp.*\"]\n",
    );
    assert!(err.contains("outside the transformer blocks"), "{err}");
    // The same weights-only criterion first runs on the whole model, then the block loop.
    let ok = run(&format!(
        "model = \"builtin:tiny-llama\"\n{calibration}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.8\n[[stage]]\nplugin = \"sparsegpt\"\ndensity = 0.5\n"
    ))
    .unwrap();
    assert_eq!(ok.report.stages.len(), 2);
    let densities: Vec<f64> = ok.report.stages.iter().map(|s| s.density_after).collect();
    assert!(
        (densities[0] - 0.8).abs() < 0.01 && (densities[1] - 0.5).abs() < 0.01,
        "{densities:?}"
    );
}
