//! A hand-written training pass for LLaMA-family models: the forward pass keeps what the
//! backward pass needs, the backward pass is written out layer by layer, and every weight
//! gradient is accumulated in place by one GEMM into its running sum.
//!
//! [`super::LossGradients`] differentiates through candle's autograd, which builds a graph of
//! tensors per batch, materialises transposes and broadcasts, and sums each weight's gradient
//! in a fresh tensor. Here each of the three products of a linear layer is one call of the
//! `gemm` crate with strides instead of copies:
//!
//! * forward `Y = X·Wᵀ` (`W` read in place, `[out, in]` row-major),
//! * input gradient `dX = dY·W`,
//! * weight gradient `dW += dYᵀ·X`, written straight into the running sum.
//!
//! The small pieces between them are fused by hand: RMSNorm (its backward needs only the
//! input and the saved reciprocal RMS), RoPE (its backward is the inverse rotation), causal
//! softmax attention per head (probabilities kept, backward as `dS = P ⊙ (dP − rowsum(P ⊙
//! dP))`), and SwiGLU. The LM head's gradient is formed chunk by chunk as in
//! [`super::LossGradients`] (never all `T × vocab` logits), with distillation when a teacher is
//! given: the teacher's hidden states come from this pass's own block forward over the whole
//! batch, and both models' logits, the loss parts and the logits' gradient are formed in one
//! fused pass per chunk, rows in parallel. With hidden-state distillation (SquareHead) the
//! teacher's residual stream after each block is a normalised squared-error target for the
//! student's, whose gradient joins the backward pass at that block. Norms, embeddings and the
//! LM head are frozen, as in fine-tuning.
//!
//! The result is the same quantity as [`super::LossGradients`] computes (the gradient of the
//! mean over sequences of each sequence's mean next-token loss) and is checked against
//! PyTorch's on the golden models. GPT-2-style models and layers not held as dense f32 weights
//! are not covered: [`TrainingPass::supports`] tells, and callers fall back to autograd.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, TensorId};
use espalier_kernels::{Bf16Training, BlockPattern, BlockTraining, Isa, bf16_training_available};
use gemm::Parallelism;
use rayon::prelude::*;

use super::grad::{Distillation, distill_head_gradient, head_gradient};
use super::ops::{self, RopeTable};
use super::{Mlp, Norm, QkvProj, Session};
use crate::error::EngineError;
use crate::linear::{Linear, LinearWeight};

/// Tokens per forward/backward batch: as many whole sequences as fit. On SmolLM2-135M 1024
/// tokens keep every weight GEMM large enough to run near the cores' peak, while the saved
/// activations stay near 1.3 GB.
const BATCH_TOKENS: usize = 1024;

/// Elements per parallel work item when [`TrainingPass::mean_into`] scales a gradient sum.
const MEAN_CHUNK: usize = 1 << 15;

/// The seven linears of a LLaMA block, in the order their gradients are stored.
const LINEARS: usize = 7;

/// One block's seven weight names and gradient sums, in [`LINEARS`] order.
type LayerSums = [(String, Vec<f32>); LINEARS];
/// One block's block-sparse products, where its layers have them.
type LayerSparse = [Option<BlockTraining>; LINEARS];
/// One block's bf16 copies, where the pass runs in [`Precision::Bf16`].
type LayerBf16 = [Bf16Slot; LINEARS];

/// The precision of the training pass's linear products (the block linears' three products
/// and the LM head's two; attention, norms and the loss stay f32 either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands and sums: the reference, checked against PyTorch's gradients.
    #[default]
    F32,
    /// Mixed precision as PyTorch's bf16 autocast runs a linear layer: the operands rounded
    /// to bf16 (nearest-even), the sums, weights, gradients and optimizer state f32. Needs
    /// AVX512-BF16, where `vdpbf16ps` does twice the multiply-adds of an f32 FMA.
    Bf16,
}

/// A weight's bf16 copies ([`Bf16Training`]) and the tensor they were rounded from, so a
/// frozen weight (the teacher's, an LM head) is rounded once and a changed one again.
/// `None` inside: the weight's shape has no bf16 products (an odd dimension), f32 runs.
#[derive(Default)]
struct Bf16Slot(Option<(TensorId, Option<Bf16Training>)>);

impl Bf16Slot {
    /// Rounds `w` (dense f32 `[out, in]`) into the copies unless they already come from this
    /// very tensor and `always` is false. The student's weights are rounded every batch
    /// (`always`): they change every step, and a tensor's id does not change when its
    /// storage is written in place. `forward_only`: the forward's copy alone (the teacher).
    fn refresh(&mut self, w: &Tensor, always: bool, forward_only: bool) -> Result<(), EngineError> {
        if !always && self.0.as_ref().is_some_and(|(id, _)| *id == w.id()) {
            return Ok(());
        }
        let (out, inp) = w.dims2()?;
        let mut products = match self.0.take() {
            Some((_, Some(p))) if p.shape() == (out, inp) => Some(p),
            _ => Bf16Training::new(out, inp, Isa::detect()),
        };
        if let Some(p) = products.as_mut() {
            ops::with_f32(w, |w| {
                if forward_only {
                    p.pack_forward(w);
                } else {
                    p.pack(w);
                }
                Ok(())
            })?;
        }
        self.0 = Some((w.id(), products));
        Ok(())
    }

    /// The copies, when rounded and the shape has them.
    fn get(&self) -> Option<&Bf16Training> {
        self.0.as_ref().and_then(|(_, p)| p.as_ref())
    }
}

/// The bf16 copies a [`Precision::Bf16`] pass keeps: the student's block linears (rounded
/// every batch), the teacher's (once) and both LM heads (once; the pass trains neither).
#[derive(Default)]
struct Bf16Copies {
    student: Vec<LayerBf16>,
    teacher: Vec<LayerBf16>,
    head: Bf16Slot,
    teacher_head: Bf16Slot,
}

/// A layer whose mask keeps at most this fraction of its 16×16 blocks trains on the
/// block-sparse products; denser ones on the dense GEMM, which is faster per multiply-add.
pub const BLOCK_SPARSE_MAX_DENSITY: f64 = 0.5;
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Accumulates, over sequences, the gradient of each sequence's mean next-token loss (or its
/// mix with distillation) with respect to every block linear weight, like
/// [`super::LossGradients`] but on hand-written passes (see the module doc).
pub struct TrainingPass<'t> {
    teacher: Option<(&'t Session, Distillation)>,
    /// Weight of the hidden-state distillation term (0: none); see
    /// [`TrainingPass::with_hidden_distillation`].
    hidden: f64,
    /// Per block, its seven linears' names and running gradient sums (`[out, in]` row-major),
    /// in [`LINEARS`] order.
    sums: Vec<LayerSums>,
    /// Weight name → (block, linear) in `sums`.
    index: BTreeMap<String, (usize, usize)>,
    /// Per block and linear, the weight's `[out, in]`.
    shapes: Vec<[(usize, usize); LINEARS]>,
    /// Per block and linear, the block-sparse products of a layer whose mask keeps few enough
    /// whole 16×16 blocks ([`TrainingPass::set_mask`]).
    sparse: Vec<LayerSparse>,
    sequences: usize,
    loss_sum: f64,
    parts_sum: (f64, f64),
    /// Running sum of the per-sequence hidden-state terms (before their weight).
    hidden_sum: f64,
    /// Activation and gradient buffers, kept from batch to batch and step to step.
    pool: Pool,
    precision: Precision,
    /// With [`Precision::Bf16`], the weights' bf16 copies.
    bf16: Bf16Copies,
}

/// Scratch buffers reused across batches: one step of SmolLM2 at 1024 tokens allocates about
/// 4 GB of activations and gradients, and taking that fresh from the kernel every batch (page
/// faults, zeroing, TLB shootdowns) cost a fifth of the step.
#[derive(Default)]
struct Pool(Vec<Vec<f32>>);

impl Pool {
    /// A buffer of `len` elements holding whatever an earlier use left (callers write every
    /// element before reading it): the smallest pooled one that fits, else the largest, grown.
    fn take(&mut self, len: usize) -> Vec<f32> {
        let fits = (self.0.iter().enumerate())
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let pick = fits.or_else(|| {
            (self.0.iter().enumerate())
                .max_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)
        });
        let mut v = pick.map_or_else(Vec::new, |i| self.0.swap_remove(i));
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    /// A buffer of `len` zeros.
    fn zeroed(&mut self, len: usize) -> Vec<f32> {
        let mut v = self.take(len);
        v.par_iter_mut().for_each(|x| *x = 0.0);
        v
    }

    /// A buffer holding a copy of `src`.
    fn copy(&mut self, src: &[f32]) -> Vec<f32> {
        let mut v = self.take(src.len());
        v.copy_from_slice(src);
        v
    }

    fn give(&mut self, v: Vec<f32>) {
        if v.capacity() > 0 {
            self.0.push(v);
        }
    }
}

/// A matrix operand of [`matmul`]: `rows × cols` elements of `data` at `rs`/`cs` strides, so a
/// transpose is a view, never a copy.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `data` as a row-major `rows × cols` matrix.
    fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether every element the strides address lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = a·b·scale`, or `dst += a·b·scale` when `accumulate`, with `dst` row-major
/// `a.rows × b.cols`. Shapes are checked (an internal error, never undefined behaviour).
fn matmul(
    dst: &mut [f32],
    a: View,
    b: View,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) -> Result<(), EngineError> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.len() != m * n || !a.in_bounds() || !b.in_bounds() {
        return Err(EngineError::Input(format!(
            "internal: training matmul of {m}×{k} by {}×{n} into {} elements",
            b.rows,
            dst.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    let parallelism = if parallel {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the shapes and strides were checked above: every element `gemm` reads lies in
    // `a.data` / `b.data` and every element it writes in `dst` (row-major `m × n`), and `dst`
    // is borrowed mutably so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// The dense f32 weight of `linear`, or why it has none.
fn dense_f32(linear: &Linear) -> Result<&Tensor, EngineError> {
    match linear.weight() {
        LinearWeight::Dense(w) if w.dtype() == DType::F32 => Ok(w),
        _ => Err(EngineError::Tensor {
            name: linear.name().to_string(),
            message: "the training pass needs this layer's dense f32 weight".into(),
        }),
    }
}

/// The block's seven linears in [`LINEARS`] order, when it is a LLaMA block.
fn block_linears(block: &super::Block) -> Option<[&Linear; LINEARS]> {
    match (&block.qkv, &block.mlp) {
        (QkvProj::Split { q, k, v }, Mlp::Gated { gate, up, down }) => {
            Some([q, k, v, &block.o, gate, up, down])
        }
        _ => None,
    }
}

/// `(weight, eps)` of an RMSNorm.
fn rms(norm: &Norm) -> Option<(&[f32], f32)> {
    match norm {
        Norm::Rms { weight, eps } => Some((weight, *eps as f32)),
        Norm::Layer { .. } => None,
    }
}

/// `y = x · w / rms(x)` row by row; returns the reciprocal RMS of each row for the backward.
fn rms_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> Vec<f32> {
    let width = w.len();
    let mut inv = vec![0f32; x.len() / width];
    y.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .zip(inv.par_iter_mut())
        .for_each(|((y, x), r)| {
            let mean = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
            *r = 1.0 / (mean + eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * *r * w;
            }
        });
    inv
}

/// Adds to `dx` the gradient through `y = x · w · r` (`r = 1/rms(x)`) given `dy`:
/// `dx = r · (dy·w − x · r² · mean(dy·w·x))`.
fn rms_backward(dy: &[f32], x: &[f32], inv: &[f32], w: &[f32], dx: &mut [f32]) {
    let width = w.len();
    dx.par_chunks_mut(width)
        .zip(dy.par_chunks(width))
        .zip(x.par_chunks(width))
        .zip(inv.par_iter())
        .for_each(|(((dx, dy), x), &r)| {
            let dot = dy
                .iter()
                .zip(w)
                .zip(x)
                .map(|((g, w), x)| g * w * x)
                .sum::<f32>()
                / width as f32;
            let c = r * r * dot;
            for (((dx, g), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += r * (g * w - x * c);
            }
        });
}

/// `[b·t, heads·d]` token-major → `[b, heads, t, d]` head-major, rotated by `rope` when given
/// (transformers' `rotate_half`: `(a, b) → (a·cos − b·sin, b·cos + a·sin)`).
fn to_heads(
    x: &[f32],
    (t, heads, d): (usize, usize, usize),
    rope: Option<&RopeTable>,
    mut out: Vec<f32>,
) -> Vec<f32> {
    out.par_chunks_mut(t * d).enumerate().for_each(|(sh, dst)| {
        let (s, h) = (sh / heads, sh % heads);
        for i in 0..t {
            let src = &x[((s * t + i) * heads + h) * d..][..d];
            let row = &mut dst[i * d..][..d];
            match rope {
                Some(r) => r.rotate(i, src, row),
                None => row.copy_from_slice(src),
            }
        }
    });
    out
}

/// The inverse of [`to_heads`] for the gradient of one head: `src: [t, d]` of head `h` of
/// sequence `s`, rotated back by the transpose of the rotation, written into token-major
/// `dst: [b·t, heads·d]`.
fn from_head(
    src: &[f32],
    (s, h): (usize, usize),
    (t, heads, d): (usize, usize, usize),
    rope: Option<&RopeTable>,
    dst: &mut [f32],
) {
    for i in 0..t {
        let g = &src[i * d..][..d];
        let out = &mut dst[((s * t + i) * heads + h) * d..][..d];
        match rope {
            Some(r) => r.unrotate(i, g, out),
            None => out.copy_from_slice(g),
        }
    }
}

/// What the backward pass of one block needs from its forward pass.
struct Saved {
    /// Block input (residual stream) and the reciprocal RMS of each row.
    x: Vec<f32>,
    inv1: Vec<f32>,
    /// Normalised input of q/k/v.
    h1: Vec<f32>,
    /// Rotated queries `[b, heads, t, d]`, rotated keys and values `[b, kv_heads, t, d]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities `[b, heads, t, t]` (zero above the diagonal).
    probs: Vec<f32>,
    /// Attention output before `o_proj`, token-major `[b·t, heads·d]`.
    ctx: Vec<f32>,
    /// Residual stream after attention, its reciprocal RMS, and the MLP's normalised input.
    mid: Vec<f32>,
    inv2: Vec<f32>,
    h2: Vec<f32>,
    /// Gate and up projections, and `silu(gate) · up` (the input of `down_proj`).
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// Shapes of one batch: `b` sequences of `t` tokens.
#[derive(Clone, Copy)]
struct Batch {
    b: usize,
    t: usize,
}

impl Batch {
    fn n(&self) -> usize {
        self.b * self.t
    }
}

impl<'t> TrainingPass<'t> {
    /// Whether `session` is a model this pass covers: LLaMA blocks (RMSNorm, RoPE, SwiGLU,
    /// separate q/k/v) whose block linears are dense f32 weights.
    pub fn supports(session: &Session) -> bool {
        session.pos_embed.is_none()
            && session.rope_theta.is_some()
            && rms(&session.final_norm).is_some()
            && session.blocks.iter().all(|b| {
                rms(&b.attn_norm).is_some()
                    && rms(&b.mlp_norm).is_some()
                    && block_linears(b).is_some_and(|ls| ls.iter().all(|l| dense_f32(l).is_ok()))
            })
    }

    /// A pass for `session`'s layers (and any session with the same layers: the weights are
    /// read from the session given to [`TrainingPass::accumulate`], so a training loop keeps
    /// one pass, and its buffers, from step to step). Fails (naming the reason) when
    /// [`TrainingPass::supports`] is false.
    pub fn new(session: &Session) -> Result<Self, EngineError> {
        if !Self::supports(session) {
            for block in &session.blocks {
                if let Some(ls) = block_linears(block) {
                    for l in ls {
                        dense_f32(l)?;
                    }
                }
            }
            return Err(EngineError::Input(
                "the hand-written training pass covers LLaMA-family models (RMSNorm, RoPE, SwiGLU); use LossGradients".into(),
            ));
        }
        let mut sums = Vec::with_capacity(session.blocks.len());
        let mut shapes = Vec::with_capacity(session.blocks.len());
        let mut index = BTreeMap::new();
        for (b, block) in session.blocks.iter().enumerate() {
            let ls = block_linears(block)
                .ok_or_else(|| EngineError::Input("internal: not a LLaMA block".into()))?;
            let mut layer = ls.map(|l| (l.name().to_string(), Vec::new()));
            let mut dims = [(0, 0); LINEARS];
            for (i, (slot, l)) in layer.iter_mut().zip(ls).enumerate() {
                let w = dense_f32(l)?;
                dims[i] = w.dims2()?;
                slot.1 = vec![0f32; w.elem_count()];
                index.insert(slot.0.clone(), (b, i));
            }
            sums.push(layer);
            shapes.push(dims);
        }
        let sparse = (0..sums.len()).map(|_| Default::default()).collect();
        Ok(TrainingPass {
            teacher: None,
            hidden: 0.0,
            sums,
            index,
            shapes,
            sparse,
            sequences: 0,
            loss_sum: 0.0,
            parts_sum: (0.0, 0.0),
            hidden_sum: 0.0,
            pool: Pool::default(),
            precision: Precision::F32,
            bf16: Bf16Copies::default(),
        })
    }

    /// Runs the linear products at `precision` ([`Precision::F32`] unless set). Fails for
    /// [`Precision::Bf16`] on a CPU without AVX512-BF16, naming the fix.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self, EngineError> {
        if precision == Precision::Bf16 && !Self::bf16_available() {
            return Err(EngineError::Input(
                "bf16 training needs a CPU with AVX-512 and AVX512-BF16 (AMD Zen 4 or later, \
                 Intel Cooper Lake or Sapphire Rapids or later), which this one lacks; train \
                 at f32 precision instead"
                    .into(),
            ));
        }
        self.precision = precision;
        Ok(self)
    }

    /// Whether this CPU runs [`Precision::Bf16`].
    pub fn bf16_available() -> bool {
        bf16_training_available(Isa::detect(), 2, 2)
    }

    /// The precision of the linear products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Adds distillation from `teacher` to the training of `student`, as
    /// [`super::LossGradients::with_teacher`] does.
    pub fn with_teacher(
        mut self,
        student: &Session,
        teacher: &'t Session,
        distillation: Distillation,
    ) -> Result<Self, EngineError> {
        super::grad::check_distillation(student, teacher, distillation)?;
        self.teacher = Some((teacher, distillation));
        Ok(self)
    }

    /// Adds to each sequence's loss a hidden-state term, as SquareHead does (Kurtic et al.,
    /// "Sparse Fine-tuning for Inference Acceleration of Large Language Models", 2023):
    /// `weight` times the mean over blocks of `‖x_s − x_t‖² / ‖x_t‖²`, where `x_s` and `x_t`
    /// are the student's and the teacher's residual streams after that block over the
    /// sequence's tokens. Every block then gets a target of its own instead of only what
    /// reaches the logits, which is what lets a pruned model recover in fewer steps. Needs a
    /// teacher ([`TrainingPass::with_teacher`]) this pass covers ([`TrainingPass::supports`])
    /// with as many blocks and the same width; `weight` must be finite and `>= 0` (0 leaves
    /// the term out).
    pub fn with_hidden_distillation(mut self, weight: f64) -> Result<Self, EngineError> {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(EngineError::Input(format!(
                "hidden-state distillation needs a weight >= 0, got {weight}"
            )));
        }
        if weight > 0.0 {
            let Some((teacher, _)) = self.teacher else {
                return Err(EngineError::Input(
                    "hidden-state distillation needs a teacher (distillation) first".into(),
                ));
            };
            let blocks = |s: &Session| s.blocks.len();
            let student_width = self.shapes.first().map(|dims| dims[O].0);
            if !Self::supports(teacher)
                || blocks(teacher) != self.sums.len()
                || Some(teacher.embed.dims()[1]) != student_width
            {
                return Err(EngineError::Input(format!(
                    "hidden-state distillation needs a teacher of the student's shape (LLaMA \
                     blocks, dense f32): the teacher has {} blocks of width {}, the student {} \
                     of width {}",
                    blocks(teacher),
                    teacher.embed.dims()[1],
                    self.sums.len(),
                    student_width.unwrap_or(0)
                )));
            }
        }
        self.hidden = weight;
        Ok(self)
    }

    /// Runs `sequences` (each at least 2 tokens) through `session` forward and backward,
    /// adding each one's gradient. Sequences of equal length run together, up to
    /// `BATCH_TOKENS` tokens. Fails when `session`'s layers are not those the pass was made
    /// for.
    pub fn accumulate(
        &mut self,
        session: &Session,
        sequences: &[Vec<u32>],
    ) -> Result<(), EngineError> {
        self.check_layers(session)?;
        for batch in super::grad::equal_length_batches(sequences, BATCH_TOKENS) {
            let (loss, parts, hidden) = super::on_pool(|| self.batch(session, batch))?;
            self.loss_sum += loss;
            self.parts_sum.0 += parts.0;
            self.parts_sum.1 += parts.1;
            self.hidden_sum += hidden;
            self.sequences += batch.len();
        }
        Ok(())
    }

    fn check_layers(&self, session: &Session) -> Result<(), EngineError> {
        let same = session.blocks.len() == self.sums.len()
            && session.blocks.iter().zip(&self.sums).all(|(block, sums)| {
                block_linears(block).is_some_and(|ls| {
                    ls.iter().zip(sums).all(|(l, (name, sum))| {
                        l.name() == name && dense_f32(l).is_ok_and(|w| w.elem_count() == sum.len())
                    })
                })
            });
        if same {
            Ok(())
        } else {
            Err(EngineError::Input(
                "internal: the training pass was made for another model's layers".into(),
            ))
        }
    }

    /// Sequences seen so far.
    pub fn sequences(&self) -> usize {
        self.sequences
    }

    /// Mean loss of the sequences seen so far.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.sequences.max(1) as f64
    }

    /// When distilling, the mean cross-entropy and the mean KL (as
    /// [`super::LossGradients::mean_parts`]).
    pub fn mean_parts(&self) -> Option<(f64, f64)> {
        let n = self.sequences.max(1) as f64;
        self.teacher
            .map(|_| (self.parts_sum.0 / n, self.parts_sum.1 / n))
    }

    /// With hidden-state distillation, the mean over sequences of the hidden-state term
    /// before its weight (the mean over blocks of `‖x_s − x_t‖² / ‖x_t‖²`).
    pub fn mean_hidden(&self) -> Option<f64> {
        (self.hidden > 0.0).then(|| self.hidden_sum / self.sequences.max(1) as f64)
    }

    /// Declares the mask of weight `name` (`[out, in]` row-major, `true` = kept; `None`: no
    /// mask), whose pruned weights the caller holds at exactly zero. When the mask keeps at
    /// most `BLOCK_SPARSE_MAX_DENSITY` of the 16×16 blocks, the layer's forward and input
    /// gradient read only kept blocks and its weight gradient is formed on kept blocks only
    /// (the pruned blocks' gradient stays zero, which the caller zeroes anyway; a caller that
    /// needs the dense gradient, e.g. for RigL, passes `None`). Returns whether the layer now
    /// runs block-sparse; fails for an unknown name or a mask of another size.
    pub fn set_mask(&mut self, name: &str, keep: Option<&[bool]>) -> Result<bool, EngineError> {
        let &(b, i) = self.index.get(name).ok_or_else(|| EngineError::Tensor {
            name: name.to_string(),
            message: "internal: the training pass has no such layer".into(),
        })?;
        let size = self.sums[b][i].1.len();
        let Some(keep) = keep else {
            self.sparse[b][i] = None;
            return Ok(false);
        };
        if keep.len() != size {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                message: format!("a mask of {} entries for {size} weights", keep.len()),
            });
        }
        let (out, inp) = self.shapes[b][i];
        let pattern = BlockPattern::from_mask(keep, out, inp)
            .filter(|p| p.density() <= BLOCK_SPARSE_MAX_DENSITY);
        // Keep the packing (and its buffers) when the pattern did not change.
        let current = self.sparse[b][i].as_ref().map(BlockTraining::pattern);
        if pattern.as_ref() != current {
            self.sparse[b][i] = pattern.map(|p| BlockTraining::new(p, Isa::detect()));
        }
        Ok(self.sparse[b][i].is_some())
    }

    /// Writes the mean gradient of weight `name` (`[out, in]` row-major) into `out`, reusing
    /// its allocation; false when the pass has no such weight.
    pub fn mean_into(&self, name: &str, out: &mut Vec<f32>) -> bool {
        let Some(&(b, i)) = self.index.get(name) else {
            return false;
        };
        let n = self.sequences.max(1) as f32;
        let sum = &self.sums[b][i].1;
        out.resize(sum.len(), 0.0);
        (out.par_chunks_mut(MEAN_CHUNK))
            .zip(sum.par_chunks(MEAN_CHUNK))
            .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, g)| *o = g / n));
        true
    }

    /// Starts a new accumulation: sums, losses and counts back to zero (buffers kept).
    pub fn reset(&mut self) {
        for block in &mut self.sums {
            for (_, sum) in block.iter_mut() {
                sum.par_iter_mut().for_each(|g| *g = 0.0);
            }
        }
        self.sequences = 0;
        self.loss_sum = 0.0;
        self.parts_sum = (0.0, 0.0);
        self.hidden_sum = 0.0;
    }

    /// The mean gradient per weight name, `[out, in]` row-major (moved out, not copied).
    pub fn finish(self) -> BTreeMap<String, Vec<f32>> {
        let n = self.sequences.max(1) as f32;
        let mut out = BTreeMap::new();
        for block in self.sums {
            for (name, mut sum) in block {
                sum.par_iter_mut().for_each(|g| *g /= n);
                out.insert(name, sum);
            }
        }
        out
    }

    /// One batch of equally long sequences forward and backward: returns the sum over its
    /// sequences of the loss, of the loss parts (cross-entropy, KL) and of the hidden-state
    /// term before its weight.
    fn batch(
        &mut self,
        s: &Session,
        batch: &[Vec<u32>],
    ) -> Result<(f64, (f64, f64), f64), EngineError> {
        let shape = Batch {
            b: batch.len(),
            t: batch[0].len(),
        };
        if shape.t < 2 {
            return Err(EngineError::Input(format!(
                "a loss needs at least 2 tokens per sequence, got {}",
                shape.t
            )));
        }
        for seq in batch {
            s.check_tokens(seq, 0)?;
        }
        let width = s.embed.dims()[1];
        let flat: Vec<u32> = batch.iter().flatten().copied().collect();
        let ids = Tensor::from_slice(&flat, flat.len(), &Device::Cpu)?;
        let embedded = s.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        let mut x = ops::with_f32(&embedded, |e| Ok(self.pool.copy(e)))?;
        let theta = s
            .rope_theta
            .ok_or_else(|| EngineError::Input("internal: no RoPE".into()))?;
        let rope = RopeTable::new(s.head_dim, theta, 0, shape.t);

        // The block-sparse layers' kept blocks, from the weights as they are now.
        for (block, sparse) in s.blocks.iter().zip(self.sparse.iter_mut()) {
            let ls = block_linears(block).ok_or_else(not_llama)?;
            for (l, train) in ls.iter().zip(sparse.iter_mut()) {
                if let Some(train) = train {
                    ops::with_f32(dense_f32(l)?, |w| {
                        train.pack(w);
                        Ok(())
                    })?;
                }
            }
        }
        if self.precision == Precision::Bf16 {
            self.refresh_bf16(s)?;
        }
        // The teacher's final hidden states for the whole batch, on the same GEMMs as the
        // student's forward (its saved activations go straight back to the pool), and with
        // hidden-state distillation its residual stream after every block.
        let mut teacher_blocks = Vec::new();
        let teacher_hidden = match self.teacher {
            Some((teacher, _)) if TrainingPass::supports(teacher) => {
                let blocks = (self.hidden > 0.0).then_some(&mut teacher_blocks);
                Some(teacher_forward(
                    (teacher, &self.bf16.teacher),
                    &mut self.pool,
                    &flat,
                    shape,
                    &rope,
                    blocks,
                )?)
            }
            _ => None,
        };
        let mut saved = Vec::with_capacity(s.blocks.len());
        // Per block, the hidden-state term's gradient with respect to its output (written over
        // the teacher's residual stream there), added to the backward pass's as it passes.
        let mut hidden_grads = Vec::with_capacity(teacher_blocks.len());
        let mut hidden_sum = 0.0;
        // The term is the mean over blocks: each block's share of the weight.
        let coef = self.hidden / s.blocks.len() as f64;
        let mut teacher_blocks = teacher_blocks.into_iter();
        for layer in 0..s.blocks.len() {
            let products = (&self.sparse[layer], self.bf16.student.get(layer));
            let (next, keep) = block_forward(s, &mut self.pool, products, layer, x, shape, &rope)?;
            saved.push(keep);
            if let Some(mut target) = teacher_blocks.next() {
                hidden_sum += hidden_term_into(&next, &mut target, shape, coef);
                hidden_grads.push(target);
            }
            x = next;
        }
        let (wf, epsf) = rms(&s.final_norm)
            .ok_or_else(|| EngineError::Input("internal: not an RMSNorm".into()))?;
        let mut hf = self.pool.take(x.len());
        let invf = rms_forward(&x, wf, epsf, &mut hf);

        // dL/dh at the final norm's output, sequence by sequence, from the LM head.
        let mut dh = self.pool.take(x.len());
        let mut loss_sum = 0.0;
        let mut parts_sum = (0.0, 0.0);
        let rows = shape.t * width;
        for (k, seq) in batch.iter().enumerate() {
            let rows_of = |v: &[f32]| v[k * rows..(k + 1) * rows].to_vec();
            let loss = match self.teacher {
                None => match (s.lm_head.weight(), s.lm_head.bias()) {
                    (LinearWeight::Dense(w), None) if w.dtype() == DType::F32 => {
                        let (vocab, _) = w.dims2()?;
                        let dst = &mut dh[k * rows..(k + 1) * rows];
                        let (hk, pool) = (&hf[k * rows..(k + 1) * rows], &mut self.pool);
                        let head = (w, self.bf16.head.get());
                        head_gradient_into(pool, head, (vocab, width), hk, seq, dst)?
                    }
                    _ => {
                        let h = Tensor::from_vec(rows_of(&hf), (shape.t, width), &Device::Cpu)?;
                        let (loss, grad) = head_gradient(&s.lm_head, &h, seq)?;
                        dh[k * rows..(k + 1) * rows].copy_from_slice(&grad);
                        loss
                    }
                },
                Some((teacher, d)) => {
                    let heads = (
                        s.lm_head.weight(),
                        s.lm_head.bias(),
                        teacher.lm_head.weight(),
                        teacher.lm_head.bias(),
                    );
                    let (ce, kl) = match (heads, teacher_hidden.as_deref()) {
                        (
                            (LinearWeight::Dense(w), None, LinearWeight::Dense(wt), None),
                            Some(th),
                        ) if w.dtype() == DType::F32
                            && wt.dtype() == DType::F32
                            && w.dims() == wt.dims() =>
                        {
                            let (vocab, _) = w.dims2()?;
                            let dst = &mut dh[k * rows..(k + 1) * rows];
                            let (hk, pool) = (&hf[k * rows..(k + 1) * rows], &mut self.pool);
                            let thk = &th[k * rows..(k + 1) * rows];
                            let heads = (
                                (w, self.bf16.head.get()),
                                (wt, self.bf16.teacher_head.get()),
                            );
                            distill_head_gradient_into(
                                pool,
                                heads,
                                (vocab, width),
                                (hk, thk),
                                seq,
                                d,
                                dst,
                            )?
                        }
                        _ => {
                            let th = teacher.hidden_states(seq, None, None)?;
                            let h = Tensor::from_vec(rows_of(&hf), (shape.t, width), &Device::Cpu)?;
                            let (ce, kl, grad) = distill_head_gradient(
                                &s.lm_head,
                                &h,
                                (&teacher.lm_head, &th),
                                seq,
                                d,
                            )?;
                            dh[k * rows..(k + 1) * rows].copy_from_slice(&grad);
                            (ce, kl)
                        }
                    };
                    parts_sum.0 += ce;
                    parts_sum.1 += kl;
                    (1.0 - d.weight) * ce + d.weight * d.temperature * d.temperature * kl
                }
            };
            loss_sum += loss;
        }
        // The term is the mean over blocks.
        let hidden_sum = hidden_sum / s.blocks.len() as f64;
        loss_sum += self.hidden * hidden_sum;
        self.pool.give(hf);
        if let Some(th) = teacher_hidden {
            self.pool.give(th);
        }
        let mut dx = self.pool.zeroed(x.len());
        rms_backward(&dh, &x, &invf, wf, &mut dx);
        self.pool.give(dh);
        self.pool.give(x);
        for layer in (0..s.blocks.len()).rev() {
            let keep = saved
                .pop()
                .ok_or_else(|| EngineError::Input("internal: missing saved activations".into()))?;
            if let Some(g) = hidden_grads.pop() {
                dx.par_iter_mut().zip(&g).for_each(|(d, g)| *d += g);
                self.pool.give(g);
            }
            dx = block_backward(
                s,
                &mut self.pool,
                (
                    &mut self.sums[layer],
                    (&self.sparse[layer], self.bf16.student.get(layer)),
                ),
                layer,
                dx,
                keep,
                shape,
                &rope,
            )?;
        }
        self.pool.give(dx);
        Ok((loss_sum, parts_sum, hidden_sum))
    }

    /// Rounds the weights into their bf16 copies for this batch: every student block linear
    /// (block-sparse ones excepted: they run their own products), the teacher's block
    /// linears and both LM heads where they changed (see [`Bf16Slot::refresh`]).
    fn refresh_bf16(&mut self, s: &Session) -> Result<(), EngineError> {
        let copies = &mut self.bf16;
        copies.student.resize_with(s.blocks.len(), Default::default);
        for ((block, slots), sparse) in s.blocks.iter().zip(&mut copies.student).zip(&self.sparse) {
            let ls = block_linears(block).ok_or_else(not_llama)?;
            for ((l, slot), sparse) in ls.iter().zip(slots.iter_mut()).zip(sparse) {
                if sparse.is_none() {
                    slot.refresh(dense_f32(l)?, true, false)?;
                }
            }
        }
        let dense_head = |s: &Session| match (s.lm_head.weight(), s.lm_head.bias()) {
            (LinearWeight::Dense(w), None) if w.dtype() == DType::F32 => Some(w.clone()),
            _ => None,
        };
        if let Some(w) = dense_head(s) {
            copies.head.refresh(&w, false, false)?;
        }
        if let Some((teacher, _)) = self.teacher.filter(|(t, _)| TrainingPass::supports(t)) {
            copies
                .teacher
                .resize_with(teacher.blocks.len(), Default::default);
            for (block, slots) in teacher.blocks.iter().zip(&mut copies.teacher) {
                let ls = block_linears(block).ok_or_else(not_llama)?;
                for (l, slot) in ls.iter().zip(slots.iter_mut()) {
                    slot.refresh(dense_f32(l)?, false, true)?;
                }
            }
            if let Some(w) = dense_head(teacher) {
                copies.teacher_head.refresh(&w, false, true)?;
            }
        }
        Ok(())
    }
}

/// `teacher`'s final hidden states (after its last norm) for the batch `tokens` (`shape`),
/// through the training pass's own block forward, every saved activation handed back to
/// `pool` at once, instead of the inference forward run sequence by sequence. With `blocks`,
/// a copy of the residual stream after each block is pushed there too.
fn teacher_forward(
    (teacher, bf16): (&Session, &[LayerBf16]),
    pool: &mut Pool,
    tokens: &[u32],
    shape: Batch,
    rope: &RopeTable,
    mut blocks: Option<&mut Vec<Vec<f32>>>,
) -> Result<Vec<f32>, EngineError> {
    let ids = Tensor::from_slice(tokens, tokens.len(), &Device::Cpu)?;
    let embedded = teacher.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
    let mut x = ops::with_f32(&embedded, |e| Ok(pool.copy(e)))?;
    let dense = LayerSparse::default();
    for layer in 0..teacher.blocks.len() {
        let products = (&dense, bf16.get(layer));
        let (next, saved) = block_forward(teacher, pool, products, layer, x, shape, rope)?;
        saved.release(pool);
        if let Some(blocks) = blocks.as_deref_mut() {
            blocks.push(pool.copy(&next));
        }
        x = next;
    }
    let (w, eps) = rms(&teacher.final_norm)
        .ok_or_else(|| EngineError::Input("internal: not an RMSNorm".into()))?;
    let mut h = pool.take(x.len());
    rms_forward(&x, w, eps, &mut h);
    pool.give(x);
    Ok(h)
}

/// The hidden-state term of one block over a batch (`shape`): for each sequence, `‖x_s −
/// x_t‖² / ‖x_t‖²` over its rows of the student's output `student` and the teacher's
/// `target`. Returns the sum of those over the sequences, and overwrites `target` with the
/// term's gradient with respect to `student` times `coef`: `coef · 2(x_s − x_t) / ‖x_t‖²`.
fn hidden_term_into(student: &[f32], target: &mut [f32], shape: Batch, coef: f64) -> f64 {
    let rows = student.len() / shape.b;
    student
        .par_chunks(rows)
        .zip(target.par_chunks_mut(rows))
        .map(|(xs, xt)| {
            let (mut err, mut norm) = (0f64, 0f64);
            for (&s, &t) in xs.iter().zip(xt.iter()) {
                let d = f64::from(s - t);
                err += d * d;
                norm += f64::from(t) * f64::from(t);
            }
            // A teacher stream of all zeros has no scale to compare against: no term.
            let scale = if norm > 0.0 { 2.0 * coef / norm } else { 0.0 };
            for (&s, t) in xs.iter().zip(xt.iter_mut()) {
                *t = ((f64::from(s) - f64::from(*t)) * scale) as f32;
            }
            if norm > 0.0 { err / norm } else { 0.0 }
        })
        .collect::<Vec<f64>>()
        .into_iter()
        // In sequence order, so the reported loss does not depend on how rayon split the work.
        .sum()
}

/// Rows of logits formed at once by [`head_gradient_into`]: 256 × vocab f32 (48 MB for
/// SmolLM2's 49152 entries) is one pooled buffer, reused for every chunk.
const HEAD_ROWS: usize = 256;

/// The mean next-token cross-entropy of one sequence and its gradient with respect to the
/// final hidden states `h: [t, width]`, written into `dh` (the last row, which predicts
/// nothing, zero): for each chunk of rows, logits `h·Wᵀ` (one GEMM), `softmax − onehot` in
/// place over the mean's `1/(t−1)`, then `dh = dlogits·W` (one GEMM). Only `HEAD_ROWS ×
/// vocab` logits exist at a time. The same quantity as `grad::head_gradient`, without
/// candle's temporaries (each a fresh mapping of tens of MB per chunk).
fn head_gradient_into(
    pool: &mut Pool,
    w: Head<'_>,
    (vocab, width): (usize, usize),
    h: &[f32],
    tokens: &[u32],
    dh: &mut [f32],
) -> Result<f64, EngineError> {
    let n = (tokens.len() - 1) as f32;
    let mut loss = 0f64;
    head_chunks(pool, w, (vocab, width), h, tokens, dh, |_, z, chunk| {
        // Per row: log-sum-exp (partial sums in f32, accumulated in f64, as `row_nll`), the
        // loss, and softmax − onehot over n in place.
        // Per-row losses collected in order and summed serially: a parallel f64 sum's order
        // depends on work stealing, and a resumed run must reproduce the loss bit for bit.
        let row_losses: Vec<f64> = z
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &target)| {
                let target = target as usize;
                let z_target = f64::from(row[target]);
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut sum = 0f64;
                for part in row.chunks_mut(256) {
                    let mut s = 0f32;
                    for v in part.iter_mut() {
                        *v = ops::fast_exp(*v - max);
                        s += *v;
                    }
                    sum += f64::from(s);
                }
                let nll = sum.ln() + f64::from(max) - z_target;
                let scale = (1.0 / sum) as f32 / n;
                row.iter_mut().for_each(|v| *v *= scale);
                row[target] -= 1.0 / n;
                nll
            })
            .collect();
        loss += row_losses.iter().sum::<f64>();
        Ok(())
    })?;
    Ok(loss / f64::from(n))
}

/// An LM head's dense f32 weight `[vocab, width]` and, in a [`Precision::Bf16`] pass, its bf16
/// copies, which its products then run on.
type Head<'a> = (&'a Tensor, Option<&'a Bf16Training>);

/// `dst = x·Wᵀ` for the LM head `head` and `x: [rows, width]`.
fn head_logits(
    head: (&[f32], Option<&Bf16Training>),
    (vocab, width): (usize, usize),
    x: &[f32],
    rows: usize,
    dst: &mut [f32],
) -> Result<(), EngineError> {
    match head {
        (_, Some(bf16)) => {
            bf16.forward(x, rows, dst, false);
            Ok(())
        }
        (w, None) => {
            let wv = View::rows(w, vocab, width);
            matmul(dst, View::rows(x, rows, width), wv.t(), 1.0, false, true)
        }
    }
}

/// The frame both LM-head gradients share: checks the targets (`tokens[1..]`), then per chunk
/// of [`HEAD_ROWS`] rows forms the logits `h·Wᵀ` (one GEMM, into one pooled buffer), lets
/// `fill(first_row, logits, targets)` turn them into `dloss/dlogits` in place, and writes
/// `dh = dlogits·W` (one GEMM); the last row of `dh`, which predicts nothing, is zero.
fn head_chunks(
    pool: &mut Pool,
    (w, bf16): Head<'_>,
    (vocab, width): (usize, usize),
    h: &[f32],
    tokens: &[u32],
    dh: &mut [f32],
    mut fill: impl FnMut(usize, &mut [f32], &[u32]) -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    let targets = &tokens[1..];
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::Input(format!(
            "target token {bad} is outside the vocabulary of {vocab} entries"
        )));
    }
    let mut logits = pool.take(HEAD_ROWS.min(targets.len()) * vocab);
    ops::with_f32(w, |w| {
        for (c, chunk) in targets.chunks(HEAD_ROWS).enumerate() {
            let first = c * HEAD_ROWS;
            let rows = chunk.len();
            let span = first * width..(first + rows) * width;
            let z = &mut logits[..rows * vocab];
            head_logits((w, bf16), (vocab, width), &h[span.clone()], rows, z)?;
            fill(first, z, chunk)?;
            match bf16 {
                Some(bf16) => bf16.input_grad(z, rows, &mut dh[span], false),
                None => matmul(
                    &mut dh[span],
                    View::rows(z, rows, vocab),
                    View::rows(w, vocab, width),
                    1.0,
                    false,
                    true,
                )?,
            }
        }
        Ok(())
    })?;
    dh[targets.len() * width..].fill(0.0);
    pool.give(logits);
    Ok(())
}

/// The distillation loss of one sequence, as `grad::distill_head_gradient` defines it, and its
/// gradient with respect to the student's final hidden states `h: [t, width]`, written into
/// `dh` (the last row zero): per chunk of [`HEAD_ROWS`] rows, the student's and the teacher's
/// logits (one GEMM each, the teacher's from its own final hidden states `th` and LM head
/// `wt`), then per row, in parallel, both log-sum-exps, the cross-entropy, the KL term and
/// `dlogits = ((1 − α)·(softmax(z) − onehot) + α·T·(softmax(z/T) − softmax(zₜ/T))) / n` in
/// place, then `dh = dlogits·W` (one GEMM). Returns the mean cross-entropy and the mean KL.
/// The candle version formed its rows one after another on one core with three fresh
/// `[rows, vocab]` tensors per chunk; on SmolLM2 that was about a fifth of a distillation step.
fn distill_head_gradient_into(
    pool: &mut Pool,
    (w, (wt, wt16)): (Head<'_>, Head<'_>),
    (vocab, width): (usize, usize),
    (h, th): (&[f32], &[f32]),
    tokens: &[u32],
    d: Distillation,
    dh: &mut [f32],
) -> Result<(f64, f64), EngineError> {
    if th.len() != h.len() || wt.dims() != w.0.dims() {
        return Err(EngineError::Input(
            "internal: the teacher's hidden states or LM head do not match the student's".into(),
        ));
    }
    let n = (tokens.len() - 1) as f32;
    let (alpha, temp) = (d.weight as f32, d.temperature as f32);
    let (ce_scale, kl_scale) = ((1.0 - alpha) / n, alpha * temp / n);
    let inv_temp = 1.0 / temp;
    let tempered = temp != 1.0;
    let row = RowSettings {
        inv_temp,
        tempered,
        ce_scale,
        kl_scale,
    };
    let mut teacher = pool.take(HEAD_ROWS.min(tokens.len() - 1) * vocab);
    let (mut ce, mut kl) = (0f64, 0f64);
    ops::with_f32(wt, |wt| {
        head_chunks(pool, w, (vocab, width), h, tokens, dh, |first, z, chunk| {
            let rows = chunk.len();
            let zt = &mut teacher[..rows * vocab];
            let span = first * width..(first + rows) * width;
            head_logits((wt, wt16), (vocab, width), &th[span], rows, zt)?;
            // Per-row (cross-entropy, KL) collected in order and summed serially, so a resumed
            // run reproduces the loss bit for bit whatever the work stealing did.
            let row_parts: Vec<(f64, f64)> = z
                .par_chunks_mut(vocab)
                .zip(zt.par_chunks(vocab))
                .zip(chunk.par_iter())
                .map(|((zs, zt), &target)| crate::wide!(distill_row(zs, zt, target as usize, &row)))
                .collect();
            for (row_ce, row_kl) in row_parts {
                ce += row_ce;
                kl += row_kl;
            }
            Ok(())
        })
    })?;
    pool.give(teacher);
    let n = f64::from(n);
    Ok((ce / n, kl / n))
}

/// The settings every row of a distillation chunk shares: the inverse temperature, whether it
/// is not 1, and the two loss weights already divided by the row count.
struct RowSettings {
    inv_temp: f32,
    tempered: bool,
    ce_scale: f32,
    kl_scale: f32,
}

/// log Σ exp(s·v) over a row (partial sums in f32, accumulated in f64). `s` is positive (a
/// temperature's inverse), so max(s·v) = s·max(v). A function, not a closure, so
/// `#[inline(always)]` keeps it inside [`distill_row`]'s AVX-512 copy.
#[inline(always)]
fn log_sum_exp(values: &[f32], s: f32) -> f64 {
    let max = ops::max_f32(values) * s;
    let mut sum = 0f64;
    for part in values.chunks(256) {
        sum += f64::from(ops::exp_sum(part, s, max));
    }
    f64::from(max) + sum.ln()
}

/// One row of [`distill_head_gradient_into`]: the student's logits `zs` become the row's
/// gradient in place; returns the row's cross-entropy against `target` and its KL term. Both
/// log-sum-exps, the cross-entropy, then the gradient and the KL term stretch by stretch
/// ([`distill_row_part`]). Called through [`wide!`](crate::wide!), whose AVX-512 copy `perf`
/// showed to matter here (in 4-wide SSE the row was a seventh of a bf16 distillation step); its
/// results are bit-identical to the portable build's.
#[inline(always)]
fn distill_row(zs: &mut [f32], zt: &[f32], target: usize, row: &RowSettings) -> (f64, f64) {
    let lse_s1 = log_sum_exp(zs, 1.0);
    let nll = lse_s1 - f64::from(zs[target]);
    let (lse_s, lse_t) = (
        if row.tempered {
            log_sum_exp(zs, row.inv_temp)
        } else {
            lse_s1
        },
        log_sum_exp(zt, row.inv_temp),
    );
    let consts = RowConsts {
        settings: row,
        lse_t: lse_t as f32,
        lse_s: lse_s as f32,
        lse_s1: lse_s1 as f32,
    };
    let mut kl = 0f64;
    for (zs_part, zt_part) in zs.chunks_mut(256).zip(zt.chunks(256)) {
        let part_kl = if row.tempered {
            distill_row_part::<true>(zs_part, zt_part, &consts)
        } else {
            distill_row_part::<false>(zs_part, zt_part, &consts)
        };
        kl += f64::from(part_kl);
    }
    zs[target] -= row.ce_scale;
    (nll, kl)
}

/// One position of [`distill_row_part`]: writes its gradient over the student's logit `v` and
/// returns its KL term. A function, not a closure, so `#[inline(always)]` holds.
#[inline(always)]
fn distill_one<const TEMPERED: bool>(v: &mut f32, u: f32, c: &RowConsts<'_>) -> f32 {
    let RowSettings {
        inv_temp,
        ce_scale,
        kl_scale,
        ..
    } = *c.settings;
    // log pₜ and log pₛ at the temperature.
    let (a, b) = (u * inv_temp - c.lse_t, *v * inv_temp - c.lse_s);
    let (q, ps) = (ops::fast_exp(a), ops::fast_exp(b));
    let p = if TEMPERED {
        ops::fast_exp(*v - c.lse_s1)
    } else {
        ps
    };
    *v = ce_scale * p + kl_scale * (ps - q);
    q * (a - b)
}

/// The per-row constants of [`distill_row_part`]: the chunk's shared settings, then the
/// teacher's and the student's log-sum-exps at the temperature and the student's at 1.
struct RowConsts<'a> {
    settings: &'a RowSettings,
    lse_t: f32,
    lse_s: f32,
    lse_s1: f32,
}

/// One stretch of a distillation row: writes `ce_scale·softmax(z) + kl_scale·(softmax(z/T) −
/// softmax(zₜ/T))` over the student's logits `zs` in place (the target's one-hot is the
/// caller's) and returns the stretch's `Σ q·(log q − log pₛ)`. [`ops::LANES`] independent KL
/// sums let the compiler vectorise the loop (a single running sum is a serial chain it may
/// not reorder); `TEMPERED` (T ≠ 1) adds the softmax at temperature 1 as its own `exp`.
#[inline(always)]
fn distill_row_part<const TEMPERED: bool>(zs: &mut [f32], zt: &[f32], c: &RowConsts<'_>) -> f32 {
    let whole = zs.len() - zs.len() % ops::LANES;
    let (body, tail) = zs.split_at_mut(whole);
    let mut acc = [0f32; ops::LANES];
    for (vs, us) in body
        .chunks_exact_mut(ops::LANES)
        .zip(zt[..whole].chunks_exact(ops::LANES))
    {
        for ((a, v), &u) in acc.iter_mut().zip(vs).zip(us) {
            *a += distill_one::<TEMPERED>(v, u, c);
        }
    }
    let sum: f32 = acc.iter().sum();
    tail.iter_mut()
        .zip(&zt[whole..])
        .fold(sum, |s, (v, &u)| s + distill_one::<TEMPERED>(v, u, c))
}

impl Saved {
    /// Hands every buffer back to the pool.
    fn release(self, pool: &mut Pool) {
        for v in [
            self.x, self.inv1, self.h1, self.q, self.k, self.v, self.probs, self.ctx, self.mid,
            self.inv2, self.h2, self.gate, self.up, self.act,
        ] {
            pool.give(v);
        }
    }
}

/// How one linear's products run: on its kept 16×16 blocks, on its bf16 copies, or (neither)
/// on the f32 `gemm` crate.
type Products<'a> = (&'a Option<BlockTraining>, Option<&'a Bf16Training>);

/// One block's [`Products`]: its block-sparse products and, in a bf16 pass, its bf16 copies.
type BlockProducts<'a> = (&'a LayerSparse, Option<&'a LayerBf16>);

/// Linear `i`'s [`Products`] in a block's.
fn products((sparse, bf16): BlockProducts<'_>, i: usize) -> Products<'_> {
    (&sparse[i], bf16.and_then(|b| b[i].get()))
}

/// `y = x·Wᵀ (+ bias)` for `x: [n, in]`.
fn linear_forward(
    pool: &mut Pool,
    (linear, products): (&Linear, Products<'_>),
    x: &[f32],
    n: usize,
) -> Result<Vec<f32>, EngineError> {
    let w = dense_f32(linear)?;
    let (out, inp) = w.dims2()?;
    let mut y = pool.take(n * out);
    match products {
        (Some(train), _) => train.forward(x, n, &mut y, false),
        (None, Some(bf16)) => bf16.forward(x, n, &mut y, false),
        (None, None) => ops::with_f32(w, |w| {
            let wt = View::rows(w, out, inp).t();
            matmul(&mut y, View::rows(x, n, inp), wt, 1.0, false, true)
        })?,
    }
    if let Some(bias) = linear.bias() {
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        y.par_chunks_mut(out).for_each(|row| {
            row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b);
        });
    }
    Ok(y)
}

/// Backward of a linear: `dW += dyᵀ·x` into `sum`, and `dx (+)= dy·W`.
fn linear_backward(
    (linear, products): (&Linear, Products<'_>),
    (dy, x, n): (&[f32], &[f32], usize),
    sum: &mut [f32],
    dx: &mut [f32],
    accumulate_dx: bool,
) -> Result<(), EngineError> {
    match products {
        (Some(train), _) => {
            train.weight_grad(dy, x, n, sum);
            train.input_grad(dy, n, dx, accumulate_dx);
            return Ok(());
        }
        (None, Some(bf16)) => {
            bf16.weight_grad(dy, x, n, sum);
            bf16.input_grad(dy, n, dx, accumulate_dx);
            return Ok(());
        }
        (None, None) => {}
    }
    let w = dense_f32(linear)?;
    let (out, inp) = w.dims2()?;
    let dyv = View::rows(dy, n, out);
    matmul(sum, dyv.t(), View::rows(x, n, inp), 1.0, true, true)?;
    ops::with_f32(w, |w| {
        matmul(dx, dyv, View::rows(w, out, inp), 1.0, accumulate_dx, true)
    })
}

fn not_llama() -> EngineError {
    EngineError::Input("internal: not a LLaMA block with RMSNorms".into())
}

/// Forward of one block: its output, and what its backward needs.
fn block_forward(
    s: &Session,
    pool: &mut Pool,
    layer_products: BlockProducts<'_>,
    layer: usize,
    x: Vec<f32>,
    shape: Batch,
    rope: &RopeTable,
) -> Result<(Vec<f32>, Saved), EngineError> {
    let block = &s.blocks[layer];
    let ls = block_linears(block).ok_or_else(not_llama)?;
    let (w1, eps1) = rms(&block.attn_norm).ok_or_else(not_llama)?;
    let (w2, eps2) = rms(&block.mlp_norm).ok_or_else(not_llama)?;
    let (n, t, d) = (shape.n(), shape.t, s.head_dim);
    let (heads, kv_heads) = (block.heads, block.kv_heads);
    let group = heads / kv_heads.max(1);

    let mut h1 = pool.take(x.len());
    let inv1 = rms_forward(&x, w1, eps1, &mut h1);
    let q_tok = linear_forward(pool, (ls[Q], products(layer_products, Q)), &h1, n)?;
    let k_tok = linear_forward(pool, (ls[K], products(layer_products, K)), &h1, n)?;
    let v_tok = linear_forward(pool, (ls[V], products(layer_products, V)), &h1, n)?;
    let q = to_heads(&q_tok, (t, heads, d), Some(rope), pool.take(q_tok.len()));
    let k = to_heads(&k_tok, (t, kv_heads, d), Some(rope), pool.take(k_tok.len()));
    let v = to_heads(&v_tok, (t, kv_heads, d), None, pool.take(v_tok.len()));
    pool.give(q_tok);
    pool.give(k_tok);
    pool.give(v_tok);

    // Attention per (sequence, head): P = softmax(scale·QKᵀ + causal), O = P·V.
    let scale = s.attention_scale(layer) as f32;
    let mut probs = pool.take(shape.b * heads * t * t);
    let outs: Vec<Vec<f32>> = probs
        .par_chunks_mut(t * t)
        .enumerate()
        .map(|(sh, p)| -> Result<Vec<f32>, EngineError> {
            let (seq, h) = (sh / heads, sh % heads);
            let g = seq * kv_heads + h / group;
            let qh = View::rows(&q[sh * t * d..][..t * d], t, d);
            let kh = View::rows(&k[g * t * d..][..t * d], t, d);
            matmul(p, qh, kh.t(), scale, false, false)?;
            for (i, row) in p.chunks_mut(t).enumerate() {
                let max = row[..=i].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut total = 0.0;
                for v in &mut row[..=i] {
                    *v = ops::fast_exp(*v - max);
                    total += *v;
                }
                let r = 1.0 / total;
                row[..=i].iter_mut().for_each(|v| *v *= r);
                row[i + 1..].fill(0.0);
            }
            let mut o = vec![0f32; t * d];
            let vh = View::rows(&v[g * t * d..][..t * d], t, d);
            matmul(&mut o, View::rows(p, t, t), vh, 1.0, false, false)?;
            Ok(o)
        })
        .collect::<Result<_, _>>()?;
    let mut ctx = pool.take(n * heads * d);
    for (sh, o) in outs.iter().enumerate() {
        let (seq, h) = (sh / heads, sh % heads);
        for i in 0..t {
            ctx[((seq * t + i) * heads + h) * d..][..d].copy_from_slice(&o[i * d..][..d]);
        }
    }
    let attn = linear_forward(pool, (ls[O], products(layer_products, O)), &ctx, n)?;
    let mut mid = pool.copy(&x);
    mid.par_iter_mut().zip(&attn).for_each(|(m, a)| *m += a);
    pool.give(attn);

    let mut h2 = pool.take(mid.len());
    let inv2 = rms_forward(&mid, w2, eps2, &mut h2);
    let gate = linear_forward(pool, (ls[GATE], products(layer_products, GATE)), &h2, n)?;
    let up = linear_forward(pool, (ls[UP], products(layer_products, UP)), &h2, n)?;
    let mut act = pool.take(gate.len());
    act.par_iter_mut()
        .zip(gate.par_iter().zip(&up))
        .for_each(|(a, (&g, &u))| *a = g / (1.0 + ops::fast_exp(-g)) * u);
    let down = linear_forward(pool, (ls[DOWN], products(layer_products, DOWN)), &act, n)?;
    let mut next = pool.copy(&mid);
    next.par_iter_mut().zip(&down).for_each(|(y, d)| *y += d);
    pool.give(down);
    Ok((
        next,
        Saved {
            x,
            inv1,
            h1,
            q,
            k,
            v,
            probs,
            ctx,
            mid,
            inv2,
            h2,
            gate,
            up,
            act,
        },
    ))
}

/// Backward of one block: adds its weight gradients to `sums` and returns the gradient with
/// respect to its input, given `dy` with respect to its output.
#[allow(clippy::too_many_arguments)]
fn block_backward(
    s: &Session,
    pool: &mut Pool,
    (sums, layer_products): (&mut LayerSums, BlockProducts<'_>),
    layer: usize,
    dy: Vec<f32>,
    sv: Saved,
    shape: Batch,
    rope: &RopeTable,
) -> Result<Vec<f32>, EngineError> {
    let block = &s.blocks[layer];
    let ls = block_linears(block).ok_or_else(not_llama)?;
    let (w1, _) = rms(&block.attn_norm).ok_or_else(not_llama)?;
    let (w2, _) = rms(&block.mlp_norm).ok_or_else(not_llama)?;
    let (n, t, d) = (shape.n(), shape.t, s.head_dim);
    let (heads, kv_heads) = (block.heads, block.kv_heads);
    let group = heads / kv_heads.max(1);
    let width = sv.x.len() / n.max(1);

    // MLP: y = mid + down(silu(gate)·up).
    let inter = sv.act.len() / n.max(1);
    let mut dgate = pool.take(n * inter);
    linear_backward(
        (ls[DOWN], products(layer_products, DOWN)),
        (&dy, &sv.act, n),
        &mut sums[DOWN].1,
        &mut dgate,
        false,
    )?;
    // d(silu(g)·u): du = da·silu(g), dg = da·u·σ(g)·(1 + g·(1 − σ(g))); dgate holds da first.
    let mut dup = pool.take(dgate.len());
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(sv.gate.par_iter().zip(&sv.up))
        .for_each(|((da, du), (&g, &u))| {
            let sig = 1.0 / (1.0 + ops::fast_exp(-g));
            *du = *da * g * sig;
            *da *= u * sig * (1.0 + g * (1.0 - sig));
        });
    let mut dh2 = pool.take(n * width);
    linear_backward(
        (ls[GATE], products(layer_products, GATE)),
        (&dgate, &sv.h2, n),
        &mut sums[GATE].1,
        &mut dh2,
        false,
    )?;
    linear_backward(
        (ls[UP], products(layer_products, UP)),
        (&dup, &sv.h2, n),
        &mut sums[UP].1,
        &mut dh2,
        true,
    )?;
    pool.give(dgate);
    pool.give(dup);
    let mut dmid = dy;
    rms_backward(&dh2, &sv.mid, &sv.inv2, w2, &mut dmid);
    pool.give(dh2);

    // Attention: mid = x + o(ctx).
    let mut dctx = pool.take(n * heads * d);
    linear_backward(
        (ls[O], products(layer_products, O)),
        (&dmid, &sv.ctx, n),
        &mut sums[O].1,
        &mut dctx,
        false,
    )?;
    let scale = s.attention_scale(layer) as f32;
    let (q, k, v, probs) = (&sv.q, &sv.k, &sv.v, &sv.probs);
    // One task per (sequence, KV head): it owns that head's dK and dV and the dQ of the
    // query heads sharing it. Returns `[group, t, d]` dQ, then `[t, d]` dK and dV.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..shape.b * kv_heads)
        .into_par_iter()
        .map(|sg| -> Result<_, EngineError> {
            let seq = sg / kv_heads;
            let g = sg % kv_heads;
            let kg = View::rows(&k[sg * t * d..][..t * d], t, d);
            let vg = View::rows(&v[sg * t * d..][..t * d], t, d);
            let mut dq = vec![0f32; group * t * d];
            let mut dk = vec![0f32; t * d];
            let mut dv = vec![0f32; t * d];
            let mut dout = vec![0f32; t * d];
            let mut ds = vec![0f32; t * t];
            for j in 0..group {
                let h = g * group + j;
                let sh = seq * heads + h;
                for i in 0..t {
                    dout[i * d..][..d]
                        .copy_from_slice(&dctx[((seq * t + i) * heads + h) * d..][..d]);
                }
                let p = &probs[sh * t * t..][..t * t];
                let pv = View::rows(p, t, t);
                let dov = View::rows(&dout, t, d);
                // dV += Pᵀ·dO; dP = dO·Vᵀ.
                matmul(&mut dv, pv.t(), dov, 1.0, true, false)?;
                matmul(&mut ds, dov, vg.t(), 1.0, false, false)?;
                // dS = P ⊙ (dP − rowsum(P ⊙ dP)), zero above the diagonal. The row sum in
                // lanes (a plain `.sum()` stays scalar): this loop was an eighth of a bf16
                // distillation step's samples.
                crate::wide!({
                    for (i, (row, prow)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                        let dot = ops::dot(&row[..=i], &prow[..=i]);
                        for (g, &p) in row[..=i].iter_mut().zip(&prow[..=i]) {
                            *g = p * (*g - dot);
                        }
                        row[i + 1..].fill(0.0);
                    }
                });
                let dsv = View::rows(&ds, t, t);
                let qh = View::rows(&q[sh * t * d..][..t * d], t, d);
                // dQ = scale·dS·K; dK += scale·dSᵀ·Q.
                matmul(&mut dq[j * t * d..][..t * d], dsv, kg, scale, false, false)?;
                matmul(&mut dk, dsv.t(), qh, scale, true, false)?;
            }
            Ok((dq, dk, dv))
        })
        .collect::<Result<_, _>>()?;
    pool.give(dctx);
    let mut dq = pool.take(n * heads * d);
    let mut dk = pool.take(n * kv_heads * d);
    let mut dv = pool.take(n * kv_heads * d);
    for (sg, (pq, pk, pv)) in parts.iter().enumerate() {
        let (seq, g) = (sg / kv_heads, sg % kv_heads);
        for j in 0..group {
            let src = &pq[j * t * d..][..t * d];
            from_head(
                src,
                (seq, g * group + j),
                (t, heads, d),
                Some(rope),
                &mut dq,
            );
        }
        from_head(pk, (seq, g), (t, kv_heads, d), Some(rope), &mut dk);
        from_head(pv, (seq, g), (t, kv_heads, d), None, &mut dv);
    }
    drop(parts);
    let mut dh1 = pool.take(n * width);
    linear_backward(
        (ls[Q], products(layer_products, Q)),
        (&dq, &sv.h1, n),
        &mut sums[Q].1,
        &mut dh1,
        false,
    )?;
    linear_backward(
        (ls[K], products(layer_products, K)),
        (&dk, &sv.h1, n),
        &mut sums[K].1,
        &mut dh1,
        true,
    )?;
    linear_backward(
        (ls[V], products(layer_products, V)),
        (&dv, &sv.h1, n),
        &mut sums[V].1,
        &mut dh1,
        true,
    )?;
    pool.give(dq);
    pool.give(dk);
    pool.give(dv);
    let mut dx = dmid;
    rms_backward(&dh1, &sv.x, &sv.inv1, w1, &mut dx);
    pool.give(dh1);
    sv.release(pool);
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LossGradients, Model, builtin_model};

    /// KL alone at temperature 1, as the recovery pipelines distill.
    const KL_AT_T1: Distillation = Distillation {
        weight: 1.0,
        temperature: 1.0,
    };

    fn sequences(count: usize, len: u32, salt: u32) -> Vec<Vec<u32>> {
        (0..count as u32)
            .map(|k| (0..len).map(|i| (i * 37 + 11 * k + salt) % 256).collect())
            .collect()
    }

    /// Largest |a − b| over the largest |b|, per weight, against autograd's gradients.
    fn worst_against_autograd(
        ours: &BTreeMap<String, Vec<f32>>,
        autograd: BTreeMap<String, Tensor>,
    ) -> f32 {
        assert_eq!(ours.len(), autograd.len());
        let mut worst = 0f32;
        for (name, g) in autograd {
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mine = &ours[&name];
            assert_eq!(mine.len(), g.len(), "{name}");
            let scale = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = mine
                .iter()
                .zip(&g)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(diff / scale.max(f32::MIN_POSITIVE));
        }
        worst
    }

    /// Several equally long sequences run as one batch (the golden test's sequences differ in
    /// length, so each runs alone there): same loss and gradients as autograd.
    #[test]
    fn batched_sequences_match_autograd() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let seqs = sequences(3, 40, 5);
        let mut pass = TrainingPass::new(&s).unwrap();
        pass.accumulate(&s, &seqs).unwrap();
        let mut auto = LossGradients::new(&s).unwrap();
        auto.accumulate(&seqs).unwrap();
        assert_eq!(pass.sequences(), 3);
        assert!((pass.mean_loss() - auto.mean_loss()).abs() < 1e-5);
        let worst = worst_against_autograd(&pass.finish(), auto.finish().unwrap().mean);
        assert!(worst < 1e-5, "max |Δg| / max |g| = {worst:.2e}");
    }

    /// With a teacher, the mixed loss, its parts and its gradients equal autograd's: at a
    /// temperature and weight where every term of the fused LM-head gradient counts, and at
    /// the recovery pipelines' KL alone at temperature 1 (the fused pass's shortcut there).
    #[test]
    fn distillation_matches_autograd() {
        let model = builtin_model("tiny-llama").unwrap();
        let mut pruned = model.clone();
        let name = "model.layers.0.mlp.up_proj.weight";
        let w = pruned.weight(name).unwrap().clone();
        let halved = (w.clone() * 0.5).unwrap();
        pruned.set_weight(name, halved, false).unwrap();
        let teacher = Session::new(&model).unwrap();
        let s = Session::new(&pruned).unwrap();
        for (weight, temperature) in [(0.5, 2.0), (1.0, 1.0)] {
            let d = Distillation {
                weight,
                temperature,
            };
            let seqs = sequences(2, 24, 9);
            let mut pass = TrainingPass::new(&s)
                .unwrap()
                .with_teacher(&s, &teacher, d)
                .unwrap();
            pass.accumulate(&s, &seqs).unwrap();
            let mut auto = LossGradients::new(&s)
                .unwrap()
                .with_teacher(&teacher, d)
                .unwrap();
            auto.accumulate(&seqs).unwrap();
            assert!((pass.mean_loss() - auto.mean_loss()).abs() < 1e-5, "{d:?}");
            let (ours, theirs) = (pass.mean_parts().unwrap(), auto.mean_parts().unwrap());
            assert!(
                (ours.0 - theirs.0).abs() < 1e-5 && (ours.1 - theirs.1).abs() < 1e-6,
                "{d:?}: {ours:?} against {theirs:?}"
            );
            let worst = worst_against_autograd(&pass.finish(), auto.finish().unwrap().mean);
            assert!(worst < 1e-5, "{d:?}: max |Δg| / max |g| = {worst:.2e}");
        }
    }

    /// Hidden-state distillation: the term is zero between equal models, and with a pruned
    /// student the gradient the pass returns is its own loss's (KL and the hidden-state term
    /// weighted so that the latter dominates): central differences of the pass's loss along
    /// the gradient and along a random direction equal the gradient's projections.
    #[test]
    fn hidden_state_distillation_matches_finite_differences() {
        let model = builtin_model("tiny-llama").unwrap();
        let teacher = Session::new(&model).unwrap();
        let d = KL_AT_T1;
        let seqs = sequences(2, 20, 4);
        let run = |m: &Model, hidden: f64| {
            let s = Session::new(m).unwrap();
            let mut pass = TrainingPass::new(&s)
                .unwrap()
                .with_teacher(&s, &teacher, d)
                .unwrap()
                .with_hidden_distillation(hidden)
                .unwrap();
            pass.accumulate(&s, &seqs).unwrap();
            let (loss, term) = (pass.mean_loss(), pass.mean_hidden().unwrap_or(0.0));
            (loss, term, pass.finish())
        };
        let (_, term, _) = run(&model, 1.0);
        assert_eq!(term, 0.0, "equal models differ nowhere");

        let mut pruned = model.clone();
        for name in [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
        ] {
            let w = pruned.weight(name).unwrap().clone();
            pruned.set_weight(name, (w * 0.5).unwrap(), false).unwrap();
        }
        let (loss, term, grads) = run(&pruned, 4.0);
        assert!(term > 0.0);
        let (kl_only, _, kl_grads) = run(&pruned, 0.0);
        assert!((loss - kl_only - 4.0 * term).abs() < 1e-6 * loss);
        let norm = |g: &BTreeMap<String, Vec<f32>>| {
            g.values()
                .flatten()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let hidden_part: BTreeMap<String, Vec<f32>> = grads
            .iter()
            .map(|(n, g)| {
                (
                    n.clone(),
                    g.iter().zip(&kl_grads[n]).map(|(a, b)| a - b).collect(),
                )
            })
            .collect();
        assert!(
            norm(&hidden_part) > norm(&kl_grads),
            "the hidden term should dominate"
        );

        // Directions: the gradient itself (unit length), and a fixed pseudo-random one.
        let mut state = 0x2545_f491u32;
        let random: BTreeMap<String, Vec<f32>> = grads
            .iter()
            .map(|(n, g)| {
                let v = g.iter().map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state as f32 / u32::MAX as f32 - 0.5
                });
                (n.clone(), v.collect())
            })
            .collect();
        let g_norm = norm(&grads);
        let along_gradient: BTreeMap<String, Vec<f32>> = grads
            .iter()
            .map(|(n, g)| {
                (
                    n.clone(),
                    g.iter().map(|v| (f64::from(*v) / g_norm) as f32).collect(),
                )
            })
            .collect();
        for direction in [along_gradient, random] {
            let unit = norm(&direction);
            let eps = 1e-2 / unit;
            let shifted = |sign: f64| {
                let mut m = pruned.clone();
                for (name, v) in &direction {
                    let w = m.weight(name).unwrap();
                    let dims = w.dims().to_vec();
                    let mut data = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    for (x, v) in data.iter_mut().zip(v) {
                        *x += (sign * eps * f64::from(*v)) as f32;
                    }
                    let t = Tensor::from_vec(data, dims, &Device::Cpu).unwrap();
                    m.set_weight(name, t, false).unwrap();
                }
                run(&m, 4.0).0
            };
            let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
            let analytic: f64 = direction
                .iter()
                .map(|(n, v)| {
                    v.iter()
                        .zip(&grads[n])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                })
                .sum();
            // Within 1% of the projection itself (a gradient off by any factor misses that).
            assert!(
                (numeric - analytic).abs() < 1e-2 * analytic.abs(),
                "finite differences {numeric:.6} against the gradient's {analytic:.6} (|v| = {unit:.3})"
            );
        }
    }

    /// Refused: a negative or NaN weight, and the term without a teacher.
    #[test]
    fn hidden_state_distillation_checks_its_settings() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let d = KL_AT_T1;
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let pass = TrainingPass::new(&s)
                .unwrap()
                .with_teacher(&s, &s, d)
                .unwrap();
            assert!(pass.with_hidden_distillation(bad).is_err(), "{bad}");
        }
        let err = TrainingPass::new(&s)
            .unwrap()
            .with_hidden_distillation(1.0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("needs a teacher"), "{err}");
        assert!(
            TrainingPass::new(&s)
                .unwrap()
                .with_hidden_distillation(0.0)
                .is_ok()
        );
    }

    /// A pass reused after `reset` (its pooled buffers hold the last batch's values) gives
    /// exactly the gradients of a fresh pass, so a training loop may keep one.
    #[test]
    fn reused_pass_equals_fresh_pass_bit_for_bit() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let (first, second) = (sequences(2, 33, 1), sequences(4, 17, 3));
        let mut reused = TrainingPass::new(&s).unwrap();
        reused.accumulate(&s, &first).unwrap();
        reused.reset();
        reused.accumulate(&s, &second).unwrap();
        let mut fresh = TrainingPass::new(&s).unwrap();
        fresh.accumulate(&s, &second).unwrap();
        assert_eq!(reused.mean_loss().to_bits(), fresh.mean_loss().to_bits());
        let mut buf = Vec::new();
        for linear in s.block_linears() {
            assert!(reused.mean_into(linear.name(), &mut buf));
            let mut want = Vec::new();
            assert!(fresh.mean_into(linear.name(), &mut want));
            assert!(
                buf.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}",
                linear.name()
            );
        }
        assert!(!reused.mean_into("no.such.weight", &mut buf));
    }

    /// Every layer's mean gradient from `pass`, by name.
    fn means(pass: &TrainingPass, s: &Session) -> BTreeMap<String, Vec<f32>> {
        s.block_linears()
            .into_iter()
            .map(|l| {
                let mut g = Vec::new();
                assert!(pass.mean_into(l.name(), &mut g));
                (l.name().to_string(), g)
            })
            .collect()
    }

    /// The largest `|b − a|` of a layer over the layer's largest `|a|`, over all layers.
    fn worst_relative(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
        let mut worst = 0f32;
        for (name, a) in a {
            let b = &b[name];
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(diff / scale.max(f32::MIN_POSITIVE));
        }
        worst
    }

    /// The mixed-precision pass ran its bf16 products (its gradients differ from the f32
    /// pass's) and stays within what rounding their operands to bf16 allows (each product off
    /// by at most 2⁻⁸ of itself; through two blocks and the LM head the gradients stay within
    /// a few percent of each layer's largest entry), with and without a teacher. A wrong
    /// layout (a copy not transposed, a panel's pair swapped) is off by the gradient's size.
    #[test]
    fn bf16_pass_is_the_f32_pass_within_bf16_rounding() {
        if !TrainingPass::bf16_available() {
            eprintln!("skipped: this CPU has no AVX512-BF16, which the bf16 pass needs");
            return;
        }
        let model = builtin_model("tiny-llama").unwrap();
        let mut pruned = model.clone();
        let name = "model.layers.1.self_attn.o_proj.weight";
        let w = pruned.weight(name).unwrap().clone();
        pruned.set_weight(name, (w * 0.5).unwrap(), false).unwrap();
        let teacher = Session::new(&model).unwrap();
        let s = Session::new(&pruned).unwrap();
        let seqs = sequences(3, 40, 5);
        for distill in [None, Some(KL_AT_T1)] {
            let run = |precision| {
                let mut pass = TrainingPass::new(&s)
                    .unwrap()
                    .with_precision(precision)
                    .unwrap();
                if let Some(d) = distill {
                    pass = pass.with_teacher(&s, &teacher, d).unwrap();
                }
                pass.accumulate(&s, &seqs).unwrap();
                (pass.mean_loss(), means(&pass, &s))
            };
            let (loss, grads) = run(Precision::F32);
            let (loss16, grads16) = run(Precision::Bf16);
            let worst = worst_relative(&grads, &grads16);
            assert!(
                worst > 0.0 && worst < 0.05,
                "distill {distill:?}: max |Δg| / max |g| = {worst:.2e}"
            );
            assert!(
                (loss16 - loss).abs() <= 1e-2 * loss.abs(),
                "distill {distill:?}: loss {loss16} against {loss}"
            );
        }
    }

    /// A bf16 pass reused over changing weights (a training loop's) gives exactly the
    /// gradients of a fresh pass on the new weights: the student's copies are rounded again.
    #[test]
    fn reused_bf16_pass_follows_the_weights() {
        if !TrainingPass::bf16_available() {
            eprintln!("skipped: this CPU has no AVX512-BF16, which the bf16 pass needs");
            return;
        }
        let model = builtin_model("tiny-llama").unwrap();
        let mut changed = model.clone();
        let name = "model.layers.0.mlp.gate_proj.weight";
        let w = changed.weight(name).unwrap().clone();
        changed
            .set_weight(name, (w * -0.75).unwrap(), false)
            .unwrap();
        let (s, s2) = (
            Session::new(&model).unwrap(),
            Session::new(&changed).unwrap(),
        );
        let seqs = sequences(2, 33, 1);
        let bf16 = || {
            TrainingPass::new(&s)
                .unwrap()
                .with_precision(Precision::Bf16)
                .unwrap()
        };
        let mut reused = bf16();
        reused.accumulate(&s, &seqs).unwrap();
        reused.reset();
        reused.accumulate(&s2, &seqs).unwrap();
        let mut fresh = bf16();
        fresh.accumulate(&s2, &seqs).unwrap();
        assert_eq!(reused.mean_loss().to_bits(), fresh.mean_loss().to_bits());
        let (a, b) = (means(&reused, &s2), means(&fresh, &s2));
        for (name, g) in &a {
            let same = g
                .iter()
                .zip(&b[name])
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name}");
        }
    }

    /// GPT-2 is refused with a message (callers fall back to autograd), and a pass refuses a
    /// session whose layers are not the ones it was made for.
    #[test]
    fn unsupported_models_and_foreign_sessions_are_refused() {
        let gpt2 = Session::new(&builtin_model("tiny-gpt2").unwrap()).unwrap();
        assert!(!TrainingPass::supports(&gpt2));
        let err = TrainingPass::new(&gpt2).err().unwrap().to_string();
        assert!(err.contains("LLaMA"), "{err}");
        let llama = Session::new(&builtin_model("tiny-llama").unwrap()).unwrap();
        let mut pass = TrainingPass::new(&llama).unwrap();
        assert!(pass.accumulate(&gpt2, &sequences(1, 8, 0)).is_err());
        let err = pass.accumulate(&llama, &[vec![3]]).unwrap_err().to_string();
        assert!(err.contains("at least 2 tokens"), "{err}");
    }
}

#[cfg(test)]
mod block_sparse_tests {
    use super::*;
    use crate::builtin_model;

    /// A layer declared block-sparse gives the same loss as the dense pass, the same gradient
    /// on its kept blocks and zero on its pruned ones; `set_mask(None)` goes back to dense.
    #[test]
    fn block_sparse_layers_match_the_dense_pass_on_kept_blocks() {
        let mut model = builtin_model("tiny-llama").unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let w = model.weight(name).unwrap().clone();
        let (out, inp) = w.dims2().unwrap();
        // Keep 1 block in 4 (by a fixed pattern), zero the rest of the weight.
        let keep: Vec<bool> = (0..out * inp)
            .map(|i| ((i / inp) / 16 + (i % inp) / 16) % 4 == 0)
            .collect();
        let mut values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values
            .iter_mut()
            .zip(&keep)
            .filter(|(_, k)| !**k)
            .for_each(|(v, _)| *v = 0.0);
        model
            .set_weight(
                name,
                Tensor::from_vec(values, (out, inp), &Device::Cpu).unwrap(),
                false,
            )
            .unwrap();
        let s = Session::new(&model).unwrap();
        let seqs: Vec<Vec<u32>> = (0..2u32)
            .map(|k| (0..30u32).map(|i| (i * 31 + 7 * k + 2) % 256).collect())
            .collect();
        let mut dense = TrainingPass::new(&s).unwrap();
        dense.accumulate(&s, &seqs).unwrap();
        let mut sparse = TrainingPass::new(&s).unwrap();
        assert!(sparse.set_mask(name, Some(&keep)).unwrap());
        sparse.accumulate(&s, &seqs).unwrap();
        assert!((dense.mean_loss() - sparse.mean_loss()).abs() < 1e-6);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for linear in s.block_linears() {
            dense.mean_into(linear.name(), &mut a);
            sparse.mean_into(linear.name(), &mut b);
            let scale = a.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let want = if linear.name() == name && !keep[i] {
                    0.0
                } else {
                    *x
                };
                assert!(
                    (want - y).abs() <= 1e-5 * scale,
                    "{} [{i}]: {y} vs {want}",
                    linear.name()
                );
            }
        }
        // A dense mask (every block kept) stays on the dense GEMM; unknown names and wrong
        // sizes are errors.
        assert!(!sparse.set_mask(name, Some(&vec![true; out * inp])).unwrap());
        assert!(sparse.set_mask("nope", None).is_err());
        assert!(sparse.set_mask(name, Some(&[true; 3])).is_err());
        assert!(!sparse.set_mask(name, None).unwrap());
    }
}
