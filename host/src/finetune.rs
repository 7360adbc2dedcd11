//! Masked fine-tuning: the pipeline's `[finetune]` section, run after the pruning stages and
//! before evaluation and export, trains every block linear (embeddings, norms and the LM head
//! stay frozen) on next-token cross-entropy with [`crate::optim::AdamW`], holding every mask.
//!
//! The loop is independent of how gradients are made: each step asks the engine's
//! hand-written [`TrainingPass`] (or, for models it does not cover, [`LossGradients`] through
//! candle's autograd) for the mean gradient of `batch × accumulate` sequences (accumulated
//! micro-batch by micro-batch, so memory follows `batch`), zeroes the pruned positions, clips
//! the global norm and updates the master copy of the weights (`f32`, row-major), which it then
//! hands back to the engine's [`Session`].
//!
//! Data: the training text is tokenized once and cut into consecutive sequences of `seq_len`
//! tokens, visited in an order shuffled at the start of every epoch by a ChaCha8 generator
//! seeded from `seed` (stable across platforms and releases of `rand_chacha`).
//!
//! Checkpoints: every `checkpoint_every` steps (and after the last) one safetensors file,
//! `finetune-checkpoint.safetensors` in the checkpoint folder, is replaced atomically (temporary
//! file and rename). It holds the trained weights, both AdamW moments, the masks, the epoch's
//! order, and in its metadata the step, the data position, the generator's exact state (seed and
//! word position), the loss history and a fingerprint of everything that decides the result
//! (model, pipeline, text, settings). A run that finds a checkpoint with its own fingerprint
//! resumes from it; any other checkpoint is refused and left untouched. Every computation is
//! deterministic for a given machine and thread count, so a resumed run ends with the same
//! weights, bit for bit, as one that was never interrupted (`resume_equals_uninterrupted_run`).
//!
//! Distillation (`distill` in the section): the loss mixes the next-token cross-entropy with
//! the KL divergence from the dense model's predictions (see the engine's [`Distillation`]).
//! The teacher is the run's input model, before any stage pruned it; its logits are made on
//! the fly from its final hidden states (the LM head and final norm are frozen and shared), so
//! nothing the size of `T × vocab` is kept. Both parts are reported per step, in the curve and
//! in the checkpoint, and the settings are part of the fingerprint.
//!
//! Scheduled pruning ([`crate::schedule`]): a [`Pruner`] re-runs the pipeline's scheduled stages
//! at their events, between steps, on the weights as trained so far. The new masks are
//! intersected with the current ones (masks only shrink), and the newly pruned weights and both
//! their AdamW moments are zeroed, so the invariant above holds for the masks of the moment.
//! The schedule's position is a function of the step and the masks are in the checkpoint, so a
//! resume across an event is as exact as any other (`scheduled_resume_across_an_event`).
//!
//! Mask updates ([`crate::dynamic`], RigL and SET): the same [`Pruner`] runs the stages with
//! `update = { … }` at their update steps. Between updates the loop sums the dense gradient of
//! their layers (taken before masking and clipping, so pruned positions have values); at an
//! update the plugin gets the mean and returns masks of unchanged density, and every newly kept
//! weight starts at exactly zero with both moments reset while every dropped weight and its
//! moments become exact zeros. The sum and its step count are in the checkpoint, and an
//! update's position is a function of the step, so a resume between or across updates is
//! bit-exact too.
//!
//! Lottery rounds ([`crate::lottery`]): when the [`Pruner`] has a stage with `lottery`, the loop
//! runs `count + 1` training rounds in one sequence of global steps. The first records the
//! rewind weights (the starting ones for `init`, those after `k` steps for `{ step = k }`);
//! at the end of each of the first `count` rounds the stage prunes (as a scheduled event) and
//! then every trained weight is rewound (survivors to the recorded values, pruned ones to
//! exact zeros), both moments restart from zero and the next round runs the learning-rate
//! schedule from step `k` with the optimizer's step count (its bias corrections) restarted.
//! The checkpoint holds the round, the finished rounds' reports and, for late rewinding once
//! recorded, the rewind weights (`rewind/NAME`); the starting weights of `init` are those the
//! run starts from, so they are taken again on every start rather than stored. A resume across
//! a round boundary is as exact as any other (`lottery_resume_across_a_round_boundary`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use espalier_engine::{
    Distillation, EngineError, Linear, LinearWeight, LossGradients, Model, Precision, Session,
    Tokenizer, TrainingPass,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cancel::CancelToken;
use crate::dynamic::UpdateEvent;
use crate::lottery::{Rewind, RoundReport, Rounds};
use crate::mask::{Mask, Structure};
use crate::optim::{self, AdamW, AdamWConfig, Decay, Moments, clip_global_norm, learning_rate};
use crate::schedule::PruneEvent;

/// The checkpoint's file name inside `checkpoint_dir`.
pub const CHECKPOINT_FILE: &str = "finetune-checkpoint.safetensors";

/// Tag of the checkpoint format, in its metadata.
const CHECKPOINT_FORMAT: &str = "espalier-finetune-1";

/// Points of the loss curve a report keeps (means over equal spans of steps).
const CURVE_POINTS: usize = 32;

/// The settings of a fine-tune (the `[finetune]` section, defaults filled in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneSpec {
    /// The training text (UTF-8).
    pub text: PathBuf,
    /// Optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches whose gradients are averaged into one step.
    pub accumulate: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps (linear, from `lr / warmup` to `lr`).
    pub warmup: u64,
    /// Decay after the warm-up.
    pub decay: Decay,
    /// AdamW's betas, epsilon and weight decay.
    pub adamw: AdamWConfig,
    /// Largest global gradient norm (`None`: no clipping).
    pub clip: Option<f64>,
    /// Seed of the data order.
    pub seed: u64,
    /// Steps between checkpoints (with `checkpoint_dir`).
    pub checkpoint_every: u64,
    /// Where the checkpoint is kept; `None`: no checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Distillation from the dense model; `None`: cross-entropy alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillSpec>,
    /// The precision of the linear products (f32, the default, is left out of reports and
    /// checkpoints, so earlier checkpoints keep their fingerprints).
    #[serde(default, skip_serializing_if = "TrainingPrecision::is_f32")]
    pub precision: TrainingPrecision,
}

/// `precision = "f32" | "bf16"`: the precision of the training pass's linear products. bf16
/// rounds their operands to bf16 and keeps the sums, weights, gradients and AdamW's state in
/// f32 (mixed precision, as PyTorch's bf16 autocast); on a CPU with AVX512-BF16 the products
/// run at twice the f32 rate. Needs the hand-written pass (LLaMA-family models).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainingPrecision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// bf16 operands, f32 sums.
    Bf16,
}

impl TrainingPrecision {
    fn is_f32(&self) -> bool {
        *self == TrainingPrecision::F32
    }

    /// The name a pipeline writes.
    pub fn as_str(self) -> &'static str {
        match self {
            TrainingPrecision::F32 => "f32",
            TrainingPrecision::Bf16 => "bf16",
        }
    }

    /// The precision a pipeline names, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "f32" => Some(TrainingPrecision::F32),
            "bf16" => Some(TrainingPrecision::Bf16),
            _ => None,
        }
    }
}

/// `distill = { weight = α, temperature = T, hidden = β }`: the loss is `(1 − α)·CE +
/// α·T²·KL(dense ‖ fine-tuned)` at temperature `T`, plus, when `β > 0`, `β` times the mean
/// over blocks of `‖x_s − x_t‖² / ‖x_t‖²` between the fine-tuned and the dense model's
/// residual streams after each block (SquareHead's hidden-state term).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DistillSpec {
    /// `α` in `[0, 1]`.
    pub weight: f64,
    /// `T > 0`.
    pub temperature: f64,
    /// `β ≥ 0`; 0 (the default, left out of reports and checkpoints) adds no hidden-state term.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hidden: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

/// The two parts of a distillation loss: the mean next-token cross-entropy and the mean KL
/// divergence of the fine-tuned model's predictions from the dense model's (at the
/// temperature, before its weight and `T²`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossParts {
    /// Mean next-token cross-entropy.
    pub cross_entropy: f64,
    /// Mean KL divergence from the dense model.
    pub kl: f64,
    /// With hidden-state distillation, the mean hidden-state term (before its weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<f64>,
}

impl LossParts {
    /// The mean of `parts` (`None` when empty).
    fn mean(parts: &[LossParts]) -> Option<LossParts> {
        let n = parts.len() as f64;
        (!parts.is_empty()).then(|| LossParts {
            cross_entropy: parts.iter().map(|p| p.cross_entropy).sum::<f64>() / n,
            kl: parts.iter().map(|p| p.kl).sum::<f64>() / n,
            hidden: parts
                .iter()
                .map(|p| p.hidden)
                .sum::<Option<f64>>()
                .map(|h| h / n),
        })
    }
}

impl FinetuneSpec {
    /// Defaults for `text`: 100 steps of 4 × 256 tokens at 1e-4, 10 warm-up steps, cosine
    /// decay, clipping at 1.0, no checkpoints.
    pub fn new(text: PathBuf) -> Self {
        FinetuneSpec {
            text,
            steps: 100,
            batch: 4,
            seq_len: 256,
            accumulate: 1,
            lr: 1e-4,
            warmup: 10,
            decay: Decay::Cosine,
            adamw: AdamWConfig::default(),
            clip: Some(1.0),
            seed: 0,
            checkpoint_every: 100,
            checkpoint_dir: None,
            distill: None,
            precision: TrainingPrecision::F32,
        }
    }

    /// Sequences per optimizer step.
    pub fn sequences_per_step(&self) -> usize {
        self.batch.saturating_mul(self.accumulate)
    }

    /// The path of the checkpoint file, when checkpoints are on.
    pub fn checkpoint_path(&self) -> Option<PathBuf> {
        self.checkpoint_dir
            .as_ref()
            .map(|d| d.join(CHECKPOINT_FILE))
    }
}

/// Why a fine-tune stopped.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// The training text cannot be read or tokenized.
    #[error("cannot read the training text {}: {message}", path.display())]
    Text {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The text does not fill one micro-batch.
    #[error(
        "training text {} has {tokens} tokens, fewer than one batch of {batch} sequences of {seq_len}; use a longer text, a smaller batch or a smaller seq_len",
        path.display()
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its tokens.
        tokens: usize,
        /// Sequences per micro-batch.
        batch: usize,
        /// Tokens per sequence.
        seq_len: usize,
    },
    /// A checkpoint exists but belongs to another run, or is unreadable. It is left as it is.
    #[error("checkpoint {}: {message} (it was left untouched: remove it or choose another checkpoint_dir)", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Writing a checkpoint failed.
    #[error("cannot write checkpoint {}: {message}", path.display())]
    WriteCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The loss or the gradient stopped being finite.
    #[error(
        "step {step}: the {what} is not finite (the learning rate {lr:e} is probably too high); {kept}"
    )]
    Diverged {
        /// 1-based step.
        step: u64,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The step's learning rate.
        lr: f64,
        /// What was kept (the last checkpoint, or nothing).
        kept: String,
    },
    /// The model cannot be trained (a layer not held densely, a tensor error).
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The run was cancelled.
    #[error("the fine-tune was cancelled")]
    Cancelled,
    /// A scheduled stage failed at one of its events (its plugin or its output).
    #[error("scheduled pruning after step {step}: {source}")]
    Stage {
        /// Optimizer steps done.
        step: u64,
        /// What failed.
        source: Box<crate::run::RunError>,
    },
    /// A mask-update stage failed at one of its updates (its plugin or its output).
    #[error("mask update after step {step}: {message}")]
    Update {
        /// Optimizer steps done.
        step: u64,
        /// What failed.
        message: String,
    },
    /// A scheduled stage's masks could not be applied.
    #[error("scheduled pruning after step {step}: {message}")]
    Prune {
        /// Optimizer steps done.
        step: u64,
        /// What failed.
        message: String,
    },
}

impl From<candle_core::Error> for FinetuneError {
    fn from(e: candle_core::Error) -> Self {
        FinetuneError::Engine(EngineError::from(e))
    }
}

/// What one step did (the `finetune-progress` event carries it).
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// 1-based step (counted across lottery rounds).
    pub step: u64,
    /// Steps in the run (in all its lottery rounds).
    pub steps: u64,
    /// With lottery rounds, the 1-based round the step trained in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// Mean loss over the step's sequences (with distillation, the mix of its parts).
    pub loss: f64,
    /// With distillation, the loss's two parts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts: Option<LossParts>,
    /// Learning rate of the step.
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of this step per second of its wall time.
    pub tokens_per_second: f64,
    /// Estimated seconds to the last step (mean step time of this process so far).
    pub eta_seconds: f64,
}

/// Hears a fine-tune's start and each of its steps.
pub trait FinetuneObserver {
    /// Training starts after `start_step` (a checkpoint's step; 0 from the beginning) of
    /// `steps` (over every lottery round, when there are rounds).
    fn started(&mut self, _start_step: u64, _steps: u64) {}
    /// A step finished.
    fn step(&mut self, step: &StepReport);
    /// A scheduled stage pruned (see [`crate::schedule`]).
    fn pruned(&mut self, _event: &PruneEvent) {}
    /// A stage updated its masks (see [`crate::dynamic`]).
    fn updated(&mut self, _event: &UpdateEvent) {}
    /// A lottery round ended: pruned and rewound, or (the last) the ticket trained (see
    /// [`crate::lottery`]).
    fn round(&mut self, _round: &RoundReport) {}
}

/// Runs the scheduled stages of a pipeline during fine-tuning (see [`crate::schedule`]).
pub trait Pruner {
    /// Whether a stage runs after `step` optimizer steps.
    fn is_event(&self, step: u64) -> bool;
    /// The layers whose masks the stages may shrink.
    fn layers(&self) -> std::collections::BTreeSet<String>;
    /// What decides the stages' results (plugins, targets, parameters, schedules), for the
    /// checkpoint's fingerprint.
    fn identity(&self) -> String;
    /// Runs every stage with an event after `step` steps (global ones, across lottery rounds)
    /// on `model` (the weights as trained so far) and its current `masks`; returns the new
    /// masks of the layers pruned (each within the current one) and what each stage did.
    fn prune(
        &mut self,
        step: u64,
        model: &Model,
        masks: &BTreeMap<String, Mask>,
        cancel: &CancelToken,
    ) -> Result<(BTreeMap<String, Mask>, Vec<PruneEvent>), FinetuneError>;

    /// The lottery rounds of the stage that prunes in rounds ([`crate::lottery`]), if one
    /// does: the fine-tune then runs its rounds, pruning at [`Pruner::is_event`] at the end of
    /// each and rewinding. None by default.
    fn rounds(&self) -> Option<Rounds> {
        None
    }

    /// The layers whose masks the mask-update stages swap ([`crate::dynamic`]); the fine-tune
    /// sums their dense gradients between updates. None by default.
    fn update_layers(&self) -> std::collections::BTreeSet<String> {
        std::collections::BTreeSet::new()
    }

    /// Whether the gradient of the step after `step` steps is summed for a later update.
    fn accumulates(&self, _step: u64) -> bool {
        false
    }

    /// Whether a mask update runs after `step` optimizer steps.
    fn is_update(&self, _step: u64) -> bool {
        false
    }

    /// Runs every mask update due after `step` steps on `model` (the weights as trained so
    /// far), its current `masks` and the mean dense `gradients` of the update layers over the
    /// last `gradient_steps` steps; returns the new masks, each checked to keep its layer's
    /// count and structure, and what each stage did.
    fn update(
        &mut self,
        step: u64,
        model: &Model,
        masks: &BTreeMap<String, Mask>,
        gradients: &BTreeMap<String, Tensor>,
        gradient_steps: u32,
        cancel: &CancelToken,
    ) -> Result<(BTreeMap<String, Mask>, Vec<UpdateEvent>), FinetuneError> {
        let _ = (step, model, masks, gradients, gradient_steps, cancel);
        Ok((BTreeMap::new(), Vec::new()))
    }
}

impl<F: FnMut(&StepReport)> FinetuneObserver for F {
    fn step(&mut self, step: &StepReport) {
        self(step)
    }
}

/// A point of the loss curve: the mean loss over steps `first..=last`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    /// First step of the span (1-based).
    pub first: u64,
    /// Last step of the span.
    pub last: u64,
    /// Mean loss over the span.
    pub loss: f64,
    /// With distillation, the means of the loss's parts over the span.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<LossParts>,
}

/// What the run report records of a fine-tune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneReport {
    /// The settings.
    pub spec: FinetuneSpec,
    /// sha256 of the training text.
    pub text_sha256: String,
    /// Tokens of the training text.
    pub text_tokens: usize,
    /// The step a checkpoint resumed from (`None`: from the start).
    pub resumed_from: Option<u64>,
    /// Tokens trained on over all steps (resumed ones and every lottery round included).
    pub tokens_trained: u64,
    /// Loss of the first step.
    pub first_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Mean loss over the last tenth of the steps (at least one): less noisy than the last.
    pub final_loss_mean: f64,
    /// With distillation, the loss parts of the first step, the last step and the mean over
    /// the last tenth (as `final_loss_mean`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<[LossParts; 3]>,
    /// The loss curve, at most 32 means over equal spans of steps.
    pub loss_curve: Vec<LossPoint>,
    /// Wall time of the steps this process ran, seconds.
    pub seconds: f64,
    /// Tokens per second over the steps this process ran.
    pub tokens_per_second: f64,
    /// Tokens per second over the steps after the first this process ran (the first also
    /// pays for allocating the training pass's buffers), as benchmarks with untimed warm-up
    /// steps count; `None` when fewer than two steps ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steady_tokens_per_second: Option<f64>,
    /// Layers trained.
    pub trained_layers: usize,
    /// Weights trained (kept positions of the trained layers, after the last prune event).
    pub trained_weights: usize,
    /// What the scheduled stages did, event by event (events before a resumed checkpoint
    /// included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prune_events: Vec<PruneEvent>,
    /// What the mask-update stages did, update by update (those before a resumed checkpoint
    /// included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mask_updates: Vec<UpdateEvent>,
    /// With lottery rounds, what each round did (those before a resumed checkpoint included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<RoundReport>,
}

/// One trained weight matrix: the master copy, its mask and its moments.
struct Param {
    name: String,
    shape: Vec<usize>,
    weights: Vec<f32>,
    keep: Option<Vec<bool>>,
    moments: Moments,
    /// The sum of the dense gradients since the last mask update, for the layers a mask-update
    /// stage swaps (`None` for the others).
    dense_grad: Option<Vec<f32>>,
    /// With lottery rounds, the weights the survivors are rewound to (once recorded).
    rewind: Option<Vec<f32>>,
}

/// The training sequences and where the run is in them.
struct Data {
    sequences: Vec<Vec<u32>>,
    order: Vec<u32>,
    position: usize,
    epoch: u64,
    rng: ChaCha8Rng,
}

impl Data {
    fn new(sequences: Vec<Vec<u32>>, seed: u64) -> Self {
        let mut data = Data {
            order: (0..sequences.len() as u32).collect(),
            sequences,
            position: 0,
            epoch: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        };
        data.order.shuffle(&mut data.rng);
        data
    }

    /// The next `n` sequences in the order, starting a newly shuffled epoch when one ends.
    fn next_batch(&mut self, n: usize) -> Vec<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.position == self.order.len() {
                self.order.sort_unstable();
                self.order.shuffle(&mut self.rng);
                self.position = 0;
                self.epoch += 1;
            }
            out.push(self.sequences[self.order[self.position] as usize].clone());
            self.position += 1;
        }
        out
    }
}

/// The training text, tokenized and cut.
pub struct TrainingText {
    /// Sequences of `seq_len` tokens.
    sequences: Vec<Vec<u32>>,
    /// sha256 of the text's bytes.
    sha256: String,
    /// Tokens in the text.
    tokens: usize,
}

impl TrainingText {
    /// Tokens in the text.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Reads `spec.text` and cuts it with `model`'s tokenizer into sequences of `seq_len`.
    pub fn load(spec: &FinetuneSpec, model: &Model) -> Result<Self, FinetuneError> {
        let err = |message: String| FinetuneError::Text {
            path: spec.text.clone(),
            message,
        };
        let text =
            espalier_engine::files::read_to_string(&spec.text, espalier_engine::files::TEXT_LIMIT)
                .map_err(|e| err(e.to_string()))?;
        let tokenizer = Tokenizer::for_model(model).map_err(|e| err(e.to_string()))?;
        Self::from_text(&text, spec, &tokenizer)
    }

    /// Tokenizes `text` (no special tokens) for `spec`.
    pub fn from_text(
        text: &str,
        spec: &FinetuneSpec,
        tokenizer: &Tokenizer,
    ) -> Result<Self, FinetuneError> {
        let ids = tokenizer
            .encode_with(text, false)
            .map_err(|e| FinetuneError::Text {
                path: spec.text.clone(),
                message: e.to_string(),
            })?;
        let sequences: Vec<Vec<u32>> = ids
            .chunks_exact(spec.seq_len.max(1))
            .map(<[u32]>::to_vec)
            .collect();
        if sequences.len() < spec.batch.max(1) || spec.seq_len < 2 {
            return Err(FinetuneError::TooShort {
                path: spec.text.clone(),
                tokens: ids.len(),
                batch: spec.batch,
                seq_len: spec.seq_len,
            });
        }
        Ok(TrainingText {
            sequences,
            sha256: crate::plugin::runtime::sha256_hex(text.as_bytes()),
            tokens: ids.len(),
        })
    }
}

/// How a step's gradients are made: the engine's hand-written [`TrainingPass`] where it covers
/// the model (LLaMA-family blocks held as dense f32 weights, e.g. SmolLM2), kept from step to
/// step with its buffers; candle's autograd ([`LossGradients`]) otherwise, made afresh each
/// step. Both compute the same gradient of the same loss.
enum Gradients<'t> {
    HandWritten(Box<TrainingPass<'t>>),
    Autograd,
}

/// A trained layer's weight name and the mask the hand-written pass may train it under.
type TrainedLayer<'p> = (&'p str, Option<&'p [bool]>);

/// One step's mean loss, its parts when distilling, and the mean gradient of every trained
/// layer in `params` order (written into `buffers`, whose allocations are reused).
type StepGradients = (f64, Option<LossParts>, Vec<Vec<f32>>);

impl<'t> Gradients<'t> {
    /// The hand-written pass where it covers `session`, else autograd. `hidden` is the
    /// hidden-state distillation weight (0: none), which only the hand-written pass has, as
    /// it alone has bf16 `precision`.
    fn new(
        session: &Session,
        teacher: Option<(&'t Session, Distillation)>,
        hidden: f64,
        precision: TrainingPrecision,
    ) -> Result<Self, EngineError> {
        if !TrainingPass::supports(session) {
            if precision == TrainingPrecision::Bf16 {
                return Err(EngineError::Input(
                    "finetune.precision: bf16 training needs a LLaMA-family model held as dense \
                     f32 weights (the hand-written training pass); write precision = \"f32\" \
                     for this model"
                        .into(),
                ));
            }
            if hidden > 0.0 {
                return Err(EngineError::Input(
                    "finetune.distill.hidden: hidden-state distillation needs a LLaMA-family \
                     model held as dense f32 weights (the hand-written training pass); leave \
                     `hidden` out for this model"
                        .into(),
                ));
            }
            return Ok(Gradients::Autograd);
        }
        let engine_precision = match precision {
            TrainingPrecision::F32 => Precision::F32,
            TrainingPrecision::Bf16 => Precision::Bf16,
        };
        let mut pass = TrainingPass::new(session)?.with_precision(engine_precision)?;
        if let Some((t, d)) = teacher {
            pass = pass
                .with_teacher(session, t, d)?
                .with_hidden_distillation(hidden)?;
        }
        Ok(Gradients::HandWritten(Box::new(pass)))
    }

    /// Runs `micro_batches` micro-batches from `next_batch` through `session` and returns the
    /// step's gradients for `layers` (name and mask: a layer whose mask keeps few whole 16×16
    /// blocks trains block-sparse in the hand-written pass; `None` where the dense gradient
    /// is needed).
    fn step(
        &mut self,
        session: &Session,
        teacher: Option<(&Session, Distillation)>,
        micro_batches: usize,
        next_batch: &mut dyn FnMut() -> Vec<Vec<u32>>,
        cancel: &CancelToken,
        (layers, mut buffers): (&[TrainedLayer], Vec<Vec<f32>>),
    ) -> Result<StepGradients, FinetuneError> {
        let parts = |p: Option<(f64, f64)>, hidden: Option<f64>| {
            p.map(|(cross_entropy, kl)| LossParts {
                cross_entropy,
                kl,
                hidden,
            })
        };
        let missing = |name: &str| EngineError::Tensor {
            name: name.to_string(),
            message: "internal: the gradient pass returned no gradient".into(),
        };
        buffers.resize_with(layers.len(), Vec::new);
        match self {
            Gradients::HandWritten(pass) => {
                for (name, keep) in layers {
                    pass.set_mask(name, *keep)?;
                }
                pass.reset();
                for _ in 0..micro_batches {
                    if cancel.is_cancelled() {
                        return Err(FinetuneError::Cancelled);
                    }
                    pass.accumulate(session, &next_batch())?;
                }
                for ((name, _), buffer) in layers.iter().zip(buffers.iter_mut()) {
                    if !pass.mean_into(name, buffer) {
                        return Err(missing(name).into());
                    }
                }
                let step_parts = parts(pass.mean_parts(), pass.mean_hidden());
                Ok((pass.mean_loss(), step_parts, buffers))
            }
            Gradients::Autograd => {
                let mut pass = LossGradients::new(session)?;
                if let Some((t, d)) = teacher {
                    pass = pass.with_teacher(t, d)?;
                }
                for _ in 0..micro_batches {
                    if cancel.is_cancelled() {
                        return Err(FinetuneError::Cancelled);
                    }
                    pass.accumulate(&next_batch())?;
                }
                let (loss, step_parts) = (pass.mean_loss(), parts(pass.mean_parts(), None));
                let mut stats = pass.finish()?.mean;
                let grads = layers
                    .iter()
                    .map(|(name, _)| {
                        let g = stats.remove(*name).ok_or_else(|| missing(name))?;
                        Ok(g.flatten_all()?.to_vec1::<f32>()?)
                    })
                    .collect::<Result<Vec<_>, FinetuneError>>()?;
                Ok((loss, step_parts, grads))
            }
        }
    }
}

/// Fine-tunes every block linear of `model` in place, holding `masks` (by weight name), on
/// `text` as `spec` says. `identity` names the run for the checkpoint's fingerprint (model
/// reference and pipeline); `progress` hears the start, every step and every prune event;
/// `pruner` runs scheduled stages at their events, and `masks` ends as they left them; `cancel`
/// is checked between micro-batches. `teacher` is the dense model `spec.distill` distills
/// from (needed only then).
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    model: &mut Model,
    masks: &mut BTreeMap<String, Mask>,
    spec: &FinetuneSpec,
    text: TrainingText,
    identity: &str,
    teacher: Option<&Model>,
    progress: &mut dyn FinetuneObserver,
    mut pruner: Option<&mut dyn Pruner>,
    cancel: &CancelToken,
) -> Result<FinetuneReport, FinetuneError> {
    let mut session = Session::new(model)?;
    let teacher = match (spec.distill, teacher) {
        (None, _) => None,
        (Some(d), Some(t)) => Some((
            Session::new(t)?,
            Distillation {
                weight: d.weight,
                temperature: d.temperature,
            },
        )),
        (Some(_), None) => {
            return Err(EngineError::Input(
                "internal: distillation needs the dense model as its teacher".into(),
            )
            .into());
        }
    };
    let updated = pruner
        .as_ref()
        .map(|p| p.update_layers())
        .unwrap_or_default();
    let mut params = Vec::new();
    let mut biases = BTreeMap::new();
    for linear in session.block_linears() {
        let LinearWeight::Dense(w) = linear.weight() else {
            return Err(EngineError::Tensor {
                name: linear.name().to_string(),
                message: "fine-tuning needs the dense weight, but this layer runs another kernel"
                    .into(),
            }
            .into());
        };
        let shape = w.dims().to_vec();
        let weights = w.flatten_all()?.to_vec1::<f32>()?;
        let keep = match masks.get(linear.name()) {
            Some(mask) if mask.keep().len() == weights.len() => Some(mask.keep().to_vec()),
            Some(_) => {
                return Err(EngineError::Tensor {
                    name: linear.name().to_string(),
                    message: "its mask does not cover the weight".into(),
                }
                .into());
            }
            None => None,
        };
        biases.insert(linear.name().to_string(), linear.bias().cloned());
        params.push(Param {
            name: linear.name().to_string(),
            moments: Moments::zeros(weights.len()),
            dense_grad: updated
                .contains(linear.name())
                .then(|| vec![0.0; weights.len()]),
            shape,
            weights,
            keep,
            rewind: None,
        });
    }
    let scheduled = pruner.as_ref().map(|p| p.layers()).unwrap_or_default();
    let rounds = pruner.as_ref().and_then(|p| p.rounds());
    // Optimizer steps over every lottery round (`spec.steps` without rounds).
    let total = rounds.map_or(spec.steps, |r| r.total_steps(spec.steps));
    if rounds.is_some_and(|r| r.rewind == Rewind::Init) {
        // The starting weights, taken again on every start (a resume included): the model the
        // fine-tune is given does not depend on a checkpoint.
        for p in params.iter_mut() {
            p.rewind = Some(p.weights.clone());
        }
    }
    let identity = match &pruner {
        Some(p) => format!("{identity}\nscheduled={}", p.identity()),
        None => identity.to_string(),
    };
    let fingerprint = fingerprint(&identity, spec, &text);
    let text_sha256 = text.sha256.clone();
    let text_tokens = text.tokens;
    let mut data = Data::new(text.sequences, spec.seed);
    let mut losses: Vec<f64> = Vec::new();
    // Per step, with distillation.
    let mut parts: Vec<LossParts> = Vec::new();
    let mut start = 0u64;
    let mut resumed_from = None;
    let mut events: Vec<PruneEvent> = Vec::new();
    let mut updates: Vec<UpdateEvent> = Vec::new();
    // Steps summed into the params' `dense_grad` since the last mask update.
    let mut gradient_steps = 0u32;
    let mut rounds_done: Vec<RoundReport> = Vec::new();
    // Whether a resumed checkpoint was written after its step's round boundary (pruned and
    // rewound already, so the loop must not do it again).
    let mut boundary_done = false;
    // Late rewinding's weights are recorded once the first round reaches their step; until
    // then a checkpoint has none to hold.
    let late_rewind = rounds.and_then(|r| match r.rewind {
        Rewind::Step(k) => Some(k),
        Rewind::Init => None,
    });
    let checkpoint = spec.checkpoint_path();
    if let Some(path) = &checkpoint
        && path.exists()
    {
        let resumed = load_checkpoint(
            path,
            &fingerprint,
            (&scheduled, &updated),
            &mut params,
            &mut data,
            (&mut losses, &mut parts),
            teacher.is_some(),
            late_rewind,
        )?;
        if let Some(r) = rounds {
            let expected = r.place(resumed.step, spec.steps).round + 1;
            let consistent = resumed.round == Some(expected)
                && rounds_match(
                    &r,
                    resumed.step,
                    spec.steps,
                    resumed.boundary_done,
                    &resumed.rounds,
                )
                && (!resumed.boundary_done || r.is_prune(resumed.step, spec.steps));
            if !consistent {
                return Err(FinetuneError::Checkpoint {
                    path: path.clone(),
                    message: format!(
                        "its lottery round ({}) or round history does not match its step {} (round {expected} expected)",
                        resumed.round.map_or("none".to_string(), |r| r.to_string()),
                        resumed.step
                    ),
                });
            }
        }
        rounds_done = resumed.rounds;
        boundary_done = resumed.boundary_done;
        start = resumed.step;
        resumed_from = Some(resumed.step);
        events = resumed.events;
        updates = resumed.updates;
        gradient_steps = resumed.gradient_steps;
        for p in &params {
            set_linear(&mut session, p, &biases)?;
            // A scheduled stage may have shrunk the mask since the stages ran.
            if let Some(keep) = &p.keep
                && masks
                    .get(&p.name)
                    .is_none_or(|m| m.keep() != keep.as_slice())
            {
                let structure = resumed
                    .structures
                    .get(&p.name)
                    .and_then(|s| s.parse::<Structure>().ok())
                    .unwrap_or(Structure::Unstructured);
                let mask = Mask::new(p.shape.clone(), keep.clone(), structure)
                    .or_else(|_| Mask::new(p.shape.clone(), keep.clone(), Structure::Unstructured))
                    .map_err(|message| FinetuneError::Checkpoint {
                        path: path.clone(),
                        message,
                    })?;
                masks.insert(p.name.clone(), mask);
            }
        }
    }
    progress.started(start, total);
    let optimizer = AdamW { config: spec.adamw };
    let tokens_per_step = (spec.sequences_per_step() * spec.seq_len) as f64;
    let hidden = spec.distill.map_or(0.0, |d| d.hidden);
    let mut gradients = Gradients::new(
        &session,
        teacher.as_ref().map(|(t, d)| (t, *d)),
        hidden,
        spec.precision,
    )?;
    let mut grad_buffers = Vec::new();
    let began = Instant::now();
    // When this process's first step ended, for `steady_tokens_per_second`.
    let mut first_step_done: Option<Instant> = None;
    let mut last_checkpoint = resumed_from;
    // Kept fraction of the pruned layers while the current lottery round trains.
    let mut round_density = kept_fraction(&params, &scheduled);
    for step in start..=total {
        if cancel.is_cancelled() {
            return Err(FinetuneError::Cancelled);
        }
        if late_rewind == Some(step) {
            // Late rewinding's target: the weights after `k` steps of the first round.
            for p in params.iter_mut() {
                p.rewind = Some(p.weights.clone());
            }
        }
        // The lottery round that ends here (its pruning is the scheduled event below), unless
        // the checkpoint resumed from was written after it.
        let boundary_passed = boundary_done && step == start;
        let ended = rounds
            .filter(|_| !boundary_passed)
            .and_then(|r| r.round_ending_at(step, spec.steps).map(|i| (r, i)));
        // A stage's event after `step` steps runs before step `step + 1` (and after the last
        // step when it ends there).
        if let Some(pruner) = pruner.as_deref_mut()
            && pruner.is_event(step)
            && !boundary_passed
        {
            let done = prune_event(
                step,
                pruner,
                model,
                &mut session,
                &mut params,
                masks,
                &biases,
                cancel,
            )?;
            for e in &done {
                progress.pruned(e);
            }
            events.extend(done);
        }
        if let Some((r, i)) = ended {
            let mut report = RoundReport {
                round: i + 1,
                rounds: r.training_rounds(),
                steps: r.round_steps(i, spec.steps),
                last_step: step,
                density: round_density,
                final_loss: losses.last().copied().unwrap_or(f64::NAN),
                pruned_to: None,
                rewound_to: None,
            };
            let pruned = i < r.count;
            if pruned {
                rewind(step, &mut params, &mut session, &biases)?;
                round_density = kept_fraction(&params, &scheduled);
                report.pruned_to = Some(round_density);
                report.rewound_to = Some(r.rewind.step());
            }
            rounds_done.push(report.clone());
            if let (Some(path), true) = (&checkpoint, pruned) {
                // The next round's start, so a resume need not prune (and calibrate) again.
                write_checkpoint(
                    path,
                    &fingerprint,
                    step,
                    (&params, masks),
                    &data,
                    (&losses, &parts),
                    (&events, &updates, gradient_steps),
                    Some(LotteryState {
                        round: i + 2,
                        done: &rounds_done,
                        rewind: late_rewind.is_some(),
                        boundary_done: true,
                    }),
                )?;
                last_checkpoint = Some(step);
            }
            progress.round(&report);
        }
        if let Some(pruner) = pruner.as_deref_mut()
            && pruner.is_update(step)
        {
            let done = update_event(
                step,
                pruner,
                model,
                (&mut session, &biases),
                &mut params,
                masks,
                gradient_steps,
                cancel,
            )?;
            gradient_steps = 0;
            for e in &done {
                progress.updated(e);
            }
            updates.extend(done);
        }
        if step == total {
            break;
        }
        let accumulate = pruner.as_deref().is_some_and(|p| p.accumulates(step));
        let step_began = Instant::now();
        // Within a lottery round the schedule runs from the rewind step, and the optimizer's
        // step count (its bias corrections) from the round's start, as its moments do.
        let place = rounds.map(|r| r.place(step, spec.steps));
        let (schedule_step, round_start) =
            place.map_or((step, 0), |p| (p.schedule_step, p.round_start));
        let lr = learning_rate(spec.lr, schedule_step, spec.steps, spec.warmup, spec.decay);
        let kept = || match last_checkpoint {
            Some(s) => format!("the checkpoint of step {s} is kept"),
            None => "no checkpoint was written".to_string(),
        };
        let (loss, step_parts, mut grads) = {
            // Masks for the hand-written pass's block-sparse layers, except where a mask
            // update needs the dense gradient.
            let layers: Vec<TrainedLayer> = params
                .iter()
                .map(|p| {
                    let keep = p.keep.as_deref().filter(|_| p.dense_grad.is_none());
                    (p.name.as_str(), keep)
                })
                .collect();
            let teacher = teacher.as_ref().map(|(t, d)| (t, *d));
            let mut next_batch = || data.next_batch(spec.batch);
            let (loss, step_parts, mut grads) = gradients.step(
                &session,
                teacher,
                spec.accumulate,
                &mut next_batch,
                cancel,
                (&layers, std::mem::take(&mut grad_buffers)),
            )?;
            // Element-wise, on every core (one core made this a few percent of a step).
            params
                .par_iter_mut()
                .zip(grads.par_iter_mut())
                .for_each(|(p, g)| {
                    // The dense gradient, before masking, for the next mask update.
                    if accumulate && let Some(sum) = &mut p.dense_grad {
                        (sum.par_chunks_mut(optim::CHUNK))
                            .zip(g.par_chunks(optim::CHUNK))
                            .for_each(|(s, g)| s.iter_mut().zip(g).for_each(|(s, g)| *s += g));
                    }
                    if let Some(keep) = &p.keep {
                        optim::zero_pruned(g, keep);
                    }
                });
            (loss, step_parts, grads)
        };
        if !loss.is_finite() {
            return Err(FinetuneError::Diverged {
                step: step + 1,
                what: "loss",
                lr,
                kept: kept(),
            });
        }
        let grad_norm = clip_global_norm(grads.iter_mut(), spec.clip);
        if !grad_norm.is_finite() {
            return Err(FinetuneError::Diverged {
                step: step + 1,
                what: "gradient norm",
                lr,
                kept: kept(),
            });
        }
        for (p, g) in params.iter_mut().zip(&grads) {
            optimizer.step(
                step + 1 - round_start,
                lr,
                &mut p.weights,
                g,
                &mut p.moments,
                p.keep.as_deref(),
            );
            set_linear(&mut session, p, &biases)?;
        }
        grad_buffers = grads;
        first_step_done.get_or_insert_with(Instant::now);
        if accumulate {
            gradient_steps += 1;
        }
        losses.push(loss);
        parts.extend(step_parts);
        let done_here = (step + 1 - start) as f64;
        let elapsed = began.elapsed().as_secs_f64();
        progress.step(&StepReport {
            step: step + 1,
            steps: total,
            round: place.map(|p| p.round + 1),
            loss,
            parts: step_parts,
            learning_rate: lr,
            grad_norm,
            tokens_per_second: tokens_per_step / step_began.elapsed().as_secs_f64().max(1e-9),
            eta_seconds: elapsed / done_here * (total - step - 1) as f64,
        });
        let due = (step + 1) % spec.checkpoint_every.max(1) == 0 || step + 1 == total;
        if let (Some(path), true) = (&checkpoint, due) {
            write_checkpoint(
                path,
                &fingerprint,
                step + 1,
                (&params, masks),
                &data,
                (&losses, &parts),
                (&events, &updates, gradient_steps),
                rounds.map(|r| LotteryState {
                    round: r.place(step + 1, spec.steps).round + 1,
                    done: &rounds_done,
                    rewind: late_rewind.is_some(),
                    boundary_done: false,
                }),
            )?;
            last_checkpoint = Some(step + 1);
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    for p in &params {
        let w = Tensor::from_slice(&p.weights, p.shape.as_slice(), &Device::Cpu)?;
        model.set_weight(&p.name, w, false)?;
    }
    let ran = total - start;
    let tail = (losses.len() / 10).max(1).min(losses.len().max(1));
    Ok(FinetuneReport {
        spec: spec.clone(),
        text_sha256,
        text_tokens,
        resumed_from,
        tokens_trained: total * tokens_per_step as u64,
        first_loss: losses.first().copied().unwrap_or(f64::NAN),
        final_loss: losses.last().copied().unwrap_or(f64::NAN),
        final_loss_mean: losses[losses.len().saturating_sub(tail)..]
            .iter()
            .sum::<f64>()
            / tail as f64,
        parts: match (parts.first(), parts.last()) {
            (Some(&first), Some(&last)) => {
                LossParts::mean(&parts[parts.len().saturating_sub(tail)..])
                    .map(|tail_mean| [first, last, tail_mean])
            }
            _ => None,
        },
        loss_curve: curve(&losses, &parts),
        seconds,
        tokens_per_second: if seconds > 0.0 {
            ran as f64 * tokens_per_step / seconds
        } else {
            0.0
        },
        steady_tokens_per_second: first_step_done
            .map(|t| t.elapsed().as_secs_f64())
            .filter(|&s| ran >= 2 && s > 0.0)
            .map(|s| (ran - 1) as f64 * tokens_per_step / s),
        trained_layers: params.len(),
        trained_weights: params
            .iter()
            .map(|p| {
                p.keep
                    .as_ref()
                    .map_or(p.weights.len(), |k| k.iter().filter(|k| **k).count())
            })
            .sum(),
        prune_events: events,
        mask_updates: updates,
        rounds: rounds_done,
    })
}

/// Kept fraction of `layers` over the trained parameters (1.0 for none): the density a lottery
/// round trains at.
fn kept_fraction(params: &[Param], layers: &std::collections::BTreeSet<String>) -> f64 {
    let (kept, numel) =
        params
            .iter()
            .filter(|p| layers.contains(&p.name))
            .fold((0usize, 0usize), |(k, n), p| {
                let kept = p
                    .keep
                    .as_ref()
                    .map_or(p.weights.len(), |k| k.iter().filter(|k| **k).count());
                (k + kept, n + p.weights.len())
            });
    if numel == 0 {
        1.0
    } else {
        kept as f64 / numel as f64
    }
}

/// Whether a checkpoint's finished lottery rounds are those its step has passed: the rounds
/// that ended before it, and the one ending at it when the checkpoint was written after that
/// round's pruning and rewinding (`boundary_done`; otherwise the checkpoint of a round's last
/// step comes before them).
fn rounds_match(
    rounds: &Rounds,
    step: u64,
    steps: u64,
    boundary_done: bool,
    done: &[RoundReport],
) -> bool {
    let finished = (0..rounds.training_rounds())
        .filter(|&r| {
            let end = rounds.round_start(r + 1, steps);
            end < step || (boundary_done && end == step)
        })
        .count();
    done.len() == finished
        && done
            .iter()
            .enumerate()
            .all(|(i, r)| r.round as usize == i + 1)
}

/// Rewinds every trained weight for the next lottery round ([`crate::lottery`]): the
/// survivors to the recorded rewind weights, the pruned ones to exact zeros, and both AdamW
/// moments to zero (the next round starts the optimizer afresh).
fn rewind(
    step: u64,
    params: &mut [Param],
    session: &mut Session,
    biases: &BTreeMap<String, Option<Tensor>>,
) -> Result<(), FinetuneError> {
    for p in params.iter_mut() {
        let Some(rewind) = &p.rewind else {
            return Err(FinetuneError::Prune {
                step,
                message: format!("internal: no rewind weights were recorded for `{}`", p.name),
            });
        };
        match &p.keep {
            Some(keep) => {
                for ((w, r), k) in p.weights.iter_mut().zip(rewind).zip(keep) {
                    *w = if *k { *r } else { 0.0 };
                }
            }
            None => p.weights.copy_from_slice(rewind),
        }
        p.moments.m.iter_mut().for_each(|m| *m = 0.0);
        p.moments.v.iter_mut().for_each(|v| *v = 0.0);
        set_linear(session, p, biases)?;
    }
    Ok(())
}

/// Runs the mask updates due after `step` steps on the weights as trained so far and the mean
/// dense gradients summed since the last update, and applies them: every newly kept weight
/// starts at exactly zero with both moments reset, every dropped weight and both its moments
/// become exact zeros (the pruner has checked each mask keeps its layer's count and
/// structure). The gradient sums restart from zero.
#[allow(clippy::too_many_arguments)]
fn update_event(
    step: u64,
    pruner: &mut dyn Pruner,
    model: &mut Model,
    (session, biases): (&mut Session, &BTreeMap<String, Option<Tensor>>),
    params: &mut [Param],
    masks: &mut BTreeMap<String, Mask>,
    gradient_steps: u32,
    cancel: &CancelToken,
) -> Result<Vec<UpdateEvent>, FinetuneError> {
    let mut gradients = BTreeMap::new();
    for p in params.iter() {
        let w = Tensor::from_slice(&p.weights, p.shape.as_slice(), &Device::Cpu)?;
        model.set_weight(&p.name, w, false)?;
        if let Some(sum) = &p.dense_grad {
            let scale = 1.0 / gradient_steps.max(1) as f32;
            let mean: Vec<f32> = sum.iter().map(|g| g * scale).collect();
            gradients.insert(
                p.name.clone(),
                Tensor::from_vec(mean, p.shape.as_slice(), &Device::Cpu)?,
            );
        }
    }
    let (new_masks, events) =
        pruner.update(step, model, masks, &gradients, gradient_steps, cancel)?;
    drop(gradients);
    for (name, mask) in new_masks {
        let err = |message: String| FinetuneError::Update { step, message };
        let p = params
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| err(format!("`{name}` is not a layer the fine-tune trains")))?;
        let old = p
            .keep
            .as_ref()
            .ok_or_else(|| err(format!("`{name}` has no mask to update")))?;
        if mask.keep().len() != p.weights.len() {
            return Err(err(format!(
                "the mask of `{name}` does not cover the weight"
            )));
        }
        for (i, (&was, &is)) in old.iter().zip(mask.keep()).enumerate() {
            if was != is {
                // Dropped: pruned from now on. Grown: starts at zero with fresh moments.
                p.weights[i] = 0.0;
                p.moments.m[i] = 0.0;
                p.moments.v[i] = 0.0;
            }
        }
        p.keep = Some(mask.keep().to_vec());
        set_linear(session, p, biases)?;
        masks.insert(name, mask);
    }
    for p in params.iter_mut() {
        if let Some(sum) = &mut p.dense_grad {
            sum.iter_mut().for_each(|g| *g = 0.0);
        }
    }
    Ok(events)
}

/// Runs the scheduled stages due after `step` steps on the weights as trained so far, and
/// makes their masks hard: each new mask is intersected with the current one, and every newly
/// pruned weight and both its moments are set to zero.
#[allow(clippy::too_many_arguments)]
fn prune_event(
    step: u64,
    pruner: &mut dyn Pruner,
    model: &mut Model,
    session: &mut Session,
    params: &mut [Param],
    masks: &mut BTreeMap<String, Mask>,
    biases: &BTreeMap<String, Option<Tensor>>,
    cancel: &CancelToken,
) -> Result<Vec<PruneEvent>, FinetuneError> {
    for p in params.iter() {
        let w = Tensor::from_slice(&p.weights, p.shape.as_slice(), &Device::Cpu)?;
        model.set_weight(&p.name, w, false)?;
    }
    let (new_masks, events) = pruner.prune(step, model, masks, cancel)?;
    for (name, mask) in new_masks {
        let err = |message: String| FinetuneError::Prune { step, message };
        let p = params
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| err(format!("`{name}` is not a layer the fine-tune trains")))?;
        let mask = match masks.get(&name) {
            Some(old) => mask.and(old).map_err(err)?,
            None => mask,
        };
        if mask.keep().len() != p.weights.len() {
            return Err(err(format!(
                "the mask of `{name}` does not cover the weight"
            )));
        }
        for (i, _) in mask.keep().iter().enumerate().filter(|(_, k)| !**k) {
            p.weights[i] = 0.0;
            p.moments.m[i] = 0.0;
            p.moments.v[i] = 0.0;
        }
        p.keep = Some(mask.keep().to_vec());
        set_linear(session, p, biases)?;
        masks.insert(name, mask);
    }
    Ok(events)
}

/// Points the session's layer at the parameter's current weights.
fn set_linear(
    session: &mut Session,
    p: &Param,
    biases: &BTreeMap<String, Option<Tensor>>,
) -> Result<(), FinetuneError> {
    let w = Tensor::from_slice(&p.weights, p.shape.as_slice(), &Device::Cpu)?;
    let bias = biases.get(&p.name).cloned().flatten();
    let linear = session
        .linear_mut(&p.name)
        .ok_or_else(|| EngineError::Tensor {
            name: p.name.clone(),
            message: "internal: the session lost this layer".into(),
        })?;
    *linear = Linear::dense(p.name.clone(), w, bias)?;
    Ok(())
}

/// Means of the losses (and of their parts, when there are any) over at most
/// [`CURVE_POINTS`] equal spans.
fn curve(losses: &[f64], parts: &[LossParts]) -> Vec<LossPoint> {
    let n = losses.len();
    let points = n.min(CURVE_POINTS);
    (0..points)
        .map(|i| {
            let (a, b) = (i * n / points, (i + 1) * n / points);
            LossPoint {
                first: a as u64 + 1,
                last: b as u64,
                loss: losses[a..b].iter().sum::<f64>() / (b - a) as f64,
                parts: parts.get(a..b).and_then(LossParts::mean),
            }
        })
        .collect()
}

/// sha256 over everything that decides a fine-tune's result: the run's identity, the text and
/// every setting except where and how often checkpoints are written.
fn fingerprint(identity: &str, spec: &FinetuneSpec, text: &TrainingText) -> String {
    let mut s = spec.clone();
    s.checkpoint_dir = None;
    s.checkpoint_every = 0;
    s.text = PathBuf::new();
    let settings = serde_json::to_string(&s).unwrap_or_default();
    crate::plugin::runtime::sha256_hex(
        format!("{identity}\n{}\n{settings}", text.sha256).as_bytes(),
    )
}

/// What a checkpoint holds of lottery rounds besides the masks and weights.
struct LotteryState<'a> {
    /// The 1-based round the next step trains in.
    round: u32,
    /// The rounds finished.
    done: &'a [RoundReport],
    /// Whether the rewind weights are stored (late rewinding; `init`'s are the run's start).
    rewind: bool,
    /// Whether the round that ends at the checkpoint's step has already been pruned and
    /// rewound (a checkpoint written at the boundary, after both).
    boundary_done: bool,
}

#[allow(clippy::too_many_arguments)]
fn write_checkpoint(
    path: &Path,
    fingerprint: &str,
    step: u64,
    (params, masks): (&[Param], &BTreeMap<String, Mask>),
    data: &Data,
    (losses, parts): (&[f64], &[LossParts]),
    (events, updates, gradient_steps): (&[PruneEvent], &[UpdateEvent], u32),
    lottery: Option<LotteryState<'_>>,
) -> Result<(), FinetuneError> {
    let err = |message: String| FinetuneError::WriteCheckpoint {
        path: path.to_path_buf(),
        message,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(5 * params.len() + 1);
    let shaped = |v: &[f32], p: &Param| Tensor::from_slice(v, p.shape.as_slice(), &Device::Cpu);
    for p in params {
        tensors.push((format!("weight/{}", p.name), shaped(&p.weights, p)?));
        tensors.push((format!("m/{}", p.name), shaped(&p.moments.m, p)?));
        tensors.push((format!("v/{}", p.name), shaped(&p.moments.v, p)?));
        if let Some(keep) = &p.keep {
            let bytes: Vec<u8> = keep.iter().map(|&k| u8::from(k)).collect();
            tensors.push((
                format!("keep/{}", p.name),
                Tensor::from_vec(bytes, p.shape.as_slice(), &Device::Cpu)?,
            ));
        }
        if let Some(sum) = &p.dense_grad {
            tensors.push((format!("grad/{}", p.name), shaped(sum, p)?));
        }
        if let (Some(w), Some(LotteryState { rewind: true, .. })) = (&p.rewind, &lottery) {
            tensors.push((format!("rewind/{}", p.name), shaped(w, p)?));
        }
    }
    tensors.push((
        "order".into(),
        Tensor::from_slice(&data.order, data.order.len(), &Device::Cpu)?,
    ));
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    meta.insert("fingerprint".to_string(), fingerprint.to_string());
    meta.insert("step".to_string(), step.to_string());
    meta.insert("epoch".to_string(), data.epoch.to_string());
    meta.insert("position".to_string(), data.position.to_string());
    meta.insert("rng_seed".to_string(), hex::encode(data.rng.get_seed()));
    meta.insert(
        "rng_word_pos".to_string(),
        data.rng.get_word_pos().to_string(),
    );
    meta.insert(
        "losses".to_string(),
        serde_json::to_string(losses).map_err(|e| err(e.to_string()))?,
    );
    if !parts.is_empty() {
        meta.insert(
            "loss_parts".to_string(),
            serde_json::to_string(parts).map_err(|e| err(e.to_string()))?,
        );
    }
    // The masks' structures, so a resumed run packs and reports them as the stages made them.
    let structures: BTreeMap<&str, String> = masks
        .iter()
        .map(|(n, m)| (n.as_str(), m.structure().to_string()))
        .collect();
    meta.insert(
        "structures".to_string(),
        serde_json::to_string(&structures).map_err(|e| err(e.to_string()))?,
    );
    if !events.is_empty() {
        meta.insert(
            "prune_events".to_string(),
            serde_json::to_string(events).map_err(|e| err(e.to_string()))?,
        );
    }
    if !updates.is_empty() {
        meta.insert(
            "mask_updates".to_string(),
            serde_json::to_string(updates).map_err(|e| err(e.to_string()))?,
        );
    }
    meta.insert("gradient_steps".to_string(), gradient_steps.to_string());
    if let Some(l) = &lottery {
        meta.insert("round".to_string(), l.round.to_string());
        meta.insert(
            "round_boundary_done".to_string(),
            l.boundary_done.to_string(),
        );
        meta.insert(
            "rounds".to_string(),
            serde_json::to_string(l.done).map_err(|e| err(e.to_string()))?,
        );
    }
    crate::atomic::write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, t)| (k.as_str(), t)),
            Some(meta.clone()),
            tmp,
        )
        .map_err(std::io::Error::other)
    })
    .map_err(|e| err(e.to_string()))
}

/// What a checkpoint restores besides the parameters and the data position.
struct Resumed {
    /// Steps done.
    step: u64,
    /// The structure of each mask, by layer.
    structures: BTreeMap<String, String>,
    /// The prune events before the checkpoint.
    events: Vec<PruneEvent>,
    /// The mask updates before the checkpoint.
    updates: Vec<UpdateEvent>,
    /// Steps summed into the dense gradients since the last update.
    gradient_steps: u32,
    /// With lottery rounds, the round the next step trains in.
    round: Option<u32>,
    /// With lottery rounds, the rounds finished before the checkpoint.
    rounds: Vec<RoundReport>,
    /// Whether the round ending at `step` was pruned and rewound before the checkpoint.
    boundary_done: bool,
}

/// Restores the state a checkpoint holds into `params` and `data` and returns its step,
/// after checking it belongs to this run (fingerprint and masks: equal to the stages' masks,
/// or within them for the layers in `scheduled`, of the same count for those in `updated`).
/// With `late_rewind = Some(k)`, a checkpoint past step `k` must hold the rewind weights.
#[allow(clippy::too_many_arguments)]
fn load_checkpoint(
    path: &Path,
    fingerprint: &str,
    (scheduled, updated): (
        &std::collections::BTreeSet<String>,
        &std::collections::BTreeSet<String>,
    ),
    params: &mut [Param],
    data: &mut Data,
    (losses, parts): (&mut Vec<f64>, &mut Vec<LossParts>),
    distilling: bool,
    late_rewind: Option<u64>,
) -> Result<Resumed, FinetuneError> {
    let err = |message: String| FinetuneError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    // What this run's checkpoint can hold: weights, both moments, the gradient sums and the
    // rewind weights (f32), masks (u8), the order (u32), and a header and metadata well under
    // 64 MiB. A larger file is not ours.
    let elements: u64 = params.iter().map(|p| p.weights.len() as u64).sum();
    let limit = elements
        .saturating_mul(21)
        .saturating_add(4 * data.order.len() as u64)
        .saturating_add(64 << 20);
    let bytes = espalier_engine::files::read(path, limit).map_err(|e| err(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| err(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let field = |key: &str| {
        meta.get(key)
            .cloned()
            .ok_or_else(|| err(format!("no `{key}` in its metadata")))
    };
    if field("format")? != CHECKPOINT_FORMAT {
        return Err(err("not an Espalier fine-tuning checkpoint".into()));
    }
    if field("fingerprint")? != fingerprint {
        return Err(err(
            "it was written by another run (a different model, pipeline, training text or [finetune] setting)".into(),
        ));
    }
    let number = |key: &str| -> Result<u64, FinetuneError> {
        field(key)?
            .parse()
            .map_err(|_| err(format!("`{key}` is not a number")))
    };
    let step = number("step")?;
    let epoch = number("epoch")?;
    let position = number("position")? as usize;
    let word_pos: u128 = field("rng_word_pos")?
        .parse()
        .map_err(|_| err("`rng_word_pos` is not a number".into()))?;
    let seed: [u8; 32] = hex::decode(field("rng_seed")?)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| err("`rng_seed` is not 32 bytes of hex".into()))?;
    let loaded: Vec<f64> =
        serde_json::from_str(&field("losses")?).map_err(|e| err(format!("`losses`: {e}")))?;
    // One entry per step exactly when the run distills.
    let loaded_parts: Vec<LossParts> = match meta.get("loss_parts") {
        Some(p) => serde_json::from_str(p).map_err(|e| err(format!("`loss_parts`: {e}")))?,
        None => Vec::new(),
    };
    let expected = if distilling { loaded.len() } else { 0 };
    if loaded_parts.len() != expected {
        return Err(err("its loss history is inconsistent".into()));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| err(e.to_string()))?;
    let get = |key: String, dtype: DType, len: usize| -> Result<&Tensor, FinetuneError> {
        let t = tensors
            .get(&key)
            .ok_or_else(|| err(format!("no tensor `{key}`")))?;
        if t.dtype() != dtype || t.elem_count() != len {
            return Err(err(format!("tensor `{key}` has the wrong type or size")));
        }
        Ok(t)
    };
    let order = get("order".into(), DType::U32, data.order.len())?
        .to_vec1::<u32>()
        .map_err(|e| err(e.to_string()))?;
    if position > order.len() || usize::try_from(loaded.len() as u64).ok() != Some(step as usize) {
        return Err(err(
            "its data position or loss history is inconsistent".into()
        ));
    }
    for p in params.iter_mut() {
        let n = p.weights.len();
        let keep = tensors.get(&format!("keep/{}", p.name));
        let stored_keep = match keep {
            Some(_) => Some(
                get(format!("keep/{}", p.name), DType::U8, n)?
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<u8>())
                    .map_err(|e| err(e.to_string()))?
                    .into_iter()
                    .map(|b| b != 0)
                    .collect::<Vec<bool>>(),
            ),
            None => None,
        };
        // A scheduled stage only ever shrinks a mask.
        let within = scheduled.contains(&p.name)
            && match (&stored_keep, &p.keep) {
                (Some(s), Some(k)) => s.iter().zip(k).all(|(s, k)| !*s || *k),
                (Some(_), None) => true,
                (None, _) => false,
            };
        // A mask update swaps weights at the same count.
        let swapped = updated.contains(&p.name)
            && match (&stored_keep, &p.keep) {
                (Some(s), Some(k)) => {
                    s.len() == k.len()
                        && s.iter().filter(|x| **x).count() == k.iter().filter(|x| **x).count()
                }
                _ => false,
            };
        if stored_keep != p.keep && !within && !swapped {
            return Err(err(format!(
                "its mask of `{}` differs from the one the pruning stages produced",
                p.name
            )));
        }
        p.keep = stored_keep;
        let read = |prefix: &str| -> Result<Vec<f32>, FinetuneError> {
            get(format!("{prefix}/{}", p.name), DType::F32, n)?
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| err(e.to_string()))
        };
        p.weights = read("weight")?;
        p.moments.m = read("m")?;
        p.moments.v = read("v")?;
        if p.dense_grad.is_some() {
            p.dense_grad = Some(read("grad")?);
        }
        if late_rewind.is_some_and(|k| step > k) {
            p.rewind = Some(read("rewind")?);
        }
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_word_pos(word_pos);
    data.order = order;
    data.position = position;
    data.epoch = epoch;
    data.rng = rng;
    *losses = loaded;
    *parts = loaded_parts;
    let structures = match meta.get("structures") {
        Some(s) => serde_json::from_str(s).map_err(|e| err(format!("`structures`: {e}")))?,
        None => BTreeMap::new(),
    };
    let events = match meta.get("prune_events") {
        Some(s) => serde_json::from_str(s).map_err(|e| err(format!("`prune_events`: {e}")))?,
        None => Vec::new(),
    };
    let updates = match meta.get("mask_updates") {
        Some(s) => serde_json::from_str(s).map_err(|e| err(format!("`mask_updates`: {e}")))?,
        None => Vec::new(),
    };
    let gradient_steps = match meta.get("gradient_steps") {
        Some(s) => s
            .parse()
            .map_err(|_| err("`gradient_steps` is not a number".into()))?,
        None => 0,
    };
    let round = match meta.get("round") {
        Some(s) => Some(
            s.parse()
                .map_err(|_| err("`round` is not a number".into()))?,
        ),
        None => None,
    };
    let rounds = match meta.get("rounds") {
        Some(s) => serde_json::from_str(s).map_err(|e| err(format!("`rounds`: {e}")))?,
        None => Vec::new(),
    };
    let boundary_done = match meta.get("round_boundary_done").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(err("`round_boundary_done` is not true or false".into())),
    };
    Ok(Resumed {
        step,
        structures,
        events,
        updates,
        gradient_steps,
        round,
        rounds,
        boundary_done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Structure;
    use espalier_engine::builtin_model;

    /// A deterministic text long enough for a few steps on the byte tokenizer.
    fn text() -> String {
        (0..400)
            .map(|i| format!("line {i} of a small training text, {} bytes. ", i * 7 % 13))
            .collect()
    }

    fn spec(dir: Option<&Path>) -> FinetuneSpec {
        FinetuneSpec {
            steps: 4,
            batch: 2,
            seq_len: 32,
            accumulate: 2,
            lr: 3e-3,
            warmup: 1,
            checkpoint_every: 2,
            checkpoint_dir: dir.map(Path::to_path_buf),
            adamw: AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
            ..FinetuneSpec::new(PathBuf::from("train.txt"))
        }
    }

    /// Half of every block linear pruned by a fixed pattern, the pruned weights zeroed.
    fn pruned_model() -> (Model, BTreeMap<String, Mask>) {
        let mut model = builtin_model("tiny-llama").unwrap();
        let mut masks = BTreeMap::new();
        let names: Vec<String> = model
            .layers()
            .into_iter()
            .filter(|l| l.role.is_block_linear())
            .map(|l| l.name)
            .collect();
        for name in names {
            let w = model.weight(&name).unwrap().clone();
            let keep: Vec<bool> = (0..w.elem_count()).map(|i| (i * 7919) % 5 < 2).collect();
            let mask = Mask::new(w.dims().to_vec(), keep.clone(), Structure::Unstructured).unwrap();
            let data: Vec<f32> = w
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .zip(&keep)
                .map(|(w, k)| if *k { *w } else { 0.0 })
                .collect();
            let t = Tensor::from_vec(data, w.dims(), &Device::Cpu).unwrap();
            model.set_weight(&name, t, false).unwrap();
            masks.insert(name, mask);
        }
        (model, masks)
    }

    fn run(
        model: &mut Model,
        masks: &BTreeMap<String, Mask>,
        spec: &FinetuneSpec,
        stop_after: Option<u64>,
    ) -> Result<FinetuneReport, FinetuneError> {
        let cancel = CancelToken::new();
        let c = cancel.clone();
        let mut progress = |s: &StepReport| {
            if stop_after == Some(s.step) {
                c.cancel();
            }
        };
        run_cancellable(model, masks, spec, &mut progress, &cancel)
    }

    fn run_with(
        model: &mut Model,
        masks: &BTreeMap<String, Mask>,
        spec: &FinetuneSpec,
        progress: &mut dyn FnMut(&StepReport),
    ) -> Result<FinetuneReport, FinetuneError> {
        run_cancellable(model, masks, spec, progress, &CancelToken::new())
    }

    fn run_cancellable(
        model: &mut Model,
        masks: &BTreeMap<String, Mask>,
        spec: &FinetuneSpec,
        progress: &mut dyn FnMut(&StepReport),
        cancel: &CancelToken,
    ) -> Result<FinetuneReport, FinetuneError> {
        let tokenizer = Tokenizer::for_model(model).unwrap();
        let text = TrainingText::from_text(&text(), spec, &tokenizer).unwrap();
        // The teacher is the dense model the pruned one came from.
        let teacher = builtin_model("tiny-llama").unwrap();
        finetune(
            model,
            &mut masks.clone(),
            spec,
            text,
            "test",
            Some(&teacher),
            &mut |s: &StepReport| progress(s),
            None,
            cancel,
        )
    }

    /// Magnitude pruning of every block linear at the schedule's density: the `magnitude`
    /// plugin's per-layer selection (largest |w| kept, ties to the lower index), in Rust.
    struct Magnitude {
        schedule: crate::schedule::Schedule,
        layers: Vec<String>,
    }

    impl Pruner for Magnitude {
        fn is_event(&self, step: u64) -> bool {
            self.schedule.is_event(step)
        }
        fn layers(&self) -> std::collections::BTreeSet<String> {
            self.layers.iter().cloned().collect()
        }
        fn identity(&self) -> String {
            serde_json::to_string(&self.schedule).unwrap()
        }
        fn prune(
            &mut self,
            step: u64,
            model: &Model,
            masks: &BTreeMap<String, Mask>,
            _cancel: &CancelToken,
        ) -> Result<(BTreeMap<String, Mask>, Vec<PruneEvent>), FinetuneError> {
            let target = self.schedule.density_at(step);
            Ok(magnitude_prune(model, &self.layers, masks, step, target))
        }
    }

    /// The `magnitude` plugin's per-layer selection at `target` (largest |w| kept, ties to the
    /// lower index), intersected with the current masks, and its event.
    fn magnitude_prune(
        model: &Model,
        layers: &[String],
        masks: &BTreeMap<String, Mask>,
        step: u64,
        target: f64,
    ) -> (BTreeMap<String, Mask>, Vec<PruneEvent>) {
        let mut out = BTreeMap::new();
        let (mut kept, mut total) = (0, 0);
        for name in layers {
            let w = model.weight(name).unwrap();
            let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let k = (target * v.len() as f64).round() as usize;
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
            let mut keep = vec![false; v.len()];
            order[..k].iter().for_each(|&i| keep[i] = true);
            let mut mask = Mask::new(w.dims().to_vec(), keep, Structure::Unstructured).unwrap();
            if let Some(old) = masks.get(name) {
                mask = mask.and(old).unwrap();
            }
            kept += mask.kept();
            total += v.len();
            out.insert(name.clone(), mask);
        }
        let event = PruneEvent {
            stage: "magnitude".into(),
            step,
            target_density: target,
            density: kept as f64 / total as f64,
            seconds: 0.0,
        };
        (out, vec![event])
    }

    /// Hears steps and prune events; cancels after `stop_after` steps; after every step checks
    /// the checkpoint (written each step) against its own masks and the masks before it.
    struct Watch {
        cancel: CancelToken,
        stop_after: Option<u64>,
        path: PathBuf,
        events: Vec<PruneEvent>,
        last_keep: BTreeMap<String, Vec<bool>>,
        checked: usize,
    }

    impl FinetuneObserver for Watch {
        fn step(&mut self, step: &StepReport) {
            if self.stop_after == Some(step.step) {
                self.cancel.cancel();
            }
            if !self.path.exists() {
                return;
            }
            let keeps = assert_checkpoint_holds_own_masks(&self.path);
            for (name, keep) in &keeps {
                if let Some(before) = self.last_keep.get(name) {
                    assert!(
                        keep.iter().zip(before).all(|(k, b)| !*k || *b),
                        "{name}: a pruned weight came back"
                    );
                }
            }
            self.last_keep = keeps;
            self.checked += 1;
        }
        fn pruned(&mut self, event: &PruneEvent) {
            self.events.push(event.clone());
        }
    }

    /// Asserts that `a` and `b` hold the same trained weights, bit for bit.
    fn assert_same_weights(a: &Model, b: &Model, masks: &BTreeMap<String, Mask>) {
        for ((name, a), (_, b)) in weights(a, masks).iter().zip(&weights(b, masks)) {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs after resuming"
            );
        }
    }

    /// Asserts that the checkpoint at `path` holds exact zeros wherever its own masks prune,
    /// in the weights and both moments; returns its masks.
    fn assert_checkpoint_holds_own_masks(path: &Path) -> BTreeMap<String, Vec<bool>> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let mut keeps = BTreeMap::new();
        for (key, t) in &tensors {
            let Some(name) = key.strip_prefix("keep/") else {
                continue;
            };
            let keep: Vec<bool> = t
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
                .into_iter()
                .map(|b| b != 0)
                .collect();
            let mask = Mask::new(t.dims().to_vec(), keep.clone(), Structure::Unstructured).unwrap();
            assert_checkpoint_holds_masks(path, &BTreeMap::from([(name.to_string(), mask)]));
            keeps.insert(name.to_string(), keep);
        }
        keeps
    }

    /// A dense tiny model, its block linears, and a cubic schedule from 0.9 to 0.2 with events
    /// at steps 0, 2 and 4 of a 6-step fine-tune checkpointed every step.
    fn scheduled_setup(dir: &Path) -> (Model, Magnitude, FinetuneSpec) {
        let model = builtin_model("tiny-llama").unwrap();
        let layers = model
            .layers()
            .into_iter()
            .filter(|l| l.role.is_block_linear())
            .map(|l| l.name)
            .collect();
        let schedule = crate::schedule::Schedule {
            kind: crate::schedule::ScheduleKind::Cubic,
            start: 0,
            end: 4,
            every: 2,
            initial: 0.9,
            final_density: 0.2,
        };
        let mut s = spec(Some(dir));
        s.steps = 6;
        s.checkpoint_every = 1;
        (model, Magnitude { schedule, layers }, s)
    }

    /// A fine-tune of the test text from no masks, with `pruner` running between steps and
    /// `watch` seeing every step: what the schedule and lottery tests share.
    fn run_pruned(
        model: &mut Model,
        spec: &FinetuneSpec,
        watch: &mut dyn FinetuneObserver,
        pruner: &mut dyn Pruner,
        cancel: &CancelToken,
    ) -> (
        Result<FinetuneReport, FinetuneError>,
        BTreeMap<String, Mask>,
    ) {
        let tokenizer = Tokenizer::for_model(model).unwrap();
        let text = TrainingText::from_text(&text(), spec, &tokenizer).unwrap();
        let mut masks = BTreeMap::new();
        let result = finetune(
            model,
            &mut masks,
            spec,
            text,
            "test",
            None,
            watch,
            Some(pruner),
            cancel,
        );
        (result, masks)
    }

    fn run_scheduled(
        model: &mut Model,
        pruner: &mut Magnitude,
        spec: &FinetuneSpec,
        stop_after: Option<u64>,
    ) -> (
        Result<FinetuneReport, FinetuneError>,
        Watch,
        BTreeMap<String, Mask>,
    ) {
        let mut watch = Watch {
            cancel: CancelToken::new(),
            stop_after,
            path: spec.checkpoint_path().unwrap(),
            events: Vec::new(),
            last_keep: BTreeMap::new(),
            checked: 0,
        };
        let cancel = watch.cancel.clone();
        let (result, masks) = run_pruned(model, spec, &mut watch, pruner, &cancel);
        (result, watch, masks)
    }

    /// Each event prunes every layer to exactly the density the schedule gives for its step,
    /// masks only shrink from one checkpoint to the next, pruned weights and both moments stay
    /// exactly zero in every checkpoint, and the model ends at the final density.
    #[test]
    fn scheduled_pruning_follows_the_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let (mut model, mut pruner, s) = scheduled_setup(dir.path());
        let (report, watch, masks) = run_scheduled(&mut model, &mut pruner, &s, None);
        let report = report.unwrap();
        let steps: Vec<u64> = watch.events.iter().map(|e| e.step).collect();
        assert_eq!(steps, vec![0, 2, 4]);
        assert_eq!(report.prune_events, watch.events);
        let numel: usize = pruner
            .layers
            .iter()
            .map(|n| model.weight(n).unwrap().elem_count())
            .sum();
        for e in &watch.events {
            assert_eq!(e.target_density, pruner.schedule.density_at(e.step));
            // Per layer round(d · n) kept: the reached density is within half a weight per layer.
            let slack = pruner.layers.len() as f64 / numel as f64;
            assert!((e.density - e.target_density).abs() <= slack, "{e:?}");
        }
        assert_eq!(watch.events[0].target_density, 0.9);
        assert_eq!(watch.events[2].target_density, 0.2);
        assert_eq!(watch.checked, 5, "steps 2..=6 saw a checkpoint");
        // The final model: exactly the returned masks, zeros in place.
        let mut kept = 0;
        for name in &pruner.layers {
            let keep = masks[name].keep();
            let w = model
                .weight(name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, k) in w.iter().zip(keep) {
                if !k {
                    assert_eq!(x.to_bits(), 0, "{name}");
                }
            }
            let layer = (0.2 * keep.len() as f64).round() as usize;
            assert_eq!(masks[name].kept(), layer, "{name}");
            kept += masks[name].kept();
        }
        assert_eq!(report.trained_weights, kept);
    }

    /// Interrupted after step 3 (the last checkpoint is step 2's, written before the event at
    /// step 2) and resumed, the scheduled fine-tune ends with the same weights, masks, losses and
    /// events as an uninterrupted run.
    #[test]
    fn scheduled_resume_across_an_event() {
        let whole_dir = tempfile::tempdir().unwrap();
        let (model, mut pruner, s) = scheduled_setup(whole_dir.path());
        let mut whole = model.clone();
        let (full, _, full_masks) = run_scheduled(&mut whole, &mut pruner, &s, None);
        let full = full.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (_, mut pruner, mut s) = scheduled_setup(dir.path());
        s.checkpoint_every = 2;
        let mut first = model.clone();
        let (stopped, watch, _) = run_scheduled(&mut first, &mut pruner, &s, Some(3));
        assert!(matches!(stopped, Err(FinetuneError::Cancelled)));
        assert_eq!(
            watch.events.len(),
            2,
            "the event at step 2 ran before the interruption"
        );
        let mut resumed = model.clone();
        let (report, _, masks) = run_scheduled(&mut resumed, &mut pruner, &s, None);
        let report = report.unwrap();
        assert_eq!(report.resumed_from, Some(2));
        assert_eq!(masks, full_masks);
        for (name, mask) in &full_masks {
            let a = whole.weight(name).unwrap().flatten_all().unwrap();
            let b = resumed.weight(name).unwrap().flatten_all().unwrap();
            let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs after resuming"
            );
            assert_eq!(mask.kept(), (0.2 * a.len() as f64).round() as usize);
        }
        assert_eq!(report.loss_curve, full.loss_curve);
        let strip = |r: &FinetuneReport| -> Vec<(u64, u64, u64)> {
            r.prune_events
                .iter()
                .map(|e| (e.step, e.target_density.to_bits(), e.density.to_bits()))
                .collect()
        };
        assert_eq!(strip(&report), strip(&full));
    }

    fn weights(model: &Model, masks: &BTreeMap<String, Mask>) -> Vec<(String, Vec<f32>)> {
        masks
            .keys()
            .map(|n| {
                let w = model.weight(n).unwrap();
                (
                    n.clone(),
                    w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect()
    }

    /// Asserts that the checkpoint at `path` holds exact zeros wherever a mask prunes, in the
    /// weights and in both AdamW moments.
    fn assert_checkpoint_holds_masks(path: &Path, masks: &BTreeMap<String, Mask>) {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        for (name, mask) in masks {
            for prefix in ["weight", "m", "v"] {
                let t = tensors[&format!("{prefix}/{name}")]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (x, k) in t.iter().zip(mask.keep()) {
                    if !k {
                        assert_eq!(x.to_bits(), 0, "{prefix}/{name}");
                    }
                }
            }
        }
    }

    /// After every step the pruned weights, their gradients (as the optimizer saw them) and
    /// both moments are exactly zero, and training lowers the loss on its own text.
    #[test]
    fn masks_hold_through_training_and_loss_falls() {
        let dir = tempfile::tempdir().unwrap();
        let (mut model, masks) = pruned_model();
        let before = weights(&model, &masks);
        let mut s = spec(Some(dir.path()));
        s.checkpoint_every = 1;
        s.steps = 6;
        let report = run(&mut model, &masks, &s, None).unwrap();
        assert_eq!(report.loss_curve.len(), 6);
        assert!(report.final_loss < report.first_loss, "{report:?}");
        assert_eq!(report.trained_layers, masks.len());
        let after = weights(&model, &masks);
        let mut changed = 0;
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            let keep = masks[name].keep();
            for i in 0..a.len() {
                if keep[i] {
                    changed += usize::from(a[i] != b[i]);
                } else {
                    assert_eq!(a[i].to_bits(), 0, "{name}[{i}] came back");
                }
            }
        }
        assert!(changed > 0, "training changed nothing");
        // The checkpoint of the last step holds the same invariant in its moments.
        assert_checkpoint_holds_masks(&dir.path().join(CHECKPOINT_FILE), &masks);
        // Every step's state, not only the last: at each step the checkpoint on disk holds
        // the previous step's weights and moments.
        let (mut model, masks) = pruned_model();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(Some(dir.path()));
        s.checkpoint_every = 1;
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut checked = 0;
        let mut check = |_: &StepReport| {
            if !path.exists() {
                return;
            }
            assert_checkpoint_holds_masks(&path, &masks);
            checked += 1;
        };
        run_with(&mut model, &masks, &s, &mut check).unwrap();
        assert_eq!(
            checked, 3,
            "steps 2..=4 saw the checkpoint of the step before"
        );
    }

    /// Interrupted after step 3 (its last checkpoint is step 2) and run again, the fine-tune
    /// ends with exactly the weights of a run that was never interrupted.
    #[test]
    fn resume_equals_uninterrupted_run() {
        let (model, masks) = pruned_model();
        let whole_dir = tempfile::tempdir().unwrap();
        let mut whole = model.clone();
        let full = run(&mut whole, &masks, &spec(Some(whole_dir.path())), None).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let s = spec(Some(dir.path()));
        let mut first = model.clone();
        assert!(matches!(
            run(&mut first, &masks, &s, Some(3)),
            Err(FinetuneError::Cancelled)
        ));
        let mut resumed = model.clone();
        let report = run(&mut resumed, &masks, &s, None).unwrap();
        assert_eq!(report.resumed_from, Some(2));
        assert_same_weights(&whole, &resumed, &masks);
        assert_eq!(report.loss_curve, full.loss_curve);
        assert_eq!(report.final_loss.to_bits(), full.final_loss.to_bits());
    }

    /// A bf16 fine-tune (mixed-precision products) holds the masks in its weights and both
    /// moments, lowers the loss, resumes to exactly the uninterrupted run's weights, and
    /// refuses the checkpoint of the same run at f32 (a different result), leaving it as it
    /// was.
    #[test]
    fn bf16_finetune_holds_masks_and_resumes_exactly() {
        if !TrainingPass::bf16_available() {
            eprintln!("skipped: this CPU has no AVX512-BF16, which bf16 training needs");
            return;
        }
        let (model, masks) = pruned_model();
        let whole_dir = tempfile::tempdir().unwrap();
        let mut s = spec(Some(whole_dir.path()));
        s.precision = TrainingPrecision::Bf16;
        let mut whole = model.clone();
        let full = run(&mut whole, &masks, &s, None).unwrap();
        assert!(full.final_loss < full.first_loss, "{full:?}");
        for (name, w) in weights(&whole, &masks) {
            for (x, k) in w.iter().zip(masks[&name].keep()) {
                if !k {
                    assert_eq!(x.to_bits(), 0, "{name}");
                }
            }
        }
        assert_checkpoint_holds_masks(&whole_dir.path().join(CHECKPOINT_FILE), &masks);
        // The f32 run differs: bf16 products are not f32's.
        let mut at_f32 = model.clone();
        let f32_run = run(&mut at_f32, &masks, &spec(None), None).unwrap();
        assert_ne!(f32_run.final_loss.to_bits(), full.final_loss.to_bits());

        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(Some(dir.path()));
        s.precision = TrainingPrecision::Bf16;
        assert!(matches!(
            run(&mut model.clone(), &masks, &s, Some(3)),
            Err(FinetuneError::Cancelled)
        ));
        // Resuming at f32 from the bf16 checkpoint is another run: refused, file untouched.
        let path = dir.path().join(CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).unwrap();
        let e = run(&mut model.clone(), &masks, &spec(Some(dir.path())), None).unwrap_err();
        assert!(e.to_string().contains("another run"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let mut resumed = model.clone();
        let report = run(&mut resumed, &masks, &s, None).unwrap();
        assert_eq!(report.resumed_from, Some(2));
        assert_same_weights(&whole, &resumed, &masks);
        assert_eq!(report.final_loss.to_bits(), full.final_loss.to_bits());
    }

    /// A checkpoint of another run (here: another seed) is refused and left as it was.
    #[test]
    fn foreign_checkpoints_are_refused_untouched() {
        let (model, masks) = pruned_model();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(Some(dir.path()));
        s.steps = 1;
        run(&mut model.clone(), &masks, &s, None).unwrap();
        let path = dir.path().join(CHECKPOINT_FILE);
        let bytes = std::fs::read(&path).unwrap();
        s.seed = 9;
        let e = run(&mut model.clone(), &masks, &s, None).unwrap_err();
        assert!(
            matches!(&e, FinetuneError::Checkpoint { .. }) && e.to_string().contains("another run"),
            "{e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        // Garbage in its place is refused the same way.
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let e = run(&mut model.clone(), &masks, &s, None).unwrap_err();
        assert!(matches!(e, FinetuneError::Checkpoint { .. }), "{e}");
    }

    /// A learning rate that blows the weights up stops with a clear error at the first
    /// non-finite step, naming the last checkpoint kept.
    #[test]
    fn divergence_is_an_error() {
        let (mut model, masks) = pruned_model();
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(Some(dir.path()));
        s.lr = 1e30;
        s.clip = None;
        s.warmup = 0;
        s.steps = 20;
        s.checkpoint_every = 1;
        let e = run(&mut model, &masks, &s, None).unwrap_err();
        assert!(matches!(e, FinetuneError::Diverged { .. }), "{e}");
        assert!(e.to_string().contains("learning rate"), "{e}");
    }

    /// A text that does not fill one batch is refused before any step.
    #[test]
    fn short_text_is_refused() {
        let model = builtin_model("tiny-llama").unwrap();
        let tokenizer = Tokenizer::for_model(&model).unwrap();
        let e = TrainingText::from_text("too short", &spec(None), &tokenizer)
            .err()
            .unwrap();
        assert!(e.to_string().contains("fewer than one batch"), "{e}");
    }

    #[test]
    fn data_order_is_a_seeded_shuffle_per_epoch() {
        let seqs: Vec<Vec<u32>> = (0..5).map(|i| vec![i]).collect();
        let mut a = Data::new(seqs.clone(), 1);
        let mut b = Data::new(seqs.clone(), 1);
        let first: Vec<u32> = a.next_batch(5).into_iter().flatten().collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            vec![0, 1, 2, 3, 4],
            "an epoch visits every sequence once"
        );
        assert_eq!(
            first,
            b.next_batch(5).into_iter().flatten().collect::<Vec<_>>()
        );
        let second: Vec<u32> = a.next_batch(5).into_iter().flatten().collect();
        assert_eq!(a.epoch, 1);
        assert_ne!(first, second, "each epoch is shuffled anew");
    }

    /// Hidden-state distillation needs the hand-written pass: on a GPT-2 model (autograd) it
    /// is refused, naming the setting, while plain distillation still runs there.
    #[test]
    fn hidden_state_distillation_is_refused_where_autograd_trains() {
        let model = builtin_model("tiny-gpt2").unwrap();
        let (student, teacher) = (Session::new(&model).unwrap(), Session::new(&model).unwrap());
        let d = Distillation {
            weight: 1.0,
            temperature: 1.0,
        };
        let err = Gradients::new(&student, Some((&teacher, d)), 1.0, TrainingPrecision::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("finetune.distill.hidden"), "{err}");
        assert!(matches!(
            Gradients::new(&student, Some((&teacher, d)), 0.0, TrainingPrecision::F32),
            Ok(Gradients::Autograd)
        ));
    }

    /// With distillation from the dense model (logits and hidden states): every step reports
    /// the loss parts (mixed as the settings say, the KL and the hidden-state term positive
    /// since pruning moved the model), the masks hold, a resume across an interruption is
    /// bit-exact (parts included), and a checkpoint of the same run without distillation is
    /// refused.
    #[test]
    fn distilled_finetune_reports_parts_holds_masks_and_resumes_exactly() {
        let (model, masks) = pruned_model();
        let mut s = spec(None);
        s.distill = Some(DistillSpec {
            weight: 0.5,
            temperature: 2.0,
            hidden: 0.25,
        });
        let whole_dir = tempfile::tempdir().unwrap();
        s.checkpoint_dir = Some(whole_dir.path().to_path_buf());
        let mut whole = model.clone();
        let mut steps = Vec::new();
        let full = run_with(&mut whole, &masks, &s, &mut |r: &StepReport| {
            steps.push(r.clone())
        })
        .unwrap();
        assert_eq!(steps.len(), 4);
        for r in &steps {
            let p = r.parts.unwrap();
            let hidden = p.hidden.unwrap();
            assert!(p.kl > 0.0 && p.cross_entropy > 0.0 && hidden > 0.0, "{r:?}");
            let mix = 0.5 * p.cross_entropy + 0.5 * 4.0 * p.kl + 0.25 * hidden;
            assert!((r.loss - mix).abs() <= 1e-9 * mix, "{r:?}");
        }
        let [first, last, _] = full.parts.unwrap();
        assert_eq!(first, steps[0].parts.unwrap());
        assert_eq!(last, steps[3].parts.unwrap());
        assert!(full.loss_curve.iter().all(|p| p.parts.is_some()));
        for (name, w) in weights(&whole, &masks) {
            let keep = masks[&name].keep();
            assert!(
                w.iter().zip(keep).all(|(w, k)| *k || w.to_bits() == 0),
                "{name}: a pruned weight came back"
            );
        }
        // Interrupted after step 3 and resumed from step 2's checkpoint.
        let dir = tempfile::tempdir().unwrap();
        s.checkpoint_dir = Some(dir.path().to_path_buf());
        assert!(matches!(
            run(&mut model.clone(), &masks, &s, Some(3)),
            Err(FinetuneError::Cancelled)
        ));
        let mut resumed = model.clone();
        let report = run(&mut resumed, &masks, &s, None).unwrap();
        assert_eq!(report.resumed_from, Some(2));
        let bits = |m: &Model| -> Vec<(String, Vec<u32>)> {
            weights(m, &masks)
                .into_iter()
                .map(|(n, w)| (n, w.iter().map(|x| x.to_bits()).collect()))
                .collect()
        };
        assert_eq!(
            bits(&resumed),
            bits(&whole),
            "weights differ after resuming"
        );
        assert_eq!(report.loss_curve, full.loss_curve);
        assert_eq!(report.parts, full.parts);
        // The same run without distillation is another run.
        s.distill = None;
        let e = run(&mut model.clone(), &masks, &s, None).unwrap_err();
        assert!(matches!(e, FinetuneError::Checkpoint { .. }), "{e}");
    }

    /// Swaps the first kept position of one layer for its first pruned one, and records the
    /// mean gradient it was given.
    struct Swap {
        layer: String,
        seen_gradient: Option<(f32, u32)>,
    }

    impl Pruner for Swap {
        fn is_event(&self, _: u64) -> bool {
            false
        }
        fn layers(&self) -> std::collections::BTreeSet<String> {
            Default::default()
        }
        fn identity(&self) -> String {
            "swap".into()
        }
        fn prune(
            &mut self,
            _: u64,
            _: &Model,
            _: &BTreeMap<String, Mask>,
            _: &CancelToken,
        ) -> Result<(BTreeMap<String, Mask>, Vec<PruneEvent>), FinetuneError> {
            Ok(Default::default())
        }
        fn update(
            &mut self,
            step: u64,
            _: &Model,
            masks: &BTreeMap<String, Mask>,
            gradients: &BTreeMap<String, Tensor>,
            gradient_steps: u32,
            _: &CancelToken,
        ) -> Result<(BTreeMap<String, Mask>, Vec<UpdateEvent>), FinetuneError> {
            let g = gradients[&self.layer]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            self.seen_gradient = Some((g[0], gradient_steps));
            let old = &masks[&self.layer];
            let mut keep = old.keep().to_vec();
            let drop = keep.iter().position(|k| *k).unwrap();
            let grow = keep.iter().position(|k| !*k).unwrap();
            keep[drop] = false;
            keep[grow] = true;
            let mask = Mask::new(old.shape().to_vec(), keep, old.structure()).unwrap();
            let event = UpdateEvent {
                stage: "swap".into(),
                step,
                drop_fraction: 0.0,
                dropped: 1,
                grown: 1,
                density: mask.density(),
                gradient_steps,
                seconds: 0.0,
            };
            Ok((BTreeMap::from([(self.layer.clone(), mask)]), vec![event]))
        }
    }

    /// At a mask update the dropped weight and both its moments become exact zeros, the grown
    /// one starts at exactly zero with reset moments (even if something had left them set),
    /// every other weight and moment is untouched, the pruner sees the mean of the summed
    /// gradient, and the sums restart from zero.
    #[test]
    fn a_mask_update_zeroes_dropped_and_starts_grown_weights_at_zero() {
        let (mut model, mut masks) = pruned_model();
        let mut session = Session::new(&model).unwrap();
        let name = masks.keys().next().unwrap().clone();
        let w = model.weight(&name).unwrap().clone();
        let weights = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let keep = masks[&name].keep().to_vec();
        let n = keep.len();
        let drop = keep.iter().position(|k| *k).unwrap();
        let grow = keep.iter().position(|k| !*k).unwrap();
        let mut moments = Moments::zeros(n);
        moments.m.iter_mut().for_each(|m| *m = 0.5);
        moments.v.iter_mut().for_each(|v| *v = 0.25);
        let mut params = vec![Param {
            name: name.clone(),
            shape: w.dims().to_vec(),
            weights: weights.clone(),
            keep: Some(keep.clone()),
            moments,
            dense_grad: Some(vec![1.0; n]),
            rewind: None,
        }];
        let biases = BTreeMap::from([(name.clone(), None)]);
        let mut swap = Swap {
            layer: name.clone(),
            seen_gradient: None,
        };
        let events = update_event(
            3,
            &mut swap,
            &mut model,
            (&mut session, &biases),
            &mut params,
            &mut masks,
            4,
            &CancelToken::new(),
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            swap.seen_gradient,
            Some((0.25, 4)),
            "the mean of 4 summed steps"
        );
        let p = &params[0];
        assert_ne!(weights[drop], 0.0);
        for i in [drop, grow] {
            assert_eq!(p.weights[i].to_bits(), 0, "weight {i}");
            assert_eq!(p.moments.m[i].to_bits(), 0, "m {i}");
            assert_eq!(p.moments.v[i].to_bits(), 0, "v {i}");
        }
        for i in (0..n).filter(|&i| i != drop && i != grow) {
            assert_eq!(p.weights[i].to_bits(), weights[i].to_bits());
            assert_eq!(p.moments.m[i], 0.5);
        }
        assert!(p.dense_grad.as_ref().unwrap().iter().all(|g| *g == 0.0));
        let new = &masks[&name];
        assert!(!new.keep()[drop] && new.keep()[grow]);
        assert_eq!(new.kept(), keep.iter().filter(|k| **k).count());
        assert_eq!(p.keep.as_deref(), Some(new.keep()));
    }

    /// Magnitude pruning in lottery rounds: [`magnitude_prune`] at the end of each pruning
    /// round, at the round's density.
    struct LotteryMagnitude {
        rounds: Rounds,
        steps: u64,
        layers: Vec<String>,
    }

    impl Pruner for LotteryMagnitude {
        fn is_event(&self, step: u64) -> bool {
            self.rounds.is_prune(step, self.steps)
        }
        fn layers(&self) -> std::collections::BTreeSet<String> {
            self.layers.iter().cloned().collect()
        }
        fn identity(&self) -> String {
            serde_json::to_string(&self.rounds).unwrap()
        }
        fn rounds(&self) -> Option<Rounds> {
            Some(self.rounds)
        }
        fn prune(
            &mut self,
            step: u64,
            model: &Model,
            masks: &BTreeMap<String, Mask>,
            _cancel: &CancelToken,
        ) -> Result<(BTreeMap<String, Mask>, Vec<PruneEvent>), FinetuneError> {
            let round = self.rounds.round_ending_at(step, self.steps).unwrap();
            let target = self.rounds.density_after(round);
            Ok(magnitude_prune(model, &self.layers, masks, step, target))
        }
    }

    /// Every tensor of the checkpoint at `path` under `prefix/`, by layer.
    fn checkpoint_tensors(path: &Path, prefix: &str) -> BTreeMap<String, Vec<f32>> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        tensors
            .iter()
            .filter_map(|(k, t)| {
                let name = k.strip_prefix(&format!("{prefix}/"))?;
                let t = t.flatten_all().unwrap();
                let v = if t.dtype() == DType::U8 {
                    t.to_vec1::<u8>()
                        .unwrap()
                        .into_iter()
                        .map(f32::from)
                        .collect()
                } else {
                    t.to_vec1::<f32>().unwrap()
                };
                Some((name.to_string(), v))
            })
            .collect()
    }

    /// Hears a lottery fine-tune. At the step after `record_after` it keeps the weights of the
    /// checkpoint then on disk (that step's: the late-rewinding target). At every round that
    /// pruned it reads the checkpoint written at the boundary and checks the next round's
    /// start: each layer keeps exactly `round(d · n)` weights for the round's density `d`,
    /// within the previous round's mask, its survivors hold the rewind target's bits, its
    /// pruned weights are exact zeros and both moments are zero everywhere.
    struct RoundWatch {
        cancel: CancelToken,
        stop_after: Option<u64>,
        path: PathBuf,
        record_after: Option<u64>,
        /// The weights the survivors must be rewound to (the starting ones unless recorded).
        target: BTreeMap<String, Vec<f32>>,
        rounds: Vec<RoundReport>,
        keeps: Vec<BTreeMap<String, Vec<f32>>>,
        steps: Vec<StepReport>,
        checked: usize,
        spec: Rounds,
    }

    impl FinetuneObserver for RoundWatch {
        fn step(&mut self, step: &StepReport) {
            if self.record_after.is_some_and(|k| step.step == k + 1) {
                self.target = checkpoint_tensors(&self.path, "weight");
            }
            self.steps.push(step.clone());
            if self.stop_after == Some(step.step) {
                self.cancel.cancel();
            }
        }
        fn round(&mut self, round: &RoundReport) {
            self.rounds.push(round.clone());
            let Some(pruned_to) = round.pruned_to else {
                return;
            };
            let density = self.spec.density_after(round.round - 1);
            let keeps = checkpoint_tensors(&self.path, "keep");
            let weights = checkpoint_tensors(&self.path, "weight");
            let (m, v) = (
                checkpoint_tensors(&self.path, "m"),
                checkpoint_tensors(&self.path, "v"),
            );
            assert_eq!(keeps.len(), self.target.len(), "every layer has a mask");
            let (mut kept, mut numel) = (0, 0);
            for (name, keep) in &keeps {
                let n = keep.iter().filter(|k| **k != 0.0).count();
                assert_eq!(n, (density * keep.len() as f64).round() as usize, "{name}");
                kept += n;
                numel += keep.len();
                if let Some(before) = self.keeps.last() {
                    assert!(
                        keep.iter()
                            .zip(&before[name])
                            .all(|(k, b)| *k == 0.0 || *b != 0.0),
                        "{name}: a weight pruned in an earlier round came back"
                    );
                }
                let target = &self.target[name];
                for (i, (w, k)) in weights[name].iter().zip(keep).enumerate() {
                    let want = if *k != 0.0 { target[i] } else { 0.0 };
                    assert_eq!(w.to_bits(), want.to_bits(), "{name}[{i}] not rewound");
                }
                assert!(
                    m[name].iter().chain(&v[name]).all(|x| x.to_bits() == 0),
                    "{name}: moments"
                );
            }
            assert_eq!(pruned_to, kept as f64 / numel as f64);
            self.keeps.push(keeps);
            self.checked += 1;
        }
    }

    /// Every block linear of the dense tiny model, a lottery of `count` rounds to 0.25 with
    /// `rewind`, 3 steps per round, a checkpoint after every step in `dir`.
    fn lottery_setup(dir: &Path, rewind: Rewind) -> (Model, LotteryMagnitude, FinetuneSpec) {
        let model = builtin_model("tiny-llama").unwrap();
        let layers = model
            .layers()
            .into_iter()
            .filter(|l| l.role.is_block_linear())
            .map(|l| l.name)
            .collect();
        let mut s = spec(Some(dir));
        s.steps = 3;
        s.checkpoint_every = 1;
        let rounds = Rounds {
            count: 2,
            rewind,
            final_density: 0.25,
        };
        (
            model,
            LotteryMagnitude {
                rounds,
                steps: s.steps,
                layers,
            },
            s,
        )
    }

    /// Runs a lottery fine-tune under a [`RoundWatch`]; `target` gives the rewind target when
    /// a resumed run will not see the step that records it.
    fn run_lottery(
        model: &mut Model,
        pruner: &mut LotteryMagnitude,
        spec: &FinetuneSpec,
        stop_after: Option<u64>,
        target: Option<&BTreeMap<String, Vec<f32>>>,
    ) -> (
        Result<FinetuneReport, FinetuneError>,
        RoundWatch,
        BTreeMap<String, Mask>,
    ) {
        // The starting weights: `init`'s rewind target.
        let starting: BTreeMap<String, Vec<f32>> = pruner
            .layers
            .iter()
            .map(|n| {
                let w = model.weight(n).unwrap().flatten_all().unwrap();
                (n.clone(), w.to_vec1::<f32>().unwrap())
            })
            .collect();
        let mut watch = RoundWatch {
            cancel: CancelToken::new(),
            stop_after,
            path: spec.checkpoint_path().unwrap(),
            record_after: match pruner.rounds.rewind {
                Rewind::Step(k) if target.is_none() => Some(k),
                _ => None,
            },
            target: target.cloned().unwrap_or(starting),
            rounds: Vec::new(),
            keeps: Vec::new(),
            steps: Vec::new(),
            checked: 0,
            spec: pruner.rounds,
        };
        let cancel = watch.cancel.clone();
        let (result, masks) = run_pruned(model, spec, &mut watch, pruner, &cancel);
        (result, watch, masks)
    }

    /// Two rounds rewound to the starting weights: the stage prunes after steps 3 and 6 to
    /// 0.5 and exactly 0.25, each round's start holds the starting weights at its survivors
    /// (checked by [`RoundWatch`] in the checkpoint written at the boundary), and the report
    /// lists the three rounds; the ticket ends at 0.25 with zeros in place.
    #[test]
    fn lottery_rounds_prune_nested_masks_and_rewind_to_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let (mut model, mut pruner, s) = lottery_setup(dir.path(), Rewind::Init);
        let (report, watch, masks) = run_lottery(&mut model, &mut pruner, &s, None, None);
        let report = report.unwrap();
        assert_eq!(watch.checked, 2, "both prunings were checked");
        assert_eq!(watch.steps.len(), 9);
        assert_eq!(watch.steps[3].round, Some(2));
        assert_eq!(watch.steps[8].steps, 9);
        // Every round runs the whole schedule: its first step at the schedule's first rate.
        for first in [0, 3, 6] {
            assert_eq!(
                watch.steps[first].learning_rate,
                watch.steps[0].learning_rate
            );
        }
        assert_eq!(report.rounds, watch.rounds);
        let summary: Vec<(u32, u64, u64, Option<u64>)> = report
            .rounds
            .iter()
            .map(|r| (r.round, r.steps, r.last_step, r.rewound_to))
            .collect();
        assert_eq!(
            summary,
            [(1, 3, 3, Some(0)), (2, 3, 6, Some(0)), (3, 3, 9, None)]
        );
        assert_eq!(report.rounds[0].density, 1.0);
        assert_eq!(
            report.rounds[1].density,
            report.rounds[0].pruned_to.unwrap()
        );
        assert_eq!(
            report.rounds[2].density,
            report.rounds[1].pruned_to.unwrap()
        );
        let steps: Vec<(u64, f64)> = report
            .prune_events
            .iter()
            .map(|e| (e.step, e.target_density))
            .collect();
        assert_eq!(steps.len(), 2);
        assert_eq!((steps[0].0, steps[1].0), (3, 6));
        assert!((steps[0].1 - 0.5).abs() < 1e-12, "{steps:?}");
        assert_eq!(
            steps[1].1, 0.25,
            "the last round reaches the density exactly"
        );
        assert_eq!(report.loss_curve.last().unwrap().last, 9);
        assert_eq!(
            report.rounds[2].final_loss.to_bits(),
            report.final_loss.to_bits()
        );
        for name in &pruner.layers {
            let keep = masks[name].keep();
            assert_eq!(
                masks[name].kept(),
                (0.25 * keep.len() as f64).round() as usize,
                "{name}"
            );
            let w = model.weight(name).unwrap().flatten_all().unwrap();
            let w = w.to_vec1::<f32>().unwrap();
            assert!(
                w.iter().zip(keep).all(|(w, k)| *k || w.to_bits() == 0),
                "{name}"
            );
        }
    }

    /// Late rewinding to step 1: rounds of 3, 2 and 2 steps; each round's start holds the
    /// weights the first round had after step 1 (not the starting ones) at its survivors, and
    /// its schedule resumes at step 1's learning rate with fresh moments.
    #[test]
    fn late_rewinding_rewinds_to_the_weights_of_step_k() {
        let dir = tempfile::tempdir().unwrap();
        let (mut model, mut pruner, s) = lottery_setup(dir.path(), Rewind::Step(1));
        let before: Vec<f32> = model
            .weight(&pruner.layers[0])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (report, watch, _) = run_lottery(&mut model, &mut pruner, &s, None, None);
        let report = report.unwrap();
        assert_eq!(watch.checked, 2);
        assert_ne!(
            watch.target[&pruner.layers[0]], before,
            "the rewind target is step 1's weights, not the starting ones"
        );
        let summary: Vec<(u64, u64)> = report
            .rounds
            .iter()
            .map(|r| (r.steps, r.last_step))
            .collect();
        assert_eq!(summary, [(3, 3), (2, 5), (2, 7)]);
        assert_eq!(watch.steps.len(), 7);
        for first in [3, 5] {
            assert_eq!(
                watch.steps[first].learning_rate,
                watch.steps[1].learning_rate
            );
        }
        assert!(report.rounds[..2].iter().all(|r| r.rewound_to == Some(1)));
    }

    /// Interrupted and resumed across a round boundary, a lottery fine-tune ends with the
    /// weights, masks, losses, prune events and rounds of an uninterrupted run, for both
    /// rewinds: from the checkpoint of step 2 (before the boundary at 3: the resumed run
    /// prunes and rewinds itself) and from the one written at the boundary (after them).
    #[test]
    fn lottery_resume_across_a_round_boundary() {
        for rewind in [Rewind::Init, Rewind::Step(1)] {
            let whole_dir = tempfile::tempdir().unwrap();
            let (model, mut pruner, s) = lottery_setup(whole_dir.path(), rewind);
            let mut whole = model.clone();
            let (full, full_watch, full_masks) =
                run_lottery(&mut whole, &mut pruner, &s, None, None);
            let full = full.unwrap();
            // (checkpoint_every, interrupted after, resumed from)
            for (every, stop, from) in [(2, 3, 2), (100, 4, 3)] {
                let dir = tempfile::tempdir().unwrap();
                let (_, mut pruner, mut s) = lottery_setup(dir.path(), rewind);
                s.checkpoint_every = every;
                let (stopped, watch, _) = run_lottery(
                    &mut model.clone(),
                    &mut pruner,
                    &s,
                    Some(stop),
                    Some(&full_watch.target),
                );
                assert!(
                    matches!(stopped, Err(FinetuneError::Cancelled)),
                    "{rewind:?}"
                );
                assert_eq!(watch.rounds.len(), usize::from(stop > 3), "{rewind:?}");
                let mut resumed = model.clone();
                let (report, watch, masks) = run_lottery(
                    &mut resumed,
                    &mut pruner,
                    &s,
                    None,
                    Some(&full_watch.target),
                );
                let report = report.unwrap();
                // The boundaries it crossed itself were checked against the same target.
                assert_eq!(watch.checked, if from == 2 { 2 } else { 1 }, "{rewind:?}");
                assert_eq!(report.resumed_from, Some(from), "{rewind:?}");
                assert_eq!(masks, full_masks, "{rewind:?} from {from}");
                for name in full_masks.keys() {
                    let a = whole.weight(name).unwrap().flatten_all().unwrap();
                    let b = resumed.weight(name).unwrap().flatten_all().unwrap();
                    let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{rewind:?} from {from}: {name} differs after resuming"
                    );
                }
                assert_eq!(report.loss_curve, full.loss_curve, "{rewind:?} from {from}");
                assert_eq!(report.rounds, full.rounds, "{rewind:?} from {from}");
                let strip = |r: &FinetuneReport| -> Vec<(u64, u64, u64)> {
                    r.prune_events
                        .iter()
                        .map(|e| (e.step, e.target_density.to_bits(), e.density.to_bits()))
                        .collect()
                };
                assert_eq!(strip(&report), strip(&full), "{rewind:?} from {from}");
            }
        }
    }
}
