//! Packed weights as plain named arrays, and back: what a packed checkpoint stores for one
//! linear layer.
//!
//! [`PackedLinear::to_parts`] lists every array of a packed layer (values, i8 row scales, row
//! pointers, column indices, bitmaps, N:M metadata, kept rows and columns) with the format, the
//! dtype and the shape; [`PackedLinear::from_parts`] rebuilds the layer from arrays read back
//! from a file, without unpacking or re-planning anything.
//!
//! The kernels index packed arrays without bounds checks (SIMD loads past the last kept value
//! into the tail padding, gathers through stored column indices), so a file must never be able
//! to hand them arrays the packers could not have produced. [`PackedLinear::from_parts`]
//! therefore checks every invariant the packers guarantee before a kernel can see the arrays:
//! lengths implied by the shape, pointers that start at zero, never decrease and end at the
//! number of stored entries, column and block indices inside the matrix, bitmap popcounts that
//! match the row pointers and no bits past the last column, distinct N:M positions per group,
//! the zero tail padding, ascending kept rows and columns, finite values and scales. A refusal
//! is a [`KernelError::Corrupt`] naming the array and what is wrong with it.

use std::collections::BTreeMap;

use half::bf16;

use crate::bitmap::{self, BitmapMatrix};
use crate::bsr::BsrMatrix;
use crate::compact::CompactMatrix;
use crate::csr::{ColIndex, CsrMatrix};
use crate::dense::DenseMatrix;
use crate::element::{Dtype, Values};
use crate::error::{KernelError, Result, checked_len};
use crate::nm::{self, NmMatrix};
use crate::plan::{Format, PackedLinear};

/// One stored array of a packed layer, in its element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// Bytes: bitmaps, N:M position metadata.
    U8(Vec<u8>),
    /// 16-bit column indices (CSR up to 65536 columns).
    U16(Vec<u16>),
    /// 32-bit pointers and indices.
    U32(Vec<u32>),
    /// f32 values or i8 row scales.
    F32(Vec<f32>),
    /// bf16 values.
    Bf16(Vec<bf16>),
    /// Quantized i8 values.
    I8(Vec<i8>),
}

impl Array {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bf16(v) => v.len(),
            Array::I8(v) => v.len(),
        }
    }

    /// Whether the array holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name as files write it (`u8`, `u16`, `u32`, `f32`, `bf16`, `i8`).
    pub fn element(&self) -> &'static str {
        match self {
            Array::U8(_) => "u8",
            Array::U16(_) => "u16",
            Array::U32(_) => "u32",
            Array::F32(_) => "f32",
            Array::Bf16(_) => "bf16",
            Array::I8(_) => "i8",
        }
    }
}

/// A packed layer taken apart: format, dtype, shape and its arrays by name.
///
/// Array names per format: `values` always (and `scales`, one f32 per output row, for i8);
/// CSR `row_ptr`, `col_idx`; bitmap `masks`, `row_ptr`; BSR `block_row_ptr`, `block_col`;
/// N:M `meta`; compact `kept_rows`, `kept_cols` (its `values` and `scales` are the kept
/// sub-matrix's).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedParts {
    /// Storage format (with block shape or N:M pattern).
    pub format: Format,
    /// Dtype of the values.
    pub dtype: Dtype,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The arrays, by name.
    pub arrays: BTreeMap<String, Array>,
}

/// The largest BSR block side a packed file may declare. Planned blocks are 16x16 or 4x1 and
/// pruners use up to 64; the bound keeps a hostile header from sizing per-block buffers.
const MAX_BLOCK: usize = 1024;

fn corrupt(array: &str, message: impl Into<String>) -> KernelError {
    KernelError::Corrupt {
        array: array.to_string(),
        message: message.into(),
    }
}

/// Takes the arrays out of a [`PackedParts`] one by one, checking each one's element type, and
/// refuses arrays the format does not have.
struct Taker {
    arrays: BTreeMap<String, Array>,
}

impl Taker {
    fn take(&mut self, name: &str) -> Result<Array> {
        self.arrays
            .remove(name)
            .ok_or_else(|| corrupt(name, "missing"))
    }

    fn u32(&mut self, name: &str) -> Result<Vec<u32>> {
        match self.take(name)? {
            Array::U32(v) => Ok(v),
            other => Err(corrupt(
                name,
                format!("expected u32 elements, found {}", other.element()),
            )),
        }
    }

    fn u8(&mut self, name: &str) -> Result<Vec<u8>> {
        match self.take(name)? {
            Array::U8(v) => Ok(v),
            other => Err(corrupt(
                name,
                format!("expected u8 elements, found {}", other.element()),
            )),
        }
    }

    /// The values (and i8 scales) in `dtype`, with `len` values and `scale_rows` scales.
    fn values(&mut self, dtype: Dtype, len: usize, scale_rows: usize) -> Result<Values> {
        let values = self.take("values")?;
        let check_len = |n: usize| {
            if n == len {
                Ok(())
            } else {
                Err(corrupt(
                    "values",
                    format!("expected {len} elements for this shape, found {n}"),
                ))
            }
        };
        let values = match (dtype, values) {
            (Dtype::F32, Array::F32(v)) => {
                check_len(v.len())?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(corrupt("values", format!("element {i} is not finite")));
                }
                Values::F32(v)
            }
            (Dtype::Bf16, Array::Bf16(v)) => {
                check_len(v.len())?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(corrupt("values", format!("element {i} is not finite")));
                }
                Values::Bf16(v)
            }
            (Dtype::I8, Array::I8(q)) => {
                check_len(q.len())?;
                if let Some(i) = q.iter().position(|&x| x == i8::MIN) {
                    return Err(corrupt(
                        "values",
                        format!("element {i} is -128: quantized weights lie in -127..=127"),
                    ));
                }
                let scales = match self.take("scales")? {
                    Array::F32(s) => s,
                    other => {
                        return Err(corrupt(
                            "scales",
                            format!("expected f32 elements, found {}", other.element()),
                        ));
                    }
                };
                if scales.len() != scale_rows {
                    return Err(corrupt(
                        "scales",
                        format!(
                            "expected one scale per output row ({scale_rows}), found {}",
                            scales.len()
                        ),
                    ));
                }
                if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
                    return Err(corrupt(
                        "scales",
                        format!("scale {i} is negative or not finite"),
                    ));
                }
                Values::I8 { q, scales }
            }
            (dtype, other) => {
                return Err(corrupt(
                    "values",
                    format!(
                        "expected {dtype} elements for dtype {dtype}, found {}",
                        other.element()
                    ),
                ));
            }
        };
        Ok(values)
    }

    /// Fails when arrays the format does not use are left.
    fn finish(self) -> Result<()> {
        match self.arrays.keys().next() {
            Some(name) => Err(corrupt(name, "not an array of this format")),
            None => Ok(()),
        }
    }
}

/// Checks a CSR-style pointer array: `len + 1` entries, starting at 0, never decreasing,
/// ending at `total`.
fn check_ptr(name: &str, ptr: &[u32], len: usize, total: usize) -> Result<()> {
    if ptr.len() != len + 1 {
        return Err(corrupt(
            name,
            format!("expected {} elements, found {}", len + 1, ptr.len()),
        ));
    }
    if ptr[0] != 0 {
        return Err(corrupt(name, "must start at 0"));
    }
    if let Some(i) = ptr.windows(2).position(|w| w[1] < w[0]) {
        return Err(corrupt(name, format!("decreases after element {i}")));
    }
    let last = ptr[len] as usize;
    if last != total {
        return Err(corrupt(
            name,
            format!("ends at {last}, but {total} entries are stored"),
        ));
    }
    Ok(())
}

/// Checks that the entries of each pointer range are strictly ascending and below `limit`.
fn check_ranges(name: &str, ptr: &[u32], idx: impl Fn(usize) -> usize, limit: usize) -> Result<()> {
    for (r, w) in ptr.windows(2).enumerate() {
        let mut prev = None;
        for k in w[0] as usize..w[1] as usize {
            let c = idx(k);
            if c >= limit {
                return Err(corrupt(
                    name,
                    format!("entry {k} (row {r}) is {c}, past the last ({})", limit - 1),
                ));
            }
            if prev.is_some_and(|p| c <= p) {
                return Err(corrupt(
                    name,
                    format!("entries of row {r} are not strictly ascending"),
                ));
            }
            prev = Some(c);
        }
    }
    Ok(())
}

/// Checks a list of kept indices: strictly ascending, each below `limit`.
fn check_kept(name: &str, kept: &[u32], limit: usize) -> Result<()> {
    if let Some(&c) = kept.iter().find(|&&c| c as usize >= limit) {
        return Err(corrupt(
            name,
            format!("index {c} is past the last ({})", limit.saturating_sub(1)),
        ));
    }
    if kept.windows(2).any(|w| w[1] <= w[0]) {
        return Err(corrupt(name, "indices are not strictly ascending"));
    }
    Ok(())
}

fn values_array(values: &Values, arrays: &mut BTreeMap<String, Array>) {
    match values {
        Values::F32(v) => {
            arrays.insert("values".into(), Array::F32(v.clone()));
        }
        Values::Bf16(v) => {
            arrays.insert("values".into(), Array::Bf16(v.clone()));
        }
        Values::I8 { q, scales } => {
            arrays.insert("values".into(), Array::I8(q.clone()));
            arrays.insert("scales".into(), Array::F32(scales.clone()));
        }
    }
}

/// The values of padding positions (bitmap tail, N:M free slots) must be exact zeros.
fn value_is_zero(values: &Values, i: usize) -> bool {
    match values {
        Values::F32(v) => v[i] == 0.0,
        Values::Bf16(v) => v[i].to_f32() == 0.0,
        Values::I8 { q, .. } => q[i] == 0,
    }
}

impl PackedLinear {
    /// The layer's arrays, format, dtype and shape (copies: the layer stays usable).
    pub fn to_parts(&self) -> PackedParts {
        let mut arrays = BTreeMap::new();
        match self {
            PackedLinear::Dense(d) => values_array(&d.values, &mut arrays),
            PackedLinear::Csr(c) => {
                values_array(&c.values, &mut arrays);
                arrays.insert("row_ptr".into(), Array::U32(c.row_ptr.clone()));
                let idx = match &c.idx {
                    ColIndex::U16(v) => Array::U16(v.clone()),
                    ColIndex::U32(v) => Array::U32(v.clone()),
                };
                arrays.insert("col_idx".into(), idx);
            }
            PackedLinear::Bitmap(b) => {
                values_array(&b.values, &mut arrays);
                arrays.insert("masks".into(), Array::U8(b.masks.clone()));
                arrays.insert("row_ptr".into(), Array::U32(b.row_ptr.clone()));
            }
            PackedLinear::Bsr(b) => {
                values_array(&b.values, &mut arrays);
                arrays.insert("block_row_ptr".into(), Array::U32(b.brow_ptr.clone()));
                arrays.insert("block_col".into(), Array::U32(b.bcol.clone()));
            }
            PackedLinear::NM(w) => {
                values_array(&w.values, &mut arrays);
                arrays.insert("meta".into(), Array::U8(w.meta.clone()));
            }
            PackedLinear::Compact(c) => {
                values_array(&c.inner.values, &mut arrays);
                arrays.insert("kept_rows".into(), Array::U32(c.kept_rows.clone()));
                arrays.insert("kept_cols".into(), Array::U32(c.kept_cols.clone()));
            }
        }
        PackedParts {
            format: self.format(),
            dtype: self.dtype(),
            rows: self.rows(),
            cols: self.cols(),
            arrays,
        }
    }

    /// Rebuilds a packed layer from its parts, checking every invariant the kernels rely on
    /// (see the module documentation). Nothing is unpacked or re-planned.
    pub fn from_parts(parts: PackedParts) -> Result<PackedLinear> {
        let PackedParts {
            format,
            dtype,
            rows,
            cols,
            arrays,
        } = parts;
        let size = checked_len(rows, cols)?;
        if u32::try_from(rows).is_err() || u32::try_from(cols).is_err() {
            return Err(KernelError::TooLarge {
                rows,
                cols,
                reason: "packed layers index rows and columns with u32",
            });
        }
        let mut t = Taker { arrays };
        let packed = match format {
            Format::Dense => {
                let values = t.values(dtype, size, rows)?;
                PackedLinear::Dense(DenseMatrix { rows, cols, values })
            }
            Format::Csr => {
                let row_ptr = t.u32("row_ptr")?;
                let idx = match t.take("col_idx")? {
                    Array::U16(v) if cols <= 1 << 16 => ColIndex::U16(v),
                    Array::U32(v) if cols > 1 << 16 => ColIndex::U32(v),
                    other => {
                        return Err(corrupt(
                            "col_idx",
                            format!(
                                "{} elements for {cols} columns (u16 up to 65536 columns, u32 past)",
                                other.element()
                            ),
                        ));
                    }
                };
                let nnz = match &idx {
                    ColIndex::U16(v) => v.len(),
                    ColIndex::U32(v) => v.len(),
                };
                check_ptr("row_ptr", &row_ptr, rows, nnz)?;
                match &idx {
                    ColIndex::U16(v) => {
                        check_ranges("col_idx", &row_ptr, |k| usize::from(v[k]), cols)?
                    }
                    ColIndex::U32(v) => check_ranges("col_idx", &row_ptr, |k| v[k] as usize, cols)?,
                }
                let values = t.values(dtype, nnz, rows)?;
                PackedLinear::Csr(CsrMatrix {
                    rows,
                    cols,
                    row_ptr,
                    idx,
                    values,
                })
            }
            Format::Bitmap => {
                let stride = cols.div_ceil(8);
                let masks = t.u8("masks")?;
                let expected = checked_len(rows, stride)?;
                if masks.len() != expected {
                    return Err(corrupt(
                        "masks",
                        format!(
                            "expected {expected} bytes ({rows} rows of {stride}), found {}",
                            masks.len()
                        ),
                    ));
                }
                // Bits past the last column would make the kernels read x out of bounds.
                if cols % 8 != 0 {
                    let spare = !((1u8 << (cols % 8)) - 1);
                    if let Some(r) = (0..rows).find(|r| masks[r * stride + stride - 1] & spare != 0)
                    {
                        return Err(corrupt(
                            "masks",
                            format!("row {r} has bits set past the last column"),
                        ));
                    }
                }
                let row_ptr = t.u32("row_ptr")?;
                let nnz: usize = masks.iter().map(|b| b.count_ones() as usize).sum();
                check_ptr("row_ptr", &row_ptr, rows, nnz)?;
                for r in 0..rows {
                    let bits: usize = masks[r * stride..(r + 1) * stride]
                        .iter()
                        .map(|b| b.count_ones() as usize)
                        .sum();
                    if (row_ptr[r + 1] - row_ptr[r]) as usize != bits {
                        return Err(corrupt(
                            "row_ptr",
                            format!(
                                "row {r} points at a different number of values than its bitmap keeps ({bits})"
                            ),
                        ));
                    }
                }
                let values = t.values(dtype, nnz + bitmap::PAD, rows)?;
                if (nnz..nnz + bitmap::PAD).any(|i| !value_is_zero(&values, i)) {
                    return Err(corrupt(
                        "values",
                        "the tail padding after the last kept value must be zeros",
                    ));
                }
                PackedLinear::Bitmap(BitmapMatrix {
                    rows,
                    cols,
                    stride,
                    masks,
                    row_ptr,
                    values,
                })
            }
            Format::Bsr { br, bc } => {
                if !(1..=MAX_BLOCK).contains(&br) || !(1..=MAX_BLOCK).contains(&bc) {
                    return Err(KernelError::InvalidParameter(format!(
                        "BSR block shape {br}x{bc}: each side must be 1..={MAX_BLOCK}"
                    )));
                }
                let (nbr, nbc) = (rows.div_ceil(br), cols.div_ceil(bc));
                let brow_ptr = t.u32("block_row_ptr")?;
                let bcol = t.u32("block_col")?;
                check_ptr("block_row_ptr", &brow_ptr, nbr, bcol.len())?;
                check_ranges("block_col", &brow_ptr, |k| bcol[k] as usize, nbc)?;
                let len = checked_len(bcol.len(), checked_len(br, bc)?)?;
                let values = t.values(dtype, len, rows)?;
                PackedLinear::Bsr(BsrMatrix {
                    rows,
                    cols,
                    br,
                    bc,
                    brow_ptr,
                    bcol,
                    values,
                })
            }
            Format::NM { n, m } => {
                nm::check_nm(n, m)?;
                let bits = m.trailing_zeros() as usize;
                let groups = cols.div_ceil(m);
                let meta_stride = checked_len(groups, n * bits)?.div_ceil(8);
                let meta = t.u8("meta")?;
                let expected = checked_len(rows, meta_stride)? + nm::META_PAD;
                if meta.len() != expected {
                    return Err(corrupt(
                        "meta",
                        format!("expected {expected} bytes, found {}", meta.len()),
                    ));
                }
                let per_row = checked_len(groups, n)?;
                let values = t.values(dtype, checked_len(rows, per_row)?, rows)?;
                let mut seen = vec![false; m];
                for r in 0..rows {
                    let mrow = &meta[r * meta_stride..];
                    for g in 0..groups {
                        seen.fill(false);
                        let width = m.min(cols - g * m);
                        for s in 0..n {
                            let p = nm::read_bits(mrow, (g * n + s) * bits, bits);
                            if std::mem::replace(&mut seen[p], true) {
                                return Err(corrupt(
                                    "meta",
                                    format!("row {r}, group {g}: position {p} appears twice"),
                                ));
                            }
                            if p >= width && !value_is_zero(&values, r * per_row + g * n + s) {
                                return Err(corrupt(
                                    "values",
                                    format!("row {r}, group {g}: a weight past the last column"),
                                ));
                            }
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
                    values,
                };
                packed.sort_slots();
                PackedLinear::NM(packed)
            }
            Format::Compact => {
                let kept_rows = t.u32("kept_rows")?;
                let kept_cols = t.u32("kept_cols")?;
                check_kept("kept_rows", &kept_rows, rows)?;
                check_kept("kept_cols", &kept_cols, cols)?;
                let (kr, kc) = (kept_rows.len(), kept_cols.len());
                let values = t.values(dtype, checked_len(kr, kc)?, kr)?;
                PackedLinear::Compact(CompactMatrix {
                    rows,
                    cols,
                    kept_rows,
                    kept_cols,
                    inner: DenseMatrix {
                        rows: kr,
                        cols: kc,
                        values,
                    },
                })
            }
        };
        t.finish()?;
        Ok(packed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Structure;
    use crate::view::DenseView;

    /// A deterministic `rows x cols` weight with about half of it pruned (and whole zero rows
    /// and columns every few, so compact has something to drop), plus its keep-mask.
    fn layer(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<bool>) {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut w = Vec::with_capacity(rows * cols);
        let mut keep = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let v = (next() % 2001) as f32 / 1000.0 - 1.0;
                let k = r % 5 != 3 && c % 7 != 2 && next() % 2 == 0;
                w.push(v);
                keep.push(k);
            }
        }
        (w, keep)
    }

    /// Keeps the 2 largest of every 4 in each row (N:M-valid).
    fn two_of_four(w: &[f32], rows: usize, cols: usize) -> Vec<bool> {
        let mut keep = vec![false; rows * cols];
        for r in 0..rows {
            for g in (0..cols).step_by(4) {
                let mut idx: Vec<usize> = (g..(g + 4).min(cols)).collect();
                idx.sort_by(|&a, &b| w[r * cols + b].abs().total_cmp(&w[r * cols + a].abs()));
                for &c in idx.iter().take(2) {
                    keep[r * cols + c] = true;
                }
            }
        }
        keep
    }

    fn formats() -> Vec<Format> {
        vec![
            Format::Dense,
            Format::Csr,
            Format::Bitmap,
            Format::Bsr { br: 16, bc: 16 },
            Format::Bsr { br: 4, bc: 1 },
            Format::Bsr { br: 3, bc: 5 },
            Format::NM { n: 2, m: 4 },
            Format::Compact,
        ]
    }

    fn packed(format: Format, dtype: Dtype, rows: usize, cols: usize) -> PackedLinear {
        let (w, mut keep) = layer(rows, cols, (rows * 31 + cols) as u64);
        if matches!(format, Format::NM { .. }) {
            keep = two_of_four(&w, rows, cols);
        }
        let view = DenseView::with_mask(&w, &keep, rows, cols).expect("view");
        PackedLinear::pack("test", &view, format, dtype).expect("pack")
    }

    #[test]
    fn every_format_and_dtype_round_trips_exactly() {
        for (rows, cols) in [(37, 45), (64, 48), (1, 9)] {
            for format in formats() {
                for dtype in [Dtype::F32, Dtype::Bf16, Dtype::I8] {
                    let p = packed(format, dtype, rows, cols);
                    let back = PackedLinear::from_parts(p.to_parts())
                        .unwrap_or_else(|e| panic!("{format} {dtype} {rows}x{cols}: {e}"));
                    assert_eq!(back, p, "{format} {dtype} {rows}x{cols}");
                    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
                    let (mut y0, mut y1) = (vec![0.0; rows], vec![0.0; rows]);
                    p.gemv(&x, &mut y0).expect("gemv");
                    back.gemv(&x, &mut y1).expect("gemv");
                    assert_eq!(y0, y1);
                }
            }
        }
    }

    fn refused(parts: PackedParts, what: &str) -> String {
        match PackedLinear::from_parts(parts) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        }
    }

    fn with(p: &PackedLinear, name: &str, change: impl FnOnce(&mut Array)) -> PackedParts {
        let mut parts = p.to_parts();
        change(parts.arrays.get_mut(name).expect("array"));
        parts
    }

    #[test]
    fn corrupt_arrays_are_refused_with_their_name() {
        let (rows, cols) = (37, 45);
        let csr = packed(Format::Csr, Dtype::F32, rows, cols);
        let e = refused(
            with(&csr, "col_idx", |a| {
                if let Array::U16(v) = a {
                    v[0] = 45;
                }
            }),
            "column past the end",
        );
        assert!(e.contains("col_idx") && e.contains("past the last"), "{e}");
        let e = refused(
            with(&csr, "row_ptr", |a| {
                if let Array::U32(v) = a {
                    v[3] = 100_000;
                }
            }),
            "pointer past the end",
        );
        assert!(e.contains("row_ptr"), "{e}");
        let e = refused(
            with(&csr, "values", |a| {
                if let Array::F32(v) = a {
                    v[1] = f32::NAN;
                }
            }),
            "NaN",
        );
        assert!(e.contains("values") && e.contains("not finite"), "{e}");
        let e = refused(
            with(&csr, "col_idx", |a| *a = Array::U32(vec![0; a.len()])),
            "wrong index type",
        );
        assert!(e.contains("col_idx"), "{e}");

        let bm = packed(Format::Bitmap, Dtype::Bf16, rows, cols);
        let e = refused(
            with(&bm, "masks", |a| {
                if let Array::U8(v) = a {
                    v[5] |= 0x80; // row 0, last byte: column 47 of 45
                }
            }),
            "bit past the last column",
        );
        assert!(e.contains("masks"), "{e}");
        let e = refused(
            with(&bm, "values", |a| {
                if let Array::Bf16(v) = a {
                    v.pop();
                }
            }),
            "short values",
        );
        assert!(e.contains("values") && e.contains("expected"), "{e}");

        let bsr = packed(Format::Bsr { br: 16, bc: 16 }, Dtype::I8, rows, cols);
        let e = refused(
            with(&bsr, "block_col", |a| {
                if let Array::U32(v) = a {
                    v[0] = 3;
                }
            }),
            "block column past the end",
        );
        assert!(e.contains("block_col"), "{e}");
        let e = refused(
            with(&bsr, "scales", |a| {
                if let Array::F32(v) = a {
                    v.pop();
                }
            }),
            "missing scale",
        );
        assert!(e.contains("scales"), "{e}");

        let nm = packed(Format::NM { n: 2, m: 4 }, Dtype::F32, rows, cols);
        let e = refused(
            with(&nm, "meta", |a| {
                if let Array::U8(v) = a {
                    // First group: both positions 0.
                    v[0] &= 0b1111_0000;
                }
            }),
            "duplicate N:M position",
        );
        assert!(e.contains("meta") && e.contains("twice"), "{e}");

        let compact = packed(Format::Compact, Dtype::F32, rows, cols);
        let e = refused(
            with(&compact, "kept_rows", |a| {
                if let Array::U32(v) = a {
                    v.swap(0, 1);
                }
            }),
            "unsorted kept rows",
        );
        assert!(e.contains("kept_rows"), "{e}");

        let dense = packed(Format::Dense, Dtype::F32, rows, cols);
        let mut parts = dense.to_parts();
        parts.arrays.insert("extra".into(), Array::U8(vec![1]));
        let e = refused(parts, "unknown array");
        assert!(e.contains("extra"), "{e}");
        let mut parts = dense.to_parts();
        parts.arrays.remove("values");
        let e = refused(parts, "missing values");
        assert!(e.contains("values") && e.contains("missing"), "{e}");
        let mut parts = dense.to_parts();
        parts.dtype = Dtype::Bf16;
        let e = refused(parts, "dtype mismatch");
        assert!(e.contains("values"), "{e}");
    }

    #[test]
    fn a_planned_layer_round_trips() {
        let (w, keep) = layer(64, 96, 7);
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::I8] {
            let p = PackedLinear::plan(
                "l",
                &w,
                [64, 96],
                Some(&keep),
                Structure::Unstructured,
                dtype,
            )
            .expect("plan");
            assert_eq!(PackedLinear::from_parts(p.to_parts()).expect("parts"), p);
        }
    }
}
