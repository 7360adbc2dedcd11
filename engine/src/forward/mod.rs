//! The forward pass: LLaMA family (RMSNorm, RoPE, grouped-query attention, SwiGLU) and GPT-2
//! (learned positions, LayerNorm, fused QKV, GELU), f32 on the CPU, with a KV cache for
//! generation.
//!
//! A [`Session`] is built once from a [`Model`] (it shares the model's tensors, copying
//! nothing) and turns token ids into logits. Every matrix product of the blocks and the LM head
//! goes through [`Linear`], so a pruned layer can be pointed at another kernel with
//! [`Session::linear_mut`].
//!
//! Head counts are read per block from the weight shapes (`q_proj` rows / `head_dim`), with
//! `head_dim` from config.json when it is there (required once heads have been removed, since
//! `hidden / heads` is then wrong) and `hidden / heads` otherwise.
//!
//! Grouped-query attention never repeats K/V: the query heads that share a KV head are stacked
//! along the rows of one matrix (`[kv_heads, group · T, head_dim]`), one batched matmul per KV
//! head, exactly the sharing `repeat_kv` expresses in transformers.

mod grad;
pub mod logprobs;
pub(crate) mod ops;
mod train;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use espalier_kernels::team;
use serde_json::Value;

use crate::config::{Architecture, ModelConfig};
use crate::error::EngineError;
use crate::linear::{Linear, LinearKernel, LinearWeight};
use crate::model::Model;

pub use grad::{Distillation, GradientStats, LossGradients};
pub use logprobs::TokenLogprob;
pub(crate) use ops::with_f32;
use ops::{Activation, RopeTable};
pub use train::{Precision, TrainingPass};

/// Rows of the LM head computed at once when only losses are needed: bounds the logits held in
/// memory (128 × 49152 f32 = 24 MiB for SmolLM2) while keeping the matmul large.
const LM_HEAD_CHUNK: usize = 128;

/// Query rows per attention block: small enough that one block's scores (`heads · 128 · keys`
/// f32) stay under glibc's mmap threshold and get reused, large enough for an efficient matmul.
const QUERY_BLOCK: usize = 128;

/// Sees the input of every linear layer during a forward pass, in execution order; the hook for
/// calibration statistics (e.g. Wanda's per-column activation norms).
pub trait LinearObserver {
    /// Called with the layer and its input `[tokens, in_features]` before the product.
    fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError>;
}

#[derive(Debug, Clone)]
enum Norm {
    Rms {
        weight: Vec<f32>,
        eps: f64,
    },
    Layer {
        weight: Vec<f32>,
        bias: Vec<f32>,
        eps: f64,
    },
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        match self {
            Norm::Rms { weight, eps } => ops::rms_norm(x, weight, *eps),
            Norm::Layer { weight, bias, eps } => ops::layer_norm(x, weight, bias, *eps),
        }
    }
}

#[derive(Debug, Clone)]
enum QkvProj {
    /// LLaMA: separate projections.
    Split { q: Linear, k: Linear, v: Linear },
    /// GPT-2: one fused projection whose rows are q, then k, then v.
    Fused(Linear),
}

#[derive(Debug, Clone)]
enum Mlp {
    /// `down(silu(gate(x)) · up(x))`.
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// `down(act(up(x)))`.
    Plain {
        up: Linear,
        down: Linear,
        act: Activation,
    },
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Norm,
    qkv: QkvProj,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    mlp_norm: Norm,
    mlp: Mlp,
}

/// What a [`KvCache`] stores its keys and values as (the session's [`Session::set_kv_dtype`]).
///
/// The attention arithmetic is f32 either way; f16 halves the cache's memory and the bytes
/// every decode step reads from it (llama.cpp's default cache type, and vLLM's `auto` for a
/// 16-bit model), at a rounding of each cached value to 11 significant bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Exact: decoding with the cache computes what the uncached forward pass does.
    #[default]
    F32,
    /// Half precision; a key or value beyond ±65504 is refused rather than stored as infinity.
    F16,
}

impl KvDtype {
    /// Bytes of one cached value.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    fn candle(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        }
    }

    /// A setting as users write it (`--kv-cache`, the daemon's `kv_cache`): `auto` (`None`:
    /// the session's [`Session::auto_kv_dtype`]), `f16` or `f32`.
    pub fn parse_setting(s: &str) -> Result<Option<KvDtype>, String> {
        match s {
            "auto" => Ok(None),
            other => other
                .parse()
                .map(Some)
                .map_err(|_| format!("`{other}` is not a KV cache type: use auto, f32 or f16")),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        })
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(format!("`{other}` is not a KV cache type: use f32 or f16")),
        }
    }
}

/// The per-layer keys and values of the tokens seen so far, for incremental decoding.
///
/// Buffers are preallocated and grow by doubling, so appending one token copies only that
/// token's keys and values. A cache belongs to the [`Session`] that filled it, and stores its
/// values as that session's [`KvDtype`].
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Positions every layer's buffer holds from its first allocation (see
    /// [`KvCache::with_capacity`]).
    reserved: usize,
}

#[derive(Debug)]
struct LayerKv {
    /// `[kv_heads, capacity, head_dim]`; positions `0..len` are valid.
    k: Tensor,
    v: Tensor,
    capacity: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache whose buffers hold `tokens` positions from the start, so a sequence
    /// that stays within them never grows (its memory is known when it is admitted).
    pub fn with_capacity(tokens: usize) -> Self {
        KvCache {
            reserved: tokens,
            ..Self::default()
        }
    }

    /// Bytes of the key and value buffers allocated so far.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Number of tokens cached (the position the next token gets).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward pass.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every token (keeps the buffers for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The whole key and value buffers of `layer` (`[kv_heads, capacity, head_dim]`, contiguous)
    /// and their capacity; positions past those appended hold zeros or stale values.
    fn layer_buffers(&self, layer: usize) -> Option<(&Tensor, &Tensor, usize)> {
        self.layers
            .get(layer)?
            .as_ref()
            .map(|e| (&e.k, &e.v, e.capacity))
    }

    /// Writes `k`, `v` (`[kv_heads, t, head_dim]`, f32) at position `self.len` of `layer`,
    /// stored as `dtype` (the caller then advances `len` past them).
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        dtype: KvDtype,
    ) -> Result<(), EngineError> {
        let (kv_heads, t, head_dim) = k.dims3()?;
        let (k, v) = if dtype == KvDtype::F16 {
            (to_f16(k, layer, "key")?, to_f16(v, layer, "value")?)
        } else {
            (k.clone(), v.clone())
        };
        let start = self.len;
        let needed = start + t;
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let slot = &mut self.layers[layer];
        if let Some(entry) = slot.as_ref()
            && (entry.k.dims() != [kv_heads, entry.capacity, head_dim]
                || entry.k.dtype() != dtype.candle())
        {
            return Err(EngineError::Input(format!(
                "KV cache of layer {layer} holds {:?} {:?}, this session needs [{kv_heads}, _, {head_dim}] {dtype}: \
                 a cache belongs to the session that filled it",
                entry.k.dims(),
                entry.k.dtype()
            )));
        }
        let grow = slot.as_ref().is_none_or(|e| e.capacity < needed);
        if grow {
            let capacity = needed
                .max(slot.as_ref().map_or(0, |e| 2 * e.capacity))
                .max(self.reserved)
                .max(16);
            let k_new = Tensor::zeros((kv_heads, capacity, head_dim), k.dtype(), &Device::Cpu)?;
            let v_new = Tensor::zeros((kv_heads, capacity, head_dim), v.dtype(), &Device::Cpu)?;
            if let Some(old) = slot.as_ref()
                && start > 0
            {
                k_new.slice_set(&old.k.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
                v_new.slice_set(&old.v.narrow(1, 0, start)?.contiguous()?, 1, 0)?;
            }
            *slot = Some(LayerKv {
                k: k_new,
                v: v_new,
                capacity,
            });
        }
        let entry = slot
            .as_ref()
            .ok_or_else(|| EngineError::Input("internal: KV cache slot empty".into()))?;
        entry.k.slice_set(&k.contiguous()?, 1, start)?;
        entry.v.slice_set(&v.contiguous()?, 1, start)?;
        Ok(())
    }

    /// The first `visible` keys and values of `layer` (`[kv_heads, visible, head_dim]`) as f32,
    /// for the prefill's matmuls: views of the buffers when they are f32, widened copies when
    /// not.
    fn visible_f32(&self, layer: usize, visible: usize) -> Result<(Tensor, Tensor), EngineError> {
        let (k, v, _) = self
            .layer_buffers(layer)
            .ok_or_else(|| EngineError::Input("internal: KV cache layer missing".into()))?;
        let (k, v) = (k.narrow(1, 0, visible)?, v.narrow(1, 0, visible)?);
        Ok((k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?))
    }
}

/// `x` (f32) rounded to f16, or an error naming the layer when a value is beyond f16's range
/// (it would be cached as infinity and turn that sequence's attention into NaN).
fn to_f16(x: &Tensor, layer: usize, what: &str) -> Result<Tensor, EngineError> {
    let largest = ops::with_f32(x, |xs| Ok(xs.iter().fold(0f32, |m, v| m.max(v.abs()))))?;
    if largest > f32::from(half::f16::MAX) || largest.is_nan() {
        return Err(EngineError::Input(format!(
            "a {what} of layer {layer} is {largest}, beyond the f16 KV cache's range (65504): \
             use an f32 KV cache for this model (kv_cache = \"f32\", or --kv-cache f32)"
        )));
    }
    Ok(x.to_dtype(DType::F16)?)
}

/// A model ready to run: blocks of [`Linear`] layers, norms and embeddings.
#[derive(Debug, Clone)]
pub struct Session {
    config: ModelConfig,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Norm,
    lm_head: Linear,
    head_dim: usize,
    rope_theta: Option<f64>,
    /// GPT-2's `scale_attn_by_inverse_layer_idx`: scores also divided by `layer + 1`.
    attn_scale_by_layer: bool,
    /// GPT-2's `scale_attn_weights` (scores divided by `sqrt(head_dim)`); always on for LLaMA.
    scale_attn: bool,
    /// What the KV caches this session fills store.
    kv_dtype: KvDtype,
}

fn tensor<'a>(model: &'a Model, name: &str) -> Result<&'a Tensor, EngineError> {
    model.weight(name).ok_or_else(|| EngineError::Weights {
        path: model.source.clone(),
        message: format!("missing tensor `{name}` needed by the forward pass"),
    })
}

fn vector(model: &Model, name: &str) -> Result<Vec<f32>, EngineError> {
    Ok(tensor(model, name)?.flatten_all()?.to_vec1()?)
}

/// A linear layer from `NAME.weight` and, when the checkpoint has one, `NAME.bias`: on the
/// packed weight when the model is a packed checkpoint that stores this layer packed.
fn linear(model: &Model, prefix: &str) -> Result<Linear, EngineError> {
    let name = format!("{prefix}.weight");
    let bias = model.weight(&format!("{prefix}.bias")).cloned();
    weight_linear(model, name, bias)
}

/// The linear layer of weight `name`: packed when the model stores it packed, else dense.
fn weight_linear(model: &Model, name: String, bias: Option<Tensor>) -> Result<Linear, EngineError> {
    match model.packed_layers().get(&name) {
        Some(kernel) => Linear::with_kernel(name, kernel.clone(), bias),
        None => Linear::dense(name.clone(), tensor(model, &name)?.clone(), bias),
    }
}

fn config_err(model: &Model, message: String) -> EngineError {
    EngineError::Config {
        path: model.source.clone(),
        message,
    }
}

impl Session {
    /// Prepares `model` for inference. Fails on tensors or settings the forward pass does not
    /// support (naming the tensor or config field) rather than computing something else.
    pub fn new(model: &Model) -> Result<Self, EngineError> {
        match model.config.arch {
            Architecture::Llama => Self::llama(model),
            Architecture::Gpt2 => Self::gpt2(model),
        }
    }

    fn llama(model: &Model) -> Result<Self, EngineError> {
        let c = &model.config;
        let act = c
            .raw
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(config_err(
                model,
                format!(
                    "hidden_act `{act}` is not supported: the LLaMA forward pass implements SwiGLU (silu)"
                ),
            ));
        }
        // transformers 5 writes `rope_parameters: {rope_theta, rope_type}` instead of the
        // top-level `rope_theta` (and `rope_scaling`) of earlier versions; accept both.
        let rope_params = c.raw.get("rope_parameters").filter(|v| v.is_object());
        for scaling in [c.raw.get("rope_scaling"), rope_params]
            .into_iter()
            .flatten()
            .filter(|v| !v.is_null())
        {
            let kind = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            if kind != "default" {
                return Err(config_err(
                    model,
                    format!(
                        "RoPE of type `{kind}` is not supported (only unscaled, `default` RoPE)"
                    ),
                ));
            }
        }
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(c.rope_theta);
        if !c.head_dim.is_multiple_of(2) {
            return Err(config_err(
                model,
                format!("head_dim {} must be even for RoPE", c.head_dim),
            ));
        }
        let rms = |name: &str| -> Result<Norm, EngineError> {
            Ok(Norm::Rms {
                weight: vector(model, name)?,
                eps: c.norm_eps,
            })
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for b in 0..c.num_layers {
            let p = format!("model.layers.{b}");
            let q = linear(model, &format!("{p}.self_attn.q_proj"))?;
            let k = linear(model, &format!("{p}.self_attn.k_proj"))?;
            let v = linear(model, &format!("{p}.self_attn.v_proj"))?;
            let (heads, kv_heads) = Self::head_counts(model, &q, &k, &v, c.head_dim)?;
            blocks.push(Block {
                attn_norm: rms(&format!("{p}.input_layernorm.weight"))?,
                qkv: QkvProj::Split { q, k, v },
                o: linear(model, &format!("{p}.self_attn.o_proj"))?,
                heads,
                kv_heads,
                mlp_norm: rms(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp::Gated {
                    gate: linear(model, &format!("{p}.mlp.gate_proj"))?,
                    up: linear(model, &format!("{p}.mlp.up_proj"))?,
                    down: linear(model, &format!("{p}.mlp.down_proj"))?,
                },
            });
        }
        let embed = tensor(model, "model.embed_tokens.weight")?.clone();
        let lm_head = if c.tie_word_embeddings {
            weight_linear(model, "model.embed_tokens.weight".into(), None)?
        } else {
            linear(model, "lm_head")?
        };
        Ok(Session {
            config: c.clone(),
            embed,
            pos_embed: None,
            blocks,
            final_norm: rms("model.norm.weight")?,
            lm_head,
            head_dim: c.head_dim,
            rope_theta: Some(rope_theta),
            attn_scale_by_layer: false,
            scale_attn: true,
            kv_dtype: KvDtype::F32,
        })
    }

    fn gpt2(model: &Model) -> Result<Self, EngineError> {
        let c = &model.config;
        let p0 = model.gpt2_prefix();
        let act_name = c
            .raw
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        let act = Activation::from_name(act_name).ok_or_else(|| {
            config_err(
                model,
                format!("activation_function `{act_name}` is not supported (gelu_new, gelu, relu, silu are)"),
            )
        })?;
        // After head removal the config carries an explicit head_dim; GPT-2 configs otherwise
        // have none and the width is n_embd / n_head.
        let head_dim = match c.raw.get("head_dim").and_then(Value::as_u64) {
            Some(d) if d > 0 => d as usize,
            _ => c.head_dim,
        };
        let flag =
            |key: &str, default: bool| c.raw.get(key).and_then(Value::as_bool).unwrap_or(default);
        let ln = |name: &str| -> Result<Norm, EngineError> {
            Ok(Norm::Layer {
                weight: vector(model, &format!("{name}.weight"))?,
                bias: vector(model, &format!("{name}.bias"))?,
                eps: c.norm_eps,
            })
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for b in 0..c.num_layers {
            let p = format!("{p0}h.{b}");
            let qkv = linear(model, &format!("{p}.attn.c_attn"))?;
            let o = linear(model, &format!("{p}.attn.c_proj"))?;
            // c_proj's input is the concatenated heads, so it fixes the number of heads.
            let q_width = o.in_features();
            if q_width % head_dim != 0 || qkv.out_features() != 3 * q_width {
                return Err(config_err(
                    model,
                    format!(
                        "block {b}: c_attn has {} outputs and c_proj {} inputs, not 3 · heads · head_dim with head_dim {head_dim}",
                        qkv.out_features(),
                        q_width
                    ),
                ));
            }
            let heads = q_width / head_dim;
            blocks.push(Block {
                attn_norm: ln(&format!("{p}.ln_1"))?,
                qkv: QkvProj::Fused(qkv),
                o,
                heads,
                kv_heads: heads,
                mlp_norm: ln(&format!("{p}.ln_2"))?,
                mlp: Mlp::Plain {
                    up: linear(model, &format!("{p}.mlp.c_fc"))?,
                    down: linear(model, &format!("{p}.mlp.c_proj"))?,
                    act,
                },
            });
        }
        let embed = tensor(model, &format!("{p0}wte.weight"))?.clone();
        let untied = model.weight("lm_head.weight").is_some()
            || model.packed_layers().contains_key("lm_head.weight");
        let lm_head = if untied && !c.tie_word_embeddings {
            weight_linear(model, "lm_head.weight".into(), None)?
        } else {
            weight_linear(model, format!("{p0}wte.weight"), None)?
        };
        Ok(Session {
            config: c.clone(),
            embed,
            pos_embed: Some(tensor(model, &format!("{p0}wpe.weight"))?.clone()),
            blocks,
            final_norm: ln(&format!("{p0}ln_f"))?,
            lm_head,
            head_dim,
            rope_theta: None,
            attn_scale_by_layer: flag("scale_attn_by_inverse_layer_idx", false),
            scale_attn: flag("scale_attn_weights", true),
            kv_dtype: KvDtype::F32,
        })
    }

    /// Query and KV head counts of one block, from the projection shapes.
    fn head_counts(
        model: &Model,
        q: &Linear,
        k: &Linear,
        v: &Linear,
        head_dim: usize,
    ) -> Result<(usize, usize), EngineError> {
        let (qw, kw, vw) = (q.out_features(), k.out_features(), v.out_features());
        let heads = qw / head_dim;
        let kv_heads = kw / head_dim;
        if qw % head_dim != 0
            || kw % head_dim != 0
            || kw != vw
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
        {
            return Err(config_err(
                model,
                format!(
                    "`{}` has {qw} outputs, `{}` {kw}, `{}` {vw}: not whole heads of head_dim {head_dim} \
                     with query heads a multiple of KV heads (set head_dim in config.json after removing heads)",
                    q.name(),
                    k.name(),
                    v.name()
                ),
            ));
        }
        Ok((heads, kv_heads))
    }

    /// The config of the model this session runs.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of transformer blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Number of rows of the LM head (logit width).
    pub fn vocab_size(&self) -> usize {
        self.lm_head.out_features()
    }

    /// Longest sequence the position encoding supports: GPT-2's learned table has a hard
    /// limit; RoPE has none, so for the LLaMA family this is `usize::MAX`.
    pub fn max_positions(&self) -> usize {
        self.pos_embed.as_ref().map_or(usize::MAX, |p| p.dims()[0])
    }

    /// What this session's KV caches store (f32 unless set).
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Sets what the KV caches this session fills from now on store (a cache already filled
    /// keeps its type, and the session refuses to append to it).
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) {
        self.kv_dtype = dtype;
    }

    /// The KV cache type that fits this session's weights, as vLLM's `auto` takes the model's
    /// dtype: f16 when every block's linears store bf16 or int8 values (in any format), f32
    /// when any stores f32, so an f32 model's decoding stays exact.
    pub fn auto_kv_dtype(&self) -> KvDtype {
        let wide = self.block_linears().iter().any(|l| match l.weight() {
            LinearWeight::Dense(w) => w.dtype() == DType::F32,
            LinearWeight::Kernel(k) => k
                .packed()
                .is_none_or(|p| p.dtype() == espalier_kernels::Dtype::F32),
        });
        if wide { KvDtype::F32 } else { KvDtype::F16 }
    }

    /// Bytes one token takes in a [`KvCache`] of this session (keys and values of every block,
    /// in its [`KvDtype`]): what a sequence of `n` tokens reserves with
    /// [`KvCache::with_capacity`] is `n` times this (at least 16 positions).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| 2 * b.kv_heads * self.head_dim * self.kv_dtype.size())
            .sum()
    }

    /// Every linear layer of the blocks, in execution order (the LM head excluded).
    pub fn block_linears(&self) -> Vec<&Linear> {
        let mut all = self.linears();
        all.pop();
        all
    }

    /// Bytes of weights one decode step reads: every linear layer (the LM head included, once
    /// even when it shares the embedding table); the embedding lookup reads one row and the
    /// norms are negligible. Bytes ÷ ms per token is the bandwidth a decode step reaches.
    pub fn weight_bytes_per_token(&self) -> usize {
        self.linears().iter().map(|l| l.weight_bytes()).sum()
    }

    /// Every linear layer, blocks in order, then the LM head.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut out = Vec::new();
        for b in &self.blocks {
            match &b.qkv {
                QkvProj::Split { q, k, v } => out.extend([q, k, v]),
                QkvProj::Fused(qkv) => out.push(qkv),
            }
            out.push(&b.o);
            match &b.mlp {
                Mlp::Gated { gate, up, down } => out.extend([gate, up, down]),
                Mlp::Plain { up, down, .. } => out.extend([up, down]),
            }
        }
        out.push(&self.lm_head);
        out
    }

    /// The linear layer whose weight has this name, to swap its kernel.
    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        if self.lm_head.name() == name {
            return Some(&mut self.lm_head);
        }
        self.blocks.iter_mut().find_map(|b| {
            let mut all: Vec<&mut Linear> = Vec::with_capacity(7);
            match &mut b.qkv {
                QkvProj::Split { q, k, v } => all.extend([q, k, v]),
                QkvProj::Fused(qkv) => all.push(qkv),
            }
            all.push(&mut b.o);
            match &mut b.mlp {
                Mlp::Gated { gate, up, down } => all.extend([gate, up, down]),
                Mlp::Plain { up, down, .. } => all.extend([up, down]),
            }
            all.into_iter().find(|l| l.name() == name)
        })
    }

    /// Points the layer `name` at another kernel (e.g. a sparse one).
    pub fn set_kernel(
        &mut self,
        name: &str,
        kernel: Arc<dyn LinearKernel>,
    ) -> Result<(), EngineError> {
        self.linear_mut(name)
            .ok_or_else(|| EngineError::Tensor {
                name: name.to_string(),
                message: "no linear layer of this name in the forward pass".into(),
            })?
            .set_kernel(kernel)
    }

    /// Logits `[T, vocab]` for `tokens`. With a cache the tokens continue the cached sequence
    /// (their positions start at `cache.len()`) and are appended to it; without, they start at
    /// position 0.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, EngineError> {
        on_pool_team(tokens.len(), || {
            let hidden = self.hidden_states(tokens, cache, None)?;
            self.lm_head.forward(&hidden)
        })
    }

    /// Logits `[vocab]` of the last token only: what generation needs, without the LM head
    /// over the whole prompt.
    pub fn forward_last(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, EngineError> {
        on_pool_team(tokens.len(), || {
            let hidden = self.hidden_states(tokens, cache, None)?;
            let last = hidden.narrow(0, hidden.dims()[0] - 1, 1)?;
            Ok(self.lm_head.forward(&last)?.squeeze(0)?)
        })
    }

    /// The greedy next token after `tokens` (appended to `cache` when given).
    pub fn next_token(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
    ) -> Result<u32, EngineError> {
        ops::argmax(&self.forward_last(tokens, cache)?)
    }

    /// One decode step for several sequences at once: `tokens[i]` continues the sequence cached
    /// in `caches[i]` (at its own position, appended to it). Returns the logits `[B, vocab]`.
    ///
    /// Every linear runs once over the `[B, hidden]` activations (the kernels' GEMM path: one
    /// pass over the weights for the whole batch); norms, RoPE and attention are per row, each
    /// sequence attending over its own cache exactly as [`Session::forward`] does for one token.
    /// With one sequence this is the same computation as `forward(&[token], Some(cache))`.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, EngineError> {
        let chunks: Vec<&[u32]> = tokens.iter().map(std::slice::from_ref).collect();
        self.forward_ragged(&chunks, caches)
    }

    /// One forward pass over several sequences' new tokens at once: `chunks[i]` (a whole
    /// prompt, or the one token of a decode step) continues the sequence cached in `caches[i]`
    /// and is appended to it. Returns the logits `[B, vocab]` of each chunk's last token.
    ///
    /// The chunks' rows are stacked into one `[Σ len, hidden]` activation, so every linear
    /// reads its weights once for all of them: prompts that arrive together are prefilled in
    /// one pass, and prompts can join a running batch's decode step (as vLLM's mixed prefill
    /// does). Attention stays per sequence, each over its own cache, exactly as
    /// [`Session::forward`] computes it; the LM head runs on the last rows only. With one chunk
    /// this is `forward_last(chunk, Some(cache))` (the linears may pick another kernel for the
    /// larger row count, whose sums can differ in the last bits).
    pub fn forward_ragged(
        &self,
        chunks: &[&[u32]],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, EngineError> {
        let total = chunks.iter().map(|c| c.len()).sum();
        let none = vec![None; chunks.len()];
        on_pool_team(total, || {
            Ok(self.forward_ragged_on_pool(chunks, caches, &none)?.0)
        })
    }

    /// [`Session::forward_ragged`] that also scores the chunks with `score[i] = Some(top)`:
    /// for each of their tokens after the first, its log-probability given the tokens before
    /// it and the `top` most likely tokens at its place (the second result, one list of
    /// `len - 1` entries per chunk, empty where `score[i]` is `None`). This is the OpenAI
    /// API's `echo` with `logprobs`: a prompt scored in the pass that prefills it. The LM head
    /// runs over the scored rows in chunks of `LM_HEAD_CHUNK` (128), so a long prompt never holds
    /// all its logits at once.
    pub fn forward_ragged_scored(
        &self,
        chunks: &[&[u32]],
        caches: &mut [&mut KvCache],
        score: &[Option<usize>],
    ) -> Result<(Tensor, Vec<Vec<TokenLogprob>>), EngineError> {
        if score.len() != chunks.len() {
            return Err(EngineError::Input(format!(
                "{} chunks but {} scoring settings",
                chunks.len(),
                score.len()
            )));
        }
        let total = chunks.iter().map(|c| c.len()).sum();
        on_pool_team(total, || self.forward_ragged_on_pool(chunks, caches, score))
    }

    fn forward_ragged_on_pool(
        &self,
        chunks: &[&[u32]],
        caches: &mut [&mut KvCache],
        score: &[Option<usize>],
    ) -> Result<(Tensor, Vec<Vec<TokenLogprob>>), EngineError> {
        let b = chunks.len();
        if b == 0 || caches.len() != b {
            return Err(EngineError::Input(format!(
                "a batched forward pass needs one cache per sequence, got {b} sequences and {} caches",
                caches.len()
            )));
        }
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        for (chunk, &start) in chunks.iter().zip(&starts) {
            self.check_tokens(chunk, start)?;
        }
        let lens: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let total: usize = lens.iter().sum();
        let all: Vec<u32> = chunks.concat();
        let ids = Tensor::from_vec(all, total, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(pos) = &self.pos_embed {
            let at: Vec<u32> = starts
                .iter()
                .zip(&lens)
                .flat_map(|(&s, &n)| (s..s + n).map(|p| p as u32))
                .collect();
            let at = Tensor::from_vec(at, total, &Device::Cpu)?;
            x = ops::add(&x, &pos.index_select(&at, 0)?)?;
        }
        let ropes: Vec<Option<RopeTable>> = starts
            .iter()
            .zip(&lens)
            .map(|(&s, &n)| {
                self.rope_theta
                    .map(|theta| RopeTable::new(self.head_dim, theta, s, n))
            })
            .collect();
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0, |at, &n| {
                let o = *at;
                *at += n;
                Some(o)
            })
            .collect();
        for layer in 0..self.blocks.len() {
            let block = &self.blocks[layer];
            let h = block.attn_norm.forward(&x)?;
            let (q, k, v) = self.qkv(block, &h, &mut None)?;
            let (heads, d) = (block.heads, self.head_dim);
            let mut ctx = vec![0f32; total * heads * d];
            // Each sequence attends over its own cache: independent work, spread over the
            // pool when there are several (with one, a parallel region would only cost).
            let attend = |i: usize, cache: &mut KvCache, out: &mut [f32]| {
                let (at, n, rope) = (offsets[i], lens[i], ropes[i].as_ref());
                let qi = ops::split_heads(&q.narrow(0, at, n)?, heads, d, rope)?;
                let ki = ops::split_heads(&k.narrow(0, at, n)?, block.kv_heads, d, rope)?;
                let vi = ops::split_heads(&v.narrow(0, at, n)?, block.kv_heads, d, None)?;
                cache.append(layer, &ki, &vi, self.kv_dtype)?;
                if n == 1 {
                    self.attend_cached_one(block, layer, &qi, cache, starts[i] + 1, out)
                } else {
                    let (kc, vc) = cache.visible_f32(layer, starts[i] + n)?;
                    self.attend(block, layer, &qi, &kc, &vc, starts[i], out)
                }
            };
            let mut outs: Vec<&mut [f32]> = Vec::with_capacity(b);
            let mut rest = ctx.as_mut_slice();
            for &n in &lens {
                let (head, tail) = rest.split_at_mut(n * heads * d);
                outs.push(head);
                rest = tail;
            }
            if b == 1 {
                attend(0, caches[0], outs[0])?;
            } else {
                let mut work: Vec<(&mut &mut KvCache, &mut [f32])> =
                    caches.iter_mut().zip(outs).collect();
                let failed = std::sync::Mutex::new(None);
                team::for_each_mut(&mut work, |i, (cache, out)| {
                    if let Err(e) = attend(i, cache, out)
                        && let Ok(mut first) = failed.lock()
                    {
                        first.get_or_insert(e);
                    }
                });
                if let Some(e) = failed.into_inner().ok().flatten() {
                    return Err(e);
                }
            }
            let ctx = Tensor::from_vec(ctx, (total, heads * d), &Device::Cpu)?;
            let x1 = ops::add(&x, &block.o.forward(&ctx)?)?;
            let h = block.mlp_norm.forward(&x1)?;
            x = ops::add(&x1, &self.mlp(block, &h, &mut None)?)?;
        }
        for ((cache, start), n) in caches.iter_mut().zip(starts).zip(&lens) {
            cache.len = start + n;
        }
        let mut scores = Vec::with_capacity(b);
        for ((chunk, &at), top) in chunks.iter().zip(&offsets).zip(score) {
            scores.push(match top {
                Some(top) => self.score_rows(&x, at, &chunk[1..], *top)?,
                None => Vec::new(),
            });
        }
        if total > b {
            let last: Vec<u32> = offsets
                .iter()
                .zip(&lens)
                .map(|(&o, &n)| (o + n - 1) as u32)
                .collect();
            x = x.index_select(&Tensor::from_vec(last, b, &Device::Cpu)?, 0)?;
        }
        let hidden = self.final_norm.forward(&x)?;
        Ok((self.lm_head.forward(&hidden)?, scores))
    }

    /// Log-probabilities of `targets[j]` under the logits of row `first_row + j` of the last
    /// block's output `x` (before the final norm), with the `top` most likely tokens there.
    fn score_rows(
        &self,
        x: &Tensor,
        first_row: usize,
        targets: &[u32],
        top: usize,
    ) -> Result<Vec<TokenLogprob>, EngineError> {
        let mut out = Vec::with_capacity(targets.len());
        for (i, chunk) in targets.chunks(LM_HEAD_CHUNK).enumerate() {
            let rows = x.narrow(0, first_row + i * LM_HEAD_CHUNK, chunk.len())?;
            let logits = self
                .lm_head
                .forward(&self.final_norm.forward(&rows)?)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (row, &target) in logits.iter().zip(chunk) {
                if target as usize >= row.len() {
                    return Err(EngineError::Input(format!(
                        "token {target} is outside the vocabulary of {} entries",
                        row.len()
                    )));
                }
                out.push(logprobs::token_logprob(row, target, top));
            }
        }
        Ok(out)
    }

    /// Negative log-likelihood of each next token: entry `i` is `-log p(tokens[i+1] |
    /// tokens[..=i])`, so the result has `T - 1` entries.
    pub fn nll(&self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.len() < 2 {
            return Err(EngineError::Input(format!(
                "a loss needs at least 2 tokens, got {}",
                tokens.len()
            )));
        }
        let hidden = self.hidden_states(tokens, None, None)?;
        self.nll_rows(&hidden, 0, &tokens[1..])
    }

    /// Mean next-token loss over `tokens`, as transformers' `model(ids, labels=ids).loss`.
    pub fn loss(&self, tokens: &[u32]) -> Result<f32, EngineError> {
        let nll = self.nll(tokens)?;
        Ok((nll.iter().map(|&v| f64::from(v)).sum::<f64>() / nll.len() as f64) as f32)
    }

    /// NLL of `targets[j]` under the logits of hidden row `first_row + j`, computing the LM
    /// head in chunks so a long window never holds all its logits at once.
    pub(crate) fn nll_rows(
        &self,
        hidden: &Tensor,
        first_row: usize,
        targets: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        let mut out = Vec::with_capacity(targets.len());
        for (i, chunk) in targets.chunks(LM_HEAD_CHUNK).enumerate() {
            let rows = hidden.narrow(0, first_row + i * LM_HEAD_CHUNK, chunk.len())?;
            let logits = self.lm_head.forward(&rows)?;
            out.extend(ops::row_nll(&logits, chunk)?);
        }
        Ok(out)
    }

    /// Checks that `tokens` can continue a sequence at position `start`: at least one token,
    /// every id inside the embedding table, every position inside the position table. What
    /// every forward pass checks first; a scheduler checks a request with it before the
    /// request joins a batch, so one bad prompt cannot fail the step it would share.
    pub fn check_tokens(&self, tokens: &[u32], start: usize) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Input("no tokens to run".into()));
        }
        let vocab = self.embed.dims()[0];
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Input(format!(
                "token id {bad} is outside the model's vocabulary of {vocab} entries (does the tokenizer belong to this model?)"
            )));
        }
        let end = start + tokens.len();
        if end > self.max_positions() {
            return Err(EngineError::Input(format!(
                "positions up to {end} requested, but the model's position table has {} entries",
                self.max_positions()
            )));
        }
        Ok(())
    }

    /// Final hidden states `[T, hidden]` (after the last norm, before the LM head), calling
    /// `observer` with the input of every block linear.
    pub fn hidden_states(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
        observer: Option<&mut dyn LinearObserver>,
    ) -> Result<Tensor, EngineError> {
        match observer {
            // An observer need not be `Send`; observed passes are calibration, not latency.
            Some(o) => self.hidden_states_here(tokens, cache, Some(o)),
            None => on_pool_team(tokens.len(), || {
                self.hidden_states_here(tokens, cache, None)
            }),
        }
    }

    fn hidden_states_here(
        &self,
        tokens: &[u32],
        mut cache: Option<&mut KvCache>,
        mut observer: Option<&mut dyn LinearObserver>,
    ) -> Result<Tensor, EngineError> {
        let start = cache.as_ref().map_or(0, |c| c.len());
        self.check_tokens(tokens, start)?;
        let t = tokens.len();
        let ids = Tensor::from_slice(tokens, t, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        if let Some(pos) = &self.pos_embed {
            x = ops::add(&x, &pos.narrow(0, start, t)?)?;
        }
        let rope = self
            .rope_theta
            .map(|theta| RopeTable::new(self.head_dim, theta, start, t));
        for layer in 0..self.blocks.len() {
            x = self.block_forward(
                layer,
                &x,
                start,
                rope.as_ref(),
                cache.as_deref_mut(),
                &mut observer,
            )?;
        }
        if let Some(c) = cache {
            c.len = start + t;
        }
        self.final_norm.forward(&x)
    }

    /// One transformer block: `x + attn(norm(x))`, then `+ mlp(norm(·))`.
    fn block_forward(
        &self,
        layer: usize,
        x: &Tensor,
        start: usize,
        rope: Option<&RopeTable>,
        cache: Option<&mut KvCache>,
        observer: &mut Option<&mut dyn LinearObserver>,
    ) -> Result<Tensor, EngineError> {
        let block = &self.blocks[layer];
        let h = block.attn_norm.forward(x)?;
        let attn = self.attention(block, layer, &h, start, rope, cache, observer)?;
        let x = ops::add(x, &attn)?;
        let h = block.mlp_norm.forward(&x)?;
        let mlp = self.mlp(block, &h, observer)?;
        ops::add(&x, &mlp)
    }

    /// The block's MLP on its normed input `h`.
    fn mlp(
        &self,
        block: &Block,
        h: &Tensor,
        observer: &mut Option<&mut dyn LinearObserver>,
    ) -> Result<Tensor, EngineError> {
        match &block.mlp {
            Mlp::Gated { gate, up, down } => {
                let g = run(gate, h, observer)?;
                let u = run(up, h, observer)?;
                run(down, &ops::swiglu(&g, &u)?, observer)
            }
            Mlp::Plain { up, down, act } => {
                let u = act.apply(&run(up, h, observer)?)?;
                run(down, &u, observer)
            }
        }
    }

    /// The query, key and value projections `[T, heads · d]` of the normed input `h`.
    fn qkv(
        &self,
        block: &Block,
        h: &Tensor,
        observer: &mut Option<&mut dyn LinearObserver>,
    ) -> Result<(Tensor, Tensor, Tensor), EngineError> {
        Ok(match &block.qkv {
            QkvProj::Split { q, k, v } => (
                run(q, h, observer)?,
                run(k, h, observer)?,
                run(v, h, observer)?,
            ),
            QkvProj::Fused(qkv) => {
                let all = run(qkv, h, observer)?;
                let w = block.heads * self.head_dim;
                (
                    all.narrow(1, 0, w)?,
                    all.narrow(1, w, w)?,
                    all.narrow(1, 2 * w, w)?,
                )
            }
        })
    }

    /// The embedded input of `tokens` (positions from 0) and the hidden state entering every
    /// block after it: entry `b` is the input of block `b`, the last one the output of the last
    /// block (before the final norm). What [`Session::nll_from_block`] resumes from.
    pub fn block_inputs(&self, tokens: &[u32]) -> Result<Vec<Tensor>, EngineError> {
        let mut x = self.embed(tokens)?;
        let rope = self
            .rope_theta
            .map(|theta| RopeTable::new(self.head_dim, theta, 0, tokens.len()));
        let mut out = Vec::with_capacity(self.blocks.len() + 1);
        for layer in 0..self.blocks.len() {
            let next = self.block_forward(layer, &x, 0, rope.as_ref(), None, &mut None)?;
            out.push(x);
            x = next;
        }
        out.push(x);
        Ok(out)
    }

    /// The embedded input of `tokens` at positions from 0: the hidden state entering block 0.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, EngineError> {
        self.check_tokens(tokens, 0)?;
        let t = tokens.len();
        let ids = Tensor::from_slice(tokens, t, &Device::Cpu)?;
        let x = self.embed.index_select(&ids, 0)?;
        Ok(match &self.pos_embed {
            Some(pos) => ops::add(&x, &pos.narrow(0, 0, t)?)?,
            None => x,
        })
    }

    /// Block `layer` alone on `x`, the hidden state entering it (`[T, hidden]`, positions from
    /// 0, as [`Session::embed`] or an earlier call gives), calling `observer` with the input of
    /// each of its linears: what sequential calibration advances its hidden states with, one
    /// block at a time, bit-identical to the same block inside a whole forward pass.
    pub fn block_forward_from(
        &self,
        layer: usize,
        x: &Tensor,
        observer: Option<&mut dyn LinearObserver>,
    ) -> Result<Tensor, EngineError> {
        let rope = self.block_input_rope(layer, x)?;
        let mut observer = observer;
        self.block_forward(layer, x, 0, rope.as_ref(), None, &mut observer)
    }

    /// Checks that `x` can enter block `layer` on its own (`[T, hidden]`, T > 0, positions from
    /// 0) and returns the rotary table for its positions, if the model has one.
    fn block_input_rope(&self, layer: usize, x: &Tensor) -> Result<Option<RopeTable>, EngineError> {
        let (t, width) = x.dims2()?;
        if layer >= self.blocks.len() || width != self.embed.dims()[1] || t == 0 {
            return Err(EngineError::Input(format!(
                "cannot run block {layer} of {} on hidden states of shape {:?}",
                self.blocks.len(),
                x.dims()
            )));
        }
        Ok(self
            .rope_theta
            .map(|theta| RopeTable::new(self.head_dim, theta, 0, t)))
    }

    /// Shows `observer` the input of every linear of block `layer` run on `x` (as
    /// [`Session::block_forward_from`] would), without computing the block's output: the last
    /// product (the MLP's down projection, a quarter of a LLaMA block's work) and the residual
    /// add after it are skipped, since calibration statistics need only that product's input.
    pub fn observe_block(
        &self,
        layer: usize,
        x: &Tensor,
        observer: &mut dyn LinearObserver,
    ) -> Result<(), EngineError> {
        let rope = self.block_input_rope(layer, x)?;
        let block = &self.blocks[layer];
        let mut observer = Some(observer);
        let h = block.attn_norm.forward(x)?;
        let attn = self.attention(block, layer, &h, 0, rope.as_ref(), None, &mut observer)?;
        let x = ops::add(x, &attn)?;
        let h = block.mlp_norm.forward(&x)?;
        match &block.mlp {
            Mlp::Gated { gate, up, down } => {
                let g = run(gate, &h, &mut observer)?;
                let u = run(up, &h, &mut observer)?;
                show(&mut observer, down, &ops::swiglu(&g, &u)?)
            }
            Mlp::Plain { up, down, act } => {
                let u = act.apply(&run(up, &h, &mut observer)?)?;
                show(&mut observer, down, &u)
            }
        }
    }

    /// Next-token NLL of `tokens` (as [`Session::nll`]) resuming from `x`, the hidden state
    /// entering block `first` (from [`Session::block_inputs`] of the same tokens): blocks before
    /// `first` are not recomputed.
    pub fn nll_from_block(
        &self,
        first: usize,
        x: &Tensor,
        tokens: &[u32],
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.len() < 2 || x.dims()[0] != tokens.len() || first > self.blocks.len() {
            return Err(EngineError::Input(format!(
                "cannot resume block {first} of {} with {} hidden rows for {} tokens",
                self.blocks.len(),
                x.dims()[0],
                tokens.len()
            )));
        }
        let rope = self
            .rope_theta
            .map(|theta| RopeTable::new(self.head_dim, theta, 0, tokens.len()));
        let mut x = x.clone();
        for layer in first..self.blocks.len() {
            x = self.block_forward(layer, &x, 0, rope.as_ref(), None, &mut None)?;
        }
        let hidden = self.final_norm.forward(&x)?;
        self.nll_rows(&hidden, 0, &tokens[1..])
    }

    /// The index of the block holding the linear layer `name` (none for the LM head or a name
    /// that is not a linear of the forward pass).
    pub fn block_of(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| {
            let mut names: Vec<&str> = vec![b.o.name()];
            match &b.qkv {
                QkvProj::Split { q, k, v } => names.extend([q.name(), k.name(), v.name()]),
                QkvProj::Fused(qkv) => names.push(qkv.name()),
            }
            match &b.mlp {
                Mlp::Gated { gate, up, down } => {
                    names.extend([gate.name(), up.name(), down.name()])
                }
                Mlp::Plain { up, down, .. } => names.extend([up.name(), down.name()]),
            }
            names.contains(&name)
        })
    }

    /// The factor attention scores are multiplied by in block `layer`: 1/√head_dim (unless
    /// GPT-2's `scale_attn_weights` is off), and 1/(layer + 1) under GPT-2's
    /// `scale_attn_by_inverse_layer_idx`.
    fn attention_scale(&self, layer: usize) -> f64 {
        let mut scale = if self.scale_attn {
            1.0 / (self.head_dim as f64).sqrt()
        } else {
            1.0
        };
        if self.attn_scale_by_layer {
            scale /= (layer + 1) as f64;
        }
        scale
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        layer: usize,
        h: &Tensor,
        start: usize,
        rope: Option<&RopeTable>,
        cache: Option<&mut KvCache>,
        observer: &mut Option<&mut dyn LinearObserver>,
    ) -> Result<Tensor, EngineError> {
        let t = h.dims()[0];
        let d = self.head_dim;
        let (heads, kv_heads) = (block.heads, block.kv_heads);
        let (q, k, v) = self.qkv(block, h, observer)?;
        let q = ops::split_heads(&q, heads, d, rope)?;
        let k = ops::split_heads(&k, kv_heads, d, rope)?;
        let v = ops::split_heads(&v, kv_heads, d, None)?;
        let mut ctx = vec![0f32; t * heads * d];
        match cache {
            Some(c) if t == 1 => {
                c.append(layer, &k, &v, self.kv_dtype)?;
                self.attend_cached_one(block, layer, &q, c, start + 1, &mut ctx)?;
            }
            Some(c) => {
                c.append(layer, &k, &v, self.kv_dtype)?;
                let (k, v) = c.visible_f32(layer, start + t)?;
                self.attend(block, layer, &q, &k, &v, start, &mut ctx)?;
            }
            None => self.attend(block, layer, &q, &k, &v, start, &mut ctx)?,
        }
        let ctx = Tensor::from_vec(ctx, (t, heads * d), &Device::Cpu)?;
        run(&block.o, &ctx, observer)
    }

    /// Attention of one query token `q: [heads, 1, d]` over the first `visible` positions of
    /// `cache` (the token's own keys and values already appended), into `ctx: [heads · d]`.
    fn attend_cached_one(
        &self,
        block: &Block,
        layer: usize,
        q: &Tensor,
        cache: &KvCache,
        visible: usize,
        ctx: &mut [f32],
    ) -> Result<(), EngineError> {
        let (k, v, capacity) = cache
            .layer_buffers(layer)
            .ok_or_else(|| EngineError::Input("internal: KV cache layer missing".into()))?;
        let scale = self.attention_scale(layer) as f32;
        let (heads, kv_heads, d) = (block.heads, block.kv_heads, self.head_dim);
        with_f32(q, |qs| match k.dtype() {
            DType::F16 => ops::with_slice::<half::f16, _>(k, |ks| {
                ops::with_slice::<half::f16, _>(v, |vs| {
                    ops::attend_one(
                        qs, ks, vs, capacity, visible, heads, kv_heads, d, scale, ctx,
                    )
                })
            }),
            _ => with_f32(k, |ks| {
                with_f32(v, |vs| {
                    ops::attend_one(
                        qs, ks, vs, capacity, visible, heads, kv_heads, d, scale, ctx,
                    )
                })
            }),
        })
    }

    /// Causal attention of queries `q: [heads, T, d]` at positions `start..start + T` over
    /// keys and values `[kv_heads, start + T, d]`, written to `ctx` as rows `[T, heads · d]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        block: &Block,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        ctx: &mut [f32],
    ) -> Result<(), EngineError> {
        let t = q.dims()[1];
        let d = self.head_dim;
        let (heads, kv_heads) = (block.heads, block.kv_heads);
        let group = heads / kv_heads;
        let scale = self.attention_scale(layer) as f32;
        // Queries in blocks: each block only multiplies the keys it can see (half the
        // attention FLOPs of a long causal window) and its scores stay a few MiB.
        let mut b0 = 0;
        while b0 < t {
            let len = QUERY_BLOCK.min(t - b0);
            // [heads, T, d] with heads ordered by KV group is [kv_heads, group, T, d]; the
            // block's rows of one KV group stack into [kv_heads, group · len, d].
            let qb = if len == t {
                q.reshape((kv_heads, group * t, d))?
            } else {
                q.reshape((kv_heads, group, t, d))?
                    .narrow(2, b0, len)?
                    .contiguous()?
                    .reshape((kv_heads, group * len, d))?
            };
            let visible = start + b0 + len;
            let kb = k.narrow(1, 0, visible)?;
            let vb = v.narrow(1, 0, visible)?;
            let scores = qb.matmul(&kb.t()?)?;
            let probs = ops::causal_softmax(&scores, len, start + b0, scale)?;
            let out = probs.matmul(&vb)?;
            ops::merge_heads_into(&out, heads, len, d, &mut ctx[b0 * heads * d..])?;
            b0 += len;
        }
        Ok(())
    }
}

/// Runs `f` on a thread of rayon's pool, where it already is one, or else hands it to the pool
/// and waits: a forward pass opens a parallel region per linear (about 250 per decoded token
/// of SmolLM2), and opened from outside the pool each of them wakes a worker and then puts the
/// calling thread to sleep until the region is done. From a worker, the other workers are
/// still spinning between regions and steal the tasks at once. One handoff per call instead
/// of one per linear measured 8-12% faster decoding on 2 cores (`bench_forward`, three
/// alternating runs).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// [`on_pool`], with the pool's other threads spinning as a team for passes of at most
/// [`TEAM_MAX_TOKENS`] tokens (decode steps, short chunks): their ~211 parallel regions per
/// pass are a few µs to tens of µs each, so a wake-up per region is a large share of them,
/// while a team region costs a few atomic operations (see `espalier_kernels::team`). Longer
/// passes (prefill) keep rayon, whose regions are long and whose other parallel loops (norms,
/// attention over many rows) a team would run on one thread.
fn on_pool_team<R: Send>(tokens: usize, f: impl FnOnce() -> R + Send) -> R {
    if tokens <= TEAM_MAX_TOKENS {
        on_pool(|| team::with_team(f))
    } else {
        on_pool(f)
    }
}

/// The longest pass [`on_pool_team`] runs as a team.
const TEAM_MAX_TOKENS: usize = 32;

/// Runs one linear layer, showing its input to the observer first.
fn run(
    linear: &Linear,
    x: &Tensor,
    observer: &mut Option<&mut dyn LinearObserver>,
) -> Result<Tensor, EngineError> {
    show(observer, linear, x)?;
    linear.forward(x)
}

/// Shows the input `x` of `linear` to the observer, if there is one.
fn show(
    observer: &mut Option<&mut dyn LinearObserver>,
    linear: &Linear,
    x: &Tensor,
) -> Result<(), EngineError> {
    match observer.as_deref_mut() {
        Some(obs) => obs.observe(linear, x),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin_model;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn cached_decoding_equals_full_forward_on_builtins() {
        // 300 tokens span three query blocks of the full forward; GPT-2's table has 128.
        for (name, n) in [("tiny-llama", 300u32), ("tiny-gpt2", 100)] {
            let model = builtin_model(name).unwrap();
            let s = Session::new(&model).unwrap();
            let tokens: Vec<u32> = (0..n).map(|i| (i * 37 + 5) % 256).collect();
            let full = s.forward(&tokens, None).unwrap();
            let mut cache = KvCache::new();
            // A prompt of 7, then one token at a time (the cache grows past 16 on the way).
            let mut rows = vec![s.forward(&tokens[..7], Some(&mut cache)).unwrap()];
            for &tok in &tokens[7..] {
                rows.push(s.forward(&[tok], Some(&mut cache)).unwrap());
            }
            assert_eq!(cache.len(), n as usize);
            let inc = Tensor::cat(&rows, 0).unwrap();
            let diff = max_diff(&full, &inc);
            assert!(diff < 1e-4, "{name}: {diff}");
            let loss = s.loss(&tokens).unwrap();
            assert!(loss.is_finite() && loss > 0.0);
        }
    }

    /// Deterministic prompts of the given lengths (byte-vocabulary ids): token `i` of prompt
    /// `p` is `(i · stride + p · shift + 1) mod 256`.
    fn mixed_prompts(lens: &[usize], stride: u32, shift: u32) -> Vec<Vec<u32>> {
        lens.iter()
            .zip(0u32..)
            .map(|(&n, p)| {
                (0..n as u32)
                    .map(|i| (i * stride + p * shift + 1) % 256)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn batched_decoding_equals_decoding_each_sequence_alone() {
        for (name, kv) in [
            ("tiny-llama", KvDtype::F32),
            ("tiny-gpt2", KvDtype::F32),
            ("tiny-llama", KvDtype::F16),
        ] {
            let model = builtin_model(name).unwrap();
            let mut s = Session::new(&model).unwrap();
            s.set_kv_dtype(kv);
            let name = format!("{name} ({kv} cache)");
            // Prompts of mixed lengths, so every row of a step sits at another position.
            let prompts = mixed_prompts(&[3, 11, 1, 6], 53, 7);
            let steps = 12;
            // Alone: the single-sequence path (`forward` with a cache), greedy.
            let mut alone_tokens = Vec::new();
            let mut alone_logits = Vec::new();
            for prompt in &prompts {
                let mut cache = KvCache::new();
                let mut next = s.next_token(prompt, Some(&mut cache)).unwrap();
                let mut toks = vec![next];
                let mut rows = Vec::new();
                for _ in 0..steps {
                    let logits = s.forward(&[next], Some(&mut cache)).unwrap();
                    next = ops::argmax(&logits.squeeze(0).unwrap()).unwrap();
                    rows.push(logits);
                    toks.push(next);
                }
                alone_tokens.push(toks);
                alone_logits.push(Tensor::cat(&rows, 0).unwrap());
            }
            // Batched: each prompt prefilled on its own, then one step for all; the second
            // sequence joins one step late, the third leaves two steps early.
            let mut caches: Vec<KvCache> =
                prompts.iter().map(|_| KvCache::with_capacity(40)).collect();
            let mut toks: Vec<Vec<u32>> = prompts
                .iter()
                .zip(caches.iter_mut())
                .map(|(p, c)| vec![s.next_token(p, Some(c)).unwrap()])
                .collect();
            let mut rows: Vec<Vec<Tensor>> = vec![Vec::new(); prompts.len()];
            for step in 0..2 * steps {
                let active: Vec<usize> = (0..prompts.len())
                    .filter(|&i| toks[i].len() <= if i == 2 { steps - 2 } else { steps })
                    .filter(|&i| !(i == 1 && step == 0))
                    .collect();
                if active.is_empty() {
                    break;
                }
                let input: Vec<u32> = active.iter().map(|&i| *toks[i].last().unwrap()).collect();
                let mut refs: Vec<&mut KvCache> = caches
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| active.contains(i))
                    .map(|(_, c)| c)
                    .collect();
                let logits = s.decode_batch(&input, &mut refs).unwrap();
                assert_eq!(logits.dims(), [active.len(), s.vocab_size()]);
                for (row, &i) in active.iter().enumerate() {
                    let l = logits.narrow(0, row, 1).unwrap();
                    toks[i].push(ops::argmax(&l.squeeze(0).unwrap()).unwrap());
                    rows[i].push(l);
                }
            }
            // The early leaver finishes alone afterwards.
            while toks[2].len() <= steps {
                let next = *toks[2].last().unwrap();
                let l = s.decode_batch(&[next], &mut [&mut caches[2]]).unwrap();
                toks[2].push(ops::argmax(&l.squeeze(0).unwrap()).unwrap());
                rows[2].push(l);
            }
            for i in 0..prompts.len() {
                assert_eq!(toks[i], alone_tokens[i], "{name} sequence {i}");
                assert_eq!(caches[i].len(), prompts[i].len() + steps);
                let diff = max_diff(&Tensor::cat(&rows[i], 0).unwrap(), &alone_logits[i]);
                assert!(diff < 1e-4, "{name} sequence {i}: {diff}");
            }
            // The reserved capacity is what the cache holds: nothing grew past it.
            assert_eq!(caches[0].bytes(), 40 * s.kv_bytes_per_token());
            // A batch of one is the single-sequence computation, bit for bit.
            let mut a = KvCache::new();
            let mut b = KvCache::new();
            s.forward(&prompts[1], Some(&mut a)).unwrap();
            s.forward(&prompts[1], Some(&mut b)).unwrap();
            let one = s.forward(&[9], Some(&mut a)).unwrap();
            let batched = s.decode_batch(&[9], &mut [&mut b]).unwrap();
            assert_eq!(max_diff(&one, &batched), 0.0, "{name}");
            assert!(s.decode_batch(&[1, 2], &mut [&mut a]).is_err());
        }
    }

    /// An f16 cache decodes what the f32 one does up to f16's rounding of the cached keys and
    /// values, in half the bytes; a session refuses a cache of the other type, and a key beyond
    /// f16's range is refused with the fix rather than cached as infinity.
    #[test]
    fn f16_cache_decodes_as_the_f32_cache_in_half_the_bytes() {
        let model = builtin_model("tiny-llama").unwrap();
        let mut s = Session::new(&model).unwrap();
        let prompt = &mixed_prompts(&[9], 53, 3)[0];
        let decode = |s: &Session| {
            let mut cache = KvCache::with_capacity(32);
            let mut logits = vec![s.forward(prompt, Some(&mut cache)).unwrap()];
            for t in [5, 17, 2, 40] {
                logits.push(s.forward(&[t], Some(&mut cache)).unwrap());
            }
            (Tensor::cat(&logits, 0).unwrap(), cache)
        };
        let (exact, f32_cache) = decode(&s);
        s.set_kv_dtype(KvDtype::F16);
        let (rounded, mut f16_cache) = decode(&s);
        let diff = max_diff(&exact, &rounded);
        assert!(diff > 0.0 && diff < 1e-2, "f16 against f32 cache: {diff}");
        assert_eq!(2 * f16_cache.bytes(), f32_cache.bytes());
        assert_eq!(f16_cache.bytes(), 32 * s.kv_bytes_per_token());
        let mut f32_cache = f32_cache;
        let err = s.forward(&[1], Some(&mut f32_cache)).unwrap_err();
        assert!(err.to_string().contains("belongs to the session"), "{err}");
        s.set_kv_dtype(KvDtype::F32);
        assert!(s.forward(&[1], Some(&mut f16_cache)).is_err());
        let far = Tensor::from_vec(vec![1.0f32, -7.0e4], (1, 1, 2), &Device::Cpu).unwrap();
        let err = to_f16(&far, 3, "key").unwrap_err().to_string();
        assert!(
            err.contains("layer 3") && err.contains("kv_cache = \"f32\""),
            "{err}"
        );
        assert_eq!("f16".parse::<KvDtype>(), Ok(KvDtype::F16));
        assert!(
            "bf16"
                .parse::<KvDtype>()
                .unwrap_err()
                .contains("f32 or f16")
        );
        assert_eq!(KvDtype::parse_setting("auto"), Ok(None));
        assert_eq!(KvDtype::parse_setting("f32"), Ok(Some(KvDtype::F32)));
        assert!(
            KvDtype::parse_setting("q8")
                .unwrap_err()
                .contains("auto, f32 or f16")
        );
    }

    #[test]
    fn ragged_passes_equal_each_sequence_alone() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let model = builtin_model(name).unwrap();
            let s = Session::new(&model).unwrap();
            let prompts = mixed_prompts(&[5, 1, 9, 2], 31, 11);
            let steps = 6;
            // Alone: prefill, then one token at a time.
            let mut alone: Vec<(Vec<u32>, Vec<Tensor>)> = Vec::new();
            for prompt in &prompts {
                let mut cache = KvCache::new();
                let first = s.forward_last(prompt, Some(&mut cache)).unwrap();
                let mut next = ops::argmax(&first).unwrap();
                let (mut toks, mut rows) = (vec![next], vec![first]);
                for _ in 0..steps {
                    let l = s.forward_last(&[next], Some(&mut cache)).unwrap();
                    next = ops::argmax(&l).unwrap();
                    toks.push(next);
                    rows.push(l);
                }
                alone.push((toks, rows));
            }
            // Ragged: sequences 0 and 1 prefill together; sequence 2's prompt joins the second
            // step beside their decode tokens, sequence 3's the fourth.
            let joins = [0usize, 0, 1, 3];
            let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
            let mut toks: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
            let mut rows: Vec<Vec<Tensor>> = vec![Vec::new(); prompts.len()];
            for step in 0..joins[3] + steps + 1 {
                let active: Vec<usize> = (0..prompts.len())
                    .filter(|&i| joins[i] <= step && toks[i].len() <= steps)
                    .collect();
                let chunks: Vec<Vec<u32>> = active
                    .iter()
                    .map(|&i| match toks[i].last() {
                        None => prompts[i].clone(),
                        Some(&t) => vec![t],
                    })
                    .collect();
                let chunk_refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
                let mut refs: Vec<&mut KvCache> = caches
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| active.contains(i))
                    .map(|(_, c)| c)
                    .collect();
                let logits = s.forward_ragged(&chunk_refs, &mut refs).unwrap();
                assert_eq!(logits.dims(), [active.len(), s.vocab_size()]);
                for (row, &i) in active.iter().enumerate() {
                    let l = logits.narrow(0, row, 1).unwrap().squeeze(0).unwrap();
                    toks[i].push(ops::argmax(&l).unwrap());
                    rows[i].push(l);
                }
            }
            for (i, (alone_toks, alone_rows)) in alone.iter().enumerate() {
                assert_eq!(&toks[i], alone_toks, "{name} sequence {i}");
                assert_eq!(caches[i].len(), prompts[i].len() + steps);
                let diff = max_diff(
                    &Tensor::stack(&rows[i], 0).unwrap(),
                    &Tensor::stack(alone_rows, 0).unwrap(),
                );
                assert!(diff < 1e-4, "{name} sequence {i}: {diff}");
            }
            // A ragged pass of one prompt is the single-sequence prefill, bit for bit.
            let mut a = KvCache::new();
            let mut b = KvCache::new();
            let one = s.forward_last(&prompts[2], Some(&mut a)).unwrap();
            let ragged = s.forward_ragged(&[&prompts[2]], &mut [&mut b]).unwrap();
            assert_eq!(max_diff(&one.unsqueeze(0).unwrap(), &ragged), 0.0, "{name}");
            assert!(
                s.forward_ragged(&[&prompts[0], &[]], &mut [&mut a, &mut b])
                    .is_err()
            );
            assert!(s.forward_ragged(&[], &mut []).is_err());
        }
    }

    #[test]
    fn scored_prompts_give_minus_the_evaluations_nll() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let model = builtin_model(name).unwrap();
            let s = Session::new(&model).unwrap();
            // 200 tokens on tiny-llama: the LM head runs over two chunks of rows (tiny-gpt2
            // has 128 positions).
            let long = if name == "tiny-llama" { 200 } else { 100 };
            let prompts = mixed_prompts(&[long, 4, 7], 17, 5);
            let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
            let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
            let mut cache_refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let (logits, scores) = s
                .forward_ragged_scored(&refs, &mut cache_refs, &[Some(3), None, Some(0)])
                .unwrap();
            // The last rows are what the unscored pass gives.
            let mut fresh: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
            let mut fresh_refs: Vec<&mut KvCache> = fresh.iter_mut().collect();
            let plain = s.forward_ragged(&refs, &mut fresh_refs).unwrap();
            assert_eq!(max_diff(&logits, &plain), 0.0, "{name}");
            assert!(scores[1].is_empty());
            for i in [0, 2] {
                let nll = s.nll(&prompts[i]).unwrap();
                assert_eq!(scores[i].len(), prompts[i].len() - 1, "{name} {i}");
                for (j, (t, l)) in scores[i].iter().zip(&nll).enumerate() {
                    assert_eq!(t.token, prompts[i][j + 1]);
                    // The same log-sum-exp as the NLL, over logits of the same rows.
                    assert!((t.logprob + l).abs() < 1e-4, "{name} {i}/{j}: {t:?} vs {l}");
                    assert_eq!(t.top.len(), if i == 0 { 3 } else { 0 });
                    if let Some(&(_, best)) = t.top.first() {
                        assert!(best >= t.logprob && best <= 0.0, "{t:?}");
                    }
                }
            }
            assert!(
                s.forward_ragged_scored(&refs, &mut cache_refs, &[None])
                    .is_err()
            );
        }
    }

    #[test]
    fn bad_tokens_and_positions_are_clear_errors() {
        let model = builtin_model("tiny-gpt2").unwrap();
        let s = Session::new(&model).unwrap();
        let err = s.forward(&[300], None).unwrap_err().to_string();
        assert!(err.contains("token id 300"), "{err}");
        let err = s.forward(&vec![1; 129], None).unwrap_err().to_string();
        assert!(err.contains("position table has 128"), "{err}");
        assert!(s.forward(&[], None).is_err());
        assert!(s.loss(&[1]).is_err());
    }

    #[test]
    fn resuming_from_a_block_input_gives_the_same_loss() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let model = builtin_model(name).unwrap();
            let s = Session::new(&model).unwrap();
            let tokens: Vec<u32> = (0..50u32).map(|i| (i * 29 + 3) % 256).collect();
            let full = s.nll(&tokens).unwrap();
            let inputs = s.block_inputs(&tokens).unwrap();
            assert_eq!(inputs.len(), s.blocks.len() + 1);
            for (b, x) in inputs.iter().enumerate() {
                let resumed = s.nll_from_block(b, x, &tokens).unwrap();
                let diff = full
                    .iter()
                    .zip(&resumed)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(diff < 1e-5, "{name} block {b}: {diff}");
            }
            let q = s.linears()[0].name().to_string();
            assert_eq!(s.block_of(&q), Some(0));
            assert_eq!(s.block_of(s.lm_head.name()), None);
        }
    }

    #[derive(Default)]
    struct Count(Vec<(String, Vec<usize>)>);
    impl LinearObserver for Count {
        fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
            self.0
                .push((linear.name().to_string(), input.dims().to_vec()));
            Ok(())
        }
    }

    #[test]
    fn observer_sees_every_block_linear() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let mut obs = Count::default();
        s.hidden_states(&[1, 2, 3], None, Some(&mut obs)).unwrap();
        assert_eq!(obs.0.len(), 14);
        assert_eq!(obs.0[0].0, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(obs.0[6].1, vec![3, 128]);
        assert_eq!(s.linears().len(), 15);
    }

    /// Records every observed input.
    #[derive(Default)]
    struct Inputs(Vec<(String, Tensor)>);

    impl LinearObserver for Inputs {
        fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
            self.0.push((linear.name().to_string(), input.clone()));
            Ok(())
        }
    }

    #[test]
    fn observing_a_block_shows_what_running_it_shows() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let model = builtin_model(name).unwrap();
            let s = Session::new(&model).unwrap();
            let x = s.embed(&[5, 1, 7, 2]).unwrap();
            let (mut ran, mut observed) = (Inputs::default(), Inputs::default());
            s.block_forward_from(1, &x, Some(&mut ran)).unwrap();
            s.observe_block(1, &x, &mut observed).unwrap();
            assert!(!ran.0.is_empty(), "{name}");
            assert_eq!(ran.0.len(), observed.0.len(), "{name}");
            for ((a, x), (b, y)) in ran.0.iter().zip(&observed.0) {
                assert_eq!(a, b, "{name}");
                assert_eq!(max_diff(x, y), 0.0, "{name} {a}");
            }
            assert!(s.observe_block(9, &x, &mut observed).is_err());
        }
    }
}
