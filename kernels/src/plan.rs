//! The planner: pick the fastest format for one weight matrix and pack it.
//!
//! At batch 1 a linear layer is memory bound, so the planner estimates, for every candidate
//! format, the bytes a GEMV would read, raises that to the format's compute floor where its
//! kernel cannot keep up with memory (measured by `bench`: the bitmap expands every 8 weights,
//! kept or not; CSR gathers every kept one), and picks the cheapest. Dense wins unless a sparse
//! format saves a clear margin, because sparse kernels have less slack when the estimate is off.
//! A declared structure adds its format as a candidate and is *verified*: declaring N:M for a
//! matrix that is not N:M is an error, never a silent fallback.
//!
//! [`PackedLinear`] is what the engine's linear layer holds: construction, `rows`, `cols`,
//! `bytes`, `format_name`, `gemv`, `gemm`.

use crate::bitmap::BitmapMatrix;
use crate::bsr::BsrMatrix;
use crate::compact::CompactMatrix;
use crate::csr::CsrMatrix;
use crate::dense::DenseMatrix;
use crate::element::Dtype;
use crate::error::{KernelError, Result};
use crate::isa::Exec;
use crate::nm::NmMatrix;
use crate::view::DenseView;
use std::fmt;

/// Sparsity structure declared by whoever pruned the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Structure {
    /// Any pattern (or unknown): the planner probes the structured formats too, since a mask
    /// may be block or N:M sparse without saying so.
    Unstructured,
    /// Whole `br x bc` blocks kept or pruned.
    Blocks {
        /// Block height (output rows).
        br: usize,
        /// Block width (input columns).
        bc: usize,
    },
    /// At most `n` kept in every `m` consecutive input weights of a row.
    NM {
        /// Kept per group.
        n: usize,
        /// Group width.
        m: usize,
    },
    /// Whole output rows pruned (neurons, heads that were not removed physically).
    Rows,
    /// Whole input columns pruned.
    Columns,
}

/// A storage format (independent of dtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Row-major dense.
    Dense,
    /// Compressed sparse rows (u16 or u32 column indices, by width).
    Csr,
    /// Per-row bitmask plus packed kept values.
    Bitmap,
    /// Block sparse rows.
    Bsr {
        /// Block height.
        br: usize,
        /// Block width.
        bc: usize,
    },
    /// Packed N:M.
    NM {
        /// Kept per group.
        n: usize,
        /// Group width.
        m: usize,
    },
    /// Dense sub-matrix of the rows and columns that keep anything.
    Compact,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Dense => f.write_str("dense"),
            Format::Csr => f.write_str("csr"),
            Format::Bitmap => f.write_str("bitmap"),
            Format::Bsr { br, bc } => write!(f, "bsr{br}x{bc}"),
            Format::NM { n, m } => write!(f, "{n}:{m}"),
            Format::Compact => f.write_str("compact"),
        }
    }
}

/// Cost floor of the bitmap GEMV, in dense-f32-bytes-equivalent per weight (kept or not). Its
/// AVX2 kernel does a table permute + FMA for every 8 weights; on the 2-core EPYC we measured
/// (`bench_kernels`, caches flushed, 30 layers) it ran at 0.6-1.2x of dense f32 from 50% to
/// 90% sparsity, i.e. about as slow as streaming dense, and always behind CSR. The floor
/// therefore keeps it from being chosen over dense; it stays available to `pack`.
const BITMAP_FLOOR_PER_WEIGHT: f64 = 4.0;
/// Cost floor of the CSR GEMV, in dense-f32-bytes-equivalent per kept weight. Measured on one
/// core: the kernel needs ~0.24 ns per kept weight even cache-hot (eight scalar loads build
/// each vector of activations), about what 6 bytes take to stream from memory, and compute and
/// memory overlap only partly; ~8 bytes per kept weight matches the streamed figures (f32 or
/// bf16 alike, since the loads of `x`, not the bytes, bound it): slower than dense at 50%,
/// ahead from ~65%.
const CSR_FLOOR_PER_NNZ: f64 = 8.0;
/// A sparse format must beat dense by this factor to be chosen.
const DENSE_MARGIN: f64 = 1.1;

/// One format the planner considered.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The format.
    pub format: Format,
    /// Bytes its GEMV would read.
    pub bytes: usize,
    /// Estimated relative cost (bytes-equivalent, compute floors and the dense margin applied).
    pub cost: f64,
}

/// The planner's decision and what it compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The chosen format.
    pub format: Format,
    /// All candidates, in evaluation order.
    pub candidates: Vec<Candidate>,
}

/// Chooses the format expected to be fastest at batch 1, without packing.
///
/// `structure` is the declared sparsity ([`Structure::Unstructured`]: unknown; the planner then
/// also probes 16x16 blocks and 2:4 / 4:8). A declared N:M that the weights violate is an error
/// naming `layer`; a declared block shape is packed as declared (blocks holding any kept weight
/// are stored), and rows/columns need no check, since the compact format is exact for any mask.
pub fn choose_format(
    layer: &str,
    view: &DenseView<'_>,
    structure: Structure,
    dtype: Dtype,
) -> Result<Choice> {
    let (rows, cols) = (view.rows(), view.cols());
    let size = dtype.size();
    // i8 stores one f32 scale per output row whatever the format (compact: per kept row).
    let per_row = dtype.row_overhead();
    let weights = rows * cols;
    let nnz = view.kept();
    let mut candidates = Vec::new();
    let mut push = |format: Format, bytes: usize, floor: f64| {
        let margin = if format == Format::Dense {
            1.0
        } else {
            DENSE_MARGIN
        };
        candidates.push(Candidate {
            format,
            bytes,
            cost: (bytes as f64).max(floor) * margin,
        });
    };

    // Declared N:M first: verified, and it wins ties with the bitmap (same bytes at 50%,
    // simpler kernel).
    let mut nm_candidates = Vec::new();
    match structure {
        Structure::NM { n, m } => {
            // Verified: the error names the layer and the offending group.
            NmMatrix::validate(layer, view, n, m)?;
            push(
                Format::NM { n, m },
                nm_bytes(rows, cols, n, m, size) + rows * per_row,
                0.0,
            );
        }
        Structure::Unstructured => nm_candidates.extend([(2, 4), (4, 8)]),
        _ => {}
    }
    for (n, m) in nm_candidates {
        if NmMatrix::satisfies(view, n, m) {
            push(
                Format::NM { n, m },
                nm_bytes(rows, cols, n, m, size) + rows * per_row,
                0.0,
            );
        }
    }
    let blocks = match structure {
        Structure::Blocks { br, bc } => Some((br, bc)),
        Structure::Unstructured => Some((16, 16)),
        _ => None,
    };
    if let Some((br, bc)) = blocks {
        if br == 0 || bc == 0 {
            return Err(KernelError::InvalidParameter(format!(
                "block shape {br}x{bc} must be at least 1x1"
            )));
        }
        let stored = count_blocks(view, br, bc);
        let bytes = stored * (br * bc * size + 4) + (rows.div_ceil(br) + 1) * 4 + rows * per_row;
        push(Format::Bsr { br, bc }, bytes, 0.0);
    }
    let idx = if cols <= 1 << 16 { 2 } else { 4 };
    push(
        Format::Csr,
        nnz * (size + idx) + (rows + 1) * 4 + rows * per_row,
        nnz as f64 * CSR_FLOOR_PER_NNZ,
    );
    push(
        Format::Bitmap,
        rows * cols.div_ceil(8)
            + (rows + 1) * 4
            + (nnz + crate::bitmap::PAD) * size
            + rows * per_row,
        weights as f64 * BITMAP_FLOOR_PER_WEIGHT,
    );
    let (kr, kc) = kept_rows_cols(view);
    if kr < rows || kc < cols {
        push(
            Format::Compact,
            kr * kc * size + 4 * (kr + kc) + kr * per_row,
            0.0,
        );
    }
    push(Format::Dense, weights * size + rows * per_row, 0.0);

    // First minimum wins, so the evaluation order above breaks ties.
    let format = candidates
        .iter()
        .fold(None::<&Candidate>, |best, c| match best {
            Some(b) if b.cost <= c.cost => Some(b),
            _ => Some(c),
        })
        .map_or(Format::Dense, |c| c.format);
    Ok(Choice { format, candidates })
}

fn nm_bytes(rows: usize, cols: usize, n: usize, m: usize, size: usize) -> usize {
    let groups = cols.div_ceil(m);
    let bits = m.trailing_zeros() as usize;
    rows * groups * n * size + rows * (groups * n * bits).div_ceil(8) + 4
}

/// Rows and columns holding at least one kept weight.
fn kept_rows_cols(view: &DenseView<'_>) -> (usize, usize) {
    let (rows, cols) = (view.rows(), view.cols());
    let mut col_used = vec![false; cols];
    let mut kr = 0;
    for r in 0..rows {
        let mut any = false;
        for (c, used) in col_used.iter_mut().enumerate() {
            if view.is_kept(r, c) {
                *used = true;
                any = true;
            }
        }
        kr += usize::from(any);
    }
    (kr, col_used.iter().filter(|&&u| u).count())
}

/// Blocks of `br x bc` holding at least one kept weight.
fn count_blocks(view: &DenseView<'_>, br: usize, bc: usize) -> usize {
    let (rows, cols) = (view.rows(), view.cols());
    let nbc = cols.div_ceil(bc);
    let mut present = vec![false; nbc];
    let mut total = 0;
    for rb in 0..rows.div_ceil(br) {
        present.fill(false);
        for r in rb * br..(rb * br + br).min(rows) {
            for (c, p) in (0..cols).map(|c| (c, c / bc)) {
                if !present[p] && view.is_kept(r, c) {
                    present[p] = true;
                }
            }
        }
        total += present.iter().filter(|&&p| p).count();
    }
    total
}

/// Chooses the fastest format (see [`choose_format`]) and packs the weights in it.
pub fn plan(
    layer: &str,
    view: &DenseView<'_>,
    structure: Structure,
    dtype: Dtype,
) -> Result<PackedLinear> {
    let choice = choose_format(layer, view, structure, dtype)?;
    PackedLinear::pack(layer, view, choice.format, dtype)
}

/// Packed weights of one linear layer in the format the planner chose: the type the engine's
/// linear layer calls. `W` is `[rows = out_features, cols = in_features]`.
#[derive(Debug, Clone, PartialEq)]
pub enum PackedLinear {
    /// Dense row-major.
    Dense(DenseMatrix),
    /// Compressed sparse rows.
    Csr(CsrMatrix),
    /// Bitmask + packed values.
    Bitmap(BitmapMatrix),
    /// Block sparse rows.
    Bsr(BsrMatrix),
    /// Packed N:M.
    NM(NmMatrix),
    /// Dense sub-matrix of the kept rows and columns.
    Compact(CompactMatrix),
}

/// Forwards a method call to whichever format is inside.
macro_rules! each {
    ($self:expr, $w:ident => $body:expr) => {
        match $self {
            PackedLinear::Dense($w) => $body,
            PackedLinear::Csr($w) => $body,
            PackedLinear::Bitmap($w) => $body,
            PackedLinear::Bsr($w) => $body,
            PackedLinear::NM($w) => $body,
            PackedLinear::Compact($w) => $body,
        }
    };
}

impl PackedLinear {
    /// Plans and packs one linear layer's weight.
    ///
    /// `weight` is row-major `[out, in]` with `shape = [out, in]`. With `keep`, an entry is kept
    /// iff its flag is `true` (the stored value of a dropped entry is ignored); without, iff it
    /// is not `0.0`. `hint` is the structure the pruner produced (see [`Structure`]); `storage`
    /// the value dtype. `name` only appears in errors, e.g. a mask that breaks a declared N:M.
    pub fn plan(
        name: &str,
        weight: &[f32],
        shape: [usize; 2],
        keep: Option<&[bool]>,
        hint: Structure,
        storage: Dtype,
    ) -> Result<PackedLinear> {
        let [rows, cols] = shape;
        let view = match keep {
            Some(k) => DenseView::with_mask(weight, k, rows, cols)?,
            None => DenseView::new(weight, rows, cols)?,
        };
        plan(name, &view, hint, storage)
    }

    /// [`PackedLinear::plan`] from a prepared view (e.g. a byte mask,
    /// [`DenseView::with_mask_bytes`]).
    pub fn plan_view(
        name: &str,
        view: &DenseView<'_>,
        hint: Structure,
        storage: Dtype,
    ) -> Result<PackedLinear> {
        plan(name, view, hint, storage)
    }

    /// Plain dense storage, no planning (the unpruned layers).
    pub fn dense(weight: &[f32], shape: [usize; 2], storage: Dtype) -> Result<PackedLinear> {
        let [rows, cols] = shape;
        Ok(PackedLinear::Dense(DenseMatrix::from_dense(
            weight, rows, cols, storage,
        )?))
    }

    /// Packs in a given format, bypassing the planner (benchmarks, tests, forced formats).
    pub fn pack(
        layer: &str,
        view: &DenseView<'_>,
        format: Format,
        dtype: Dtype,
    ) -> Result<PackedLinear> {
        Ok(match format {
            Format::Dense => PackedLinear::Dense(DenseMatrix::from_view(view, dtype)),
            Format::Csr => PackedLinear::Csr(CsrMatrix::from_view(view, dtype)?),
            Format::Bitmap => PackedLinear::Bitmap(BitmapMatrix::from_view(view, dtype)?),
            Format::Bsr { br, bc } => PackedLinear::Bsr(BsrMatrix::from_view(view, br, bc, dtype)?),
            Format::NM { n, m } => PackedLinear::NM(NmMatrix::from_view(layer, view, n, m, dtype)?),
            Format::Compact => PackedLinear::Compact(CompactMatrix::from_view(view, dtype)?),
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        each!(self, w => w.rows())
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        each!(self, w => w.cols())
    }

    /// Storage dtype of the values.
    pub fn dtype(&self) -> Dtype {
        each!(self, w => w.dtype())
    }

    /// Bytes a GEMV reads (values, indices, metadata).
    pub fn bytes(&self) -> usize {
        each!(self, w => w.bytes())
    }

    /// The storage format.
    pub fn format(&self) -> Format {
        match self {
            PackedLinear::Dense(_) => Format::Dense,
            PackedLinear::Csr(_) => Format::Csr,
            PackedLinear::Bitmap(_) => Format::Bitmap,
            PackedLinear::Bsr(b) => {
                let (br, bc) = b.block();
                Format::Bsr { br, bc }
            }
            PackedLinear::NM(w) => {
                let (n, m) = w.pattern();
                Format::NM { n, m }
            }
            PackedLinear::Compact(_) => Format::Compact,
        }
    }

    /// Human-readable format and dtype, e.g. `bsr16x16/f32`, `csr-u16/bf16`, `2:4/i8`,
    /// `compact400x576/f32`.
    pub fn format_name(&self) -> String {
        match self {
            PackedLinear::Csr(c) => format!("csr-u{}/{}", c.index_bytes() * 8, self.dtype()),
            PackedLinear::Compact(c) => {
                let (r, k) = c.kept_shape();
                format!("compact{r}x{k}/{}", self.dtype())
            }
            _ => format!("{}/{}", self.format(), self.dtype()),
        }
    }

    /// Unpacks to dense row-major f32 (bf16 values widened, i8 values times their row scale).
    pub fn to_dense(&self) -> Vec<f32> {
        each!(self, w => w.to_dense())
    }

    /// Decode: `y = W·x` with `x.len() == cols`, `y.len() == rows` (overwritten). Best ISA,
    /// rayon's global pool.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.gemv_with(x, y, Exec::auto())
    }

    /// Prefill: `Y = X·Wᵀ` with `X` `[tokens, cols]` and `Y` `[tokens, rows]`, row-major
    /// (`Y` overwritten). Best ISA, rayon's global pool.
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<()> {
        self.gemm_with(x, tokens, y, Exec::auto())
    }

    /// [`PackedLinear::gemv`] with explicit ISA/threading.
    pub fn gemv_with(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        each!(self, w => w.gemv(x, y, exec))
    }

    /// [`PackedLinear::gemm`] with explicit ISA/threading.
    pub fn gemm_with(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) -> Result<()> {
        each!(self, w => w.gemm(x, tokens, y, exec))
    }
}
