//! Small helpers shared by the AVX2 kernels and their portable twins.

/// Sums 8 partial accumulators pairwise (the portable kernels keep 8 lanes so the compiler can
/// vectorise them and so the summation order resembles the AVX2 path).
#[inline(always)]
pub(crate) fn sum8(a: [f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Portable dot product of stored weights with an f32 vector, 8 independent accumulators.
#[inline(always)]
pub(crate) fn dot_portable<T: crate::element::Element>(w: &[T], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let wc = w.chunks_exact(8);
    let xc = x.chunks_exact(8);
    let (wt, xt) = (wc.remainder(), xc.remainder());
    for (wv, xv) in wc.zip(xc) {
        for j in 0..8 {
            acc[j] += wv[j].to_f32() * xv[j];
        }
    }
    let mut s = sum8(acc);
    for (wv, xv) in wt.iter().zip(xt) {
        s += wv.to_f32() * xv;
    }
    s
}

/// `x` regrouped for the bf16 kernels: per block of `width` columns, the even columns, then
/// the odd ones. A vector of bf16 pairs widens in two instructions, a shift for the even
/// (low) halves and a mask for the odd (high) ones, and each half then meets its own
/// contiguous slice of this array; widening 8 values at a time with `vpmovzxwd` instead
/// costs a lane-crossing shuffle per 8 weights, which kept dense bf16 compute bound (50% of
/// the bandwidth probe in `bench kernels`). Columns past the last whole block are left out.
pub(crate) fn split_even_odd(x: &[f32], width: usize) -> Vec<f32> {
    let blocks = x.len() / width;
    let half = width / 2;
    let mut out = vec![0.0f32; blocks * width];
    for (dst, src) in out.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
        for j in 0..half {
            dst[j] = src[2 * j];
            dst[half + j] = src[2 * j + 1];
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The integer step of the int8 GEMVs (dense and bitmap): 64 i8 weights in `w`, sign
    /// extended to two halves of 32 i16, each multiplied with its 32 i16 activations at `x`
    /// and summed in pairs into `acc`'s i32 lanes (`vpdpwssd`).
    ///
    /// # Safety
    /// AVX-512F/BW/VNNI present; `x..x + 64` readable.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(crate) unsafe fn dot64_i8_i16(acc: &mut [__m512i; 2], w: __m512i, x: *const i16) {
        let lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(w));
        let hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64::<1>(w));
        // SAFETY: 64 readable i16 at `x` (contract).
        let (x0, x1) = unsafe {
            (
                _mm512_loadu_si512(x.cast()),
                _mm512_loadu_si512(x.add(32).cast()),
            )
        };
        acc[0] = _mm512_dpwssd_epi32(acc[0], lo, x0);
        acc[1] = _mm512_dpwssd_epi32(acc[1], hi, x1);
    }

    /// The sum of [`dot64_i8_i16`]'s accumulators as f32; the lanes are converted first, since
    /// 16 lanes near their bound (`quant::I16_CHUNK`) would overflow an i32 sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn sum_i32_lanes(acc: [__m512i; 2]) -> f32 {
        _mm512_reduce_add_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[0], acc[1])))
    }

    /// Horizontal sum of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}
