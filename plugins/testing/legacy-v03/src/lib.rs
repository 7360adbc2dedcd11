//! Test plugin: first-order Taylor pruning (|w · dL/dw| per layer) written against
//! `espalier:prune@0.3.0` with its own bindings. It stands for every plugin built before 0.4.0
//! (which added `validate` and `progress`): the host must keep running it, gradients included,
//! without calling a `validate` it does not have, and its masks must equal the built-in
//! `taylor` criterion's.

wit_bindgen::generate!({
    path: "../../../wit/since_v0.3.0",
    world: "criterion",
});

use espalier::prune::kernels::{self, BinaryOp, Structure, UnaryOp};
use espalier::prune::plugin_types::{LayerMask, Need, OutputKind};
use espalier::prune::{calibration, model};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "legacy-v03".into(),
            version: "0.0.1".into(),
            description: "First-order Taylor built against the 0.3.0 WIT (compatibility test)."
                .into(),
            params: vec![],
            needs: vec![Need::Weights, Need::Gradients],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let name = &target.layer.name;
            let density = target
                .density
                .ok_or_else(|| format!("layer `{name}` has no density"))?;
            let w = model::weight(name)?;
            let g = calibration::gradients(name)?;
            let scores = kernels::unary(UnaryOp::Abs, &kernels::binary(BinaryOp::Mul, &w, &g)?);
            masks.push(LayerMask {
                layer: name.clone(),
                mask: kernels::select(&scores, Structure::Unstructured, density)?,
            });
        }
        Ok(StageOutput {
            masks,
            budgets: Vec::new(),
            heads: Vec::new(),
        })
    }
}

export!(Legacy);
