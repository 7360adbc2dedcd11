//! `espalier bench plugins`: what the sandbox costs. On a model of SmolLM2-135M's shapes it
//! runs the built-in criteria exactly as a pipeline would and splits each stage's time into
//! guest + boundary (instantiation, wasm execution, crossing into host imports and back),
//! host kernels, and validation/application of the masks. And `espalier bench decode`: batch-1
//! decode of a dense model and of it pruned, in the same process, in turn.

use espalier_engine::Model;
use serde::Serialize;

use crate::app::{App, AppError};
use crate::cancel::CancelToken;
use crate::events::Quiet;
use crate::pipeline::Pipeline;
use crate::plan::plan;
use crate::run::execute;

/// One benchmark case.
pub struct Case {
    /// Label shown in the table.
    pub label: &'static str,
    /// The `[[stage]]` body.
    pub stage: &'static str,
    /// Whether the criterion needs calibration statistics (a short shipped text is used).
    pub calibration: bool,
}

/// One case per built-in criterion, at the settings a pipeline would use: magnitude 50%,
/// block 16x16 80%, 2:4, Wanda 50%, Taylor 50%, sensitivity budgets at 50%, 2/3 of the heads.
pub const CASES: &[Case] = &[
    Case {
        label: "magnitude 50%",
        stage: "plugin = \"magnitude\"\ndensity = 0.5\n",
        calibration: false,
    },
    Case {
        label: "block 16x16 80%",
        stage: "plugin = \"block\"\ndensity = 0.2\nblock = [16, 16]\n",
        calibration: false,
    },
    Case {
        label: "2:4",
        stage: "plugin = \"n-m\"\nn = 2\nm = 4\n",
        calibration: false,
    },
    Case {
        label: "wanda 50%",
        stage: "plugin = \"wanda\"\ndensity = 0.5\n",
        calibration: true,
    },
    Case {
        label: "taylor 50%",
        stage: "plugin = \"taylor\"\ndensity = 0.5\n",
        calibration: true,
    },
    Case {
        label: "sensitivity 50% (loss)",
        stage: "plugin = \"sensitivity\"\ndensity = 0.5\n",
        calibration: true,
    },
    Case {
        label: "heads 2/3",
        stage: "plugin = \"heads\"\ntargets = [\"*.self_attn.*\"]\ndensity = 0.67\n",
        calibration: false,
    },
];

/// Calibration for the cases that need it: two sequences of 64 tokens of the shipped text,
/// enough to exercise every statistic without the bench measuring calibration instead of
/// the sandbox.
const CALIBRATION_SAMPLES: usize = 2;
const CALIBRATION_SEQ_LEN: usize = 64;

/// Median figures of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case label.
    pub label: String,
    /// Target layers.
    pub targets: usize,
    /// Weights in the targets.
    pub target_weights: usize,
    /// Whole stage, seconds.
    pub stage_seconds: f64,
    /// Guest + boundary + instantiation, seconds.
    pub guest_seconds: f64,
    /// Host kernels called by the plugin, seconds.
    pub host_kernel_seconds: f64,
    /// Validation and application, seconds.
    pub apply_seconds: f64,
    /// guest_seconds / stage_seconds.
    pub guest_share: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs every case `repeat` times on `model` and returns the medians.
pub fn bench_plugins(
    app: &App,
    model_ref: &str,
    model: &Model,
    repeat: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<CaseResult>, AppError> {
    // The calibration text is written out (plans read texts from files) and removed after.
    let calibration = std::env::temp_dir().join(format!(
        "espalier-bench-calibration-{}.txt",
        std::process::id()
    ));
    std::fs::write(&calibration, crate::evaluate::SHIPPED_TEXT)
        .map_err(|e| AppError::Runtime(format!("cannot write {}: {e}", calibration.display())))?;
    let result = run_cases(app, model_ref, model, repeat, &calibration, progress);
    let _ = std::fs::remove_file(&calibration);
    result
}

fn run_cases(
    app: &App,
    model_ref: &str,
    model: &Model,
    repeat: usize,
    calibration: &std::path::Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<CaseResult>, AppError> {
    let mut results = Vec::new();
    for case in CASES {
        let mut text = format!("model = {model_ref:?}\n");
        if case.calibration {
            text.push_str(&format!(
                "[calibration]\ntext = {:?}\nsamples = {CALIBRATION_SAMPLES}\nseq_len = {CALIBRATION_SEQ_LEN}\n",
                calibration.display().to_string()
            ));
        }
        text.push_str(&format!("[[stage]]\n{}", case.stage));
        let pipeline = Pipeline::parse("<bench>", &text)?;
        let planned = plan(pipeline, &app.registry(), &app.runtime, model)?;
        let targets = planned.stages[0].targets.len();
        let target_weights = planned.stages[0].targets.iter().map(|l| l.numel()).sum();
        let (mut total, mut guest, mut host, mut apply) = (vec![], vec![], vec![], vec![]);
        for i in 0..repeat.max(1) {
            progress(&format!("{} ({}/{})", case.label, i + 1, repeat.max(1)));
            let outcome = execute(
                &planned,
                &app.runtime,
                model.clone(),
                &mut Quiet,
                &CancelToken::new(),
            )?;
            let s = &outcome.report.stages[0];
            total.push(s.seconds);
            guest.push(s.guest_and_boundary_seconds + s.instantiate_seconds);
            host.push(s.host_kernel_seconds);
            apply.push(s.validate_apply_seconds);
        }
        let stage_seconds = median(total);
        let guest_seconds = median(guest);
        results.push(CaseResult {
            label: case.label.to_string(),
            targets,
            target_weights,
            stage_seconds,
            guest_seconds,
            host_kernel_seconds: median(host),
            apply_seconds: median(apply),
            guest_share: if stage_seconds > 0.0 {
                guest_seconds / stage_seconds
            } else {
                0.0
            },
        });
    }
    Ok(results)
}

/// `espalier bench decode`: batch-1 decode of the dense model and of the model a pipeline
/// prunes, in one process, on Espalier's sparse kernels.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeBench {
    /// Model reference, resolved.
    pub model: String,
    /// The model timed as the dense baseline: `model`, or for an export timed with its own
    /// masks, the model it was pruned from.
    pub dense_model: String,
    /// Pipeline name, or "the export's masks".
    pub pipeline: String,
    /// Weight storage of the dense baseline's linears (by default the pruned model's, so the
    /// ratio is the pruning's alone).
    pub dense_storage: String,
    /// Weight storage the pruned model's linears run in: the one asked for, or a packed
    /// export's own ("mixed" when its layers differ).
    pub storage: String,
    /// Dense decode: the median round by ms/token (peak RSS from the first round).
    pub dense: espalier_engine::eval::LatencyReport,
    /// Pruned decode: the median round by ms/token (peak RSS from the first round).
    pub pruned: espalier_engine::eval::LatencyReport,
    /// Decode tokens/s of every round, dense and pruned in turn.
    pub rounds: Vec<RoundTokensPerS>,
    /// Linear formats the pruned forward pass runs (format → layers).
    pub pruned_formats: std::collections::BTreeMap<String, usize>,
    /// Peak RSS while the pruned model decoded (first round, the dense session freed).
    pub pruned_peak_rss_bytes: Option<u64>,
    /// Bytes of weights each forward pass holds (`dense`, `pruned`).
    pub weight_bytes: WeightBytes,
    /// dense ms/token ÷ pruned ms/token, of the median rounds.
    pub decode_speedup: f64,
    /// Prompt tokens used.
    pub prompt_tokens: usize,
    /// Whether both generated the same token ids (greedy).
    pub same_generated_ids: bool,
    /// The machine's read bandwidth in GB/s, probed in this run right after the decodes: the
    /// ceiling for `weight_gb_per_s` of each.
    pub memory_bandwidth_gbps: f64,
}

/// One round of [`bench_decode`]: the dense model's decode, then the pruned one's.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoundTokensPerS {
    /// Dense decode tokens/s.
    pub dense: f64,
    /// Pruned decode tokens/s.
    pub pruned: f64,
}

/// What [`bench_decode`] measures besides the model and its pruning.
#[derive(Debug, Clone, Copy)]
pub struct DecodeBenchOptions {
    /// Prompt tokens (at least 1).
    pub prompt_tokens: usize,
    /// Tokens generated per decode (at least 2).
    pub new_tokens: usize,
    /// Weight storage of the pruned model's linears (ignored by a packed export); `None`: for
    /// an export timed with its own masks, the storage its run evaluated it in (its report),
    /// else f32.
    pub storage: Option<crate::sparse::Storage>,
    /// Weight storage of the dense baseline; `None`: the pruned model's (for a packed export,
    /// the dtype it was packed in when every packed layer shares one, else f32).
    pub dense_storage: Option<crate::sparse::Storage>,
    /// Rounds of dense-then-pruned decodes; each model's figures are its median round.
    pub rounds: usize,
}

/// Bytes of weights each forward pass holds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WeightBytes {
    /// The dense model.
    pub dense: usize,
    /// The pruned model, packed.
    pub pruned: usize,
}

/// What `bench_decode` needs to time a pruned export as it was exported.
struct ExportToTime {
    /// The model it was pruned from (its report's `model`, resolved); `None` when the report
    /// does not name one and the export holds its dense weights, which are then their own
    /// baseline.
    source: Option<String>,
    /// The storage its run evaluated it in (from its report's kernels), if the report says.
    evaluated_storage: Option<crate::sparse::Storage>,
}

/// Checks that `dir` is a pruned export (it holds `masks.safetensors`) and reads what timing it
/// needs; a folder that is not a pruned export gets an error that says to pass a pipeline. The
/// masks themselves are read later, one layer at a time, as the export loads packed.
fn export_to_time(
    app: &App,
    dir: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportToTime, AppError> {
    let path = std::path::Path::new(dir);
    let masks = crate::export::MaskFile::open(path)
        .map_err(AppError::Masks)?
        .ok_or_else(|| {
            AppError::Masks(format!(
                "{dir} holds no masks.safetensors (it is not a pruned export of `espalier run`): \
                 pass --pipeline P to prune it"
            ))
        })?;
    let evaluated_storage = masks.evaluated_storage();
    drop(masks);
    let source = std::fs::read(path.join("report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::report::RunReport>(&b).ok())
        .map(|r| r.model);
    let source = match source {
        Some(s) => Some(
            crate::fetch::resolve(&s, &app.config().models_dir, &mut |m| progress(m)).map_err(
                |e| {
                    AppError::Masks(format!(
                        "{dir}/report.json names `{s}` as the dense model it was pruned from, \
                         which cannot be loaded: {e}"
                    ))
                },
            )?,
        ),
        None if path.join(espalier_engine::packed::PACKED_FILE).exists() => {
            return Err(AppError::Masks(format!(
                "{dir} is a packed export whose report.json (missing or unreadable) does not name \
                 the dense model it was pruned from, and it holds no dense weights to be its \
                 own baseline: restore its report.json, or prune the dense model with \
                 --pipeline P"
            )));
        }
        None => None,
    };
    Ok(ExportToTime {
        source,
        evaluated_storage,
    })
}

/// A fixed prompt when no text is given (public-domain, from the Declaration of Independence).
const FALLBACK_PROMPT: &str = "When in the Course of human events, it becomes necessary for one people to dissolve the political bands which have connected them with another. ";

/// Measures decode latency of the dense model (`model_ref`) and of it pruned, on the sparse
/// kernels in `opts.storage`. The pruning is `pipeline`'s (run with no export and no
/// evaluation) or, with no pipeline, the masks `model_ref` was exported with
/// (`masks.safetensors`, as `generate` and `serve` read them): a fine-tuned export is timed as
/// it is, without rerunning what made it. The prompt is the first `prompt_tokens` tokens of
/// `prompt_text` (a fixed text if `None`).
///
/// The dense baseline is stored in `opts.dense_storage` (by default the pruned model's dtype)
/// and both are decoded `opts.rounds` times, in turn, because on a shared machine one decode's
/// speed drifts by tens of percent within minutes: taking each model's median round of
/// interleaved runs lets the drift move both alike. The first round runs each model with the
/// other's session freed, so its peak RSS is its own.
pub fn bench_decode(
    app: &App,
    model_ref: &str,
    pipeline: Option<Pipeline>,
    prompt_text: Option<&str>,
    opts: DecodeBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<DecodeBench, AppError> {
    use espalier_engine::eval::{latency, peak_rss_bytes};
    let DecodeBenchOptions {
        prompt_tokens,
        new_tokens,
        storage,
        rounds,
        ..
    } = opts;
    let rounds = rounds.max(1);
    let model_ref =
        crate::fetch::resolve(model_ref, &app.config().models_dir, &mut |m| progress(m))
            .map_err(|e| AppError::Model(espalier_engine::EngineError::Input(e.to_string())))?;
    let text = prompt_text.map_or_else(|| FALLBACK_PROMPT.repeat(8), str::to_string);
    let prompt_for = |model: &Model| -> Result<Vec<u32>, AppError> {
        let tok = espalier_engine::Tokenizer::for_model(model)?;
        let mut ids = tok.encode(&text)?;
        ids.truncate(prompt_tokens.max(1));
        Ok(ids)
    };

    // Without a pipeline the export's own masks prune it, and the dense baseline is the model
    // the export was pruned from (its report's `model`): a packed export holds no dense weights.
    let export = match &pipeline {
        Some(_) => None,
        None => Some(export_to_time(app, &model_ref, progress)?),
    };
    let dense_ref = match &export {
        Some(ExportToTime {
            source: Some(source),
            ..
        }) => source.clone(),
        _ => model_ref.clone(),
    };
    // An export runs in the storage its run evaluated it in, as `eval` and `generate` run it.
    let storage = storage
        .or(export.as_ref().and_then(|e| e.evaluated_storage))
        .unwrap_or_default();
    let dense_storage = match (opts.dense_storage, &export) {
        (Some(s), _) => s,
        (None, Some(_)) => {
            crate::sparse::checkpoint_storage(std::path::Path::new(&model_ref))?.unwrap_or(storage)
        }
        (None, None) => storage,
    };
    // The dense model with every linear packed dense in `dense_storage` (f32 stays on the
    // engine's own path, as the pruned model's unpruned layers do).
    let dense_session = || -> Result<(espalier_engine::Session, usize, Vec<u32>), AppError> {
        let model = espalier_engine::load_model(&dense_ref)?;
        let prompt = prompt_for(&model)?;
        let mut session = espalier_engine::Session::new(&model)?;
        let attached = crate::sparse::attach(
            &mut session,
            &model,
            &std::collections::BTreeMap::new(),
            dense_storage,
        )?;
        drop(model);
        // The peak from here on is the decode's, not the loading's or the packing's.
        crate::evaluate::reset_peak();
        Ok((session, attached.packed_model_bytes, prompt))
    };
    progress(&format!(
        "dense ({dense_ref}, {}): decoding {new_tokens} tokens after a {prompt_tokens}-token \
         prompt, {rounds} round(s) in turn with the pruned model",
        dense_storage.name()
    ));
    let (dense_bytes, first_dense) = {
        let (session, bytes, prompt) = dense_session()?;
        (bytes, latency(&session, &prompt, new_tokens)?)
    };

    let (pipeline_name, model, masks) = match (pipeline, export) {
        (_, Some(_)) => {
            // Each masked layer packed in `storage` as it is read, its dense copy never held (as
            // `generate` and `serve` load it); a packed checkpoint loads as packed.
            let (model, _) = crate::sparse::load_to_run(&model_ref, Some(storage), true)?;
            (
                "the export's masks".to_string(),
                model,
                std::collections::BTreeMap::new(),
            )
        }
        (Some(mut pipeline), None) => {
            progress(&format!("pruned: running pipeline `{}`", pipeline.name));
            let overrides = crate::app::RunOverrides {
                model: Some(model_ref.clone()),
                export_dir: None,
                no_export: true,
                force: false,
                ..crate::app::RunOverrides::default()
            };
            pipeline.evaluate = None;
            let name = pipeline.name.clone();
            let result = app.run_pipeline(pipeline, &overrides, &mut Quiet, &CancelToken::new())?;
            (name, result.state.model, result.state.masks)
        }
        (None, None) => return Err(AppError::Masks("no pipeline and no masks".into())),
    };
    let prompt = prompt_for(&model)?;
    let mut session = espalier_engine::Session::new(&model)?;
    let attached = crate::sparse::attach(&mut session, &model, &masks, storage)?;
    // Only the packed weights (and the layers left dense) stay alive for the measurement.
    drop((model, masks));
    progress(&format!(
        "pruned: decoding {new_tokens} tokens after a {prompt_tokens}-token prompt"
    ));
    crate::evaluate::reset_peak();
    let first_pruned = latency(&session, &prompt, new_tokens)?;
    let pruned_peak = peak_rss_bytes();
    let same_generated_ids = first_dense.generated == first_pruned.generated;
    let mut dense_runs = vec![first_dense];
    let mut pruned_runs = vec![first_pruned];
    if rounds > 1 {
        let (dense, _, dense_prompt) = dense_session()?;
        for round in 2..=rounds {
            progress(&format!("round {round}/{rounds}: dense, then pruned"));
            dense_runs.push(latency(&dense, &dense_prompt, new_tokens)?);
            pruned_runs.push(latency(&session, &prompt, new_tokens)?);
        }
    }
    let round_figures = dense_runs
        .iter()
        .zip(&pruned_runs)
        .map(|(d, p)| RoundTokensPerS {
            dense: d.decode_tokens_per_s,
            pruned: p.decode_tokens_per_s,
        })
        .collect();
    let first_peaks = (dense_runs[0].peak_rss_bytes, pruned_runs[0].peak_rss_bytes);
    let mut dense = median_round(dense_runs);
    let mut pruned = median_round(pruned_runs);
    (dense.peak_rss_bytes, pruned.peak_rss_bytes) = first_peaks;
    progress("probing the memory bandwidth");
    let memory_bandwidth_gbps = espalier_kernels::bench::memory_bandwidth_gbps();
    Ok(DecodeBench {
        memory_bandwidth_gbps,
        model: model_ref,
        dense_model: dense_ref,
        pipeline: pipeline_name,
        dense_storage: dense_storage.name().to_string(),
        storage: match attached.packed_storage {
            Some(s) => s.name().to_string(),
            None if attached.formats.is_empty() => storage.name().to_string(),
            None => "mixed".to_string(),
        },
        decode_speedup: dense.ms_per_token / pruned.ms_per_token,
        same_generated_ids,
        prompt_tokens: prompt.len(),
        dense,
        pruned,
        rounds: round_figures,
        pruned_formats: attached.formats.clone(),
        pruned_peak_rss_bytes: pruned_peak,
        weight_bytes: WeightBytes {
            dense: dense_bytes,
            pruned: attached.packed_model_bytes,
        },
    })
}

/// The round with the median ms/token (the slower of the two middle ones for an even count).
fn median_round(
    mut runs: Vec<espalier_engine::eval::LatencyReport>,
) -> espalier_engine::eval::LatencyReport {
    runs.sort_by(|a, b| a.ms_per_token.total_cmp(&b.ms_per_token));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use espalier_engine::eval::LatencyReport;

    fn report(ms_per_token: f64, generated: u32) -> LatencyReport {
        LatencyReport {
            prompt_tokens: 8,
            new_tokens: 2,
            prefill_ms: 1.0,
            prefill_tokens_per_s: 8000.0,
            ms_per_token,
            decode_tokens_per_s: 1000.0 / ms_per_token,
            decode_steps: 1,
            weight_bytes_per_token: 0,
            weight_gb_per_s: 0.0,
            generated: vec![generated],
            peak_rss_bytes: None,
        }
    }

    #[test]
    fn the_median_round_is_the_middle_one_by_time() {
        let runs = vec![report(9.0, 0), report(7.0, 1), report(12.0, 2)];
        assert_eq!(median_round(runs).generated, vec![0]);
        // An even count takes the slower of the two middle rounds; one round is itself.
        let runs = vec![
            report(5.0, 0),
            report(8.0, 1),
            report(6.0, 2),
            report(9.0, 3),
        ];
        assert_eq!(median_round(runs).generated, vec![1]);
        assert_eq!(median_round(vec![report(3.0, 7)]).generated, vec![7]);
    }
}
