//! Espalier host library: sandboxed pruning-criterion plugins, pipelines that compose them, and
//! the export of pruned models. The `espalier` binary is a thin CLI over this crate.

pub mod app;
pub mod bench;
pub mod calibration;
pub mod cancel;
pub mod display_safe;
pub mod evaluate;
pub mod events;
pub mod export;
pub mod fetch;
pub mod heads;
pub mod mask;
pub mod ops;
pub mod pipeline;
pub mod plan;
pub mod plugin;
pub mod report;
pub mod run;
pub mod sparse;
pub mod tensor_util;
