//! Calibration statistics served through the 0.2 WIT and the `wanda` criterion, checked against
//! a straightforward reference computed here (the engine's forward pass with an observer of our
//! own, explicit loops and sorting); the `[calibration]` section's errors; and the promise of
//! WIT versioning: plugins built against the frozen 0.1.0 and 0.2.0 contracts still run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use espalier::calibration::{CalibrationSet, Calibrator};
use espalier::mask::{Mask, Structure};
use espalier::plugin::WitVersion;
use espalier_engine::{EngineError, Linear, LinearObserver, Model, Session, Tokenizer};

mod common;
use common::{app, block_linears, mask_of, run, top_k};

const SAMPLES: usize = 4;
const SEQ_LEN: usize = 32;

fn calibration_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt")
}

fn calibration_section() -> String {
    format!(
        "[calibration]\ntext = {:?}\nsamples = {SAMPLES}\nseq_len = {SEQ_LEN}\n",
        calibration_text().display().to_string()
    )
}

fn tiny() -> Model {
    espalier_engine::load_model("builtin:tiny-llama").expect("built-in model")
}

/// The reference statistic: per linear, per input column, the sum over every token of every
/// sequence of x², divided by the number of sequences (f64; per-sequence sums, then their sum).
struct Reference(BTreeMap<String, Vec<f64>>);

impl LinearObserver for Reference {
    fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
        let rows: Vec<Vec<f32>> = input.to_vec2()?;
        let acc = self
            .0
            .entry(linear.name().to_string())
            .or_insert_with(|| vec![0.0; linear.in_features()]);
        for row in rows {
            for j in 0..row.len() {
                acc[j] += f64::from(row[j]) * f64::from(row[j]);
            }
        }
        Ok(())
    }
}

fn reference_norms(model: &Model) -> BTreeMap<String, Vec<f32>> {
    let text = std::fs::read_to_string(calibration_text()).unwrap();
    // builtin:tiny-llama uses the byte tokenizer: one id per UTF-8 byte.
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    let session = Session::new(model).unwrap();
    // Sum over each sequence's tokens, then over sequences, then the mean.
    let mut total: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for s in 0..SAMPLES {
        let seq = &ids[s * SEQ_LEN..(s + 1) * SEQ_LEN];
        let mut obs = Reference(BTreeMap::new());
        session.hidden_states(seq, None, Some(&mut obs)).unwrap();
        for (name, sums) in obs.0 {
            let t = total.entry(name).or_insert_with(|| vec![0.0; sums.len()]);
            for j in 0..sums.len() {
                t[j] += sums[j];
            }
        }
    }
    total
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|s| (s / SAMPLES as f64) as f32).collect()))
        .collect()
}

/// Wanda scores of one layer, `[r][c]`, in the same f32 arithmetic as the host kernels.
fn wanda_scores(model: &Model, norms: &BTreeMap<String, Vec<f32>>, name: &str) -> Vec<Vec<f32>> {
    let w: Vec<Vec<f32>> = model.weight(name).unwrap().to_vec2().unwrap();
    let n = &norms[name];
    w.iter()
        .map(|row| row.iter().zip(n).map(|(x, v)| x.abs() * v.sqrt()).collect())
        .collect()
}

fn reference_wanda(model: &Model, name: &str, density: f64) -> Vec<bool> {
    let norms = reference_norms(model);
    let scores = wanda_scores(model, &norms, name);
    let cols = scores[0].len();
    let k = (density * cols as f64).round() as usize;
    scores.iter().flat_map(|row| top_k(row, k)).collect()
}

fn reference_wanda_n_m(model: &Model, name: &str, n: usize, m: usize) -> Vec<bool> {
    let norms = reference_norms(model);
    wanda_scores(model, &norms, name)
        .iter()
        .flat_map(|row| row.chunks(m).flat_map(|g| top_k(g, n)).collect::<Vec<_>>())
        .collect()
}

fn names(model: &Model, pattern: &str) -> Vec<String> {
    block_linears(model)
        .into_iter()
        .filter(|n| n.contains(pattern))
        .collect()
}

#[test]
fn wanda_matches_the_reference_per_row() {
    let model = tiny();
    let result = run(&format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"wanda\"\ndensity = 0.3\n",
        calibration_section()
    ))
    .unwrap();
    let all = names(&model, "");
    assert!(!all.is_empty());
    for name in &all {
        let got = mask_of(&result, name);
        assert_eq!(got, reference_wanda(&model, name, 0.3), "{name}");
        // Per-row selection: every row keeps the same count.
        let cols = model.weight(name).unwrap().dims()[1];
        let k = (0.3 * cols as f64).round() as usize;
        assert!(
            got.chunks(cols)
                .all(|r| r.iter().filter(|&&b| b).count() == k)
        );
    }
    // Wanda differs from magnitude on real activations (else the statistic was ignored).
    let mag =
        run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.3\n")
            .unwrap();
    assert!(all.iter().any(|n| mask_of(&mag, n) != mask_of(&result, n)));
}

#[test]
fn wanda_blocks_keep_the_blocks_with_the_largest_score_norms() {
    let model = tiny();
    let density = 0.25;
    let result = run(&format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"wanda\"\ndensity = {density}\nblock = [8, 8]\n",
        calibration_section()
    ))
    .unwrap();
    let norms = reference_norms(&model);
    let block = run(&format!(
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ndensity = {density}\nblock = [8, 8]\n"
    ))
    .unwrap();
    let mut differs_from_magnitude = false;
    for name in names(&model, "") {
        let scores = wanda_scores(&model, &norms, &name);
        let (r, c) = (scores.len(), scores[0].len());
        let (gr, gc) = (r / 8, c / 8);
        let mut sums = vec![0f64; gr * gc];
        for i in 0..r {
            for j in 0..c {
                let s = scores[i][j] * scores[i][j];
                sums[(i / 8) * gc + j / 8] += f64::from(s);
            }
        }
        let keep = top_k(&sums, (density * (gr * gc) as f64).round() as usize);
        let expected: Vec<bool> = (0..r * c)
            .map(|e| keep[(e / c / 8) * gc + (e % c) / 8])
            .collect();
        let got = mask_of(&result, &name);
        assert_eq!(got, expected, "{name}");
        differs_from_magnitude |= got != mask_of(&block, &name);
    }
    assert!(
        differs_from_magnitude,
        "activations must change which blocks stay"
    );
    let err = run(&format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"wanda\"\nn = 2\nm = 4\nblock = [8, 8]\n",
        calibration_section()
    ))
    .err()
    .expect("N:M and blocks together are refused")
    .to_string();
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn wanda_n_m_keeps_the_best_n_of_every_m_by_wanda_score() {
    let model = tiny();
    let result = run(&format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"wanda\"\nn = 2\nm = 4\n",
        calibration_section()
    ))
    .unwrap();
    for name in names(&model, "") {
        assert_eq!(
            mask_of(&result, &name),
            reference_wanda_n_m(&model, &name, 2, 4),
            "{name}"
        );
        assert_eq!(
            result.state.masks[&name].structure(),
            Structure::NOfM { n: 2, m: 4 }
        );
    }
}

#[test]
fn statistics_see_the_masks_of_earlier_stages() {
    // Stage 1 prunes the MLPs; the attention inputs of later blocks then change, and wanda's
    // statistics must be those of the pruned model.
    let masked = run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.4\n")
        .unwrap()
        .state
        .model;
    let result = run(&format!(
        "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.4\n[[stage]]\nplugin = \"wanda\"\ntargets = [\"*.self_attn.*\"]\ndensity = 0.5\n",
        calibration_section()
    ))
    .unwrap();
    let dense = tiny();
    let attn = names(&dense, "self_attn");
    let mut differs_from_dense = false;
    for name in &attn {
        let got = mask_of(&result, name);
        assert_eq!(got, reference_wanda(&masked, name, 0.5), "{name}");
        differs_from_dense |= got != reference_wanda(&dense, name, 0.5);
    }
    assert!(
        differs_from_dense,
        "earlier masks must change the statistics"
    );
}

#[test]
fn calibration_losses_match_the_engine() {
    let model = tiny();
    let text = std::fs::read_to_string(calibration_text()).unwrap();
    let set = CalibrationSet::from_text(
        &text,
        &calibration_text(),
        &Tokenizer::bytes(),
        SAMPLES,
        SEQ_LEN,
    )
    .unwrap();
    assert_eq!((set.samples(), set.seq_len()), (SAMPLES, SEQ_LEN));
    let session = Session::new(&model).unwrap();
    let expected: f64 = set
        .sequences
        .iter()
        .map(|s| f64::from(session.loss(s).unwrap()))
        .sum::<f64>()
        / SAMPLES as f64;
    let set = Arc::new(set);
    // Prepared for trials first, the base loss comes from the kept block inputs instead of a
    // second pass; it must be the same number.
    let prepared = Calibrator::new(model.clone(), set.clone());
    prepared.prepare_trials().unwrap();
    let resumed = prepared.loss().unwrap();
    assert!((resumed - expected).abs() < 1e-9, "{resumed} vs {expected}");
    let cal = Calibrator::new(model.clone(), set);
    let loss = cal.loss().unwrap();
    assert!((loss - expected).abs() < 1e-9, "{loss} vs {expected}");

    let name = names(&model, "mlp.down").remove(0);
    let shape = model.weight(&name).unwrap().dims().to_vec();
    let numel: usize = shape.iter().product();
    let dense = Mask::dense(shape.clone());
    assert!((cal.loss_with_mask(&name, &dense).unwrap() - loss).abs() < 1e-9);
    let empty = Mask::new(shape, vec![false; numel], Structure::Unstructured).unwrap();
    let pruned = cal.loss_with_mask(&name, &empty).unwrap();
    assert!(
        (pruned - loss).abs() > 1e-6,
        "masking a layer must move the loss"
    );
    // The trial left the calibrator's model untouched.
    assert_eq!(cal.loss().unwrap(), loss);
    assert!(cal.activation_norms("lm_head.weight").is_err());
}

#[test]
fn calibration_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "too short").unwrap();
    let stage = "[[stage]]\nplugin = \"wanda\"\ndensity = 0.5\n";
    let cases = [
        (
            format!(
                "model = \"builtin:tiny-llama\"\n[calibration]\ntext = {:?}\nseq_len = 32\n{stage}",
                short.display().to_string()
            ),
            "test.toml:3:8: calibration.text: calibration text",
            "fewer than one sequence of seq_len = 32",
        ),
        (
            format!(
                "model = \"builtin:tiny-llama\"\n[calibration]\ntext = {:?}\nsamples = 0\n{stage}",
                calibration_text().display().to_string()
            ),
            "test.toml:4:11: calibration.samples",
            "must be in 1..=",
        ),
        (
            format!(
                "model = \"builtin:tiny-llama\"\n[calibration]\ntext = {:?}\nseq_len = 1\n{stage}",
                calibration_text().display().to_string()
            ),
            "calibration.seq_len",
            "must be in 2..=",
        ),
        (
            format!(
                "model = \"builtin:tiny-gpt2\"\n[calibration]\ntext = {:?}\nseq_len = 60000\n{stage}",
                calibration_text().display().to_string()
            ),
            "test.toml:2:1: calibration.seq_len",
            "exceed the model's",
        ),
        (
            format!(
                "model = \"builtin:tiny-llama\"\n[calibration]\ntext = \"no/such/file.txt\"\n{stage}"
            ),
            "test.toml:3:8: calibration.text",
            "not a readable file",
        ),
        (
            format!("model = \"builtin:tiny-llama\"\n[calibration]\nwords = 3\n{stage}"),
            "test.toml:",
            "unknown field `words`",
        ),
    ];
    for (text, at, says) in cases {
        let err = run(&text).err().expect("must fail").to_string();
        assert!(err.contains(at) && err.contains(says), "{err}");
    }
    // No [calibration] and no default text where the run happens: the stage that needs it is
    // named at planning, before anything runs.
    if !Path::new("data/calibration.txt").exists() {
        let err = run(&format!("model = \"builtin:tiny-llama\"\n{stage}"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("stage[0].plugin") && err.contains("needs calibration data"),
            "{err}"
        );
    }
}

#[test]
fn plugins_built_against_wit_0_1_still_run() {
    let legacy = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_legacy_v01.wasm");
    assert!(legacy.is_file(), "{} was not built", legacy.display());
    let plugin = espalier::plugin::registry::load_file(&app().runtime, &legacy).unwrap();
    assert_eq!(plugin.compiled.wit, WitVersion::V0_1);
    assert_eq!(
        app().registry().get("magnitude").unwrap().compiled.wit,
        WitVersion::V0_6
    );
    let old = run(&format!(
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = {:?}\ndensity = 0.4\n",
        legacy.display().to_string()
    ))
    .unwrap();
    let new =
        run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.4\n")
            .unwrap();
    for name in names(&tiny(), "") {
        assert_eq!(mask_of(&old, &name), mask_of(&new, &name), "{name}");
    }
}

#[test]
fn plugins_built_against_wit_0_2_still_run() {
    let legacy = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_legacy_v02.wasm");
    assert!(legacy.is_file(), "{} was not built", legacy.display());
    let plugin = espalier::plugin::registry::load_file(&app().runtime, &legacy).unwrap();
    assert_eq!(plugin.compiled.wit, WitVersion::V0_2);
    let stage = |plugin: &str| {
        format!(
            "model = \"builtin:tiny-llama\"\n{}[[stage]]\nplugin = {plugin:?}\ndensity = 0.4\n",
            calibration_section()
        )
    };
    let old = run(&stage(&legacy.display().to_string())).unwrap();
    let new = run(&stage("wanda")).unwrap();
    for name in names(&tiny(), "") {
        assert_eq!(mask_of(&old, &name), mask_of(&new, &name), "{name}");
    }
}

/// Per linear, `Σ xᵀx` over every token of every sequence, in f64 with explicit loops.
struct GramReference(BTreeMap<String, Vec<f64>>);

impl LinearObserver for GramReference {
    fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
        let rows: Vec<Vec<f32>> = input.to_vec2()?;
        let n = linear.in_features();
        let acc = self
            .0
            .entry(linear.name().to_string())
            .or_insert_with(|| vec![0.0; n * n]);
        for row in rows {
            for i in 0..n {
                for j in 0..n {
                    acc[i * n + j] += f64::from(row[i]) * f64::from(row[j]);
                }
            }
        }
        Ok(())
    }
}

/// The input Hessians SparseGPT works from: `XᵀX / tokens` of every block linear, against the
/// explicit-loop reference; one shared matrix for layers reading the same input (q/k/v,
/// gate/up), distinct ones for o and down; and, on a real layer with its real inputs, the OBS
/// update under a fixed mask reconstructs the layer's outputs far better than masking alone.
#[test]
fn input_hessians_are_shared_and_drive_the_obs_update() {
    use espalier::obs::{ObsUpdate, inverse_factor};

    let model = tiny();
    let text = std::fs::read_to_string(calibration_text()).unwrap();
    let set = CalibrationSet::from_text(
        &text,
        &calibration_text(),
        &Tokenizer::bytes(),
        SAMPLES,
        SEQ_LEN,
    )
    .unwrap();
    let session = Session::new(&model).unwrap();
    let mut reference = GramReference(BTreeMap::new());
    for seq in &set.sequences {
        session
            .hidden_states(seq, None, Some(&mut reference))
            .unwrap();
    }
    let tokens = (SAMPLES * SEQ_LEN) as u64;
    let cal = Calibrator::new(model.clone(), Arc::new(set));
    for name in names(&model, "") {
        let h = cal.hessian(&name).unwrap();
        assert_eq!(h.tokens(), tokens, "{name}");
        let want = &reference.0[&name];
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (got, want) in h.mean().iter().zip(want) {
            let want = want / tokens as f64;
            assert!(
                (got - want).abs() <= 1e-5 * scale,
                "{name}: {got} vs {want}"
            );
        }
    }
    let one = |p: &str| cal.hessian(&names(&model, p)[0]).unwrap();
    assert!(Arc::ptr_eq(&one("q_proj"), &one("k_proj")));
    assert!(Arc::ptr_eq(&one("q_proj"), &one("v_proj")));
    assert!(Arc::ptr_eq(&one("gate_proj"), &one("up_proj")));
    assert!(!Arc::ptr_eq(&one("q_proj"), &one("o_proj")));
    assert!(!Arc::ptr_eq(&one("up_proj"), &one("down_proj")));
    assert!(!Arc::ptr_eq(&one("gate_proj"), &one("q_proj")));
    let err = cal.hessian("lm_head.weight").unwrap_err();
    assert!(err.contains("`lm_head.weight`"), "{err}");

    // Half of each row of down_proj removed (the smaller half by magnitude), then
    // reconstructed: the output error on the calibration inputs, ‖(W − W′)·Xᵀ‖² = tr(ΔHΔᵀ),
    // drops well below plain masking's.
    let name = names(&model, "down_proj").remove(0);
    let w: Vec<Vec<f32>> = model.weight(&name).unwrap().to_vec2().unwrap();
    let (rows, cols) = (w.len(), w[0].len());
    let removed: Vec<bool> = w
        .iter()
        .flat_map(|row| {
            let keep = top_k(&row.iter().map(|x| x.abs()).collect::<Vec<_>>(), cols / 2);
            keep.into_iter().map(|k| !k).collect::<Vec<_>>()
        })
        .collect();
    let h = cal.hessian(&name).unwrap();
    let hm = h.mean();
    let factor = Arc::new(inverse_factor(&hm, cols, 0.01, h.tokens(), &name).unwrap());
    let flat: Vec<f32> = w.iter().flatten().copied().collect();
    let mut up = ObsUpdate::new(&name, flat.clone(), rows, factor, 16).unwrap();
    up.process(0, cols, &removed).unwrap();
    let updated = up.finish().unwrap();
    let error = |v: &[f32]| -> f64 {
        (0..rows)
            .map(|r| {
                let d: Vec<f64> = (0..cols)
                    .map(|j| f64::from(flat[r * cols + j]) - f64::from(v[r * cols + j]))
                    .collect();
                (0..cols)
                    .map(|i| {
                        (0..cols)
                            .map(|j| d[i] * hm[i * cols + j] * d[j])
                            .sum::<f64>()
                    })
                    .sum::<f64>()
            })
            .sum()
    };
    let masked: Vec<f32> = flat
        .iter()
        .zip(&removed)
        .map(|(&x, &r)| if r { 0.0 } else { x })
        .collect();
    for (u, &r) in updated.iter().zip(&removed) {
        assert!(!r || *u == 0.0);
    }
    let (e_upd, e_mask) = (error(&updated), error(&masked));
    assert!(e_upd < 0.7 * e_mask, "{e_upd} vs {e_mask}");
}
