//! Gradient-based criteria through the 0.3 WIT: `taylor` (|w · dL/dw|) checked mask for mask
//! against a reference computed here from the engine's gradients (themselves matched against
//! PyTorch in `engine/tests/golden.rs`), and the `sensitivity` allocator's budgets checked
//! against loss increases measured here, its bounds, its global density and its determinism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use espalier::app::RunResult;
use espalier::calibration::{CalibrationSet, Calibrator};
use espalier::mask::{Mask, Structure};
use espalier_engine::{LossGradients, Model, Session, Tokenizer};

mod common;
use common::{block_linears, mask_of, run, top_k};

const SAMPLES: usize = 4;
const SEQ_LEN: usize = 32;

fn calibration_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt")
}

fn pipeline(stages: &str) -> String {
    format!(
        "model = \"builtin:tiny-llama\"\n[calibration]\ntext = {:?}\nsamples = {SAMPLES}\nseq_len = {SEQ_LEN}\n{stages}",
        calibration_text().display().to_string()
    )
}

fn tiny() -> Model {
    espalier_engine::load_model("builtin:tiny-llama").expect("built-in model")
}

fn calibration_set() -> CalibrationSet {
    let text = std::fs::read_to_string(calibration_text()).unwrap();
    CalibrationSet::from_text(
        &text,
        &calibration_text(),
        &Tokenizer::bytes(),
        SAMPLES,
        SEQ_LEN,
    )
    .unwrap()
}

/// Per block linear, |w · g| (first order) and w² · F (Fisher), g and F from the engine
/// directly, in the host kernels' f32 arithmetic.
fn reference_scores(model: &Model, fisher: bool) -> BTreeMap<String, Vec<Vec<f32>>> {
    let set = calibration_set();
    let session = Session::new(model).unwrap();
    let mut grads = LossGradients::new(&session).unwrap().with_squares();
    grads.accumulate(&set.sequences).unwrap();
    let stats = grads.finish().unwrap();
    let source = if fisher {
        stats.mean_squares.unwrap()
    } else {
        stats.mean
    };
    block_linears(model)
        .into_iter()
        .map(|name| {
            let w: Vec<Vec<f32>> = model.weight(&name).unwrap().to_vec2().unwrap();
            let g: Vec<Vec<f32>> = source[&name].to_vec2().unwrap();
            let s = w
                .iter()
                .zip(&g)
                .map(|(w, g)| {
                    w.iter()
                        .zip(g)
                        .map(|(w, g)| if fisher { w * w * g } else { (w * g).abs() })
                        .collect()
                })
                .collect();
            (name, s)
        })
        .collect()
}

#[test]
fn taylor_keeps_the_largest_first_order_importances() {
    let model = tiny();
    let scores = reference_scores(&model, false);
    let density = 0.3;
    let layer = run(&pipeline(&format!(
        "[[stage]]\nplugin = \"taylor\"\ndensity = {density}\n"
    )))
    .unwrap();
    let row = run(&pipeline(&format!(
        "[[stage]]\nplugin = \"taylor\"\ndensity = {density}\nscope = \"row\"\n"
    )))
    .unwrap();
    let nm = run(&pipeline("[[stage]]\nplugin = \"taylor\"\nn = 2\nm = 4\n")).unwrap();
    for (name, s) in &scores {
        let flat: Vec<f32> = s.iter().flatten().copied().collect();
        let k = (density * flat.len() as f64).round() as usize;
        assert_eq!(mask_of(&layer, name), top_k(&flat, k), "{name} (layer)");
        let per_row = (density * s[0].len() as f64).round() as usize;
        let expected: Vec<bool> = s.iter().flat_map(|r| top_k(r, per_row)).collect();
        assert_eq!(mask_of(&row, name), expected, "{name} (row)");
        let expected: Vec<bool> = s
            .iter()
            .flat_map(|r| r.chunks(4).flat_map(|g| top_k(g, 2)).collect::<Vec<_>>())
            .collect();
        assert_eq!(mask_of(&nm, name), expected, "{name} (2:4)");
    }
    // The scores are not magnitudes in disguise: some layer keeps other weights than |w| would.
    let magnitude = run(&pipeline(&format!(
        "[[stage]]\nplugin = \"magnitude\"\ndensity = {density}\n"
    )))
    .unwrap();
    assert!(
        scores
            .keys()
            .any(|n| mask_of(&magnitude, n) != mask_of(&layer, n))
    );
}

#[test]
fn taylor_fisher_keeps_the_largest_second_order_estimates() {
    let model = tiny();
    let scores = reference_scores(&model, true);
    let density = 0.4;
    let run = run(&pipeline(&format!(
        "[[stage]]\nplugin = \"taylor\"\ndensity = {density}\nestimate = \"fisher\"\n"
    )))
    .unwrap();
    let first_order = reference_scores(&model, false);
    let mut differs = false;
    for (name, s) in &scores {
        let flat: Vec<f32> = s.iter().flatten().copied().collect();
        let k = (density * flat.len() as f64).round() as usize;
        let expected = top_k(&flat, k);
        assert_eq!(mask_of(&run, name), expected, "{name}");
        let fo: Vec<f32> = first_order[name].iter().flatten().copied().collect();
        differs |= top_k(&fo, k) != expected;
    }
    assert!(
        differs,
        "the Fisher estimate must rank differently from |w·g| somewhere"
    );
}

#[test]
fn taylor_parameter_mistakes_are_clear() {
    for (params, says) in [
        ("scope = \"col\"", "scope = \"col\""),
        ("n = 2\nm = 4\nblock = [4, 4]", "not both"),
        ("block = [4]", "`block` must be [rows, cols]"),
        ("estimate = \"hessian\"", "estimate = \"hessian\""),
    ] {
        let err = run(&pipeline(&format!(
            "[[stage]]\nplugin = \"taylor\"\ndensity = 0.5\n{params}\n"
        )))
        .err()
        .expect("must fail")
        .to_string();
        assert!(err.contains(says), "{err}");
    }
}

/// Loss increase of each group of layers (names) pruned by magnitude to `density` together.
fn measured_increases(model: &Model, groups: &[Vec<String>], density: f64) -> Vec<f64> {
    let cal = Calibrator::new(model.clone(), Arc::new(calibration_set()));
    let base = cal.loss().unwrap();
    let layers = model.layers();
    groups
        .iter()
        .map(|group| {
            let changes: Vec<(String, Mask)> = layers
                .iter()
                .filter(|l| group.contains(&l.name))
                .map(|l| {
                    let w: Vec<f32> = model
                        .weight(&l.name)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let scores: Vec<f32> = w.iter().map(|x| x * x).collect();
                    let k = (density * w.len() as f64).round() as usize;
                    let mask =
                        Mask::new(l.shape.clone(), top_k(&scores, k), Structure::Unstructured)
                            .unwrap();
                    (l.name.clone(), mask)
                })
                .collect();
            let refs: Vec<(&str, &Mask)> = changes.iter().map(|(l, m)| (l.as_str(), m)).collect();
            cal.loss_with_masks(&refs).unwrap() - base
        })
        .collect()
}

fn sensitivity_run(extra: &str) -> RunResult {
    run(&pipeline(&format!(
        "[[stage]]\nname = \"budgets\"\nplugin = \"sensitivity\"\ndensity = 0.5\n{extra}\
         [[stage]]\nplugin = \"magnitude\"\ndensity = \"budget\"\n"
    )))
    .unwrap()
}

/// Δ(d) of a curve of `(density, increase)` points, made non-increasing in density and linear
/// between points (the allocator's definition, restated).
fn increase_at(points: &[(f64, f64)], d: f64) -> f64 {
    let mut c = points.to_vec();
    for i in (0..c.len() - 1).rev() {
        c[i].1 = c[i].1.max(c[i + 1].1);
    }
    for w in c.windows(2) {
        if d <= w[1].0 {
            let t = (d - w[0].0) / (w[1].0 - w[0].0);
            return w[0].1 + t * (w[1].1 - w[0].1);
        }
    }
    0.0
}

/// Checks the equal-loss allocation of one run: every group strictly between its lowest probe
/// and the upper bound sits at the same loss increase ε; groups at the lowest probe cost at least
/// ε, groups at the upper bound at most ε (all against curves measured here).
fn check_equal_loss(model: &Model, groups: &[Vec<String>], budgets: &BTreeMap<String, f64>) {
    let probes = [0.3, 0.5, 0.7];
    let curves: Vec<Vec<(f64, f64)>> = {
        let per_probe: Vec<Vec<f64>> = probes
            .iter()
            .map(|&d| measured_increases(model, groups, d))
            .collect();
        (0..groups.len())
            .map(|g| {
                let mut c: Vec<(f64, f64)> = probes
                    .iter()
                    .zip(&per_probe)
                    .map(|(&d, v)| (d, v[g]))
                    .collect();
                c.push((1.0, 0.0));
                c
            })
            .collect()
    };
    let mut interior = Vec::new();
    for (group, curve) in groups.iter().zip(&curves) {
        let d = budgets[&group[0]];
        for name in group {
            assert_eq!(budgets[name], d, "{name} shares its group's budget");
        }
        let at = increase_at(curve, d);
        if d > 0.3 + 1e-9 && d < 1.0 - 1e-9 {
            interior.push((group[0].clone(), d, at));
        }
    }
    assert!(!interior.is_empty(), "{budgets:?}");
    let eps = interior[0].2;
    for (name, d, at) in &interior {
        assert!(
            (at - eps).abs() < 1e-6 * eps.abs().max(1e-3),
            "{name} at {d} costs {at}, others {eps}: {interior:?}"
        );
    }
    for (group, curve) in groups.iter().zip(&curves) {
        let d = budgets[&group[0]];
        if d <= 0.3 + 1e-9 {
            assert!(increase_at(curve, d) >= eps - 1e-9, "{}", group[0]);
        }
    }
}

#[test]
fn sensitivity_gives_every_group_the_same_loss_increase() {
    let model = tiny();
    let names = block_linears(&model);
    let blocks: Vec<Vec<String>> = (0..model.config.num_layers)
        .map(|b| {
            model
                .layers()
                .into_iter()
                .filter(|l| l.role.is_block_linear() && l.block == Some(b))
                .map(|l| l.name)
                .collect()
        })
        .collect();
    let singles: Vec<Vec<String>> = names.iter().map(|n| vec![n.clone()]).collect();
    for (extra, groups) in [
        ("spread = 0.2\n", &blocks),
        ("granularity = \"layer\"\nspread = 0.2\n", &singles),
    ] {
        let result = sensitivity_run(extra);
        let budgets = &result.report.stages[0].budgets;
        assert_eq!(budgets.len(), names.len());
        check_equal_loss(&model, groups, budgets);
        // The parameter-weighted mean is the stage's density, and the next stage applied it.
        let (mut kept_sum, mut total) = (0.0, 0.0);
        for name in &names {
            let numel = model.weight(name).unwrap().elem_count() as f64;
            kept_sum += budgets[name] * numel;
            total += numel;
            let kept = result.state.kept(name) as f64;
            assert!(
                (kept / numel - budgets[name]).abs() <= 1.0 / numel,
                "{name}"
            );
        }
        assert!(
            (kept_sum / total - 0.5).abs() < 1e-9,
            "{extra}: {}",
            kept_sum / total
        );
        let distinct: std::collections::BTreeSet<u64> =
            budgets.values().map(|d| d.to_bits()).collect();
        assert!(distinct.len() > 1, "{extra}: {budgets:?}");
        // Deterministic: the same run gives the same budgets, bit for bit.
        let again = sensitivity_run(extra);
        assert_eq!(&again.report.stages[0].budgets, budgets);
    }
}

#[test]
fn sensitivity_respects_bounds_per_layer_and_owl() {
    let model = tiny();
    let names = block_linears(&model);
    for params in [
        "granularity = \"layer\"\nspread = 0.5\nmin_density = 0.3\nmax_density = 0.7",
        "method = \"owl\"\nspread = 0.3\nmin_density = 0.35\nmax_density = 0.6",
        "probe_block = [8, 8]\nprobe_densities = [0.25, 0.4]",
    ] {
        let result = sensitivity_run(&format!("{params}\n"));
        let budgets = &result.report.stages[0].budgets;
        assert_eq!(budgets.len(), names.len(), "{params}");
        let (lo, hi) = if params.contains("min_density = 0.3\n") {
            (0.3, 0.7)
        } else if params.contains("owl") {
            (0.35, 0.6)
        } else {
            (0.0, 1.0)
        };
        let mut total = (0.0, 0.0);
        for name in &names {
            let d = budgets[name];
            assert!(
                (lo - 1e-12..=hi + 1e-12).contains(&d),
                "{params}: {name} {d}"
            );
            let n = model.weight(name).unwrap().elem_count() as f64;
            total = (total.0 + d * n, total.1 + n);
        }
        assert!((total.0 / total.1 - 0.5).abs() < 1e-9, "{params}");
        let distinct: std::collections::BTreeSet<u64> =
            budgets.values().map(|d| d.to_bits()).collect();
        assert!(
            distinct.len() > 1,
            "{params}: budgets must differ: {budgets:?}"
        );
    }
}

#[test]
fn sensitivity_mistakes_are_clear() {
    for (stage, says) in [
        (
            "min_density = 0.6\n",
            "lies outside [min_density, max_density]",
        ),
        ("method = \"hessian\"\n", "method = \"hessian\""),
        (
            "min_density = 0.8\nmax_density = 0.2\n",
            "must satisfy 0 <= min <= max <= 1",
        ),
    ] {
        let err = run(&pipeline(&format!(
            "[[stage]]\nplugin = \"sensitivity\"\ndensity = 0.5\n{stage}[[stage]]\nplugin = \"block\"\ndensity = \"budget\"\nblock = [4, 4]\n"
        )))
        .err()
        .expect("must fail")
        .to_string();
        assert!(err.contains(says), "{err}");
    }
    // Without calibration text the gradient and loss needs are refused at planning.
    if !Path::new("data/calibration.txt").exists() {
        let err =
            run("model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"taylor\"\ndensity = 0.5\n")
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("needs calibration data"), "{err}");
    }
}

#[test]
fn plugins_built_against_wit_0_3_still_run_with_gradients() {
    // `legacy-v03` is first-order Taylor written against the frozen 0.3.0 WIT: the host serves
    // it in the 0.3 world (no `validate` is called, it has none), gradients included, and its
    // masks equal the built-in `taylor`'s.
    let legacy = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_legacy_v03.wasm");
    assert!(legacy.is_file(), "{} was not built", legacy.display());
    let plugin = espalier::plugin::registry::load_file(&common::app().runtime, &legacy).unwrap();
    assert_eq!(plugin.compiled.wit, espalier::plugin::WitVersion::V0_3);
    assert!(!plugin.compiled.reports_progress);
    let stage =
        |plugin: &str| pipeline(&format!("[[stage]]\nplugin = {plugin:?}\ndensity = 0.6\n"));
    let old = run(&stage(&legacy.display().to_string())).unwrap();
    let new = run(&stage("taylor")).unwrap();
    for name in block_linears(&tiny()) {
        assert_eq!(mask_of(&old, &name), mask_of(&new, &name), "{name}");
    }
}
