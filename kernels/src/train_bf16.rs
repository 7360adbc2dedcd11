//! Mixed-precision products for training a dense linear layer: the three products of its
//! forward and backward pass with bf16 operands and f32 sums, as PyTorch's bf16 autocast runs
//! them, on the tokens-in-lanes GEMM ([`crate::lanes`]):
//!
//! * forward `Y = X·Wᵀ` ([`Bf16Training::forward`]),
//! * input gradient `dX = dY·W` ([`Bf16Training::input_grad`]),
//! * weight gradient `dW += dYᵀ·X` ([`Bf16Training::weight_grad`]), added into the f32 running sum.
//!
//! The f32 products of the training pass (the `gemm` crate) run at the f32 FMA rate; one
//! `vdpbf16ps` does twice the multiply-adds of an f32 FMA, so on a CPU with AVX512-BF16 the
//! products, most of a training step, can run up to twice as fast. The price is the operands'
//! precision: each is rounded to bf16 (nearest-even, 8 significant bits: off by at most `2⁻⁸` of
//! itself), so each product is off by at most `2⁻⁷ + 2⁻¹⁶` of itself and a sum by about
//! `2⁻⁷·Σ|a·b|`; the sums, the master weights, their
//! gradients' running sums and the optimizer's state stay f32.
//!
//! Weights change every optimizer step, so [`Bf16Training::pack`] rounds the current f32
//! weight into two bf16 copies once per pass: as stored (`[out, in]`, the forward's rows) and
//! transposed (`[in, out]`, the input gradient's rows); both together are as many bytes as
//! the f32 weight. The weight gradient's operands change every batch: `X` is transposed into
//! bf16 rows `[in, tokens]` (the GEMM's weights) and `dY`'s columns become token panels built
//! straight from its rows (two rows of `dY` make a panel's pairs, no transpose), so its
//! reduction runs over the batch's tokens.
//!
//! Where the CPU has AMX-BF16 (Intel Sapphire Rapids and later), all three products run on its
//! tiles instead ([`crate::gemm_bf16::amx_gemm`]), with the same bf16 operands and f32 sums:
//! on such a Xeon the tokens-in-lanes kernel's `vdpbf16ps` ran at half the f32 FMA path's
//! speed (a bf16 training pass at 0.53× the f32 one), where AMX does 256 times a
//! `vdpbf16ps`'s multiply-adds per instruction. The weight gradient's `dY` is then transposed
//! into bf16 rows `[out, tokens]`, the tiles' A operand, and `X`'s transpose is the B operand.

use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

use crate::amx;
use crate::gemm_bf16::{self, DenseBits};
use crate::isa::{Exec, Isa};
use crate::lanes::{self, Weights};
use crate::par::SharedOut;

/// Rows (of the source) per parallel task when transposing into bf16.
const TRANSPOSE_BLOCK: usize = 64;

/// Buffers a thread's products reuse from call to call: a training step runs the same shapes
/// over and over, and fresh buffers of megabytes each cost page faults (6% of a bf16 step's
/// samples in `perf` before they were kept).
#[derive(Default)]
struct Scratch {
    /// Token panels.
    panels: Vec<u32>,
    /// The weight gradient's transposed activations.
    xt: Vec<u16>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// Runs `f` with this thread's [`Scratch`], or a fresh one if a call on this thread is
/// already using it (a product started from inside another's parallel region).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Whether the mixed-precision products can run for an `[out, in]` weight: AVX-512 with
/// AVX512-BF16 asked for and present, and both dimensions even (the GEMM reads pairs along
/// its reduction, which is `in` for the forward and `out` for the input gradient).
pub fn bf16_training_available(isa: Isa, out: usize, inp: usize) -> bool {
    lanes::available_bf16(isa, inp) && out.is_multiple_of(2)
}

/// Whether the products run on AMX tiles: AVX-512 is the effective ISA and [`amx::enabled`]
/// (the CPU has AMX-BF16, the OS granted the tile state, `ESPALIER_AMX=0` is not set).
fn amx_for(isa: Isa) -> bool {
    isa.effective() == Isa::Avx512 && amx::enabled()
}

/// The bf16 copies of one dense `[out, in]` weight, for [`Bf16Training::forward`] and
/// [`Bf16Training::input_grad`].
#[derive(Debug, Clone)]
pub struct Bf16Training {
    out: usize,
    inp: usize,
    /// `W` rounded to bf16, `[out, in]`.
    rows: Vec<u16>,
    /// `Wᵀ` rounded to bf16, `[in, out]`.
    cols: Vec<u16>,
    exec: Exec,
    /// The products run on AMX tiles ([`amx_for`]), else on the tokens-in-lanes kernel.
    amx: bool,
}

impl Bf16Training {
    /// Empty copies for an `[out, in]` weight (fill them with [`Bf16Training::pack`]), or
    /// `None` where [`bf16_training_available`] says the products cannot run.
    pub fn new(out: usize, inp: usize, isa: Isa) -> Option<Self> {
        bf16_training_available(isa, out, inp).then(|| Bf16Training {
            out,
            inp,
            rows: Vec::new(),
            cols: Vec::new(),
            exec: Exec {
                isa,
                ..Exec::auto()
            },
            amx: amx_for(isa),
        })
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Rounds the current weight `w` (`[out, in]` row-major f32) into both copies.
    ///
    /// # Panics
    /// When `w` does not hold `out · in` values (a caller's bug, not an input's).
    pub fn pack(&mut self, w: &[f32]) {
        self.round_rows(w);
        self.cols.resize(w.len(), 0);
        transpose_bf16(
            w,
            self.out,
            self.inp,
            (&mut self.cols, self.out),
            self.exec.isa,
        );
    }

    /// Rounds `w` into the forward's copy only, dropping the other: for a frozen model that
    /// only runs forward (a distillation teacher), half the memory.
    ///
    /// # Panics
    /// As [`Bf16Training::pack`].
    pub fn pack_forward(&mut self, w: &[f32]) {
        self.round_rows(w);
        self.cols = Vec::new();
    }

    /// The forward's copy of `w`, its allocation reused.
    fn round_rows(&mut self, w: &[f32]) {
        assert_eq!(w.len(), self.out * self.inp, "weight of the wrong size");
        self.rows.resize(w.len(), 0);
        let isa = self.exec.isa;
        (self.rows.par_chunks_mut(1 << 14))
            .zip(w.par_chunks(1 << 14))
            .for_each(|(dst, src)| round_into(src, dst, isa));
    }

    /// `y = x·Wᵀ` (`x: [n, in]`, `y: [n, out]`), or `y += x·Wᵀ` with `accumulate`.
    ///
    /// # Panics
    /// When the copies were not packed or a length is short (a caller's bug).
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
        assert!(
            self.rows.len() == self.out * self.inp,
            "forward before pack"
        );
        product(
            &self.rows, self.out, self.inp, x, n, y, accumulate, self.exec, self.amx,
        );
    }

    /// `dx = dy·W` (`dy: [n, out]`, `dx: [n, in]`), or `dx += dy·W` with `accumulate`.
    ///
    /// # Panics
    /// When the copies were not packed or a length is short (a caller's bug).
    pub fn input_grad(&self, dy: &[f32], n: usize, dx: &mut [f32], accumulate: bool) {
        assert!(
            self.cols.len() == self.out * self.inp,
            "input_grad before pack"
        );
        product(
            &self.cols, self.inp, self.out, dy, n, dx, accumulate, self.exec, self.amx,
        );
    }
}

impl Bf16Training {
    /// `sum += dyᵀ·x` (`dy: [n, out]`, `x: [n, in]`, `sum: [out, in]`), the weight gradient,
    /// with both operands rounded to bf16; needs no copies of the weight (works before
    /// [`Bf16Training::pack`]).
    ///
    /// # Panics
    /// When a length is short (a caller's bug).
    pub fn weight_grad(&self, dy: &[f32], x: &[f32], n: usize, sum: &mut [f32]) {
        weight_grad_bf16(dy, x, n, (self.out, self.inp), sum, self.exec.isa, self.amx);
    }
}

/// `y (+)= x·Wᵀ` for bf16 `w: [rows, cols]`, `x: [n, cols]`, `y: [n, rows]`, on AMX tiles
/// with `amx`.
#[allow(clippy::too_many_arguments)]
fn product(
    w: &[u16],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    y: &mut [f32],
    accumulate: bool,
    exec: Exec,
    amx: bool,
) {
    assert!(x.len() >= n * cols && y.len() >= n * rows);
    if n == 0 || rows == 0 {
        return;
    }
    if cols == 0 {
        if !accumulate {
            y[..n * rows].fill(0.0);
        }
        return;
    }
    if amx {
        with_scratch(|scratch| {
            gemm_bf16::pack_activations_amx(x, n, cols, &mut scratch.panels);
            let out = SharedOut::new(&mut y[..n * rows]);
            let w = DenseBits { bits: w, cols };
            gemm_bf16::amx_gemm(&w, rows, cols, &scratch.panels, n, out, accumulate, exec);
        });
        return;
    }
    let width = lanes::panel_width(n);
    with_scratch(|scratch| {
        lanes::pack_bf16_into(x, n, cols, width, exec, &mut scratch.panels);
        let out = SharedOut::new(&mut y[..n * rows]);
        lanes::gemm_panels(
            Weights::Bf16(w),
            rows,
            cols,
            &scratch.panels,
            n,
            out,
            accumulate,
            exec,
        );
    });
}

/// `sum += dyᵀ·x` for `dy: [n, out]`, `x: [n, inp]`, `sum: [out, inp]` (the weight gradient
/// of `y = x·Wᵀ`), with both operands rounded to bf16 and the products summed in f32 over the
/// `n` tokens, on AMX tiles with `amx`. The caller has checked [`bf16_training_available`]
/// for `(out, inp)`; `n` may be odd (a zero token pads the last pair).
///
/// # Panics
/// When a length is short (a caller's bug).
fn weight_grad_bf16(
    dy: &[f32],
    x: &[f32],
    n: usize,
    (out, inp): (usize, usize),
    sum: &mut [f32],
    isa: Isa,
    amx: bool,
) {
    assert!(dy.len() >= n * out && x.len() >= n * inp && sum.len() >= out * inp);
    if n == 0 || out == 0 || inp == 0 {
        return;
    }
    let exec = Exec {
        isa,
        ..Exec::auto()
    };
    // The GEMM's reduction runs over tokens in pairs: an odd count gets a zero token.
    let padded = n + n % 2;
    with_scratch(|scratch| {
        // Its weights: `x` transposed, `[inp, padded]` bf16 (row `i` is feature `i` of every
        // token; the padding token's column zero).
        let xt = &mut scratch.xt;
        xt.clear();
        xt.resize(inp * padded, 0);
        transpose_bf16(&x[..n * inp], n, inp, (xt, padded), isa);
        let sums = SharedOut::new(&mut sum[..out * inp]);
        if amx {
            // The tiles' A operand: `dy` transposed, `[out, padded]` bf16 read as pairs of
            // consecutive tokens, in the padded layout `amx_gemm` reads (zero past the tokens
            // and past the `out` rows).
            let stride = gemm_bf16::amx_stride(padded);
            let a = &mut scratch.panels;
            a.clear();
            a.resize(gemm_bf16::amx_token_rows(out) * stride, 0);
            // SAFETY: every bit pattern is a valid u16 and u16's alignment divides u32's, so
            // the whole buffer is the middle part, two bf16 values per pair in memory order
            // (the low half first, as the tiles read them).
            let (head, dyt, tail) = unsafe { a.align_to_mut::<u16>() };
            debug_assert!(head.is_empty() && tail.is_empty());
            transpose_bf16(&dy[..n * out], n, out, (dyt, 2 * stride), isa);
            let xt = DenseBits {
                bits: &xt[..],
                cols: padded,
            };
            gemm_bf16::amx_gemm(&xt, inp, padded, &scratch.panels, out, sums, true, exec);
            return;
        }
        // Its tokens: the `out` columns of `dy`, as pair panels over the `padded` tokens.
        let width = lanes::panel_width(out);
        dy_panels(&dy[..n * out], n, out, width, isa, &mut scratch.panels);
        lanes::gemm_panels(
            Weights::Bf16(xt),
            inp,
            padded,
            &scratch.panels,
            out,
            sums,
            true,
            exec,
        );
    });
}

/// Rounds f32 values to bf16 bits (nearest-even; `vcvtneps2bf16` 16 at a time where
/// [`bf16_training_available`]).
fn round_into(src: &[f32], dst: &mut [u16], isa: Isa) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if bf16_training_available(isa, 2, 2) {
        done = n - n % 16;
        // SAFETY: AVX512-BF16 is present (checked above); both slices hold `done` elements.
        unsafe { x86::round16(&src[..done], &mut dst[..done]) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for (d, &s) in dst[done..n].iter_mut().zip(&src[done..n]) {
        *d = bf16::from_f32(s).to_bits();
    }
}

/// `dst = srcᵀ` rounded to bf16, for `src: [rows, cols]` f32 and `dst: [cols, stride]`
/// (`stride ≥ rows`; the elements past `rows` in each row are left as they are), in square
/// blocks so both sides stay in cache, blocks of source rows in parallel.
fn transpose_bf16(
    src: &[f32],
    rows: usize,
    cols: usize,
    (dst, stride): (&mut [u16], usize),
    isa: Isa,
) {
    assert!(stride >= rows && src.len() >= rows * cols && dst.len() >= cols * stride);
    let dst = SharedBits(dst.as_mut_ptr(), cols * stride);
    #[cfg(target_arch = "x86_64")]
    let simd = bf16_training_available(isa, 2, 2);
    (0..rows.div_ceil(TRANSPOSE_BLOCK))
        .into_par_iter()
        .for_each(|rb| {
            let r0 = rb * TRANSPOSE_BLOCK;
            let r1 = (r0 + TRANSPOSE_BLOCK).min(rows);
            for c0 in (0..cols).step_by(TRANSPOSE_BLOCK) {
                let c1 = (c0 + TRANSPOSE_BLOCK).min(cols);
                // Whole 16×16 squares in registers, the ragged edges value by value.
                let (mut rs, mut cs) = (r0, c0);
                #[cfg(target_arch = "x86_64")]
                if simd {
                    (rs, cs) = (r1 - (r1 - r0) % 16, c1 - (c1 - c0) % 16);
                    for r in (r0..rs).step_by(16) {
                        for c in (c0..cs).step_by(16) {
                            // SAFETY: AVX512-BF16 is present (checked above); `square16`
                            // checks its bounds; this task alone writes columns `r0..r1` of
                            // `dst`'s rows.
                            unsafe { x86::square16(src, cols, (r, c), &dst, stride) };
                        }
                    }
                }
                let edge = |r: usize, c: usize| {
                    let v = bf16::from_f32(src[r * cols + c]).to_bits();
                    // SAFETY: `write` checks the bounds; this task alone writes columns
                    // `r0..r1` of `dst`'s rows.
                    unsafe { dst.write(c * stride + r, v) };
                };
                for c in c0..c1 {
                    for r in rs..r1 {
                        edge(r, c);
                    }
                }
                for c in cs..c1 {
                    for r in r0..rs {
                        edge(r, c);
                    }
                }
            }
        });
}

/// A raw view of a bf16 output shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedBits(*mut u16, usize);

// SAFETY: handed only to tasks writing disjoint indices while the borrow it came from lives.
unsafe impl Send for SharedBits {}
// SAFETY: as above; no task reads another's elements.
unsafe impl Sync for SharedBits {}

impl SharedBits {
    /// # Safety
    /// No other task may access index `i` meanwhile.
    #[inline(always)]
    unsafe fn write(&self, i: usize, v: u16) {
        assert!(i < self.1, "index {i} out of bounds {}", self.1);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { self.0.add(i).write(v) }
    }

    /// The address of the run `start..start + n`, its bounds checked.
    ///
    /// # Safety
    /// The caller writes only within the run, and no other task may access it meanwhile.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn run_ptr(&self, start: usize, n: usize) -> *mut u16 {
        assert!(
            start.checked_add(n).is_some_and(|end| end <= self.1),
            "run {start}+{n} out of bounds {}",
            self.1
        );
        // SAFETY: start <= len (checked above), so the offset stays within the allocation.
        unsafe { self.0.add(start) }
    }
}

/// The token panels of [`lanes::gemm_panels`] for the weight gradient: "token" `o` is column
/// `o` of `dy` (`[n, out]`), its pair `k` is `(dy[2k][o], dy[2k + 1][o])` rounded to bf16 (the
/// second zero past the last token when `n` is odd), at `p * pairs * width + k * width + o %
/// width` for panel `p = o / width`. Each pair of `dy` rows fills one run of every panel, so
/// no transpose is needed.
fn dy_panels(dy: &[f32], n: usize, out: usize, width: usize, isa: Isa, panels: &mut Vec<u32>) {
    let pairs = n.div_ceil(2);
    let panel_len = pairs * width;
    panels.clear();
    panels.resize(out.div_ceil(width) * panel_len, 0);
    #[cfg(target_arch = "x86_64")]
    let simd = bf16_training_available(isa, 2, 2);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    panels
        .par_chunks_mut(panel_len)
        .enumerate()
        .for_each(|(p, panel)| {
            let o0 = p * width;
            let lanes = width.min(out - o0);
            for k in 0..pairs {
                let a = &dy[2 * k * out + o0..][..lanes];
                let run = &mut panel[k * width..][..lanes];
                // The second token of the last pair when `n` is odd: zero.
                let b = (2 * k + 1 < n).then(|| &dy[(2 * k + 1) * out + o0..][..lanes]);
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if simd && let Some(b) = b {
                    done = lanes - lanes % 16;
                    // SAFETY: AVX512-BF16 is present (checked above); the slices hold `done`
                    // elements.
                    unsafe { x86::pairs16(&a[..done], &b[..done], &mut run[..done]) };
                }
                for (i, w) in run.iter_mut().enumerate().skip(done) {
                    let hi = b.map_or(0, |b| bf16::from_f32(b[i]).to_bits());
                    *w = u32::from(bf16::from_f32(a[i]).to_bits()) | (u32::from(hi) << 16);
                }
            }
        });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::SharedBits;
    use std::arch::x86_64::*;

    /// 16 f32 rounded to bf16 bits (nearest-even).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn bf16x16(v: __m512) -> __m256i {
        // SAFETY: `__m256bh` and `__m256i` are both 32 plain bytes.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) }
    }

    /// `dst = src` rounded to bf16 bits, 16 at a time.
    ///
    /// # Safety
    /// AVX512-BF16 available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round16(src: &[f32], dst: &mut [u16]) {
        assert!(src.len() == dst.len() && src.len().is_multiple_of(16));
        for (s, d) in src.chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: each chunk holds the 16 values loaded or stored.
            unsafe {
                let v = bf16x16(_mm512_loadu_ps(s.as_ptr()));
                _mm256_storeu_si256(d.as_mut_ptr().cast(), v);
            }
        }
    }

    /// Words `a[i]` (low half) and `b[i]` (high half) rounded to bf16, 16 at a time: the pair
    /// layout `vdpbf16ps` multiplies.
    ///
    /// # Safety
    /// AVX512-BF16 available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn pairs16(a: &[f32], b: &[f32], dst: &mut [u32]) {
        assert!(a.len() == dst.len() && b.len() == dst.len() && dst.len().is_multiple_of(16));
        for ((a, b), d) in a
            .chunks_exact(16)
            .zip(b.chunks_exact(16))
            .zip(dst.chunks_exact_mut(16))
        {
            // SAFETY: each chunk holds the 16 values loaded or stored.
            unsafe {
                let lo = _mm512_cvtepu16_epi32(bf16x16(_mm512_loadu_ps(a.as_ptr())));
                let hi = _mm512_cvtepu16_epi32(bf16x16(_mm512_loadu_ps(b.as_ptr())));
                let w = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_storeu_si512(d.as_mut_ptr().cast(), w);
            }
        }
    }

    /// The 16×16 square of `src` (`[.., cols]` f32) at `(r, c)` transposed into `dst` rounded
    /// to bf16: source column `c + j` becomes the run `dst[(c + j) * stride + r..][..16]`.
    ///
    /// # Safety
    /// AVX512-BF16 available; no other task accesses those runs meanwhile.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn square16(
        src: &[f32],
        cols: usize,
        (r, c): (usize, usize),
        dst: &SharedBits,
        stride: usize,
    ) {
        let mut v = [_mm512_setzero_ps(); 16];
        for (i, v) in v.iter_mut().enumerate() {
            let row = &src[(r + i) * cols + c..][..16];
            // SAFETY: `row` holds the 16 floats loaded.
            *v = unsafe { _mm512_loadu_ps(row.as_ptr()) };
        }
        for (j, col) in crate::lanes::x86::transpose16(v).into_iter().enumerate() {
            // SAFETY: `run_ptr` checks the run's bounds; exclusivity is the caller's contract.
            unsafe {
                let p = dst.run_ptr((c + j) * stride + r, 16);
                _mm256_storeu_si256(p.cast(), bf16x16(col));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::{rng, values};

    /// Shapes around the GEMM's edges: ragged row tiles (12 rows), token counts of one
    /// 16-lane panel and of 32-lane panels with a short last one, odd token counts (the
    /// weight gradient's padded pair).
    const SHAPES: [(usize, usize, usize); 6] = [
        (2, 2, 1),
        (14, 34, 9),
        (26, 18, 17),
        (40, 64, 33),
        (192, 96, 70),
        (36, 576, 128),
    ];

    /// Whether `got` is within `(2⁻⁷ + 2⁻¹⁵)·Σ|a·b|` (+ a hair) of the f64 product `exact`:
    /// both operands rounded to bf16 (8 significant bits, unit roundoff `u = 2⁻⁸` each) put a
    /// product within `(2u + u²)` of itself, and the f32 sum adds its own rounding.
    fn close(got: f32, exact: f64, magnitude: f64) -> bool {
        (f64::from(got) - exact).abs() <= magnitude * (1.0 / 128.0 + 1.0 / 32768.0) + 1e-6
    }

    /// The kernels this machine can run the products on: the tokens-in-lanes one, and AMX's
    /// tiles where the CPU has them (said when it does not, since then they go untested here).
    fn kernels() -> Vec<bool> {
        if amx_for(Isa::Avx512) {
            vec![false, true]
        } else {
            eprintln!("AMX tiles not tested: this CPU or OS has no AMX-BF16 (or ESPALIER_AMX=0)");
            vec![false]
        }
    }

    #[test]
    fn the_three_products_match_f64_within_bf16_rounding() {
        if !bf16_training_available(Isa::Avx512, 2, 2) {
            eprintln!("skipped: this CPU has no AVX512-BF16, which the bf16 products need");
            return;
        }
        for amx in kernels() {
            products_match_f64(amx);
        }
    }

    /// The body of the test above on one kernel.
    fn products_match_f64(amx: bool) {
        let mut seed = rng(5);
        for (out, inp, n) in SHAPES {
            let w = values(&mut seed, out * inp);
            let x = values(&mut seed, n * inp);
            let dy = values(&mut seed, n * out);
            let mut t = Bf16Training::new(out, inp, Isa::Avx512).expect("available");
            t.amx = amx;
            t.pack(&w);
            // Forward, stored then accumulated onto what it stored (twice the product).
            let mut y = vec![f32::NAN; n * out];
            t.forward(&x, n, &mut y, false);
            let mut y2 = y.clone();
            t.forward(&x, n, &mut y2, true);
            for tk in 0..n {
                for o in 0..out {
                    let terms =
                        (0..inp).map(|i| f64::from(w[o * inp + i]) * f64::from(x[tk * inp + i]));
                    let exact: f64 = terms.clone().sum();
                    let mag: f64 = terms.map(f64::abs).sum();
                    assert!(
                        close(y[tk * out + o], exact, mag),
                        "forward {out}x{inp}x{n} [{tk}][{o}] (amx: {amx})"
                    );
                    assert!(
                        close(y2[tk * out + o], 2.0 * exact, 2.0 * mag),
                        "forward += [{tk}][{o}] (amx: {amx})"
                    );
                }
            }
            // Input gradient.
            let mut dx = vec![f32::NAN; n * inp];
            t.input_grad(&dy, n, &mut dx, false);
            for tk in 0..n {
                for i in 0..inp {
                    let terms =
                        (0..out).map(|o| f64::from(dy[tk * out + o]) * f64::from(w[o * inp + i]));
                    let exact: f64 = terms.clone().sum();
                    let mag: f64 = terms.map(f64::abs).sum();
                    assert!(
                        close(dx[tk * inp + i], exact, mag),
                        "input_grad {out}x{inp}x{n} [{tk}][{i}] (amx: {amx})"
                    );
                }
            }
            // Weight gradient, added to a running sum that already holds something.
            let start = values(&mut seed, out * inp);
            let mut sum = start.clone();
            t.weight_grad(&dy, &x, n, &mut sum);
            for o in 0..out {
                for i in 0..inp {
                    let terms =
                        (0..n).map(|tk| f64::from(dy[tk * out + o]) * f64::from(x[tk * inp + i]));
                    let exact: f64 = terms.clone().sum::<f64>() + f64::from(start[o * inp + i]);
                    let mag: f64 = terms.map(f64::abs).sum();
                    assert!(
                        close(sum[o * inp + i], exact, mag),
                        "weight_grad {out}x{inp}x{n} [{o}][{i}] (amx: {amx})"
                    );
                }
            }
        }
    }

    #[test]
    fn the_copies_are_the_weight_rounded_as_stored_and_transposed() {
        let (out, inp) = (70, 130);
        let mut seed = rng(9);
        let w = values(&mut seed, out * inp);
        let mut t = Bf16Training {
            out,
            inp,
            rows: Vec::new(),
            cols: Vec::new(),
            exec: Exec::auto(),
            amx: false,
        };
        t.pack(&w);
        for o in 0..out {
            for i in 0..inp {
                let b = bf16::from_f32(w[o * inp + i]).to_bits();
                assert_eq!(t.rows[o * inp + i], b);
                assert_eq!(t.cols[i * out + o], b);
            }
        }
        t.pack_forward(&w);
        assert!(t.cols.is_empty() && t.rows.len() == w.len());
    }

    #[test]
    fn odd_dimensions_are_refused() {
        assert!(Bf16Training::new(3, 4, Isa::Avx512).is_none());
        assert!(Bf16Training::new(4, 3, Isa::Avx512).is_none());
        assert!(Bf16Training::new(4, 4, Isa::Portable).is_none());
    }
}
