//! The application core the CLI and the daemon share: configuration passed in (never read
//! from the working directory or environment here), the plugin runtime and a registry that can
//! change while runs hold the plugin versions they started with, and a run from parsing to
//! export that reports through events, can be cancelled from outside, and fails with errors
//! of stable kinds.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use espalier_engine::EngineError;

use crate::cancel::CancelToken;
use crate::events::{EventSink, RunEvent};

use crate::evaluate::{Comparison, EvalSpec, EvalText, Evaluation, Subject, evaluate, model_bytes};
use crate::export::{ExportError, Input, prepare};
use crate::pipeline::{Pipeline, PipelineError};
use crate::plan::{PlanError, plan};
use crate::plugin::registry::SharedRegistry;
use crate::plugin::{Origin, PluginError, Registry, Runtime, Sandbox};
use crate::report::RunReport;
use crate::resolved::{ExportTarget, resolved_pipeline};
use crate::run::{RunError, RunState, execute};

/// Anything that can stop a run, each naming its cause.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The pipeline file is wrong.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The model cannot be loaded.
    #[error("model: {0}")]
    Model(#[from] EngineError),
    /// A plugin cannot be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A plugin's planning-time `validate` failed instead of answering (trap, panic, timeout).
    #[error(
        "stage `{}`: checking its parameters at planning: {source}",
        crate::display_safe::name(.stage)
    )]
    Validate {
        /// Stage name.
        stage: String,
        /// What happened.
        source: PluginError,
    },
    /// A stage failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Writing the output failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// Evaluating the dense or pruned model failed.
    #[error("evaluating the {0} model: {1}")]
    Evaluate(String, EngineError),
    /// The wasm runtime could not start.
    #[error("plugin runtime: {0}")]
    Runtime(String),
    /// Fine-tuning failed for a reason that is not the pipeline's (a tensor error, a
    /// checkpoint that cannot be written).
    #[error("fine-tuning: {0}")]
    Finetune(crate::finetune::FinetuneError),
    /// The run was cancelled from outside.
    #[error("the run was cancelled")]
    Cancelled,
    /// A model's exported masks are missing or unreadable where they are needed.
    #[error("masks: {0}")]
    Masks(String),
}

/// The stable kind of an [`AppError`]: what a front end maps to an exit code or an HTTP
/// status, and what run records store. Names never change once released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The pipeline (file or request body) is wrong; the message names file, line and field.
    InvalidPipeline,
    /// The model cannot be loaded or does not fit the request.
    InvalidModel,
    /// A plugin is not a loadable component.
    InvalidPlugin,
    /// A plugin failed inside its sandbox (error, trap, panic, timeout, memory).
    PluginFailed,
    /// A plugin returned a result the host refuses to apply.
    InvalidOutput,
    /// The export folder is refused or could not be written.
    Export,
    /// Evaluating a model failed.
    Evaluation,
    /// The run was cancelled.
    Cancelled,
    /// Anything else: a bug or an environment problem (runtime start, out of memory).
    Internal,
}

impl ErrorKind {
    /// The kebab-case name (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidPipeline => "invalid-pipeline",
            ErrorKind::InvalidModel => "invalid-model",
            ErrorKind::InvalidPlugin => "invalid-plugin",
            ErrorKind::PluginFailed => "plugin-failed",
            ErrorKind::InvalidOutput => "invalid-output",
            ErrorKind::Export => "export",
            ErrorKind::Evaluation => "evaluation",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

impl AppError {
    /// Its stable kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AppError::Pipeline(_) => ErrorKind::InvalidPipeline,
            AppError::Model(_) => ErrorKind::InvalidModel,
            AppError::Plugin(PluginError::Invalid { .. } | PluginError::Refused { .. }) => {
                ErrorKind::InvalidPlugin
            }
            AppError::Plugin(PluginError::Cancelled { .. }) => ErrorKind::Cancelled,
            AppError::Plugin(_) => ErrorKind::PluginFailed,
            AppError::Validate { source, .. } => match source {
                PluginError::Invalid { .. } | PluginError::Refused { .. } => {
                    ErrorKind::InvalidPlugin
                }
                PluginError::Cancelled { .. } => ErrorKind::Cancelled,
                _ => ErrorKind::PluginFailed,
            },
            AppError::Run(e) => run_error_kind(e),
            // A scheduled stage fails as it would before fine-tuning.
            AppError::Finetune(crate::finetune::FinetuneError::Stage { source, .. }) => {
                run_error_kind(source)
            }
            AppError::Export(_) => ErrorKind::Export,
            AppError::Evaluate(_, EngineError::Cancelled) => ErrorKind::Cancelled,
            AppError::Evaluate(..) => ErrorKind::Evaluation,
            AppError::Runtime(_) => ErrorKind::Internal,
            AppError::Finetune(_) => ErrorKind::Internal,
            AppError::Cancelled => ErrorKind::Cancelled,
            AppError::Masks(_) => ErrorKind::InvalidModel,
        }
    }
}

/// The kind of a stage's failure.
fn run_error_kind(e: &RunError) -> ErrorKind {
    match e {
        RunError::Plugin { source, .. } => match source {
            PluginError::Invalid { .. } | PluginError::Refused { .. } => ErrorKind::InvalidPlugin,
            PluginError::Cancelled { .. } => ErrorKind::Cancelled,
            _ => ErrorKind::PluginFailed,
        },
        RunError::InvalidOutput { .. } => ErrorKind::InvalidOutput,
        RunError::Cancelled { .. } => ErrorKind::Cancelled,
        RunError::Apply { .. } => ErrorKind::Internal,
    }
}

impl From<PlanError> for AppError {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Pipeline(e) => AppError::Pipeline(e),
            PlanError::Validate { stage, source } => AppError::Validate { stage, source },
        }
    }
}

/// Runs the pipeline's `[finetune]` on the pruned model, reporting every step to `sink`.
/// Problems of the pipeline's making (a short or unreadable text, another run's checkpoint, a
/// learning rate that diverges) point at the section's fields.
#[allow(clippy::too_many_arguments)]
fn run_finetune(
    pipeline: &Pipeline,
    section: &crate::pipeline::FinetuneSection,
    models_dir: &Path,
    identity: &str,
    teacher: Option<&espalier_engine::Model>,
    state: &mut RunState,
    pruner: Option<&mut dyn crate::finetune::Pruner>,
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<crate::finetune::FinetuneReport, AppError> {
    use crate::finetune::{FinetuneError, TrainingText, finetune};
    // `fetch:NAME` texts are downloaded on first use, as `fetch:` models are.
    let mut spec = section.spec.clone();
    spec.text = crate::fetch::resolve_text(&spec.text, models_dir, &mut |m| {
        sink.emit(RunEvent::Notice {
            message: m.to_string(),
        })
    })
    .map_err(|e| {
        AppError::Pipeline(pipeline.error(&section.text_position, "finetune.text", e.to_string()))
    })?;
    let spec = &spec;
    let pipeline_err = |e: FinetuneError| -> AppError {
        let (position, field) = match &e {
            FinetuneError::Text { .. } | FinetuneError::TooShort { .. } => {
                (&section.text_position, "finetune.text")
            }
            FinetuneError::Checkpoint { .. } => {
                (&section.checkpoint_position, "finetune.checkpoint_dir")
            }
            FinetuneError::Diverged { .. } => (&section.position, "finetune.lr"),
            FinetuneError::Cancelled => return AppError::Cancelled,
            _ => return AppError::Finetune(e),
        };
        AppError::Pipeline(pipeline.error(position, field, e.to_string()))
    };
    let text = TrainingText::load(spec, &state.model).map_err(pipeline_err)?;
    /// Turns the fine-tune's start and steps into run events.
    struct Events<'a> {
        sink: &'a mut dyn EventSink,
        spec: &'a crate::finetune::FinetuneSpec,
        text_tokens: usize,
        /// Training rounds, with lottery rounds.
        rounds: Option<u32>,
    }
    impl crate::finetune::FinetuneObserver for Events<'_> {
        fn started(&mut self, start_step: u64, steps: u64) {
            if start_step > 0 {
                self.sink.emit(RunEvent::Notice {
                    message: format!(
                        "fine-tuning resumes from the checkpoint of step {start_step} in {}",
                        self.spec
                            .checkpoint_dir
                            .as_deref()
                            .map(|d| d.display().to_string())
                            .unwrap_or_default()
                    ),
                });
            }
            self.sink.emit(RunEvent::FinetuneStarted {
                steps,
                rounds: self.rounds,
                start_step,
                sequences_per_step: self.spec.sequences_per_step(),
                seq_len: self.spec.seq_len,
                text_tokens: self.text_tokens,
            });
        }
        fn step(&mut self, step: &crate::finetune::StepReport) {
            self.sink
                .emit(RunEvent::FinetuneProgress { step: step.clone() });
        }
        fn pruned(&mut self, event: &crate::schedule::PruneEvent) {
            self.sink.emit(RunEvent::FinetunePruned {
                event: event.clone(),
            });
        }
        fn updated(&mut self, event: &crate::dynamic::UpdateEvent) {
            self.sink.emit(RunEvent::FinetuneMaskUpdated {
                event: event.clone(),
            });
        }
        fn round(&mut self, round: &crate::lottery::RoundReport) {
            self.sink.emit(RunEvent::FinetuneRound {
                round: round.clone(),
            });
        }
    }
    let mut progress = Events {
        rounds: pruner
            .as_ref()
            .and_then(|p| p.rounds())
            .map(|r| r.training_rounds()),
        text_tokens: text.tokens(),
        sink: &mut *sink,
        spec,
    };
    let report = finetune(
        &mut state.model,
        &mut state.masks,
        spec,
        text,
        identity,
        teacher,
        &mut progress,
        pruner,
        cancel,
    )
    .map_err(pipeline_err)?;
    sink.emit(RunEvent::FinetuneFinished {
        report: Box::new(report.clone()),
    });
    Ok(report)
}

/// Where a front end keeps things; the core reads no working directory or environment
/// variable of its own.
#[derive(Debug, Clone)]
pub struct Config {
    /// Folders of extra plugin `.wasm` files, registered at start.
    pub plugin_dirs: Vec<PathBuf>,
    /// Where `fetch:` models are downloaded and imported.
    pub models_dir: PathBuf,
    /// Where compiled components are kept between processes (`None`: compile at every start),
    /// and plugins pulled from OCI registries by pipelines (in `oci/`, by digest).
    pub cache_dir: Option<PathBuf>,
    /// Limits for the `describe` call of folder plugins (a pipeline's own `[sandbox]` when the
    /// CLI runs one, so a `describe` that loops stops at the pipeline's timeout).
    pub sandbox: Sandbox,
    /// Reset the process's peak memory before each model's evaluation, so each model's peak
    /// is its own. Off in a process that runs several things at once (the daemon).
    pub per_model_peak: bool,
    /// The signers plugin files must come from (and whether unsigned ones are refused).
    pub trust: crate::plugin::signing::Trust,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            plugin_dirs: Vec::new(),
            models_dir: PathBuf::from("models"),
            cache_dir: None,
            sandbox: Sandbox::default(),
            per_model_peak: true,
            trust: Default::default(),
        }
    }
}

/// Builds the forward pass of `model` and evaluates it, reporting progress as `which`.
///
/// With `masks`, pruned layers run on Espalier's sparse kernels (the format the planner picks),
/// in the spec's storage.
/// `reset_peak`: measure this model's own peak memory (see [`Subject::reset_peak`]).
pub fn evaluate_model(
    model: &espalier_engine::Model,
    masks: Option<&std::collections::BTreeMap<String, crate::mask::Mask>>,
    spec: &EvalSpec,
    (which, reset_peak): (&str, bool),
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<Evaluation, AppError> {
    sink.emit(RunEvent::EvaluationStarted {
        which: which.to_string(),
    });
    let (session, subject) = prepare_evaluation(model, masks, spec, (which, reset_peak))?;
    run_evaluation(model, &session, spec, subject, which, sink, cancel)
}

/// [`evaluate_model`] for a model the caller has no further use for (`espalier eval`): once
/// the forward pass holds its packed kernels, the model's dense copies of those layers are
/// dropped, so the peak memory measured is the pruned model's own, not the pruned model's
/// plus the dense weights it was packed from.
pub fn evaluate_model_alone(
    mut model: espalier_engine::Model,
    masks: Option<&std::collections::BTreeMap<String, crate::mask::Mask>>,
    spec: &EvalSpec,
    which: &str,
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<Evaluation, AppError> {
    sink.emit(RunEvent::EvaluationStarted {
        which: which.to_string(),
    });
    let (session, subject) = prepare_evaluation(&model, masks, spec, (which, true))?;
    for linear in session.linears() {
        // A layer on a kernel no longer reads the model's tensor (`Linear::set_kernel` drops
        // its own reference); one on the dense path shares it, and dropping the model's
        // reference would free nothing.
        if matches!(linear.weight(), espalier_engine::LinearWeight::Kernel(_)) {
            model.remove_weight(linear.name());
        }
    }
    run_evaluation(&model, &session, spec, subject, which, sink, cancel)
}

/// [`evaluate_model`] for a run's pruned model, which the run still exports afterwards: the
/// model's dense copies of the layers packed exactly are set aside while the evaluation runs
/// (`park_packed_weights`) and rebuilt from their kernels after, so the peak memory measured
/// is the pruned model's own and not the pruned model's plus the unpacked one it came from
/// (the quickstart: 1202 -> 705 MiB, dense 764; 624 with the bitmap's buffers sized exactly).
/// Layers packed in bf16 or int8 are rounded, so their kernels cannot give the exact values
/// back: their dense copies wait in an unlinked temporary file instead (`Spill`), in
/// `spill_dir` (the folder the export goes to: on disk, where the export needs the room
/// anyway; `$TMPDIR` may be a tmpfs, whose files take memory) or else `$TMPDIR`, or, where none
/// can be written, stay held.
pub fn evaluate_pruned_in_run(
    model: &mut espalier_engine::Model,
    masks: &std::collections::BTreeMap<String, crate::mask::Mask>,
    spec: &EvalSpec,
    reset_peak: bool,
    spill_dir: Option<&std::path::Path>,
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<Evaluation, AppError> {
    let which = "pruned";
    sink.emit(RunEvent::EvaluationStarted {
        which: which.to_string(),
    });
    let (session, subject) = prepare_evaluation(model, Some(masks), spec, (which, reset_peak))?;
    let parked = park_packed_weights(model, &session);
    let spilled = Spill::rounded_layers(model, &session, spill_dir);
    let result = run_evaluation(model, &session, spec, subject, which, sink, cancel);
    restore_parked_weights(model, parked).map_err(|e| AppError::Evaluate(which.to_string(), e))?;
    if let Some(spilled) = spilled {
        spilled
            .restore(model)
            .map_err(|e| AppError::Evaluate(which.to_string(), e))?;
    }
    result
}

/// Where a run exporting to `export_dir` spills its rounded layers' dense copies: the folder
/// the export is written into (its parent; `.` for a bare name), when it exists.
fn spill_dir_beside(export_dir: &std::path::Path) -> Option<&std::path::Path> {
    let parent = export_dir.parent()?;
    let parent = if parent.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        parent
    };
    parent.is_dir().then_some(parent)
}

/// A layer whose dense tensor was dropped from the model while its packed kernel (which holds
/// the same values) ran.
struct Parked<'a> {
    name: String,
    packed: &'a espalier_kernels::PackedLinear,
}

/// Drops from `model` the dense tensor of every layer `session` runs on an f32 packed kernel
/// that expands to exactly the tensor's bits (zeros where pruned included), returning them.
fn park_packed_weights<'a>(
    model: &mut espalier_engine::Model,
    session: &'a espalier_engine::Session,
) -> Vec<Parked<'a>> {
    let mut parked = Vec::new();
    for linear in session.linears() {
        if let espalier_engine::LinearWeight::Kernel(kernel) = linear.weight()
            && let Some(packed) = kernel.packed()
            && packed.dtype() == espalier_kernels::Dtype::F32
            && let Some(dense) = model.weight(linear.name())
            && rebuilds_exactly(packed, dense)
        {
            model.remove_weight(linear.name());
            parked.push(Parked {
                name: linear.name().to_string(),
                packed,
            });
        }
    }
    parked
}

/// Puts back what [`park_packed_weights`] dropped, rebuilt from the kernels.
fn restore_parked_weights(
    model: &mut espalier_engine::Model,
    parked: Vec<Parked<'_>>,
) -> Result<(), EngineError> {
    for Parked { name, packed } in parked {
        let shape = (packed.rows(), packed.cols());
        let tensor =
            candle_core::Tensor::from_vec(packed.to_dense(), shape, &candle_core::Device::Cpu)?;
        model.restore_weight(&name, tensor);
    }
    Ok(())
}

/// The dense tensors of the layers a session runs on rounded (bf16 or int8) packed kernels,
/// written to an unlinked temporary file while the pruned model is evaluated and read back
/// for the export: the operating system deletes the file when it is closed, whatever ends the
/// process. A tensor the session itself still reads (a tied embedding) is not spilled.
struct Spill {
    file: std::fs::File,
    /// (name, shape) in the order written.
    layers: Vec<(String, Vec<usize>)>,
}

impl Spill {
    /// Spills every such layer of `model` to an unlinked file in `dir` (else, or where none can
    /// be made there, in `$TMPDIR`); `None` when there is no such layer, or when no temporary
    /// file can be written (the layers then stay held, as the run's note says).
    fn rounded_layers(
        model: &mut espalier_engine::Model,
        session: &espalier_engine::Session,
        dir: Option<&std::path::Path>,
    ) -> Option<Spill> {
        let embedding = model.embedding_name();
        let names: Vec<String> = session
            .linears()
            .iter()
            .filter(|l| {
                matches!(l.weight(), espalier_engine::LinearWeight::Kernel(k)
                    if k.packed().is_some_and(|p| p.dtype() != espalier_kernels::Dtype::F32))
                    && l.name() != embedding
                    && model.weight(l.name()).is_some()
            })
            .map(|l| l.name().to_string())
            .collect();
        if names.is_empty() {
            return None;
        }
        let written = (|| -> Result<Spill, String> {
            use std::io::Write;
            let file = dir
                .and_then(|d| tempfile::tempfile_in(d).ok())
                .map_or_else(tempfile::tempfile, Ok)
                .map_err(|e| e.to_string())?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
            let mut layers = Vec::with_capacity(names.len());
            let mut bytes = Vec::with_capacity(4 << 14);
            for name in &names {
                let Some(tensor) = model.weight(name) else {
                    continue;
                };
                crate::tensor_util::with_f32(tensor, |values| -> std::io::Result<()> {
                    for chunk in values.chunks(1 << 14) {
                        bytes.clear();
                        bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                        out.write_all(&bytes)?;
                    }
                    Ok(())
                })?
                .map_err(|e| e.to_string())?;
                layers.push((name.clone(), tensor.dims().to_vec()));
            }
            out.flush().map_err(|e| e.to_string())?;
            drop(out);
            Ok(Spill { file, layers })
        })();
        match written {
            Ok(spill) => {
                for (name, _) in &spill.layers {
                    model.remove_weight(name);
                }
                Some(spill)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot write the rounded layers' dense copies to a temporary file ({e}); they stay in memory while the pruned model is evaluated"
                );
                None
            }
        }
    }

    /// Reads every spilled tensor back into `model`.
    fn restore(self, model: &mut espalier_engine::Model) -> Result<(), EngineError> {
        use std::io::{Read, Seek};
        let io = |source| EngineError::Io {
            path: "the temporary file holding the rounded layers' dense copies".into(),
            source,
        };
        let mut file = &self.file;
        file.rewind().map_err(io)?;
        let mut input = std::io::BufReader::with_capacity(1 << 20, file);
        for (name, shape) in self.layers {
            let mut bytes = vec![0u8; shape.iter().product::<usize>() * 4];
            input.read_exact(&mut bytes).map_err(io)?;
            let tensor = candle_core::Tensor::from_raw_buffer(
                &bytes,
                candle_core::DType::F32,
                &shape,
                &candle_core::Device::Cpu,
            )?;
            model.restore_weight(&name, tensor);
        }
        Ok(())
    }
}

/// Whether `packed` expands to exactly `dense`'s f32 bits.
fn rebuilds_exactly(packed: &espalier_kernels::PackedLinear, dense: &candle_core::Tensor) -> bool {
    if dense.dims() != [packed.rows(), packed.cols()] {
        return false;
    }
    let rebuilt = packed.to_dense();
    crate::tensor_util::with_f32(dense, |values| {
        rebuilt.len() == values.len()
            && rebuilt
                .iter()
                .zip(values)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    })
    .unwrap_or(false)
}

/// The forward pass of `model` (on the sparse kernels `masks` plan, or a packed model's own)
/// and what the evaluation should know about it.
fn prepare_evaluation(
    model: &espalier_engine::Model,
    masks: Option<&std::collections::BTreeMap<String, crate::mask::Mask>>,
    spec: &EvalSpec,
    (which, reset_peak): (&str, bool),
) -> Result<(espalier_engine::Session, Subject), AppError> {
    let mut session = espalier_engine::Session::new(model)
        .map_err(|e| AppError::Evaluate(which.to_string(), e))?;
    // A packed checkpoint reports its packed kernels and bytes as a pruned run's model does.
    let no_masks = std::collections::BTreeMap::new();
    let masks = masks.or(model.is_packed().then_some(&no_masks));
    let subject = match masks {
        Some(masks) => {
            let attached = crate::sparse::attach(&mut session, model, masks, spec.storage)
                .map_err(|e| AppError::Evaluate(which.to_string(), e))?;
            Subject {
                kernels: attached.kernels,
                weight_bytes: attached.packed_model_bytes as u64,
                reset_peak,
            }
        }
        None => Subject {
            weight_bytes: model_bytes(model),
            reset_peak,
            ..Subject::default()
        },
    };
    Ok((session, subject))
}

/// Evaluates a prepared forward pass, reporting progress and the result as `which`.
fn run_evaluation(
    model: &espalier_engine::Model,
    session: &espalier_engine::Session,
    spec: &EvalSpec,
    subject: Subject,
    which: &str,
    sink: &mut dyn EventSink,
    cancel: &CancelToken,
) -> Result<Evaluation, AppError> {
    let evaluation = evaluate(
        model,
        session,
        spec,
        subject,
        &mut |p| {
            sink.emit(RunEvent::EvaluationProgress {
                which: which.to_string(),
                windows_done: p.windows_done,
                windows_total: p.windows_total,
            })
        },
        cancel,
    )
    .map_err(|e| AppError::Evaluate(which.to_string(), e))?;
    sink.emit(RunEvent::EvaluationFinished {
        which: which.to_string(),
        evaluation: evaluation.clone(),
    });
    Ok(evaluation)
}

/// The application core both front ends share: the plugin runtime, the plugin registry (which
/// a daemon changes while runs hold the snapshot they planned with) and the configuration.
pub struct App {
    /// The wasmtime runtime.
    pub runtime: Runtime,
    registry: SharedRegistry,
    /// Files in plugin folders that could not be loaded at start (reported, not fatal).
    pub plugin_warnings: Vec<PluginError>,
    config: Config,
}

/// Settings that override the pipeline file from the command line.
#[derive(Debug, Default, Clone)]
pub struct RunOverrides {
    /// Replaces `model`.
    pub model: Option<String>,
    /// Replaces `export.dir` (and enables export).
    pub export_dir: Option<PathBuf>,
    /// Skips the export even when the pipeline has one.
    pub no_export: bool,
    /// Allows replacing an existing folder that is not an Espalier export (as `[export]
    /// force = true`); an input of the run is never replaced.
    pub force: bool,
    /// Replaces the density of every stage that gives a fixed one (budget references and
    /// stages without a density are left alone).
    pub density: Option<f64>,
    /// Dense evaluations to reuse and add to (`espalier run A.toml B.toml`: the dense model is
    /// evaluated once for all pipelines on the same model under the same protocol).
    pub dense_baselines: Option<Arc<DenseBaselines>>,
}

/// Dense evaluations already measured in this process, by model reference and protocol.
#[derive(Debug, Default)]
pub struct DenseBaselines(std::sync::Mutex<Vec<(String, EvalSpec, Evaluation)>>);

impl DenseBaselines {
    fn find(&self, model: &str, spec: &EvalSpec) -> Option<Evaluation> {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.iter()
            .find(|(m, s, _)| m == model && s == spec)
            .map(|(_, _, e)| e.clone())
    }

    fn insert(&self, model: &str, spec: &EvalSpec, evaluation: &Evaluation) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.push((model.to_string(), spec.clone(), evaluation.clone()));
    }
}

/// A finished run.
pub struct RunResult {
    /// The report.
    pub report: RunReport,
    /// Where the output went, if exported.
    pub exported_to: Option<PathBuf>,
    /// The pruned model and masks.
    pub state: RunState,
}

impl App {
    /// Every file and folder a run of `pipeline` reads, which its export must never replace.
    fn inputs(&self, pipeline: &Pipeline, model: &str, registry: &Registry) -> Vec<Input> {
        let mut inputs = vec![Input::new("pipeline file", &pipeline.file)];
        if !model.starts_with("builtin:") {
            inputs.push(Input::new("model folder", model));
        }
        inputs.push(Input::new(
            "calibration text",
            pipeline.calibration_spec().text,
        ));
        if let Some(e) = &pipeline.evaluate
            && let EvalText::File(text) = &e.value.text
        {
            inputs.push(Input::new("evaluation text", text));
        }
        for stage in &pipeline.stages {
            let name = &stage.plugin.value;
            if name.ends_with(".wasm") || name.contains('/') {
                inputs.push(Input::new("plugin file", name));
            }
        }
        for plugin in registry.iter() {
            if let Origin::File(path) = &plugin.origin {
                inputs.push(Input::new("plugin file", path));
            }
        }
        inputs
    }

    /// Starts the runtime and registers the built-ins plus every `.wasm` in `plugin_dirs`,
    /// with the default configuration otherwise.
    pub fn new(plugin_dirs: &[PathBuf]) -> Result<Self, AppError> {
        Self::start(Config {
            plugin_dirs: plugin_dirs.to_vec(),
            ..Config::default()
        })
    }

    /// Starts the runtime (with the disk cache of compiled components when configured) and
    /// registers the built-ins plus every `.wasm` in the configured plugin folders.
    pub fn start(config: Config) -> Result<Self, AppError> {
        let runtime = match &config.cache_dir {
            // A cache that cannot be used (read-only home, full disk) costs compile time only.
            Some(dir) => Runtime::with_disk_cache(dir).or_else(|e| {
                tracing::warn!("compiling plugins without the disk cache: {e:#}");
                Runtime::new()
            }),
            None => Runtime::new(),
        }
        .map_err(|e| AppError::Runtime(format!("{e:#}")))?;
        let mut registry = Registry::with_builtins(&runtime)?;
        registry.set_trust(config.trust.clone());
        registry.set_pull_cache(
            config
                .cache_dir
                .as_ref()
                .map(|d| crate::plugin::oci::PullCache::new(d.join("oci"))),
        );
        let mut plugin_warnings = Vec::new();
        for dir in &config.plugin_dirs {
            plugin_warnings.extend(registry.add_dir(&runtime, dir, &config.sandbox));
        }
        Ok(App {
            runtime,
            registry: SharedRegistry::new(registry),
            plugin_warnings,
            config,
        })
    }

    /// The registry as it is now (a run plans with one snapshot and keeps it).
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.snapshot()
    }

    /// The registry, to change it while runs are in flight.
    pub fn shared_registry(&self) -> &SharedRegistry {
        &self.registry
    }

    /// The configuration it started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Parses, plans, runs and exports a pipeline file.
    pub fn run_file(
        &self,
        path: &Path,
        overrides: &RunOverrides,
        sink: &mut dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunResult, AppError> {
        let pipeline = Pipeline::load(path)?;
        self.run_pipeline(pipeline, overrides, sink, cancel)
    }

    /// Plans, runs and exports a parsed pipeline, reporting to `sink` (ending with
    /// `run-finished`, `run-failed` or `run-cancelled`) and stopping once `cancel` is cancelled
    /// (between stages, inside a plugin call, inside calibration and evaluation).
    pub fn run_pipeline(
        &self,
        pipeline: Pipeline,
        overrides: &RunOverrides,
        sink: &mut dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunResult, AppError> {
        let started = std::time::Instant::now();
        let result = self
            .run_inner(pipeline, overrides, sink, cancel)
            // Whatever a cancelled run failed with (a calibration pass, a plugin that saw a
            // failing import), the cause is the cancellation.
            .map_err(|e| {
                if cancel.is_cancelled() {
                    AppError::Cancelled
                } else {
                    e
                }
            });
        let seconds = started.elapsed().as_secs_f64();
        sink.emit(match &result {
            Ok(_) => RunEvent::RunFinished { seconds },
            Err(e) if e.kind() == ErrorKind::Cancelled => RunEvent::RunCancelled { seconds },
            Err(e) => RunEvent::RunFailed {
                kind: e.kind(),
                message: e.to_string(),
            },
        });
        result
    }

    fn run_inner(
        &self,
        mut pipeline: Pipeline,
        overrides: &RunOverrides,
        sink: &mut dyn EventSink,
        cancel: &CancelToken,
    ) -> Result<RunResult, AppError> {
        if let Some(m) = &overrides.model {
            pipeline.model.value = m.clone();
        }
        if let Some(d) = overrides.density {
            if !(0.0..=1.0).contains(&d) {
                return Err(AppError::Pipeline(pipeline.error(
                    &pipeline.model.position,
                    "density",
                    format!("the density override {d} must be in [0, 1]"),
                )));
            }
            for stage in &mut pipeline.stages {
                if let Some(spec) = &mut stage.density
                    && matches!(spec.value, crate::pipeline::DensitySpec::Fixed(_))
                {
                    spec.value = crate::pipeline::DensitySpec::Fixed(d);
                }
            }
        }
        // A pinned evaluation text is checked before anything is spent on the run.
        if let Some(e) = &pipeline.evaluate {
            e.value.check_text().map_err(|m| {
                AppError::Pipeline(pipeline.error(&e.position, "evaluate.sha256", m))
            })?;
        }
        // `fetch:NAME` downloads and imports the model on first use.
        let reference =
            crate::fetch::resolve(&pipeline.model.value, &self.config.models_dir, &mut |m| {
                sink.emit(RunEvent::Notice {
                    message: m.to_string(),
                })
            })
            .map_err(|e| {
                AppError::Pipeline(pipeline.error(&pipeline.model.position, "model", e.to_string()))
            })?;
        let model = espalier_engine::load_model(&reference).map_err(|e| {
            if overrides.model.is_some() {
                // The model came from the command line: the pipeline file is not at fault.
                AppError::Model(e)
            } else {
                AppError::Pipeline(pipeline.error(&pipeline.model.position, "model", e.to_string()))
            }
        })?;
        if model.is_packed() {
            let message = format!(
                "{reference} is a packed checkpoint ({}): its linears are stored as the planner packed them and cannot be pruned further; prune the original model (or a dense export) instead",
                espalier_engine::packed::PACKED_FILE
            );
            return Err(if overrides.model.is_some() {
                AppError::Model(espalier_engine::EngineError::Input(message))
            } else {
                AppError::Pipeline(pipeline.error(&pipeline.model.position, "model", message))
            });
        }
        let registry = self.registry();
        let masks = pipeline.export.as_ref().is_none_or(|e| e.masks);
        let packed = pipeline.export.as_ref().and_then(|e| e.packed);
        let export_dir = if overrides.no_export {
            None
        } else {
            overrides
                .export_dir
                .clone()
                .or_else(|| pipeline.export.as_ref().map(|e| e.dir.value.clone()))
        };
        // The destination is checked (and its temporary folder reserved) before the model is
        // loaded or any stage runs: a refused folder costs nothing. Dropped on any error below,
        // the target removes its temporary folder.
        let target = match &export_dir {
            Some(dir) => {
                let force = overrides.force || pipeline.export.as_ref().is_some_and(|e| e.force);
                let inputs = self.inputs(&pipeline, &reference, &registry);
                let checked = prepare(dir, &inputs, force);
                Some(match (checked, &overrides.export_dir, &pipeline.export) {
                    (Ok(t), _, _) => t,
                    // The folder came from the pipeline file: point at the line.
                    (Err(e), None, Some(spec)) => {
                        return Err(AppError::Pipeline(pipeline.error(
                            &spec.dir.position,
                            "export.dir",
                            e.to_string(),
                        )));
                    }
                    (Err(e), _, _) => return Err(AppError::Export(e)),
                })
            }
            None => None,
        };
        let evaluate = pipeline.evaluate.clone();
        let plan = plan(pipeline, &registry, &self.runtime, &model)?;
        sink.emit(RunEvent::RunStarted {
            pipeline: plan.pipeline.name.clone(),
            model: reference.clone(),
            stages: plan.stages.len(),
            plugins: plan
                .stages
                .iter()
                .map(|s| (s.plugin.info.name.clone(), s.plugin.compiled.sha256.clone()))
                .collect(),
        });
        let reset_peak = self.config.per_model_peak;
        let shared = match (&evaluate, &overrides.dense_baselines) {
            (Some(spec), Some(baselines)) => baselines.find(&reference, &spec.value),
            _ => None,
        };
        let dense_shared = shared.is_some();
        let dense = match (&evaluate, shared) {
            (_, Some(found)) => {
                sink.emit(RunEvent::Notice {
                    message: "dense model: reusing this process's evaluation of the same model under the same protocol".into(),
                });
                Some(found)
            }
            (Some(spec), None) => {
                let e = evaluate_model(
                    &model,
                    None,
                    &spec.value,
                    ("dense", reset_peak),
                    sink,
                    cancel,
                )?;
                if let Some(baselines) = &overrides.dense_baselines {
                    baselines.insert(&reference, &spec.value, &e);
                }
                Some(e)
            }
            (None, None) => None,
        };
        // Distillation's teacher is the input model as it was before any stage pruned it (a
        // clone shares the weights' storage; the stages replace weights rather than write them).
        let teacher = plan
            .pipeline
            .finetune
            .as_ref()
            .and_then(|f| f.spec.distill)
            .map(|_| model.clone());
        let mut outcome = execute(&plan, &self.runtime, model, sink, cancel)?;
        if let Some(section) = &plan.pipeline.finetune {
            let identity = format!("model={reference}\npipeline={}", plan.pipeline.name);
            let mut scheduled =
                crate::run::ScheduledStages::new(&plan, &self.runtime, &outcome.state);
            let report = run_finetune(
                &plan.pipeline,
                section,
                &self.config.models_dir,
                &identity,
                teacher.as_ref(),
                &mut outcome.state,
                scheduled
                    .as_mut()
                    .map(|s| s as &mut dyn crate::finetune::Pruner),
                sink,
                cancel,
            )?;
            outcome.report.finetune = Some(report);
            if let Some(scheduled) = scheduled {
                // The scheduled stages' reports take their places among the stages, and the
                // layers' densities are the masks' after the last event.
                for (index, report) in scheduled.finish(&outcome.state) {
                    sink.emit(RunEvent::StageFinished {
                        index,
                        report: report.clone(),
                    });
                    let at = index.min(outcome.report.stages.len());
                    outcome.report.stages.insert(at, report);
                }
                crate::run::refresh_layers(&mut outcome.report, &outcome.state);
            }
        }
        // The teacher's dense weights are not needed past the fine-tune.
        drop(teacher);
        if let (Some(spec), Some(dense)) = (&evaluate, dense) {
            let pruned = evaluate_pruned_in_run(
                &mut outcome.state.model,
                &outcome.state.masks,
                &spec.value,
                reset_peak,
                export_dir.as_deref().and_then(spill_dir_beside),
                sink,
                cancel,
            )?;
            outcome.report.evaluation = Some(Comparison {
                dense,
                pruned,
                dense_shared,
            });
        }
        outcome.report.build = crate::build().to_string();
        outcome.report.export_dir = export_dir.as_ref().map(|d| d.display().to_string());
        outcome.report.resolved_pipeline = resolved_pipeline(
            &plan,
            evaluate
                .as_ref()
                .zip(outcome.report.evaluation.as_ref())
                .map(|(spec, c)| (&spec.value.text, &c.pruned.protocol)),
            export_dir
                .as_deref()
                .map(|dir| ExportTarget { dir, masks, packed }),
            &format!(
                "The pipeline `{}` exactly as it ran (espalier {} {}): every parameter written out,\nplugins and texts pinned by sha256. Rerun it with `espalier run --from report.json`.",
                plan.pipeline.name,
                env!("CARGO_PKG_VERSION"),
                crate::build()
            ),
        );
        // The last point a cancellation is honoured: an export, once started, completes (it is
        // atomic either way).
        cancel.check().map_err(|_| AppError::Cancelled)?;
        if let Some(target) = target {
            target.write(&outcome.state, &outcome.report, masks, packed)?;
            if let Some(dir) = &export_dir {
                sink.emit(RunEvent::Exported {
                    dir: dir.display().to_string(),
                });
            }
        }
        Ok(RunResult {
            report: outcome.report,
            exported_to: export_dir,
            state: outcome.state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Structure;
    use crate::sparse::{Storage, attach, tests::pruned};
    use espalier_engine::{LinearWeight, Model, Session};
    use std::collections::BTreeMap;

    fn weight_bits(model: &Model) -> BTreeMap<String, Vec<u32>> {
        model
            .weights()
            .iter()
            .map(|(name, t)| {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                (name.clone(), v.iter().map(|x| x.to_bits()).collect())
            })
            .collect()
    }

    /// A run's pruned evaluation drops the dense copy of every layer on an exact f32 kernel,
    /// runs without them, and gives every weight back bit for bit (the export writes them).
    #[test]
    fn parked_weights_come_back_bit_for_bit() {
        let (mut model, masks) = pruned("builtin:tiny-llama", Structure::Unstructured, 0.5);
        let before = weight_bits(&model);
        let mut session = Session::new(&model).unwrap();
        attach(&mut session, &model, &masks, Storage::F32).unwrap();
        let on_kernels: Vec<String> = session
            .linears()
            .iter()
            .filter(|l| matches!(l.weight(), LinearWeight::Kernel(_)))
            .map(|l| l.name().to_string())
            .collect();
        assert!(!on_kernels.is_empty());
        let want = session.forward(&[1, 2, 3], None).unwrap();
        let parked = park_packed_weights(&mut model, &session);
        let names: Vec<String> = parked.iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, on_kernels);
        assert!(names.iter().all(|n| model.weight(n).is_none()));
        let got = session.forward(&[1, 2, 3], None).unwrap();
        let (want, got): (Vec<f32>, Vec<f32>) = (
            want.flatten_all().unwrap().to_vec1().unwrap(),
            got.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(want, got);
        restore_parked_weights(&mut model, parked).unwrap();
        assert_eq!(weight_bits(&model), before);
    }

    /// bf16 and int8 storage round the kept values, so their kernels cannot give the tensors
    /// back: those are not parked but spilled to a temporary file while the session runs
    /// without them (the tied embedding, which the session reads, excepted), and come back bit
    /// for bit.
    #[test]
    fn the_spill_goes_into_the_folder_the_export_is_written_into() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("out");
        assert_eq!(spill_dir_beside(&export), Some(dir.path()));
        assert_eq!(
            spill_dir_beside(std::path::Path::new("out")),
            Some(std::path::Path::new("."))
        );
        // A folder not made yet: no spill folder (the caller falls back to `$TMPDIR`).
        assert_eq!(spill_dir_beside(&dir.path().join("missing/out")), None);
    }

    #[test]
    fn rounded_kernels_spill_their_dense_copies() {
        for storage in [Storage::Bf16, Storage::Int8] {
            let (mut model, masks) = pruned("builtin:tiny-llama", Structure::Unstructured, 0.5);
            let before = weight_bits(&model);
            let mut session = Session::new(&model).unwrap();
            attach(&mut session, &model, &masks, storage).unwrap();
            let parked = park_packed_weights(&mut model, &session);
            assert!(parked.is_empty());
            let want = session.forward(&[1, 2, 3], None).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let spill = Spill::rounded_layers(&mut model, &session, Some(dir.path())).unwrap();
            // In the folder asked for (the export's, on disk), not `$TMPDIR`.
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let at = std::fs::read_link(format!("/proc/self/fd/{}", spill.file.as_raw_fd()))
                    .unwrap();
                assert!(at.starts_with(dir.path()), "{}", at.display());
            }
            let spilled: Vec<&String> = spill.layers.iter().map(|(n, _)| n).collect();
            let expected: Vec<String> = session
                .linears()
                .iter()
                .map(|l| l.name().to_string())
                .filter(|n| n != model.embedding_name())
                .collect();
            assert_eq!(spilled, expected.iter().collect::<Vec<_>>(), "{storage:?}");
            assert!(expected.iter().all(|n| model.weight(n).is_none()));
            assert!(model.weight(model.embedding_name()).is_some());
            let got = session.forward(&[1, 2, 3], None).unwrap();
            assert_eq!(
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            spill.restore(&mut model).unwrap();
            assert_eq!(weight_bits(&model), before, "{storage:?}");
        }
    }
}
