//! Packed weights in the forward pass, and packed checkpoints on disk.
//!
//! [`PackedKernel`] runs a layer packed by the kernels crate (sparse format and/or bf16/int8
//! storage) behind the engine's [`LinearKernel`] interface.
//!
//! A *packed checkpoint* is a model folder whose linear layers are stored the way the planner
//! packed them, so loading it needs no planning and never materialises a dense copy. Beside
//! `config.json` and the tokenizer files it holds:
//!
//! - `model.safetensors`: every tensor that is not packed (embeddings, norms, biases, and the
//!   linears the planner left on the dense f32 path). A tool that knows nothing of the packed
//!   file therefore fails on the missing linears instead of computing something else.
//! - `packed.safetensors` ([`PACKED_FILE`]): for every packed linear `NAME` one 1-D tensor per
//!   array of its format, named `NAME/ARRAY` (`values`, `scales`, `row_ptr`, ...; see
//!   [`espalier_kernels::PackedParts`]), and one `__metadata__` entry `NAME` with the layer's
//!   format, dtype and shape as JSON, e.g. `{"format":"bsr","block":[16,16],"dtype":"bf16",
//!   "rows":576,"cols":1536}`. The entry `espalier.packed` holds the layout version.
//!
//! Reading trusts nothing in the file: every layer goes through
//! [`PackedLinear::from_parts`], which checks each invariant the kernels rely on, and an error
//! names the file and the layer.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use espalier_kernels::{Array, Dtype, Format, PackedLinear, PackedParts};
use half::bf16;
use safetensors::Dtype as StDtype;
use safetensors::tensor::{SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::forward::ops::with_f32;
use crate::linear::LinearKernel;

/// Name of the packed-weights file in a packed checkpoint.
pub const PACKED_FILE: &str = "packed.safetensors";
/// Metadata key holding the layout version.
const VERSION_KEY: &str = "espalier.packed";
/// The layout this build writes and reads.
const VERSION: &str = "1";
/// The largest packed file read (16 GiB): far above any model this engine runs on a CPU, low
/// enough that a corrupt size never asks for more.
const MAX_FILE: u64 = 16 << 30;

/// A packed weight behind the engine's linear-layer interface.
#[derive(Debug)]
pub struct PackedKernel {
    packed: PackedLinear,
    label: String,
}

impl PackedKernel {
    /// Wraps a packed weight.
    pub fn new(packed: PackedLinear) -> Self {
        let label = packed.format_name();
        PackedKernel { packed, label }
    }

    /// The packed weight.
    pub fn packed(&self) -> &PackedLinear {
        &self.packed
    }
}

impl LinearKernel for PackedKernel {
    fn in_features(&self) -> usize {
        self.packed.cols()
    }

    fn out_features(&self) -> usize {
        self.packed.rows()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        let tokens = x.dims().first().copied().unwrap_or(0);
        let y = with_f32(x, |xs| {
            if tokens == 1 {
                let mut y = vec![0.0f32; self.packed.rows()];
                self.packed.gemv(xs, &mut y).map(|()| y)
            } else {
                // Not zeroed first where the kernel writes every output (prefill's GEMM).
                self.packed.gemm_new(xs, tokens)
            }
            .map_err(EngineError::kernel)
        })?;
        Ok(Tensor::from_vec(
            y,
            (tokens, self.packed.rows()),
            x.device(),
        )?)
    }

    fn kind(&self) -> &str {
        &self.label
    }

    fn weight_bytes(&self) -> usize {
        self.packed.bytes()
    }

    fn packed(&self) -> Option<&PackedLinear> {
        Some(&self.packed)
    }
}

/// One layer's `__metadata__` entry.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct LayerMeta {
    /// `dense`, `csr`, `bitmap`, `bsr`, `n:m` or `compact`.
    format: String,
    /// BSR block shape `[rows, cols]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    block: Option<[usize; 2]>,
    /// N:M pattern `[n, m]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n_m: Option<[usize; 2]>,
    /// `f32`, `bf16` or `i8`.
    dtype: String,
    rows: usize,
    cols: usize,
}

impl LayerMeta {
    fn of(parts: &PackedParts) -> LayerMeta {
        let (format, block, n_m) = match parts.format {
            Format::Dense => ("dense", None, None),
            Format::Csr => ("csr", None, None),
            Format::Bitmap => ("bitmap", None, None),
            Format::Bsr { br, bc } => ("bsr", Some([br, bc]), None),
            Format::NM { n, m } => ("n:m", None, Some([n, m])),
            Format::Compact => ("compact", None, None),
        };
        LayerMeta {
            format: format.to_string(),
            block,
            n_m,
            dtype: parts.dtype.to_string(),
            rows: parts.rows,
            cols: parts.cols,
        }
    }

    fn format(&self) -> Result<Format, String> {
        let need = |what: Option<[usize; 2]>, key: &str| {
            what.ok_or_else(|| format!("format `{}` needs `{key}`", self.format))
        };
        Ok(match self.format.as_str() {
            "dense" => Format::Dense,
            "csr" => Format::Csr,
            "bitmap" => Format::Bitmap,
            "compact" => Format::Compact,
            "bsr" => {
                let [br, bc] = need(self.block, "block")?;
                Format::Bsr { br, bc }
            }
            "n:m" => {
                let [n, m] = need(self.n_m, "n_m")?;
                Format::NM { n, m }
            }
            other => {
                return Err(format!(
                    "unknown format `{other}` (dense, csr, bitmap, bsr, n:m or compact)"
                ));
            }
        })
    }

    fn dtype(&self) -> Result<Dtype, String> {
        match self.dtype.as_str() {
            "f32" => Ok(Dtype::F32),
            "bf16" => Ok(Dtype::Bf16),
            "i8" => Ok(Dtype::I8),
            other => Err(format!("unknown dtype `{other}` (f32, bf16 or i8)")),
        }
    }
}

/// The little-endian bytes of an array and its safetensors dtype.
fn array_bytes(a: &Array) -> (StDtype, Vec<u8>) {
    fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }
    match a {
        Array::U8(v) => (StDtype::U8, v.clone()),
        Array::U16(v) => (StDtype::U16, le(v, u16::to_le_bytes)),
        Array::U32(v) => (StDtype::U32, le(v, u32::to_le_bytes)),
        Array::F32(v) => (StDtype::F32, le(v, f32::to_le_bytes)),
        Array::Bf16(v) => (StDtype::BF16, le(v, bf16::to_le_bytes)),
        Array::I8(v) => (StDtype::I8, le(v, i8::to_le_bytes)),
    }
}

/// An array from safetensors bytes (the crate has checked that the length matches the shape).
fn array_from(dtype: StDtype, bytes: &[u8]) -> Result<Array, String> {
    fn from_le<T, const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                f(b)
            })
            .collect()
    }
    Ok(match dtype {
        StDtype::U8 => Array::U8(bytes.to_vec()),
        StDtype::U16 => Array::U16(from_le(bytes, u16::from_le_bytes)),
        StDtype::U32 => Array::U32(from_le(bytes, u32::from_le_bytes)),
        StDtype::F32 => Array::F32(from_le(bytes, f32::from_le_bytes)),
        StDtype::BF16 => Array::Bf16(from_le(bytes, bf16::from_le_bytes)),
        StDtype::I8 => Array::I8(from_le(bytes, i8::from_le_bytes)),
        other => return Err(format!("dtype {other:?} is not used by packed layers")),
    })
}

fn file_err(path: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Weights {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Writes packed layers (name, layer) to `path` (through a temporary file and a rename).
pub fn write_packed(path: &Path, layers: &[(String, &PackedLinear)]) -> Result<(), EngineError> {
    let mut metadata = HashMap::new();
    metadata.insert(VERSION_KEY.to_string(), VERSION.to_string());
    let mut buffers: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, layer) in layers {
        if name.contains('/') {
            return Err(file_err(
                path,
                format!("layer name `{name}` contains `/`, which separates arrays"),
            ));
        }
        let parts = layer.to_parts();
        let meta = serde_json::to_string(&LayerMeta::of(&parts))
            .map_err(|e| file_err(path, format!("{name}: {e}")))?;
        metadata.insert(name.clone(), meta);
        for (array, data) in &parts.arrays {
            let (dtype, bytes) = array_bytes(data);
            buffers.push((format!("{name}/{array}"), dtype, vec![data.len()], bytes));
        }
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e.to_string()))?;
    let tmp = path.with_file_name(format!(".{PACKED_FILE}.tmp"));
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .map_err(|e| file_err(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    })
}

/// The distinct dtypes of the layers a packed file holds, read from its header alone (each
/// layer's metadata entry) without reading or checking its arrays: what a caller needs to
/// know before deciding whether to load the file.
pub fn packed_dtypes(path: &Path) -> Result<Vec<Dtype>, EngineError> {
    use std::io::Read;
    let io_err = |source| EngineError::Io {
        path: path.display().to_string(),
        source,
    };
    let invalid = |m: String| file_err(path, format!("not a valid packed file: {m}"));
    let (mut file, size) = crate::files::open_regular(path).map_err(io_err)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io_err)?;
    let len = u64::from_le_bytes(len);
    // The header is JSON that the file itself contains.
    if len > size.saturating_sub(8) {
        return Err(invalid(format!(
            "header of {len} bytes in a {size}-byte file"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io_err)?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: BTreeMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
    let mut dtypes = Vec::new();
    for (name, json) in header.metadata.iter().filter(|(k, _)| *k != VERSION_KEY) {
        let layer_err = |m: String| file_err(path, format!("layer `{name}`: {m}"));
        let m: LayerMeta = serde_json::from_str(json).map_err(|e| layer_err(e.to_string()))?;
        let dtype = m.dtype().map_err(layer_err)?;
        if !dtypes.contains(&dtype) {
            dtypes.push(dtype);
        }
    }
    Ok(dtypes)
}

/// Reads and checks every layer of a packed file.
pub fn read_packed(path: &Path) -> Result<BTreeMap<String, PackedLinear>, EngineError> {
    let bytes = crate::files::read(path, MAX_FILE).map_err(|e| EngineError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let invalid = |m: String| file_err(path, format!("not a valid packed file: {m}"));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
    let mut meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    match meta.remove(VERSION_KEY) {
        Some(v) if v == VERSION => {}
        Some(v) => {
            return Err(invalid(format!(
                "layout version {v}; this build reads version {VERSION}"
            )));
        }
        None => return Err(invalid(format!("no `{VERSION_KEY}` metadata entry"))),
    }
    // Arrays grouped by layer.
    let mut arrays: BTreeMap<String, BTreeMap<String, Array>> = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let Some((layer, array)) = name.rsplit_once('/') else {
            return Err(invalid(format!("tensor `{name}` is not named LAYER/ARRAY")));
        };
        if !meta.contains_key(layer) {
            return Err(invalid(format!(
                "tensor `{name}` belongs to no layer listed in the metadata"
            )));
        }
        if view.shape().len() != 1 {
            return Err(invalid(format!("tensor `{name}` is not 1-D")));
        }
        let data =
            array_from(view.dtype(), view.data()).map_err(|m| invalid(format!("{name}: {m}")))?;
        arrays
            .entry(layer.to_string())
            .or_default()
            .insert(array.to_string(), data);
    }
    let mut layers = BTreeMap::new();
    for (name, json) in meta {
        let layer_err = |m: String| file_err(path, format!("layer `{name}`: {m}"));
        let m: LayerMeta = serde_json::from_str(&json).map_err(|e| layer_err(e.to_string()))?;
        let parts = PackedParts {
            format: m.format().map_err(layer_err)?,
            dtype: m.dtype().map_err(layer_err)?,
            rows: m.rows,
            cols: m.cols,
            arrays: arrays.remove(&name).unwrap_or_default(),
        };
        let packed = PackedLinear::from_parts(parts).map_err(|e| layer_err(e.to_string()))?;
        layers.insert(name, packed);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<(String, PackedLinear)> {
        let (rows, cols) = (24, 40);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % 3 == 0 {
                    0.0
                } else {
                    (i as f32 * 0.01).sin()
                }
            })
            .collect();
        let mut two_four = w.clone();
        for g in two_four.chunks_mut(4) {
            g[0] = 0.0;
            g[1] = 0.0;
        }
        let block = |dtype| {
            let view = espalier_kernels::DenseView::new(&w, rows, cols).expect("view");
            PackedLinear::pack("b", &view, Format::Bsr { br: 16, bc: 16 }, dtype).expect("bsr")
        };
        vec![
            (
                "a.weight".into(),
                PackedLinear::dense(&w, [rows, cols], Dtype::Bf16).expect("dense"),
            ),
            ("b.weight".into(), block(Dtype::I8)),
            (
                "c.weight".into(),
                PackedLinear::plan(
                    "c",
                    &two_four,
                    [rows, cols],
                    None,
                    espalier_kernels::Structure::NM { n: 2, m: 4 },
                    Dtype::F32,
                )
                .expect("2:4"),
            ),
        ]
    }

    /// Writes [`layers`] into a packed file in a fresh temporary folder.
    fn written() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Vec<(String, PackedLinear)>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(PACKED_FILE);
        let layers = layers();
        let refs: Vec<(String, &PackedLinear)> =
            layers.iter().map(|(n, l)| (n.clone(), l)).collect();
        write_packed(&path, &refs).expect("write");
        (dir, path, layers)
    }

    #[test]
    fn a_packed_file_round_trips_every_layer() {
        let (_dir, path, layers) = written();
        let back = read_packed(&path).expect("read");
        assert_eq!(back.len(), layers.len());
        for (name, layer) in &layers {
            assert_eq!(&back[name], layer, "{name}");
        }
        // The header alone names the layers' dtypes (here one of each, in name order).
        assert_eq!(
            packed_dtypes(&path).expect("dtypes"),
            vec![Dtype::Bf16, Dtype::I8, Dtype::F32]
        );
    }

    #[test]
    fn damaged_files_are_refused_naming_the_file_and_layer() {
        let (_dir, path, _) = written();
        let good = std::fs::read(&path).expect("read");

        // A metadata entry pointing at a format whose arrays are not there.
        let needle = br#"\"format\":\"bsr\""#;
        let at = good
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("bsr metadata");
        let mut swapped = good.clone();
        swapped[at + 13] = b'c'; // bsr -> csr: same length, so the header still parses
        std::fs::write(&path, &swapped).expect("write");
        let e = read_packed(&path).unwrap_err().to_string();
        assert!(e.contains(PACKED_FILE) && e.contains("b.weight"), "{e}");

        // Truncated.
        std::fs::write(&path, &good[..good.len() - 10]).expect("write");
        let e = read_packed(&path).unwrap_err().to_string();
        assert!(e.contains("not a valid packed file"), "{e}");

        // Not a packed file at all; a header longer than the file; an unknown dtype.
        std::fs::write(&path, b"hello").expect("write");
        assert!(read_packed(&path).is_err());
        assert!(packed_dtypes(&path).is_err());
        std::fs::write(&path, &good[..40]).expect("write");
        let e = packed_dtypes(&path).unwrap_err().to_string();
        assert!(e.contains(PACKED_FILE) && e.contains("header of"), "{e}");
        let needle = br#"\"dtype\":\"i8\""#;
        let at = good
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("i8 metadata");
        let mut odd = good.clone();
        odd[at + needle.len() - 4..at + needle.len() - 2].copy_from_slice(b"u8");
        std::fs::write(&path, &odd).expect("write");
        let e = packed_dtypes(&path).unwrap_err().to_string();
        assert!(e.contains("b.weight") && e.contains("unknown dtype"), "{e}");
    }
}
