//! Text to token ids through a model directory's `tokenizer.json`, with the Hugging Face
//! `tokenizers` crate (the library behind transformers' fast tokenizers, so ids match what
//! `AutoTokenizer` produces for the same file).
//!
//! Special tokens are added exactly as the file's post-processor says (GPT-2 and SmolLM2 add
//! none), which is what `tokenizer(text)` does in transformers.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::EngineError;

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let source = path.display().to_string();
        if !path.is_file() {
            return Err(EngineError::Tokenizer {
                path: source,
                message: "missing file: the model directory needs a tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| EngineError::Tokenizer {
            path: source.clone(),
            message: format!("not a valid tokenizer.json: {e}"),
        })?;
        Ok(Tokenizer { inner, source })
    }

    /// Reads `DIR/tokenizer.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, EngineError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Parses tokenizer JSON held in memory; `source` names it in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self, EngineError> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| EngineError::Tokenizer {
                path: source.to_string(),
                message: format!("not a valid tokenizer.json: {e}"),
            })?;
        Ok(Tokenizer {
            inner,
            source: source.to_string(),
        })
    }

    /// Token ids of `text`, with the special tokens the post-processor adds (if any).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`; `add_special_tokens = false` skips the post-processor's tokens.
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let enc =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| EngineError::Tokenizer {
                    path: self.source.clone(),
                    message: format!("cannot encode text: {e}"),
                })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot decode ids: {e}"),
            })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string (e.g. `<|endoftext|>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Fails clearly when this tokenizer can produce ids the model has no embedding for.
    /// (Models often pad their embedding beyond the tokenizer, so a smaller tokenizer is fine.)
    pub fn check_fits(&self, config: &ModelConfig) -> Result<(), EngineError> {
        // The largest id, not the count: added tokens may leave gaps.
        let max_id = self
            .inner
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        if max_id as usize >= config.vocab_size {
            return Err(EngineError::Tokenizer {
                path: self.source.clone(),
                message: format!(
                    "tokenizer has ids up to {max_id} but the model's vocabulary has {} entries: \
                     this tokenizer does not belong to the model",
                    config.vocab_size
                ),
            });
        }
        Ok(())
    }

    /// The `tokenizers` object, for what this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
