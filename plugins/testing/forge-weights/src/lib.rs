//! Test plugin: a `weights` criterion (0.5) that returns the output `mode` names, so
//! `tests/criteria.rs` can check the host's checks of updated weights:
//!
//! - `valid`: every target keeps its first half of weights in row-major order, and its weights
//!   become `2·w` there and exact zeros elsewhere;
//! - `nan`: like `valid`, with the first target's first weight NaN;
//! - `unmasked`: like `valid`, with the first target's last (removed) weight non-zero;
//! - `shape`: like `valid`, with the first target's weights one column wider than the layer.
use espalier_plugin_sdk::*;

struct P;

impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "forge-weights".into(),
            version: "0.0.1".into(),
            description: "A test plugin that returns updated weights, valid or malformed.".into(),
            params: vec![param(
                "mode",
                ParamValue::Text("valid".into()),
                "valid | nan | unmasked | shape",
            )],
            needs: vec![Need::Weights],
            produces: OutputKind::Weights,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let mode = Params::new(&ctx).text("mode")?.to_string();
        let mut masks = Vec::new();
        let mut weights = Vec::new();
        for (i, t) in ctx.targets.iter().enumerate() {
            let name = &t.layer.name;
            let [r, c] = t.layer.shape[..] else {
                return Err(format!("`{name}` is not 2-D"));
            };
            let n = (r * c) as usize;
            let kept = n / 2;
            let keep: Vec<u8> = (0..n).map(|j| u8::from(j < kept)).collect();
            let mut w = read_all(&model::weight(name)?)?;
            for (j, x) in w.iter_mut().enumerate() {
                *x = if j < kept { 2.0 * *x } else { 0.0 };
            }
            let mut shape = vec![r, c];
            if i == 0 {
                match mode.as_str() {
                    "nan" => w[0] = f32::NAN,
                    "unmasked" => w[n - 1] = 1.0,
                    "shape" => {
                        shape = vec![r, c + 1];
                        w = (0..(r * (c + 1)) as usize).map(|_| 0.0).collect();
                    }
                    _ => {}
                }
            }
            masks.push(LayerMask {
                layer: name.clone(),
                mask: kernels::mask_from_bytes(&t.layer.shape, &keep, Structure::Unstructured)?,
            });
            weights.push(LayerWeights {
                layer: name.clone(),
                weights: tensors::from_f32(&shape, &w)?,
            });
        }
        Ok(weights_output(masks, weights))
    }
}

export_criterion!(P);
