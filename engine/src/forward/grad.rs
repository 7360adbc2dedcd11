//! Gradients of the next-token loss with respect to every block linear weight, through candle's
//! autograd.
//!
//! The inference path ([`super::Session::hidden_states`]) uses fused kernels candle cannot
//! differentiate, so this module runs a second forward pass built only from candle operations
//! that have a backward rule (matmul, narrow/cat, exp, sqr, sqrt, recip, gelu, silu, ...). The
//! block linear weights become [`Var`]s (one copy, made once per [`LossGradients`]); norms,
//! embeddings and the LM head stay constants, so their gradients are never formed.
//!
//! The LM head is differentiated by hand: the gradient of the mean cross-entropy with respect to
//! the logits is `softmax - onehot`, so `dL/dh = (softmax - onehot) · W_head / (T - 1)` is formed
//! chunk by chunk (never all `T × vocab` logits at once, and never the `vocab × hidden` weight
//! gradient autograd would compute for the tied embedding). The blocks' graph is then closed with
//! the surrogate `sum(h ⊙ dL/dh)`, whose gradients equal those of the loss.
//!
//! Distillation ([`LossGradients::with_teacher`]): the loss becomes, per predicted token,
//! `(1 − α)·CE + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`, with `z_t` the logits of a teacher
//! session (the dense model) on the same tokens, from its inference path. The gradient with
//! respect to the student's logits is `(1 − α)(softmax(z_s) − onehot) + α·T·(softmax(z_s/T) −
//! softmax(z_t/T))`, formed in the same chunks; the teacher's logits are made chunk by chunk
//! from its final hidden states, so neither model ever holds all `T × vocab` logits.
//!
//! Several sequences run as one batch (`[B·T, hidden]` through the linears), so a weight's
//! gradient for the batch is one large matmul instead of B small ones.

use std::collections::BTreeMap;

use candle_core::{D, Device, Tensor, Var};

use super::ops::{self, RopeTable};
use super::{Block, LM_HEAD_CHUNK, Mlp, Norm, QkvProj, Session};
use crate::error::EngineError;
use crate::linear::{Linear, LinearWeight};

/// Tokens per batch of the backward pass. On SmolLM2-135M (2 cores) 256 ran at 99 tokens/s
/// with a 3.3 GB peak, 512 at 88 and 1024 at 64 (7.6 GB): bigger graphs lose more to page
/// faults and cache misses than they gain in matmul size.
const BATCH_TOKENS: usize = 256;

/// Accumulates, over calibration sequences, the gradient of each sequence's mean next-token
/// loss with respect to every dense block linear weight (`[out, in]`, like the weights), and
/// optionally ([`LossGradients::with_squares`]) the squares of those per-sequence gradients.
///
/// [`LossGradients::finish`] divides by the number of sequences: the result is the gradient of
/// the mean calibration loss, `∂/∂W (1/S) Σ_s loss_s`, and the mean squared per-sequence
/// gradient `(1/S) Σ_s (∂loss_s/∂W)²`, the diagonal of the empirical Fisher information.
pub struct LossGradients<'a> {
    session: &'a Session,
    /// Weight name → its differentiable copy.
    vars: BTreeMap<String, Var>,
    /// Weight name → running sum of gradients, row-major `[out, in]`.
    sums: BTreeMap<String, Vec<f32>>,
    /// Weight name → running sum of squared per-sequence gradients, when asked for.
    squares: Option<BTreeMap<String, Vec<f32>>>,
    sequences: usize,
    loss_sum: f64,
    /// The teacher and the mix, when distilling.
    teacher: Option<(&'a Session, Distillation)>,
    /// Running sums of the per-sequence mean cross-entropy and KL, when distilling.
    parts_sum: (f64, f64),
}

/// How a distillation term joins the next-token loss: `(1 − weight)·CE + weight ·
/// temperature² · KL(teacher ‖ student)` at `temperature`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distillation {
    /// `α` in `[0, 1]`: 0 is plain cross-entropy, 1 distillation alone.
    pub weight: f64,
    /// `T > 0`, dividing both models' logits before their softmax.
    pub temperature: f64,
}

impl<'a> LossGradients<'a> {
    /// Prepares `session` for differentiation. Fails when a block linear is not held as a dense
    /// f32 weight (e.g. already pointed at a sparse kernel).
    pub fn new(session: &'a Session) -> Result<Self, EngineError> {
        let mut vars = BTreeMap::new();
        for linear in session.block_linears() {
            let LinearWeight::Dense(w) = linear.weight() else {
                return Err(EngineError::Tensor {
                    name: linear.name().to_string(),
                    message: "gradients need the dense weight, but this layer runs another kernel"
                        .into(),
                });
            };
            vars.insert(linear.name().to_string(), Var::from_tensor(w)?);
        }
        Ok(LossGradients {
            session,
            vars,
            sums: BTreeMap::new(),
            squares: None,
            sequences: 0,
            loss_sum: 0.0,
            teacher: None,
            parts_sum: (0.0, 0.0),
        })
    }

    /// Adds distillation from `teacher` (see the module doc). Fails when the teacher's
    /// vocabulary differs from the student's, or `distillation` is out of range.
    pub fn with_teacher(
        mut self,
        teacher: &'a Session,
        distillation: Distillation,
    ) -> Result<Self, EngineError> {
        check_distillation(self.session, teacher, distillation)?;
        self.teacher = Some((teacher, distillation));
        Ok(self)
    }

    /// Also accumulates the squared gradient of every sequence (the empirical Fisher diagonal).
    /// Each sequence then runs as its own batch, so its gradient is its own.
    pub fn with_squares(mut self) -> Self {
        self.squares = Some(BTreeMap::new());
        self
    }

    /// Runs `sequences` (each at least 2 tokens) forward and backward, adding each one's
    /// gradient. Sequences of equal length are batched together; batches run one after the
    /// other (two at a time measured slower on 2 cores: they fight over the caches).
    pub fn accumulate(&mut self, sequences: &[Vec<u32>]) -> Result<(), EngineError> {
        // With squares, each sequence runs alone so its gradient is its own.
        let tokens = if self.squares.is_some() {
            0
        } else {
            BATCH_TOKENS
        };
        let batches = equal_length_batches(sequences, tokens);
        for batch in batches {
            let result = self.batch_gradients(batch)?;
            self.add(result)?;
        }
        Ok(())
    }

    /// Sequences seen so far.
    pub fn sequences(&self) -> usize {
        self.sequences
    }

    /// Mean loss of the sequences seen so far (the forward pass of the gradients).
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.sequences.max(1) as f64
    }

    /// When distilling, the mean cross-entropy and the mean KL (at the temperature, before
    /// its weight and `T²`) of the sequences seen so far; [`LossGradients::mean_loss`] is
    /// their mix.
    pub fn mean_parts(&self) -> Option<(f64, f64)> {
        let n = self.sequences.max(1) as f64;
        self.teacher
            .map(|_| (self.parts_sum.0 / n, self.parts_sum.1 / n))
    }

    /// The mean gradient per weight name, `[out, in]` f32 tensors, and the mean squared
    /// gradient when [`LossGradients::with_squares`] asked for it.
    pub fn finish(mut self) -> Result<GradientStats, EngineError> {
        let n = self.sequences.max(1) as f32;
        let mut mean = BTreeMap::new();
        let mut mean_squares = self.squares.as_ref().map(|_| BTreeMap::new());
        for (name, var) in &self.vars {
            let dims = var.as_tensor().dims().to_vec();
            // Divided in place and moved into the tensor: no second copy of every gradient.
            let take = |sums: &mut BTreeMap<String, Vec<f32>>| -> Result<Tensor, EngineError> {
                let data = match sums.remove(name) {
                    Some(mut sum) => {
                        sum.iter_mut().for_each(|g| *g /= n);
                        sum
                    }
                    None => vec![0f32; dims.iter().product()],
                };
                Ok(Tensor::from_vec(data, dims.clone(), &Device::Cpu)?)
            };
            mean.insert(name.clone(), take(&mut self.sums)?);
            if let (Some(squares), Some(out)) = (self.squares.as_mut(), mean_squares.as_mut()) {
                out.insert(name.clone(), take(squares)?);
            }
        }
        Ok(GradientStats { mean, mean_squares })
    }

    fn add(&mut self, batch: BatchGradients) -> Result<(), EngineError> {
        self.loss_sum += batch.loss_sum;
        self.parts_sum.0 += batch.parts_sum.0;
        self.parts_sum.1 += batch.parts_sum.1;
        self.sequences += batch.sequences;
        for (name, g) in batch.grads {
            // Read in place (no copy of a gradient the size of the model per batch).
            ops::with_f32(&g, |g| {
                if let Some(squares) = self.squares.as_mut() {
                    match squares.get_mut(&name) {
                        Some(sum) => sum.iter_mut().zip(g).for_each(|(s, g)| *s += g * g),
                        None => {
                            squares.insert(name.clone(), g.iter().map(|g| g * g).collect());
                        }
                    }
                }
                match self.sums.get_mut(&name) {
                    Some(sum) => sum.iter_mut().zip(g).for_each(|(s, g)| *s += g),
                    None => {
                        self.sums.insert(name.clone(), g.to_vec());
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Forward and backward over one batch of equally long sequences.
    fn batch_gradients(&self, batch: &[Vec<u32>]) -> Result<BatchGradients, EngineError> {
        let s = self.session;
        let (b, t) = (batch.len(), batch[0].len());
        if t < 2 {
            return Err(EngineError::Input(format!(
                "a loss needs at least 2 tokens per sequence, got {t}"
            )));
        }
        for seq in batch {
            s.check_tokens(seq, 0)?;
        }
        let flat: Vec<u32> = batch.iter().flatten().copied().collect();
        let hidden = self.hidden(&flat, b, t)?;
        // dL/dh from the LM head, by hand (see the module doc), with the losses.
        let detached = hidden.detach();
        let mut dh = vec![0f32; b * t * hidden.dims()[1]];
        let mut loss_sum = 0.0;
        let mut parts_sum = (0.0, 0.0);
        for (k, seq) in batch.iter().enumerate() {
            let h = detached.narrow(0, k * t, t)?;
            let (loss, grad) = match self.teacher {
                None => head_gradient(&s.lm_head, &h, seq)?,
                Some((teacher, d)) => {
                    // The teacher's final hidden states from its (fused) inference path.
                    let th = teacher.hidden_states(seq, None, None)?;
                    let (ce, kl, grad) =
                        distill_head_gradient(&s.lm_head, &h, (&teacher.lm_head, &th), seq, d)?;
                    parts_sum.0 += ce;
                    parts_sum.1 += kl;
                    (
                        (1.0 - d.weight) * ce + d.weight * d.temperature * d.temperature * kl,
                        grad,
                    )
                }
            };
            loss_sum += loss;
            let width = grad.len();
            dh[k * width..(k + 1) * width].copy_from_slice(&grad);
        }
        let dh = Tensor::from_vec(dh, hidden.dims(), &Device::Cpu)?;
        let surrogate = (hidden * dh)?.sum_all()?;
        let mut store = surrogate.backward()?;
        let mut grads = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            if let Some(g) = store.remove(var.as_tensor()) {
                grads.push((name.clone(), g));
            }
        }
        Ok(BatchGradients {
            loss_sum,
            parts_sum,
            sequences: b,
            grads,
        })
    }

    /// Final hidden states `[B·T, hidden]` of `b` sequences of `t` tokens, as a graph.
    fn hidden(&self, flat: &[u32], b: usize, t: usize) -> Result<Tensor, EngineError> {
        let s = self.session;
        let ids = Tensor::from_slice(flat, flat.len(), &Device::Cpu)?;
        let mut x = s.embed.index_select(&ids, 0)?;
        if let Some(pos) = &s.pos_embed {
            let pos = pos.narrow(0, 0, t)?.repeat((b, 1))?;
            x = (x + pos)?;
        }
        let rope = match s.rope_theta {
            Some(theta) => Some(RopeTensors::new(&RopeTable::new(s.head_dim, theta, 0, t))?),
            None => None,
        };
        let causal = causal_bias(t)?;
        for (layer, block) in s.blocks.iter().enumerate() {
            let h = norm(&block.attn_norm, &x)?;
            let attn = self.attention(block, layer, &h, b, t, rope.as_ref(), &causal)?;
            x = (x + attn)?;
            let h = norm(&block.mlp_norm, &x)?;
            let mlp = match &block.mlp {
                Mlp::Gated { gate, up, down } => {
                    let g = self.linear(gate, &h)?;
                    let u = self.linear(up, &h)?;
                    self.linear(down, &(g.silu()? * u)?)?
                }
                Mlp::Plain { up, down, act } => {
                    let u = act.apply(&self.linear(up, &h)?)?;
                    self.linear(down, &u)?
                }
            };
            x = (x + mlp)?;
        }
        norm(&s.final_norm, &x)
    }

    /// `x · Wᵀ + b` with the layer's differentiable weight.
    fn linear(&self, linear: &Linear, x: &Tensor) -> Result<Tensor, EngineError> {
        let w = self
            .vars
            .get(linear.name())
            .ok_or_else(|| EngineError::Tensor {
                name: linear.name().to_string(),
                message: "internal: no differentiable copy of this weight".into(),
            })?;
        let y = x.matmul(&w.as_tensor().t()?)?;
        Ok(match linear.bias() {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        block: &Block,
        layer: usize,
        h: &Tensor,
        b: usize,
        t: usize,
        rope: Option<&RopeTensors>,
        causal: &Tensor,
    ) -> Result<Tensor, EngineError> {
        let s = self.session;
        let d = s.head_dim;
        let (heads, kv_heads) = (block.heads, block.kv_heads);
        let group = heads / kv_heads;
        let (q, k, v) = match &block.qkv {
            QkvProj::Split { q, k, v } => {
                (self.linear(q, h)?, self.linear(k, h)?, self.linear(v, h)?)
            }
            QkvProj::Fused(qkv) => {
                let all = self.linear(qkv, h)?;
                let w = heads * d;
                (
                    all.narrow(1, 0, w)?,
                    all.narrow(1, w, w)?,
                    all.narrow(1, 2 * w, w)?,
                )
            }
        };
        // [B·T, n·d] → [B, n, T, d], rotated.
        let split = |x: Tensor, n: usize, rotate: bool| -> Result<Tensor, EngineError> {
            let x = x.reshape((b, t, n, d))?;
            let x = match (rotate, rope) {
                (true, Some(r)) => r.apply(&x)?,
                _ => x,
            };
            Ok(x.transpose(1, 2)?.contiguous()?)
        };
        let q = split(q, heads, true)?;
        let k = split(k, kv_heads, true)?;
        let v = split(v, kv_heads, false)?;
        // Query heads sharing a KV head stack along the rows: [B, kv, group · T, d].
        let q = q.reshape((b, kv_heads, group * t, d))?;
        let scores = (q.matmul(&k.t()?)? * s.attention_scale(layer))?;
        let scores = scores
            .reshape((b, kv_heads, group, t, t))?
            .broadcast_add(causal)?;
        // Softmax is shift-invariant, so the row maximum is subtracted as a constant.
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let ctx = probs
            .reshape((b, kv_heads, group * t, t))?
            .matmul(&v)?
            .reshape((b, heads, t, d))?
            .transpose(1, 2)?
            .reshape((b * t, heads * d))?;
        self.linear(&block.o, &ctx)
    }
}

/// Consecutive runs of equally long sequences, each run up to `tokens` tokens (at least one
/// sequence per run): the batches both training passes form.
pub(super) fn equal_length_batches(sequences: &[Vec<u32>], tokens: usize) -> Vec<&[Vec<u32>]> {
    let mut batches = Vec::new();
    let mut i = 0;
    while i < sequences.len() {
        let len = sequences[i].len();
        let per_batch = (tokens / len.max(1)).max(1);
        let mut j = i + 1;
        while j < sequences.len() && j - i < per_batch && sequences[j].len() == len {
            j += 1;
        }
        batches.push(&sequences[i..j]);
        i = j;
    }
    batches
}

/// Fails when the teacher's vocabulary differs from the student's, or `distillation` is out of
/// range.
pub(super) fn check_distillation(
    student: &Session,
    teacher: &Session,
    distillation: Distillation,
) -> Result<(), EngineError> {
    if teacher.vocab_size() != student.vocab_size() {
        return Err(EngineError::Input(format!(
            "the teacher's vocabulary has {} entries, the student's {}",
            teacher.vocab_size(),
            student.vocab_size()
        )));
    }
    let Distillation {
        weight,
        temperature,
    } = distillation;
    if !((0.0..=1.0).contains(&weight) && temperature.is_finite() && temperature > 0.0) {
        return Err(EngineError::Input(format!(
            "distillation needs a weight in [0, 1] and a temperature > 0, got {weight} and {temperature}"
        )));
    }
    Ok(())
}

/// What [`LossGradients::finish`] returns, per weight name, `[out, in]`.
pub struct GradientStats {
    /// Gradient of the mean calibration loss.
    pub mean: BTreeMap<String, Tensor>,
    /// Mean over sequences of the squared per-sequence gradient (empirical Fisher diagonal),
    /// when it was asked for.
    pub mean_squares: Option<BTreeMap<String, Tensor>>,
}

/// The result of one batch, before it is added to the running sums.
struct BatchGradients {
    loss_sum: f64,
    parts_sum: (f64, f64),
    sequences: usize,
    grads: Vec<(String, Tensor)>,
}

/// `0` where key `j` is visible from query `i` (`j <= i`), a large negative number elsewhere.
fn causal_bias(t: usize) -> Result<Tensor, EngineError> {
    let data: Vec<f32> = (0..t * t)
        .map(|k| if k % t <= k / t { 0.0 } else { -1e30 })
        .collect();
    Ok(Tensor::from_vec(data, (t, t), &Device::Cpu)?)
}

/// A norm built from differentiable candle operations (its own weights are constants).
fn norm(norm: &Norm, x: &Tensor) -> Result<Tensor, EngineError> {
    let vec = |v: &[f32]| Tensor::from_slice(v, v.len(), &Device::Cpu);
    Ok(match norm {
        Norm::Rms { weight, eps } => {
            let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                .sqrt()?
                .recip()?;
            x.broadcast_mul(&inv)?.broadcast_mul(&vec(weight)?)?
        }
        Norm::Layer { weight, bias, eps } => {
            let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let inv = (centered.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                .sqrt()?
                .recip()?;
            centered
                .broadcast_mul(&inv)?
                .broadcast_mul(&vec(weight)?)?
                .broadcast_add(&vec(bias)?)?
        }
    })
}

/// Rotary tables as tensors `[1, T, 1, half]`, to rotate `[B, T, heads, d]` by broadcasting.
struct RopeTensors {
    cos: Tensor,
    sin: Tensor,
    half: usize,
}

impl RopeTensors {
    fn new(table: &RopeTable) -> Result<Self, EngineError> {
        let half = table.half;
        let t = table.cos.len() / half.max(1);
        let cos = Tensor::from_slice(&table.cos, (1, t, 1, half), &Device::Cpu)?;
        let sin = Tensor::from_slice(&table.sin, (1, t, 1, half), &Device::Cpu)?;
        Ok(RopeTensors { cos, sin, half })
    }

    /// transformers' `rotate_half` convention: `(a, b) → (a·cos − b·sin, b·cos + a·sin)`.
    fn apply(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        let a = x.narrow(D::Minus1, 0, self.half)?;
        let b = x.narrow(D::Minus1, self.half, self.half)?;
        let ra = (a.broadcast_mul(&self.cos)? - b.broadcast_mul(&self.sin)?)?;
        let rb = (b.broadcast_mul(&self.cos)? + a.broadcast_mul(&self.sin)?)?;
        Ok(Tensor::cat(&[ra, rb], D::Minus1)?)
    }
}

/// The mean next-token loss of one sequence and its gradient with respect to the final hidden
/// states `h: [T, hidden]` (row-major; the last row, which predicts nothing, is zero).
pub(super) fn head_gradient(
    head: &Linear,
    h: &Tensor,
    tokens: &[u32],
) -> Result<(f64, Vec<f32>), EngineError> {
    let (t, width) = h.dims2()?;
    let targets = &tokens[1..];
    let n = targets.len() as f32;
    let LinearWeight::Dense(w) = head.weight() else {
        return Err(EngineError::Tensor {
            name: head.name().to_string(),
            message: "gradients need the dense LM head".into(),
        });
    };
    let mut grad = vec![0f32; t * width];
    let mut loss = 0f64;
    for (c, chunk) in targets.chunks(LM_HEAD_CHUNK).enumerate() {
        let first = c * LM_HEAD_CHUNK;
        let logits = head.forward(&h.narrow(0, first, chunk.len())?)?;
        loss += ops::row_nll(&logits, chunk)?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
        // softmax − onehot, over the mean's 1/n.
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let mut dlogits = p.to_vec2::<f32>()?;
        for (row, &target) in dlogits.iter_mut().zip(chunk) {
            row[target as usize] -= 1.0;
            row.iter_mut().for_each(|v| *v /= n);
        }
        let rows = dlogits.len();
        let dlogits = Tensor::new(dlogits, &Device::Cpu)?.reshape((rows, ()))?;
        let dh = dlogits.matmul(w)?;
        let dh = dh.flatten_all()?.to_vec1::<f32>()?;
        grad[first * width..first * width + dh.len()].copy_from_slice(&dh);
    }
    Ok((loss / f64::from(n), grad))
}

/// With distillation: the mean cross-entropy and the mean KL of one sequence (see
/// [`Distillation`]) and the gradient of their mix with respect to the student's final hidden
/// states `h: [T, hidden]` (the last row zero), the teacher's logits made chunk by chunk from
/// its own head and final hidden states.
pub(super) fn distill_head_gradient(
    head: &Linear,
    h: &Tensor,
    (teacher_head, teacher_h): (&Linear, &Tensor),
    tokens: &[u32],
    d: Distillation,
) -> Result<(f64, f64, Vec<f32>), EngineError> {
    let (t, width) = h.dims2()?;
    if teacher_h.dims2()?.0 != t {
        return Err(EngineError::Input(
            "internal: the teacher's hidden states do not match the sequence".into(),
        ));
    }
    let targets = &tokens[1..];
    let n = targets.len() as f32;
    let LinearWeight::Dense(w) = head.weight() else {
        return Err(EngineError::Tensor {
            name: head.name().to_string(),
            message: "gradients need the dense LM head".into(),
        });
    };
    let (alpha, temp) = (d.weight as f32, d.temperature as f32);
    let (ce_scale, kl_scale) = (1.0 - alpha, alpha * temp);
    let mut grad = vec![0f32; t * width];
    let (mut ce, mut kl) = (0f64, 0f64);
    let mut ps = Vec::new();
    let mut pt = Vec::new();
    for (c, chunk) in targets.chunks(LM_HEAD_CHUNK).enumerate() {
        let first = c * LM_HEAD_CHUNK;
        let logits = head.forward(&h.narrow(0, first, chunk.len())?)?;
        let teacher = teacher_head
            .forward(&teacher_h.narrow(0, first, chunk.len())?)?
            .to_vec2::<f32>()?;
        ce += ops::row_nll(&logits, chunk)?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
        // softmax(z_s), exactly as the plain loss forms it (weight 0 gives its bits).
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let student = logits.to_vec2::<f32>()?;
        let mut dlogits = p.to_vec2::<f32>()?;
        for (((row, &target), zs), zt) in dlogits.iter_mut().zip(chunk).zip(&student).zip(&teacher)
        {
            let lse_s = tempered_softmax(zs, temp, &mut ps);
            let lse_t = tempered_softmax(zt, temp, &mut pt);
            // KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), log p = z/T − lse.
            kl += zt
                .iter()
                .zip(zs)
                .zip(&pt)
                .map(|((&a, &b), &q)| {
                    let (a, b) = (f64::from(a / temp) - lse_t, f64::from(b / temp) - lse_s);
                    f64::from(q) * (a - b)
                })
                .sum::<f64>();
            for ((g, &a), &b) in row.iter_mut().zip(&ps).zip(&pt) {
                *g = ce_scale * *g + kl_scale * (a - b);
            }
            row[target as usize] -= ce_scale;
            row.iter_mut().for_each(|v| *v /= n);
        }
        let rows = dlogits.len();
        let dlogits = Tensor::new(dlogits, &Device::Cpu)?.reshape((rows, ()))?;
        let dh = dlogits.matmul(w)?;
        let dh = dh.flatten_all()?.to_vec1::<f32>()?;
        grad[first * width..first * width + dh.len()].copy_from_slice(&dh);
    }
    let n = f64::from(n);
    Ok((ce / n, kl / n, grad))
}

/// Writes `softmax(z / temp)` into `out` and returns the log-sum-exp of `z / temp` (f64).
fn tempered_softmax(z: &[f32], temp: f32, out: &mut Vec<f32>) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v / temp));
    out.clear();
    out.extend(z.iter().map(|&v| (v / temp - max).exp()));
    let sum: f64 = out.iter().map(|&v| f64::from(v)).sum();
    let inv = (1.0 / sum) as f32;
    out.iter_mut().for_each(|v| *v *= inv);
    f64::from(max) + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin_model;

    /// The gradients' forward pass computes the same loss as the inference path, on both
    /// architectures, batched or not.
    #[test]
    fn autograd_forward_matches_inference_loss() {
        for name in ["tiny-llama", "tiny-gpt2"] {
            let model = builtin_model(name).unwrap();
            let s = Session::new(&model).unwrap();
            let seqs: Vec<Vec<u32>> = (0..3)
                .map(|k| (0..40u32).map(|i| (i * 37 + 11 * k + 5) % 256).collect())
                .collect();
            let expected: f64 = seqs
                .iter()
                .map(|q| f64::from(s.loss(q).unwrap()))
                .sum::<f64>()
                / 3.0;
            let mut g = LossGradients::new(&s).unwrap();
            g.accumulate(&seqs).unwrap();
            assert_eq!(g.sequences(), 3);
            assert!((g.mean_loss() - expected).abs() < 1e-4, "{name}");
            let grads = g.finish().unwrap().mean;
            assert_eq!(grads.len(), s.block_linears().len());
        }
    }

    /// With squares, the mean squared gradient is the mean of each sequence's own squared
    /// gradient, and the mean gradient is unchanged by the per-sequence batching.
    #[test]
    fn squared_gradients_are_per_sequence() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let seqs: Vec<Vec<u32>> = (0..2)
            .map(|k| (0..20u32).map(|i| (i * 31 + 17 * k + 1) % 256).collect())
            .collect();
        let single = |q: &Vec<u32>| {
            let mut g = LossGradients::new(&s).unwrap();
            g.accumulate(std::slice::from_ref(q)).unwrap();
            g.finish().unwrap().mean
        };
        let (a, b) = (single(&seqs[0]), single(&seqs[1]));
        let mut both = LossGradients::new(&s).unwrap().with_squares();
        both.accumulate(&seqs).unwrap();
        let stats = both.finish().unwrap();
        let squares = stats.mean_squares.unwrap();
        let name = "model.layers.0.self_attn.v_proj.weight";
        let (ga, gb) = (
            a[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let sq = squares[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mean = stats.mean[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..sq.len() {
            let expected = (ga[i] * ga[i] + gb[i] * gb[i]) / 2.0;
            assert!(
                (sq[i] - expected).abs() <= 1e-6 * expected.abs().max(1e-6),
                "{i}"
            );
            assert!((mean[i] - (ga[i] + gb[i]) / 2.0).abs() < 1e-6, "{i}");
        }
    }

    /// A central finite difference along the gradient direction agrees with the gradient's
    /// squared norm (f64 accumulation of the losses keeps the difference meaningful).
    #[test]
    fn gradients_agree_with_finite_differences() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let seq: Vec<u32> = (0..24u32).map(|i| (i * 53 + 7) % 256).collect();
        let mut g = LossGradients::new(&s).unwrap();
        g.accumulate(std::slice::from_ref(&seq)).unwrap();
        let grads = g.finish().unwrap().mean;
        let name = "model.layers.1.mlp.up_proj.weight";
        let (slope, norm2) = slope_along(&s, name, &grads[name], 1e-2, |moved| {
            f64::from(moved.loss(&seq).unwrap())
        });
        let rel = (slope - norm2).abs() / norm2;
        assert!(rel < 2e-2, "finite difference {slope} vs |g|² {norm2}");
    }

    /// The central finite-difference slope of `objective` along the gradient `grad` of weight
    /// `name` (a step of `scale / |g|` each way from `session`'s weights), and `|g|²`, which
    /// the slope equals when `grad` is right.
    fn slope_along(
        session: &Session,
        name: &str,
        grad: &Tensor,
        scale: f64,
        objective: impl Fn(&Session) -> f64,
    ) -> (f64, f64) {
        let norm2: f64 = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .into();
        let eps = scale / norm2.sqrt();
        let at = |step: f64| {
            let mut moved = session.clone();
            let linear = moved.linear_mut(name).unwrap();
            let LinearWeight::Dense(w) = linear.weight() else {
                panic!("{name} is not dense")
            };
            let w = (w + (grad * step).unwrap()).unwrap();
            *linear = Linear::dense(name, w, None).unwrap();
            objective(&moved)
        };
        ((at(eps) - at(-eps)) / (2.0 * eps), norm2)
    }

    /// The distillation objective of `tokens`, in f64 from both models' full logits (an
    /// implementation independent of the chunked one).
    fn reference_objective(
        student: &Session,
        teacher: &Session,
        tokens: &[u32],
        d: Distillation,
    ) -> (f64, f64) {
        let rows = |s: &Session| -> Vec<Vec<f64>> {
            s.forward(tokens, None)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(f64::from).collect())
                .collect()
        };
        let log_softmax = |z: &[f64], temp: f64| -> Vec<f64> {
            let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v / temp));
            let lse = max + z.iter().map(|&v| (v / temp - max).exp()).sum::<f64>().ln();
            z.iter().map(|&v| v / temp - lse).collect()
        };
        let (zs, zt) = (rows(student), rows(teacher));
        let n = (tokens.len() - 1) as f64;
        let (mut ce, mut kl) = (0.0, 0.0);
        for i in 0..tokens.len() - 1 {
            ce -= log_softmax(&zs[i], 1.0)[tokens[i + 1] as usize];
            let (ls, lt) = (
                log_softmax(&zs[i], d.temperature),
                log_softmax(&zt[i], d.temperature),
            );
            kl += lt
                .iter()
                .zip(&ls)
                .map(|(t, s)| t.exp() * (t - s))
                .sum::<f64>();
        }
        (ce / n, kl / n)
    }

    /// A student that differs from the tiny model (its teacher): two weights scaled by −2.
    fn student_of(teacher: &Session) -> Session {
        let mut s = teacher.clone();
        for name in [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
        ] {
            let linear = s.linear_mut(name).unwrap();
            let LinearWeight::Dense(w) = linear.weight() else {
                panic!()
            };
            let w = (w * -2.0).unwrap();
            *linear = Linear::dense(name, w, None).unwrap();
        }
        s
    }

    /// With distillation, the parts agree with an f64 reference on full logits, and a central
    /// finite difference of that reference objective along the gradient agrees with the
    /// gradient's squared norm: with distillation alone (weight 1, so the KL's gradient is
    /// all there is) and mixed with cross-entropy.
    #[test]
    fn distillation_gradients_agree_with_finite_differences() {
        let model = builtin_model("tiny-llama").unwrap();
        let teacher = Session::new(&model).unwrap();
        let student = student_of(&teacher);
        let seq: Vec<u32> = (0..24u32).map(|i| (i * 53 + 7) % 256).collect();
        for (weight, temperature) in [(1.0, 2.0), (0.5, 2.0)] {
            let d = Distillation {
                weight,
                temperature,
            };
            let mut g = LossGradients::new(&student)
                .unwrap()
                .with_teacher(&teacher, d)
                .unwrap();
            g.accumulate(std::slice::from_ref(&seq)).unwrap();
            let (ce, kl) = g.mean_parts().unwrap();
            let (rce, rkl) = reference_objective(&student, &teacher, &seq, d);
            assert!((ce - rce).abs() < 1e-4, "CE {ce} vs {rce}");
            assert!(
                kl > 1e-3 && (kl - rkl).abs() < 1e-3 * rkl,
                "KL {kl} vs {rkl}"
            );
            let mix = |(ce, kl): (f64, f64)| {
                (1.0 - weight) * ce + weight * temperature * temperature * kl
            };
            assert!((g.mean_loss() - mix((rce, rkl))).abs() < 1e-4);
            let grads = g.finish().unwrap().mean;
            for name in [
                "model.layers.1.mlp.up_proj.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ] {
                let (slope, norm2) = slope_along(&student, name, &grads[name], 1e-1, |moved| {
                    mix(reference_objective(moved, &teacher, &seq, d))
                });
                let rel = (slope - norm2).abs() / norm2;
                assert!(
                    rel < 2e-2,
                    "{weight} {name}: finite difference {slope} vs |g|² {norm2}"
                );
            }
        }
    }

    /// Weight 0 gives the plain cross-entropy gradients bit for bit; a teacher equal to the
    /// student gives a zero KL, and gradients `(1 − α)` times the plain ones.
    #[test]
    fn distillation_limits() {
        let model = builtin_model("tiny-llama").unwrap();
        let teacher = Session::new(&model).unwrap();
        let student = student_of(&teacher);
        let seqs: Vec<Vec<u32>> = (0..2)
            .map(|k| (0..20u32).map(|i| (i * 31 + 17 * k + 1) % 256).collect())
            .collect();
        let run = |s: &Session, t: Option<(&Session, Distillation)>| {
            let mut g = LossGradients::new(s).unwrap();
            if let Some((t, d)) = t {
                g = g.with_teacher(t, d).unwrap();
            }
            g.accumulate(&seqs).unwrap();
            let (loss, parts) = (g.mean_loss(), g.mean_parts());
            let grads = g.finish().unwrap().mean;
            let flat: Vec<(String, Vec<f32>)> = grads
                .into_iter()
                .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
                .collect();
            (loss, parts, flat)
        };
        let (plain_loss, none, plain) = run(&student, None);
        assert_eq!(none, None);
        let d0 = Distillation {
            weight: 0.0,
            temperature: 2.0,
        };
        let (loss0, parts0, zero) = run(&student, Some((&teacher, d0)));
        assert_eq!(
            zero, plain,
            "weight 0 must give the plain gradients bit for bit"
        );
        assert_eq!(loss0.to_bits(), plain_loss.to_bits());
        assert!(parts0.unwrap().1 > 1e-4, "the models differ: {parts0:?}");
        let d = Distillation {
            weight: 0.5,
            temperature: 3.0,
        };
        let (_, same, half) = run(&student, Some((&student, d)));
        let (ce, kl) = same.unwrap();
        assert!((ce - plain_loss).abs() < 1e-9, "{ce} vs {plain_loss}");
        assert!(kl.abs() < 1e-7, "KL of a model against itself: {kl}");
        for ((name, h), (_, p)) in half.iter().zip(&plain) {
            let scale = p.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (h, p) in h.iter().zip(p) {
                assert!((h - 0.5 * p).abs() <= 1e-4 * scale, "{name}: {h} vs {p}/2");
            }
        }
        // Out-of-range settings are refused.
        for (weight, temperature) in [(1.5, 1.0), (-0.1, 1.0), (0.5, 0.0), (0.5, f64::NAN)] {
            let d = Distillation {
                weight,
                temperature,
            };
            assert!(
                LossGradients::new(&student)
                    .unwrap()
                    .with_teacher(&teacher, d)
                    .is_err()
            );
        }
    }
}
