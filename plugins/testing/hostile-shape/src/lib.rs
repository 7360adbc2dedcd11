//! Test plugin: returns a mask whose shape differs from its layer's.
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-shape";
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
            let keep = vec![1u8; 6];
            let mask = kernels::mask_from_bytes(&[2, 3], &keep, Structure::Unstructured)?;
            masks.push(LayerMask {
                layer: t.layer.name.clone(),
                mask,
            });
        }
        Ok(masks_output(masks))
    }
}
export_criterion!(P);
