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
use crate::par::{self, Out, SharedOut};
use crate::rowgemm::{self, RowDecode};
use crate::view::DenseView;
use crate::{lanes, lanes24};
use half::slice::HalfBitsSliceExt;

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
        let mut packed = NmMatrix {
            rows,
            cols,
            n,
            m,
            bits,
            groups,
            meta_stride,
            meta,
            values: Values::from_f32(dtype, vals),
        };
        packed.sort_slots();
        Ok(packed)
    }

    /// Orders every group's slots by position, moving their values along: packing puts a
    /// group's padding slots after its kept ones, and a checkpoint may hold any order. No
    /// product changes (the kernels read each slot's position), but the 2:4 tokens-in-lanes
    /// path pairs activations only for ascending positions ([`lanes24`]),
    /// so every constructor ends with this.
    pub(crate) fn sort_slots(&mut self) {
        let (n, bits, per_row) = (self.n, self.bits, self.groups * self.n);
        let mut slots: Vec<(usize, usize)> = Vec::with_capacity(n);
        for r in 0..self.rows {
            let mrow = &mut self.meta[r * self.meta_stride..][..self.meta_stride];
            for g in 0..self.groups {
                slots.clear();
                slots.extend((0..n).map(|s| (read_bits(mrow, (g * n + s) * bits, bits), s)));
                if slots.is_sorted() {
                    continue;
                }
                slots.sort_unstable();
                for (s, &(p, _)) in slots.iter().enumerate() {
                    write_bits(mrow, (g * n + s) * bits, bits, p);
                }
                let base = r * per_row + g * n;
                with_values!(&mut self.values, v => {
                    let old = v[base..base + n].to_vec();
                    for (s, &(_, from)) in slots.iter().enumerate() {
                        v[base + s] = old[from];
                    }
                });
            }
        }
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
        let mut words = vec![0u64; cols.div_ceil(64)];
        for r in 0..view.rows() {
            view.row_bits(r, &mut words);
            for c0 in (0..cols).step_by(m) {
                let col_end = (c0 + m).min(cols);
                let kept = crate::view::count_bits(&words, c0, col_end) as usize;
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
                #[cfg(target_arch = "x86_64")]
                if self.expands_gemv() && simd_cols > 0 {
                    let per_row = self.groups * 2;
                    // SAFETY: AVX2 present (`simd_cols` non-zero); every row of `r` has
                    // `per_row >= 4·(simd_cols/8)` values and `meta_stride >= simd_cols/8`
                    // metadata bytes; x has cols >= simd_cols columns; ys.len() == r.len().
                    unsafe {
                        x86::gemv24_rows(
                            v,
                            &self.meta,
                            self.meta_stride,
                            per_row,
                            r.clone(),
                            simd_cols / 8,
                            x,
                            ys,
                        )
                    };
                    if simd_cols < self.cols {
                        for (yi, r) in ys.iter_mut().zip(r) {
                            *yi += self.tail_dot(simd_cols, v, r, x);
                        }
                    }
                    self.values.scale_rows(first, ys);
                    return;
                }
                for (yi, r) in ys.iter_mut().zip(r) {
                    *yi = self.row_dot(simd_cols, v, r, x);
                }
                self.values.scale_rows(first, ys);
            })
        });
        Ok(())
    }

    /// Row `r`'s groups from column `covered` on (a ragged tail past the vector kernel, or the
    /// whole row on the portable path) dotted with `x`.
    fn tail_dot<T: Element>(&self, covered: usize, vals: &[T], r: usize, x: &[f32]) -> f32 {
        let (n, m) = (self.n, self.m);
        let vrow = &vals[r * self.groups * n..][..self.groups * n];
        let mut s = 0.0;
        for g in covered / m..self.groups {
            for slot in 0..n {
                let c = g * m + self.position(r, g, slot);
                if c < self.cols {
                    s += vrow[g * n + slot].to_f32() * x[c];
                }
            }
        }
        s
    }

    /// The task-splitting weight of one pass: the stored bytes, times 4. The kernel gathers
    /// activations with permutes and is compute bound at about a quarter of the read bandwidth
    /// (2:4 in bf16 read 5.2 GB/s with a 21 GB/s probe), so splitting by bytes alone left the
    /// 576-wide layers (≈350 KB in bf16) on one thread.
    fn work_bytes(&self) -> usize {
        self.bytes().saturating_mul(4)
    }

    /// Columns the vector kernels handle; 0 on the portable path. 2:4 runs the expand kernel
    /// ([`x86::dot24`]) 8 columns (one metadata byte) at a time; the other `M = 2N` patterns
    /// run the gather kernel 16 at a time (whole groups only). AVX-512 runs these AVX2 kernels
    /// too: a 32-column AVX-512 gather (one two-source permute per 16 values) measured ~20%
    /// slower on the Zen 4 we tuned on, cache-hot, single core.
    fn simd_cols(&self, isa: Isa) -> usize {
        let (n, m) = (self.n, self.m);
        if !(cfg!(target_arch = "x86_64") && isa.has_avx2()) {
            0
        } else if self.is_two_four() {
            self.cols / 8 * 8
        } else if m == 2 * n && matches!(n, 1 | 2 | 4) {
            self.cols / 16 * 16
        } else {
            0
        }
    }

    /// 2:4, the pattern with its own expand kernels.
    fn is_two_four(&self) -> bool {
        (self.n, self.m) == (2, 4)
    }

    /// Whether the single-token GEMV runs the 2:4 expand kernel ([`x86::gemv24_rows`]) rather
    /// than the activation gather. Measured on SmolLM2's block shapes (30 blocks streamed, 2
    /// threads, three alternating runs, `batch_bench`): for bf16 and i8 the expand was faster
    /// (2:4 against dense in the same dtype 1.01-1.37x vs 0.90-1.25x in bf16, 0.77-1.03x vs
    /// 0.67-0.74x in i8), while f32 was faster with the gather (1.15-1.39x vs 0.98-1.14x): its
    /// values are already f32, so the gather's extra permutes are all it pays, and its 16-byte
    /// value loads make the expand's broadcast no cheaper.
    fn expands_gemv(&self) -> bool {
        self.is_two_four() && self.values.dtype() != Dtype::F32
    }

    /// Row `r` of `W` dotted with `x` (unscaled: int8 rows are scaled by the caller).
    /// `simd_cols` comes from [`Self::simd_cols`] for the ISA in use.
    #[inline]
    fn row_dot<T: Element>(&self, simd_cols: usize, vals: &[T], r: usize, x: &[f32]) -> f32 {
        let mut s = [0.0f32];
        self.row_dots(simd_cols, vals, r, x, &mut s);
        s[0]
    }

    /// Row `r` of `W` dotted with each of `out.len()` tokens (`x`: `[tokens, cols]`), reading
    /// the row's values once per 8 tokens (unscaled, as [`Self::row_dot`]).
    fn row_dots<T: Element>(
        &self,
        simd_cols: usize,
        vals: &[T],
        r: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        let (n, m, cols) = (self.n, self.m, self.cols);
        let per_row = self.groups * n;
        let vrow = &vals[r * per_row..][..per_row];
        let mrow = &self.meta[r * self.meta_stride..];
        out.fill(0.0);
        // Columns the vector kernel covers; the rest is the scalar tail below.
        let mut covered = 0;
        #[cfg(target_arch = "x86_64")]
        if simd_cols > 0 {
            // One f32 token gathers (see `expands_gemv`); everything else 2:4 expands.
            let gather = out.len() == 1 && !self.expands_gemv();
            if self.is_two_four() && !gather {
                covered = simd_cols;
                // SAFETY: AVX2 present (`simd_cols` is non-zero only then); step k reads
                // values 4k..4k+4 < per_row (k < simd_cols/8 <= cols/8 <= groups/2), metadata
                // bytes < simd_cols/8 <= meta_stride, and x columns < simd_cols <= cols of
                // each of the out.len() tokens x holds.
                unsafe { x86::dot24(vrow, mrow, simd_cols / 8, x, cols, out) };
            } else {
                covered = simd_cols / 16 * 16;
                for (t, o) in out.iter_mut().enumerate() {
                    // SAFETY: as in `dot24`; chunk k reads values 8k..8k+8 < per_row,
                    // metadata bytes k·b..k·b+4 (inside the row or the META_PAD tail).
                    *o = unsafe {
                        x86::row_chunks(
                            vrow,
                            mrow,
                            self.bits,
                            n,
                            m,
                            covered / 16,
                            &x[t * cols..][..cols],
                        )
                    };
                }
            }
        }
        // Remaining groups (ragged tail, or everything on the portable path).
        for (t, o) in out.iter_mut().enumerate() {
            *o += self.tail_dot(covered, vals, r, &x[t * cols..][..cols]);
        }
    }

    /// The bf16 values when this product runs the 2:4 tokens-in-lanes GEMM: 2:4 in bf16, a
    /// decode step of 9 to 16 sequences ([`lanes::MIN_TOKENS`]..=[`lanes24::MAX_TOKENS`]),
    /// AVX512-BF16 and an even column count. Multiplying only the kept weights, it is the
    /// one kernel where 2:4 beats dense at that batch: a 16-sequence step is compute bound,
    /// and [`Self::small_batch`]'s f32 FMAs per kept weight ran at 0.45x dense bf16.
    fn lanes_values(&self, tokens: usize, exec: Exec) -> Option<&[u16]> {
        let Values::Bf16(v) = &self.values else {
            return None;
        };
        let fits = self.is_two_four()
            && (lanes::MIN_TOKENS..=lanes24::MAX_TOKENS).contains(&tokens)
            && lanes::available_bf16(exec.isa, self.cols);
        fits.then(|| Element::bf16_bits(v.as_slice())).flatten()
    }

    /// `Y = X·Wᵀ` for a few tokens (a batched decode step): one pass over the weights, each row
    /// dotted with every token while its values and metadata are in L1, so the weights are read
    /// from memory once for the whole batch.
    fn small_batch(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) {
        let rows = self.rows;
        let work = self.work_bytes().saturating_mul(tokens);
        let tasks = par::task_count(exec, rows, work, par::MIN_TASK_BYTES);
        let bounds = par::even_bounds(rows, tasks);
        let isa = exec.isa.effective();
        let simd_cols = self.simd_cols(isa);
        let scales = self.values.scales();
        #[cfg(target_arch = "x86_64")]
        if self.is_two_four() && simd_cols > 0 && tokens >= 8 {
            self.small_batch_24t(x, tokens, y, &bounds, simd_cols);
            return;
        }
        let out = SharedOut::new(y);
        with_values!(&self.values, v => {
            par::for_each_bound(&bounds, |range| {
                let mut dots = [0.0f32; crate::SMALL_BATCH];
                let dots = &mut dots[..tokens];
                for r in range {
                    let scale = scales.map_or(1.0, |s| s[r]);
                    self.row_dots(simd_cols, v, r, x, dots);
                    for (t, &d) in dots.iter().enumerate() {
                        // SAFETY: this task owns output row r of W, i.e. column r of Y.
                        unsafe { out.write(t * rows + r, d * scale) };
                    }
                }
            })
        });
    }

    /// [`Self::small_batch`] for 2:4 and 8 to 16 tokens, computing only the kept weights: the
    /// tokens are transposed into the vector lanes (`xᵀ`: one row of 8 or 16 tokens per
    /// column), and each stored weight, broadcast, is multiplied with its column's row of `xᵀ`.
    /// That is half the multiplies of the dense small batch (the expand kernel multiplies the
    /// pruned zeros too), which matters here: with 8+ tokens a decode step is compute bound.
    #[cfg(target_arch = "x86_64")]
    fn small_batch_24t(
        &self,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        bounds: &[usize],
        simd_cols: usize,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let lanes = if tokens <= 8 { 8 } else { 16 };
        let mut xt = vec![0.0f32; simd_cols * lanes];
        for (c, xc) in xt.chunks_exact_mut(lanes).enumerate() {
            for (t, v) in xc.iter_mut().enumerate().take(tokens) {
                *v = x[t * cols + c];
            }
        }
        let scales = self.values.scales();
        let out = SharedOut::new(y);
        let per_row = self.groups * self.n;
        with_values!(&self.values, v => {
            par::for_each_bound(bounds, |range| {
                let mut wrow = vec![0.0f32; per_row];
                let mut dots = [0.0f32; 16];
                for r in range {
                    let vrow = &v[r * per_row..][..per_row];
                    for (w, &q) in wrow.iter_mut().zip(vrow) {
                        *w = q.to_f32();
                    }
                    let mrow = &self.meta[r * self.meta_stride..];
                    // SAFETY: AVX2 present (`simd_cols` non-zero); `wrow` holds 4·steps
                    // values, `mrow` steps bytes, `xt` steps·8 rows of `lanes` floats.
                    unsafe {
                        if lanes == 8 {
                            x86::dot24_t::<1>(&wrow, mrow, simd_cols / 8, &xt, &mut dots);
                        } else {
                            x86::dot24_t::<2>(&wrow, mrow, simd_cols / 8, &xt, &mut dots);
                        }
                    }
                    if simd_cols < cols {
                        for (t, d) in dots.iter_mut().enumerate().take(tokens) {
                            *d += self.tail_dot(simd_cols, v, r, &x[t * cols..][..cols]);
                        }
                    }
                    let scale = scales.map_or(1.0, |s| s[r]);
                    for (t, &d) in dots.iter().enumerate().take(tokens) {
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
        if let Some(values) = self.lanes_values(tokens, exec) {
            let (meta, stride) = (&self.meta, self.meta_stride);
            let (rows, cols) = (self.rows, self.cols);
            lanes24::gemm(
                values,
                meta,
                stride,
                rows,
                cols,
                x,
                tokens,
                Out::Init(y),
                exec,
            );
            return Ok(());
        }
        if tokens <= crate::SMALL_BATCH {
            self.small_batch(x, tokens, y, exec);
            return Ok(());
        }
        let (rows, cols) = (self.rows, self.cols);
        let stored = rows * self.groups * self.n;
        // bf16 prefill (and int8 on AMX, its integers widened and each row's sums scaled): the
        // panels are expanded to dense pairs for `vdpbf16ps` or the tiles (see `gemm_bf16`);
        // twice the multiplies, each at twice the rate, and no per-weight AXPY.
        if crate::gemm_bf16::try_gemm(self, self.dtype(), self.rows, self.cols, x, tokens, y, exec)
        {
            return Ok(());
        }
        if let Values::I8 { q, scales } = &self.values
            && lanes::available_bf16(exec.isa, cols)
            && cols > 0
        {
            self.i8_rows_gemm(q, scales, x, tokens, Out::Init(y), exec);
            return Ok(());
        }
        if crate::dense::takes_lanes(Dtype::F32, cols, tokens, exec) && cols > 0 {
            // f32 (and int8 without AVX512-BF16) prefill: each tile of rows expanded to f32
            // just before the tokens-in-lanes GEMM multiplies it, the pruned weights as zeros.
            // `batch_bench 128 f32` (SmolLM2's block linears, 2-core Xeon): 2:4 took 289-306
            // ms on the row GEMM's per-weight AXPYs, 139-145 here (dense f32: 119-143).
            let write = |r: usize, row: &mut [f32]| self.row_f32(r, row);
            let w = lanes::Weights::F32Rows(&write);
            lanes::gemm(w, rows, cols, x, tokens, Out::Init(y), exec);
            return Ok(());
        }
        rowgemm::row_gemm(self, rows, cols, None, stored, x, tokens, y, exec);
        Ok(())
    }
}

impl crate::gemm_bf16::Bf16Rows for NmMatrix {
    fn rows_bits<'a>(
        &'a self,
        r0: usize,
        nr: usize,
        buf: &'a mut Vec<u16>,
        scratch: &mut (Vec<u32>, Vec<f32>),
    ) -> &'a [u16] {
        buf.resize(nr * self.cols, 0);
        if self.cols == 0 {
            return buf;
        }
        match &self.values {
            Values::Bf16(v) => {
                let rows = buf.reinterpret_cast_mut::<half::bf16>();
                for (i, out) in rows.chunks_exact_mut(self.cols).enumerate() {
                    self.row_values(r0 + i, v, out);
                }
            }
            // The integers themselves (exact in bf16): `row_scales` scales the sums.
            Values::I8 { q, .. } => {
                let rows = buf.reinterpret_cast_mut::<half::bf16>();
                crate::dense::widen_i8_rows(rows, self.cols, |i, bytes| {
                    self.row_values(r0 + i, q, bytes)
                });
            }
            Values::F32(_) => {
                // `try_gemm` takes bf16 and int8 only; decode the general way.
                let (idx, val) = scratch;
                for (i, out) in buf.chunks_exact_mut(self.cols).enumerate() {
                    out.fill(0);
                    self.decode_row(r0 + i, idx, val);
                    for (&c, &x) in idx.iter().zip(val.iter()) {
                        out[c as usize] = half::bf16::from_f32(x).to_bits();
                    }
                }
            }
        }
        buf
    }

    fn row_scales(&self) -> Option<&[f32]> {
        self.values.scales()
    }
}

impl NmMatrix {
    /// int8 prefill where AMX does not take it (Zen 4, Ice Lake): `dense::i8_rows_gemm` on
    /// each tile's rows decoded from the metadata (rows decoded to f32 cost twice the
    /// multiplies). The caller has checked `lanes::available_bf16` and `cols > 0`.
    pub(crate) fn i8_rows_gemm(
        &self,
        q: &[i8],
        scales: &[f32],
        x: &[f32],
        tokens: usize,
        y: Out<'_>,
        exec: Exec,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        crate::dense::i8_rows_gemm(rows, cols, scales, x, tokens, y, exec, |r, bytes| {
            self.row_values(r, q, bytes)
        });
    }

    /// Row `r` expanded to dense f32 (int8 scaled), for the tokens-in-lanes GEMM's
    /// rows-written tiles (`lanes::Weights::F32Rows`).
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        match &self.values {
            Values::F32(v) => self.row_values(r, v, out),
            values => {
                out.fill(0.0);
                let scale = values.scales().map_or(1.0, |s| s[r]);
                with_values!(values, vals => self.for_each_slot(r, |c, i| {
                    out[c] = vals[i].to_f32() * scale;
                }));
            }
        }
    }

    /// Row `r`'s stored values (of type `T`, as stored: int8 unscaled) written densely into
    /// `out` (`cols` long), zeros where pruned.
    fn row_values<T: Element>(&self, r: usize, vals: &[T], out: &mut [T]) {
        if self.is_24() {
            return self.expand_row_24(r, vals, out);
        }
        out.fill(T::default());
        // Positions are distinct within a group, so a padding slot's zero lands on a column
        // no kept value has.
        self.for_each_slot(r, |c, i| out[c] = vals[i]);
    }

    /// Whether this is 2:4, whose metadata byte holds two groups' four 2-bit positions, i.e.
    /// says which of 8 columns are kept.
    fn is_24(&self) -> bool {
        (self.n, self.m) == (2, 4)
    }

    /// A 2:4 row expanded as a bitmap row: each metadata byte becomes the kept-column mask of
    /// its 8 columns (`MASK24`: the slots' positions are distinct within a group and stored
    /// ascending, so the values come in column order), and the VBMI2 expansion the bitmap
    /// uses writes 16 f32, 32 bf16 or 64 i8 columns per instruction (`bitmap::x86::
    /// expand_row_words`); the rest of the row byte by byte. Slot by slot this decode was
    /// 2:4 prefill's cost: 0.78-0.82x dense's speed in f32, 0.49-0.50x in int8 at 128 tokens
    /// (`batch_bench 128 f32,i8`).
    fn expand_row_24<T: Element>(&self, r: usize, vals: &[T], out: &mut [T]) {
        let per_row = self.groups * 2;
        let row = &vals[r * per_row..][..per_row];
        let meta = &self.meta[r * self.meta_stride..][..per_row.div_ceil(4)];
        let cols = self.cols.min(out.len());
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if crate::bitmap::vbmi2_expand() {
            // The masks of the bytes the word expansion reads (whole 64-byte words of `out`).
            let per_word = 64 / size_of::<T>();
            let bytes = cols / per_word * per_word / 8;
            let mut stack = [0u8; 512];
            let mut heap = Vec::new();
            let mask = if bytes <= stack.len() {
                &mut stack[..bytes]
            } else {
                heap.resize(bytes, 0);
                &mut heap[..]
            };
            for (m, &b) in mask.iter_mut().zip(meta) {
                *m = MASK24[usize::from(b)];
            }
            // SAFETY: VBMI2 and AVX-512 present (checked); T is f32, bf16 or i8, plain bits.
            // `mask` covers `cols / per_word` whole words; each mask byte has at most 4 bits
            // set (one per slot), so the values read for it stay within its 4 slots' values
            // and `bytes <= cols / 8 <= per_row / 4` bytes read at most `per_row` values;
            // `out` holds `cols` values.
            (done, _) = unsafe {
                crate::bitmap::x86::expand_row_words(
                    size_of::<T>(),
                    mask,
                    row.as_ptr().cast(),
                    0,
                    out.as_mut_ptr().cast(),
                    bytes * 8,
                )
            };
        }
        out[done..].fill(T::default());
        // `done` is a multiple of 8: whole metadata bytes.
        for (b, &byte) in meta.iter().enumerate().skip(done / 8) {
            for k in 0..4.min(per_row - 4 * b) {
                let c = 8 * b + 4 * (k / 2) + usize::from(byte >> (2 * k) & 3);
                if c < cols {
                    out[c] = row[4 * b + k];
                }
            }
        }
    }

    /// Calls `put(column, value index)` for each stored slot of row `r` whose column lies
    /// inside the matrix, walking the metadata a byte pair at a time. Padding slots hold zeros
    /// at positions no kept value of their group has (positions are distinct within a group,
    /// which constructors and checkpoint loading ensure), so writing them is harmless.
    fn for_each_slot(&self, r: usize, mut put: impl FnMut(usize, usize)) {
        let per_row = self.groups * self.n;
        let meta = &self.meta[r * self.meta_stride..][..self.meta_stride];
        let mask = (1usize << self.bits) - 1;
        let mut bit = 0;
        for g in 0..self.groups {
            for s in 0..self.n {
                // Positions are at most 8 bits (M <= 256), so two bytes always hold one.
                let byte = bit / 8;
                let word = usize::from(meta[byte])
                    | usize::from(meta.get(byte + 1).copied().unwrap_or(0)) << 8;
                let c = g * self.m + (word >> (bit % 8) & mask);
                bit += self.bits;
                if c < self.cols {
                    put(c, r * per_row + g * self.n + s);
                }
            }
        }
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
        let p = pos + i;
        let bit = 1 << (p % 8);
        if v >> i & 1 != 0 {
            buf[p / 8] |= bit;
        } else {
            buf[p / 8] &= !bit;
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

/// For a 2:4 metadata byte (two groups of 4 columns, each with two 2-bit positions): where
/// each of the byte's 8 lanes (columns) finds its value among the step's 4 packed values,
/// `None` where the column was pruned. Lane `4g + pos(g, s)` takes value `2g + s`.
const fn lanes24(byte: usize) -> [Option<usize>; 8] {
    let mut lanes = [None; 8];
    let mut g = 0;
    while g < 2 {
        let mut s = 0;
        while s < 2 {
            let pos = (byte >> (4 * g + 2 * s)) & 3;
            lanes[4 * g + pos] = Some(2 * g + s);
            s += 1;
        }
        g += 1;
    }
    lanes
}

/// For each 2:4 metadata byte, the `vpshufb` control that expands the step's 4 packed values
/// (`size` bytes each, the same in both 128-bit halves of the source) into 8 lanes of 32
/// bits, zeros where pruned (`0x80` makes `vpshufb` write a zero). A value's bytes go to the
/// top `size` bytes of its lane: for f32 the whole lane, for bf16 the high half (where a
/// bf16's bits belong in an f32, so this expands and widens at once), for i8 the top byte
/// (an arithmetic shift right by 24 then sign-extends it).
const fn shuffle24_table(size: usize) -> [[u8; 32]; 256] {
    let mut t = [[0x80u8; 32]; 256];
    let mut byte = 0;
    while byte < 256 {
        let lanes = lanes24(byte);
        let mut j = 0;
        while j < 8 {
            if let Some(k) = lanes[j] {
                let mut b = 0;
                while b < size {
                    t[byte][4 * j + 4 - size + b] = (k * size + b) as u8;
                    b += 1;
                }
            }
            j += 1;
        }
        byte += 1;
    }
    t
}

/// For each 2:4 metadata byte, the columns (within the step's 8) of its 4 packed values, one
/// per byte of the `u32`, value `k` in byte `k`.
const fn columns24_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut k = 0;
        while k < 4 {
            let (g, s) = (k / 2, k % 2);
            let col = 4 * g + ((byte >> (4 * g + 2 * s)) & 3);
            t[byte] |= (col as u32) << (8 * k);
            k += 1;
        }
        byte += 1;
    }
    t
}

/// For a 2:4 metadata byte (two groups' two 2-bit positions each, low group first), the
/// mask of its 8 columns that are kept: bit `4g + position` for each slot.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static MASK24: [u8; 256] = mask24_table();

const fn mask24_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            let position = (b >> (2 * k)) & 3;
            t[b] |= 1 << (4 * (k / 2) + position);
            k += 1;
        }
        b += 1;
    }
    t
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static COLS24: [u32; 256] = columns24_table();
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static SHUF24_F32: [[u8; 32]; 256] = shuffle24_table(4);
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static SHUF24_BF16: [[u8; 32]; 256] = shuffle24_table(2);
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static SHUF24_I8: [[u8; 32]; 256] = shuffle24_table(1);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{COLS24, SHUF24_BF16, SHUF24_F32, SHUF24_I8};
    use crate::element::{Dtype, Element};
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

    /// How far ahead (bytes) [`dot24`] prefetches the value and metadata streams (once per
    /// 64 columns), as the bitmap GEMV does.
    const PF_VALUES: usize = 2048;
    const PF_META: usize = 512;

    /// One 2:4 step (8 columns, one metadata byte `byte`, 4 packed values at `vp`) as a dense
    /// f32 vector with zeros in the pruned lanes: one broadcast load of the 4 values and one
    /// `vpshufb` whose control is looked up from the byte (see [`super::shuffle24_table`]).
    ///
    /// # Safety
    /// AVX2; 4 values readable at `vp`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expand24<T: Element>(byte: usize, vp: *const T) -> __m256 {
        // SAFETY: 4 values (16, 8 or 4 bytes) readable at `vp` by the caller's contract; every
        // table row is 32 bytes and byte < 256. Reading the values as bytes is valid for all
        // three element types (f32, `repr(transparent)` u16 bf16, i8).
        unsafe {
            match T::DTYPE {
                Dtype::F32 => {
                    let src = _mm256_broadcastsi128_si256(_mm_loadu_si128(vp.cast()));
                    let ctl = _mm256_loadu_si256(SHUF24_F32[byte].as_ptr().cast());
                    _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl))
                }
                Dtype::Bf16 => {
                    let src = _mm256_set1_epi64x(vp.cast::<i64>().read_unaligned());
                    let ctl = _mm256_loadu_si256(SHUF24_BF16[byte].as_ptr().cast());
                    _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl))
                }
                Dtype::I8 => {
                    let src = _mm256_set1_epi32(vp.cast::<i32>().read_unaligned());
                    let ctl = _mm256_loadu_si256(SHUF24_I8[byte].as_ptr().cast());
                    let top = _mm256_shuffle_epi8(src, ctl);
                    _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(top))
                }
            }
        }
    }

    /// 2:4 dot products of one row's first `steps` 8-column steps with each token of `x`
    /// (`[out.len(), cols]`), added to `out`. The weights are expanded to dense vectors
    /// (zeros where pruned) and multiplied with the activations as loaded: no activation
    /// gather, and each expanded step serves up to 4 tokens.
    ///
    /// # Safety
    /// AVX2+FMA; `vals` holds `4·steps` values, `meta` `steps` bytes, `x` `out.len()` rows of
    /// `cols >= 8·steps` columns.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot24<T: Element>(
        vals: &[T],
        meta: &[u8],
        steps: usize,
        x: &[f32],
        cols: usize,
        out: &mut [f32],
    ) {
        let mut t = 0;
        // SAFETY: the caller's contract, passed on block by block.
        unsafe {
            while t < out.len() {
                let xt = x.as_ptr().add(t * cols);
                match out.len() - t {
                    1 => out[t] += dot24_one(vals.as_ptr(), meta.as_ptr(), steps, xt),
                    2 | 3 => {
                        let d = dot24_block::<T, 2>(vals.as_ptr(), meta.as_ptr(), steps, xt, cols);
                        out[t] += d[0];
                        out[t + 1] += d[1];
                        t += 1;
                    }
                    _ => {
                        let d = dot24_block::<T, 4>(vals.as_ptr(), meta.as_ptr(), steps, xt, cols);
                        for (o, d) in out[t..t + 4].iter_mut().zip(d) {
                            *o += d;
                        }
                        t += 3;
                    }
                }
                t += 1;
            }
        }
    }

    /// The 2:4 GEMV over a range of rows, one [`dot24_one`] per row (the row loop lives here,
    /// inside the AVX2 code, so a row costs no call and no setup: at 576 columns a row is only
    /// 72 steps).
    ///
    /// # Safety
    /// AVX2+FMA; each row `r` of `rows` has `per_row >= 4·steps` values at `vals[r·per_row..]`
    /// and `steps` metadata bytes at `meta[r·meta_stride..]`; `x` holds `8·steps` columns;
    /// `y.len() == rows.len()`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv24_rows<T: Element>(
        vals: &[T],
        meta: &[u8],
        meta_stride: usize,
        per_row: usize,
        rows: std::ops::Range<usize>,
        steps: usize,
        x: &[f32],
        y: &mut [f32],
    ) {
        assert!(
            rows.end * per_row <= vals.len()
                && rows.end.saturating_sub(1) * meta_stride + steps <= meta.len()
        );
        assert!(x.len() >= 8 * steps && y.len() == rows.len() && 4 * steps <= per_row);
        for (yi, r) in y.iter_mut().zip(rows) {
            // SAFETY: bounds asserted above.
            *yi = unsafe {
                dot24_one(
                    vals.as_ptr().add(r * per_row),
                    meta.as_ptr().add(r * meta_stride),
                    steps,
                    x.as_ptr(),
                )
            };
        }
    }

    /// [`dot24`] for one token: 8 steps (one u64 of metadata) per iteration into 4
    /// accumulators, with prefetch.
    ///
    /// # Safety
    /// As [`dot24`], for one token at `xp`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot24_one<T: Element>(
        vp: *const T,
        mp: *const u8,
        steps: usize,
        xp: *const f32,
    ) -> f32 {
        let mut a = [_mm256_setzero_ps(); 4];
        let mut b = 0;
        // SAFETY: b + 8 <= steps before each 8-byte metadata read; step b reads values
        // 4b..4b+4 and x columns 8b..8b+8. Prefetches never fault.
        unsafe {
            while b + 8 <= steps {
                _mm_prefetch::<_MM_HINT_T0>(vp.add(4 * b).cast::<i8>().wrapping_add(PF_VALUES));
                _mm_prefetch::<_MM_HINT_T0>(mp.add(b).cast::<i8>().wrapping_add(PF_META));
                let w = mp.add(b).cast::<u64>().read_unaligned();
                for k in 0..8 {
                    let e = expand24(((w >> (8 * k)) & 0xff) as usize, vp.add(4 * (b + k)));
                    let xv = _mm256_loadu_ps(xp.add(8 * (b + k)));
                    a[k % 4] = _mm256_fmadd_ps(e, xv, a[k % 4]);
                }
                b += 8;
            }
            while b < steps {
                let e = expand24(usize::from(*mp.add(b)), vp.add(4 * b));
                a[b % 4] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xp.add(8 * b)), a[b % 4]);
                b += 1;
            }
        }
        hsum(_mm256_add_ps(
            _mm256_add_ps(a[0], a[1]),
            _mm256_add_ps(a[2], a[3]),
        ))
    }

    /// [`dot24`] for `TK` tokens: each step is expanded once and multiplied with every token.
    ///
    /// # Safety
    /// As [`dot24`], for `TK` tokens from `xp` (row stride `cols`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot24_block<T: Element, const TK: usize>(
        vp: *const T,
        mp: *const u8,
        steps: usize,
        xp: *const f32,
        cols: usize,
    ) -> [f32; TK] {
        let mut a = [_mm256_setzero_ps(); TK];
        // SAFETY: step b < steps reads values 4b..4b+4, metadata byte b and x columns
        // 8b..8b+8 of tokens 0..TK.
        unsafe {
            for b in 0..steps {
                let e = expand24(usize::from(*mp.add(b)), vp.add(4 * b));
                for (t, at) in a.iter_mut().enumerate() {
                    *at = _mm256_fmadd_ps(e, _mm256_loadu_ps(xp.add(t * cols + 8 * b)), *at);
                }
            }
        }
        let mut d = [0.0; TK];
        for (d, a) in d.iter_mut().zip(a) {
            *d = hsum(a);
        }
        d
    }

    /// 2:4 dot products of one row with 8·`H` tokens transposed into lanes: `wrow` holds the
    /// row's first `4·steps` stored values widened to f32, `xt` one row of 8·`H` floats (the
    /// tokens) per column. Each stored weight is broadcast and multiplied with its column's
    /// row of `xt`; 4 accumulator sets (one per value of a step) keep 4·`H` FMA chains in
    /// flight. Writes the 8·`H` sums to `dots`.
    ///
    /// # Safety
    /// AVX2+FMA; `wrow.len() >= 4·steps`, `meta.len() >= steps`, `xt.len() >= 8·steps·8·H`,
    /// `dots.len() >= 8·H`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot24_t<const H: usize>(
        wrow: &[f32],
        meta: &[u8],
        steps: usize,
        xt: &[f32],
        dots: &mut [f32],
    ) {
        let lanes = 8 * H;
        let mut a = [[_mm256_setzero_ps(); H]; 4];
        let (wp, xp) = (wrow.as_ptr(), xt.as_ptr());
        // SAFETY: step b reads values 4b..4b+4, metadata byte b and rows 8b..8b+8 of `xt`
        // (columns from the table are < 8); all within the caller's bounds.
        unsafe {
            for b in 0..steps {
                let cols = COLS24[usize::from(*meta.get_unchecked(b))];
                for (k, ak) in a.iter_mut().enumerate() {
                    let c = 8 * b + ((cols >> (8 * k)) & 0xff) as usize;
                    let w = _mm256_broadcast_ss(&*wp.add(4 * b + k));
                    let xc = xp.add(c * lanes);
                    for (h, akh) in ak.iter_mut().enumerate() {
                        *akh = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc.add(8 * h)), *akh);
                    }
                }
            }
            let [a0, a1, a2, a3] = a;
            for (h, ((&s0, &s1), (&s2, &s3))) in
                a0.iter().zip(&a1).zip(a2.iter().zip(&a3)).enumerate()
            {
                let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
                _mm256_storeu_ps(dots.as_mut_ptr().add(8 * h), s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

    /// Positions of row `r`, group `g`, slot by slot.
    fn slots(p: &NmMatrix, r: usize, g: usize) -> Vec<usize> {
        let mrow = &p.meta[r * p.meta_stride..];
        (0..p.n)
            .map(|s| read_bits(mrow, (g * p.n + s) * p.bits, p.bits))
            .collect()
    }

    /// Packing leaves every group's slots in ascending order (padding slots included, which
    /// it writes after the kept ones), and sorting a shuffled matrix restores the packed one
    /// exactly: positions and values move together.
    #[test]
    fn slots_are_kept_in_ascending_order() {
        let mut rng = testutil::rng(7);
        for (n, m) in [(2, 4), (1, 2), (4, 8), (3, 8)] {
            let (rows, cols) = (9, 4 * m + 2);
            // Many groups keep fewer than `n`: their padding positions come first or last.
            let w = testutil::nm_with(&mut rng, rows, cols, n, m, 0.6);
            for dtype in [Dtype::F32, Dtype::Bf16, Dtype::I8] {
                let packed = NmMatrix::from_dense("l", &w, rows, cols, n, m, dtype).expect("pack");
                for r in 0..rows {
                    for g in 0..packed.groups {
                        assert!(
                            slots(&packed, r, g).is_sorted(),
                            "{n}:{m} row {r} group {g}"
                        );
                    }
                }
                // Reverse every group's slots, as a checkpoint written in another order holds
                // them, then sort again.
                let mut shuffled = packed.clone();
                let per_row = packed.groups * n;
                for r in 0..rows {
                    for g in 0..packed.groups {
                        let pos = slots(&packed, r, g);
                        let mrow = &mut shuffled.meta[r * packed.meta_stride..];
                        for (s, &p) in pos.iter().rev().enumerate() {
                            write_bits(mrow, (g * n + s) * packed.bits, packed.bits, p);
                        }
                        let base = r * per_row + g * n;
                        with_values!(&mut shuffled.values, v => v[base..base + n].reverse());
                    }
                }
                assert_eq!(shuffled.to_dense(), packed.to_dense(), "{n}:{m} {dtype}");
                if n > 1 {
                    assert_ne!(
                        shuffled.meta, packed.meta,
                        "{n}:{m} {dtype}: nothing reversed"
                    );
                }
                shuffled.sort_slots();
                assert_eq!(shuffled, packed, "{n}:{m} {dtype}");
            }
        }
    }
}
