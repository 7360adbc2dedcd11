//! Sequential calibration (`[calibration] sequential = true`): the pipeline's stages run block
//! by block, each block's statistics (activation norms, input Hessians) taken on the outputs of
//! the blocks before it *as they are after pruning and weight updates*, as the sequential
//! variants of SparseGPT and Wanda do. Errors a pruned block makes are then seen, and partly
//! repaired, by the blocks after it.
//!
//! The calibration hidden states flow through the model once: one tensor per sequence
//! (`[seq_len, hidden]` f32; 64 × 256 × 576 × 4 bytes = 37 MiB for SmolLM2) enters block `b`,
//! every block-local stage is called with block `b`'s targets and a [`Calibrator`] that runs
//! block `b` alone on those states, and then the pruned block `b` carries them to block `b + 1`.
//!
//! Which stages can run per block is decided at planning ([`split`]): a stage that produces
//! masks or weights from per-layer calibration statistics (activations or Hessians) and needs
//! no loss or gradient. Everything else decides across the whole model and runs before the
//! block loop, on the whole model as without `sequential`: budget allocation (`sensitivity`,
//! whose budgets later stages then follow per layer), head removal, anything measuring losses
//! or gradients (they need every block), and criteria that use weights alone (they may rank
//! across layers, as `magnitude` with `scope = "global"` does, and calibration would not
//! change them). Such a stage after the first block-local one is refused, naming it: moving
//! it silently would change what the pipeline says.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use espalier_engine::Session;
use rayon::prelude::*;

use crate::calibration::{CalibrationSet, Calibrator};
use crate::cancel::CancelToken;
use crate::display_safe;
use crate::events::{EventSink, RunEvent};
use crate::pipeline::{Pipeline, PipelineError};
use crate::plan::{Plan, PlannedStage};
use crate::plugin::Runtime;
use crate::plugin::bindings::{Need, OutputKind};
use crate::report::StageReport;
use crate::run::{RunError, RunState, run_stage};

/// Why `stage` decides across the whole model (and so cannot run block by block), if it does.
fn global_reason(stage: &PlannedStage) -> Option<&'static str> {
    let info = &stage.plugin.info;
    match info.produces {
        OutputKind::Budgets => {
            return Some("produces budgets, which allocate density across the whole model");
        }
        OutputKind::Heads => return Some("removes attention heads, which reshapes layers"),
        OutputKind::MaskUpdates => {
            return Some("updates masks during fine-tuning, after every stage has run");
        }
        OutputKind::Masks | OutputKind::Weights => {}
    }
    if info.needs.contains(&Need::Loss) {
        return Some("measures the model's loss, which needs every block");
    }
    if info.needs.contains(&Need::Gradients) {
        return Some("needs gradients of the loss, which need every block");
    }
    if !info
        .needs
        .iter()
        .any(|n| matches!(n, Need::Activations | Need::Hessians))
    {
        return Some(
            "takes no calibration statistics (it decides from weights alone, possibly across layers)",
        );
    }
    None
}

/// Under `[calibration] sequential = true`, the index of the first stage that runs block by
/// block (the stages before it run on the whole model first); `None` without it. Refuses a
/// pipeline where that cannot be done soundly, naming the stage (see the module doc).
pub fn split(pipeline: &Pipeline, stages: &[PlannedStage]) -> Result<Option<usize>, PipelineError> {
    let Some(section) = pipeline.calibration.as_ref().filter(|c| c.spec.sequential) else {
        return Ok(None);
    };
    let first = stages.iter().position(|s| global_reason(s).is_none()).ok_or_else(|| {
        pipeline.error(
            &section.position,
            "calibration.sequential",
            "no stage prunes from per-layer calibration statistics (activations or Hessians), so there is nothing to run block by block; remove `sequential = true` or add such a stage (e.g. `wanda`, `sparsegpt`, `reconstruct`)",
        )
    })?;
    let first_name = &stages[first].spec.name;
    for s in &stages[first + 1..] {
        if let Some(why) = global_reason(s) {
            return Err(pipeline.error(
                &s.spec.plugin.position,
                format!("stage[{}].plugin", s.spec.index),
                format!(
                    "stage `{}` (plugin `{}`) {why}, so under [calibration] sequential = true it must come before stage `{first_name}`, the first that runs block by block",
                    s.spec.name,
                    display_safe::name(&s.plugin.info.name),
                ),
            ));
        }
    }
    for s in &stages[first..] {
        if let Some(l) = s.targets.iter().find(|l| l.block.is_none()) {
            let position = s.spec.targets_position();
            return Err(pipeline.error(
                position,
                format!("stage[{}].targets", s.spec.index),
                format!(
                    "`{}` is outside the transformer blocks, but under [calibration] sequential = true stage `{}` runs block by block; protect it or prune it in a stage before `{first_name}`",
                    l.name, s.spec.name
                ),
            ));
        }
    }
    Ok(Some(first))
}

/// Runs `f` on every kept hidden state in parallel (results in sequence order), stopping
/// between sequences once `cancel` is cancelled.
fn each_state(
    states: &[Tensor],
    cancel: &CancelToken,
    f: impl Fn(&Tensor) -> Result<Tensor, String> + Sync,
) -> Result<Vec<Tensor>, String> {
    states
        .par_iter()
        .map(|x| {
            cancel.check().map_err(|e| e.to_string())?;
            f(x)
        })
        .collect()
}

/// Runs stages `from..` of `plan` block by block on `state` (the stages before `from` already
/// ran), announcing each with `stage-started` before the first block. Returns their reports
/// (each stage's calls summed over blocks) and the time spent carrying the calibration hidden
/// states through the pruned blocks.
pub(crate) fn run_blocks(
    plan: &Plan,
    from: usize,
    runtime: &Runtime,
    state: &mut RunState,
    budgets: &BTreeMap<usize, BTreeMap<String, f64>>,
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<(Vec<StageReport>, Duration), RunError> {
    let stages = &plan.stages[from..];
    let first = stages
        .first()
        .map_or(String::new(), |s| s.spec.name.clone());
    let apply_err = |message: String| RunError::Apply {
        stage: first.clone(),
        message,
    };
    let set: &Arc<CalibrationSet> = plan.calibration.as_ref().ok_or_else(|| {
        apply_err("sequential calibration needs calibration text, and none was loaded".into())
    })?;
    for (k, stage) in stages.iter().enumerate() {
        sink.emit(RunEvent::StageStarted {
            index: from + k,
            total: plan.stages.len(),
            name: stage.spec.name.clone(),
            plugin: stage.plugin.info.name.clone(),
            plugin_sha256: stage.plugin.compiled.sha256.clone(),
            targets: stage.targets.len(),
        });
    }
    let cancelled = |e: String| {
        if cancel.is_cancelled() {
            RunError::Cancelled {
                stage: first.clone(),
            }
        } else {
            apply_err(e)
        }
    };
    let mut carry_time = Duration::ZERO;
    let started = Instant::now();
    let session = Session::new(&state.model).map_err(|e| apply_err(e.to_string()))?;
    let blocks = session.num_blocks();
    let mut states: Vec<Tensor> = set
        .sequences
        .par_iter()
        .map(|seq| {
            cancel.check().map_err(|e| e.to_string())?;
            session
                .embed(seq)
                .map_err(|e| format!("calibration forward pass failed: {e}"))
        })
        .collect::<Result<_, String>>()
        .map_err(cancelled)?;
    drop(session);
    carry_time += started.elapsed();
    let mut reports: Vec<Option<StageReport>> = vec![None; stages.len()];
    for block in 0..blocks {
        let inputs = Arc::new(std::mem::take(&mut states));
        for (k, stage) in stages.iter().enumerate() {
            let targets: Vec<_> = stage
                .targets
                .iter()
                .filter(|l| l.block == Some(block))
                .cloned()
                .collect();
            if targets.is_empty() {
                continue;
            }
            if cancel.is_cancelled() {
                return Err(RunError::Cancelled {
                    stage: stage.spec.name.clone(),
                });
            }
            sink.emit(RunEvent::StageProgress {
                index: from + k,
                step: format!("block {} of {blocks}", block + 1),
                done: None,
                total: None,
            });
            let one_block = PlannedStage {
                targets,
                ..stage.clone()
            };
            // Statistics of this block alone, on the states the pruned blocks before it
            // produced, with this block as the earlier stages of this loop left it.
            state.calibrator = Some(Arc::new(
                Calibrator::for_block(state.model.clone(), set.clone(), block, inputs.clone())
                    .with_cancel(cancel.clone()),
            ));
            let (report, _) = run_stage(
                runtime,
                &plan.pipeline.sandbox,
                &one_block,
                budgets,
                Some(set),
                state,
                (from + k, &mut *sink),
                cancel,
            )?;
            match &mut reports[k] {
                Some(total) => total.add_call(&report),
                none => *none = Some(report),
            }
        }
        state.calibrator = None;
        // The pruned (and updated) block carries the states to the next one.
        let carry = Instant::now();
        let session = Session::new(&state.model).map_err(|e| apply_err(e.to_string()))?;
        states = each_state(&inputs, cancel, |x| {
            session
                .block_forward_from(block, x, None)
                .map_err(|e| format!("calibration forward pass failed: {e}"))
        })
        .map_err(cancelled)?;
        carry_time += carry.elapsed();
    }
    let mut out = Vec::with_capacity(stages.len());
    for (stage, report) in stages.iter().zip(reports) {
        let Some(mut report) = report else {
            return Err(RunError::Apply {
                stage: stage.spec.name.clone(),
                message: "no target of this stage is in any block the forward pass runs".into(),
            });
        };
        // What the whole stage did: every target, and its density over all of them.
        report.targets = stage.targets.len();
        report.density_after = state.density_of(stage.targets.iter().map(|l| l.name.as_str()));
        report.matched_layers = stage.targets.iter().map(|l| l.name.clone()).collect();
        out.push(report);
    }
    Ok((out, carry_time))
}
