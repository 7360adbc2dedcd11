//! Keep-masks: one flag per weight (true = keep) plus the structure they were selected under,
//! with the structural invariants checked on construction. Every mask a plugin hands back went
//! through [`Mask::new`], so nothing malformed reaches the model.

use std::fmt;

/// The group structure under which weights are kept or removed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Structure {
    /// Single weights.
    Unstructured,
    /// Rectangular blocks of `rows x cols` (edge blocks may be smaller).
    Blocks {
        /// Block height (along out-features).
        rows: usize,
        /// Block width (along in-features).
        cols: usize,
    },
    /// At most `n` kept in every `m` consecutive input weights of a row.
    NOfM {
        /// Kept per group.
        n: usize,
        /// Group size.
        m: usize,
    },
    /// Whole rows.
    Rows,
    /// Whole columns.
    Columns,
    /// Groups of this many consecutive rows (attention heads of Q/K/V).
    RowGroups {
        /// Rows per group.
        size: usize,
    },
    /// Groups of this many consecutive columns (attention heads of O).
    ColumnGroups {
        /// Columns per group.
        size: usize,
    },
}

impl fmt::Display for Structure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Structure::Unstructured => write!(f, "unstructured"),
            Structure::Blocks { rows, cols } => write!(f, "{rows}x{cols} blocks"),
            Structure::NOfM { n, m } => write!(f, "{n}:{m}"),
            Structure::Rows => write!(f, "rows"),
            Structure::Columns => write!(f, "columns"),
            Structure::RowGroups { size } => write!(f, "row groups of {size}"),
            Structure::ColumnGroups { size } => write!(f, "column groups of {size}"),
        }
    }
}

/// Reads back what `Display` writes (reports record structures that way).
impl std::str::FromStr for Structure {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.parse::<usize>()
                .map_err(|_| format!("`{text}` is not a mask structure"))
        };
        Ok(match text {
            "unstructured" => Structure::Unstructured,
            "rows" => Structure::Rows,
            "columns" => Structure::Columns,
            _ => {
                if let Some(size) = text.strip_prefix("row groups of ") {
                    Structure::RowGroups {
                        size: number(size)?,
                    }
                } else if let Some(size) = text.strip_prefix("column groups of ") {
                    Structure::ColumnGroups {
                        size: number(size)?,
                    }
                } else if let Some((rows, cols)) =
                    text.strip_suffix(" blocks").and_then(|d| d.split_once('x'))
                {
                    Structure::Blocks {
                        rows: number(rows)?,
                        cols: number(cols)?,
                    }
                } else if let Some((n, m)) = text.split_once(':') {
                    Structure::NOfM {
                        n: number(n)?,
                        m: number(m)?,
                    }
                } else {
                    return Err(format!("`{text}` is not a mask structure"));
                }
            }
        })
    }
}

/// A keep-mask over one weight tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    shape: Vec<usize>,
    keep: Vec<bool>,
    structure: Structure,
    /// Number of kept flags, counted once (reports and checks ask for it often).
    kept: usize,
}

fn count_kept(keep: &[bool]) -> usize {
    use rayon::prelude::*;
    keep.par_chunks(1 << 16)
        .map(|c| c.iter().filter(|&&k| k).count())
        .sum()
}

/// Splits a shape into (rows, cols), treating 1-D tensors as one row.
pub fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [c] => (1, *c),
        [r, c] => (*r, *c),
        [.., c] => (
            shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .unwrap_or(usize::MAX)
                / c.max(&1),
            *c,
        ),
    }
}

impl Mask {
    /// Builds a mask, checking the length and the structure's invariant.
    pub fn new(shape: Vec<usize>, keep: Vec<bool>, structure: Structure) -> Result<Self, String> {
        // The non-zero dimensions must multiply without overflow too: candle multiplies all of
        // them (element count, strides) unchecked, zero or not.
        let numel = crate::plugin::budget::numel(&shape)
            .map_err(|_| format!("shape {shape:?} has more elements than memory can address"))?;
        if keep.len() != numel {
            return Err(format!(
                "mask has {} entries but shape {shape:?} has {numel}",
                keep.len()
            ));
        }
        let kept = count_kept(&keep);
        let mask = Mask {
            shape,
            keep,
            structure,
            kept,
        };
        mask.check_structure()?;
        Ok(mask)
    }

    /// A mask keeping everything.
    pub fn dense(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Mask {
            shape,
            keep: vec![true; n],
            structure: Structure::Unstructured,
            kept: n,
        }
    }

    /// Shape of the masked tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// One flag per element, row-major.
    pub fn keep(&self) -> &[bool] {
        &self.keep
    }

    /// The structure the mask honours.
    pub fn structure(&self) -> Structure {
        self.structure
    }

    /// Number of kept elements.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// Fraction kept.
    pub fn density(&self) -> f64 {
        if self.keep.is_empty() {
            1.0
        } else {
            self.kept() as f64 / self.keep.len() as f64
        }
    }

    /// Intersection with another mask of the same shape. The result keeps `self`'s structure
    /// when `other` is dense in it (composing stages), else becomes unstructured.
    pub fn and(&self, other: &Mask) -> Result<Mask, String> {
        if self.shape != other.shape {
            return Err(format!(
                "cannot combine masks of shapes {:?} and {:?}",
                self.shape, other.shape
            ));
        }
        let keep: Vec<bool> = self
            .keep
            .iter()
            .zip(&other.keep)
            .map(|(a, b)| *a && *b)
            .collect();
        let kept = count_kept(&keep);
        let mut out = Mask {
            shape: self.shape.clone(),
            keep,
            structure: self.structure,
            kept,
        };
        if out.check_structure().is_err() {
            out.structure = other.structure;
            if out.check_structure().is_err() {
                out.structure = Structure::Unstructured;
            }
        }
        Ok(out)
    }

    /// Checks that the flags honour the declared structure.
    pub fn check_structure(&self) -> Result<(), String> {
        let (r, c) = rows_cols(&self.shape);
        // Group sizes must still make sense for an empty mask, but there are no flags to check
        // (and indexing the first flag of a group would be out of bounds).
        if self.keep.is_empty() {
            return crate::ops::group_grid(&self.shape, self.structure).map(|_| ());
        }
        let at = |i: usize, j: usize| self.keep[i * c + j];
        match self.structure {
            Structure::Unstructured => Ok(()),
            Structure::Blocks { rows: br, cols: bc } => {
                if br == 0 || bc == 0 {
                    return Err("block shape must be positive".into());
                }
                for bi in (0..r).step_by(br) {
                    for bj in (0..c).step_by(bc) {
                        let first = at(bi, bj);
                        for i in bi..(bi + br).min(r) {
                            for j in bj..(bj + bc).min(c) {
                                if at(i, j) != first {
                                    return Err(format!(
                                        "not {br}x{bc}-block structured: block at ({bi}, {bj}) is partly kept"
                                    ));
                                }
                            }
                        }
                    }
                }
                Ok(())
            }
            Structure::NOfM { n, m } => {
                if m == 0 || n > m {
                    return Err(format!("invalid N:M pattern {n}:{m}"));
                }
                if c % m != 0 {
                    return Err(format!("{c} columns are not a multiple of m = {m}"));
                }
                for i in 0..r {
                    for g in 0..c / m {
                        let kept = (0..m).filter(|&j| at(i, g * m + j)).count();
                        if kept > n {
                            return Err(format!(
                                "not {n}:{m}: row {i}, columns {}..{} keep {kept}",
                                g * m,
                                g * m + m
                            ));
                        }
                    }
                }
                Ok(())
            }
            Structure::Rows => self.check_row_groups(r, c, 1),
            Structure::RowGroups { size } => self.check_row_groups(r, c, size),
            Structure::Columns => self.check_column_groups(r, c, 1),
            Structure::ColumnGroups { size } => self.check_column_groups(r, c, size),
        }
    }

    fn check_row_groups(&self, r: usize, c: usize, size: usize) -> Result<(), String> {
        if size == 0 || !r.is_multiple_of(size) {
            return Err(format!("{r} rows do not split into groups of {size}"));
        }
        for g in 0..r / size {
            let first = self.keep[g * size * c];
            if self.keep[g * size * c..(g + 1) * size * c]
                .iter()
                .any(|&k| k != first)
            {
                return Err(format!("row group {g} (rows of {size}) is partly kept"));
            }
        }
        Ok(())
    }

    fn check_column_groups(&self, r: usize, c: usize, size: usize) -> Result<(), String> {
        if size == 0 || !c.is_multiple_of(size) {
            return Err(format!("{c} columns do not split into groups of {size}"));
        }
        for g in 0..c / size {
            let first = self.keep[g * size];
            for i in 0..r {
                if self.keep[i * c + g * size..i * c + (g + 1) * size]
                    .iter()
                    .any(|&k| k != first)
                {
                    return Err(format!(
                        "column group {g} (columns of {size}) is partly kept"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_invariants_are_checked() {
        let keep = vec![true, true, false, false, true, false, true, false];
        assert!(Mask::new(vec![2, 4], keep.clone(), Structure::NOfM { n: 2, m: 4 }).is_ok());
        assert!(Mask::new(vec![2, 4], keep.clone(), Structure::NOfM { n: 1, m: 4 }).is_err());
        assert!(
            Mask::new(
                vec![2, 4],
                keep.clone(),
                Structure::Blocks { rows: 2, cols: 2 }
            )
            .is_err()
        );
        let blocky = vec![true, true, false, false, true, true, false, false];
        assert!(
            Mask::new(
                vec![2, 4],
                blocky.clone(),
                Structure::Blocks { rows: 2, cols: 2 }
            )
            .is_ok()
        );
        assert!(Mask::new(vec![2, 4], blocky.clone(), Structure::Columns).is_ok());
        assert!(Mask::new(vec![2, 4], blocky, Structure::Rows).is_err());
        assert!(Mask::new(vec![3, 4], keep, Structure::Unstructured).is_err());
    }

    #[test]
    fn empty_masks_are_checked_without_indexing() {
        // Zero rows or zero columns under every structure: no panic, and the group sizes are
        // still validated.
        for shape in [vec![0, 4], vec![4, 0], vec![0, 0], vec![0], vec![2, 0, 3]] {
            for s in [
                Structure::Unstructured,
                Structure::Rows,
                Structure::Columns,
                Structure::RowGroups { size: 2 },
                Structure::ColumnGroups { size: 2 },
                Structure::Blocks { rows: 2, cols: 2 },
                Structure::NOfM { n: 2, m: 4 },
            ] {
                let _ = Mask::new(shape.clone(), Vec::new(), s);
            }
        }
        assert!(Mask::new(vec![4, 0], vec![], Structure::Rows).is_ok());
        assert!(Mask::new(vec![0, 4], vec![], Structure::Columns).is_ok());
        assert!(Mask::new(vec![0, 4], vec![], Structure::RowGroups { size: 0 }).is_err());
    }

    #[test]
    fn overflowing_shapes_are_refused() {
        assert!(Mask::new(vec![1 << 32, 1 << 32], vec![], Structure::Unstructured).is_err());
        assert!(Mask::new(vec![1 << 16; 4], vec![], Structure::Rows).is_err());
    }

    #[test]
    fn and_keeps_structure_when_possible() {
        let a = Mask::new(
            vec![1, 4],
            vec![true, true, false, false],
            Structure::Blocks { rows: 1, cols: 2 },
        )
        .unwrap();
        let b = Mask::dense(vec![1, 4]);
        let c = a.and(&b).unwrap();
        assert_eq!(c.structure(), a.structure());
        assert_eq!(c.kept(), 2);
    }

    #[test]
    fn structures_read_back_what_display_writes() {
        for s in [
            Structure::Unstructured,
            Structure::Blocks { rows: 16, cols: 8 },
            Structure::NOfM { n: 2, m: 4 },
            Structure::Rows,
            Structure::Columns,
            Structure::RowGroups { size: 64 },
            Structure::ColumnGroups { size: 64 },
        ] {
            assert_eq!(s.to_string().parse::<Structure>(), Ok(s));
        }
        assert!("2:x".parse::<Structure>().is_err());
        assert!("diagonal".parse::<Structure>().is_err());
    }
}
