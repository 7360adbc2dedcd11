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

/// Activations quantized to i16 with one scale for the vector, for the int8 GEMVs that
/// multiply in integers (`vpdpwssd`: 32 i8·i16 products per instruction, summed in i32), where
/// widening every weight to f32 for an FMA bounded them by their instructions instead of their
/// bytes. `x ≈ q · scale` with `scale = max|x| / 32767`, so each activation is off by at most
/// `max|x| / 65534`: about 1.5e-5 of the largest, a hundredth of the int8 weights' own
/// rounding (half a step of 127).
pub(crate) struct ActivationsI16 {
    /// `round(x / scale)`, in `-32767..=32767`.
    pub(crate) q: Vec<i16>,
    /// The dequantization step.
    pub(crate) scale: f32,
}

impl ActivationsI16 {
    /// The largest `|q|`: 2¹⁵ − 1, so that a pair of products `q_w·q_x` (|q_w| ≤ 127) sums to
    /// at most 8.3e6 and [`I16_CHUNK`] columns of them fit an i32 lane.
    const MAX: f32 = 32767.0;

    /// `x` quantized, or `None` when `x` holds a non-finite value (the float kernels then
    /// propagate it as f32 arithmetic does).
    pub(crate) fn quantize(x: &[f32]) -> Option<ActivationsI16> {
        // max |x| over the bits: non-finite values have the largest magnitudes' exponent, and
        // an integer max vectorises where a float max (NaN rules) does not.
        let max_bits = x
            .iter()
            .map(|v| v.to_bits() & 0x7FFF_FFFF)
            .max()
            .unwrap_or(0);
        let max = f32::from_bits(max_bits);
        if !max.is_finite() {
            return None;
        }
        let mut q = vec![0i16; x.len()];
        if max == 0.0 {
            return Some(ActivationsI16 { q, scale: 0.0 });
        }
        let inv = Self::MAX / max;
        // Rounds to nearest, ties to even (one instruction where SSE4.1 or later is enabled,
        // a libm call per value otherwise); `|v · inv| <= 32767` up to rounding, and the cast
        // saturates.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 (and so SSE4.1's rounding) is present (checked).
            unsafe { round_scaled_avx2(x, inv, &mut q) };
            return Some(ActivationsI16 {
                q,
                scale: max / Self::MAX,
            });
        }
        round_scaled(x, inv, &mut q);
        Some(ActivationsI16 {
            q,
            scale: max / Self::MAX,
        })
    }
}

/// `q[i] = round_ties_even(x[i] · inv)`, saturated to i16.
#[inline(always)]
fn round_scaled(x: &[f32], inv: f32, q: &mut [i16]) {
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even() as i16;
    }
}

/// [`round_scaled`] compiled for AVX2, where the rounding is a vector instruction instead of
/// a `rintf` call per value (it took a third of the int8 decode step's quantization time).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn round_scaled_avx2(x: &[f32], inv: f32, q: &mut [i16]) {
    round_scaled(x, inv, q);
}

/// Columns an i32 accumulator lane of the i8·i16 kernels may sum before it is flushed to f32:
/// each `vpdpwssd` adds two products of at most 127 · 32767 to a lane, and a lane sees one
/// pair per 32 columns, so 4096 columns add at most 128 pairs, 1.07e9 < 2³¹ (two such lanes
/// added before the flush stay below 2³¹ too).
pub(crate) const I16_CHUNK: usize = 4096;

#[cfg(test)]
mod activation_tests {
    use super::*;

    #[test]
    fn activations_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..1000).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let a = ActivationsI16::quantize(&x).expect("finite");
        let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(a.q.iter().any(|&q| q.unsigned_abs() == 32767));
        for (&v, &q) in x.iter().zip(&a.q) {
            assert!((f32::from(q) * a.scale - v).abs() <= max / 65534.0 * 1.0001);
        }
        assert!(ActivationsI16::quantize(&[1.0, f32::NAN]).is_none());
        assert!(ActivationsI16::quantize(&[f32::INFINITY]).is_none());
        let zero = ActivationsI16::quantize(&[0.0; 5]).expect("zeros");
        assert_eq!((zero.q, zero.scale), (vec![0; 5], 0.0));
    }
}
