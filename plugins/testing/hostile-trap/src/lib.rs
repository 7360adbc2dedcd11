//! Test plugin: `apply` hits `unreachable` (a trap).
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-trap";
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
    fn apply(_ctx: StageContext) -> Result<StageOutput, String> {
        core::arch::wasm32::unreachable()
    }
}
export_criterion!(P);
