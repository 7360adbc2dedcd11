//! Test plugin: `apply` allocates until memory runs out; the host's memory cap must stop it.
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-grow";
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
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(std::hint::black_box(vec![1u8; 16 << 20]));
        }
    }
}
export_criterion!(P);
