//! The entry points the CLI (and later the daemon) share: start the plugin runtime, register
//! built-in and folder plugins, and run a pipeline file from parsing to export.

use std::path::{Path, PathBuf};

use espalier_engine::EngineError;

use crate::evaluate::{Comparison, EvalSpec, Evaluation, evaluate};
use crate::export::{ExportError, Input, prepare};
use crate::pipeline::{Pipeline, PipelineError};
use crate::plan::plan;
use crate::plugin::{Origin, PluginError, Registry, Runtime, Sandbox};
use crate::report::RunReport;
use crate::run::{RunError, RunObserver, RunState, execute};

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
}

/// Builds the forward pass of `model` and evaluates it, reporting progress as `which`.
///
/// With `masks`, pruned layers run on Espalier's sparse kernels (the format the planner picks).
pub fn evaluate_model(
    model: &espalier_engine::Model,
    masks: Option<&std::collections::BTreeMap<String, crate::mask::Mask>>,
    spec: &EvalSpec,
    which: &str,
    observer: &mut dyn RunObserver,
) -> Result<Evaluation, AppError> {
    observer.evaluation_started(which);
    let mut session = espalier_engine::Session::new(model)
        .map_err(|e| AppError::Evaluate(which.to_string(), e))?;
    if let Some(masks) = masks {
        crate::sparse::attach(&mut session, model, masks, crate::sparse::Storage::F32)
            .map_err(|e| AppError::Evaluate(which.to_string(), e))?;
    }
    evaluate(model, &session, spec, &mut |p| {
        observer.evaluation_progress(which, p)
    })
    .map_err(|e| AppError::Evaluate(which.to_string(), e))
}

/// Runtime plus registered plugins.
pub struct App {
    /// The wasmtime runtime.
    pub runtime: Runtime,
    /// Plugins by name.
    pub registry: Registry,
    /// Files in plugin folders that could not be loaded (reported, not fatal).
    pub plugin_warnings: Vec<PluginError>,
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
    fn inputs(&self, pipeline: &Pipeline, model: &str) -> Vec<Input> {
        let mut inputs = vec![Input::new("pipeline file", &pipeline.file)];
        if !model.starts_with("builtin:") {
            inputs.push(Input::new("model folder", model));
        }
        let calibration = pipeline.calibration.as_ref().map_or_else(
            || crate::calibration::CalibrationSpec::default().text,
            |c| c.spec.text.clone(),
        );
        inputs.push(Input::new("calibration text", calibration));
        if let Some(text) = pipeline
            .evaluate
            .as_ref()
            .and_then(|e| e.value.text.clone())
        {
            inputs.push(Input::new("evaluation text", text));
        }
        for stage in &pipeline.stages {
            let name = &stage.plugin.value;
            if name.ends_with(".wasm") || name.contains('/') {
                inputs.push(Input::new("plugin file", name));
            }
        }
        for plugin in self.registry.iter() {
            if let Origin::File(path) = &plugin.origin {
                inputs.push(Input::new("plugin file", path));
            }
        }
        inputs
    }

    /// Starts the runtime and registers the built-ins plus every `.wasm` in `plugin_dirs`.
    pub fn new(plugin_dirs: &[PathBuf]) -> Result<Self, AppError> {
        Self::with_sandbox(plugin_dirs, &Sandbox::default())
    }

    /// As [`App::new`], describing the plugins of `plugin_dirs` under `sandbox` (the limits of
    /// the pipeline about to run, so a `describe` that loops stops at its timeout).
    pub fn with_sandbox(plugin_dirs: &[PathBuf], sandbox: &Sandbox) -> Result<Self, AppError> {
        let runtime = Runtime::new().map_err(|e| AppError::Runtime(format!("{e:#}")))?;
        let mut registry = Registry::with_builtins(&runtime)?;
        let mut plugin_warnings = Vec::new();
        for dir in plugin_dirs {
            plugin_warnings.extend(registry.add_dir(&runtime, dir, sandbox));
        }
        Ok(App {
            runtime,
            registry,
            plugin_warnings,
        })
    }

    /// Parses, plans, runs and exports a pipeline file.
    pub fn run_file(
        &self,
        path: &Path,
        overrides: &RunOverrides,
        observer: &mut dyn RunObserver,
    ) -> Result<RunResult, AppError> {
        let pipeline = Pipeline::load(path)?;
        self.run_pipeline(pipeline, overrides, observer)
    }

    /// Plans, runs and exports a parsed pipeline.
    pub fn run_pipeline(
        &self,
        mut pipeline: Pipeline,
        overrides: &RunOverrides,
        observer: &mut dyn RunObserver,
    ) -> Result<RunResult, AppError> {
        if let Some(m) = &overrides.model {
            pipeline.model.value = m.clone();
        }
        // `fetch:NAME` downloads and imports the model on first use (progress on stderr).
        let reference = crate::fetch::resolve(&pipeline.model.value, &mut |m| {
            // Progress only: a closed stderr must not stop (or panic) the run.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "espalier: {m}");
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
        let masks = pipeline.export.as_ref().is_none_or(|e| e.masks);
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
                let inputs = self.inputs(&pipeline, &reference);
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
        let plan = plan(pipeline, &self.registry, &self.runtime, &model)?;
        let dense = match &evaluate {
            Some(spec) => Some(evaluate_model(
                &model,
                None,
                &spec.value,
                "dense",
                observer,
            )?),
            None => None,
        };
        let mut outcome = execute(&plan, &self.runtime, model, observer)?;
        if let (Some(spec), Some(dense)) = (&evaluate, dense) {
            let pruned = evaluate_model(
                &outcome.state.model,
                Some(&outcome.state.masks),
                &spec.value,
                "pruned",
                observer,
            )?;
            outcome.report.evaluation = Some(Comparison { dense, pruned });
        }
        if let Some(target) = target {
            target.write(&outcome.state, &outcome.report, masks)?;
        }
        Ok(RunResult {
            report: outcome.report,
            exported_to: export_dir,
            state: outcome.state,
        })
    }
}
