//! Test plugin: unstructured Wanda written against `espalier:prune@0.2.0` with its own bindings.
//! It stands for every plugin built before 0.3.0: the host must keep running it (calibration
//! statistics included), and its masks must equal the built-in `wanda` criterion's.

wit_bindgen::generate!({
    path: "../../../wit/since_v0.2.0",
    world: "criterion",
});

use espalier::prune::kernels::{self, BinaryOp, UnaryOp};
use espalier::prune::plugin_types::{LayerMask, Need, OutputKind};
use espalier::prune::{calibration, model};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "legacy-v02".into(),
            version: "0.0.1".into(),
            description: "Wanda built against the 0.2.0 WIT (compatibility test).".into(),
            params: vec![],
            needs: vec![Need::Weights, Need::Activations],
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
            let norms = calibration::activation_norms(name)?;
            let scores = kernels::binary(
                BinaryOp::Mul,
                &kernels::unary(UnaryOp::Abs, &w),
                &kernels::unary(UnaryOp::Sqrt, &norms),
            )?;
            masks.push(LayerMask {
                layer: name.clone(),
                mask: kernels::select_per_row(&scores, density)?,
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
