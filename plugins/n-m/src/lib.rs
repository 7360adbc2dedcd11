//! `n-m`: N:M semi-structured pruning. Convention: "N:M keeps N of every M consecutive input
//! weights of a row" (consecutive along in-features, the layout NVIDIA's 2:4 sparse tensor
//! cores and our CPU kernels use). Within each group the N largest |w| survive; ties keep the
//! lower column. Density is exactly N/M; a `density` set on the stage must agree.

use espalier_plugin_sdk::*;

struct NOfMCriterion;

impl Guest for NOfMCriterion {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "n-m".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "N:M semi-structured pruning: keep the N largest |w| of every M consecutive input weights of each row (2:4 by default).".into(),
            params: vec![
                param("n", ParamValue::Integer(2), "weights kept per group"),
                param("m", ParamValue::Integer(4), "group size along in-features"),
            ],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let (n, m) = (params.integer("n")?, params.integer("m")?);
        if !(1..=64).contains(&m) || !(1..=m).contains(&n) {
            return Err(format!("need 1 <= n <= m <= 64, got n = {n}, m = {m}"));
        }
        let structure = Structure::NOfM(NOfM {
            n: n as u32,
            m: m as u32,
        });
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let layer = &target.layer;
            if let Some(d) = target.density
                && (d - n as f64 / m as f64).abs() > 1e-9
            {
                return Err(format!(
                    "layer `{}`: density {d} conflicts with {n}:{m} (which keeps exactly {}); drop `density` from the stage",
                    layer.name,
                    n as f64 / m as f64
                ));
            }
            let cols = layer.shape.last().copied().unwrap_or(0);
            if cols % m as u32 != 0 {
                return Err(format!(
                    "layer `{}` has {cols} input columns, not a multiple of m = {m}",
                    layer.name
                ));
            }
            let w = model::weight(&layer.name)?;
            let scores = kernels::unary(UnaryOp::Abs, &w);
            let mask = kernels::select(&scores, structure, 0.0)?;
            masks.push(LayerMask {
                layer: layer.name.clone(),
                mask,
            });
        }
        Ok(masks_output(masks))
    }
}

export_criterion!(NOfMCriterion);
