//! `wanda`: pruning by weights and activations (Sun et al., 2023, "A Simple and Effective
//! Pruning Approach for Large Language Models"). The score of weight (i, j) is
//! |W_ij| · sqrt(norm_j), where norm_j is the host's calibration statistic for the layer's input
//! column j (the mean over calibration sequences of the sum over tokens of x_j²; the square
//! root gives the reference's `‖X_j‖₂` up to a per-column constant that cannot change a
//! per-row ranking). Scores are compared within each output row, as in the reference: every
//! row keeps round(density · in) weights. With `n` and `m` set, each group of m consecutive
//! inputs of a row keeps its n best scores instead (N:M, e.g. 2:4). With `block = [rows, cols]`
//! whole blocks compete across the layer, ranked by the L2 norm of their Wanda scores (the sum
//! of w²·norm over the block): the activation-aware counterpart of the `block` criterion, which
//! ranks by |w| alone and so removes blocks that feed on large activations.
//!
//! Everything runs as host kernels on handles: the weights and statistics never enter wasm.

use espalier_plugin_sdk::*;

struct Wanda;

impl Guest for Wanda {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "wanda".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Wanda: keep the weights with the largest |w| * sqrt(activation norm) of each output row (calibration text needed); unstructured at the stage's density, N:M with `n` and `m`, or whole blocks with `block`.".into(),
            params: vec![
                param(
                    "n",
                    ParamValue::Integer(0),
                    "N of N:M (keep n of every m consecutive inputs); 0 = unstructured per-row selection at the stage's density",
                ),
                param("m", ParamValue::Integer(0), "M of N:M (0 = unstructured)"),
                param(
                    "block",
                    ParamValue::Integers(vec![]),
                    "block shape [rows, cols]: keep whole blocks by the L2 norm of their scores; empty = single weights",
                ),
            ],
            needs: vec![Need::Weights, Need::Activations],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let (n, m) = (params.integer("n")?, params.integer("m")?);
        let block = match params.integers("block")? {
            [] => None,
            [r, c] if (1..=4096).contains(r) && (1..=4096).contains(c) => Some(BlockShape {
                rows: *r as u32,
                cols: *c as u32,
            }),
            other => {
                return Err(format!(
                    "`block` must be [rows, cols] with entries in 1..=4096, got {other:?}"
                ));
            }
        };
        if block.is_some() && (n, m) != (0, 0) {
            return Err("set either N:M (`n`, `m`) or `block`, not both".into());
        }
        let n_of_m = match (n, m) {
            (0, 0) => None,
            (n, m) if m > 0 && n > 0 && n <= m && m <= i64::from(u32::MAX) => Some(NOfM {
                n: n as u32,
                m: m as u32,
            }),
            _ => {
                return Err(format!(
                    "n = {n}, m = {m}: set both with 1 <= n <= m for N:M, or neither for unstructured"
                ));
            }
        };
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let name = &target.layer.name;
            let w = model::weight(name)?;
            let norms = calibration::activation_norms(name)?;
            let scale = kernels::unary(UnaryOp::Sqrt, &norms);
            let magnitude = kernels::unary(UnaryOp::Abs, &w);
            // [out, in] * [1, in]: each column scaled by its input's activation norm.
            let scores = kernels::binary(BinaryOp::Mul, &magnitude, &scale)?;
            let mask = match (n_of_m, block) {
                (Some(nm), _) => kernels::select(&scores, Structure::NOfM(nm), 0.0)?,
                (None, Some(b)) => {
                    // A group's score is the sum of its elements': squares rank by L2 norm.
                    let squares = kernels::unary(UnaryOp::Square, &scores);
                    kernels::select(&squares, Structure::Blocks(b), target_density(target)?)?
                }
                (None, None) => kernels::select_per_row(&scores, target_density(target)?)?,
            };
            masks.push(LayerMask {
                layer: name.clone(),
                mask,
            });
        }
        Ok(masks_output(masks))
    }
}

export_criterion!(Wanda);
