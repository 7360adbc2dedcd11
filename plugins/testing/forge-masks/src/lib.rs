//! Test plugin: a mask criterion that returns the output `mode` names, valid or malformed, so
//! `tests/claims.rs` can check each of the host's output-validation rules:
//!
//! - `exact`: magnitude masks at each target's density (valid);
//! - `first`: every target keeps its first `round(density · n)` weights in row-major order
//!   (valid, and independent of the weights);
//! - `offset`: like `exact`, but the first target keeps `round(density · n) + offset` weights
//!   (its first ones in row-major order), to probe the density tolerance at its limits;
//! - `non-target`: also a mask for `layer`, which the stage does not target;
//! - `duplicate`: the first target's mask twice;
//! - `missing`: no mask for the last target;
//! - `shape`: the first target's mask one column wider than the layer;
//! - `budgets`, `heads`: valid masks plus an output of another kind.
use espalier_plugin_sdk::*;

struct P;

fn magnitude(layer: &str, density: f64) -> Result<Mask, String> {
    let w = model::weight(layer)?;
    kernels::select(
        &kernels::unary(UnaryOp::Abs, &w),
        Structure::Unstructured,
        density,
    )
}

/// A mask keeping the first `kept` weights of a `[rows, cols]` layer.
fn first_kept(shape: &[u32], kept: usize) -> Result<Mask, String> {
    let n: usize = shape.iter().map(|&d| d as usize).product();
    let keep: Vec<u8> = (0..n).map(|i| u8::from(i < kept)).collect();
    kernels::mask_from_bytes(shape, &keep, Structure::Unstructured)
}

impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "forge-masks".into(),
            version: "0.0.1".into(),
            description: "A test plugin that returns a chosen malformed mask output.".into(),
            params: vec![
                param(
                    "mode",
                    ParamValue::Text("exact".into()),
                    "exact | first | offset | non-target | duplicate | missing | shape | budgets | heads",
                ),
                param(
                    "offset",
                    ParamValue::Integer(0),
                    "offset: weights kept beyond the exact count (may be negative)",
                ),
                param(
                    "layer",
                    ParamValue::Text(String::new()),
                    "non-target: the layer to add a mask for",
                ),
            ],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let mode = params.text("mode")?;
        let mut out = masks_output(Vec::new());
        for (i, t) in ctx.targets.iter().enumerate() {
            let name = &t.layer.name;
            let density = target_density(t)?;
            let n: f64 = t.layer.shape.iter().map(|&d| f64::from(d)).product();
            let mask = match mode {
                "first" => first_kept(&t.layer.shape, (density * n).round() as usize)?,
                "offset" if i == 0 => {
                    let kept = (density * n).round() as i64 + params.integer("offset")?;
                    first_kept(
                        &t.layer.shape,
                        usize::try_from(kept).map_err(|_| "negative count")?,
                    )?
                }
                "shape" if i == 0 => {
                    let [r, c] = t.layer.shape[..] else {
                        return Err(format!("`{name}` is not 2-D"));
                    };
                    first_kept(&[r, c + 1], 0)?
                }
                "missing" if i + 1 == ctx.targets.len() => continue,
                _ => magnitude(name, density)?,
            };
            out.masks.push(LayerMask {
                layer: name.clone(),
                mask,
            });
            if mode == "duplicate" && i == 0 {
                out.masks.push(LayerMask {
                    layer: name.clone(),
                    mask: magnitude(name, density)?,
                });
            }
        }
        match mode {
            "non-target" => {
                let layer = params.text("layer")?.to_string();
                let mask = magnitude(&layer, 0.5)?;
                out.masks.push(LayerMask { layer, mask });
            }
            "budgets" => {
                out.budgets = ctx
                    .targets
                    .iter()
                    .map(|t| LayerBudget {
                        layer: t.layer.name.clone(),
                        density: 0.5,
                    })
                    .collect();
            }
            "heads" => {
                out.heads = vec![HeadKeep {
                    block: 0,
                    keep: vec![0],
                }];
            }
            "exact" | "first" | "offset" | "duplicate" | "missing" | "shape" => {}
            other => return Err(format!("unknown mode {other:?}")),
        }
        Ok(out)
    }
}

export_criterion!(P);
