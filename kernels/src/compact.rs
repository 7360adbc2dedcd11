//! Row/column-pruned weights stored as a smaller dense matrix.
//!
//! When pruning removes whole output rows (neurons) or whole input columns (e.g. the inputs fed
//! by removed neurons of the previous layer), the kept entries form a dense sub-matrix
//! `[kept_rows, kept_cols]`. Storing just that sub-matrix plus the two index lists reads
//! `kept_rows · kept_cols` values with no per-weight index at all, and runs at dense speed:
//! GEMV gathers the kept activations into a contiguous buffer (one pass over `cols` floats,
//! negligible next to the weights), runs the dense kernel, and scatters the outputs (pruned
//! rows are written as zero so callers see the full `rows`-long output).
//!
//! The format is exact for any mask: a row or column with at least one kept entry is kept, so
//! nothing is lost; the planner only picks it when it saves bytes.

use crate::dense::DenseMatrix;
use crate::element::Dtype;
use crate::error::{KernelError, Result, checked_len, expect_len};
use crate::isa::Exec;
use crate::view::DenseView;

/// A dense sub-matrix at `kept_rows x kept_cols` of a `[rows, cols]` matrix that is zero
/// elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Ascending indices of the output rows that hold a kept entry.
    pub(crate) kept_rows: Vec<u32>,
    /// Ascending indices of the input columns that hold a kept entry.
    pub(crate) kept_cols: Vec<u32>,
    pub(crate) inner: DenseMatrix,
}

impl CompactMatrix {
    /// Packs the view, keeping every row and column that holds at least one kept entry.
    pub fn from_view(view: &DenseView<'_>, dtype: Dtype) -> Result<CompactMatrix> {
        let (rows, cols) = (view.rows(), view.cols());
        let too_large = || KernelError::TooLarge {
            rows,
            cols,
            reason: "compact indices must fit in u32",
        };
        let mut col_used = vec![false; cols];
        let mut kept_rows = Vec::new();
        for r in 0..rows {
            let mut any = false;
            for (c, used) in col_used.iter_mut().enumerate() {
                if view.is_kept(r, c) {
                    *used = true;
                    any = true;
                }
            }
            if any {
                kept_rows.push(u32::try_from(r).map_err(|_| too_large())?);
            }
        }
        let kept_cols = col_used
            .iter()
            .enumerate()
            .filter(|(_, u)| **u)
            .map(|(c, _)| u32::try_from(c).map_err(|_| too_large()))
            .collect::<Result<Vec<u32>>>()?;
        let mut sub = Vec::with_capacity(checked_len(kept_rows.len(), kept_cols.len())?);
        for &r in &kept_rows {
            sub.extend(kept_cols.iter().map(|&c| view.get(r as usize, c as usize)));
        }
        let inner = DenseMatrix::from_dense(&sub, kept_rows.len(), kept_cols.len(), dtype)?;
        Ok(CompactMatrix {
            rows,
            cols,
            kept_rows,
            kept_cols,
            inner,
        })
    }

    /// Packs dense-with-zeros weights.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, dtype: Dtype) -> Result<CompactMatrix> {
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

    /// `(kept_rows, kept_cols)`: the shape of the stored sub-matrix.
    pub fn kept_shape(&self) -> (usize, usize) {
        (self.kept_rows.len(), self.kept_cols.len())
    }

    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.inner.dtype()
    }

    /// Bytes a GEMV reads: the sub-matrix and both index lists.
    pub fn bytes(&self) -> usize {
        self.inner.bytes() + 4 * (self.kept_rows.len() + self.kept_cols.len())
    }

    fn all_cols(&self) -> bool {
        self.kept_cols.len() == self.cols
    }

    fn all_rows(&self) -> bool {
        self.kept_rows.len() == self.rows
    }

    /// Unpacks to dense row-major f32.
    pub fn to_dense(&self) -> Vec<f32> {
        let sub = self.inner.to_dense();
        let kc = self.kept_cols.len();
        let mut out = vec![0.0; self.rows * self.cols];
        for (i, &r) in self.kept_rows.iter().enumerate() {
            for (j, &c) in self.kept_cols.iter().enumerate() {
                out[r as usize * self.cols + c as usize] = sub[i * kc + j];
            }
        }
        out
    }

    /// `x` restricted to the kept columns, `tokens` rows of `cols` each.
    fn gather_cols(&self, x: &[f32], tokens: usize) -> Vec<f32> {
        let mut xs = Vec::with_capacity(tokens * self.kept_cols.len());
        for t in 0..tokens {
            let row = &x[t * self.cols..][..self.cols];
            xs.extend(self.kept_cols.iter().map(|&c| row[c as usize]));
        }
        xs
    }

    /// `y = W·x` (`x`: `cols`, `y`: `rows`, overwritten).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        self.gemm(x, 1, y, exec)
    }

    /// `Y = X·Wᵀ` (`X`: `[tokens, cols]`, `Y`: `[tokens, rows]`, row-major; `Y` overwritten).
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", checked_len(tokens, self.cols)?, x.len())?;
        expect_len("y", checked_len(tokens, self.rows)?, y.len())?;
        // Skip the copies when nothing was removed on that side.
        let gathered;
        let xs = if self.all_cols() {
            x
        } else {
            gathered = self.gather_cols(x, tokens);
            &gathered
        };
        if self.all_rows() {
            return self.inner.gemm(xs, tokens, y, exec);
        }
        let kr = self.kept_rows.len();
        let mut ys = vec![0.0f32; tokens * kr];
        self.inner.gemm(xs, tokens, &mut ys, exec)?;
        y.fill(0.0);
        for t in 0..tokens {
            let out = &mut y[t * self.rows..][..self.rows];
            for (&r, &v) in self.kept_rows.iter().zip(&ys[t * kr..][..kr]) {
                out[r as usize] = v;
            }
        }
        Ok(())
    }
}
