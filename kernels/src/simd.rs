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
