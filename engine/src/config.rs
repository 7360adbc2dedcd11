//! Model configuration: the subset of a Hugging Face `config.json` that Espalier needs, parsed
//! for the LLaMA family (LLaMA, SmolLM, Qwen2, Mistral-style) and GPT-2.
//!
//! The original JSON is kept verbatim (`raw`) so that an export writes back every field the
//! user's tools rely on, changing only what pruning changed (head counts, `head_dim`).

use std::path::Path;

use serde_json::Value;

use crate::error::EngineError;
use crate::files;

/// Which forward pass and tensor naming a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// LLaMA family: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP (LLaMA, SmolLM, Qwen2).
    Llama,
    /// GPT-2: LayerNorm, learned positions, fused QKV `Conv1D`, GELU MLP.
    Gpt2,
}

/// The model hyper-parameters, normalised across architectures.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Forward pass and naming scheme.
    pub arch: Architecture,
    /// `model_type` as written in config.json (`llama`, `qwen2`, `gpt2`, ...).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (equal to `num_heads` without grouped-query attention).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the position encoding supports.
    pub max_position_embeddings: usize,
    /// Epsilon of RMSNorm (LLaMA) or LayerNorm (GPT-2).
    pub norm_eps: f64,
    /// RoPE base frequency (LLaMA family only).
    pub rope_theta: f64,
    /// Whether the LM head shares the token embedding's weights.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases (Qwen2).
    pub attention_bias: bool,
    /// Beginning-of-sequence token id, if the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id, if the config names one.
    pub eos_token_id: Option<u32>,
    /// The config.json this was parsed from, kept so an export rewrites only what changed.
    pub raw: Value,
}

/// Largest width, head count or vocabulary accepted: 2^24, a hundred times beyond today's
/// largest models (hidden sizes around 16k, vocabularies around 256k).
const MAX_DIM: usize = 1 << 24;

/// Largest layer count accepted (today's largest models have about 130).
const MAX_LAYERS: usize = 1 << 16;

/// Largest context length accepted (the longest today are about 10M tokens).
const MAX_POSITIONS: usize = u32::MAX as usize;

/// Largest element count of one weight: 2^36 f32 (256 GiB), beyond any single tensor of a model
/// Espalier can load on one machine; bounds every product of config sizes.
const MAX_TENSOR_ELEMENTS: usize = 1 << 36;

fn field_usize(raw: &Value, source: &str, keys: &[&str]) -> Result<usize, EngineError> {
    for key in keys {
        if let Some(v) = raw.get(*key) {
            return v
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::Config {
                    path: source.to_string(),
                    message: format!("field `{key}` must be a non-negative integer, found {v}"),
                });
        }
    }
    Err(EngineError::Config {
        path: source.to_string(),
        message: format!("missing field `{}`", keys.join("` or `")),
    })
}

fn opt_f64(raw: &Value, key: &str) -> Option<f64> {
    raw.get(key).and_then(Value::as_f64)
}

fn opt_token(raw: &Value, key: &str) -> Option<u32> {
    match raw.get(key)? {
        Value::Number(n) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
        // Some configs list several end-of-sequence ids; the first is the canonical one.
        Value::Array(items) => items
            .first()
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok()),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let text = files::read_to_string(path, files::JSON_LIMIT).map_err(|e| EngineError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| EngineError::Config {
            path: path.display().to_string(),
            message: format!(
                "not valid JSON (line {}, column {}): {e}",
                e.line(),
                e.column()
            ),
        })?;
        Self::from_json(raw, &path.display().to_string())
    }

    /// Parses a config already read as JSON; `source` names it in error messages.
    pub fn from_json(raw: Value, source: &str) -> Result<Self, EngineError> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let arch = match model_type.as_str() {
            "llama" | "qwen2" | "mistral" | "smollm" | "smollm2" => Architecture::Llama,
            "gpt2" => Architecture::Gpt2,
            other => {
                return Err(EngineError::Config {
                    path: source.to_string(),
                    message: format!(
                        "unsupported model_type `{other}`: Espalier supports llama, qwen2, mistral (LLaMA family) and gpt2"
                    ),
                });
            }
        };
        let config = match arch {
            Architecture::Llama => {
                let hidden_size = field_usize(&raw, source, &["hidden_size"])?;
                let num_heads = field_usize(&raw, source, &["num_attention_heads"])?;
                let num_kv_heads =
                    field_usize(&raw, source, &["num_key_value_heads"]).unwrap_or(num_heads);
                let head_dim = match raw.get("head_dim") {
                    Some(Value::Null) | None => hidden_size.checked_div(num_heads).unwrap_or(0),
                    Some(_) => field_usize(&raw, source, &["head_dim"])?,
                };
                let attention_bias = raw
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(model_type == "qwen2");
                ModelConfig {
                    arch,
                    model_type,
                    hidden_size,
                    intermediate_size: field_usize(&raw, source, &["intermediate_size"])?,
                    num_layers: field_usize(&raw, source, &["num_hidden_layers"])?,
                    num_heads,
                    num_kv_heads,
                    head_dim,
                    vocab_size: field_usize(&raw, source, &["vocab_size"])?,
                    max_position_embeddings: field_usize(
                        &raw,
                        source,
                        &["max_position_embeddings"],
                    )
                    .unwrap_or(2048),
                    norm_eps: opt_f64(&raw, "rms_norm_eps").unwrap_or(1e-6),
                    // transformers 5 writes `rope_parameters.rope_theta` instead of a top-level
                    // `rope_theta`; accept both.
                    rope_theta: opt_f64(&raw, "rope_theta")
                        .or_else(|| {
                            raw.get("rope_parameters")
                                .and_then(|p| opt_f64(p, "rope_theta"))
                        })
                        .unwrap_or(10_000.0),
                    tie_word_embeddings: raw
                        .get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    attention_bias,
                    bos_token_id: opt_token(&raw, "bos_token_id"),
                    eos_token_id: opt_token(&raw, "eos_token_id"),
                    raw,
                }
            }
            Architecture::Gpt2 => {
                let hidden_size = field_usize(&raw, source, &["n_embd", "hidden_size"])?;
                let num_heads = field_usize(&raw, source, &["n_head", "num_attention_heads"])?;
                let intermediate_size = match raw.get("n_inner") {
                    Some(Value::Null) | None => hidden_size.saturating_mul(4),
                    Some(_) => field_usize(&raw, source, &["n_inner"])?,
                };
                ModelConfig {
                    arch,
                    model_type,
                    hidden_size,
                    intermediate_size,
                    num_layers: field_usize(&raw, source, &["n_layer", "num_hidden_layers"])?,
                    num_heads,
                    num_kv_heads: num_heads,
                    head_dim: hidden_size.checked_div(num_heads).unwrap_or(0),
                    vocab_size: field_usize(&raw, source, &["vocab_size"])?,
                    max_position_embeddings: field_usize(
                        &raw,
                        source,
                        &["n_positions", "max_position_embeddings"],
                    )?,
                    norm_eps: opt_f64(&raw, "layer_norm_epsilon").unwrap_or(1e-5),
                    rope_theta: 0.0,
                    tie_word_embeddings: raw
                        .get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    attention_bias: true,
                    bos_token_id: opt_token(&raw, "bos_token_id"),
                    eos_token_id: opt_token(&raw, "eos_token_id"),
                    raw,
                }
            }
        };
        config.check(source)?;
        Ok(config)
    }

    fn check(&self, source: &str) -> Result<(), EngineError> {
        let bad = |message: String| EngineError::Config {
            path: source.to_string(),
            message,
        };
        // Each size is bounded, and every product the loader and the forward pass form from
        // them is checked, so that no absurd value can overflow or size an allocation before
        // it is compared with the tensors the files actually hold.
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if value > MAX_DIM {
                return Err(bad(format!(
                    "field `{field}` is {value}, more than the {MAX_DIM} Espalier supports"
                )));
            }
        }
        if self.num_layers > MAX_LAYERS {
            return Err(bad(format!(
                "field `{}` is {}, more than the {MAX_LAYERS} Espalier supports",
                self.layers_field(),
                self.num_layers
            )));
        }
        if self.max_position_embeddings > MAX_POSITIONS {
            return Err(bad(format!(
                "field `max_position_embeddings` is {}, more than the {MAX_POSITIONS} Espalier supports",
                self.max_position_embeddings
            )));
        }
        let elements = |what: &str, a: usize, b: usize| {
            a.checked_mul(b)
                .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
                .ok_or_else(|| {
                    bad(format!(
                        "{what} ({a} × {b}) is larger than any tensor Espalier can hold"
                    ))
                })
        };
        let q = elements(
            "num_attention_heads × head_dim",
            self.num_heads,
            self.head_dim,
        )?;
        elements(
            "num_key_value_heads × head_dim",
            self.num_kv_heads,
            self.head_dim,
        )?;
        elements(
            "the token embedding (vocab_size × hidden_size)",
            self.vocab_size,
            self.hidden_size,
        )?;
        elements(
            "an MLP weight (intermediate_size × hidden_size)",
            self.intermediate_size,
            self.hidden_size,
        )?;
        elements(
            "an attention weight (heads × head_dim × hidden_size)",
            q,
            self.hidden_size,
        )?;
        elements(
            "the position table (max_position_embeddings × hidden_size)",
            self.max_position_embeddings,
            self.hidden_size,
        )?;
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 {
            return Err(bad("head counts and head_dim must be positive".into()));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.arch == Architecture::Gpt2 && !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(bad(format!(
                "n_embd ({}) must be a multiple of n_head ({})",
                self.hidden_size, self.num_heads
            )));
        }
        Ok(())
    }

    /// The config.json key that holds the layer count (for error messages).
    pub fn layers_field(&self) -> &'static str {
        match self.arch {
            Architecture::Gpt2 if self.raw.get("n_layer").is_some() => "n_layer",
            _ => "num_hidden_layers",
        }
    }

    /// Query heads that share one key/value head.
    pub fn heads_per_kv_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}
