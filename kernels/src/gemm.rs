//! Register-blocked GEMM micro-kernel shared by dense and BSR prefill (`Y = X · Wᵀ`).
//!
//! Prefill is compute bound, so what matters is keeping the FMA units busy. On AVX2 the
//! micro-kernel computes a 6-token x 16-row tile of `Y` held in 12 registers; each step over the
//! input dimension loads 16 weights (2 vectors) and broadcasts 6 activations, for 12 FMAs: the
//! FMA pipes, not the loads, are the limit. On AVX-512 the tile is [`MR_512`] tokens x 16 rows,
//! one 512-bit accumulator per token: each step loads the 16 weights once and does one FMA per
//! token with the activation broadcast from memory inside the instruction, so 14 FMAs cost 15
//! loads and the 32 registers hold the whole tile (the AVX2 tile re-reads each panel row for
//! every 6 tokens; this one for every 14, and issues half the instructions per product).
//! Weights are read from a *panel*: the weights of 16
//! consecutive output rows for consecutive input columns, stored column-major
//! (`panel[k * ld + r]`). Dense weights are packed into that layout on the fly (once per panel,
//! amortised over every token tile); BSR blocks with `br` a multiple of 16 already are in it,
//! so the kernel reads them in place, one [`Segment`] per stored block, and skips the pruned
//! blocks entirely, which is where the BSR speed-up comes from.

use crate::isa::Isa;
use crate::par::SharedOut;

/// Tokens per register tile (AVX2 and portable).
pub(crate) const MR: usize = 6;
/// Tokens per register tile on AVX-512: 14 accumulators and the weight vector, leaving
/// registers for the compiler's addressing.
pub(crate) const MR_512: usize = 14;
/// Output rows per register tile (two 8-lane vectors).
pub(crate) const NR: usize = 16;

/// `kc` consecutive input columns starting at `col`, whose weights for the current 16 output rows
/// start at `offset` in the panel buffer (`panel[offset + k * ld + r]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub col: usize,
    pub kc: usize,
    pub offset: usize,
}

/// Writes `Y[t, r0 .. r0 + nr] = Σ_seg Σ_k X[t, seg.col + k] · panel[seg.offset + k*ld + r]` for
/// every token `t`, where `X` is `[tokens, ldx]` and `Y` is `[tokens, ldy]`, both row-major.
///
/// Only columns `r0 .. r0 + nr` of `Y` are written; the caller's tasks own disjoint row ranges,
/// which is what makes the shared writes sound.
#[allow(clippy::too_many_arguments)]
pub(crate) fn panel_gemm(
    isa: Isa,
    x: &[f32],
    tokens: usize,
    ldx: usize,
    segs: &[Segment],
    panel: &[f32],
    ld: usize,
    out: SharedOut,
    ldy: usize,
    r0: usize,
    nr: usize,
) {
    // Validate once here so the micro-kernels can use unchecked pointer arithmetic.
    assert!(nr <= NR && ld >= NR, "panel tile {nr} rows, ld {ld}");
    assert!(x.len() >= tokens * ldx, "x shorter than tokens * ldx");
    assert!(r0 + nr <= ldy, "rows {r0}+{nr} beyond ldy {ldy}");
    for s in segs {
        assert!(s.col + s.kc <= ldx, "segment columns beyond ldx");
        assert!(
            s.kc == 0 || s.offset + (s.kc - 1) * ld + NR <= panel.len(),
            "segment beyond the panel buffer"
        );
    }
    let isa = isa.effective();
    let mr = if isa == Isa::Avx512 { MR_512 } else { MR };
    // Even tiles: 128 tokens run as 8 x 13 + 2 x 12 on AVX-512 rather than 9 x 14 + 2, whose
    // last tile would wait on its two accumulators' FMA latency.
    let tiles = tokens.div_ceil(mr);
    let mut tile: Tile = [[0.0; NR]; MR_512];
    let mut t0 = 0;
    for i in 0..tiles {
        let nt = (tokens - t0).div_ceil(tiles - i);
        micro_kernel(isa, nt, &x[t0 * ldx..], ldx, segs, panel, ld, &mut tile);
        store_tile(&tile[..nt], t0, out, ldy, r0, nr);
        t0 += nt;
    }
}

/// A register tile's results: up to [`MR_512`] tokens × [`NR`] rows (the AVX2 and portable
/// kernels fill the first [`MR`]).
type Tile = [[f32; NR]; MR_512];

/// Runs the micro-kernel of `isa` (already effective) for `nt` tokens (at most [`MR_512`] on
/// AVX-512, [`MR`] otherwise) into the first `nt` rows of `tile`. The bounds were checked by
/// [`panel_gemm`]: `nt` rows of `x` and every segment inside `panel`.
#[allow(clippy::too_many_arguments)]
fn micro_kernel(
    isa: Isa,
    nt: usize,
    x: &[f32],
    ldx: usize,
    segs: &[Segment],
    panel: &[f32],
    ld: usize,
    tile: &mut Tile,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let (xs, p, t) = (x.as_ptr(), panel.as_ptr(), &mut *tile);
        // SAFETY: `isa` is effective, so its instructions exist; the bounds are
        // `panel_gemm`'s asserts (see above), and `nt` is within the ISA's tile.
        match isa {
            Isa::Avx512 => unsafe {
                match nt {
                    14 => x86::mk512::<14>(xs, ldx, segs, p, ld, t),
                    13 => x86::mk512::<13>(xs, ldx, segs, p, ld, t),
                    12 => x86::mk512::<12>(xs, ldx, segs, p, ld, t),
                    11 => x86::mk512::<11>(xs, ldx, segs, p, ld, t),
                    10 => x86::mk512::<10>(xs, ldx, segs, p, ld, t),
                    9 => x86::mk512::<9>(xs, ldx, segs, p, ld, t),
                    8 => x86::mk512::<8>(xs, ldx, segs, p, ld, t),
                    7 => x86::mk512::<7>(xs, ldx, segs, p, ld, t),
                    6 => x86::mk512::<6>(xs, ldx, segs, p, ld, t),
                    5 => x86::mk512::<5>(xs, ldx, segs, p, ld, t),
                    4 => x86::mk512::<4>(xs, ldx, segs, p, ld, t),
                    3 => x86::mk512::<3>(xs, ldx, segs, p, ld, t),
                    2 => x86::mk512::<2>(xs, ldx, segs, p, ld, t),
                    _ => x86::mk512::<1>(xs, ldx, segs, p, ld, t),
                }
                return;
            },
            Isa::Avx2Fma => unsafe {
                match nt {
                    6 => x86::mk::<6>(xs, ldx, segs, p, ld, t),
                    5 => x86::mk::<5>(xs, ldx, segs, p, ld, t),
                    4 => x86::mk::<4>(xs, ldx, segs, p, ld, t),
                    3 => x86::mk::<3>(xs, ldx, segs, p, ld, t),
                    2 => x86::mk::<2>(xs, ldx, segs, p, ld, t),
                    _ => x86::mk::<1>(xs, ldx, segs, p, ld, t),
                }
                return;
            },
            Isa::Portable => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    mk_portable(nt, x, ldx, segs, panel, ld, tile);
}

/// Writes the first `nr` lanes of each tile row to `Y[t0 + t, r0 ..]`.
fn store_tile(tile: &[[f32; NR]], t0: usize, out: SharedOut, ldy: usize, r0: usize, nr: usize) {
    for (t, row) in tile.iter().enumerate() {
        let nr = nr.min(row.len());
        // SAFETY: this task owns output rows r0..r0+nr (see `panel_gemm`).
        unsafe { out.write_run((t0 + t) * ldy + r0, nr, |i| row[i]) };
    }
}

/// Portable micro-kernel: same tile and summation order as the AVX2 one.
fn mk_portable(
    nt: usize,
    x: &[f32],
    ldx: usize,
    segs: &[Segment],
    panel: &[f32],
    ld: usize,
    tile: &mut Tile,
) {
    for row in tile.iter_mut() {
        *row = [0.0; NR];
    }
    for s in segs {
        for k in 0..s.kc {
            let w: &[f32; NR] = panel[s.offset + k * ld..][..NR]
                .try_into()
                .expect("slice of NR");
            for (t, acc) in tile.iter_mut().enumerate().take(nt) {
                let xv = x[t * ldx + s.col + k];
                for r in 0..NR {
                    acc[r] += xv * w[r];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Segment;
    use std::arch::x86_64::*;

    /// AVX-512 micro-kernel for `NT` tokens (at most [`super::MR_512`]): one accumulator per token,
    /// each step one weight vector and `NT` FMAs whose activation operand is a broadcast from
    /// memory (`vfmadd231ps zmm, zmm, [x]{1to16}`).
    ///
    /// # Safety
    /// AVX-512F available; `x` valid for `NT` rows of stride `ldx` covering every segment's
    /// columns; `panel` valid for every segment's `offset + (kc-1)*ld + 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn mk512<const NT: usize>(
        x: *const f32,
        ldx: usize,
        segs: &[Segment],
        panel: *const f32,
        ld: usize,
        tile: &mut super::Tile,
    ) {
        let mut acc = [_mm512_setzero_ps(); NT];
        for s in segs {
            // SAFETY: bounds are the caller's contract (checked by `panel_gemm`).
            unsafe {
                let mut w = panel.add(s.offset);
                let mut xp = x.add(s.col);
                for _ in 0..s.kc {
                    let wv = _mm512_loadu_ps(w);
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(t * ldx)), wv, *a);
                    }
                    // wrapping: after the last step these may point past the buffers; they are
                    // never dereferenced there.
                    xp = xp.wrapping_add(1);
                    w = w.wrapping_add(ld);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: tile rows have 16 lanes.
            unsafe { _mm512_storeu_ps(tile[t].as_mut_ptr(), *a) };
        }
    }

    /// AVX2 micro-kernel for `NT` tokens: 2·NT accumulators stay in registers across all
    /// segments, so the output tile is stored once per panel.
    ///
    /// # Safety
    /// AVX2+FMA available; `x` valid for `NT` rows of stride `ldx` covering every segment's
    /// columns; `panel` valid for every segment's `offset + (kc-1)*ld + 16`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn mk<const NT: usize>(
        x: *const f32,
        ldx: usize,
        segs: &[Segment],
        panel: *const f32,
        ld: usize,
        tile: &mut super::Tile,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; NT];
        for s in segs {
            // SAFETY: bounds are the caller's contract (checked by `panel_gemm`).
            unsafe {
                let mut w = panel.add(s.offset);
                let mut xp = x.add(s.col);
                for _ in 0..s.kc {
                    let w0 = _mm256_loadu_ps(w);
                    let w1 = _mm256_loadu_ps(w.add(8));
                    for (t, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_broadcast_ss(&*xp.add(t * ldx));
                        a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                        a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                    }
                    // wrapping: after the last step these may point past the buffers; they are
                    // never dereferenced there.
                    xp = xp.wrapping_add(1);
                    w = w.wrapping_add(ld);
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            // SAFETY: tile rows have 16 lanes.
            unsafe {
                _mm256_storeu_ps(tile[t].as_mut_ptr(), a[0]);
                _mm256_storeu_ps(tile[t].as_mut_ptr().add(8), a[1]);
            }
        }
    }
}
