//! Prefill (`Y = X · Wᵀ`) for formats whose rows are scattered sparse: CSR, bitmap, N:M and
//! BSR shapes the panel micro-kernel does not cover.
//!
//! Unstructured rows share no columns, so the register blocking of [`crate::gemm`] does not
//! apply. Instead `X` is transposed once to `Xᵀ [cols, tokens]`; then every stored weight
//! `(c, v)` of row `r` becomes an AXPY over tokens, `Yᵀ[r, t..t+64] += v · Xᵀ[c, t..t+64]`, with
//! the 64-token slice held in 8 registers. Each FMA needs one load of `Xᵀ` (unavoidable for
//! unstructured sparsity), but `Xᵀ` stays in L2, the work is proportional to the number of
//! stored weights, and each row is decoded once per call rather than once per token.

use crate::isa::{Exec, Isa};
use crate::par::{self, SharedOut};

/// Token lanes per register tile (8 vectors of 8).
const TILE: usize = 64;

/// A format that can list the stored entries of one row.
pub(crate) trait RowDecode: Sync {
    /// Clears `idx`/`val` and fills them with row `r`'s stored `(column, value)` pairs, values
    /// widened to f32. Columns are `< cols`.
    fn decode_row(&self, r: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>);
}

/// `Y = X · Wᵀ` for a row-decodable `W` with `rows x cols`; `X` is `[tokens, cols]`, `Y`
/// `[tokens, rows]`. `prefix` (row pointer, `rows + 1` entries) balances tasks by stored
/// weights when available. Shapes are checked by the caller.
#[allow(clippy::too_many_arguments)]
pub(crate) fn row_gemm<S: RowDecode>(
    src: &S,
    rows: usize,
    cols: usize,
    prefix: Option<&[u32]>,
    stored: usize,
    x: &[f32],
    tokens: usize,
    y: &mut [f32],
    exec: Exec,
) {
    if tokens == 0 || rows == 0 {
        return;
    }
    // Xᵀ with the token dimension padded to a multiple of 8, so every tile load is a full
    // vector; the padding lanes are zero and never stored.
    let tp = tokens.div_ceil(8) * 8;
    let mut xt = vec![0.0f32; cols * tp];
    for t in 0..tokens {
        for (c, &v) in x[t * cols..(t + 1) * cols].iter().enumerate() {
            xt[c * tp + t] = v;
        }
    }
    let tasks = par::task_count(
        exec,
        rows,
        stored.saturating_mul(tokens),
        par::MIN_TASK_FLOPS,
    );
    let bounds = match prefix {
        Some(p) if tasks > 1 => par::weighted_bounds(p, tasks),
        _ => par::even_bounds(rows, tasks),
    };
    let out = SharedOut::new(y);
    let isa = exec.isa.effective();
    par::for_each_bound(&bounds, |range| {
        let mut idx = Vec::new();
        let mut val = Vec::new();
        let mut acc = [0.0f32; TILE];
        for r in range {
            src.decode_row(r, &mut idx, &mut val);
            // Checked once per row (not per tile) so the SIMD tile can read `Xᵀ` unchecked.
            assert!(
                idx.iter().all(|&c| (c as usize) < cols),
                "decoded column out of range"
            );
            let mut t0 = 0;
            while t0 < tokens {
                let nv = ((tp - t0) / 8).min(TILE / 8);
                tile(isa, nv, &idx, &val, &xt, tp, t0, &mut acc);
                for (t, &v) in acc.iter().enumerate().take((tokens - t0).min(TILE)) {
                    // SAFETY: this task owns output row r of W, i.e. column r of Y.
                    unsafe { out.write((t0 + t) * rows + r, v) };
                }
                t0 += TILE;
            }
        }
    });
}

/// One row x (8·nv)-token tile: `acc[0..8nv] = Σ val[i] · Xᵀ[idx[i], t0..]`.
#[allow(clippy::too_many_arguments)]
fn tile(
    isa: Isa,
    nv: usize,
    idx: &[u32],
    val: &[f32],
    xt: &[f32],
    tp: usize,
    t0: usize,
    acc: &mut [f32; TILE],
) {
    // Every idx < cols (checked by the caller per row), xt is [cols, tp] and t0 + 8·nv <= tp,
    // so all reads are inside `xt`.
    assert!(t0 + 8 * nv <= tp && (1..=TILE / 8).contains(&nv));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => {
            let p = xt.as_ptr();
            // SAFETY: AVX2 checked by the caller via `effective`; reads bounded as asserted.
            unsafe {
                match nv {
                    8 => x86::tile::<8>(idx, val, p, tp, t0, acc),
                    7 => x86::tile::<7>(idx, val, p, tp, t0, acc),
                    6 => x86::tile::<6>(idx, val, p, tp, t0, acc),
                    5 => x86::tile::<5>(idx, val, p, tp, t0, acc),
                    4 => x86::tile::<4>(idx, val, p, tp, t0, acc),
                    3 => x86::tile::<3>(idx, val, p, tp, t0, acc),
                    2 => x86::tile::<2>(idx, val, p, tp, t0, acc),
                    _ => x86::tile::<1>(idx, val, p, tp, t0, acc),
                }
            }
        }
        _ => {
            let n = 8 * nv;
            acc[..n].fill(0.0);
            for (&c, &v) in idx.iter().zip(val) {
                let xs = &xt[c as usize * tp + t0..][..n];
                for (a, &xv) in acc[..n].iter_mut().zip(xs) {
                    *a += v * xv;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::TILE;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2+FMA available; `xt + c*tp + t0 .. + 8*NV` readable for every `c` in `idx`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const NV: usize>(
        idx: &[u32],
        val: &[f32],
        xt: *const f32,
        tp: usize,
        t0: usize,
        acc_out: &mut [f32; TILE],
    ) {
        let mut acc = [_mm256_setzero_ps(); NV];
        for (&c, &v) in idx.iter().zip(val) {
            let vb = _mm256_set1_ps(v);
            // SAFETY: see the function contract.
            unsafe {
                let p = xt.add(c as usize * tp + t0);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(vb, _mm256_loadu_ps(p.add(8 * j)), *a);
                }
            }
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: 8·NV <= TILE lanes.
            unsafe { _mm256_storeu_ps(acc_out.as_mut_ptr().add(8 * j), *a) };
        }
    }
}
