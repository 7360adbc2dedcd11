//! Test plugin: `describe` spins forever; planning must stop it at the pipeline's
//! `sandbox.timeout_s`, not the default deadline.
use espalier_plugin_sdk::*;
struct P;
impl Guest for P {
    fn describe() -> PluginInfo {
        let mut x: u64 = 1;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
    fn apply(_ctx: StageContext) -> Result<StageOutput, String> {
        Err("unreachable: describe never returns".into())
    }
}
export_criterion!(P);
