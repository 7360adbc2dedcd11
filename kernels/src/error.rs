//! The one error type of the crate.
//!
//! Every fallible entry point (packing, kernels, planner, bench) returns [`KernelError`]. Kernels
//! validate shapes once at their boundary so the inner loops can index without re-checking.

use thiserror::Error;

/// Everything that can go wrong while packing weights or running a kernel.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum KernelError {
    /// A buffer's length does not match the shape it was declared with.
    #[error("{what}: expected {expected} elements, got {actual}")]
    Length {
        /// Which buffer (e.g. "weights", "mask", "x", "y").
        what: &'static str,
        /// Length implied by the shape.
        expected: usize,
        /// Length actually passed.
        actual: usize,
    },

    /// A shape whose element count does not fit in memory or in the format's index type.
    #[error("shape {rows}x{cols} is too large: {reason}")]
    TooLarge {
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
        /// Which limit was exceeded.
        reason: &'static str,
    },

    /// A format parameter that cannot work (zero-sized block, N > M, unsupported M, ...).
    #[error("invalid format parameter: {0}")]
    InvalidParameter(String),

    /// The weights were declared N:M but a group keeps more than N of its M weights.
    ///
    /// Refusing is deliberate: silently densifying would hide a pruning bug and the memory
    /// savings the caller asked for.
    #[error(
        "layer `{layer}` is not {n}:{m} sparse: row {row}, columns {col}..{col_end} keep {kept} \
         weights (at most {n} of every {m} consecutive input weights may be kept)"
    )]
    NotNm {
        /// Layer name given by the caller.
        layer: String,
        /// Kept weights allowed per group.
        n: usize,
        /// Group width along the input dimension.
        m: usize,
        /// Offending output row.
        row: usize,
        /// First input column of the offending group.
        col: usize,
        /// One past the last input column of the offending group.
        col_end: usize,
        /// Weights the group actually keeps.
        kept: usize,
    },

    /// A packed array read back from a file breaks an invariant of its format (see
    /// [`crate::PackedLinear::from_parts`]).
    #[error("packed array `{array}`: {message}")]
    Corrupt {
        /// Which array (`values`, `row_ptr`, ...).
        array: String,
        /// What is wrong with it.
        message: String,
    },

    /// The candle baseline failed inside the benchmark.
    #[error("baseline (candle) failed: {0}")]
    Baseline(String),
}

/// Shorthand used across the crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// `rows * cols`, refusing overflow instead of wrapping.
pub(crate) fn checked_len(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(KernelError::TooLarge {
        rows,
        cols,
        reason: "rows * cols overflows usize",
    })
}

/// Fails with [`KernelError::Length`] unless `actual == expected`.
pub(crate) fn expect_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::Length {
            what,
            expected,
            actual,
        })
    }
}
