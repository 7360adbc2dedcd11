//! The in-memory model: config plus named f32 weights in canonical orientation, loaded from a
//! Hugging Face–style directory and saved back to one that `transformers` loads.
//!
//! Invariants:
//! - every floating-point weight is held as contiguous f32 on the CPU (the masks, kernels and
//!   the forward pass all work on f32; bf16/f16 checkpoints are widened on load);
//! - linear weights are `[out, in]`; GPT-2's `Conv1D` weights are transposed on load and back
//!   on save (see [`crate::layers::stored_transposed`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::{Architecture, ModelConfig};
use crate::error::EngineError;
use crate::layers::{self, LayerInfo, Role};

/// Files besides the weights that travel with a model directory (tokenizer and generation
/// settings); an export copies them unchanged.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
];

/// A loaded model.
#[derive(Debug, Clone)]
pub struct Model {
    /// Hyper-parameters and the original config.json.
    pub config: ModelConfig,
    weights: BTreeMap<String, Tensor>,
    /// Where the model came from (a directory, or `builtin:NAME`).
    pub source: String,
    /// The directory it was loaded from, for companion files such as the tokenizer.
    pub source_dir: Option<PathBuf>,
}

fn weights_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Weights {
        path: path.display().to_string(),
        message: message.into(),
    }
}

fn candle_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// Reads every tensor of one safetensors file, widening floats to f32.
fn read_safetensors(
    path: &Path,
    arch: Architecture,
    only: Option<&dyn Fn(&str) -> bool>,
    out: &mut BTreeMap<String, Tensor>,
) -> Result<(), EngineError> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| weights_err(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.tensors() {
        if let Some(filter) = only
            && !filter(&name)
        {
            continue;
        }
        let dtype = candle_dtype(view.dtype()).ok_or_else(|| {
            weights_err(
                path,
                format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
            )
        })?;
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .map_err(|e| weights_err(path, format!("tensor `{name}`: {e}")))?;
        let tensor = if dtype.is_float() {
            tensor.to_dtype(DType::F32)?
        } else {
            tensor
        };
        let tensor = if layers::stored_transposed(&name, arch) && tensor.rank() == 2 {
            tensor.t()?.contiguous()?
        } else {
            tensor
        };
        out.insert(name, tensor);
    }
    Ok(())
}

impl Model {
    /// Builds a model from parts (used by the built-in generators and importers).
    pub fn from_parts(
        config: ModelConfig,
        weights: BTreeMap<String, Tensor>,
        source: impl Into<String>,
    ) -> Result<Self, EngineError> {
        let model = Model {
            config,
            weights,
            source: source.into(),
            source_dir: None,
        };
        model.check_tensors(Path::new(&model.source))?;
        Ok(model)
    }

    /// Loads `config.json` plus `model.safetensors` (or a sharded `model.safetensors.index.json`).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        if !dir.is_dir() {
            return Err(weights_err(
                dir,
                "not a directory: expected a Hugging Face–style model directory with config.json and model.safetensors",
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(weights_err(dir, "missing config.json"));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let mut weights = BTreeMap::new();
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            read_safetensors(&single, config.arch, None, &mut weights)?;
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::Io {
                path: index.display().to_string(),
                source: e,
            })?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| weights_err(&index, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| weights_err(&index, "missing object field `weight_map`"))?;
            let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    weights_err(&index, format!("weight_map[`{name}`] must be a file name"))
                })?;
                by_file
                    .entry(file.to_string())
                    .or_default()
                    .push(name.clone());
            }
            for (file, names) in by_file {
                let shard = dir.join(&file);
                if !shard.is_file() {
                    return Err(weights_err(
                        &index,
                        format!("shard `{file}` listed in weight_map is missing"),
                    ));
                }
                let before = weights.len();
                let filter = |n: &str| names.iter().any(|m| m == n);
                read_safetensors(&shard, config.arch, Some(&filter), &mut weights)?;
                if weights.len() - before != names.len() {
                    return Err(weights_err(
                        &shard,
                        format!(
                            "holds fewer tensors than weight_map assigns to it ({} expected)",
                            names.len()
                        ),
                    ));
                }
            }
        } else {
            return Err(weights_err(
                dir,
                "missing model.safetensors (or model.safetensors.index.json for sharded weights)",
            ));
        }
        let model = Model {
            config,
            weights,
            source: dir.display().to_string(),
            source_dir: Some(dir.to_path_buf()),
        };
        model.check_tensors(dir)?;
        Ok(model)
    }

    /// Checks that the tensors the architecture needs exist with shapes that match the config.
    fn check_tensors(&self, origin: &Path) -> Result<(), EngineError> {
        let c = &self.config;
        let (h, i, q, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
        match c.arch {
            Architecture::Llama => {
                expected.push((self.embedding_name().to_string(), vec![c.vocab_size, h]));
                for b in 0..c.num_layers {
                    let p = format!("model.layers.{b}");
                    expected.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
                    expected.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
                    expected.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
                    expected.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
                    expected.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                    expected.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
                    expected.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
                    expected.push((format!("{p}.input_layernorm.weight"), vec![h]));
                    expected.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
                }
                expected.push(("model.norm.weight".into(), vec![h]));
                if !c.tie_word_embeddings {
                    expected.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
                }
            }
            Architecture::Gpt2 => {
                let p0 = self.gpt2_prefix();
                expected.push((format!("{p0}wte.weight"), vec![c.vocab_size, h]));
                expected.push((
                    format!("{p0}wpe.weight"),
                    vec![c.max_position_embeddings, h],
                ));
                for b in 0..c.num_layers {
                    let p = format!("{p0}h.{b}");
                    expected.push((format!("{p}.attn.c_attn.weight"), vec![2 * q + h, h]));
                    expected.push((format!("{p}.attn.c_proj.weight"), vec![h, q]));
                    expected.push((format!("{p}.mlp.c_fc.weight"), vec![i, h]));
                    expected.push((format!("{p}.mlp.c_proj.weight"), vec![h, i]));
                    expected.push((format!("{p}.ln_1.weight"), vec![h]));
                    expected.push((format!("{p}.ln_2.weight"), vec![h]));
                }
                expected.push((format!("{p0}ln_f.weight"), vec![h]));
            }
        }
        for (name, shape) in expected {
            let Some(t) = self.weights.get(&name) else {
                return Err(weights_err(
                    origin,
                    format!(
                        "missing tensor `{name}` that config.json ({} layers) implies",
                        c.num_layers
                    ),
                ));
            };
            if t.dims() != shape.as_slice() {
                return Err(weights_err(
                    origin,
                    format!(
                        "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                        t.dims()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `"transformer."` when a GPT-2 checkpoint was saved from the LM-head model, else `""`.
    pub fn gpt2_prefix(&self) -> &'static str {
        if self.weights.keys().any(|k| k.starts_with("transformer.")) {
            "transformer."
        } else {
            ""
        }
    }

    /// Name of the token embedding tensor.
    pub fn embedding_name(&self) -> &'static str {
        match self.config.arch {
            Architecture::Llama => "model.embed_tokens.weight",
            Architecture::Gpt2 => {
                if self.gpt2_prefix().is_empty() {
                    "wte.weight"
                } else {
                    "transformer.wte.weight"
                }
            }
        }
    }

    /// Describes every floating-point tensor, sorted by block then name order of the checkpoint.
    pub fn layers(&self) -> Vec<LayerInfo> {
        let mut out: Vec<LayerInfo> = self
            .weights
            .iter()
            .filter(|(_, t)| t.dtype() == DType::F32)
            .map(|(name, t)| layers::describe(name, t.dims(), &self.config))
            .collect();
        out.sort_by_key(|l| (l.block.map_or(usize::MAX, |b| b), l.name.clone()));
        out
    }

    /// Describes one tensor.
    pub fn layer(&self, name: &str) -> Option<LayerInfo> {
        self.weights
            .get(name)
            .map(|t| layers::describe(name, t.dims(), &self.config))
    }

    /// The weight with this name (canonical orientation, f32).
    pub fn weight(&self, name: &str) -> Option<&Tensor> {
        self.weights.get(name)
    }

    /// All weights by name.
    pub fn weights(&self) -> &BTreeMap<String, Tensor> {
        &self.weights
    }

    /// Replaces a weight; the new tensor must keep the shape unless `allow_reshape` (head removal).
    pub fn set_weight(
        &mut self,
        name: &str,
        tensor: Tensor,
        allow_reshape: bool,
    ) -> Result<(), EngineError> {
        let Some(old) = self.weights.get(name) else {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                message: "no such tensor in the model".into(),
            });
        };
        if !allow_reshape && old.dims() != tensor.dims() {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                message: format!(
                    "new shape {:?} differs from {:?}",
                    tensor.dims(),
                    old.dims()
                ),
            });
        }
        self.weights
            .insert(name.to_string(), tensor.to_dtype(DType::F32)?.contiguous()?);
        Ok(())
    }

    /// Total number of elements over all floating-point tensors.
    pub fn num_parameters(&self) -> usize {
        self.weights
            .values()
            .filter(|t| t.dtype() == DType::F32)
            .map(|t| t.elem_count())
            .sum()
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (which must exist), each through a
    /// temporary file and a rename, plus the companion files of the source directory.
    pub fn save_into(&self, dir: &Path) -> Result<(), EngineError> {
        let mut out: HashMap<String, Tensor> = HashMap::with_capacity(self.weights.len());
        for (name, t) in &self.weights {
            let t = if layers::stored_transposed(name, self.config.arch) && t.rank() == 2 {
                t.t()?.contiguous()?
            } else {
                t.clone()
            };
            out.insert(name.clone(), t);
        }
        let weights_path = dir.join("model.safetensors");
        let tmp = dir.join(".model.safetensors.tmp");
        candle_core::safetensors::save(&out, &tmp)?;
        rename(&tmp, &weights_path)?;

        let config_text = serde_json::to_string_pretty(&self.config.raw)
            .map_err(|e| weights_err(dir, format!("cannot serialise config.json: {e}")))?;
        write_atomic(&dir.join("config.json"), config_text.as_bytes())?;

        if let Some(src) = &self.source_dir {
            for file in COMPANION_FILES {
                let from = src.join(file);
                if from.is_file() {
                    let bytes = std::fs::read(&from).map_err(|e| EngineError::Io {
                        path: from.display().to_string(),
                        source: e,
                    })?;
                    write_atomic(&dir.join(file), &bytes)?;
                }
            }
        }
        Ok(())
    }

    /// Rewrites `config.json` fields after structural changes (e.g. attention heads removed).
    pub fn set_config_field(&mut self, key: &str, value: Value) -> Result<(), EngineError> {
        if let Value::Object(map) = &mut self.config.raw {
            map.insert(key.to_string(), value);
        }
        let raw = self.config.raw.clone();
        self.config = ModelConfig::from_json(raw, &self.source)?;
        Ok(())
    }

    /// Layers whose role is one of the block linears (the usual pruning targets).
    pub fn block_linears(&self) -> Vec<LayerInfo> {
        self.layers()
            .into_iter()
            .filter(|l| l.role.is_block_linear())
            .collect()
    }

    /// Tensor names with the given role.
    pub fn names_with_role(&self, role: Role) -> Vec<String> {
        self.layers()
            .into_iter()
            .filter(|l| l.role == role)
            .map(|l| l.name)
            .collect()
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), EngineError> {
    std::fs::rename(from, to).map_err(|e| EngineError::Io {
        path: to.display().to_string(),
        source: e,
    })
}

/// Writes a file through a temporary sibling and a rename, so readers never see half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| EngineError::Io {
        path: tmp.display().to_string(),
        source: e,
    })?;
    rename(&tmp, path)
}
