//! The run report: what each stage did and cost, the density of every layer, and everything
//! needed to rerun the same pipeline (resolved parameters, matched layers, pinned plugins and
//! texts, sandbox limits, protocol, build), written as `report.json` on export, rendered as
//! tables by the CLI, and read back by `espalier run --from` and `espalier compare`.

use std::collections::BTreeMap;

use espalier_engine::Role;
use serde::{Deserialize, Serialize};

use crate::heads::HeadsChange;

/// One stage of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Who vouches for the plugin: `builtin`, `unsigned`, or `key ID (trusted)` /
    /// `key ID (not trusted)` (empty in reports written before signatures).
    #[serde(default)]
    pub plugin_signer: String,
    /// For a plugin pulled from an OCI registry, the reference pinned to its manifest
    /// (`oci://REGISTRY/REPOSITORY@sha256:HEX`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_source: Option<String>,
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
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub budgets: BTreeMap<String, f64>,
    /// Every parameter the plugin received, defaults included (as JSON values).
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// How the density was given: a number, `budget` (from stage N) or none.
    #[serde(default)]
    pub density_from: String,
    /// `targets` as written (`None`: every block linear).
    #[serde(default)]
    pub target_patterns: Option<Vec<String>>,
    /// `protect` as written.
    #[serde(default)]
    pub protect_patterns: Vec<String>,
    /// The layers the targets matched, in model order.
    #[serde(default)]
    pub matched_layers: Vec<String>,
}

/// One 2-D weight after the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Layers with a mask.
    pub pruned_layers: usize,
    /// Layers without a mask made smaller by head removal (rows or columns cut out).
    #[serde(default)]
    pub shrunk_layers: usize,
    /// Kept fraction over the pruned layers (`pruned_layers` + `shrunk_layers`).
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

/// The calibration a run used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CalibrationRecord {
    /// The text file.
    pub text: String,
    /// sha256 of its bytes.
    pub text_sha256: String,
    /// Sequences used (fewer than asked when the text is short).
    pub samples: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Whether stages ran block by block on the pruned blocks' outputs (`sequential = true`).
    #[serde(default)]
    pub sequential: bool,
    /// Under sequential calibration, seconds spent carrying the calibration hidden states
    /// through the pruned blocks (the stages' own time is in their reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequential_carry_seconds: Option<f64>,
}

/// The sandbox limits every plugin call ran under.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRecord {
    /// Wall-clock budget of one call, seconds.
    pub timeout_s: f64,
    /// Guest linear-memory cap, MiB.
    pub memory_mb: u64,
    /// Host tensors a plugin may allocate, MiB.
    pub host_memory_mb: u64,
}

/// The report format; bumped when a field changes meaning.
pub const REPORT_VERSION: u32 = 2;

/// Everything `report.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// [`REPORT_VERSION`] of the writer (reports from before versioning read as 1).
    #[serde(default = "first_version")]
    pub report_version: u32,
    /// Version of the espalier binary.
    pub espalier_version: String,
    /// Build of the binary: git commit when built from a checkout, and profile.
    #[serde(default)]
    pub build: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Pipeline file.
    pub pipeline_file: String,
    /// The pipeline exactly as it ran, as TOML: overrides applied, every parameter written
    /// out, plugins and texts pinned by sha256. `espalier run --from report.json` runs it.
    #[serde(default)]
    pub resolved_pipeline: String,
    /// Model reference.
    pub model: String,
    /// `model_type` of the config.
    pub architecture: String,
    /// Calibration text and settings, when a stage used calibration.
    #[serde(default)]
    pub calibration: Option<CalibrationRecord>,
    /// Sandbox limits.
    #[serde(default)]
    pub sandbox: Option<SandboxRecord>,
    /// Where the pruned model was written (`None`: not exported).
    #[serde(default)]
    pub export_dir: Option<String>,
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
    /// The masked fine-tune, when the pipeline has a `[finetune]` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<crate::finetune::FinetuneReport>,
}

fn first_version() -> u32 {
    1
}

impl RunReport {
    /// Kept fraction per role over the layers of that role (`attn-q` → 0.5, ...), for
    /// comparisons.
    pub fn density_by_role(&self) -> BTreeMap<String, f64> {
        let mut sums: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for l in &self.layers {
            let e = sums.entry(l.role.as_str().to_string()).or_insert((0, 0));
            e.0 += l.kept;
            e.1 += l.original_numel;
        }
        sums.into_iter()
            .map(|(role, (kept, total))| {
                (
                    role,
                    if total == 0 {
                        1.0
                    } else {
                        kept as f64 / total as f64
                    },
                )
            })
            .collect()
    }
}
