//! Errors of the engine crate: every variant names the file or tensor it is about.

/// An error loading, checking or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing a field, has a wrong type, or describes an unsupported model.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A weights file is corrupt or does not match the config.
    #[error("{path}: {message}")]
    Weights {
        /// The weights file (or model directory).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor operation failed.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A GGUF file cannot be imported: unreadable, missing a metadata key, or an unsupported
    /// architecture, tensor type or tokenizer.
    #[error("{path}: {message}")]
    Gguf {
        /// The GGUF file (or output directory).
        path: String,
        /// What is wrong, naming the metadata key or tensor.
        message: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Input to the forward pass or an evaluation is unusable (empty, out of vocabulary, too
    /// long for the position encoding, shorter than one evaluation window).
    #[error("{0}")]
    Input(String),
    /// The caller asked the work to stop (a cancelled run).
    #[error("cancelled")]
    Cancelled,
    /// `tokenizer.json` is missing, malformed, or does not fit the model.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The tokenizer file (or model directory).
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl EngineError {
    /// A sparse kernel's error (packing, a damaged packed array, a product that failed), as the
    /// engine reports it.
    pub fn kernel(e: impl std::fmt::Display) -> Self {
        EngineError::from(candle_core::Error::Msg(e.to_string()))
    }
}
