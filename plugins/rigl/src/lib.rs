//! `rigl`: Rigged Lottery dynamic sparse training (Evci et al., 2020, "Rigging the Lottery:
//! Making All Tickets Winners"). During fine-tuning, at every mask update of its stage
//! (`update = { every = 100, end = 0.75, drop_fraction = 0.3 }`, the paper's defaults), each
//! target layer drops the `round(f · kept)` kept weights of lowest magnitude and grows as many
//! of the positions not kept with the largest magnitude of the dense gradient (the gradient
//! with respect to the masked weight matrix, averaged by the host since the previous update).
//! `f` is the stage's drop fraction annealed by the host (cosine by default). The host starts
//! every grown weight at zero with its optimizer moments reset, as the paper does.
//!
//! The layer's mask structure is kept: unstructured masks swap single weights across the
//! layer, N:M masks grow back inside each group what the group lost, block masks swap whole
//! blocks scored by the sums of |w| and |gradient| over the block (see the SDK's
//! [`espalier_plugin_sdk::dynamic`]). The stage has no density of its own: each layer keeps the
//! density an earlier stage gave it.

use espalier_plugin_sdk::dynamic::{Grow, update_layers};
use espalier_plugin_sdk::*;

struct Rigl;

impl Guest for Rigl {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "rigl".into(),
            version: "0.1.0".into(),
            description: "RigL (Evci et al., 2020): during fine-tuning, every ΔT steps, drop the \
                          smallest-magnitude kept weights of each layer and grow as many where \
                          the dense gradient is largest (new weights start at zero). Needs \
                          `update = { ... }` on the stage and a [finetune] section; keeps each \
                          layer's density and its unstructured, N:M or block structure."
                .into(),
            params: Vec::new(),
            needs: vec![Need::Weights],
            produces: OutputKind::MaskUpdates,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        problems_result(
            ctx.fixed_density()
                .map(|_| {
                    ParamProblem::density(
                        "rigl keeps each layer's current density (an earlier stage sets it); drop `density`",
                    )
                })
                .into_iter()
                .collect(),
        )
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        Err(format!(
            "stage `{}`: rigl updates masks during fine-tuning; give the stage `update = {{ every = 100 }}` and the pipeline a [finetune] section",
            ctx.stage
        ))
    }

    fn update_masks(ctx: UpdateContext) -> Result<Vec<LayerMask>, String> {
        let total = ctx.layers.len() as u64;
        report_progress(0, total, "rigl: drop and grow");
        update_layers(&ctx.layers, ctx.position.drop_fraction, Grow::Gradient)
    }
}

export_criterion!(Rigl);
