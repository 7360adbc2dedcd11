//! Batched decode steps of bf16 weights on AMX tiles: the tokens-in-lanes GEMM
//! ([`crate::lanes`]) with the weights as the tiles' A operand, read where they lie.
//!
//! A decode step of 3 to 16 sequences multiplies every weight by at most 16 tokens. On
//! AVX512-BF16 that is one `vdpbf16ps` per weight pair and 16 tokens, which on an Intel Xeon
//! with AMX runs at about half its f32 FMA's rate: the dense bf16 block products of a
//! 3-16-sequence step took 21-24 ms there (`batch_bench`), compute bound. One `tdpbf16ps`
//! multiplies 16 weight rows × 32 columns by the same 16 tokens, 8192 multiply-adds, so on
//! the tiles the same products take 17.5-18.5 ms and the step is bound by moving the weights.
//!
//! Operands: the prefill GEMM ([`crate::gemm_bf16`]) makes the weights the B operand, which
//! needs them repacked into pair panels per call, paid back over 32 tokens at a time. Here
//! the roles swap, as in [`crate::lanes`]: an A tile is 16 weight rows × 32 columns loaded
//! with the row length as stride (no copy of dense weights), and the B tile is 16 pair-rows
//! of the 16-lane bf16 token panel that [`crate::lanes::pack_bf16`] already builds
//! (`panel[k * 16 + t]`: exactly AMX's pair layout). The accumulators are 16 rows × 16
//! tokens, transposed in registers on the way out (`lanes::x86::transpose16`). Four row
//! groups (64 rows) share each B tile. A block's 64 row streams are more than the hardware
//! prefetcher follows, so each task requests its next block into L2 while it multiplies
//! this one, and its first block all at once.
//!
//! A bitmap matrix ([`bitmap_gemm`]) expands each step's 64 rows × 32 columns from its
//! packed values into an L1 buffer the A tiles load (one `vpexpandw` per row and step), and
//! rows written on demand (`Weights::Bf16Rows`) go through a buffer of whole rows. int8
//! weights, dense ([`i8_gemm`]) or bitmap, are widened to bf16 step by step into the same kind
//! of L1 buffer (exact: every int8 is a bf16), each output row scaled once after its sum.
//!
//! The products are the same bf16 products with f32 accumulation as [`crate::lanes`]'s; only
//! the order of the additions differs.

use crate::amx::{self, ROW_GROUPS, TILE, Tiles};
use crate::isa::Exec;
use crate::lanes::Weights;
use crate::par::{self, Out, SharedOut};
use half::bf16;
use half::slice::HalfBitsSliceExt;

/// Weight rows per block: one accumulator tile per row group.
const BLOCK_ROWS: usize = ROW_GROUPS * TILE;
/// Columns per A tile (two per pair, [`amx::PAIRS`] pairs).
const TILE_COLS: usize = 2 * amx::PAIRS;
/// bf16 values of one reduction step's expanded or widened rows (an L1 buffer slot).
const STEP_VALUES: usize = BLOCK_ROWS * TILE_COLS;
/// Slots of the step buffer: int8 steps are widened two at a time (64 columns: one
/// `vpexpandb`, one table lookup), into one pair of slots while the tiles read the other.
const SLOTS: usize = 4;

/// Whether a bf16 product of `tokens` tokens over `cols` columns runs here: AMX enabled, one
/// 16-lane token panel, whole A tiles of columns (the caller has checked
/// [`crate::lanes::available_bf16`]).
pub(crate) fn takes(cols: usize, tokens: usize) -> bool {
    tokens <= TILE && cols > 0 && cols.is_multiple_of(TILE_COLS) && amx::enabled()
}

/// [`takes`] for int8 weights, which are widened by byte table lookups (AVX512-VBMI: every
/// CPU with AMX has it).
pub(crate) fn takes_i8(cols: usize, tokens: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        takes(cols, tokens) && std::arch::is_x86_feature_detected!("avx512vbmi")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (cols, tokens);
        false
    }
}

/// [`crate::lanes::gemm_panels`] for bf16 weights (`Bf16` or `Bf16Rows`) on AMX: `panel` is
/// the 16-lane bf16 token panel of `tokens ≤ 16` tokens, `out` is `[tokens, rows]`, stored
/// into or, with `accumulate`, added to. The caller has checked [`takes`].
///
/// # Panics
/// On F32 weights or a short panel or output (a caller's bug).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_panels(
    w: Weights<'_>,
    rows: usize,
    cols: usize,
    panel: &[u32],
    tokens: usize,
    out: SharedOut,
    accumulate: bool,
    exec: Exec,
) {
    let k_tiles = cols / TILE_COLS;
    for_each_block(rows, cols, panel, tokens, exec, || {
        // Rows written on demand (`Bf16Rows`), and a dense matrix's last partial block,
        // zero-padded to whole row groups.
        let mut written = Vec::new();
        move |tiles: &Tiles, b: usize, first: bool, last: bool, c: &mut Acc| {
            let r0 = b * BLOCK_ROWS;
            let nr = BLOCK_ROWS.min(rows - r0);
            let (a, next): (&[u16], &[u16]) = match w {
                Weights::Bf16(bits) if nr == BLOCK_ROWS => {
                    dense_block(bits, rows, cols, r0, (first, last))
                }
                Weights::Bf16(bits) => {
                    written.clear();
                    written.extend_from_slice(&bits[r0 * cols..(r0 + nr) * cols]);
                    written.resize(BLOCK_ROWS * cols, 0);
                    (&written[..], &[][..])
                }
                Weights::Bf16Rows(write, _) => {
                    written.resize(BLOCK_ROWS * cols, 0);
                    let rows_out = written[..nr * cols].reinterpret_cast_mut::<bf16>();
                    for (i, row) in rows_out.chunks_exact_mut(cols).enumerate() {
                        write(r0 + i, row);
                    }
                    written[nr * cols..].fill(0);
                    (&written[..], &[][..])
                }
                Weights::F32(_) | Weights::F32Rows(_) => {
                    unreachable!("f32 weights do not run on the bf16 tiles")
                }
            };
            let ahead = Prefetch::new(next, k_tiles);
            tiles.rows_zero();
            for k in 0..k_tiles {
                ahead.step(k);
                // SAFETY: `a` holds BLOCK_ROWS = ROW_GROUPS · TILE rows of `cols` =
                // k_tiles · TILE_COLS values; the panel holds cols / 2 · TILE pairs
                // (`for_each_block` checks it).
                unsafe { tiles.rows_step(a[k * TILE_COLS..].as_ptr(), cols, panel_step(panel, k)) };
            }
            tiles.rows_store(c);
            let scales = match w {
                Weights::Bf16Rows(_, scales) => scales.map(|s| &s[r0..r0 + nr]),
                _ => None,
            };
            store_block(c, nr, tokens, scales, &out, rows, r0, accumulate);
        }
    });
}

/// Stored weights as the tiles take them: bf16 bits, or int8 with one scale per row. int8
/// values are widened to bf16 on their way into the tiles (every int8 is exact in bf16) and
/// each output row is scaled once after its sum, as the int8 kernels scale their row sums.
#[derive(Clone, Copy)]
pub(crate) enum Packed<'a> {
    Bf16(&'a [u16]),
    I8 { q: &'a [i8], scales: &'a [f32] },
}

impl<'a> Packed<'a> {
    /// The row scales, for int8.
    fn scales(self) -> Option<&'a [f32]> {
        match self {
            Packed::Bf16(_) => None,
            Packed::I8 { scales, .. } => Some(scales),
        }
    }

    /// A request into L2 for stored values `range`, spread over `steps` reduction steps.
    fn prefetch(self, range: std::ops::Range<usize>, steps: usize) -> Prefetch {
        match self {
            Packed::Bf16(v) => Prefetch::new(&v[range], steps),
            Packed::I8 { q, .. } => Prefetch::new(&q[range], steps),
        }
    }
}

/// A bitmap matrix as [`bitmap_gemm`] reads it (`BitmapMatrix`'s fields): `stride` mask
/// bytes per row (bit `c % 8` of byte `c / 8` keeps column `c`), row `r`'s kept values at
/// `row_ptr[r]..row_ptr[r + 1]` of `vals` in column order.
pub(crate) struct BitmapRows<'a> {
    pub rows: usize,
    pub cols: usize,
    pub stride: usize,
    pub masks: &'a [u8],
    pub row_ptr: &'a [u32],
    pub vals: Packed<'a>,
}

/// `Y = X·Wᵀ` for a bf16 or int8 bitmap matrix on AMX, a decode step of up to 16 tokens:
/// each reduction step's 64 rows × 32 columns are expanded from the packed values (a masked
/// load and one `vpexpandw`, or `vpexpandb` and a widening to bf16, per row) into an L1
/// buffer that the A tiles load, so the kept weights go from memory to the tiles without a
/// dense copy in L2 (expanding whole rows first, through `Weights::Bf16Rows`, wrote and
/// re-read 64 rows × `cols` per block). `x: [tokens, cols]`, `y: [tokens, rows]` (every
/// element written). The caller has checked [`takes`] (int8: [`takes_i8`]), AVX512-BF16 and
/// VBMI2, and the lengths.
pub(crate) fn bitmap_gemm(m: &BitmapRows<'_>, x: &[f32], tokens: usize, y: Out<'_>, exec: Exec) {
    let (rows, cols) = (m.rows, m.cols);
    assert!(m.stride * 8 >= cols && m.masks.len() >= rows * m.stride && m.row_ptr.len() > rows);
    let panel = crate::lanes::pack_bf16(x, tokens, cols, TILE, exec);
    let panel = &panel[..];
    let out = y.shared();
    let k_tiles = cols / TILE_COLS;
    for_each_block(rows, cols, panel, tokens, exec, || {
        // Steps' expanded rows in a ring of slots, so a step's expansion need not wait for
        // the last step's tile loads.
        let mut bufs = vec![0u16; SLOTS * STEP_VALUES];
        let mut cursors = [0usize; BLOCK_ROWS];
        move |tiles: &Tiles, b: usize, first: bool, last: bool, c: &mut Acc| {
            let r0 = b * BLOCK_ROWS;
            let nr = BLOCK_ROWS.min(rows - r0);
            for (cur, &p) in cursors.iter_mut().zip(&m.row_ptr[r0..r0 + nr]) {
                *cur = p as usize;
            }
            if nr < BLOCK_ROWS {
                // Rows past the matrix multiply as zeros.
                bufs.fill(0);
            }
            // The next block's masks and values, requested into L2 while this one runs.
            let (next_masks, next_vals) = if last {
                (&[][..], 0..0)
            } else {
                let end = rows.min(r0 + nr + BLOCK_ROWS);
                let (v0, v1) = (m.row_ptr[r0 + nr] as usize, m.row_ptr[end] as usize);
                (&m.masks[(r0 + nr) * m.stride..end * m.stride], v0..v1)
            };
            let masks = &m.masks[r0 * m.stride..(r0 + nr) * m.stride];
            if first {
                // Nothing requested this block ahead: ask for all of it now (its 64 rows'
                // values are 64 streams, more than the hardware prefetcher follows; measured
                // 24.4-25.7 against 25.5-26.6 ms per 16-sequence Wanda step without).
                let (v0, v1) = (m.row_ptr[r0] as usize, m.row_ptr[r0 + nr] as usize);
                m.vals.prefetch(v0..v1, 1).step(0);
                Prefetch::new(masks, 1).step(0);
            }
            let ahead_vals = m.vals.prefetch(next_vals, k_tiles);
            let ahead_masks = Prefetch::new(next_masks, k_tiles);
            tiles.rows_zero();
            for k in 0..k_tiles {
                ahead_vals.step(k);
                ahead_masks.step(k);
                let slot = (k % SLOTS) * STEP_VALUES;
                match m.vals {
                    Packed::Bf16(v) => {
                        let buf = &mut bufs[slot..][..STEP_VALUES];
                        expand_step(masks, m.stride, v, &mut cursors[..nr], k, buf);
                    }
                    Packed::I8 { q, .. } if k % 2 == 0 => {
                        // This step and the next, as one 64-column expansion.
                        let steps = if k + 1 < k_tiles { 2 } else { 1 };
                        let buf = &mut bufs[slot..][..2 * STEP_VALUES];
                        expand_steps_i8(masks, m.stride, q, &mut cursors[..nr], k, steps, buf);
                    }
                    Packed::I8 { .. } => {}
                }
                let buf = &bufs[slot..][..STEP_VALUES];
                // SAFETY: `buf` holds BLOCK_ROWS rows of TILE_COLS values; the panel holds
                // cols / 2 · TILE pairs (`for_each_block` checks it).
                unsafe { tiles.rows_step(buf.as_ptr(), TILE_COLS, panel_step(panel, k)) };
            }
            tiles.rows_store(c);
            let scales = m.vals.scales().map(|s| &s[r0..r0 + nr]);
            store_block(c, nr, tokens, scales, &out, rows, r0, false);
        }
    });
}

/// `Y = X·Wᵀ` for dense int8 weights (`q: [rows, cols]`, one scale per row) on AMX, a decode
/// step of up to 16 tokens: each pair of reduction steps' 64 rows × 64 columns are widened
/// to bf16 (exact, by table: `x86::Widen`) into an L1 buffer that the A tiles load, and each
/// output row is scaled once. Half
/// the bytes of bf16 weights come from memory; writing whole rows first (`Weights::Bf16Rows`)
/// wrote and re-read 64 rows × `cols` bf16 per block through L2 and took longer than bf16's
/// whole step. `x: [tokens, cols]`, `y: [tokens, rows]` (every element written). The caller
/// has checked [`takes_i8`], AVX512-BF16 and the lengths.
#[allow(clippy::too_many_arguments)]
pub(crate) fn i8_gemm(
    q: &[i8],
    scales: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: Out<'_>,
    exec: Exec,
) {
    assert!(q.len() >= rows * cols && scales.len() >= rows);
    let panel = crate::lanes::pack_bf16(x, tokens, cols, TILE, exec);
    let panel = &panel[..];
    let out = y.shared();
    let k_tiles = cols / TILE_COLS;
    for_each_block(rows, cols, panel, tokens, exec, || {
        // Steps' widened rows in a ring of slots, as the bitmap's expansion does.
        let mut bufs = vec![0u16; SLOTS * STEP_VALUES];
        move |tiles: &Tiles, b: usize, first: bool, last: bool, c: &mut Acc| {
            let r0 = b * BLOCK_ROWS;
            let nr = BLOCK_ROWS.min(rows - r0);
            if nr < BLOCK_ROWS {
                // Rows past the matrix multiply as zeros.
                bufs.fill(0);
            }
            let (block, next) = dense_block(q, rows, cols, r0, (first, last));
            let ahead = Prefetch::new(next, k_tiles);
            tiles.rows_zero();
            for k in 0..k_tiles {
                ahead.step(k);
                let slot = (k % SLOTS) * STEP_VALUES;
                if k % 2 == 0 {
                    // This step and the next, widened together.
                    let steps = if k + 1 < k_tiles { 2 } else { 1 };
                    widen_steps(
                        block,
                        cols,
                        nr,
                        k,
                        steps,
                        &mut bufs[slot..][..2 * STEP_VALUES],
                    );
                }
                let buf = &bufs[slot..][..STEP_VALUES];
                // SAFETY: `buf` holds BLOCK_ROWS rows of TILE_COLS values; the panel holds
                // cols / 2 · TILE pairs (`for_each_block` checks it).
                unsafe { tiles.rows_step(buf.as_ptr(), TILE_COLS, panel_step(panel, k)) };
            }
            tiles.rows_store(c);
            store_block(
                c,
                nr,
                tokens,
                Some(&scales[r0..r0 + nr]),
                &out,
                rows,
                r0,
                false,
            );
        }
    });
}

/// The accumulators of one block as stored: [`ROW_GROUPS`] tiles of 16 rows × 16 tokens.
type Acc = [f32; ROW_GROUPS * TILE * TILE];

/// Splits the [`BLOCK_ROWS`]-row blocks over the pool; each task loads the tile
/// configuration, makes its block runner (`make`: its buffers) and runs it over its blocks in
/// order, telling it which is its first (nothing was requested ahead for it) and its last
/// (nothing to request ahead).
fn for_each_block<F, R>(rows: usize, cols: usize, panel: &[u32], tokens: usize, exec: Exec, make: F)
where
    F: Fn() -> R + Sync,
    R: FnMut(&Tiles, usize, bool, bool, &mut Acc),
{
    assert!(tokens <= TILE && cols.is_multiple_of(TILE_COLS));
    assert!(panel.len() >= cols / 2 * TILE);
    let blocks = rows.div_ceil(BLOCK_ROWS);
    // The tiles multiply 16 lanes whatever the tokens: count that work.
    let tasks = par::task_count(exec, blocks, TILE * rows * cols, par::MIN_TASK_FLOPS);
    let bounds = par::even_bounds(blocks, tasks);
    par::for_each_bound(&bounds, |range| {
        let Some(tiles) = Tiles::configure() else {
            unreachable!("the caller checked amx::enabled(), so the tiles are there");
        };
        let mut run = make();
        let mut c = [0f32; ROW_GROUPS * TILE * TILE];
        let last = range.end.saturating_sub(1);
        let range_start = range.start;
        for b in range {
            run(&tiles, b, b == range_start, b == last, &mut c);
        }
    });
}

/// Reduction step `k`'s B tile: pair-rows `16k..16k + 16` of the 16-lane panel.
fn panel_step(panel: &[u32], k: usize) -> *const u32 {
    panel[k * amx::PAIRS * TILE..][..amx::PAIRS * TILE].as_ptr()
}

/// Block `r0` of a row-major `[rows, cols]` matrix read in place (its rows `r0..r0 + 64`, fewer
/// at the end), and the task's next block, which the caller requests into L2 while this one
/// runs: its 64 row streams are more than the hardware prefetcher follows (without it a
/// 16-sequence step's dense bf16 block products took 24.5-25.3 ms, with it 18.3-19.2,
/// `batch_bench` on a 2-core Xeon). A task's first block, which nothing requested ahead, is
/// requested whole at once here (25.2-25.8 against 27.3-30.1 ms per 16-sequence dense step
/// without). `(first, last)`: the block's place in its task's run; the last has no next.
fn dense_block<T>(
    w: &[T],
    rows: usize,
    cols: usize,
    r0: usize,
    (first, last): (bool, bool),
) -> (&[T], &[T]) {
    let end = rows.min(r0 + BLOCK_ROWS);
    let block = &w[r0 * cols..end * cols];
    if first {
        Prefetch::new(block, 1).step(0);
    }
    let next = if last {
        &[][..]
    } else {
        &w[end * cols..rows.min(end + BLOCK_ROWS) * cols]
    };
    (block, next)
}

/// Requests a run of memory into L2 over a block's reduction steps, an equal share of its
/// lines at each.
struct Prefetch {
    start: *const u8,
    lines: usize,
    per_step: usize,
}

impl Prefetch {
    fn new<T>(run: &[T], steps: usize) -> Prefetch {
        let lines = size_of_val(run).div_ceil(64);
        Prefetch {
            start: run.as_ptr().cast(),
            lines,
            per_step: lines.div_ceil(steps.max(1)),
        }
    }

    fn step(&self, k: usize) {
        for line in k * self.per_step..self.lines.min((k + 1) * self.per_step) {
            prefetch_l2(self.start.wrapping_add(64 * line));
        }
    }
}

/// Requests the 64-byte line at `p` into L2 (never faults; `p` need not be valid).
#[inline]
fn prefetch_l2(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetches never fault, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Expands reduction step `k` (columns `32k..32k + 32`) of the block's bf16 rows into `buf`,
/// row `i` at `32i`: row `i`'s mask is at `masks[i * stride..]`, its next packed value at
/// `vals[cursors[i]]`, which moves past the step's kept values.
fn expand_step(
    masks: &[u8],
    stride: usize,
    vals: &[u16],
    cursors: &mut [usize],
    k: usize,
    buf: &mut [u16],
) {
    assert!(cursors.len() <= BLOCK_ROWS && buf.len() >= cursors.len() * TILE_COLS);
    assert!(masks.len() >= cursors.len() * stride && stride >= 4 * (k + 1));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked AVX-512 and VBMI2 (`bitmap_gemm`'s contract); the asserts
    // bound the mask reads and the stores; each masked load reads the step's popcount of
    // values from the cursor, all within the row's (the bitmap's pointers are checked when it
    // is built or loaded).
    unsafe {
        x86::expand_step(
            masks.as_ptr(),
            stride,
            vals.as_ptr(),
            cursors,
            k,
            buf.as_mut_ptr(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (vals, buf);
        unreachable!("no AMX tiles off x86-64");
    }
}

/// [`expand_step`] for int8 values, `steps` (1 or 2) reduction steps from `k` at once (one
/// mask word of 32 or 64 bits per row), widened to bf16: step `k + s` into
/// `buf[s * STEP_VALUES..]`, row `i` at `32i`.
fn expand_steps_i8(
    masks: &[u8],
    stride: usize,
    vals: &[i8],
    cursors: &mut [usize],
    k: usize,
    steps: usize,
    buf: &mut [u16],
) {
    assert!((1..=2).contains(&steps) && buf.len() >= steps * STEP_VALUES);
    assert!(cursors.len() <= BLOCK_ROWS);
    assert!(masks.len() >= cursors.len() * stride && stride >= 4 * (k + steps));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked AVX-512, VBMI, VBMI2 and AVX512-BF16 (`bitmap_gemm`'s
    // contract, `takes_i8`); the asserts bound the mask reads and the stores; each masked load
    // reads the steps' popcount of values from the cursor, all within the row's.
    unsafe {
        x86::expand_steps_i8(
            masks.as_ptr(),
            stride,
            vals.as_ptr(),
            cursors,
            k,
            steps == 2,
            buf.as_mut_ptr(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (vals, buf);
        unreachable!("no AMX tiles off x86-64");
    }
}

/// Widens `steps` (1 or 2) reduction steps from `k` (columns `32k..32k + 32·steps`) of the
/// first `nr` rows of an int8 block (`block`: rows of `cols` values) into `buf` as bf16:
/// step `k + s` at `buf[s * STEP_VALUES..]`, row `i` at `32i`.
fn widen_steps(block: &[i8], cols: usize, nr: usize, k: usize, steps: usize, buf: &mut [u16]) {
    assert!((1..=2).contains(&steps) && buf.len() >= steps * STEP_VALUES);
    assert!(nr <= BLOCK_ROWS && block.len() >= nr * cols && cols >= TILE_COLS * (k + steps));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked AVX-512, VBMI and AVX512-BF16 (`i8_gemm`'s contract,
    // `takes_i8`); the asserts bound the reads (32 · steps bytes from column 32k of each row)
    // and the stores.
    unsafe {
        x86::widen_steps(block.as_ptr(), cols, nr, k, steps == 2, buf.as_mut_ptr())
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (block, cols, nr, k, steps, buf);
        unreachable!("no AMX tiles off x86-64");
    }
}

/// Writes a block's accumulators (`c[g][m][t]`, rows `r0 + 16g + m`) into `out`
/// (`[tokens, rows]`), each row scaled by `scales[16g + m]` when given: per row group, the 16
/// × 16 tile transposed in registers and each token's row run stored (or added) at once.
#[allow(clippy::too_many_arguments)]
fn store_block(
    c: &[f32; ROW_GROUPS * TILE * TILE],
    nr: usize,
    tokens: usize,
    scales: Option<&[f32]>,
    out: &SharedOut,
    rows: usize,
    r0: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX implies AVX-512F (the caller checked `lanes::available_bf16`); this task owns
    // output rows r0..r0 + nr of every token.
    unsafe {
        x86::store_block(c, nr, tokens, scales, out, rows, r0, accumulate)
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (c, nr, tokens, scales, out, rows, r0, accumulate);
        unreachable!("no AMX tiles off x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ROW_GROUPS, STEP_VALUES, TILE, TILE_COLS};
    use crate::lanes::x86::transpose16;
    use crate::par::SharedOut;
    use std::arch::x86_64::*;

    /// See [`super::expand_step`]: per row, the step's 32-bit mask word, a masked load of its
    /// popcount of packed values and one `vpexpandw` into the row's 64 bytes.
    ///
    /// # Safety
    /// AVX-512F/BW and VBMI2; `masks` readable for `cursors.len()` rows of `stride` bytes
    /// (`stride ≥ 4k + 4`), `vals` for every row's values from its cursor, `buf` writable for
    /// `cursors.len()` rows of [`TILE_COLS`] values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub(super) unsafe fn expand_step(
        masks: *const u8,
        stride: usize,
        vals: *const u16,
        cursors: &mut [usize],
        k: usize,
        buf: *mut u16,
    ) {
        for (i, cur) in cursors.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            unsafe {
                let m = masks.add(i * stride + 4 * k).cast::<u32>().read_unaligned();
                let n = m.count_ones();
                let load = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
                let packed = _mm512_maskz_loadu_epi16(load, vals.add(*cur).cast());
                let dense = _mm512_maskz_expand_epi16(m, packed);
                _mm512_storeu_si512(buf.add(TILE_COLS * i).cast::<__m512i>(), dense);
                *cur += n as usize;
            }
        }
    }

    /// See [`super::expand_steps_i8`]: per row, the steps' mask word (32 or 64 bits), a masked
    /// load of its popcount of bytes, one `vpexpandb`, and the bytes widened to bf16
    /// ([`Widen`]).
    ///
    /// # Safety
    /// AVX-512F/BW, VBMI, VBMI2 and AVX512-BF16; `masks` readable for `cursors.len()` rows of
    /// `stride` bytes (`stride ≥ 4k + 4`, `+ 8` for two steps), `vals` for every row's values
    /// from its cursor, `buf` writable for one or two slots of [`STEP_VALUES`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vbmi2,popcnt")]
    pub(super) unsafe fn expand_steps_i8(
        masks: *const u8,
        stride: usize,
        vals: *const i8,
        cursors: &mut [usize],
        k: usize,
        two: bool,
        buf: *mut u16,
    ) {
        let widen = Widen::new();
        for (i, cur) in cursors.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            unsafe {
                let at = masks.add(i * stride + 4 * k);
                let m = if two {
                    at.cast::<u64>().read_unaligned()
                } else {
                    u64::from(at.cast::<u32>().read_unaligned())
                };
                let n = m.count_ones();
                let load = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                let packed = _mm512_maskz_loadu_epi8(load, vals.add(*cur));
                let (first, second) = widen.bytes(_mm512_maskz_expand_epi8(m, packed));
                _mm512_storeu_si512(buf.add(TILE_COLS * i).cast::<__m512i>(), first);
                if two {
                    let next = buf.add(STEP_VALUES + TILE_COLS * i);
                    _mm512_storeu_si512(next.cast::<__m512i>(), second);
                }
                *cur += n as usize;
            }
        }
    }

    /// See [`super::widen_steps`].
    ///
    /// # Safety
    /// AVX-512F/BW and VBMI; `block` readable for `nr` rows of `cols ≥ 32k + 32` bytes (`+ 64`
    /// for two steps), `buf` writable for one or two slots of [`STEP_VALUES`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn widen_steps(
        block: *const i8,
        cols: usize,
        nr: usize,
        k: usize,
        two: bool,
        buf: *mut u16,
    ) {
        let widen = Widen::new();
        let load = if two { u64::MAX } else { u64::from(u32::MAX) };
        for i in 0..nr {
            // SAFETY: the caller's contract; the masked load reads the steps' bytes only.
            unsafe {
                let v = _mm512_maskz_loadu_epi8(load, block.add(i * cols + TILE_COLS * k));
                let (first, second) = widen.bytes(v);
                _mm512_storeu_si512(buf.add(TILE_COLS * i).cast::<__m512i>(), first);
                if two {
                    let next = buf.add(STEP_VALUES + TILE_COLS * i);
                    _mm512_storeu_si512(next.cast::<__m512i>(), second);
                }
            }
        }
    }

    /// The high and low bytes of the bf16 of `0..128` (every one exact), for table lookups.
    const fn bf16_bytes(high: bool) -> [u8; 128] {
        let mut t = [0u8; 128];
        let mut a = 0;
        while a < 128 {
            let bits = ((a as f32).to_bits() >> 16) as u16;
            t[a] = if high { (bits >> 8) as u8 } else { bits as u8 };
            a += 1;
        }
        t
    }
    static BF16_HIGH: [u8; 128] = bf16_bytes(true);
    static BF16_LOW: [u8; 128] = bf16_bytes(false);

    /// The byte order that makes `vpunpck{l,h}bw`, which interleave within 128-bit lanes,
    /// yield columns 0..32 and 32..64 in order: lane `L`'s low 8 bytes are columns
    /// `8L..8L + 8`, its high 8 columns `32 + 8L..`.
    const fn unpack_order() -> [u8; 64] {
        let mut p = [0u8; 64];
        let mut lane = 0;
        while lane < 4 {
            let mut j = 0;
            while j < 8 {
                p[16 * lane + j] = (8 * lane + j) as u8;
                p[16 * lane + 8 + j] = (32 + 8 * lane + j) as u8;
                j += 1;
            }
            lane += 1;
        }
        p
    }
    static UNPACK_ORDER: [u8; 64] = unpack_order();

    /// int8 to bf16 by table, 64 values at a time: each byte's magnitude looks up the high
    /// and low byte of its bf16 (`vpermi2b`, 128 entries), the sign goes into the high byte,
    /// and the two are interleaved into words. Exact for `-127..=127`, the only values int8
    /// weights hold (checkpoints with -128 are refused when loaded). About a third of the
    /// instructions of widening through f32 (`vpmovsxbd`, `vcvtdq2ps`, `vcvtne2ps2bf16`),
    /// which bounded the int8 bitmap's 16-token steps.
    struct Widen {
        order: __m512i,
        high: [__m512i; 2],
        low: [__m512i; 2],
        sign: __m512i,
    }

    impl Widen {
        #[target_feature(enable = "avx512f")]
        fn new() -> Widen {
            // SAFETY: each load reads 64 bytes of a static of at least that size.
            unsafe {
                let load = |p: *const u8| _mm512_loadu_si512(p.cast::<__m512i>());
                Widen {
                    order: load(UNPACK_ORDER.as_ptr()),
                    high: [load(BF16_HIGH.as_ptr()), load(BF16_HIGH.as_ptr().add(64))],
                    low: [load(BF16_LOW.as_ptr()), load(BF16_LOW.as_ptr().add(64))],
                    sign: _mm512_set1_epi8(i8::MIN),
                }
            }
        }

        /// The 64 int8 values of `v` (column order) as bf16: columns 0..32, then 32..64.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        fn bytes(&self, v: __m512i) -> (__m512i, __m512i) {
            let v = _mm512_permutexvar_epi8(self.order, v);
            let magnitude = _mm512_abs_epi8(v);
            let high = _mm512_permutex2var_epi8(self.high[0], magnitude, self.high[1]);
            let low = _mm512_permutex2var_epi8(self.low[0], magnitude, self.low[1]);
            // high | (v & 0x80): the sign bit.
            let high = _mm512_ternarylogic_epi32::<0xF8>(high, v, self.sign);
            (
                _mm512_unpacklo_epi8(low, high),
                _mm512_unpackhi_epi8(low, high),
            )
        }
    }

    /// See [`super::store_block`].
    ///
    /// # Safety
    /// AVX-512F available; the calling task owns output rows `r0..r0 + nr` of every token.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_block(
        c: &[f32; ROW_GROUPS * TILE * TILE],
        nr: usize,
        tokens: usize,
        scales: Option<&[f32]>,
        out: &SharedOut,
        rows: usize,
        r0: usize,
        accumulate: bool,
    ) {
        assert!(tokens <= TILE && nr <= ROW_GROUPS * TILE);
        for g in 0..nr.div_ceil(TILE) {
            let n = TILE.min(nr - g * TILE);
            let mask = ((1u32 << n) - 1) as __mmask16;
            let tile = &c[g * TILE * TILE..][..TILE * TILE];
            let mut lanes = [_mm512_setzero_ps(); TILE];
            for (v, row) in lanes.iter_mut().zip(tile.chunks_exact(TILE)) {
                // SAFETY: `row` holds the 16 floats loaded.
                *v = unsafe { _mm512_loadu_ps(row.as_ptr()) };
            }
            let scale = scales.map(|s| {
                // SAFETY: the masked load reads the group's `n` scales only.
                unsafe { _mm512_maskz_loadu_ps(mask, s[g * TILE..].as_ptr()) }
            });
            for (t, &v) in transpose16(lanes).iter().enumerate().take(tokens) {
                let v = scale.map_or(v, |s| _mm512_mul_ps(v, s));
                // SAFETY: `run_ptr` checks the run's bounds; the masked load and store touch
                // its `n` floats only; ownership is the caller's contract.
                unsafe {
                    let p = out.run_ptr(t * rows + r0 + g * TILE, n);
                    let v = if accumulate {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p))
                    } else {
                        v
                    };
                    _mm512_mask_storeu_ps(p, mask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::{Dtype, Values};
    use crate::testutil;
    use crate::view::DenseView;
    use crate::{BitmapMatrix, DenseMatrix, Isa};

    /// Whether this CPU runs the decode tiles (AMX-BF16, AVX512-BF16 and, for the bitmap's
    /// expansion, VBMI2); says why a test skips where it does not.
    fn tiles_here(test: &str) -> bool {
        let here = crate::bitmap::vbmi2_expand()
            && crate::lanes::available_bf16(Isa::Avx512, 2)
            && amx::enabled();
        if !here {
            eprintln!(
                "{test} skipped: this CPU lacks AMX-BF16, AVX512-BF16 or VBMI2 (or \
                 ESPALIER_AMX=0), which the decode tiles need"
            );
        }
        here
    }

    /// The same product through the rows-written path (`Weights::Bf16Rows` through
    /// `gemm_panels`): `stored_rows` as bf16 (int8 as their integers, with `scales`).
    fn rows_written(
        stored_rows: &[u16],
        scales: Option<&[f32]>,
        rows: usize,
        cols: usize,
        x: &[f32],
        tokens: usize,
    ) -> Vec<f32> {
        let write = |r: usize, row: &mut [bf16]| {
            for (o, &b) in row.iter_mut().zip(&stored_rows[r * cols..][..cols]) {
                *o = bf16::from_bits(b);
            }
        };
        let panel = crate::lanes::pack_bf16(x, tokens, cols, TILE, Exec::auto());
        let mut y = vec![f32::NAN; tokens * rows];
        let out = SharedOut::new(&mut y);
        let written = Weights::Bf16Rows(&write, scales);
        gemm_panels(
            written,
            rows,
            cols,
            &panel,
            tokens,
            out,
            false,
            Exec::auto(),
        );
        y
    }

    /// The bitmap's fused expansion on the tiles, bf16 and int8 (widened in L1): empty,
    /// sparse, half and full rows, partial 64-row blocks, an odd count of 32-column steps
    /// (int8 widens two at a time), 9 and 16 tokens, against the f64 product of the stored
    /// weights (activations rounded to bf16: within `2⁻⁸·Σ|w·x|`), and equal to the
    /// rows-written path up to the order of the additions.
    #[test]
    fn bitmap_tiles_match_reference() {
        if !tiles_here("bitmap_tiles_match_reference") {
            return;
        }
        let mut rng = testutil::rng(21);
        for dtype in [Dtype::Bf16, Dtype::I8] {
            for (rows, cols) in [(100, 64), (70, 96), (64, 576), (200, 1536)] {
                for density in [0.0, 0.1, 0.5, 1.0] {
                    let w = testutil::unstructured(&mut rng, rows, cols, density);
                    let view = DenseView::new(&w, rows, cols).expect("view");
                    let m = BitmapMatrix::from_view(&view, dtype).expect("pack");
                    let stored = m.to_dense();
                    // The weights the tiles multiply, row-major with zeros, as bf16 bits
                    // (int8: the integers, scaled after the sums).
                    let (vals, tile_rows, scales) = match &m.values {
                        Values::Bf16(v) => {
                            let bits = crate::Element::bf16_bits(v.as_slice()).expect("bits");
                            let dense = stored.iter().map(|&v| bf16::from_f32(v).to_bits());
                            (Packed::Bf16(bits), dense.collect::<Vec<_>>(), None)
                        }
                        Values::I8 { q, scales } => {
                            // Bit by bit from the mask: a reference independent of the
                            // kernels' own expansion.
                            let mut ints = vec![0u16; rows * cols];
                            for r in 0..rows {
                                let (a, b) = (m.row_ptr[r] as usize, m.row_ptr[r + 1] as usize);
                                let kept = (0..cols)
                                    .filter(|c| m.masks[r * m.stride + c / 8] >> (c % 8) & 1 == 1);
                                for (c, &v) in kept.zip(&q[a..b]) {
                                    ints[r * cols + c] = bf16::from_f32(f32::from(v)).to_bits();
                                }
                            }
                            (Packed::I8 { q, scales }, ints, Some(scales.as_slice()))
                        }
                        Values::F32(_) => unreachable!("packed as {dtype}"),
                    };
                    for tokens in [9, 16] {
                        let x = testutil::values(&mut rng, tokens * cols);
                        let (want, mag) = testutil::reference(&stored, rows, cols, &x, tokens);
                        let tol: Vec<f32> = mag.iter().map(|m| m * (1.0 / 256.0) / 1e-5).collect();
                        let ctx =
                            format!("{dtype} {rows}x{cols} density {density} tokens {tokens}");
                        let mut y = vec![f32::NAN; tokens * rows];
                        let rows_view = BitmapRows {
                            rows,
                            cols,
                            stride: m.stride,
                            masks: &m.masks,
                            row_ptr: &m.row_ptr,
                            vals,
                        };
                        bitmap_gemm(&rows_view, &x, tokens, Out::Init(&mut y), Exec::auto());
                        testutil::assert_close(&y, &want, &tol, &ctx);
                        let y2 = rows_written(&tile_rows, scales, rows, cols, &x, tokens);
                        let small: Vec<f32> = mag.iter().map(|m| m * 1e-6 / 1e-5).collect();
                        testutil::assert_close(&y, &y2, &small, &format!("{ctx}: rows written"));
                    }
                }
            }
        }
    }

    /// Dense int8 on the tiles (each step widened in L1), through `DenseMatrix::gemm` as a
    /// decode step runs it: partial 64-row blocks, an odd count of 32-column steps, 3, 5, 9
    /// and 16 tokens, against the f64 product of the stored weights and bit for bit the
    /// rows-written path (the same tile products in the same order, scaled the same way).
    #[test]
    fn int8_tiles_match_reference() {
        if !tiles_here("int8_tiles_match_reference") {
            return;
        }
        let mut rng = testutil::rng(22);
        for (rows, cols) in [(100, 64), (70, 96), (64, 576), (200, 1536)] {
            let w = testutil::unstructured(&mut rng, rows, cols, 1.0);
            let view = DenseView::new(&w, rows, cols).expect("view");
            let m = DenseMatrix::from_view(&view, Dtype::I8);
            let stored = m.to_dense();
            let Values::I8 { q, scales } = &m.values else {
                panic!("int8 storage");
            };
            let ints: Vec<u16> = q
                .iter()
                .map(|&v| bf16::from_f32(f32::from(v)).to_bits())
                .collect();
            for tokens in [3, 5, 9, 16] {
                let x = testutil::values(&mut rng, tokens * cols);
                let (want, mag) = testutil::reference(&stored, rows, cols, &x, tokens);
                let tol: Vec<f32> = mag.iter().map(|m| m * (1.0 / 256.0) / 1e-5).collect();
                let ctx = format!("int8 {rows}x{cols} tokens {tokens}");
                let mut y = vec![f32::NAN; tokens * rows];
                m.gemm(&x, tokens, &mut y, Exec::auto()).expect("gemm");
                testutil::assert_close(&y, &want, &tol, &ctx);
                let y2 = rows_written(&ints, Some(scales), rows, cols, &x, tokens);
                assert!(
                    y.iter().zip(&y2).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ctx}: differs from the rows-written path"
                );
            }
        }
    }
}
