//! `reconstruct`: keeps the masks earlier stages left on its targets and updates only the kept
//! weights so that each layer's outputs on the calibration data stay as close to the dense
//! ones as the mask allows (the Optimal Brain Surgeon update SparseGPT uses, with the mask
//! fixed). So Wanda + reconstruct, block + reconstruct or N:M + reconstruct are pipelines.
//!
//! The decisions are all made already (the earlier mask); the host's `obs` kernels do the
//! algebra: starting from the weights as the run loaded them (`model.original-weight`), one
//! `process` of every column with the layer's current mask removes the masked weights and
//! moves their error onto the kept ones, then `finish`. The Hessian is taken on the model as
//! the earlier stages left it, so each layer is fitted to the inputs it will see. A
//! target no earlier stage masks is refused at planning (there would be nothing to
//! reconstruct), and so is a `density` (the earlier masks fix it).

use espalier_plugin_sdk::*;

struct Reconstruct;

/// The problems of the parameters, and `(blocksize, damping)` when usable.
fn settings(params: &Params) -> (Vec<ParamProblem>, Option<(u32, f64)>) {
    let blocksize = checks::obs_blocksize(params.integer("blocksize").unwrap_or(0));
    let damping = checks::obs_damping(params.float("damping").unwrap_or(f64::NAN));
    match (blocksize, damping) {
        (Ok(b), Ok(d)) => (Vec::new(), Some((b, d))),
        (b, d) => (b.err().into_iter().chain(d.err()).collect(), None),
    }
}

impl Guest for Reconstruct {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "reconstruct".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Keeps the masks of earlier stages and updates the kept weights of each target to restore its outputs on the calibration data (SparseGPT's OBS update under a fixed mask). Put it after a stage that prunes the same layers.".into(),
            params: vec![
                param("blocksize", ParamValue::Integer(128), "columns per lazy-update block (SparseGPT: 128)"),
                param("damping", ParamValue::Float(0.01), "fraction of the mean Hessian diagonal added to the diagonal (SparseGPT: 0.01)"),
            ],
            needs: vec![Need::Weights, Need::Hessians],
            produces: OutputKind::Weights,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let mut problems = settings(&Params::new(&ctx)).0;
        if !matches!(ctx.density, PlannedDensity::Unset) {
            problems.push(ParamProblem::density(
                "reconstruct keeps the density of the earlier masks; drop `density` from this stage",
            ));
        }
        let unmasked: Vec<&str> = ctx
            .targets
            .iter()
            .filter(|t| !ctx.masked_earlier.contains(&t.name))
            .map(|t| t.name.as_str())
            .collect();
        if let Some(first) = unmasked.first() {
            problems.push(ParamProblem::targets(format!(
                "reconstruct keeps the masks of earlier stages, but no earlier stage prunes `{first}` ({} such targets); put a stage that prunes them (e.g. wanda) before this one, or narrow `targets`",
                unmasked.len()
            )));
        }
        problems_result(problems)
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let (problems, ok) = settings(&Params::new(&ctx));
        no_problems(problems)?;
        let Some((blocksize, damping)) = ok else {
            return Err("invalid parameters".into());
        };
        let total = ctx.targets.len() as u64;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        let mut weights = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            let name = &target.layer.name;
            report_progress(i as u64, total, name);
            let mask = model::current_mask(name).ok_or_else(|| {
                format!("`{name}` has no mask from an earlier stage; reconstruct only updates pruned layers")
            })?;
            // From the weights as loaded: the masked ones would carry no error to compensate.
            let w = model::original_weight(name)?;
            let update = obs::layer_hessian(name)?.update(&w, damping, blocksize)?;
            update.process(0, update.cols(), &mask)?;
            let done = obs::finish(update, mask.structure())?;
            masks.push(LayerMask {
                layer: name.clone(),
                mask: done.mask,
            });
            weights.push(LayerWeights {
                layer: name.clone(),
                weights: done.weights,
            });
        }
        report_progress(total, total, "done");
        Ok(weights_output(masks, weights))
    }
}

export_criterion!(Reconstruct);
