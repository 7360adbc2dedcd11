//! Test plugin: per-row magnitude pruning written against `espalier:prune@0.5.0` with its own
//! bindings. It stands for every plugin built before 0.6.0 (which added mask updates during
//! fine-tuning): the host must keep running it, call its `validate` through the 0.5 world and
//! report its problems at their lines, and pass on its progress reports.

// The generated export glue of `validate` takes the flattened planning context as more than
// seven core-wasm parameters (the canonical ABI; the SDK allows the same for its bindings).
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../../../wit/since_v0.5.0",
    world: "criterion",
});

use espalier::prune::kernels::{self, UnaryOp};
use espalier::prune::plugin_types::{
    LayerMask, Need, OutputKind, ParamKind, ParamSpec, ParamValue, ProblemAt,
};
use espalier::prune::{model, progress};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "legacy-v05".into(),
            version: "0.0.1".into(),
            description: "Per-row magnitude built against the 0.5.0 WIT (compatibility test)."
                .into(),
            params: vec![ParamSpec {
                name: "refuse".into(),
                kind: ParamKind::Boolean,
                default: Some(ParamValue::Boolean(false)),
                doc: "refuse the stage at planning (tests that problems reach their line)".into(),
            }],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let refuse = ctx
            .params
            .iter()
            .any(|(n, v)| n == "refuse" && matches!(v, ParamValue::Boolean(true)));
        if refuse {
            return Err(vec![ParamProblem {
                at: ProblemAt::Param("refuse".into()),
                message: "refused by a 0.5 plugin: set refuse = false".into(),
            }]);
        }
        Ok(())
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let mut masks = Vec::with_capacity(ctx.targets.len());
        let total = ctx.targets.len() as u64;
        for (i, target) in ctx.targets.iter().enumerate() {
            progress::report(i as u64, total, &target.layer.name);
            let name = &target.layer.name;
            let density = target
                .density
                .ok_or_else(|| format!("layer `{name}` has no density"))?;
            let w = model::weight(name)?;
            let scores = kernels::unary(UnaryOp::Abs, &w);
            masks.push(LayerMask {
                layer: name.clone(),
                mask: kernels::select_per_row(&scores, density)?,
            });
        }
        Ok(StageOutput {
            masks,
            budgets: Vec::new(),
            heads: Vec::new(),
            weights: Vec::new(),
        })
    }
}

export!(Legacy);
