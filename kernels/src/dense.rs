//! Dense row-major weights: the baseline every sparse format has to beat, and the fallback the
//! planner picks when sparsity would not pay.
//!
//! GEMV (`y = W·x`) is memory bound at batch 1, so the kernel's only job is to stream `W` at
//! full bandwidth: row after row as one sequential stream (four independent FMA chains hide the
//! FMA latency), the rows split over the rayon pool in contiguous ranges. GEMM packs 16
//! rows at a time into a column-major panel and runs the shared register-blocked micro-kernel.

use crate::element::{Dtype, Element, Values, with_values};
use crate::error::{Result, checked_len, expect_len};
use crate::gemm::{self, NR, Segment};
use crate::gemm_bf16;
use crate::isa::{Exec, Isa};
use crate::lanes;
use crate::par::{self, Out, SharedOut};
#[cfg(target_arch = "x86_64")]
use crate::quant::ActivationsI16;
use crate::simd;
use crate::view::DenseView;
use std::ops::Range;

/// Dense `[rows, cols]` row-major weights stored as f32, bf16 or i8 (per-row scales).
#[derive(Debug, Clone, PartialEq)]
pub struct DenseMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) values: Values,
}

impl DenseMatrix {
    /// Packs (copies, and rounds for bf16, quantizes for i8) the view; masked-out entries
    /// become zero.
    pub fn from_view(view: &DenseView<'_>, dtype: Dtype) -> DenseMatrix {
        if dtype == Dtype::I8 {
            return DenseMatrix {
                rows: view.rows(),
                cols: view.cols(),
                values: crate::quant::Quantized::new(view).into_dense(),
            };
        }
        let mut v = Vec::with_capacity(view.rows() * view.cols());
        for r in 0..view.rows() {
            v.extend_from_slice(&view.row(r));
        }
        DenseMatrix {
            rows: view.rows(),
            cols: view.cols(),
            values: Values::from_f32(dtype, v),
        }
    }

    /// Packs dense row-major weights.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, dtype: Dtype) -> Result<DenseMatrix> {
        Ok(Self::from_view(&DenseView::new(w, rows, cols)?, dtype))
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.values.dtype()
    }

    /// Bytes a GEMV reads from the weights.
    pub fn bytes(&self) -> usize {
        self.values.bytes()
    }

    /// Unpacks to dense row-major f32.
    pub fn to_dense(&self) -> Vec<f32> {
        (0..self.values_len())
            .map(|i| self.values.get(i, i / self.cols))
            .collect()
    }

    fn values_len(&self) -> usize {
        self.rows * self.cols
    }

    /// `y = W·x` (`x`: `cols`, `y`: `rows`, overwritten).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        let scales = self.values.scales();
        with_values!(&self.values, w => gemv_slice(w, scales, self.rows, self.cols, x, y, exec))
    }

    /// `Y = X·Wᵀ` (`X`: `[tokens, cols]`, `Y`: `[tokens, rows]`, both row-major; `Y` overwritten).
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) -> Result<()> {
        self.gemm_out(x, tokens, Out::Init(y), exec)
    }

    /// [`DenseMatrix::gemm`] into an initialized or fresh output (see [`Out`]).
    pub(crate) fn gemm_out(&self, x: &[f32], tokens: usize, y: Out<'_>, exec: Exec) -> Result<()> {
        expect_len("x", checked_len(tokens, self.cols)?, x.len())?;
        expect_len("y", checked_len(tokens, self.rows)?, y.len())?;
        #[cfg(target_arch = "x86_64")]
        if let Values::Bf16(v) = &self.values
            && (2..=FEW_TOKENS_BF16).contains(&tokens)
            && self.cols > 0
            && gemm_bf16::available(exec.isa.effective())
            && let Some(bits) = Element::bf16_bits(v.as_slice())
        {
            few_tokens_bf16(bits, self.rows, self.cols, x, tokens, y.init(), exec);
            return Ok(());
        }
        if let Some(w) = self.lanes_weights(tokens, exec) {
            lanes::gemm(w, self.rows, self.cols, x, tokens, y, exec);
            return Ok(());
        }
        if let Values::I8 { q, scales } = &self.values {
            let (rows, cols) = (self.rows, self.cols);
            if tokens >= MIN_TOKENS_I8_TILES
                && lanes::available_bf16(exec.isa, cols)
                && crate::lanes_amx::takes_i8(cols, tokens)
            {
                // A decode step on AMX: each pair of steps' bytes widened in L1 (`i8_gemm`).
                crate::lanes_amx::i8_gemm(q, scales, rows, cols, x, tokens, y, exec);
                return Ok(());
            }
            if gemm_bf16::takes(Dtype::I8, tokens, exec.isa) {
                // Prefill on AMX: each 32-row panel widened to bf16 as it is packed.
                let src = I8Rows { q, scales, cols };
                let ran =
                    gemm_bf16::try_gemm(&src, Dtype::I8, rows, cols, x, tokens, y.init(), exec);
                // `takes` is the whole of `try_gemm`'s condition for a scaled source: never a
                // silently unwritten output.
                assert!(ran, "gemm_bf16::takes said it runs");
                return Ok(());
            }
            if takes_lanes_i8(cols, tokens, exec) {
                let write =
                    |r: usize, row: &mut [half::bf16]| widen_i8_row(&q[r * cols..][..cols], row);
                let w = lanes::Weights::Bf16Rows(&write, Some(scales));
                lanes::gemm(w, rows, cols, x, tokens, y, exec);
                return Ok(());
            }
        }
        let y = y.init();
        if tokens <= SMALL_BATCH {
            // Too few tokens to amortise packing: stream W once, each row dotted with every
            // token while it is in L1.
            let scales = self.values.scales();
            return with_values!(&self.values, w => {
                small_batch(w, scales, self.rows, self.cols, x, tokens, y, exec)
            });
        }
        if let Values::Bf16(v) = &self.values
            && let Some(bits) = Element::bf16_bits(v.as_slice())
        {
            let src = gemm_bf16::DenseBits {
                bits,
                cols: self.cols,
            };
            let (rows, cols) = (self.rows, self.cols);
            if gemm_bf16::try_gemm(&src, Dtype::Bf16, rows, cols, x, tokens, y, exec) {
                return Ok(());
            }
        }
        let scales = self.values.scales();
        with_values!(&self.values, w => {
            panel_gemm(w, scales, self.rows, self.cols, x, tokens, y, exec)
        });
        Ok(())
    }

    /// The weights as the tokens-in-lanes GEMM takes them, when it is the kernel for this
    /// call: f32 or bf16 values, enough tokens ([`takes_lanes`]), the CPU able (AVX-512,
    /// and AVX512-BF16 for bf16), and for bf16 prefill no AMX (its tiles are faster still).
    fn lanes_weights(&self, tokens: usize, exec: Exec) -> Option<lanes::Weights<'_>> {
        if !takes_lanes(self.values.dtype(), self.cols, tokens, exec) {
            return None;
        }
        match &self.values {
            Values::F32(v) => Some(lanes::Weights::F32(v)),
            Values::Bf16(v) => Element::bf16_bits(v.as_slice()).map(lanes::Weights::Bf16),
            Values::I8 { .. } => None,
        }
    }
}

/// Whether a dense `dtype` product of `tokens` tokens over `cols` columns runs on the
/// tokens-in-lanes GEMM ([`lanes::gemm`]): bf16 from [`lanes::MIN_TOKENS_DENSE_BF16`] tokens
/// and f32 from [`lanes::MIN_TOKENS_DENSE_F32`], the CPU able (AVX-512, and AVX512-BF16 for
/// bf16), and for bf16 prefill no AMX (its tiles are faster still). Sparse formats that run
/// dense's kernels on expanded rows ask the same, from [`lanes::MIN_TOKENS`] on.
pub(crate) fn takes_lanes(dtype: Dtype, cols: usize, tokens: usize, exec: Exec) -> bool {
    match dtype {
        Dtype::F32 => tokens >= lanes::MIN_TOKENS_DENSE_F32 && lanes::available(exec.isa),
        Dtype::Bf16 => {
            tokens >= lanes::MIN_TOKENS_DENSE_BF16
                && lanes::available_bf16(exec.isa, cols)
                && (tokens <= SMALL_BATCH || !crate::amx::enabled())
        }
        Dtype::I8 => false,
    }
}

/// The register-blocked GEMM over packed panels ([`gemm::panel_gemm`]): each task packs the
/// [`NR`]-row panels it owns, one at a time, and runs every token tile over it.
#[allow(clippy::too_many_arguments)]
fn panel_gemm<T: Element>(
    w: &[T],
    scales: Option<&[f32]>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) {
    let panels = rows.div_ceil(NR);
    let flops = tokens * rows * cols;
    let tasks = par::task_count(exec, panels, flops, par::MIN_TASK_FLOPS);
    let bounds = par::even_bounds(panels, tasks);
    let out = SharedOut::new(y);
    let isa = exec.isa.effective();
    par::for_each_bound(&bounds, |range| {
        let mut panel = vec![0.0f32; cols * NR];
        for p in range {
            let r0 = p * NR;
            let nr = NR.min(rows - r0);
            pack_panel(w, scales, cols, r0, nr, &mut panel);
            let seg = [Segment {
                col: 0,
                kc: cols,
                offset: 0,
            }];
            gemm::panel_gemm(isa, x, tokens, cols, &seg, &panel, NR, out, rows, r0, nr);
        }
    });
}

/// Token counts up to which [`DenseMatrix::gemm`] and [`gemm_f32`] stream `W` once and dot each
/// row with every token (`small_batch`) instead of packing panels for the register-blocked
/// GEMM: decode steps, one token per running sequence of a batch. Past it, the GEMM's reuse of
/// each packed panel across tokens wins.
pub const SMALL_BATCH: usize = 16;

/// `Y = X·Wᵀ` for dense row-major f32 weights owned elsewhere (a candle tensor's storage),
/// as [`DenseMatrix::gemm`] runs it: the GEMV (one token) or small-batch kernel (up to 8
/// tokens, or [`SMALL_BATCH`] without AVX-512), the tokens-in-lanes GEMM from 9 tokens on
/// AVX-512, else the register-blocked GEMM over panels packed per task. `w`: `[rows, cols]`; `x`: `[tokens, cols]`; `y`:
/// `[tokens, rows]`, overwritten.
pub fn gemm_f32(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) -> Result<()> {
    gemm_f32_out(w, rows, cols, x, tokens, Out::Init(y), exec)
}

/// [`gemm_f32`] into a new `[tokens, rows]` vector, not zeroed first where the kernel writes
/// every output itself (the tokens-in-lanes GEMM).
pub fn gemm_f32_new(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    exec: Exec,
) -> Result<Vec<f32>> {
    par::new_output(checked_len(tokens, rows)?, |y| {
        gemm_f32_out(w, rows, cols, x, tokens, y, exec)
    })
}

/// Whether a dense int8 product of `tokens` tokens runs on the tokens-in-lanes GEMM, its rows
/// widened to bf16 12 at a time (the integers are exact in bf16; each output row is scaled
/// once after its sum, as the int8 kernels do) against bf16-rounded activations: from
/// [`lanes::MIN_TOKENS`] tokens on AVX512-BF16. Widening costs a decode step a flat 18-19 ms
/// of SmolLM2's block linears (`batch_bench`), where the small-batch tile, which widens every
/// weight to f32 for every 4 tokens, took 9 ms at 3 tokens, 20-22 at 8 and 29-35 at 16; in
/// prefill a tile's widened rows serve every token panel (128 tokens: 190 ms on the int8
/// panel GEMM, 99-102 ms here, `bench_forward`). Where the CPU has AMX, decode steps from
/// [`MIN_TOKENS_I8_TILES`] and prefill run on its tiles before this is asked.
fn takes_lanes_i8(cols: usize, tokens: usize, exec: Exec) -> bool {
    tokens >= lanes::MIN_TOKENS && lanes::available_bf16(exec.isa, cols)
}

/// Dense int8 weights (`[rows, cols]`, one scale per row) as the bf16 prefill's panels take
/// them: each row's integers as bf16 (exact), the scales applied after the sums.
pub(crate) struct I8Rows<'a> {
    pub q: &'a [i8],
    pub scales: &'a [f32],
    pub cols: usize,
}

impl gemm_bf16::Bf16Rows for I8Rows<'_> {
    fn rows_bits<'a>(
        &'a self,
        r0: usize,
        nr: usize,
        buf: &'a mut Vec<u16>,
        _: &mut (Vec<u32>, Vec<f32>),
    ) -> &'a [u16] {
        use half::slice::HalfBitsSliceExt;
        let cols = self.cols;
        buf.resize(nr * cols, 0);
        let rows = buf.reinterpret_cast_mut::<half::bf16>();
        for (i, row) in rows.chunks_exact_mut(cols).enumerate() {
            widen_i8_row(&self.q[(r0 + i) * cols..][..cols], row);
        }
        &buf[..nr * cols]
    }

    fn row_scales(&self) -> Option<&[f32]> {
        Some(self.scales)
    }
}

/// `nr` rows of int8 integers as bf16 into `out` (`nr * cols`, row after row), each row first
/// written whole by `row(i, bytes)` ([`widen_i8_row_from`]): the sparse formats' int8 panels
/// for the bf16 prefill (`Bf16Rows` of the bitmap and N:M), their rows scaled after the sums.
pub(crate) fn widen_i8_rows(
    out: &mut [half::bf16],
    cols: usize,
    mut row: impl FnMut(usize, &mut [i8]),
) {
    for (i, dst) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        widen_i8_row_from(dst, |bytes| row(i, bytes));
    }
}

/// One int8 row as bf16 into `out`, its integers first written whole by `row(bytes)` into a
/// scratch row of the calling thread's (kept between calls: the panels and tiles of a
/// product widen row after row, on every worker).
pub(crate) fn widen_i8_row_from(out: &mut [half::bf16], row: impl FnOnce(&mut [i8])) {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with_borrow_mut(|bytes| {
        bytes.resize(out.len(), 0);
        row(bytes);
        widen_i8_row(bytes, out);
    });
}

/// `Y = X·Wᵀ` for a sparse format's int8 rows on the tokens-in-lanes GEMM, where AMX does
/// not take its prefill (Zen 4, Ice Lake): each tile's rows written whole by `row(r, bytes)`
/// as their integers, widened to bf16 (exact) through [`widen_i8_row_from`], and
/// every output row scaled after its sum, as dense int8 runs there (`Weights::Bf16Rows` with
/// row scales). The caller has checked `lanes::available_bf16` and `cols > 0`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn i8_rows_gemm(
    rows: usize,
    cols: usize,
    scales: &[f32],
    x: &[f32],
    tokens: usize,
    y: Out<'_>,
    exec: Exec,
    row: impl Fn(usize, &mut [i8]) + Sync,
) {
    let write = |r: usize, out: &mut [half::bf16]| widen_i8_row_from(out, |bytes| row(r, bytes));
    lanes::gemm(
        lanes::Weights::Bf16Rows(&write, Some(scales)),
        rows,
        cols,
        x,
        tokens,
        y,
        exec,
    );
}

/// One row of int8 weights as bf16 (the same integers: every int8 value is exact in bf16).
pub(crate) fn widen_i8_row(q: &[i8], out: &mut [half::bf16]) {
    let done = {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::gemm_bf16::available(Isa::Avx512) {
                // SAFETY: AVX512-BF16 (and AVX-512F) present, checked just above.
                unsafe { x86::widen_i8_bf16(q, out) }
            } else {
                0
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        0
    };
    for (o, &v) in out[done..].iter_mut().zip(&q[done..]) {
        *o = half::bf16::from_f32(f32::from(v));
    }
}

/// [`gemm_f32`] into an initialized or fresh output (see [`Out`]).
fn gemm_f32_out(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: Out<'_>,
    exec: Exec,
) -> Result<()> {
    expect_len("w", checked_len(rows, cols)?, w.len())?;
    expect_len("x", checked_len(tokens, cols)?, x.len())?;
    expect_len("y", checked_len(tokens, rows)?, y.len())?;
    if takes_lanes(Dtype::F32, cols, tokens, exec) {
        lanes::gemm(lanes::Weights::F32(w), rows, cols, x, tokens, y, exec);
        return Ok(());
    }
    let y = y.init();
    if tokens <= SMALL_BATCH {
        small_batch(w, None, rows, cols, x, tokens, y, exec)?;
    } else {
        panel_gemm(w, None, rows, cols, x, tokens, y, exec);
    }
    Ok(())
}

/// Whether [`gemm_f32`] runs prefill (more than [`SMALL_BATCH`] tokens) on its
/// tokens-in-lanes AVX-512 kernel here, which measured 1.04-1.28x candle's matmul on
/// SmolLM2's shapes at 128 tokens (`kernel_bench`); without AVX-512 candle's GEMM is the
/// faster choice for prefill.
pub fn gemm_f32_prefill_fast(exec: Exec) -> bool {
    lanes::available(exec.isa)
}

/// How a pass over `rows × cols` stored weights splits over the pool: bounds in units of 4
/// rows (so every task but the last runs whole 4-row steps), one task per
/// [`par::MIN_TASK_BYTES`] of weights at most.
fn row_bounds<T: Element>(exec: Exec, rows: usize, cols: usize) -> Vec<usize> {
    let units = rows.div_ceil(4);
    let tasks = par::task_count(
        exec,
        units,
        rows * cols * T::DTYPE.size(),
        par::MIN_TASK_BYTES,
    );
    par::even_bounds(units, tasks)
}

/// Fewest tokens a dense int8 product takes the AMX tiles for (`lanes_amx::i8_gemm`, each
/// pair of steps' bytes widened to bf16 in L1); fewer run the small-batch kernels. `batch_bench
/// 2,3 i8` on a 2-core Xeon, SmolLM2's block linears, three times: 3 tokens 17.6-18.3 against
/// 19.1-20.0 ms, 2 tokens 18.2 against 15.9-16.6.
pub(crate) const MIN_TOKENS_I8_TILES: usize = 3;

/// Most tokens a dense bf16 product takes [`few_tokens_bf16`] for; from one more, the
/// tokens-in-lanes GEMM (on AMX where present). Whole SmolLM2 decode steps on the Xeon
/// (`bench_forward out/smollm2-dense-bf16 --batch B --kv-cache f16`, twice): 2 sequences
/// 24.2 ms on the small-batch tile before, 14.5 here; 3 sequences 16.0-16.4 on AMX, 15.4-15.6
/// here; 4 sequences 16.7-16.9 on AMX, 17.9-18.0 here.
pub(crate) const FEW_TOKENS_BF16: usize = 3;

/// `Y = X·Wᵀ` for 2 to [`FEW_TOKENS_BF16`] tokens of bf16 weights on AVX512-BF16: the bf16
/// GEMV's loop with each weight block multiplied for every token ([`x86::gemm_rows_bf16_dp`]),
/// rows split over the pool as the GEMV splits them. Each token's outputs equal its GEMV's
/// bit for bit. Lengths checked by the caller.
#[cfg(target_arch = "x86_64")]
fn few_tokens_bf16(
    bits: &[u16],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) {
    let pairs = cols.div_ceil(2);
    let xb = gemm_bf16::pack_activations(x, tokens, cols);
    let bounds = row_bounds::<half::bf16>(exec, rows, cols);
    let out = SharedOut::new(y);
    par::for_each_bound(&bounds, |units| {
        let r = units.start * 4..(units.end * 4).min(rows);
        // SAFETY: AVX-512F and AVX512-BF16 present (`gemm_bf16::available` of the effective
        // ISA); rows within `bits` (`bounds` cover 0..rows in 4-row units); `xb` and `x` hold
        // `tokens` tokens; the bounds' row ranges are disjoint.
        unsafe {
            match tokens {
                3 => x86::gemm_rows_bf16_dp::<3>(bits, cols, r, &xb, pairs, x, out, rows),
                2 => x86::gemm_rows_bf16_dp::<2>(bits, cols, r, &xb, pairs, x, out, rows),
                _ => x86::gemm_rows_bf16_dp::<1>(bits, cols, r, &xb, pairs, x, out, rows),
            }
        }
    });
}

/// Whether this CPU runs the int8 GEMVs in integers (AVX512-BW and AVX512-VNNI's `vpdpwssd`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni() -> bool {
    x86::has_vnni()
}

/// `y = W·x` over stored rows `w` (`[rows, cols]`; i8 rows scaled by `scales`).
fn gemv_slice<T: Element>(
    w: &[T],
    scales: Option<&[f32]>,
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    exec: Exec,
) -> Result<()> {
    expect_len("x", cols, x.len())?;
    expect_len("y", rows, y.len())?;
    let bounds = row_bounds::<T>(exec, rows, cols);
    let isa = exec.isa.effective();
    // i8 on AVX512-VNNI multiplies in integers: `x` quantized once for all tasks.
    #[cfg(target_arch = "x86_64")]
    let xq = match T::i8_values(w) {
        Some(_) if isa == Isa::Avx512 && x86::has_vnni() => ActivationsI16::quantize(x),
        _ => None,
    };
    // bf16 on AVX512-BF16 multiplies pairs: `x` rounded to bf16 pairs once for all tasks.
    #[cfg(target_arch = "x86_64")]
    let xb = match T::bf16_bits(w) {
        Some(_) if cols > 0 && crate::gemm_bf16::available(isa) => {
            Some(crate::gemm_bf16::pack_activations(x, 1, cols))
        }
        _ => None,
    };
    par::for_each_range(y, 4, &bounds, |units, ys| {
        let r = units.start * 4..(units.end * 4).min(rows);
        let first = r.start;
        #[cfg(target_arch = "x86_64")]
        if let (Some(q), Some(xq)) = (T::i8_values(w), xq.as_ref()) {
            // SAFETY: AVX-512F (`effective`), BW and VNNI (checked) present; rows within
            // `w` (`bounds` cover 0..rows of a `rows x cols` matrix), `xq` holds `cols` values.
            unsafe { x86::gemv_rows_i8_vnni(q, cols, r, xq, ys) };
        } else if let (Some(bits), Some(xb)) = (T::bf16_bits(w), xb.as_ref()) {
            // SAFETY: AVX-512F and AVX512-BF16 present (`gemm_bf16::available`); rows within
            // `w` as above; `xb` holds `cols.div_ceil(2)` pairs and `x` holds `cols` values.
            unsafe { x86::gemv_rows_bf16_dp(bits, cols, r, xb, x, ys) };
        } else {
            gemv_rows(isa, w, cols, r, x, ys);
        }
        #[cfg(not(target_arch = "x86_64"))]
        gemv_rows(isa, w, cols, r, x, ys);
        if let Some(s) = scales {
            for (yi, &si) in ys.iter_mut().zip(s.get(first..).unwrap_or_default()) {
                *yi *= si;
            }
        }
    });
    Ok(())
}

/// `Y = X·Wᵀ` for a few tokens: one stream over `W` (rows split over the pool as in the GEMV),
/// each row dotted with up to 4 tokens per pass while it sits in L1. Weight traffic is that of
/// one GEMV whatever the token count, which is what batched decoding needs.
#[allow(clippy::too_many_arguments)]
fn small_batch<T: Element>(
    w: &[T],
    scales: Option<&[f32]>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) -> Result<()> {
    // One token is a GEMV; the lengths are checked there or in `small_batch_tasks`.
    if tokens == 1 {
        return gemv_slice(w, scales, rows, cols, x, y, exec);
    }
    small_batch_tasks::<T>(rows, cols, x, tokens, y, exec, |isa, r, batch, out| {
        small_batch_rows(isa, w, 0, scales, cols, r, batch, out, rows)
    })
}

/// The split shared by [`small_batch`] and [`small_batch_written`]: the lengths checked, the
/// rows split over the pool in 4-row units, and `task(isa, rows, batch, out)` run per range,
/// writing only the columns `rows` of Y (its own rows of W).
fn small_batch_tasks<T: Element>(
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
    task: impl Fn(Isa, Range<usize>, &Batch<'_>, SharedOut) + Sync + Send,
) -> Result<()> {
    expect_len("x", checked_len(tokens, cols)?, x.len())?;
    expect_len("y", checked_len(tokens, rows)?, y.len())?;
    let bounds = row_bounds::<T>(exec, rows, cols);
    let out = SharedOut::new(y);
    let isa = exec.isa.effective();
    // bf16 on AVX512-BF16 multiplies pairs, as the single-token GEMV does: every token's
    // activations rounded to bf16 pairs once for all tasks. From 4 tokens: at 2 the tile's
    // reductions cost more than the multiplies saved (`batch_bench 1,2,4,8 bf16`: 2 tokens
    // 0.85-0.92x the widening kernel, 4 tokens 1.11x, 8 tokens 1.22x).
    #[cfg(target_arch = "x86_64")]
    let xb = (T::DTYPE == Dtype::Bf16 && tokens >= 4 && cols > 0 && gemm_bf16::available(isa))
        .then(|| gemm_bf16::pack_activations(x, tokens, cols));
    #[cfg(not(target_arch = "x86_64"))]
    let xb: Option<Vec<u32>> = None;
    par::for_each_bound(&bounds, |units| {
        let r = units.start * 4..(units.end * 4).min(rows);
        let batch = Batch {
            x,
            xb: xb.as_deref(),
            tokens,
        };
        task(isa, r, &batch, out);
    });
    Ok(())
}

/// Rows written per block by [`small_batch_written`]: a multiple of the 4-row tile,
/// 8 rows of SmolLM2's widest (1536) columns are 24 KiB, in L1 beside the activations.
const WRITTEN_BLOCK: usize = 8;

/// [`small_batch`] over rows that `write(r, row)` writes whole on demand (every column, zeros
/// where pruned; i8 rows scaled by `scales`), [`WRITTEN_BLOCK`] at a time per task, each block
/// multiplied right after it is written: a sparse format's batched step on dense's register
/// tiles without a dense copy of the whole matrix per call (the bitmap's, `BitmapMatrix::gemm`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_batch_written<T: Element>(
    write: &(dyn Fn(usize, &mut [T]) + Sync),
    scales: Option<&[f32]>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) -> Result<()> {
    small_batch_tasks::<T>(rows, cols, x, tokens, y, exec, |isa, r, batch, out| {
        let mut block = vec![T::default(); WRITTEN_BLOCK * cols];
        let mut r0 = r.start;
        while r0 < r.end {
            let r1 = (r0 + WRITTEN_BLOCK).min(r.end);
            let rows_out = &mut block[..(r1 - r0) * cols];
            for (i, row) in rows_out.chunks_exact_mut(cols.max(1)).enumerate() {
                write(r0 + i, row);
            }
            small_batch_rows(isa, &*rows_out, r0, scales, cols, r0..r1, batch, out, rows);
            r0 = r1;
        }
    })
}

/// The activations of a small batch: `x` (`[tokens, cols]`) and, for bf16 weights on
/// AVX512-BF16, the same rounded to bf16 pairs (`[tokens, cols.div_ceil(2)]`).
struct Batch<'a> {
    x: &'a [f32],
    xb: Option<&'a [u32]>,
    tokens: usize,
}

/// Rows `r` of `Y = X·Wᵀ` into `out` (`[tokens, rows_total]`), where `w` holds rows
/// `w_row0..` of the matrix (the whole matrix from 0, or a block written on demand).
#[allow(clippy::too_many_arguments)]
fn small_batch_rows<T: Element>(
    isa: Isa,
    w: &[T],
    w_row0: usize,
    scales: Option<&[f32]>,
    cols: usize,
    r: Range<usize>,
    batch: &Batch<'_>,
    out: SharedOut,
    rows_total: usize,
) {
    let (x, tokens) = (batch.x, batch.tokens);
    assert!(
        r.start >= w_row0
            && (r.end - w_row0) * cols <= w.len()
            && x.len() == tokens * cols
            && r.end <= rows_total
    );
    let mut r = r;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && tokens >= 4 {
        // 4 rows x 4 tokens per register tile: `vdpbf16ps` on bf16 pairs where `batch.xb`
        // exists (`x86::dot_tile_bf16_dp`), else widened weights and FMAs (`x86::dot_tile`);
        // leftover rows below.
        let pairs = cols.div_ceil(2);
        let dp = T::bf16_bits(w).zip(batch.xb);
        if let Some((_, xb)) = dp {
            assert!(xb.len() == tokens * pairs);
        }
        while r.end - r.start >= 4 {
            let r0 = r.start;
            let mut t0 = 0;
            while t0 < tokens {
                let n = (tokens - t0).min(4);
                let mut dots = [[0.0f32; 4]; 4];
                let xs = &x[t0 * cols..(t0 + n) * cols];
                match dp {
                    Some((bits, xb)) => {
                        let wp = &bits[(r0 - w_row0) * cols..(r0 - w_row0 + 4) * cols];
                        let xbs = &xb[t0 * pairs..(t0 + n) * pairs];
                        // SAFETY: `isa` is effective and `xb` exists only where AVX512-BF16
                        // does; `wp` holds 4 rows of `cols`, `xs` and `xbs` `n` tokens.
                        unsafe {
                            match n {
                                4 => x86::dot_tile_bf16_dp::<4>(wp, cols, xbs, xs, &mut dots),
                                3 => x86::dot_tile_bf16_dp::<3>(wp, cols, xbs, xs, &mut dots),
                                2 => x86::dot_tile_bf16_dp::<2>(wp, cols, xbs, xs, &mut dots),
                                _ => x86::dot_tile_bf16_dp::<1>(wp, cols, xbs, xs, &mut dots),
                            }
                        }
                    }
                    None => {
                        let wp = &w[(r0 - w_row0) * cols..(r0 - w_row0 + 4) * cols];
                        // SAFETY: `isa` is effective (AVX-512F present); `wp` holds 4 rows of
                        // `cols` and `xs` holds `n` tokens of `cols` (sliced just above).
                        unsafe {
                            match n {
                                4 => x86::dot_tile::<T, 4>(wp, cols, xs, &mut dots),
                                3 => x86::dot_tile::<T, 3>(wp, cols, xs, &mut dots),
                                2 => x86::dot_tile::<T, 2>(wp, cols, xs, &mut dots),
                                _ => x86::dot_tile::<T, 1>(wp, cols, xs, &mut dots),
                            }
                        }
                    }
                }
                for (i, row_dots) in dots.iter().enumerate() {
                    let scale = scales.map_or(1.0, |s| s[r0 + i]);
                    for (j, d) in row_dots.iter().enumerate().take(n) {
                        // SAFETY: column `r0 + i` of Y belongs to this task (see `small_batch`).
                        unsafe { out.write((t0 + j) * rows_total + r0 + i, *d * scale) };
                    }
                }
                t0 += n;
            }
            r.start += 4;
        }
    }
    for row in r {
        let wr = &w[(row - w_row0) * cols..][..cols];
        let scale = scales.map_or(1.0, |s| s[row]);
        let mut t0 = 0;
        while t0 < tokens {
            let n = (tokens - t0).min(4);
            let mut dots = [0.0f32; 4];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `isa` is effective (AVX2+FMA present); `wr` has `cols` values and
                // tokens t0..t0+n each have `cols` inputs in `x` (asserted above).
                Isa::Avx2Fma | Isa::Avx512 => unsafe {
                    x86::dot_tokens(wr, &x[t0 * cols..(t0 + n) * cols], n, &mut dots)
                },
                _ => {
                    for (j, d) in dots.iter_mut().enumerate().take(n) {
                        *d = simd::dot_portable(wr, &x[(t0 + j) * cols..][..cols]);
                    }
                }
            }
            for (j, d) in dots.iter().enumerate().take(n) {
                // SAFETY: column `row` of Y belongs to this task (see `small_batch`).
                unsafe { out.write((t0 + j) * rows_total + row, *d * scale) };
            }
            t0 += n;
        }
    }
}

/// Copies rows `r0..r0+nr` of `w` into `panel[k * 16 + r]` (f32), zero-filling rows past `nr`;
/// i8 rows are dequantized with their `scales` on the way (GEMM is compute bound, and the panel
/// is reused by every token tile, so this costs nothing measurable).
fn pack_panel<T: Element>(
    w: &[T],
    scales: Option<&[f32]>,
    cols: usize,
    r0: usize,
    nr: usize,
    panel: &mut [f32],
) {
    for r in 0..NR {
        if r < nr {
            let row = &w[(r0 + r) * cols..][..cols];
            let s = scales.map_or(1.0, |s| s[r0 + r]);
            for (k, &v) in row.iter().enumerate() {
                panel[k * NR + r] = v.to_f32() * s;
            }
        } else {
            for k in 0..cols {
                panel[k * NR + r] = 0.0;
            }
        }
    }
}

/// `y[i] = W[rows.start + i] · x` for the given row range; `y.len() == rows.len()`.
pub(crate) fn gemv_rows<T: Element>(
    isa: Isa,
    w: &[T],
    cols: usize,
    rows: Range<usize>,
    x: &[f32],
    y: &mut [f32],
) {
    assert!(rows.end * cols <= w.len() && x.len() == cols && y.len() == rows.len());
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(bits)) = (isa.has_avx2(), T::bf16_bits(w)) {
        return match isa {
            // SAFETY: `isa` is effective (AVX-512F present); bounds asserted above.
            Isa::Avx512 => unsafe { x86::gemv_rows_bf16_avx512(bits, cols, rows, x, y) },
            // SAFETY: `isa` is effective (AVX2+FMA present); bounds asserted above.
            _ => unsafe { x86::gemv_rows_bf16(bits, cols, rows, x, y) },
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is effective (AVX2+FMA present); bounds asserted above.
        Isa::Avx2Fma | Isa::Avx512 => unsafe { x86::gemv_rows(w, cols, rows, x, y) },
        _ => {
            for (yi, r) in y.iter_mut().zip(rows) {
                *yi = simd::dot_portable(&w[r * cols..][..cols], x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// How far ahead of its loads a GEMV requests its weights, in bytes. The rows are read
    /// one after another, so this runs into the rows that follow. On a 2-core Xeon (KVM) the
    /// dense bf16 decode step went from 12.5-12.9 to 9.8-10.0 ms per token with it (1 KiB
    /// ahead: 11.0-11.2, 2 KiB: 10.3-10.7, 6-8 KiB like 4, 12 KiB slightly worse): a layer
    /// of SmolLM2 is a few hundred KiB, too short for the hardware prefetcher to get going.
    const PREFETCH_AHEAD: usize = 4096;

    /// Requests `lines` 64-byte lines from [`PREFETCH_AHEAD`] bytes past `p` into L1. Never
    /// faults (the addresses are only formed, wrapping, and may lie past the matrix).
    #[inline(always)]
    fn prefetch_ahead(p: *const u8, lines: usize) {
        for l in 0..lines {
            // SAFETY: prefetches never fault, whatever the address.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD + 64 * l).cast());
            }
        }
    }

    use crate::element::{Dtype, Element};
    use crate::quant::{ActivationsI16, I16_CHUNK};
    use crate::simd::x86::{dot64_i8_i16, hsum, sum_i32_lanes};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `out[i] = bf16(q[i])` for the whole 16-value blocks of `q` (sign-extend, convert to
    /// f32, `vcvtneps2bf16`: exact, the integers need 8 bits); returns the values done.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn widen_i8_bf16(q: &[i8], out: &mut [half::bf16]) -> usize {
        let n = q.len().min(out.len()) / 16 * 16;
        for (src, dst) in q[..n].chunks_exact(16).zip(out[..n].chunks_exact_mut(16)) {
            // SAFETY: `src` holds the 16 bytes loaded, `dst` the 16 bf16 (32 bytes) stored.
            unsafe {
                let bytes = _mm_loadu_si128(src.as_ptr().cast());
                let f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
                let h = _mm512_cvtneps_pbh(f);
                _mm256_storeu_si256(
                    dst.as_mut_ptr().cast(),
                    std::mem::transmute::<__m256bh, __m256i>(h),
                );
            }
        }
        n
    }

    /// Whether this CPU multiplies i8 by i16 in integers on 512-bit vectors (AVX512-BW for the
    /// sign extension, AVX512-VNNI for `vpdpwssd`: Ice Lake, Zen 4 and later).
    pub(crate) fn has_vnni() -> bool {
        std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

    /// `y[i] = Σ_c q[r, c] · xq[c] · xq.scale` for `r` in `rows` (i8 weights, i16 activations;
    /// the caller applies the row scales): per 64 columns one 64-byte load of weights, two
    /// sign extensions to i16 and two `vpdpwssd` against the activations, summed in i32 and
    /// flushed to f32 every [`I16_CHUNK`] columns. Widening each weight to f32 for an FMA
    /// (`gemv_rows`) took four instructions per 8 weights and bounded the int8 GEMV by them,
    /// at about 25 GB/s of weights on 2 Zen 4 cores.
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI present; `rows.end * cols <= w.len()`, `xq.q.len() == cols`,
    /// `y.len() == rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
    pub(crate) unsafe fn gemv_rows_i8_vnni(
        w: &[i8],
        cols: usize,
        rows: Range<usize>,
        xq: &ActivationsI16,
        y: &mut [f32],
    ) {
        let xp = xq.q.as_ptr();
        for (yi, r) in y.iter_mut().zip(rows) {
            // SAFETY: row r is within `w`; every column read is < cols (contract).
            unsafe {
                let p = w.as_ptr().add(r * cols);
                let mut total = 0.0f32;
                let mut c = 0;
                while c + 64 <= cols {
                    let end = (c + I16_CHUNK).min(cols);
                    let mut acc = [_mm512_setzero_si512(); 2];
                    while c + 64 <= end {
                        prefetch_ahead(p.add(c).cast(), 1);
                        let v = _mm512_loadu_si512(p.add(c).cast());
                        dot64_i8_i16(&mut acc, v, xp.add(c));
                        c += 64;
                    }
                    total += sum_i32_lanes(acc);
                }
                let mut tail = 0i64;
                for k in c..cols {
                    tail += i64::from(*p.add(k)) * i64::from(*xp.add(k));
                }
                *yi = (total + tail as f32) * xq.scale;
            }
        }
    }

    /// `y[i] = Σ_k pair(w[r], k) · pair(xb, k)` for `r` in `rows`: bf16 weights against the
    /// activations rounded to bf16 pairs (`xb`, from [`crate::gemm_bf16::pack_activations`]),
    /// one `vdpbf16ps` per 32 weights straight from the row-major row (a weight pair and its
    /// activation pair sit in the same 32-bit lane). Widening the weights for an FMA takes five
    /// instructions per 32 weights; here one load and one dot product, so the loop keeps more
    /// weight loads in flight and the decode step reads its weights faster.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available; `rows.end * cols <= w.len()`;
    /// `xb.len() >= cols.div_ceil(2)`; `x.len() == cols`; `y.len() == rows.len()`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gemv_rows_bf16_dp(
        w: &[u16],
        cols: usize,
        rows: Range<usize>,
        xb: &[u32],
        x: &[f32],
        y: &mut [f32],
    ) {
        let (first, pairs) = (rows.start, cols.div_ceil(2));
        // SAFETY: the contract above is `rows_bf16_dp`'s for one token.
        unsafe { rows_bf16_dp::<1>(w, cols, rows, xb, pairs, x, |_, r, s| y[r - first] = s) }
    }

    /// The loop of [`gemv_rows_bf16_dp`] for `N` tokens at once (`xb`: `N` rows of `pairs`
    /// pairs, `x`: `N` rows of `cols`): every 32 weights loaded once and multiplied with each
    /// token's pairs, so a decode step of a few sequences reads the weights once, as one
    /// token's GEMV does, and each token's sums run exactly as they run alone (four
    /// accumulators, the same blocks, the same tail). `store(j, r, sum)` receives row `r` of
    /// token `j`. The GEMV is its `N = 1` case.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available (this inlines into functions that enable them);
    /// `rows.end * cols <= w.len()`; `xb.len() >= N * pairs`, `pairs >= cols.div_ceil(2)`;
    /// `x.len() >= N * cols`.
    #[inline(always)]
    pub(super) unsafe fn rows_bf16_dp<const N: usize>(
        w: &[u16],
        cols: usize,
        rows: Range<usize>,
        xb: &[u32],
        pairs: usize,
        x: &[f32],
        mut store: impl FnMut(usize, usize, f32),
    ) {
        let blocks = cols / 32;
        assert!(
            rows.end * cols <= w.len()
                && xb.len() >= N * pairs
                && 16 * blocks <= pairs
                && x.len() >= N * cols
        );
        let xp = xb.as_ptr();
        for r in rows {
            // SAFETY: row r is within `w`; block reads end at column `blocks * 32 <= cols`, and
            // token j's pair reads below j * pairs + 16 * blocks <= N * pairs (contract);
            // `__m512bh` is 64 plain bytes.
            unsafe {
                let p = w.as_ptr().add(r * cols);
                let wv = |b: usize| -> __m512bh {
                    std::mem::transmute(_mm512_loadu_si512(p.add(b * 32).cast()))
                };
                let xv = |j: usize, b: usize| -> __m512bh {
                    std::mem::transmute(_mm512_loadu_si512(xp.add(j * pairs + b * 16).cast()))
                };
                let mut a = [[_mm512_setzero_ps(); 4]; N];
                let mut b = 0;
                while b + 4 <= blocks {
                    prefetch_ahead(p.add(b * 32).cast(), 4);
                    for u in 0..4 {
                        let wu = wv(b + u);
                        for (j, aj) in a.iter_mut().enumerate() {
                            aj[u] = _mm512_dpbf16_ps(aj[u], wu, xv(j, b + u));
                        }
                    }
                    b += 4;
                }
                while b < blocks {
                    let wb = wv(b);
                    for (j, aj) in a.iter_mut().enumerate() {
                        aj[0] = _mm512_dpbf16_ps(aj[0], wb, xv(j, b));
                    }
                    b += 1;
                }
                for (j, aj) in a.iter().enumerate() {
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(
                        _mm512_add_ps(aj[0], aj[1]),
                        _mm512_add_ps(aj[2], aj[3]),
                    ));
                    let xj = x.as_ptr().add(j * cols);
                    for c in blocks * 32..cols {
                        s += crate::element::widen_bf16(*p.add(c)) * *xj.add(c);
                    }
                    store(j, r, s);
                }
            }
        }
    }

    /// [`rows_bf16_dp`] for 2 or 3 tokens, row `r` of token `j` into `out[j * out_rows + r]`.
    ///
    /// # Safety
    /// As [`rows_bf16_dp`]; `out` holds `N * out_rows` values, `rows.end <= out_rows`, and no
    /// other task writes these rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn gemm_rows_bf16_dp<const N: usize>(
        w: &[u16],
        cols: usize,
        rows: Range<usize>,
        xb: &[u32],
        pairs: usize,
        x: &[f32],
        out: crate::par::SharedOut,
        out_rows: usize,
    ) {
        assert!(rows.end <= out_rows && out.len() >= N * out_rows);
        // SAFETY: the contract above; each write is this task's row (contract).
        unsafe {
            rows_bf16_dp::<N>(w, cols, rows, xb, pairs, x, |j, r, s| {
                out.write(j * out_rows + r, s)
            })
        }
    }

    /// `dots[j] = w · x_j` for `n ≤ 4` tokens laid out one after another in `xs` (`n · cols`
    /// values): every 8 weights are loaded once and used `n` times, two accumulators per token
    /// so the FMA chains stay short.
    ///
    /// # Safety
    /// AVX2+FMA available; `xs.len() == n * w.len()`; `1 ≤ n ≤ 4`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_tokens<T: Element>(
        w: &[T],
        xs: &[f32],
        n: usize,
        dots: &mut [f32; 4],
    ) {
        let cols = w.len();
        let p = w.as_ptr();
        let xp = xs.as_ptr();
        let mut a = [[_mm256_setzero_ps(); 2]; 4];
        let mut c = 0;
        // SAFETY: columns < cols for every token row j < n (function contract).
        unsafe {
            while c + 16 <= cols {
                let w0 = T::load8(p.add(c));
                let w1 = T::load8(p.add(c + 8));
                for (j, acc) in a.iter_mut().enumerate().take(n) {
                    let x = xp.add(j * cols + c);
                    acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), acc[0]);
                    acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), acc[1]);
                }
                c += 16;
            }
            while c + 8 <= cols {
                let w0 = T::load8(p.add(c));
                for (j, acc) in a.iter_mut().enumerate().take(n) {
                    acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(j * cols + c)), acc[0]);
                }
                c += 8;
            }
            for (j, (d, acc)) in dots.iter_mut().zip(&a).enumerate().take(n) {
                let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
                for k in c..cols {
                    s += (*p.add(k)).to_f32() * *xp.add(j * cols + k);
                }
                *d = s;
            }
        }
    }

    /// One row at a time, four accumulators (32 weights per step).
    ///
    /// Why not several rows per pass sharing each load of `x` (the textbook GEMV)? Measured on
    /// the 2-core EPYC: interleaving 4 rows made 4 concurrent streams 2.3 KB apart and ran at
    /// ~11 GB/s on one core, while reading row after row (one sequential stream, `x` hot in
    /// L1) ran at ~24 GB/s, on par with candle's gemm. Memory, not the `x` loads, is the limit.
    ///
    /// # Safety
    /// AVX2+FMA available; `w` holds rows `..rows.end` of `cols`; `x.len() == cols`;
    /// `y.len() == rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_rows<T: Element>(
        w: &[T],
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let xp = x.as_ptr();
        for (yi, r) in y.iter_mut().zip(rows) {
            // SAFETY: row r is within `w`, columns < cols (function contract).
            unsafe {
                let p = w.as_ptr().add(r * cols);
                let mut a = [_mm256_setzero_ps(); 4];
                let mut c = 0;
                while c + 32 <= cols {
                    prefetch_ahead(p.add(c).cast(), (32 * size_of::<T>()).div_ceil(64));
                    for (j, acc) in a.iter_mut().enumerate() {
                        let o = c + 8 * j;
                        *acc =
                            _mm256_fmadd_ps(T::load8(p.add(o)), _mm256_loadu_ps(xp.add(o)), *acc);
                    }
                    c += 32;
                }
                while c + 8 <= cols {
                    a[0] = _mm256_fmadd_ps(T::load8(p.add(c)), _mm256_loadu_ps(xp.add(c)), a[0]);
                    c += 8;
                }
                let mut s = hsum(_mm256_add_ps(
                    _mm256_add_ps(a[0], a[1]),
                    _mm256_add_ps(a[2], a[3]),
                ));
                for c in c..cols {
                    s += (*p.add(c)).to_f32() * *xp.add(c);
                }
                *yi = s;
            }
        }
    }

    /// 16 stored weights widened to f32 in one 512-bit vector.
    ///
    /// # Safety
    /// AVX-512F available; `p..p+16` readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn load16<T: Element>(p: *const T) -> __m512 {
        // SAFETY: 16 readable elements at `p` (contract); the casts match `T::DTYPE`'s size.
        unsafe {
            match T::DTYPE {
                Dtype::F32 => _mm512_loadu_ps(p.cast::<f32>()),
                Dtype::Bf16 => {
                    let h = _mm256_loadu_si256(p.cast::<__m256i>());
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
                }
                Dtype::I8 => {
                    let b = _mm_loadu_si128(p.cast::<__m128i>());
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
                }
            }
        }
    }

    /// `dots[i][j] = w_i · x_j` for 4 consecutive rows of `w` and `NT ≤ 4` tokens of `xs`: a
    /// register tile of 4 × NT accumulators, so each 16-column step loads 4 weight vectors and
    /// NT activation vectors for 4·NT FMAs. One row against 4 tokens at a time
    /// ([`dot_tokens`]) needed a load of `x` per FMA, and with 16 tokens `x` no longer fits
    /// in L1: batched decode steps ran at about a third of the FMA rate.
    ///
    /// # Safety
    /// AVX-512F available; `w.len() == 4 * cols`; `xs.len() == NT * cols`; `1 ≤ NT ≤ 4`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dot_tile<T: Element, const NT: usize>(
        w: &[T],
        cols: usize,
        xs: &[f32],
        dots: &mut [[f32; 4]; 4],
    ) {
        debug_assert!(w.len() == 4 * cols && xs.len() == NT * cols);
        let wp = w.as_ptr();
        let xp = xs.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NT]; 4];
        let mut c = 0;
        // SAFETY: every column read is < cols, for rows < 4 and tokens < NT (contract).
        unsafe {
            while c + 16 <= cols {
                let wv = [
                    load16(wp.add(c)),
                    load16(wp.add(cols + c)),
                    load16(wp.add(2 * cols + c)),
                    load16(wp.add(3 * cols + c)),
                ];
                for t in 0..NT {
                    let xv = _mm512_loadu_ps(xp.add(t * cols + c));
                    for (a, &wr) in acc.iter_mut().zip(&wv) {
                        a[t] = _mm512_fmadd_ps(wr, xv, a[t]);
                    }
                }
                c += 16;
            }
            for (i, (d, a)) in dots.iter_mut().zip(&acc).enumerate() {
                for t in 0..NT {
                    let mut s = _mm512_reduce_add_ps(a[t]);
                    for k in c..cols {
                        s += (*wp.add(i * cols + k)).to_f32() * *xp.add(t * cols + k);
                    }
                    d[t] = s;
                }
            }
        }
    }

    /// [`dot_tile`] for bf16 weights on AVX512-BF16: per 32 columns 4 weight loads (each row's
    /// pairs as stored) and NT activation-pair loads for 4·NT `vdpbf16ps`, half the
    /// multiply instructions of widening the weights for f32 FMAs and none of the widening.
    /// The activations are `xb`, rounded to bf16 pairs (`[NT, cols.div_ceil(2)]`); the last
    /// `cols % 32` columns use the exact `xs`.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available; `w.len() == 4 * cols`; `xs.len() == NT * cols`;
    /// `xb.len() == NT * cols.div_ceil(2)`; `1 ≤ NT ≤ 4`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot_tile_bf16_dp<const NT: usize>(
        w: &[u16],
        cols: usize,
        xb: &[u32],
        xs: &[f32],
        dots: &mut [[f32; 4]; 4],
    ) {
        let pairs = cols.div_ceil(2);
        debug_assert!(w.len() == 4 * cols && xs.len() == NT * cols && xb.len() == NT * pairs);
        let (wp, xp) = (w.as_ptr(), xb.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); NT]; 4];
        let blocks = cols / 32;
        // SAFETY: block reads end at column `blocks * 32 <= cols` of each of the 4 rows and at
        // pair `blocks * 16 <= pairs` of each of the NT tokens (contract); `__m512bh` is 64
        // plain bytes.
        unsafe {
            for b in 0..blocks {
                let wv: [__m512bh; 4] = std::array::from_fn(|i| {
                    std::mem::transmute(_mm512_loadu_si512(wp.add(i * cols + 32 * b).cast()))
                });
                for t in 0..NT {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(xp.add(t * pairs + 16 * b).cast()));
                    for (a, &wr) in acc.iter_mut().zip(&wv) {
                        a[t] = _mm512_dpbf16_ps(a[t], wr, xv);
                    }
                }
            }
            for (i, (d, a)) in dots.iter_mut().zip(&acc).enumerate() {
                for t in 0..NT {
                    let mut s = _mm512_reduce_add_ps(a[t]);
                    for k in blocks * 32..cols {
                        s += crate::element::widen_bf16(*wp.add(i * cols + k))
                            * *xs.get_unchecked(t * cols + k);
                    }
                    d[t] = s;
                }
            }
        }
    }

    /// [`gemv_rows`] for bf16 weights, 16 columns per step as 8 pairs (see
    /// [`split_even_odd`](crate::simd::split_even_odd)), two steps in flight for four accumulators.
    ///
    /// # Safety
    /// AVX2+FMA available; `w` holds rows `..rows.end` of `cols`; `x.len() == cols`;
    /// `y.len() == rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_rows_bf16(
        w: &[u16],
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let xd = crate::simd::split_even_odd(x, 16);
        let blocks = cols / 16;
        let xp = xd.as_ptr();
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for (yi, r) in y.iter_mut().zip(rows) {
            // SAFETY: row r is within `w` and `xd` holds `blocks * 16` values (contract above).
            unsafe {
                let p = w.as_ptr().add(r * cols);
                let mut a = [_mm256_setzero_ps(); 4];
                let mut b = 0;
                while b + 2 <= blocks {
                    for u in 0..2 {
                        let o = (b + u) * 16;
                        let v = _mm256_loadu_si256(p.add(o).cast::<__m256i>());
                        let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                        let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                        a[2 * u] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp.add(o)), a[2 * u]);
                        a[2 * u + 1] =
                            _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp.add(o + 8)), a[2 * u + 1]);
                    }
                    b += 2;
                }
                if b < blocks {
                    let o = b * 16;
                    let v = _mm256_loadu_si256(p.add(o).cast::<__m256i>());
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                    a[0] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp.add(o)), a[0]);
                    a[1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp.add(o + 8)), a[1]);
                }
                let mut s = hsum(_mm256_add_ps(
                    _mm256_add_ps(a[0], a[1]),
                    _mm256_add_ps(a[2], a[3]),
                ));
                for c in blocks * 16..cols {
                    s += crate::element::widen_bf16(*p.add(c)) * *x.get_unchecked(c);
                }
                *yi = s;
            }
        }
    }

    /// [`gemv_rows_bf16`] on 512-bit vectors: 32 columns (16 pairs) per step, two steps in
    /// flight. Same arithmetic (exact widening, f32 FMA), wider instructions: half as many to
    /// issue per weight, which is what a 2-core decode needs to keep up with the memory.
    ///
    /// # Safety
    /// AVX-512F available; `w` holds rows `..rows.end` of `cols`; `x.len() == cols`;
    /// `y.len() == rows.len()`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn gemv_rows_bf16_avx512(
        w: &[u16],
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let xd = crate::simd::split_even_odd(x, 32);
        let blocks = cols / 32;
        let xp = xd.as_ptr();
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        for (yi, r) in y.iter_mut().zip(rows) {
            // SAFETY: row r is within `w` and `xd` holds `blocks * 32` values (contract above).
            unsafe {
                let p = w.as_ptr().add(r * cols);
                let mut a = [_mm512_setzero_ps(); 4];
                let mut b = 0;
                while b + 2 <= blocks {
                    for u in 0..2 {
                        let o = (b + u) * 32;
                        let v = _mm512_loadu_si512(p.add(o).cast::<__m512i>());
                        let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                        let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                        a[2 * u] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp.add(o)), a[2 * u]);
                        a[2 * u + 1] =
                            _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp.add(o + 16)), a[2 * u + 1]);
                    }
                    b += 2;
                }
                if b < blocks {
                    let o = b * 32;
                    let v = _mm512_loadu_si512(p.add(o).cast::<__m512i>());
                    let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                    let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
                    a[0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp.add(o)), a[0]);
                    a[1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp.add(o + 16)), a[1]);
                }
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(
                    _mm512_add_ps(a[0], a[1]),
                    _mm512_add_ps(a[2], a[3]),
                ));
                for c in blocks * 32..cols {
                    s += crate::element::widen_bf16(*p.add(c)) * *x.get_unchecked(c);
                }
                *yi = s;
            }
        }
    }
}
