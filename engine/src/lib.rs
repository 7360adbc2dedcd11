//! The model side of Espalier: loading Hugging Face–style checkpoints, describing their layers,
//! generating built-in models, and saving pruned models back.

pub mod builtin;
pub mod config;
pub mod error;
pub mod eval;
pub mod files;
pub mod forward;
pub mod gguf;
#[cfg(target_os = "linux")]
pub mod hugepages;
pub mod layers;
pub mod linear;
pub mod model;
pub mod packed;
pub mod tokenizer;
pub mod wide;

pub use builtin::{BUILTIN_MODELS, builtin_model};
pub use config::{Architecture, ModelConfig};
pub use error::EngineError;
pub use forward::{
    Distillation, GradientStats, KvCache, KvDtype, LinearObserver, LossGradients, Precision,
    Session, TokenLogprob, TrainingPass,
};
pub use layers::{LayerInfo, Role};
pub use linear::{Linear, LinearKernel, LinearWeight};
pub use model::{LoadPacking, Model, TensorFile};
pub use packed::PackedKernel;
pub use tokenizer::Tokenizer;

/// Loads a model by reference: `builtin:NAME` or a directory path.
pub fn load_model(reference: &str) -> Result<Model, EngineError> {
    match reference.strip_prefix("builtin:") {
        Some(name) => builtin_model(name),
        None => Model::load(std::path::Path::new(reference)),
    }
}
