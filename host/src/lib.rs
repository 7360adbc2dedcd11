//! Espalier host library: sandboxed pruning-criterion plugins, pipelines that compose them, and
//! the export of pruned models. The `espalier` binary is a thin CLI over this crate.

pub mod app;
pub mod atomic;
pub mod bench;
pub mod calibration;
pub mod cancel;
pub mod display_safe;
pub mod dynamic;
pub mod evaluate;
pub mod events;
pub mod export;
pub mod fetch;
pub mod finetune;
pub mod generate;
pub mod heads;
pub mod lottery;
pub mod mask;
pub mod obs;
pub mod ops;
pub mod optim;
pub mod pipeline;
pub mod plan;
pub mod plugin;
pub mod report;
pub mod resolved;
pub mod run;
pub mod schedule;
pub mod sequential;
pub mod sparse;
pub mod strategy;
pub mod tensor_util;

static BUILD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records the front end's build (git commit and profile) for reports; the first call wins.
pub fn set_build(build: &str) {
    let _ = BUILD.set(build.to_string());
}

/// The build [`set_build`] recorded (empty when none was).
pub fn build() -> &'static str {
    BUILD.get().map_or("", String::as_str)
}
