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
