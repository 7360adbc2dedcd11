//! Calibration data and the statistics plugins ask for through the `calibration` interface of
//! WIT 0.2 and later (`wit/since_v0.2.0`, `wit/since_v0.3.0`).
//!
//! A [`CalibrationSet`] is built once per run, at planning: the pipeline's text tokenized with
//! the model's own tokenizer and cut into consecutive, non-overlapping sequences of `seq_len`
//! tokens. A [`Calibrator`] pairs it with one state of the model (earlier stages' masks
//! applied) and computes statistics lazily, on the first request, caching them until the model
//! changes: activation norms for every block linear come from one forward pass over the set, so
//! a criterion asking for thirty layers pays for one pass, not thirty; gradients of every block
//! linear from one forward and backward pass (candle autograd, see
//! [`espalier_engine::LossGradients`]).
//!
//! Loss trials (`loss-with-mask(s)`, what sensitivity measurements make by the hundred) resume
//! from the hidden states entering the first block a trial changes, kept from the first trial:
//! a trial on the last block costs one block and the LM head, not the whole model.
//!
//! Under sequential calibration ([`crate::sequential`]) a calibrator covers one block
//! ([`Calibrator::for_block`]): its norms and Hessians come from running that block alone on
//! the hidden states the pruned blocks before it produced; losses and gradients, which need the
//! whole model, are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor};
use espalier_engine::{
    EngineError, GradientStats, Linear, LinearObserver, LinearWeight, LossGradients, Model,
    Session, Tokenizer, files,
};
use rayon::prelude::*;

use crate::cancel::CancelToken;
use crate::mask::Mask;
use crate::obs::Hessian;
use crate::tensor_util::{apply_mask, tensor_from};

/// Where calibration text comes from and how it is cut (the pipeline's `[calibration]`).
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationSpec {
    /// A UTF-8 text file, relative to the working directory.
    pub text: PathBuf,
    /// Number of sequences (fewer are used when the text is too short for all of them).
    pub samples: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Prune block by block, each block's statistics taken on the outputs of the blocks
    /// before it as already pruned (see [`crate::sequential`]).
    pub sequential: bool,
}

impl Default for CalibrationSpec {
    fn default() -> Self {
        CalibrationSpec {
            text: PathBuf::from("data/calibration.txt"),
            samples: 64,
            seq_len: 256,
            sequential: false,
        }
    }
}

/// Why calibration data could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The text file cannot be read.
    #[error("cannot read calibration text {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The model's tokenizer is missing or failed.
    #[error("cannot tokenize the calibration text: {0}")]
    Tokenizer(#[from] EngineError),
    /// The text does not fill one sequence.
    #[error(
        "calibration text {} has {tokens} tokens, fewer than one sequence of seq_len = {seq_len}; use a longer text or a smaller seq_len",
        path.display()
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Tokens in it.
        tokens: usize,
        /// Tokens one sequence needs.
        seq_len: usize,
    },
}

/// Tokenized calibration sequences, all of the same length.
#[derive(Debug, Clone)]
pub struct CalibrationSet {
    /// The text file they came from.
    pub source: PathBuf,
    /// Token ids, `samples` sequences of `seq_len` tokens.
    pub sequences: Vec<Vec<u32>>,
    /// sha256 of the text's bytes (reports record it; a pinned pipeline checks it).
    pub text_sha256: String,
}

impl CalibrationSet {
    /// Reads `spec.text` and cuts it with the model's tokenizer.
    pub fn load(spec: &CalibrationSpec, model: &Model) -> Result<Self, CalibrationError> {
        let text = files::read_to_string(&spec.text, files::TEXT_LIMIT).map_err(|source| {
            CalibrationError::Read {
                path: spec.text.clone(),
                source,
            }
        })?;
        let tokenizer = Tokenizer::for_model(model)?;
        Self::from_text(&text, &spec.text, &tokenizer, spec.samples, spec.seq_len)
    }

    /// Tokenizes `text` (no special tokens: the sequences are windows of running text) and
    /// takes up to `samples` consecutive non-overlapping chunks of `seq_len` tokens.
    pub fn from_text(
        text: &str,
        source: &Path,
        tokenizer: &Tokenizer,
        samples: usize,
        seq_len: usize,
    ) -> Result<Self, CalibrationError> {
        let ids = tokenizer.encode_with(text, false)?;
        if seq_len == 0 || ids.len() < seq_len {
            return Err(CalibrationError::TooShort {
                path: source.to_path_buf(),
                tokens: ids.len(),
                seq_len,
            });
        }
        let available = ids.len() / seq_len;
        if available < samples {
            tracing::warn!(
                "calibration text {} holds {available} sequences of {seq_len} tokens; using those instead of {samples}",
                source.display()
            );
        }
        let sequences = ids
            .chunks_exact(seq_len)
            .take(samples)
            .map(<[u32]>::to_vec)
            .collect();
        Ok(CalibrationSet {
            source: source.to_path_buf(),
            sequences,
            text_sha256: crate::plugin::runtime::sha256_hex(text.as_bytes()),
        })
    }

    /// Number of sequences.
    pub fn samples(&self) -> usize {
        self.sequences.len()
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.sequences.first().map_or(0, Vec::len)
    }
}

/// Accumulates, per linear layer, the sum over tokens of x_j² for every input column j, in
/// f64 so the order of thousands of additions does not blur near-ties between columns.
#[derive(Default)]
struct SquaredInputs {
    sums: BTreeMap<String, Vec<f64>>,
}

impl LinearObserver for SquaredInputs {
    fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
        let rows = input.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let acc = self
            .sums
            .entry(linear.name().to_string())
            .or_insert_with(|| vec![0.0; linear.in_features()]);
        for row in &rows {
            for (a, &x) in acc.iter_mut().zip(row) {
                let x = f64::from(x);
                *a += x * x;
            }
        }
        Ok(())
    }
}

/// Keeps, per sequence, the input of every block linear, once per distinct input: layers that
/// read the same tensor (q/k/v, gate/up) are recorded as sharing the first one's input.
#[derive(Default)]
struct LinearInputs {
    /// Input tensor and the layer that first read it, in execution order.
    inputs: Vec<(candle_core::TensorId, String, Tensor)>,
    /// Layer name to the name its input is recorded under.
    shared: BTreeMap<String, String>,
}

impl LinearObserver for LinearInputs {
    fn observe(&mut self, linear: &Linear, input: &Tensor) -> Result<(), EngineError> {
        let name = linear.name().to_string();
        let key = match self.inputs.last() {
            Some((id, key, _)) if *id == input.id() => key.clone(),
            _ => {
                self.inputs.push((input.id(), name.clone(), input.clone()));
                name.clone()
            }
        };
        self.shared.insert(name, key);
        Ok(())
    }
}

/// Calibration sequences whose inputs are stacked into one `XᵀX` product: a fixed number, so
/// the f32 sums (and the masks chosen from them) do not depend on the machine's core count.
const HESSIAN_BATCH: usize = 8;

/// The input second moments of every block linear: one [`Hessian`] per distinct input, shared
/// by the layers that read it.
#[derive(Debug, Default)]
pub struct Hessians {
    by_layer: BTreeMap<String, Arc<Hessian>>,
}

impl Hessians {
    /// The Hessian of `layer`'s inputs.
    pub fn get(&self, layer: &str) -> Option<&Arc<Hessian>> {
        self.by_layer.get(layer)
    }

    /// Layers with a Hessian, in name order.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.by_layer.keys().map(String::as_str)
    }
}

/// Most bytes of hidden states kept for resuming loss trials; beyond it (very long calibration
/// sets) every trial runs the whole model instead.
const MAX_RESUME_BYTES: usize = 4 << 30;

/// What a [`Calibrator`]'s statistics are taken over.
enum Scope {
    /// The whole model, run from the calibration tokens.
    Model,
    /// One block, run from the hidden states entering it (one per sequence), as sequential
    /// calibration keeps them: only that block's linears have statistics, and losses and
    /// gradients (which need the rest of the model) are not served.
    Block {
        /// Its index.
        block: usize,
        /// Per sequence, the hidden state entering it.
        inputs: Arc<Vec<Tensor>>,
    },
}

/// Calibration statistics of one state of the model, computed on first request and cached.
pub struct Calibrator {
    set: Arc<CalibrationSet>,
    model: Model,
    scope: Scope,
    session: OnceLock<Result<Session, String>>,
    norms: OnceLock<Result<BTreeMap<String, Tensor>, String>>,
    gradients: OnceLock<Result<GradientStats, String>>,
    hessians: OnceLock<Result<Hessians, String>>,
    loss: OnceLock<Result<f64, String>>,
    /// Per sequence, the hidden states entering each block (see [`Session::block_inputs`]);
    /// `None` when they would not fit [`MAX_RESUME_BYTES`].
    block_inputs: OnceLock<Result<Option<Vec<Vec<Tensor>>>, String>>,
    /// Checked before every sequence of every pass: a cancelled run stops within one sequence.
    cancel: CancelToken,
}

impl Calibrator {
    /// A calibrator for `model` as it is now (cloning a model shares its weight storage).
    pub fn new(model: Model, set: Arc<CalibrationSet>) -> Self {
        Calibrator {
            set,
            model,
            scope: Scope::Model,
            session: OnceLock::new(),
            norms: OnceLock::new(),
            gradients: OnceLock::new(),
            hessians: OnceLock::new(),
            loss: OnceLock::new(),
            block_inputs: OnceLock::new(),
            cancel: CancelToken::new(),
        }
    }

    /// A calibrator for block `block` of `model` alone, fed `inputs`, the hidden state entering
    /// it for each calibration sequence (in sequence order): the activation norms and Hessians
    /// of its linears come from running that one block, not the model.
    pub fn for_block(
        model: Model,
        set: Arc<CalibrationSet>,
        block: usize,
        inputs: Arc<Vec<Tensor>>,
    ) -> Self {
        let mut c = Self::new(model, set);
        c.scope = Scope::Block { block, inputs };
        c
    }

    /// Runs sequence `index` (tokens `seq`) through what this calibrator covers, showing every
    /// linear's input to `observer`.
    fn observe(
        &self,
        session: &Session,
        index: usize,
        seq: &[u32],
        observer: &mut dyn LinearObserver,
    ) -> Result<(), String> {
        let result = match &self.scope {
            Scope::Model => session.hidden_states(seq, None, Some(observer)).map(|_| ()),
            Scope::Block { block, inputs } => {
                let x = inputs.get(index).ok_or_else(|| {
                    format!("no hidden state kept for calibration sequence {index}")
                })?;
                // Statistics need the linears' inputs only: the block's output is not computed.
                session.observe_block(*block, x, observer)
            }
        };
        result.map_err(|e| format!("calibration forward pass failed: {e}"))
    }

    /// Refuses what a block calibrator cannot compute.
    fn whole_model(&self, what: &str) -> Result<(), String> {
        match &self.scope {
            Scope::Model => Ok(()),
            Scope::Block { block, .. } => Err(format!(
                "{what} need the whole model, but under sequential calibration a stage sees block {block} alone"
            )),
        }
    }

    /// Why `layer` has no statistic here.
    fn not_covered(&self, what: &str, layer: &str) -> String {
        match &self.scope {
            Scope::Model => format!(
                "no {what} for `{layer}`: only the weights of block linear layers (attention and MLP projections) have them"
            ),
            Scope::Block { block, .. } => format!(
                "no {what} for `{layer}`: under sequential calibration this call covers the linears of block {block} only"
            ),
        }
    }

    /// The same calibrator, stopping its passes once `cancel` is cancelled.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
    }

    fn check_cancel(&self) -> Result<(), String> {
        self.cancel.check().map_err(|e| e.to_string())
    }

    /// Number of calibration sequences.
    pub fn samples(&self) -> usize {
        self.set.samples()
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.set.seq_len()
    }

    fn session(&self) -> Result<&Session, String> {
        self.session
            .get_or_init(|| {
                Session::new(&self.model)
                    .map_err(|e| format!("cannot run the model on calibration text: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Wanda's statistic for `layer`: `[1, in]`, column j = mean over sequences of the sum
    /// over tokens of x_j². The first call runs the whole calibration set once and keeps the
    /// statistic of every block linear.
    pub fn activation_norms(&self, layer: &str) -> Result<Tensor, String> {
        let norms = self
            .norms
            .get_or_init(|| self.compute_norms(&mut |_, _| {}))
            .as_ref()
            .map_err(Clone::clone)?;
        norms
            .get(layer)
            .cloned()
            .ok_or_else(|| self.not_covered("activation statistics", layer))
    }

    /// Computes the activation norms of every block linear now, if not done yet.
    pub fn prepare_norms(&self) -> Result<(), String> {
        self.prepare_norms_with(&mut |_, _| {})
    }

    /// [`Calibrator::prepare_norms`], calling `progress(sequences done, total)` as it goes.
    pub fn prepare_norms_with(&self, progress: &mut dyn FnMut(usize, usize)) -> Result<(), String> {
        self.norms
            .get_or_init(|| self.compute_norms(progress))
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
    }

    /// Runs `f` on every calibration sequence, in parallel, in chunks of one sequence per
    /// thread, calling `progress(done, total)` on this thread after each chunk (a run's events
    /// go out from the thread that runs it). Results are in sequence order, so whatever is
    /// summed from them does not depend on scheduling.
    fn each_sequence<T: Send>(
        &self,
        progress: &mut dyn FnMut(usize, usize),
        f: impl Fn(usize, &[u32]) -> Result<T, String> + Sync,
    ) -> Result<Vec<T>, String> {
        let total = self.set.sequences.len();
        let chunk = rayon::current_num_threads().max(1);
        let mut out = Vec::with_capacity(total);
        progress(0, total);
        for (c, part) in self.set.sequences.chunks(chunk).enumerate() {
            let results = part
                .par_iter()
                .enumerate()
                .map(|(i, seq)| {
                    self.check_cancel()?;
                    f(c * chunk + i, seq)
                })
                .collect::<Result<Vec<T>, String>>()?;
            out.extend(results);
            progress(out.len(), total);
        }
        Ok(out)
    }

    fn compute_norms(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<BTreeMap<String, Tensor>, String> {
        let session = self.session()?;
        let started = std::time::Instant::now();
        // Sequences run in parallel (one 256-token pass does not keep the cores busy); each
        // has its own sums, added up afterwards in sequence order.
        let per_sequence: Vec<BTreeMap<String, Vec<f64>>> =
            self.each_sequence(progress, |i, seq| {
                let mut observer = SquaredInputs::default();
                self.observe(session, i, seq, &mut observer)?;
                Ok(observer.sums)
            })?;
        let mut totals: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for sums in per_sequence {
            for (name, s) in sums {
                match totals.get_mut(&name) {
                    Some(t) => t.iter_mut().zip(&s).for_each(|(t, v)| *t += v),
                    None => {
                        totals.insert(name, s);
                    }
                }
            }
        }
        let n = self.set.samples().max(1) as f64;
        let mut out = BTreeMap::new();
        for (name, sums) in totals {
            let cols = sums.len();
            let mean: Vec<f32> = sums.into_iter().map(|s| (s / n) as f32).collect();
            out.insert(name, tensor_from(mean, &[1, cols])?);
        }
        tracing::info!(
            "activation norms over {} sequences of {} tokens in {:.1} s",
            self.set.samples(),
            self.set.seq_len(),
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }

    /// The input second moment `XᵀX` of the block linear `layer` over the calibration set (the
    /// same `Arc` for layers reading the same input). The first call computes every block
    /// linear's in one pass.
    pub fn hessian(&self, layer: &str) -> Result<Arc<Hessian>, String> {
        self.prepare_hessians()?
            .get(layer)
            .cloned()
            .ok_or_else(|| self.not_covered("input Hessian", layer))
    }

    /// Computes the Hessians of every block linear now, if not done yet.
    pub fn prepare_hessians(&self) -> Result<&Hessians, String> {
        self.prepare_hessians_with(&mut |_, _| {})
    }

    /// [`Calibrator::prepare_hessians`], calling `progress(sequences done, total)`.
    pub fn prepare_hessians_with(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<&Hessians, String> {
        self.hessians
            .get_or_init(|| self.compute_hessians(progress))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn compute_hessians(&self, progress: &mut dyn FnMut(usize, usize)) -> Result<Hessians, String> {
        let session = self.session()?;
        let started = std::time::Instant::now();
        let fail = |e: String| format!("calibration Hessians failed: {e}");
        let mut sums: BTreeMap<String, Hessian> = BTreeMap::new();
        let mut shared: BTreeMap<String, String> = BTreeMap::new();
        let total = self.set.sequences.len();
        let mut done = 0;
        progress(0, total);
        for (c, part) in self.set.sequences.chunks(HESSIAN_BATCH).enumerate() {
            // Forward passes in parallel, keeping each sequence's linear inputs (a few MiB).
            let observed = part
                .par_iter()
                .enumerate()
                .map(|(i, seq)| {
                    self.check_cancel()?;
                    let mut observer = LinearInputs::default();
                    self.observe(session, c * HESSIAN_BATCH + i, seq, &mut observer)?;
                    Ok(observer)
                })
                .collect::<Result<Vec<LinearInputs>, String>>()?;
            // Then one product per distinct input over the batch's stacked tokens.
            let Some(first) = observed.first() else { break };
            shared.extend(first.shared.clone());
            for (k, (_, key, _)) in first.inputs.iter().enumerate() {
                let mut stacked = Vec::with_capacity(observed.len());
                for o in &observed {
                    match o.inputs.get(k) {
                        Some((_, other, x)) if other == key => stacked.push(x.clone()),
                        _ => {
                            return Err(fail(format!("sequences saw different layers at `{key}`")));
                        }
                    }
                }
                let x = Tensor::cat(&stacked, 0).map_err(|e| fail(e.to_string()))?;
                let cols = x.dim(1).map_err(|e| fail(e.to_string()))?;
                sums.entry(key.clone())
                    .or_insert_with(|| Hessian::new(cols))
                    .add(&x)
                    .map_err(|e| fail(format!("`{key}`: {e}")))?;
            }
            done += part.len();
            progress(done, total);
        }
        let sums: BTreeMap<String, Arc<Hessian>> =
            sums.into_iter().map(|(k, h)| (k, Arc::new(h))).collect();
        let mut by_layer = BTreeMap::new();
        for (layer, key) in shared {
            if let Some(h) = sums.get(&key) {
                by_layer.insert(layer, h.clone());
            }
        }
        tracing::info!(
            "input Hessians of {} layers ({} distinct inputs) over {} sequences of {} tokens in {:.1} s",
            by_layer.len(),
            sums.len(),
            self.set.samples(),
            self.set.seq_len(),
            started.elapsed().as_secs_f64()
        );
        Ok(Hessians { by_layer })
    }

    /// Mean calibration loss of the model (mean over sequences of the mean next-token loss).
    pub fn loss(&self) -> Result<f64, String> {
        self.whole_model("losses")?;
        self.loss
            .get_or_init(|| {
                let session = self.session()?;
                // With the trials' hidden states already kept, the loss is only the final
                // norm and the LM head away: no second pass over the blocks.
                match self.block_inputs.get() {
                    Some(Ok(Some(inputs))) => resumed_mean_loss(
                        session,
                        session.num_blocks(),
                        inputs,
                        &self.set,
                        &self.cancel,
                    ),
                    _ => mean_loss(session, &self.set, &self.cancel),
                }
            })
            .clone()
    }

    /// The gradient of the mean calibration loss with respect to the block linear `layer`
    /// (`[out, in]`). The first call differentiates every block linear at once.
    pub fn gradients(&self, layer: &str) -> Result<Tensor, String> {
        let stats = self.gradient_stats()?;
        stats
            .mean
            .get(layer)
            .cloned()
            .ok_or_else(|| no_gradient(layer))
    }

    /// The empirical Fisher diagonal of the block linear `layer`: the mean over sequences of the
    /// squared gradient of each sequence's loss (`[out, in]`), from the same pass as
    /// [`Calibrator::gradients`].
    pub fn fisher(&self, layer: &str) -> Result<Tensor, String> {
        let stats = self.gradient_stats()?;
        stats
            .mean_squares
            .as_ref()
            .and_then(|m| m.get(layer))
            .cloned()
            .ok_or_else(|| no_gradient(layer))
    }

    /// Computes the gradients of every block linear now, if not done yet.
    pub fn prepare_gradients(&self) -> Result<(), String> {
        self.prepare_gradients_with(&mut |_, _| {})
    }

    /// [`Calibrator::prepare_gradients`], calling `progress(sequences done, total)`.
    pub fn prepare_gradients_with(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), String> {
        self.whole_model("gradients")?;
        self.gradients
            .get_or_init(|| self.compute_gradients(progress))
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
    }

    fn gradient_stats(&self) -> Result<&GradientStats, String> {
        self.whole_model("gradients")?;
        self.gradients
            .get_or_init(|| self.compute_gradients(&mut |_, _| {}))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn compute_gradients(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GradientStats, String> {
        let session = self.session()?;
        let started = std::time::Instant::now();
        let fail = |e: EngineError| format!("calibration gradients failed: {e}");
        let mut grads = LossGradients::new(session).map_err(fail)?.with_squares();
        // One sequence at a time (with squares, `accumulate` batches one sequence anyway), so a
        // cancelled run stops between sequences.
        let total = self.set.sequences.len();
        progress(0, total);
        for (i, seq) in self.set.sequences.iter().enumerate() {
            self.check_cancel()?;
            grads.accumulate(std::slice::from_ref(seq)).map_err(fail)?;
            progress(i + 1, total);
        }
        let loss = grads.mean_loss();
        let out = grads.finish().map_err(fail)?;
        tracing::info!(
            "gradients of the calibration loss ({loss:.4}) over {} sequences of {} tokens in {:.1} s",
            self.set.samples(),
            self.set.seq_len(),
            started.elapsed().as_secs_f64()
        );
        Ok(out)
    }

    /// The calibration loss with `layer` additionally masked by `mask` (the model itself is
    /// untouched).
    pub fn loss_with_mask(&self, layer: &str, mask: &Mask) -> Result<f64, String> {
        self.loss_with_masks(&[(layer, mask)])
    }

    /// The calibration loss with every `(layer, mask)` applied on top of the current masks, in
    /// one trial. Resumes from the hidden states entering the first block a change touches.
    pub fn loss_with_masks(&self, changes: &[(&str, &Mask)]) -> Result<f64, String> {
        self.whole_model("loss trials")?;
        if changes.is_empty() {
            return self.loss();
        }
        let base = self.session()?;
        let mut session = base.clone();
        let mut first_block = base.num_blocks();
        for (i, (layer, mask)) in changes.iter().enumerate() {
            if changes[..i].iter().any(|(l, _)| l == layer) {
                return Err(format!("`{layer}` is changed twice in one trial"));
            }
            let linear = session
                .linear_mut(layer)
                .ok_or_else(|| format!("`{layer}` is not a linear layer of the forward pass"))?;
            let LinearWeight::Dense(weight) = linear.weight() else {
                return Err(format!("`{layer}` does not hold dense weights"));
            };
            // The weights already carry earlier masks (zeros), so masking again intersects.
            let masked = apply_mask(weight, mask)?;
            let bias = linear.bias().cloned();
            *linear = Linear::dense(*layer, masked, bias).map_err(|e| e.to_string())?;
            // Only the LM head is a linear outside the blocks: it resumes after the last one.
            first_block = first_block.min(base.block_of(layer).unwrap_or(base.num_blocks()));
        }
        match self.block_inputs()? {
            Some(inputs) => {
                resumed_mean_loss(&session, first_block, inputs, &self.set, &self.cancel)
            }
            None => mean_loss(&session, &self.set, &self.cancel),
        }
    }

    /// The base loss and the hidden states loss trials resume from, computed now if not done yet.
    pub fn prepare_trials(&self) -> Result<(), String> {
        self.prepare_trials_with(&mut |_, _| {})
    }

    /// [`Calibrator::prepare_trials`], calling `progress(sequences done, total)`.
    pub fn prepare_trials_with(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), String> {
        self.whole_model("loss trials")?;
        // Block inputs first: the base loss then comes from them (see `loss`).
        self.block_inputs_with(progress)?;
        self.loss().map(|_| ())
    }

    /// The hidden states every trial resumes from, computed on the first trial.
    fn block_inputs(&self) -> Result<Option<&Vec<Vec<Tensor>>>, String> {
        self.block_inputs_with(&mut |_, _| {})
    }

    fn block_inputs_with(
        &self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<&Vec<Vec<Tensor>>>, String> {
        self.block_inputs
            .get_or_init(|| {
                let session = self.session()?;
                let width = self.model.config.hidden_size;
                let bytes = (session.num_blocks() + 1)
                    * self.set.samples()
                    * self.set.seq_len()
                    * width
                    * std::mem::size_of::<f32>();
                if bytes > MAX_RESUME_BYTES {
                    tracing::info!(
                        "loss trials run the whole model: keeping block inputs would take {} MiB",
                        bytes >> 20
                    );
                    return Ok(None);
                }
                let inputs = self.each_sequence(progress, |_, seq| {
                    session
                        .block_inputs(seq)
                        .map_err(|e| format!("calibration forward pass failed: {e}"))
                })?;
                Ok(Some(inputs))
            })
            .as_ref()
            .map(Option::as_ref)
            .map_err(Clone::clone)
    }
}

fn no_gradient(layer: &str) -> String {
    format!(
        "no gradient for `{layer}`: only the weights of block linear layers (attention and MLP projections) have them"
    )
}

/// [`mean_loss`] resumed at block `first` from the kept hidden states (one entry per sequence).
fn resumed_mean_loss(
    session: &Session,
    first: usize,
    inputs: &[Vec<Tensor>],
    set: &CalibrationSet,
    cancel: &CancelToken,
) -> Result<f64, String> {
    let losses: Vec<f64> = set
        .sequences
        .par_iter()
        .zip(inputs.par_iter())
        .map(|(seq, x)| {
            cancel.check().map_err(|e| e.to_string())?;
            let nll = session
                .nll_from_block(first, &x[first], seq)
                .map_err(|e| format!("calibration loss failed: {e}"))?;
            // Rounded like `Session::loss`, so both paths give bit-identical losses.
            let mean = nll.iter().map(|&v| f64::from(v)).sum::<f64>() / nll.len() as f64;
            Ok(f64::from(mean as f32))
        })
        .collect::<Result<_, String>>()?;
    Ok(losses.iter().sum::<f64>() / set.samples().max(1) as f64)
}

/// Mean over sequences of each sequence's mean next-token loss (sequences in parallel, summed
/// in order).
fn mean_loss(session: &Session, set: &CalibrationSet, cancel: &CancelToken) -> Result<f64, String> {
    let losses: Vec<f32> = set
        .sequences
        .par_iter()
        .map(|seq| {
            cancel.check().map_err(|e| e.to_string())?;
            session
                .loss(seq)
                .map_err(|e| format!("calibration loss failed: {e}"))
        })
        .collect::<Result<_, String>>()?;
    let total: f64 = losses.iter().map(|&l| f64::from(l)).sum();
    Ok(total / set.samples().max(1) as f64)
}
