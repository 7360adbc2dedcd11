//! Documented claims, each checked so that breaking it fails a test: stages compose by
//! intersection; every output-validation rule of `run.rs` (through the `forge-*` test plugins,
//! which return a chosen malformed output); OWL budgets and `calibration.loss-with-masks`
//! against computations made here from the engine's forward pass and the weights; `heads` with
//! `granularity = "group"` and `taylor` with blocks against references.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use espalier::calibration::CalibrationSet;
use espalier::cancel::CancelToken;
use espalier::events::Quiet;
use espalier::pipeline::Pipeline;
use espalier::run::execute;
use espalier_engine::{
    EngineError, Linear, LinearObserver, LossGradients, Model, Session, Tokenizer,
};
use serde_json::Value;

mod common;
use common::{app, block_linears, mask_of, run, top_k};

const SAMPLES: usize = 4;
const SEQ_LEN: usize = 32;
const TINY: &str = "model = \"builtin:tiny-llama\"\n";

fn tiny() -> Model {
    espalier_engine::load_model("builtin:tiny-llama").expect("built-in model")
}

fn calibration_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt")
}

fn calibration_section() -> String {
    format!(
        "[calibration]\ntext = {:?}\nsamples = {SAMPLES}\nseq_len = {SEQ_LEN}\n",
        calibration_text().display().to_string()
    )
}

/// The calibration sequences a `[calibration]` section above gives the built-in models.
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

/// A test plugin built next to the built-ins (`plugins/testing/<name>`).
fn test_plugin(stem: &str) -> String {
    let path =
        PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR).join(format!("{stem}.wasm"));
    assert!(path.is_file(), "{} was not built", path.display());
    format!("{:?}", path.display().to_string())
}

/// Row-major values and `[rows, cols]` of a weight.
fn values(model: &Model, name: &str) -> (Vec<f32>, usize, usize) {
    let w = model.weight(name).unwrap();
    let (r, c) = w.dims2().unwrap();
    (w.flatten_all().unwrap().to_vec1().unwrap(), r, c)
}

fn names(model: &Model, pattern: &str) -> Vec<String> {
    block_linears(model)
        .into_iter()
        .filter(|n| n.contains(pattern))
        .collect()
}

fn fails(text: &str) -> String {
    run(text)
        .err()
        .unwrap_or_else(|| panic!("must fail:\n{text}"))
        .to_string()
}

/// Keeps the blocks of `[r, c]` scores (row-major) with the largest sums, `density` of them.
fn top_blocks(scores: &[f64], r: usize, c: usize, br: usize, bc: usize, density: f64) -> Vec<bool> {
    let (gr, gc) = (r / br, c / bc);
    let mut sums = vec![0.0f64; gr * gc];
    for i in 0..r {
        for j in 0..c {
            sums[(i / br) * gc + j / bc] += scores[i * c + j];
        }
    }
    let kept = top_k(&sums, (density * sums.len() as f64).round() as usize);
    (0..r * c)
        .map(|e| kept[(e / c / br) * gc + (e % c) / bc])
        .collect()
}

fn and(a: &[bool], b: &[bool]) -> Vec<bool> {
    a.iter().zip(b).map(|(x, y)| *x && *y).collect()
}

#[test]
fn stages_compose_by_intersection() {
    let model = tiny();
    // Stage 2 keeps the first half of every layer in row-major order, whatever the weights:
    // its own mask is known exactly, so the final mask must be magnitude's AND it.
    let result = run(&format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = {}\ndensity = 0.5\nmode = \"first\"\n",
        test_plugin("espalier_test_forge_masks")
    ))
    .unwrap();
    // The same with a real criterion: 8×8 blocks ranked by the L2 norm of the weights stage 1
    // left (pruned weights are zeros), computed here.
    let blocks = run(&format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"block\"\ndensity = 0.5\nblock = [8, 8]\n"
    ))
    .unwrap();
    for name in block_linears(&model) {
        let (w, r, c) = values(&model, &name);
        let n = w.len();
        let abs: Vec<f32> = w.iter().map(|x| x.abs()).collect();
        let first = top_k(&abs, n / 2);
        let half: Vec<bool> = (0..n).map(|i| i < n / 2).collect();
        let expected = and(&first, &half);
        assert_ne!(
            expected, half,
            "{name}: the check must tell AND from replace"
        );
        assert_eq!(mask_of(&result, &name), expected, "{name}");

        let squares: Vec<f64> = w
            .iter()
            .zip(&first)
            .map(|(x, k)| if *k { f64::from(*x).powi(2) } else { 0.0 })
            .collect();
        let second = top_blocks(&squares, r, c, 8, 8, 0.5);
        let expected = and(&first, &second);
        assert_ne!(expected, second, "{name}");
        assert_eq!(mask_of(&blocks, &name), expected, "{name} (blocks)");
        // The model holds the weights with the combined mask applied.
        let (pruned, _, _) = values(&blocks.state.model, &name);
        for i in 0..n {
            assert_eq!(
                pruned[i],
                if expected[i] { w[i] } else { 0.0 },
                "{name}[{i}]"
            );
        }
    }
}

/// A stage of `forge-masks` over the MLP of block 0 at density 0.5.
fn forge_masks(targets: &str, params: &str) -> String {
    format!(
        "{TINY}[[stage]]\nplugin = {}\ntargets = [{targets}]\ndensity = 0.5\n{params}\n",
        test_plugin("espalier_test_forge_masks")
    )
}

#[test]
fn malformed_masks_are_refused_naming_the_plugin_and_the_cause() {
    let model = tiny();
    let mlp0 = names(&model, "layers.0.mlp.");
    assert_eq!(mlp0.len(), 3);
    let targets = "\"model.layers.0.mlp.*\"";
    run(&forge_masks(targets, "mode = \"exact\"")).expect("the valid output passes");
    let other = names(&model, "layers.1.mlp.")[0].clone();
    let cases = [
        (
            format!("mode = \"non-target\"\nlayer = {other:?}"),
            format!("a mask for `{other}`, which is not a target of this stage"),
        ),
        (
            "mode = \"duplicate\"".into(),
            format!("two masks for `{}`", mlp0[0]),
        ),
        (
            "mode = \"missing\"".into(),
            format!("no mask for target `{}`", mlp0[2]),
        ),
        (
            "mode = \"shape\"".into(),
            format!("the mask for `{}` has shape", mlp0[0]),
        ),
        (
            "mode = \"budgets\"".into(),
            "a mask plugin returned budgets or heads".into(),
        ),
        (
            "mode = \"heads\"".into(),
            "a mask plugin returned budgets or heads".into(),
        ),
    ];
    for (params, cause) in cases {
        let err = fails(&forge_masks(targets, &params));
        assert!(
            err.contains("plugin `forge-masks` returned an invalid result") && err.contains(&cause),
            "{params}: {err}"
        );
    }
}

#[test]
fn the_density_tolerance_holds_at_its_limits() {
    // The host accepts a stage's masks when their kept count is within one weight plus half a
    // group per layer of what was asked (a group of an unstructured mask is a row: per-row
    // selection rounds each row). Just inside passes, one weight further fails, both ways.
    let model = tiny();
    let up = names(&model, "layers.0.mlp.up_proj")[0].clone();
    let gate = names(&model, "layers.0.mlp.gate_proj")[0].clone();
    let rows = |n: &str| model.weight(n).unwrap().dims2().unwrap().0 as i64;
    let numel = |n: &str| model.weight(n).unwrap().elem_count();
    assert!(numel(&up) % 2 == 0 && rows(&up) % 2 == 0);
    let single = 1 + rows(&up) / 2;
    // Two targets: the slack adds up over layers (the offset is on the first target only).
    let both = 1 + rows(&up) / 2 + rows(&gate) / 2;
    for (targets, limit) in [
        (format!("{up:?}"), single),
        (format!("{gate:?}, {up:?}"), both),
    ] {
        for sign in [1, -1] {
            let inside = forge_masks(
                &targets,
                &format!("mode = \"offset\"\noffset = {}", sign * limit),
            );
            run(&inside).unwrap_or_else(|e| panic!("{targets} {}: {e}", sign * limit));
            let outside = forge_masks(
                &targets,
                &format!("mode = \"offset\"\noffset = {}", sign * (limit + 1)),
            );
            let err = fails(&outside);
            assert!(
                err.contains("plugin `forge-masks` returned an invalid result")
                    && err.contains("the stage asked for 50.00%"),
                "{targets} {}: {err}",
                sign * (limit + 1)
            );
        }
    }
}

/// `forge-budgets` over the MLP of block 0, feeding a magnitude stage.
fn forge_budgets(params: &str) -> String {
    format!(
        "{TINY}[[stage]]\nname = \"alloc\"\nplugin = {}\ntargets = [\"model.layers.0.mlp.*\"]\ndensity = 0.5\n{params}\n[[stage]]\nplugin = \"magnitude\"\ntargets = [\"model.layers.0.mlp.*\"]\ndensity = \"budget\"\n",
        test_plugin("espalier_test_forge_budgets")
    )
}

#[test]
fn malformed_budgets_are_refused_naming_the_plugin_and_the_cause() {
    let model = tiny();
    let mlp0 = names(&model, "layers.0.mlp.");
    let ok = run(&forge_budgets("mode = \"exact\"")).expect("the valid output passes");
    assert_eq!(ok.report.stages[0].budgets.len(), 3);
    let other = names(&model, "layers.1.mlp.")[0].clone();
    let first = &mlp0[0];
    let cases = [
        (
            "mode = \"nan\"".to_string(),
            format!("budget NaN for `{first}` is outside [0, 1]"),
        ),
        (
            "mode = \"negative\"".into(),
            format!("budget -0.1 for `{first}` is outside [0, 1]"),
        ),
        (
            "mode = \"above-one\"".into(),
            format!("budget 1.5 for `{first}` is outside [0, 1]"),
        ),
        (
            "mode = \"duplicate\"".into(),
            format!("two budgets for `{first}`"),
        ),
        (
            "mode = \"missing\"".into(),
            format!("no budget for target `{}`", mlp0[2]),
        ),
        (
            format!("mode = \"non-target\"\nlayer = {other:?}"),
            format!("a budget for `{other}`, which is not a target"),
        ),
        (
            "mode = \"masks\"".into(),
            "a budget plugin returned masks or heads".into(),
        ),
        (
            "mode = \"heads\"".into(),
            "a budget plugin returned masks or heads".into(),
        ),
    ];
    for (params, cause) in cases {
        let err = fails(&forge_budgets(&params));
        assert!(
            err.contains("stage `alloc`")
                && err.contains("plugin `forge-budgets` returned an invalid result")
                && err.contains(&cause),
            "{params}: {err}"
        );
    }
}

fn forge_heads(targets: &str, params: &str) -> String {
    format!(
        "{TINY}[[stage]]\nplugin = {}\ntargets = [{targets}]\ndensity = 0.5\n{params}\n",
        test_plugin("espalier_test_forge_heads")
    )
}

#[test]
fn malformed_head_choices_are_refused_naming_the_plugin_and_the_cause() {
    let all = "\"*.self_attn.*\"";
    let ok = run(&forge_heads(all, "mode = \"exact\"")).expect("the valid choice passes");
    assert_eq!(
        (
            ok.state.model.config.num_heads,
            ok.state.model.config.num_kv_heads
        ),
        (2, 2)
    );
    let cases = [
        (
            "\"model.layers.0.self_attn.*\"",
            "mode = \"non-target\"\nblock = 1",
            "heads for block 1, which has no target in this stage",
        ),
        (all, "mode = \"duplicate-block\"", "block 0 listed twice"),
        (
            all,
            "mode = \"duplicate-head\"",
            "block 0: a head is listed twice",
        ),
        (
            all,
            "mode = \"out-of-range\"",
            "block 0: head 11 does not exist (the model has 4)",
        ),
        (all, "mode = \"empty\"", "block 0: keeps no head"),
        (
            all,
            "mode = \"uneven-groups\"",
            "kept K/V groups keep different numbers of query heads",
        ),
        (
            all,
            "mode = \"uneven-blocks\"",
            "blocks keep different head counts",
        ),
        (
            all,
            "mode = \"masks\"",
            "a heads plugin returned masks or budgets",
        ),
        (
            all,
            "mode = \"budgets\"",
            "a heads plugin returned masks or budgets",
        ),
    ];
    for (targets, params, cause) in cases {
        let err = fails(&forge_heads(targets, params));
        assert!(
            err.contains("plugin `forge-heads` returned an invalid result") && err.contains(cause),
            "{params}: {err}"
        );
    }
}

/// Per block linear and input column: the mean over calibration sequences of the sum over each
/// sequence's tokens of x², from the engine's forward pass with an observer of our own.
struct SquaredInputs(BTreeMap<String, Vec<f64>>);

impl LinearObserver for SquaredInputs {
    fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
        let rows: Vec<Vec<f32>> = input.to_vec2()?;
        let acc = self
            .0
            .entry(linear.name().to_string())
            .or_insert_with(|| vec![0.0; linear.in_features()]);
        for row in rows {
            for (a, x) in acc.iter_mut().zip(row) {
                *a += f64::from(x) * f64::from(x);
            }
        }
        Ok(())
    }
}

fn activation_norms(model: &Model, set: &CalibrationSet) -> BTreeMap<String, Vec<f32>> {
    let session = Session::new(model).unwrap();
    let mut obs = SquaredInputs(BTreeMap::new());
    for seq in &set.sequences {
        session.hidden_states(seq, None, Some(&mut obs)).unwrap();
    }
    let n = set.sequences.len() as f64;
    obs.0
        .into_iter()
        .map(|(k, v)| (k, v.iter().map(|s| (s / n) as f32).collect()))
        .collect()
}

#[test]
fn owl_budgets_follow_outlier_ratios_computed_here() {
    // OWL (Yin et al., 2024): a layer's outlier ratio is the share of its Wanda scores
    // |w|·√(activation norm) above owl_m times the layer's mean score; ratios are min–max
    // normalised to r ∈ [0, 1]; layer g gets β + spread·(2 r_g − 1), β such that the
    // parameter-weighted mean is the stage's density. Spread and bounds are chosen so nothing
    // is clamped, so β has a closed form here (the plugin bisects).
    let (density, spread, owl_m) = (0.5, 0.1, 2.0);
    let model = tiny();
    let set = calibration_set();
    let norms = activation_norms(&model, &set);
    let layers = block_linears(&model);
    let mut ratios = Vec::new();
    let mut sizes = Vec::new();
    for name in &layers {
        let (w, _, c) = values(&model, name);
        let scores: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(i, x)| x.abs() * norms[name][i % c].sqrt())
            .collect();
        let mean = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len() as f64;
        let threshold = owl_m * mean;
        // No score sits so close to the threshold that f32 rounding (here or in the host's
        // kernels, ~1e-7 relative) could flip it.
        assert!(
            scores
                .iter()
                .all(|&s| (f64::from(s) - threshold).abs() > 1e-6 * threshold),
            "{name}: a score on the threshold"
        );
        let outliers = scores.iter().filter(|&&s| f64::from(s) > threshold).count();
        ratios.push(outliers as f64 / scores.len() as f64);
        sizes.push(scores.len() as f64);
    }
    let (lo, hi) = ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &r| {
            (a.min(r), b.max(r))
        });
    assert!(hi > lo, "ratios must differ: {ratios:?}");
    let offsets: Vec<f64> = ratios
        .iter()
        .map(|r| spread * (2.0 * (r - lo) / (hi - lo) - 1.0))
        .collect();
    let total: f64 = sizes.iter().sum();
    let beta = density - offsets.iter().zip(&sizes).map(|(o, n)| o * n).sum::<f64>() / total;

    let result = run(&format!(
        "{TINY}{}[[stage]]\nplugin = \"sensitivity\"\ndensity = {density}\nmethod = \"owl\"\ngranularity = \"layer\"\nspread = {spread}\nowl_m = {owl_m}\n[[stage]]\nplugin = \"magnitude\"\ndensity = \"budget\"\n",
        calibration_section()
    ))
    .unwrap();
    let budgets = &result.report.stages[0].budgets;
    assert_eq!(budgets.len(), layers.len());
    for ((name, offset), ratio) in layers.iter().zip(&offsets).zip(&ratios) {
        let expected = beta + offset;
        assert!(
            (0.0..=1.0).contains(&expected),
            "{name}: the reference would clamp"
        );
        let got = budgets[name];
        assert!(
            (got - expected).abs() < 1e-9,
            "{name} (outlier ratio {ratio}): budget {got}, expected {expected}"
        );
    }
}

/// A copy of `model` with magnitude masks at `density` applied to `layers` (reference top-k).
fn magnitude_masked(model: &Model, layers: &[&str], density: f64) -> Model {
    let mut out = model.clone();
    for name in layers {
        let (w, r, c) = values(model, name);
        let abs: Vec<f32> = w.iter().map(|x| x.abs()).collect();
        let keep = top_k(&abs, (density * w.len() as f64).round() as usize);
        let masked: Vec<f32> = w
            .iter()
            .zip(&keep)
            .map(|(x, k)| if *k { *x } else { 0.0 })
            .collect();
        let t = Tensor::from_vec(masked, (r, c), &Device::Cpu).unwrap();
        out.set_weight(name, t, false).unwrap();
    }
    out
}

/// The calibration loss as documented: mean over sequences of each one's mean next-token loss,
/// from full forward passes of the engine.
fn mean_loss(model: &Model, set: &CalibrationSet) -> f64 {
    let session = Session::new(model).unwrap();
    set.sequences
        .iter()
        .map(|s| f64::from(session.loss(s).unwrap()))
        .sum::<f64>()
        / set.sequences.len() as f64
}

#[test]
fn loss_trials_match_full_forward_passes_of_masked_models() {
    // Through the WIT: the probe plugin builds magnitude masks for a layer of block 1 and one of
    // block 0 (listed in that order: a trial must resume at the first block it changes, not at
    // the first layer named) and asks for the base loss, the loss with the first mask
    // (`loss-with-mask`) and with both (`loss-with-masks`).
    let model = tiny();
    let set = calibration_set();
    let late = "model.layers.1.mlp.down_proj.weight";
    let early = "model.layers.0.self_attn.o_proj.weight";
    let err = fails(&format!(
        "{TINY}{}[[stage]]\nplugin = {}\ndensity = 0.5\nmode = \"trial\"\nlayers = \"{late},{early}\"\ntrial_density = 0.3\n",
        calibration_section(),
        test_plugin("espalier_test_probe_sandbox")
    ));
    let at = err
        .find("probe report: ")
        .unwrap_or_else(|| panic!("{err}"));
    let report: Value = serde_json::Deserializer::from_str(&err[at + 14..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let base = mean_loss(&model, &set);
    let single = mean_loss(&magnitude_masked(&model, &[late], 0.3), &set);
    let both = mean_loss(&magnitude_masked(&model, &[late, early], 0.3), &set);
    // The three differ clearly, so a trial that dropped a change could not pass.
    assert!(
        (single - base).abs() > 1e-3 && (both - single).abs() > 1e-3,
        "{base} {single} {both}"
    );
    for (key, expected) in [("base", base), ("single", single), ("all", both)] {
        let got = report[key].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-5,
            "{key}: {got} through the plugin, {expected} from full forward passes"
        );
    }
}

#[test]
fn heads_by_group_keep_whole_kv_groups_scored_with_their_k_and_v() {
    // `granularity = "group"` keeps whole K/V groups: a group's score is its K and V rows'
    // squared norms plus, for each of its query heads, the Q rows' and O columns'. To show that
    // K (then V) counts, in each block the group that loses on everything else gets those rows
    // ×100: a plugin that left them out would keep the other group.
    let base = tiny();
    let cfg = base.config.clone();
    let (hd, heads, kv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let per = heads / kv;
    let sq = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>();
    let name = |b: usize, p: &str| format!("model.layers.{b}.self_attn.{p}_proj.weight");
    // Per group: (Q rows + O columns of its heads, K rows, V rows).
    let parts = |m: &Model, b: usize| -> Vec<[f64; 3]> {
        let (q, _, qc) = values(m, &name(b, "q"));
        let (o, or, oc) = values(m, &name(b, "o"));
        let (k, _, kc) = values(m, &name(b, "k"));
        let (v, _, vc) = values(m, &name(b, "v"));
        (0..kv)
            .map(|g| {
                let qo: f64 = (g * per..(g + 1) * per)
                    .map(|h| {
                        let cols: f64 = (0..or)
                            .map(|i| sq(&o[i * oc + h * hd..i * oc + (h + 1) * hd]))
                            .sum();
                        sq(&q[h * hd * qc..(h + 1) * hd * qc]) + cols
                    })
                    .sum();
                [
                    qo,
                    sq(&k[g * hd * kc..(g + 1) * hd * kc]),
                    sq(&v[g * hd * vc..(g + 1) * hd * vc]),
                ]
            })
            .collect()
    };
    for (boosted, part) in [(1, "k"), (2, "v")] {
        let mut model = base.clone();
        let mut winners = Vec::new();
        for b in 0..cfg.num_layers {
            let without: Vec<f64> = parts(&base, b)
                .iter()
                .map(|p| p.iter().sum::<f64>() - p[boosted])
                .collect();
            let loser = top_k(&without, 1).iter().position(|&k| !k).unwrap();
            let (mut w, r, c) = values(&base, &name(b, part));
            for x in &mut w[loser * hd * c..(loser + 1) * hd * c] {
                *x *= 100.0;
            }
            let t = Tensor::from_vec(w, (r, c), &Device::Cpu).unwrap();
            model.set_weight(&name(b, part), t, false).unwrap();
            // The reference on the modified model: every part counted, top 1 of 2 groups.
            let scores: Vec<f64> = parts(&model, b).iter().map(|p| p.iter().sum()).collect();
            let kept = top_k(&scores, 1).iter().position(|&k| k).unwrap();
            assert_eq!(kept, loser, "block {b}: the boosted {part} must decide");
            winners.push(kept);
        }

        let pipeline = Pipeline::parse(
            "test.toml",
            &format!(
                "{TINY}[[stage]]\nplugin = \"heads\"\ntargets = [\"*.self_attn.*\"]\ndensity = 0.5\ngranularity = \"group\"\n"
            ),
        )
        .unwrap();
        let plan =
            espalier::plan::plan(pipeline, &app().registry(), &app().runtime, &model).unwrap();
        let out = execute(
            &plan,
            &app().runtime,
            model.clone(),
            &mut Quiet,
            &CancelToken::new(),
        )
        .unwrap();
        let pruned = &out.state.model;
        assert_eq!(
            (pruned.config.num_heads, pruned.config.num_kv_heads),
            (per, 1)
        );
        for (b, &g) in winners.iter().enumerate() {
            // Q, K and V keep the group's rows, O its columns, bit for bit.
            for (p, rows_per) in [("q", per * hd), ("k", hd), ("v", hd)] {
                let (before, _, c) = values(&model, &name(b, p));
                let (after, r, _) = values(pruned, &name(b, p));
                assert_eq!(r, rows_per, "{part}: block {b} {p}");
                assert_eq!(
                    after,
                    before[g * rows_per * c..(g + 1) * rows_per * c],
                    "{part}: block {b} {p}"
                );
            }
            let (before, or, oc) = values(&model, &name(b, "o"));
            let (after, _, noc) = values(pruned, &name(b, "o"));
            assert_eq!(noc, per * hd);
            for i in 0..or {
                assert_eq!(
                    after[i * noc..(i + 1) * noc],
                    before[i * oc + g * per * hd..i * oc + (g + 1) * per * hd],
                    "{part}: block {b} o row {i}"
                );
            }
        }
    }
}

#[test]
fn taylor_blocks_keep_the_blocks_with_the_largest_summed_importance() {
    let model = tiny();
    let set = calibration_set();
    let session = Session::new(&model).unwrap();
    let mut grads = LossGradients::new(&session).unwrap().with_squares();
    grads.accumulate(&set.sequences).unwrap();
    let stats = grads.finish().unwrap();
    let fisher = stats.mean_squares.unwrap();
    let density = 0.5;
    for (estimate, source) in [("first-order", &stats.mean), ("fisher", &fisher)] {
        let result = run(&format!(
            "{TINY}{}[[stage]]\nplugin = \"taylor\"\ndensity = {density}\nblock = [8, 8]\nestimate = \"{estimate}\"\n",
            calibration_section()
        ))
        .unwrap();
        let by_magnitude = run(&format!(
            "{TINY}[[stage]]\nplugin = \"block\"\ndensity = {density}\nblock = [8, 8]\n"
        ))
        .unwrap();
        let mut differs = false;
        for name in block_linears(&model) {
            let (w, r, c) = values(&model, &name);
            let g: Vec<f32> = source[&name].flatten_all().unwrap().to_vec1().unwrap();
            // Element importances in the host kernels' f32 arithmetic, summed per block.
            let scores: Vec<f64> = w
                .iter()
                .zip(&g)
                .map(|(w, g)| {
                    f64::from(if estimate == "fisher" {
                        w * w * g
                    } else {
                        (w * g).abs()
                    })
                })
                .collect();
            let expected = top_blocks(&scores, r, c, 8, 8, density);
            assert_eq!(mask_of(&result, &name), expected, "{estimate} {name}");
            differs |= mask_of(&by_magnitude, &name) != expected;
        }
        assert!(
            differs,
            "{estimate}: the blocks are not chosen by |w| alone"
        );
    }
}
