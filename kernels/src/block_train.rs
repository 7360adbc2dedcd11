//! Block-sparse products for training a layer whose mask keeps whole 16×16 blocks (e.g. 80%
//! of the blocks pruned): the three products of a linear layer's forward and backward pass,
//! reading and writing only kept blocks.
//!
//! * forward `Y = X·Wᵀ` ([`BlockTraining::forward`]),
//! * input gradient `dX = dY·W` ([`BlockTraining::input_grad`]),
//! * weight gradient `dW += dYᵀ·X` on kept blocks only ([`BlockTraining::weight_grad`]).
//!
//! The pattern ([`BlockPattern`]) comes from the mask, not the weights: a kept block whose
//! weights happen to be zero (RigL's regrown weights start at zero) still gets its gradient.
//! Weights change every optimizer step, so [`BlockTraining::pack`] copies the kept blocks of
//! the current dense weight (two layouts: transposed by block-row for the forward, as stored
//! by block-column for the input gradient) once per pass; that is a fifth of the weight at
//! 80% sparsity, a few percent of the products' time.
//!
//! The forward and input-gradient products are one kernel: for each output block of 16
//! columns, a tile of 8 tokens × 16 outputs is accumulated in registers over the kept blocks'
//! 16 inner indices (one 16-wide weight load and 8 broadcasts per 8 FMAs). The weight
//! gradient of a kept block accumulates 16 rows × 16 columns in registers over all tokens.
//! Work is split over tokens (forward, input gradient) or block-rows (weight gradient), so
//! threads never write the same element, and every element's sum runs in a fixed order:
//! results do not depend on the thread count.

use rayon::prelude::*;

use crate::Isa;

/// The block edge: 16 f32 are one AVX-512 register.
pub const TRAIN_BLOCK: usize = 16;

/// Tokens per register tile in the forward and input-gradient kernel.
const TILE: usize = 8;

/// Tokens per parallel task in the forward and input-gradient kernel.
const TOKENS_PER_TASK: usize = 64;

/// Which 16×16 blocks of an `[out, in]` weight are kept, by block-row and by block-column.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPattern {
    out: usize,
    inp: usize,
    /// Per block-row, the kept block-columns in increasing order.
    by_row: Vec<Vec<u32>>,
    /// Per block-column, the kept block-rows in increasing order.
    by_col: Vec<Vec<u32>>,
}

impl BlockPattern {
    /// The blocks of `keep` (`[out, in]` row-major, `true` = kept) holding at least one kept
    /// position; `None` unless both dimensions are multiples of [`TRAIN_BLOCK`] and `keep`
    /// has `out · in` entries.
    pub fn from_mask(keep: &[bool], out: usize, inp: usize) -> Option<Self> {
        let b = TRAIN_BLOCK;
        if !out.is_multiple_of(b) || !inp.is_multiple_of(b) || keep.len() != out * inp {
            return None;
        }
        let (rows, cols) = (out / b, inp / b);
        let by_row: Vec<Vec<u32>> = (0..rows)
            .into_par_iter()
            .map(|rb| {
                (0..cols as u32)
                    .filter(|&cb| {
                        let c0 = cb as usize * b;
                        (0..b).any(|r| keep[(rb * b + r) * inp + c0..][..b].contains(&true))
                    })
                    .collect()
            })
            .collect();
        let mut by_col = vec![Vec::new(); cols];
        for (rb, kept) in by_row.iter().enumerate() {
            for &cb in kept {
                by_col[cb as usize].push(rb as u32);
            }
        }
        Some(BlockPattern {
            out,
            inp,
            by_row,
            by_col,
        })
    }

    /// Kept blocks over all blocks.
    pub fn density(&self) -> f64 {
        let kept: usize = self.by_row.iter().map(Vec::len).sum();
        let all = self.by_row.len() * self.by_col.len();
        if all == 0 {
            0.0
        } else {
            kept as f64 / all as f64
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }
}

/// A [`BlockPattern`] with the kept blocks of one weight packed for the products.
#[derive(Debug, Clone)]
pub struct BlockTraining {
    pattern: BlockPattern,
    /// Per block-row, its kept blocks transposed (`[c][r]`), in `by_row` order.
    forward_blocks: Vec<f32>,
    /// Per block-column, its kept blocks as stored (`[r][c]`), in `by_col` order.
    input_blocks: Vec<f32>,
    isa: Isa,
}

impl BlockTraining {
    /// An empty packing for `pattern`; call [`BlockTraining::pack`] before the products.
    pub fn new(pattern: BlockPattern, isa: Isa) -> Self {
        BlockTraining {
            pattern,
            forward_blocks: Vec::new(),
            input_blocks: Vec::new(),
            isa: isa.effective(),
        }
    }

    pub fn pattern(&self) -> &BlockPattern {
        &self.pattern
    }

    /// Copies the kept blocks of `w` (`[out, in]` row-major). Panics if `w` has another size
    /// (an internal error: the caller made the pattern from this layer's mask).
    pub fn pack(&mut self, w: &[f32]) {
        let (out, inp) = (self.pattern.out, self.pattern.inp);
        assert_eq!(w.len(), out * inp, "block packing: weight size");
        let b = TRAIN_BLOCK;
        let kept: usize = self.pattern.by_row.iter().map(Vec::len).sum();
        self.forward_blocks.clear();
        self.forward_blocks.reserve(kept * b * b);
        for (rb, cols) in self.pattern.by_row.iter().enumerate() {
            for &cb in cols {
                let c0 = cb as usize * b;
                for c in 0..b {
                    for r in 0..b {
                        self.forward_blocks.push(w[(rb * b + r) * inp + c0 + c]);
                    }
                }
            }
        }
        self.input_blocks.clear();
        self.input_blocks.reserve(kept * b * b);
        for (cb, rows) in self.pattern.by_col.iter().enumerate() {
            for &rb in rows {
                let r0 = rb as usize * b;
                for r in 0..b {
                    let row = (r0 + r) * inp + cb * b;
                    self.input_blocks.extend_from_slice(&w[row..row + b]);
                }
            }
        }
    }

    /// `y = x·Wᵀ` (or `y += x·Wᵀ` when `accumulate`) over the kept blocks, `x: [n, in]`,
    /// `y: [n, out]`, row-major.
    pub fn forward(&self, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) {
        let (out, inp) = (self.pattern.out, self.pattern.inp);
        assert!(
            x.len() == n * inp && y.len() == n * out,
            "block forward: shapes"
        );
        block_product(
            (x, inp),
            (&self.pattern.by_row, &self.forward_blocks),
            (y, out),
            accumulate,
            self.isa,
        );
    }

    /// `dx = dy·W` (or `dx += dy·W` when `accumulate`) over the kept blocks, `dy: [n, out]`,
    /// `dx: [n, in]`, row-major.
    pub fn input_grad(&self, dy: &[f32], n: usize, dx: &mut [f32], accumulate: bool) {
        let (out, inp) = (self.pattern.out, self.pattern.inp);
        assert!(
            dy.len() == n * out && dx.len() == n * inp,
            "block input grad: shapes"
        );
        block_product(
            (dy, out),
            (&self.pattern.by_col, &self.input_blocks),
            (dx, inp),
            accumulate,
            self.isa,
        );
    }

    /// `sum += dyᵀ·x` on the kept blocks of `sum` (`[out, in]` row-major; pruned blocks are
    /// left as they are), `dy: [n, out]`, `x: [n, in]`.
    pub fn weight_grad(&self, dy: &[f32], x: &[f32], n: usize, sum: &mut [f32]) {
        let (out, inp) = (self.pattern.out, self.pattern.inp);
        assert!(
            dy.len() == n * out && x.len() == n * inp && sum.len() == out * inp,
            "block weight grad: shapes"
        );
        let b = TRAIN_BLOCK;
        let isa = self.isa;
        sum.par_chunks_mut(b * inp)
            .zip(self.pattern.by_row.par_iter())
            .enumerate()
            .for_each(|(rb, (rows, cols))| {
                for &cb in cols {
                    let c0 = cb as usize * b;
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `isa` is effective, so AVX-512F is present; the shapes
                        // were checked above (every read of `dy`, `x` and write of `rows`
                        // is in bounds).
                        Isa::Avx512 => unsafe {
                            x86::block_weight_grad(dy, out, rb * b, x, inp, c0, n, rows)
                        },
                        _ => portable_block_weight_grad(dy, out, rb * b, x, inp, c0, n, rows),
                    }
                }
            });
    }
}

/// `c[:, ob·16..+16] (+)= Σ_kb a[:, kb·16..+16] · block(ob, kb)` for every output block `ob`,
/// blocks stored `[k][o]` in `lists[ob]` order. Split over tokens.
fn block_product(
    (a, a_width): (&[f32], usize),
    (lists, blocks): (&[Vec<u32>], &[f32]),
    (c, c_width): (&mut [f32], usize),
    accumulate: bool,
    isa: Isa,
) {
    let b = TRAIN_BLOCK;
    // Offset of each output block's first packed block.
    let mut starts = Vec::with_capacity(lists.len());
    let mut at = 0;
    for list in lists {
        starts.push(at);
        at += list.len() * b * b;
    }
    c.par_chunks_mut(TOKENS_PER_TASK * c_width)
        .enumerate()
        .for_each(|(task, c)| {
            let t0 = task * TOKENS_PER_TASK;
            let tokens = c.len() / c_width;
            let a = &a[t0 * a_width..(t0 + tokens) * a_width];
            for (ob, list) in lists.iter().enumerate() {
                let packed = &blocks[starts[ob]..starts[ob] + list.len() * b * b];
                let mut t = 0;
                while t < tokens {
                    let rows = TILE.min(tokens - t);
                    let a = &a[t * a_width..(t + rows) * a_width];
                    let c = &mut c[t * c_width..(t + rows) * c_width];
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: AVX-512F is present (`isa` is effective); `a` holds `rows`
                        // rows of `a_width` with every listed block inside them, `c` holds
                        // `rows` rows of `c_width` with output block `ob` inside them, and
                        // `packed` holds `list.len()` blocks.
                        Isa::Avx512 if rows == TILE => unsafe {
                            x86::tile8(a, a_width, list, packed, c, c_width, ob * b, accumulate)
                        },
                        _ => portable_tile(
                            (a, a_width),
                            (list, packed),
                            (c, c_width, ob * b),
                            rows,
                            accumulate,
                        ),
                    }
                    t += rows;
                }
            }
        });
}

fn portable_tile(
    (a, a_width): (&[f32], usize),
    (list, packed): (&[u32], &[f32]),
    (c, c_width, o0): (&mut [f32], usize, usize),
    rows: usize,
    accumulate: bool,
) {
    let b = TRAIN_BLOCK;
    for t in 0..rows {
        let mut acc = [0f32; TRAIN_BLOCK];
        for (i, &kb) in list.iter().enumerate() {
            let block = &packed[i * b * b..(i + 1) * b * b];
            let k0 = kb as usize * b;
            for k in 0..b {
                let av = a[t * a_width + k0 + k];
                for (acc, w) in acc.iter_mut().zip(&block[k * b..(k + 1) * b]) {
                    *acc += av * w;
                }
            }
        }
        let dst = &mut c[t * c_width + o0..][..b];
        if accumulate {
            dst.iter_mut().zip(&acc).for_each(|(d, a)| *d += a);
        } else {
            dst.copy_from_slice(&acc);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn portable_block_weight_grad(
    dy: &[f32],
    out: usize,
    r0: usize,
    x: &[f32],
    inp: usize,
    c0: usize,
    n: usize,
    rows: &mut [f32],
) {
    let b = TRAIN_BLOCK;
    let mut acc = [[0f32; TRAIN_BLOCK]; TRAIN_BLOCK];
    for t in 0..n {
        let xs = &x[t * inp + c0..][..b];
        for (r, acc) in acc.iter_mut().enumerate() {
            let g = dy[t * out + r0 + r];
            acc.iter_mut().zip(xs).for_each(|(a, x)| *a += g * x);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        rows[r * inp + c0..][..b]
            .iter_mut()
            .zip(acc)
            .for_each(|(s, a)| *s += a);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{TILE, TRAIN_BLOCK};

    /// One 8-token tile of one output block: see `block_product`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile8(
        a: &[f32],
        a_width: usize,
        list: &[u32],
        packed: &[f32],
        c: &mut [f32],
        c_width: usize,
        o0: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller guarantees AVX-512F and that every index below is in bounds
        // (see `block_product`).
        unsafe {
            let b = TRAIN_BLOCK;
            let mut acc = [_mm512_setzero_ps(); TILE];
            let ap = a.as_ptr();
            for (i, &kb) in list.iter().enumerate() {
                let block = packed.as_ptr().add(i * b * b);
                let k0 = kb as usize * b;
                for k in 0..b {
                    let w = _mm512_loadu_ps(block.add(k * b));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let av = _mm512_set1_ps(*ap.add(t * a_width + k0 + k));
                        *acc = _mm512_fmadd_ps(av, w, *acc);
                    }
                }
            }
            let cp = c.as_mut_ptr();
            for (t, acc) in acc.iter().enumerate() {
                let dst = cp.add(t * c_width + o0);
                let v = if accumulate {
                    _mm512_add_ps(_mm512_loadu_ps(dst), *acc)
                } else {
                    *acc
                };
                _mm512_storeu_ps(dst, v);
            }
        }
    }

    /// `rows[r][c0..c0+16] += Σ_t dy[t][r0 + r] · x[t][c0..c0+16]` for the block's 16 rows.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn block_weight_grad(
        dy: &[f32],
        out: usize,
        r0: usize,
        x: &[f32],
        inp: usize,
        c0: usize,
        n: usize,
        rows: &mut [f32],
    ) {
        // SAFETY: the caller guarantees AVX-512F, `n` rows of `dy` (`out` wide) and `x` (`inp`
        // wide), and 16 rows of `rows` (`inp` wide) with columns `c0..c0 + 16` inside.
        unsafe {
            let mut acc = [_mm512_setzero_ps(); TRAIN_BLOCK];
            let (dp, xp) = (dy.as_ptr(), x.as_ptr());
            for t in 0..n {
                let xv = _mm512_loadu_ps(xp.add(t * inp + c0));
                let g = dp.add(t * out + r0);
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*g.add(r)), xv, *acc);
                }
            }
            let sp = rows.as_mut_ptr();
            for (r, acc) in acc.iter().enumerate() {
                let dst = sp.add(r * inp + c0);
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), *acc));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::testutil::rng;

    /// A `[out, in]` mask keeping each 16×16 block with probability `density` (and, inside
    /// kept blocks, dropping some positions, which must not matter to the pattern).
    fn mask(out: usize, inp: usize, density: f64, rng: &mut StdRng) -> Vec<bool> {
        let b = TRAIN_BLOCK;
        let kept: Vec<bool> = (0..(out / b) * (inp / b))
            .map(|_| rng.random::<f64>() < density)
            .collect();
        (0..out * inp)
            .map(|i| {
                let (r, c) = (i / inp, i % inp);
                kept[(r / b) * (inp / b) + c / b] && rng.random::<f64>() < 0.9
            })
            .collect()
    }

    fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            worst <= 1e-5 * scale,
            "{what}: max |Δ| {worst} (scale {scale})"
        );
    }

    /// All three products equal dense products with the pruned weights zeroed, on every ISA
    /// this CPU has, for token counts that leave partial tiles and tasks; pruned blocks of the
    /// gradient sum are left untouched.
    #[test]
    fn products_equal_dense_references() {
        let mut rng = rng(7);
        for &(out, inp, density) in &[(32, 48, 0.5), (64, 32, 0.2), (48, 80, 1.0), (16, 16, 0.0)] {
            let keep = mask(out, inp, density, &mut rng);
            let pattern = BlockPattern::from_mask(&keep, out, inp).unwrap();
            let w: Vec<f32> = random(out * inp, &mut rng)
                .into_iter()
                .zip(&keep)
                .map(|(w, &k)| if k { w } else { 0.0 })
                .collect();
            for n in [1, 7, 8, 13, 70, 131] {
                let x = random(n * inp, &mut rng);
                let dy = random(n * out, &mut rng);
                let mut y_ref = vec![0f32; n * out];
                let mut dx_ref = vec![0f32; n * inp];
                let mut dw_ref = vec![0f32; out * inp];
                for t in 0..n {
                    for o in 0..out {
                        for i in 0..inp {
                            y_ref[t * out + o] += x[t * inp + i] * w[o * inp + i];
                            dx_ref[t * inp + i] += dy[t * out + o] * w[o * inp + i];
                            dw_ref[o * inp + i] += dy[t * out + o] * x[t * inp + i];
                        }
                    }
                }
                // Pruned blocks keep what the sum held (here 0.5), kept ones add to it.
                let b = TRAIN_BLOCK;
                for (i, g) in dw_ref.iter_mut().enumerate() {
                    let (rb, cb) = ((i / inp) / b, (i % inp) / b);
                    let kept = pattern.by_row[rb].contains(&(cb as u32));
                    *g = if kept { *g + 0.5 } else { 0.5 };
                }
                for isa in Isa::all_available() {
                    let mut train = BlockTraining::new(pattern.clone(), isa);
                    train.pack(&w);
                    let mut y = vec![f32::NAN; n * out];
                    train.forward(&x, n, &mut y, false);
                    close(&y, &y_ref, &format!("{isa:?} forward {out}x{inp} n={n}"));
                    let mut dx = vec![1.0f32; n * inp];
                    train.input_grad(&dy, n, &mut dx, true);
                    let plus_one: Vec<f32> = dx_ref.iter().map(|v| v + 1.0).collect();
                    close(
                        &dx,
                        &plus_one,
                        &format!("{isa:?} input grad {out}x{inp} n={n}"),
                    );
                    let mut dw = vec![0.5f32; out * inp];
                    train.weight_grad(&dy, &x, n, &mut dw);
                    close(
                        &dw,
                        &dw_ref,
                        &format!("{isa:?} weight grad {out}x{inp} n={n}"),
                    );
                }
            }
        }
    }

    #[test]
    fn patterns_need_whole_blocks_and_count_density() {
        assert!(BlockPattern::from_mask(&[true; 24 * 16], 24, 16).is_none());
        assert!(BlockPattern::from_mask(&[true; 10], 16, 16).is_none());
        let mut keep = vec![false; 32 * 32];
        keep[17 * 32 + 3] = true; // block (1, 0)
        let p = BlockPattern::from_mask(&keep, 32, 32).unwrap();
        assert_eq!(p.by_row, vec![vec![], vec![0]]);
        assert_eq!(p.by_col, vec![vec![1], vec![]]);
        assert_eq!(p.density(), 0.25);
    }
}
