//! Test plugin: per-layer magnitude pruning written against `espalier:prune@0.1.0` with its own
//! bindings. It stands for every plugin built before 0.2.0: the host must keep running it, and
//! its masks must equal the built-in `magnitude` criterion's.

wit_bindgen::generate!({
    path: "../../../wit/since_v0.1.0",
    world: "criterion",
});

use espalier::prune::kernels::{self, Structure, UnaryOp};
use espalier::prune::model;
use espalier::prune::plugin_types::{LayerMask, Need, OutputKind};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "legacy-v01".into(),
            version: "0.0.1".into(),
            description: "Magnitude pruning built against the 0.1.0 WIT (compatibility test)."
                .into(),
            params: vec![],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let density = target
                .density
                .ok_or_else(|| format!("layer `{}` has no density", target.layer.name))?;
            let w = model::weight(&target.layer.name)?;
            let scores = kernels::unary(UnaryOp::Abs, &w);
            masks.push(LayerMask {
                layer: target.layer.name.clone(),
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
