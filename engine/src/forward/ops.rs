//! Element-wise and row-wise kernels of the forward pass that candle-core lacks (it has no
//! softmax, norms or RoPE without candle-nn) or that are cheaper fused: each reads a
//! contiguous f32 tensor once and writes one new tensor, rows spread over rayon's pool (the
//! same pool candle's gemm uses).
//!
//! Formulas follow Hugging Face transformers' f32 code paths, so logits agree to ~1e-6.

use candle_core::{Device, Storage, Tensor};
use espalier_kernels::team;
use rayon::prelude::*;
use std::ops::Range;

use crate::error::EngineError;

/// Rows below this many elements are processed on one thread: spawning costs more than it saves.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// Runs `f` on the contiguous f32 data of a CPU tensor (copies only if it is not contiguous).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<R, EngineError>,
) -> Result<R, EngineError> {
    with_slice(t, f)
}

/// Runs `f` on the contiguous data of a CPU tensor of element type `T` (copies only if it is
/// not contiguous); a tensor of another type is an error.
pub(crate) fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R, EngineError>,
) -> Result<R, EngineError> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(EngineError::Input(
            "the forward pass runs on the CPU; got a tensor on another device".into(),
        ));
    };
    let data = cpu.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| EngineError::Input("internal: tensor not contiguous".into()))?;
    f(&data[start..end])
}

fn new_tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor, EngineError> {
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Applies `f(row_in, row_out)` to every row of width `width`, in parallel for large inputs
/// (each row [`wide!`](crate::wide!)).
fn map_rows(
    input: &[f32],
    width: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    if width == 0 {
        return out;
    }
    if input.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(width)
            .zip(input.par_chunks(width))
            .enumerate()
            .for_each(|(r, (o, i))| crate::wide!(f(r, i, o)));
    } else {
        out.chunks_mut(width)
            .zip(input.chunks(width))
            .enumerate()
            .for_each(|(r, (o, i))| crate::wide!(f(r, i, o)));
    }
    out
}

/// `e^x` for f32 in straight-line arithmetic the compiler vectorises (libm's `expf` is a call
/// per element and was a tenth of a long window's time inside the softmax). Cephes' `expf`
/// scheme: `x = n·ln2 + r`, a degree-7 polynomial for `e^r`, `2^n` built in the exponent bits.
/// Relative error below 2e-7 over the range where the result is a normal f32; inputs below
/// -87 return ~1e-38 (negligible beside the 1 of a softmax's maximum), above 88 saturate.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let t = x * std::f32::consts::LOG2_E + EXP_ROUND;
    let n = t - EXP_ROUND;
    // n as an integer, read from t's low mantissa bits: a float-to-int `as` cast saturates and
    // checks for NaN per element, which keeps the loop scalar.
    let n_bits = t.to_bits().wrapping_sub(EXP_ROUND.to_bits());
    let r = x - n * EXP_LN2_HI - n * EXP_LN2_LO;
    let z = r * r;
    let [c0, c1, c2, c3, c4] = EXP_POLY;
    let p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + 0.5;
    let e = p * z + r + 1.0;
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    e * scale
}

/// [`fast_exp`]'s input range (below, ~1e-38; above, saturated).
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
/// ln 2 split in two so n·ln2 is exact in the high part.
const EXP_LN2_HI: f32 = 0.693_359_4;
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// Adding then subtracting 1.5·2^23 rounds to the nearest integer without a libm call.
const EXP_ROUND: f32 = 12_582_912.0;
/// The polynomial's coefficients above its `0.5·r²` term, highest degree first.
const EXP_POLY: [f32; 5] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
];

/// Lanes of the reductions below: eight independent accumulators let the compiler keep them
/// in one vector register (a plain fold is a serial chain it may not reorder).
pub(crate) const LANES: usize = 8;

/// Largest entry (`-inf` for an empty slice).
#[inline(always)]
pub(crate) fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    tail.iter().fold(
        acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
        |m, &v| m.max(v),
    )
}

/// Writes `e^(x·scale - shift)` for each `x` into `out` and returns their sum.
#[inline(always)]
fn exp_into(xs: &[f32], out: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let n = xs.len() - xs.len() % LANES;
    for (c, o) in xs[..n]
        .chunks_exact(LANES)
        .zip(out[..n].chunks_exact_mut(LANES))
    {
        for ((a, &v), o) in acc.iter_mut().zip(c).zip(o) {
            let e = fast_exp(v * scale - shift);
            *o = e;
            *a += e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (&v, o) in xs[n..].iter().zip(&mut out[n..]) {
        let e = fast_exp(v * scale - shift);
        *o = e;
        sum += e;
    }
    sum
}

/// `out = softmax(row · scale)`, on the widest vectors the CPU has. With AVX-512 the maximum,
/// each exponential and each product are the portable loop's floats and only the sum's order
/// differs. The prefill's softmax runs inside `map_rows`' closure, which the compiler builds
/// for baseline x86-64 only: there the softmax was 14% of a 1024-token prefill of SmolLM2.
fn softmax_into(row: &[f32], out: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present (checked just above); the callee asserts the lengths.
        unsafe { softmax_into_avx512(row, out, scale) };
        return;
    }
    let max = max_f32(row) * scale;
    let inv = 1.0 / exp_into(row, out, scale, max);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// [`softmax_into`] on AVX-512.
///
/// # Safety
/// AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_into_avx512(row: &[f32], out: &mut [f32], scale: f32) {
    use std::arch::x86_64::*;
    assert!(out.len() == row.len());
    // SAFETY: AVX-512F (contract); equal lengths asserted above.
    let inv = unsafe {
        let max = max_f32_avx512(row) * scale;
        1.0 / exp_into_avx512(row, out, scale, max)
    };
    let n = out.len() - out.len() % 16;
    let iv = _mm512_set1_ps(inv);
    for c in out[..n].chunks_exact_mut(16) {
        // SAFETY: each chunk holds 16 floats.
        unsafe {
            _mm512_storeu_ps(
                c.as_mut_ptr(),
                _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), iv),
            )
        };
    }
    for o in &mut out[n..] {
        *o *= inv;
    }
}

/// [`max_f32`] on AVX-512 (the same value for any input without NaN: a maximum does not
/// depend on the order it is taken in).
///
/// # Safety
/// AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_f32_avx512(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = xs.len() - xs.len() % 16;
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in xs[..n].chunks_exact(16) {
        // SAFETY: each chunk holds 16 floats.
        acc = _mm512_max_ps(acc, unsafe { _mm512_loadu_ps(c.as_ptr()) });
    }
    xs[n..]
        .iter()
        .fold(_mm512_reduce_max_ps(acc), |m, &v| m.max(v))
}

/// The sum of `e^(x·scale - shift)` over `xs` ([`exp_into`] without the output).
#[inline(always)]
pub(crate) fn exp_sum(xs: &[f32], scale: f32, shift: f32) -> f32 {
    crate::wide::sum_in_lanes::<f32, LANES>(xs, |v| fast_exp(v * scale - shift))
}

/// LLaMA's RMSNorm: `w · x / sqrt(mean(x²) + eps)`, per row of `x: [T, h]`.
pub(crate) fn rms_norm(x: &Tensor, weight: &[f32], eps: f64) -> Result<Tensor, EngineError> {
    let h = weight.len();
    let out = with_f32(x, |xs| {
        Ok(map_rows(xs, h, |_, row, o| {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
            let inv = 1.0 / (ms + eps as f32).sqrt();
            for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
                *o = w * (v * inv);
            }
        }))
    })?;
    new_tensor(out, x.dims())
}

/// LayerNorm with biased variance (PyTorch): `(x - mean) / sqrt(var + eps) · w + b`.
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: &[f32],
    bias: &[f32],
    eps: f64,
) -> Result<Tensor, EngineError> {
    let h = weight.len();
    let out = with_f32(x, |xs| {
        Ok(map_rows(xs, h, |_, row, o| {
            let mean = row.iter().sum::<f32>() / h as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
            let inv = 1.0 / (var + eps as f32).sqrt();
            for (((o, v), w), b) in o.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (v - mean) * inv * w + b;
            }
        }))
    })?;
    new_tensor(out, x.dims())
}

/// Cosine and sine tables of rotary embeddings for positions `start..start + len`.
#[derive(Debug, Clone)]
pub(crate) struct RopeTable {
    /// `[len, half]`, row-major.
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
    pub(super) half: usize,
}

impl RopeTable {
    /// HF's default rotary embedding: `inv_freq[i] = theta^(-2i/d)`, angle = position ·
    /// inv_freq (f32 like transformers, so large positions round the same way).
    pub(crate) fn new(head_dim: usize, theta: f64, start: usize, len: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable { cos, sin, half }
    }

    /// Writes `src` (one head's `d` values at table row `pos`) rotated into `dst`:
    /// `(a, b) → (a·cos − b·sin, b·cos + a·sin)` over the two halves.
    #[inline]
    pub(crate) fn rotate(&self, pos: usize, src: &[f32], dst: &mut [f32]) {
        let half = self.half;
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        for i in 0..half {
            let (a, b) = (src[i], src[i + half]);
            dst[i] = a * cos[i] - b * sin[i];
            dst[i + half] = b * cos[i] + a * sin[i];
        }
    }

    /// The transpose of [`RopeTable::rotate`] (its inverse): carries a gradient with respect
    /// to the rotated values back to the values before rotation.
    #[inline]
    pub(crate) fn unrotate(&self, pos: usize, src: &[f32], dst: &mut [f32]) {
        let half = self.half;
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        for i in 0..half {
            let (a, b) = (src[i], src[i + half]);
            dst[i] = a * cos[i] + b * sin[i];
            dst[i + half] = b * cos[i] - a * sin[i];
        }
    }
}

/// Splits `x: [T, heads · d]` into heads, `[heads, T, d]`, applying rotary embeddings
/// (`rotate_half` convention of transformers' LLaMA) when `rope` is given. One pass does both
/// the rotation and the transpose.
pub(crate) fn split_heads(
    x: &Tensor,
    heads: usize,
    head_dim: usize,
    rope: Option<&RopeTable>,
) -> Result<Tensor, EngineError> {
    let t = x.dims()[0];
    let out = with_f32(x, |xs| {
        let mut out = vec![0f32; xs.len()];
        let fill = |h: usize, dst: &mut [f32]| {
            for p in 0..t {
                let src = &xs[p * heads * head_dim + h * head_dim..][..head_dim];
                let o = &mut dst[p * head_dim..][..head_dim];
                match rope {
                    Some(r) => r.rotate(p, src, o),
                    None => o.copy_from_slice(src),
                }
            }
        };
        if xs.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(t * head_dim)
                .enumerate()
                .for_each(|(h, dst)| fill(h, dst));
        } else {
            out.chunks_mut(t * head_dim)
                .enumerate()
                .for_each(|(h, dst)| fill(h, dst));
        }
        Ok(out)
    })?;
    new_tensor(out, &[heads, t, head_dim])
}

/// Scaled, causally masked softmax of attention scores, in place of a fresh tensor.
///
/// `scores: [groups, rows, keys]` where row `r` is query token `r % t` (grouped-query
/// attention stacks the query heads sharing a KV head along the rows) at absolute position
/// `offset + r % t`; key `j` is visible when `j <= offset + r % t`.
pub(crate) fn causal_softmax(
    scores: &Tensor,
    t: usize,
    offset: usize,
    scale: f32,
) -> Result<Tensor, EngineError> {
    let keys = *scores
        .dims()
        .last()
        .ok_or_else(|| EngineError::Input("internal: scalar attention scores".into()))?;
    let out = with_f32(scores, |xs| {
        Ok(map_rows(xs, keys, |r, row, o| {
            let visible = (offset + r % t + 1).min(keys);
            softmax_into(&row[..visible], &mut o[..visible], scale);
            // Masked keys stay 0 (the output started zeroed).
        }))
    })?;
    new_tensor(out, scores.dims())
}

/// One decode step's attention inputs for the per-head kernels: `q: [heads · d]`, a layer's
/// cache buffers `k`, `v`: `[kv_heads, capacity, d]` with positions `0..visible` valid, `group`
/// query heads per KV head, scores scaled by `scale`.
#[derive(Clone, Copy)]
struct Attend<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    capacity: usize,
    visible: usize,
    group: usize,
    d: usize,
    scale: f32,
}

impl<E> Attend<'_, E> {
    /// The visible cached keys of KV head `g`, `[visible, d]`.
    fn keys(&self, g: usize) -> &[E] {
        &self.k[g * self.capacity * self.d..][..self.visible * self.d]
    }

    /// The visible cached values of KV head `g`, `[visible, d]`.
    fn values(&self, g: usize) -> &[E] {
        &self.v[g * self.capacity * self.d..][..self.visible * self.d]
    }
}

/// An element type a KV cache stores: f32, or f16 (half the bytes every decode step reads,
/// as llama.cpp's default cache). The attention arithmetic is f32 either way.
pub(crate) trait KvElem: Copy + Send + Sync {
    /// `row` as f32: the row itself for f32, else widened into `buf` (`row.len()` values).
    fn row_f32<'a>(row: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// 16 values from `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// AVX-512F available (callers are `#[target_feature(enable = "avx512f")]` functions, into
    /// which this inlines); 16 values readable at `p`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    fn row_f32<'a>(row: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        row
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    fn row_f32<'a>(row: &'a [half::f16], buf: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let buf = &mut buf[..row.len()];
        row.convert_to_f32_slice(buf);
        buf
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (32 bytes readable; AVX-512F includes the 512-bit
        // half-to-single conversion).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// Attention of one query token over the cached keys and values, straight from the cache's
/// buffers: what every decode step runs. `q: [heads · d]` (RoPE applied); `k`, `v`: a layer's
/// cache buffers `[kv_heads, capacity, d]`, of which positions `0..visible` are valid; query
/// head `h` reads KV head `h / (heads / kv_heads)`. Writes `ctx: [heads · d]`.
///
/// The general path (candle matmuls over narrowed views, a softmax tensor, a merge) copies the
/// visible cache and, for these tiny products, wakes the thread pool twice per layer; here it is
/// a few dot products on the calling thread. The softmax is [`causal_softmax`]'s arithmetic.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_one<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    capacity: usize,
    visible: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
    ctx: &mut [f32],
) -> Result<(), EngineError> {
    let group = heads / kv_heads.max(1);
    if q.len() != heads * d
        || ctx.len() != heads * d
        || k.len() != kv_heads * capacity * d
        || v.len() != k.len()
        || visible == 0
        || visible > capacity
        || group * kv_heads != heads
    {
        return Err(EngineError::Input(
            "internal: decode attention shape mismatch".into(),
        ));
    }
    let args = Attend {
        q,
        k,
        v,
        capacity,
        visible,
        group,
        d,
        scale,
    };
    let run = |hs: Range<usize>, out: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if avx512_head_dim(d) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just above), a head dimension it takes;
            // shapes were checked above.
            unsafe { attend_heads_avx512(&args, hs, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { attend_heads_avx2(&args, hs, out) };
            return;
        }
        attend_heads(&args, hs, out);
    };
    // The heads are independent: split them over two threads once the cache is long enough
    // that the work (every visible key and value of every head) outweighs waking one.
    // Each head is computed exactly as alone, so the split changes no float.
    if heads >= 2
        && visible * heads * d >= PARALLEL_ATTENTION_MIN
        && rayon::current_num_threads() > 1
    {
        // Two halves (whoever is free takes each): finer splits would cut the groups of
        // heads that share a KV head, and each part re-reads that head's keys and values.
        let mid = heads.div_ceil(2);
        let (first, second) = ctx.split_at_mut(mid * d);
        let mut parts = [(0..mid, first), (mid..heads, second)];
        team::for_each_mut(&mut parts, |_, (hs, out)| run(hs.clone(), out));
    } else {
        run(0..heads, ctx);
    }
    Ok(())
}

/// Multiply-adds (per score or per value element) above which [`attend_one`] splits its heads
/// over two threads: 64k is about 10 µs of one core, several times what the split costs.
const PARALLEL_ATTENTION_MIN: usize = 64 * 1024;

/// Query heads [`attend_heads_avx512`] scores at once: with 64-wide heads, 4 heads' queries
/// (16 vectors) and one key row (4) stay in registers.
const HEADS_AT_ONCE: usize = 4;

/// How far ahead of the row it reads [`attend_heads_avx512`] requests cached keys and values:
/// 8 rows of 64-wide f32 heads. On the Xeon, 16-sequence decode steps of SmolLM2 at 64 to 214
/// cached positions took 27.1-27.8 ms with it against 30.0-30.4 without (4 KiB: 27.8-28.2).
#[cfg(target_arch = "x86_64")]
const ATTEND_AHEAD_BYTES: usize = 2048;

/// Whether [`attend_heads_avx512`] takes this head dimension (its queries and outputs live in
/// registers: 4 or 8 vectors of 16 per head).
#[cfg(target_arch = "x86_64")]
fn avx512_head_dim(d: usize) -> bool {
    d == 64 || d == 128
}

/// [`attend_heads`] on AVX-512 for 64- and 128-wide heads: the query heads that share a KV
/// head (`group` of them under grouped-query attention; 3 in SmolLM2) are scored and summed
/// together, so each cached key and value row is loaded once for up to [`HEADS_AT_ONCE`]
/// heads instead of once per head, with the queries and each head's output in registers
/// across the whole cache (the portable loop reloaded a head's output for every position).
/// The softmax is [`attend_heads`]'s; the normalisation is applied once at the end instead
/// of to every weight, so results differ from the portable loop in the last bits. A head's
/// arithmetic does not depend on which heads share its pass, so splitting the heads over
/// threads changes no float.
///
/// # Safety
/// AVX-512F available; [`avx512_head_dim`]`(d)`; shapes as [`attend_one`] checks them,
/// `ctx.len() == heads.len() * d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_heads_avx512<E: KvElem>(a: &Attend<'_, E>, heads: Range<usize>, ctx: &mut [f32]) {
    let (visible, d) = (a.visible, a.d);
    let mut weights = vec![0f32; 2 * HEADS_AT_ONCE * visible];
    let first = heads.start;
    let mut h0 = heads.start;
    while h0 < heads.end {
        // Heads h0..h1 share KV head `g`: at most HEADS_AT_ONCE of them, never past the group.
        let g = h0 / a.group;
        let h1 = heads.end.min((g + 1) * a.group).min(h0 + HEADS_AT_ONCE);
        let chunk = Chunk {
            q: &a.q[h0 * d..h1 * d],
            k: a.keys(g),
            v: a.values(g),
            visible,
            scale: a.scale,
        };
        let out = &mut ctx[(h0 - first) * d..(h1 - first) * d];
        // SAFETY: AVX-512F present (contract); each arm's NH is the chunk's head count
        // (`q` and `out` hold NH·d values) and NV·16 is `d`.
        unsafe {
            match (h1 - h0, d) {
                (1, 64) => chunk.run::<1, 4>(&mut weights, out),
                (2, 64) => chunk.run::<2, 4>(&mut weights, out),
                (3, 64) => chunk.run::<3, 4>(&mut weights, out),
                (4, 64) => chunk.run::<4, 4>(&mut weights, out),
                (1, _) => chunk.run::<1, 8>(&mut weights, out),
                (2, _) => chunk.run::<2, 8>(&mut weights, out),
                (3, _) => chunk.run::<3, 8>(&mut weights, out),
                _ => chunk.run::<4, 8>(&mut weights, out),
            }
        }
        h0 = h1;
    }
}

/// Query heads sharing one KV head, for [`attend_heads_avx512`]: `q` their queries, `k` and
/// `v` that KV head's first `visible` cached rows.
#[cfg(target_arch = "x86_64")]
struct Chunk<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    visible: usize,
    scale: f32,
}

#[cfg(target_arch = "x86_64")]
impl<E: KvElem> Chunk<'_, E> {
    /// Attention of `NH` heads of `16·NV` dimensions into `out` (`NH · 16·NV` values);
    /// `scratch` holds at least `2 · NH · visible` values (scores, then weights).
    ///
    /// # Safety
    /// AVX-512F available; `q.len() == out.len() == NH·16·NV`, `k.len() == v.len() ==
    /// visible·16·NV`, `scratch.len() >= 2·NH·visible`.
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const NH: usize, const NV: usize>(&self, scratch: &mut [f32], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let (d, visible) = (16 * NV, self.visible);
        assert!(
            self.q.len() == NH * d
                && out.len() == NH * d
                && self.k.len() == visible * d
                && self.v.len() == visible * d
                && scratch.len() >= 2 * NH * visible
        );
        let (scores, weights) = scratch.split_at_mut(NH * visible);
        let (qp, kp, vp) = (self.q.as_ptr(), self.k.as_ptr(), self.v.as_ptr());
        // SAFETY: every offset below is within the lengths asserted above.
        unsafe {
            let mut qv = [[_mm512_setzero_ps(); NV]; NH];
            for (i, qh) in qv.iter_mut().enumerate() {
                for (c, x) in qh.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(qp.add(i * d + 16 * c));
                }
            }
            // Scores: one pass over the keys for all NH heads. Each (sequence, layer, KV head)
            // is a fresh stream of a few dozen KiB that the hardware prefetcher only picks up
            // after some misses (and drops at every 4 KiB page), so the loop requests its keys
            // `ATTEND_AHEAD_BYTES` ahead into L1, and the same rows of values into L2 for the
            // second pass.
            let row_bytes = d * size_of::<E>();
            let (rows_ahead, per_line) = (ATTEND_AHEAD_BYTES / row_bytes, 64 / size_of::<E>());
            // The rows the loop's requests do not cover: its first `rows_ahead`.
            for line in (0..rows_ahead.min(visible) * d).step_by(per_line) {
                _mm_prefetch::<_MM_HINT_T0>(kp.add(line).cast());
                _mm_prefetch::<_MM_HINT_T1>(vp.add(line).cast());
            }
            let prefetch_row = |j: usize| {
                let ahead = (j + rows_ahead) * d;
                for line in (0..d).step_by(per_line) {
                    _mm_prefetch::<_MM_HINT_T0>(kp.wrapping_add(ahead + line).cast());
                    _mm_prefetch::<_MM_HINT_T1>(vp.wrapping_add(ahead + line).cast());
                }
            };
            // Four key rows at a time: each head's four 16-lane partial sums are reduced
            // together (`sum4`), a quarter of the shuffles of reducing each row on its own,
            // which with the softmax's scalar exponentials was a third of this function's time.
            let mut j = 0;
            while j + 4 <= visible {
                let mut acc = [[_mm512_setzero_ps(); 4]; NH];
                for r in 0..4 {
                    prefetch_row(j + r);
                    for c in 0..NV {
                        let kc = E::load16(kp.add((j + r) * d + 16 * c));
                        for (a, qh) in acc.iter_mut().zip(&qv) {
                            a[r] = _mm512_fmadd_ps(qh[c], kc, a[r]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    _mm_storeu_ps(scores.as_mut_ptr().add(i * visible + j), sum4(a));
                }
                j += 4;
            }
            for j in j..visible {
                prefetch_row(j);
                let mut acc = [_mm512_setzero_ps(); NH];
                for c in 0..NV {
                    let kc = E::load16(kp.add(j * d + 16 * c));
                    for (a, qh) in acc.iter_mut().zip(&qv) {
                        *a = _mm512_fmadd_ps(qh[c], kc, *a);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    *scores.get_unchecked_mut(i * visible + j) = _mm512_reduce_add_ps(*a);
                }
            }
            // Softmax weights (unnormalised), then one pass over the values.
            let mut inv = [0f32; NH];
            for (i, s) in inv.iter_mut().enumerate() {
                let sc = &scores[i * visible..][..visible];
                let max = max_f32_avx512(sc) * self.scale;
                let w = &mut weights[i * visible..][..visible];
                *s = 1.0 / exp_into_avx512(sc, w, self.scale, max);
            }
            let mut acc = [[_mm512_setzero_ps(); NV]; NH];
            for j in 0..visible {
                let ahead = (j + rows_ahead) * d;
                for line in (0..d).step_by(per_line) {
                    _mm_prefetch::<_MM_HINT_T0>(vp.wrapping_add(ahead + line).cast());
                }
                let mut vc = [_mm512_setzero_ps(); NV];
                for (c, x) in vc.iter_mut().enumerate() {
                    *x = E::load16(vp.add(j * d + 16 * c));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*weights.get_unchecked(i * visible + j));
                    for (x, &vx) in a.iter_mut().zip(&vc) {
                        *x = _mm512_fmadd_ps(w, vx, *x);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let s = _mm512_set1_ps(inv[i]);
                for (c, &x) in a.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(i * d + 16 * c), _mm512_mul_ps(x, s));
                }
            }
        }
    }
}

/// The sums of four vectors' 16 lanes, `[Σa₀, Σa₁, Σa₂, Σa₃]`: two rounds of unpacks pair
/// the vectors within each 128-bit lane, then two shuffles of 128-bit lanes finish the sums.
///
/// # Safety
/// AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum4(a: &[std::arch::x86_64::__m512; 4]) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // Per 128-bit lane: [a0 a1 a0 a1] partials, then [a2 a3 a2 a3].
    let t0 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[0], a[1]),
        _mm512_unpackhi_ps(a[0], a[1]),
    );
    let t1 = _mm512_add_ps(
        _mm512_unpacklo_ps(a[2], a[3]),
        _mm512_unpackhi_ps(a[2], a[3]),
    );
    // Per 128-bit lane: [a0 a1 a2 a3], each that lane's sum of four.
    let (t0, t1) = (_mm512_castps_pd(t0), _mm512_castps_pd(t1));
    let u = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t1)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t1)),
    );
    // Lanes (0+2, 1+3, ..), then ((0+2)+(1+3), ..) in lane 0.
    let w = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b01_00_11_10>(u, u));
    let x = _mm512_add_ps(w, _mm512_shuffle_f32x4::<0b10_11_00_01>(w, w));
    _mm512_castps512_ps128(x)
}

/// [`exp_into`] 16 lanes wide: each `e^(x·scale - shift)` is [`fast_exp`]'s, bit for bit (the
/// same operations in the same order, no fused multiply-adds); only the sum's order differs.
/// The compiler left `exp_into`'s polynomial scalar inside the AVX-512 attention.
///
/// # Safety
/// AVX-512F available; `out.len() >= xs.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_into_avx512(xs: &[f32], out: &mut [f32], scale: f32, shift: f32) -> f32 {
    use std::arch::x86_64::*;
    assert!(out.len() >= xs.len());
    let n = xs.len() - xs.len() % 16;
    let (sv, hv) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
    let mut acc = _mm512_setzero_ps();
    let mut at = 0;
    while at < n {
        // SAFETY: `at + 16 <= n <= xs.len() <= out.len()`.
        unsafe {
            let x = _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(xs.as_ptr().add(at)), sv), hv);
            let e = fast_exp_avx512(x);
            _mm512_storeu_ps(out.as_mut_ptr().add(at), e);
            acc = _mm512_add_ps(acc, e);
        }
        at += 16;
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    for (&v, o) in xs[n..].iter().zip(&mut out[n..]) {
        let e = fast_exp(v * scale - shift);
        *o = e;
        sum += e;
    }
    sum
}

/// [`fast_exp`] of 16 lanes, bit for bit: its constants, its operations in its order.
///
/// # Safety
/// AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fast_exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    let (add, mul, sub) = (_mm512_add_ps, _mm512_mul_ps, _mm512_sub_ps);
    // `clamp`, with a NaN passed through as the scalar's does: `vmaxps`/`vminps` return their
    // second operand when either is NaN.
    let x = _mm512_min_ps(c(EXP_MAX), _mm512_max_ps(c(EXP_MIN), x));
    let round = c(EXP_ROUND);
    let t = add(mul(x, c(std::f32::consts::LOG2_E)), round);
    let n = sub(t, round);
    let n_bits = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(round));
    let r = sub(sub(x, mul(n, c(EXP_LN2_HI))), mul(n, c(EXP_LN2_LO)));
    let z = mul(r, r);
    let [c0, c1, c2, c3, c4] = EXP_POLY;
    let p = add(mul(c(c0), r), c(c1));
    let p = add(mul(p, r), c(c2));
    let p = add(mul(p, r), c(c3));
    let p = add(mul(p, r), c(c4));
    let p = add(mul(p, r), c(0.5));
    let e = add(add(mul(p, z), r), c(1.0));
    let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(n_bits, _mm512_set1_epi32(127)));
    mul(e, _mm512_castsi512_ps(scale))
}

/// [`attend_heads`] compiled for AVX2: the engine is built for baseline x86-64, where these
/// loops vectorise to 4-wide SSE2. Every reduction keeps [`LANES`] explicit accumulators and
/// nothing is fused, so both builds compute the same floats in the same order: the results are
/// identical, only twice as wide per instruction.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_heads_avx2<E: KvElem>(a: &Attend<'_, E>, heads: Range<usize>, ctx: &mut [f32]) {
    attend_heads(a, heads, ctx);
}

/// The body of [`attend_one`] for the query heads `heads`, whose outputs `ctx` holds
/// (`heads.len() · d` values); shapes already checked.
#[inline(always)]
fn attend_heads<E: KvElem>(a: &Attend<'_, E>, heads: Range<usize>, ctx: &mut [f32]) {
    let (d, scale) = (a.d, a.scale);
    let mut scores = vec![0f32; a.visible];
    let mut probs = vec![0f32; a.visible];
    let mut row = vec![0f32; d];
    let first = heads.start;
    for h in heads {
        let (keys, values) = (a.keys(h / a.group), a.values(h / a.group));
        let qh = &a.q[h * d..][..d];
        for (s, key) in scores.iter_mut().zip(keys.chunks_exact(d)) {
            *s = dot(qh, E::row_f32(key, &mut row));
        }
        let max = max_f32(&scores) * scale;
        let inv = 1.0 / exp_into(&scores, &mut probs, scale, max);
        let out = &mut ctx[(h - first) * d..][..d];
        out.fill(0.0);
        for (&p, value) in probs.iter().zip(values.chunks_exact(d)) {
            let value = E::row_f32(value, &mut row);
            let w = p * inv;
            for (o, &x) in out.iter_mut().zip(value) {
                *o += w * x;
            }
        }
    }
}

/// Dot product with eight independent accumulators (vectorised by the compiler).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Writes attention output `ctx: [heads, len, d]` into `out`, the rows of `[T, heads · d]`
/// starting at the block's first token (the inverse of [`split_heads`]).
pub(crate) fn merge_heads_into(
    ctx: &Tensor,
    heads: usize,
    len: usize,
    d: usize,
    out: &mut [f32],
) -> Result<(), EngineError> {
    with_f32(ctx, |xs| {
        if xs.len() != heads * len * d || out.len() < len * heads * d {
            return Err(EngineError::Input(
                "internal: attention output shape mismatch".into(),
            ));
        }
        for (p, row) in out.chunks_mut(heads * d).take(len).enumerate() {
            for (h, dst) in row.chunks_mut(d).enumerate() {
                dst.copy_from_slice(&xs[(h * len + p) * d..][..d]);
            }
        }
        Ok(())
    })
}

/// `x + y` for the residual stream (same shapes), on rayon's pool for large inputs.
///
/// candle's elementwise add splits anything over 64k values over its own thread pool, whose
/// worker then spins for up to 25,000 pauses after each op: beside rayon's two workers on two
/// cores that spinner took about 15% of a 128-token prefill's CPU time.
pub(crate) fn add(x: &Tensor, y: &Tensor) -> Result<Tensor, EngineError> {
    zip_map(x, y, "residual add", |a, b| a + b)
}

/// `silu(gate) · up`, the SwiGLU activation.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, EngineError> {
    zip_map(gate, up, "SwiGLU", |g, u| g / (1.0 + fast_exp(-g)) * u)
}

/// `f(x, y)` element by element for two tensors of one shape, on rayon's pool from
/// [`PAR_MIN_ELEMS`] values (in chunks of a quarter of that); `what` names the op in the
/// shape error.
fn zip_map(
    x: &Tensor,
    y: &Tensor,
    what: &str,
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<Tensor, EngineError> {
    if x.dims() != y.dims() {
        return Err(EngineError::Input(format!(
            "internal: {what} of shapes {:?} and {:?}",
            x.dims(),
            y.dims()
        )));
    }
    const CHUNK: usize = PAR_MIN_ELEMS / 4;
    let out = with_f32(x, |a| {
        with_f32(y, |b| {
            let mut out = vec![0f32; a.len()];
            let run = |(o, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
                crate::wide!({
                    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                        *o = f(a, b);
                    }
                })
            };
            if a.len() >= PAR_MIN_ELEMS {
                team::for_each_chunk_mut(&mut out, CHUNK, |i, o| {
                    let span = i * CHUNK..i * CHUNK + o.len();
                    run((o, (&a[span.clone()], &b[span])))
                });
            } else {
                run((&mut out, (a, b)));
            }
            Ok(out)
        })
    })?;
    new_tensor(out, x.dims())
}

/// An MLP activation of a non-gated MLP (GPT-2), by its transformers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor, EngineError> {
        Ok(match self {
            // candle's `gelu` is the tanh approximation, its `gelu_erf` the exact form.
            Activation::GeluTanh => x.gelu()?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
        })
    }
}

/// Negative log-likelihood of `target` under each row of `logits: [rows, vocab]`:
/// `logsumexp(row) - row[target]`, with the sum in f64 so a 50k-entry vocabulary adds no
/// rounding of its own.
pub(crate) fn row_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>, EngineError> {
    let vocab = logits.dims()[1];
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::Input(format!(
            "target token {bad} is outside the vocabulary of {vocab} entries"
        )));
    }
    with_f32(logits, |xs| {
        let per_row = |(row, &target): (&[f32], &u32)| -> f32 {
            (log_sum_exp(row) - f64::from(row[target as usize])) as f32
        };
        Ok(if xs.len() >= PAR_MIN_ELEMS {
            xs.par_chunks(vocab)
                .zip(targets.par_iter())
                .map(per_row)
                .collect()
        } else {
            xs.chunks(vocab).zip(targets.iter()).map(per_row).collect()
        })
    })
}

/// `ln Σ e^x` over a row of logits, stable (shifted by the row's maximum): partial sums of
/// 256 in f32, accumulated in f64. The NLL and the API's log-probabilities both use it, so a
/// token's log-probability is exactly the negated NLL the evaluation sums.
pub(crate) fn log_sum_exp(row: &[f32]) -> f64 {
    let max = max_f32(row);
    let mut scratch = [0f32; 256];
    let sum: f64 = row
        .chunks(256)
        .map(|c| f64::from(exp_into(c, &mut scratch[..c.len()], 1.0, max)))
        .sum();
    sum.ln() + f64::from(max)
}

/// Index of the largest entry of a vector (the greedy next token).
pub(crate) fn argmax(logits: &Tensor) -> Result<u32, EngineError> {
    with_f32(logits, |xs| {
        let mut best = (0usize, f32::NEG_INFINITY);
        for (i, &v) in xs.iter().enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        Ok(best.0 as u32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn softmax_masks_future_keys() {
        // 2 heads stacked on rows, 2 query tokens at positions 1 and 2 (offset 1), 3 keys.
        let s = t(&[0.0; 12], &[1, 4, 3]);
        let p: Vec<Vec<f32>> = causal_softmax(&s, 2, 1, 1.0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(p[0], vec![0.5, 0.5, 0.0]);
        assert!((p[1][2] - 1.0 / 3.0).abs() < 1e-7);
        assert_eq!(p[2], vec![0.5, 0.5, 0.0]);
    }

    #[test]
    fn norms_and_rope_match_formulas() {
        let x = t(&[1.0, 2.0, 3.0, 4.0], &[1, 4]);
        let r: Vec<f32> = rms_norm(&x, &[1.0, 1.0, 1.0, 2.0], 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let inv = 1.0 / 7.5f32.sqrt();
        assert!((r[3] - 8.0 * inv).abs() < 1e-6);
        let l: Vec<f32> = layer_norm(&x, &[1.0; 4], &[0.5; 4], 0.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((l.iter().sum::<f32>() - 2.0).abs() < 1e-5);
        // Position 0 is the identity; a head of width 2 at position 1 rotates by 1 radian.
        let rope = RopeTable::new(2, 10_000.0, 0, 2);
        let x = t(&[1.0, 0.0, 1.0, 0.0], &[2, 2]);
        let y: Vec<f32> = split_heads(&x, 1, 2, Some(&rope))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&y[..2], &[1.0, 0.0]);
        assert!((y[2] - 1f32.cos()).abs() < 1e-6 && (y[3] - 1f32.sin()).abs() < 1e-6);
    }

    /// The AVX-512 copies [`wide!`](crate::wide!) makes give exactly the floats of the baseline
    /// build for the loops it wraps: the SwiGLU, the softmax's exponentials and sum, the RMSNorm.
    #[test]
    fn wide_loops_equal_the_portable_ones() {
        let n = 1000 + 7;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let u: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let swiglu = |o: &mut [f32]| {
            for ((o, &g), &u) in o.iter_mut().zip(&g).zip(&u) {
                *o = g / (1.0 + fast_exp(-g)) * u;
            }
        };
        let softmax = |o: &mut [f32]| {
            let max = max_f32(&g) * 0.125;
            let sum = exp_into(&g, o, 0.125, max);
            for o in o.iter_mut() {
                *o /= sum;
            }
        };
        let norm = |o: &mut [f32]| {
            let ms = g.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for ((o, v), w) in o.iter_mut().zip(&g).zip(&u) {
                *o = w * (v * inv);
            }
        };
        // Generic, not `dyn`: each loop must be inlined into the AVX-512 copy to be rebuilt there.
        fn check(what: &str, n: usize, f: impl Fn(&mut [f32])) {
            let (mut plain, mut wide) = (vec![0f32; n], vec![0f32; n]);
            f(&mut plain);
            crate::wide!(f(&mut wide));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&plain), bits(&wide), "{what}");
        }
        check("swiglu", n, swiglu);
        check("softmax", n, softmax);
        check("rms norm", n, norm);
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let rel = (f64::from(fast_exp(x)) - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37 && fast_exp(1000.0).is_finite());
    }

    /// The AVX-512 softmax pieces of the attention: each exponential is [`fast_exp`]'s bit for
    /// bit (clamped ends, NaN and a ragged tail included), the sum is the scalar sum's within
    /// rounding, the prefill's softmax is the portable one's, and `sum4` adds each vector's 16
    /// lanes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_softmax_pieces_equal_the_scalar_ones() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU lacks AVX-512F, which these kernels need");
            return;
        }
        let mut xs: Vec<f32> = (0..1000).map(|i| -200.0 + 0.4137 * i as f32).collect();
        xs.extend([f32::NAN, 88.5, -87.5, 0.0, -0.0, 1e-30]);
        let (scale, shift) = (0.9, 1.5);
        let mut got = vec![0f32; xs.len()];
        let mut want = vec![0f32; xs.len()];
        // SAFETY: AVX-512F checked above; `got` as long as `xs`.
        let sum = unsafe { exp_into_avx512(&xs, &mut got, scale, shift) };
        let _ = exp_into(&xs, &mut want, scale, shift);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "x = {}: {g} against {w}",
                xs[i]
            );
        }
        assert!(
            sum.is_nan(),
            "a NaN score makes the sum NaN, as the scalar loop's"
        );
        // Scores of a softmax: at most 0 after the shift by their maximum.
        let finite: Vec<f32> = xs[..1000].iter().map(|x| x * 0.2 - 40.0).collect();
        let mut out = vec![0f32; finite.len()];
        // SAFETY: as above.
        let sum = unsafe { exp_into_avx512(&finite, &mut out, scale, shift) };
        let exact: f64 = out.iter().map(|&e| f64::from(e)).sum();
        assert!(
            ((f64::from(sum) - exact) / exact).abs() < 1e-6,
            "{sum} against {exact}"
        );

        // The softmax: the maximum exactly the portable one's (ragged tails included), each
        // probability within rounding of the portable loop's, and they sum to 1.
        for n in [1, 15, 16, 17, 100, 1000] {
            let row = &finite[..n];
            // SAFETY: AVX-512F checked above.
            assert_eq!(unsafe { max_f32_avx512(row) }, max_f32(row), "{n} values");
            let mut want = vec![0f32; n];
            let inv = 1.0 / exp_into(row, &mut want, 0.125, max_f32(row) * 0.125);
            want.iter_mut().for_each(|w| *w *= inv);
            let mut got = vec![0f32; n];
            softmax_into(row, &mut got, 0.125);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1e-30),
                    "{n}: {g} against {w}"
                );
            }
            let total: f64 = got.iter().map(|&g| f64::from(g)).sum();
            assert!((total - 1.0).abs() < 1e-5, "{n}: sums to {total}");
        }

        use std::arch::x86_64::*;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..16)
                    .map(|i| ((r * 16 + i) as f32 * 0.731).sin())
                    .collect()
            })
            .collect();
        // SAFETY: AVX-512F checked above; each row holds 16 floats.
        let lanes = unsafe {
            let v = [0, 1, 2, 3].map(|r| _mm512_loadu_ps(rows[r].as_ptr()));
            let mut lanes = [0f32; 4];
            _mm_storeu_ps(lanes.as_mut_ptr(), sum4(&v));
            lanes
        };
        for (r, (&got, row)) in lanes.iter().zip(&rows).enumerate() {
            let want: f32 = row.iter().sum();
            assert!((got - want).abs() < 1e-5, "row {r}: {got} against {want}");
        }
    }

    /// The residual add equals candle's on the pool's path (more than `PAR_MIN_ELEMS` values,
    /// a ragged last chunk) and on the calling thread's, and refuses mismatched shapes.
    #[test]
    fn residual_add_equals_candles_and_checks_shapes() {
        for n in [7, 3 * PAR_MIN_ELEMS + 5] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let (x, y) = (t(&a, &[n]), t(&b, &[n]));
            let got = add(&x, &y).unwrap().to_vec1::<f32>().unwrap();
            let want = (&x + &y).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got, want, "{n} values");
        }
        assert!(add(&t(&[1.0, 2.0], &[2]), &t(&[1.0], &[1])).is_err());
    }

    #[test]
    fn nll_is_logsumexp_minus_target() {
        let l = t(&[0.0, 0.0, 0.0, 0.0, 1.0, 0.0], &[2, 3]);
        let n = row_nll(&l, &[0, 1]).unwrap();
        assert!((n[0] - 3f32.ln()).abs() < 1e-6);
        let e = 1f32.exp();
        assert!((n[1] - ((2.0 + e).ln() - 1.0)).abs() < 1e-6);
        assert_eq!(argmax(&t(&[0.0, 3.0, 1.0], &[3])).unwrap(), 1);
    }

    /// A long cache makes [`attend_one`] split its heads over two threads; every head must
    /// come out exactly as the one-thread loop computes it, and the odd head count leaves the
    /// halves uneven.
    #[test]
    fn split_decode_attention_equals_one_thread() {
        let (heads, kv_heads, d, capacity, visible) = (5, 1, 64, 320, 300);
        assert!(visible * heads * d >= PARALLEL_ATTENTION_MIN);
        let fill = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32)
                .map(|v| v / (1u32 << 24) as f32 - 0.5)
                .collect()
        };
        let q = fill(heads * d, 1);
        let k = fill(kv_heads * capacity * d, 2);
        let v = fill(kv_heads * capacity * d, 3);
        let mut split = vec![0f32; heads * d];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            attend_one(
                &q, &k, &v, capacity, visible, heads, kv_heads, d, 0.125, &mut split,
            )
        })
        .unwrap();
        let mut alone = vec![0f32; heads * d];
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        one.install(|| {
            attend_one(
                &q, &k, &v, capacity, visible, heads, kv_heads, d, 0.125, &mut alone,
            )
        })
        .unwrap();
        assert_eq!(split, alone);
        assert!(alone.iter().any(|&x| x != 0.0));
    }

    /// Decode attention (whichever kernel this CPU runs: the AVX-512 one for 64- and 128-wide
    /// heads) against a plain f64 softmax attention, under grouped-query attention (3 query
    /// heads per KV head, as SmolLM2) and without, from one visible position to many; over an
    /// f16 cache holding the same values it computes the same floats.
    #[test]
    fn decode_attention_matches_an_f64_reference() {
        for (heads, kv_heads, d) in [(9, 3, 64), (4, 4, 64), (6, 2, 128), (5, 1, 32)] {
            for visible in [1, 2, 17, 160] {
                let capacity = visible + 3;
                let fill = |n: usize, seed: u64| -> Vec<f32> {
                    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    (0..n)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
                        })
                        .collect()
                };
                let q = fill(heads * d, 1);
                // Keys and values f16 represents exactly, so the f16 cache's kernel reads the
                // same numbers as the f32 one and must compute the same floats.
                let halve = |x: Vec<f32>| -> Vec<half::f16> {
                    x.into_iter().map(half::f16::from_f32).collect()
                };
                let (k16, v16) = (
                    halve(fill(kv_heads * capacity * d, 2)),
                    halve(fill(kv_heads * capacity * d, 3)),
                );
                let k: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
                let v: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
                let scale = 1.0 / (d as f32).sqrt();
                let mut got = vec![f32::NAN; heads * d];
                attend_one(
                    &q, &k, &v, capacity, visible, heads, kv_heads, d, scale, &mut got,
                )
                .unwrap();
                let mut from_f16 = vec![f32::NAN; heads * d];
                attend_one(
                    &q,
                    &k16,
                    &v16,
                    capacity,
                    visible,
                    heads,
                    kv_heads,
                    d,
                    scale,
                    &mut from_f16,
                )
                .unwrap();
                assert_eq!(
                    got, from_f16,
                    "heads {heads}/{kv_heads}, d {d}, visible {visible}"
                );
                let group = heads / kv_heads;
                for h in 0..heads {
                    let base = (h / group) * capacity * d;
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|c| f64::from(q[h * d + c]) * f64::from(k[base + j * d + c]))
                                .sum();
                            dot * f64::from(scale)
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..d {
                        let want: f64 = (0..visible)
                            .map(|j| e[j] / total * f64::from(v[base + j * d + c]))
                            .sum();
                        let got = f64::from(got[h * d + c]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "heads {heads}/{kv_heads}, d {d}, visible {visible}, head {h}, \
                             dim {c}: got {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
