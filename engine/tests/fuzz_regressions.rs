//! Replays the committed inputs of the `model_load` and `gguf_import` fuzz targets
//! (`fuzz/regressions/<target>/`) through the same drivers the fuzzer runs, so that every crash
//! the fuzzer once found stays fixed without a nightly toolchain.
//!
//! File names say what is expected: `valid-*` must load, `crash-*`, `oom-*`, `timeout-*` and
//! `invalid-*` must be refused with an error; anything else (coverage inputs) must merely not
//! panic. Every input must finish within a few seconds.
//!
//! `write_model_load_seeds` (ignored) writes the hand-made seeds; see fuzz/README.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use espalier_engine::{Model, ModelConfig};
use serde_json::json;

#[path = "../../fuzz/harness/model_load.rs"]
mod model_load;

#[path = "../../fuzz/harness/gguf_import.rs"]
mod gguf_import;

fn regressions(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target)
}

/// Runs every input of `target` and checks its expectation; returns how many ran.
fn replay(target: &str, run: impl Fn(&[u8], &Path) -> Result<(), String>) -> usize {
    let mut files: Vec<PathBuf> = std::fs::read_dir(regressions(target))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let result = run(&bytes, dir.path());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{target}/{name} took {:?}",
            started.elapsed()
        );
        let must_fail = ["crash-", "oom-", "timeout-", "invalid-"]
            .iter()
            .any(|p| name.starts_with(p));
        if name.starts_with("valid-") {
            assert!(result.is_ok(), "{target}/{name}: {result:?}");
        } else if must_fail {
            assert!(result.is_err(), "{target}/{name} was accepted");
        }
    }
    files.len()
}

#[test]
fn model_load_regressions_replay() {
    let n = replay("model_load", |bytes, dir| {
        let (model, tokenizer) = model_load::run(bytes, dir);
        model.and(tokenizer)
    });
    assert!(n > 0, "no model_load inputs");
}

#[test]
fn gguf_import_regressions_replay() {
    let n = replay("gguf_import", gguf_import::run);
    assert!(n > 0, "no gguf_import inputs");
}

/// Deterministic small values.
fn values(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 37 + seed * 11) % 17) as f32 / 8.0 - 1.0)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn micro_llama(tied: bool) -> Model {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 2,
        "vocab_size": 8, "max_position_embeddings": 16, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied
    });
    let mut w = BTreeMap::new();
    let mut add = |name: String, shape: &[usize]| {
        let seed = w.len();
        w.insert(name, values(shape, seed));
    };
    add("model.embed_tokens.weight".into(), &[8, 4]);
    for b in 0..2 {
        let p = format!("model.layers.{b}");
        add(format!("{p}.self_attn.q_proj.weight"), &[4, 4]);
        add(format!("{p}.self_attn.k_proj.weight"), &[2, 4]);
        add(format!("{p}.self_attn.v_proj.weight"), &[2, 4]);
        add(format!("{p}.self_attn.o_proj.weight"), &[4, 4]);
        add(format!("{p}.mlp.gate_proj.weight"), &[8, 4]);
        add(format!("{p}.mlp.up_proj.weight"), &[8, 4]);
        add(format!("{p}.mlp.down_proj.weight"), &[4, 8]);
        add(format!("{p}.input_layernorm.weight"), &[4]);
        add(format!("{p}.post_attention_layernorm.weight"), &[4]);
    }
    add("model.norm.weight".into(), &[4]);
    if !tied {
        add("lm_head.weight".into(), &[8, 4]);
    }
    let config = ModelConfig::from_json(config, "micro-llama").unwrap();
    Model::from_parts(config, w, "micro-llama").unwrap()
}

fn micro_gpt2() -> Model {
    let config = json!({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_embd": 4, "n_head": 2, "n_layer": 1, "n_positions": 8, "vocab_size": 8
    });
    let mut w = BTreeMap::new();
    let mut add = |name: &str, shape: &[usize]| {
        let seed = w.len();
        w.insert(format!("transformer.{name}"), values(shape, seed));
    };
    add("wte.weight", &[8, 4]);
    add("wpe.weight", &[8, 4]);
    add("h.0.attn.c_attn.weight", &[12, 4]);
    add("h.0.attn.c_attn.bias", &[12]);
    add("h.0.attn.c_proj.weight", &[4, 4]);
    add("h.0.mlp.c_fc.weight", &[16, 4]);
    add("h.0.mlp.c_proj.weight", &[4, 16]);
    add("h.0.ln_1.weight", &[4]);
    add("h.0.ln_1.bias", &[4]);
    add("h.0.ln_2.weight", &[4]);
    add("h.0.ln_2.bias", &[4]);
    add("ln_f.weight", &[4]);
    add("ln_f.bias", &[4]);
    let config = ModelConfig::from_json(config, "micro-gpt2").unwrap();
    Model::from_parts(config, w, "micro-gpt2").unwrap()
}

const WORD_LEVEL: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,"model":{"type":"WordLevel","vocab":{"a":0,"b":1,"[UNK]":2},"unk_token":"[UNK]"}}"#;

const BPE: &str = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{"id":3,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],"normalizer":null,"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},"post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}"#;

/// The files of `model` as saved, with `tokenizer`, as a `model_load` input.
fn encode(model: &Model, dtype: DType, sharded: bool, tokenizer: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    model.save_into(dir.path()).unwrap();
    let mut weights: std::collections::HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    for t in weights.values_mut() {
        *t = t.to_dtype(dtype).unwrap();
    }
    let path = dir.path().join("w.safetensors");
    candle_core::safetensors::save(&weights, &path).unwrap();
    let weights = std::fs::read(path).unwrap();
    let config = std::fs::read(dir.path().join("config.json")).unwrap();
    let index = if sharded {
        let map: serde_json::Map<String, serde_json::Value> = model
            .weights()
            .keys()
            .map(|k| (k.clone(), json!(model_load::SHARD)))
            .collect();
        json!({"metadata": {}, "weight_map": map}).to_string()
    } else {
        String::new()
    };
    model_load::join(&model_load::Parts {
        flags: if sharded { model_load::SHARDED } else { 0 },
        config: &config,
        weights: &weights,
        tokenizer: tokenizer.as_bytes(),
        index: index.as_bytes(),
    })
}

/// Writes the `model_load` seeds into `fuzz/regressions/model_load/`.
#[test]
#[ignore = "writes the fuzz seeds; run by hand (fuzz/README.md)"]
fn write_model_load_seeds() {
    let dir = regressions("model_load");
    std::fs::create_dir_all(&dir).unwrap();
    let seeds = [
        (
            "valid-llama-f32",
            encode(&micro_llama(true), DType::F32, false, WORD_LEVEL),
        ),
        (
            "valid-llama-bf16-sharded",
            encode(&micro_llama(false), DType::BF16, true, BPE),
        ),
        (
            "valid-gpt2-f16",
            encode(&micro_gpt2(), DType::F16, false, WORD_LEVEL),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
