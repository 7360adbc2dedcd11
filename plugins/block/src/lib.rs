//! `block`: block-sparse pruning. Tiles each weight into `rows x cols` blocks (16x16 by
//! default) and keeps the blocks with the largest L2 norm: exactly round(density x blocks) of
//! them, ties going to the lower block index. Shapes the block does not divide are refused
//! unless `ragged = true` (edge blocks are then smaller groups ranked by their own norm).

use espalier_plugin_sdk::*;

struct Block;

impl Guest for Block {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "block".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Block-sparse pruning: keep the blocks (16x16 by default) with the largest L2 norm; exact block counts per layer.".into(),
            params: vec![
                param("block", ParamValue::Integers(vec![16, 16]), "block shape [rows, cols] (rows along out-features)"),
                param("ragged", ParamValue::Boolean(false), "allow shapes the block does not divide (edge blocks are smaller)"),
            ],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let shape = params.integers("block")?;
        let [rows, cols] = shape else {
            return Err(format!(
                "`block` must have two entries [rows, cols], got {shape:?}"
            ));
        };
        if *rows < 1 || *cols < 1 || *rows > 4096 || *cols > 4096 {
            return Err(format!(
                "`block` entries must be in 1..=4096, got [{rows}, {cols}]"
            ));
        }
        let (br, bc) = (*rows as u32, *cols as u32);
        let ragged = params.boolean("ragged")?;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let layer = &target.layer;
            let [r, c] = layer.shape[..] else {
                return Err(format!(
                    "layer `{}` is not 2-D (shape {:?})",
                    layer.name, layer.shape
                ));
            };
            if !ragged && (r % br != 0 || c % bc != 0) {
                return Err(format!(
                    "layer `{}` has shape {r}x{c}, which {br}x{bc} blocks do not tile; pick a block that divides it or set ragged = true",
                    layer.name
                ));
            }
            let density = target_density(target)?;
            let w = model::weight(&layer.name)?;
            // Sum of squares per block ranks blocks exactly as their L2 norm does.
            let squares = kernels::unary(UnaryOp::Square, &w);
            let mask = kernels::select(
                &squares,
                Structure::Blocks(BlockShape { rows: br, cols: bc }),
                density,
            )?;
            masks.push(LayerMask {
                layer: layer.name.clone(),
                mask,
            });
        }
        Ok(masks_output(masks))
    }
}

export_criterion!(Block);
