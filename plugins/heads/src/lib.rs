//! `heads`: attention-head pruning. A query head's importance is the squared L2 norm of its
//! rows of Q plus its columns of O; a key/value head adds its K and V rows. With grouped-query
//! attention (several query heads share one K/V head) two granularities keep the model
//! consistent for Hugging Face (every block must keep the same head counts):
//! - `query`: every K/V group keeps the same number of its best query heads;
//! - `group`: whole K/V groups (their K/V head and all their query heads) are kept or removed.
//!
//! The stage's density is the fraction of heads to keep; the export removes the others
//! physically (smaller matrices, updated config).
//!
//! `validate` checks `granularity`, the density and that every block it touches has all of its
//! attention projections among the targets, at planning (the host itself refuses targets that
//! are not attention projections).

use espalier_plugin_sdk::*;

/// The problems of the parameters, the density and the targets' completeness per block.
fn check(granularity: &str, density: &PlannedDensity, targets: &[LayerInfo]) -> Vec<ParamProblem> {
    let mut problems = Vec::new();
    if granularity != "query" && granularity != "group" {
        problems.push(ParamProblem::param(
            "granularity",
            format!("granularity must be \"query\" or \"group\", not {granularity:?}"),
        ));
    }
    if matches!(density, PlannedDensity::Unset) {
        problems.push(ParamProblem::density(
            "heads keeps this fraction of the attention heads: set `density` (e.g. density = 0.5)",
        ));
    }
    let mut blocks: std::collections::BTreeMap<u32, Vec<Role>> = Default::default();
    for l in targets {
        if let Some(b) = l.block {
            blocks.entry(b).or_default().push(l.role);
        }
    }
    let has = |roles: &[Role], want: Role| {
        roles
            .iter()
            .any(|r| std::mem::discriminant(r) == std::mem::discriminant(&want))
    };
    if let Some((b, _)) = blocks.iter().find(|(_, roles)| {
        !(has(roles, Role::AttnO)
            && (has(roles, Role::AttnQkv)
                || (has(roles, Role::AttnQ) && has(roles, Role::AttnK) && has(roles, Role::AttnV))))
    }) {
        problems.push(ParamProblem::targets(format!(
            "block {b}: heads needs the q, k, v and o projections (or c_attn and c_proj) of every block it prunes among its targets; target whole attention modules (e.g. targets = [\"*.self_attn.*\"]) and `protect` whole blocks"
        )));
    }
    problems
}

struct Heads;

/// The attention projections of one block, by role.
#[derive(Default)]
struct BlockLayers {
    q: Option<LayerInfo>,
    k: Option<LayerInfo>,
    v: Option<LayerInfo>,
    qkv: Option<LayerInfo>,
    o: Option<LayerInfo>,
    density: Option<f64>,
}

fn squared_norms(name: &str, structure: Structure) -> Result<Vec<f64>, String> {
    let w = model::weight(name)?;
    let norms = kernels::group_norms(&w, structure, 2.0)?;
    Ok(read_all(&norms)?
        .into_iter()
        .map(|x| f64::from(x) * f64::from(x))
        .collect())
}

/// Indices of the `k` largest scores, ties to the lower index, returned sorted.
fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order.into_iter().take(k).collect();
    kept.sort_unstable();
    kept
}

impl Guest for Heads {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "heads".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Attention-head pruning by the L2 norm of each head's Q/K/V rows and O columns; GQA-aware; the export removes pruned heads physically.".into(),
            params: vec![param(
                "granularity",
                ParamValue::Text("query".into()),
                "`query`: keep the same number of query heads in every K/V group; `group`: keep or drop whole K/V groups",
            )],
            needs: vec![Need::Weights],
            produces: OutputKind::Heads,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let granularity = Params::new(&ctx)
            .text("granularity")
            .map_err(|e| vec![ParamProblem::stage(e)])?;
        problems_result(check(granularity, &ctx.density, &ctx.targets))
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        let granularity = params.text("granularity")?;
        if granularity != "query" && granularity != "group" {
            return Err(format!(
                "granularity must be \"query\" or \"group\", not {granularity:?}"
            ));
        }
        let info = model::info();
        let (heads, kv_heads, head_dim) = (
            info.num_heads as usize,
            info.num_kv_heads as usize,
            info.head_dim,
        );
        let per_group = heads / kv_heads;

        let mut blocks: std::collections::BTreeMap<u32, BlockLayers> = Default::default();
        for target in &ctx.targets {
            let layer = &target.layer;
            let Some(b) = layer.block else {
                return Err(format!(
                    "`{}` is not inside a transformer block",
                    layer.name
                ));
            };
            let entry = blocks.entry(b).or_default();
            let density = target_density(target)?;
            if entry.density.is_some_and(|d| d != density) {
                return Err(format!(
                    "block {b}: all attention projections need the same density"
                ));
            }
            entry.density = Some(density);
            let slot = match layer.role {
                Role::AttnQ => &mut entry.q,
                Role::AttnK => &mut entry.k,
                Role::AttnV => &mut entry.v,
                Role::AttnQkv => &mut entry.qkv,
                Role::AttnO => &mut entry.o,
                _ => {
                    return Err(format!(
                        "`{}` is not an attention projection; target only q/k/v/o",
                        layer.name
                    ));
                }
            };
            *slot = Some(layer.clone());
        }

        let mut keep_out = Vec::with_capacity(blocks.len());
        let total = blocks.len() as u64;
        for (i, (b, layers)) in blocks.iter().enumerate() {
            report_progress(i as u64, total, &format!("block {b}"));
            let missing = || {
                format!(
                    "block {b}: heads needs the q, k, v and o projections (or c_attn and c_proj) all in targets"
                )
            };
            let o = layers.o.as_ref().ok_or_else(missing)?;
            let (q_sq, k_sq, v_sq) = if let Some(qkv) = &layers.qkv {
                let all = squared_norms(&qkv.name, Structure::RowGroups(head_dim))?;
                if all.len() != heads + 2 * kv_heads {
                    return Err(format!(
                        "`{}`: expected {} head slices, found {}",
                        qkv.name,
                        heads + 2 * kv_heads,
                        all.len()
                    ));
                }
                (
                    all[..heads].to_vec(),
                    all[heads..heads + kv_heads].to_vec(),
                    all[heads + kv_heads..].to_vec(),
                )
            } else {
                let (q, k, v) = (
                    layers.q.as_ref().ok_or_else(missing)?,
                    layers.k.as_ref().ok_or_else(missing)?,
                    layers.v.as_ref().ok_or_else(missing)?,
                );
                (
                    squared_norms(&q.name, Structure::RowGroups(head_dim))?,
                    squared_norms(&k.name, Structure::RowGroups(head_dim))?,
                    squared_norms(&v.name, Structure::RowGroups(head_dim))?,
                )
            };
            let o_sq = squared_norms(&o.name, Structure::ColumnGroups(head_dim))?;
            if q_sq.len() != heads
                || o_sq.len() != heads
                || k_sq.len() != kv_heads
                || v_sq.len() != kv_heads
            {
                return Err(format!(
                    "block {b}: projection shapes do not match {heads} heads / {kv_heads} KV heads of width {head_dim}"
                ));
            }
            let density = layers.density.unwrap_or(1.0);
            let query_score: Vec<f64> = (0..heads).map(|h| q_sq[h] + o_sq[h]).collect();
            let mut keep = Vec::new();
            if granularity == "query" {
                let k = ((density * per_group as f64).round() as usize).clamp(1, per_group);
                for g in 0..kv_heads {
                    let members = &query_score[g * per_group..(g + 1) * per_group];
                    keep.extend(
                        top_k(members, k)
                            .into_iter()
                            .map(|i| (g * per_group + i) as u32),
                    );
                }
            } else {
                let k = ((density * kv_heads as f64).round() as usize).clamp(1, kv_heads);
                let group_score: Vec<f64> = (0..kv_heads)
                    .map(|g| {
                        k_sq[g]
                            + v_sq[g]
                            + query_score[g * per_group..(g + 1) * per_group]
                                .iter()
                                .sum::<f64>()
                    })
                    .collect();
                for g in top_k(&group_score, k) {
                    keep.extend((g * per_group..(g + 1) * per_group).map(|h| h as u32));
                }
            }
            keep_out.push(HeadKeep { block: *b, keep });
        }
        report_progress(total, total, "done");
        Ok(StageOutput {
            masks: Vec::new(),
            budgets: Vec::new(),
            heads: keep_out,
            weights: Vec::new(),
        })
    }
}

export_criterion!(Heads);
