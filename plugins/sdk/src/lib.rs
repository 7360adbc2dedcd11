//! Guest SDK for Espalier criterion plugins.
//!
//! A criterion crate implements [`Guest`] (`describe` + `apply`) and calls
//! [`export_criterion!`]; the SDK owns the generated WIT bindings and the small helpers every
//! criterion needs (typed parameter access, parameter specs, per-target iteration), so a
//! criterion is mostly its own math.
//!
//! ```ignore
//! use espalier_plugin_sdk::*;
//! struct Mine;
//! impl Guest for Mine {
//!     fn describe() -> PluginInfo { ... }
//!     fn apply(ctx: StageContext) -> Result<StageOutput, String> { ... }
//! }
//! export_criterion!(Mine);
//! ```

// Lets the generated code name this crate by its public path, inside and outside it.
extern crate self as espalier_plugin_sdk;

/// Bindings generated from `wit/since_v0.3.0` (the `criterion` world). Each version is a
/// superset of the one before: a criterion that uses none of the additions runs exactly as
/// before, and the host still accepts components built against 0.1 and 0.2 (see
/// `plugins/testing/legacy-v01` and `legacy-v02`).
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/since_v0.3.0",
        world: "criterion",
        pub_export_macro: true,
        export_macro_name: "export_criterion_raw",
        default_bindings_module: "espalier_plugin_sdk::bindings",
        runtime_path: "espalier_plugin_sdk::bindings::__wit_bindgen::rt",
    });
    #[doc(hidden)]
    pub use wit_bindgen as __wit_bindgen;
}

pub use bindings::Guest;
pub use bindings::espalier::prune::calibration::{self, CalibrationInfo};
pub use bindings::espalier::prune::kernels::{
    self, BinaryOp, BlockShape, Mask, NOfM, ReduceOp, Structure, UnaryOp,
};
pub use bindings::espalier::prune::model::{self, LayerInfo, ModelInfo, Role};
pub use bindings::espalier::prune::plugin_types::{
    HeadKeep, LayerBudget, LayerMask, Need, OutputKind, ParamKind, ParamSpec, ParamValue,
    PluginInfo, StageContext, StageOutput, Target,
};
pub use bindings::espalier::prune::tensors::{self, Dtype, Tensor};

/// Exports a type implementing [`Guest`] as this component's criterion.
#[macro_export]
macro_rules! export_criterion {
    ($ty:ident) => {
        $crate::bindings::export_criterion_raw!($ty with_types_in $crate::bindings);
    };
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
    /// Wraps the parameter list of a stage context.
    pub fn new(ctx: &'a StageContext) -> Self {
        Params(&ctx.params)
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

/// An output with masks only.
pub fn masks_output(masks: Vec<LayerMask>) -> StageOutput {
    StageOutput {
        masks,
        budgets: Vec::new(),
        heads: Vec::new(),
    }
}
