//! Test plugin: `apply` spins forever; the host's epoch deadline must stop it.
use espalier_plugin_sdk::*;
const NAME: &str = "hostile-loop";
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
        let mut x: u64 = 1;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}
export_criterion!(P);
