//! Physical removal of attention heads: the rows of Q/K/V and the columns of O that belong to
//! pruned heads are cut out (the kept ones are copied bit for bit), and the config gets the
//! new head counts, so the exported model is smaller and loads in Hugging Face transformers as
//! the same architecture.
//!
//! Hugging Face LLaMA-family configs carry one head count for all blocks, so every block must
//! keep the same number of query heads and of K/V heads, and under grouped-query attention
//! every kept K/V group must keep the same number of query heads.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use espalier_engine::{Architecture, Model, Role};

use crate::mask::Mask;

/// The heads one block keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHeads {
    /// Kept query heads, ascending.
    pub query: Vec<usize>,
    /// Kept key/value heads, ascending.
    pub kv: Vec<usize>,
}

/// What a head-removal step changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeadsChange {
    /// Query heads before / after.
    pub heads_before: usize,
    /// Query heads after.
    pub heads_after: usize,
    /// K/V heads before.
    pub kv_heads_before: usize,
    /// K/V heads after.
    pub kv_heads_after: usize,
    /// Kept query heads per block.
    pub kept: BTreeMap<usize, Vec<usize>>,
}

/// Checks a plugin's head choice and derives the K/V heads each block keeps.
///
/// `keep` maps block index to kept query heads; blocks not listed keep every head.
pub fn plan_removal(
    model: &Model,
    keep: &BTreeMap<usize, Vec<usize>>,
) -> Result<BTreeMap<usize, BlockHeads>, String> {
    let cfg = &model.config;
    if cfg.arch != Architecture::Llama {
        return Err(
            "physical head removal is implemented for the LLaMA family (separate q/k/v/o \
             projections); GPT-2's fused c_attn is not supported yet"
                .into(),
        );
    }
    let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(format!(
            "{heads} query heads do not split into {kv_heads} K/V groups"
        ));
    }
    let per_group = heads / kv_heads;
    let mut plans = BTreeMap::new();
    for block in 0..cfg.num_layers {
        let query: Vec<usize> = match keep.get(&block) {
            None => (0..heads).collect(),
            Some(q) => {
                let set: BTreeSet<usize> = q.iter().copied().collect();
                if set.len() != q.len() {
                    return Err(format!("block {block}: a head is listed twice"));
                }
                if let Some(bad) = set.iter().find(|&&h| h >= heads) {
                    return Err(format!(
                        "block {block}: head {bad} does not exist (the model has {heads})"
                    ));
                }
                if set.is_empty() {
                    return Err(format!(
                        "block {block}: keeps no head; an attention layer needs at least one"
                    ));
                }
                set.into_iter().collect()
            }
        };
        let mut per_kv: BTreeMap<usize, usize> = BTreeMap::new();
        for &h in &query {
            *per_kv.entry(h / per_group).or_default() += 1;
        }
        let counts: BTreeSet<usize> = per_kv.values().copied().collect();
        if counts.len() > 1 {
            return Err(format!(
                "block {block}: kept K/V groups keep different numbers of query heads ({:?}); \
                 grouped-query attention needs the same number in every kept group",
                per_kv
            ));
        }
        plans.insert(
            block,
            BlockHeads {
                query,
                kv: per_kv.keys().copied().collect(),
            },
        );
    }
    let shapes: BTreeSet<(usize, usize)> = plans
        .values()
        .map(|p| (p.query.len(), p.kv.len()))
        .collect();
    if shapes.len() > 1 {
        return Err(format!(
            "blocks keep different head counts {shapes:?} (query, K/V); the config has one head \
             count for every block, so give every block the same density"
        ));
    }
    Ok(plans)
}

fn rows_of(heads: &[usize], head_dim: usize) -> Vec<u32> {
    heads
        .iter()
        .flat_map(|&h| (h * head_dim..(h + 1) * head_dim).map(|r| r as u32))
        .collect()
}

fn select(t: &Tensor, dim: usize, idx: &[u32]) -> Result<Tensor, String> {
    let ids = Tensor::new(idx, &Device::Cpu).map_err(|e| e.to_string())?;
    t.index_select(&ids, dim)
        .and_then(|t| t.contiguous())
        .map_err(|e| e.to_string())
}

/// Keeps the chosen rows (`dim` 0) or columns (`dim` 1) of a mask.
fn slice_mask(mask: &Mask, dim: usize, idx: &[u32]) -> Result<Mask, String> {
    let (r, c) = crate::mask::rows_cols(mask.shape());
    let keep = mask.keep();
    let (shape, flags): (Vec<usize>, Vec<bool>) = if dim == 0 {
        let mut f = Vec::with_capacity(idx.len() * c);
        for &i in idx {
            f.extend_from_slice(&keep[i as usize * c..(i as usize + 1) * c]);
        }
        (vec![idx.len(), c], f)
    } else {
        let mut f = Vec::with_capacity(idx.len() * r);
        for row in 0..r {
            f.extend(idx.iter().map(|&j| keep[row * c + j as usize]));
        }
        (vec![r, idx.len()], f)
    };
    // Cutting whole heads keeps block/N:M groups intact when head_dim is a multiple of the
    // group; otherwise the structure no longer holds and the mask is plain unstructured.
    Mask::new(shape.clone(), flags.clone(), mask.structure())
        .or_else(|_| Mask::new(shape, flags, crate::mask::Structure::Unstructured))
}

/// Removes the heads not in `plans` from the model and from `masks`, and rewrites the config.
pub fn remove_heads(
    model: &mut Model,
    plans: &BTreeMap<usize, BlockHeads>,
    masks: &mut BTreeMap<String, Mask>,
) -> Result<HeadsChange, String> {
    let cfg = model.config.clone();
    let head_dim = cfg.head_dim;
    let (heads_after, kv_after) = plans
        .values()
        .next()
        .map_or((cfg.num_heads, cfg.num_kv_heads), |p| {
            (p.query.len(), p.kv.len())
        });
    let change = HeadsChange {
        heads_before: cfg.num_heads,
        heads_after,
        kv_heads_before: cfg.num_kv_heads,
        kv_heads_after: kv_after,
        kept: plans.iter().map(|(b, p)| (*b, p.query.clone())).collect(),
    };
    if heads_after == cfg.num_heads && kv_after == cfg.num_kv_heads {
        return Ok(change);
    }
    if !cfg.hidden_size.is_multiple_of(heads_after) {
        // Our engine and transformers 4.x run such configs (head_dim is explicit), but
        // transformers 5 refuses a LLaMA config whose hidden size its head count does not divide.
        tracing::warn!(
            "hidden size {} is not a multiple of the {heads_after} remaining heads: transformers 5 \
             refuses to load such LLaMA configs; keep a head count that divides it",
            cfg.hidden_size
        );
    }
    let layers = model.layers();
    for (block, plan) in plans {
        let q_rows = rows_of(&plan.query, head_dim);
        let kv_rows = rows_of(&plan.kv, head_dim);
        for layer in layers.iter().filter(|l| l.block == Some(*block)) {
            let (dim, idx) = match layer.role {
                Role::AttnQ => (0, &q_rows),
                Role::AttnK | Role::AttnV => (0, &kv_rows),
                Role::AttnO if layer.shape.len() == 2 => (1, &q_rows),
                Role::Bias => {
                    // q/k/v biases (Qwen2) follow their projection's rows.
                    let base = layer.name.trim_end_matches(".bias");
                    if base.ends_with("q_proj") {
                        (0, &q_rows)
                    } else if base.ends_with("k_proj") || base.ends_with("v_proj") {
                        (0, &kv_rows)
                    } else {
                        continue;
                    }
                }
                _ => continue,
            };
            let weight = model
                .weight(&layer.name)
                .ok_or_else(|| format!("`{}` vanished from the model", layer.name))?;
            let cut = select(weight, dim, idx)?;
            model
                .set_weight(&layer.name, cut, true)
                .map_err(|e| e.to_string())?;
            if let Some(m) = masks.get(&layer.name) {
                let sliced = slice_mask(m, dim, idx)?;
                masks.insert(layer.name.clone(), sliced);
            }
        }
    }
    model
        .set_config_field("num_attention_heads", serde_json::json!(heads_after))
        .and_then(|()| model.set_config_field("num_key_value_heads", serde_json::json!(kv_after)))
        // hidden / heads no longer gives the head width: say it explicitly.
        .and_then(|()| model.set_config_field("head_dim", serde_json::json!(head_dim)))
        .map_err(|e| e.to_string())?;
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Model {
        espalier_engine::load_model("builtin:tiny-llama").unwrap()
    }

    #[test]
    fn removal_keeps_rows_and_columns_bit_identical() {
        let mut model = tiny();
        let before = model.clone();
        let cfg = before.config.clone();
        assert_eq!((cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (4, 2, 16));
        // Keep heads 1 and 3: one query head in each K/V group.
        let keep: BTreeMap<usize, Vec<usize>> =
            (0..cfg.num_layers).map(|b| (b, vec![1, 3])).collect();
        let plans = plan_removal(&model, &keep).unwrap();
        assert_eq!(plans[&0].kv, vec![0, 1]);
        let change = remove_heads(&mut model, &plans, &mut BTreeMap::new()).unwrap();
        assert_eq!((change.heads_after, change.kv_heads_after), (2, 2));
        assert_eq!(model.config.num_heads, 2);
        assert_eq!(model.config.num_kv_heads, 2);
        assert_eq!(model.config.head_dim, 16);
        for b in 0..cfg.num_layers {
            let q_name = format!("model.layers.{b}.self_attn.q_proj.weight");
            let o_name = format!("model.layers.{b}.self_attn.o_proj.weight");
            let k_name = format!("model.layers.{b}.self_attn.k_proj.weight");
            let q_old: Vec<Vec<f32>> = before.weight(&q_name).unwrap().to_vec2().unwrap();
            let q_new: Vec<Vec<f32>> = model.weight(&q_name).unwrap().to_vec2().unwrap();
            assert_eq!(q_new.len(), 32);
            for (i, &h) in [1usize, 3].iter().enumerate() {
                for r in 0..16 {
                    assert_eq!(q_new[i * 16 + r], q_old[h * 16 + r]);
                }
            }
            let o_old: Vec<Vec<f32>> = before.weight(&o_name).unwrap().to_vec2().unwrap();
            let o_new: Vec<Vec<f32>> = model.weight(&o_name).unwrap().to_vec2().unwrap();
            for (row_old, row_new) in o_old.iter().zip(&o_new) {
                assert_eq!(row_new.len(), 32);
                for (i, &h) in [1usize, 3].iter().enumerate() {
                    assert_eq!(
                        &row_new[i * 16..(i + 1) * 16],
                        &row_old[h * 16..(h + 1) * 16]
                    );
                }
            }
            // Both K/V groups survive untouched.
            assert_eq!(
                model.weight(&k_name).unwrap().to_vec2::<f32>().unwrap(),
                before.weight(&k_name).unwrap().to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn dropping_a_whole_group_removes_its_kv_head() {
        let mut model = tiny();
        let before = model.clone();
        let keep: BTreeMap<usize, Vec<usize>> = (0..2).map(|b| (b, vec![2, 3])).collect();
        let plans = plan_removal(&model, &keep).unwrap();
        remove_heads(&mut model, &plans, &mut BTreeMap::new()).unwrap();
        assert_eq!((model.config.num_heads, model.config.num_kv_heads), (2, 1));
        let v = "model.layers.0.self_attn.v_proj.weight";
        let old: Vec<Vec<f32>> = before.weight(v).unwrap().to_vec2().unwrap();
        let new: Vec<Vec<f32>> = model.weight(v).unwrap().to_vec2().unwrap();
        assert_eq!(new, old[16..32].to_vec());
    }

    #[test]
    fn inconsistent_choices_are_refused() {
        let model = tiny();
        // Group 0 keeps two query heads, group 1 keeps one.
        let uneven: BTreeMap<usize, Vec<usize>> = (0..2).map(|b| (b, vec![0, 1, 2])).collect();
        assert!(
            plan_removal(&model, &uneven)
                .unwrap_err()
                .contains("same number")
        );
        // Block 0 keeps 2 heads, block 1 keeps all 4.
        let partial: BTreeMap<usize, Vec<usize>> = [(0, vec![0, 2])].into_iter().collect();
        assert!(
            plan_removal(&model, &partial)
                .unwrap_err()
                .contains("different head counts")
        );
        let bad: BTreeMap<usize, Vec<usize>> = (0..2).map(|b| (b, vec![7])).collect();
        assert!(
            plan_removal(&model, &bad)
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
