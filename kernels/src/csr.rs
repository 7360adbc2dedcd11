//! Compressed sparse rows: one value and one column index per kept weight.
//!
//! Column indices are `u16` whenever `cols <= 65536` (every LLM hidden size), else `u32`: at
//! batch 1 bytes are time, and the index is a third (f32) or half (bf16) of each entry. The AVX2
//! GEMV builds 8 activations at a time from scalar loads (faster than `vgatherdps` on the
//! Zen 4 we measured) and FMAs them with 8 stored values; rows are split over the pool
//! balanced by stored entries rather than by row count.

use crate::element::{Dtype, Element, Values, with_values};
use crate::error::{KernelError, Result, checked_len, expect_len};
use crate::isa::{Exec, Isa};
use crate::par;
use crate::rowgemm::{self, RowDecode};
use crate::view::DenseView;
use std::ops::Range;

/// Column index storage, chosen by width at packing time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ColIndex {
    U16(Vec<u16>),
    U32(Vec<u32>),
}

/// A column index type usable by the kernels (`u16` or `u32`).
trait Index: Copy + Send + Sync + 'static {
    fn get(self) -> usize;
}
impl Index for u16 {
    #[inline(always)]
    fn get(self) -> usize {
        usize::from(self)
    }
}
impl Index for u32 {
    #[inline(always)]
    fn get(self) -> usize {
        self as usize
    }
}

/// CSR weights `[rows, cols]`: `row_ptr[r]..row_ptr[r+1]` indexes row `r`'s entries.
#[derive(Debug, Clone, PartialEq)]
pub struct CsrMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_ptr: Vec<u32>,
    pub(crate) idx: ColIndex,
    pub(crate) values: Values,
}

impl CsrMatrix {
    /// Packs the kept entries of the view.
    pub fn from_view(view: &DenseView<'_>, dtype: Dtype) -> Result<CsrMatrix> {
        if dtype == Dtype::I8 {
            return crate::quant::pack_i8(
                view,
                |qv| Self::from_view(qv, Dtype::F32),
                |w| &mut w.values,
            );
        }
        let (rows, cols) = (view.rows(), view.cols());
        // Column indices are stored as (at most) u32.
        if u32::try_from(cols).is_err() {
            return Err(KernelError::TooLarge {
                rows,
                cols,
                reason: "CSR column indices must fit in u32",
            });
        }
        let mut row_ptr = Vec::with_capacity(rows + 1);
        // Sized once (grown by doubling, a buffer can keep twice what it needs resident).
        let kept = view.kept();
        let mut idx = Vec::with_capacity(kept);
        let mut vals = Vec::with_capacity(kept);
        row_ptr.push(0u32);
        for r in 0..rows {
            for c in 0..cols {
                if view.is_kept(r, c) {
                    idx.push(c as u32);
                    vals.push(view.get(r, c));
                }
            }
            row_ptr.push(u32::try_from(idx.len()).map_err(|_| KernelError::TooLarge {
                rows,
                cols,
                reason: "more than u32::MAX stored entries",
            })?);
        }
        let idx = if cols <= 1 << 16 {
            ColIndex::U16(idx.into_iter().map(|c| c as u16).collect())
        } else {
            ColIndex::U32(idx)
        };
        Ok(CsrMatrix {
            rows,
            cols,
            row_ptr,
            idx,
            values: Values::from_f32(dtype, vals),
        })
    }

    /// Packs dense-with-zeros weights.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, dtype: Dtype) -> Result<CsrMatrix> {
        Self::from_view(&DenseView::new(w, rows, cols)?, dtype)
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.values.dtype()
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.row_ptr.last().map_or(0, |&n| n as usize)
    }

    /// Bytes per column index (2 or 4).
    pub fn index_bytes(&self) -> usize {
        match self.idx {
            ColIndex::U16(_) => 2,
            ColIndex::U32(_) => 4,
        }
    }

    /// Bytes a GEMV reads: values, indices and row pointers.
    pub fn bytes(&self) -> usize {
        self.values.bytes() + self.nnz() * self.index_bytes() + self.row_ptr.len() * 4
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

    /// `y = W·x` (`x`: `cols`, `y`: `rows`, overwritten).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", self.cols, x.len())?;
        expect_len("y", self.rows, y.len())?;
        // Split by work: every kept weight costs a gather of x besides its bytes.
        let work = par::work_bytes(self.bytes(), self.nnz(), crate::plan::CSR_COMPUTE_PER_NNZ);
        let tasks = par::task_count(exec, self.rows, work, par::MIN_TASK_BYTES);
        let bounds = if tasks > 1 {
            par::weighted_bounds(&self.row_ptr, tasks)
        } else {
            par::even_bounds(self.rows, 1)
        };
        let isa = exec.isa.effective();
        let rp = &self.row_ptr;
        let values = &self.values;
        with_values!(values, v => match &self.idx {
            ColIndex::U16(ix) => par::for_each_range(y, 1, &bounds, |r, ys| {
                let first = r.start;
                gemv_rows(isa, rp, ix, v, r, x, ys);
                values.scale_rows(first, ys);
            }),
            ColIndex::U32(ix) => par::for_each_range(y, 1, &bounds, |r, ys| {
                let first = r.start;
                gemv_rows(isa, rp, ix, v, r, x, ys);
                values.scale_rows(first, ys);
            }),
        });
        Ok(())
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
        let (rows, cols, nnz) = (self.rows, self.cols, self.nnz());
        rowgemm::row_gemm(
            self,
            rows,
            cols,
            Some(&self.row_ptr),
            nnz,
            x,
            tokens,
            y,
            exec,
        );
        Ok(())
    }
}

impl RowDecode for CsrMatrix {
    fn decode_row(&self, r: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>) {
        idx.clear();
        val.clear();
        let (s, e) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
        match &self.idx {
            ColIndex::U16(ix) => idx.extend(ix[s..e].iter().map(|&c| u32::from(c))),
            ColIndex::U32(ix) => idx.extend_from_slice(&ix[s..e]),
        }
        val.extend((s..e).map(|i| self.values.get(i, r)));
    }
}

/// GEMV over a row range; `y.len() == rows.len()`.
fn gemv_rows<T: Element, I: Index>(
    isa: Isa,
    row_ptr: &[u32],
    idx: &[I],
    vals: &[T],
    rows: Range<usize>,
    x: &[f32],
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma | Isa::Avx512 => {
            // SAFETY: AVX2 present (`effective`); the packer guarantees row_ptr is monotone and
            // within `idx`/`vals`, and every index < cols == x.len() (checked by `gemv`).
            unsafe { x86::gemv_rows(row_ptr, idx, vals, rows, x, y) }
        }
        _ => {
            for (yi, r) in y.iter_mut().zip(rows) {
                let (s, e) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
                let mut acc = [0.0f32; 8];
                let (ic, vc) = (idx[s..e].chunks_exact(8), vals[s..e].chunks_exact(8));
                let (it, vt) = (ic.remainder(), vc.remainder());
                for (i8, v8) in ic.zip(vc) {
                    for j in 0..8 {
                        acc[j] += v8[j].to_f32() * x[i8[j].get()];
                    }
                }
                let mut s = crate::simd::sum8(acc);
                for (i, v) in it.iter().zip(vt) {
                    s += v.to_f32() * x[i.get()];
                }
                *yi = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Index;
    use crate::element::Element;
    use crate::simd::x86::hsum;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// `x[idx[0..8]]` as one vector, from eight scalar loads. Not `vgatherdps`: on the Zen 4
    /// we tuned on, the hardware gather made the whole CSR GEMV 1.55x slower (cache-hot,
    /// one core: 0.061 vs 0.039 ms for a 50%-sparse 576x576), since it issues the same eight
    /// loads with more micro-ops.
    ///
    /// # Safety
    /// AVX2; 8 indices readable at `ip`, each `< x.len()`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gather8<I: Index>(xp: *const f32, ip: *const I) -> __m256 {
        // SAFETY: caller's contract.
        unsafe {
            let g = |j: usize| *xp.add((*ip.add(j)).get());
            _mm256_setr_ps(g(0), g(1), g(2), g(3), g(4), g(5), g(6), g(7))
        }
    }

    /// # Safety
    /// AVX2+FMA; `row_ptr` monotone with entries within `idx`/`vals`; every index `< x.len()`;
    /// `y.len() == rows.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemv_rows<T: Element, I: Index>(
        row_ptr: &[u32],
        idx: &[I],
        vals: &[T],
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let (ip, vp, xp) = (idx.as_ptr(), vals.as_ptr(), x.as_ptr());
        for (yi, r) in y.iter_mut().zip(rows) {
            let (s, e) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut k = s;
            // SAFETY: s..e lies in idx/vals, indices < x.len() (contract).
            unsafe {
                // Two independent FMA chains per iteration.
                while k + 16 <= e {
                    let g0 = gather8(xp, ip.add(k));
                    let g1 = gather8(xp, ip.add(k + 8));
                    a0 = _mm256_fmadd_ps(T::load8(vp.add(k)), g0, a0);
                    a1 = _mm256_fmadd_ps(T::load8(vp.add(k + 8)), g1, a1);
                    k += 16;
                }
                if k + 8 <= e {
                    let g0 = gather8(xp, ip.add(k));
                    a0 = _mm256_fmadd_ps(T::load8(vp.add(k)), g0, a0);
                    k += 8;
                }
                let mut sum = hsum(_mm256_add_ps(a0, a1));
                while k < e {
                    sum += (*vp.add(k)).to_f32() * *xp.add((*ip.add(k)).get());
                    k += 1;
                }
                *yi = sum;
            }
        }
    }
}
