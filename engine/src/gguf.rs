//! Importing a llama.cpp GGUF checkpoint into a Hugging Face–style model directory.
//!
//! [`import`] reads a GGUF file with candle's reader (`candle_core::quantized::gguf_file`),
//! dequantizes every tensor to f32 and writes a directory that both Espalier ([`crate::Model`])
//! and `transformers` (`AutoModelForCausalLM` / `AutoTokenizer`) load as a `LlamaForCausalLM`:
//!
//! - `config.json`, from the GGUF metadata (`llama.*` keys);
//! - `model.safetensors`, f32 with Hugging Face tensor names;
//! - `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, rebuilt from the
//!   `tokenizer.ggml.*` metadata (see [`tokenizer`]);
//! - `generation_config.json` with the special token ids.
//!
//! **What the weights are.** A quantized GGUF has lost precision for good: the imported model is
//! the *dequantized* quantized model, not the original checkpoint. For SmolLM2-135M-Instruct as
//! shipped by `scripts/fetch-smollm2.sh` the 210 block linears are Q4_1 (4-bit with a per-32
//! scale and minimum), the tied token embedding / LM head is Q8_0 (8-bit, per-32 scale) and the
//! 61 norm vectors are f32; its perplexity is therefore that of the Q4_1 model.
//!
//! **Layout.** llama.cpp's converter permutes the rows of `attn_q` and `attn_k` so that RoPE
//! rotates adjacent pairs (GPT-J style); Hugging Face's LLaMA rotates the two halves of each
//! head. The import undoes that permutation ([`unpermute_rope_rows`]), so the result is in
//! Hugging Face layout and runs unchanged in `transformers` and in Espalier's forward pass.
//!
//! **Atomicity.** Everything is written into a hidden temporary directory next to `out_dir`,
//! which is renamed to `out_dir` only once complete; on any error it is removed, so `out_dir`
//! either does not exist or holds a complete import.
//!
//! Supported: `general.architecture = llama` (LLaMA, SmolLM, TinyLlama-style files with a
//! byte-level BPE tokenizer), tensor types F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1
//! and the K-quants Q2_K…Q8_K. Other architectures, i-quants and newer ggml types, RoPE scaling,
//! mixture-of-experts files and SentencePiece (`tokenizer.ggml.model = llama`) vocabularies are
//! refused with an error that names what is unsupported.

pub mod header;
pub mod tokenizer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::files;
use crate::model::{Model, write_atomic};

/// One step of an import, reported to the caller's progress callback.
#[derive(Debug, Clone, Copy)]
pub enum ImportProgress<'a> {
    /// The GGUF header and metadata were read.
    Opened {
        /// Tensors in the file.
        tensors: usize,
        /// `general.name`, when the file has one.
        name: Option<&'a str>,
    },
    /// One tensor was dequantized (`index` counts from 1 to `total`).
    Tensor {
        /// Its GGUF name (`blk.0.attn_q.weight`).
        gguf_name: &'a str,
        /// Its Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
        hf_name: &'a str,
        /// Its type in the file.
        ggml_type: GgmlDType,
        /// 1-based position.
        index: usize,
        /// Number of tensors.
        total: usize,
    },
    /// A file of the output directory was written (in the temporary directory).
    Wrote {
        /// File name (`model.safetensors`, `tokenizer.json`, ...).
        file: &'a str,
    },
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The directory written.
    pub out_dir: PathBuf,
    /// `general.name` of the GGUF, when present.
    pub name: Option<String>,
    /// `general.architecture` (always `llama` today).
    pub architecture: String,
    /// Number of tensors written to `model.safetensors`.
    pub tensors: usize,
    /// Number of parameters (f32 elements) written.
    pub parameters: usize,
    /// How many tensors of each GGUF type were dequantized (`Q4_1` → 210, ...).
    pub tensor_types: BTreeMap<String, usize>,
    /// Vocabulary size of the model and tokenizer.
    pub vocab_size: usize,
    /// Whether the LM head is tied to the token embedding (no `output.weight` in the file).
    pub tie_word_embeddings: bool,
    /// The files written into `out_dir`.
    pub files: Vec<String>,
}

/// Files an import writes besides `config.json` and `model.safetensors`.
const EXTRA_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// The architectures [`import`] converts.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

fn gguf_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Gguf {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Name of a ggml type as llama.cpp prints it (`Q4_1`, `Q4_K`, `F32`).
pub fn ggml_type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Rewrites candle's header errors into messages a user can act on.
fn header_error(path: &Path, e: candle_core::Error) -> EngineError {
    let text = e.to_string();
    if let Some(id) = text
        .find("unknown dtype for tensor ")
        .map(|i| &text[i + "unknown dtype for tensor ".len()..])
    {
        let id = id.split_whitespace().next().unwrap_or("?");
        return gguf_err(path, header::unsupported_type_message(id));
    }
    gguf_err(path, format!("not a readable GGUF file: {text}"))
}

/// Typed access to the GGUF metadata, with errors that name the key.
struct Meta<'a> {
    path: &'a Path,
    map: &'a HashMap<String, Value>,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn missing(&self, key: &str) -> EngineError {
        gguf_err(self.path, format!("missing metadata key `{key}`"))
    }

    fn wrong_type(&self, key: &str, want: &str, v: &Value) -> EngineError {
        gguf_err(
            self.path,
            format!(
                "metadata key `{key}` should be {want}, found a value of type {:?}",
                v.value_type()
            ),
        )
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => Some(u64::from(*x)),
            Value::U16(x) => Some(u64::from(*x)),
            Value::U32(x) => Some(u64::from(*x)),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, EngineError> {
        self.opt_u64(key)?
            .map(|n| {
                usize::try_from(n).map_err(|_| {
                    gguf_err(
                        self.path,
                        format!("metadata key `{key}` is too large ({n})"),
                    )
                })
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize, EngineError> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float, rounded to the shortest decimal that reads back as the same f32 when stored as
    /// f32 (so `9.999999747e-6` becomes `1e-5`, as in the original `config.json`).
    fn opt_f64(&self, key: &str) -> Result<Option<f64>, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            Value::F32(x) => Ok(Some(format!("{x}").parse::<f64>().unwrap_or(f64::from(*x)))),
            Value::F64(x) => Ok(Some(*x)),
            Value::U32(_) | Value::U64(_) | Value::I32(_) | Value::I64(_) => {
                Ok(self.opt_u64(key)?.map(|n| n as f64))
            }
            other => Err(self.wrong_type(key, "a number", other)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, EngineError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str, EngineError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, EngineError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "a boolean", other)),
        }
    }

    fn string_array(&self, key: &str) -> Result<Vec<&'a str>, EngineError> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "an array of strings", v));
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong_type(key, "an array of strings", other)),
            })
            .collect()
    }

    fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i64>>, EngineError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.wrong_type(key, "an array of integers", v));
        };
        items
            .iter()
            .map(|item| match item {
                Value::I32(x) => Ok(i64::from(*x)),
                Value::U32(x) => Ok(i64::from(*x)),
                Value::I8(x) => Ok(i64::from(*x)),
                Value::U8(x) => Ok(i64::from(*x)),
                Value::I16(x) => Ok(i64::from(*x)),
                Value::U16(x) => Ok(i64::from(*x)),
                Value::I64(x) => Ok(*x),
                other => Err(self.wrong_type(key, "an array of integers", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Hyper-parameters read from the `llama.*` metadata.
#[derive(Debug, Clone)]
struct LlamaParams {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context: usize,
    rope_theta: f64,
    rms_eps: f64,
    vocab: Option<usize>,
}

fn read_llama_params(meta: &Meta<'_>, arch: &str) -> Result<LlamaParams, EngineError> {
    let k = |s: &str| format!("{arch}.{s}");
    let hidden = meta.usize(&k("embedding_length"))?;
    let heads = meta.usize(&k("attention.head_count"))?;
    if heads == 0 || hidden % heads != 0 {
        return Err(gguf_err(
            meta.path,
            format!(
                "`{}` ({heads}) must be positive and divide `{}` ({hidden})",
                k("attention.head_count"),
                k("embedding_length")
            ),
        ));
    }
    let kv_heads = meta
        .opt_usize(&k("attention.head_count_kv"))?
        .unwrap_or(heads);
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(gguf_err(
            meta.path,
            format!(
                "`{}` ({kv_heads}) must be positive and divide the head count ({heads})",
                k("attention.head_count_kv")
            ),
        ));
    }
    let head_dim = meta
        .opt_usize(&k("attention.key_length"))?
        .unwrap_or(hidden / heads);
    if let Some(v) = meta.opt_usize(&k("attention.value_length"))?
        && v != head_dim
    {
        return Err(gguf_err(
            meta.path,
            format!(
                "value head width {v} differs from key head width {head_dim}: not a LLaMA layout"
            ),
        ));
    }
    if let Some(rot) = meta.opt_usize(&k("rope.dimension_count"))?
        && rot != head_dim
    {
        return Err(gguf_err(
            meta.path,
            format!(
                "partial rotary embeddings (`{}` = {rot}, head width {head_dim}) are not supported",
                k("rope.dimension_count")
            ),
        ));
    }
    if let Some(kind) = meta.opt_str(&k("rope.scaling.type"))?
        && kind != "none"
    {
        return Err(gguf_err(
            meta.path,
            format!(
                "RoPE scaling `{kind}` (`{}`) is not supported",
                k("rope.scaling.type")
            ),
        ));
    }
    if let Some(experts) = meta.opt_usize(&k("expert_count"))?
        && experts > 0
    {
        return Err(gguf_err(
            meta.path,
            format!(
                "mixture-of-experts models (`{}` = {experts}) are not supported",
                k("expert_count")
            ),
        ));
    }
    let rms_key = k("attention.layer_norm_rms_epsilon");
    Ok(LlamaParams {
        hidden,
        intermediate: meta.usize(&k("feed_forward_length"))?,
        layers: meta.usize(&k("block_count"))?,
        heads,
        kv_heads,
        head_dim,
        context: meta.usize(&k("context_length"))?,
        rope_theta: meta.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
        rms_eps: meta
            .opt_f64(&rms_key)?
            .ok_or_else(|| meta.missing(&rms_key))?,
        vocab: meta.opt_usize(&k("vocab_size"))?,
    })
}

/// The Hugging Face name of a GGUF tensor of a LLaMA model, or `None` if it has no counterpart.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (block, tail) = rest.split_once('.')?;
    let block: usize = block.parse().ok()?;
    let hf = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{block}.{hf}"))
}

/// Undoes llama.cpp's RoPE row permutation of a `[heads * head_dim, in]` q or k weight.
///
/// llama.cpp's converter (`LlamaModel.permute`) maps Hugging Face row `h*d + p*(d/2) + i` to row
/// `h*d + 2*i + p` (`p` ∈ {0, 1}, `i` < `d/2`), i.e. it reshapes to `[heads, 2, d/2, in]` and
/// swaps the middle axes. This applies the inverse: `[heads, d/2, 2, in]` with the middle axes
/// swapped back.
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor, EngineError> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(EngineError::Tensor {
            name: "q/k projection".into(),
            message: format!("{rows} rows cannot be split into {heads} heads of even width"),
        });
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The inverse of [`unpermute_rope_rows`]: Hugging Face layout to llama.cpp layout (used by the
/// tests to build GGUF files the way llama.cpp's converter does).
pub fn permute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor, EngineError> {
    let (rows, cols) = w.dims2()?;
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(EngineError::Tensor {
            name: "q/k projection".into(),
            message: format!("{rows} rows cannot be split into {heads} heads of even width"),
        });
    }
    let half = rows / heads / 2;
    Ok(w.reshape((heads, 2, half, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Removes the temporary directory unless the import completed.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks that `out_dir` can receive the import and creates its parent.
fn prepare_out_dir(out_dir: &Path) -> Result<(), EngineError> {
    if out_dir.exists() {
        let mut entries = std::fs::read_dir(out_dir).map_err(|e| {
            gguf_err(
                out_dir,
                format!("exists and cannot be listed ({e}); choose a new output directory"),
            )
        })?;
        if entries.next().is_some() {
            return Err(gguf_err(
                out_dir,
                "output directory already exists and is not empty; remove it or choose another",
            ));
        }
    }
    if let Some(parent) = out_dir.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    Ok(())
}

/// Converts a GGUF file into a Hugging Face–style directory (see the module docs).
///
/// `out_dir` must not exist or be an empty directory; its parent is created if needed. The
/// import is atomic: on error nothing is left at `out_dir`. `progress` is called once the file
/// is opened, after each tensor is dequantized, and after each file is written.
pub fn import(
    gguf_path: &Path,
    out_dir: &Path,
    progress: &mut dyn FnMut(ImportProgress<'_>),
) -> Result<ImportSummary, EngineError> {
    prepare_out_dir(out_dir)?;
    let (file, size) = files::open_regular(gguf_path).map_err(|e| io_err(gguf_path, e))?;
    let mut reader = BufReader::new(file);
    // Our own pass first: candle's reader trusts sizes that a hostile file can forge.
    header::check(&mut reader, size).map_err(|m| gguf_err(gguf_path, m))?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_err(gguf_path, e))?;
    let content = Content::read(&mut reader).map_err(|e| header_error(gguf_path, e))?;
    let meta = Meta {
        path: gguf_path,
        map: &content.metadata,
    };

    let arch = meta.str("general.architecture")?;
    if !SUPPORTED_ARCHITECTURES.contains(&arch) {
        return Err(gguf_err(
            gguf_path,
            format!(
                "unsupported architecture `{arch}` (metadata `general.architecture`); \
                 the importer converts {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        ));
    }
    let name = meta.opt_str("general.name")?;
    progress(ImportProgress::Opened {
        tensors: content.tensor_infos.len(),
        name,
    });
    let params = read_llama_params(&meta, arch)?;

    // The tokenizer is built (and checked) before the expensive part, so that a bad vocabulary
    // fails fast.
    let tok = tokenizer::GgufTokenizer::from_meta(&meta)?;
    let vocab = tok.tokens.len();
    if let Some(v) = params.vocab
        && v != vocab
    {
        return Err(gguf_err(
            gguf_path,
            format!(
                "`{arch}.vocab_size` is {v} but `tokenizer.ggml.tokens` lists {vocab} tokens: the tokenizer does not match the model"
            ),
        ));
    }

    // Map and check every tensor name before reading any data.
    let mut names: Vec<(&str, String)> = Vec::with_capacity(content.tensor_infos.len());
    for gguf_name in content.tensor_infos.keys() {
        let hf = hf_tensor_name(gguf_name).ok_or_else(|| {
            gguf_err(
                gguf_path,
                format!(
                    "tensor `{gguf_name}` has no counterpart in Hugging Face's LlamaForCausalLM \
                     (biases, RoPE frequency tables and extra heads are not supported)"
                ),
            )
        })?;
        names.push((gguf_name.as_str(), hf));
    }
    names.sort_by(|a, b| a.1.cmp(&b.1));
    // Two spellings of one block (`blk.1.` and `blk.01.`) would silently replace each other.
    if let Some(pair) = names.windows(2).find(|w| w[0].1 == w[1].1) {
        return Err(gguf_err(
            gguf_path,
            format!(
                "tensors `{}` and `{}` both name `{}`",
                pair[0].0, pair[1].0, pair[0].1
            ),
        ));
    }
    if let Some((gguf_name, _)) = names
        .iter()
        .find(|(_, hf)| crate::layers::block_index(hf).is_some_and(|b| b >= params.layers))
    {
        return Err(gguf_err(
            gguf_path,
            format!(
                "tensor `{gguf_name}` belongs to a block beyond `{arch}.block_count` ({})",
                params.layers
            ),
        ));
    }
    let tie = !content.tensor_infos.contains_key("output.weight");

    if let Some(rows) = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|info| info.shape.dims().first().copied())
        && rows != vocab
    {
        return Err(gguf_err(
            gguf_path,
            format!(
                "`token_embd.weight` has {rows} rows but the tokenizer has {vocab} tokens: the tokenizer does not match the model"
            ),
        ));
    }

    // The config the import will write, checked against the tensors' shapes before any tensor
    // is read or dequantized: metadata claiming more than the file holds fails here.
    let config = hf_config(&params, &tok, vocab, tie);
    let model_config = ModelConfig::from_json(config, &gguf_path.display().to_string())?;
    let shapes: BTreeMap<String, Vec<usize>> = names
        .iter()
        .map(|(g, hf)| (hf.clone(), content.tensor_infos[*g].shape.dims().to_vec()))
        .collect();
    crate::model::check_shapes(&model_config, &shapes, gguf_path, gguf_path)?;
    drop(shapes);

    let mut weights = BTreeMap::new();
    let mut tensor_types: BTreeMap<String, usize> = BTreeMap::new();
    let total = names.len();
    for (index, (gguf_name, hf_name)) in names.iter().enumerate() {
        let info = &content.tensor_infos[*gguf_name];
        let q = info
            .read(&mut reader, content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| gguf_err(gguf_path, format!("tensor `{gguf_name}`: {e}")))?;
        let mut t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| gguf_err(gguf_path, format!("tensor `{gguf_name}`: {e}")))?
            .to_dtype(DType::F32)?;
        if gguf_name.ends_with("attn_q.weight") {
            t = unpermute_rope_rows(&t, params.heads)?;
        } else if gguf_name.ends_with("attn_k.weight") {
            t = unpermute_rope_rows(&t, params.kv_heads)?;
        }
        *tensor_types
            .entry(ggml_type_name(info.ggml_dtype).to_string())
            .or_default() += 1;
        weights.insert(hf_name.clone(), t.contiguous()?);
        progress(ImportProgress::Tensor {
            gguf_name,
            hf_name,
            ggml_type: info.ggml_dtype,
            index: index + 1,
            total,
        });
    }
    let model = Model::from_parts(model_config, weights, gguf_path.display().to_string())?;
    let parameters = model.num_parameters();
    let tensors = model.weights().len();

    // Write everything into a temporary sibling, then rename.
    let parent = out_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "import".into());
    let tmp = TempDir {
        path: parent.join(format!(".{base}.import-{}.tmp", std::process::id())),
        keep: false,
    };
    if tmp.path.exists() {
        std::fs::remove_dir_all(&tmp.path).map_err(|e| io_err(&tmp.path, e))?;
    }
    std::fs::create_dir(&tmp.path).map_err(|e| io_err(&tmp.path, e))?;
    model.save_into(&tmp.path)?;
    progress(ImportProgress::Wrote {
        file: "model.safetensors",
    });
    progress(ImportProgress::Wrote {
        file: "config.json",
    });
    let mut extra = tok.files(params.context)?;
    extra.push(("generation_config.json", generation_config(&tok)));
    for (file, value) in &extra {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| gguf_err(out_dir, format!("cannot serialise {file}: {e}")))?;
        write_atomic(&tmp.path.join(file), text.as_bytes())?;
        progress(ImportProgress::Wrote { file });
    }

    if out_dir.exists() {
        // Checked empty above; `rename` onto a directory is not portable.
        std::fs::remove_dir(out_dir).map_err(|e| io_err(out_dir, e))?;
    }
    std::fs::rename(&tmp.path, out_dir).map_err(|e| io_err(out_dir, e))?;
    let mut tmp = tmp;
    tmp.keep = true;

    let mut files = vec!["config.json".to_string(), "model.safetensors".to_string()];
    files.extend(EXTRA_FILES.iter().map(|f| f.to_string()));
    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        name: name.map(str::to_string),
        architecture: arch.to_string(),
        tensors,
        parameters,
        tensor_types,
        vocab_size: vocab,
        tie_word_embeddings: tie,
        files,
    })
}

/// The `config.json` of a `LlamaForCausalLM` with these hyper-parameters.
fn hf_config(
    p: &LlamaParams,
    tok: &tokenizer::GgufTokenizer,
    vocab: usize,
    tie: bool,
) -> serde_json::Value {
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": p.layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.context,
        "rms_norm_eps": p.rms_eps,
        "rope_theta": p.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tie,
        "vocab_size": vocab,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    if let serde_json::Value::Object(map) = &mut config {
        for (key, id) in [
            ("bos_token_id", tok.bos_id),
            ("eos_token_id", tok.eos_id),
            ("pad_token_id", tok.pad_id),
        ] {
            if let Some(id) = id {
                map.insert(key.into(), json!(id));
            }
        }
    }
    config
}

fn generation_config(tok: &tokenizer::GgufTokenizer) -> serde_json::Value {
    let mut g = serde_json::Map::new();
    for (key, id) in [
        ("bos_token_id", tok.bos_id),
        ("eos_token_id", tok.eos_id),
        ("pad_token_id", tok.pad_id),
    ] {
        if let Some(id) = id {
            g.insert(key.into(), json!(id));
        }
    }
    serde_json::Value::Object(g)
}
