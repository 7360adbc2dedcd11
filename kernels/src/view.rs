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

    /// Row `r`'s kept entries as bits into `words` (`cols.div_ceil(64)` of them): bit `c % 64`
    /// of word `c / 64` set where `(r, c)` is kept, none past the last column. The planner's
    /// statistics and the bitmap's packing read these instead of asking [`Self::is_kept`]
    /// entry by entry, which cost a load of SmolLM2's 211 layers seconds.
    pub(crate) fn row_bits(&self, r: usize, words: &mut [u64]) {
        let row = r * self.cols..(r + 1) * self.cols;
        match &self.mask {
            None => bits_of(&self.values[row], |&v| v != 0.0, words),
            Some(Mask::Bools(m)) => bits_of(&m[row], |&k| k, words),
            Some(Mask::Bytes(m)) => bits_of(&m[row], |&k| k != 0, words),
        }
    }

    /// Row `r`'s stored values as they are, pruned entries included (a kept entry's value is
    /// what [`Self::get`] returns for it).
    pub(crate) fn stored_row(&self, r: usize) -> &'a [f32] {
        &self.values[r * self.cols..(r + 1) * self.cols]
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

/// `row`'s entries that `kept` accepts as bits into `words` (64 a word, see
/// [`DenseView::row_bits`]).
fn bits_of<T>(row: &[T], kept: impl Fn(&T) -> bool, words: &mut [u64]) {
    assert!(words.len() >= row.len().div_ceil(64));
    let chunks = row.chunks_exact(64);
    let tail = chunks.remainder();
    let mut n = 0;
    for (w, chunk) in words.iter_mut().zip(chunks) {
        *w = chunk
            .iter()
            .enumerate()
            .fold(0u64, |bits, (j, v)| bits | u64::from(kept(v)) << j);
        n += 1;
    }
    if !tail.is_empty() {
        words[n] = tail
            .iter()
            .enumerate()
            .fold(0u64, |bits, (j, v)| bits | u64::from(kept(v)) << j);
    }
}

/// How many of bits `start..end` of `words` (64 a word, bit `i % 64` of word `i / 64`) are set.
pub(crate) fn count_bits(words: &[u64], start: usize, end: usize) -> u32 {
    let mut count = 0;
    let mut i = start;
    while i < end {
        let (w, b) = (i / 64, i % 64);
        let take = (64 - b).min(end - i);
        let field = words[w] >> b;
        let field = if take == 64 {
            field
        } else {
            field & ((1u64 << take) - 1)
        };
        count += field.count_ones();
        i += take;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bits of a row agree with `is_kept` for every mask layout, across word boundaries and
    /// in a ragged last word, and `count_bits` counts any range of them.
    #[test]
    fn row_bits_match_is_kept() {
        let (rows, cols) = (3, 131);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                if i % 3 == 0 || i % 7 == 1 {
                    0.0
                } else {
                    i as f32
                }
            })
            .collect();
        let bools: Vec<bool> = (0..rows * cols).map(|i| i % 5 != 2).collect();
        let bytes: Vec<u8> = (0..rows * cols).map(|i| (i % 4 == 1) as u8 * 7).collect();
        let views = [
            DenseView::new(&values, rows, cols).expect("view"),
            DenseView::with_mask(&values, &bools, rows, cols).expect("view"),
            DenseView::with_mask_bytes(&values, &bytes, rows, cols).expect("view"),
        ];
        for view in &views {
            let mut words = vec![u64::MAX; cols.div_ceil(64)];
            for r in 0..rows {
                view.row_bits(r, &mut words);
                for c in 0..cols {
                    let bit = words[c / 64] >> (c % 64) & 1 == 1;
                    assert_eq!(bit, view.is_kept(r, c), "row {r} column {c}");
                }
                assert_eq!(
                    words[cols / 64] >> (cols % 64),
                    0,
                    "no bits past the last column"
                );
                for (start, end) in [(0, cols), (5, 70), (60, 68), (64, 128), (130, 131), (9, 9)] {
                    let want = (start..end).filter(|&c| view.is_kept(r, c)).count() as u32;
                    assert_eq!(count_bits(&words, start, end), want, "{start}..{end}");
                }
            }
        }
    }
}
