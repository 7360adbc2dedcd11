//! Guest SDK for Espalier criterion plugins.
//!
//! A criterion crate implements [`Guest`] (`describe` + `apply`, and optionally `validate`) and
//! calls [`export_criterion!`]; the SDK owns the generated WIT bindings and the small helpers
//! every criterion needs (typed parameter access, parameter specs, per-target iteration,
//! planning problems, progress reports), so a criterion is mostly its own math. A criterion
//! that updates masks during fine-tuning (RigL, SET) also implements [`Guest::update_masks`]
//! and produces [`OutputKind::MaskUpdates`]; [`dynamic`] holds the drop-and-grow selection
//! they share.
//!
//! ```ignore
//! use espalier_plugin_sdk::*;
//! struct Mine;
//! impl Guest for Mine {
//!     fn describe() -> PluginInfo { ... }
//!     // Optional: checked at planning, before anything runs; each problem is reported at the
//!     // line of what it names.
//!     fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
//!         let k = Params::new(&ctx).integer("k").unwrap_or(0);
//!         if k < 1 {
//!             return Err(vec![ParamProblem::param("k", format!("k = {k}: set k >= 1"))]);
//!         }
//!         Ok(())
//!     }
//!     fn apply(ctx: StageContext) -> Result<StageOutput, String> {
//!         for (i, target) in ctx.targets.iter().enumerate() {
//!             report_progress(i as u64, ctx.targets.len() as u64, &target.layer.name);
//!             ...
//!         }
//!     }
//! }
//! export_criterion!(Mine);
//! ```

// Lets the generated code name this crate by its public path, inside and outside it.
extern crate self as espalier_plugin_sdk;

/// Bindings generated from `wit/since_v0.6.0` (the `criterion` world). Each version is a
/// superset of the one before: a criterion that uses none of the additions runs exactly as
/// before, and the host still accepts components built against 0.1 to 0.5 (see
/// `plugins/testing/legacy-v01` to `legacy-v05`).
pub mod bindings {
    // The generated export glue of `validate` takes the flattened planning context as more
    // than seven core-wasm parameters; that is the canonical ABI, not a design choice here.
    #![allow(clippy::too_many_arguments)]
    wit_bindgen::generate!({
        path: "../../wit/since_v0.6.0",
        world: "criterion",
        pub_export_macro: true,
        export_macro_name: "export_criterion_raw",
        default_bindings_module: "espalier_plugin_sdk::bindings",
        runtime_path: "espalier_plugin_sdk::bindings::__wit_bindgen::rt",
    });
    #[doc(hidden)]
    pub use wit_bindgen as __wit_bindgen;
}

pub use bindings::espalier::prune::calibration::{self, CalibrationInfo};
pub use bindings::espalier::prune::kernels::{
    self, BinaryOp, BlockShape, Mask, NOfM, ReduceOp, Structure, UnaryOp,
};
pub use bindings::espalier::prune::model::{self, LayerInfo, ModelInfo, Role};
pub use bindings::espalier::prune::obs::{self, Hessian, Update};
pub use bindings::espalier::prune::plugin_types::{
    HeadKeep, LayerBudget, LayerMask, LayerWeights, Need, OutputKind, ParamKind, ParamProblem,
    ParamSpec, ParamValue, PlannedDensity, PlanningContext, PluginInfo, ProblemAt, StageContext,
    StageOutput, Target,
};
pub use bindings::espalier::prune::progress;
pub use bindings::espalier::prune::tensors::{self, Dtype, Tensor};
pub use bindings::espalier::prune::training::{self, LayerState, Position, UpdateContext};

pub mod dynamic;

/// What a criterion implements: the WIT world's exports, with `validate` optional.
///
/// The generated trait (`bindings::Guest`) has no defaults, so every criterion would have to
/// write a `validate` that accepts everything; [`export_criterion!`] bridges this one to it.
pub trait Guest {
    /// Describes the plugin: name, version, parameters, needs, output.
    fn describe() -> PluginInfo;

    /// Checks a stage at planning, before any calibration, evaluation or stage runs: return
    /// every problem, each naming what it is about ([`ParamProblem::param`],
    /// [`ParamProblem::density`], ...) with a message that says the fix. The host reports each
    /// at that line of the pipeline file. Only the model's description (`model::info`,
    /// `model::layers`) is available; the default accepts every stage.
    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        let _ = ctx;
        Ok(())
    }

    /// Runs the criterion for one stage.
    fn apply(ctx: StageContext) -> Result<StageOutput, String>;

    /// New masks at one mask update during fine-tuning, one per layer of `ctx.layers`, each
    /// keeping exactly as many weights as its current mask under the same structure. Called
    /// only for criteria that produce [`OutputKind::MaskUpdates`]; the default refuses.
    fn update_masks(ctx: UpdateContext) -> Result<Vec<LayerMask>, String> {
        Err(format!(
            "stage `{}`: this criterion does not update masks during fine-tuning",
            ctx.stage
        ))
    }
}

/// Exports a type implementing [`Guest`] as this component's criterion.
#[macro_export]
macro_rules! export_criterion {
    ($ty:ident) => {
        #[doc(hidden)]
        pub struct __EspalierCriterion;

        impl $crate::bindings::Guest for __EspalierCriterion {
            fn describe() -> $crate::PluginInfo {
                <$ty as $crate::Guest>::describe()
            }
            fn validate(
                ctx: $crate::PlanningContext,
            ) -> ::core::result::Result<(), ::std::vec::Vec<$crate::ParamProblem>> {
                <$ty as $crate::Guest>::validate(ctx)
            }
            fn apply(
                ctx: $crate::StageContext,
            ) -> ::core::result::Result<$crate::StageOutput, ::std::string::String> {
                <$ty as $crate::Guest>::apply(ctx)
            }
            fn update_masks(
                ctx: $crate::UpdateContext,
            ) -> ::core::result::Result<::std::vec::Vec<$crate::LayerMask>, ::std::string::String>
            {
                <$ty as $crate::Guest>::update_masks(ctx)
            }
        }

        $crate::bindings::export_criterion_raw!(__EspalierCriterion with_types_in $crate::bindings);
    };
}

/// Reports that `done` of `total` units of this `apply`'s work are finished (trials, layers),
/// with a short message; `total = 0` when the amount is unknown. Cheap: the host keeps one
/// report per 200 ms or so and drops the rest, so call it at every step. No effect outside
/// `apply`.
pub fn report_progress(done: u64, total: u64, message: &str) {
    progress::report(done, total, message);
}

impl ParamProblem {
    /// A problem with the named parameter (reported at its line).
    pub fn param(name: &str, message: impl Into<String>) -> Self {
        ParamProblem {
            at: ProblemAt::Param(name.to_string()),
            message: message.into(),
        }
    }

    /// A problem with the stage's `density`.
    pub fn density(message: impl Into<String>) -> Self {
        ParamProblem {
            at: ProblemAt::Density,
            message: message.into(),
        }
    }

    /// A problem with the stage's `targets`.
    pub fn targets(message: impl Into<String>) -> Self {
        ParamProblem {
            at: ProblemAt::Targets,
            message: message.into(),
        }
    }

    /// A problem with the stage as a whole.
    pub fn stage(message: impl Into<String>) -> Self {
        ParamProblem {
            at: ProblemAt::Stage,
            message: message.into(),
        }
    }
}

/// Problems as one error message for `apply` (which checks what `validate` checked when the
/// host serves an older contract, or a density arrives from a budget): "`n`: ...; `density`:
/// ...".
pub fn problems_message(problems: &[ParamProblem]) -> String {
    problems
        .iter()
        .map(|p| match &p.at {
            ProblemAt::Param(name) => format!("`{name}`: {}", p.message),
            ProblemAt::Density => format!("`density`: {}", p.message),
            ProblemAt::Targets => format!("`targets`: {}", p.message),
            ProblemAt::Stage => p.message.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Ok` when there are no problems, else their [`problems_message`].
pub fn no_problems(problems: Vec<ParamProblem>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems_message(&problems))
    }
}

/// `Ok` when there are no problems, else the problems: the end of a `validate`.
pub fn problems_result(problems: Vec<ParamProblem>) -> Result<(), Vec<ParamProblem>> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// A context that carries a stage's parameters: what `apply` and `validate` get.
pub trait StageParams {
    /// The parameters, typed and completed with defaults by the host.
    fn param_list(&self) -> &[(String, ParamValue)];
}

impl StageParams for StageContext {
    fn param_list(&self) -> &[(String, ParamValue)] {
        &self.params
    }
}

impl StageParams for UpdateContext {
    fn param_list(&self) -> &[(String, ParamValue)] {
        &self.params
    }
}

impl StageParams for PlanningContext {
    fn param_list(&self) -> &[(String, ParamValue)] {
        &self.params
    }
}

impl PlanningContext {
    /// The density every target is asked for, when the pipeline gives a number.
    pub fn fixed_density(&self) -> Option<f64> {
        match self.density {
            PlannedDensity::Fixed(d) => Some(d),
            PlannedDensity::Unset | PlannedDensity::Budget => None,
        }
    }
}

/// Declares a parameter with a default value.
pub fn param(name: &str, default: ParamValue, doc: &str) -> ParamSpec {
    ParamSpec {
        name: name.to_string(),
        kind: kind_of(&default),
        default: Some(default),
        doc: doc.to_string(),
    }
}

/// Declares a parameter the pipeline must set.
pub fn required_param(name: &str, kind: ParamKind, doc: &str) -> ParamSpec {
    ParamSpec {
        name: name.to_string(),
        kind,
        default: None,
        doc: doc.to_string(),
    }
}

fn kind_of(value: &ParamValue) -> ParamKind {
    match value {
        ParamValue::Boolean(_) => ParamKind::Boolean,
        ParamValue::Integer(_) => ParamKind::Integer,
        ParamValue::Float(_) => ParamKind::Float,
        ParamValue::Text(_) => ParamKind::Text,
        ParamValue::Integers(_) => ParamKind::Integers,
        ParamValue::Floats(_) => ParamKind::Floats,
    }
}

/// Typed access to a stage's parameters (the host has already type-checked them against
/// `describe` and filled in defaults, so a miss here is a plugin bug, reported as an error).
pub struct Params<'a>(&'a [(String, ParamValue)]);

impl<'a> Params<'a> {
    /// Wraps the parameter list of a stage context (`apply`) or planning context (`validate`).
    pub fn new(ctx: &'a impl StageParams) -> Self {
        Params(ctx.param_list())
    }

    fn get(&self, name: &str) -> Result<&'a ParamValue, String> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("parameter `{name}` missing"))
    }

    /// A float parameter (integers are widened).
    pub fn float(&self, name: &str) -> Result<f64, String> {
        match self.get(name)? {
            ParamValue::Float(v) => Ok(*v),
            ParamValue::Integer(v) => Ok(*v as f64),
            _ => Err(format!("parameter `{name}` must be a number")),
        }
    }

    /// An integer parameter.
    pub fn integer(&self, name: &str) -> Result<i64, String> {
        match self.get(name)? {
            ParamValue::Integer(v) => Ok(*v),
            _ => Err(format!("parameter `{name}` must be an integer")),
        }
    }

    /// A boolean parameter.
    pub fn boolean(&self, name: &str) -> Result<bool, String> {
        match self.get(name)? {
            ParamValue::Boolean(v) => Ok(*v),
            _ => Err(format!("parameter `{name}` must be true or false")),
        }
    }

    /// A text parameter.
    pub fn text(&self, name: &str) -> Result<&'a str, String> {
        match self.get(name)? {
            ParamValue::Text(v) => Ok(v.as_str()),
            _ => Err(format!("parameter `{name}` must be a string")),
        }
    }

    /// A list-of-floats parameter (a list of integers is widened).
    pub fn floats(&self, name: &str) -> Result<Vec<f64>, String> {
        match self.get(name)? {
            ParamValue::Floats(v) => Ok(v.clone()),
            ParamValue::Integers(v) => Ok(v.iter().map(|&x| x as f64).collect()),
            _ => Err(format!("parameter `{name}` must be a list of numbers")),
        }
    }

    /// A list-of-integers parameter.
    pub fn integers(&self, name: &str) -> Result<&'a [i64], String> {
        match self.get(name)? {
            ParamValue::Integers(v) => Ok(v.as_slice()),
            _ => Err(format!("parameter `{name}` must be a list of integers")),
        }
    }
}

/// The density asked for a target, or an error naming the layer.
pub fn target_density(target: &Target) -> Result<f64, String> {
    target.density.ok_or_else(|| {
        format!(
            "layer `{}` has no density: set `density` in the stage or feed it a budget",
            target.layer.name
        )
    })
}

/// Reads a whole (small) tensor into the guest.
pub fn read_all(t: &Tensor) -> Result<Vec<f32>, String> {
    let n = t.numel();
    let mut out = Vec::with_capacity(n as usize);
    let mut offset = 0u64;
    // Chunks keep each host->guest copy bounded (a list must fit in one allocation).
    const CHUNK: u64 = 1 << 20;
    while offset < n {
        let count = (n - offset).min(CHUNK);
        out.extend(t.read(offset, count as u32)?);
        offset += count;
    }
    Ok(out)
}

/// Reads a whole mask's flags into the guest (`true` = kept), in chunks.
pub fn read_mask(m: &Mask) -> Result<Vec<bool>, String> {
    let n: u64 = m.shape().iter().map(|&d| u64::from(d)).product();
    let mut out = Vec::with_capacity(n as usize);
    let mut offset = 0u64;
    const CHUNK: u64 = 1 << 22;
    while offset < n {
        let count = (n - offset).min(CHUNK);
        out.extend(
            kernels::mask_bytes(m, offset, count as u32)?
                .into_iter()
                .map(|b| b != 0),
        );
        offset += count;
    }
    Ok(out)
}

/// An output with masks only.
pub fn masks_output(masks: Vec<LayerMask>) -> StageOutput {
    StageOutput {
        masks,
        budgets: Vec::new(),
        heads: Vec::new(),
        weights: Vec::new(),
    }
}

/// An output with masks and updated weights (`produces = weights`).
pub fn weights_output(masks: Vec<LayerMask>, weights: Vec<LayerWeights>) -> StageOutput {
    StageOutput {
        masks,
        budgets: Vec::new(),
        heads: Vec::new(),
        weights,
    }
}

/// Checks several criteria share, each returning the [`ParamProblem`] a `validate` reports (and
/// an `apply` turns into its error with [`no_problems`]).
pub mod checks {
    use super::{BlockShape, LayerInfo, NOfM, ParamProblem, PlannedDensity};

    /// An optional N:M pair from the `n` and `m` parameters: `(0, 0)` = none.
    pub fn optional_n_of_m(n: i64, m: i64) -> Result<Option<NOfM>, ParamProblem> {
        match (n, m) {
            (0, 0) => Ok(None),
            (n, m) if m > 0 && n > 0 && n <= m && m <= i64::from(u32::MAX) => Ok(Some(NOfM {
                n: n as u32,
                m: m as u32,
            })),
            _ => Err(ParamProblem::param(
                if (1..=m.max(1)).contains(&n) {
                    "m"
                } else {
                    "n"
                },
                format!(
                    "n = {n}, m = {m}: set both with 1 <= n <= m for N:M (e.g. n = 2, m = 4), or neither"
                ),
            )),
        }
    }

    /// Widest lazy-update column block an OBS update takes (wider than any layer gains nothing).
    pub const MAX_OBS_BLOCKSIZE: i64 = 1 << 16;

    /// The `blocksize` of an OBS update: columns per lazy-update block (SparseGPT: 128).
    pub fn obs_blocksize(blocksize: i64) -> Result<u32, ParamProblem> {
        if (1..=MAX_OBS_BLOCKSIZE).contains(&blocksize) {
            Ok(blocksize as u32)
        } else {
            Err(ParamProblem::param(
                "blocksize",
                format!(
                    "blocksize = {blocksize}: the lazy-update block must be 1..={MAX_OBS_BLOCKSIZE} columns (SparseGPT: 128)"
                ),
            ))
        }
    }

    /// The `damping` of an OBS update: a fraction of the Hessian's mean diagonal added to the
    /// diagonal (SparseGPT: 0.01).
    pub fn obs_damping(damping: f64) -> Result<f64, ParamProblem> {
        if (0.0..=1.0).contains(&damping) {
            Ok(damping)
        } else {
            Err(ParamProblem::param(
                "damping",
                format!(
                    "damping = {damping}: a fraction of the Hessian's mean diagonal in [0, 1] (SparseGPT: 0.01)"
                ),
            ))
        }
    }

    /// An optional block shape from a `[rows, cols]` parameter named `name`: `[]` = none.
    pub fn optional_block(name: &str, shape: &[i64]) -> Result<Option<BlockShape>, ParamProblem> {
        match shape {
            [] => Ok(None),
            [r, c] if (1..=4096).contains(r) && (1..=4096).contains(c) => Ok(Some(BlockShape {
                rows: *r as u32,
                cols: *c as u32,
            })),
            other => Err(ParamProblem::param(
                name,
                format!(
                    "`{name}` must be [rows, cols] with entries in 1..=4096, or empty; got {other:?} (e.g. {name} = [16, 16])"
                ),
            )),
        }
    }

    /// What an N:M selection implies for the stage's density: it keeps exactly n/m, so a
    /// different fixed density or per-layer budgets cannot be honoured.
    pub fn n_of_m_density(nm: NOfM, density: &PlannedDensity) -> Option<ParamProblem> {
        let (n, m) = (nm.n, nm.m);
        let exact = f64::from(n) / f64::from(m);
        match density {
            PlannedDensity::Fixed(d) if (d - exact).abs() > 1e-9 => {
                Some(ParamProblem::density(format!(
                    "n = {n}, m = {m} keeps exactly {exact} of each group; set density = {exact} or drop it"
                )))
            }
            PlannedDensity::Budget => Some(ParamProblem::density(format!(
                "N:M keeps exactly n/m = {n}/{m} of every layer, so per-layer budgets cannot apply; drop `density`"
            ))),
            _ => None,
        }
    }

    /// A stage that keeps a fraction of each target needs a density.
    pub fn density_required(plugin: &str, density: &PlannedDensity) -> Option<ParamProblem> {
        matches!(density, PlannedDensity::Unset).then(|| {
            ParamProblem::density(format!(
                "{plugin} keeps a fraction of each target's weights: set `density` (e.g. density = 0.5) or feed it a budget (density = \"budget\")"
            ))
        })
    }

    /// Targets whose input columns `m` does not divide (N:M groups run along them).
    pub fn n_of_m_columns(nm: NOfM, targets: &[&LayerInfo]) -> Option<ParamProblem> {
        let misfits: Vec<&&LayerInfo> = targets
            .iter()
            .filter(|l| l.shape.last().copied().unwrap_or(0) % nm.m != 0)
            .collect();
        let first = misfits.first()?;
        let cols = first.shape.last().copied().unwrap_or(0);
        Some(ParamProblem::param(
            "m",
            format!(
                "`{}` has {cols} input columns, not a multiple of m = {} ({} such targets): pick an m that divides them, or `protect` them",
                first.name,
                nm.m,
                misfits.len()
            ),
        ))
    }
}
