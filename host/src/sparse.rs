//! Runs a pruned model on Espalier's own sparse kernels: every masked linear is packed in the
//! format the kernels' planner picks from its mask (structure, density, shape) and plugged into
//! the engine's forward pass; layers where sparse would be slower stay on the engine's dense
//! f32 path (its own GEMV for decode steps, candle's GEMM for prefill).

use std::collections::BTreeMap;
use std::sync::Arc;

use espalier_engine::{EngineError, Model, PackedKernel, Session};
use espalier_kernels::{
    Choice, DenseView, Dtype, Format, PackedLinear, Structure as KStructure, choose_format,
};

use crate::evaluate::KernelUse;
use crate::mask::{Mask, Structure};
use crate::tensor_util::with_f32;

/// The planner's structure hint for a mask.
fn hint(s: Structure) -> KStructure {
    match s {
        Structure::Blocks { rows, cols } => KStructure::Blocks { br: rows, bc: cols },
        Structure::NOfM { n, m } => KStructure::NM { n, m },
        Structure::Rows | Structure::RowGroups { .. } => KStructure::Rows,
        Structure::Columns | Structure::ColumnGroups { .. } => KStructure::Columns,
        Structure::Unstructured => KStructure::Unstructured,
    }
}

/// Weight storage for sparse and dense layers alike: anything but f32 packs every linear (the
/// LM head too) in that dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// f32 (exact).
    #[default]
    F32,
    /// bf16 with f32 accumulation (half the bytes; rounds weights).
    Bf16,
    /// int8 with a per-output-row f32 scale and f32 accumulation (a quarter of the bytes;
    /// quantizes weights, masked ones stay exact zeros).
    Int8,
}

impl Storage {
    /// The setting's name in pipelines and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "f32",
            Storage::Bf16 => "bf16",
            Storage::Int8 => "int8",
        }
    }

    /// The kernels' dtype of this storage.
    pub fn dtype(self) -> Dtype {
        match self {
            Storage::F32 => Dtype::F32,
            Storage::Bf16 => Dtype::Bf16,
            Storage::Int8 => Dtype::I8,
        }
    }

    /// The storage whose kernels' dtype is `dtype`.
    pub fn of_dtype(dtype: Dtype) -> Storage {
        match dtype {
            Dtype::F32 => Storage::F32,
            Dtype::Bf16 => Storage::Bf16,
            Dtype::I8 => Storage::Int8,
        }
    }

    /// Reads a name written by [`Storage::name`].
    pub fn from_name(name: &str) -> Option<Storage> {
        [Storage::F32, Storage::Bf16, Storage::Int8]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// What [`attach`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Attached {
    /// Layers per packed format (layers left on the engine's dense f32 path are not listed).
    pub formats: BTreeMap<String, usize>,
    /// Bytes of all model tensors as loaded (f32).
    pub model_bytes: usize,
    /// Bytes of the weights the forward pass holds after packing.
    pub packed_model_bytes: usize,
    /// Every linear's kernel (the engine's dense f32 path counted as `dense`) and why layers stayed dense.
    pub kernels: KernelUse,
    /// The storage every packed layer shares: `None` when nothing was packed (all on the
    /// engine's dense f32 path) and for a packed checkpoint whose layers differ in dtype.
    #[serde(skip)]
    pub packed_storage: Option<Storage>,
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::I8 => "int8",
    }
}

/// Why the planner kept a pruned layer dense, in words a summary can group: the structure,
/// the kept share rounded to 5%, and the best sparse format with its estimated cost relative
/// to dense (bytes read at batch 1, compute floors included).
fn dense_reason(mask: &Mask, choice: &Choice, dtype: Dtype) -> String {
    let dense_cost = choice
        .candidates
        .iter()
        .find(|c| c.format == Format::Dense)
        .map_or(1.0, |c| c.cost.max(1.0));
    let best_sparse = choice
        .candidates
        .iter()
        .filter(|c| c.format != Format::Dense)
        .min_by(|a, b| a.cost.total_cmp(&b.cost));
    let kept = (mask.density() * 20.0).round() * 5.0;
    let dtype = dtype_name(dtype);
    match best_sparse {
        Some(c) => format!(
            "{} at ~{kept:.0}% kept: dense {dtype} is faster (best sparse format {}, est. {:.1}x dense's cost; see `espalier bench kernels`)",
            mask.structure(),
            c.format,
            c.cost / dense_cost
        ),
        None => format!(
            "{} at ~{kept:.0}% kept: no sparse format applies",
            mask.structure()
        ),
    }
}

/// What the planner made of one linear.
struct Planned {
    /// Its packed form; `None` where it stays on the engine's dense f32 path (our GEMV on the
    /// tensor's own storage for decode, candle's GEMM for prefill: packing dense f32 would only
    /// copy it).
    packed: Option<PackedLinear>,
    /// Why it runs a dense kernel (packed dense in `storage`, or on the dense f32 path).
    why_dense: Option<String>,
}

/// Plans linear `name` (weight `weight`, `[out, in]`) from its mask: the format the kernels'
/// planner finds fastest in `storage`'s dtype, packed.
fn plan_layer(
    name: &str,
    weight: &candle_core::Tensor,
    mask: Option<&Mask>,
    storage: Storage,
) -> Result<Planned, EngineError> {
    let &[rows, cols] = weight.dims() else {
        return Err(EngineError::Input(format!(
            "linear `{name}` has shape {:?}, not 2-D",
            weight.dims()
        )));
    };
    if let Some(m) = mask
        && m.shape() != weight.dims()
    {
        return Err(EngineError::Input(format!(
            "linear `{name}`: its mask is {:?} but the weight is {:?}",
            m.shape(),
            weight.dims()
        )));
    }
    let dtype = storage.dtype();
    if mask.is_none() && storage == Storage::F32 {
        return Ok(Planned {
            packed: None,
            why_dense: Some("not pruned".to_string()),
        });
    }
    let (packed, why_dense) = with_f32(weight, |w| -> Result<_, EngineError> {
        match mask {
            Some(m) => {
                let view =
                    DenseView::with_mask(w, m.keep(), rows, cols).map_err(EngineError::kernel)?;
                let choice = choose_format(name, &view, hint(m.structure()), dtype)
                    .map_err(EngineError::kernel)?;
                let reason =
                    (choice.format == Format::Dense).then(|| dense_reason(m, &choice, dtype));
                let packed = PackedLinear::pack(name, &view, choice.format, dtype)
                    .map_err(EngineError::kernel)?;
                Ok((packed, reason))
            }
            None => Ok((
                PackedLinear::dense(w, [rows, cols], dtype).map_err(EngineError::kernel)?,
                Some("not pruned".to_string()),
            )),
        }
    })
    .map_err(EngineError::kernel)??;
    let packed = (packed.format() != Format::Dense || storage != Storage::F32).then_some(packed);
    Ok(Planned { packed, why_dense })
}

/// The kernel summary's name of a packed layer: format and dtype (a compact layer's kept shape
/// left out, so such layers group).
fn packed_kind(packed: &PackedLinear) -> String {
    format!("{}/{}", packed.format(), dtype_name(packed.dtype()))
}

/// Loads the pruned export in `dir` (an `espalier run` export: dense weights with zeros, and
/// `masks.safetensors`) with each masked linear planned and packed as it is read, exactly as
/// [`attach`] would pack it: the dense copy of a packed layer is never held beside the packed
/// one, so loading peaks at about the pruned model's size rather than the dense model's plus
/// the packed copies. The storage is `storage`, by default the one the export's run evaluated
/// it in (its `report.json`), else f32; it is returned with the model. `None` when `dir` holds
/// no masks, or is a packed checkpoint (whose layers load as its export packed them).
///
/// The model counts as packed ([`Model::is_packed`]); [`attach`] then reports its kernels and
/// why layers stayed dense without planning again.
pub fn load_pruned_export(
    dir: &std::path::Path,
    storage: Option<Storage>,
) -> Result<Option<(Model, Storage)>, EngineError> {
    // A packed checkpoint already carries its planner's decisions.
    if dir.join(espalier_engine::packed::PACKED_FILE).exists() {
        return Ok(None);
    }
    let Some(mut masks) = crate::export::MaskFile::open(dir).map_err(EngineError::Input)? else {
        return Ok(None);
    };
    let storage = storage.or(masks.evaluated_storage()).unwrap_or_default();
    let model = Model::load_packing(dir, &mut |name, weight| {
        let mask = masks.read(name).map_err(EngineError::Input)?;
        let planned = plan_layer(name, weight, mask.as_ref(), storage).map_err(|e| match e {
            // A mask that does not fit its weight: the file is at fault.
            EngineError::Input(m) => EngineError::Input(format!(
                "{}: {m}: these masks do not belong to this model",
                masks.path().display()
            )),
            e => e,
        })?;
        Ok(espalier_engine::LoadPacking {
            packed: planned.packed,
            why_dense: planned.why_dense,
        })
    })?;
    Ok(Some((model, storage)))
}

/// Loads a model to run it (`generate`, the daemon's OpenAI API, `eval`): with `use_masks`, a
/// pruned export through [`load_pruned_export`]; anything else (a model folder, a packed
/// checkpoint, `builtin:NAME`) as it is. Returns the storage its linears are to run in:
/// `storage`, or the pruned export's default, else f32.
pub fn load_to_run(
    reference: &str,
    storage: Option<Storage>,
    use_masks: bool,
) -> Result<(Model, Storage), EngineError> {
    if use_masks
        && !reference.starts_with("builtin:")
        && let Some(loaded) = load_pruned_export(std::path::Path::new(reference), storage)?
    {
        return Ok(loaded);
    }
    Ok((
        espalier_engine::load_model(reference)?,
        storage.unwrap_or_default(),
    ))
}

/// The storage [`load_to_run`] runs `dir` in by default, read without loading it: a packed
/// checkpoint's (when its layers share one dtype), else the storage a pruned export's run
/// evaluated it in (its `report.json`), else f32.
pub fn served_storage(dir: &std::path::Path) -> Result<Storage, EngineError> {
    if let Some(storage) = checkpoint_storage(dir)? {
        return Ok(storage);
    }
    let masks = crate::export::MaskFile::open(dir).map_err(EngineError::Input)?;
    Ok(masks
        .and_then(|m| m.evaluated_storage())
        .unwrap_or_default())
}

/// The storage the layers of packed checkpoint `dir` share, from its header alone (`None`
/// when it has no packed file, or its layers differ in dtype).
pub fn checkpoint_storage(dir: &std::path::Path) -> Result<Option<Storage>, EngineError> {
    let path = dir.join(espalier_engine::packed::PACKED_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let dtypes = espalier_engine::packed::packed_dtypes(&path)?;
    Ok(match dtypes[..] {
        [dtype] => Some(Storage::of_dtype(dtype)),
        _ => None,
    })
}

/// Packs every masked linear of `model` that the planner finds faster sparse and points the
/// session at it. A model loaded packed (a packed checkpoint, or [`load_pruned_export`]) is
/// already on its kernels: its layers are only counted.
pub fn attach(
    session: &mut Session,
    model: &Model,
    masks: &BTreeMap<String, Mask>,
    storage: Storage,
) -> Result<Attached, EngineError> {
    let model_bytes = crate::evaluate::model_bytes(model) as usize;
    let mut saved = 0isize;
    // (name, kind) of every linear, read once: the loop below replaces kernels in `session`.
    let linears: Vec<(String, String)> = session
        .linears()
        .iter()
        .map(|l| (l.name().to_string(), l.kind().to_string()))
        .collect();
    let mut formats = BTreeMap::new();
    let mut kernels = KernelUse::default();
    let count = |map: &mut BTreeMap<String, usize>, key: String| {
        *map.entry(key).or_insert(0) += 1;
    };
    if model.is_packed() {
        // A packed model carries its planner's decisions: its layers already run packed (or on
        // the dense path) as planned when it was exported or loaded. Nothing is repacked.
        let mut packed_bytes = 0usize;
        for l in session.linears() {
            match model.packed_layers().get(l.name()) {
                Some(p) => {
                    count(&mut kernels.layers, packed_kind(p.packed()));
                    *formats.entry(p.packed().format_name()).or_insert(0) += 1;
                    packed_bytes += p.packed().bytes();
                }
                None => count(&mut kernels.layers, l.kind().to_string()),
            }
            if let Some(why) = model.dense_reasons().get(l.name()) {
                count(&mut kernels.dense_because, why.clone());
            }
        }
        let mut dtypes = model.packed_layers().values().map(|p| p.packed().dtype());
        let first = dtypes.next();
        let packed_storage = first
            .filter(|&d| dtypes.all(|other| other == d))
            .map(Storage::of_dtype);
        return Ok(Attached {
            packed_storage,
            formats,
            model_bytes: model_bytes
                + model
                    .packed_layers()
                    .iter()
                    .filter(|(n, _)| model.weight(n).is_none())
                    .map(|(_, p)| p.packed().rows() * p.packed().cols() * 4)
                    .sum::<usize>(),
            packed_model_bytes: model_bytes + packed_bytes,
            kernels,
        });
    }
    for (name, current_kind) in linears {
        let Some(weight) = model.weight(&name) else {
            continue;
        };
        let &[rows, cols] = weight.dims() else {
            count(&mut kernels.layers, current_kind);
            continue;
        };
        let planned = plan_layer(&name, weight, masks.get(&name), storage)?;
        if let Some(why) = planned.why_dense {
            count(&mut kernels.dense_because, why);
        }
        let Some(packed) = planned.packed else {
            count(&mut kernels.layers, current_kind);
            continue;
        };
        count(&mut kernels.layers, packed_kind(&packed));
        *formats.entry(packed.format_name()).or_insert(0) += 1;
        // A tied LM head is the embedding table, which the session keeps in f32 for its
        // look-ups: packing it adds its packed copy and frees nothing.
        let freed = if name == model.embedding_name() {
            0
        } else {
            rows * cols * 4
        };
        saved += freed as isize - packed.bytes() as isize;
        session.set_kernel(&name, Arc::new(PackedKernel::new(packed)))?;
    }
    Ok(Attached {
        // Everything packed here is packed in `storage`.
        packed_storage: (!formats.is_empty()).then_some(storage),
        formats,
        model_bytes,
        packed_model_bytes: (model_bytes as isize - saved).max(0) as usize,
        kernels,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::select;
    use crate::tensor_util::{apply_mask, with_f32};
    use candle_core::Tensor;
    use espalier_engine::KvCache;

    /// Prunes every block linear of a built-in model with `structure` at `density` (host
    /// selection on |w|), returning the masked model and its masks.
    pub(crate) fn pruned(
        name: &str,
        structure: Structure,
        density: f64,
    ) -> (Model, BTreeMap<String, Mask>) {
        let mut model = espalier_engine::load_model(name).unwrap();
        let mut masks = BTreeMap::new();
        for layer in model.block_linears() {
            let w = model.weight(&layer.name).unwrap().clone();
            let scores: Vec<f32> = with_f32(&w, |v| v.iter().map(|x| x.abs()).collect()).unwrap();
            let mask = select(&scores, &layer.shape, structure, density).unwrap();
            let pruned = apply_mask(&w, &mask).unwrap();
            model.set_weight(&layer.name, pruned, false).unwrap();
            masks.insert(layer.name.clone(), mask);
        }
        (model, masks)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
            / scale
    }

    #[test]
    fn sparse_forward_matches_dense_with_zeros() {
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 251) as u32).collect();
        for (model_name, structure, density) in [
            (
                "builtin:tiny-llama",
                Structure::Blocks { rows: 16, cols: 16 },
                0.25,
            ),
            ("builtin:tiny-llama", Structure::NOfM { n: 2, m: 4 }, 0.5),
            ("builtin:tiny-llama", Structure::Unstructured, 0.1),
            (
                "builtin:tiny-gpt2",
                Structure::Blocks { rows: 16, cols: 16 },
                0.2,
            ),
        ] {
            let (model, masks) = pruned(model_name, structure, density);
            let dense = Session::new(&model).unwrap();
            let mut sparse = Session::new(&model).unwrap();
            let formats = attach(&mut sparse, &model, &masks, Storage::F32)
                .unwrap()
                .formats;
            // Prefill (many tokens) and decode (one token) paths.
            for t in [&tokens[..], &tokens[..1]] {
                let a = dense.forward(t, None).unwrap();
                let b = sparse.forward(t, None).unwrap();
                let d = max_rel_diff(&a, &b);
                assert!(d <= 1e-4, "{model_name} {structure}: {d} ({formats:?})");
            }
        }
    }

    /// bf16 and int8 storage pack every linear (masked ones in their sparse format, the rest
    /// and the LM head dense) and stay close to the f32 logits: the rounding of the weights is
    /// the only difference.
    #[test]
    fn bf16_and_int8_storage_pack_every_linear_and_stay_close() {
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 % 251) as u32).collect();
        let (model, masks) = pruned("builtin:tiny-llama", Structure::NOfM { n: 2, m: 4 }, 0.5);
        let dense = Session::new(&model).unwrap();
        let want = dense.forward(&tokens, None).unwrap();
        for (storage, label, tolerance) in
            [(Storage::Bf16, "bf16", 2e-2), (Storage::Int8, "int8", 5e-2)]
        {
            let mut session = Session::new(&model).unwrap();
            let attached = attach(&mut session, &model, &masks, storage).unwrap();
            let linears = session.linears().len();
            let packed: usize = attached
                .kernels
                .layers
                .iter()
                .filter(|(k, _)| k.ends_with(label))
                .map(|(_, n)| n)
                .sum();
            assert_eq!(packed, linears, "{label}: {:?}", attached.kernels.layers);
            assert!(
                attached.packed_model_bytes < attached.model_bytes,
                "{label}"
            );
            for t in [&tokens[..], &tokens[..1]] {
                let got = session.forward(t, None).unwrap();
                let reference = dense.forward(t, None).unwrap();
                let d = max_rel_diff(&reference, &got);
                assert!(d <= tolerance, "{label}: {d}");
            }
            let d = max_rel_diff(&want, &session.forward(&tokens, None).unwrap());
            assert!(d > 0.0, "{label}: rounding must change something");
        }
    }

    /// A bf16 model of dense and bitmap layers decodes 2 or 3 sequences in one step exactly as
    /// it decodes each alone, where the CPU has the kernels that keep each token's GEMV
    /// arithmetic (elsewhere the batched kernels may differ in the last bits, and this checks
    /// only that they stay close).
    #[test]
    fn few_sequence_bf16_steps_equal_each_sequence_alone() {
        let (model, masks) = pruned("builtin:tiny-llama", Structure::Unstructured, 0.5);
        let mut session = Session::new(&model).unwrap();
        let attached = attach(&mut session, &model, &masks, Storage::Bf16).unwrap();
        let kinds: Vec<&String> = attached.kernels.layers.keys().collect();
        let exact = espalier_kernels::few_token_bf16_steps_exact()
            && kinds
                .iter()
                .all(|k| *k == "dense/bf16" || *k == "bitmap/bf16");
        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|p| (0..5 + 3 * p).map(|i| (i * 31 + p * 7 + 1) % 251).collect())
            .collect();
        for b in [2, 3] {
            let prompts = &prompts[..b];
            let mut alone: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
            let mut batched: Vec<KvCache> = prompts.iter().map(|_| KvCache::new()).collect();
            for ((p, a), c) in prompts.iter().zip(&mut alone).zip(&mut batched) {
                session.forward(p, Some(a)).unwrap();
                session.forward(p, Some(c)).unwrap();
            }
            let mut next: Vec<u32> = (0..b as u32).map(|i| 40 + i).collect();
            for step in 0..4 {
                let mut refs: Vec<&mut KvCache> = batched.iter_mut().collect();
                let together = session.decode_batch(&next, &mut refs).unwrap();
                for (i, cache) in alone.iter_mut().enumerate() {
                    let one = session.forward(&next[i..=i], Some(cache)).unwrap();
                    let row = together.narrow(0, i, 1).unwrap();
                    let ctx = format!("{b} sequences, step {step}, sequence {i} ({kinds:?})");
                    if exact {
                        let (x, y): (Vec<f32>, Vec<f32>) = (
                            one.flatten_all().unwrap().to_vec1().unwrap(),
                            row.flatten_all().unwrap().to_vec1().unwrap(),
                        );
                        assert_eq!(x, y, "{ctx}");
                    } else {
                        assert!(max_rel_diff(&one, &row) < 2e-2, "{ctx}");
                    }
                }
                next = next.iter().map(|t| (t * 7 + 3) % 251).collect();
            }
        }
        // On this kind of CPU the check above must have been the exact one.
        if espalier_kernels::few_token_bf16_steps_exact() {
            assert!(
                exact,
                "layers planned {kinds:?}: the test needs dense or bitmap ones"
            );
        }
    }

    /// A packed checkpoint loads without planning and computes exactly what the run's model
    /// computes with the same storage attached; in f32 it matches the dense-with-zeros export
    /// (1e-5 relative) and greedy decoding is token for token the evaluation path's.
    #[test]
    fn packed_checkpoints_round_trip_against_the_dense_export() {
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 % 251) as u32).collect();
        for (model_name, structure, density) in [
            (
                "builtin:tiny-llama",
                Structure::Blocks { rows: 16, cols: 16 },
                0.25,
            ),
            ("builtin:tiny-llama", Structure::NOfM { n: 2, m: 4 }, 0.5),
            ("builtin:tiny-llama", Structure::Unstructured, 0.3),
            ("builtin:tiny-gpt2", Structure::Unstructured, 0.2),
        ] {
            let (model, masks) = pruned(model_name, structure, density);
            let t = tempfile::tempdir().unwrap();
            let dense_dir = t.path().join("dense");
            std::fs::create_dir(&dense_dir).unwrap();
            model.save_into(&dense_dir).unwrap();
            let dense = Model::load(&dense_dir).unwrap();
            assert!(!dense.is_packed());
            let dense_session = Session::new(&dense).unwrap();
            let want = dense_session.forward(&tokens, None).unwrap();
            let mut state = crate::run::RunState::new(model.clone());
            state.masks = masks.clone();
            for storage in [Storage::F32, Storage::Bf16, Storage::Int8] {
                let label = format!("{model_name} {structure} {}", storage.name());
                let dir = t.path().join(storage.name());
                std::fs::create_dir(&dir).unwrap();
                crate::export::write_packed_model(&state, storage, &dir).unwrap();
                let loaded = Model::load(&dir).unwrap();
                assert!(loaded.is_packed(), "{label}");
                let mut session = Session::new(&loaded).unwrap();
                // Attaching to a packed model plans nothing and changes nothing.
                let attached = attach(&mut session, &loaded, &masks, storage).unwrap();
                if storage != Storage::F32 {
                    assert_eq!(
                        loaded.packed_layers().len(),
                        session.linears().len(),
                        "{label}: every linear packed"
                    );
                }
                assert_eq!(
                    attached.formats.values().sum::<usize>(),
                    loaded.packed_layers().len(),
                    "{label}"
                );
                let mut reference = Session::new(&dense).unwrap();
                attach(&mut reference, &dense, &masks, storage).unwrap();
                for t in [&tokens[..], &tokens[..1]] {
                    let got = session.forward(t, None).unwrap();
                    let same = reference.forward(t, None).unwrap();
                    assert_eq!(max_rel_diff(&same, &got), 0.0, "{label}");
                }
                if storage == Storage::F32 {
                    let got = session.forward(&tokens, None).unwrap();
                    let d = max_rel_diff(&want, &got);
                    assert!(d <= 1e-5, "{label}: {d}");
                    let greedy = espalier_engine::eval::latency(&session, &tokens[..4], 8)
                        .unwrap()
                        .generated;
                    let evaluated = espalier_engine::eval::latency(&dense_session, &tokens[..4], 8)
                        .unwrap()
                        .generated;
                    assert_eq!(greedy, evaluated, "{label}");
                }
            }
        }
    }

    /// A pruned export packed layer by layer as it loads runs the same kernels, with the same
    /// reasons and byte counts, and computes exactly what attaching its masks to the whole
    /// dense model computes, without holding the dense copy of any packed layer.
    #[test]
    fn pruned_exports_pack_as_they_load() {
        let tokens: Vec<u32> = (0..20).map(|i| (i * 29 % 251) as u32).collect();
        for (model_name, structure, density) in [
            ("builtin:tiny-llama", Structure::Unstructured, 0.3),
            (
                "builtin:tiny-llama",
                Structure::Blocks { rows: 16, cols: 16 },
                0.25,
            ),
            ("builtin:tiny-gpt2", Structure::Unstructured, 0.2),
        ] {
            let (model, masks) = pruned(model_name, structure, density);
            let t = tempfile::tempdir().unwrap();
            model.save_into(t.path()).unwrap();
            assert!(
                load_pruned_export(t.path(), Some(Storage::F32))
                    .unwrap()
                    .is_none()
            );
            let mut state = crate::run::RunState::new(model.clone());
            // A mask of another shape is refused, naming the file and the layer.
            let (first, _) = masks.iter().next().unwrap();
            state.masks = BTreeMap::from([(
                first.clone(),
                Mask::new(vec![3, 5], vec![true; 15], Structure::Unstructured).unwrap(),
            )]);
            let masks_file = t.path().join("masks.safetensors");
            crate::export::write_masks(&state, &masks_file).unwrap();
            let err = load_pruned_export(t.path(), Some(Storage::F32))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("masks.safetensors") && err.contains(first.as_str()),
                "{err}"
            );
            state.masks = masks;
            crate::export::write_masks(&state, &masks_file).unwrap();
            let dense = Model::load(t.path()).unwrap();
            let read = crate::export::read_masks(t.path()).unwrap().unwrap();
            // Without a report.json the structures read as unstructured; the bits round-trip.
            assert!(read.len() == state.masks.len());
            for (name, mask) in &state.masks {
                assert_eq!(read[name].keep(), mask.keep(), "{name}");
            }
            for storage in [Storage::F32, Storage::Bf16] {
                let label = format!("{model_name} {structure} {}", storage.name());
                let (loaded, _) = load_pruned_export(t.path(), Some(storage))
                    .unwrap()
                    .unwrap();
                assert!(loaded.is_packed(), "{label}");
                let mut session = Session::new(&loaded).unwrap();
                let got = attach(&mut session, &loaded, &BTreeMap::new(), storage).unwrap();
                let mut reference = Session::new(&dense).unwrap();
                let want = attach(&mut reference, &dense, &read, storage).unwrap();
                assert!(!want.formats.is_empty(), "{label}: something packed");
                assert_eq!(got.kernels, want.kernels, "{label}");
                assert_eq!(got.formats, want.formats, "{label}");
                assert_eq!(got.model_bytes, want.model_bytes, "{label}");
                assert_eq!(got.packed_model_bytes, want.packed_model_bytes, "{label}");
                assert_eq!(got.packed_storage, want.packed_storage, "{label}");
                for name in loaded.packed_layers().keys() {
                    assert_eq!(
                        loaded.weight(name).is_some(),
                        name == loaded.embedding_name(),
                        "{label}: {name}"
                    );
                }
                for t in [&tokens[..], &tokens[..1]] {
                    let a = reference.forward(t, None).unwrap();
                    let b = session.forward(t, None).unwrap();
                    assert_eq!(max_rel_diff(&a, &b), 0.0, "{label}");
                }
            }
        }
    }

    #[test]
    fn a_mask_breaking_its_declared_structure_is_refused_with_the_layer_name() {
        let model = espalier_engine::load_model("builtin:tiny-llama").unwrap();
        let name = "model.layers.0.mlp.up_proj.weight";
        let w = model.weight(name).unwrap();
        let keep = vec![true; w.elem_count()];
        let err = with_f32(w, |v| {
            PackedLinear::plan(
                name,
                v,
                [128, 64],
                Some(&keep),
                KStructure::NM { n: 2, m: 4 },
                Dtype::F32,
            )
        })
        .unwrap()
        .unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
}
