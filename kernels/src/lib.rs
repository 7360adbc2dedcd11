//! Native compute for pruned weights: sparse formats built from masks and CPU kernels.
//!
//! This crate knows nothing about models or plugins. It takes a dense row-major weight matrix
//! `W [rows = out_features, cols = in_features]` whose pruned entries are exactly `0.0` (or `W`
//! plus a keep-mask, see [`DenseView`]), packs it into a storage format and multiplies:
//!
//! * decode, batch 1 (GEMV): `y = W·x`;
//! * prefill (GEMM): `Y = X·Wᵀ`, `X [tokens, cols]`, `Y [tokens, rows]`, row-major.
//!
//! Formats: [`DenseMatrix`], [`CsrMatrix`] (u16 column indices up to 65536 columns, else u32),
//! [`BitmapMatrix`] (1 bit per weight + packed values), [`BsrMatrix`] (any block shape, fast
//! paths for 16x16 and 4x1) and [`NmMatrix`] (2:4, 4:8, ... with log2(M)-bit positions; refuses
//! matrices that are not N:M). Values are stored as f32, bf16 or int8 with one f32 scale per
//! output row ([`Dtype`]) and always accumulated in f32, so pruning and quantization compose.
//!
//! Row- or column-pruned matrices can also be stored as a smaller dense matrix
//! ([`CompactMatrix`]).
//!
//! Every kernel has a portable version and an AVX2+FMA version chosen at run time ([`Isa`],
//! [`Exec`]); both are tested. Work is split over rayon's *global* pool by output rows, the
//! same pool candle's CPU matmul uses, so running our kernels and candle's between each other
//! never puts more busy threads than cores on the machine (size it with `RAYON_NUM_THREADS`).
//!
//! The engine should only need [`PackedLinear`] (built by [`PackedLinear::plan`], which picks
//! the format expected to be fastest at batch 1 in the storage dtype and falls back to dense;
//! or by [`plan_measured`], which times the candidates on the matrix and keeps the fastest,
//! dense included) and, for `espalier bench kernels`, [`bench::run_kernel_bench`].

mod amx;
mod bitmap;
mod block_train;
mod bsr;
mod compact;
mod csr;
mod dense;
mod element;
mod error;
mod gemm;
mod gemm_bf16;
mod isa;
mod lanes;
mod lanes24;
mod lanes_amx;
mod lanes_kept;
mod nm;
mod par;
mod parts;
mod plan;
mod quant;
mod rowgemm;
mod simd;
pub mod team;
mod train_bf16;
mod view;

pub mod bench;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use amx::{enabled as amx_enabled, set_enabled as set_amx_enabled};

pub use bitmap::BitmapMatrix;
pub use block_train::{BlockPattern, BlockTraining, TRAIN_BLOCK};
pub use bsr::BsrMatrix;
pub use compact::CompactMatrix;
pub use csr::CsrMatrix;
pub use dense::{DenseMatrix, SMALL_BATCH, gemm_f32, gemm_f32_new, gemm_f32_prefill_fast};
pub use element::{Dtype, Element};
pub use error::{KernelError, Result};
pub use isa::{Exec, Isa};
pub use nm::NmMatrix;
pub use parts::{Array, PackedParts};
pub use plan::{
    Candidate, Choice, Format, PackedLinear, PlanTimer, Structure, choose_format, plan,
    plan_measured,
};
pub use train_bf16::{Bf16Training, bf16_training_available};
pub use view::DenseView;

/// Whether this CPU runs decode steps of a few tokens on bf16 weights with each token's own
/// GEMV arithmetic (AVX512-BF16, and VBMI2 for the bitmap): dense bf16 layers up to 3 tokens
/// and bf16 bitmap layers up to 4 give every token exactly what it gets alone.
pub fn few_token_bf16_steps_exact() -> bool {
    let isa = Exec::auto().isa.effective();
    gemm_bf16::available(isa) && bitmap::bf16_expand_dp(isa)
}
