//! `taylor`: first-order Taylor importance (Molchanov et al., 2019; LLM-Pruner, Ma et al.,
//! 2023). Removing weight w changes the calibration loss by about -g·w, where g is the gradient
//! of the loss with respect to w, so the score of a weight is |w · g|: the weights whose removal
//! the loss notices least go first. The gradient is the host's: the gradient of the mean
//! calibration loss, from one forward and backward pass over the calibration set.
//!
//! With `estimate = "fisher"` the score is w² · F instead, where F is the host's empirical
//! Fisher diagonal (the mean over calibration sequences of each sequence's squared gradient):
//! the second-order estimate of the loss increase of removing w (Optimal Brain Damage, LeCun et
//! al., 1990, with the Fisher for the Hessian). At a converged model the mean gradient is close
//! to zero and noisy, so the first-order score ranks poorly; the Fisher does not average out.
//!
//! Scores are compared across the whole layer (`scope = "layer"`, the default), within each
//! output row (`scope = "row"`), within N:M groups (`n`, `m`), or summed over blocks (`block`).
//! Everything runs as host kernels on handles: weights and gradients never enter wasm.
//! `validate` checks the parameters and the density they imply at planning, before the
//! gradient pass runs.

use espalier_plugin_sdk::*;

struct Taylor;

impl Guest for Taylor {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "taylor".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Taylor importance from the calibration loss's gradients (calibration text needed): keep the weights with the largest |w * dL/dw| (first order) or w^2 * Fisher (second order, `estimate = \"fisher\"`). Per layer, per row, N:M or blocks.".into(),
            params: vec![
                param(
                    "estimate",
                    ParamValue::Text("first-order".into()),
                    "\"first-order\": |w * g| with g the gradient of the mean calibration loss; \"fisher\": w^2 * the mean squared per-sequence gradient",
                ),
                param(
                    "scope",
                    ParamValue::Text("layer".into()),
                    "where scores compete: \"layer\" (the whole weight) or \"row\" (each output row keeps the same count)",
                ),
                param(
                    "n",
                    ParamValue::Integer(0),
                    "N of N:M (keep n of every m consecutive inputs); 0 = no N:M",
                ),
                param("m", ParamValue::Integer(0), "M of N:M (0 = no N:M)"),
                param(
                    "block",
                    ParamValue::Integers(vec![]),
                    "block shape [rows, cols] to keep whole blocks by summed importance; empty = single weights",
                ),
            ],
            needs: vec![Need::Weights, Need::Gradients],
            produces: OutputKind::Masks,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let targets: Vec<&LayerInfo> = ctx.targets.iter().collect();
        Settings::check(&Params::new(&ctx), Some(&ctx.density), &targets).map(|_| ())
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let targets: Vec<&LayerInfo> = ctx.targets.iter().map(|t| &t.layer).collect();
        // Densities are checked per target below (`target_density` names the layer).
        let Settings { selection, fisher } =
            Settings::check(&params, None, &targets).map_err(|p| problems_message(&p))?;
        let total = ctx.targets.len() as u64;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            let name = &target.layer.name;
            report_progress(i as u64, total, name);
            let w = model::weight(name)?;
            let scores = if fisher {
                let f = calibration::fisher(name)?;
                let squares = kernels::unary(UnaryOp::Square, &w);
                kernels::binary(BinaryOp::Mul, &squares, &f)?
            } else {
                let g = calibration::gradients(name)?;
                let product = kernels::binary(BinaryOp::Mul, &w, &g)?;
                kernels::unary(UnaryOp::Abs, &product)
            };
            let mask = match selection {
                Selection::Layer => {
                    kernels::select(&scores, Structure::Unstructured, target_density(target)?)?
                }
                Selection::Row => kernels::select_per_row(&scores, target_density(target)?)?,
                Selection::NOfM(nm) => kernels::select(&scores, Structure::NOfM(nm), 0.0)?,
                Selection::Blocks(b) => {
                    kernels::select(&scores, Structure::Blocks(b), target_density(target)?)?
                }
            };
            masks.push(LayerMask {
                layer: name.clone(),
                mask,
            });
        }
        report_progress(total, total, "done");
        Ok(masks_output(masks))
    }
}

/// How scores compete, from the parameters (exactly one of the modes).
#[derive(Clone, Copy)]
enum Selection {
    Layer,
    Row,
    NOfM(NOfM),
    Blocks(BlockShape),
}

/// The parameters, checked.
struct Settings {
    selection: Selection,
    /// `estimate = "fisher"` (else first order).
    fisher: bool,
}

impl Settings {
    /// The settings the parameters ask for, with every problem of them and of the density (not
    /// checked when `None`: `apply` checks each target's own).
    fn check(
        params: &Params,
        density: Option<&PlannedDensity>,
        targets: &[&LayerInfo],
    ) -> Result<Self, Vec<ParamProblem>> {
        let stage = |e: String| vec![ParamProblem::stage(e)];
        let (n, m) = (
            params.integer("n").map_err(stage)?,
            params.integer("m").map_err(stage)?,
        );
        let block = params.integers("block").map_err(stage)?;
        let mut problems = Vec::new();
        let fisher = match params.text("estimate").map_err(stage)? {
            "first-order" => false,
            "fisher" => true,
            other => {
                problems.push(ParamProblem::param(
                    "estimate",
                    format!("estimate = \"{other}\": use \"first-order\" or \"fisher\""),
                ));
                false
            }
        };
        let by_scope = match params.text("scope").map_err(stage)? {
            "layer" => Selection::Layer,
            "row" => Selection::Row,
            other => {
                problems.push(ParamProblem::param(
                    "scope",
                    format!("scope = \"{other}\": use \"layer\" or \"row\""),
                ));
                Selection::Layer
            }
        };
        let n_of_m = checks::optional_n_of_m(n, m).map_err(|p| problems.push(p));
        let blocks = checks::optional_block("block", block).map_err(|p| problems.push(p));
        let selection = match (n_of_m, blocks) {
            (Ok(Some(_)), Ok(Some(_))) => {
                problems.push(ParamProblem::param(
                    "block",
                    "set either N:M (`n`, `m`) or `block`, not both",
                ));
                by_scope
            }
            (Ok(Some(nm)), Ok(None)) => {
                problems.extend(density.and_then(|d| checks::n_of_m_density(nm, d)));
                problems.extend(checks::n_of_m_columns(nm, targets));
                Selection::NOfM(nm)
            }
            (Ok(None), Ok(Some(b))) => Selection::Blocks(b),
            _ => by_scope,
        };
        if !matches!(selection, Selection::NOfM(_)) {
            problems.extend(density.and_then(|d| checks::density_required("taylor", d)));
        }
        if problems.is_empty() {
            Ok(Settings { selection, fisher })
        } else {
            Err(problems)
        }
    }
}

export_criterion!(Taylor);
