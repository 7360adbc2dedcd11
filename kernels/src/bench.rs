//! The kernel benchmark behind `espalier bench kernels`.
//!
//! What it answers: at batch 1, how close each format runs to this machine's memory bandwidth
//! and how much faster than dense it is, on the linear shapes of SmolLM2-135M. Three choices
//! make the figures honest:
//!
//! * **Streaming, not cache-hot.** Each configuration packs `layers` (default 30) *different*
//!   matrices and times one GEMV through all of them, as a decoder does per token, after
//!   reading a buffer four times the L3 cache this VM reports. A single 576x576 matrix (1.3 MB), or
//!   even 30 sparse ones, would otherwise sit in cache and report fantasy bandwidth.
//! * **One process, one run, ratios.** The bandwidth probe, candle's matmul, our dense kernel
//!   and every sparse format are measured in the same run, and every figure is shown against
//!   those; absolute numbers on a shared 2-core machine drift, ratios much less.
//! * **Best of `reps`, baselines interleaved.** Each figure is the fastest repetition: noise
//!   from other processes only ever adds time, so the minimum is the best estimate of what the
//!   kernel costs. The baselines are re-run between every configuration's repetitions and
//!   each ratio uses the baselines of the same rounds, so a loaded moment hits both sides.
//!
//! The baseline of every speed-up is the faster of candle's f32 matmul (`x.matmul(&w.t())`,
//! what a candle linear layer runs) and our dense f32 GEMV, so bf16 rows include the gain from
//! halving the bytes and i8 rows (dense, BSR and 2:4, per-row scales) from quartering them.
//! Prefill rows compare our GEMM on `tokens` rows of `X` against candle's.
//!
//! Masks are random: unstructured at the given sparsity (CSR and bitmap), whole 16x16 blocks
//! (BSR), and exactly 2 of every 4 (2:4). The weights' values do not affect speed.

use crate::element::Dtype;
use crate::error::{KernelError, Result};
use crate::isa::{Exec, Isa};
use crate::plan::{Format, PackedLinear, Structure, choose_format};
use crate::view::DenseView;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Serialize;
use std::fmt;
use std::hint::black_box;
use std::time::Instant;

/// The linear shapes `(out, in)` of SmolLM2-135M and how many of each one block holds
/// (q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down: 576x1536).
pub const SMOLLM2_SHAPES: [((usize, usize), usize); 4] = [
    ((576, 576), 2),
    ((192, 576), 2),
    ((1536, 576), 2),
    ((576, 1536), 1),
];

/// SmolLM2-135M's LM head `(vocab, hidden)`: one matrix of 28M weights, read once per token,
/// the largest single read of a decode step (measured too, but outside the per-block summary).
pub const SMOLLM2_LM_HEAD: (usize, usize) = (49152, 576);

/// Most bytes of f32 weights one configuration packs: `layers` matrices of a shape, fewer for
/// the LM head (2 of its 113 MB already stream from memory on any machine).
const MAX_CONFIG_BYTES: usize = 256 << 20;

/// What to measure. [`KernelBenchOptions::default`] is the full run the issue asks for;
/// [`KernelBenchOptions::quick`] a run of well under a second for tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelBenchOptions {
    /// Matrix shapes `(out, in)`.
    pub shapes: Vec<(usize, usize)>,
    /// Sparsities (fraction pruned, `0 < s < 1`) for the BSR, CSR and bitmap rows.
    pub sparsities: Vec<f64>,
    /// Include 2:4 rows.
    pub two_four: bool,
    /// Storage dtypes to measure (the baseline is always f32).
    pub dtypes: Vec<Dtype>,
    /// Distinct matrices per configuration, streamed through in turn (30 = SmolLM2's layers;
    /// fewer where that would exceed 256 MiB of f32 weights, i.e. for the LM head).
    pub layers: usize,
    /// Bytes read between timed passes to flush the caches: 30 layers of a sparse 192x576
    /// matrix (a few MB) would otherwise stay in a 32 MB L3 cache from one pass to the next,
    /// while in a real model they are read between all the other layers' weights. 0 disables.
    pub evict_bytes: usize,
    /// Timed repetitions of each GEMV configuration (best one reported).
    pub reps: usize,
    /// Tokens of the prefill comparison (0 skips it).
    pub prefill_tokens: usize,
    /// Timed repetitions of each prefill configuration.
    pub prefill_reps: usize,
    /// Bytes the memory-read probe streams per pass (in 2 MiB buffers, caches flushed first).
    /// The probe runs at the start and after every shape; the best figure is used.
    pub probe_bytes: usize,
    /// Instruction set (`Isa::detect()` unless comparing the portable path).
    #[serde(skip)]
    pub isa: Isa,
    /// Seed of the random weights and masks.
    pub seed: u64,
}

impl Default for KernelBenchOptions {
    fn default() -> Self {
        KernelBenchOptions {
            shapes: SMOLLM2_SHAPES
                .iter()
                .map(|&(s, _)| s)
                .chain([SMOLLM2_LM_HEAD])
                .collect(),
            sparsities: vec![0.5, 0.7, 0.8, 0.9],
            two_four: true,
            dtypes: vec![Dtype::F32, Dtype::Bf16, Dtype::I8],
            layers: 30,
            evict_bytes: 128 << 20,
            reps: 10,
            prefill_tokens: 128,
            prefill_reps: 3,
            probe_bytes: 64 << 20,
            isa: Isa::detect(),
            seed: 0x5eed,
        }
    }
}

impl KernelBenchOptions {
    /// A tiny run that exercises every code path (for tests and smoke checks); its numbers
    /// mean little since everything fits in cache.
    pub fn quick() -> Self {
        KernelBenchOptions {
            shapes: vec![(64, 96), (48, 160)],
            sparsities: vec![0.5, 0.8],
            two_four: true,
            dtypes: vec![Dtype::F32, Dtype::Bf16, Dtype::I8],
            layers: 2,
            evict_bytes: 0,
            reps: 2,
            prefill_tokens: 8,
            prefill_reps: 1,
            probe_bytes: 1 << 20,
            isa: Isa::detect(),
            seed: 1,
        }
    }
}

/// One measured GEMV configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeRow {
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// What was run: `candle`, `dense`, `bsr16x16`, `csr-u16`, `bitmap`, `2:4`.
    pub kernel: String,
    /// Storage dtype.
    pub dtype: String,
    /// Fraction of weights pruned (0 for the dense rows).
    pub sparsity: f64,
    /// Bytes of one packed matrix.
    pub bytes: usize,
    /// Milliseconds per matrix (best repetition, averaged over the streamed layers).
    pub ms: f64,
    /// Packed bytes read per second, in GB/s.
    pub gbps: f64,
    /// `gbps` as a share of the probe's bandwidth.
    pub share_of_bandwidth: f64,
    /// Baseline time over this row's time (the baseline being the faster of candle and our
    /// dense f32 kernel on this shape, measured interleaved with this row).
    pub speedup: f64,
    /// Our dense GEMV *in this row's dtype* (same shape, measured interleaved with this row)
    /// over this row's time: what a sparse format gains over dense storage of the same
    /// precision, e.g. bitmap bf16 against dense bf16. 1 for the dense rows themselves.
    pub vs_dense_same_dtype: f64,
    /// The same against the best baseline time of the whole run: conservative when other
    /// processes load the machine (the baseline then had many more chances at a quiet moment
    /// than this row had).
    pub speedup_vs_best: f64,
    /// For unstructured masks: the format the planner picks for this mask in this dtype.
    pub planned: Option<String>,
}

/// One measured prefill configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefillRow {
    /// `(out, in)`.
    pub shape: (usize, usize),
    /// What was run: `candle`, `dense`, `bsr16x16`.
    pub kernel: String,
    /// Fraction pruned.
    pub sparsity: f64,
    /// Milliseconds per matrix for all tokens.
    pub ms: f64,
    /// Candle's time over this row's time.
    pub speedup_vs_candle: f64,
}

/// A kernel configuration aggregated over one SmolLM2 block (shapes weighted by how often a
/// block holds them), which is what the model-level speed-up follows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SummaryRow {
    /// Kernel, dtype and sparsity, e.g. `bsr16x16 f32 80%`.
    pub label: String,
    /// Block-weighted baseline time over this configuration's time.
    pub speedup: f64,
    /// The same against the best baselines of the whole run (conservative).
    pub speedup_vs_best: f64,
    /// Block-weighted time of dense in the same dtype over this configuration's.
    pub vs_dense_same_dtype: f64,
    /// Block-weighted bandwidth share.
    pub share_of_bandwidth: f64,
}

/// Everything one run measured. `Display` prints the tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelBenchReport {
    /// Rayon threads the kernels (and candle) ran on.
    pub threads: usize,
    /// Instruction set used by our kernels.
    pub isa: String,
    /// Read bandwidth with all threads, GB/s.
    pub probe_gbps: f64,
    /// Read bandwidth of one thread, GB/s.
    pub probe_gbps_one_thread: f64,
    /// Matrices streamed per configuration.
    pub layers: usize,
    /// GEMV measurements.
    pub decode: Vec<DecodeRow>,
    /// Prefill measurements.
    pub prefill: Vec<PrefillRow>,
    /// Per-configuration block-weighted summary.
    pub summary: Vec<SummaryRow>,
    /// Tokens of the prefill rows.
    pub prefill_tokens: usize,
}

/// Small deterministic generator (SplitMix64): the benchmark needs random masks, not
/// statistical quality, and this keeps `rand` out of the library's dependencies.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Non-zero value in `[-1, 1)`.
    fn weight(&mut self) -> f32 {
        let v = (self.unit() * 2.0 - 1.0) as f32;
        if v == 0.0 { 0.25 } else { v }
    }
}

/// Which mask a configuration prunes with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MaskKind {
    None,
    Unstructured(f64),
    Blocks16(f64),
    TwoFour,
}

/// Dense-with-zeros weights for one layer of one configuration.
fn make_weights(rng: &mut SplitMix, rows: usize, cols: usize, kind: MaskKind) -> Vec<f32> {
    let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.weight()).collect();
    match kind {
        MaskKind::None => {}
        MaskKind::Unstructured(s) => {
            for v in &mut w {
                if rng.unit() < s {
                    *v = 0.0;
                }
            }
        }
        MaskKind::Blocks16(s) => {
            for rb in 0..rows.div_ceil(16) {
                for cb in 0..cols.div_ceil(16) {
                    if rng.unit() < s {
                        for r in rb * 16..(rb * 16 + 16).min(rows) {
                            w[r * cols + cb * 16..(r * cols + cb * 16 + 16).min((r + 1) * cols)]
                                .fill(0.0);
                        }
                    }
                }
            }
        }
        MaskKind::TwoFour => {
            for g in w.chunks_mut(4) {
                // Keep two distinct random positions of the four.
                let a = (rng.next() % 4) as usize;
                let b = (a + 1 + (rng.next() % 3) as usize) % 4;
                for (i, v) in g.iter_mut().enumerate() {
                    if i != a && i != b {
                        *v = 0.0;
                    }
                }
            }
        }
    }
    w
}

/// A buffer larger than the last-level cache, read before every timed pass so each pass
/// starts with its weights in memory, not in cache, as in a model whose other layers' weights
/// were read since.
struct Evictor {
    buf: Vec<f32>,
}

impl Evictor {
    fn new(bytes: usize) -> Evictor {
        // Non-zero contents so every page is really backed (a zeroed allocation may map one
        // shared zero page and read from cache).
        Evictor {
            buf: (0..bytes / 4).map(|i| (i % 1000) as f32).collect(),
        }
    }

    fn evict(&self) {
        if !self.buf.is_empty() {
            black_box(parallel_sum(&self.buf, rayon::current_num_threads()));
        }
    }

    /// Evicts, then times one run of `f`, in seconds.
    fn time(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.evict();
        let t = Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    }
}

/// Bytes of one probe buffer.
const PROBE_CHUNK: usize = 2 << 20;

/// Sums `buf` with `threads` tasks of rayon's pool (the bandwidth probe's inner loop).
fn parallel_sum(buf: &[f32], threads: usize) -> f32 {
    let chunk = buf.len().div_ceil(threads.max(1)).max(1);
    buf.par_chunks(chunk)
        .with_max_len(1)
        .map(sum_f32)
        .reduce(|| 0.0, |a, b| a + b)
}

/// Sum of one contiguous chunk: one sequential stream, 256-bit loads where the CPU has them,
/// i.e. read the way our kernels read, so the probe is a fair ceiling for them.
fn sum_f32(c: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx2Fma.is_available() {
        // SAFETY: AVX2 checked just above.
        return unsafe { sum_avx2(c) };
    }
    let mut acc = [0.0f32; 8];
    let chunks = c.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for q in chunks {
        for j in 0..8 {
            acc[j] += q[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(c: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= c.len() {
        for (j, acc) in a.iter_mut().enumerate() {
            // SAFETY: i + 8j + 8 <= i + 32 <= len.
            *acc = _mm256_add_ps(*acc, unsafe { _mm256_loadu_ps(c.as_ptr().add(i + 8 * j)) });
        }
        i += 32;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` has 8 floats.
    unsafe {
        _mm256_storeu_ps(
            lanes.as_mut_ptr(),
            _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
        )
    };
    lanes.iter().sum::<f32>() + c[i..].iter().sum::<f32>()
}

/// Read bandwidth in GB/s, measured the way the kernels read: the probe's bytes are split
/// into 2 MiB buffers (the size of a SmolLM2 layer), the caches are flushed, then `threads`
/// tasks sum their share of the buffers one after the other; best of a few passes. (One
/// big buffer read in a single sweep measured well below what the GEMV kernels stream on this
/// VM, so it would not be a fair ceiling.)
fn probe_bandwidth(bufs: &[Vec<f32>], threads: usize, evictor: &Evictor) -> f64 {
    let bytes: usize = bufs.iter().map(|b| b.len() * 4).sum();
    let per = bufs.len().div_ceil(threads.max(1)).max(1);
    let pass = || -> f32 {
        bufs.par_chunks(per)
            .with_max_len(1)
            .map(|group| group.iter().map(|b| sum_f32(b)).sum::<f32>())
            .sum()
    };
    black_box(pass());
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        evictor.evict();
        let t = Instant::now();
        black_box(pass());
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

/// The read bandwidth (GB/s) of this machine right now, on rayon's pool, measured the way the
/// kernels read (see `probe_bandwidth`): 64 MiB of 2 MiB buffers, caches flushed with 128 MiB
/// between passes. For benchmarks that report how close a forward pass comes to the memory
/// limit, measured in the same run as the pass.
pub fn memory_bandwidth_gbps() -> f64 {
    let bufs: Vec<Vec<f32>> = (0..(64 << 20) / PROBE_CHUNK)
        .map(|k| {
            (0..PROBE_CHUNK / 4)
                .map(|i| ((i + k) % 1000) as f32)
                .collect()
        })
        .collect();
    probe_bandwidth(
        &bufs,
        rayon::current_num_threads(),
        &Evictor::new(128 << 20),
    )
}

fn baseline_err(e: candle_core::Error) -> KernelError {
    KernelError::Baseline(e.to_string())
}

/// Candle's linear (`x.matmul(&w.t())`) through all layers.
fn candle_pass(ws: &[Tensor], x: &Tensor) -> Result<()> {
    for w in ws {
        let t = w.t().map_err(baseline_err)?;
        black_box(x.matmul(&t).map_err(baseline_err)?);
    }
    Ok(())
}

/// Our GEMV through all layers.
fn gemv_pass(ps: &[PackedLinear], x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
    for p in ps {
        p.gemv_with(x, y, exec)?;
    }
    black_box(y);
    Ok(())
}

/// Our GEMM through all layers.
fn gemm_pass(
    ps: &[PackedLinear],
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) -> Result<()> {
    for p in ps {
        p.gemm_with(x, tokens, y, exec)?;
    }
    black_box(y);
    Ok(())
}

/// One row of [`run_batch_bench`]: a decode step of `tokens` tokens through all of SmolLM2's
/// block linears (30 blocks), dense and 2:4 in the same dtype, best of the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct BatchRow {
    /// Storage dtype of both.
    pub dtype: String,
    /// Tokens per step.
    pub tokens: usize,
    /// Milliseconds per step, dense.
    pub dense_ms: f64,
    /// Milliseconds per step, 2:4.
    pub two_four_ms: f64,
    /// Milliseconds per step, the same 50% masks in the bitmap format (what an unstructured
    /// 50% layer plans to).
    pub bitmap_ms: f64,
}

/// Decode steps of a few tokens (continuous batching) through 30 SmolLM2 blocks' linears,
/// 2:4 and the same masks as a bitmap beside dense in each dtype, timed in alternating rounds (best of `rounds`). The 30
/// blocks are streamed, so the weights come from memory as in a real model; the 2:4 masks are
/// `make_weights`'s, packed both ways.
pub fn run_batch_bench(tokens: &[usize], dtypes: &[Dtype], rounds: usize) -> Result<Vec<BatchRow>> {
    const BLOCKS: usize = 30;
    let exec = Exec::auto();
    let mut rng = SplitMix(0x5eed);
    let mut rows = Vec::new();
    for &dtype in dtypes {
        let mut dense = Vec::new();
        let mut nm = Vec::new();
        let mut bitmap = Vec::new();
        for _ in 0..BLOCKS {
            for &((r, c), count) in &SMOLLM2_SHAPES {
                for _ in 0..count {
                    let w = make_weights(&mut rng, r, c, MaskKind::TwoFour);
                    let view = DenseView::new(&w, r, c)?;
                    dense.push(PackedLinear::pack("dense", &view, Format::Dense, dtype)?);
                    nm.push(PackedLinear::pack(
                        "2:4",
                        &view,
                        Format::NM { n: 2, m: 4 },
                        dtype,
                    )?);
                    bitmap.push(PackedLinear::pack("bitmap", &view, Format::Bitmap, dtype)?);
                }
            }
        }
        let widest = SMOLLM2_SHAPES
            .iter()
            .map(|&((r, _), _)| r)
            .max()
            .unwrap_or(0);
        let mut widths: Vec<usize> = SMOLLM2_SHAPES.iter().map(|&((_, c), _)| c).collect();
        widths.sort_unstable();
        widths.dedup();
        for &t in tokens {
            // One input per input width, shared by the layers of that width.
            let xs: Vec<(usize, Vec<f32>)> = widths
                .iter()
                .map(|&c| (c, (0..t * c).map(|_| rng.weight()).collect()))
                .collect();
            let mut y = vec![0.0f32; t * widest];
            let mut pass = |layers: &[PackedLinear]| -> Result<f64> {
                let start = Instant::now();
                for p in layers {
                    let x = xs
                        .iter()
                        .find(|(c, _)| *c == p.cols())
                        .map_or(&xs[0].1, |(_, x)| x);
                    p.gemm_with(x, t, &mut y[..t * p.rows()], exec)?;
                }
                black_box(&mut y);
                Ok(start.elapsed().as_secs_f64())
            };
            let (mut best_dense, mut best_nm, mut best_bitmap) =
                (f64::INFINITY, f64::INFINITY, f64::INFINITY);
            for _ in 0..rounds.max(1) {
                best_dense = best_dense.min(pass(&dense)?);
                best_nm = best_nm.min(pass(&nm)?);
                best_bitmap = best_bitmap.min(pass(&bitmap)?);
            }
            rows.push(BatchRow {
                dtype: dtype.to_string(),
                tokens: t,
                dense_ms: best_dense * 1e3,
                two_four_ms: best_nm * 1e3,
                bitmap_ms: best_bitmap * 1e3,
            });
        }
    }
    Ok(rows)
}

/// A measured GEMV configuration before the baseline of its shape is final.
struct Measured {
    shape: (usize, usize),
    kernel: String,
    dtype: String,
    sparsity: f64,
    bytes: usize,
    secs: f64,
    planned: Option<String>,
    /// Baseline seconds per matrix measured in this configuration's own rounds (the speed-up
    /// compares the best of the same number of interleaved samples on both sides).
    paired_base: Option<f64>,
    /// Dense in this configuration's dtype, seconds per matrix, from the same rounds.
    paired_same: Option<f64>,
}

/// Runs the benchmark. `progress` receives one line per configuration as it goes (the full
/// run takes a minute or two).
///
/// Baselines are re-measured alternately with every configuration (dense, candle, sparse,
/// dense, ...). Each speed-up compares the best of that configuration's rounds with the best
/// baseline of the *same* rounds, so both sides get the same number of samples under the same
/// load; the baseline rows show the best of all rounds.
pub fn run_kernel_bench(
    opts: &KernelBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelBenchReport> {
    let threads = rayon::current_num_threads();
    let exec = Exec::threaded(opts.isa);
    let layers = opts.layers.max(1);
    let reps = opts.reps.max(1);
    let preps = opts.prefill_reps.max(1);
    // Non-zero contents so every page is really backed.
    let probe_buf: Vec<Vec<f32>> = (0..opts.probe_bytes.div_ceil(PROBE_CHUNK).max(1))
        .map(|k| {
            (0..PROBE_CHUNK / 4)
                .map(|i| ((i + k) % 1000) as f32)
                .collect()
        })
        .collect();
    let evictor = Evictor::new(opts.evict_bytes);
    progress(&format!(
        "memory probe: {} MiB, {threads} threads",
        opts.probe_bytes >> 20
    ));
    let mut probe = probe_bandwidth(&probe_buf, threads, &evictor);
    let mut probe_one = probe_bandwidth(&probe_buf, 1, &evictor);
    progress(&format!(
        "  {probe:.1} GB/s ({probe_one:.1} GB/s on one thread)"
    ));
    let mut rng = SplitMix(opts.seed);
    let mut measured: Vec<Measured> = Vec::new();
    let mut bases: Vec<((usize, usize), f64)> = Vec::new();
    let mut prefill = Vec::new();

    for &(rows, cols) in &opts.shapes {
        let layers = layers.min((MAX_CONFIG_BYTES / (rows * cols * 4).max(1)).max(1));
        let x: Vec<f32> = (0..cols).map(|_| rng.weight()).collect();
        let mut y = vec![0.0f32; rows];
        let tokens = opts.prefill_tokens;
        let xp: Vec<f32> = (0..tokens * cols).map(|_| rng.weight()).collect();
        let mut yp = vec![0.0f32; tokens * rows];

        // Baselines: candle and our dense kernel on the same dense weights, kept for the
        // whole shape so they can be re-measured between the configurations.
        let (candle_w, dense_f32, dense_other) = {
            let dense_w: Vec<Vec<f32>> = (0..layers)
                .map(|_| make_weights(&mut rng, rows, cols, MaskKind::None))
                .collect();
            // Dense in every other measured dtype, on the same weights: the same-dtype baseline.
            let dense_other = opts
                .dtypes
                .iter()
                .filter(|&&d| d != Dtype::F32)
                .map(|&d| {
                    let ps = dense_w
                        .iter()
                        .map(|w| PackedLinear::dense(w, [rows, cols], d))
                        .collect::<Result<Vec<_>>>()?;
                    Ok((d, ps))
                })
                .collect::<Result<Vec<_>>>()?;
            let candle_w = dense_w
                .iter()
                .map(|w| Tensor::from_slice(w, (rows, cols), &Device::Cpu).map_err(baseline_err))
                .collect::<Result<Vec<_>>>()?;
            let dense_f32 = dense_w
                .iter()
                .map(|w| PackedLinear::dense(w, [rows, cols], Dtype::F32))
                .collect::<Result<Vec<_>>>()?;
            (candle_w, dense_f32, dense_other)
        };
        let xt = Tensor::from_slice(&x, (1, cols), &Device::Cpu).map_err(baseline_err)?;
        let xpt = if tokens > 0 {
            Some(Tensor::from_slice(&xp, (tokens, cols), &Device::Cpu).map_err(baseline_err)?)
        } else {
            None
        };
        let (mut best_candle, mut best_dense) = (f64::INFINITY, f64::INFINITY);
        let (mut best_candle_p, mut best_dense_p) = (f64::INFINITY, f64::INFINITY);
        // One round of the baselines, alternating; the warm-up pass is untimed.
        // One round of the baselines, alternating; the warm-up pass is untimed. The baselines
        // write their own output buffer so the closure can live across the loop below.
        let mut yb = vec![0.0f32; rows];
        let mut yb2 = vec![0.0f32; rows];
        let mut baseline_round = |best_candle: &mut f64, best_dense: &mut f64| -> Result<()> {
            *best_dense =
                best_dense.min(evictor.time(|| gemv_pass(&dense_f32, &x, &mut yb, exec))?);
            *best_candle = best_candle.min(evictor.time(|| candle_pass(&candle_w, &xt))?);
            Ok(())
        };
        gemv_pass(&dense_f32, &x, &mut vec![0.0; rows], exec)?;
        candle_pass(&candle_w, &xt)?;
        for _ in 0..reps {
            baseline_round(&mut best_candle, &mut best_dense)?;
        }
        // Dense prefill in the other dtypes (bf16 takes AVX512-BF16 where the CPU has it).
        let mut other_p: Vec<(String, f64)> = Vec::new();
        if let Some(xpt) = &xpt {
            for _ in 0..preps {
                best_dense_p = best_dense_p
                    .min(evictor.time(|| gemm_pass(&dense_f32, &xp, tokens, &mut yp, exec))?);
                best_candle_p = best_candle_p.min(evictor.time(|| candle_pass(&candle_w, xpt))?);
            }
            for (d, ps) in &dense_other {
                if *d == Dtype::Bf16 && crate::amx::enabled() {
                    // Both bf16 kernels, alternating: AMX tiles and AVX512-BF16 registers.
                    let mut best = [f64::INFINITY; 2];
                    for _ in 0..preps {
                        for (on, best) in [true, false].into_iter().zip(best.iter_mut()) {
                            crate::amx::set_enabled(on);
                            gemm_pass(ps, &xp, tokens, &mut yp, exec)?;
                            *best = best
                                .min(evictor.time(|| gemm_pass(ps, &xp, tokens, &mut yp, exec))?);
                        }
                    }
                    crate::amx::set_enabled(true);
                    other_p.push((format!("dense {d} (AMX)"), best[0]));
                    other_p.push((format!("dense {d} (AVX512-BF16)"), best[1]));
                    continue;
                }
                gemm_pass(ps, &xp, tokens, &mut yp, exec)?;
                let mut best = f64::INFINITY;
                for _ in 0..preps {
                    best = best.min(evictor.time(|| gemm_pass(ps, &xp, tokens, &mut yp, exec))?);
                }
                other_p.push((format!("dense {d}"), best));
            }
        }
        progress(&format!(
            "{rows}x{cols} ({layers} matrices): candle {:.4} ms, dense {:.4} ms per matrix",
            best_candle / layers as f64 * 1e3,
            best_dense / layers as f64 * 1e3
        ));

        // Every other configuration: (mask, format to pack); dense bf16 first.
        let mut configs: Vec<(MaskKind, Format)> = vec![(MaskKind::None, Format::Dense)];
        for &s in &opts.sparsities {
            configs.push((MaskKind::Blocks16(s), Format::Bsr { br: 16, bc: 16 }));
            configs.push((MaskKind::Unstructured(s), Format::Csr));
            configs.push((MaskKind::Unstructured(s), Format::Bitmap));
        }
        if opts.two_four {
            configs.push((MaskKind::TwoFour, Format::NM { n: 2, m: 4 }));
        }
        let mut prefill_cfg: Vec<(String, f64, f64, Option<f64>)> = Vec::new();
        for (kind, format) in configs {
            let cfg_seed = rng.next();
            let ws: Vec<Vec<f32>> = {
                let mut r = SplitMix(cfg_seed);
                (0..layers)
                    .map(|_| make_weights(&mut r, rows, cols, kind))
                    .collect()
            };
            let sparsity = match kind {
                MaskKind::None => 0.0,
                MaskKind::Unstructured(s) | MaskKind::Blocks16(s) => s,
                MaskKind::TwoFour => 0.5,
            };
            for &dtype in &opts.dtypes {
                let planned = match (kind, format) {
                    (MaskKind::Unstructured(_), Format::Csr | Format::Bitmap) => {
                        let view = DenseView::new(&ws[0], rows, cols)?;
                        let choice = choose_format("bench", &view, Structure::Unstructured, dtype)?;
                        Some(choice.format.to_string())
                    }
                    _ => None,
                };
                if kind == MaskKind::None && dtype == Dtype::F32 {
                    continue; // the baseline itself
                }
                // int8 is meant for dense, BSR and 2:4; CSR and bitmap support it, but their
                // kernels are bound by gathering activations, not by value bytes (see the
                // planner's floors), so their int8 rows would only lengthen the run.
                // (The bitmap's int8 rows are kept where its VBMI2 kernel runs: it expands 64
                // values at a time and reads 0.625 bytes per weight at 50%.)
                let bitmap_i8 = format == Format::Bitmap && crate::bitmap::vbmi2_expand();
                if dtype == Dtype::I8
                    && matches!(format, Format::Csr | Format::Bitmap)
                    && !bitmap_i8
                {
                    continue;
                }
                let packed = ws
                    .iter()
                    .map(|w| {
                        let view = DenseView::new(w, rows, cols)?;
                        PackedLinear::pack("bench", &view, format, dtype)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bytes = packed.first().map_or(0, PackedLinear::bytes);
                let kernel = packed.first().map_or_else(
                    || format.to_string(),
                    |p| {
                        let name = p.format_name();
                        name.split('/').next().unwrap_or(&name).to_string()
                    },
                );
                gemv_pass(&packed, &x, &mut y, exec)?;
                // Dense in this dtype, timed in the same rounds (f32: the baseline itself).
                let same = dense_other
                    .iter()
                    .find(|(d, _)| *d == dtype && kind != MaskKind::None)
                    .map(|(_, ps)| ps);
                let mut best = f64::INFINITY;
                let (mut local_candle, mut local_dense) = (f64::INFINITY, f64::INFINITY);
                let mut local_same = f64::INFINITY;
                for _ in 0..reps {
                    baseline_round(&mut local_candle, &mut local_dense)?;
                    if let Some(ps) = same {
                        local_same =
                            local_same.min(evictor.time(|| gemv_pass(ps, &x, &mut yb2, exec))?);
                    }
                    best = best.min(evictor.time(|| gemv_pass(&packed, &x, &mut y, exec))?);
                }
                best_candle = best_candle.min(local_candle);
                best_dense = best_dense.min(local_dense);
                let paired = local_candle.min(local_dense) / layers as f64;
                let secs = best / layers as f64;
                // Dense rows are their own same-dtype baseline; f32 rows compare with dense f32.
                let paired_same = match (kind, dtype) {
                    (MaskKind::None, _) => secs,
                    (_, Dtype::F32) => local_dense / layers as f64,
                    _ => local_same / layers as f64,
                };
                progress(&format!(
                    "{rows}x{cols} {kernel} {dtype} {:.0}%: {:.4} ms, {:.1} GB/s, {:.2}x, {:.2}x dense {dtype}",
                    sparsity * 100.0,
                    secs * 1e3,
                    bytes as f64 / secs / 1e9,
                    paired / secs,
                    paired_same / secs
                ));
                measured.push(Measured {
                    shape: (rows, cols),
                    kernel: kernel.clone(),
                    dtype: dtype.to_string(),
                    sparsity,
                    bytes,
                    secs,
                    planned,
                    paired_base: Some(paired),
                    paired_same: Some(paired_same),
                });

                // Prefill against candle, alternating too: BSR in f32, and every bf16 format
                // (they share the AVX512-BF16 GEMM where the CPU has it).
                let is_bsr = matches!(format, Format::Bsr { .. });
                let measured_prefill = match dtype {
                    Dtype::F32 => is_bsr,
                    Dtype::Bf16 => format != Format::Dense,
                    Dtype::I8 => false,
                };
                if let (Some(xpt), true) = (&xpt, measured_prefill) {
                    gemm_pass(&packed, &xp, tokens, &mut yp, exec)?;
                    let mut best = f64::INFINITY;
                    let mut local_candle = f64::INFINITY;
                    for _ in 0..preps {
                        local_candle =
                            local_candle.min(evictor.time(|| candle_pass(&candle_w, xpt))?);
                        best = best
                            .min(evictor.time(|| gemm_pass(&packed, &xp, tokens, &mut yp, exec))?);
                    }
                    best_candle_p = best_candle_p.min(local_candle);
                    let l = layers as f64;
                    let name = match dtype {
                        Dtype::F32 => kernel,
                        d => format!("{kernel} {d}"),
                    };
                    prefill_cfg.push((name, sparsity, best / l, Some(local_candle / l)));
                }
            }
        }

        let l = layers as f64;
        let layer_bytes_f32 = rows * cols * 4;
        for (kernel, secs) in [("candle", best_candle / l), ("dense", best_dense / l)] {
            measured.push(Measured {
                shape: (rows, cols),
                kernel: kernel.into(),
                dtype: "f32".into(),
                sparsity: 0.0,
                bytes: layer_bytes_f32,
                secs,
                planned: None,
                paired_base: None,
                paired_same: None,
            });
        }
        bases.push(((rows, cols), best_candle.min(best_dense) / l));
        if tokens > 0 {
            let cp = best_candle_p / l;
            let mut rows_p = vec![
                ("candle".to_string(), 0.0, cp, None),
                ("dense".to_string(), 0.0, best_dense_p / l, None),
            ];
            rows_p.extend(other_p.into_iter().map(|(k, t)| (k, 0.0, t / l, None)));
            rows_p.extend(prefill_cfg);
            for (kernel, sparsity, secs, paired) in rows_p {
                prefill.push(PrefillRow {
                    shape: (rows, cols),
                    kernel,
                    sparsity,
                    ms: secs * 1e3,
                    speedup_vs_candle: paired.unwrap_or(cp) / secs,
                });
            }
        }
        // The machine's bandwidth is re-probed between shapes; the best figure is the ceiling.
        probe = probe.max(probe_bandwidth(&probe_buf, threads, &evictor));
        probe_one = probe_one.max(probe_bandwidth(&probe_buf, 1, &evictor));
    }

    // Baseline rows first within each shape, as they are read first.
    measured.sort_by_key(|m| {
        let shape_pos = opts.shapes.iter().position(|&s| s == m.shape);
        let kind = match m.kernel.as_str() {
            "candle" => 0,
            "dense" if m.dtype == "f32" => 1,
            _ => 2,
        };
        (shape_pos, kind)
    });
    let decode: Vec<DecodeRow> = measured
        .into_iter()
        .map(|m| {
            let best = bases
                .iter()
                .find(|(s, _)| *s == m.shape)
                .map_or(m.secs, |&(_, b)| b);
            let base = m.paired_base.unwrap_or(best);
            let gbps = m.bytes as f64 / m.secs / 1e9;
            DecodeRow {
                shape: m.shape,
                kernel: m.kernel,
                dtype: m.dtype,
                sparsity: m.sparsity,
                bytes: m.bytes,
                ms: m.secs * 1e3,
                gbps,
                share_of_bandwidth: gbps / probe,
                speedup: base / m.secs,
                vs_dense_same_dtype: m.paired_same.unwrap_or(m.secs) / m.secs,
                speedup_vs_best: best / m.secs,
                planned: m.planned,
            }
        })
        .collect();
    let summary = summarise(&decode);
    Ok(KernelBenchReport {
        threads,
        isa: format!("{:?}", opts.isa.effective()),
        probe_gbps: probe,
        probe_gbps_one_thread: probe_one,
        layers,
        decode,
        prefill,
        summary,
        prefill_tokens: opts.prefill_tokens,
    })
}

/// How often one SmolLM2 block holds a shape (1 for shapes outside the model).
fn block_weight(shape: (usize, usize)) -> f64 {
    SMOLLM2_SHAPES
        .iter()
        .find(|(s, _)| *s == shape)
        .map_or(1.0, |&(_, n)| n as f64)
}

/// Aggregates each (kernel, dtype, sparsity) over the shapes: block-weighted baseline time over
/// block-weighted time, i.e. the speed-up of one whole block's linears (the LM head, outside
/// the blocks, is left out).
fn summarise(rows: &[DecodeRow]) -> Vec<SummaryRow> {
    let mut labels: Vec<(String, String, f64)> = Vec::new();
    for r in rows {
        let key = (r.kernel.clone(), r.dtype.clone(), r.sparsity);
        if !labels.contains(&key) {
            labels.push(key);
        }
    }
    labels
        .into_iter()
        .map(|(kernel, dtype, sparsity)| {
            let (mut t, mut tb, mut tbb, mut bytes) = (0.0, 0.0, 0.0, 0.0);
            let (mut probe, mut ts) = (0.0, 0.0);
            for r in rows.iter().filter(|r| {
                r.kernel == kernel
                    && r.dtype == dtype
                    && r.sparsity == sparsity
                    && r.shape != SMOLLM2_LM_HEAD
            }) {
                let w = block_weight(r.shape);
                t += w * r.ms;
                tb += w * r.ms * r.speedup;
                tbb += w * r.ms * r.speedup_vs_best;
                ts += w * r.ms * r.vs_dense_same_dtype;
                bytes += w * r.bytes as f64;
                // Recover the probe figure from the row itself (gbps / share).
                if r.share_of_bandwidth > 0.0 {
                    probe = r.gbps / r.share_of_bandwidth;
                }
            }
            let gbps = if t > 0.0 {
                bytes / (t * 1e-3) / 1e9
            } else {
                0.0
            };
            let pct = if sparsity > 0.0 {
                format!(" {:.0}%", sparsity * 100.0)
            } else {
                String::new()
            };
            SummaryRow {
                label: format!("{kernel} {dtype}{pct}"),
                speedup: if t > 0.0 { tb / t } else { 0.0 },
                speedup_vs_best: if t > 0.0 { tbb / t } else { 0.0 },
                vs_dense_same_dtype: if t > 0.0 { ts / t } else { 0.0 },
                share_of_bandwidth: if probe > 0.0 { gbps / probe } else { 0.0 },
            }
        })
        .collect()
}

impl fmt::Display for KernelBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "memory read bandwidth: {:.1} GB/s ({} threads), {:.1} GB/s (1 thread); isa {}; \
             {} matrices streamed per figure (fewer past 256 MiB: the LM head), caches flushed \
             before each pass",
            self.probe_gbps, self.threads, self.probe_gbps_one_thread, self.isa, self.layers
        )?;
        writeln!(
            f,
            "speed-up: against the faster of candle's matmul and our dense f32 GEMV on the same \
             shape, measured in the same rounds; vs-best: against the best baseline of the run; \
             vs-dense: against our dense GEMV in the row's dtype, same rounds\n"
        )?;
        writeln!(
            f,
            "{:<10} {:<9} {:<5} {:>5} {:>9} {:>9} {:>7} {:>6} {:>8} {:>8} {:>8}  planner",
            "shape",
            "kernel",
            "dtype",
            "sp%",
            "KiB",
            "ms",
            "GB/s",
            "%bw",
            "speed-up",
            "vs-best",
            "vs-dense"
        )?;
        for r in &self.decode {
            writeln!(
                f,
                "{:<10} {:<9} {:<5} {:>5.0} {:>9.1} {:>9.4} {:>7.1} {:>5.0}% {:>7.2}x {:>7.2}x {:>7.2}x  {}",
                format!("{}x{}", r.shape.0, r.shape.1),
                r.kernel,
                r.dtype,
                r.sparsity * 100.0,
                r.bytes as f64 / 1024.0,
                r.ms,
                r.gbps,
                r.share_of_bandwidth * 100.0,
                r.speedup,
                r.speedup_vs_best,
                r.vs_dense_same_dtype,
                r.planned.as_deref().unwrap_or("")
            )?;
        }
        if !self.summary.is_empty() {
            writeln!(f, "\nper SmolLM2 block (shapes weighted by count):")?;
            writeln!(
                f,
                "{:<24} {:>8} {:>8} {:>8} {:>6}",
                "configuration", "speed-up", "vs-best", "vs-dense", "%bw"
            )?;
            for s in &self.summary {
                writeln!(
                    f,
                    "{:<24} {:>7.2}x {:>7.2}x {:>7.2}x {:>5.0}%",
                    s.label,
                    s.speedup,
                    s.speedup_vs_best,
                    s.vs_dense_same_dtype,
                    s.share_of_bandwidth * 100.0
                )?;
            }
        }
        if !self.prefill.is_empty() {
            writeln!(
                f,
                "\nprefill, {} tokens (f32 unless the kernel names a dtype):",
                self.prefill_tokens
            )?;
            writeln!(
                f,
                "{:<10} {:<9} {:>5} {:>9} {:>11}",
                "shape", "kernel", "sp%", "ms", "vs candle"
            )?;
            for r in &self.prefill {
                writeln!(
                    f,
                    "{:<10} {:<9} {:>5.0} {:>9.3} {:>10.2}x",
                    format!("{}x{}", r.shape.0, r.shape.1),
                    r.kernel,
                    r.sparsity * 100.0,
                    r.ms,
                    r.speedup_vs_candle
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_bench_runs_and_prints() {
        let mut lines = Vec::new();
        let report = run_kernel_bench(&KernelBenchOptions::quick(), &mut |l| {
            lines.push(l.to_string())
        })
        .expect("bench");
        assert!(report.probe_gbps > 0.0);
        assert!(!lines.is_empty());
        // 2 shapes x (candle, dense f32, dense bf16, dense i8, 2 sparsities x (BSR x 3 dtypes,
        // CSR x 2 dtypes, bitmap x 2 dtypes or 3 where its VBMI2 i8 kernel runs), 2:4 x 3
        // dtypes).
        let bitmap_i8 = usize::from(crate::bitmap::vbmi2_expand());
        assert_eq!(report.decode.len(), 2 * (4 + 2 * (7 + bitmap_i8) + 3));
        for kernel in ["dense", "bsr16x16", "2:4"] {
            assert!(
                report
                    .decode
                    .iter()
                    .any(|r| r.kernel == kernel && r.dtype == "i8"),
                "{kernel} i8 row"
            );
        }
        assert!(report.decode.iter().all(|r| r.ms > 0.0 && r.speedup > 0.0));
        // Per shape: candle, dense f32, dense in the 2 other dtypes, one f32 BSR row per
        // sparsity, and every bf16 format (BSR, CSR, bitmap per sparsity; 2:4).
        let opts = KernelBenchOptions::quick();
        let s = opts.sparsities.len();
        // Where AMX runs, dense bf16 has two rows: AMX tiles and AVX512-BF16.
        let amx_row = usize::from(crate::amx::enabled() && opts.dtypes.contains(&Dtype::Bf16));
        let per_shape = 4 + s + 3 * s + usize::from(opts.two_four) + amx_row;
        assert_eq!(report.prefill.len(), opts.shapes.len() * per_shape);
        let text = report.to_string();
        assert!(text.contains("bsr16x16") && text.contains("2:4") && text.contains("candle"));
    }

    #[test]
    fn masks_have_the_asked_structure() {
        let mut rng = SplitMix(3);
        let w = make_weights(&mut rng, 32, 40, MaskKind::TwoFour);
        let view = DenseView::new(&w, 32, 40).expect("view");
        assert!(crate::NmMatrix::satisfies(&view, 2, 4));
        assert_eq!(view.kept(), 32 * 40 / 2);
        let w = make_weights(&mut rng, 64, 64, MaskKind::Blocks16(0.5));
        let b = crate::BsrMatrix::from_dense(&w, 64, 64, 16, 16, Dtype::F32).expect("bsr");
        assert_eq!(b.blocks() * 256, w.iter().filter(|&&v| v != 0.0).count());
    }
}
