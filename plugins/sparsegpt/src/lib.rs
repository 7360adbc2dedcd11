//! `sparsegpt`: SparseGPT (Frantar & Alistarh, 2023), one-shot pruning that removes weights
//! and updates the kept ones so that each layer's outputs on the calibration data change as
//! little as possible (Optimal Brain Surgeon on the layer-wise reconstruction error).
//!
//! Per target layer: the host's `obs` kernels invert the damped Hessian of the layer's inputs
//! and hold the weights; this plugin walks the columns left to right and decides what goes:
//! - unstructured (the default): at the start of every `mask_blocksize` columns, the weights of
//!   those columns with the lowest OBS scores `w² / U[j][j]²` (on the weights as updated so
//!   far) are removed, exactly `1 − density` of the range (SparseGPT's adaptive mask
//!   selection; `mask_blocksize = 0` selects once over the whole layer);
//! - N:M (`n`, `m`): in every group of `m` columns, the `m − n` lowest scores of each row, chosen
//!   when the update reaches the group;
//! - blocks (`block = [rows, cols]`): whole blocks by the sum of their scores, over ranges of
//!   whole block columns.
//!
//! The removed weights' error moves onto the columns not yet processed (lazy updates in blocks
//! of `blocksize` columns, 128 as in the paper; the result does not depend on it beyond
//! rounding). Defaults are the paper's: 1% damping, 128-column blocks.

use espalier_plugin_sdk::*;

struct SparseGpt;

/// Largest N:M group accepted (as the `n-m` criterion).
const MAX_M: u32 = 64;

/// What decides the removals.
#[derive(Clone, Copy)]
enum Mode {
    Unstructured,
    NOfM(NOfM),
    Blocks(BlockShape),
}

/// Checked parameters.
#[derive(Clone, Copy)]
struct Settings {
    mode: Mode,
    blocksize: u32,
    mask_blocksize: u32,
    damping: f64,
}

impl Settings {
    fn structure(&self) -> Structure {
        match self.mode {
            Mode::Unstructured => Structure::Unstructured,
            Mode::NOfM(nm) => Structure::NOfM(nm),
            Mode::Blocks(b) => Structure::Blocks(b),
        }
    }
}

/// The problems of the parameters, the density and the targets; the settings when usable.
fn settings(
    params: &Params,
    density: &PlannedDensity,
    targets: &[&LayerInfo],
) -> (Vec<ParamProblem>, Option<Settings>) {
    let mut problems = Vec::new();
    let blocksize = checks::obs_blocksize(params.integer("blocksize").unwrap_or(0))
        .map_err(|p| problems.push(p))
        .ok();
    let max = checks::MAX_OBS_BLOCKSIZE;
    let mask_blocksize = params.integer("mask_blocksize").unwrap_or(-1);
    if !(0..=max).contains(&mask_blocksize) {
        problems.push(ParamProblem::param(
            "mask_blocksize",
            format!("mask_blocksize = {mask_blocksize}: columns per mask selection, 0..={max} (0 = the whole layer at once; SparseGPT: 128)"),
        ));
    }
    let damping = checks::obs_damping(params.float("damping").unwrap_or(f64::NAN))
        .map_err(|p| problems.push(p))
        .ok();
    let nm = match checks::optional_n_of_m(
        params.integer("n").unwrap_or(0),
        params.integer("m").unwrap_or(0),
    ) {
        Ok(nm) => nm,
        Err(p) => {
            problems.push(p);
            None
        }
    };
    if let Some(nm) = nm
        && nm.m > MAX_M
    {
        problems.push(ParamProblem::param(
            "m",
            format!("m = {}: the group size must be at most {MAX_M}", nm.m),
        ));
    }
    let block = match checks::optional_block("block", params.integers("block").unwrap_or(&[])) {
        Ok(b) => b,
        Err(p) => {
            problems.push(p);
            None
        }
    };
    let mode = match (nm, block) {
        (Some(_), Some(_)) => {
            problems.push(ParamProblem::param(
                "block",
                "choose N:M (`n`, `m`) or `block`, not both",
            ));
            None
        }
        (Some(nm), None) => {
            problems.extend(checks::n_of_m_density(nm, density));
            problems.extend(checks::n_of_m_columns(nm, targets));
            Some(Mode::NOfM(nm))
        }
        (None, block) => {
            if matches!(density, PlannedDensity::Unset) {
                problems.push(ParamProblem::density(
                    "sparsegpt needs the kept fraction: set `density` (e.g. 0.5), or give `n` and `m` for N:M",
                ));
            }
            Some(block.map_or(Mode::Unstructured, Mode::Blocks))
        }
    };
    let ok = match (mode, blocksize, damping) {
        (Some(mode), Some(blocksize), Some(damping)) if problems.is_empty() => Some(Settings {
            mode,
            blocksize,
            mask_blocksize: mask_blocksize as u32,
            damping,
        }),
        _ => None,
    };
    (problems, ok)
}

/// The column ranges decided at once: N:M groups, ranges of whole block columns, or
/// `mask_blocksize` columns (the whole layer for 0).
fn ranges(settings: &Settings, cols: u32) -> Vec<(u32, u32)> {
    let step = match settings.mode {
        Mode::NOfM(nm) => nm.m,
        Mode::Unstructured if settings.mask_blocksize == 0 => cols,
        Mode::Unstructured => settings.mask_blocksize,
        Mode::Blocks(_) if settings.mask_blocksize == 0 => cols,
        // Whole block columns: at least one, as many as fit in mask_blocksize.
        Mode::Blocks(b) => (settings.mask_blocksize / b.cols).max(1) * b.cols,
    }
    .max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < cols {
        let end = start.saturating_add(step).min(cols);
        out.push((start, end));
        start = end;
    }
    out
}

/// Prunes one layer: returns its mask and updated weights.
fn prune(settings: &Settings, name: &str, density: Option<f64>) -> Result<(Mask, Tensor), String> {
    let density = match settings.mode {
        Mode::NOfM(_) => 0.0,
        _ => density.ok_or_else(|| {
            format!("layer `{name}` has no density: set `density` in the stage or feed it a budget")
        })?,
    };
    let w = model::weight(name)?;
    let update = obs::layer_hessian(name)?.update(&w, settings.damping, settings.blocksize)?;
    let structure = settings.structure();
    for (start, end) in ranges(settings, update.cols()) {
        let scores = update.scores(start, end)?;
        let keep = kernels::select(&scores, structure, density)?;
        update.process(start, end, &keep)?;
    }
    let done = obs::finish(update, structure)?;
    Ok((done.mask, done.weights))
}

impl Guest for SparseGpt {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "sparsegpt".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "SparseGPT: removes the weights with the lowest OBS scores column block by column block and updates the kept weights to restore each layer's outputs on the calibration data. Unstructured (density), N:M (n, m) or blocks (block = [rows, cols]); paper defaults: 128-column blocks, 1% damping.".into(),
            params: vec![
                param("blocksize", ParamValue::Integer(128), "columns per lazy-update block (SparseGPT: 128)"),
                param("mask_blocksize", ParamValue::Integer(128), "columns per mask selection, unstructured and blocks (SparseGPT: 128; 0 = the whole layer at once)"),
                param("damping", ParamValue::Float(0.01), "fraction of the mean Hessian diagonal added to the diagonal (SparseGPT: 0.01)"),
                param("n", ParamValue::Integer(0), "N:M: weights kept per group of m columns (0 with m = 0: not N:M)"),
                param("m", ParamValue::Integer(0), "N:M: group size along in-features (e.g. 4 for 2:4)"),
                param("block", ParamValue::Integers(Vec::new()), "blocks: [rows, cols] removed together (empty: single weights)"),
            ],
            needs: vec![Need::Weights, Need::Hessians],
            produces: OutputKind::Weights,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let targets: Vec<&LayerInfo> = ctx.targets.iter().collect();
        problems_result(settings(&Params::new(&ctx), &ctx.density, &targets).0)
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let targets: Vec<&LayerInfo> = ctx.targets.iter().map(|t| &t.layer).collect();
        let density = match ctx.targets.first().and_then(|t| t.density) {
            Some(d) => PlannedDensity::Fixed(d),
            None => PlannedDensity::Unset,
        };
        let (problems, ok) = settings(&Params::new(&ctx), &density, &targets);
        no_problems(problems)?;
        let settings = ok.ok_or("invalid parameters")?;
        let total = ctx.targets.len() as u64;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        let mut weights = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            let name = &target.layer.name;
            report_progress(i as u64, total, name);
            let (mask, w) = prune(&settings, name, target.density)?;
            masks.push(LayerMask {
                layer: name.clone(),
                mask,
            });
            weights.push(LayerWeights {
                layer: name.clone(),
                weights: w,
            });
        }
        report_progress(total, total, "done");
        Ok(weights_output(masks, weights))
    }
}

export_criterion!(SparseGpt);
