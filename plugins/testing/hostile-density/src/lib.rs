//! Test plugin: keeps every weight whatever density the stage asks for.
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-density";
struct P;
impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: NAME.into(),
            version: "0.0.1".into(),
            description: "A test plugin that misbehaves on purpose.".into(),
            params: vec![],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }
    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let mut masks = Vec::new();
        for t in &ctx.targets {
            let w = model::weight(&t.layer.name)?;
            let mask = kernels::select(
                &kernels::unary(UnaryOp::Abs, &w),
                Structure::Unstructured,
                1.0,
            )?;
            masks.push(LayerMask {
                layer: t.layer.name.clone(),
                mask,
            });
        }
        Ok(masks_output(masks))
    }
}
export_criterion!(P);
