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
//! `validate` checks `n`/`m`/`block` and the density they imply at planning, before the
//! calibration pass runs.

use espalier_plugin_sdk::*;

struct Wanda;

/// How scores compete: N:M groups, blocks, or each row at the stage's density.
#[derive(Clone, Copy)]
enum Selection {
    NOfM(NOfM),
    Blocks(BlockShape),
    PerRow,
}

/// The selection the parameters ask for, with every problem of them and of the density (not
/// checked when `None`: `apply` checks each target's own).
fn check(
    params: &Params,
    density: Option<&PlannedDensity>,
    targets: &[&LayerInfo],
) -> Result<Selection, Vec<ParamProblem>> {
    let stage = |e: String| vec![ParamProblem::stage(e)];
    let (n, m) = (
        params.integer("n").map_err(stage)?,
        params.integer("m").map_err(stage)?,
    );
    let block = params.integers("block").map_err(stage)?;
    let (n_of_m, block) = match (
        checks::optional_n_of_m(n, m),
        checks::optional_block("block", block),
    ) {
        (Ok(nm), Ok(b)) => (nm, b),
        (a, b) => return Err(a.err().into_iter().chain(b.err()).collect()),
    };
    let (selection, problems) = match (n_of_m, block) {
        (Some(_), Some(_)) => {
            return Err(vec![ParamProblem::param(
                "block",
                "set either N:M (`n`, `m`) or `block`, not both",
            )]);
        }
        (Some(nm), None) => (
            Selection::NOfM(nm),
            vec![
                density.and_then(|d| checks::n_of_m_density(nm, d)),
                checks::n_of_m_columns(nm, targets),
            ],
        ),
        (None, Some(b)) => (
            Selection::Blocks(b),
            vec![density.and_then(|d| checks::density_required("wanda", d))],
        ),
        (None, None) => (
            Selection::PerRow,
            vec![density.and_then(|d| checks::density_required("wanda", d))],
        ),
    };
    let problems: Vec<ParamProblem> = problems.into_iter().flatten().collect();
    if problems.is_empty() {
        Ok(selection)
    } else {
        Err(problems)
    }
}

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

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let targets: Vec<&LayerInfo> = ctx.targets.iter().collect();
        check(&Params::new(&ctx), Some(&ctx.density), &targets).map(|_| ())
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let targets: Vec<&LayerInfo> = ctx.targets.iter().map(|t| &t.layer).collect();
        // Densities are checked per target below (`target_density` names the layer).
        let selection = check(&params, None, &targets).map_err(|p| problems_message(&p))?;
        let total = ctx.targets.len() as u64;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            let name = &target.layer.name;
            report_progress(i as u64, total, name);
            let w = model::weight(name)?;
            let norms = calibration::activation_norms(name)?;
            let scale = kernels::unary(UnaryOp::Sqrt, &norms);
            let magnitude = kernels::unary(UnaryOp::Abs, &w);
            // [out, in] * [1, in]: each column scaled by its input's activation norm.
            let scores = kernels::binary(BinaryOp::Mul, &magnitude, &scale)?;
            let mask = match selection {
                Selection::NOfM(nm) => kernels::select(&scores, Structure::NOfM(nm), 0.0)?,
                Selection::Blocks(b) => {
                    // A group's score is the sum of its elements': squares rank by L2 norm.
                    let squares = kernels::unary(UnaryOp::Square, &scores);
                    kernels::select(&squares, Structure::Blocks(b), target_density(target)?)?
                }
                Selection::PerRow => kernels::select_per_row(&scores, target_density(target)?)?,
            };
            masks.push(LayerMask {
                layer: name.clone(),
                mask,
            });
        }
        report_progress(total, total, "done");
        Ok(masks_output(masks))
    }
}

export_criterion!(Wanda);
