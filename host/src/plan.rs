//! Planning: checks a parsed pipeline against the plugins and the model before anything runs
//! (unknown plugins, parameters of the wrong type, targets that match nothing, a `heads` stage
//! aimed at anything but attention projections, budgets with no source, and whatever each
//! plugin's own `validate` finds), so a mistake in stage 5 is reported at its line before
//! stage 1, the calibration or the dense evaluation spends a minute.

use std::path::Path;
use std::sync::Arc;

use espalier_engine::{LayerInfo, Model, Role, Session};
use globset::{Glob, GlobMatcher};

use crate::calibration::CalibrationSet;
use crate::display_safe;
use crate::pipeline::{DensitySpec, HeadsSpec, Pipeline, PipelineError, Position, StageSpec};
use crate::plugin::bindings::{
    Need, OutputKind, ParamKind, ParamProblem, ParamValue, PlannedDensity, PlanningContext,
    ProblemAt,
};
use crate::plugin::registry::{load_file_trusted, value_fits};
use crate::plugin::state::ModelView;
use crate::plugin::{Plugin, PluginError, Registry, Runtime, WitVersion};

/// Why a pipeline cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A mistake in the pipeline, at its line (the host's checks and the problems a plugin's
    /// `validate` reported alike).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A plugin's `validate` failed instead of answering (trap, panic, timeout, memory).
    #[error("stage `{}`: checking its parameters at planning: {source}", display_safe::name(.stage))]
    Validate {
        /// Stage name.
        stage: String,
        /// What happened.
        source: PluginError,
    },
}

/// Most problems of one stage's `validate` reported (each on its own line); the rest are
/// counted. A plugin may return millions.
const MAX_PROBLEMS: usize = 8;

/// Where a stage's per-layer density comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum StageDensity {
    /// Not given: the plugin decides (e.g. N:M fixes its own density).
    None,
    /// The same kept fraction for every target.
    Fixed(f64),
    /// The budgets produced by the stage with this index.
    Budget(usize),
}

/// A stage ready to run.
#[derive(Clone)]
pub struct PlannedStage {
    /// The stage as written.
    pub spec: StageSpec,
    /// The plugin that runs it.
    pub plugin: Plugin,
    /// The layers it prunes.
    pub targets: Vec<LayerInfo>,
    /// Where densities come from.
    pub density: StageDensity,
    /// Query heads to keep per block, when the stage gives `heads` (its density is this over
    /// the model's heads).
    pub heads_per_block: Option<usize>,
    /// Parameters, type-checked and completed with defaults.
    pub params: Vec<(String, ParamValue)>,
}

/// A pipeline checked against its plugins and model.
pub struct Plan {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Its stages.
    pub stages: Vec<PlannedStage>,
    /// Tokenized calibration text, when the pipeline has a `[calibration]` section or a stage
    /// needs activations or losses.
    pub calibration: Option<Arc<CalibrationSet>>,
    /// Under `[calibration] sequential = true`, the first stage that runs block by block (see
    /// [`crate::sequential`]).
    pub sequential_from: Option<usize>,
}

/// A layer-name pattern: a glob when it has wildcards, else a substring.
pub enum NamePattern {
    /// `*`, `?`, `[...]`, `{a,b}` patterns over the whole name.
    Glob(GlobMatcher),
    /// Plain text: matches names containing it (`embed_tokens`, `lm_head`).
    Contains(String),
}

impl NamePattern {
    /// Compiles a pattern.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.contains(['*', '?', '[', '{']) {
            Glob::new(pattern)
                .map(|g| NamePattern::Glob(g.compile_matcher()))
                .map_err(|e| format!("invalid glob `{pattern}`: {e}"))
        } else {
            Ok(NamePattern::Contains(pattern.to_string()))
        }
    }

    /// Whether a layer name matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Glob(g) => g.is_match(name),
            NamePattern::Contains(s) => name.contains(s.as_str()),
        }
    }
}

fn compile_patterns(
    pipeline: &Pipeline,
    spec: &StageSpec,
    field: &str,
    patterns: &[String],
    position: &crate::pipeline::Position,
) -> Result<Vec<NamePattern>, PipelineError> {
    patterns
        .iter()
        .map(|p| {
            NamePattern::new(p)
                .map_err(|m| pipeline.error(position, format!("stage[{}].{field}", spec.index), m))
        })
        .collect()
}

/// Resolves a stage's targets: matching 2-D weights, minus protected ones.
pub fn resolve_targets(
    pipeline: &Pipeline,
    spec: &StageSpec,
    model: &Model,
) -> Result<Vec<LayerInfo>, PipelineError> {
    let layers = model.layers();
    let candidates: Vec<&LayerInfo> = match &spec.targets {
        None => layers.iter().filter(|l| l.role.is_block_linear()).collect(),
        Some(t) => {
            let pats = compile_patterns(pipeline, spec, "targets", &t.value, &t.position)?;
            for (p, text) in pats.iter().zip(&t.value) {
                if !layers.iter().any(|l| p.matches(&l.name)) {
                    return Err(pipeline.error(
                        &t.position,
                        format!("stage[{}].targets", spec.index),
                        format!("pattern `{text}` matches no layer of the model (layer names look like `{}`; list them with `espalier model layers`)", example_name(&layers)),
                    ));
                }
            }
            layers
                .iter()
                .filter(|l| l.shape.len() == 2 && pats.iter().any(|p| p.matches(&l.name)))
                .collect()
        }
    };
    let protect = compile_patterns(
        pipeline,
        spec,
        "protect",
        &spec.protect.value,
        &spec.protect.position,
    )?;
    let targets: Vec<LayerInfo> = candidates
        .into_iter()
        .filter(|l| !protect.iter().any(|p| p.matches(&l.name)))
        .cloned()
        .collect();
    if targets.is_empty() {
        let position = spec.targets_position();
        return Err(pipeline.error(
            position,
            format!("stage[{}].targets", spec.index),
            "no 2-D weight is left to prune after `protect` (norms and biases are never targets)",
        ));
    }
    Ok(targets)
}

/// Whether a role is an attention projection, the only weights whose heads a `heads` stage can
/// remove.
fn is_attention(role: Role) -> bool {
    matches!(
        role,
        Role::AttnQ | Role::AttnK | Role::AttnV | Role::AttnQkv | Role::AttnO
    )
}

/// A `heads` stage removes whole attention heads: every target must be an attention projection
/// (the plugin would refuse anything else only once the stage runs, after calibration and the
/// dense evaluation). Refused at the stage's `targets` (or its `[[stage]]` line when the
/// default, every block linear, applies) with a pattern that selects this model's attention.
fn check_head_targets(
    pipeline: &Pipeline,
    spec: &StageSpec,
    plugin: &Plugin,
    targets: &[LayerInfo],
    model: &Model,
) -> Result<(), PipelineError> {
    if plugin.info.produces != OutputKind::Heads {
        return Ok(());
    }
    let others: Vec<&LayerInfo> = targets.iter().filter(|l| !is_attention(l.role)).collect();
    let Some(first) = others.first() else {
        return Ok(());
    };
    // The module that holds the projections: `self_attn` (LLaMA family), `attn` (GPT-2).
    let module = model
        .layers()
        .iter()
        .find(|l| is_attention(l.role))
        .and_then(|l| {
            l.name
                .split('.')
                .find(|part| part.contains("attn") && !part.starts_with("c_"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "self_attn".into());
    let (position, which) = match &spec.targets {
        Some(t) => (&t.position, "its targets include"),
        None => (
            &spec.position,
            "it has no `targets`, so it gets every block linear, including",
        ),
    };
    Err(pipeline.error(
        position,
        format!("stage[{}].targets", spec.index),
        format!(
            "plugin `{}` removes attention heads, so its targets must be attention projections (q, k, v, o), but {which} {} weights that are not (`{}` is {}); set `targets = [\"*.{module}.*\"]`",
            display_safe::name(&plugin.info.name),
            others.len(),
            first.name,
            first.role.as_str(),
        ),
    ))
}

fn example_name(layers: &[LayerInfo]) -> String {
    layers
        .iter()
        .find(|l| l.role.is_block_linear())
        .or(layers.first())
        .map(|l| l.name.clone())
        .unwrap_or_default()
}

fn kind_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Boolean => "a boolean",
        ParamKind::Integer => "an integer",
        ParamKind::Float => "a number",
        ParamKind::Text => "a string",
        ParamKind::Integers => "a list of integers",
        ParamKind::Floats => "a list of numbers",
    }
}

/// Converts a TOML value to a parameter value of the declared kind.
pub fn convert_param(value: &toml::Value, kind: ParamKind) -> Option<ParamValue> {
    let v = match (value, kind) {
        (toml::Value::Boolean(b), ParamKind::Boolean) => ParamValue::Boolean(*b),
        (toml::Value::Integer(i), ParamKind::Integer) => ParamValue::Integer(*i),
        (toml::Value::Integer(i), ParamKind::Float) => ParamValue::Float(*i as f64),
        (toml::Value::Float(f), ParamKind::Float) => ParamValue::Float(*f),
        (toml::Value::String(s), ParamKind::Text) => ParamValue::Text(s.clone()),
        (toml::Value::Array(items), ParamKind::Integers) => ParamValue::Integers(
            items
                .iter()
                .map(toml::Value::as_integer)
                .collect::<Option<Vec<i64>>>()?,
        ),
        (toml::Value::Array(items), ParamKind::Floats) => ParamValue::Floats(
            items
                .iter()
                .map(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
                .collect::<Option<Vec<f64>>>()?,
        ),
        _ => return None,
    };
    Some(v)
}

fn check_params(
    pipeline: &Pipeline,
    spec: &StageSpec,
    plugin: &Plugin,
) -> Result<Vec<(String, ParamValue)>, PipelineError> {
    let info = &plugin.info;
    // Names and docs come from the plugin: escaped and capped before they reach a message.
    let plugin_name = display_safe::name(&info.name);
    let accepted = || {
        if info.params.is_empty() {
            "it takes no parameters".to_string()
        } else {
            format!(
                "it accepts: {}",
                info.params
                    .iter()
                    .take(50)
                    .map(|p| display_safe::name(&p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    let mut out = Vec::with_capacity(info.params.len());
    for (key, value) in &spec.params {
        let field = format!("stage[{}].{}", spec.index, key.value);
        let Some(p) = info.params.iter().find(|p| p.name == key.value) else {
            // A typo of a stage key (`densty`) is as likely as one of a parameter.
            let closest = info
                .params
                .iter()
                .map(|p| p.name.as_str())
                .chain(crate::pipeline::STAGE_KEYS.iter().copied())
                .map(|k| (edit_distance(k, &key.value), k))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, k)| format!("did you mean `{}`? ", display_safe::name(k)))
                .unwrap_or_default();
            return Err(pipeline.error(
                &key.position,
                field,
                format!(
                    "unknown key `{}` in [[stage]] `{}`: {closest}plugin `{plugin_name}` has no parameter of that name ({}; the stage's own keys are {}; see `espalier plugins inspect {plugin_name}`)",
                    display_safe::name(&key.value),
                    display_safe::name(&spec.name),
                    accepted(),
                    crate::pipeline::STAGE_KEYS.join(", "),
                ),
            ));
        };
        let Some(v) = convert_param(&value.value, p.kind) else {
            return Err(pipeline.error(
                &value.position,
                field,
                format!(
                    "expected {} ({}), found {} `{}`",
                    kind_name(p.kind),
                    display_safe::line(&p.doc, display_safe::NAME_MAX),
                    value.value.type_str(),
                    value.value
                ),
            ));
        };
        debug_assert!(value_fits(&v, p.kind));
        out.push((p.name.clone(), v));
    }
    for p in &info.params {
        if out.iter().any(|(n, _)| *n == p.name) {
            continue;
        }
        match &p.default {
            Some(d) => out.push((p.name.clone(), d.clone())),
            None => {
                return Err(pipeline.error(
                    &spec.position,
                    format!("stage[{}].{}", spec.index, p.name),
                    format!(
                        "plugin `{plugin_name}` needs parameter `{}` ({}): {}",
                        display_safe::name(&p.name),
                        kind_name(p.kind),
                        display_safe::line(&p.doc, display_safe::NAME_MAX)
                    ),
                ));
            }
        }
    }
    Ok(out)
}

fn resolve_plugin(
    pipeline: &Pipeline,
    spec: &StageSpec,
    registry: &Registry,
    runtime: &Runtime,
) -> Result<Plugin, PipelineError> {
    let name = &spec.plugin.value;
    let field = format!("stage[{}].plugin", spec.index);
    if name.starts_with("oci://") {
        // Pulled once and cached by digest; checked like a plugin file.
        return crate::plugin::registry::load_oci(registry, runtime, name, &pipeline.sandbox)
            .map_err(|e| pipeline.error(&spec.plugin.position, field, e.to_string()));
    }
    if name.ends_with(".wasm") || name.contains('/') {
        // Described under the pipeline's limits: a looping `describe` stops at its timeout.
        return load_file_trusted(
            runtime,
            Path::new(name),
            &pipeline.sandbox,
            registry.trust(),
        )
        .map_err(|e| pipeline.error(&spec.plugin.position, field, e.to_string()));
    }
    // A pinned name takes the build with that hash whichever registered plugin of that name
    // is visible (a folder plugin may shadow the pinned built-in, or the reverse).
    if let Some(pin) = &spec.plugin_sha256
        && let Some(p) = registry.by_sha256(pin).filter(|p| p.info.name == *name)
    {
        return Ok(p.clone());
    }
    registry.get(name).cloned().ok_or_else(|| {
        let names = registry.names();
        let hint = names
            .iter()
            .min_by_key(|n| edit_distance(n, name))
            .filter(|n| edit_distance(n, name) <= 3)
            .map(|n| format!("did you mean `{n}`? "))
            .unwrap_or_default();
        pipeline.error(
            &spec.plugin.position,
            field,
            format!(
                "unknown plugin `{name}`; {hint}available: {} (or give a path to a .wasm file){}",
                names.join(", "),
                registry
                    .refused(name)
                    .map(|why| format!("; a plugin file named `{name}` was refused: {why}"))
                    .unwrap_or_default()
            ),
        )
    })
}

/// Query heads per block for a stage's `heads` count: only for a plugin that produces heads,
/// at most the model's heads; a total is divided evenly over the target blocks (rounded to the
/// nearest count, at least 1: every block keeps the same number).
fn heads_per_block(
    pipeline: &Pipeline,
    spec: &StageSpec,
    heads: &crate::pipeline::Located<HeadsSpec>,
    plugin: &Plugin,
    targets: &[LayerInfo],
    model: &Model,
) -> Result<usize, PipelineError> {
    let field = format!("stage[{}].heads", spec.index);
    if plugin.info.produces != OutputKind::Heads {
        return Err(pipeline.error(
            &heads.position,
            field,
            format!(
                "`heads` counts attention heads for a plugin that removes heads (e.g. `heads`); `{}` produces {}, so give `density` instead",
                display_safe::name(&plugin.info.name),
                crate::plugin::registry::produces_name(plugin.info.produces)
            ),
        ));
    }
    let available = model.config.num_heads;
    let per_block = match heads.value {
        HeadsSpec::PerBlock(n) => n,
        HeadsSpec::Total(total) => {
            let blocks = targets
                .iter()
                .filter_map(|l| l.block)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                .max(1);
            ((total as f64 / blocks as f64).round() as usize).max(1)
        }
    };
    if per_block > available {
        return Err(pipeline.error(
            &heads.position,
            field,
            format!(
                "{per_block} query heads per block, but the model has {available} (see `espalier model layers`)"
            ),
        ));
    }
    Ok(per_block)
}

/// Refuses a plugin whose sha256 differs from the stage's pin, showing both hashes.
fn check_pin(pipeline: &Pipeline, spec: &StageSpec, plugin: &Plugin) -> Result<(), PipelineError> {
    match &spec.plugin_sha256 {
        Some(pinned) if *pinned != plugin.compiled.sha256 => Err(pipeline.error(
            &spec.plugin.position,
            format!("stage[{}].plugin", spec.index),
            format!(
                "`{}` is pinned to sha256 {pinned}, but the plugin found has sha256 {} (version {}); put the pinned build in a plugin folder (--plugin-dir) or change the pin",
                spec.plugin.value,
                plugin.compiled.sha256,
                display_safe::name(&plugin.info.version)
            ),
        )),
        _ => Ok(()),
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Where a problem `validate` reported is shown: the line of what it names, and its field.
fn problem_site<'a>(spec: &'a StageSpec, at: &ProblemAt) -> (&'a Position, String) {
    let stage = format!("stage[{}]", spec.index);
    match at {
        ProblemAt::Stage => (&spec.position, stage),
        ProblemAt::Density => (
            spec.density
                .as_ref()
                .map_or(&spec.position, |d| &d.position),
            format!("{stage}.density"),
        ),
        ProblemAt::Targets => (spec.targets_position(), format!("{stage}.targets")),
        ProblemAt::Param(name) => (
            spec.params
                .iter()
                .find(|(k, _)| k.value == *name)
                .map_or(&spec.position, |(_, v)| &v.position),
            format!("{stage}.{}", display_safe::name(name)),
        ),
    }
}

/// The problems a plugin's `validate` reported for a stage, as one pipeline error: the first
/// at its own line, each further one on a line of its own with its position (at most
/// [`MAX_PROBLEMS`]), every message escaped and capped, naming the stage.
fn problems_error(
    pipeline: &Pipeline,
    spec: &StageSpec,
    plugin: &str,
    problems: &[ParamProblem],
) -> PipelineError {
    let who = if spec.name == plugin {
        format!("stage `{}`", display_safe::name(&spec.name))
    } else {
        format!(
            "stage `{}` (plugin `{}`)",
            display_safe::name(&spec.name),
            display_safe::name(plugin)
        )
    };
    let say = |p: &ParamProblem| {
        let text = display_safe::line(p.message.trim(), display_safe::NAME_MAX * 2);
        if text.is_empty() {
            format!("{who}: the plugin refuses this without saying why")
        } else {
            format!("{who}: {text}")
        }
    };
    let Some(first) = problems.first() else {
        return pipeline.error(
            &spec.position,
            format!("stage[{}]", spec.index),
            format!("{who}: the plugin refuses the stage without naming a problem"),
        );
    };
    let (position, field) = problem_site(spec, &first.at);
    let mut message = say(first);
    for p in problems.iter().skip(1).take(MAX_PROBLEMS - 1) {
        let (at, field) = problem_site(spec, &p.at);
        let also = pipeline.error(at, field, say(p));
        message.push('\n');
        message.push_str(&also.to_string());
    }
    if problems.len() > MAX_PROBLEMS {
        message.push_str(&format!(
            "\n… and {} more problems in this stage",
            problems.len() - MAX_PROBLEMS
        ));
    }
    pipeline.error(position, field, message)
}

/// The model as `validate` sees it: its description, no weights, masks or statistics (nothing
/// is computed at planning).
fn planning_view(model: &Model) -> Arc<ModelView> {
    Arc::new(ModelView {
        info: crate::run::model_info(model),
        layers: model.layers().iter().map(crate::run::wit_layer).collect(),
        weights: Default::default(),
        masks: Default::default(),
        original_weights: Default::default(),
        calibration: None,
    })
}

/// Calls the plugin's `validate` (0.4 and later) on a stage whose host-side checks passed.
fn validate_stage(
    pipeline: &Pipeline,
    earlier: &[PlannedStage],
    stage: &PlannedStage,
    runtime: &Runtime,
    view: &Arc<ModelView>,
) -> Result<(), PlanError> {
    let ctx = PlanningContext {
        stage: stage.spec.name.clone(),
        density: match stage.density {
            StageDensity::None => PlannedDensity::Unset,
            StageDensity::Fixed(d) => PlannedDensity::Fixed(d),
            StageDensity::Budget(_) => PlannedDensity::Budget,
        },
        targets: stage.targets.iter().map(crate::run::wit_layer).collect(),
        params: stage.params.clone(),
        masked_earlier: masked_earlier(earlier, stage),
    };
    let verdict = runtime
        .validate(
            &stage.plugin.info.name,
            &stage.plugin.compiled,
            view.clone(),
            &pipeline.sandbox,
            &ctx,
        )
        .map_err(|source| PlanError::Validate {
            stage: stage.spec.name.clone(),
            source,
        })?;
    verdict.map_err(|problems| {
        problems_error(pipeline, &stage.spec, &stage.plugin.info.name, &problems).into()
    })
}

/// A scheduled stage (or one pruning in lottery rounds) runs again and again at falling
/// densities during fine-tuning: its plugin must produce masks (budgets, heads and updated
/// weights have no meaning mid-training), its targets must be block linears (the only layers
/// fine-tuning trains), and (for a plugin that validates) it must accept the first density it
/// will be asked for as well as its final one, which refuses a plugin whose density is fixed
/// (N:M) at the `schedule`'s or `lottery`'s line.
fn check_scheduled(
    pipeline: &Pipeline,
    earlier: &[PlannedStage],
    stage: &PlannedStage,
    runtime: &Runtime,
    view: &Arc<ModelView>,
) -> Result<(), PlanError> {
    // The key, where it was written, the first density asked and the final one, and what a
    // refused first density is called in the message.
    let (key, position, first, final_density, first_event) =
        match (&stage.spec.schedule, &stage.spec.lottery) {
            (Some(section), _) => {
                let schedule = &section.schedule;
                let first = schedule.events().first().copied().unwrap_or(schedule.start);
                (
                    "schedule",
                    &section.position,
                    schedule.density_at(first),
                    schedule.final_density,
                    format!("the schedule's first event (step {first})"),
                )
            }
            (None, Some(section)) => (
                "lottery",
                &section.position,
                section.rounds.density_after(0),
                section.rounds.final_density,
                "the first round's pruning".to_string(),
            ),
            (None, None) => return Ok(()),
        };
    let field = format!("stage[{}].{key}", stage.spec.index);
    let plugin = display_safe::name(&stage.plugin.info.name);
    if stage.plugin.info.produces != OutputKind::Masks {
        let what = if key == "lottery" {
            "a stage with lottery rounds must produce masks (it prunes again at the end of each round)"
        } else {
            "a scheduled stage must produce masks (it prunes again at each event during fine-tuning)"
        };
        return Err(pipeline
            .error(
                position,
                field,
                format!(
                    "plugin `{plugin}` produces {}, but {what}; drop `{key}` to run it once",
                    crate::plugin::registry::produces_name(stage.plugin.info.produces)
                ),
            )
            .into());
    }
    if let Some(l) = stage.targets.iter().find(|l| !l.role.is_block_linear()) {
        let position = stage.spec.targets_position();
        return Err(pipeline
            .error(
                position,
                format!("stage[{}].targets", stage.spec.index),
                format!(
                    "`{}` is not a block linear, and fine-tuning trains only block linears, so a stage with `{key}` cannot prune it; protect it or prune it in a stage without `{key}`",
                    l.name
                ),
            )
            .into());
    }
    if stage.plugin.compiled.wit < WitVersion::V0_4 || first == final_density {
        return Ok(());
    }
    let first_stage = PlannedStage {
        density: StageDensity::Fixed(first),
        ..stage.clone()
    };
    let refused = match validate_stage(pipeline, earlier, &first_stage, runtime, view) {
        Ok(()) => return Ok(()),
        Err(PlanError::Pipeline(e)) => e.message,
        Err(other) => return Err(other),
    };
    let cannot = if key == "lottery" {
        "cannot prune in rounds"
    } else {
        "cannot follow a schedule"
    };
    Err(pipeline
        .error(
            position,
            field,
            format!(
                "{first_event} asks for density {first}, and the plugin refuses it (a plugin whose density is fixed, such as N:M, {cannot}): {refused}"
            ),
        )
        .into())
}

/// A stage updates masks during fine-tuning exactly when its plugin produces `mask-updates`
/// and its pipeline entry has `update = { … }`; its targets must be block linears (the layers
/// fine-tuning trains) that an earlier stage masks (there is nothing to swap in a dense layer).
fn check_updating(
    pipeline: &Pipeline,
    earlier: &[PlannedStage],
    stage: &PlannedStage,
) -> Result<(), PlanError> {
    let plugin = display_safe::name(&stage.plugin.info.name);
    let produces = stage.plugin.info.produces;
    let index = stage.spec.index;
    let Some(section) = &stage.spec.update else {
        if produces == OutputKind::MaskUpdates {
            return Err(pipeline
                .error(
                    &stage.spec.position,
                    format!("stage[{index}]"),
                    format!(
                        "plugin `{plugin}` updates masks during fine-tuning: give the stage `update = {{ every = 100, end = 0.75, drop_fraction = 0.3 }}` (or `update = {{}}` for these defaults) and the pipeline a [finetune] section"
                    ),
                )
                .into());
        }
        return Ok(());
    };
    if produces != OutputKind::MaskUpdates {
        return Err(pipeline
            .error(
                &section.position,
                format!("stage[{index}].update"),
                format!(
                    "plugin `{plugin}` produces {}; only a plugin that produces mask-updates (rigl, set) can update masks during fine-tuning",
                    crate::plugin::registry::produces_name(produces)
                ),
            )
            .into());
    }
    let masked = masked_earlier(earlier, stage);
    if let Some(l) = stage
        .targets
        .iter()
        .find(|l| !l.role.is_block_linear() || !masked.contains(&l.name))
    {
        let why = if l.role.is_block_linear() {
            "no earlier stage prunes it, so it has no mask to update; prune it first (e.g. with a wanda stage) or protect it"
        } else {
            "it is not a block linear, and fine-tuning trains only block linears; protect it"
        };
        return Err(pipeline
            .error(
                stage.spec.targets_position(),
                format!("stage[{index}].targets"),
                format!("`{}`: {why}", l.name),
            )
            .into());
    }
    Ok(())
}

/// The targets of `stage` that one of the `earlier` stages masks (a plugin producing masks or
/// weights targets them), in target order.
fn masked_earlier(earlier: &[PlannedStage], stage: &PlannedStage) -> Vec<String> {
    let masked: std::collections::BTreeSet<&str> = earlier
        .iter()
        .filter(|s| {
            matches!(
                s.plugin.info.produces,
                OutputKind::Masks | OutputKind::Weights
            )
        })
        .flat_map(|s| s.targets.iter().map(|t| t.name.as_str()))
        .collect();
    stage
        .targets
        .iter()
        .filter(|t| masked.contains(t.name.as_str()))
        .map(|t| t.name.clone())
        .collect()
}

/// Checks every stage of `pipeline` against the plugins and the model: the host's checks, then
/// each 0.4 plugin's `validate`, stage by stage, all before anything is computed.
pub fn plan(
    pipeline: Pipeline,
    registry: &Registry,
    runtime: &Runtime,
    model: &Model,
) -> Result<Plan, PlanError> {
    let mut stages: Vec<PlannedStage> = Vec::with_capacity(pipeline.stages.len());
    // Built for the first plugin that validates (a copy of the layer list).
    let mut view: Option<Arc<ModelView>> = None;
    for spec in &pipeline.stages {
        let plugin = resolve_plugin(&pipeline, spec, registry, runtime)?;
        check_pin(&pipeline, spec, &plugin)?;
        let targets = resolve_targets(&pipeline, spec, model)?;
        check_head_targets(&pipeline, spec, &plugin, &targets, model)?;
        let params = check_params(&pipeline, spec, &plugin)?;
        let heads_per_block = match &spec.heads {
            Some(h) => Some(heads_per_block(
                &pipeline, spec, h, &plugin, &targets, model,
            )?),
            None => None,
        };
        let density = match (&spec.density, heads_per_block) {
            (_, Some(per_block)) => {
                StageDensity::Fixed(per_block as f64 / model.config.num_heads.max(1) as f64)
            }
            (None, None) => StageDensity::None,
            (Some(d), None) => match &d.value {
                DensitySpec::Fixed(x) => StageDensity::Fixed(*x),
                DensitySpec::Budget(from) => {
                    let field = format!("stage[{}].density", spec.index);
                    let source = match from {
                        None => stages.iter().rposition(|s| s.plugin.info.produces == OutputKind::Budgets).ok_or_else(|| {
                            pipeline.error(&d.position, field.clone(), "\"budget\" needs an earlier stage whose plugin produces budgets (e.g. `sensitivity`)")
                        })?,
                        Some(name) => {
                            let i = stages.iter().position(|s| s.spec.name == *name).ok_or_else(|| {
                                pipeline.error(&d.position, field.clone(), format!("no earlier stage is named `{name}`"))
                            })?;
                            if stages[i].plugin.info.produces != OutputKind::Budgets {
                                return Err(pipeline.error(&d.position, field, format!("stage `{name}` produces {:?}, not budgets", stages[i].plugin.info.produces)).into());
                            }
                            i
                        }
                    };
                    StageDensity::Budget(source)
                }
            },
        };
        let stage = PlannedStage {
            spec: spec.clone(),
            plugin,
            targets,
            density,
            heads_per_block,
            params,
        };
        if stage.plugin.compiled.wit >= WitVersion::V0_4 {
            let view = view.get_or_insert_with(|| planning_view(model));
            validate_stage(&pipeline, &stages, &stage, runtime, view)?;
        }
        if stage.spec.schedule.is_some() || stage.spec.lottery.is_some() {
            let view = view.get_or_insert_with(|| planning_view(model));
            check_scheduled(&pipeline, &stages, &stage, runtime, view)?;
        }
        check_updating(&pipeline, &stages, &stage)?;
        stages.push(stage);
    }
    let sequential_from = crate::sequential::split(&pipeline, &stages)?;
    let calibration = plan_calibration(&pipeline, &stages, model)?;
    Ok(Plan {
        pipeline,
        stages,
        calibration,
        sequential_from,
    })
}

/// Tokenizes the calibration text when the pipeline gives one or a stage needs it, so a text
/// too short for one sequence (or a model without a tokenizer) fails before any stage runs.
fn plan_calibration(
    pipeline: &Pipeline,
    stages: &[PlannedStage],
    model: &Model,
) -> Result<Option<Arc<CalibrationSet>>, PipelineError> {
    let needing = stages.iter().find(|s| {
        s.plugin.info.needs.iter().any(|n| {
            matches!(
                n,
                Need::Activations | Need::Loss | Need::Gradients | Need::Hessians
            )
        })
    });
    let (spec, position, field) = match (&pipeline.calibration, needing) {
        (Some(c), _) => (
            c.spec.clone(),
            c.text_position.clone(),
            "calibration.text".to_string(),
        ),
        (None, Some(stage)) => {
            let spec = pipeline.calibration_spec();
            let field = format!("stage[{}].plugin", stage.spec.index);
            if !spec.text.is_file() {
                return Err(pipeline.error(
                    &stage.spec.plugin.position,
                    field,
                    format!(
                        "plugin `{}` needs calibration data (activations or losses), but the pipeline has no [calibration] section and the default text {} does not exist here; add [calibration] with text = \"FILE\"",
                        display_safe::name(&stage.plugin.info.name),
                        spec.text.display()
                    ),
                ));
            }
            (spec, stage.spec.plugin.position.clone(), field)
        }
        (None, None) => return Ok(None),
    };
    // GPT-2's learned position table bounds the sequence length; RoPE models have no bound.
    let max_positions = Session::new(model).map_or(usize::MAX, |s| s.max_positions());
    if spec.seq_len > max_positions {
        let at = pipeline
            .calibration
            .as_ref()
            .map_or(position.clone(), |c| c.position.clone());
        return Err(pipeline.error(
            &at,
            "calibration.seq_len",
            format!(
                "{} tokens exceed the model's {max_positions} positions",
                spec.seq_len
            ),
        ));
    }
    let set = CalibrationSet::load(&spec, model)
        .map_err(|e| pipeline.error(&position, field, e.to_string()))?;
    if let Some(pin) = pipeline
        .calibration
        .as_ref()
        .and_then(|c| c.text_sha256.as_ref())
        && pin.value != set.text_sha256
    {
        return Err(pipeline.error(
            &pin.position,
            "calibration.sha256",
            format!(
                "the calibration text {} has sha256 {}, but the pipeline pins {}; restore that text or update `sha256`",
                spec.text.display(),
                set.text_sha256,
                pin.value
            ),
        ));
    }
    Ok(Some(Arc::new(set)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_glob_or_contain() {
        let g = NamePattern::new("*.mlp.*").unwrap();
        assert!(g.matches("model.layers.0.mlp.up_proj.weight"));
        assert!(!g.matches("model.layers.0.self_attn.q_proj.weight"));
        let c = NamePattern::new("embed_tokens").unwrap();
        assert!(c.matches("model.embed_tokens.weight"));
        assert!(NamePattern::new("[").is_err());
    }

    #[test]
    fn params_convert_by_kind() {
        assert!(
            matches!(convert_param(&toml::Value::Integer(3), ParamKind::Float), Some(ParamValue::Float(x)) if x == 3.0)
        );
        assert!(convert_param(&toml::Value::Float(3.5), ParamKind::Integer).is_none());
        let arr = toml::Value::Array(vec![toml::Value::Integer(16), toml::Value::Integer(8)]);
        assert!(
            matches!(convert_param(&arr, ParamKind::Integers), Some(ParamValue::Integers(v)) if v == [16, 8])
        );
        let bad = toml::Value::Array(vec![toml::Value::String("x".into())]);
        assert!(convert_param(&bad, ParamKind::Integers).is_none());
    }

    #[test]
    fn plugin_problems_are_reported_at_the_line_of_what_they_name() {
        let text =
            "model = \"m\"\n[[stage]]\nname = \"cut\"\nplugin = \"n-m\"\ndensity = 0.3\nn = 2\n";
        let pipeline = Pipeline::parse("p.toml", text).unwrap();
        let spec = &pipeline.stages[0];
        let problem = |at: ProblemAt, message: &str| ParamProblem {
            at,
            message: message.into(),
        };
        // One problem: at its own line, naming the stage and the plugin.
        let e = problems_error(
            &pipeline,
            spec,
            "n-m",
            &[problem(ProblemAt::Density, "fix it")],
        );
        assert_eq!((e.position.line, e.position.column), (5, 1), "{e}");
        assert_eq!(e.field, "stage[0].density");
        assert_eq!(e.message, "stage `cut` (plugin `n-m`): fix it");
        // A parameter at its line; a defaulted one, targets and the stage at the stage's line.
        for (at, line, field) in [
            (ProblemAt::Param("n".into()), 6, "stage[0].n"),
            (ProblemAt::Param("m".into()), 2, "stage[0].m"),
            (ProblemAt::Targets, 2, "stage[0].targets"),
            (ProblemAt::Stage, 2, "stage[0]"),
        ] {
            let (position, f) = problem_site(spec, &at);
            assert_eq!((position.line, f.as_str()), (line, field));
        }
        // Many problems: each further one on its own located line, the rest counted, every
        // message escaped.
        let many: Vec<ParamProblem> = (0..20)
            .map(|i| {
                problem(
                    ProblemAt::Param("n".into()),
                    &format!("\u{1b}[2Jproblem {i}"),
                )
            })
            .collect();
        let e = problems_error(&pipeline, spec, "n-m", &many);
        let shown = e.to_string();
        assert_eq!(
            shown.matches("p.toml:6:1: stage[0].n: ").count(),
            MAX_PROBLEMS,
            "{shown}"
        );
        assert!(shown.contains("and 12 more problems"), "{shown}");
        assert!(!shown.contains('\u{1b}'), "{shown}");
        // An empty refusal still refuses.
        let e = problems_error(&pipeline, spec, "n-m", &[]);
        assert!(e.message.contains("without naming a problem"), "{e}");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("magnitude", "magnitud"), 1);
        assert_eq!(edit_distance("block", "blokc"), 2);
    }
}
