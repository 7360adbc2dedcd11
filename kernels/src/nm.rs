//! N:M semi-structured sparsity, packed: in every row, each group of `M` consecutive input
//! weights (along `cols`) keeps at most `N`; we store exactly `N` values per group plus, for
//! each, its `log2(M)`-bit position inside the group.
//!
//! 2:4 in f32 reads 2 values + 4 bits per 4 weights = 2.125 bytes per weight (1.88x less than
//! dense); 4:8 reads 4 values + 12 bits per 8 weights (2.19 bytes per weight). A matrix that
//! breaks the pattern is refused with [`KernelError::NotNm`] naming the layer: a wrong
//! declaration is a bug upstream, and silently densifying would hide it. Groups keeping fewer
//! than `N` store explicit zeros (at unused positions, so positions in a group stay distinct).
//!
//! Metadata is a little-endian bit stream per row (row starts byte-aligned): slot `s` of group
//! `g` uses bits `[(g·N + s)·b, +b)`. For `M == 2N` with `N ∈ {1, 2, 4}` (1:2, 2:4, 4:8), eight
//! slots cover exactly 16 columns and `8·b` bits, i.e. `b` whole bytes; the AVX2 kernel turns
//! those bits into lane indices with a variable shift and gathers the matching activations
//! with two in-register permutes of the 16 activations (no memory gather).

use crate::element::{Dtype, Element, Values, with_values};
use crate::error::{KernelError, Result, checked_len, expect_len};
use crate::isa::{Exec, Isa};
use crate::par::{self, SharedOut};
use crate::rowgemm::{self, RowDecode};
use crate::view::DenseView;

/// Spare metadata bytes so the AVX2 kernel can read 4 bytes at any chunk start.
pub(crate) const META_PAD: usize = 4;

/// Packed N:M weights `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct NmMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) n: usize,
    pub(crate) m: usize,
    /// Bits per in-group position: log2(m).
    pub(crate) bits: usize,
    /// Groups per row: ceil(cols / m) (a ragged last group is allowed).
    pub(crate) groups: usize,
    /// Metadata bytes per row.
    pub(crate) meta_stride: usize,
    pub(crate) meta: Vec<u8>,
    /// `groups * n` values per row.
    pub(crate) values: Values,
}

/// Checks that `n:m` is a supported pattern.
pub(crate) fn check_nm(n: usize, m: usize) -> Result<()> {
    if !(2..=256).contains(&m) || !m.is_power_of_two() || n == 0 || n >= m {
        return Err(KernelError::InvalidParameter(format!(
            "N:M sparsity {n}:{m} needs M a power of two in 2..=256 and 0 < N < M"
        )));
    }
    Ok(())
}

impl NmMatrix {
    /// Packs the view as `n:m`; fails with [`KernelError::NotNm`] (naming `layer`) if any group
    /// keeps more than `n` weights.
    pub fn from_view(
        layer: &str,
        view: &DenseView<'_>,
        n: usize,
        m: usize,
        dtype: Dtype,
    ) -> Result<NmMatrix> {
        if dtype == Dtype::I8 {
            return crate::quant::pack_i8(
                view,
                |qv| Self::from_view(layer, qv, n, m, Dtype::F32),
                |w| &mut w.values,
            );
        }
        check_nm(n, m)?;
        let (rows, cols) = (view.rows(), view.cols());
        let bits = m.trailing_zeros() as usize;
        let groups = cols.div_ceil(m);
        let meta_stride = (checked_len(groups, n * bits)?).div_ceil(8);
        let mut meta = vec![0u8; checked_len(rows, meta_stride)? + META_PAD];
        let mut vals = Vec::with_capacity(checked_len(rows, groups * n)?);
        let mut kept = Vec::with_capacity(m);
        for r in 0..rows {
            let mrow = &mut meta[r * meta_stride..(r + 1) * meta_stride];
            for g in 0..groups {
                let c0 = g * m;
                let width = m.min(cols - c0);
                kept.clear();
                kept.extend((0..width).filter(|&i| view.is_kept(r, c0 + i)));
                if kept.len() > n {
                    return Err(KernelError::NotNm {
                        layer: layer.to_string(),
                        n,
                        m,
                        row: r,
                        col: c0,
                        col_end: c0 + width,
                        kept: kept.len(),
                    });
                }
                let real = kept.len();
                // Pad with unused positions so positions within a group stay distinct.
                // Unused positions exist: real < n < m. Collected first because `kept` grows.
                let free: Vec<usize> = (0..m)
                    .filter(|i| !kept.contains(i))
                    .take(n - real)
                    .collect();
                kept.extend(free);
                for (s, &i) in kept.iter().enumerate() {
                    let v = if s < real { view.get(r, c0 + i) } else { 0.0 };
                    vals.push(v);
                    write_bits(mrow, (g * n + s) * bits, bits, i);
                }
            }
        }
        Ok(NmMatrix {
            rows,
            cols,
            n,
            m,
            bits,
            groups,
            meta_stride,
            meta,
            values: Values::from_f32(dtype, vals),
        })
    }

    /// Packs dense-with-zeros weights as `n:m` (see [`NmMatrix::from_view`]).
    pub fn from_dense(
        layer: &str,
        w: &[f32],
        rows: usize,
        cols: usize,
        n: usize,
        m: usize,
        dtype: Dtype,
    ) -> Result<NmMatrix> {
        Self::from_view(layer, &DenseView::new(w, rows, cols)?, n, m, dtype)
    }

    /// Checks that the view is `n:m` sparse without packing it; the error is the one
    /// [`NmMatrix::from_view`] would return.
    pub fn validate(layer: &str, view: &DenseView<'_>, n: usize, m: usize) -> Result<()> {
        check_nm(n, m)?;
        let cols = view.cols();
        for r in 0..view.rows() {
            for c0 in (0..cols).step_by(m) {
                let col_end = (c0 + m).min(cols);
                let kept = (c0..col_end).filter(|&c| view.is_kept(r, c)).count();
                if kept > n {
                    return Err(KernelError::NotNm {
                        layer: layer.to_string(),
                        n,
                        m,
                        row: r,
                        col: c0,
                        col_end,
                        kept,
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether the view satisfies `n:m`.
    pub fn satisfies(view: &DenseView<'_>, n: usize, m: usize) -> bool {
        Self::validate("", view, n, m).is_ok()
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The pattern `(n, m)`.
    pub fn pattern(&self) -> (usize, usize) {
        (self.n, self.m)
    }

    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.values.dtype()
    }

    /// Bytes a GEMV reads: values and metadata.
    pub fn bytes(&self) -> usize {
        self.values.bytes() + self.meta.len()
    }

    /// Unpacks to dense row-major f32.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        for r in 0..self.rows {
            self.decode_row(r, &mut idx, &mut val);
            for (&c, &v) in idx.iter().zip(&val) {
                out[r * self.cols + c as usize] = v;
            }
        }
        out
    }

    /// Position of slot `s` of group `g` in row `r`.
    #[inline]
    fn position(&self, r: usize, g: usize, s: usize) -> usize {
        read_bits(
            &self.meta[r * self.meta_stride..],
            (g * self.n + s) * self.bits,
            self.bits,
        )
    }

    /// `y = W·x` (`x`: `cols`, `y`: `rows`, overwritten).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", self.cols, x.len())?;
        expect_len("y", self.rows, y.len())?;
        let tasks = par::task_count(exec, self.rows, self.work_bytes(), par::MIN_TASK_BYTES);
        let bounds = par::even_bounds(self.rows, tasks);
        let isa = exec.isa.effective();
        let simd_cols = self.simd_cols(isa);
        with_values!(&self.values, v => {
            par::for_each_range(y, 1, &bounds, |r, ys| {
                let first = r.start;
                for (yi, r) in ys.iter_mut().zip(r) {
                    *yi = self.row_dot(simd_cols, v, r, x);
                }
                self.values.scale_rows(first, ys);
            })
        });
        Ok(())
    }

    /// The task-splitting weight of one pass: the stored bytes, times 4. The kernel gathers
    /// activations with permutes and is compute bound at about a quarter of the read bandwidth
    /// (2:4 in bf16 read 5.2 GB/s with a 21 GB/s probe), so splitting by bytes alone left the
    /// 576-wide layers (≈350 KB in bf16) on one thread.
    fn work_bytes(&self) -> usize {
        self.bytes().saturating_mul(4)
    }

    /// Columns the vector kernel handles, 16 at a time (whole groups only); 0 on the portable
    /// path. AVX-512 runs this AVX2 kernel too: a 32-column AVX-512 version (one two-source
    /// permute per 16 values) measured ~20% slower on the Zen 4 we tuned on, cache-hot, single
    /// core.
    fn simd_cols(&self, isa: Isa) -> usize {
        let (n, m) = (self.n, self.m);
        if cfg!(target_arch = "x86_64") && isa.has_avx2() && m == 2 * n && matches!(n, 1 | 2 | 4) {
            self.cols / 16 * 16
        } else {
            0
        }
    }

    /// Row `r` of `W` dotted with `x` (unscaled: int8 rows are scaled by the caller).
    /// `simd_cols` comes from [`Self::simd_cols`] for the ISA in use.
    #[inline]
    fn row_dot<T: Element>(&self, simd_cols: usize, vals: &[T], r: usize, x: &[f32]) -> f32 {
        let (n, m) = (self.n, self.m);
        let per_row = self.groups * n;
        let vrow = &vals[r * per_row..][..per_row];
        let mut s = 0.0f32;
        #[cfg(target_arch = "x86_64")]
        if simd_cols > 0 {
            let mrow = &self.meta[r * self.meta_stride..];
            // SAFETY: AVX2 present (`simd_cols` is non-zero only then); chunk k reads values
            // 8k..8k+8 < per_row, metadata bytes k·b..k·b+4 (inside the row or the META_PAD
            // tail), and x columns < simd_cols <= cols == x.len().
            s = unsafe { x86::row_chunks(vrow, mrow, self.bits, n, m, simd_cols / 16, x) };
        }
        // Remaining groups (ragged tail, or everything on the portable path).
        for g in simd_cols / m..self.groups {
            for slot in 0..n {
                let c = g * m + self.position(r, g, slot);
                if c < self.cols {
                    s += vrow[g * n + slot].to_f32() * x[c];
                }
            }
        }
        s
    }

    /// `Y = X·Wᵀ` for a few tokens (a batched decode step): one pass over the weights, each row
    /// dotted with every token while its values and metadata are in L1, so the weights are read
    /// from memory once for the whole batch.
    fn small_batch(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) {
        let (rows, cols) = (self.rows, self.cols);
        let work = self.work_bytes().saturating_mul(tokens);
        let tasks = par::task_count(exec, rows, work, par::MIN_TASK_BYTES);
        let bounds = par::even_bounds(rows, tasks);
        let isa = exec.isa.effective();
        let simd_cols = self.simd_cols(isa);
        let scales = self.values.scales();
        let out = SharedOut::new(y);
        with_values!(&self.values, v => {
            par::for_each_bound(&bounds, |range| {
                for r in range {
                    let scale = scales.map_or(1.0, |s| s[r]);
                    for t in 0..tokens {
                        let d = self.row_dot(simd_cols, v, r, &x[t * cols..][..cols]);
                        // SAFETY: this task owns output row r of W, i.e. column r of Y.
                        unsafe { out.write(t * rows + r, d * scale) };
                    }
                }
            })
        });
    }

    /// `Y = X·Wᵀ` (`X`: `[tokens, cols]`, `Y`: `[tokens, rows]`, row-major; `Y` overwritten).
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", checked_len(tokens, self.cols)?, x.len())?;
        expect_len("y", checked_len(tokens, self.rows)?, y.len())?;
        if tokens == 1 {
            return self.gemv(x, y, exec);
        }
        if tokens <= crate::SMALL_BATCH {
            self.small_batch(x, tokens, y, exec);
            return Ok(());
        }
        let (rows, cols) = (self.rows, self.cols);
        let stored = rows * self.groups * self.n;
        rowgemm::row_gemm(self, rows, cols, None, stored, x, tokens, y, exec);
        Ok(())
    }
}

impl RowDecode for NmMatrix {
    fn decode_row(&self, r: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>) {
        idx.clear();
        val.clear();
        let per_row = self.groups * self.n;
        for g in 0..self.groups {
            for s in 0..self.n {
                let c = g * self.m + self.position(r, g, s);
                let v = self.values.get(r * per_row + g * self.n + s, r);
                // Padding slots hold zeros (possibly at columns past a ragged edge): skip them.
                if c < self.cols && v != 0.0 {
                    idx.push(c as u32);
                    val.push(v);
                }
            }
        }
    }
}

/// Writes the low `bits` bits of `v` at bit offset `pos` (LSB first) of `buf`.
fn write_bits(buf: &mut [u8], pos: usize, bits: usize, v: usize) {
    for i in 0..bits {
        if v >> i & 1 != 0 {
            let p = pos + i;
            buf[p / 8] |= 1 << (p % 8);
        }
    }
}

/// Reads `bits` bits at bit offset `pos` (LSB first) of `buf`.
#[inline]
pub(crate) fn read_bits(buf: &[u8], pos: usize, bits: usize) -> usize {
    let mut v = 0;
    for i in 0..bits {
        let p = pos + i;
        v |= usize::from(buf[p / 8] >> (p % 8) & 1) << i;
    }
    v
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::element::Element;
    use crate::simd::x86::hsum;
    use std::arch::x86_64::*;

    /// Lane constants of one pattern, computed once per row.
    #[derive(Clone, Copy)]
    struct Lanes {
        shifts: __m256i,
        pos_mask: __m256i,
        bases: __m256i,
        word_mask: u32,
        bits: usize,
    }

    /// One 16-column chunk: gathers the 8 activations the chunk's stored values multiply
    /// (two in-register permutes of the 16 activations) and accumulates.
    ///
    /// # Safety
    /// AVX2+FMA; 8 values at `vp`, 4 metadata bytes at `mp`, 16 activations at `xp`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk<T: Element>(
        l: Lanes,
        vp: *const T,
        mp: *const u8,
        xp: *const f32,
        acc: __m256,
    ) -> __m256 {
        // SAFETY: caller's contract.
        unsafe {
            let word = mp.cast::<u32>().read_unaligned() & l.word_mask;
            let pos = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), l.shifts),
                l.pos_mask,
            );
            let perm = _mm256_add_epi32(pos, l.bases);
            let lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xp), perm);
            let hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xp.add(8)), perm);
            let xg = _mm256_blend_ps::<0xF0>(lo, hi);
            _mm256_fmadd_ps(T::load8(vp), xg, acc)
        }
    }

    /// Dot product of one row's first `chunks` 16-column chunks (8 stored values each).
    ///
    /// # Safety
    /// AVX2+FMA; `m == 2n`, `n ∈ {1,2,4}`, `bits == log2(m)`; `vals` holds `8·chunks` values;
    /// `meta` readable for `bits·(chunks-1) + 4` bytes; `x` holds `16·chunks` columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_chunks<T: Element>(
        vals: &[T],
        meta: &[u8],
        bits: usize,
        n: usize,
        m: usize,
        chunks: usize,
        x: &[f32],
    ) -> f32 {
        let b = bits as i32;
        // Lane j belongs to group j / n, whose first column is (j / n)·m within the chunk;
        // lanes 0..4 read columns 0..8 and lanes 4..8 columns 8..16, so modulo 8 it is the
        // lane of the x half the lane permutes from.
        let base = |j: i32| ((j / n as i32) * m as i32) & 7;
        let l = Lanes {
            // Lane j's position sits at bit j·b of the chunk's metadata word.
            shifts: _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b),
            pos_mask: _mm256_set1_epi32(m as i32 - 1),
            bases: _mm256_setr_epi32(
                base(0),
                base(1),
                base(2),
                base(3),
                base(4),
                base(5),
                base(6),
                base(7),
            ),
            word_mask: if bits * 8 >= 32 {
                u32::MAX
            } else {
                (1u32 << (bits * 8)) - 1
            },
            bits,
        };
        let (vp, mp, xp) = (vals.as_ptr(), meta.as_ptr(), x.as_ptr());
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        // SAFETY: bounds are the caller's contract.
        unsafe {
            let mut k = 0;
            while k + 2 <= chunks {
                a0 = chunk(l, vp.add(8 * k), mp.add(k * l.bits), xp.add(16 * k), a0);
                a1 = chunk(
                    l,
                    vp.add(8 * k + 8),
                    mp.add((k + 1) * l.bits),
                    xp.add(16 * k + 16),
                    a1,
                );
                k += 2;
            }
            if k < chunks {
                a0 = chunk(l, vp.add(8 * k), mp.add(k * l.bits), xp.add(16 * k), a0);
            }
        }
        hsum(_mm256_add_ps(a0, a1))
    }
}
