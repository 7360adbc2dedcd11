//! `magnitude`: unstructured magnitude pruning. Keeps the weights with the largest |w|, either
//! per layer (each target keeps exactly its density) or with one global threshold over all
//! targets (the stage's density overall; layers with larger weights keep more).
//!
//! `validate` refuses, at planning, an unknown `scope`, a stage without a density and a global
//! scope fed per-layer budgets.

use espalier_plugin_sdk::*;

struct Magnitude;

/// The problems of `scope` and the stage's density.
fn check(scope: &str, density: &PlannedDensity) -> Vec<ParamProblem> {
    let mut problems = Vec::new();
    if scope != "layer" && scope != "global" {
        problems.push(ParamProblem::param(
            "scope",
            format!("scope must be \"layer\" or \"global\", not {scope:?}"),
        ));
    }
    match density {
        PlannedDensity::Unset => problems.push(ParamProblem::density(
            "magnitude keeps a fraction of each target's weights: set `density` (e.g. density = 0.5) or feed it a budget (density = \"budget\")",
        )),
        PlannedDensity::Budget if scope == "global" => problems.push(ParamProblem::param(
            "scope",
            "scope = \"global\" needs one density for all targets, not per-layer budgets; use scope = \"layer\" or a fixed density",
        )),
        _ => {}
    }
    problems
}

impl Guest for Magnitude {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "magnitude".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Unstructured magnitude pruning: keep the largest |w|, per layer or with one global threshold over all targets.".into(),
            params: vec![param(
                "scope",
                ParamValue::Text("layer".into()),
                "`layer`: each target keeps its density; `global`: one threshold over all targets",
            )],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let scope = Params::new(&ctx)
            .text("scope")
            .map_err(|e| vec![ParamProblem::stage(e)])?;
        problems_result(check(scope, &ctx.density))
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let total = ctx.targets.len() as u64;
        let mut scores = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            report_progress(i as u64, total, &target.layer.name);
            let w = model::weight(&target.layer.name)?;
            scores.push(kernels::unary(UnaryOp::Abs, &w));
        }
        let masks = match params.text("scope")? {
            "layer" => ctx
                .targets
                .iter()
                .zip(&scores)
                .map(|(target, s)| {
                    let density = target_density(target)?;
                    kernels::select(s, Structure::Unstructured, density)
                })
                .collect::<Result<Vec<Mask>, String>>()?,
            "global" => {
                let first = ctx.targets.first().map(target_density).transpose()?;
                let Some(density) = first else {
                    return Ok(masks_output(Vec::new()));
                };
                if ctx.targets.iter().any(|t| t.density != Some(density)) {
                    return Err("scope = \"global\" needs one density for all targets, not per-layer budgets".into());
                }
                let refs: Vec<&Tensor> = scores.iter().collect();
                kernels::select_global(&refs, density)?
            }
            other => {
                return Err(format!(
                    "scope must be \"layer\" or \"global\", not {other:?}"
                ));
            }
        };
        report_progress(total, total, "done");
        Ok(masks_output(
            ctx.targets
                .iter()
                .zip(masks)
                .map(|(t, mask)| LayerMask {
                    layer: t.layer.name.clone(),
                    mask,
                })
                .collect(),
        ))
    }
}

export_criterion!(Magnitude);
