//! Test plugin: a budget allocator that returns the output `mode` names, valid or malformed,
//! so `tests/claims.rs` can check the host's budget validation:
//!
//! - `exact`: every target gets `density` (valid);
//! - `nan`, `negative`, `above-one`: the first target's budget is NaN, -0.1 or 1.5;
//! - `duplicate`: the first target twice; `missing`: no budget for the last target;
//! - `non-target`: also a budget for `layer`, which the stage does not target;
//! - `masks`, `heads`: valid budgets plus an output of another kind.
use espalier_plugin_sdk::*;

struct P;

impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "forge-budgets".into(),
            version: "0.0.1".into(),
            description: "A test plugin that returns a chosen malformed budget output.".into(),
            params: vec![
                param(
                    "mode",
                    ParamValue::Text("exact".into()),
                    "exact | nan | negative | above-one | duplicate | missing | non-target | masks | heads",
                ),
                param(
                    "layer",
                    ParamValue::Text(String::new()),
                    "non-target: the layer to add a budget for",
                ),
            ],
            needs: vec![Need::Weights],
            produces: OutputKind::Budgets,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let mode = params.text("mode")?;
        let mut out = masks_output(Vec::new());
        for (i, t) in ctx.targets.iter().enumerate() {
            let density = match mode {
                "nan" if i == 0 => f64::NAN,
                "negative" if i == 0 => -0.1,
                "above-one" if i == 0 => 1.5,
                "missing" if i + 1 == ctx.targets.len() => continue,
                _ => target_density(t)?,
            };
            let copies = if mode == "duplicate" && i == 0 { 2 } else { 1 };
            for _ in 0..copies {
                out.budgets.push(LayerBudget {
                    layer: t.layer.name.clone(),
                    density,
                });
            }
        }
        let first = ctx.targets.first().ok_or("no targets")?;
        match mode {
            "non-target" => out.budgets.push(LayerBudget {
                layer: params.text("layer")?.to_string(),
                density: 0.5,
            }),
            "masks" => {
                let w = model::weight(&first.layer.name)?;
                let mask = kernels::select(&w, Structure::Unstructured, 1.0)?;
                out.masks.push(LayerMask {
                    layer: first.layer.name.clone(),
                    mask,
                });
            }
            "heads" => {
                out.heads = vec![HeadKeep {
                    block: 0,
                    keep: vec![0],
                }];
            }
            "exact" | "nan" | "negative" | "above-one" | "duplicate" | "missing" => {}
            other => return Err(format!("unknown mode {other:?}")),
        }
        Ok(out)
    }
}

export_criterion!(P);
