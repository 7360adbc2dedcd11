//! The run report: what each stage did and cost, and the density of every layer, written as
//! `report.json` on export and rendered as tables by the CLI.

use espalier_engine::Role;
use serde::Serialize;

use crate::heads::HeadsChange;

/// One stage of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Plugin name (from `describe`).
    pub plugin: String,
    /// Plugin version (from `describe`).
    pub plugin_version: String,
    /// sha256 of the plugin's component bytes.
    pub plugin_sha256: String,
    /// `builtin` or the .wasm path.
    pub plugin_origin: String,
    /// `masks`, `budgets` or `heads`.
    pub produces: String,
    /// Number of target layers.
    pub targets: usize,
    /// The density the pipeline asked for, when fixed.
    pub requested_density: Option<f64>,
    /// Kept fraction of the targets after the stage, relative to their size before the run.
    pub density_after: f64,
    /// Wall time of the whole stage.
    pub seconds: f64,
    /// Instantiating the component.
    pub instantiate_seconds: f64,
    /// Inside the guest and crossing the boundary (the call minus host kernels).
    pub guest_and_boundary_seconds: f64,
    /// Host kernels called by the plugin.
    pub host_kernel_seconds: f64,
    /// Validating and applying the result.
    pub validate_apply_seconds: f64,
    /// (guest + boundary + instantiation) / stage time.
    pub guest_share: f64,
    /// The per-layer densities a budget stage produced (empty for other stages).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub budgets: std::collections::BTreeMap<String, f64>,
}

/// One 2-D weight after the run.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Tensor name.
    pub name: String,
    /// What it does.
    pub role: Role,
    /// Block index.
    pub block: Option<usize>,
    /// Shape now (smaller than before when heads were removed).
    pub shape: Vec<usize>,
    /// Elements before the run.
    pub original_numel: usize,
    /// Elements kept (non-pruned).
    pub kept: usize,
    /// kept / original_numel.
    pub density: f64,
    /// Structure of its mask, if pruned by a mask.
    pub structure: Option<String>,
}

/// Whole-model figures.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Layers with a mask.
    pub pruned_layers: usize,
    /// Kept fraction over the pruned layers (masked or reshaped).
    pub pruned_density: f64,
    /// Kept fraction over all block linears.
    pub block_linear_density: f64,
    /// Kept fraction over all 2-D weights (embeddings and LM head included).
    pub all_weights_density: f64,
    /// Parameters before the run.
    pub parameters_before: usize,
    /// Parameters stored after the run (smaller only when heads were removed).
    pub parameters_after: usize,
    /// Parameters not pruned (stored minus zeros in place).
    pub nonzero_parameters_after: usize,
    /// Attention heads removed physically, if any.
    pub heads: Option<HeadsChange>,
}

/// Everything `report.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Version of the espalier binary.
    pub espalier_version: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline file.
    pub pipeline_file: String,
    /// Model reference.
    pub model: String,
    /// `model_type` of the config.
    pub architecture: String,
    /// Wall time of all stages.
    pub seconds: f64,
    /// Per stage.
    pub stages: Vec<StageReport>,
    /// Totals.
    pub summary: Summary,
    /// Per 2-D weight.
    pub layers: Vec<LayerReport>,
    /// Dense vs pruned evaluation, when the pipeline has an `[evaluate]` section.
    pub evaluation: Option<crate::evaluate::Comparison>,
}
