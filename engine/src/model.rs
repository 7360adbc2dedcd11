//! The in-memory model: config plus named f32 weights in canonical orientation, loaded from a
//! Hugging Face–style directory and saved back to one that `transformers` loads.
//!
//! Invariants:
//! - every floating-point weight is held as contiguous f32 on the CPU (the masks, kernels and
//!   the forward pass all work on f32; bf16/f16 checkpoints are widened on load);
//! - linear weights are `[out, in]`; GPT-2's `Conv1D` weights are transposed on load and back
//!   on save (see [`crate::layers::stored_transposed`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use serde_json::Value;

use crate::config::{Architecture, ModelConfig};
use crate::error::EngineError;
use crate::files;
use crate::layers::{self, LayerInfo, Role};
use crate::packed::PackedKernel;
use espalier_kernels::PackedLinear;

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
    /// Linears loaded packed, by weight name: from a packed checkpoint ([`crate::packed`]) or
    /// packed as they were read ([`Model::load_packing`]). They have no dense tensor in
    /// `weights` (except a tied embedding, whose packed copy is the LM head).
    packed: BTreeMap<String, Arc<PackedKernel>>,
    /// Loaded from a packed checkpoint (even one whose planner left every linear dense f32),
    /// or through a [`Model::load_packing`] hook that packed a layer or said why not.
    packed_checkpoint: bool,
    /// Why a `load_packing` hook left linears dense, by weight name.
    dense_reasons: BTreeMap<String, String>,
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
        _ => return None,
    })
}

/// The largest safetensors header read. The format allows 100 MB; real headers are a few
/// hundred bytes per tensor (a few MB for the largest mixture-of-experts shards), so 32 MiB
/// bounds what parsing a hostile header costs without refusing any real checkpoint.
const MAX_HEADER: u64 = 32 << 20;

/// The header of one safetensors file: every tensor's dtype, shape and byte range.
struct Header {
    path: PathBuf,
    /// Offset of the data section in the file.
    data_start: u64,
    /// Total file size the header implies (checked equal to the file's size).
    file_len: u64,
    meta: Metadata,
}

/// Reads and checks the header of a safetensors file without reading any tensor data.
fn read_header(path: &Path) -> Result<Header, EngineError> {
    let io = |e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let (file, size) = files::open_regular(path).map_err(io)?;
    let invalid = |m: String| weights_err(path, format!("not a valid safetensors file: {m}"));
    let mut file = std::io::BufReader::new(file);
    let mut n = [0u8; 8];
    file.read_exact(&mut n)
        .map_err(|_| invalid("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > size.saturating_sub(8) {
        return Err(invalid(format!(
            "header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER}-byte limit"
        )));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(io)?;
    let meta: Metadata =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("bad header: {e}")))?;
    let data_start = 8 + n;
    let file_len = data_start
        .checked_add(meta.data_len() as u64)
        .ok_or_else(|| invalid("tensor sizes overflow".into()))?;
    if file_len != size {
        return Err(invalid(format!(
            "the header describes {file_len} bytes but the file has {size}"
        )));
    }
    Ok(Header {
        path: path.to_path_buf(),
        data_start,
        file_len,
        meta,
    })
}

impl Header {
    /// Tensors in file order, restricted to `only` when given.
    fn tensors<'a>(
        &'a self,
        only: Option<&'a BTreeSet<String>>,
    ) -> impl Iterator<Item = (String, &'a TensorInfo)> + 'a {
        self.meta
            .offset_keys()
            .into_iter()
            .filter(move |name| only.is_none_or(|set| set.contains(name)))
            .filter_map(|name| self.meta.info(&name).map(|info| (name, info)))
    }

    /// Refuses tensors that are not floating point: a model weight stored as integers (or in a
    /// float format candle cannot widen) would otherwise be skipped until evaluation fails.
    fn check_dtypes(&self, only: Option<&BTreeSet<String>>) -> Result<(), EngineError> {
        for (name, info) in self.tensors(only) {
            if candle_dtype(info.dtype).is_none() {
                let kind = match info.dtype {
                    Dtype::BOOL
                    | Dtype::U8
                    | Dtype::I8
                    | Dtype::I16
                    | Dtype::U16
                    | Dtype::I32
                    | Dtype::U32
                    | Dtype::I64
                    | Dtype::U64 => "an integer dtype",
                    _ => "an unsupported dtype",
                };
                return Err(weights_err(
                    &self.path,
                    format!(
                        "tensor `{name}` is stored as {:?}, {kind}: model weights must be \
                         floating point (F32, F16, BF16 or F64)",
                        info.dtype
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Opens the file for reading its tensors, refusing one that changed since its header was
    /// read.
    fn open_data(&self) -> Result<std::io::BufReader<std::fs::File>, EngineError> {
        let (file, size) = files::open_regular(&self.path).map_err(|e| self.io(e))?;
        if size != self.file_len {
            return Err(weights_err(
                &self.path,
                "the file changed while it was loaded",
            ));
        }
        Ok(std::io::BufReader::new(file))
    }

    fn io(&self, source: std::io::Error) -> EngineError {
        EngineError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Reads one tensor's bytes from `file` (opened by [`Header::open_data`]) as stored.
    fn read_stored(
        &self,
        file: &mut std::io::BufReader<std::fs::File>,
        name: &str,
        info: &TensorInfo,
        dtype: DType,
    ) -> Result<Tensor, EngineError> {
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        file.seek(SeekFrom::Start(self.data_start + start as u64))
            .map_err(|e| self.io(e))?;
        file.read_exact(&mut bytes).map_err(|e| self.io(e))?;
        Tensor::from_raw_buffer(&bytes, dtype, info.shape.as_slice(), &Device::Cpu)
            .map_err(|e| weights_err(&self.path, format!("tensor `{name}`: {e}")))
    }

    /// Reads the tensors (all, or those in `only`) one at a time, widening floats to f32 and
    /// transposing GPT-2's `Conv1D` weights to `[out, in]`, and hands each to `sink`: no more
    /// than one tensor is held here at a time.
    fn read_tensors(
        &self,
        arch: Architecture,
        only: Option<&BTreeSet<String>>,
        sink: &mut dyn FnMut(String, Tensor) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let mut file = self.open_data()?;
        for (name, info) in self.tensors(only) {
            let dtype = candle_dtype(info.dtype).ok_or_else(|| {
                weights_err(&self.path, format!("tensor `{name}`: unsupported dtype"))
            })?;
            let tensor = self
                .read_stored(&mut file, &name, info, dtype)?
                .to_dtype(DType::F32)?;
            let tensor = if layers::stored_transposed(&name, arch) && tensor.rank() == 2 {
                tensor.t()?.contiguous()?
            } else {
                tensor
            };
            sink(name, tensor)?;
        }
        Ok(())
    }
}

/// A safetensors file read tensor by tensor, in its stored dtype: for files beside a model
/// that are not weights (an export's masks), so that no more than one tensor of them is in
/// memory at a time. The header is checked as a model's is (size limits, offsets that match
/// the file's length) before any data is read.
pub struct TensorFile {
    header: Header,
    file: std::io::BufReader<std::fs::File>,
}

impl TensorFile {
    /// Opens `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let header = read_header(path)?;
        let file = header.open_data()?;
        Ok(TensorFile { header, file })
    }

    /// The tensors' names in file order.
    pub fn names(&self) -> Vec<String> {
        self.header.tensors(None).map(|(name, _)| name).collect()
    }

    /// The tensor `name` as stored (`None` when the file has none of that name): floats and
    /// 8-bit integers (`U8`, `BOOL` read as `U8`); other dtypes are refused, naming the tensor.
    pub fn read(&mut self, name: &str) -> Result<Option<Tensor>, EngineError> {
        let Some(info) = self.header.meta.info(name) else {
            return Ok(None);
        };
        let dtype = match info.dtype {
            Dtype::U8 | Dtype::BOOL => DType::U8,
            other => candle_dtype(other).ok_or_else(|| {
                weights_err(
                    &self.header.path,
                    format!("tensor `{name}` is stored as {other:?}, which is not read here"),
                )
            })?,
        };
        self.header
            .read_stored(&mut self.file, name, info, dtype)
            .map(Some)
    }
}

/// What a [`Model::load_packing`] hook decided for one linear.
pub struct LoadPacking {
    /// The packed form the layer runs on; its dense tensor is then not kept (a tied
    /// embedding's is, for its look-ups). `None` keeps the layer dense.
    pub packed: Option<PackedLinear>,
    /// Why the layer runs a dense kernel, in words a summary can group; recorded in
    /// [`Model::dense_reasons`].
    pub why_dense: Option<String>,
}

/// Resolves a shard file named in `model.safetensors.index.json`, refusing anything that is not
/// a file inside the model folder: absolute paths, `..`, and symbolic links leading outside.
fn shard_path(dir: &Path, index: &Path, name: &str, file: &str) -> Result<PathBuf, EngineError> {
    let entry = format!("weight_map[`{name}`] = `{file}`");
    let rel = Path::new(file);
    if file.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(weights_err(
            index,
            format!(
                "{entry}: a shard must be named by a relative path inside the model folder \
                 (no absolute path, no `..` or `.`)"
            ),
        ));
    }
    let joined = dir.join(rel);
    let resolved = joined.canonicalize().map_err(|e| {
        weights_err(
            index,
            format!("{entry}: shard `{file}` listed in weight_map is missing or unreadable ({e})"),
        )
    })?;
    let root = dir.canonicalize().map_err(|e| EngineError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    if !resolved.starts_with(&root) {
        return Err(weights_err(
            index,
            format!("{entry}: the shard resolves to a file outside the model folder"),
        ));
    }
    Ok(resolved)
}

/// Reads `model.safetensors.index.json` and groups the tensor names by shard file.
fn read_index(
    dir: &Path,
    index: &Path,
) -> Result<BTreeMap<PathBuf, BTreeSet<String>>, EngineError> {
    let text = files::read_to_string(index, files::JSON_LIMIT).map_err(|e| EngineError::Io {
        path: index.display().to_string(),
        source: e,
    })?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| weights_err(index, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| weights_err(index, "missing object field `weight_map`"))?;
    // Shard names repeat for every tensor: resolve each distinct one once.
    let mut resolved: HashMap<&str, PathBuf> = HashMap::new();
    let mut by_file: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| {
            weights_err(index, format!("weight_map[`{name}`] must be a file name"))
        })?;
        let path = match resolved.get(file) {
            Some(p) => p.clone(),
            None => {
                let p = shard_path(dir, index, name, file)?;
                resolved.insert(file, p.clone());
                p
            }
        };
        by_file.entry(path).or_default().insert(name.clone());
    }
    Ok(by_file)
}

fn gpt2_prefix_of<'a>(mut names: impl Iterator<Item = &'a String>) -> &'static str {
    if names.any(|k| k.starts_with("transformer.")) {
        "transformer."
    } else {
        ""
    }
}

/// The token embedding's tensor name among `names` (a GPT-2 checkpoint's may be prefixed).
fn embedding_name_of<'a>(
    arch: Architecture,
    names: impl Iterator<Item = &'a String>,
) -> &'static str {
    match arch {
        Architecture::Llama => "model.embed_tokens.weight",
        Architecture::Gpt2 => {
            if gpt2_prefix_of(names).is_empty() {
                "wte.weight"
            } else {
                "transformer.wte.weight"
            }
        }
    }
}

/// Checks that `shapes` (tensor name → shape in canonical `[out, in]` orientation) holds every
/// tensor the config implies, with the implied shape. Cheap whatever the config claims: the
/// layer count is first compared with the blocks present, and the expected tensors are
/// generated one at a time, so nothing is allocated in proportion to a config value.
///
/// `config_path` names the config in errors about its fields, `origin` the weights.
pub(crate) fn check_shapes(
    c: &ModelConfig,
    shapes: &BTreeMap<String, Vec<usize>>,
    config_path: &Path,
    origin: &Path,
) -> Result<(), EngineError> {
    let blocks_present = shapes
        .keys()
        .filter_map(|n| layers::block_index(n))
        .max()
        .map_or(0, |b| b.saturating_add(1));
    if c.num_layers > blocks_present {
        let first_missing = match c.arch {
            Architecture::Llama => format!("model.layers.{blocks_present}.self_attn.q_proj.weight"),
            Architecture::Gpt2 => format!(
                "{}h.{blocks_present}.attn.c_attn.weight",
                gpt2_prefix_of(shapes.keys())
            ),
        };
        return Err(EngineError::Config {
            path: config_path.display().to_string(),
            message: format!(
                "field `{}` is {} but the weights hold {blocks_present} blocks \
                 (missing tensor `{first_missing}`)",
                c.layers_field(),
                c.num_layers
            ),
        });
    }
    // Products saturate: an absurd value then matches no real tensor and is reported as a
    // shape mismatch (the config's own check already bounds them).
    let m = |a: usize, b: usize| a.saturating_mul(b);
    let (h, i, q, kv) = (
        c.hidden_size,
        c.intermediate_size,
        m(c.num_heads, c.head_dim),
        m(c.num_kv_heads, c.head_dim),
    );
    let expect = |name: &str, shape: &[usize]| -> Result<(), EngineError> {
        let Some(found) = shapes.get(name) else {
            return Err(weights_err(
                origin,
                format!(
                    "missing tensor `{name}` that config.json ({} layers) implies",
                    c.num_layers
                ),
            ));
        };
        if found.as_slice() != shape {
            return Err(weights_err(
                origin,
                format!("tensor `{name}` has shape {found:?}, config.json implies {shape:?}"),
            ));
        }
        Ok(())
    };
    match c.arch {
        Architecture::Llama => {
            expect("model.embed_tokens.weight", &[c.vocab_size, h])?;
            for b in 0..c.num_layers {
                let p = format!("model.layers.{b}");
                expect(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?;
                expect(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?;
                expect(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?;
                expect(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?;
                expect(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
                expect(&format!("{p}.mlp.up_proj.weight"), &[i, h])?;
                expect(&format!("{p}.mlp.down_proj.weight"), &[h, i])?;
                expect(&format!("{p}.input_layernorm.weight"), &[h])?;
                expect(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
            }
            expect("model.norm.weight", &[h])?;
            if !c.tie_word_embeddings {
                expect("lm_head.weight", &[c.vocab_size, h])?;
            }
        }
        Architecture::Gpt2 => {
            let p0 = gpt2_prefix_of(shapes.keys());
            expect(&format!("{p0}wte.weight"), &[c.vocab_size, h])?;
            expect(&format!("{p0}wpe.weight"), &[c.max_position_embeddings, h])?;
            for b in 0..c.num_layers {
                let p = format!("{p0}h.{b}");
                expect(
                    &format!("{p}.attn.c_attn.weight"),
                    &[m(2, q).saturating_add(h), h],
                )?;
                expect(&format!("{p}.attn.c_proj.weight"), &[h, q])?;
                expect(&format!("{p}.mlp.c_fc.weight"), &[i, h])?;
                expect(&format!("{p}.mlp.c_proj.weight"), &[h, i])?;
                expect(&format!("{p}.ln_1.weight"), &[h])?;
                expect(&format!("{p}.ln_2.weight"), &[h])?;
            }
            expect(&format!("{p0}ln_f.weight"), &[h])?;
        }
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
            packed: BTreeMap::new(),
            packed_checkpoint: false,
            dense_reasons: BTreeMap::new(),
        };
        model.check_tensors(Path::new(&model.source))?;
        Ok(model)
    }

    /// Loads `config.json` plus `model.safetensors` (or a sharded `model.safetensors.index.json`).
    ///
    /// Every header is read and checked against the config (names, shapes, dtypes) before any
    /// tensor data is read, so a config or header that claims more than the files hold fails
    /// without allocating for it.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        Self::load_packing(dir, &mut |_, _| {
            Ok(LoadPacking {
                packed: None,
                why_dense: None,
            })
        })
    }

    /// [`Model::load`], handing each linear the forward pass runs (the LM head too: the
    /// embedding table when tied) to `pack` as it is read, in canonical orientation. A layer it
    /// packs keeps no dense tensor, so a pruned model loads in about its packed size instead
    /// of its dense size plus the packed copies. Layers a packed checkpoint stores packed are
    /// not offered. A model with any layer packed here, or left dense with a reason, counts as
    /// packed ([`Model::is_packed`]): the hook made its kernel decisions.
    pub fn load_packing(
        dir: &Path,
        pack: &mut dyn FnMut(&str, &Tensor) -> Result<LoadPacking, EngineError>,
    ) -> Result<Self, EngineError> {
        if !dir.is_dir() {
            return Err(weights_err(
                dir,
                "not a directory: expected a Hugging Face–style model directory with config.json and model.safetensors",
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(weights_err(dir, "missing config.json"));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        // (header, the tensors the index assigns to it; `None` for a single file)
        let mut shards: Vec<(Header, Option<BTreeSet<String>>)> = Vec::new();
        if single.exists() {
            shards.push((read_header(&single)?, None));
        } else if index.exists() {
            for (path, names) in read_index(dir, &index)? {
                let header = read_header(&path)?;
                if let Some(name) = names.iter().find(|n| header.meta.info(n).is_none()) {
                    return Err(weights_err(
                        &path,
                        format!(
                            "holds no tensor `{name}`, which model.safetensors.index.json assigns to it"
                        ),
                    ));
                }
                shards.push((header, Some(names)));
            }
        } else {
            return Err(weights_err(
                dir,
                "missing model.safetensors (or model.safetensors.index.json for sharded weights)",
            ));
        }
        let mut shapes: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (header, only) in &shards {
            header.check_dtypes(only.as_ref())?;
            for (name, info) in header.tensors(only.as_ref()) {
                let mut shape = info.shape.clone();
                if layers::stored_transposed(&name, config.arch) && shape.len() == 2 {
                    shape.reverse();
                }
                shapes.insert(name, shape);
            }
        }
        // A packed checkpoint: its linears come from packed.safetensors, checked layer by layer.
        let packed_path = dir.join(crate::packed::PACKED_FILE);
        let packed_checkpoint = packed_path.exists();
        let packed = if packed_checkpoint {
            crate::packed::read_packed(&packed_path)?
        } else {
            BTreeMap::new()
        };
        for (name, layer) in &packed {
            let shape = vec![layer.rows(), layer.cols()];
            match shapes.get(name) {
                // Only a tied embedding is stored both ways (its packed copy is the LM head).
                Some(dense) if *dense != shape => {
                    return Err(weights_err(
                        &packed_path,
                        format!(
                            "layer `{name}` is {}x{} but model.safetensors holds it as {dense:?}",
                            layer.rows(),
                            layer.cols()
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    shapes.insert(name.clone(), shape);
                }
            }
        }
        check_shapes(&config, &shapes, &config_path, dir)?;

        // The linears the forward pass runs, by weight name (the LM head as the embedding
        // table when tied), and which of them is also the embedding looked up.
        let embedding = embedding_name_of(config.arch, shapes.keys());
        let head_is_embedding = match config.arch {
            Architecture::Llama => config.tie_word_embeddings,
            Architecture::Gpt2 => {
                config.tie_word_embeddings || !shapes.contains_key("lm_head.weight")
            }
        };
        let offered = |name: &str| match layers::role_of(name, config.arch) {
            Role::LmHead => !head_is_embedding && name == "lm_head.weight",
            Role::Embedding => head_is_embedding && name == embedding,
            role => role.is_block_linear() && name.ends_with(".weight"),
        };
        drop(shapes);

        let mut packed: BTreeMap<String, Arc<PackedKernel>> = packed
            .into_iter()
            .map(|(name, layer)| (name, Arc::new(PackedKernel::new(layer))))
            .collect();
        let mut packed_here = false;
        let mut dense_reasons = BTreeMap::new();
        let mut weights = BTreeMap::new();
        for (header, only) in &shards {
            header.read_tensors(config.arch, only.as_ref(), &mut |name, tensor| {
                if offered(&name) && tensor.rank() == 2 && !packed.contains_key(&name) {
                    let decided = pack(&name, &tensor)?;
                    if let Some(why) = decided.why_dense {
                        dense_reasons.insert(name.clone(), why);
                    }
                    if let Some(layer) = decided.packed {
                        if [layer.rows(), layer.cols()] != tensor.dims() {
                            return Err(weights_err(
                                &header.path,
                                format!(
                                    "layer `{name}` packed as {}x{} but its tensor is {:?}",
                                    layer.rows(),
                                    layer.cols(),
                                    tensor.dims()
                                ),
                            ));
                        }
                        packed.insert(name.clone(), Arc::new(PackedKernel::new(layer)));
                        packed_here = true;
                        if name != embedding {
                            return Ok(());
                        }
                    }
                }
                weights.insert(name, tensor);
                Ok(())
            })?;
        }
        Ok(Model {
            config,
            weights,
            source: dir.display().to_string(),
            source_dir: Some(dir.to_path_buf()),
            packed,
            packed_checkpoint: packed_checkpoint || packed_here || !dense_reasons.is_empty(),
            dense_reasons,
        })
    }

    /// Checks that the tensors the architecture needs exist with shapes that match the config.
    fn check_tensors(&self, origin: &Path) -> Result<(), EngineError> {
        let shapes: BTreeMap<String, Vec<usize>> = self
            .weights
            .iter()
            .map(|(n, t)| (n.clone(), t.dims().to_vec()))
            .collect();
        check_shapes(&self.config, &shapes, origin, origin)
    }

    /// `"transformer."` when a GPT-2 checkpoint was saved from the LM-head model, else `""`.
    pub fn gpt2_prefix(&self) -> &'static str {
        gpt2_prefix_of(self.weights.keys())
    }

    /// Name of the token embedding tensor.
    pub fn embedding_name(&self) -> &'static str {
        embedding_name_of(self.config.arch, self.weights.keys())
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

    /// Removes the tensor `name` from the model and returns it (`None` when there is none):
    /// for a caller that has handed the weight to a forward pass in another form (a packed
    /// kernel) and keeps the model only for its configuration and tokenizer, so the dense copy's
    /// memory is freed.
    pub fn remove_weight(&mut self, name: &str) -> Option<Tensor> {
        self.weights.remove(name)
    }

    /// Puts back a weight [`Model::remove_weight`] took out (or rebuilt exactly from its packed
    /// form): a run that evaluates its pruned model without the dense copies held, then
    /// exports them.
    pub fn restore_weight(&mut self, name: &str, tensor: Tensor) {
        self.weights.insert(name.to_string(), tensor);
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

    /// Total number of elements over all floating-point tensors (a packed linear counts as
    /// its dense shape).
    pub fn num_parameters(&self) -> usize {
        let packed: usize = self
            .packed
            .iter()
            .filter(|(name, _)| !self.weights.contains_key(*name))
            .map(|(_, k)| k.packed().rows() * k.packed().cols())
            .sum();
        self.weights
            .values()
            .filter(|t| t.dtype() == DType::F32)
            .map(|t| t.elem_count())
            .sum::<usize>()
            + packed
    }

    /// The linears a packed checkpoint stores packed, by weight name (empty for any other
    /// model).
    pub fn packed_layers(&self) -> &BTreeMap<String, Arc<PackedKernel>> {
        &self.packed
    }

    /// Whether the model was loaded packed: from a packed checkpoint (its layers run as the
    /// export's planner packed them) or through a [`Model::load_packing`] hook. It cannot be
    /// pruned further (prune the original instead).
    pub fn is_packed(&self) -> bool {
        self.packed_checkpoint
    }

    /// Why a [`Model::load_packing`] hook left linears dense, by weight name (empty for any
    /// other model).
    pub fn dense_reasons(&self) -> &BTreeMap<String, String> {
        &self.dense_reasons
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (which must exist), each through a
    /// temporary file and a rename, plus the companion files of the source directory.
    pub fn save_into(&self, dir: &Path) -> Result<(), EngineError> {
        self.save_into_except(dir, &BTreeSet::new())
    }

    /// [`Model::save_into`] without the tensors named in `skip` (a packed checkpoint stores
    /// them in `packed.safetensors`).
    pub fn save_into_except(&self, dir: &Path, skip: &BTreeSet<String>) -> Result<(), EngineError> {
        let mut out: HashMap<String, Tensor> = HashMap::with_capacity(self.weights.len());
        for (name, t) in self.weights.iter().filter(|(n, _)| !skip.contains(*n)) {
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
                if from.exists() {
                    let bytes =
                        files::read(&from, files::JSON_LIMIT).map_err(|e| EngineError::Io {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::builtin_model;

    fn saved(name: &str) -> (tempfile::TempDir, Model) {
        let dir = tempfile::tempdir().unwrap();
        let m = builtin_model(name).unwrap();
        m.save_into(dir.path()).unwrap();
        (dir, m)
    }

    fn load_err(dir: &Path) -> String {
        Model::load(dir).unwrap_err().to_string()
    }

    /// The hook is offered exactly the linears the forward pass runs (the tied LM head as the
    /// embedding); a layer it packs keeps no dense tensor (a tied embedding keeps its table),
    /// the model then runs on the packed forms, and a packed form of the wrong shape is refused.
    #[test]
    fn load_packing_offers_the_forward_pass_linears_and_drops_their_dense_copies() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let (dir, original) = saved(name);
            let mut offered = BTreeSet::new();
            let loaded = Model::load_packing(dir.path(), &mut |n, t| {
                offered.insert(n.to_string());
                let [rows, cols] = t.dims() else {
                    panic!("{n} is not 2-D")
                };
                let w: Vec<f32> = t.flatten_all()?.to_vec1()?;
                Ok(LoadPacking {
                    packed: Some(
                        PackedLinear::dense(&w, [*rows, *cols], espalier_kernels::Dtype::F32)
                            .map_err(EngineError::kernel)?,
                    ),
                    why_dense: None,
                })
            })
            .unwrap();
            assert!(loaded.is_packed(), "{name}");
            let dense = crate::Session::new(&original).unwrap();
            let linears: BTreeSet<String> = dense
                .linears()
                .iter()
                .map(|l| l.name().to_string())
                .collect();
            assert_eq!(offered, linears, "{name}");
            let embedding = loaded.embedding_name();
            for l in &linears {
                assert!(loaded.packed_layers().contains_key(l), "{name}: {l}");
                assert_eq!(loaded.weight(l).is_some(), l == embedding, "{name}: {l}");
            }
            let session = crate::Session::new(&loaded).unwrap();
            assert!(session.linears().iter().all(|l| l.kind() != "dense"));
            let tokens = [1u32, 5, 9, 2];
            let logits = |s: &crate::Session| -> Vec<f32> {
                let l = s.forward(&tokens, None).unwrap();
                l.flatten_all().unwrap().to_vec1().unwrap()
            };
            let (want, got) = (logits(&dense), logits(&session));
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "{name}: {diff}");

            let err = Model::load_packing(dir.path(), &mut |_, _| {
                Ok(LoadPacking {
                    packed: Some(
                        PackedLinear::dense(&[0.0; 6], [2, 3], espalier_kernels::Dtype::F32)
                            .map_err(EngineError::kernel)?,
                    ),
                    why_dense: None,
                })
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains("packed as 2x3 but its tensor is"), "{err}");
            // A hook that only gives reasons still made the kernel decisions.
            let reasoned = Model::load_packing(dir.path(), &mut |_, _| {
                Ok(LoadPacking {
                    packed: None,
                    why_dense: Some("not pruned".into()),
                })
            })
            .unwrap();
            assert!(reasoned.is_packed() && reasoned.packed_layers().is_empty());
            assert_eq!(reasoned.dense_reasons().len(), linears.len());
            assert!(!Model::load(dir.path()).unwrap().is_packed());
        }
    }

    /// A side file is read tensor by tensor in its stored dtype; a dtype it does not read is
    /// refused naming the tensor, and a file whose header does not match its length is refused
    /// before any data is read.
    #[test]
    fn tensor_files_read_one_tensor_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("side.safetensors");
        let mut tensors = HashMap::new();
        tensors.insert(
            "b.mask".to_string(),
            Tensor::from_vec(vec![1u8, 0, 1, 1, 0, 0], (2, 3), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "a.scale".to_string(),
            Tensor::from_vec(vec![0.5f32, 2.0], 2, &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "c.count".to_string(),
            Tensor::from_vec(vec![7i64], 1, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let mut file = TensorFile::open(&path).unwrap();
        let mut names = file.names();
        names.sort();
        assert_eq!(names, ["a.scale", "b.mask", "c.count"]);
        let mask = file.read("b.mask").unwrap().unwrap();
        assert_eq!(mask.dims(), [2, 3]);
        assert_eq!(
            mask.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            [1, 0, 1, 1, 0, 0]
        );
        let scale = file.read("a.scale").unwrap().unwrap();
        assert_eq!(scale.to_vec1::<f32>().unwrap(), [0.5, 2.0]);
        assert!(file.read("missing").unwrap().is_none());
        let err = file.read("c.count").unwrap_err().to_string();
        assert!(err.contains("`c.count`") && err.contains("I64"), "{err}");
        // Cut short: the header promises more than the file holds.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("describes") && err.contains("side.safetensors"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn non_regular_model_files_are_refused_without_hanging() {
        let (dir, _) = saved("tiny-llama");
        let p = dir.path();
        // config.json and model.safetensors as links to /dev/zero (an endless read).
        let config = p.join("config.json");
        let text = std::fs::read(&config).unwrap();
        std::fs::remove_file(&config).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &config).unwrap();
        let err = load_err(p);
        assert!(
            err.contains("config.json") && err.contains("not a regular file"),
            "{err}"
        );
        std::fs::remove_file(&config).unwrap();
        std::fs::write(&config, &text).unwrap();

        let weights = p.join("model.safetensors");
        std::fs::rename(&weights, p.join("w")).unwrap();
        std::fs::create_dir(&weights).unwrap();
        let err = load_err(p);
        assert!(
            err.contains("model.safetensors") && err.contains("not a regular file"),
            "{err}"
        );
        std::fs::remove_dir(&weights).unwrap();
        std::fs::rename(p.join("w"), &weights).unwrap();

        // tokenizer.json as a FIFO: opening it for reading would block forever.
        let tok = p.join("tokenizer.json");
        let c = std::ffi::CString::new(tok.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = crate::Tokenizer::from_model_dir(p).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not a regular file"),
            "{err}"
        );
        Model::load(p).unwrap();
    }

    /// Writes the tiny model as one shard named by an index whose entries all say `file`.
    fn sharded(file: &str) -> (tempfile::TempDir, PathBuf) {
        let (dir, m) = saved("tiny-llama");
        let p = dir.path();
        std::fs::rename(p.join("model.safetensors"), p.join("shard.safetensors")).unwrap();
        let map: serde_json::Map<String, Value> = m
            .weights()
            .keys()
            .map(|k| (k.clone(), json!(file)))
            .collect();
        let index = p.join("model.safetensors.index.json");
        std::fs::write(&index, json!({"weight_map": map}).to_string()).unwrap();
        (dir, index)
    }

    #[test]
    fn shard_paths_stay_inside_the_model_folder() {
        let (dir, _) = sharded("shard.safetensors");
        Model::load(dir.path()).unwrap();

        let outside = tempfile::tempdir().unwrap();
        let (dir, _) = saved("tiny-llama");
        std::fs::copy(
            dir.path().join("model.safetensors"),
            outside.path().join("stolen.safetensors"),
        )
        .unwrap();
        let abs = outside.path().join("stolen.safetensors");
        for file in [
            "../stolen.safetensors",
            "sub/../shard.safetensors",
            "./shard.safetensors",
            abs.to_str().unwrap(),
        ] {
            let (dir, _) = sharded(file);
            let err = load_err(dir.path());
            assert!(
                err.contains("model.safetensors.index.json")
                    && err.contains(&format!("= `{file}`"))
                    && err.contains("inside the model folder"),
                "{file}: {err}"
            );
        }
        #[cfg(unix)]
        {
            let (dir, _) = sharded("link.safetensors");
            std::os::unix::fs::symlink(&abs, dir.path().join("link.safetensors")).unwrap();
            let err = load_err(dir.path());
            assert!(
                err.contains("`link.safetensors`") && err.contains("outside the model folder"),
                "{err}"
            );
        }
    }

    fn with_config(edit: impl FnOnce(&mut Value)) -> String {
        let (dir, m) = saved("tiny-llama");
        let mut raw = m.config.raw.clone();
        edit(&mut raw);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        load_err(dir.path())
    }

    #[test]
    fn config_sizes_are_checked_before_anything_is_sized_by_them() {
        let started = std::time::Instant::now();
        // Millions of layers: refused from the blocks the weights hold, at once.
        let err = with_config(|c| c["num_hidden_layers"] = json!(60_000));
        assert!(
            err.contains("config.json")
                && err.contains("`num_hidden_layers` is 60000")
                && err.contains("hold 2 blocks"),
            "{err}"
        );
        let err = with_config(|c| c["num_hidden_layers"] = json!(u64::MAX));
        assert!(err.contains("`num_hidden_layers`"), "{err}");
        // Absurd sizes and products that overflow.
        for (field, value) in [
            ("hidden_size", json!(1u64 << 40)),
            ("vocab_size", json!(u64::MAX)),
            ("num_attention_heads", json!(1u64 << 25)),
            ("max_position_embeddings", json!(u64::MAX)),
        ] {
            let err = with_config(|c| c[field] = value.clone());
            assert!(
                err.contains("config.json") && err.contains(field),
                "{field}: {err}"
            );
        }
        let err = with_config(|c| {
            c["head_dim"] = json!(1 << 20);
            c["num_attention_heads"] = json!(1 << 20);
            c["num_key_value_heads"] = json!(1 << 20);
        });
        assert!(err.contains("num_attention_heads × head_dim"), "{err}");
        // Plausible sizes that the tensors contradict.
        let err = with_config(|c| c["intermediate_size"] = json!(4096));
        assert!(
            err.contains("mlp.gate_proj.weight") && err.contains("4096"),
            "{err}"
        );
        assert!(started.elapsed().as_secs() < 10);
    }

    #[test]
    fn gpt2_configs_are_bounded_too() {
        let (dir, m) = saved("tiny-gpt2");
        let mut raw = m.config.raw.clone();
        raw["n_embd"] = json!(u64::MAX / 2);
        raw["n_head"] = json!(1);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains("hidden_size"), "{err}");
        raw = m.config.raw.clone();
        raw["n_layer"] = json!(1_000_000);
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains("`n_layer`"), "{err}");
    }

    #[test]
    fn integer_weights_are_refused_naming_the_tensor() {
        let (dir, m) = saved("tiny-llama");
        let mut out: HashMap<String, Tensor> = m
            .weights()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (dtype, name) in [
            (DType::I64, "model.norm.weight"),
            (DType::U8, "model.layers.0.mlp.up_proj.weight"),
            (DType::U32, "extra.buffer"),
        ] {
            let mut out = out.clone();
            let t = m
                .weight(if name == "extra.buffer" {
                    "model.norm.weight"
                } else {
                    name
                })
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            out.insert(name.to_string(), t);
            let path = dir.path().join("model.safetensors");
            candle_core::safetensors::save(&out, &path).unwrap();
            let err = load_err(dir.path());
            assert!(
                err.contains(&format!("`{name}`"))
                    && err.contains(&format!("{:?}", dtype).to_uppercase())
                    && err.contains("integer"),
                "{err}"
            );
        }
        // Half-precision weights are widened, as before.
        out = out
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&out, dir.path().join("model.safetensors")).unwrap();
        let back = Model::load(dir.path()).unwrap();
        assert_eq!(
            back.weight("model.norm.weight").unwrap().dtype(),
            DType::F32
        );
    }

    #[test]
    fn headers_that_overstate_the_file_are_refused() {
        let (dir, _) = saved("tiny-llama");
        let path = dir.path().join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        // Header length larger than the file.
        let real = bytes[..8].to_vec();
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(dir.path());
        assert!(
            err.contains("not a valid safetensors") && err.contains("header length"),
            "{err}"
        );
        // Data shorter than the header says.
        bytes[..8].copy_from_slice(&real);
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&path, &bytes).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains("describes") && err.contains("bytes"), "{err}");
    }
}
