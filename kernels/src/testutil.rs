//! Test helpers: random pruned matrices of each structure and naive references.
//!
//! References accumulate in f64 so they are more accurate than any kernel under test; the
//! tolerance is relative to `Σ|w·x|` of each output, which is what bounds f32 rounding error
//! whatever the summation order.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Deterministic generator for a test case.
pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform values in `[-1, 1)`, never exactly zero (a zero would read as pruned).
pub(crate) fn values(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if v == 0.0 { 0.5 } else { v }
        })
        .collect()
}

/// Unstructured: each weight kept with probability `density`, pruned ones exactly zero.
pub(crate) fn unstructured(rng: &mut StdRng, rows: usize, cols: usize, density: f64) -> Vec<f32> {
    let mut w = values(rng, rows * cols);
    for v in &mut w {
        if !rng.random_bool(density.clamp(0.0, 1.0)) {
            *v = 0.0;
        }
    }
    w
}

/// `br x bc` blocks kept with probability `density`; ragged edge blocks are partial.
pub(crate) fn blocky(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    br: usize,
    bc: usize,
    density: f64,
) -> Vec<f32> {
    let mut w = values(rng, rows * cols);
    for rb in 0..rows.div_ceil(br) {
        for cb in 0..cols.div_ceil(bc) {
            if !rng.random_bool(density.clamp(0.0, 1.0)) {
                for r in rb * br..(rb * br + br).min(rows) {
                    for c in cb * bc..(cb * bc + bc).min(cols) {
                        w[r * cols + c] = 0.0;
                    }
                }
            }
        }
    }
    w
}

/// N:M sparse: every group of `m` columns keeps a random subset of at most `n` (sometimes
/// fewer, to exercise the padding slots).
pub(crate) fn nm(rng: &mut StdRng, rows: usize, cols: usize, n: usize, m: usize) -> Vec<f32> {
    nm_with(rng, rows, cols, n, m, 0.2)
}

/// N:M sparse where a group keeps fewer than `n` with probability `fewer`.
pub(crate) fn nm_with(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
    fewer: f64,
) -> Vec<f32> {
    let mut w = values(rng, rows * cols);
    for r in 0..rows {
        for c0 in (0..cols).step_by(m) {
            let width = m.min(cols - c0);
            let keep = if rng.random_bool(fewer) {
                rng.random_range(0..=n)
            } else {
                n
            };
            let mut pos: Vec<usize> = (0..width).collect();
            // Fisher-Yates prefix: the first `keep` positions are a uniform random subset.
            for i in 0..width {
                let j = rng.random_range(i..width);
                pos.swap(i, j);
            }
            for &p in &pos[keep.min(width)..] {
                w[r * cols + c0 + p] = 0.0;
            }
        }
    }
    w
}

/// Rows and columns pruned whole: each kept with probability `density`.
pub(crate) fn rows_cols(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    row_density: f64,
    col_density: f64,
) -> Vec<f32> {
    let mut w = values(rng, rows * cols);
    let keep_r: Vec<bool> = (0..rows).map(|_| rng.random_bool(row_density)).collect();
    let keep_c: Vec<bool> = (0..cols).map(|_| rng.random_bool(col_density)).collect();
    for r in 0..rows {
        for c in 0..cols {
            if !(keep_r[r] && keep_c[c]) {
                w[r * cols + c] = 0.0;
            }
        }
    }
    w
}

/// Naive `Y = X·Wᵀ` in f64, plus `Σ|w·x|` per output for the tolerance.
pub(crate) fn reference(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0.0; tokens * rows];
    let mut mag = vec![0.0; tokens * rows];
    for t in 0..tokens {
        for r in 0..rows {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for c in 0..cols {
                let p = f64::from(w[r * cols + c]) * f64::from(x[t * cols + c]);
                s += p;
                a += p.abs();
            }
            y[t * rows + r] = s as f32;
            mag[t * rows + r] = a as f32;
        }
    }
    (y, mag)
}

/// Widens `mag` (from [`reference`]) by what quantizing each token's activations to i16
/// can add (the int8 GEMVs that multiply in integers do): each activation moves by at most
/// `max|x| / 65534`, so an output by `Σ|w| · max|x| / 65534`, expressed in the units
/// [`assert_close`] scales by `1e-5`.
pub(crate) fn widen_for_i16_activations(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
    mag: &mut [f32],
) {
    for t in 0..tokens {
        let xt = &x[t * cols..][..cols];
        let xmax = xt.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for r in 0..rows {
            let wsum: f32 = w[r * cols..][..cols].iter().map(|v| v.abs()).sum();
            // 1.01: the bound itself is computed in f32.
            mag[t * rows + r] += wsum * xmax / 65534.0 / 1e-5 * 1.01;
        }
    }
}

/// Asserts `got` matches the reference within `1e-5 · Σ|w·x|` (plus a tiny absolute floor).
pub(crate) fn assert_close(got: &[f32], want: &[f32], mag: &[f32], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = 1e-5 * m + 1e-30;
        assert!(
            (g - w).abs() <= tol,
            "{ctx}: output {i}: got {g}, want {w} (tolerance {tol})"
        );
    }
}
