//! Built-in models that need no download: small deterministic models for quickstarts and
//! tests, and a random model with SmolLM2-135M's shapes for benchmarks.
//!
//! Names are `builtin:NAME`. Weights come from ChaCha8 seeded by the tensor name, so every
//! machine and every run generates bit-identical models (ChaCha's output is value-stable across
//! `rand_chacha` releases, unlike `StdRng`).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::model::Model;

/// The names accepted after `builtin:`, with a one-line description.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[
    (
        "tiny-llama",
        "LLaMA-family, 2 blocks, hidden 64, 4 heads / 2 KV heads, vocab 256 (~0.1M parameters)",
    ),
    (
        "tiny-gpt2",
        "GPT-2, 2 blocks, hidden 64, 4 heads, vocab 256 (~0.1M parameters)",
    ),
    (
        "smollm2-135m-shapes",
        "random weights with SmolLM2-135M's shapes: 30 blocks, hidden 576, FFN 1536, 9/3 heads, vocab 49152",
    ),
];

fn seed_of(name: &str) -> u64 {
    // FNV-1a: a stable, dependency-free hash of the tensor name.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn random(name: &str, shape: &[usize], scale: f32) -> Result<Tensor, EngineError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed_of(name));
    let n: usize = shape.iter().product();
    // Sum of two uniforms: a bell-ish distribution (like trained weights) at negligible cost.
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() + rng.random::<f32>() - 1.0) * scale)
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn ones(shape: &[usize]) -> Result<Tensor, EngineError> {
    Ok(Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?)
}

fn llama(name: &str, c: serde_json::Value) -> Result<Model, EngineError> {
    let config = ModelConfig::from_json(c, name)?;
    let (h, i, q, kv) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    );
    let s = 1.0 / (h as f32).sqrt();
    let mut w = BTreeMap::new();
    let mut put = |n: String, shape: &[usize], scale: f32| -> Result<(), EngineError> {
        let t = if scale == 0.0 {
            ones(shape)?
        } else {
            random(&n, shape, scale)?
        };
        w.insert(n, t);
        Ok(())
    };
    // Small embeddings, as in trained models: the tied LM head then gives moderate logits and a
    // random model scores a perplexity near the vocabulary size instead of an astronomical one.
    put(
        "model.embed_tokens.weight".into(),
        &[config.vocab_size, h],
        0.1,
    )?;
    for b in 0..config.num_layers {
        let p = format!("model.layers.{b}");
        put(format!("{p}.self_attn.q_proj.weight"), &[q, h], s)?;
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, h], s)?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, h], s)?;
        put(format!("{p}.self_attn.o_proj.weight"), &[h, q], s)?;
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], s)?;
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], s)?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[h, i],
            1.0 / (i as f32).sqrt(),
        )?;
        put(format!("{p}.input_layernorm.weight"), &[h], 0.0)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.0)?;
    }
    put("model.norm.weight".into(), &[h], 0.0)?;
    Model::from_parts(config, w, format!("builtin:{name}"))
}

fn gpt2(name: &str, c: serde_json::Value) -> Result<Model, EngineError> {
    let config = ModelConfig::from_json(c, name)?;
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let s = 1.0 / (h as f32).sqrt();
    let mut w = BTreeMap::new();
    let mut put = |n: String, shape: &[usize], scale: f32| -> Result<(), EngineError> {
        let t = if scale == 0.0 {
            ones(shape)?
        } else {
            random(&n, shape, scale)?
        };
        w.insert(n, t);
        Ok(())
    };
    let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu);
    put("wte.weight".into(), &[config.vocab_size, h], 0.1)?;
    put(
        "wpe.weight".into(),
        &[config.max_position_embeddings, h],
        0.1,
    )?;
    let mut biases = Vec::new();
    for b in 0..config.num_layers {
        let p = format!("h.{b}");
        put(format!("{p}.attn.c_attn.weight"), &[3 * h, h], s)?;
        put(format!("{p}.attn.c_proj.weight"), &[h, h], s)?;
        put(format!("{p}.mlp.c_fc.weight"), &[i, h], s)?;
        put(
            format!("{p}.mlp.c_proj.weight"),
            &[h, i],
            1.0 / (i as f32).sqrt(),
        )?;
        put(format!("{p}.ln_1.weight"), &[h], 0.0)?;
        put(format!("{p}.ln_2.weight"), &[h], 0.0)?;
        for (n, len) in [
            ("attn.c_attn.bias", 3 * h),
            ("attn.c_proj.bias", h),
            ("mlp.c_fc.bias", i),
            ("mlp.c_proj.bias", h),
            ("ln_1.bias", h),
            ("ln_2.bias", h),
        ] {
            biases.push((format!("{p}.{n}"), len));
        }
    }
    put("ln_f.weight".into(), &[h], 0.0)?;
    biases.push(("ln_f.bias".into(), h));
    for (n, len) in biases {
        w.insert(n, zeros(&[len])?);
    }
    Model::from_parts(config, w, format!("builtin:{name}"))
}

/// Generates the built-in model `name` (without the `builtin:` prefix).
pub fn builtin_model(name: &str) -> Result<Model, EngineError> {
    match name {
        "tiny-llama" => llama(
            name,
            json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                "vocab_size": 256, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": true, "hidden_act": "silu",
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
                (crate::tokenizer::BYTES_MARKER): "bytes"
            }),
        ),
        "tiny-gpt2" => gpt2(
            name,
            json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
                "vocab_size": 256, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float32",
                (crate::tokenizer::BYTES_MARKER): "bytes"
            }),
        ),
        "smollm2-135m-shapes" => llama(
            name,
            json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0, "tie_word_embeddings": true, "hidden_act": "silu",
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
                (crate::tokenizer::BYTES_MARKER): "bytes"
            }),
        ),
        other => Err(EngineError::Config {
            path: format!("builtin:{other}"),
            message: format!(
                "unknown built-in model; available: {}",
                BUILTIN_MODELS
                    .iter()
                    .map(|(n, _)| format!("builtin:{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_deterministic_and_consistent() {
        let a = builtin_model("tiny-llama").unwrap();
        let b = builtin_model("tiny-llama").unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let va: Vec<f32> = a
            .weight(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vb: Vec<f32> = b
            .weight(name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(va, vb);
        assert_eq!(a.block_linears().len(), 14);
        let g = builtin_model("tiny-gpt2").unwrap();
        assert_eq!(g.block_linears().len(), 8);
        assert!(
            builtin_model("nope")
                .unwrap_err()
                .to_string()
                .contains("builtin:tiny-llama")
        );
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["tiny-llama", "tiny-gpt2"] {
            let m = builtin_model(name).unwrap();
            m.save_into(dir.path()).unwrap();
            let back = Model::load(dir.path()).unwrap();
            assert_eq!(back.layers(), m.layers());
            for (n, t) in m.weights() {
                let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                let y: Vec<f32> = back
                    .weight(n)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!(x, y, "{n}");
            }
        }
    }

    #[test]
    fn mismatched_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let m = builtin_model("tiny-llama").unwrap();
        m.save_into(dir.path()).unwrap();
        // A config that claims more layers than the weights hold.
        let mut raw = m.config.raw.clone();
        raw["num_hidden_layers"] = json!(3);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        let err = Model::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("missing tensor `model.layers.2."), "{err}");
        // A truncated weights file.
        std::fs::write(dir.path().join("config.json"), m.config.raw.to_string()).unwrap();
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("model.safetensors"),
            &bytes[..bytes.len() / 2],
        )
        .unwrap();
        let err = Model::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
        // No weights at all.
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = Model::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("missing model.safetensors"), "{err}");
    }
}
