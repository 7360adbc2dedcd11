//! Storage element types: weights are stored as `f32`, `bf16` or `i8` and always accumulated in
//! `f32`.
//!
//! [`Element`] is sealed: kernels are only instantiated for the three types here. bf16 halves the
//! bytes a memory-bound GEMV has to read; widening it to f32 is a 16-bit shift, cheap enough to
//! hide under the memory stream. i8 quarters them: each output row `r` stores
//! `q = round(w / s_r)` with one f32 scale `s_r = max|w_r| / 127` (symmetric, per output
//! channel, see [`crate::quant`]). Every kernel runs unchanged on the integers (widened
//! i8 -> i32 -> f32 on load) and multiplies each finished row sum by its scale once, so the
//! scale costs one multiply per output, not per weight.

use half::bf16;
use std::fmt;

/// Storage dtype of packed weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE single precision (4 bytes).
    F32,
    /// bfloat16 (2 bytes): f32's exponent with a 7-bit mantissa; rounded to nearest-even.
    Bf16,
    /// Signed 8-bit integers (1 byte) with one f32 scale per output row: `w ≈ q · s_r`,
    /// `s_r = max|w_r| / 127`, `q` rounded to nearest. Pruned weights stay exact zeros.
    I8,
}

impl Dtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
            Dtype::I8 => 1,
        }
    }

    /// Bytes stored per output row besides the values: the i8 scale.
    pub fn row_overhead(self) -> usize {
        match self {
            Dtype::F32 | Dtype::Bf16 => 0,
            Dtype::I8 => 4,
        }
    }

    /// Rounds `v` to this dtype and back: what a stored weight reads as. For [`Dtype::I8`],
    /// whose rounding depends on the whole row's scale, see `quant::row_scale` and
    /// `quant::quantize`.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 | Dtype::I8 => v,
            Dtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::I8 => "i8",
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i8 {}
}

/// A stored weight type (`f32`, `bf16` or `i8`). Sealed.
pub trait Element: Copy + Default + Send + Sync + fmt::Debug + 'static + sealed::Sealed {
    /// The runtime tag for this type.
    const DTYPE: Dtype;
    /// Rounds an f32 into storage (i8: an already-scaled value, rounded and saturated).
    fn from_f32(v: f32) -> Self;
    /// Widens a stored value for f32 accumulation.
    fn to_f32(self) -> f32;

    /// Loads 8 consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p..p+8` must be readable and the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Loads 4 consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p..p+4` must be readable and the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn load4(p: *const Self) -> std::arch::x86_64::__m128;

    /// The raw bits of a bf16 slice (`None` for the other types): bf16 kernels that widen a
    /// whole vector of pairs at once read the stored values as `u16`.
    #[doc(hidden)]
    fn bf16_bits(_values: &[Self]) -> Option<&[u16]> {
        None
    }

    /// The values as `i8` when `Self` is `i8` (for the int8-only kernels), else `None`.
    #[doc(hidden)]
    fn i8_values(_values: &[Self]) -> Option<&[i8]> {
        None
    }
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable f32 at `p`; loadu has no alignment need.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const Self) -> std::arch::x86_64::__m128 {
        // SAFETY: the caller guarantees 4 readable f32 at `p`.
        unsafe { std::arch::x86_64::_mm_loadu_ps(p) }
    }
}

/// The f32 value of bf16 bits: bf16 is the top half of an f32, so widening is exact (a shift,
/// no rounding). For kernels that hold bf16 weights as raw `u16` bits.
#[inline(always)]
pub(crate) fn widen_bf16(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        widen_bf16(self.to_bits())
    }

    #[inline(always)]
    fn bf16_bits(values: &[Self]) -> Option<&[u16]> {
        // SAFETY: `half::bf16` is `repr(transparent)` over `u16`: same size, alignment and
        // validity (every bit pattern is a valid u16), so the slice reinterprets as is.
        Some(unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u16>(), values.len()) })
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p`; bf16 is a
        // `repr(transparent)` u16, so reading it as an unaligned 128-bit integer is valid.
        unsafe {
            let h = _mm_loadu_si128(p.cast::<__m128i>());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const Self) -> std::arch::x86_64::__m128 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 4 readable bf16 (8 bytes) at `p`.
        unsafe {
            let h = _mm_loadl_epi64(p.cast::<__m128i>());
            _mm_castsi128_ps(_mm_slli_epi32::<16>(_mm_cvtepu16_epi32(h)))
        }
    }
}

impl Element for i8 {
    #[inline(always)]
    fn i8_values(values: &[Self]) -> Option<&[i8]> {
        Some(values)
    }
    const DTYPE: Dtype = Dtype::I8;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        // `as` saturates (and maps NaN to 0); the clamp keeps the range symmetric.
        v.round().clamp(-127.0, 127.0) as i8
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bytes at `p`; the 64-bit load is unaligned.
        // Sign-extend to i32, then convert (exact: |q| <= 127). Measured against a dense
        // kernel that loads 32 bytes at once and sign-extends byte k of every lane with two
        // shifts (x permuted to match): on one thread, cache-hot, 576x576 took 0.0175 ms this
        // way and 0.0215-0.0355 ms with shifts, so the plain widening stays.
        unsafe {
            let b = _mm_loadl_epi64(p.cast::<__m128i>());
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const Self) -> std::arch::x86_64::__m128 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 4 readable bytes at `p`.
        unsafe {
            let b = _mm_cvtsi32_si128(p.cast::<i32>().read_unaligned());
            _mm_cvtepi32_ps(_mm_cvtepi8_epi32(b))
        }
    }
}

/// Stored weight values of one format, in the dtype chosen at packing time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// Quantized values and one scale per output row of the matrix (not per stored value).
    I8 {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
}

impl Values {
    /// Rounds f32 values into the requested float storage. [`Dtype::I8`] needs the row scales
    /// and goes through [`crate::quant::pack_i8`], which calls [`Values::into_i8`].
    pub(crate) fn from_f32(dtype: Dtype, v: Vec<f32>) -> Values {
        match dtype {
            Dtype::F32 | Dtype::I8 => Values::F32(v),
            Dtype::Bf16 => Values::Bf16(v.into_iter().map(bf16::from_f32).collect()),
        }
    }

    /// Turns f32 values that are already quantized (integers in `-127..=127`, as packed from a
    /// [`crate::quant::Quantized`] view) into i8 storage with the given per-row scales.
    pub(crate) fn into_i8(self, scales: Vec<f32>) -> Values {
        let q = match self {
            Values::F32(v) => v.into_iter().map(i8::from_f32).collect(),
            Values::Bf16(v) => v.into_iter().map(|b| i8::from_f32(b.to_f32())).collect(),
            Values::I8 { q, .. } => q,
        };
        Values::I8 { q, scales }
    }

    pub(crate) fn dtype(&self) -> Dtype {
        match self {
            Values::F32(_) => Dtype::F32,
            Values::Bf16(_) => Dtype::Bf16,
            Values::I8 { .. } => Dtype::I8,
        }
    }

    /// Bytes a GEMV reads from the values (and, for i8, the row scales).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => v.len() * 4,
            Values::Bf16(v) => v.len() * 2,
            Values::I8 { q, scales } => q.len() + scales.len() * 4,
        }
    }

    /// Value `i`, which belongs to output row `row`, widened to f32 and dequantized (only used
    /// off the hot paths: unpacking, row decoding for prefill, tests).
    pub(crate) fn get(&self, i: usize, row: usize) -> f32 {
        match self {
            Values::F32(v) => v[i],
            Values::Bf16(v) => v[i].to_f32(),
            Values::I8 { q, scales } => q[i].to_f32() * scales[row],
        }
    }

    /// The per-row scales of i8 storage (`None` for float storage).
    pub(crate) fn scales(&self) -> Option<&[f32]> {
        match self {
            Values::I8 { scales, .. } => Some(scales),
            _ => None,
        }
    }

    /// Applies the i8 row scales to finished row sums: `y[i] *= s[first_row + i]`. A no-op for
    /// float storage. Kernels accumulate `Σ q·x` per row; this turns it into `Σ w·x`.
    #[inline]
    pub(crate) fn scale_rows(&self, first_row: usize, y: &mut [f32]) {
        if let Some(s) = self.scales() {
            // `get`: an empty range past the last row scales nothing rather than panicking.
            for (yi, &si) in y.iter_mut().zip(s.get(first_row..).unwrap_or_default()) {
                *yi *= si;
            }
        }
    }
}

/// Runs `$body` with `$v` bound to the typed value slice of a [`Values`], so one generic kernel
/// call covers every dtype (i8: the raw integers; the caller applies [`Values::scale_rows`]).
macro_rules! with_values {
    ($values:expr, $v:ident => $body:expr) => {
        match $values {
            $crate::element::Values::F32($v) => $body,
            $crate::element::Values::Bf16($v) => $body,
            $crate::element::Values::I8 { q: $v, .. } => $body,
        }
    };
}
pub(crate) use with_values;
