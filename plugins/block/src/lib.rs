//! `block`: block-sparse pruning. Tiles each weight into `rows x cols` blocks (16x16 by
//! default) and keeps the blocks with the largest L2 norm: exactly round(density x blocks) of
//! them, ties going to the lower block index. Shapes the block does not divide are refused
//! unless `ragged = true` (edge blocks are then smaller groups ranked by their own norm).
//!
//! `validate` checks the block shape, that the blocks tile every target (or `ragged` is set)
//! and that the stage has a density, at planning; `apply` repeats the checks for hosts that do
//! not call `validate`.

use espalier_plugin_sdk::*;

struct Block;

/// The problems of the parameters, the targets' shapes and whether a density is given; the
/// block shape when it is usable.
fn check(
    params: &Params,
    targets: &[&LayerInfo],
    has_density: bool,
) -> (Vec<ParamProblem>, Option<BlockShape>) {
    let mut problems = Vec::new();
    if !has_density {
        problems.push(ParamProblem::density(
            "`block` keeps a fraction of each layer's blocks: set `density` (e.g. density = 0.5) or feed it a budget (density = \"budget\")",
        ));
    }
    let (shape, ragged) = match (params.integers("block"), params.boolean("ragged")) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            problems.push(ParamProblem::stage(e));
            return (problems, None);
        }
    };
    let [rows, cols] = shape else {
        problems.push(ParamProblem::param(
            "block",
            format!(
                "`block` must have two entries [rows, cols], got {shape:?}; e.g. block = [16, 16]"
            ),
        ));
        return (problems, None);
    };
    if !(1..=4096).contains(rows) || !(1..=4096).contains(cols) {
        problems.push(ParamProblem::param(
            "block",
            format!(
                "`block` entries must be in 1..=4096, got [{rows}, {cols}]; e.g. block = [16, 16]"
            ),
        ));
        return (problems, None);
    }
    let (br, bc) = (*rows as u32, *cols as u32);
    if !ragged {
        let misfits: Vec<&&LayerInfo> = targets
            .iter()
            .filter(|l| match l.shape[..] {
                [r, c] => r % br != 0 || c % bc != 0,
                _ => false,
            })
            .collect();
        if let Some(first) = misfits.first() {
            problems.push(ParamProblem::param(
                "block",
                format!(
                    "`{}` has shape {}x{}, which {br}x{bc} blocks do not tile ({} such targets); pick a block that divides it or set ragged = true",
                    first.name,
                    first.shape[0],
                    first.shape[1],
                    misfits.len()
                ),
            ));
        }
    }
    (problems, Some(BlockShape { rows: br, cols: bc }))
}

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

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let targets: Vec<&LayerInfo> = ctx.targets.iter().collect();
        let has_density = !matches!(ctx.density, PlannedDensity::Unset);
        problems_result(check(&Params::new(&ctx), &targets, has_density).0)
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let targets: Vec<&LayerInfo> = ctx.targets.iter().map(|t| &t.layer).collect();
        // Densities are checked per target below (target_density names the layer).
        let (problems, block) = check(&params, &targets, true);
        no_problems(problems)?;
        let Some(block) = block else {
            return Err("`block` must be [rows, cols] with entries in 1..=4096".into());
        };
        let total = ctx.targets.len() as u64;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            let layer = &target.layer;
            report_progress(i as u64, total, &layer.name);
            if layer.shape.len() != 2 {
                return Err(format!(
                    "layer `{}` is not 2-D (shape {:?})",
                    layer.name, layer.shape
                ));
            }
            let density = target_density(target)?;
            let w = model::weight(&layer.name)?;
            // Sum of squares per block ranks blocks exactly as their L2 norm does.
            let squares = kernels::unary(UnaryOp::Square, &w);
            let mask = kernels::select(&squares, Structure::Blocks(block), density)?;
            masks.push(LayerMask {
                layer: layer.name.clone(),
                mask,
            });
        }
        report_progress(total, total, "done");
        Ok(masks_output(masks))
    }
}

export_criterion!(Block);
