//! The input every packer starts from: a dense row-major weight matrix, optionally with a mask.
//!
//! `W` is `[rows = out_features, cols = in_features]`, row-major. An entry is *kept* when the
//! mask says so or, without a mask, when it is not `0.0` (the "dense-with-zeros" convention of
//! pruned checkpoints; `-0.0` counts as pruned). With a mask, a kept entry whose value happens
//! to be zero is still stored, so the packed structure is exactly the mask's.

use crate::error::{Result, checked_len, expect_len};

/// A keep-mask in one of the two layouts callers have at hand: `bool`s, or bytes (non-zero =
/// kept, the layout of masks read from files or produced by plugins).
#[derive(Debug, Clone, Copy)]
enum Mask<'a> {
    Bools(&'a [bool]),
    Bytes(&'a [u8]),
}

impl Mask<'_> {
    #[inline]
    fn get(&self, i: usize) -> bool {
        match self {
            Mask::Bools(m) => m[i],
            Mask::Bytes(m) => m[i] != 0,
        }
    }

    fn count(&self) -> usize {
        match self {
            Mask::Bools(m) => m.iter().filter(|&&k| k).count(),
            Mask::Bytes(m) => m.iter().filter(|&&k| k != 0).count(),
        }
    }
}

/// Borrowed dense weights `[rows, cols]` plus an optional keep-mask of the same shape.
#[derive(Debug, Clone, Copy)]
pub struct DenseView<'a> {
    values: &'a [f32],
    mask: Option<Mask<'a>>,
    rows: usize,
    cols: usize,
}

impl<'a> DenseView<'a> {
    /// Dense-with-zeros weights: an entry is kept iff it is not zero.
    pub fn new(values: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        expect_len("weights", checked_len(rows, cols)?, values.len())?;
        Ok(DenseView {
            values,
            mask: None,
            rows,
            cols,
        })
    }

    /// Weights plus a keep-mask (`true` = kept). Entries the mask drops read as zero whatever
    /// their stored value.
    pub fn with_mask(
        values: &'a [f32],
        mask: &'a [bool],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let len = checked_len(rows, cols)?;
        expect_len("weights", len, values.len())?;
        expect_len("mask", len, mask.len())?;
        Ok(DenseView {
            values,
            mask: Some(Mask::Bools(mask)),
            rows,
            cols,
        })
    }

    /// Weights plus a byte keep-mask (non-zero = kept).
    pub fn with_mask_bytes(
        values: &'a [f32],
        mask: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let len = checked_len(rows, cols)?;
        expect_len("weights", len, values.len())?;
        expect_len("mask", len, mask.len())?;
        Ok(DenseView {
            values,
            mask: Some(Mask::Bytes(mask)),
            rows,
            cols,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether entry `(r, c)` is kept.
    #[inline]
    pub fn is_kept(&self, r: usize, c: usize) -> bool {
        let i = r * self.cols + c;
        match &self.mask {
            Some(m) => m.get(i),
            None => self.values[i] != 0.0,
        }
    }

    /// Entry `(r, c)` as the packed formats see it: zero when not kept.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> f32 {
        if self.is_kept(r, c) {
            self.values[r * self.cols + c]
        } else {
            0.0
        }
    }

    /// Number of kept entries.
    pub fn kept(&self) -> usize {
        match &self.mask {
            Some(m) => m.count(),
            None => self.values.iter().filter(|&&v| v != 0.0).count(),
        }
    }

    /// Row `r` with pruned entries zeroed (allocates only when a mask is present).
    pub(crate) fn row(&self, r: usize) -> std::borrow::Cow<'a, [f32]> {
        let row = &self.values[r * self.cols..(r + 1) * self.cols];
        match &self.mask {
            None => std::borrow::Cow::Borrowed(row),
            Some(m) => {
                let base = r * self.cols;
                std::borrow::Cow::Owned(
                    row.iter()
                        .enumerate()
                        .map(|(c, &v)| if m.get(base + c) { v } else { 0.0 })
                        .collect(),
                )
            }
        }
    }
}
