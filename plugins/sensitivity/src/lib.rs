//! `sensitivity`: turns one global density into per-layer budgets, pruning more where the model
//! minds least. It produces budgets, not masks: a later stage with `density = "budget"` (e.g.
//! `block`, `magnitude`, `wanda`) does the pruning at those densities.
//!
//! Two measurements, both deterministic:
//!
//! - `method = "loss"` (default), the classic sensitivity analysis: for each group of target
//!   layers (a transformer block, or each layer alone with `granularity = "layer"`) the host
//!   measures the calibration loss with that group pruned by magnitude at a few probe densities
//!   (`probe_densities`; by default the target and the target ± `spread`), under the
//!   `probe_block` structure so a block criterion is probed with blocks, on top of the current
//!   masks. Each group's loss increase is then a curve Δ_g(d) through its probes and (1, 0),
//!   linear between them and made non-increasing in d. Budgets give every group the same loss
//!   increase ε: d_g(ε) is the lowest density whose Δ_g stays within ε, and ε is bisected so the
//!   parameter-weighted mean density equals the stage's density. Groups whose loss barely moves
//!   go lowest. One forward pass per trial at most (the host resumes from the hidden states
//!   entering the group's block).
//! - `method = "owl"`: Outlier-Weighted Layerwise sparsity (Yin et al., 2024). A group's
//!   importance is its share of outlier weights: Wanda scores |W_ij|·‖X_j‖ above `owl_m` times
//!   the layer's mean score. No trials; needs the activation norms (computed on first use). As in
//!   the paper, the outlier ratios are min–max normalised to r ∈ [0, 1] and group g gets
//!   `clamp(β + spread · (2 r_g − 1), min_density, max_density)`, β bisected to the target.
//!
//! Either way every budget lies in [min_density, max_density], the parameter-weighted mean is the
//! stage's density (to 1e-9), and a target the bounds make unreachable is an error, not a silent
//! miss. Each group's measurement and budget is printed to the log.
//!
//! `validate` checks every parameter and the stage's density at planning, before the
//! calibration passes run; `apply` reports its progress trial by trial (group by group for OWL).

use espalier_plugin_sdk::*;

struct Sensitivity;

impl Guest for Sensitivity {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "sensitivity".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Per-layer density budgets from a global density: measures each block's (or layer's) calibration-loss increase when pruned, or its OWL outlier ratio, and prunes more where the loss barely moves. Feed a later stage with density = \"budget\".".into(),
            params: vec![
                param("method", ParamValue::Text("loss".into()), "\"loss\" (measured loss increase) or \"owl\" (outlier-weighted layerwise sparsity)"),
                param("granularity", ParamValue::Text("block".into()), "\"block\" (one budget per transformer block) or \"layer\" (one per target layer)"),
                param("probe_densities", ParamValue::Floats(vec![]), "kept fractions at which the loss method probes each group; empty = the stage's density and that density ± spread (within the bounds)"),
                param("probe_block", ParamValue::Integers(vec![]), "structure of the probe: [rows, cols] blocks, or empty for unstructured"),
                param("spread", ParamValue::Float(0.1), "loss method: distance of the default probes from the target; owl: half-width of the density range before rebalancing"),
                param("min_density", ParamValue::Float(0.0), "no budget below this kept fraction"),
                param("max_density", ParamValue::Float(1.0), "no budget above this kept fraction"),
                param("owl_m", ParamValue::Float(5.0), "OWL: a weight is an outlier when its Wanda score exceeds owl_m times its layer's mean score"),
            ],
            needs: vec![Need::Weights, Need::Loss],
            produces: OutputKind::Budgets,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let target = match ctx.density {
            PlannedDensity::Fixed(d) => Ok(d),
            PlannedDensity::Unset => Err(ParamProblem::density(
                "sensitivity turns one global density into per-layer budgets: set `density` (e.g. density = 0.5)",
            )),
            PlannedDensity::Budget => Err(ParamProblem::density(
                "sensitivity turns one global density into budgets and cannot take budgets itself: set a number (e.g. density = 0.5)",
            )),
        };
        Settings::from_params(&Params::new(&ctx), target).map(|_| ())
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let settings = Settings::from_params(&params, global_density(&ctx.targets))
            .map_err(|p| problems_message(&p))?;
        let groups = group_targets(&ctx.targets, settings.per_layer);
        let sizes: Vec<f64> = groups
            .iter()
            .map(|g| g.iter().map(|t| numel(&t.layer)).sum())
            .collect();
        let densities = match settings.method {
            Method::Loss => {
                let curves = loss_curves(&groups, &settings)?;
                let densities = equal_loss_budgets(&curves, &sizes, &settings)?;
                for ((group, curve), d) in groups.iter().zip(&curves).zip(&densities) {
                    let probes: Vec<String> = curve
                        .iter()
                        .filter(|(d, _)| *d < 1.0)
                        .map(|(d, l)| format!("{d:.3}: {l:+.5}"))
                        .collect();
                    println!(
                        "{}: loss increase at density {} -> budget {d:.4}",
                        group_label(group),
                        probes.join(", ")
                    );
                }
                densities
            }
            Method::Owl => {
                let ratios = owl_importance(&groups, settings.owl_m)?;
                let densities = spread_budgets(&ratios, &sizes, &settings)?;
                for ((group, r), d) in groups.iter().zip(&ratios).zip(&densities) {
                    println!(
                        "{}: outlier ratio {r:.5} -> budget {d:.4}",
                        group_label(group)
                    );
                }
                densities
            }
        };
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
            weights: Vec::new(),
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
    probe_densities: Vec<f64>,
    probe: Structure,
    spread: f64,
    min: f64,
    max: f64,
    owl_m: f64,
}

/// The one density every target carries (`sensitivity` spreads it into budgets).
fn global_density(targets: &[Target]) -> Result<f64, ParamProblem> {
    let first = targets
        .first()
        .ok_or_else(|| ParamProblem::targets("the stage has no target layers"))?;
    let target = target_density(first).map_err(ParamProblem::density)?;
    if let Some(other) = targets
        .iter()
        .find(|t| t.density.is_some_and(|d| (d - target).abs() > 1e-12))
    {
        return Err(ParamProblem::density(format!(
            "`sensitivity` turns one global density into budgets, but `{}` asks {:?} and `{}` {target}; give the stage one density",
            other.layer.name, other.density, first.layer.name
        )));
    }
    Ok(target)
}

impl Settings {
    /// The settings, or every problem of the parameters and the stage's density `target`.
    fn from_params(
        params: &Params,
        target: Result<f64, ParamProblem>,
    ) -> Result<Self, Vec<ParamProblem>> {
        let stage = |e: String| vec![ParamProblem::stage(e)];
        let mut problems = Vec::new();
        let method = match params.text("method").map_err(stage)? {
            "loss" => Method::Loss,
            "owl" => Method::Owl,
            other => {
                problems.push(ParamProblem::param(
                    "method",
                    format!("method = \"{other}\": use \"loss\" or \"owl\""),
                ));
                Method::Loss
            }
        };
        let per_layer = match params.text("granularity").map_err(stage)? {
            "block" => false,
            "layer" => true,
            other => {
                problems.push(ParamProblem::param(
                    "granularity",
                    format!("granularity = \"{other}\": use \"block\" or \"layer\""),
                ));
                false
            }
        };
        let (min, max) = (
            params.float("min_density").map_err(stage)?,
            params.float("max_density").map_err(stage)?,
        );
        let spread = params.float("spread").map_err(stage)?;
        // Checked before any clamp below (clamp panics on min > max).
        let bounds_ok = (0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max) && min <= max;
        if !bounds_ok {
            problems.push(ParamProblem::param(
                if (0.0..=1.0).contains(&min) {
                    "max_density"
                } else {
                    "min_density"
                },
                format!(
                    "min_density = {min} and max_density = {max} must satisfy 0 <= min <= max <= 1"
                ),
            ));
        }
        if !(0.0..=1.0).contains(&spread) {
            problems.push(ParamProblem::param(
                "spread",
                format!("spread = {spread} must be in [0, 1]"),
            ));
        }
        let target = match target {
            Ok(t) => {
                if bounds_ok && (t < min || t > max) {
                    problems.push(ParamProblem::density(format!(
                        "the stage's density {t} lies outside [min_density, max_density] = [{min}, {max}]; widen the bounds or change the density"
                    )));
                }
                Some(t)
            }
            Err(p) => {
                problems.push(p);
                None
            }
        };
        let mut probe_densities = params.floats("probe_densities").map_err(stage)?;
        if let Some(bad) = probe_densities.iter().find(|d| !(0.0..1.0).contains(*d)) {
            problems.push(ParamProblem::param(
                "probe_densities",
                format!("probe density {bad} must be in [0, 1): a probe at 1 prunes nothing"),
            ));
        }
        let probe = match params.integers("probe_block").map_err(stage)? {
            [] => Structure::Unstructured,
            [r, c] if (1..=4096).contains(r) && (1..=4096).contains(c) => {
                Structure::Blocks(BlockShape {
                    rows: *r as u32,
                    cols: *c as u32,
                })
            }
            other => {
                problems.push(ParamProblem::param(
                    "probe_block",
                    format!(
                        "probe_block must be [rows, cols] with entries in 1..=4096, or empty; got {other:?}"
                    ),
                ));
                Structure::Unstructured
            }
        };
        let owl_m = params.float("owl_m").map_err(stage)?;
        if !(owl_m > 0.0 && owl_m.is_finite()) {
            problems.push(ParamProblem::param(
                "owl_m",
                format!("owl_m = {owl_m} must be a positive number (5 in the paper)"),
            ));
        }
        let (Some(target), true) = (target, problems.is_empty()) else {
            return Err(problems);
        };
        if probe_densities.is_empty() {
            probe_densities = [target - spread, target, target + spread]
                .into_iter()
                .map(|d| d.clamp(min, max))
                .filter(|&d| d < 1.0)
                .collect();
        }
        probe_densities.sort_by(f64::total_cmp);
        probe_densities.dedup();
        Ok(Settings {
            method,
            per_layer,
            target,
            probe_densities,
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

/// A group as people read it: `block 3`, or the layer's name.
fn group_label(group: &[&Target]) -> String {
    match (group.len(), group.first().and_then(|t| t.layer.block)) {
        (n, Some(b)) if n > 1 => format!("block {b} ({n} layers)"),
        _ => group
            .first()
            .map_or_else(String::new, |t| t.layer.name.clone()),
    }
}

/// Each group's loss increase at every probe density, as `(density, increase)` points sorted by
/// density and ending with `(1, 0)`.
fn loss_curves(groups: &[Vec<&Target>], s: &Settings) -> Result<Vec<Vec<(f64, f64)>>, String> {
    let base = calibration::loss()?;
    let trials = (groups.len() * s.probe_densities.len()) as u64;
    let mut trial = 0u64;
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let label = group_label(group);
        // |w|² ranks single weights like |w| and blocks by their L2 norm.
        let mut scores = Vec::with_capacity(group.len());
        for t in group {
            let w = model::weight(&t.layer.name)?;
            scores.push((t.layer.name.clone(), kernels::unary(UnaryOp::Square, &w)));
        }
        let mut curve = Vec::with_capacity(s.probe_densities.len() + 1);
        for &density in &s.probe_densities {
            report_progress(
                trial,
                trials,
                &format!(
                    "loss trial {}/{trials}: {label} at density {density:.3}",
                    trial + 1
                ),
            );
            trial += 1;
            let mut masks = Vec::with_capacity(group.len());
            for (name, score) in &scores {
                masks.push((name.clone(), kernels::select(score, s.probe, density)?));
            }
            let changes: Vec<(String, &Mask)> = masks.iter().map(|(n, m)| (n.clone(), m)).collect();
            curve.push((density, calibration::loss_with_masks(&changes)? - base));
        }
        curve.push((1.0, 0.0));
        out.push(curve);
    }
    report_progress(trials, trials, "loss trials done");
    Ok(out)
}

/// The curve made non-increasing in density (a denser layer never costs more loss), so that
/// "the lowest density within ε" is well defined.
fn monotone(curve: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = curve.to_vec();
    for i in (0..out.len().saturating_sub(1)).rev() {
        out[i].1 = out[i].1.max(out[i + 1].1);
    }
    out
}

/// The lowest density in [lowest probe, 1] at which the (monotone) curve is within `eps`.
fn density_within(curve: &[(f64, f64)], eps: f64) -> f64 {
    if curve[0].1 <= eps {
        return curve[0].0;
    }
    for pair in curve.windows(2) {
        let ((d0, l0), (d1, l1)) = (pair[0], pair[1]);
        if l1 <= eps {
            // l0 > eps >= l1: linear between the two probes.
            return d0 + (d1 - d0) * (l0 - eps) / (l0 - l1);
        }
    }
    1.0
}

/// Equal-loss-increase budgets (see the module doc), clamped to the bounds.
fn equal_loss_budgets(
    curves: &[Vec<(f64, f64)>],
    sizes: &[f64],
    s: &Settings,
) -> Result<Vec<f64>, String> {
    let curves: Vec<Vec<(f64, f64)>> = curves.iter().map(|c| monotone(c)).collect();
    let total: f64 = sizes.iter().sum();
    let densities = |eps: f64| -> Vec<f64> {
        curves
            .iter()
            .map(|c| density_within(c, eps).clamp(s.min, s.max))
            .collect()
    };
    let mean = |d: &[f64]| d.iter().zip(sizes).map(|(d, n)| d * n).sum::<f64>() / total;
    // The mean density falls as ε grows: at the largest increase every group sits at its lowest
    // probe; below zero (the monotone curves end at (1, 0), so none is below) every group is
    // dense, at the upper bound.
    let top = curves
        .iter()
        .flat_map(|c| c.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let (mut lo, mut hi) = (-1.0, top);
    let (d_lo, d_hi) = (densities(lo), densities(hi));
    if mean(&d_hi) > s.target + 1e-9 || mean(&d_lo) < s.target - 1e-9 {
        return Err(format!(
            "the probes reach mean densities {:.4}..{:.4}, which do not include the target {}: widen `spread`, the probes or [min_density, max_density]",
            mean(&d_hi),
            mean(&d_lo),
            s.target
        ));
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mean(&densities(mid)) > s.target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    // A flat stretch of a curve makes the mean jump at one ε; blend the two sides to land on
    // the target exactly (the mean is linear in the blend).
    let (a, b) = (densities(lo), densities(hi));
    let (ma, mb) = (mean(&a), mean(&b));
    let t = if (ma - mb).abs() > 1e-15 {
        ((ma - s.target) / (ma - mb)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Ok(a.iter().zip(&b).map(|(x, y)| x + t * (y - x)).collect())
}

/// OWL's outlier ratio of each group: the fraction of its weights whose Wanda score exceeds
/// `m` times the mean score of their layer.
fn owl_importance(groups: &[Vec<&Target>], m: f64) -> Result<Vec<f64>, String> {
    let mut out = Vec::with_capacity(groups.len());
    let count = groups.len() as u64;
    for (i, group) in groups.iter().enumerate() {
        report_progress(
            i as u64,
            count,
            &format!("outlier ratio of {}", group_label(group)),
        );
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
    report_progress(count, count, "outlier ratios done");
    Ok(out)
}

/// OWL's budgets from importances: min–max positions, spread around β, clamped to the bounds,
/// β bisected so the size-weighted mean density is the target.
fn spread_budgets(importance: &[f64], sizes: &[f64], s: &Settings) -> Result<Vec<f64>, String> {
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
