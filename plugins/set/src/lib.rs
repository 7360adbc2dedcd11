//! `set`: Sparse Evolutionary Training (Mocanu et al., 2018, "Scalable training of artificial
//! neural networks with adaptive sparse connectivity"). During fine-tuning, at every mask update
//! of its stage (`update = { every, end, drop_fraction }`), each target layer drops the
//! `round(f · kept)` kept weights of lowest magnitude and grows as many positions not kept,
//! chosen at random. The draw is seeded by the stage's `seed` and the update's own seed (a
//! function of the fine-tune's seed and step), so the same settings give the same masks and a
//! resumed run draws what an uninterrupted one drew. Grown weights start at zero with reset
//! optimizer moments (done by the host).
//!
//! Like `rigl`, it keeps each layer's density and structure (unstructured, N:M groups, blocks):
//! see the SDK's [`espalier_plugin_sdk::dynamic`].

use espalier_plugin_sdk::dynamic::{Grow, update_layers};
use espalier_plugin_sdk::*;

struct Set;

impl Guest for Set {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "set".into(),
            version: "0.1.0".into(),
            description: "SET (Mocanu et al., 2018): during fine-tuning, every ΔT steps, drop the \
                          smallest-magnitude kept weights of each layer and grow as many at \
                          seeded random positions (new weights start at zero). Needs \
                          `update = { ... }` on the stage and a [finetune] section; keeps each \
                          layer's density and its unstructured, N:M or block structure."
                .into(),
            params: vec![param(
                "seed",
                ParamValue::Integer(0),
                "seed of the random growth (mixed with each update's step)",
            )],
            needs: vec![Need::Weights],
            produces: OutputKind::MaskUpdates,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        problems_result(
            ctx.fixed_density()
                .map(|_| {
                    ParamProblem::density(
                        "set keeps each layer's current density (an earlier stage sets it); drop `density`",
                    )
                })
                .into_iter()
                .collect(),
        )
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        Err(format!(
            "stage `{}`: set updates masks during fine-tuning; give the stage `update = {{ every = 100 }}` and the pipeline a [finetune] section",
            ctx.stage
        ))
    }

    fn update_masks(ctx: UpdateContext) -> Result<Vec<LayerMask>, String> {
        let seed = Params::new(&ctx).integer("seed")? as u64;
        let total = ctx.layers.len() as u64;
        report_progress(0, total, "set: drop and grow");
        update_layers(
            &ctx.layers,
            ctx.position.drop_fraction,
            Grow::Random(seed.rotate_left(17) ^ ctx.position.seed),
        )
    }
}

export_criterion!(Set);
