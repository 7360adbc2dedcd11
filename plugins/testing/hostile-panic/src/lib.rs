//! Test plugin: `apply` panics with a message; the host must report the message as the cause.
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-panic";
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
        let n = std::hint::black_box(ctx.targets.len());
        panic!("hostile-panic gave up on {n} targets: the answer is not 42");
    }
}
export_criterion!(P);
