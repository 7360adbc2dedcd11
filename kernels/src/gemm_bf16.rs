//! Dense bf16 prefill on AVX512-BF16: `Y = X · Wᵀ` with `vdpbf16ps`, which multiplies pairs
//! of bf16 values and adds both products into an f32 lane in one instruction.
//!
//! The f32 micro-kernel ([`crate::gemm`]) widens the weights and does one FMA per weight and
//! token, so bf16 prefill ran no faster than f32 prefill (it is compute bound). Where the CPU
//! has AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids and later), one
//! `vdpbf16ps` on 512-bit vectors does 32 multiply-adds: twice the FMA's work per instruction.
//! llama.cpp's BF16 path does the same, and it is why its BF16 prefill was 2.3× Espalier's.
//!
//! The cost is precision: the activations are rounded to bf16 (nearest-even) for the
//! products, as llama.cpp does; accumulation stays f32. Rounding to bf16's 8 significant bits
//! moves a value by at most `2⁻⁸` of itself, so each product's error is at most `2⁻⁸·|w·x|` and
//! an output is within `2⁻⁸·Σ|w·x|` (plus the f32 sum's own rounding) of the f32 result (the
//! tests hold it to that bound). Only prefill (more than [`crate::SMALL_BATCH`] tokens) takes this path: of
//! dense matrices only on AMX (without it [`crate::lanes`] runs dense bf16 prefill, and its
//! decode steps of 9-16 tokens, faster; with it those steps run [`crate::lanes_amx`]), of
//! bf16 bitmaps on AMX too (their rows expanded panel by panel), of N:M always, and of int8
//! matrices on AMX (their integers widened to bf16 panel by panel, each output row scaled
//! after its sum: [`crate::dense::I8Rows`]). Single-token
//! and small decode steps
//! keep f32 activations, where the weights' bytes, not the arithmetic, bound them.
//!
//! Layout: the activations become `u32` pairs `(x[t][2k], x[t][2k+1])`, converted once per
//! call; the weights of [`NR`] output rows are packed per panel as `panel[k * NR + r] =
//! (w[r][2k], w[r][2k+1])`, the lane order `vdpbf16ps` wants. An odd column count is padded
//! with a zero pair half. The register tile is [`MR`] tokens × [`NR`] rows: 16 accumulators,
//! and per pair of columns 2 weight loads and [`MR`] broadcasts for 16 `vdpbf16ps`.

use crate::amx::{self, Tiles};
use crate::element::Dtype;
use crate::isa::{Exec, Isa};
use crate::par::{self, SharedOut};
use std::ops::Range;

/// Output rows per panel (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// Tokens per register tile.
pub(crate) const MR: usize = 8;

// A panel is exactly two AMX B tiles wide.
const _: () = assert!(NR == 2 * amx::TILE);

/// Whether this path can run: AVX-512 asked for and effective, and the CPU has AVX512-BF16.
pub(crate) fn available(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        isa.effective() == Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Where a panel's rows come from: any bf16 weight matrix that can write one row densely
/// (dense, and N:M, whose panels are expanded so the pruned weights are multiplied as zeros:
/// twice the arithmetic at 2:4, but at twice the rate and with none of the per-weight AXPYs
/// of [`crate::rowgemm`], which prefill is bound by).
pub(crate) trait Bf16Rows: Sync {
    /// Rows `r0..r0 + nr` (all `cols` columns, pruned ones as zero) as bf16 bits, one row
    /// after another: the weights themselves where they are stored so, else decoded into
    /// `buf` (reused from panel to panel; `scratch` for formats that decode through it).
    fn rows_bits<'a>(
        &'a self,
        r0: usize,
        nr: usize,
        buf: &'a mut Vec<u16>,
        scratch: &mut (Vec<u32>, Vec<f32>),
    ) -> &'a [u16];

    /// One scale per row that every output of the row is multiplied by after its sum (int8
    /// weights, whose rows are their integers: [`crate::dense::I8Rows`]); `None` for bf16.
    fn row_scales(&self) -> Option<&[f32]> {
        None
    }
}

/// Dense bf16 weights, `[rows, cols]`, as raw bits.
pub(crate) struct DenseBits<'a> {
    pub bits: &'a [u16],
    pub cols: usize,
}

impl Bf16Rows for DenseBits<'_> {
    fn rows_bits<'a>(
        &'a self,
        r0: usize,
        nr: usize,
        _: &'a mut Vec<u16>,
        _: &mut (Vec<u32>, Vec<f32>),
    ) -> &'a [u16] {
        &self.bits[r0 * self.cols..(r0 + nr) * self.cols]
    }
}

/// Runs a bf16 or int8 matrix's prefill here when it qualifies ([`takes`]; int8 from a source
/// with row scales); returns whether it did. Shapes are checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn try_gemm<S: Bf16Rows>(
    src: &S,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) -> bool {
    // int8 runs only from a source that scales its rows (`dense::I8Rows`, and the bitmap's
    // and N:M's panels of int8 storage, which write its integers).
    let scaled = src.row_scales().is_some();
    if !takes(dtype, tokens, exec.isa) || (dtype == Dtype::I8) != scaled {
        return false;
    }
    let bounds = panel_bounds(rows, cols, tokens, exec);
    gemm(src, rows, cols, x, tokens, y, &bounds, amx::enabled());
    true
}

/// Whether [`try_gemm`] runs a product of `tokens` tokens in `dtype`: prefill (more than
/// [`crate::SMALL_BATCH`] tokens) on AVX512-BF16, of bf16 weights, or of int8 ones on AMX
/// tiles (their rows widened to bf16 panel by panel and scaled after the sums; without AMX
/// the tokens-in-lanes GEMM runs them).
pub(crate) fn takes(dtype: Dtype, tokens: usize, isa: Isa) -> bool {
    let dtype_runs = match dtype {
        Dtype::Bf16 => true,
        Dtype::I8 => amx::enabled(),
        Dtype::F32 => false,
    };
    dtype_runs && tokens > crate::SMALL_BATCH && available(isa)
}

/// The split of a product's [`NR`]-row panels over the pool (in units of panels), by its
/// multiply-adds.
fn panel_bounds(rows: usize, cols: usize, tokens: usize, exec: Exec) -> Vec<usize> {
    let panels = rows.div_ceil(NR);
    let tasks = par::task_count(exec, panels, tokens * rows * cols, par::MIN_TASK_FLOPS);
    par::even_bounds(panels, tasks)
}

/// `Y = X · Wᵀ` for the bf16 weights `src` (`[rows, cols]`), `x: [tokens, cols]`,
/// `y: [tokens, rows]` (overwritten), panels split over the pool as `bounds` says (in units of
/// [`NR`] rows), on AMX tiles when `use_amx` (the caller has checked [`amx::enabled`]). The
/// caller has checked [`available`] and the lengths.
#[allow(clippy::too_many_arguments)]
fn gemm<S: Bf16Rows>(
    src: &S,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    bounds: &[usize],
    use_amx: bool,
) {
    assert!(x.len() >= tokens * cols && y.len() >= tokens * rows);
    if cols == 0 {
        // No inputs (a compact matrix may keep no column): every output is an empty sum.
        y[..tokens * rows].fill(0.0);
        return;
    }
    let out = SharedOut::new(y);
    if use_amx {
        // The tiles read whole blocks of amx::TOKENS tokens × amx::PAIRS pairs: the
        // activations padded with zeros to both.
        let mut xb = Vec::new();
        pack_activations_amx(x, tokens, cols, &mut xb);
        let padded = amx_stride(cols);
        par::for_each_bound(bounds, |range| {
            panels_amx(src, rows, cols, padded, &xb, tokens, out, range, false);
        });
        return;
    }
    let xb = pack_activations(x, tokens, cols);
    par::for_each_bound(bounds, |range| {
        panels(src, rows, cols, &xb, tokens, out, range);
    });
}

/// Pairs per token that [`amx_gemm`]'s activations hold for a reduction over `cols` values:
/// the pairs padded with zeros to whole tile rows ([`amx::PAIRS`]).
pub(crate) fn amx_stride(cols: usize) -> usize {
    cols.div_ceil(2).next_multiple_of(amx::PAIRS)
}

/// Token rows that [`amx_gemm`]'s activations hold for `tokens` tokens: zero tokens up to a
/// whole product ([`amx::TOKENS`]).
pub(crate) fn amx_token_rows(tokens: usize) -> usize {
    tokens.next_multiple_of(amx::TOKENS)
}

/// `x: [tokens, cols]` rounded into the activations [`amx_gemm`] reads, in `buf` (its
/// allocation reused): `[amx_token_rows(tokens), amx_stride(cols)]` bf16 pairs, the padding zero.
pub(crate) fn pack_activations_amx(x: &[f32], tokens: usize, cols: usize, buf: &mut Vec<u32>) {
    let (stride, token_rows) = (amx_stride(cols), amx_token_rows(tokens));
    pack_activations_into(x, tokens, cols, stride, token_rows, buf);
}

/// `y = A·Wᵀ`, or `y += A·Wᵀ` with `accumulate`, on AMX tiles, for the bf16 weights `src`
/// (`[rows, cols]`) and activations already in bf16 pairs, `a: [amx_token_rows(tokens),
/// amx_stride(cols)]` (from [`pack_activations_amx`], or built so by a caller whose operand is
/// a transpose), `y: [tokens, rows]`. The caller has checked [`amx::enabled`] and that AVX-512
/// is the effective ISA.
///
/// # Panics
/// When `a` or `y` is short (a caller's bug).
#[allow(clippy::too_many_arguments)]
pub(crate) fn amx_gemm<S: Bf16Rows>(
    src: &S,
    rows: usize,
    cols: usize,
    a: &[u32],
    tokens: usize,
    y: SharedOut,
    accumulate: bool,
    exec: Exec,
) {
    let stride = amx_stride(cols);
    assert!(a.len() >= amx_token_rows(tokens) * stride && y.len() >= tokens * rows);
    if tokens == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        if !accumulate {
            // SAFETY: no task runs; this call owns `y`'s first tokens · rows values.
            unsafe { y.write_run(0, tokens * rows, |_| 0.0) };
        }
        return;
    }
    par::for_each_bound(&panel_bounds(rows, cols, tokens, exec), |range| {
        panels_amx(src, rows, cols, stride, a, tokens, y, range, accumulate);
    });
}

/// [`panels`] on AMX tiles: each panel is two B tiles, [`amx::TOKENS`] tokens (two A tiles)
/// at a time. `xb` holds the activations at `padded` pairs per token (a multiple of
/// [`amx::PAIRS`]) and zero tokens up to a multiple of [`amx::TOKENS`]. The outputs are
/// stored, or added to what `out` holds with `accumulate`.
#[allow(clippy::too_many_arguments)]
fn panels_amx<S: Bf16Rows>(
    src: &S,
    rows: usize,
    cols: usize,
    padded: usize,
    xb: &[u32],
    tokens: usize,
    out: SharedOut,
    range: Range<usize>,
    accumulate: bool,
) {
    let Some(tiles) = Tiles::configure() else {
        unreachable!("the caller checked amx::enabled(), so the tiles are there");
    };
    let mut tile = [0f32; amx::TOKENS * NR];
    assert!(xb.len() >= tokens.next_multiple_of(amx::TOKENS) * padded);
    for_each_panel(src, rows, cols, padded, range, |panel, r0, nr| {
        for t0 in (0..tokens).step_by(amx::TOKENS) {
            if nr == NR && t0 + amx::TOKENS <= tokens {
                // A whole block: the tiles are stored into (or added onto) `out` itself.
                // SAFETY: as below for the A and B tiles; `run_ptr` checks that the block's
                // span, rows t0..t0+TOKENS of `rows` floats from column r0 on, is in bounds;
                // the tiles touch only columns r0..r0+NR of it, which this task owns (panels
                // are disjoint).
                unsafe {
                    let c = out.run_ptr(t0 * rows + r0, (amx::TOKENS - 1) * rows + NR);
                    tiles.product_at(
                        xb.as_ptr().add(t0 * padded),
                        padded,
                        panel.as_ptr(),
                        NR,
                        padded / amx::PAIRS,
                        c,
                        rows,
                        accumulate,
                    );
                }
                continue;
            }
            // SAFETY: `t0` is a multiple of TOKENS, so the A tiles read rows below the
            // zero-padded `xb`'s end, `padded` pairs each; the panel holds `padded` pair-rows of
            // NR pairs; `tile` holds TOKENS × NR values.
            unsafe {
                tiles.product(
                    xb.as_ptr().add(t0 * padded),
                    padded,
                    panel.as_ptr(),
                    NR,
                    padded / amx::PAIRS,
                    &mut tile,
                );
            }
            let nt = amx::TOKENS.min(tokens - t0);
            let values = tile.chunks_exact(NR).take(nt);
            write_tile(out, (rows, r0, nr, t0), values, accumulate);
        }
        scale_panel(src, out, (rows, r0, nr), tokens, accumulate);
    });
}

/// Multiplies the panel's outputs (rows `r0..r0 + nr` of every token) by their rows' scales
/// where `src` has them (int8), once all of its sums are written.
fn scale_panel<S: Bf16Rows>(
    src: &S,
    out: SharedOut,
    (rows, r0, nr): (usize, usize, usize),
    tokens: usize,
    accumulate: bool,
) {
    let Some(scales) = src.row_scales() else {
        return;
    };
    // Scaling after the sums cannot tell the new sums from what the output held before.
    assert!(!accumulate, "row scales with an accumulating product");
    let scales = &scales[r0..r0 + nr];
    for t in 0..tokens {
        // SAFETY: the calling task owns output rows r0..r0+nr (panels are disjoint);
        // `run_ptr` checks the run's bounds.
        unsafe {
            let p = out.run_ptr(t * rows + r0, nr);
            for (i, &s) in scales.iter().enumerate() {
                *p.add(i) *= s;
            }
        }
    }
}

/// Panels `range` (of [`NR`] rows each): pack each, then run every token tile over it.
#[allow(clippy::too_many_arguments)]
fn panels<S: Bf16Rows>(
    src: &S,
    rows: usize,
    cols: usize,
    xb: &[u32],
    tokens: usize,
    out: SharedOut,
    range: Range<usize>,
) {
    let pairs = cols.div_ceil(2);
    let mut tile = [[0.0f32; NR]; MR];
    for_each_panel(src, rows, cols, pairs, range, |panel, r0, nr| {
        let mut t0 = 0;
        while t0 < tokens {
            let nt = MR.min(tokens - t0);
            let xs = &xb[t0 * pairs..(t0 + nt) * pairs];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked `available` (AVX-512F and AVX512-BF16 present); `xs`
            // holds `nt` tokens of `pairs` pairs and `panel` holds `pairs * NR` pairs.
            unsafe {
                match nt {
                    8 => x86::mk::<8>(xs, pairs, panel, &mut tile),
                    7 => x86::mk::<7>(xs, pairs, panel, &mut tile),
                    6 => x86::mk::<6>(xs, pairs, panel, &mut tile),
                    5 => x86::mk::<5>(xs, pairs, panel, &mut tile),
                    4 => x86::mk::<4>(xs, pairs, panel, &mut tile),
                    3 => x86::mk::<3>(xs, pairs, panel, &mut tile),
                    2 => x86::mk::<2>(xs, pairs, panel, &mut tile),
                    _ => x86::mk::<1>(xs, pairs, panel, &mut tile),
                }
            }
            let values = tile.iter().take(nt).map(|r| r.as_slice());
            write_tile(out, (rows, r0, nr, t0), values, false);
            t0 += nt;
        }
        scale_panel(src, out, (rows, r0, nr), tokens, false);
    });
}

/// Packs each panel of `range` in turn (see [`pack_panel`]) into one buffer of `panel_pairs`
/// pair-rows (at least the columns' pairs; those past them stay zero) and hands it to `run`
/// with the panel's first row and row count.
fn for_each_panel<S: Bf16Rows>(
    src: &S,
    rows: usize,
    cols: usize,
    panel_pairs: usize,
    range: Range<usize>,
    mut run: impl FnMut(&[u32], usize, usize),
) {
    let mut panel = vec![0u32; panel_pairs * NR];
    let mut buf = Vec::new();
    let mut scratch = (Vec::new(), Vec::new());
    for p in range {
        let r0 = p * NR;
        let nr = NR.min(rows - r0);
        pack_panel(
            src.rows_bits(r0, nr, &mut buf, &mut scratch),
            cols,
            nr,
            &mut panel,
        );
        run(&panel, r0, nr);
    }
}

/// Writes a tile's first `nr` outputs of each token (`values`' rows: tokens `t0`, `t0 + 1`,
/// ...) into `y: [tokens, rows]` at rows `r0..r0 + nr`, or adds them to what it holds with
/// `accumulate`.
fn write_tile<'v>(
    out: SharedOut,
    (rows, r0, nr, t0): (usize, usize, usize, usize),
    values: impl Iterator<Item = &'v [f32]>,
    accumulate: bool,
) {
    for (t, values) in values.enumerate() {
        let nr = nr.min(values.len());
        let start = (t0 + t) * rows + r0;
        // SAFETY: the calling task owns output rows r0..r0+nr (panels are disjoint);
        // `run_ptr` and `write_run` check the run's bounds.
        unsafe {
            if accumulate {
                let p = out.run_ptr(start, nr);
                for (i, v) in values[..nr].iter().enumerate() {
                    *p.add(i) += v;
                }
            } else {
                out.write_run(start, nr, |i| values[i]);
            }
        }
    }
}

/// The activations as bf16 pairs, `[tokens, cols.div_ceil(2)]`, rounded to nearest-even
/// (`vcvtne2ps2bf16` 32 values at a time where the CPU has it: converting one by one took
/// as long as the GEMM of a 192-row layer).
pub(crate) fn pack_activations(x: &[f32], tokens: usize, cols: usize) -> Vec<u32> {
    let pairs = cols.div_ceil(2);
    let mut out = Vec::new();
    pack_activations_into(x, tokens, cols, pairs, tokens, &mut out);
    out
}

/// [`pack_activations`] into `out` (its allocation reused) at `stride` pairs per token (at
/// least `cols.div_ceil(2)`) over `token_rows` rows (at least `tokens`), the padding zero.
fn pack_activations_into(
    x: &[f32],
    tokens: usize,
    cols: usize,
    stride: usize,
    token_rows: usize,
    out: &mut Vec<u32>,
) {
    let pairs = cols.div_ceil(2);
    debug_assert!(stride >= pairs && token_rows >= tokens);
    out.clear();
    out.resize(token_rows * stride, 0);
    for (dst, src) in out
        .chunks_exact_mut(stride)
        .zip(x.chunks_exact(cols))
        .take(tokens)
    {
        let dst = &mut dst[..pairs];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            // SAFETY: AVX512-BF16 (and so AVX-512F) is present, checked just above.
            done = unsafe { x86::convert_row(src, dst) };
        }
        for (d, s) in dst[done / 2..].iter_mut().zip(src[done..].chunks(2)) {
            let lo = u32::from(half::bf16::from_f32(s[0]).to_bits());
            let hi = s
                .get(1)
                .map_or(0, |&v| u32::from(half::bf16::from_f32(v).to_bits()));
            *d = lo | (hi << 16);
        }
    }
}

/// Packs the `nr` rows of `block` (`[nr, cols]` bf16 bits) into `panel[k * NR + r]` (bf16
/// pairs of columns `2k` and `2k + 1`), zero for rows past `nr` and for the missing half of an
/// odd last pair. A pair of columns read as one little-endian `u32` is already the pair the
/// panel holds, so packing a full panel is a transpose of 32-bit words: with AVX-512, 16 pairs
/// of 16 rows at a time through a register transpose ([`x86::pack_full`]). The rest (a short
/// panel, odd columns, the last pairs) goes pair by pair across the rows, so the panel is
/// written in order and each row read as a stream. `perf` put the pair-by-pair loop alone at
/// 8-9% of a bf16 distillation step, where every linear's weights are packed per product.
fn pack_panel(block: &[u16], cols: usize, nr: usize, panel: &mut [u32]) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if nr == NR && cols.is_multiple_of(2) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present, checked just above.
        done = unsafe { x86::pack_full(block, cols, panel) };
    }
    pack_panel_pairs(block, cols, nr, panel, done);
}

/// [`pack_panel`]'s pairs `from..` one by one.
fn pack_panel_pairs(block: &[u16], cols: usize, nr: usize, panel: &mut [u32], from: usize) {
    let rows: [&[u16]; NR] = std::array::from_fn(|i| {
        if i < nr {
            &block[i * cols..][..cols]
        } else {
            &[]
        }
    });
    for (k, dst) in panel
        .chunks_exact_mut(NR)
        .take(cols.div_ceil(2))
        .enumerate()
        .skip(from)
    {
        for (d, row) in dst.iter_mut().zip(&rows[..nr]) {
            let hi = row.get(2 * k + 1).map_or(0, |&v| u32::from(v));
            *d = u32::from(row[2 * k]) | (hi << 16);
        }
        dst[nr..].fill(0);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// Converts the whole 32-value blocks of `src` into bf16 pairs in `dst` (nearest-even);
    /// returns how many values it converted (a multiple of 32).
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert_row(src: &[f32], dst: &mut [u32]) -> usize {
        let blocks = (src.len() / 32).min(dst.len() / 16);
        for b in 0..blocks {
            // SAFETY: block b covers src[32b..32b+32] and dst[16b..16b+16], both in bounds;
            // `__m512bh` is 64 plain bytes.
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(32 * b));
                let hi = _mm512_loadu_ps(src.as_ptr().add(32 * b + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * b).cast::<__m512i>(), v);
            }
        }
        blocks * 32
    }

    /// [`super::pack_panel`] of a full panel ([`NR`] rows, even `cols`) for its whole blocks of
    /// 16 pairs: per block and half panel, 16 rows' 16 pairs loaded as 32-bit words,
    /// transposed ([`crate::lanes::x86::transpose16`]: lane `j` of output `i` is pair `i` of
    /// row `j`) and stored as 16 runs of the panel. Returns the pairs packed (a multiple of 16).
    ///
    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_full(block: &[u16], cols: usize, panel: &mut [u32]) -> usize {
        let pairs = cols / 2;
        assert!(block.len() >= NR * cols && panel.len() >= pairs * NR);
        let blocks = pairs / 16;
        for b in 0..blocks {
            for half in 0..NR / 16 {
                let mut rows = [_mm512_setzero_ps(); 16];
                for (i, v) in rows.iter_mut().enumerate() {
                    let start = (16 * half + i) * cols + 32 * b;
                    let row = &block[start..start + 32];
                    // SAFETY: `row` holds the 32 bf16 values (64 bytes) loaded.
                    *v = unsafe { _mm512_loadu_ps(row.as_ptr().cast()) };
                }
                for (j, v) in crate::lanes::x86::transpose16(rows).into_iter().enumerate() {
                    let dst = &mut panel[(16 * b + j) * NR + 16 * half..][..16];
                    // SAFETY: `dst` holds the 16 words stored.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr().cast(), v) };
                }
            }
        }
        blocks * 16
    }

    /// `tile[t][r] = Σ_k pair(x[t], k) · pair(panel, k, r)` for `NT` tokens and all [`NR`]
    /// rows: `2·NT` accumulators in registers over the whole panel.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available; `xs.len() >= NT * pairs`;
    /// `panel.len() >= pairs * NR`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn mk<const NT: usize>(
        xs: &[u32],
        pairs: usize,
        panel: &[u32],
        tile: &mut [[f32; NR]; MR],
    ) {
        debug_assert!(xs.len() >= NT * pairs && panel.len() >= pairs * NR);
        let mut acc = [[_mm512_setzero_ps(); 2]; NT];
        let xp = xs.as_ptr();
        let wp = panel.as_ptr();
        // SAFETY: every read is below `NT * pairs` in `xs` and `pairs * NR` in `panel`
        // (contract above); `__m512bh` and `__m512i` are both 64 plain bytes.
        unsafe {
            for k in 0..pairs {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(wp.add(k * NR).cast::<__m512i>()));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(wp.add(k * NR + 16).cast::<__m512i>()));
                for (t, a) in acc.iter_mut().enumerate() {
                    let xv: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*xp.add(t * pairs + k) as i32));
                    a[0] = _mm512_dpbf16_ps(a[0], w0, xv);
                    a[1] = _mm512_dpbf16_ps(a[1], w1, xv);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile[t].as_mut_ptr(), a[0]);
                _mm512_storeu_ps(tile[t].as_mut_ptr().add(16), a[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pairs put column `2k` in the low half, as `vdpbf16ps` reads memory order.
    #[test]
    fn activations_pack_low_column_first_and_pad_odd_rows() {
        let x = [1.0f32, 2.0, 3.0, -1.0, 0.5, 4.0];
        let p = pack_activations(&x, 2, 3);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], 0x3f80 | (0x4000 << 16));
        assert_eq!(p[1], 0x4040);
        assert_eq!(p[2], 0xbf80 | (0x3f00 << 16));
        assert_eq!(p[3], 0x4080);
    }

    /// The AMX tiles and the AVX512-BF16 kernel on awkward shapes (token counts around the
    /// 16- and 32-token tiles, rows around the 32-row panel, odd columns and columns around
    /// the 16-pair tile row): both within `2⁻⁸·Σ|w·x|` of the f32 product, and within
    /// `2⁻¹⁶·Σ|w·x|` of each other (the same bf16 products, added in another order).
    #[test]
    fn amx_tiles_equal_the_avx512_bf16_kernel() {
        if !available(Isa::Avx512) {
            eprintln!("skipped: this CPU has no AVX512-BF16, so neither kernel can run");
            return;
        }
        if Tiles::configure().is_none() {
            eprintln!(
                "skipped: this CPU or OS has no AMX-BF16 tiles (the AVX512-BF16 kernel is tested elsewhere)"
            );
            return;
        }
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (tokens, rows, cols) in [
            (17, 1, 1),
            (17, 31, 3),
            (32, 32, 32),
            (33, 33, 31),
            (48, 64, 33),
            (100, 70, 576),
            (128, 192, 577),
        ] {
            let w: Vec<u16> = (0..rows * cols)
                .map(|_| half::bf16::from_f32(next()).to_bits())
                .collect();
            let x: Vec<f32> = (0..tokens * cols).map(|_| 4.0 * next()).collect();
            let src = DenseBits { bits: &w, cols };
            let panels = rows.div_ceil(NR);
            let bounds = par::even_bounds(panels, 2.min(panels));
            let mut tiles = vec![f32::NAN; tokens * rows];
            let mut vector = vec![f32::NAN; tokens * rows];
            gemm(&src, rows, cols, &x, tokens, &mut tiles, &bounds, true);
            gemm(&src, rows, cols, &x, tokens, &mut vector, &bounds, false);
            for t in 0..tokens {
                for r in 0..rows {
                    let (mut exact, mut size) = (0f64, 0f64);
                    for k in 0..cols {
                        let p = f64::from(half::bf16::from_bits(w[r * cols + k]).to_f32())
                            * f64::from(x[t * cols + k]);
                        exact += p;
                        size += p.abs();
                    }
                    let (a, b) = (tiles[t * rows + r], vector[t * rows + r]);
                    let ctx = format!("{tokens}x{rows}x{cols} at token {t}, row {r}");
                    assert!(
                        (f64::from(a) - exact).abs() <= size / 256.0 + 1e-30,
                        "{ctx}: {a} vs {exact}"
                    );
                    assert!(
                        (f64::from(b) - exact).abs() <= size / 256.0 + 1e-30,
                        "{ctx}: {b} vs {exact}"
                    );
                    assert!(
                        (f64::from(a) - f64::from(b)).abs() <= size / 65536.0,
                        "{ctx}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// The panel packing (whole blocks transposed in registers where the CPU has AVX-512, the
    /// rest pair by pair) equals the definition: `panel[k * NR + r]` holds row `r`'s columns
    /// `2k` (low half) and `2k + 1`, zero past the rows, the columns and the odd last half.
    #[test]
    fn panels_pack_as_defined() {
        for (nr, cols) in [
            (32usize, 32usize),
            (32, 576),
            (32, 1536),
            (32, 34),
            (32, 63),
            (31, 64),
            (5, 7),
        ] {
            let block: Vec<u16> = (0..nr * cols).map(|i| (i * 7919 % 65521) as u16).collect();
            let pairs = cols.div_ceil(2) + 3;
            let mut panel = vec![u32::MAX; pairs * NR];
            panel[cols.div_ceil(2) * NR..].fill(0);
            pack_panel(&block, cols, nr, &mut panel);
            for k in 0..pairs {
                for r in 0..NR {
                    let at = |c: usize| {
                        if r < nr && c < cols {
                            u32::from(block[r * cols + c])
                        } else {
                            0
                        }
                    };
                    let want = at(2 * k) | (at(2 * k + 1) << 16);
                    assert_eq!(panel[k * NR + r], want, "{nr}x{cols}: pair {k}, row {r}");
                }
            }
        }
    }

    /// The vector conversion rounds exactly as the scalar one (nearest-even), ties included.
    #[test]
    fn vector_conversion_equals_scalar() {
        let x: Vec<f32> = (0..70)
            .map(|i| match i % 5 {
                0 => f32::from_bits(0x3f80_8000 + i as u32 * 0x10000), // a tie
                1 => -(i as f32) * 0.37,
                2 => 1e-3 * i as f32,
                3 => f32::from_bits(0x4120_7fff),
                _ => 123.456 / (i as f32 + 1.0),
            })
            .collect();
        let packed = pack_activations(&x, 1, 70);
        for (k, &p) in packed.iter().enumerate() {
            let want = |v: f32| u32::from(half::bf16::from_f32(v).to_bits());
            assert_eq!(p, want(x[2 * k]) | (want(x[2 * k + 1]) << 16), "pair {k}");
        }
    }
}
