//! Test plugin: asks the host for new tensors forever and never drops them, trying to exhaust
//! host memory through kernel calls (the guest's own memory stays small).
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-hoard";
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
        let first = ctx.targets.first().ok_or("no targets")?;
        let w = model::weight(&first.layer.name)?;
        let mut hoard = Vec::new();
        loop {
            hoard.push(kernels::unary(UnaryOp::Abs, &w));
        }
    }
}
export_criterion!(P);
