//! Tokens in the vector lanes, kept weights only: `Y = X · Wᵀ` for an f32 bitmap matrix and
//! 9 to 16 tokens (a batched decode step of that many sequences), one FMA per *kept* weight
//! (AVX-512 with VBMI2).
//!
//! [`crate::lanes`] multiplies every weight of a tile of rows by one column's 16 tokens, and
//! the bitmap's other batched kernels expand its rows and do the same: the dense product's
//! FMAs plus the expansion. At 9 to 16 tokens that ran at 0.88–0.92× the dense matrix's speed
//! (`batch_bench 9,12,16 f32`, SmolLM2's 30 blocks at 50%, 2-core Xeon). Here each row walks
//! its kept entries instead. It loads the kept column's 16 tokens from the token panel and
//! broadcasts the weight from the packed values, so the FMAs are the kept weights' (half the
//! dense count at 50%). The dense tile shares one activation load among 12 rows; this walk
//! pays one per FMA, which the load ports take while the FMA ports do half the work. Measured
//! the same way, six runs: 1.00–1.18× dense.
//!
//! - Each row's kept columns are decoded from its mask into 16-bit column indices just before
//!   its walk: `vpcompressw` of 32 columns' indices per 32-bit mask word, no per-bit branches.
//! - Columns go in blocks whose slice of the token panel (64 bytes a column, each on its own
//!   cache line) stays in L1 while all the rows of a tile of [`ROWS`] walk it: SmolLM2's 576
//!   columns in one block, its 1536 in three.
//! - The walk keeps eight independent accumulators to cover the FMA's latency, and requests the
//!   packed values 4 KiB ahead.
//! - The outputs go through the tokens-in-lanes GEMM's transposing store.
//!
//! Below 9 tokens the bitmap's small-batch tiles stay faster (they multiply 4 tokens per FMA
//! rather than a 16-lane vector mostly empty); past 16, prefill's FMA pipes are busy in the
//! dense tile too, and one load per FMA there ran no faster than the expanded rows.

use crate::isa::Exec;
use crate::lanes::{self, ROWS, TOKENS};
use crate::par::{self, Out};
use std::ops::Range;

/// The parts of an f32 bitmap matrix this product reads (see `BitmapMatrix`): bit `c % 8` of
/// byte `r * stride + c / 8` set where `(r, c)` is kept, row `r`'s kept values from
/// `row_ptr[r]` in column order.
pub(crate) struct KeptRows<'a> {
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub masks: &'a [u8],
    pub row_ptr: &'a [u32],
    pub values: &'a [f32],
}

/// One cache line of a token panel.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Most bytes of token panel (64 a column) a tile's rows walk before moving on to the next
/// columns: SmolLM2's 576 columns (36 KiB) in one block, its 1536 in three of 32 KiB.
const BLOCK_BYTES: usize = 40 * 1024;

/// Whether this product runs here: AVX-512F and VBMI2 (for `vpcompressw`).
pub(crate) fn available(exec: Exec) -> bool {
    lanes::available(exec.isa) && crate::bitmap::vbmi2_expand()
}

/// `Y = X · Wᵀ` (`x`: `[tokens, cols]`, `y`: `[tokens, rows]`, every output written), split
/// over the pool by `exec`. The caller has checked [`available`] and the lengths.
pub(crate) fn gemm(w: &KeptRows<'_>, x: &[f32], tokens: usize, y: Out<'_>, exec: Exec) {
    let (rows, cols) = (w.rows, w.cols);
    assert!(
        x.len() >= tokens * cols
            && y.len() >= tokens * rows
            && w.row_ptr.len() == rows + 1
            && w.masks.len() >= rows * w.stride
            && w.stride * 8 >= cols
            && w.values.len() >= w.row_ptr[rows] as usize
    );
    if rows == 0 || tokens == 0 {
        return;
    }
    if cols == 0 {
        y.init()[..tokens * rows].fill(0.0);
        return;
    }
    assert!(tokens <= 16, "one token panel of 16 lanes");
    // Each column's 16 tokens on a cache line of its own: the walk loads one per FMA, and a
    // vector split over two lines costs two.
    let mut panel = vec![Line([0; 16]); cols];
    // SAFETY: `Line` is 16 u32 words with no padding (size 64, align 64), so the lines are
    // `16 * cols` words, each initialized.
    let words =
        unsafe { std::slice::from_raw_parts_mut(panel.as_mut_ptr().cast::<u32>(), 16 * cols) };
    lanes::pack_f32_into(x, tokens, cols, 16, exec, words);
    let out = y.shared();
    let tiles = rows.div_ceil(ROWS);
    let kept = w.row_ptr[rows] as usize;
    let tasks = par::task_count(exec, tiles, tokens * kept, par::MIN_TASK_FLOPS);
    let bounds = par::even_bounds(tiles, tasks);
    // Column blocks whose slices of the panel stay in L1 while a tile's rows walk them.
    let blocks = (cols * 64).div_ceil(BLOCK_BYTES);
    let block = cols.div_ceil(blocks).next_multiple_of(32);
    par::for_each_bound(&bounds, |range| {
        let mut tile = [[0.0f32; TOKENS]; ROWS];
        // One row's kept columns of a block, from its first; 32 slots of slack for the
        // decode's whole-vector stores.
        let mut columns = vec![0u16; block + 32];
        for t in range {
            let r0 = t * ROWS;
            let nr = ROWS.min(rows - r0);
            let mut next: [usize; ROWS] =
                std::array::from_fn(|i| w.row_ptr[(r0 + i).min(rows)] as usize);
            tile.iter_mut().for_each(|row| row[..16].fill(0.0));
            for c0 in (0..cols).step_by(block) {
                let c1 = (c0 + block).min(cols);
                let slice = &panel[c0..c1];
                for (i, out_row) in tile.iter_mut().take(nr).enumerate() {
                    let r = r0 + i;
                    // A well-formed matrix has exactly `n` values here; never read past the
                    // row.
                    let n = decode_columns(w, r, c0..c1, &mut columns)
                        .min(w.row_ptr[r + 1] as usize - next[i]);
                    let vals = &w.values[next[i]..next[i] + n];
                    // SAFETY: AVX-512F is present (`available`); `decode_columns` wrote
                    // indices from `c0`, each below `c1 - c0`, the slice's length.
                    unsafe { row_dot(vals, &columns[..n], slice, out_row) };
                    next[i] += n;
                }
            }
            // SAFETY: AVX-512F is present (the caller checked `available`); this task owns
            // output rows r0..r0 + nr (its tiles) of every token.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                lanes::x86::store_tile(&tile, nr, tokens, &out, rows, r0, 0, false)
            };
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (&out, &tile);
                unreachable!("the tokens-in-lanes GEMM runs on AVX-512 only");
            }
        }
    });
}

/// Row `r`'s kept columns in `cols` (which starts at a multiple of 32) written into `idx` as
/// indices from `cols.start`, in order; returns how many. `idx` holds `cols.len() + 32`.
fn decode_columns(w: &KeptRows<'_>, r: usize, cols: Range<usize>, idx: &mut [u16]) -> usize {
    let mrow = &w.masks[r * w.stride..][..w.stride];
    assert!(
        cols.start.is_multiple_of(32)
            && cols.end <= w.cols
            && idx.len() >= cols.len() + 32
            && cols.len() <= 1 << 16
    );
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the caller checked AVX-512F and VBMI2 (`available`); the bounds are asserted.
        unsafe { x86::decode_columns(mrow, cols, idx) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut n = 0;
        for c in cols.clone() {
            if mrow[c / 8] >> (c % 8) & 1 == 1 {
                idx[n] = (c - cols.start) as u16;
                n += 1;
            }
        }
        n
    }
}

/// One row's outputs: `Σ vals[i] · panel[idx[i]]` (each a column's 16 tokens) added to
/// `out[..16]`.
///
/// # Safety
/// AVX-512F available, and every index below `panel.len()` (as [`decode_columns`] writes
/// them for the block `panel` is the slice of).
unsafe fn row_dot(vals: &[f32], idx: &[u16], panel: &[Line], out: &mut [f32; TOKENS]) {
    assert!(vals.len() == idx.len());
    debug_assert!(idx.iter().all(|&c| (c as usize) < panel.len()));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the contract: each index is a line of the panel, 16 aligned floats.
        unsafe { x86::row_dot(vals, idx, panel.as_ptr().cast::<u8>(), out) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (vals, idx, panel, out);
        unreachable!("the tokens-in-lanes GEMM runs on AVX-512 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::decode_columns`]: 32 columns per step, `vpcompressw` of their indices under
    /// the mask's 32-bit word, stored whole and the write position moved by its popcount.
    ///
    /// # Safety
    /// AVX-512F, AVX-512BW and VBMI2 available.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub(super) unsafe fn decode_columns(
        mrow: &[u8],
        range: std::ops::Range<usize>,
        idx: &mut [u16],
    ) -> usize {
        let cols = range.end;
        assert!(idx.len() >= range.len() + 32 && mrow.len() * 8 >= cols);
        assert!(range.start.is_multiple_of(32));
        let iota: [u16; 32] = std::array::from_fn(|i| i as u16);
        // SAFETY: reads the 64 bytes of `iota`.
        let mut cur = unsafe { _mm512_loadu_si512(iota.as_ptr().cast()) };
        let advance = _mm512_set1_epi16(32);
        let mut n = 0usize;
        let mut c0 = range.start;
        while c0 < cols {
            let byte = c0 / 8;
            let mut m = match mrow.get(byte..byte + 4) {
                Some(word) => u32::from_le_bytes([word[0], word[1], word[2], word[3]]),
                None => mrow[byte..]
                    .iter()
                    .rev()
                    .fold(0u32, |acc, &b| acc << 8 | b as u32),
            };
            if cols - c0 < 32 {
                m &= (1u32 << (cols - c0)) - 1;
            }
            let packed = _mm512_maskz_compress_epi16(m, cur);
            // SAFETY: n <= c0 - range.start < range.len() here, and idx holds that + 32.
            unsafe { _mm512_storeu_si512(idx.as_mut_ptr().add(n).cast(), packed) };
            n += m.count_ones() as usize;
            cur = _mm512_add_epi16(cur, advance);
            c0 += 32;
        }
        n
    }

    /// [`super::row_dot`]: independent accumulators over the kept entries, summed and added
    /// to `out`.
    ///
    /// # Safety
    /// AVX-512F available; `xp + 64 · idx[i]` readable for 16 floats for every `i`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_dot(
        vals: &[f32],
        idx: &[u16],
        xp: *const u8,
        out: &mut [f32; super::TOKENS],
    ) {
        /// Independent accumulators: the FMA's latency times its ports.
        const ACC: usize = 8;
        /// Values requested ahead of the walk, 4 KiB: they stream from memory, and left to
        /// the hardware prefetcher the walk ran at about a third of its speed.
        const AHEAD: usize = 1024;
        let n = vals.len().min(idx.len());
        let mut acc = [_mm512_setzero_ps(); ACC];
        let mut i = 0;
        // SAFETY: every address is inside the slice (the contract); `i + j < n`; prefetches
        // only form addresses (wrapping) and never fault.
        unsafe {
            while i + ACC <= n {
                _mm_prefetch::<_MM_HINT_T0>(vals.as_ptr().wrapping_add(i + AHEAD).cast::<i8>());
                for (j, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*vals.get_unchecked(i + j));
                    let p = xp
                        .add(64 * *idx.get_unchecked(i + j) as usize)
                        .cast::<f32>();
                    *a = _mm512_fmadd_ps(w, _mm512_load_ps(p), *a);
                }
                i += ACC;
            }
            for (j, a) in acc.iter_mut().enumerate().take(n - i) {
                let w = _mm512_set1_ps(*vals.get_unchecked(i + j));
                let p = xp
                    .add(64 * *idx.get_unchecked(i + j) as usize)
                    .cast::<f32>();
                *a = _mm512_fmadd_ps(w, _mm512_load_ps(p), *a);
            }
            let s01 = _mm512_add_ps(acc[0], acc[1]);
            let s23 = _mm512_add_ps(acc[2], acc[3]);
            let s45 = _mm512_add_ps(acc[4], acc[5]);
            let s67 = _mm512_add_ps(acc[6], acc[7]);
            let s = _mm512_add_ps(_mm512_add_ps(s01, s23), _mm512_add_ps(s45, s67));
            let o = out.as_mut_ptr();
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::BitmapMatrix;
    use crate::element::{Dtype, Values};
    use crate::isa::Isa;
    use crate::testutil;

    /// Against the f64 reference: one block and several (1400 columns: three, ragged), rows
    /// not a whole number of tiles, empty and full rows, every token count the bitmap sends
    /// here, one thread and split; and the bitmap's own product takes this path for them.
    #[test]
    fn kept_walk_matches_reference() {
        let exec = Exec::auto();
        if !available(exec) {
            eprintln!("skipped: this CPU lacks AVX-512 with VBMI2, which this kernel needs");
            return;
        }
        let mut rng = testutil::rng(77);
        for &(rows, cols) in &[(7, 33), (13, 640), (29, 1400), (12, 576)] {
            for density in [0.0, 0.04, 0.5, 1.0] {
                let w = testutil::unstructured(&mut rng, rows, cols, density);
                let m = BitmapMatrix::from_dense(&w, rows, cols, Dtype::F32).expect("pack");
                let Values::F32(values) = &m.values else {
                    panic!("f32 storage")
                };
                let kept = KeptRows {
                    rows,
                    cols,
                    stride: m.stride,
                    masks: &m.masks,
                    row_ptr: &m.row_ptr,
                    values,
                };
                for tokens in [9, 13, 16] {
                    let x = testutil::values(&mut rng, tokens * cols);
                    let (want, mag) = testutil::reference(&w, rows, cols, &x, tokens);
                    let ctx = format!("{rows}x{cols} density {density} tokens {tokens}");
                    for parallel in [false, true] {
                        let exec = Exec {
                            isa: Isa::Avx512,
                            parallel,
                        };
                        let mut y = vec![f32::NAN; tokens * rows];
                        gemm(&kept, &x, tokens, Out::Init(&mut y), exec);
                        testutil::assert_close(&y, &want, &mag, &format!("{ctx} {exec:?}"));
                        let mut routed = vec![f32::NAN; tokens * rows];
                        m.gemm(&x, tokens, &mut routed, exec).expect("gemm");
                        assert_eq!(routed, y, "{ctx}: the bitmap's gemm takes this walk");
                    }
                }
            }
        }
    }

    /// A decode stops at its range's end even where the mask has bits past it (the next
    /// block's columns, or bits past the last column, which `from_parts` refuses anyway), so
    /// no index can leave the block's slice of the panel.
    #[test]
    fn decode_stops_at_the_range_end() {
        if !available(Exec::auto()) {
            eprintln!("skipped: this CPU lacks AVX-512 with VBMI2, which this kernel needs");
            return;
        }
        // One row of 40 columns, 8 mask bytes: columns 0, 31, 32 and 39 kept, and bits 40
        // and 63 set past the end.
        let mut masks = vec![0u8; 8];
        for c in [0usize, 31, 32, 39, 40, 63] {
            masks[c / 8] |= 1 << (c % 8);
        }
        let w = KeptRows {
            rows: 1,
            cols: 40,
            stride: 8,
            masks: &masks,
            row_ptr: &[0, 4],
            values: &[1.0; 4],
        };
        let mut idx = vec![u16::MAX; 40 + 32];
        assert_eq!(decode_columns(&w, 0, 0..40, &mut idx), 4);
        assert_eq!(&idx[..4], &[0, 31, 32, 39]);
        assert_eq!(decode_columns(&w, 0, 32..36, &mut idx), 1);
        assert_eq!(idx[0], 0, "from the range's first column");
    }
}
