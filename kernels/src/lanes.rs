//! Dense GEMM with the tokens in the vector lanes, for AVX-512: `Y = X · Wᵀ` read straight
//! from the row-major weights (f32, or bf16 on AVX512-BF16), with no packed copy of `W`.
//!
//! [`crate::gemm`] puts 16 output rows in a vector, so it first packs every 16-row panel of `W`
//! column-major (a scalar transpose of the whole matrix per call) and then broadcasts the
//! activations; [`crate::gemm_bf16`] does the same with pairs. Here the roles swap: the
//! activations are transposed once per call into *token panels* (16 or [`TOKENS`] tokens of
//! each column side by side, zero past the last token) and each weight is broadcast from
//! where it lies, one row stream per output row of the tile. A register tile is [`ROWS`] rows
//! × 32 tokens (24 accumulators) or × 16 tokens: each column costs one or two vector loads,
//! 12 broadcasts and 12 or 24 FMAs, so the FMA pipes, not the loads, bound it. Transposing
//! `X` costs `tokens × cols` copies against `tokens × rows × cols` multiply-adds.
//!
//! bf16 weights are multiplied by `vdpbf16ps`, one 32-bit weight pair broadcast against 16
//! tokens' activation pairs, two multiply-adds per lane: the activations are rounded to bf16
//! (nearest-even), as the bf16 prefill rounds them, so an output is within `2⁻⁸·Σ|w·x|` of
//! the f32 product.
//!
//! Where it runs: dense bf16 products of [`MIN_TOKENS_DENSE_BF16`] tokens or more and f32 of
//! [`MIN_TOKENS_DENSE_F32`], that is batched decode steps (one 16-lane vector per column,
//! where the small-batch kernel re-read each weight row for every 4 tokens; the bitmap's
//! expanded rows from [`MIN_TOKENS`]) and prefill (except bf16
//! prefill on AMX, whose tiles are faster). Where the CPU has AMX-BF16, the bf16 steps of up
//! to 16 tokens run [`crate::lanes_amx`]'s tiles on the same token panel instead (there
//! `vdpbf16ps` runs at half the f32 FMA's rate and bounds the step). Measured on the 2-core EPYC (`kernel_bench`, 128
//! tokens): f32 1.03-1.21x candle's matmul, bf16 1.1-1.4x the packed-panel AVX512-BF16 kernel
//! on SmolLM2's shapes. Tasks own disjoint ranges of row tiles and run every token panel over
//! each tile while its weights (`ROWS × cols`, 27 KiB at SmolLM2's 576) are in L1/L2.

use crate::element::Element;
use crate::isa::{Exec, Isa};
use crate::par::{self, Out, SharedOut};
use half::bf16;

/// Tokens per panel: two 16-lane vectors.
pub(crate) const TOKENS: usize = 32;
/// Output rows per register tile.
pub(crate) const ROWS: usize = 12;
/// Fewest tokens a sparse format's batched step takes this path with (the bitmap's expanded
/// rows, 2:4's `lanes24`): at 8 or fewer their small-batch kernels, which expand 8 rows at a
/// time and multiply each weight once per token, measured faster. (Where AMX is present, a
/// bf16 bitmap takes its tiles from 5 tokens instead: `bitmap::FEW_TOKENS_MAX`.)
pub(crate) const MIN_TOKENS: usize = 9;
/// Fewest tokens a dense bf16 product takes this path with: from 3 tokens on it beats the
/// small-batch tile, even with 13 of 16 lanes empty, because its tiles read the weights from
/// L2 (the next tile requested while one runs) where the small-batch tile waits on memory
/// (`batch_bench`, SmolLM2's block linears: 11.8-12.4 ms at 2-8 tokens against 14.9-19.0;
/// whole 2-sequence steps in `bench_forward` came out level, 3-sequence ones ahead). Since
/// then, steps of up to [`crate::dense::FEW_TOKENS_BF16`] tokens take `dense::few_tokens_bf16`
/// wherever this path could run (both need AVX512-BF16), so it starts one token later.
pub(crate) const MIN_TOKENS_DENSE_BF16: usize = crate::dense::FEW_TOKENS_BF16 + 1;
/// The same for dense f32, whose lanes do twice the multiplies of bf16's: from 4 tokens
/// (20.8-21.7 ms against 23.2-29.6 at 4-8 tokens; the small-batch tile's 15-18 ms at 2-3).
pub(crate) const MIN_TOKENS_DENSE_F32: usize = 4;

/// Whether this path can run (AVX-512F asked for and present).
pub(crate) fn available(isa: Isa) -> bool {
    isa.effective() == Isa::Avx512
}

/// Whether the bf16 path can run: [`available`] and AVX512-BF16, and an even column count
/// (each weight pair is read as one 32-bit word of its row).
pub(crate) fn available_bf16(isa: Isa, cols: usize) -> bool {
    cols.is_multiple_of(2) && crate::gemm_bf16::available(isa)
}

/// The weights of a call, row-major `[rows, cols]`.
#[derive(Clone, Copy)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    /// bf16 bits; the activations are rounded to bf16 and multiplied in pairs (`vdpbf16ps`).
    Bf16(&'a [u16]),
    /// bf16 rows written on demand: `write(r, row)` writes all of row `r`'s `cols` values
    /// into `row` (zeros where pruned; the buffer holds the previous tile's rows). Each task
    /// writes a tile's [`ROWS`] rows into an L1-sized buffer just before multiplying them,
    /// so a sparse format runs this GEMM without a dense copy of the whole matrix (the
    /// bitmap's batched steps: see `BitmapMatrix::gemm`).
    ///
    /// With row scales, each output row is multiplied by its scale after the sum: int8
    /// weights run this way, written as their integers (exact in bf16) and scaled once per
    /// output, as the int8 kernels scale each row sum (`DenseMatrix::gemm_out`).
    Bf16Rows(&'a (dyn Fn(usize, &mut [bf16]) + Sync), Option<&'a [f32]>),
    /// f32 rows written on demand, as [`Weights::Bf16Rows`] writes bf16 ones: an f32 bitmap's
    /// prefill multiplies each tile of rows expanded just before, where a dense copy of the
    /// whole matrix per call cost it a quarter of its time in page faults, zeroing and
    /// expansion (`BitmapMatrix::gemm`).
    F32Rows(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// `Y = X · Wᵀ` for `w: [rows, cols]`, `x: [tokens, cols]`, `y: [tokens, rows]` (every
/// element written, so fresh memory is fine), split over the pool by `exec`. The caller has
/// checked [`available`] (and [`available_bf16`] for bf16 weights) and the lengths.
pub(crate) fn gemm(
    w: Weights<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: Out<'_>,
    exec: Exec,
) {
    gemm_on(w, rows, cols, x, tokens, y, exec, true);
}

/// [`gemm`], bf16 steps of up to 16 tokens on AMX tiles ([`crate::lanes_amx`]) only when
/// `tiles` allows it (tests run both kernels on a CPU that has them).
#[allow(clippy::too_many_arguments)]
fn gemm_on(
    w: Weights<'_>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    y: Out<'_>,
    exec: Exec,
    tiles: bool,
) {
    let stored = match w {
        Weights::F32(w) => w.len(),
        Weights::Bf16(w) => w.len(),
        Weights::Bf16Rows(..) | Weights::F32Rows(_) => rows * cols,
    };
    assert!(stored >= rows * cols && x.len() >= tokens * cols && y.len() >= tokens * rows);
    if rows == 0 || tokens == 0 {
        return;
    }
    if cols == 0 {
        y.init()[..tokens * rows].fill(0.0);
        return;
    }
    let width = panel_width(tokens);
    // The activations transposed into token panels of `width` lanes, as 32-bit words: for
    // f32 weights the f32 bits of column `k` at `p * cols * width + k * width + t`, for bf16
    // the pair of columns `2k`, `2k + 1` at `p * (cols / 2) * width + k * width + t`. Zero
    // past the last token.
    let panels = match w {
        Weights::F32(_) | Weights::F32Rows(_) => pack_f32(x, tokens, cols, width, exec),
        Weights::Bf16(_) | Weights::Bf16Rows(..) => pack_bf16(x, tokens, cols, width, exec),
    };
    gemm_panels_on(
        w,
        rows,
        cols,
        &panels,
        tokens,
        y.shared(),
        false,
        exec,
        tiles,
    );
}

/// Lanes per token panel for a product of `tokens` tokens: a decode step of up to 16
/// sequences fills one vector per column; anything longer runs panels of 32 (the last one
/// may be shorter, and then runs the one-vector tile).
pub(crate) fn panel_width(tokens: usize) -> usize {
    if tokens <= 16 { 16 } else { TOKENS }
}

/// The product of [`gemm`] from token panels already built (`panels`, laid out as [`gemm`]
/// builds them for `tokens` tokens at [`panel_width`]), each output stored into `out`
/// (`[tokens, rows]`) or, with `accumulate`, added to what it holds. `cols > 0`, and the
/// caller has checked [`available`] (and [`available_bf16`] for bf16 weights).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_panels(
    w: Weights<'_>,
    rows: usize,
    cols: usize,
    panels: &[u32],
    tokens: usize,
    out: SharedOut,
    accumulate: bool,
    exec: Exec,
) {
    gemm_panels_on(w, rows, cols, panels, tokens, out, accumulate, exec, true);
}

/// [`gemm_panels`], on AMX tiles where `tiles` allows it and [`crate::lanes_amx`] takes the
/// call: bf16 weights, one 16-lane panel, whole 32-column tiles.
#[allow(clippy::too_many_arguments)]
fn gemm_panels_on(
    w: Weights<'_>,
    rows: usize,
    cols: usize,
    panels: &[u32],
    tokens: usize,
    out: SharedOut,
    accumulate: bool,
    exec: Exec,
    tiles: bool,
) {
    let f32_weights = matches!(w, Weights::F32(_) | Weights::F32Rows(_));
    if tiles && !f32_weights && crate::lanes_amx::takes(cols, tokens) {
        crate::lanes_amx::gemm_panels(w, rows, cols, panels, tokens, out, accumulate, exec);
        return;
    }
    let width = panel_width(tokens);
    let pairs = cols / 2;
    let panel_words = if f32_weights {
        cols * width
    } else {
        pairs * width
    };
    assert!(cols > 0 && panels.len() >= tokens.div_ceil(width) * panel_words);
    let tiles = rows.div_ceil(ROWS);
    let flops = tokens * rows * cols;
    let tasks = par::task_count(exec, tiles, flops, par::MIN_TASK_FLOPS);
    let bounds = par::even_bounds(tiles, tasks);
    // Every tile of rows meets every panel of tokens and stores each of its outputs once.
    par::for_each_bound(&bounds, |range| {
        let mut tile = [[0.0f32; TOKENS]; ROWS];
        // The tile's rows when they are written on demand (`Bf16Rows`, `F32Rows`).
        let mut written = match w {
            Weights::Bf16Rows(..) => vec![bf16::ZERO; ROWS * cols],
            _ => Vec::new(),
        };
        let mut written_f32 = match w {
            Weights::F32Rows(_) => vec![0.0f32; ROWS * cols],
            _ => Vec::new(),
        };
        let last = range.end.saturating_sub(1);
        for t in range {
            let r0 = t * ROWS;
            let nr = ROWS.min(rows - r0);
            // The rows of this task's next tile, requested into L2 while this one runs (by
            // the first token panel: the others find them there).
            let next = if t < last {
                (r0 + nr)..rows.min(r0 + nr + ROWS)
            } else {
                0..0
            };
            match w {
                Weights::Bf16Rows(write, _) => write_rows(write, &mut written, r0, nr, cols),
                Weights::F32Rows(write) => write_rows(write, &mut written_f32, r0, nr, cols),
                _ => {}
            }
            for p in 0..tokens.div_ceil(width) {
                let t0 = p * width;
                let nt = width.min(tokens - t0);
                match w {
                    Weights::F32(w) => {
                        let panel = &panels[p * cols * width..][..cols * width];
                        let ahead = if p == 0 { next.clone() } else { 0..0 };
                        tile_f32(
                            &w[r0 * cols..(r0 + nr) * cols],
                            nr,
                            cols,
                            panel,
                            width,
                            nt,
                            &w[ahead.start * cols..ahead.end * cols],
                            &mut tile,
                        );
                    }
                    Weights::F32Rows(_) => {
                        // Written just before into a buffer the token panels share (as
                        // `Bf16Rows` below): the write requests the next tile's stored rows.
                        let panel = &panels[p * cols * width..][..cols * width];
                        let rows_in = &written_f32[..nr * cols];
                        tile_f32(rows_in, nr, cols, panel, width, nt, &[], &mut tile);
                    }
                    Weights::Bf16(w) => {
                        let panel = &panels[p * pairs * width..][..pairs * width];
                        let ahead = if p == 0 { next.clone() } else { 0..0 };
                        tile_bf16(
                            &w[r0 * cols..(r0 + nr) * cols],
                            nr,
                            cols,
                            panel,
                            width,
                            nt,
                            &w[ahead.start * cols..ahead.end * cols],
                            &mut tile,
                        );
                    }
                    Weights::Bf16Rows(_, scales) => {
                        // The rows are written into an L1 buffer just before: nothing to
                        // request (the bitmap's expansion prefetches its packed values).
                        let panel = &panels[p * pairs * width..][..pairs * width];
                        let bits = Element::bf16_bits(&written[..nr * cols]).unwrap_or_default();
                        tile_bf16(bits, nr, cols, panel, width, nt, &[], &mut tile);
                        if let Some(scales) = scales {
                            for (row, &s) in tile.iter_mut().zip(&scales[r0..r0 + nr]) {
                                row[..nt].iter_mut().for_each(|v| *v *= s);
                            }
                        }
                    }
                }
                // SAFETY: the caller checked AVX-512F (`available`); this task owns output
                // rows r0..r0 + nr (its tiles of W) of every token.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::store_tile(&tile, nr, nt, &out, rows, r0, t0, accumulate)
                };
                #[cfg(not(target_arch = "x86_64"))]
                {
                    // Unreachable (`available` is false off x86-64).
                    let _ = (&out, accumulate);
                    unreachable!("the tokens-in-lanes GEMM runs on AVX-512 only");
                }
            }
        }
    });
}

/// Rows `r0..r0 + nr` written on demand into `buf` (`cols` each), for a tile's products.
fn write_rows<T>(
    write: &(dyn Fn(usize, &mut [T]) + Sync),
    buf: &mut [T],
    r0: usize,
    nr: usize,
    cols: usize,
) {
    for (i, row) in buf[..nr * cols].chunks_exact_mut(cols).enumerate() {
        write(r0 + i, row);
    }
}

/// f32 token panels (their bits; see [`gemm`]).
pub(crate) fn pack_f32(
    x: &[f32],
    tokens: usize,
    cols: usize,
    width: usize,
    exec: Exec,
) -> Vec<u32> {
    let mut panels = vec![0; tokens.div_ceil(width) * cols * width];
    pack_f32_into(x, tokens, cols, width, exec, &mut panels);
    panels
}

/// [`pack_f32`] into `panels` (`tokens.div_ceil(width) * cols * width` words, zero where no
/// token is), memory the caller lays out as it needs (`lanes_kept`: a column to a cache line).
pub(crate) fn pack_f32_into(
    x: &[f32],
    tokens: usize,
    cols: usize,
    width: usize,
    exec: Exec,
    panels: &mut [u32],
) {
    let x = &x[..tokens * cols];
    // SAFETY: f32 and u32 have one size and alignment, and every bit pattern is valid in both.
    let bits = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u32>(), x.len()) };
    transpose_into(bits, cols, width, exec, panels);
}

/// bf16 pair token panels (see [`gemm`]); `cols` is even. Rounded to nearest-even as the
/// bf16 prefill rounds them ([`crate::gemm_bf16::pack_activations`]). With AVX512-BF16 and
/// whole 32-column blocks, each panel is converted and transposed in one pass
/// (`x86::fill_panel_bf16`, the same `vcvtne2ps2bf16` rounding), without the row-major pair
/// copy in between.
pub(crate) fn pack_bf16(
    x: &[f32],
    tokens: usize,
    cols: usize,
    width: usize,
    exec: Exec,
) -> Vec<u32> {
    let mut panels = Vec::new();
    pack_bf16_into(x, tokens, cols, width, exec, &mut panels);
    panels
}

/// [`pack_bf16`] into `panels`, whose allocation is reused (a training step packs the same
/// shapes over and over; fresh buffers of megabytes each cost page faults every call).
pub(crate) fn pack_bf16_into(
    x: &[f32],
    tokens: usize,
    cols: usize,
    width: usize,
    exec: Exec,
    panels: &mut Vec<u32>,
) {
    let x = &x[..tokens * cols];
    #[cfg(target_arch = "x86_64")]
    if cols.is_multiple_of(32) && available_bf16(exec.isa, cols) {
        build_panels_into(
            tokens,
            cols / 2,
            width,
            exec,
            panels,
            |first, lanes, panel| {
                // SAFETY: AVX512-BF16 (and so AVX-512F) is present, checked above; `cols` is a
                // multiple of 32.
                unsafe { x86::fill_panel_bf16(&x[first * cols..], cols, width, lanes, panel) }
            },
        );
        return;
    }
    let pairs = crate::gemm_bf16::pack_activations(x, tokens, cols);
    *panels = transpose_into_panels(&pairs, cols / 2, width, exec);
}

/// Rows of `len` values (one per token) as panels of `width` tokens: value `k` of token `t`
/// at `(t / width) * len * width + k * width + t % width`, zero past the last token.
fn transpose_into_panels(rows: &[u32], len: usize, width: usize, exec: Exec) -> Vec<u32> {
    let tokens = rows.len() / len.max(1);
    let mut out = vec![0; tokens.div_ceil(width) * len * width];
    transpose_into(rows, len, width, exec, &mut out);
    out
}

/// [`transpose_into_panels`] into `out`, which holds exactly the panels and is zero where no
/// token is.
fn transpose_into(rows: &[u32], len: usize, width: usize, exec: Exec, out: &mut [u32]) {
    let tokens = rows.len() / len.max(1);
    fill_panels(tokens, len, width, exec, out, |first, lanes, panel| {
        #[cfg(target_arch = "x86_64")]
        if available(exec.isa) {
            // SAFETY: AVX-512F is present (checked just above).
            unsafe { x86::fill_panel(&rows[first * len..], len, width, lanes, panel) };
            return;
        }
        for (lane, row) in rows[first * len..]
            .chunks_exact(len)
            .take(lanes)
            .enumerate()
        {
            for (k, &v) in row.iter().enumerate() {
                panel[k * width + lane] = v;
            }
        }
    })
}

/// The zeroed panels of `tokens` tokens by `len` values in `out` (its allocation reused),
/// each filled by `fill(first_token, lanes, panel)` (see [`fill_panels`]).
fn build_panels_into(
    tokens: usize,
    len: usize,
    width: usize,
    exec: Exec,
    out: &mut Vec<u32>,
    fill: impl Fn(usize, usize, &mut [u32]) + Sync + Send,
) {
    out.clear();
    out.resize(tokens.div_ceil(width) * len * width, 0);
    fill_panels(tokens, len, width, exec, out, fill);
}

/// The panels of `tokens` tokens by `len` values in `out` (sized and zeroed by the caller),
/// each filled by `fill(first_token, lanes, panel)` with its `lanes` tokens from
/// `first_token` on. Panels are filled in parallel when `exec` allows and there are several:
/// done on the calling thread alone, a 128-token prefill's transposes left the other worker
/// waiting (with the output scatter, ~8% of an f32 prefill's samples in `perf`).
fn fill_panels(
    tokens: usize,
    len: usize,
    width: usize,
    exec: Exec,
    out: &mut [u32],
    fill: impl Fn(usize, usize, &mut [u32]) + Sync + Send,
) {
    assert!(out.len() == tokens.div_ceil(width) * len * width);
    if len == 0 {
        return;
    }
    let fill = |p: usize, panel: &mut [u32]| {
        let first = p * width;
        fill(first, width.min(tokens - first), panel)
    };
    let panel_len = len * width;
    if exec.parallel && out.len() > panel_len && out.len() >= 16 * 1024 {
        crate::team::for_each_chunk_mut(out, panel_len, |p, panel| fill(p, panel));
    } else {
        for (p, panel) in out.chunks_mut(panel_len).enumerate() {
            fill(p, panel);
        }
    }
}

/// `kernel::<NR, NV>(args)` for a tile of `nr` rows (1..=[`ROWS`], a const generic each) and
/// `nt` tokens: one 16-lane vector of them per column up to 16, two past that.
#[cfg(target_arch = "x86_64")]
macro_rules! by_tile_shape {
    ($($kernel:ident)::+, $nr:expr, $nt:expr, $args:tt) => {
        if $nt <= 16 {
            by_tile_rows!($($kernel)::+, $nr, 1, $args)
        } else {
            by_tile_rows!($($kernel)::+, $nr, 2, $args)
        }
    };
}

/// [`by_tile_shape`] for a fixed number of vectors `nv`.
#[cfg(target_arch = "x86_64")]
macro_rules! by_tile_rows {
    ($($kernel:ident)::+, $nr:expr, $nv:literal, $args:tt) => {
        match $nr {
            12 => $($kernel)::+::<12, $nv> $args,
            11 => $($kernel)::+::<11, $nv> $args,
            10 => $($kernel)::+::<10, $nv> $args,
            9 => $($kernel)::+::<9, $nv> $args,
            8 => $($kernel)::+::<8, $nv> $args,
            7 => $($kernel)::+::<7, $nv> $args,
            6 => $($kernel)::+::<6, $nv> $args,
            5 => $($kernel)::+::<5, $nv> $args,
            4 => $($kernel)::+::<4, $nv> $args,
            3 => $($kernel)::+::<3, $nv> $args,
            2 => $($kernel)::+::<2, $nv> $args,
            _ => $($kernel)::+::<1, $nv> $args,
        }
    };
}

/// One f32 register tile: rows `w` (`nr × cols`) by the first `nt` tokens of `panel`
/// (`cols × width` f32 bits), into `tile[r][t]`; `next` (whole rows, possibly none) is
/// requested into L2 meanwhile.
#[allow(clippy::too_many_arguments)]
fn tile_f32(
    w: &[f32],
    nr: usize,
    cols: usize,
    panel: &[u32],
    width: usize,
    nt: usize,
    next: &[f32],
    tile: &mut [[f32; TOKENS]; ROWS],
) {
    assert!(nr <= ROWS && nt <= width && width <= TOKENS && width.is_multiple_of(16));
    assert!(w.len() == nr * cols && panel.len() == cols * width);
    #[cfg(target_arch = "x86_64")]
    {
        let (wp, xp) = (w.as_ptr(), panel.as_ptr().cast::<f32>());
        let ahead = (next.as_ptr(), next.len() / cols.max(1));
        // SAFETY: the caller checked AVX-512F (`available`); the asserts above bound every
        // read: `nr` rows of `cols` weights, `cols` columns of `width` lanes (f32 bits, which
        // u32 words hold with the same size and alignment); `next` is only prefetched.
        unsafe { by_tile_shape!(x86::tile_f32, nr, nt, (wp, cols, xp, width, ahead, tile)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Unreachable (`available` is false off x86-64); kept so the crate builds anywhere.
        let _ = (w, cols, panel, width, next, tile);
        unreachable!("the tokens-in-lanes GEMM runs on AVX-512 only");
    }
}

/// One bf16 register tile: as [`tile_f32`], `w` and `next` being bf16 bits and `panel`
/// pairs (`cols / 2 × width`).
#[allow(clippy::too_many_arguments)]
fn tile_bf16(
    w: &[u16],
    nr: usize,
    cols: usize,
    panel: &[u32],
    width: usize,
    nt: usize,
    next: &[u16],
    tile: &mut [[f32; TOKENS]; ROWS],
) {
    assert!(nr <= ROWS && nt <= width && width <= TOKENS && width.is_multiple_of(16));
    assert!(cols.is_multiple_of(2) && w.len() == nr * cols && panel.len() == cols / 2 * width);
    #[cfg(target_arch = "x86_64")]
    {
        let (wp, xp) = (w.as_ptr().cast::<u32>(), panel.as_ptr());
        let pairs = cols / 2;
        let ahead = (next.as_ptr().cast::<u32>(), next.len() / cols.max(1));
        // SAFETY: the caller checked AVX512-BF16 (`available_bf16`); the asserts above bound
        // every read: `nr` rows of `pairs` 32-bit words (x86 reads them unaligned), `pairs`
        // columns of `width` lanes; `next` is only prefetched.
        unsafe { by_tile_shape!(x86::tile_bf16, nr, nt, (wp, pairs, xp, width, ahead, tile)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, cols, panel, width, next, tile);
        unreachable!("the tokens-in-lanes GEMM runs on AVX-512 only");
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{ROWS, TOKENS};
    use crate::par::SharedOut;
    use std::arch::x86_64::*;

    /// Stores the first `nt` tokens of a register tile's `nr` rows (`tile[r][i]`) into `Y`
    /// (`[tokens, rows]`, row-major), or adds them to it with `accumulate`: token `t0 + i`
    /// gets `y[(t0 + i) * rows + r0..][..nr]`.
    /// Each 16 tokens' rows are transposed in registers ([`transpose16`]) and every token's
    /// `nr` values written by one masked store; copied value by value, this scatter was 4% of
    /// a 128-token bf16 prefill's samples in `perf`.
    ///
    /// # Safety
    /// AVX-512F available; the calling task owns output rows `r0..r0 + nr` of tokens
    /// `t0..t0 + nt` (each run's bounds are checked).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store_tile(
        tile: &[[f32; TOKENS]; ROWS],
        nr: usize,
        nt: usize,
        out: &SharedOut,
        rows: usize,
        r0: usize,
        t0: usize,
        accumulate: bool,
    ) {
        assert!((1..=ROWS).contains(&nr) && nt <= TOKENS);
        let mask = ((1u32 << nr) - 1) as __mmask16;
        for h in 0..nt.div_ceil(16) {
            let mut lanes = [_mm512_setzero_ps(); 16];
            for (v, row) in lanes.iter_mut().zip(&tile[..nr]) {
                // SAFETY: the slice holds the 16 floats loaded.
                *v = unsafe { _mm512_loadu_ps(row[16 * h..][..16].as_ptr()) };
            }
            let tokens = transpose16(lanes);
            for (i, v) in tokens.iter().enumerate().take(nt - 16 * h) {
                // SAFETY: `run_ptr` checks the run's bounds; the masked load and store touch its
                // `nr` floats only; ownership is the caller's contract.
                unsafe {
                    let p = out.run_ptr((t0 + 16 * h + i) * rows + r0, nr);
                    let v = if accumulate {
                        _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask, p))
                    } else {
                        *v
                    };
                    _mm512_mask_storeu_ps(p, mask, v);
                }
            }
        }
    }

    /// One token panel of `transpose_into_panels` for 4-byte values: `rows` holds the
    /// panel's `lanes` tokens' rows of `len` values first; value `k` of token `t` goes to
    /// `panel[k * width + t]` (lanes past `lanes` are left as they are: zero). 16 tokens by
    /// 16 values per step through [`transpose16`], one 64-byte load per token and one store
    /// per value; a value at a time, the 128-byte stride of those stores made the transposes
    /// about 3% of a 128-token bf16 prefill.
    ///
    /// # Safety
    /// AVX-512F available.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill_panel(
        rows: &[u32],
        len: usize,
        width: usize,
        lanes: usize,
        panel: &mut [u32],
    ) {
        assert!(width.is_multiple_of(16) && lanes <= width);
        assert!(rows.len() >= lanes * len && panel.len() >= len * width);
        let whole = len - len % 16;
        for lane0 in (0..lanes).step_by(16) {
            let m = 16.min(lanes - lane0);
            for k0 in (0..whole).step_by(16) {
                let mut v = [_mm512_setzero_ps(); 16];
                for (i, v) in v.iter_mut().enumerate().take(m) {
                    let row = &rows[(lane0 + i) * len + k0..][..16];
                    // SAFETY: `row` holds the 16 words loaded.
                    *v = _mm512_castsi512_ps(unsafe { _mm512_loadu_epi32(row.as_ptr().cast()) });
                }
                store_transposed(v, &mut panel[k0 * width + lane0..], width);
            }
            for i in 0..m {
                for k in whole..len {
                    panel[k * width + lane0 + i] = rows[(lane0 + i) * len + k];
                }
            }
        }
    }

    /// [`fill_panel`] for bf16 pair panels straight from f32 activations: `x` holds the
    /// panel's `lanes` tokens' rows of `cols` values first; pair `k` (columns `2k`, `2k + 1`,
    /// rounded to nearest-even by `vcvtne2ps2bf16`, as `gemm_bf16::pack_activations` rounds
    /// them) of token `t` goes to `panel[k * width + t]`. Per 16 tokens by 32 columns: two
    /// loads and one conversion per token, a [`transpose16`], 16 stores.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 available.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn fill_panel_bf16(
        x: &[f32],
        cols: usize,
        width: usize,
        lanes: usize,
        panel: &mut [u32],
    ) {
        let pairs = cols / 2;
        assert!(cols.is_multiple_of(32) && width.is_multiple_of(16) && lanes <= width);
        assert!(x.len() >= lanes * cols && panel.len() >= pairs * width);
        for lane0 in (0..lanes).step_by(16) {
            let m = 16.min(lanes - lane0);
            for k0 in (0..pairs).step_by(16) {
                let mut v = [_mm512_setzero_ps(); 16];
                for (i, v) in v.iter_mut().enumerate().take(m) {
                    let row = &x[(lane0 + i) * cols + 2 * k0..][..32];
                    // SAFETY: `row` holds the 32 floats loaded; `__m512bh` is 64 plain bytes.
                    *v = unsafe {
                        let lo = _mm512_loadu_ps(row.as_ptr());
                        let hi = _mm512_loadu_ps(row.as_ptr().add(16));
                        std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo))
                    };
                }
                store_transposed(v, &mut panel[k0 * width + lane0..], width);
            }
        }
    }

    /// Writes the 16x16 transpose of `v` (16 tokens' 16 values) to 16 runs of 16 words,
    /// `width` apart: value `j` of every token at `panel[j * width..][..16]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store_transposed(v: [__m512; 16], panel: &mut [u32], width: usize) {
        for (j, v) in transpose16(v).iter().enumerate() {
            let dst = &mut panel[j * width..][..16];
            // SAFETY: `dst` holds the 16 words stored.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().cast(), *v) };
        }
    }

    /// The 16x16 transpose of `r`: lane `j` of result `i` is lane `i` of `r[j]`. Interleaves
    /// 32-bit then 64-bit elements within 128-bit lanes, then moves whole 128-bit lanes twice:
    /// 64 shuffles.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let zero = _mm512_setzero_ps();
        // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved; per 128-bit lane k, columns 4k, 4k+1
        // and 4k+2, 4k+3.
        let mut t = [zero; 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4q + c]: per 128-bit lane k, column 4k + c of rows 4q..4q + 3.
        let mut u = [zero; 16];
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        for q in 0..4 {
            let (a, b, c, d) = (t[4 * q], t[4 * q + 2], t[4 * q + 1], t[4 * q + 3]);
            u[4 * q] = ps(_mm512_unpacklo_pd(pd(a), pd(b)));
            u[4 * q + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(b)));
            u[4 * q + 2] = ps(_mm512_unpacklo_pd(pd(c), pd(d)));
            u[4 * q + 3] = ps(_mm512_unpackhi_pd(pd(c), pd(d)));
        }
        // Column 4k + c: 128-bit lane k of u[c], u[4 + c], u[8 + c], u[12 + c], in that order.
        let mut out = [zero; 16];
        for c in 0..4 {
            let lo01 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
            let lo23 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
            let hi01 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
            let hi23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(lo01, lo23);
            out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(lo01, lo23);
            out[8 + c] = _mm512_shuffle_f32x4::<0x88>(hi01, hi23);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(hi01, hi23);
        }
        out
    }

    /// `NR` rows × `16·NV` tokens: per column, `NV` loads of the panel, `NR` weight broadcasts
    /// and `NR·NV` FMAs into registers that stay put across all columns. Every 16 columns
    /// one line of each of the `ahead.1` rows at `ahead.0` (the next tile's, which the task
    /// runs next) is requested into L2, so a tile's weights come from L2 rather than memory.
    /// A tile streams `NR` rows at once, more than the hardware prefetcher follows (a
    /// 16-sequence step ran at 11 GB/s without prefetching), and requests only a few lines
    /// ahead of each row (into L1, as before) left the memory latency in every step: the
    /// dense bf16 block products of a 16-sequence step took 20.1-21.1 ms that way, 12.1-12.6
    /// ms with the next tile in L2 (`batch_bench`, alternating).
    ///
    /// # Safety
    /// AVX-512F available; `w` valid for `NR` rows of `cols` floats, `xp` for `cols × width`
    /// with `width ≥ 16·NV` (`ahead` is only prefetched).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_f32<const NR: usize, const NV: usize>(
        w: *const f32,
        cols: usize,
        xp: *const f32,
        width: usize,
        ahead: (*const f32, usize),
        out: &mut [[f32; TOKENS]; ROWS],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; NR];
        // SAFETY: bounds are the caller's contract; prefetch addresses are only formed
        // (wrapping) and prefetches never fault.
        unsafe {
            let mut k0 = 0;
            while k0 < cols {
                for r in 0..ahead.1 {
                    let line = ahead.0.wrapping_add(r * cols + k0);
                    _mm_prefetch::<_MM_HINT_T1>(line.cast::<i8>());
                }
                for k in k0..(k0 + 16).min(cols) {
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (v, x) in xv.iter_mut().enumerate() {
                        *x = _mm512_loadu_ps(xp.add(k * width + 16 * v));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(*w.add(r * cols + k));
                        for v in 0..NV {
                            a[v] = _mm512_fmadd_ps(wv, xv[v], a[v]);
                        }
                    }
                }
                k0 += 16;
            }
            for (r, a) in acc.iter().enumerate() {
                for (v, &av) in a.iter().enumerate() {
                    _mm512_storeu_ps(out[r].as_mut_ptr().add(16 * v), av);
                }
            }
        }
    }

    /// `acc + x · broadcast(w[OFFSET bytes])` as bf16 pairs, the weight pair broadcast inside
    /// the instruction (`{1to16}`), which LLVM does not fold for `vdpbf16ps`; the offset is
    /// the instruction's displacement, so several multiplies share one row pointer.
    ///
    /// # Safety
    /// AVX512-BF16 available; `w + OFFSET` readable for 4 bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(crate) unsafe fn dp_broadcast<const OFFSET: usize>(
        acc: __m512,
        x: __m512,
        w: *const u32,
    ) -> __m512 {
        let mut a = acc;
        // SAFETY: reads the 4 bytes at `w + OFFSET` (contract); no other memory or flags.
        unsafe {
            std::arch::asm!(
                "vdpbf16ps {a}, {x}, dword ptr [{w} + {offset}]{{1to16}}",
                a = inout(zmm_reg) a,
                x = in(zmm_reg) x,
                w = in(reg) w,
                offset = const OFFSET,
                options(pure, readonly, nostack, preserves_flags)
            );
        }
        a
    }

    /// The bf16 tile: per pair of columns, `NV` loads of activation pairs, `NR` broadcasts of
    /// a weight pair (one 32-bit word) and `NR·NV` `vdpbf16ps`, each two multiply-adds per
    /// lane. Prefetch as [`tile_f32`], 16 pairs (one line) per step.
    ///
    /// # Safety
    /// AVX512-BF16 available; `w` valid for `NR` rows of `pairs` words, `xp` for
    /// `pairs × width` with `width ≥ 16·NV` (`ahead` is only prefetched).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile_bf16<const NR: usize, const NV: usize>(
        w: *const u32,
        pairs: usize,
        xp: *const u32,
        width: usize,
        ahead: (*const u32, usize),
        out: &mut [[f32; TOKENS]; ROWS],
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; NR];
        // SAFETY: as `tile_f32`; `__m512bh` and `__m512i` are both 64 plain bytes.
        unsafe {
            let mut k0 = 0;
            while k0 < pairs {
                for r in 0..ahead.1 {
                    let line = ahead.0.wrapping_add(r * pairs + k0);
                    _mm_prefetch::<_MM_HINT_T1>(line.cast::<i8>());
                }
                for k in k0..(k0 + 16).min(pairs) {
                    let mut xv = [_mm512_setzero_ps(); NV];
                    for (v, x) in xv.iter_mut().enumerate() {
                        *x = _mm512_castsi512_ps(_mm512_loadu_si512(
                            xp.add(k * width + 16 * v).cast::<__m512i>(),
                        ));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let wp = w.add(r * pairs + k);
                        for v in 0..NV {
                            a[v] = dp_broadcast::<0>(a[v], xv[v], wp);
                        }
                    }
                }
                k0 += 16;
            }
            for (r, a) in acc.iter().enumerate() {
                for (v, &av) in a.iter().enumerate() {
                    _mm512_storeu_ps(out[r].as_mut_ptr().add(16 * v), av);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize) -> Vec<f64> {
        let mut y = vec![0f64; tokens * rows];
        for t in 0..tokens {
            for r in 0..rows {
                y[t * rows + r] = (0..cols)
                    .map(|k| f64::from(w[r * cols + k]) * f64::from(x[t * cols + k]))
                    .sum();
            }
        }
        y
    }

    /// Shapes around every tile edge: 1-12 rows and ragged row tiles, 9-16 tokens (one
    /// 16-lane panel), 17-32 and more (32-lane panels with a short last one), odd and
    /// even columns, columns around the 16-column prefetch step.
    const SHAPES: [(usize, usize, usize); 9] = [
        (1, 2, 9),
        (13, 8, 17),
        (12, 34, 16),
        (25, 64, 33),
        (37, 100, 64),
        (5, 578, 70),
        (11, 18, 10),
        (192, 576, 128),
        (7, 7, 40),
    ];

    fn random(n: usize, seed: &mut u32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (*seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `n` random weights rounded to bf16: their bits, and their values as f32.
    fn bf16_weights(n: usize, seed: &mut u32) -> (Vec<u16>, Vec<f32>) {
        let bits: Vec<u16> = random(n, seed)
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let wf = bits
            .iter()
            .map(|&b| crate::element::widen_bf16(b))
            .collect();
        (bits, wf)
    }

    /// Runs `gemm` serially and split over the pool and checks every output against the
    /// f64 product, within `tol · Σ|w·x|`.
    fn check(
        w: Weights<'_>,
        wf: &[f32],
        rows: usize,
        cols: usize,
        x: &[f32],
        tokens: usize,
        tol: f64,
    ) {
        let want = reference(wf, rows, cols, x, tokens);
        // Both kernels where the CPU has AMX (the tiles take bf16 steps of up to 16 tokens).
        for (parallel, tiles) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut y = vec![f32::NAN; tokens * rows];
            let exec = Exec {
                parallel,
                ..Exec::auto()
            };
            gemm_on(
                w,
                rows,
                cols,
                x,
                tokens,
                par::Out::Init(&mut y),
                exec,
                tiles,
            );
            for t in 0..tokens {
                for r in 0..rows {
                    let bound: f64 = (0..cols)
                        .map(|k| f64::from((wf[r * cols + k] * x[t * cols + k]).abs()))
                        .sum::<f64>()
                        * tol
                        + 1e-30;
                    let (got, exp) = (f64::from(y[t * rows + r]), want[t * rows + r]);
                    assert!(
                        (got - exp).abs() <= bound,
                        "{rows}x{cols}, {tokens} tokens (tiles {tiles}): y[{t}][{r}] = {got}, \
                         expected {exp}"
                    );
                }
            }
        }
    }

    /// f32: within f32 rounding of the exact product.
    #[test]
    fn f32_matches_reference_on_awkward_shapes() {
        if !available(Isa::Avx512) {
            eprintln!("skipped: this CPU has no AVX-512F, which the tokens-in-lanes GEMM needs");
            return;
        }
        let mut seed = 7u32;
        for (rows, cols, tokens) in SHAPES {
            let w = random(rows * cols, &mut seed);
            let x = random(tokens * cols, &mut seed);
            check(Weights::F32(&w), &w, rows, cols, &x, tokens, 1e-6);
        }
    }

    /// bf16: the weights exact, the activations rounded to bf16, so within `2⁻⁸·Σ|w·x|` as
    /// the bf16 prefill (each product off by at most `2⁻⁸` of itself: bf16 keeps 8 significant bits).
    #[test]
    fn bf16_matches_reference_on_awkward_shapes() {
        if !available_bf16(Isa::Avx512, 2) {
            eprintln!("skipped: this CPU has no AVX512-BF16, which the bf16 tile needs");
            return;
        }
        let mut seed = 11u32;
        for (rows, cols, tokens) in SHAPES {
            if !cols.is_multiple_of(2) {
                assert!(
                    !available_bf16(Isa::Avx512, cols),
                    "odd columns must be refused"
                );
                continue;
            }
            let (bits, wf) = bf16_weights(rows * cols, &mut seed);
            let x = random(tokens * cols, &mut seed);
            check(
                Weights::Bf16(&bits),
                &wf,
                rows,
                cols,
                &x,
                tokens,
                1.0 / 256.0,
            );
        }
    }

    /// The AMX decode tiles' edges (`lanes_amx`): whole and partial 64-row blocks and 16-row
    /// groups, 1-16 tokens, 32 to 1536 columns; dense bf16 read in place, and rows written on
    /// demand with per-row scales (int8's route), each against the f64 product. Runs the
    /// AVX512-BF16 kernel too, so it checks something on a CPU without AMX.
    #[test]
    fn bf16_decode_tiles_match_reference() {
        if !available_bf16(Isa::Avx512, 2) {
            eprintln!("skipped: this CPU has no AVX512-BF16, which the bf16 tiles need");
            return;
        }
        if !crate::amx::enabled() {
            eprintln!("note: no AMX here (or ESPALIER_AMX=0): only the AVX512-BF16 kernel runs");
        }
        let mut seed = 5u32;
        let shapes = [
            (64, 32, 16),
            (100, 64, 3),
            (17, 96, 1),
            (200, 576, 9),
            (128, 1536, 16),
            (576, 192, 12),
        ];
        for (rows, cols, tokens) in shapes {
            let (bits, wf) = bf16_weights(rows * cols, &mut seed);
            let x = random(tokens * cols, &mut seed);
            check(
                Weights::Bf16(&bits),
                &wf,
                rows,
                cols,
                &x,
                tokens,
                1.0 / 256.0,
            );
            // Rows written on demand, scaled per row after the sum.
            let scales: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 / 64.0).collect();
            let write = |r: usize, row: &mut [half::bf16]| {
                for (v, &b) in row.iter_mut().zip(&bits[r * cols..][..cols]) {
                    *v = half::bf16::from_bits(b);
                }
            };
            let scaled: Vec<f32> = wf
                .iter()
                .enumerate()
                .map(|(i, &v)| v * scales[i / cols])
                .collect();
            let rows_w = Weights::Bf16Rows(&write, Some(&scales));
            check(rows_w, &scaled, rows, cols, &x, tokens, 1.0 / 256.0);
            // Accumulating (the training products' path): the same product added onto what
            // the output holds, by both kernels alike.
            let exec = Exec::auto();
            let panels = pack_bf16(&x, tokens, cols, panel_width(tokens), exec);
            let mut sums = Vec::new();
            for tiles in [false, true] {
                let mut y = vec![1.0f32; tokens * rows];
                let out = SharedOut::new(&mut y);
                let w = Weights::Bf16(&bits);
                gemm_panels_on(w, rows, cols, &panels, tokens, out, true, exec, tiles);
                sums.push(y);
            }
            let want = reference(&wf, rows, cols, &x, tokens);
            for (i, (&a, &b)) in sums[0].iter().zip(&sums[1]).enumerate() {
                let (t, r) = (i / rows, i % rows);
                let bound: f64 = (0..cols)
                    .map(|k| f64::from((wf[r * cols + k] * x[t * cols + k]).abs()))
                    .sum::<f64>()
                    / 256.0
                    + 1e-5;
                let exp = 1.0 + want[i];
                for got in [a, b] {
                    let err = (f64::from(got) - exp).abs();
                    assert!(
                        err <= bound,
                        "{rows}x{cols}: y[{t}][{r}] = {got}, expected {exp}"
                    );
                }
            }
        }
    }
}
