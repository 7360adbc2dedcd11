//! `espalier bench plugins`: what the sandbox costs. On a model of SmolLM2-135M's shapes it
//! runs the built-in criteria exactly as a pipeline would and splits each stage's time into
//! guest + boundary (instantiation, wasm execution, crossing into host imports and back),
//! host kernels, and validation/application of the masks.

use espalier_engine::Model;
use serde::Serialize;

use crate::app::{App, AppError};
use crate::pipeline::Pipeline;
use crate::plan::plan;
use crate::run::{Quiet, execute};

/// One benchmark case.
pub struct Case {
    /// Label shown in the table.
    pub label: &'static str,
    /// The `[[stage]]` body.
    pub stage: &'static str,
}

/// The cases the issue asks for: magnitude 50%, block 16x16 80%, 2:4.
pub const CASES: &[Case] = &[
    Case {
        label: "magnitude 50%",
        stage: "plugin = \"magnitude\"\ndensity = 0.5\n",
    },
    Case {
        label: "block 16x16 80%",
        stage: "plugin = \"block\"\ndensity = 0.2\nblock = [16, 16]\n",
    },
    Case {
        label: "2:4",
        stage: "plugin = \"n-m\"\nn = 2\nm = 4\n",
    },
];

/// Median figures of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case label.
    pub label: String,
    /// Target layers.
    pub targets: usize,
    /// Weights in the targets.
    pub target_weights: usize,
    /// Whole stage, seconds.
    pub stage_seconds: f64,
    /// Guest + boundary + instantiation, seconds.
    pub guest_seconds: f64,
    /// Host kernels called by the plugin, seconds.
    pub host_kernel_seconds: f64,
    /// Validation and application, seconds.
    pub apply_seconds: f64,
    /// guest_seconds / stage_seconds.
    pub guest_share: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs every case `repeat` times on `model` and returns the medians.
pub fn bench_plugins(
    app: &App,
    model_ref: &str,
    model: &Model,
    repeat: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<CaseResult>, AppError> {
    let mut results = Vec::new();
    for case in CASES {
        let text = format!("model = {model_ref:?}\n[[stage]]\n{}", case.stage);
        let pipeline = Pipeline::parse("<bench>", &text)?;
        let planned = plan(pipeline, &app.registry, &app.runtime, model)?;
        let targets = planned.stages[0].targets.len();
        let target_weights = planned.stages[0].targets.iter().map(|l| l.numel()).sum();
        let (mut total, mut guest, mut host, mut apply) = (vec![], vec![], vec![], vec![]);
        for i in 0..repeat.max(1) {
            progress(&format!("{} ({}/{})", case.label, i + 1, repeat.max(1)));
            let outcome = execute(&planned, &app.runtime, model.clone(), &mut Quiet)?;
            let s = &outcome.report.stages[0];
            total.push(s.seconds);
            guest.push(s.guest_and_boundary_seconds + s.instantiate_seconds);
            host.push(s.host_kernel_seconds);
            apply.push(s.validate_apply_seconds);
        }
        let stage_seconds = median(total);
        let guest_seconds = median(guest);
        results.push(CaseResult {
            label: case.label.to_string(),
            targets,
            target_weights,
            stage_seconds,
            guest_seconds,
            host_kernel_seconds: median(host),
            apply_seconds: median(apply),
            guest_share: if stage_seconds > 0.0 {
                guest_seconds / stage_seconds
            } else {
                0.0
            },
        });
    }
    Ok(results)
}
