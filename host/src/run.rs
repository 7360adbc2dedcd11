//! Executing a planned pipeline: each stage's plugin runs in its own sandboxed Store on a view
//! of the current model; its output is validated (names, shapes, structure, densities) before
//! anything is applied; masks compose with earlier ones; budgets feed later stages; head
//! choices cut the model physically. A failing stage fails the run and leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use espalier_engine::{LayerInfo, Model, Role};

use crate::calibration::{CalibrationSet, Calibrator};
use crate::cancel::CancelToken;
use crate::display_safe;
use crate::events::{EventSink, RunEvent};
use crate::heads::{self, HeadsChange};
use crate::mask::{Mask, Structure, rows_cols};
use crate::plan::{Plan, PlannedStage, StageDensity};
use crate::plugin::bindings::espalier::prune::model as wit_model;
use crate::plugin::bindings::{Need, OutputKind, StageContext, StageOutput, Target};
use crate::plugin::state::ModelView;
use crate::plugin::{CallTimings, Origin, PluginError, Progress, Runtime, Sandbox};
use crate::report::{
    CalibrationRecord, LayerReport, RunReport, SandboxRecord, StageReport, Summary,
};
use crate::tensor_util::{apply_mask, with_f32};
use candle_core::Tensor;

/// Where a calibration pass reports `(sequences done, total)`.
type PassProgress<'a> = &'a mut dyn FnMut(usize, usize);

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The plugin failed inside the sandbox.
    #[error("stage `{stage}`: {source}")]
    Plugin {
        /// Stage name.
        stage: String,
        /// What happened.
        source: PluginError,
    },
    /// The plugin returned something the host refuses to apply.
    #[error("stage `{stage}`: plugin `{plugin}` returned an invalid result: {message}")]
    InvalidOutput {
        /// Stage name.
        stage: String,
        /// Plugin name.
        plugin: String,
        /// What is wrong.
        message: String,
    },
    /// The run was cancelled from outside.
    #[error("stage `{stage}`: cancelled")]
    Cancelled {
        /// The stage that was running or about to run.
        stage: String,
    },
    /// Applying a valid result failed (out of memory, tensor error).
    #[error("stage `{stage}`: {message}")]
    Apply {
        /// Stage name.
        stage: String,
        /// What failed.
        message: String,
    },
}

/// The state a run builds up.
pub struct RunState {
    /// The model being pruned (weights with zeros in place, heads removed).
    pub model: Model,
    /// The mask of every pruned layer.
    pub masks: BTreeMap<String, Mask>,
    /// Element counts of every layer before the run (densities are relative to these).
    pub original_numel: BTreeMap<String, usize>,
    /// Head removals applied.
    pub heads: Option<HeadsChange>,
    /// Calibration statistics of the model as it is now; dropped whenever a stage changes the
    /// model, kept across stages that do not (a budget stage), so they are computed once.
    /// (Sequential calibration sets a block's own before each of its stages.)
    pub(crate) calibrator: Option<Arc<Calibrator>>,
    /// The weights as loaded (sharing storage with the model until a stage replaces them),
    /// kept only when a stage produces weights: a reconstruction needs the dense originals.
    original_weights: BTreeMap<String, Tensor>,
}

/// The outcome of a successful run.
pub struct RunOutcome {
    /// The pruned model and its masks.
    pub state: RunState,
    /// The report (also written as report.json on export).
    pub report: RunReport,
}

fn wit_role(role: Role) -> wit_model::Role {
    use wit_model::Role as W;
    match role {
        Role::Embedding => W::Embedding,
        Role::PositionEmbedding => W::PositionEmbedding,
        Role::AttnQ => W::AttnQ,
        Role::AttnK => W::AttnK,
        Role::AttnV => W::AttnV,
        Role::AttnQkv => W::AttnQkv,
        Role::AttnO => W::AttnO,
        Role::MlpGate => W::MlpGate,
        Role::MlpUp => W::MlpUp,
        Role::MlpDown => W::MlpDown,
        Role::LmHead => W::LmHead,
        Role::Norm => W::Norm,
        Role::Bias => W::Bias,
        Role::Other => W::Other,
    }
}

/// Converts an engine layer description to its WIT form.
pub fn wit_layer(l: &LayerInfo) -> wit_model::LayerInfo {
    wit_model::LayerInfo {
        name: l.name.clone(),
        role: wit_role(l.role),
        block: l.block.map(|b| b as u32),
        shape: l.shape.iter().map(|&d| d as u32).collect(),
        heads: l.heads.map(|h| h as u32),
        kv_heads: l.kv_heads.map(|h| h as u32),
        head_dim: l.head_dim.map(|h| h as u32),
    }
}

/// Builds the view of the model a plugin sees (shares weight storage with the model).
pub fn model_view(model: &Model, masks: &BTreeMap<String, Mask>) -> ModelView {
    ModelView {
        info: model_info(model),
        layers: model.layers().iter().map(wit_layer).collect(),
        weights: model.weights().clone(),
        masks: masks.clone(),
        original_weights: BTreeMap::new(),
        calibration: None,
    }
}

/// The architecture-level facts plugins see (`model.info`).
pub fn model_info(model: &Model) -> wit_model::ModelInfo {
    let c = &model.config;
    wit_model::ModelInfo {
        architecture: match c.arch {
            espalier_engine::Architecture::Llama => "llama".into(),
            espalier_engine::Architecture::Gpt2 => "gpt2".into(),
        },
        hidden_size: c.hidden_size as u32,
        num_layers: c.num_layers as u32,
        num_heads: c.num_heads as u32,
        num_kv_heads: c.num_kv_heads as u32,
        head_dim: c.head_dim as u32,
        vocab_size: c.vocab_size as u32,
    }
}

/// Elements per selection group of a structure on a layer of shape `[r, c]`, used as the
/// rounding tolerance of a density check. Unstructured masks may come from a per-row
/// selection (`select-per-row`, Wanda) that rounds each row's count, so a row is their unit.
fn group_elements(s: Structure, r: usize, c: usize) -> usize {
    match s {
        Structure::Unstructured => r,
        Structure::Blocks { rows, cols } => rows * cols,
        Structure::NOfM { m, .. } => m,
        Structure::Rows => c,
        Structure::Columns => r,
        Structure::RowGroups { size } => size * c,
        Structure::ColumnGroups { size } => size * r,
    }
}

impl RunState {
    /// Starts a run on a loaded model.
    pub fn new(model: Model) -> Self {
        let original_numel = model
            .layers()
            .into_iter()
            .map(|l| (l.name.clone(), l.numel()))
            .collect();
        RunState {
            model,
            masks: BTreeMap::new(),
            original_numel,
            heads: None,
            calibrator: None,
            original_weights: BTreeMap::new(),
        }
    }

    /// Kept elements of a layer (all of them when it has no mask).
    pub fn kept(&self, layer: &str) -> usize {
        match self.masks.get(layer) {
            Some(m) => m.kept(),
            None => self.model.layer(layer).map_or(0, |l| l.numel()),
        }
    }

    /// Kept fraction of `layers` together, relative to their sizes before the run (1.0 for
    /// none): the density a stage's report gives over its targets.
    pub fn density_of<'a>(&self, layers: impl IntoIterator<Item = &'a str>) -> f64 {
        let (kept, numel) = layers.into_iter().fold((0usize, 0usize), |(k, n), name| {
            (
                k + self.kept(name),
                n + self.original_numel.get(name).copied().unwrap_or(0),
            )
        });
        if numel == 0 {
            1.0
        } else {
            kept as f64 / numel as f64
        }
    }

    /// A stage's new mask for `name` combined with the one earlier stages left there: a weight
    /// pruned once stays pruned.
    fn with_earlier_mask(&self, name: &str, mask: Mask) -> Result<Mask, String> {
        match self.masks.get(name) {
            Some(old) => mask.and(old),
            None => Ok(mask),
        }
    }

    /// Replaces a layer's weights and records its mask.
    fn set_layer(&mut self, name: String, weights: Tensor, mask: Mask) -> Result<(), String> {
        self.model
            .set_weight(&name, weights, false)
            .map_err(|e| e.to_string())?;
        self.masks.insert(name, mask);
        Ok(())
    }

    /// Density of a layer relative to its size before the run.
    pub fn density(&self, layer: &str) -> f64 {
        let original = self.original_numel.get(layer).copied().unwrap_or(0);
        if original == 0 {
            1.0
        } else {
            self.kept(layer) as f64 / original as f64
        }
    }

    /// Drops what only the stages read: the dense originals a reconstruction needs and the
    /// calibration statistics.
    fn release_stage_inputs(&mut self) {
        self.original_weights = BTreeMap::new();
        self.calibrator = None;
    }

    /// Whether the state still holds inputs of the stages (the dense originals, calibration
    /// statistics): during the stages only; a finished run's state holds neither.
    pub fn holds_stage_inputs(&self) -> bool {
        !self.original_weights.is_empty() || self.calibrator.is_some()
    }
}

/// Runs one stage's plugin and applies its validated output. Returns the stage report.
/// `calibration` serves the plugin's `calibration` imports (none: they return an error).
/// `cancel` stops the calibration passes and the plugin call; progress goes to `sink` as stage
/// `index`.
#[allow(clippy::too_many_arguments)]
pub fn run_stage(
    runtime: &Runtime,
    sandbox: &Sandbox,
    stage: &PlannedStage,
    budgets: &BTreeMap<usize, BTreeMap<String, f64>>,
    calibration: Option<&Arc<CalibrationSet>>,
    state: &mut RunState,
    (index, sink): (usize, &mut dyn EventSink),
    cancel: &CancelToken,
) -> Result<(StageReport, Option<BTreeMap<String, f64>>), RunError> {
    let started = Instant::now();
    let step = |sink: &mut dyn EventSink, step: &str| {
        sink.emit(RunEvent::StageProgress {
            index,
            step: step.to_string(),
            done: None,
            total: None,
        })
    };
    let stage_name = stage.spec.name.clone();
    let plugin_name = stage.plugin.info.name.clone();
    let invalid = |message: String| RunError::InvalidOutput {
        stage: stage_name.clone(),
        plugin: plugin_name.clone(),
        message,
    };

    // Targets as they are now (a head stage may have reshaped them).
    let mut targets = Vec::with_capacity(stage.targets.len());
    for t in &stage.targets {
        let layer = state.model.layer(&t.name).ok_or_else(|| RunError::Apply {
            stage: stage_name.clone(),
            message: format!("layer `{}` is no longer in the model", t.name),
        })?;
        let density = match stage.density {
            StageDensity::None => None,
            StageDensity::Fixed(d) => Some(d),
            StageDensity::Budget(from) => {
                let d = budgets.get(&from).and_then(|b| b.get(&t.name)).copied();
                Some(d.ok_or_else(|| RunError::Apply {
                    stage: stage_name.clone(),
                    message: format!("the budget stage gave no density for `{}`; target the same layers in both stages", t.name),
                })?)
            }
        };
        targets.push((layer, density));
    }
    let ctx = StageContext {
        stage: stage_name.clone(),
        targets: targets
            .iter()
            .map(|(l, d)| Target {
                layer: wit_layer(l),
                density: *d,
            })
            .collect(),
        params: stage.params.clone(),
    };

    let mut view = model_view(&state.model, &state.masks);
    view.original_weights = state.original_weights.clone();
    if let Some(set) = calibration {
        let calibrator = state.calibrator.get_or_insert_with(|| {
            Arc::new(Calibrator::new(state.model.clone(), set.clone()).with_cancel(cancel.clone()))
        });
        // Statistics the plugin declared it needs are computed before the call: the sandbox
        // deadline counts wall time, and one pass over the calibration set of a real model can
        // take longer than a plugin's whole budget. (Loss trials themselves still count.)
        let needs = &stage.plugin.info.needs;
        let calibrator = calibrator.clone();
        // Each pass reports sequences done, from this thread (see `Calibrator::each_sequence`).
        let mut pass = |pass: &str,
                        run: &dyn Fn(PassProgress<'_>) -> Result<(), String>|
         -> Result<(), String> {
            step(&mut *sink, &format!("calibration: {pass}"));
            run(&mut |done, total| {
                sink.emit(RunEvent::CalibrationProgress {
                    index,
                    pass: pass.to_string(),
                    done,
                    total,
                })
            })
        };
        let prepared = if needs.contains(&Need::Activations) {
            pass("activation statistics", &|p| {
                calibrator.prepare_norms_with(p)
            })
        } else {
            Ok(())
        }
        .and_then(|()| {
            if needs.contains(&Need::Loss) {
                pass("hidden states for loss trials", &|p| {
                    calibrator.prepare_trials_with(p)
                })
            } else {
                Ok(())
            }
        })
        .and_then(|()| {
            if needs.contains(&Need::Gradients) {
                pass("gradients", &|p| calibrator.prepare_gradients_with(p))
            } else {
                Ok(())
            }
        })
        .and_then(|()| {
            if needs.contains(&Need::Hessians) {
                pass("input Hessians", &|p| {
                    calibrator.prepare_hessians_with(p).map(|_| ())
                })
            } else {
                Ok(())
            }
        });
        prepared.map_err(|message| {
            if cancel.is_cancelled() {
                RunError::Cancelled {
                    stage: stage_name.clone(),
                }
            } else {
                RunError::Apply {
                    stage: stage_name.clone(),
                    message,
                }
            }
        })?;
        view.calibration = Some(calibrator.clone());
    }
    let view = Arc::new(view);
    step(sink, "calling the plugin");
    let (output, mut store, timings) = runtime
        .apply(
            &plugin_name,
            &stage.plugin.compiled,
            view,
            sandbox,
            &ctx,
            cancel,
            // What a 0.4 plugin reports while it runs, as progress of this stage.
            Some(&mut |p: Progress| {
                let known = p.total > 0;
                sink.emit(RunEvent::StageProgress {
                    index,
                    step: if p.message.is_empty() {
                        "running the plugin".into()
                    } else {
                        p.message
                    },
                    done: known.then_some(p.done),
                    total: known.then_some(p.total),
                })
            }),
        )
        .map_err(|source| match source {
            PluginError::Cancelled { .. } => RunError::Cancelled {
                stage: stage_name.clone(),
            },
            source => RunError::Plugin {
                stage: stage_name.clone(),
                source,
            },
        })?;
    step(sink, "validating and applying the result");
    let apply_started = Instant::now();
    let StageOutput {
        masks,
        budgets: out_budgets,
        heads,
        weights,
    } = output;
    if stage.plugin.info.produces != OutputKind::Weights && !weights.is_empty() {
        return Err(invalid(format!(
            "a plugin that produces {} returned weights",
            crate::plugin::registry::produces_name(stage.plugin.info.produces)
        )));
    }

    let target_names: BTreeSet<&str> = targets.iter().map(|(l, _)| l.name.as_str()).collect();
    let mut produced_budgets = None;
    match stage.plugin.info.produces {
        OutputKind::MaskUpdates => {
            // Planning runs such a stage only through `update-masks`, during fine-tuning.
            return Err(invalid(
                "a plugin that produces mask-updates returned a stage output".into(),
            ));
        }
        OutputKind::Masks => {
            if !out_budgets.is_empty() || !heads.is_empty() {
                return Err(invalid("a mask plugin returned budgets or heads".into()));
            }
            let new_masks = take_masks(&mut store, masks, &target_names).map_err(invalid)?;
            drop(store);
            validate_masks(&targets, &new_masks).map_err(invalid)?;
            for (name, mask) in new_masks {
                let combined = state.with_earlier_mask(&name, mask).map_err(invalid)?;
                let weight = state
                    .model
                    .weight(&name)
                    .ok_or_else(|| invalid(format!("unknown layer `{name}`")))?;
                let apply_err = |message| RunError::Apply {
                    stage: stage_name.clone(),
                    message,
                };
                let pruned = apply_mask(weight, &combined).map_err(apply_err)?;
                state.set_layer(name, pruned, combined).map_err(apply_err)?;
            }
        }
        OutputKind::Weights => {
            if !out_budgets.is_empty() || !heads.is_empty() {
                return Err(invalid("a weights plugin returned budgets or heads".into()));
            }
            let new_masks = take_masks(&mut store, masks, &target_names).map_err(invalid)?;
            let mut new_weights: BTreeMap<String, Tensor> = BTreeMap::new();
            for lw in weights {
                let tensor = store
                    .data_mut()
                    .take_tensor(lw.weights)
                    .map_err(|e| invalid(format!("bad tensor handle: {e}")))?;
                if !target_names.contains(lw.layer.as_str()) {
                    return Err(invalid(format!(
                        "weights for `{}`, which is not a target of this stage",
                        display_safe::name(&lw.layer)
                    )));
                }
                if new_weights.insert(lw.layer.clone(), tensor).is_some() {
                    return Err(invalid(format!(
                        "two weights for `{}`",
                        display_safe::name(&lw.layer)
                    )));
                }
            }
            drop(store);
            validate_masks(&targets, &new_masks).map_err(invalid)?;
            // Every layer is checked before any is applied: a refused output changes nothing.
            let mut updates = Vec::with_capacity(new_masks.len());
            for (name, mask) in new_masks {
                let combined = state.with_earlier_mask(&name, mask).map_err(invalid)?;
                let tensor = new_weights
                    .remove(&name)
                    .ok_or_else(|| invalid(format!("no weights for target `{name}`")))?;
                check_weights(&name, &tensor, &combined).map_err(invalid)?;
                updates.push((name, tensor, combined));
            }
            for (name, tensor, combined) in updates {
                state
                    .set_layer(name, tensor, combined)
                    .map_err(|message| RunError::Apply {
                        stage: stage_name.clone(),
                        message,
                    })?;
            }
        }
        OutputKind::Budgets => {
            if !masks.is_empty() || !heads.is_empty() {
                return Err(invalid("a budget plugin returned masks or heads".into()));
            }
            drop(store);
            let mut map = BTreeMap::new();
            for b in out_budgets {
                if !target_names.contains(b.layer.as_str()) {
                    return Err(invalid(format!(
                        "a budget for `{}`, which is not a target",
                        display_safe::name(&b.layer)
                    )));
                }
                if !(0.0..=1.0).contains(&b.density) || b.density.is_nan() {
                    return Err(invalid(format!(
                        "budget {} for `{}` is outside [0, 1]",
                        b.density, b.layer
                    )));
                }
                if map.insert(b.layer.clone(), b.density).is_some() {
                    return Err(invalid(format!("two budgets for `{}`", b.layer)));
                }
            }
            if let Some(missing) = target_names.iter().find(|n| !map.contains_key(**n)) {
                return Err(invalid(format!("no budget for target `{missing}`")));
            }
            produced_budgets = Some(map);
        }
        OutputKind::Heads => {
            if !masks.is_empty() || !out_budgets.is_empty() {
                return Err(invalid("a heads plugin returned masks or budgets".into()));
            }
            drop(store);
            let mut keep: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            let target_blocks: BTreeSet<usize> =
                targets.iter().filter_map(|(l, _)| l.block).collect();
            let num_heads = state.model.config.num_heads;
            for h in heads {
                let block = h.block as usize;
                // Checked before the list is copied or sorted: its length is the plugin's.
                if h.keep.len() > num_heads {
                    return Err(invalid(format!(
                        "block {block} keeps {} heads; the model has {num_heads}",
                        h.keep.len()
                    )));
                }
                if !target_blocks.contains(&block) {
                    return Err(invalid(format!(
                        "heads for block {block}, which has no target in this stage"
                    )));
                }
                if keep
                    .insert(block, h.keep.iter().map(|&x| x as usize).collect())
                    .is_some()
                {
                    return Err(invalid(format!("block {block} listed twice")));
                }
            }
            let plans = heads::plan_removal(&state.model, &keep).map_err(invalid)?;
            let change =
                heads::remove_heads(&mut state.model, &plans, &mut state.masks).map_err(|m| {
                    RunError::Apply {
                        stage: stage_name.clone(),
                        message: m,
                    }
                })?;
            state.heads = Some(change);
        }
    }

    if stage.plugin.info.produces != OutputKind::Budgets {
        // The model changed: statistics of the old one must not leak into later stages.
        state.calibrator = None;
    }
    let apply_time = apply_started.elapsed();
    let total = started.elapsed();
    let requested = match stage.density {
        StageDensity::Fixed(d) => Some(d),
        _ => None,
    };
    let mut report = StageReport::new(
        stage,
        targets.len(),
        requested,
        state.density_of(targets.iter().map(|(l, _)| l.name.as_str())),
        total,
        timings,
        apply_time,
    );
    report.budgets = produced_budgets.clone().unwrap_or_default();
    Ok((report, produced_budgets))
}

/// Takes the masks a stage returned out of its Store: each for a target, at most one per layer.
fn take_masks(
    store: &mut wasmtime::Store<crate::plugin::state::PluginState>,
    masks: Vec<crate::plugin::bindings::LayerMask>,
    target_names: &BTreeSet<&str>,
) -> Result<BTreeMap<String, Mask>, String> {
    let mut new_masks: BTreeMap<String, Mask> = BTreeMap::new();
    for lm in masks {
        let mask = store
            .data_mut()
            .take_mask(lm.mask)
            .map_err(|e| format!("bad mask handle: {e}"))?;
        if !target_names.contains(lm.layer.as_str()) {
            return Err(format!(
                "a mask for `{}`, which is not a target of this stage",
                display_safe::name(&lm.layer)
            ));
        }
        if new_masks.contains_key(&lm.layer) {
            return Err(format!("two masks for `{}`", display_safe::name(&lm.layer)));
        }
        new_masks.insert(lm.layer, mask);
    }
    Ok(new_masks)
}

/// Checks updated weights for `layer` before they replace the model's: the mask's shape,
/// finite values, and exact zeros wherever `mask` (earlier masks included) removes.
pub fn check_weights(layer: &str, weights: &Tensor, mask: &Mask) -> Result<(), String> {
    if weights.dims() != mask.shape() {
        return Err(format!(
            "the weights for `{layer}` have shape {:?}, the layer has {:?}",
            weights.dims(),
            mask.shape()
        ));
    }
    let cols = mask.shape().last().copied().unwrap_or(1).max(1);
    with_f32(weights, |w| {
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the weights for `{layer}` hold a non-finite value ({}) at [{}, {}]",
                w[i],
                i / cols,
                i % cols
            ));
        }
        if let Some(i) = w
            .iter()
            .zip(mask.keep())
            .position(|(&v, &k)| !k && v != 0.0)
        {
            return Err(format!(
                "the weights for `{layer}` are not zero where the layer is masked: {} at [{}, {}]",
                w[i],
                i / cols,
                i % cols
            ));
        }
        Ok(())
    })?
}

/// Checks the masks of one stage against its targets: one per target, the right shape, and in
/// aggregate the density asked for (within the rounding of the structure's groups).
fn validate_masks(
    targets: &[(LayerInfo, Option<f64>)],
    masks: &BTreeMap<String, Mask>,
) -> Result<(), String> {
    let mut asked_kept = 0.0f64;
    let mut tolerance = 1.0f64;
    let mut kept = 0usize;
    let mut any_density = false;
    for (layer, density) in targets {
        let mask = masks
            .get(&layer.name)
            .ok_or_else(|| format!("no mask for target `{}`", layer.name))?;
        if mask.shape() != layer.shape.as_slice() {
            return Err(format!(
                "the mask for `{}` has shape {:?}, the layer has {:?}",
                layer.name,
                mask.shape(),
                layer.shape
            ));
        }
        if let Some(d) = density {
            any_density = true;
            let (r, c) = rows_cols(&layer.shape);
            asked_kept += d * layer.numel() as f64;
            let group = group_elements(mask.structure(), r, c);
            // Groups of unequal size (blocks that do not tile the shape) make the kept share of
            // *weights* drift from the kept share of *groups*, which is what selection fixes:
            // allow up to the whole layer's worth of slack then (the structure itself was
            // checked by `Mask::new`).
            let ragged = matches!(mask.structure(), Structure::Blocks { rows, cols } if r % rows != 0 || c % cols != 0);
            tolerance += if ragged {
                layer.numel() as f64
            } else {
                group as f64 / 2.0
            };
            kept += mask.kept();
        }
    }
    if any_density && (kept as f64 - asked_kept).abs() > tolerance {
        let total: usize = targets
            .iter()
            .filter(|(_, d)| d.is_some())
            .map(|(l, _)| l.numel())
            .sum();
        return Err(format!(
            "its masks keep {:.2}% of the targets' weights; the stage asked for {:.2}%",
            100.0 * kept as f64 / total.max(1) as f64,
            100.0 * asked_kept / total.max(1) as f64
        ));
    }
    Ok(())
}

/// Runs every stage of a plan on `model`.
///
/// Events go to `sink`; `cancel` is checked before every stage and inside each (see
/// [`run_stage`]).
pub fn execute(
    plan: &Plan,
    runtime: &Runtime,
    model: Model,
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let parameters_before = model.num_parameters();
    let mut state = RunState::new(model);
    if plan
        .stages
        .iter()
        .any(|s| s.plugin.info.produces == OutputKind::Weights)
    {
        // Shares storage: costs memory only for the layers a stage replaces.
        state.original_weights = state.model.weights().clone();
    }
    let mut budgets: BTreeMap<usize, BTreeMap<String, f64>> = BTreeMap::new();
    let mut stage_reports = Vec::with_capacity(plan.stages.len());
    // Under sequential calibration the stages from `whole_model` on run block by block, after
    // the ones before it ran on the whole model (see `crate::sequential`).
    let whole_model = plan.sequential_from.unwrap_or(plan.stages.len());
    for (i, stage) in plan.stages[..whole_model].iter().enumerate() {
        if stage.spec.schedule.is_some()
            || stage.spec.update.is_some()
            || stage.spec.lottery.is_some()
        {
            // Runs during fine-tuning, at its events ([`ScheduledStages`]).
            continue;
        }
        if cancel.is_cancelled() {
            return Err(RunError::Cancelled {
                stage: stage.spec.name.clone(),
            });
        }
        sink.emit(RunEvent::StageStarted {
            index: i,
            total: plan.stages.len(),
            name: stage.spec.name.clone(),
            plugin: stage.plugin.info.name.clone(),
            plugin_sha256: stage.plugin.compiled.sha256.clone(),
            targets: stage.targets.len(),
        });
        let (report, produced) = run_stage(
            runtime,
            &plan.pipeline.sandbox,
            stage,
            &budgets,
            plan.calibration.as_ref(),
            &mut state,
            (i, &mut *sink),
            cancel,
        )?;
        if let Some(b) = produced {
            budgets.insert(i, b);
        }
        if let (Some(asked), Some(change)) = (stage.heads_per_block, &state.heads)
            && change.heads_after != asked
        {
            // The count a plugin can keep depends on its grouping (GQA groups keep equal
            // numbers of query heads): say what was kept instead of what was asked.
            sink.emit(RunEvent::Warning {
                message: format!(
                    "stage `{}`: heads = {asked} per block became {} per block ({} query heads share each of {} K/V heads, and the plugin keeps whole numbers per group)",
                    stage.spec.name,
                    change.heads_after,
                    change.heads_before / change.kv_heads_before.max(1),
                    change.kv_heads_before
                ),
            });
        }
        sink.emit(RunEvent::StageFinished {
            index: i,
            report: report.clone(),
        });
        stage_reports.push(report);
    }
    let mut carry_seconds = None;
    if let Some(from) = plan.sequential_from {
        let (reports, carry) =
            crate::sequential::run_blocks(plan, from, runtime, &mut state, &budgets, sink, cancel)?;
        for (k, report) in reports.into_iter().enumerate() {
            sink.emit(RunEvent::StageFinished {
                index: from + k,
                report: report.clone(),
            });
            stage_reports.push(report);
        }
        carry_seconds = Some(carry.as_secs_f64());
    }
    // The dense originals and the calibration statistics serve the stages alone: released
    // here, so the fine-tune and the evaluations after the stages do not carry them (after
    // SparseGPT on SmolLM2 the originals of the layers it rewrote are ~0.4 GB, which the pruned
    // model's measured peak memory counted).
    state.release_stage_inputs();
    let mut report = build_report(
        plan,
        &state,
        stage_reports,
        parameters_before,
        started.elapsed(),
    );
    if let Some(c) = report.calibration.as_mut() {
        c.sequential_carry_seconds = carry_seconds;
    }
    Ok(RunOutcome { state, report })
}

/// The pipeline's scheduled stages ([`crate::schedule`]), run by the fine-tune at their events
/// on the weights as trained so far: each event is [`run_stage`] at the schedule's density on
/// a fresh state holding the current model and masks (so calibration statistics, when the
/// plugin needs them, are taken on the current model), whose masks already include the old
/// ones. Also the mask-update stages ([`crate::dynamic`]), whose plugins' `update-masks` it
/// calls at their update steps, and the stage pruning in lottery rounds ([`crate::lottery`]),
/// run the same way at the end of each round at the round's density.
pub struct ScheduledStages<'a> {
    plan: &'a Plan,
    runtime: &'a Runtime,
    original_numel: BTreeMap<String, usize>,
    /// Each scheduled stage's calls in this process, summed, by stage index.
    reports: BTreeMap<usize, StageReport>,
}

impl<'a> ScheduledStages<'a> {
    /// The scheduled stages of `plan`, densities relative to the layers' sizes in `state`
    /// (before the run); `None` when the plan has none.
    pub fn new(plan: &'a Plan, runtime: &'a Runtime, state: &RunState) -> Option<Self> {
        plan.stages
            .iter()
            .any(|s| {
                s.spec.schedule.is_some() || s.spec.update.is_some() || s.spec.lottery.is_some()
            })
            .then(|| ScheduledStages {
                plan,
                runtime,
                original_numel: state.original_numel.clone(),
                reports: BTreeMap::new(),
            })
    }

    fn scheduled(
        &self,
    ) -> impl Iterator<Item = (usize, &PlannedStage, &crate::schedule::Schedule)> {
        self.plan
            .stages
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.spec.schedule.as_ref().map(|x| (i, s, &x.schedule)))
    }

    /// The stage pruning in lottery rounds (parsing allows one, and no scheduled or updating
    /// stage beside it).
    fn lottery(&self) -> Option<(usize, &PlannedStage, &crate::lottery::Rounds)> {
        self.plan
            .stages
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.spec.lottery.as_ref().map(|x| (i, s, &x.rounds)))
    }

    /// The mask-update stages, with their settings.
    fn updating(
        &self,
    ) -> impl Iterator<Item = (usize, &PlannedStage, &crate::dynamic::UpdateSchedule)> {
        self.plan
            .stages
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.spec.update.as_ref().map(|x| (i, s, &x.update)))
    }

    /// The fine-tune's optimizer steps (mask updates are placed relative to them).
    fn steps(&self) -> u64 {
        self.plan
            .pipeline
            .finetune
            .as_ref()
            .map_or(0, |f| f.spec.steps)
    }

    /// Stage `i`'s calls in this process summed (an empty report when a resumed run had none
    /// left), with its density as `state` has it now.
    fn summed_report(&self, i: usize, stage: &PlannedStage, state: &RunState) -> StageReport {
        let mut report = self.reports.get(&i).cloned().unwrap_or_else(|| {
            StageReport::new(
                stage,
                stage.targets.len(),
                None,
                1.0,
                Duration::ZERO,
                CallTimings::default(),
                Duration::ZERO,
            )
        });
        report.density_after = state.density_of(stage.targets.iter().map(|l| l.name.as_str()));
        report
    }

    /// The report of each scheduled stage (index, report): its calls in this process summed
    /// (none when a resumed run had no event left), its density as `state` has it now.
    pub fn finish(self, state: &RunState) -> Vec<(usize, StageReport)> {
        let mut out = Vec::new();
        for (i, stage, schedule) in self.scheduled() {
            let mut report = self.summed_report(i, stage, state);
            report.requested_density = Some(schedule.final_density);
            report.density_from = format!(
                "schedule: {} {} → {} over steps {}..={} every {}",
                schedule.kind.as_str(),
                schedule.initial,
                schedule.final_density,
                schedule.start,
                schedule.end,
                schedule.every
            );
            out.push((i, report));
        }
        let steps = self.steps();
        if let Some((i, stage, rounds)) = self.lottery() {
            let mut report = self.summed_report(i, stage, state);
            report.requested_density = Some(rounds.final_density);
            let densities: Vec<String> = (0..rounds.count)
                .map(|r| format!("{:.4}", rounds.density_after(r)))
                .collect();
            report.density_from = format!(
                "lottery rounds: {} prunings to {} ({}) every {} steps, survivors rewound to {}, then the ticket trained",
                rounds.count,
                rounds.final_density,
                densities.join(" → "),
                rounds.round_steps(0, steps),
                rounds.rewind.describe()
            );
            out.push((i, report));
        }
        for (i, stage, update) in self.updating() {
            let mut report = self.summed_report(i, stage, state);
            report.density_from = format!(
                "mask updates: every {} steps, {} of the kept weights swapped ({} anneal) from step {} to {} ({} updates)",
                update.every,
                update.drop_fraction,
                update.anneal.as_str(),
                update.start_step(steps),
                update.end_step(steps),
                update.events(steps).len()
            );
            out.push((i, report));
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// Runs one mask-update stage at `step`: hands its plugin the target layers' weights,
    /// masks and mean dense gradients, and checks what it returns (every target exactly once,
    /// each mask of the layer's shape, count and structure).
    #[allow(clippy::too_many_arguments)]
    fn update_stage(
        &mut self,
        i: usize,
        stage: &PlannedStage,
        schedule: &crate::dynamic::UpdateSchedule,
        step: u64,
        model: &Model,
        masks: &BTreeMap<String, Mask>,
        gradients: &BTreeMap<String, Tensor>,
        gradient_steps: u32,
        cancel: &CancelToken,
    ) -> Result<(BTreeMap<String, Mask>, crate::dynamic::UpdateEvent), crate::finetune::FinetuneError>
    {
        use crate::finetune::FinetuneError;
        use crate::plugin::bindings::{UpdateContext, UpdatePosition, WitLayerState};
        let started = Instant::now();
        let err = |message: String| FinetuneError::Update {
            step,
            message: format!("stage `{}`: {message}", stage.spec.name),
        };
        let steps = self.steps();
        let seed = self
            .plan
            .pipeline
            .finetune
            .as_ref()
            .map_or(0, |f| f.spec.seed);
        let position = UpdatePosition {
            step,
            total_steps: steps,
            fraction: step as f64 / steps.max(1) as f64,
            update: schedule.index_of(step, steps),
            updates: schedule.events(steps).len() as u32,
            drop_fraction: schedule.drop_fraction_at(step, steps),
            seed: crate::dynamic::update_seed(seed, i, step),
        };
        // Everything the plugin gets, checked before its Store exists.
        let mut layers = Vec::with_capacity(stage.targets.len());
        for t in &stage.targets {
            let layer = model
                .layer(&t.name)
                .ok_or_else(|| err(format!("layer `{}` is no longer in the model", t.name)))?;
            let weight = model
                .weight(&t.name)
                .ok_or_else(|| err(format!("layer `{}` has no weight", t.name)))?;
            let mask = masks
                .get(&t.name)
                .ok_or_else(|| err(format!("`{}` has no mask to update", t.name)))?;
            let gradient = gradients
                .get(&t.name)
                .ok_or_else(|| err(format!("internal: no gradient of `{}`", t.name)))?;
            layers.push((wit_layer(&layer), weight.clone(), mask, gradient.clone()));
        }
        let drop_fraction = position.drop_fraction;
        let view = Arc::new(model_view(model, masks));
        let ctx = |state: &mut crate::plugin::state::PluginState| -> Result<UpdateContext, String> {
            let mut out = Vec::with_capacity(layers.len());
            for (layer, weight, mask, gradient) in &layers {
                out.push(WitLayerState {
                    layer: layer.clone(),
                    weights: state.give_tensor(weight.clone())?,
                    mask: state.give_mask(mask)?,
                    gradient: state.give_tensor(gradient.clone())?,
                    gradient_steps,
                });
            }
            Ok(UpdateContext {
                stage: stage.spec.name.clone(),
                position,
                layers: out,
                params: stage.params.clone(),
            })
        };
        let (returned, timings) = self
            .runtime
            .update_masks(
                &stage.plugin.info.name,
                &stage.plugin.compiled,
                view,
                &self.plan.pipeline.sandbox,
                ctx,
                cancel,
            )
            .map_err(|e| match e {
                PluginError::Cancelled { .. } => FinetuneError::Cancelled,
                e => err(e.to_string()),
            })?;
        let apply_started = Instant::now();
        let targets: BTreeSet<&str> = stage.targets.iter().map(|l| l.name.as_str()).collect();
        let mut out = BTreeMap::new();
        let (mut dropped, mut grown) = (0, 0);
        for (name, mask) in returned {
            if !targets.contains(name.as_str()) {
                return Err(err(format!(
                    "a mask for `{}`, which is not a target of this stage",
                    display_safe::name(&name)
                )));
            }
            let old = &masks[&name];
            let (d, g) = crate::dynamic::check_update(&name, old, &mask).map_err(err)?;
            // Under the old structure, whatever the plugin declared.
            let mask = Mask::new(old.shape().to_vec(), mask.keep().to_vec(), old.structure())
                .map_err(err)?;
            if out.insert(name.clone(), mask).is_some() {
                return Err(err(format!("two masks for `{name}`")));
            }
            dropped += d;
            grown += g;
        }
        if let Some(missing) = targets.iter().find(|t| !out.contains_key(**t)) {
            return Err(err(format!("no mask for target `{missing}`")));
        }
        let (kept, numel) = out.values().fold((0usize, 0usize), |(k, n), m| {
            (k + m.kept(), n + m.keep().len())
        });
        let density = kept as f64 / numel.max(1) as f64;
        let report = StageReport::new(
            stage,
            stage.targets.len(),
            None,
            density,
            started.elapsed(),
            timings,
            apply_started.elapsed(),
        );
        match self.reports.get_mut(&i) {
            Some(total) => total.add_call(&report),
            None => {
                self.reports.insert(i, report);
            }
        }
        let event = crate::dynamic::UpdateEvent {
            stage: stage.spec.name.clone(),
            step,
            drop_fraction,
            dropped,
            grown,
            density,
            gradient_steps,
            seconds: started.elapsed().as_secs_f64(),
        };
        Ok((out, event))
    }
}

impl crate::finetune::Pruner for ScheduledStages<'_> {
    fn is_event(&self, step: u64) -> bool {
        self.scheduled().any(|(_, _, s)| s.is_event(step))
            || self
                .lottery()
                .is_some_and(|(_, _, r)| r.is_prune(step, self.steps()))
    }

    fn layers(&self) -> BTreeSet<String> {
        self.scheduled()
            .map(|(_, s, _)| s)
            .chain(self.lottery().map(|(_, s, _)| s))
            .flat_map(|s| s.targets.iter().map(|l| l.name.clone()))
            .collect()
    }

    fn rounds(&self) -> Option<crate::lottery::Rounds> {
        self.lottery().map(|(_, _, r)| *r)
    }

    fn update_layers(&self) -> BTreeSet<String> {
        self.updating()
            .flat_map(|(_, s, _)| s.targets.iter().map(|l| l.name.clone()))
            .collect()
    }

    fn accumulates(&self, step: u64) -> bool {
        let steps = self.steps();
        self.updating().any(|(_, _, u)| {
            step >= u.start_step(steps) && u.events(steps).last().is_some_and(|&last| step < last)
        })
    }

    fn is_update(&self, step: u64) -> bool {
        let steps = self.steps();
        self.updating().any(|(_, _, u)| u.is_event(step, steps))
    }

    fn update(
        &mut self,
        step: u64,
        model: &Model,
        masks: &BTreeMap<String, Mask>,
        gradients: &BTreeMap<String, Tensor>,
        gradient_steps: u32,
        cancel: &CancelToken,
    ) -> Result<
        (BTreeMap<String, Mask>, Vec<crate::dynamic::UpdateEvent>),
        crate::finetune::FinetuneError,
    > {
        let steps = self.steps();
        let due: Vec<(usize, PlannedStage, crate::dynamic::UpdateSchedule)> = self
            .updating()
            .filter(|(_, _, u)| u.is_event(step, steps))
            .map(|(i, s, u)| (i, s.clone(), u.clone()))
            .collect();
        // Each stage sees the masks the ones before it at this step left.
        let mut current = masks.clone();
        let mut changed = BTreeMap::new();
        let mut events = Vec::with_capacity(due.len());
        for (i, stage, schedule) in due {
            let (new, event) = self.update_stage(
                i,
                &stage,
                &schedule,
                step,
                model,
                &current,
                gradients,
                gradient_steps,
                cancel,
            )?;
            for (name, mask) in new {
                current.insert(name.clone(), mask.clone());
                changed.insert(name, mask);
            }
            events.push(event);
        }
        Ok((changed, events))
    }

    fn identity(&self) -> String {
        let updates = self.updating().map(|(i, s, u)| {
            format!(
                "{i}:{}:update={}:{:?}:{:?}",
                s.plugin.compiled.sha256,
                serde_json::to_string(u).unwrap_or_default(),
                s.targets.iter().map(|l| &l.name).collect::<Vec<_>>(),
                s.params,
            )
        });
        // The calibration set decides what a plugin that needs statistics sees.
        let calibration = self.plan.calibration.as_ref().map(|c| {
            (
                c.text_sha256.as_str(),
                c.sequences.len(),
                self.plan.pipeline.calibration_spec().seq_len,
            )
        });
        let lottery = self.lottery().map(|(i, s, rounds)| {
            format!(
                "{i}:{}:rounds={}:{:?}:{:?}:{calibration:?}",
                s.plugin.compiled.sha256,
                serde_json::to_string(rounds).unwrap_or_default(),
                s.targets.iter().map(|l| &l.name).collect::<Vec<_>>(),
                s.params,
            )
        });
        self.scheduled()
            .map(|(i, s, schedule)| {
                format!(
                    "{i}:{}:{}:{:?}:{:?}:{calibration:?}",
                    s.plugin.compiled.sha256,
                    serde_json::to_string(schedule).unwrap_or_default(),
                    s.targets.iter().map(|l| &l.name).collect::<Vec<_>>(),
                    s.params,
                )
            })
            .chain(lottery)
            .chain(updates)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn prune(
        &mut self,
        step: u64,
        model: &Model,
        masks: &BTreeMap<String, Mask>,
        cancel: &CancelToken,
    ) -> Result<
        (BTreeMap<String, Mask>, Vec<crate::schedule::PruneEvent>),
        crate::finetune::FinetuneError,
    > {
        use crate::finetune::FinetuneError;
        let mut state = RunState {
            model: model.clone(),
            masks: masks.clone(),
            original_numel: self.original_numel.clone(),
            heads: None,
            calibrator: None,
            original_weights: BTreeMap::new(),
        };
        let steps = self.steps();
        // A lottery stage prunes at the end of a pruning round, to that round's density.
        let lottery = self.lottery().and_then(|(i, stage, rounds)| {
            let round = rounds
                .round_ending_at(step, steps)
                .filter(|&r| r < rounds.count)?;
            Some((i, stage, rounds.density_after(round)))
        });
        let due: Vec<(usize, PlannedStage, f64)> = self
            .scheduled()
            .filter(|(_, _, s)| s.is_event(step))
            .map(|(i, stage, s)| (i, stage, s.density_at(step)))
            .chain(lottery)
            .map(|(i, stage, density)| {
                let planned = PlannedStage {
                    density: StageDensity::Fixed(density),
                    ..stage.clone()
                };
                (i, planned, density)
            })
            .collect();
        let mut events = Vec::with_capacity(due.len());
        let mut pruned = BTreeSet::new();
        for (i, stage, density) in due {
            let started = Instant::now();
            // Statistics of the model as trained now: a fresh calibrator (`state.calibrator`
            // starts empty and is dropped by every stage that changes masks).
            let (report, _) = run_stage(
                self.runtime,
                &self.plan.pipeline.sandbox,
                &stage,
                &BTreeMap::new(),
                self.plan.calibration.as_ref(),
                &mut state,
                (i, &mut crate::events::Quiet),
                cancel,
            )
            .map_err(|e| match e {
                RunError::Cancelled { .. } => FinetuneError::Cancelled,
                source => FinetuneError::Stage {
                    step,
                    source: Box::new(source),
                },
            })?;
            events.push(crate::schedule::PruneEvent {
                stage: stage.spec.name.clone(),
                step,
                target_density: density,
                density: report.density_after,
                seconds: started.elapsed().as_secs_f64(),
            });
            match self.reports.get_mut(&i) {
                Some(total) => total.add_call(&report),
                None => {
                    self.reports.insert(i, report);
                }
            }
            pruned.extend(stage.targets.iter().map(|l| l.name.clone()));
        }
        let out = state
            .masks
            .into_iter()
            .filter(|(name, _)| pruned.contains(name))
            .collect();
        Ok((out, events))
    }
}

/// Recomputes the report's per-layer densities and summary from `state` (after scheduled
/// pruning changed the masks).
pub fn refresh_layers(report: &mut RunReport, state: &RunState) {
    let (layers, summary) = layers_and_summary(state, report.summary.parameters_before);
    report.layers = layers;
    report.summary = summary;
}

fn build_report(
    plan: &Plan,
    state: &RunState,
    stages: Vec<StageReport>,
    parameters_before: usize,
    elapsed: Duration,
) -> RunReport {
    let (layers, summary) = layers_and_summary(state, parameters_before);
    let sandbox = &plan.pipeline.sandbox;
    RunReport {
        report_version: crate::report::REPORT_VERSION,
        espalier_version: env!("CARGO_PKG_VERSION").to_string(),
        build: String::new(),
        pipeline: plan.pipeline.name.clone(),
        pipeline_file: plan.pipeline.file.clone(),
        resolved_pipeline: String::new(),
        model: plan.pipeline.model.value.clone(),
        architecture: state.model.config.model_type.clone(),
        calibration: plan.calibration.as_ref().map(|set| {
            let spec = plan.pipeline.calibration_spec();
            CalibrationRecord {
                text: set.source.display().to_string(),
                text_sha256: set.text_sha256.clone(),
                samples: set.sequences.len(),
                seq_len: spec.seq_len,
                sequential: plan.sequential_from.is_some(),
                sequential_carry_seconds: None,
            }
        }),
        sandbox: Some(SandboxRecord {
            timeout_s: sandbox.timeout.as_secs_f64(),
            memory_mb: (sandbox.guest_memory >> 20) as u64,
            host_memory_mb: (sandbox.host_memory >> 20) as u64,
        }),
        export_dir: None,
        seconds: elapsed.as_secs_f64(),
        stages,
        summary,
        layers,
        evaluation: None,
        finetune: None,
    }
}

/// Every 2-D layer's density and the summary over them.
fn layers_and_summary(state: &RunState, parameters_before: usize) -> (Vec<LayerReport>, Summary) {
    let layers: Vec<LayerReport> = state
        .model
        .layers()
        .into_iter()
        .filter(|l| l.shape.len() == 2)
        .map(|l| {
            let original = state
                .original_numel
                .get(&l.name)
                .copied()
                .unwrap_or(l.numel());
            let kept = state.kept(&l.name);
            LayerReport {
                role: l.role,
                block: l.block,
                shape: l.shape.clone(),
                original_numel: original,
                kept,
                density: if original == 0 {
                    1.0
                } else {
                    kept as f64 / original as f64
                },
                structure: state.masks.get(&l.name).map(|m| m.structure().to_string()),
                name: l.name,
            }
        })
        .collect();
    let sum = |f: &dyn Fn(&LayerReport) -> bool| {
        let (k, n) = layers
            .iter()
            .filter(|l| f(l))
            .fold((0, 0), |(k, n), l| (k + l.kept, n + l.original_numel));
        if n == 0 { 1.0 } else { k as f64 / n as f64 }
    };
    let pruned: BTreeSet<&str> = state.masks.keys().map(String::as_str).collect();
    let shrunk_layers = layers
        .iter()
        .filter(|l| !pruned.contains(l.name.as_str()) && l.kept < l.original_numel)
        .count();
    let summary = Summary {
        pruned_layers: pruned.len(),
        shrunk_layers,
        pruned_density: sum(&|l| pruned.contains(l.name.as_str()) || l.kept < l.original_numel),
        block_linear_density: sum(&|l| l.role.is_block_linear()),
        all_weights_density: sum(&|_| true),
        parameters_before,
        parameters_after: state.model.num_parameters(),
        nonzero_parameters_after: parameters_before
            - layers
                .iter()
                .map(|l| l.original_numel - l.kept)
                .sum::<usize>(),
        heads: state.heads.clone(),
    };
    (layers, summary)
}

impl StageReport {
    /// Adds another call of the same stage (one block under sequential calibration, one event
    /// of a schedule): times are summed and the guest share taken over the sums.
    pub(crate) fn add_call(&mut self, part: &StageReport) {
        self.seconds += part.seconds;
        self.instantiate_seconds += part.instantiate_seconds;
        self.guest_and_boundary_seconds += part.guest_and_boundary_seconds;
        self.host_kernel_seconds += part.host_kernel_seconds;
        self.validate_apply_seconds += part.validate_apply_seconds;
        self.guest_share = guest_share(
            self.guest_and_boundary_seconds + self.instantiate_seconds,
            self.seconds,
        );
    }

    fn new(
        stage: &PlannedStage,
        targets: usize,
        requested_density: Option<f64>,
        density_after: f64,
        total: Duration,
        timings: CallTimings,
        apply: Duration,
    ) -> Self {
        let secs = total.as_secs_f64();
        StageReport {
            name: stage.spec.name.clone(),
            plugin: stage.plugin.info.name.clone(),
            plugin_version: stage.plugin.info.version.clone(),
            plugin_sha256: stage.plugin.compiled.sha256.clone(),
            plugin_origin: match &stage.plugin.origin {
                Origin::Builtin => "builtin".into(),
                Origin::File(p) => p.display().to_string(),
            },
            plugin_signer: stage.plugin.signer.to_string(),
            plugin_source: stage.plugin.source.clone(),
            produces: crate::plugin::registry::produces_name(stage.plugin.info.produces)
                .to_string(),
            targets,
            requested_density,
            density_after,
            seconds: secs,
            instantiate_seconds: timings.instantiate.as_secs_f64(),
            guest_and_boundary_seconds: timings.guest_and_boundary().as_secs_f64(),
            host_kernel_seconds: timings.host.as_secs_f64(),
            validate_apply_seconds: apply.as_secs_f64(),
            guest_share: guest_share(
                (timings.guest_and_boundary() + timings.instantiate).as_secs_f64(),
                secs,
            ),
            budgets: BTreeMap::new(),
            params: stage
                .params
                .iter()
                .map(|(k, v)| (k.clone(), crate::resolved::param_json(v)))
                .collect(),
            density_from: match (&stage.density, stage.heads_per_block) {
                (StageDensity::Fixed(d), Some(n)) => {
                    format!("heads: {n} per block (density {d:.4})")
                }
                (StageDensity::None, _) => "none (the plugin decides)".into(),
                (StageDensity::Fixed(d), None) => format!("{d}"),
                (StageDensity::Budget(from), _) => format!("budget from stage {}", from + 1),
            },
            target_patterns: stage.spec.targets.as_ref().map(|t| t.value.clone()),
            protect_patterns: stage.spec.protect.value.clone(),
            matched_layers: stage.targets.iter().map(|l| l.name.clone()).collect(),
        }
    }
}

/// The share of a stage's `seconds` spent in the sandbox (`guest` = guest + boundary +
/// instantiation), 0 for a stage that took no time.
fn guest_share(guest: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { guest / seconds } else { 0.0 }
}
