//! 2:4 sparse GEMM with the tokens in the vector lanes, for batched decode steps of
//! [`lanes::MIN_TOKENS`] to [`MAX_TOKENS`] sequences on AVX512-BF16: only the kept weights
//! are multiplied.
//!
//! A step of 16 sequences is compute bound on these CPUs: dense bf16 ([`lanes`]) spends one
//! `vdpbf16ps` (32 multiply-adds) per pair of columns, and a 2:4 matrix expanded to dense
//! rows would multiply its zeros too. Here each row's two kept values in a group of four
//! columns are one 32-bit word, the operand `vdpbf16ps` broadcasts; what it must meet is
//! the 16 tokens' activations of *those* two columns, interleaved. A group has six such
//! pairs (positions `p0 < p1`, the order `NmMatrix` keeps), so each call first builds the
//! activations into six *pattern panels* per group, and each row's 4-bit pattern (its
//! metadata nibble `p0 | p1 << 2`) picks one: per group and row one panel load and one
//! `vdpbf16ps`, against two `vdpbf16ps` for dense.
//!
//! The panels of a whole matrix (144 KiB at SmolLM2's widest input, 1536 columns) do not
//! fit L1, and a panel loaded from L2 costs about as much as the multiply it saves (2:4 ran
//! at 0.78x dense with every row tile sweeping all columns). So the columns go in blocks of
//! [`BLOCK_GROUPS`] groups (12 KiB of panel lines in use), each block over every row tile of a task, the
//! tiles' accumulators kept in memory between blocks; each task builds a block's panels
//! itself (no serial section, and the panels are written in the core that reads them).
//!
//! Measured (`batch_bench`, SmolLM2's 30 blocks, 2-core EPYC): 12 and 16 sequences in
//! 14.1-14.8 ms per step against 37-38 ms on the f32 small-batch kernel before: 0.84-0.85x
//! dense bf16 (whose tiles read L2 too), level with the bitmap's expanded rows. The
//! multiplies are half of dense's, but each takes a panel whose address depends on the
//! row's metadata, which on this core costs about twice a dense multiply (a microbenchmark:
//! 0.30 ns per `vdpbf16ps` with fixed operand addresses, 0.5 with data-dependent ones).

use std::ops::Range;

use crate::isa::Exec;
use crate::lanes::{self, ROWS, TOKENS};
use crate::par::{self, Out};

/// Most tokens one call takes: one 16-lane vector per panel.
pub(crate) const MAX_TOKENS: usize = 16;
/// Lanes of a panel.
const LANES: usize = 16;
/// The first and last patterns `p0 | p1 << 2` with `p0 < p1`: (0, 1) is 4, (2, 3) is 14.
const FIRST_PATTERN: usize = 4;
/// Panels per group of 4 columns: one per pattern from [`FIRST_PATTERN`] to 14, so a panel's
/// offset is its pattern (minus [`FIRST_PATTERN`]) times 64 bytes. Five of the eleven
/// (patterns 5, 6, 7, 10 and 11, where `p0 ≥ p1`) are never written or read: they cost
/// address space, not cache lines.
const SLOTS: usize = 11;
/// Groups of 4 columns per block of the column loop: 32 groups' panels use 12 KiB of lines
/// (22 KiB of address space with the unused slots).
const BLOCK_GROUPS: usize = 32;

/// The pairs of positions a group's two kept values can have.
const PAIRS: [(usize, usize); 6] = [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)];

/// One panel: 16 tokens' words, on a cache line of its own (every multiply loads one, and an
/// unaligned 64-byte load that straddles two lines costs two).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Panel([u32; LANES]);

/// `Y = X · Wᵀ` for 2:4 bf16 weights `[rows, cols]` as `NmMatrix` stores them: per row, one
/// 32-bit word per group of 4 columns (the group's two kept values, slot 0 in the low half;
/// `values` holds their bf16 bits) and the slots' positions in `meta` (`p0 | p1 << 2` per
/// group, two groups per byte, low nibble first, `meta_stride` bytes per row), `p0 < p1`.
/// `x: [tokens, cols]`, `y: [tokens, rows]`, every element written. The activations are
/// rounded to bf16 as [`lanes`] rounds them. The caller has checked [`lanes::available_bf16`] and
/// `tokens <= MAX_TOKENS`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    values: &[u16],
    meta: &[u8],
    meta_stride: usize,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: Out<'_>,
    exec: Exec,
) {
    let groups = cols.div_ceil(4);
    assert!(tokens <= MAX_TOKENS && x.len() >= tokens * cols && y.len() >= tokens * rows);
    assert!(values.len() >= rows * groups * 2 && meta_stride >= groups.div_ceil(2));
    assert!(meta.len() >= rows * meta_stride);
    if rows == 0 || tokens == 0 {
        return;
    }
    if cols == 0 {
        y.init()[..tokens * rows].fill(0.0);
        return;
    }
    let pairs = lanes::pack_bf16(x, tokens, cols, LANES, exec);
    let tiles = rows.div_ceil(ROWS);
    let flops = tokens * rows * cols / 2;
    let tasks = par::task_count(exec, tiles, flops, par::MIN_TASK_FLOPS);
    let bounds = par::even_bounds(tiles, tasks);
    let out = y.shared();
    par::for_each_bound(&bounds, |range| {
        let mut accs = vec![[[0.0f32; TOKENS]; ROWS]; range.len()];
        // Each task builds the block's panels itself: no serial section before the tasks,
        // and the panels are written where they are read (12 KiB of lines, built by both).
        let mut panels = vec![Panel([0; LANES]); BLOCK_GROUPS * SLOTS];
        for g0 in (0..groups).step_by(BLOCK_GROUPS) {
            let g1 = (g0 + BLOCK_GROUPS).min(groups);
            let block = &mut panels[..(g1 - g0) * SLOTS];
            pattern_panels(&pairs, cols, g0..g1, block);
            for (t, acc) in range.clone().zip(accs.iter_mut()) {
                let r0 = t * ROWS;
                let nr = ROWS.min(rows - r0);
                let w = &values[r0 * groups * 2..(r0 + nr) * groups * 2];
                let m = &meta[r0 * meta_stride..(r0 + nr) * meta_stride];
                tile(w, m, meta_stride, nr, groups, block, g0..g1, acc);
            }
        }
        for (t, acc) in range.zip(&accs) {
            let r0 = t * ROWS;
            let nr = ROWS.min(rows - r0);
            // SAFETY: the caller checked AVX512-BF16 (`lanes::available_bf16`); this task owns output rows
            // r0..r0 + nr (its tiles of W) of every token.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                lanes::x86::store_tile(acc, nr, tokens, &out, rows, r0, 0, false)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (acc, nr, &out);
        }
    });
}

/// The pattern panels from bf16 pair panels of one token panel (`pairs`, [`lanes::pack_bf16`]
/// with 16 lanes): per group `g` of 4 columns, [`SLOTS`] panels of 16 words, the one of
/// pattern `p0 | p1 << 2` holding every token's columns `4g + p0` (low half) and `4g + p1`
/// (high half). Columns past `cols` are zero, so a ragged last group's padding positions
/// multiply zeros. Built for the groups of `span` only (a block), into `out`; the unused slots
/// keep what `out` held.
fn pattern_panels(pairs: &[u32], cols: usize, span: Range<usize>, out: &mut [Panel]) {
    let npairs = cols / 2;
    assert!(out.len() == span.len() * SLOTS && 2 * span.end <= npairs + 1);
    let zero = [0u32; LANES];
    let fill = || {
        for (g, slots) in span.zip(out.chunks_exact_mut(SLOTS)) {
            let p01 = &pairs[2 * g * LANES..][..LANES];
            let p23 = pairs.get((2 * g + 1) * LANES..(2 * g + 2) * LANES);
            let p23 = p23.unwrap_or(&zero);
            for &(p0, p1) in &PAIRS {
                let slot = &mut slots[(p0 | p1 << 2) - FIRST_PATTERN].0;
                // Column `c` of the group, token `t`, in the low half of a word.
                let column = |c: usize, t: usize| match c {
                    0 => p01[t] & 0xffff,
                    1 => p01[t] >> 16,
                    2 => p23[t] & 0xffff,
                    _ => p23[t] >> 16,
                };
                for (t, v) in slot.iter_mut().enumerate() {
                    *v = column(p0, t) | column(p1, t) << 16;
                }
            }
        }
    };
    // Compiled for AVX-512 where it is present (always, where this path runs), so the token
    // loops are 16 lanes wide instead of baseline x86-64's 4.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked just above).
        unsafe { x86::with_avx512(fill) };
        return;
    }
    fill();
}

/// One register tile: `nr` rows (`w`: `groups` weight words each, `meta`: `meta_stride`
/// bytes each) over the groups `span` (starting at an even group), added into `acc` (set
/// instead at the first block), against the block's pattern panels `panels`
/// ([`pattern_panels`] of `span`).
#[allow(clippy::too_many_arguments)]
fn tile(
    w: &[u16],
    meta: &[u8],
    meta_stride: usize,
    nr: usize,
    groups: usize,
    panels: &[Panel],
    span: std::ops::Range<usize>,
    acc: &mut [[f32; TOKENS]; ROWS],
) {
    assert!((1..=ROWS).contains(&nr) && w.len() == nr * groups * 2);
    assert!(meta.len() == nr * meta_stride && meta_stride >= groups.div_ceil(2));
    assert!(panels.len() == span.len() * SLOTS && span.start.is_multiple_of(2));
    assert!(span.start < span.end && span.end <= groups);
    #[cfg(target_arch = "x86_64")]
    {
        let (wp, mp) = (w.as_ptr().cast::<u32>(), meta.as_ptr());
        let xp = panels.as_ptr().cast::<u32>();
        let args = (wp, groups, mp, meta_stride, xp, span, acc);
        // SAFETY: the caller checked AVX512-BF16 (`lanes::available_bf16`); the asserts above bound
        // every read: `nr` rows of `groups` 32-bit words (read unaligned) and of
        // `ceil(groups / 2)` metadata bytes, and per group one of its `SLOTS` panels.
        unsafe {
            match nr {
                12 => x86::tile::<12>(args),
                11 => x86::tile::<11>(args),
                10 => x86::tile::<10>(args),
                9 => x86::tile::<9>(args),
                8 => x86::tile::<8>(args),
                7 => x86::tile::<7>(args),
                6 => x86::tile::<6>(args),
                5 => x86::tile::<5>(args),
                4 => x86::tile::<4>(args),
                3 => x86::tile::<3>(args),
                2 => x86::tile::<2>(args),
                _ => x86::tile::<1>(args),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, meta, panels, span, acc);
        unreachable!("the tokens-in-lanes GEMM runs on AVX-512 only");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{FIRST_PATTERN, LANES, ROWS, SLOTS, TOKENS};
    use crate::lanes::x86::dp_broadcast;
    use std::arch::x86_64::*;

    /// Runs `f` compiled for AVX-512F (inlined here), so its loops vectorize 16 lanes wide.
    ///
    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
        f()
    }

    /// The arguments of [`tile`]: the tile's first weight row (`groups` words a row), its
    /// first metadata row (`meta_stride` bytes a row), the block's pattern panels, the
    /// block's groups and the accumulators.
    pub(super) type TileArgs<'a> = (
        *const u32,
        usize,
        *const u8,
        usize,
        *const u32,
        std::ops::Range<usize>,
        &'a mut [[f32; TOKENS]; ROWS],
    );

    /// `NR` rows over the groups of `span`: per group and row, the row's pattern picks the
    /// group's panel (one load) and one `vdpbf16ps` multiplies it with the row's weight word,
    /// broadcast. A row takes 8 groups at a time: one 32-bit metadata read, each pattern's
    /// panel offset (its nibble times 64 bytes) a shift and a mask of it, and the weight
    /// words as displacements from one row pointer, about 4 instructions per multiply (a
    /// table lookup would add a load; rows interleaved per group, LLVM kept the 12 metadata
    /// words in vector registers and extracted them one by one). First the next tile's
    /// weights for the same block are requested into L2 (a block reads 128 bytes of each
    /// row, too short a run for the hardware prefetcher to follow 12 rows; into L1 instead,
    /// a 16-sequence step took 18.8-20.1 ms against 14.1-14.8).
    ///
    /// # Safety
    /// AVX512-BF16 available; pointers valid for `NR` rows of `groups` words and of
    /// `meta_stride ≥ ceil(groups / 2)` bytes, and for `span.len() · SLOTS · 16` panel words;
    /// `span` within `0..groups`, its start even.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const NR: usize>(args: TileArgs<'_>) {
        let (w, groups, meta, meta_stride, xp, span, acc) = args;
        const GROUP_BYTES: usize = SLOTS * LANES * 4;
        // Slot `n - FIRST_PATTERN` holds pattern `n`: subtracted once from the base.
        const BIAS: usize = FIRST_PATTERN * LANES * 4;
        // SAFETY: bounds are the caller's contract (a pattern `p0 | p1 << 2` with p0 < p1
        // lies in FIRST_PATTERN..FIRST_PATTERN + SLOTS, so its panel is within its group's);
        // prefetch addresses are only formed (wrapping), never fault.
        unsafe {
            for r in 0..ROWS {
                // The run is 4·span.len() bytes from anywhere in a line (the values are only
                // 2-byte aligned): every line it touches, the last one included.
                let run = w
                    .wrapping_add((ROWS + r) * groups + span.start)
                    .cast::<i8>();
                let skew = run as usize % 64;
                for line in (0..skew + 4 * span.len()).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(run.wrapping_add(line).wrapping_sub(skew));
                }
            }
            let mut a = [_mm512_setzero_ps(); NR];
            if span.start > 0 {
                for (av, row) in a.iter_mut().zip(acc.iter()) {
                    *av = _mm512_loadu_ps(row.as_ptr());
                }
            }
            // Group `g`'s panels start `(g - span.start) · GROUP_BYTES` into the block's.
            let xb = xp
                .cast::<u8>()
                .wrapping_sub(BIAS + span.start * GROUP_BYTES);
            // `offset`: the pattern times 64 bytes.
            let panel = |g: usize, offset: usize| {
                _mm512_loadu_ps(xb.wrapping_add(g * GROUP_BYTES + offset).cast::<f32>())
            };
            let whole = span.start + span.len() / 8 * 8;
            for g0 in (span.start..whole).step_by(8) {
                // Row by row, 8 groups each: one metadata word, then 8 multiplies whose
                // operands are the word's nibbles and displacements from one row pointer.
                for (r, av) in a.iter_mut().enumerate() {
                    let word = meta
                        .add(r * meta_stride + g0 / 2)
                        .cast::<u32>()
                        .read_unaligned();
                    let word = word as usize;
                    let wp = w.add(r * groups + g0);
                    let mut v = *av;
                    v = dp_broadcast::<0>(v, panel(g0, word << 6 & 0x3c0), wp);
                    v = dp_broadcast::<4>(v, panel(g0 + 1, word << 2 & 0x3c0), wp);
                    v = dp_broadcast::<8>(v, panel(g0 + 2, word >> 2 & 0x3c0), wp);
                    v = dp_broadcast::<12>(v, panel(g0 + 3, word >> 6 & 0x3c0), wp);
                    v = dp_broadcast::<16>(v, panel(g0 + 4, word >> 10 & 0x3c0), wp);
                    v = dp_broadcast::<20>(v, panel(g0 + 5, word >> 14 & 0x3c0), wp);
                    v = dp_broadcast::<24>(v, panel(g0 + 6, word >> 18 & 0x3c0), wp);
                    v = dp_broadcast::<28>(v, panel(g0 + 7, word >> 22 & 0x3c0), wp);
                    *av = v;
                }
            }
            for g in whole..span.end {
                for (r, av) in a.iter_mut().enumerate() {
                    let byte = usize::from(*meta.add(r * meta_stride + g / 2));
                    let offset = byte << 6 >> (4 * (g % 2)) & 0x3c0;
                    *av = dp_broadcast::<0>(*av, panel(g, offset), w.add(r * groups + g));
                }
            }
            for (av, row) in a.iter().zip(acc.iter_mut()) {
                _mm512_storeu_ps(row.as_mut_ptr(), *av);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The six ascending pairs of positions are exactly the patterns the panel slots cover.
    #[test]
    fn every_ascending_pair_has_its_own_slot() {
        let mut slots: Vec<usize> = PAIRS.iter().map(|&(p0, p1)| p0 | p1 << 2).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), 6);
        assert!(
            slots
                .iter()
                .all(|n| (FIRST_PATTERN..FIRST_PATTERN + SLOTS).contains(n))
        );
        for p1 in 0..4 {
            for p0 in 0..p1 {
                assert!(PAIRS.contains(&(p0, p1)));
            }
        }
    }
}
