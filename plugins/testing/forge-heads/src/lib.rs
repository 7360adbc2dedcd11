//! Test plugin: a head criterion that returns the head choice `mode` names, valid or
//! malformed, so `tests/claims.rs` can check the host's head validation (LLaMA-family models
//! with two query heads per K/V group, such as `builtin:tiny-llama`):
//!
//! - `exact`: every targeted block keeps query heads 0 and 2 (one per K/V group; valid);
//! - `non-target`: also a choice for block `block`, which the stage does not target;
//! - `duplicate-block`: the first block twice; `duplicate-head`: head 0 twice;
//! - `out-of-range`: a head the model does not have; `empty`: no head at all;
//! - `uneven-groups`: heads 0, 1 and 2 (K/V groups keeping different numbers of heads);
//! - `uneven-blocks`: the first block keeps 0 and 2, the others every head;
//! - `masks`, `budgets`: a valid choice plus an output of another kind.
use espalier_plugin_sdk::*;

struct P;

impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "forge-heads".into(),
            version: "0.0.1".into(),
            description: "A test plugin that returns a chosen malformed head choice.".into(),
            params: vec![
                param(
                    "mode",
                    ParamValue::Text("exact".into()),
                    "exact | non-target | duplicate-block | duplicate-head | out-of-range | empty | uneven-groups | uneven-blocks | masks | budgets",
                ),
                param(
                    "block",
                    ParamValue::Integer(0),
                    "non-target: the block to add a choice for",
                ),
            ],
            needs: vec![Need::Weights],
            produces: OutputKind::Heads,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let mode = params.text("mode")?;
        let heads = model::info().num_heads;
        let mut blocks: Vec<u32> = ctx.targets.iter().filter_map(|t| t.layer.block).collect();
        blocks.dedup();
        let mut out = masks_output(Vec::new());
        for (i, &block) in blocks.iter().enumerate() {
            let keep = match mode {
                "duplicate-head" => vec![0, 0],
                "out-of-range" => vec![0, heads + 7],
                "empty" => vec![],
                "uneven-groups" => vec![0, 1, 2],
                "uneven-blocks" if i > 0 => (0..heads).collect(),
                _ => vec![0, 2],
            };
            out.heads.push(HeadKeep { block, keep });
        }
        let first = ctx.targets.first().ok_or("no targets")?;
        match mode {
            "non-target" => out.heads.push(HeadKeep {
                block: u32::try_from(params.integer("block")?).map_err(|_| "bad block")?,
                keep: vec![0, 2],
            }),
            "duplicate-block" => out.heads.push(HeadKeep {
                block: *blocks.first().ok_or("no blocks")?,
                keep: vec![0, 2],
            }),
            "masks" => {
                let w = model::weight(&first.layer.name)?;
                let mask = kernels::select(&w, Structure::Unstructured, 1.0)?;
                out.masks.push(LayerMask {
                    layer: first.layer.name.clone(),
                    mask,
                });
            }
            "budgets" => out.budgets.push(LayerBudget {
                layer: first.layer.name.clone(),
                density: 0.5,
            }),
            "exact" | "duplicate-head" | "out-of-range" | "empty" | "uneven-groups"
            | "uneven-blocks" => {}
            other => return Err(format!("unknown mode {other:?}")),
        }
        Ok(out)
    }
}

export_criterion!(P);
