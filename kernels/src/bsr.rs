//! Block sparse rows: weights kept or pruned in whole `br x bc` blocks.
//!
//! One `u32` block-column index per stored block (1/64 of a byte per weight for 16x16 f32), so
//! a block-pruned matrix reads almost exactly its kept fraction of the dense bytes, and the
//! blocks are dense inside, so the kernels run at dense speed on what remains. Each block is
//! stored column-major (`block[k * br + r]`): for GEMV that makes each step over `k` a
//! broadcast of `x[k]` times 16 contiguous weights (two AVX2 vectors, no horizontal sums), and
//! for GEMM it is exactly the panel layout of the shared micro-kernel, which then reads the
//! blocks in place. Ragged edges (shape not a multiple of the block) are stored zero-padded;
//! the kernels never read `x` or write `y` past the matrix.
//!
//! Fast paths: `16 x bc` (GEMV, any `bc`, unrolled for 16x16), `4x1` (GEMV) and
//! `(16·k) x bc` (GEMM micro-kernel). Other shapes use generic code. i8 blocks run the same
//! GEMV kernels on the integers and scale each finished row; GEMM dequantizes a block row into
//! an f32 panel once and reuses it for every token tile.

use crate::element::{Dtype, Element, Values, with_values};
use crate::error::{KernelError, Result, checked_len, expect_len};
use crate::gemm::{self, NR, Segment};
use crate::isa::{Exec, Isa};
use crate::par::{self, SharedOut};
use crate::rowgemm::{self, RowDecode};
use crate::view::DenseView;
use std::ops::Range;

/// BSR weights `[rows, cols]` with `br x bc` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct BsrMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) br: usize,
    pub(crate) bc: usize,
    /// Block row `R`'s blocks are `brow_ptr[R]..brow_ptr[R+1]`.
    pub(crate) brow_ptr: Vec<u32>,
    /// Block column of each stored block.
    pub(crate) bcol: Vec<u32>,
    /// `br * bc` values per stored block, column-major within the block.
    pub(crate) values: Values,
}

impl BsrMatrix {
    /// Packs every block of the view that holds at least one kept weight.
    pub fn from_view(
        view: &DenseView<'_>,
        br: usize,
        bc: usize,
        dtype: Dtype,
    ) -> Result<BsrMatrix> {
        if dtype == Dtype::I8 {
            return crate::quant::pack_i8(
                view,
                |qv| Self::from_view(qv, br, bc, Dtype::F32),
                |m| &mut m.values,
            );
        }
        if br == 0 || bc == 0 {
            return Err(KernelError::InvalidParameter(format!(
                "BSR block shape {br}x{bc} must be at least 1x1"
            )));
        }
        let (rows, cols) = (view.rows(), view.cols());
        let (nbr, nbc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let too_large = |reason| KernelError::TooLarge { rows, cols, reason };
        let mut brow_ptr = Vec::with_capacity(nbr + 1);
        let mut bcol = Vec::new();
        let mut vals = Vec::new();
        let mut present = vec![false; nbc];
        brow_ptr.push(0u32);
        for rb in 0..nbr {
            present.fill(false);
            let r_end = (rb * br + br).min(rows);
            for r in rb * br..r_end {
                for c in 0..cols {
                    if view.is_kept(r, c) {
                        present[c / bc] = true;
                    }
                }
            }
            for (cb, _) in present.iter().enumerate().filter(|(_, p)| **p) {
                bcol.push(u32::try_from(cb).map_err(|_| too_large("block column beyond u32"))?);
                for k in 0..bc {
                    for i in 0..br {
                        let (r, c) = (rb * br + i, cb * bc + k);
                        vals.push(if r < rows && c < cols {
                            view.get(r, c)
                        } else {
                            0.0
                        });
                    }
                }
            }
            brow_ptr.push(u32::try_from(bcol.len()).map_err(|_| too_large("too many blocks"))?);
        }
        // Grown by doubling, the buffers could hold up to twice the stored blocks' memory
        // (resident on huge pages): give the excess back.
        bcol.shrink_to_fit();
        vals.shrink_to_fit();
        Ok(BsrMatrix {
            rows,
            cols,
            br,
            bc,
            brow_ptr,
            bcol,
            values: Values::from_f32(dtype, vals),
        })
    }

    /// Packs dense-with-zeros weights.
    pub fn from_dense(
        w: &[f32],
        rows: usize,
        cols: usize,
        br: usize,
        bc: usize,
        dtype: Dtype,
    ) -> Result<BsrMatrix> {
        Self::from_view(&DenseView::new(w, rows, cols)?, br, bc, dtype)
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Block shape `(br, bc)`.
    pub fn block(&self) -> (usize, usize) {
        (self.br, self.bc)
    }

    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.values.dtype()
    }

    /// Stored blocks.
    pub fn blocks(&self) -> usize {
        self.bcol.len()
    }

    /// Bytes a GEMV reads: block values, block-column indices, block-row pointers.
    pub fn bytes(&self) -> usize {
        self.values.bytes() + self.bcol.len() * 4 + self.brow_ptr.len() * 4
    }

    fn block_rows(&self) -> usize {
        self.brow_ptr.len() - 1
    }

    /// Unpacks to dense row-major f32.
    pub fn to_dense(&self) -> Vec<f32> {
        let (br, bc) = (self.br, self.bc);
        let mut out = vec![0.0; self.rows * self.cols];
        for rb in 0..self.block_rows() {
            for b in self.brow_ptr[rb] as usize..self.brow_ptr[rb + 1] as usize {
                let cb = self.bcol[b] as usize;
                for k in 0..bc {
                    for i in 0..br {
                        let (r, c) = (rb * br + i, cb * bc + k);
                        if r < self.rows && c < self.cols {
                            out[r * self.cols + c] = self.values.get(b * br * bc + k * br + i, r);
                        }
                    }
                }
            }
        }
        out
    }

    /// `y = W·x` (`x`: `cols`, `y`: `rows`, overwritten).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", self.cols, x.len())?;
        expect_len("y", self.rows, y.len())?;
        let nbr = self.block_rows();
        let tasks = par::task_count(exec, nbr, self.bytes(), par::MIN_TASK_BYTES);
        let bounds = if tasks > 1 {
            par::weighted_bounds(&self.brow_ptr, tasks)
        } else {
            par::even_bounds(nbr, 1)
        };
        let isa = exec.isa.effective();
        with_values!(&self.values, v => {
            par::for_each_range(y, self.br, &bounds, |brs, ys| {
                let first = brs.start * self.br;
                self.gemv_brows(isa, v, brs, x, ys);
                self.values.scale_rows(first, ys);
            })
        });
        Ok(())
    }

    /// GEMV over block rows `brs`; `y` starts at row `brs.start * br`.
    fn gemv_brows<T: Element>(
        &self,
        isa: Isa,
        v: &[T],
        brs: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let (br, bc) = (self.br, self.bc);
        match (isa, br, bc) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2Fma | Isa::Avx512, 16, _) => {
                // SAFETY: AVX2 present (`effective`); block arrays consistent by construction,
                // block columns < ceil(cols/bc) and kc clamps reads of x to < cols; y covers the
                // rows of `brs` (split by `for_each_range` in units of br).
                unsafe { x86::gemv_b16(&self.brow_ptr, &self.bcol, v, bc, self.cols, brs, x, y) }
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2Fma | Isa::Avx512, 4, 1) => {
                // SAFETY: as above; with bc == 1 every block column is a valid column.
                unsafe { x86::gemv_4x1(&self.brow_ptr, &self.bcol, v, brs, x, y) }
            }
            _ => {
                let mut acc = vec![0.0f32; br];
                let start = brs.start;
                for rb in brs {
                    acc.fill(0.0);
                    for b in self.brow_ptr[rb] as usize..self.brow_ptr[rb + 1] as usize {
                        let c0 = self.bcol[b] as usize * bc;
                        let kc = bc.min(self.cols - c0);
                        let blk = &v[b * br * bc..][..br * bc];
                        for k in 0..kc {
                            let xv = x[c0 + k];
                            for (a, w) in acc.iter_mut().zip(&blk[k * br..][..br]) {
                                *a += w.to_f32() * xv;
                            }
                        }
                    }
                    let y0 = (rb - start) * br;
                    let nr = br.min(y.len() - y0);
                    y[y0..y0 + nr].copy_from_slice(&acc[..nr]);
                }
            }
        }
    }

    /// `Y = X·Wᵀ` (`X`: `[tokens, cols]`, `Y`: `[tokens, rows]`, row-major; `Y` overwritten).
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", checked_len(tokens, self.cols)?, x.len())?;
        expect_len("y", checked_len(tokens, self.rows)?, y.len())?;
        if tokens <= 2 {
            for t in 0..tokens {
                let (xs, ys) = (
                    &x[t * self.cols..][..self.cols],
                    &mut y[t * self.rows..][..self.rows],
                );
                self.gemv(xs, ys, exec)?;
            }
            return Ok(());
        }
        if !self.br.is_multiple_of(NR) {
            let nnz = self.blocks() * self.br * self.bc;
            let (rows, cols) = (self.rows, self.cols);
            rowgemm::row_gemm(self, rows, cols, None, nnz, x, tokens, y, exec);
            return Ok(());
        }
        let nbr = self.block_rows();
        let flops = (self.blocks() * self.br * self.bc).saturating_mul(tokens);
        let tasks = par::task_count(exec, nbr, flops, par::MIN_TASK_FLOPS);
        let bounds = if tasks > 1 {
            par::weighted_bounds(&self.brow_ptr, tasks)
        } else {
            par::even_bounds(nbr, 1)
        };
        let out = SharedOut::new(y);
        let isa = exec.isa.effective();
        par::for_each_bound(&bounds, |brs| {
            let mut segs = Vec::new();
            let mut scratch = Vec::new();
            for rb in brs {
                let (b0, b1) = (self.brow_ptr[rb] as usize, self.brow_ptr[rb + 1] as usize);
                let bsz = self.br * self.bc;
                // f32 blocks are read in place; bf16 ones are widened once per block row, i8
                // ones dequantized (row `rb·br + j % br` of block element `j`), then reused by
                // every token tile.
                let (panel, base): (&[f32], usize) = match &self.values {
                    Values::F32(v) => (v, b0 * bsz),
                    Values::Bf16(v) => {
                        scratch.clear();
                        scratch.extend(v[b0 * bsz..b1 * bsz].iter().map(|w| w.to_f32()));
                        (&scratch, 0)
                    }
                    Values::I8 { q, scales } => {
                        // Rows past the matrix (ragged last block row) hold zeros: scale 0.
                        let scale = |i: usize| scales.get(rb * self.br + i).copied().unwrap_or(0.0);
                        scratch.clear();
                        scratch.extend(
                            q[b0 * bsz..b1 * bsz]
                                .iter()
                                .enumerate()
                                .map(|(j, w)| w.to_f32() * scale(j % self.br)),
                        );
                        (&scratch, 0)
                    }
                };
                for p in 0..self.br / NR {
                    let r0 = rb * self.br + p * NR;
                    if r0 >= self.rows {
                        break;
                    }
                    segs.clear();
                    segs.extend((b0..b1).map(|b| {
                        let col = self.bcol[b] as usize * self.bc;
                        Segment {
                            col,
                            kc: self.bc.min(self.cols - col),
                            offset: base + (b - b0) * bsz + p * NR,
                        }
                    }));
                    let nr = NR.min(self.rows - r0);
                    gemm::panel_gemm(
                        isa, x, tokens, self.cols, &segs, panel, self.br, out, self.rows, r0, nr,
                    );
                }
            }
        });
        Ok(())
    }
}

impl RowDecode for BsrMatrix {
    fn decode_row(&self, r: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>) {
        idx.clear();
        val.clear();
        let (br, bc) = (self.br, self.bc);
        let (rb, i) = (r / br, r % br);
        for b in self.brow_ptr[rb] as usize..self.brow_ptr[rb + 1] as usize {
            let c0 = self.bcol[b] as usize * bc;
            for k in 0..bc.min(self.cols - c0) {
                let v = self.values.get(b * br * bc + k * br + i, r);
                // Zeros inside a stored block cost FMAs and change nothing: skip them.
                if v != 0.0 {
                    idx.push((c0 + k) as u32);
                    val.push(v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::element::Element;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Accumulates `x[c0 + k] * block[k]` for `k in 0..kc` into two pairs of accumulators
    /// (even and odd `k`, so consecutive FMAs are independent).
    ///
    /// # Safety
    /// AVX2+FMA; `p` holds `kc` columns of 16; `xp + c0 .. + kc` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block16<T: Element>(p: *const T, xp: *const f32, kc: usize, a: &mut [__m256; 4]) {
        // SAFETY: caller's contract.
        unsafe {
            let mut k = 0;
            while k + 2 <= kc {
                let x0 = _mm256_broadcast_ss(&*xp.add(k));
                let x1 = _mm256_broadcast_ss(&*xp.add(k + 1));
                a[0] = _mm256_fmadd_ps(T::load8(p.add(16 * k)), x0, a[0]);
                a[1] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 8)), x0, a[1]);
                a[2] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 16)), x1, a[2]);
                a[3] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 24)), x1, a[3]);
                k += 2;
            }
            if k < kc {
                let x0 = _mm256_broadcast_ss(&*xp.add(k));
                a[0] = _mm256_fmadd_ps(T::load8(p.add(16 * k)), x0, a[0]);
                a[1] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 8)), x0, a[1]);
            }
        }
    }

    /// The 16x16 block, fully unrolled (the common case).
    ///
    /// # Safety
    /// As [`block16`] with `kc == 16`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block16x16<T: Element>(p: *const T, xp: *const f32, a: &mut [__m256; 4]) {
        // SAFETY: caller's contract.
        unsafe {
            for k in (0..16).step_by(2) {
                let x0 = _mm256_broadcast_ss(&*xp.add(k));
                let x1 = _mm256_broadcast_ss(&*xp.add(k + 1));
                a[0] = _mm256_fmadd_ps(T::load8(p.add(16 * k)), x0, a[0]);
                a[1] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 8)), x0, a[1]);
                a[2] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 16)), x1, a[2]);
                a[3] = _mm256_fmadd_ps(T::load8(p.add(16 * k + 24)), x1, a[3]);
            }
        }
    }

    /// GEMV for `16 x bc` blocks over block rows `brs`.
    ///
    /// # Safety
    /// AVX2+FMA; consistent block arrays with `vals.len() >= blocks * 16 * bc`; block columns
    /// `< ceil(cols / bc)`; `x.len() == cols`; `y` covers rows `brs.start*16 ..` (clamped).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_b16<T: Element>(
        brow_ptr: &[u32],
        bcol: &[u32],
        vals: &[T],
        bc: usize,
        cols: usize,
        brs: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let start = brs.start;
        for rb in brs {
            let mut a = [_mm256_setzero_ps(); 4];
            let (b0, b1) = (brow_ptr[rb] as usize, brow_ptr[rb + 1] as usize);
            for (b, &cb) in (b0..b1).zip(&bcol[b0..b1]) {
                let c0 = cb as usize * bc;
                let kc = bc.min(cols - c0);
                // SAFETY: block b is inside vals; columns c0..c0+kc < cols == x.len().
                unsafe {
                    let p = vals.as_ptr().add(b * 16 * bc);
                    if kc == 16 {
                        block16x16(p, x.as_ptr().add(c0), &mut a);
                    } else {
                        block16(p, x.as_ptr().add(c0), kc, &mut a);
                    }
                }
            }
            let mut out = [0.0f32; 16];
            // SAFETY: `out` has 16 lanes.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(a[0], a[2]));
                _mm256_storeu_ps(out.as_mut_ptr().add(8), _mm256_add_ps(a[1], a[3]));
            }
            let y0 = (rb - start) * 16;
            let nr = 16.min(y.len() - y0);
            y[y0..y0 + nr].copy_from_slice(&out[..nr]);
        }
    }

    /// GEMV for `4x1` blocks: each block is 4 rows of one column, i.e. one 128-bit FMA.
    ///
    /// # Safety
    /// AVX2+FMA; consistent block arrays with `vals.len() >= blocks * 4`; every block column
    /// `< x.len()`; `y` covers rows `brs.start*4 ..` (clamped).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_4x1<T: Element>(
        brow_ptr: &[u32],
        bcol: &[u32],
        vals: &[T],
        brs: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let start = brs.start;
        let (vp, xp) = (vals.as_ptr(), x.as_ptr());
        for rb in brs {
            let (s, e) = (brow_ptr[rb] as usize, brow_ptr[rb + 1] as usize);
            let mut a0 = _mm_setzero_ps();
            let mut a1 = _mm_setzero_ps();
            let mut b = s;
            // SAFETY: blocks s..e inside vals; block columns < x.len() (contract).
            unsafe {
                while b + 2 <= e {
                    let x0 = _mm_broadcast_ss(&*xp.add(bcol[b] as usize));
                    let x1 = _mm_broadcast_ss(&*xp.add(bcol[b + 1] as usize));
                    a0 = _mm_fmadd_ps(T::load4(vp.add(4 * b)), x0, a0);
                    a1 = _mm_fmadd_ps(T::load4(vp.add(4 * b + 4)), x1, a1);
                    b += 2;
                }
                if b < e {
                    let x0 = _mm_broadcast_ss(&*xp.add(bcol[b] as usize));
                    a0 = _mm_fmadd_ps(T::load4(vp.add(4 * b)), x0, a0);
                }
            }
            let mut out = [0.0f32; 4];
            // SAFETY: `out` has 4 lanes.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(a0, a1)) };
            let y0 = (rb - start) * 4;
            let nr = 4.min(y.len() - y0);
            y[y0..y0 + nr].copy_from_slice(&out[..nr]);
        }
    }
}
