//! The forward pass after attention heads are physically removed: removing a head must give the
//! same logits as keeping it with its slice of the output projection zeroed (the head then adds
//! nothing to the residual stream), including after a save and reload through config.json.

use candle_core::{D, Tensor};
use espalier_engine::{Model, Session, builtin_model};
use serde_json::json;

/// Rows `[h·d, (h+1)·d)` of each kept head, concatenated along `dim`.
fn keep_heads(t: &Tensor, dim: usize, d: usize, keep: &[usize]) -> Tensor {
    let parts: Vec<Tensor> = keep
        .iter()
        .map(|&h| t.narrow(dim, h * d, d).unwrap())
        .collect();
    Tensor::cat(&parts, dim).unwrap()
}

/// `t` with the slices of `dim` belonging to `heads` set to zero.
fn zero_heads(t: &Tensor, dim: usize, d: usize, heads: &[usize]) -> Tensor {
    let n = t.dims()[dim] / d;
    let parts: Vec<Tensor> = (0..n)
        .map(|h| {
            let s = t.narrow(dim, h * d, d).unwrap();
            if heads.contains(&h) {
                s.zeros_like().unwrap()
            } else {
                s
            }
        })
        .collect();
    Tensor::cat(&parts, dim).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check(pruned: &Model, zeroed: &Model) {
    let tokens: Vec<u32> = (0..40).map(|i| (i * 29 + 7) % 256).collect();
    let a = Session::new(pruned)
        .unwrap()
        .forward(&tokens, None)
        .unwrap();
    let b = Session::new(zeroed)
        .unwrap()
        .forward(&tokens, None)
        .unwrap();
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
    // Through config.json and safetensors, as an exported pruned model is read back.
    let dir = tempfile::tempdir().unwrap();
    pruned.save_into(dir.path()).unwrap();
    let back = Model::load(dir.path()).unwrap();
    let c = Session::new(&back).unwrap().forward(&tokens, None).unwrap();
    assert!(max_diff(&a, &c) < 1e-6);
}

#[test]
fn llama_with_query_heads_removed() {
    // tiny-llama: 4 query heads in 2 KV groups of 2, head_dim 16. Remove query head 1 (group 0)
    // and 3 (group 1): 2 query heads, 2 KV heads, hidden still 64.
    let base = builtin_model("tiny-llama").unwrap();
    let d = 16;
    let (keep, drop) = ([0usize, 2], [1usize, 3]);
    let mut pruned = base.clone();
    let mut zeroed = base.clone();
    for b in 0..2 {
        let q = format!("model.layers.{b}.self_attn.q_proj.weight");
        let o = format!("model.layers.{b}.self_attn.o_proj.weight");
        let wq = base.weight(&q).unwrap();
        let wo = base.weight(&o).unwrap();
        pruned
            .set_weight(&q, keep_heads(wq, 0, d, &keep), true)
            .unwrap();
        pruned
            .set_weight(&o, keep_heads(wo, 1, d, &keep), true)
            .unwrap();
        zeroed
            .set_weight(&o, zero_heads(wo, 1, d, &drop), false)
            .unwrap();
    }
    pruned
        .set_config_field("num_attention_heads", json!(2))
        .unwrap();
    assert_eq!(pruned.config.head_dim, 16, "explicit head_dim survives");
    check(&pruned, &zeroed);
}

#[test]
fn llama_with_a_kv_group_removed() {
    // Remove KV head 1 and its query heads 2 and 3: 2 query heads sharing 1 KV head.
    let base = builtin_model("tiny-llama").unwrap();
    let d = 16;
    let mut pruned = base.clone();
    let mut zeroed = base.clone();
    for b in 0..2 {
        let p = format!("model.layers.{b}.self_attn");
        for (proj, keep) in [
            ("q_proj", &[0usize, 1][..]),
            ("k_proj", &[0]),
            ("v_proj", &[0]),
        ] {
            let name = format!("{p}.{proj}.weight");
            let w = base.weight(&name).unwrap();
            pruned
                .set_weight(&name, keep_heads(w, 0, d, keep), true)
                .unwrap();
        }
        let o = format!("{p}.o_proj.weight");
        let wo = base.weight(&o).unwrap();
        pruned
            .set_weight(&o, keep_heads(wo, 1, d, &[0, 1]), true)
            .unwrap();
        zeroed
            .set_weight(&o, zero_heads(wo, 1, d, &[2, 3]), false)
            .unwrap();
    }
    pruned
        .set_config_field("num_attention_heads", json!(2))
        .unwrap();
    pruned
        .set_config_field("num_key_value_heads", json!(1))
        .unwrap();
    check(&pruned, &zeroed);
}

#[test]
fn gpt2_with_heads_removed() {
    // tiny-gpt2: 4 heads of 16 in a fused c_attn [q; k; v]. Remove head 2 from q, k and v
    // (as transformers' prune_heads does) and from c_proj's inputs; head_dim goes into the
    // config because n_embd / n_head no longer gives it.
    let base = builtin_model("tiny-gpt2").unwrap();
    let (d, h) = (16, 64);
    let keep = [0usize, 1, 3];
    let mut pruned = base.clone();
    let mut zeroed = base.clone();
    for b in 0..2 {
        let qkv = format!("h.{b}.attn.c_attn.weight");
        let qkv_b = format!("h.{b}.attn.c_attn.bias");
        let o = format!("h.{b}.attn.c_proj.weight");
        let (w, bias) = (base.weight(&qkv).unwrap(), base.weight(&qkv_b).unwrap());
        let split = |t: &Tensor| -> Tensor {
            let parts: Vec<Tensor> = (0..3)
                .map(|i| keep_heads(&t.narrow(0, i * h, h).unwrap(), 0, d, &keep))
                .collect();
            Tensor::cat(&parts, 0).unwrap()
        };
        pruned.set_weight(&qkv, split(w), true).unwrap();
        pruned.set_weight(&qkv_b, split(bias), true).unwrap();
        let wo = base.weight(&o).unwrap();
        pruned
            .set_weight(&o, keep_heads(wo, 1, d, &keep), true)
            .unwrap();
        zeroed
            .set_weight(&o, zero_heads(wo, 1, d, &[2]), false)
            .unwrap();
    }
    // The forward pass counts heads from c_proj's width and the explicit head_dim. (config.rs
    // still refuses n_head = 3 with n_embd = 64, so n_head stays as it was here.)
    pruned.set_config_field("head_dim", json!(16)).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 29 + 7) % 256).collect();
    let a = Session::new(&pruned)
        .unwrap()
        .forward(&tokens, None)
        .unwrap();
    let b = Session::new(&zeroed)
        .unwrap()
        .forward(&tokens, None)
        .unwrap();
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
}
