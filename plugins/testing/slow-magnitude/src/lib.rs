//! Test plugin: per-layer magnitude pruning after `spin` iterations of busy work (guests have
//! no clock to sleep on), so a daemon test can keep a run in flight long enough to replace the
//! plugin file or cancel the run.
use espalier_plugin_sdk::*;

struct SlowMagnitude;

impl Guest for SlowMagnitude {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "slow-magnitude".into(),
            version: "0.0.1".into(),
            description: "A test plugin: magnitude pruning after a busy wait of `spin` iterations."
                .into(),
            params: vec![param(
                "spin",
                ParamValue::Integer(0),
                "iterations of busy work before pruning",
            )],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let spin = params.integer("spin")?;
        let mut x: u64 = 1;
        for _ in 0..spin.max(0) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for target in &ctx.targets {
            let w = model::weight(&target.layer.name)?;
            let scores = kernels::unary(UnaryOp::Abs, &w);
            masks.push(LayerMask {
                layer: target.layer.name.clone(),
                mask: kernels::select(&scores, Structure::Unstructured, target_density(target)?)?,
            });
        }
        Ok(masks_output(masks))
    }
}

export_criterion!(SlowMagnitude);
