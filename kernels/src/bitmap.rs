//! Bitmap format: one bit per weight saying whether it is kept, plus the kept values packed.
//!
//! The index cost is a fixed 1 bit per weight instead of CSR's 16 bits per *kept* weight, so the
//! bitmap reads fewer bytes whenever more than 1/16 of the weights are kept: at 50% sparsity it
//! reads 1.125 bytes per weight in bf16 (dense bf16: 2, CSR: 2) and 2.125 in f32 (dense: 4). The
//! price is compute proportional to *all* weights. The AVX2 kernel takes 8 mask bytes (64
//! weights) per step, finds where each byte's values start from popcounts of the word's
//! prefixes (so steps depend on each other only through one add), and expands each byte's 8
//! weights into a vector: in bf16 with one broadcast load of the next 16 packed bytes and one
//! `vpshufb` whose control (a 256-entry table, looked up from the byte) puts packed value `k`
//! into the high half of its f32 lane and zeroes the rest, i.e. expands and widens at once; in
//! f32 and i8 with a lane permute (`vpermps`) and a mask. Then one FMA against `x`. It
//! prefetches its two streams ahead, which the hardware prefetcher alone did not keep fed. With
//! AVX-512 one masked expand (`vexpandps`) does the same for 16 weights per mask word; with
//! AVX512-VBMI2 as well (Ice Lake, Zen 4), bf16 takes 32 weights per word (`vpexpandw`, then
//! dense bf16's own widen-and-FMA step) and i8 64 (`vpexpandb`, then dense i8's integer step:
//! `vpdpwssd` against the activations quantized to i16 once per call, AVX512-VNNI), and
//! batches of 3+ tokens (f32: 2+) are expanded into dense rows that dense's batched kernels
//! run: bf16 from 9 tokens (batched decode steps, prefill) 12 rows at a time inside dense
//! bf16's tokens-in-lanes GEMM, each tile just before it is multiplied, and up to 16 tokens 8
//! rows at a time into dense's small-batch tiles (`expands_for_batch`), except f32 steps of 9
//! to 16 tokens, which skip the pruned weights altogether: each row walks its kept entries, one
//! FMA per kept weight against 16 tokens (`lanes_kept`); f32 prefill
//! 12 rows at a time into the f32 tokens-in-lanes GEMM's tiles, bf16 and i8 prefill on AMX a
//! 32-row panel at a time as the tiles' panels are packed, and i8 prefill without AMX 12 rows
//! at a time, widened to bf16, into the tokens-in-lanes GEMM (`i8_rows_gemm`); only where the
//! CPU has neither AMX nor AVX512-BF16 (Ice Lake), or the columns are odd, does i8 prefill
//! still expand the whole matrix per call (`expanded_for_batch`).
//! Without the dense copy a 16-sequence step of the 50% SmolLM2 model went 41 -> 36 ms, level
//! with dense bf16. With AVX512-BF16 too (Zen 4, Sapphire Rapids), each expanded bf16
//! word is multiplied in one `vdpbf16ps` against the activations rounded to bf16 pairs once
//! per call, as dense bf16's GEMV does.
//!
//! Measured on the 2-core EPYC (Zen 2, AVX2), streamed with caches flushed: at 50% the bf16
//! bitmap beats dense bf16 on every SmolLM2 shape and the f32 bitmap beats dense f32, while CSR,
//! whose work scales with kept weights only, wins again when very sparse; the planner weighs
//! them with those measured costs (`plan.rs`), and the GEMV splits its rows over the pool by
//! that work, not by bytes (`par.rs`).

use crate::dense::{DenseMatrix, SMALL_BATCH, small_batch_written, takes_lanes};
use crate::element::{Dtype, Element, Values, with_values};
use crate::error::{KernelError, Result, checked_len, expect_len};
use crate::isa::{Exec, Isa};
use crate::lanes;
use crate::par::{self, Out};
use crate::quant::ActivationsI16;
use crate::rowgemm::{self, RowDecode};
use crate::view::DenseView;
use half::slice::HalfBitsSliceExt;
use std::ops::Range;

/// Zero values appended after the last packed value: the SIMD kernels load 8 (AVX2) or 16
/// (AVX-512) values per step even when fewer are kept.
pub(crate) const PAD: usize = 16;

/// Bitmap weights `[rows, cols]`: bit `c % 8` of byte `r * stride + c / 8` is set when `(r, c)`
/// is kept; row `r`'s kept values start at `row_ptr[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct BitmapMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) stride: usize,
    pub(crate) masks: Vec<u8>,
    pub(crate) row_ptr: Vec<u32>,
    pub(crate) values: Values,
}

/// A bitmap's rows for the bf16 prefill GEMM's panels ([`crate::gemm_bf16`]): each panel's
/// rows expanded from the packed values into `buf` (the VBMI2 expansion), so prefill on AMX
/// needs no dense copy of the matrix. bf16 storage as it is; int8 as its integers (exact in
/// bf16), each output scaled after its sum by [`row_scales`](crate::gemm_bf16::Bf16Rows::row_scales).
/// f32 storage rounds to bf16 here, though its prefill runs the tokens-in-lanes GEMM instead.
impl crate::gemm_bf16::Bf16Rows for BitmapMatrix {
    fn rows_bits<'a>(
        &'a self,
        r0: usize,
        nr: usize,
        buf: &'a mut Vec<u16>,
        _: &mut (Vec<u32>, Vec<f32>),
    ) -> &'a [u16] {
        buf.resize(nr * self.cols, 0);
        if self.cols == 0 {
            return buf;
        }
        let rows = buf.reinterpret_cast_mut::<half::bf16>();
        match &self.values {
            Values::Bf16(vals) => {
                for (i, row) in rows.chunks_exact_mut(self.cols).enumerate() {
                    self.expand_row(r0 + i, vals, row);
                }
            }
            Values::I8 { q, .. } => crate::dense::widen_i8_rows(rows, self.cols, |i, bytes| {
                self.expand_row(r0 + i, q, bytes)
            }),
            Values::F32(vals) => {
                let mut floats = vec![0.0f32; self.cols];
                for (i, row) in rows.chunks_exact_mut(self.cols).enumerate() {
                    self.expand_row(r0 + i, vals, &mut floats);
                    row.iter_mut()
                        .zip(&floats)
                        .for_each(|(o, &v)| *o = half::bf16::from_f32(v));
                }
            }
        }
        buf
    }

    fn row_scales(&self) -> Option<&[f32]> {
        self.values.scales()
    }
}

impl BitmapMatrix {
    /// Packs the kept entries of the view.
    pub fn from_view(view: &DenseView<'_>, dtype: Dtype) -> Result<BitmapMatrix> {
        if dtype == Dtype::I8 {
            return crate::quant::pack_i8(
                view,
                |qv| Self::from_view(qv, Dtype::F32),
                |w| &mut w.values,
            );
        }
        let (rows, cols) = (view.rows(), view.cols());
        let stride = cols.div_ceil(8);
        let mut masks = vec![0u8; checked_len(rows, stride)?];
        let mut row_ptr = Vec::with_capacity(rows + 1);
        // Sized once: grown by doubling, the values' buffer kept up to twice the memory it
        // needs, which (on huge pages) stayed resident: 85 MiB of an f32 SmolLM2's 324.
        let mut vals = Vec::with_capacity(view.kept().saturating_add(PAD));
        row_ptr.push(0u32);
        let mut words = vec![0u64; cols.div_ceil(64)];
        for r in 0..rows {
            // The row's kept bits are its mask bytes (little-endian words); its kept values
            // follow them in column order.
            view.row_bits(r, &mut words);
            let row = view.stored_row(r);
            for ((bytes, &w), k) in masks[r * stride..(r + 1) * stride]
                .chunks_mut(8)
                .zip(&words)
                .zip((0..).step_by(64))
            {
                bytes.copy_from_slice(&w.to_le_bytes()[..bytes.len()]);
                let mut bits = w;
                while bits != 0 {
                    vals.push(row[k + bits.trailing_zeros() as usize]);
                    bits &= bits - 1;
                }
            }
            row_ptr.push(
                u32::try_from(vals.len()).map_err(|_| KernelError::TooLarge {
                    rows,
                    cols,
                    reason: "more than u32::MAX stored entries",
                })?,
            );
        }
        vals.extend([0.0; PAD]);
        Ok(BitmapMatrix {
            rows,
            cols,
            stride,
            masks,
            row_ptr,
            values: Values::from_f32(dtype, vals),
        })
    }

    /// Packs dense-with-zeros weights.
    pub fn from_dense(w: &[f32], rows: usize, cols: usize, dtype: Dtype) -> Result<BitmapMatrix> {
        Self::from_view(&DenseView::new(w, rows, cols)?, dtype)
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage dtype.
    pub fn dtype(&self) -> Dtype {
        self.values.dtype()
    }

    /// Stored (kept) entries.
    pub fn nnz(&self) -> usize {
        self.row_ptr.last().map_or(0, |&n| n as usize)
    }

    /// Bytes a GEMV reads: masks, row pointers and values (with the small tail padding).
    pub fn bytes(&self) -> usize {
        self.masks.len() + self.row_ptr.len() * 4 + self.values.bytes()
    }

    /// Unpacks to dense row-major f32.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        let (mut idx, mut val) = (Vec::new(), Vec::new());
        for r in 0..self.rows {
            self.decode_row(r, &mut idx, &mut val);
            for (&c, &v) in idx.iter().zip(&val) {
                out[r * self.cols + c as usize] = v;
            }
        }
        out
    }

    /// `y = W·x` (`x`: `cols`, `y`: `rows`, overwritten).
    pub fn gemv(&self, x: &[f32], y: &mut [f32], exec: Exec) -> Result<()> {
        expect_len("x", self.cols, x.len())?;
        expect_len("y", self.rows, y.len())?;
        let bounds = self.gemv_bounds(exec);
        let isa = exec.isa.effective();
        // The i8 kernel multiplies in integers: quantize `x` once for all tasks.
        let xq = match &self.values {
            Values::I8 { .. } if isa == Isa::Avx512 && i8_expand_vnni() => {
                ActivationsI16::quantize(x)
            }
            _ => None,
        };
        // The bf16 kernel on AVX512-BF16 multiplies pairs: `x` rounded to bf16 pairs once.
        let xb = match &self.values {
            Values::Bf16(_) if self.cols > 0 && bf16_expand_dp(isa) => {
                Some(crate::gemm_bf16::pack_activations(x, 1, self.cols))
            }
            _ => None,
        };
        let inputs = Inputs {
            x,
            xq: xq.as_ref(),
            xb: xb.as_deref(),
        };
        with_values!(&self.values, v => {
            par::for_each_range(y, 1, &bounds, |r, ys| {
                let first = r.start;
                self.gemv_rows(isa, v, r, &inputs, ys);
                self.values.scale_rows(first, ys);
            })
        });
        Ok(())
    }

    /// `Y = X·Wᵀ` for 2 to [`FEW_TOKENS_MAX`] tokens of bf16 values on AVX512-BF16 (lengths
    /// checked by the caller): the bf16 GEMV's fused expand-and-`vpdpbf16ps` loop with every
    /// expanded word used for each token, rows split over the pool as the GEMV splits them.
    /// Each token's outputs equal its GEMV's bit for bit.
    #[cfg(target_arch = "x86_64")]
    fn gemm_few_bf16(&self, bits: &[u16], x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) {
        let pairs = self.cols.div_ceil(2);
        let xb = crate::gemm_bf16::pack_activations(x, tokens, self.cols);
        let bounds = self.gemv_bounds(exec);
        let out = par::SharedOut::new(y);
        par::for_each_bound(&bounds, |r| {
            // SAFETY: AVX-512F/BW/VBMI2/BF16 present (`bf16_expand_dp` with an effective
            // AVX-512); the arrays are consistent by construction; `xb` holds `tokens` rows of
            // `pairs` and `x` of `cols`, `y` is `[tokens, rows]`, and the bounds' row ranges
            // are disjoint.
            unsafe {
                x86::gemm_rows_bf16_vbmi2_dp(self, bits, r, tokens, pairs, &xb, x, out, self.rows)
            }
        });
    }

    /// How the GEMV (and [`BitmapMatrix::gemm_few_bf16`]) split the rows over the pool: by
    /// work, not bytes, since the expand costs the same per weight whether kept or not.
    pub(crate) fn gemv_bounds(&self, exec: Exec) -> Vec<usize> {
        let work = par::work_bytes(
            self.bytes(),
            self.rows * self.cols,
            crate::plan::bitmap_compute_per_weight(self.dtype()),
        );
        let tasks = par::task_count(exec, self.rows, work, par::MIN_TASK_BYTES);
        par::even_bounds(self.rows, tasks)
    }

    /// Rows `rows` of `y = W·x`, on the kernel `inputs` was prepared for.
    fn gemv_rows<T: Element>(
        &self,
        isa: Isa,
        vals: &[T],
        rows: Range<usize>,
        inputs: &Inputs<'_>,
        y: &mut [f32],
    ) {
        let x = inputs.x;
        #[cfg(target_arch = "x86_64")]
        if let (Isa::Avx512, Some(q), Some(xq)) = (isa, T::i8_values(vals), inputs.xq) {
            // SAFETY: AVX-512F (`effective`), BW, VBMI2 and VNNI present (`gemv` quantizes
            // only where `i8_expand_vnni`); the arrays are consistent by construction; `xq`
            // holds `cols` values.
            return unsafe { x86::gemv_rows_i8_vnni(self, q, rows, xq, y) };
        }
        #[cfg(target_arch = "x86_64")]
        if let (Isa::Avx512, Some(bits), Some(xb)) = (isa, T::bf16_bits(vals), inputs.xb) {
            // SAFETY: AVX-512F (`effective`), BW, VBMI2 and AVX512-BF16 present (`gemv` packs
            // `xb` only where `bf16_expand_dp`); the arrays are consistent by construction;
            // `xb` holds `cols.div_ceil(2)` pairs and `x` holds `cols` values.
            return unsafe { x86::gemv_rows_bf16_vbmi2_dp(self, bits, rows, xb, x, y) };
        }
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if T::bf16_bits(vals).is_some() && x86::has_vbmi2() => {
                let bits = T::bf16_bits(vals).unwrap_or_default();
                // SAFETY: AVX-512F (`effective`), BW and VBMI2 (checked) present; the arrays
                // are consistent by construction; x.len() == cols (checked by `gemv`).
                unsafe { x86::gemv_rows_bf16_vbmi2(self, bits, rows, x, y) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                // SAFETY: AVX-512F present (`effective`); as below, with PAD >= 16 trailing
                // values for the 16-wide loads.
                unsafe {
                    x86::gemv_rows_512(
                        &self.masks,
                        self.stride,
                        &self.row_ptr,
                        vals,
                        self.cols,
                        rows,
                        x,
                        y,
                    )
                }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                // SAFETY: AVX2 present (`effective`); masks/row_ptr/values are consistent by
                // construction and `values` carries PAD trailing elements for the 8-wide loads;
                // x.len() == cols (checked by `gemv`).
                unsafe {
                    x86::gemv_rows(
                        &self.masks,
                        self.stride,
                        &self.row_ptr,
                        vals,
                        self.cols,
                        rows,
                        x,
                        y,
                    )
                }
            }
            _ => {
                for (yi, r) in y.iter_mut().zip(rows) {
                    let mut vi = self.row_ptr[r] as usize;
                    let mut acc = [0.0f32; 8];
                    let mask = &self.masks[r * self.stride..][..self.stride];
                    for (b, &m) in mask.iter().enumerate() {
                        let mut m = m;
                        while m != 0 {
                            let j = m.trailing_zeros() as usize;
                            acc[j] += vals[vi].to_f32() * x[b * 8 + j];
                            vi += 1;
                            m &= m - 1;
                        }
                    }
                    *yi = crate::simd::sum8(acc);
                }
            }
        }
    }

    /// `Y = X·Wᵀ` (`X`: `[tokens, cols]`, `Y`: `[tokens, rows]`, row-major; `Y` overwritten).
    pub fn gemm(&self, x: &[f32], tokens: usize, y: &mut [f32], exec: Exec) -> Result<()> {
        self.gemm_out(x, tokens, Out::Init(y), exec)
    }

    /// [`BitmapMatrix::gemm`] into an initialized or fresh output (see [`Out`]).
    pub(crate) fn gemm_out(&self, x: &[f32], tokens: usize, y: Out<'_>, exec: Exec) -> Result<()> {
        expect_len("x", checked_len(tokens, self.cols)?, x.len())?;
        expect_len("y", checked_len(tokens, self.rows)?, y.len())?;
        if let Some(vals) = self.tile_values(tokens, exec) {
            crate::lanes_amx::bitmap_gemm(&self.amx_rows(vals), x, tokens, y, exec);
            return Ok(());
        }
        if let Values::F32(vals) = &self.values
            && (lanes::MIN_TOKENS..=SMALL_BATCH).contains(&tokens)
            && crate::lanes_kept::available(exec)
        {
            // A batched decode step of 9 to 16 sequences: one FMA per kept weight, 1.00-1.18x
            // dense f32 where the expanded rows ran 0.88-0.92x (see `lanes_kept`).
            let kept = crate::lanes_kept::KeptRows {
                rows: self.rows,
                cols: self.cols,
                stride: self.stride,
                masks: &self.masks,
                row_ptr: &self.row_ptr,
                values: vals,
            };
            crate::lanes_kept::gemm(&kept, x, tokens, y, exec);
            return Ok(());
        }
        let on_lanes = self.expands_for_batch(exec) && self.rows_on_lanes(tokens, exec);
        match &self.values {
            Values::Bf16(vals) if on_lanes => {
                let write = self.tile_row_writer(vals);
                let w = lanes::Weights::Bf16Rows(&write, None);
                lanes::gemm(w, self.rows, self.cols, x, tokens, y, exec);
                return Ok(());
            }
            Values::I8 { q, scales } if on_lanes => {
                self.i8_rows_gemm(q, scales, x, tokens, y, exec);
                return Ok(());
            }
            Values::F32(vals) if on_lanes => {
                let write = self.tile_row_writer(vals);
                lanes::gemm(
                    lanes::Weights::F32Rows(&write),
                    self.rows,
                    self.cols,
                    x,
                    tokens,
                    y,
                    exec,
                );
                return Ok(());
            }
            _ => {}
        }
        let y = y.init();
        #[cfg(target_arch = "x86_64")]
        if let Values::Bf16(vals) = &self.values
            && (2..=FEW_TOKENS_MAX).contains(&tokens)
            && bf16_expand_dp(exec.isa.effective())
            && let Some(bits) = Element::bf16_bits(vals.as_slice())
        {
            self.gemm_few_bf16(bits, x, tokens, y, exec);
            return Ok(());
        }
        // Two f32 tokens share one pass over the expanded rows (below) rather than two GEMVs.
        let f32_rows = self.expands_for_batch(exec) && self.values.dtype() == Dtype::F32;
        if tokens == 1 || (tokens == 2 && !f32_rows) {
            for t in 0..tokens {
                let (xs, ys) = (
                    &x[t * self.cols..][..self.cols],
                    &mut y[t * self.rows..][..self.rows],
                );
                self.gemv(xs, ys, exec)?;
            }
            return Ok(());
        }
        if self.expands_for_batch(exec) {
            // bf16 on the tokens-in-lanes GEMM went above; f32 there takes the dense copy below.
            if tokens <= SMALL_BATCH && !self.rows_on_lanes(tokens, exec) {
                let (rows, cols) = (self.rows, self.cols);
                let scales = self.values.scales();
                return with_values!(&self.values, vals => {
                    let write = |r: usize, row: &mut [_]| self.expand_row(r, vals, row);
                    small_batch_written(&write, scales, rows, cols, x, tokens, y, exec)
                });
            }
        }
        if self.expands_for_batch(exec)
            && crate::amx::enabled()
            && crate::gemm_bf16::try_gemm(
                self,
                self.dtype(),
                self.rows,
                self.cols,
                x,
                tokens,
                y,
                exec,
            )
        {
            // bf16 and int8 prefill on AMX: each 32-row panel expanded as the tiles' panel is
            // packed (`Bf16Rows` above), instead of a dense copy of the whole matrix per call.
            return Ok(());
        }
        if let Some(dense) = self.expanded_for_batch(exec) {
            return dense.gemm(x, tokens, y, exec);
        }
        let (rows, cols, nnz) = (self.rows, self.cols, self.nnz());
        rowgemm::row_gemm(
            self,
            rows,
            cols,
            Some(&self.row_ptr),
            nnz,
            x,
            tokens,
            y,
            exec,
        );
        Ok(())
    }
}

/// The activations of one GEMV in the forms its kernels take: `x` itself, quantized to i16 for
/// the i8 VNNI kernel, or rounded to bf16 pairs for the bf16 `vdpbf16ps` kernel (each `None`
/// where that kernel does not run).
struct Inputs<'a> {
    x: &'a [f32],
    xq: Option<&'a ActivationsI16>,
    xb: Option<&'a [u32]>,
}

/// Most tokens a bf16 bitmap product runs as one GEMV-like pass over the weights for all of
/// them ([`BitmapMatrix::gemm_few_bf16`]); above, AMX where present ([`lanes_amx`]'s bitmap
/// tiles), else the expanded rows' tiles and from [`lanes::MIN_TOKENS`] the tokens-in-lanes
/// GEMM. Whole Wanda 50% SmolLM2 decode steps on the Xeon (`bench_forward
/// out/smollm2-wanda-50-bf16 --batch B --kv-cache f16`, twice) against the kernels before (a
/// GEMV per token at 2, the expanded rows' tiles at 3 to 8): 2 sequences 15.5-15.7 -> 12.3-12.7
/// ms, 3: 17.1-17.3 -> 12.5 (AMX from 3: 16.0-17.0), 4: 15.9-16.6 -> 13.6-14.2 (AMX:
/// 17.2-17.3); 6 and 8 on AMX: 19.1-19.5 -> 17.5-18.8 and 23.1-23.2 -> 19.0-20.0 (this pass at
/// 6 and 8: 18.8-19.8, 23.6-23.9).
///
/// [`lanes_amx`]: crate::lanes_amx
pub(crate) const FEW_TOKENS_MAX: usize = 4;

/// Fewest tokens an int8 bitmap's batched step takes the AMX tiles for (each pair of steps'
/// bytes expanded and widened to bf16 in L1, `lanes_amx::bitmap_gemm`); fewer run the
/// small-batch kernels, which multiply fewer tokens per expanded weight. `batch_bench
/// 4,5,6,7,8,9,16 i8` on a 2-core Xeon, SmolLM2's block linears, twice: 16 tokens 15.1-15.8
/// against 25.4-26.1 ms before, 8 tokens 15.7-16.0 against 17.1-17.5, 7 tokens 15.7-16.2
/// against 16.6-17.0, level or behind at 5-6.
pub(crate) const MIN_TOKENS_I8_TILES: usize = 7;

/// Whether the bf16 GEMV runs the expand-and-`vdpbf16ps` kernel: AVX-512 in use with VBMI2
/// and AVX512-BF16 (Zen 4, Sapphire Rapids and later).
pub(crate) fn bf16_expand_dp(isa: Isa) -> bool {
    vbmi2_expand() && crate::gemm_bf16::available(isa)
}

/// Whether the i8 GEMV runs the expand-and-`vpdpwssd` kernel on this CPU (AVX-512 with VBMI2
/// and VNNI: Ice Lake, Zen 4 and later).
pub(crate) fn i8_expand_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        vbmi2_expand() && crate::dense::has_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the bf16 and i8 GEMVs run the VBMI2 expand kernels on this CPU (AVX-512 with
/// VBMI2: Ice Lake, Zen 4 and later), which cut their compute per weight to about dense's;
/// the planner weighs the bitmap by this.
pub(crate) fn vbmi2_expand() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.is_available() && x86::has_vbmi2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl BitmapMatrix {
    /// For a batched product (3 tokens or more): the matrix expanded to dense rows, pruned
    /// weights as zeros, in its own dtype (f32, bf16, or i8 with the same row scales), so dense's
    /// batched kernels run it (tokens in lanes with `vdpbf16ps`, the small-batch dot, the
    /// prefill tiles), when that is the faster road: the VBMI2 expand available (it writes 16
    /// f32, 32 bf16 or 64 i8 weights per instruction) and at least 1/8 of the weights kept. Those
    /// kernels multiply the zeros too, but each product costs a fraction of [`rowgemm`]'s
    /// per-weight AXPY: through `rowgemm` the 50% bf16 bitmap took 6-7x dense bf16's time for
    /// 4-32 tokens (`batch_bench 1,2,4,8,16,32 bf16`, 30 SmolLM2 blocks). The expansion reads
    /// the packed weights once per call and writes the dense copy, which the product then
    /// reads from cache or memory. Every other batched route expands rows just before it
    /// multiplies them; only int8 prefill without AMX still comes here.
    fn expanded_for_batch(&self, exec: Exec) -> Option<DenseMatrix> {
        if !self.expands_for_batch(exec) {
            return None;
        }
        let values = match &self.values {
            Values::Bf16(v) => Values::Bf16(self.expand_rows(v, exec)),
            Values::I8 { q, scales } => Values::I8 {
                q: self.expand_rows(q, exec),
                scales: scales.clone(),
            },
            Values::F32(v) => Values::F32(self.expand_rows(v, exec)),
        };
        Some(DenseMatrix {
            rows: self.rows,
            cols: self.cols,
            values,
        })
    }

    /// The values for a decode step of `tokens` tokens on the AMX tiles (each step's 32
    /// columns expanded into their L1 buffer, `lanes_amx::bitmap_gemm`), when it runs there:
    /// bf16 from [`FEW_TOKENS_MAX`]` + 1` tokens, int8 (widened as it is expanded) from
    /// [`MIN_TOKENS_I8_TILES`], up to 16, where the CPU has AMX, VBMI2 and AVX512-BF16.
    fn tile_values(&self, tokens: usize, exec: Exec) -> Option<crate::lanes_amx::Packed<'_>> {
        use crate::lanes_amx::{Packed, takes, takes_i8};
        if !(self.expands_for_batch(exec) && lanes::available_bf16(exec.isa, self.cols)) {
            return None;
        }
        match &self.values {
            Values::Bf16(vals) if tokens > FEW_TOKENS_MAX && takes(self.cols, tokens) => {
                Element::bf16_bits(vals.as_slice()).map(Packed::Bf16)
            }
            Values::I8 { q, scales }
                if tokens >= MIN_TOKENS_I8_TILES && takes_i8(self.cols, tokens) =>
            {
                Some(Packed::I8 { q, scales })
            }
            _ => None,
        }
    }

    /// The matrix as the AMX decode tiles read it (`vals`: its values).
    fn amx_rows<'a>(
        &'a self,
        vals: crate::lanes_amx::Packed<'a>,
    ) -> crate::lanes_amx::BitmapRows<'a> {
        crate::lanes_amx::BitmapRows {
            rows: self.rows,
            cols: self.cols,
            stride: self.stride,
            masks: &self.masks,
            row_ptr: &self.row_ptr,
            vals,
        }
    }

    /// Whether a batched product runs dense's kernels on rows expanded block by block as they
    /// are multiplied, instead of [`Self::expanded_for_batch`]'s dense copy of the whole
    /// matrix per call (its allocation, zeroing and `rows x cols` writes, which the product
    /// then reads back): where that would expand (VBMI2, at least 1/8 kept). bf16 from 9
    /// tokens goes 12 rows at a time into the tokens-in-lanes GEMM
    /// ([`lanes::Weights::Bf16Rows`]; where the CPU has AMX, 32 columns of 64 rows at a time
    /// into the tiles' L1 buffer, `lanes_amx::bitmap_gemm`); up to 16 tokens otherwise (i8
    /// too, and f32 below 9 tokens: from 9 it walks the kept weights, `lanes_kept`) 8 rows at a
    /// time into the small-batch register tiles (`dense::small_batch_written`).
    fn expands_for_batch(&self, exec: Exec) -> bool {
        vbmi2_expand()
            && exec.isa.effective() == Isa::Avx512
            && self.nnz() * 8 >= self.rows * self.cols
    }

    /// Every row written densely (`[rows, cols]`, zeros where pruned), row blocks of ~32 Ki
    /// weights spread over the pool.
    fn expand_rows<T: Element>(&self, vals: &[T], exec: Exec) -> Vec<T> {
        let weights = self.rows * self.cols;
        let mut out = vec![T::default(); weights];
        // No columns: nothing to write (the product is all zeros).
        if let Some(block_rows) = (32 * 1024usize).checked_div(self.cols) {
            let block_rows = block_rows.max(1);
            let fill = |first: usize, block: &mut [T]| {
                for (i, row) in block.chunks_exact_mut(self.cols).enumerate() {
                    self.expand_row(first + i, vals, row);
                }
            };
            if exec.parallel && weights >= 64 * 1024 {
                crate::team::for_each_chunk_mut(&mut out, block_rows * self.cols, |b, block| {
                    fill(b * block_rows, block)
                });
            } else {
                fill(0, &mut out);
            }
        }
        out
    }

    /// Whether a product multiplies the expanded rows on the tokens-in-lanes GEMM, each tile
    /// of rows written just before into a buffer every token panel reads: bf16 from
    /// [`lanes::MIN_TOKENS`] tokens, f32 past [`SMALL_BATCH`] (prefill). Below those, and in
    /// i8 up to [`SMALL_BATCH`], the small-batch tiles over 8 expanded rows at a time measured
    /// faster: f32 at 9 and 16 tokens 24-32 ms there against 34-36 here (`batch_bench 9,16
    /// f32`, SmolLM2's block linears, 2-core Xeon); at 64 and 128 tokens this ran 78 and 130
    /// ms where the dense copy per call took 111 and 164 (dense f32: 73 and 127-134).
    fn rows_on_lanes(&self, tokens: usize, exec: Exec) -> bool {
        self.rows_on_lanes_with(tokens, exec, crate::amx::enabled())
    }

    /// [`Self::rows_on_lanes`] where AMX is (`amx`) or is not available: int8 prefill takes
    /// the lanes GEMM (as bf16 rows with row scales, AVX512-BF16) only where AMX does not
    /// take it panel by panel.
    pub(crate) fn rows_on_lanes_with(&self, tokens: usize, exec: Exec, amx: bool) -> bool {
        let dtype = self.values.dtype();
        match dtype {
            Dtype::Bf16 => {
                tokens >= lanes::MIN_TOKENS && takes_lanes(dtype, self.cols, tokens, exec)
            }
            Dtype::F32 => tokens > SMALL_BATCH && takes_lanes(dtype, self.cols, tokens, exec),
            Dtype::I8 => tokens > SMALL_BATCH && !amx && lanes::available_bf16(exec.isa, self.cols),
        }
    }

    /// Writes row `r` expanded for the tokens-in-lanes GEMM's tiles, and requests the same
    /// row of the next tile into L2 while this tile is multiplied (as the dense tiles request
    /// theirs).
    fn tile_row_writer<'a, T: Element>(
        &'a self,
        vals: &'a [T],
    ) -> impl Fn(usize, &mut [T]) + Sync + 'a {
        move |r, row| {
            self.prefetch_row_l2(r + lanes::ROWS, vals);
            self.expand_row(r, vals, row)
        }
    }

    /// int8 prefill where AMX does not take it (Zen 4, Ice Lake): `dense::i8_rows_gemm` on
    /// each tile's rows expanded from the mask just before, instead of a dense int8 copy of
    /// the matrix per call. The caller has checked [`Self::rows_on_lanes_with`].
    pub(crate) fn i8_rows_gemm(
        &self,
        q: &[i8],
        scales: &[f32],
        x: &[f32],
        tokens: usize,
        y: Out<'_>,
        exec: Exec,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        crate::dense::i8_rows_gemm(rows, cols, scales, x, tokens, y, exec, |r, bytes| {
            self.prefetch_row_l2(r + lanes::ROWS, q);
            self.expand_row(r, q, bytes);
        });
    }

    /// Requests row `r`'s packed values and mask into L2 (nothing past the last row): a
    /// batched step that expands a tile of rows asks for the next tile's this way, so its
    /// expansion reads L2, not memory.
    fn prefetch_row_l2<T: Element>(&self, r: usize, vals: &[T]) {
        #[cfg(target_arch = "x86_64")]
        if r < self.rows {
            use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            let (start, end) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            let bytes = vals[start..end].as_ptr().cast::<i8>();
            let mask = self.masks[r * self.stride..].as_ptr().cast::<i8>();
            let len = (end - start) * size_of::<T>();
            // SAFETY: prefetches only form addresses (wrapping) and never fault; SSE is
            // baseline on x86-64.
            unsafe {
                for line in (0..len + 64).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(bytes.wrapping_add(line));
                }
                for line in (0..self.stride).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(mask.wrapping_add(line));
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (r, vals);
    }

    /// Row `r` written densely into `out`, every one of its `cols` values (zeros where pruned,
    /// so `out` need not be zeroed first): whole mask words by one expand (f32 16 columns, bf16
    /// 32, i8 64) where the CPU has VBMI2, bit by bit elsewhere and in the ragged tail.
    fn expand_row<T: Element>(&self, r: usize, vals: &[T], out: &mut [T]) {
        let mrow = &self.masks[r * self.stride..][..self.stride];
        let mut vi = self.row_ptr[r] as usize;
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if vbmi2_expand() {
            // SAFETY: VBMI2 and AVX-512 present (checked); T is f32 (4 bytes), bf16 (2) or i8
            // (1), all plain bits in memory; `mrow` is row r's mask, `vi` its
            // first value; `out` holds the row's `cols` values.
            (done, vi) = unsafe {
                x86::expand_row_words(
                    size_of::<T>(),
                    mrow,
                    vals.as_ptr().cast(),
                    vi,
                    out.as_mut_ptr().cast(),
                    out.len(),
                )
            };
        }
        // The columns the word expansion did not write: zero, then their kept values.
        out[done..].fill(T::default());
        for (b, &m) in mrow.iter().enumerate().skip(done / 8) {
            let mut m = m;
            while m != 0 {
                let c = 8 * b + m.trailing_zeros() as usize;
                out[c] = vals[vi];
                vi += 1;
                m &= m - 1;
            }
        }
    }
}

impl RowDecode for BitmapMatrix {
    fn decode_row(&self, r: usize, idx: &mut Vec<u32>, val: &mut Vec<f32>) {
        idx.clear();
        val.clear();
        let mut vi = self.row_ptr[r] as usize;
        for (b, &m) in self.masks[r * self.stride..][..self.stride]
            .iter()
            .enumerate()
        {
            let mut m = m;
            while m != 0 {
                idx.push((b * 8) as u32 + m.trailing_zeros());
                val.push(self.values.get(vi, r));
                vi += 1;
                m &= m - 1;
            }
        }
    }
}

/// For mask byte `m`: lane `j` (bit `j` set) takes packed value number `popcount(m & (2^j - 1))`.
const fn perm_table() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut j = 0;
        let mut k = 0;
        while j < 8 {
            if m & (1 << j) != 0 {
                t[m][j] = k;
                k += 1;
            }
            j += 1;
        }
        m += 1;
    }
    t
}

/// For mask byte `m`: all-ones in the lanes whose bit is set (zeroes the other lanes).
const fn lane_table() -> [[u32; 8]; 256] {
    let mut t = [[0u32; 8]; 256];
    let mut m = 0;
    while m < 256 {
        let mut j = 0;
        while j < 8 {
            if m & (1 << j) != 0 {
                t[m][j] = u32::MAX;
            }
            j += 1;
        }
        m += 1;
    }
    t
}

/// For mask byte `m`: the `vpshufb` control that turns 8 packed bf16 values (16 bytes, the same
/// in both 128-bit halves) into 8 f32 lanes. Lane `j` (bit `j` set) takes packed value
/// `k = popcount(m & (2^j - 1))`: bytes `2k, 2k+1` go to the lane's bytes 2 and 3 (the high
/// half of an f32, where a bf16's bits belong); every other byte gets `0x80`, which `vpshufb`
/// turns into zero, so empty lanes and the low halves need no separate masking.
const fn bf16_shuffle_table() -> [[u8; 32]; 256] {
    let mut t = [[0x80u8; 32]; 256];
    let mut m = 0;
    while m < 256 {
        let mut j = 0;
        let mut k = 0;
        while j < 8 {
            if m & (1 << j) != 0 {
                t[m][4 * j + 2] = (2 * k) as u8;
                t[m][4 * j + 3] = (2 * k + 1) as u8;
                k += 1;
            }
            j += 1;
        }
        m += 1;
    }
    t
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static PERM: [[u32; 8]; 256] = perm_table();
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static LANES: [[u32; 8]; 256] = lane_table();
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
static SHUF_BF16: [[u8; 32]; 256] = bf16_shuffle_table();

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::{BitmapMatrix, LANES, PERM, SHUF_BF16};
    use crate::element::{Dtype, Element};
    use crate::par::SharedOut;
    use crate::quant::{ActivationsI16, I16_CHUNK};
    use crate::simd::x86::{dot64_i8_i16, hsum, sum_i32_lanes};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// How far ahead (bytes) the GEMVs prefetch their value stream (the AVX2 one its mask
    /// stream too, once per step of 64 weights; the VBMI2 ones once per mask word; the
    /// AVX-512 f32 one, with its masks, once per two words). The
    /// hardware prefetcher alone left the bitmap well below dense's bandwidth when streaming:
    /// measured on the 2-core EPYC (30 layers per shape, caches flushed, one thread, same run),
    /// prefetching made the 50% bf16 GEMV 10-35% faster; 1 KiB and 2 KiB ahead were alike.
    /// On a 2-core Intel Xeon (`bench_forward`, Wanda 50% decode, alternating three times),
    /// 4 KiB ahead instead of 2, with the mask stream requested too in the AVX512-BF16 and
    /// VNNI GEMVs: bf16 8.2-8.3 -> 7.1-7.3 ms per token (4 KiB alone 7.2-7.6; 8 KiB and masks
    /// 1 KiB ahead 7.4), int8 4.1-4.2 -> 3.8-3.9 (4 KiB alone) -> 3.73-3.78 (masks too).
    const PF_VALUES: usize = 4096;
    const PF_MASKS: usize = 512;

    /// AVX-512 GEMV: 16 weights per mask word; the packed values are loaded 16 at a time and
    /// expanded into the lanes whose bit is set (zeros elsewhere), so the loop does no table
    /// look-ups and its only serial dependency is the value offset (`+= popcount`). Values and
    /// masks are requested [`PF_VALUES`] and [`PF_MASKS`] bytes ahead, as in the other GEMVs:
    /// without it the f32 bitmap streamed at half dense f32's bandwidth on the 2-core Xeon and
    /// a 50% model decoded no faster than dense (`batch_bench 1 f32`, three alternations:
    /// 1.00-1.05x dense before, 1.44-1.75x after; one 512-bit load instead of two joined
    /// 256-bit ones for f32 measured alike, 1.49-1.63x).
    ///
    /// # Safety
    /// AVX-512F+AVX2+FMA+POPCNT; arrays consistent (see `BitmapMatrix`), `vals` has PAD (16)
    /// trailing elements, `x.len() == cols`, `y.len() == rows.len()`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma,popcnt")]
    pub(super) unsafe fn gemv_rows_512<T: Element>(
        masks: &[u8],
        stride: usize,
        row_ptr: &[u32],
        vals: &[T],
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let words = cols / 16;
        let xp = x.as_ptr();
        let vp = vals.as_ptr();
        for (yi, r) in y.iter_mut().zip(rows) {
            let mrow = &masks[r * stride..][..stride];
            let mut vi = row_ptr[r] as usize;
            let mut a0 = _mm512_setzero_ps();
            let mut a1 = _mm512_setzero_ps();
            let mut k = 0;
            let mp = mrow.as_ptr();
            // SAFETY: vi stays within the row's values (it advances by the popcounts of the
            // row's mask bits) and PAD spare values cover each 16-wide load; mask reads stay
            // below 2 * words <= stride; x reads < cols; prefetches never fault.
            unsafe {
                while k + 2 <= words {
                    _mm_prefetch::<_MM_HINT_T0>(vp.add(vi).cast::<i8>().wrapping_add(PF_VALUES));
                    _mm_prefetch::<_MM_HINT_T0>(mp.add(2 * k).cast::<i8>().wrapping_add(PF_MASKS));
                    let m01 = mp.add(2 * k).cast::<u32>().read_unaligned();
                    let (m0, m1) = (m01 as u16, (m01 >> 16) as u16);
                    let v0 = _mm512_maskz_expand_ps(m0, load16(vp.add(vi)));
                    vi += m0.count_ones() as usize;
                    let v1 = _mm512_maskz_expand_ps(m1, load16(vp.add(vi)));
                    vi += m1.count_ones() as usize;
                    a0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xp.add(16 * k)), a0);
                    a1 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xp.add(16 * k + 16)), a1);
                    k += 2;
                }
                if k < words {
                    let m0 = u16::from_le_bytes([mrow[2 * k], mrow[2 * k + 1]]);
                    let v0 = _mm512_maskz_expand_ps(m0, load16(vp.add(vi)));
                    vi += m0.count_ones() as usize;
                    a0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xp.add(16 * k)), a0);
                }
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                // Tail: the last `cols % 16` columns, bit by bit.
                for (b, &m) in mrow.iter().enumerate().skip(2 * words) {
                    let mut m = m;
                    while m != 0 {
                        let j = m.trailing_zeros() as usize;
                        s += (*vp.add(vi)).to_f32() * *xp.add(8 * b + j);
                        vi += 1;
                        m &= m - 1;
                    }
                }
                *yi = s;
            }
        }
    }

    /// Whether this CPU has the byte/word expand of AVX512-VBMI2 (Ice Lake, Zen 4 and later)
    /// that [`gemv_rows_bf16_vbmi2`] needs.
    pub(super) fn has_vbmi2() -> bool {
        std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vbmi2")
    }

    /// The ragged tail of a bf16 row, bit by bit: `masks` are the row's mask bytes after its
    /// whole 32-column words, whose first column is `first`; `vals` starts at the tail's first
    /// kept value.
    fn bf16_tail(masks: &[u8], first: usize, vals: &[u16], x: &[f32]) -> f32 {
        let mut s = 0.0;
        let mut kept = vals.iter();
        for (b, &m) in masks.iter().enumerate() {
            let mut m = m;
            while m != 0 {
                let c = first + 8 * b + m.trailing_zeros() as usize;
                let w = kept.next().map_or(0.0, |&v| crate::element::widen_bf16(v));
                s += w * x[c];
                m &= m - 1;
            }
        }
        s
    }

    /// AVX-512 GEMV for bf16 values with VBMI2: 32 weights per mask word. One masked load
    /// takes the word's packed values (at most 32, never past the row's last value, so no
    /// padding is read), one word expand (`vpexpandw`) spreads them to the lanes of their
    /// columns with zeros between, and from there it is dense bf16's step (`dense.rs`): a
    /// shift widens the even columns, a mask the odd ones, each meets its half of `x`
    /// regrouped by [`split_even_odd`](crate::simd::split_even_odd), two f32 FMAs. So per
    /// weight it issues what dense bf16 issues plus one expand per 32, while reading 1.125
    /// bytes per weight at 50% instead of 2; [`gemv_rows_512`]'s f32 expand of 16 at a time
    /// issued twice the instructions and lost to dense bf16 at 50%.
    ///
    /// Measured on the 2-core Zen 4 (`kernel_bench 0.5 bf16`, alternating builds): per SmolLM2
    /// block 1.33-1.43x dense bf16 as written; without the prefetch 0.91-1.24x; `vpexpandw`
    /// straight from memory (no masked load) 0.94-0.99x; two rows interleaved 1.17-1.21x.
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI2+AVX2+FMA+POPCNT; `m`'s arrays consistent (see `BitmapMatrix`),
    /// `vals` its values, `x.len() == m.cols`, `y.len() == rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx2,fma,popcnt")]
    pub(super) unsafe fn gemv_rows_bf16_vbmi2(
        m: &BitmapMatrix,
        vals: &[u16],
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let (masks, stride, row_ptr, cols) = (&m.masks, m.stride, &m.row_ptr, m.cols);
        let words = cols / 32;
        let xd = crate::simd::split_even_odd(x, 32);
        let (xp, vp) = (xd.as_ptr(), vals.as_ptr());
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        for (yi, r) in y.iter_mut().zip(rows) {
            let mrow = &masks[r * stride..][..stride];
            let mp = mrow.as_ptr();
            let mut vi = row_ptr[r] as usize;
            let (mut even_acc, mut odd_acc) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            // SAFETY: each masked load reads exactly its word's popcount of values from vi,
            // which stays within the row's values (vi advances by those popcounts); mask reads
            // stay below 4 * words <= stride; xd holds words * 32 values; prefetches never
            // fault.
            unsafe {
                for k in 0..words {
                    let o = 32 * k;
                    let (xe, xo) = (_mm512_loadu_ps(xp.add(o)), _mm512_loadu_ps(xp.add(o + 16)));
                    _mm_prefetch::<_MM_HINT_T0>(vp.add(vi).cast::<i8>().wrapping_add(PF_VALUES));
                    let m = mp.add(4 * k).cast::<u32>().read_unaligned();
                    let n = m.count_ones();
                    let load = ((1u64 << n) - 1) as u32;
                    let packed = _mm512_maskz_loadu_epi16(load, vp.add(vi).cast());
                    vi += n as usize;
                    let w = _mm512_maskz_expand_epi16(m, packed);
                    let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w));
                    let odd = _mm512_castsi512_ps(_mm512_and_si512(w, high));
                    even_acc = _mm512_fmadd_ps(even, xe, even_acc);
                    odd_acc = _mm512_fmadd_ps(odd, xo, odd_acc);
                }
                let s = _mm512_reduce_add_ps(_mm512_add_ps(even_acc, odd_acc));
                *yi = s + bf16_tail(&mrow[4 * words..], 32 * words, &vals[vi..], x);
            }
        }
    }

    /// [`gemv_rows_bf16_vbmi2`] on AVX512-BF16: the expanded word is 16 pairs of bf16
    /// weights in column order, which one `vdpbf16ps` multiplies with `x` rounded to bf16
    /// pairs once per call (`xb`, as dense bf16's GEMV does), instead of a shift, a mask and
    /// two f32 FMAs. Two words per step, each with its own accumulator, so the two masked
    /// loads and expands of a step overlap (a loop of one word per step with its accumulator
    /// picked by parity was no faster than the widening kernel: that was the earlier attempt);
    /// the values prefetched [`PF_VALUES`] bytes ahead as there.
    ///
    /// Measured on the 2-core Zen 4 in a stand-alone loop (one thread, 30 SmolLM2-shaped
    /// matrices streamed from memory, ns per 32-weight word): 1536x576 3.1-3.4 -> 1.9-2.3,
    /// 576x1536 3.5-4.6 -> 2.0-2.3, against dense bf16's `vdpbf16ps` GEMV at 3.0-3.6.
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI2/BF16+POPCNT; `m`'s arrays consistent (see `BitmapMatrix`), `vals`
    /// its values, `xb.len() >= m.cols / 2`, `x.len() == m.cols`, `y.len() == rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx512bf16,popcnt")]
    pub(super) unsafe fn gemv_rows_bf16_vbmi2_dp(
        m: &BitmapMatrix,
        vals: &[u16],
        rows: Range<usize>,
        xb: &[u32],
        x: &[f32],
        y: &mut [f32],
    ) {
        let (first, pairs) = (rows.start, m.cols.div_ceil(2));
        // SAFETY: the contract above is `rows_bf16_vbmi2_dp`'s for one token.
        unsafe { rows_bf16_vbmi2_dp(m, vals, rows, 1, pairs, xb, x, |_, r, s| y[r - first] = s) }
    }

    /// The loop of [`gemv_rows_bf16_vbmi2_dp`] for `tokens` tokens at once (`xb`, `x`:
    /// `tokens` rows of `pairs` and `cols`): each word's values are loaded and expanded once
    /// per group of up to four tokens, and the row stays in L1 across groups, so the weights
    /// are read from memory once for the step, as in one token's GEMV, instead of once per
    /// token. Each token's sums run exactly as they run alone (two accumulators by word
    /// parity, then the tail). `store(t, r, sum)` receives row `r` of token `t`. The GEMV is
    /// its one-token case.
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI2/BF16+POPCNT (this inlines into functions that enable them); `m`'s
    /// arrays consistent (see `BitmapMatrix`), `vals` its values; `xb.len() >= tokens *
    /// pairs`, `pairs >= m.cols / 2`, `x.len() == tokens * m.cols`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn rows_bf16_vbmi2_dp(
        m: &BitmapMatrix,
        vals: &[u16],
        rows: Range<usize>,
        tokens: usize,
        pairs: usize,
        xb: &[u32],
        x: &[f32],
        mut store: impl FnMut(usize, usize, f32),
    ) {
        let (masks, stride, row_ptr, cols) = (&m.masks, m.stride, &m.row_ptr, m.cols);
        let words = cols / 32;
        assert!(xb.len() >= tokens * pairs && 16 * words <= pairs && x.len() == tokens * cols);
        for r in rows {
            let mrow = &masks[r * stride..][..stride];
            let v0 = row_ptr[r] as usize;
            let mut t0 = 0;
            while t0 < tokens {
                let n = (tokens - t0).min(4);
                let xg = &xb[t0 * pairs..];
                let mut dots = [0f32; 4];
                // SAFETY: the function's contract; `xg` holds `n` tokens of `pairs` pairs.
                let vi = unsafe {
                    match n {
                        4 => row_dots_bf16::<4>(mrow, vals, v0, words, xg, pairs, &mut dots),
                        3 => row_dots_bf16::<3>(mrow, vals, v0, words, xg, pairs, &mut dots),
                        2 => row_dots_bf16::<2>(mrow, vals, v0, words, xg, pairs, &mut dots),
                        _ => row_dots_bf16::<1>(mrow, vals, v0, words, xg, pairs, &mut dots),
                    }
                };
                for (j, d) in dots.iter().enumerate().take(n) {
                    let t = t0 + j;
                    let xt = &x[t * cols..][..cols];
                    store(
                        t,
                        r,
                        d + bf16_tail(&mrow[4 * words..], 32 * words, &vals[vi..], xt),
                    );
                }
                t0 += n;
            }
        }
    }

    /// [`rows_bf16_vbmi2_dp`] with row `r` of token `t` into `out[t * out_rows + r]`.
    ///
    /// # Safety
    /// As [`rows_bf16_vbmi2_dp`]; `out` holds `tokens * out_rows` values, `rows.end <=
    /// out_rows`, and no other task writes these rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx512bf16,popcnt")]
    pub(super) unsafe fn gemm_rows_bf16_vbmi2_dp(
        m: &BitmapMatrix,
        vals: &[u16],
        rows: Range<usize>,
        tokens: usize,
        pairs: usize,
        xb: &[u32],
        x: &[f32],
        out: SharedOut,
        out_rows: usize,
    ) {
        assert!(rows.end <= out_rows && out.len() >= tokens * out_rows);
        // SAFETY: the contract above; each write is this task's row (contract).
        unsafe {
            rows_bf16_vbmi2_dp(m, vals, rows, tokens, pairs, xb, x, |t, r, s| {
                out.write(t * out_rows + r, s)
            })
        }
    }

    /// One bitmap row's whole words dotted with `N` tokens' bf16 pairs (token `j`'s at
    /// `xb[j * pairs..]`), each token's sum before its tail, into `dots[..N]`; returns the
    /// offset of the row's first value after its whole words (where its tail starts).
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI2/BF16 (inlined into [`rows_bf16_vbmi2_dp`]); `mrow` one row's
    /// masks with at least `4 * words` bytes, that row's values starting at `vals[v0]`;
    /// `xb` holds `N * pairs` pairs, `pairs >= 16 * words`.
    #[inline(always)]
    unsafe fn row_dots_bf16<const N: usize>(
        mrow: &[u8],
        vals: &[u16],
        v0: usize,
        words: usize,
        xb: &[u32],
        pairs: usize,
        dots: &mut [f32; 4],
    ) -> usize {
        let (mp, vp, xp) = (mrow.as_ptr(), vals.as_ptr(), xb.as_ptr());
        let mut vi = v0;
        // SAFETY: AVX-512F (contract).
        let mut acc = [[unsafe { _mm512_setzero_ps() }; 2]; N];
        // SAFETY: each masked load reads exactly its word's popcount of the row's values; mask
        // reads below 4 * words; pair reads of token j below j * pairs + 16 * words <= N *
        // pairs; prefetches never fault.
        unsafe {
            let expand = |vi: &mut usize, k: usize| -> __m512bh {
                let mask = mp.add(4 * k).cast::<u32>().read_unaligned();
                let n = mask.count_ones();
                let packed = _mm512_maskz_loadu_epi16(((1u64 << n) - 1) as u32, vp.add(*vi).cast());
                *vi += n as usize;
                std::mem::transmute(_mm512_maskz_expand_epi16(mask, packed))
            };
            let pair = |j: usize, k: usize| -> __m512bh {
                std::mem::transmute(_mm512_loadu_si512(xp.add(j * pairs + 16 * k).cast()))
            };
            let mut k = 0;
            while k + 2 <= words {
                _mm_prefetch::<_MM_HINT_T0>(vp.add(vi).cast::<i8>().wrapping_add(PF_VALUES));
                _mm_prefetch::<_MM_HINT_T0>(mp.add(4 * k).cast::<i8>().wrapping_add(PF_MASKS));
                let (w0, w1) = (expand(&mut vi, k), expand(&mut vi, k + 1));
                for (j, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_dpbf16_ps(a[0], w0, pair(j, k));
                    a[1] = _mm512_dpbf16_ps(a[1], w1, pair(j, k + 1));
                }
                k += 2;
            }
            if k < words {
                let w0 = expand(&mut vi, k);
                for (j, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm512_dpbf16_ps(a[0], w0, pair(j, k));
                }
            }
            for (d, a) in dots.iter_mut().zip(&acc) {
                *d = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
        vi
    }

    /// [`gemv_rows_bf16_vbmi2`] for i8 values against i16 activations (per-row scales applied
    /// by the caller): 64 weights per mask word, one masked load of the word's packed bytes and
    /// one `vpexpandb`, then dense i8's integer step (`dense.rs`): two sign extensions to i16
    /// and two `vpdpwssd`, summed in i32 and flushed to f32 every [`I16_CHUNK`] columns. Reads
    /// 0.625 bytes per weight at 50% against dense i8's 1. Widening each expanded weight to
    /// f32 for an FMA instead (4 converts and FMAs per 16) bounded it by its instructions at
    /// 0.93-1.02x dense i8 per SmolLM2 block.
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI2/VNNI+POPCNT; `m`'s arrays consistent (see `BitmapMatrix`), `vals` its
    /// values, `xq.q.len() == m.cols`, `y.len() == rows.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx512vnni,avx2,popcnt")]
    pub(super) unsafe fn gemv_rows_i8_vnni(
        m: &BitmapMatrix,
        vals: &[i8],
        rows: Range<usize>,
        xq: &ActivationsI16,
        y: &mut [f32],
    ) {
        let (masks, stride, row_ptr, cols) = (&m.masks, m.stride, &m.row_ptr, m.cols);
        let words = cols / 64;
        let chunk_words = I16_CHUNK / 64;
        let (xp, vp) = (xq.q.as_ptr(), vals.as_ptr());
        for (yi, r) in y.iter_mut().zip(rows) {
            let mrow = &masks[r * stride..][..stride];
            let mp = mrow.as_ptr();
            let mut vi = row_ptr[r] as usize;
            let mut total = 0.0f32;
            // SAFETY: each masked load reads exactly its word's popcount of values from vi,
            // which stays within the row's values; mask reads stay below 8 * words <= stride;
            // xq reads stay below 64 * words <= cols; prefetches never fault.
            unsafe {
                let mut k = 0;
                while k < words {
                    let end = (k + chunk_words).min(words);
                    let mut acc = [_mm512_setzero_si512(); 2];
                    while k < end {
                        _mm_prefetch::<_MM_HINT_T0>(
                            vp.add(vi).cast::<i8>().wrapping_add(PF_VALUES),
                        );
                        _mm_prefetch::<_MM_HINT_T0>(
                            mp.add(8 * k).cast::<i8>().wrapping_add(PF_MASKS),
                        );
                        let m = mp.add(8 * k).cast::<u64>().read_unaligned();
                        let n = m.count_ones();
                        let load = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                        let packed = _mm512_maskz_loadu_epi8(load, vp.add(vi));
                        vi += n as usize;
                        let w = _mm512_maskz_expand_epi8(m, packed);
                        dot64_i8_i16(&mut acc, w, xp.add(64 * k));
                        k += 1;
                    }
                    total += sum_i32_lanes(acc);
                }
                // Tail: the last `cols % 64` columns, bit by bit.
                let mut tail = 0i64;
                for (b, &m) in mrow.iter().enumerate().skip(8 * words) {
                    let mut m = m;
                    while m != 0 {
                        let c = 8 * b + m.trailing_zeros() as usize;
                        tail += i64::from(*vp.add(vi)) * i64::from(*xp.add(c));
                        vi += 1;
                        m &= m - 1;
                    }
                }
                *yi = (total + tail as f32) * xq.scale;
            }
        }
    }

    /// The whole mask words of one bitmap row written densely to `out` (zeros left where
    /// pruned), for values of `size` bytes (a branch per word, always the same way): f32 (4)
    /// takes 16 columns per word, bf16 (2) 32, i8 (1) 64; per word a masked load of its packed values, one `vpexpandd` / `vpexpandw`
    /// / `vpexpandb` and one 64-byte store. Returns the columns done and the value offset
    /// after them.
    ///
    /// # Safety
    /// AVX-512F/BW/VBMI2; `size` is 1, 2 or 4; `mrow` is one row's mask bytes, `vals` the
    /// packed values with that row's first at `vi`; `out` writable for `cols <= 8 * mrow.len()`
    /// values of `size` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,popcnt")]
    pub(crate) unsafe fn expand_row_words(
        size: usize,
        mrow: &[u8],
        vals: *const u8,
        mut vi: usize,
        out: *mut u8,
        cols: usize,
    ) -> (usize, usize) {
        let per_word = 64 / size;
        let words = cols / per_word;
        let mp = mrow.as_ptr();
        // SAFETY: mask reads stay below words * per_word / 8 <= mrow.len(); each masked load
        // reads exactly the word's popcount of values, all within the row's; stores stay below
        // words * 64 bytes <= cols * size; prefetch addresses are only formed (wrapping) and
        // prefetches never fault.
        unsafe {
            for k in 0..words {
                // The packed values streamed ahead, as the GEMVs do (without it this loop
                // waited on memory: 23% of a 16-sequence Wanda step in `perf`).
                _mm_prefetch::<_MM_HINT_T0>(vals.add(size * vi).wrapping_add(PF_VALUES).cast());
                let (m, n) = if size == 4 {
                    let m = mp.add(2 * k).cast::<u16>().read_unaligned();
                    (u64::from(m), m.count_ones())
                } else if size == 2 {
                    let m = mp.add(4 * k).cast::<u32>().read_unaligned();
                    (u64::from(m), m.count_ones())
                } else {
                    let m = mp.add(8 * k).cast::<u64>().read_unaligned();
                    (m, m.count_ones())
                };
                let load = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                let dense = if size == 4 {
                    let packed = _mm512_maskz_loadu_epi32(load as u16, vals.add(4 * vi).cast());
                    _mm512_maskz_expand_epi32(m as u16, packed)
                } else if size == 2 {
                    let packed = _mm512_maskz_loadu_epi16(load as u32, vals.add(2 * vi).cast());
                    _mm512_maskz_expand_epi16(m as u32, packed)
                } else {
                    let packed = _mm512_maskz_loadu_epi8(load, vals.add(vi).cast());
                    _mm512_maskz_expand_epi8(m, packed)
                };
                vi += n as usize;
                _mm512_storeu_si512(out.add(64 * k).cast::<__m512i>(), dense);
            }
        }
        (words * per_word, vi)
    }

    /// Loads 16 consecutive values widened to f32.
    ///
    /// # Safety
    /// AVX-512F; 16 values readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn load16<T: Element>(p: *const T) -> __m512 {
        // SAFETY: caller's contract; two 8-wide loads joined into one 512-bit vector.
        unsafe {
            let lo = _mm512_castps256_ps512(T::load8(p));
            let hi = _mm256_castps_pd(T::load8(p.add(8)));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(lo), hi))
        }
    }

    /// The 8 weights of mask byte `m` as an f32 vector (zeros in the lanes whose bit is clear),
    /// from the packed values at `vp`.
    ///
    /// bf16: one 16-byte broadcast load of the next 8 packed values and one byte shuffle
    /// (`vpshufb`, its control looked up from `m`) that moves packed value `k` into the high
    /// half of its lane and zeroes everything else: a bf16 is the top half of an f32, so this
    /// expands and widens at once. f32 and i8: widen 8 packed values, permute them into their
    /// lanes (`vpermps`) and zero the empty lanes.
    ///
    /// # Safety
    /// AVX2+FMA+POPCNT; 8 values readable at `vp`.
    #[inline]
    #[target_feature(enable = "avx2,fma,popcnt")]
    unsafe fn expand<T: Element>(m: usize, vp: *const T) -> __m256 {
        // SAFETY: table rows are 32 bytes and m < 256; 8 values (16 bytes for bf16) readable
        // at `vp` by the caller's contract. The bf16 branch only runs for T = bf16, whose
        // values are 2-byte `repr(transparent)` u16s, so reading them as bytes is valid.
        unsafe {
            if T::DTYPE == Dtype::Bf16 {
                let src = _mm256_broadcastsi128_si256(_mm_loadu_si128(vp.cast::<__m128i>()));
                let ctl = _mm256_loadu_si256(SHUF_BF16[m].as_ptr().cast());
                _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl))
            } else {
                let perm = _mm256_loadu_si256(PERM[m].as_ptr().cast());
                let lanes = _mm256_loadu_ps(LANES[m].as_ptr().cast());
                _mm256_and_ps(_mm256_permutevar8x32_ps(T::load8(vp), perm), lanes)
            }
        }
    }

    /// AVX2 GEMV over a row range: 64 weights (8 mask bytes, one u64) per step into 4
    /// accumulators. The eight value offsets of a step come from popcounts of the mask word's
    /// prefixes, so the only serial dependency between steps is one add to the value offset.
    /// (8 bytes per step measured 5-8% faster than 4, cache-hot and streamed: fewer mask
    /// loads and prefetches share the load ports with the 3 loads every 8 weights need.)
    ///
    /// # Safety
    /// AVX2+FMA+POPCNT; the matrix arrays are consistent (see `BitmapMatrix`), `vals` has PAD
    /// trailing elements, `x.len() == cols`, `y.len() == rows.len()`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,popcnt")]
    pub(super) unsafe fn gemv_rows<T: Element>(
        masks: &[u8],
        stride: usize,
        row_ptr: &[u32],
        vals: &[T],
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        y: &mut [f32],
    ) {
        let full = cols / 8;
        let xp = x.as_ptr();
        let vp = vals.as_ptr();
        for (yi, r) in y.iter_mut().zip(rows) {
            let mrow = &masks[r * stride..][..stride];
            let mp = mrow.as_ptr();
            let mut vi = row_ptr[r] as usize;
            let mut a = [_mm256_setzero_ps(); 4];
            let mut b = 0;
            // SAFETY: vi never exceeds the row's end (the popcounts of its bytes), and values
            // carry PAD spare elements, so each 8-wide load is in bounds; mask reads stay
            // below `full <= stride`; x reads stay < cols.
            unsafe {
                while b + 8 <= full {
                    // Prefetches never fault, so running past the arrays' ends is harmless.
                    _mm_prefetch::<_MM_HINT_T0>(vp.add(vi).cast::<i8>().wrapping_add(PF_VALUES));
                    _mm_prefetch::<_MM_HINT_T0>(mp.add(b).cast::<i8>().wrapping_add(PF_MASKS));
                    let w = mp.add(b).cast::<u64>().read_unaligned();
                    let x0 = xp.add(8 * b);
                    // Where byte k's values start: the popcount of the bytes before it.
                    let mut o = [0usize; 8];
                    for (k, ok) in o.iter_mut().enumerate().skip(1) {
                        *ok = (w & ((1u64 << (8 * k)) - 1)).count_ones() as usize;
                    }
                    for (k, &ok) in o.iter().enumerate() {
                        let e = expand(((w >> (8 * k)) & 0xff) as usize, vp.add(vi + ok));
                        a[k % 4] = _mm256_fmadd_ps(e, _mm256_loadu_ps(x0.add(8 * k)), a[k % 4]);
                    }
                    vi += w.count_ones() as usize;
                    b += 8;
                }
                while b < full {
                    let m = usize::from(*mp.add(b));
                    let e = expand(m, vp.add(vi));
                    a[0] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xp.add(8 * b)), a[0]);
                    vi += m.count_ones() as usize;
                    b += 1;
                }
                let mut s = hsum(_mm256_add_ps(
                    _mm256_add_ps(a[0], a[1]),
                    _mm256_add_ps(a[2], a[3]),
                ));
                if full < stride {
                    // Ragged tail: fewer than 8 columns in the last byte.
                    let mut m = mrow[full];
                    while m != 0 {
                        let j = m.trailing_zeros() as usize;
                        s += (*vp.add(vi)).to_f32() * *xp.add(8 * full + j);
                        vi += 1;
                        m &= m - 1;
                    }
                }
                *yi = s;
            }
        }
    }
}
