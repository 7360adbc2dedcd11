//! `sensitivity`: turns one global density into per-layer budgets, pruning more where the model
//! minds least. It produces budgets, not masks: a later stage with `density = "budget"` (e.g.
//! `block`, `magnitude`, `wanda`) does the pruning at those densities.
//!
//! Two measurements, both deterministic:
//!
//! - `method = "loss"` (default): for each group of target layers (a transformer block, or each
//!   layer alone with `granularity = "layer"`) the host measures the calibration loss with that
//!   group pruned by magnitude at `probe_density` (under the `probe_block` structure, so a block
//!   criterion is probed with blocks), on top of the current masks. The loss increase is the
//!   group's sensitivity. One trial per group, each one forward pass at most (the host resumes
//!   from the hidden states entering the group's block).
//! - `method = "owl"`: Outlier-Weighted Layerwise sparsity (Yin et al., 2024). A group's
//!   importance is its share of outlier weights: Wanda scores |W_ij|·‖X_j‖ above `owl_m` times
//!   the layer's mean score. No trials; needs the activation norms (computed on first use).
//!
//! Budgets: importances (the log loss increase, or the outlier ratio) are min–max normalised over
//! the groups to positions r ∈ [0, 1], and group g gets density
//! `clamp(β + spread · (2 r_g − 1), min_density, max_density)`, with β found by bisection so that
//! the parameter-weighted mean density equals the stage's density exactly (to 1e-9). A target
//! that the bounds make unreachable is an error, not a silent miss.

use espalier_plugin_sdk::*;

struct Sensitivity;

/// Loss increases below this count as this (log of zero is not a position).
const MIN_INCREASE: f64 = 1e-9;

impl Guest for Sensitivity {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "sensitivity".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Per-layer density budgets from a global density: measures each block's (or layer's) calibration-loss increase when pruned, or its OWL outlier ratio, and prunes more where the loss barely moves. Feed a later stage with density = \"budget\".".into(),
            params: vec![
                param("method", ParamValue::Text("loss".into()), "\"loss\" (measured loss increase) or \"owl\" (outlier-weighted layerwise sparsity)"),
                param("granularity", ParamValue::Text("block".into()), "\"block\" (one budget per transformer block) or \"layer\" (one per target layer)"),
                param("probe_density", ParamValue::Float(-1.0), "kept fraction of the magnitude probe of the loss method; negative = the stage's density"),
                param("probe_block", ParamValue::Integers(vec![]), "structure of the probe: [rows, cols] blocks, or empty for unstructured"),
                param("spread", ParamValue::Float(0.1), "half-width of the density range before rebalancing: the most sensitive group gets about density + spread, the least density - spread"),
                param("min_density", ParamValue::Float(0.0), "no budget below this kept fraction"),
                param("max_density", ParamValue::Float(1.0), "no budget above this kept fraction"),
                param("owl_m", ParamValue::Float(5.0), "OWL: a weight is an outlier when its Wanda score exceeds owl_m times its layer's mean score"),
            ],
            needs: vec![Need::Weights, Need::Loss],
            produces: OutputKind::Budgets,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let settings = Settings::from_params(&params, &ctx)?;
        let groups = group_targets(&ctx.targets, settings.per_layer);
        let importance = match settings.method {
            Method::Loss => loss_importance(&groups, &settings)?,
            Method::Owl => owl_importance(&groups, settings.owl_m)?,
        };
        let sizes: Vec<f64> = groups
            .iter()
            .map(|g| g.iter().map(|t| numel(&t.layer)).sum())
            .collect();
        let densities = allocate(&importance, &sizes, &settings)?;
        let mut budgets = Vec::with_capacity(ctx.targets.len());
        for (group, density) in groups.iter().zip(&densities) {
            for target in group {
                budgets.push(LayerBudget {
                    layer: target.layer.name.clone(),
                    density: *density,
                });
            }
        }
        Ok(StageOutput {
            masks: Vec::new(),
            budgets,
            heads: Vec::new(),
        })
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Loss,
    Owl,
}

struct Settings {
    method: Method,
    per_layer: bool,
    target: f64,
    probe_density: f64,
    probe: Structure,
    spread: f64,
    min: f64,
    max: f64,
    owl_m: f64,
}

impl Settings {
    fn from_params(params: &Params, ctx: &StageContext) -> Result<Self, String> {
        let method = match params.text("method")? {
            "loss" => Method::Loss,
            "owl" => Method::Owl,
            other => return Err(format!("method = \"{other}\": use \"loss\" or \"owl\"")),
        };
        let per_layer = match params.text("granularity")? {
            "block" => false,
            "layer" => true,
            other => {
                return Err(format!(
                    "granularity = \"{other}\": use \"block\" or \"layer\""
                ));
            }
        };
        // One global target: every target must carry the same density.
        let first = ctx
            .targets
            .first()
            .ok_or("the stage has no target layers")?;
        let target = target_density(first)?;
        if let Some(other) = ctx
            .targets
            .iter()
            .find(|t| t.density.is_some_and(|d| (d - target).abs() > 1e-12))
        {
            return Err(format!(
                "`sensitivity` turns one global density into budgets, but `{}` asks {:?} and `{}` {target}; give the stage one density",
                other.layer.name, other.density, first.layer.name
            ));
        }
        let probe_density = match params.float("probe_density")? {
            d if d < 0.0 => target,
            d if d <= 1.0 => d,
            d => return Err(format!("probe_density = {d} must be at most 1")),
        };
        let probe = match params.integers("probe_block")? {
            [] => Structure::Unstructured,
            [r, c] if (1..=4096).contains(r) && (1..=4096).contains(c) => {
                Structure::Blocks(BlockShape {
                    rows: *r as u32,
                    cols: *c as u32,
                })
            }
            other => {
                return Err(format!(
                    "probe_block must be [rows, cols] with entries in 1..=4096, or empty; got {other:?}"
                ));
            }
        };
        let (min, max) = (params.float("min_density")?, params.float("max_density")?);
        if !(0.0..=1.0).contains(&min) || !(0.0..=1.0).contains(&max) || min > max {
            return Err(format!(
                "min_density = {min} and max_density = {max} must satisfy 0 <= min <= max <= 1"
            ));
        }
        if target < min || target > max {
            return Err(format!(
                "the stage's density {target} lies outside [min_density, max_density] = [{min}, {max}]"
            ));
        }
        let spread = params.float("spread")?;
        if !(0.0..=1.0).contains(&spread) {
            return Err(format!("spread = {spread} must be in [0, 1]"));
        }
        let owl_m = params.float("owl_m")?;
        if owl_m <= 0.0 {
            return Err(format!("owl_m = {owl_m} must be positive"));
        }
        Ok(Settings {
            method,
            per_layer,
            target,
            probe_density,
            probe,
            spread,
            min,
            max,
            owl_m,
        })
    }
}

fn numel(layer: &LayerInfo) -> f64 {
    layer.shape.iter().map(|&d| f64::from(d)).product()
}

/// Targets grouped by transformer block (in order of first appearance; layers outside blocks,
/// such as an LM head, each form their own group), or one group per layer.
fn group_targets(targets: &[Target], per_layer: bool) -> Vec<Vec<&Target>> {
    let mut groups: Vec<Vec<&Target>> = Vec::new();
    let mut keys: Vec<Option<u32>> = Vec::new();
    for t in targets {
        let key = if per_layer { None } else { t.layer.block };
        match key.and_then(|k| keys.iter().position(|&x| x == Some(k))) {
            Some(i) => groups[i].push(t),
            None => {
                keys.push(key);
                groups.push(vec![t]);
            }
        }
    }
    groups
}

/// log(loss increase) of each group pruned by magnitude at the probe density.
fn loss_importance(groups: &[Vec<&Target>], s: &Settings) -> Result<Vec<f64>, String> {
    let base = calibration::loss()?;
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let mut masks = Vec::with_capacity(group.len());
        for t in group {
            let w = model::weight(&t.layer.name)?;
            // |w|² ranks single weights like |w| and blocks by their L2 norm.
            let scores = kernels::unary(UnaryOp::Square, &w);
            masks.push((
                t.layer.name.clone(),
                kernels::select(&scores, s.probe, s.probe_density)?,
            ));
        }
        let changes: Vec<(String, &Mask)> = masks.iter().map(|(n, m)| (n.clone(), m)).collect();
        let loss = calibration::loss_with_masks(&changes)?;
        out.push((loss - base).max(MIN_INCREASE).ln());
    }
    Ok(out)
}

/// OWL's outlier ratio of each group: the fraction of its weights whose Wanda score exceeds
/// `m` times the mean score of their layer.
fn owl_importance(groups: &[Vec<&Target>], m: f64) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let (mut outliers, mut total) = (0u64, 0u64);
        for t in group {
            let name = &t.layer.name;
            let w = model::weight(name)?;
            let norms = calibration::activation_norms(name)?;
            let scores = kernels::binary(
                BinaryOp::Mul,
                &kernels::unary(UnaryOp::Abs, &w),
                &kernels::unary(UnaryOp::Sqrt, &norms),
            )?;
            let [rows, _] = scores.shape()[..] else {
                return Err(format!("layer `{name}` is not 2-D"));
            };
            // The mean over the layer, then the outliers counted row block by row block (the
            // guest never holds the whole layer).
            let row_sums = kernels::reduce(ReduceOp::Sum, &scores, 1)?;
            let mean = read_all(&row_sums)?
                .iter()
                .map(|&v| f64::from(v))
                .sum::<f64>()
                / scores.numel() as f64;
            let threshold = (m * mean) as f32;
            let step = 256u32;
            let mut start = 0u32;
            while start < rows {
                let count = step.min(rows - start);
                let values = scores.read_rows(start, count)?;
                outliers += values.iter().filter(|&&v| v > threshold).count() as u64;
                start += count;
            }
            total += scores.numel();
        }
        out.push(outliers as f64 / total.max(1) as f64);
    }
    Ok(out)
}

/// Budgets from importances: min–max positions, spread around β, clamped to the bounds, β
/// bisected so the size-weighted mean density is the target.
fn allocate(importance: &[f64], sizes: &[f64], s: &Settings) -> Result<Vec<f64>, String> {
    let lo = importance.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = importance.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let positions: Vec<f64> = importance
        .iter()
        .map(|&v| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 })
        .collect();
    let total: f64 = sizes.iter().sum();
    let densities = |beta: f64| -> Vec<f64> {
        positions
            .iter()
            .map(|&r| (beta + s.spread * (2.0 * r - 1.0)).clamp(s.min, s.max))
            .collect()
    };
    let mean = |d: &[f64]| d.iter().zip(sizes).map(|(d, n)| d * n).sum::<f64>() / total;
    // The weighted mean grows monotonically with β; [min - spread, max + spread] brackets it.
    let (mut a, mut b) = (s.min - s.spread, s.max + s.spread);
    if mean(&densities(a)) > s.target + 1e-9 || mean(&densities(b)) < s.target - 1e-9 {
        return Err(format!(
            "no budgets within [{}, {}] average {}",
            s.min, s.max, s.target
        ));
    }
    for _ in 0..200 {
        let mid = 0.5 * (a + b);
        if mean(&densities(mid)) < s.target {
            a = mid;
        } else {
            b = mid;
        }
    }
    Ok(densities(0.5 * (a + b)))
}

export_criterion!(Sensitivity);
