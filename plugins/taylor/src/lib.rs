//! `taylor`: first-order Taylor importance (Molchanov et al., 2019; LLM-Pruner, Ma et al.,
//! 2023). Removing weight w changes the calibration loss by about -g·w, where g is the gradient
//! of the loss with respect to w, so the score of a weight is |w · g|: the weights whose removal
//! the loss notices least go first. The gradient is the host's: the gradient of the mean
//! calibration loss, from one forward and backward pass over the calibration set.
//!
//! With `estimate = "fisher"` the score is w² · F instead, where F is the host's empirical
//! Fisher diagonal (the mean over calibration sequences of each sequence's squared gradient):
//! the second-order estimate of the loss increase of removing w (Optimal Brain Damage, LeCun et
//! al., 1990, with the Fisher for the Hessian). At a converged model the mean gradient is close
//! to zero and noisy, so the first-order score ranks poorly; the Fisher does not average out.
//!
//! Scores are compared across the whole layer (`scope = "layer"`, the default), within each
//! output row (`scope = "row"`), within N:M groups (`n`, `m`), or summed over blocks (`block`).
//! Everything runs as host kernels on handles: weights and gradients never enter wasm.

use espalier_plugin_sdk::*;

struct Taylor;

impl Guest for Taylor {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "taylor".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Taylor importance from the calibration loss's gradients (calibration text needed): keep the weights with the largest |w * dL/dw| (first order) or w^2 * Fisher (second order, `estimate = \"fisher\"`). Per layer, per row, N:M or blocks.".into(),
            params: vec![
                param(
                    "estimate",
                    ParamValue::Text("first-order".into()),
                    "\"first-order\": |w * g| with g the gradient of the mean calibration loss; \"fisher\": w^2 * the mean squared per-sequence gradient",
                ),
                param(
                    "scope",
                    ParamValue::Text("layer".into()),
                    "where scores compete: \"layer\" (the whole weight) or \"row\" (each output row keeps the same count)",
                ),
                param(
                    "n",
                    ParamValue::Integer(0),
                    "N of N:M (keep n of every m consecutive inputs); 0 = no N:M",
                ),
                param("m", ParamValue::Integer(0), "M of N:M (0 = no N:M)"),
                param(
                    "block",
                    ParamValue::Integers(vec![]),
                    "block shape [rows, cols] to keep whole blocks by summed importance; empty = single weights",
                ),
            ],
            needs: vec![Need::Weights, Need::Gradients],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let selection = Selection::from_params(&params)?;
        let fisher = match params.text("estimate")? {
            "first-order" => false,
            "fisher" => true,
            other => {
                return Err(format!(
                    "estimate = \"{other}\": use \"first-order\" or \"fisher\""
                ));
            }
        };
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let name = &target.layer.name;
            let w = model::weight(name)?;
            let scores = if fisher {
                let f = calibration::fisher(name)?;
                let squares = kernels::unary(UnaryOp::Square, &w);
                kernels::binary(BinaryOp::Mul, &squares, &f)?
            } else {
                let g = calibration::gradients(name)?;
                let product = kernels::binary(BinaryOp::Mul, &w, &g)?;
                kernels::unary(UnaryOp::Abs, &product)
            };
            let mask = match selection {
                Selection::Layer => {
                    kernels::select(&scores, Structure::Unstructured, target_density(target)?)?
                }
                Selection::Row => kernels::select_per_row(&scores, target_density(target)?)?,
                Selection::NOfM(nm) => kernels::select(&scores, Structure::NOfM(nm), 0.0)?,
                Selection::Blocks(b) => {
                    kernels::select(&scores, Structure::Blocks(b), target_density(target)?)?
                }
            };
            masks.push(LayerMask {
                layer: name.clone(),
                mask,
            });
        }
        Ok(masks_output(masks))
    }
}

/// How scores compete, from the parameters (exactly one of the modes).
#[derive(Clone, Copy)]
enum Selection {
    Layer,
    Row,
    NOfM(NOfM),
    Blocks(BlockShape),
}

impl Selection {
    fn from_params(params: &Params) -> Result<Self, String> {
        let (n, m) = (params.integer("n")?, params.integer("m")?);
        let block = params.integers("block")?;
        let scope = params.text("scope")?;
        let by_scope = match scope {
            "layer" => Selection::Layer,
            "row" => Selection::Row,
            other => {
                return Err(format!("scope = \"{other}\": use \"layer\" or \"row\""));
            }
        };
        match ((n, m), block) {
            ((0, 0), []) => Ok(by_scope),
            ((n, m), []) if m > 0 && n > 0 && n <= m && m <= i64::from(u32::MAX) => {
                Ok(Selection::NOfM(NOfM {
                    n: n as u32,
                    m: m as u32,
                }))
            }
            ((0, 0), [r, c]) if (1..=4096).contains(r) && (1..=4096).contains(c) => {
                Ok(Selection::Blocks(BlockShape {
                    rows: *r as u32,
                    cols: *c as u32,
                }))
            }
            ((0, 0), other) => Err(format!(
                "`block` must be [rows, cols] with entries in 1..=4096, got {other:?}"
            )),
            ((n, m), []) => Err(format!(
                "n = {n}, m = {m}: set both with 1 <= n <= m for N:M, or neither"
            )),
            _ => Err("set either N:M (`n`, `m`) or `block`, not both".into()),
        }
    }
}

export_criterion!(Taylor);
