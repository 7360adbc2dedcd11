//! Evaluation of a model as the `[evaluate]` pipeline section and `espalier eval` ask for:
//! perplexity over a text (Hugging Face's fixed-length method, see `espalier_engine::eval`),
//! batch-1 generation latency, tokens/s and peak resident memory. A pipeline run evaluates
//! the dense model before the first stage and the pruned model after the last, in one process,
//! so the two are directly comparable.

use std::path::{Path, PathBuf};

use espalier_engine::eval::{
    LatencyReport, PerplexityOptions, PerplexityProgress, PerplexityReport, latency,
    perplexity_until,
};
use espalier_engine::{EngineError, Model, Session, Tokenizer, files};
use serde::Serialize;

use crate::cancel::CancelToken;

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSpec {
    /// Text for perplexity (and the latency prompt); `None` = latency on a fixed prompt only.
    pub text: Option<PathBuf>,
    /// Window and stride.
    pub options: PerplexityOptions,
    /// Score at most this many tokens of the text (from its start).
    pub max_tokens: Option<usize>,
    /// Latency: prompt tokens and new tokens; `None` = skip.
    pub latency: Option<(usize, usize)>,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            text: None,
            options: PerplexityOptions::default(),
            max_tokens: None,
            latency: Some((32, 64)),
        }
    }
}

/// Results for one model.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Perplexity, if a text was given.
    pub perplexity: Option<PerplexityReport>,
    /// Latency, if asked.
    pub latency: Option<LatencyReport>,
    /// Linear-layer implementations used (e.g. `{"dense": 196, "bsr16x16": 14}`).
    pub kernels: std::collections::BTreeMap<String, usize>,
}

/// Dense and pruned side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Before the first stage.
    pub dense: Evaluation,
    /// After the last stage.
    pub pruned: Evaluation,
}

/// A fixed prompt for latency when no text is given (public-domain, from the Declaration of
/// Independence).
const DEFAULT_PROMPT: &str = "When in the Course of human events, it becomes necessary for one people to dissolve the political bands which have connected them with another, and to assume among the powers of the earth";

fn read_text(path: &Path) -> Result<String, EngineError> {
    files::read_to_string(path, files::TEXT_LIMIT)
        .map_err(|e| EngineError::Input(format!("cannot read {}: {e}", path.display())))
}

/// Evaluates `session` (built from `model`) as `spec` asks; `cancel` is checked before every
/// perplexity window and before the latency measurement.
pub fn evaluate(
    model: &Model,
    session: &Session,
    spec: &EvalSpec,
    progress: &mut dyn FnMut(&PerplexityProgress),
    cancel: &CancelToken,
) -> Result<Evaluation, EngineError> {
    let tokenizer = Tokenizer::for_model(model)?;
    let text = match &spec.text {
        Some(p) => Some(read_text(p)?),
        None => None,
    };
    let tokens = match &text {
        Some(t) => {
            let mut ids = tokenizer.encode(t)?;
            if let Some(max) = spec.max_tokens {
                ids.truncate(max);
            }
            Some(ids)
        }
        None => None,
    };
    let mut options = spec.options;
    // A window longer than the model's positions cannot run; say so rather than clamp silently.
    if options.window > session.max_positions() {
        return Err(EngineError::Input(format!(
            "perplexity window {} exceeds the model's {} positions; set `window` (and `stride`) lower",
            options.window,
            session.max_positions()
        )));
    }
    options.stride = options.stride.min(options.window);
    let ppl = match &tokens {
        Some(ids) => Some(perplexity_until(session, ids, &options, progress, &|| {
            cancel.is_cancelled()
        })?),
        None => None,
    };
    if cancel.is_cancelled() {
        return Err(EngineError::Cancelled);
    }
    let lat = match spec.latency {
        Some((prompt_tokens, new_tokens)) => {
            let mut prompt = match &tokens {
                Some(ids) => ids.clone(),
                None => tokenizer.encode(DEFAULT_PROMPT)?,
            };
            prompt.truncate(prompt_tokens.max(1));
            Some(latency(session, &prompt, new_tokens)?)
        }
        None => None,
    };
    let mut kernels = std::collections::BTreeMap::new();
    for l in session.linears() {
        *kernels.entry(l.kind().to_string()).or_insert(0) += 1;
    }
    Ok(Evaluation {
        perplexity: ppl,
        latency: lat,
        kernels,
    })
}
