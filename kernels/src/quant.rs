//! Symmetric int8 quantization with one scale per output row (per output channel).
//!
//! Row `r` of `W` gets `s_r = max_c |w_rc| / 127` over its kept weights and stores
//! `q_rc = round(w_rc / s_r)` (to nearest, ties away from zero), so `|q| <= 127` and a stored
//! weight reads back as `q · s_r`, off by at most `s_r / 2`. Pruned weights are `0` and stay
//! exact zeros; a row with nothing kept (or only zeros) gets scale `0`.
//!
//! Packing reuses every format's f32 packer: [`Quantized`] is the view with each kept weight
//! replaced by its integer `q` (as f32, exact) and the *original* keep-mask, so the packed
//! structure (which blocks, which N:M slots, which CSR entries) is the mask's even where a kept
//! weight rounds to zero; [`pack_i8`] then narrows the packed values to i8 and attaches the
//! scales. One definition of the rounding, one packer per format.

use crate::element::{Element, Values};
use crate::error::Result;
use crate::view::DenseView;

/// `s = max|w| / 127` over `row` (0 for an all-zero row).
pub(crate) fn row_scale(row: &[f32]) -> f32 {
    row.iter().fold(0.0f32, |m, &v| m.max(v.abs())) / 127.0
}

/// `q = round(w / s)`, saturated to `-127..=127` (0 when `s == 0`).
#[inline]
pub(crate) fn quantize(w: f32, s: f32) -> i8 {
    if s == 0.0 { 0 } else { i8::from_f32(w / s) }
}

/// A view's weights quantized per row: integer values (stored as f32), its keep-mask, scales.
pub(crate) struct Quantized {
    q: Vec<f32>,
    mask: Vec<u8>,
    rows: usize,
    cols: usize,
    scales: Vec<f32>,
}

impl Quantized {
    /// Quantizes the kept weights of `view` (pruned ones read as zero and stay zero).
    pub(crate) fn new(view: &DenseView<'_>) -> Quantized {
        let (rows, cols) = (view.rows(), view.cols());
        let mut q = Vec::with_capacity(rows * cols);
        let mut mask = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(rows);
        for r in 0..rows {
            let row = view.row(r);
            let s = row_scale(&row);
            scales.push(s);
            q.extend(row.iter().map(|&w| f32::from(quantize(w, s))));
            mask.extend((0..cols).map(|c| u8::from(view.is_kept(r, c))));
        }
        Quantized {
            q,
            mask,
            rows,
            cols,
            scales,
        }
    }

    /// All `rows x cols` quantized values, row-major, as i8 storage (the dense layout).
    pub(crate) fn into_dense(self) -> Values {
        Values::F32(self.q).into_i8(self.scales)
    }

    /// The quantized integers with the original keep-mask.
    pub(crate) fn view(&self) -> Result<DenseView<'_>> {
        DenseView::with_mask_bytes(&self.q, &self.mask, self.rows, self.cols)
    }
}

/// Packs `view` as i8: `pack` is the format's f32 packer, run on the quantized view; `values`
/// selects the packed matrix's values, which are then narrowed to i8 with the row scales.
pub(crate) fn pack_i8<M>(
    view: &DenseView<'_>,
    pack: impl FnOnce(&DenseView<'_>) -> Result<M>,
    values: impl FnOnce(&mut M) -> &mut Values,
) -> Result<M> {
    let qz = Quantized::new(view);
    let mut m = pack(&qz.view()?)?;
    let v = values(&mut m);
    *v = std::mem::replace(v, Values::F32(Vec::new())).into_i8(qz.scales);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_scales() {
        let row = [0.5f32, -1.27, 0.0, 0.004, 0.006, 1.0];
        let s = row_scale(&row);
        assert_eq!(s, 1.27 / 127.0);
        let q: Vec<i8> = row.iter().map(|&w| quantize(w, s)).collect();
        // 0.5/0.01 = 50, -127 at the max, zeros stay zero, 0.4 rounds down, 0.6 up.
        assert_eq!(q, [50, -127, 0, 0, 1, 100]);
        assert_eq!(row_scale(&[0.0, -0.0]), 0.0);
        assert_eq!(quantize(3.0, 0.0), 0);
    }

    #[test]
    fn mask_survives_values_that_round_to_zero() {
        // Row 0 keeps (0,1) whose value rounds to 0: still kept in the quantized view.
        let w = [1.0f32, 0.001, 0.0, 0.5];
        let keep = [true, true, false, true];
        let view = DenseView::with_mask(&w, &keep, 2, 2).expect("view");
        let qz = Quantized::new(&view);
        let qv = qz.view().expect("view");
        assert!(qv.is_kept(0, 1) && !qv.is_kept(1, 0));
        assert_eq!(qv.get(0, 1), 0.0);
        assert_eq!(qz.scales, [1.0 / 127.0, 0.5 / 127.0]);
    }
}
