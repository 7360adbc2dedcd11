//! Storage element types: weights are stored as `f32` or `bf16` and always accumulated in `f32`.
//!
//! [`Element`] is sealed: kernels are only instantiated for the two types here. bf16 halves the
//! bytes a memory-bound GEMV has to read; widening it to f32 is a 16-bit shift, cheap enough to
//! hide under the memory stream.

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
}

impl Dtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }

    /// Rounds `v` to this dtype and back: what a stored weight reads as.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        })
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// A stored weight type (`f32` or `bf16`). Sealed.
pub trait Element: Copy + Default + Send + Sync + fmt::Debug + 'static + sealed::Sealed {
    /// The runtime tag for this type.
    const DTYPE: Dtype;
    /// Rounds an f32 into storage.
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

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32, so widening is exact: a shift, no rounding.
        f32::from_bits(u32::from(self.to_bits()) << 16)
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

/// Stored weight values of one format, in the dtype chosen at packing time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Values {
    /// Rounds f32 values into the requested storage.
    pub(crate) fn from_f32(dtype: Dtype, v: Vec<f32>) -> Values {
        match dtype {
            Dtype::F32 => Values::F32(v),
            Dtype::Bf16 => Values::Bf16(v.into_iter().map(bf16::from_f32).collect()),
        }
    }

    pub(crate) fn dtype(&self) -> Dtype {
        match self {
            Values::F32(_) => Dtype::F32,
            Values::Bf16(_) => Dtype::Bf16,
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Values::F32(v) => v.len() * 4,
            Values::Bf16(v) => v.len() * 2,
        }
    }

    /// Value `i` widened to f32 (only used off the hot paths: unpacking, tests).
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            Values::F32(v) => v[i],
            Values::Bf16(v) => v[i].to_f32(),
        }
    }
}

/// Runs `$body` with `$v` bound to the typed value slice of a [`Values`], so one generic kernel
/// call covers both dtypes.
macro_rules! with_values {
    ($values:expr, $v:ident => $body:expr) => {
        match $values {
            $crate::element::Values::F32($v) => $body,
            $crate::element::Values::Bf16($v) => $body,
        }
    };
}
pub(crate) use with_values;
