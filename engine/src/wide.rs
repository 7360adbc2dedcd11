//! [`wide!`](crate::wide!): one expression compiled a second time for AVX-512 and chosen at run
//! time, for the element-wise and row loops of the forward pass, the training pass and the
//! optimizer.
//!
//! The workspace targets baseline x86-64, where LLVM builds these loops 4 floats wide (SSE) at
//! best. Inside a function carrying `#[target_feature(enable = "avx512f")]` the same loops are
//! built 16 wide, but only what is inlined into that function gets the wider build. The macro
//! therefore defines a fresh generic trampoline at every use and hands it a closure that has
//! exactly that one call site, which LLVM inlines whatever its size. A shared generic
//! trampoline (what `ops::vectorized` used to be) has as many call sites as uses, and `perf`
//! caught LLVM declining to inline a large body into it: the distillation rows stayed SSE, a
//! seventh of a bf16 distillation step. Functions the expression calls should be
//! `#[inline(always)]` for the same reason (a closure cannot be marked so).
//!
//! Both branches run the same IEEE operations in the same order (no fused multiply-add is formed
//! without fast-math flags), so the results are bit-identical on every CPU:
//! `forward::ops`' `wide_loops_equal_the_portable_ones` checks it.
//!
//! [`sum_in_lanes`] is the reduction those loops share: a single running sum is a serial chain
//! the compiler may not reorder, so it stays scalar even in the AVX-512 copy.

/// Evaluates `$body` compiled for AVX-512 where the CPU has it, else as it is; see the
/// [module](mod@crate::wide) for why a macro. `$body` is expanded into both branches, so it must
/// not `return`, `break` or use `?` (inside the AVX-512 branch those would act on a closure).
#[macro_export]
macro_rules! wide {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F is present, checked just above.
                unsafe { avx512(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// `Σ term(x)` over `xs` in `N` running sums (lane `l` takes the values at `l`, `l + N`, ...),
/// the lanes added in order, then the tail one by one: a fixed order, so the bits are the same in
/// every build. `#[inline(always)]`, like the functions `term` calls, so it is widened inside a
/// [`wide!`](crate::wide!) copy.
#[inline(always)]
pub fn sum_in_lanes<A, const N: usize>(xs: &[f32], term: impl Fn(f32) -> A) -> A
where
    A: Copy
        + Default
        + std::ops::Add<Output = A>
        + std::ops::AddAssign
        + for<'a> std::iter::Sum<&'a A>,
{
    let mut acc = [A::default(); N];
    let chunks = xs.chunks_exact(N);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += term(v);
        }
    }
    let sum: A = acc.iter().sum();
    tail.iter().fold(sum, |s, &v| s + term(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole lanes and a tail, in f32 and f64: integers, so every order gives the exact sum.
    #[test]
    fn lanes_sum_every_value_once() {
        let xs: Vec<f32> = (1..=21).map(|i| i as f32).collect();
        assert_eq!(sum_in_lanes::<f32, 8>(&xs, |v| v), 231.0);
        assert_eq!(sum_in_lanes::<f64, 4>(&xs, |v| f64::from(v * v)), 3311.0);
        assert_eq!(sum_in_lanes::<f32, 8>(&xs[..5], |v| 2.0 * v), 30.0);
        assert_eq!(sum_in_lanes::<f32, 8>(&[], |v| v), 0.0);
    }
}
