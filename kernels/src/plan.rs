//! The planner: pick the fastest format for one weight matrix and pack it.
//!
//! At batch 1 a linear layer is memory bound, so the planner estimates, for every candidate
//! format in the dtype asked for, the bytes a GEMV would read, adds the compute its kernel
//! cannot hide under memory (measured by streaming benchmarks: the bitmap expands every 8
//! weights, kept or not; CSR gathers every kept one; dense bf16/i8 widen each value), and picks
//! the cheapest. Dense wins unless a sparse format saves a clear margin, so that an estimate
//! that is somewhat off never picks a format slower than dense *for that dtype* (at 50%
//! unstructured the bitmap is chosen in bf16 and f32; CSR from ~80% sparsity in bf16).
//!
//! [`plan_measured`] is the planner that needs no estimate to be right: it times the promising
//! candidates and dense on the very matrix (caches flushed, best of a few runs, [`PlanTimer`])
//! and keeps the fastest, recording every time in the [`Choice`], so its decision is never
//! slower than dense in its own measurement. It is meant for plans made once per model; the
//! estimate stays the deterministic default.
//!
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
use crate::error::{KernelError, Result, checked_len};
use crate::isa::Exec;
use crate::nm::NmMatrix;
use crate::par;
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

/// Compute of the bitmap GEMV, in bytes-equivalent per weight (kept or not), added to the bytes
/// it reads: its AVX2 kernel expands every 8 weights from one mask byte (bf16: a broadcast load
/// and one byte shuffle that expands and widens at once; f32/i8: a lane permute and a mask),
/// whatever the density. Measured with streaming passes (caches flushed, 30 layers of each
/// SmolLM2 shape, one thread; the unit is dense f32's time per byte in the same run): at 50%
/// bf16 the bitmap took 0.52-0.92 bytes-equivalent per weight beyond its bytes' streaming time,
/// f32 0.78-1.24 (its expand is two table loads, a permute and a mask: cache-hot, 1.6x the
/// bf16 shuffle's time). Memory and compute overlap only partly on the 2-core EPYC, so the
/// two are added, not maxed.
///
/// bf16 was 0.75 until dense bf16 learnt to widen pairs (`dense.rs`): with both threads,
/// dense bf16 then ran 1.80-1.87x dense f32 per SmolLM2 block where the 50% bitmap ran 1.56x
/// (`kernel_bench -- 0.5 bf16,f32`), i.e. the bitmap costs ~1.4 beyond its bytes, and the Wanda
/// 50% model decoded at 0.85x dense bf16 end to end (`scripts/llama_cpp_bench.py`). At 1.2 a
/// 50% bf16 layer plans dense and the bitmap takes over from about 70% sparsity.
///
/// With AVX512-VBMI2 the bf16 kernel expands 32 packed values per mask word with one
/// `vpexpandw` and then runs dense bf16's own widen-and-FMA step; on the 2-core Zen 4 the 50%
/// bitmap then ran 1.32-1.59x dense bf16 per SmolLM2 block (`kernel_bench 0.5 bf16`, four
/// runs), i.e. ~0.45 beyond its bytes: a 50% bf16 layer plans the bitmap (up to ~70% density,
/// with the margin), and so does a 2:4 mask in bf16: the 2:4 kernel ran 1.14-1.23x dense bf16
/// at one token where the bitmap ran 1.41-1.42x (`batch_bench`, same rounds).
///
/// With AVX512-BF16 as well, each expanded word meets `x` rounded to bf16 pairs in one
/// `vdpbf16ps`, two words per step: in `kernel_bench 0.2,0.3,0.5 bf16` (2 threads, same run)
/// the bitmap ran 1.15x dense bf16 per SmolLM2 block at 20% sparsity, 1.17x at 30% and
/// 1.53x at 50%, i.e. ~0.1-0.2 beyond its bytes; at 0.2 the bitmap plans from about 20%
/// sparsity (its bytes plus compute then 1.93 against dense's 2 per weight).
///
/// The i8 kernel (`vpexpandb`, 64 per word) was bound by widening each weight to f32 for an
/// FMA (0.93-1.02x dense i8 per block at 50%: ~0.6 beyond its bytes). It now multiplies in
/// integers against i16 activations (`vpdpwssd`, AVX512-VNNI, as dense i8 does): in
/// `kernel_bench 0.5 i8` (two runs alternating with the build before it) the 50% bitmap
/// streamed the LM head in 0.68 ms against dense i8's 0.80-0.90 (1.11-1.32x; 0.86x before)
/// and the block shapes at 0.89-1.09x dense i8 (a stray process held one core in those runs);
/// on quiet cores 0.90x (192x576), 1.05-1.18x (the other block shapes) and 1.33x (LM head),
/// i.e. ~0.3 beyond its bytes: a 50% i8 layer plans the bitmap.
///
/// The f32 kernel on AVX-512 expands 16 values per mask word (`vexpandps`) and requests its
/// values and masks ahead as the other GEMVs do: in `kernel_bench 0.2,0.3,0.5,2:4 f32` (2-core
/// Xeon, 2 threads) it ran 1.10x, 1.22x and 1.66x dense f32 per SmolLM2 block at 20%, 30% and
/// 50% sparsity, i.e. ~0.3 beyond its bytes, where the 2:4 kernel ran 1.05x (~1.7 beyond its
/// equal bytes); `batch_bench 1 f32`, three runs: the 50% bitmap 1.58-1.72x dense f32, 2:4
/// 1.11-1.23x. At 0.35 an f32 layer plans the bitmap up to ~78% density, and a 2:4 mask in
/// f32 does too, as in bf16.
pub(crate) fn bitmap_compute_per_weight(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 if crate::bitmap::bf16_expand_dp(crate::isa::Isa::Avx512) => 0.2,
        Dtype::Bf16 if crate::bitmap::vbmi2_expand() => 0.45,
        Dtype::I8 if crate::bitmap::i8_expand_vnni() => 0.3,
        Dtype::F32 if crate::isa::Isa::Avx512.is_available() => 0.35,
        Dtype::Bf16 | Dtype::F32 | Dtype::I8 => 1.2,
    }
}

/// Compute of the N:M GEMV, in bytes-equivalent per weight of the dense shape, added to the
/// bytes it reads (widening included). 2:4 expands every 8 weights from one metadata byte (a
/// broadcast load and a table-driven byte shuffle; i8 also a shift and a convert); f32 2:4 and
/// the other patterns gather activations with permutes. From `batch_bench` on SmolLM2's block
/// shapes (30 blocks streamed, 2 threads, three alternating runs, the unit is as for the
/// bitmap): 2:4 took 0.73-0.99x dense bf16's time in bf16, 0.97-1.30x dense i8's in i8 and
/// 0.72-0.87x dense f32's in f32, i.e. about 0.7, 0.7 and 1.0 beyond its bytes. So a 2:4 layer
/// stored in i8 is planned dense: the i8 expand is compute bound and slower than reading twice
/// the bytes.
pub(crate) fn nm_compute_per_weight(dtype: Dtype, n: usize, m: usize) -> f64 {
    match (n, m, dtype) {
        (2, 4, Dtype::Bf16) => 0.7,
        (2, 4, Dtype::I8) => 0.7,
        _ => 1.0,
    }
}

/// Compute of the CSR GEMV, in bytes-equivalent per kept weight, added to its bytes: eight
/// scalar loads of `x` build each vector of activations (`vgatherdps` was slower). Measured as
/// above: 1.3-1.9 per kept weight at 50%; behind the bitmap until ~80% sparsity in bf16.
pub(crate) const CSR_COMPUTE_PER_NNZ: f64 = 2.0;
/// Compute of the dense bf16 and i8 GEMVs, in bytes-equivalent per weight: widening each
/// value costs a shift (bf16) or a convert (i8) per 8 weights, which measured 0.12-0.2 per
/// weight beyond the bytes (0.59 on the smallest shape). Dense f32 is the unit (0).
const DENSE_WIDEN_PER_WEIGHT: f64 = 0.2;
/// A sparse format must beat dense by this factor to be chosen by estimate: the estimates'
/// error, so that an estimate never picks a format slower than dense for its dtype. The
/// measured mode ([`plan_measured`]) needs no margin: it times dense too.
const DENSE_MARGIN: f64 = 1.1;

/// One format the planner considered.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The format.
    pub format: Format,
    /// Bytes its GEMV would read.
    pub bytes: usize,
    /// Estimated relative cost (bytes-equivalent, compute and the dense margin applied).
    pub cost: f64,
    /// Seconds one GEMV took on this matrix, caches flushed, best of the repetitions: only set
    /// by [`plan_measured`], for the candidates it timed.
    pub measured: Option<f64>,
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
    // Stored values that dense-like kernels widen (bf16 shift, i8 convert) cost this each.
    let widen = if dtype == Dtype::F32 {
        0.0
    } else {
        DENSE_WIDEN_PER_WEIGHT
    };
    let mut candidates = Vec::new();
    let mut push = |format: Format, bytes: usize, compute: f64| {
        let margin = if format == Format::Dense {
            1.0
        } else {
            DENSE_MARGIN
        };
        candidates.push(Candidate {
            format,
            bytes,
            cost: (bytes as f64 + compute) * margin,
            measured: None,
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
                weights as f64 * nm_compute_per_weight(dtype, n, m),
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
                weights as f64 * nm_compute_per_weight(dtype, n, m),
            );
        }
    }
    let blocks = match structure {
        Structure::Blocks { br, bc } => Some((br, bc)),
        Structure::Unstructured => Some((16, 16)),
        _ => None,
    };
    if let Some((br, bc)) = blocks
        && (br == 0 || bc == 0)
    {
        return Err(KernelError::InvalidParameter(format!(
            "block shape {br}x{bc} must be at least 1x1"
        )));
    }
    let stats = kept_stats(view, blocks);
    if let Some((br, bc)) = blocks {
        let stored = stats.blocks;
        let bytes = stored * (br * bc * size + 4) + (rows.div_ceil(br) + 1) * 4 + rows * per_row;
        push(
            Format::Bsr { br, bc },
            bytes,
            (stored * br * bc) as f64 * widen,
        );
    }
    let idx = if cols <= 1 << 16 { 2 } else { 4 };
    push(
        Format::Csr,
        nnz * (size + idx) + (rows + 1) * 4 + rows * per_row,
        nnz as f64 * CSR_COMPUTE_PER_NNZ,
    );
    push(
        Format::Bitmap,
        rows * cols.div_ceil(8)
            + (rows + 1) * 4
            + (nnz + crate::bitmap::PAD) * size
            + rows * per_row,
        weights as f64 * bitmap_compute_per_weight(dtype),
    );
    let (kr, kc) = (stats.rows, stats.cols);
    if kr < rows || kc < cols {
        push(
            Format::Compact,
            kr * kc * size + 4 * (kr + kc) + kr * per_row,
            (kr * kc) as f64 * widen,
        );
    }
    push(
        Format::Dense,
        weights * size + rows * per_row,
        weights as f64 * widen,
    );

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

/// What the planner counts of a view's kept weights.
struct KeptStats {
    /// Rows holding at least one.
    rows: usize,
    /// Columns holding at least one.
    cols: usize,
    /// `br x bc` blocks holding at least one (0 when no block shape was asked for).
    blocks: usize,
}

/// [`KeptStats`] in one pass over the rows' kept bits (`DenseView::row_bits`), blocks of
/// `blocks` (rows, columns) counted when given.
fn kept_stats(view: &DenseView<'_>, blocks: Option<(usize, usize)>) -> KeptStats {
    let (rows, cols) = (view.rows(), view.cols());
    let (br, bc) = blocks.unwrap_or((rows.max(1), cols.max(1)));
    let words = cols.div_ceil(64);
    let (mut row, mut used, mut block_row) =
        (vec![0u64; words], vec![0u64; words], vec![0u64; words]);
    let mut stats = KeptStats {
        rows: 0,
        cols: 0,
        blocks: 0,
    };
    for r in 0..rows {
        view.row_bits(r, &mut row);
        stats.rows += usize::from(row.iter().any(|&w| w != 0));
        for ((u, b), &w) in used.iter_mut().zip(&mut block_row).zip(&row) {
            *u |= w;
            *b |= w;
        }
        // The last row of a block row: count its blocks holding a kept weight.
        if blocks.is_some() && ((r + 1) % br == 0 || r + 1 == rows) {
            stats.blocks += (0..cols)
                .step_by(bc)
                .filter(|&c0| crate::view::count_bits(&block_row, c0, (c0 + bc).min(cols)) > 0)
                .count();
            block_row.fill(0);
        }
    }
    stats.cols = used.iter().map(|w| w.count_ones() as usize).sum();
    stats
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

/// How [`plan_measured`] times its candidates: a buffer read between timed runs to flush the
/// caches (a layer's weights come from memory in a forward pass, since every other layer was
/// read since; a cache-hot timing would favour byte-heavy formats), the repetitions (best one
/// kept: other processes only ever add time) and the execution options decode runs with.
#[derive(Debug, Clone)]
pub struct PlanTimer {
    evict: Vec<f32>,
    reps: usize,
    exec: Exec,
}

impl PlanTimer {
    /// A timer that reads `evict_bytes` between timed runs (0: none, cache-hot figures) and
    /// keeps the best of `reps` (at least 1) runs on `exec`.
    pub fn new(evict_bytes: usize, reps: usize, exec: Exec) -> PlanTimer {
        // Non-zero contents so every page is really backed.
        let evict = (0..evict_bytes / 4).map(|i| (i % 251) as f32).collect();
        PlanTimer {
            evict,
            reps: reps.max(1),
            exec,
        }
    }

    /// 64 MiB flushed (well past the last-level caches of the machines we run on), best of 5,
    /// best ISA on rayon's pool: 45-140 ms per SmolLM2 layer on the loaded 2-core EPYC (2-3
    /// formats timed), i.e. 10-30 s for the whole model.
    ///
    /// A single GEMV timed this way includes what every call pays in a forward pass and a
    /// streamed benchmark spreads over many layers (waking the pool, page walks on freshly
    /// evicted weights): on the loaded 2-core EPYC it measured 1.5-2.5x the per-layer time of
    /// `bench kernels` and its sparse-vs-dense ratios were noisier, so the decision is only as
    /// good as the machine is quiet; the recorded times let the caller check it.
    pub fn standard() -> PlanTimer {
        PlanTimer::new(64 << 20, 5, Exec::auto())
    }

    /// Reads the flush buffer, one load per 64-byte line (enough to evict what was cached),
    /// split over rayon's pool when the timed kernel runs there: the pool's threads are then
    /// awake when the timed run starts, as they are between the layers of a forward pass
    /// (after a flush on one thread the workers had parked, and waking them cost more than a
    /// small layer's GEMV).
    fn flush(&self) {
        use rayon::prelude::*;
        let chunk = if self.exec.parallel {
            self.evict
                .len()
                .div_ceil(rayon::current_num_threads())
                .max(16)
        } else {
            self.evict.len().max(1)
        };
        let s: f32 = self
            .evict
            .par_chunks(chunk)
            .map(|c| c.iter().step_by(16).sum::<f32>())
            .sum();
        std::hint::black_box(s);
    }

    /// Seconds of one GEMV of `p`, caches flushed first.
    fn time(&self, p: &PackedLinear, x: &[f32], y: &mut [f32]) -> Result<f64> {
        self.flush();
        let t = std::time::Instant::now();
        p.gemv_with(x, y, self.exec)?;
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(y);
        Ok(secs)
    }
}

/// Sparse candidates are timed when they read fewer bytes than dense and their estimated cost
/// is within this factor of dense's: the estimates are off by less than that, so a format
/// outside it cannot win, and timing it would only lengthen planning. (One that reads as many
/// bytes as dense, e.g. 16x16 blocks of a 50% unstructured mask, all stored, does dense's work
/// with more indexing: timing it would only let noise pick it.)
const MEASURE_WITHIN: f64 = 1.5;
/// At most this many sparse candidates are timed (the best by estimate), besides dense.
const MEASURE_MAX_SPARSE: usize = 2;

/// Chooses by *timing*: the candidates [`choose_format`] estimates to be close to dense or
/// better (and that read fewer bytes) are packed and each runs a GEMV on this very matrix, caches flushed, best of
/// `timer`'s repetitions, interleaved round by round (a busy moment hits every candidate
/// alike), dense always among them; the fastest wins (dense on ties). The measurements are
/// recorded in [`Candidate::measured`], so the decision can be checked: the chosen format's
/// time is never above dense's. For plans made once per model (packing, export); planning by
/// estimate ([`choose_format`]) stays the deterministic default.
pub fn plan_measured(
    layer: &str,
    view: &DenseView<'_>,
    structure: Structure,
    dtype: Dtype,
    timer: &PlanTimer,
) -> Result<(PackedLinear, Choice)> {
    let mut choice = choose_format(layer, view, structure, dtype)?;
    let dense_at = choice
        .candidates
        .iter()
        .position(|c| c.format == Format::Dense)
        .ok_or_else(|| KernelError::InvalidParameter("no dense candidate".into()))?;
    let dense = &choice.candidates[dense_at];
    let (dense_cost, dense_bytes) = (dense.cost, dense.bytes);
    let mut sparse: Vec<usize> = (0..choice.candidates.len())
        .filter(|&i| {
            let c = &choice.candidates[i];
            i != dense_at && c.bytes < dense_bytes && c.cost <= dense_cost * MEASURE_WITHIN
        })
        .collect();
    sparse.sort_by(|&a, &b| {
        choice.candidates[a]
            .cost
            .total_cmp(&choice.candidates[b].cost)
    });
    sparse.truncate(MEASURE_MAX_SPARSE);
    // Dense first, so it wins ties.
    let order: Vec<usize> = std::iter::once(dense_at).chain(sparse).collect();
    let mut packed = order
        .iter()
        .map(|&i| PackedLinear::pack(layer, view, choice.candidates[i].format, dtype))
        .collect::<Result<Vec<_>>>()?;
    // A fixed input: the values do not affect the kernels' speed.
    let x: Vec<f32> = (0..view.cols())
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
        .collect();
    let mut y = vec![0.0f32; view.rows()];
    for p in &packed {
        p.gemv_with(&x, &mut y, timer.exec)?; // warm-up: page faults, thread wake-up
    }
    let mut best = vec![f64::INFINITY; packed.len()];
    for _ in 0..timer.reps {
        for (b, p) in best.iter_mut().zip(&packed) {
            *b = b.min(timer.time(p, &x, &mut y)?);
        }
    }
    for (&i, &b) in order.iter().zip(&best) {
        choice.candidates[i].measured = Some(b);
    }
    // First minimum wins: dense on ties.
    let win = (0..best.len()).fold(0, |w, k| if best[k] < best[w] { k } else { w });
    choice.format = choice.candidates[order[win]].format;
    Ok((packed.swap_remove(win), choice))
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

    /// [`PackedLinear::gemm`] into a new `[tokens, rows]` vector, not zeroed first where the
    /// kernel writes every output itself (dense f32 and bf16, and the bf16 bitmap, on the
    /// tokens-in-lanes GEMM). Best ISA, rayon's global pool.
    pub fn gemm_new(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let exec = Exec::auto();
        par::new_output(checked_len(tokens, self.rows())?, |y| match self {
            PackedLinear::Dense(w) => w.gemm_out(x, tokens, y, exec),
            PackedLinear::Bitmap(w) => w.gemm_out(x, tokens, y, exec),
            other => other.gemm_with(x, tokens, y.init(), exec),
        })
    }
}
