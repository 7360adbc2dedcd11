//! `n-m`: N:M semi-structured pruning. Convention: "N:M keeps N of every M consecutive input
//! weights of a row" (consecutive along in-features, the layout NVIDIA's 2:4 sparse tensor
//! cores and our CPU kernels use). Within each group the N largest |w| survive; ties keep the
//! lower column. Density is exactly N/M; a `density` set on the stage must agree.
//!
//! `validate` checks all of it at planning (the ranges of `n` and `m`, a `density` that
//! disagrees with n/m, targets whose columns `m` does not divide), so a pipeline that asks for
//! 2:4 at density 0.3 is refused at its `density` line before anything runs; `apply` repeats the
//! checks for hosts that do not call `validate` and for densities that arrive as budgets.

use espalier_plugin_sdk::*;

struct NOfMCriterion;

/// Largest group size the host's N:M kernels accept here.
const MAX_M: i64 = 64;

/// The problems of an `n`/`m` pair, the stage's density and the targets' shapes; the pair
/// when it is usable.
fn check(
    n: i64,
    m: i64,
    density: &PlannedDensity,
    targets: &[&LayerInfo],
) -> (Vec<ParamProblem>, Option<NOfM>) {
    if !(1..=MAX_M).contains(&m) {
        let problem = ParamProblem::param(
            "m",
            format!("m = {m}: the group size must be in 1..={MAX_M} (2:4 is n = 2, m = 4)"),
        );
        return (vec![problem], None);
    }
    if !(1..=m).contains(&n) {
        let problem = ParamProblem::param(
            "n",
            format!("n = {n} with m = {m}: keep between 1 and m = {m} weights of each group"),
        );
        return (vec![problem], None);
    }
    let nm = NOfM {
        n: n as u32,
        m: m as u32,
    };
    let problems = [
        checks::n_of_m_density(nm, density),
        checks::n_of_m_columns(nm, targets),
    ];
    (problems.into_iter().flatten().collect(), Some(nm))
}

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

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let params = Params::new(&ctx);
        let (n, m) = match (params.integer("n"), params.integer("m")) {
            (Ok(n), Ok(m)) => (n, m),
            (Err(e), _) | (_, Err(e)) => return Err(vec![ParamProblem::stage(e)]),
        };
        let targets: Vec<&LayerInfo> = ctx.targets.iter().collect();
        problems_result(check(n, m, &ctx.density, &targets).0)
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let (n, m) = (params.integer("n")?, params.integer("m")?);
        let targets: Vec<&LayerInfo> = ctx.targets.iter().map(|t| &t.layer).collect();
        // Densities are checked per target below: they may come from budgets.
        let (problems, pair) = check(n, m, &PlannedDensity::Unset, &targets);
        no_problems(problems)?;
        let Some(nm) = pair else {
            return Err(format!("need 1 <= n <= m <= {MAX_M}, got n = {n}, m = {m}"));
        };
        let (n, m) = (nm.n, nm.m);
        let structure = Structure::NOfM(nm);
        let total = ctx.targets.len() as u64;
        let mut masks = Vec::with_capacity(ctx.targets.len());
        for (i, target) in ctx.targets.iter().enumerate() {
            let layer = &target.layer;
            report_progress(i as u64, total, &layer.name);
            // Per target: a density may come from a budget, which planning cannot see.
            if let Some(d) = target.density
                && (d - f64::from(n) / f64::from(m)).abs() > 1e-9
            {
                return Err(format!(
                    "layer `{}`: density {d} conflicts with {n}:{m} (which keeps exactly {}); drop `density` from the stage",
                    layer.name,
                    f64::from(n) / f64::from(m)
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
        report_progress(total, total, "done");
        Ok(masks_output(masks))
    }
}

export_criterion!(NOfMCriterion);
