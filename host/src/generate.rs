//! Text generation from any model Espalier loads (dense, or a pruned export running on its
//! sparse kernels): the chat template of the model's `tokenizer_config.json` rendered as
//! transformers renders it (Jinja via minijinja, `trim_blocks` and `lstrip_blocks`, Python
//! string methods), greedy decoding (the argmax of the logits, as the evaluation's
//! `Session::next_token`), or seeded sampling (temperature, top-k, top-p), text streamed as whole
//! UTF-8 characters, and stops on EOS, stop strings, the token limit or the context's end.

use std::path::Path;
use std::time::Instant;

use espalier_engine::forward::logprobs;
use espalier_engine::{Session, TokenLogprob, Tokenizer};
use rand::SeedableRng;
use rand::distr::{Distribution, weighted::WeightedIndex};
use rand::rngs::StdRng;
use serde::Serialize;

/// Why generation could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A setting is out of range.
    #[error("{0}")]
    Settings(String),
    /// The chat template is missing or does not render.
    #[error("{0}")]
    Template(String),
    /// The model or tokenizer failed.
    #[error(transparent)]
    Engine(#[from] espalier_engine::EngineError),
    /// Stopped from outside.
    #[error("generation was cancelled")]
    Cancelled,
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (None: all).
    pub top_p: Option<f32>,
    /// Seed of the sampler (the same seed and settings give the same text).
    pub seed: u64,
    /// Every token already in the prompt or the reply has a positive logit divided by this and
    /// a negative one multiplied by it before the choice (transformers' and llama.cpp's
    /// repetition penalty; 1 = off, above 1 discourages repeats).
    pub repetition_penalty: f32,
    /// Subtracted from a token's logit once per time the reply already holds it (OpenAI's
    /// `frequency_penalty`, -2 to 2; 0 = off).
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every token the reply already holds (OpenAI's
    /// `presence_penalty`, -2 to 2; 0 = off).
    pub presence_penalty: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
        }
    }
}

impl Sampling {
    /// Checks the ranges (a clear message instead of NaN probabilities).
    pub fn check(&self) -> Result<(), GenerateError> {
        match self.invalid_setting() {
            Some((_, message)) => Err(GenerateError::Settings(message)),
            None => Ok(()),
        }
    }

    /// The first setting out of its range: its name and what is wrong with it.
    pub fn invalid_setting(&self) -> Option<(&'static str, String)> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Some((
                "temperature",
                format!(
                    "temperature {} must be a finite number >= 0 (0 = greedy)",
                    self.temperature
                ),
            ));
        }
        if self.top_k == Some(0) {
            return Some((
                "top_k",
                "top_k must be at least 1 (leave it out to keep every token)".into(),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Some(("top_p", format!("top_p {p} must be in (0, 1]")));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Some((
                "repetition_penalty",
                format!(
                    "the repetition penalty {} must be a finite number > 0 (1 = off)",
                    self.repetition_penalty
                ),
            ));
        }
        for (name, words, v) in [
            ("frequency_penalty", "frequency", self.frequency_penalty),
            ("presence_penalty", "presence", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Some((
                    name,
                    format!("the {words} penalty {v} must be in [-2, 2] (0 = off)"),
                ));
            }
        }
        None
    }

    /// Whether any penalty changes the logits.
    fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
    }
}

/// The tokens a sequence's penalties look at, kept as it goes (only when a penalty is set).
#[derive(Debug, Default)]
struct Seen {
    /// The prompt's distinct tokens, sorted (the repetition penalty counts them too).
    prompt: Vec<u32>,
    /// How often each token occurs in the reply so far.
    reply: std::collections::BTreeMap<u32, u32>,
}

impl Seen {
    fn new(prompt: &[u32]) -> Seen {
        let mut distinct = prompt.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        Seen {
            prompt: distinct,
            reply: Default::default(),
        }
    }

    fn push(&mut self, token: u32) {
        *self.reply.entry(token).or_insert(0) += 1;
    }

    /// `logits` with `sampling`'s penalties applied: the repetition penalty on every token of
    /// the prompt or the reply, the frequency and presence penalties on the reply's.
    fn penalized(&self, logits: &[f32], sampling: &Sampling) -> Vec<f32> {
        let mut out = logits.to_vec();
        if sampling.repetition_penalty != 1.0 {
            let r = sampling.repetition_penalty;
            let in_reply_only = self
                .reply
                .keys()
                .filter(|t| self.prompt.binary_search(t).is_err());
            for &t in self.prompt.iter().chain(in_reply_only) {
                if let Some(v) = out.get_mut(t as usize) {
                    *v = if *v > 0.0 { *v / r } else { *v * r };
                }
            }
        }
        for (&t, &n) in &self.reply {
            if let Some(v) = out.get_mut(t as usize) {
                *v -= n as f32 * sampling.frequency_penalty + sampling.presence_penalty;
            }
        }
        out
    }
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct GenerateSpec {
    /// At most this many new tokens.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Generation ends when the text contains any of these (the stop string is not returned).
    pub stop: Vec<String>,
    /// Token ids that end generation (EOS); not part of the text. [`Generator::generate`]
    /// fills this and `context` from the model.
    pub eos: Vec<u32>,
    /// The model's context in tokens (`max_position_embeddings`: rotary models compute any
    /// position but were trained up to this one); 0 = only the forward pass's own limit.
    pub context: usize,
    /// Record each chosen token's log-probability (and an EOS token's that ended the reply)
    /// with this many most likely alternatives: the OpenAI API's `logprobs`. They come from
    /// the model's logits as computed, before temperature and penalties (as vLLM's default).
    pub logprobs: Option<usize>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The model's positions are used up.
    ContextFull,
    /// The request's deadline passed (the daemon's `generation_deadline_s`).
    Deadline,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Generated tokens (without an EOS token that ended it).
    pub tokens: Vec<u32>,
    /// Their text, cut before a stop string.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Time to the first token (the prefill), milliseconds.
    pub first_token_ms: f64,
    /// Mean time per later token, milliseconds (0 with one token or fewer).
    pub ms_per_token: f64,
    /// The chosen tokens' log-probabilities not handed out during generation
    /// ([`Sequence::take_logprobs`]; all of them from [`generate`]), with
    /// `GenerateSpec::logprobs` (an ending EOS included).
    #[serde(skip)]
    pub logprobs: Vec<TokenLogprob>,
}

/// Generates after `prompt`, calling `on_text` with each new piece of text as soon as it is
/// whole characters (and not possibly the start of a stop string). `on_text` returns false to
/// stop (a client that went away).
pub fn generate(
    session: &Session,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    spec: &GenerateSpec,
    on_text: &mut dyn FnMut(&str) -> bool,
    cancel: &crate::cancel::CancelToken,
) -> Result<Generation, GenerateError> {
    let mut seq = Sequence::new(session, prompt, spec)?;
    while seq.wants_token() {
        if cancel.is_cancelled() {
            return Err(GenerateError::Cancelled);
        }
        let input = match seq.last_token() {
            None => prompt.to_vec(),
            Some(t) => vec![t],
        };
        let logits = session.forward_last(&input, Some(&mut seq.cache))?;
        let logits: Vec<f32> = logits
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.to_vec1())
            .map_err(espalier_engine::EngineError::from)?;
        let piece = seq.accept(&logits, tokenizer)?;
        if !piece.is_empty() && !on_text(&piece) {
            return Err(GenerateError::Cancelled);
        }
    }
    Ok(seq.into_generation())
}

/// One sequence being generated, one token at a time: its KV cache, sampler, text and stop
/// rules. [`generate`] drives one; the daemon's batch scheduler drives many, feeding each the
/// logits of its row of a batched step ([`Session::forward_ragged`]).
pub struct Sequence {
    spec: GenerateSpec,
    prompt_len: usize,
    positions: usize,
    rng: StdRng,
    /// What the penalties look at; `None` when the sampling sets none.
    seen: Option<Seen>,
    /// Chosen tokens' log-probabilities not handed out yet, when the spec asks for them.
    logprobs: Vec<TokenLogprob>,
    /// The sequence's keys and values, reserved for the whole prompt and reply up front.
    pub cache: espalier_engine::KvCache,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
    started: Instant,
    first_token_ms: f64,
    decode_started: Instant,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// Checks the settings and the prompt's room in the context, and reserves the KV cache
    /// for `prompt + max_tokens` tokens (at most the context).
    pub fn new(
        session: &Session,
        prompt: &[u32],
        spec: &GenerateSpec,
    ) -> Result<Self, GenerateError> {
        spec.sampling.check()?;
        if prompt.is_empty() {
            return Err(GenerateError::Settings("the prompt has no tokens".into()));
        }
        let positions = match spec.context {
            0 => session.max_positions(),
            c => c.min(session.max_positions()),
        };
        if prompt.len() >= positions {
            return Err(GenerateError::Settings(format!(
                "the prompt has {} tokens; the model has {positions} positions, so nothing fits after it",
                prompt.len()
            )));
        }
        let now = Instant::now();
        Ok(Sequence {
            cache: espalier_engine::KvCache::with_capacity(Self::reserved_tokens(
                prompt.len(),
                spec.max_tokens,
                positions,
            )),
            spec: spec.clone(),
            prompt_len: prompt.len(),
            positions,
            rng: StdRng::seed_from_u64(spec.sampling.seed),
            seen: spec.sampling.penalizes().then(|| Seen::new(prompt)),
            logprobs: Vec::new(),
            tokens: Vec::new(),
            text: String::new(),
            sent: 0,
            started: now,
            first_token_ms: 0.0,
            decode_started: now,
            finish: None,
        })
    }

    /// Tokens of KV cache a sequence reserves: its prompt and at most `max_tokens` more, within
    /// the model's `positions` (the last token chosen is never fed back, hence the `- 1`).
    pub fn reserved_tokens(prompt: usize, max_tokens: usize, positions: usize) -> usize {
        prompt
            .saturating_add(max_tokens)
            .saturating_sub(1)
            .min(positions)
            .max(prompt)
    }

    /// The last generated token (the next decode step's input); none before the prefill.
    pub fn last_token(&self) -> Option<u32> {
        self.tokens.last().copied()
    }

    /// Tokens of the prompt.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    /// Whether another token is to be generated; false once finished (EOS, a stop string, the
    /// token limit or the context's end, which this records).
    pub fn wants_token(&mut self) -> bool {
        if self.finish.is_some() {
            return false;
        }
        if self.tokens.len() >= self.spec.max_tokens {
            self.finish = Some(FinishReason::Length);
        } else if self.prompt_len + self.tokens.len() >= self.positions {
            self.finish = Some(FinishReason::ContextFull);
        }
        self.finish.is_none()
    }

    /// Ends the sequence from outside (e.g. its deadline passed) with `reason`, returning the
    /// text not handed out yet.
    pub fn stop(&mut self, reason: FinishReason) -> String {
        self.finish.get_or_insert(reason);
        self.rest()
    }

    /// The text so far (cut before a stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Why it finished, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Chooses the next token from the logits after the last input (`[vocab]`) and returns
    /// the text that became settled: whole characters that cannot be the start of a stop
    /// string, and everything left once the sequence finishes.
    pub fn accept(
        &mut self,
        logits: &[f32],
        tokenizer: &Tokenizer,
    ) -> Result<String, GenerateError> {
        let sampling = &self.spec.sampling;
        let next = match &self.seen {
            Some(seen) => choose(&seen.penalized(logits, sampling), sampling, &mut self.rng),
            None => choose(logits, sampling, &mut self.rng),
        };
        if self.tokens.is_empty() {
            self.first_token_ms = self.started.elapsed().as_secs_f64() * 1e3;
            self.decode_started = Instant::now();
        }
        if let Some(top) = self.spec.logprobs {
            self.logprobs
                .push(logprobs::token_logprob(logits, next, top));
        }
        if self.spec.eos.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(self.rest());
        }
        self.tokens.push(next);
        if let Some(seen) = &mut self.seen {
            seen.push(next);
        }
        self.text = tokenizer.decode(&self.tokens, true)?;
        let sent = self.sent;
        if let Some(cut) = self
            .spec
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[sent.min(self.text.len())..]
                    .find(s.as_str())
                    .map(|i| i + sent)
            })
            .min()
        {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::Stop);
            return Ok(self.rest());
        }
        if !self.wants_token() {
            return Ok(self.rest());
        }
        // Hand over what is settled: whole characters (a token may end inside one, shown as
        // U+FFFD until the next completes it) that cannot be the start of a stop string.
        let settled = settled_len(&self.text, &self.spec.stop);
        if settled > self.sent {
            let piece = self.text[self.sent..settled].to_string();
            self.sent = settled;
            return Ok(piece);
        }
        Ok(String::new())
    }

    /// The chosen tokens' log-probabilities not handed out yet (with `spec.logprobs`; an EOS
    /// token that ended the reply included, though it is not in the text): a stream sends them
    /// with the text they belong to.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprobs)
    }

    /// Text not handed out yet, marked as handed out.
    fn rest(&mut self) -> String {
        let piece = self.text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = self.text.len();
        piece
    }

    /// The result (call once [`Sequence::wants_token`] is false).
    pub fn into_generation(self) -> Generation {
        let later = self.tokens.len().saturating_sub(1);
        Generation {
            prompt_tokens: self.prompt_len,
            ms_per_token: if later > 0 {
                self.decode_started.elapsed().as_secs_f64() * 1e3 / later as f64
            } else {
                0.0
            },
            finish: self.finish.unwrap_or(FinishReason::Length),
            tokens: self.tokens,
            text: self.text,
            first_token_ms: self.first_token_ms,
            logprobs: self.logprobs,
        }
    }
}

/// Bytes of `text` that can be shown now: up to a trailing replacement character (an
/// unfinished UTF-8 sequence) and before any suffix that could begin a stop string.
fn settled_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for s in stop.iter().filter(|s| !s.is_empty()) {
        // The longest suffix of text[..end] that is a proper prefix of `s`.
        for (i, _) in s.char_indices().skip(1) {
            if text[..end].ends_with(&s[..i]) {
                end = end.min(text[..end].len() - i);
                break;
            }
        }
    }
    end
}

/// The next token from `logits`: the first largest (as the engine's greedy `next_token`) at
/// temperature 0, else sampled.
fn choose(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    if sampling.temperature == 0.0 {
        let mut best = (0usize, f32::NEG_INFINITY);
        for (i, &v) in logits.iter().enumerate() {
            if v > best.1 {
                best = (i, v);
            }
        }
        return best.0 as u32;
    }
    sample(logits, sampling, rng)
}

/// Samples from softmax(logits / temperature) restricted by top-k and top-p.
fn sample(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if order.is_empty() {
        return 0;
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = sampling.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]];
    let t = sampling.temperature.max(1e-6);
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| (((logits[i] - max) / t) as f64).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = sampling.top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    match WeightedIndex::new(&probs) {
        Ok(dist) => order[dist.sample(rng)] as u32,
        Err(_) => order[0] as u32,
    }
}

/// A model ready to generate: its forward pass (a pruned export's masked linears on Espalier's
/// sparse kernels, as in its evaluation; KV caches in the type its weights suggest, which a
/// caller may change through `session`), tokenizer, chat template, end tokens and context.
/// The CLI's `generate` and the daemon's `/openai/v1` both load models through this.
pub struct Generator {
    /// The forward pass.
    pub session: Session,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, when `tokenizer_config.json` has one.
    pub template: Option<ChatTemplate>,
    /// Tokens that end a reply: the config's EOS and the template's end-of-turn token.
    pub eos: Vec<u32>,
    /// Tokens of context (prompt + reply): the trained positions.
    pub context: usize,
    /// The linears' kernels, e.g. `3 compact/f32, 208 dense`.
    pub kernels: String,
}

impl Generator {
    /// Loads `reference` (a model directory, an export of `espalier run`, or `builtin:NAME`)
    /// in the storage [`Generator::load_in`] picks by default.
    pub fn load(reference: &str) -> Result<Self, GenerateError> {
        Self::load_in(reference, None)
    }

    /// Loads `reference` with its linears in `storage`. By default (`None`) a pruned export
    /// runs in the storage its run evaluated it in (its `report.json`), so it generates as that
    /// evaluation measured it, and anything else in f32. A packed checkpoint runs as packed.
    pub fn load_in(
        reference: &str,
        storage: Option<crate::sparse::Storage>,
    ) -> Result<Self, GenerateError> {
        // A pruned export is packed layer by layer as it loads, so loading it never holds the
        // dense model and the packed one at once.
        let (model, storage) = crate::sparse::load_to_run(reference, storage, true)?;
        let mut session = Session::new(&model)?;
        let dir = model.source_dir.clone();
        let mut kernels = String::from("dense");
        // A dense model in rounded storage has every linear packed dense in it.
        if model.is_packed() || storage != crate::sparse::Storage::F32 {
            let attached = crate::sparse::attach(
                &mut session,
                &model,
                &std::collections::BTreeMap::new(),
                storage,
            )?;
            kernels = attached
                .kernels
                .layers
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ");
        }
        // Bf16 and int8 models keep their keys and values in f16 (half the cache's memory and
        // the bytes each decode step reads), f32 models in f32 (exact); see `auto_kv_dtype`.
        session.set_kv_dtype(session.auto_kv_dtype());
        let tokenizer = Tokenizer::for_model(&model)?;
        let template = match &dir {
            Some(d) => ChatTemplate::from_model_dir(d)?,
            None => None,
        };
        let mut eos: Vec<u32> = model.config.eos_token_id.into_iter().collect();
        if let Some(id) = template
            .as_ref()
            .and_then(|t| t.eos_token())
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos.push(id);
        }
        Ok(Generator {
            context: session
                .max_positions()
                .min(model.config.max_position_embeddings.max(1)),
            session,
            tokenizer,
            template,
            eos,
            kernels,
        })
    }

    /// What it runs on, e.g. `linears: 210 bitmap/f32, 1 dense; KV cache f32`: what
    /// `espalier generate` prints and the OpenAI API's `system_fingerprint` carries.
    pub fn runs_on(&self) -> String {
        format!(
            "linears: {}; KV cache {}",
            self.kernels,
            self.session.kv_dtype()
        )
    }

    /// Generates after `prompt` with this model's end tokens and context (see [`generate`]).
    pub fn generate(
        &self,
        prompt: &[u32],
        spec: &GenerateSpec,
        on_text: &mut dyn FnMut(&str) -> bool,
        cancel: &crate::cancel::CancelToken,
    ) -> Result<Generation, GenerateError> {
        let spec = GenerateSpec {
            eos: self.eos.clone(),
            context: self.context,
            ..spec.clone()
        };
        generate(
            &self.session,
            &self.tokenizer,
            prompt,
            &spec,
            on_text,
            cancel,
        )
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's chat template (`chat_template` of `tokenizer_config.json`) with the special
/// tokens it may use.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// From a `tokenizer_config.json` text (`file` names it in errors); `None` when it has no
    /// chat template.
    pub fn from_config_text(text: &str, file: &str) -> Result<Option<Self>, GenerateError> {
        let config: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| GenerateError::Template(format!("{file}: not JSON: {e}")))?;
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            // A list of named templates: the one named `default`.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| {
                    GenerateError::Template(format!(
                        "{file}: chat_template is a list without a template named `default`"
                    ))
                })?
                .to_string(),
            Some(_) => {
                return Err(GenerateError::Template(format!(
                    "{file}: chat_template is neither a string nor a list of named templates"
                )));
            }
        };
        let template = ChatTemplate {
            source,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        };
        // Compile now, so a broken template is reported where it was read.
        template.environment()?;
        Ok(Some(template))
    }

    /// From `DIR/tokenizer_config.json`; `None` when the file or its template is absent.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, GenerateError> {
        let path = dir.join("tokenizer_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(GenerateError::Template(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        Self::from_config_text(&text, &path.display().to_string())
    }

    /// The end-of-turn token the template writes (`eos_token`), if any.
    pub fn eos_token(&self) -> Option<&str> {
        Some(self.eos_token.as_str()).filter(|t| !t.is_empty())
    }

    fn environment(&self) -> Result<minijinja::Environment<'static>, GenerateError> {
        let mut env = minijinja::Environment::new();
        // As transformers' own environment: block tags do not leave their newline or indent.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // `message.content.strip()` and other Python string methods templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", self.source.clone())
            .map_err(|e| {
                GenerateError::Template(format!("the chat template does not parse: {e}"))
            })?;
        Ok(env)
    }

    /// The prompt text for `messages`, ending with the assistant's turn when
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, GenerateError> {
        let env = self.environment()?;
        let template = env
            .get_template("chat")
            .map_err(|e| GenerateError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| GenerateError::Template(format!("the chat template failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture `scripts/make_chat_fixture.py` wrote with transformers'
    /// `apply_chat_template` from SmolLM2-135M-Instruct's tokenizer config.
    const FIXTURE: &str = include_str!("../../tests/fixtures/chat_template_smollm2.json");

    #[test]
    fn chat_template_renders_as_transformers_does() {
        let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let config = fixture["tokenizer_config"].to_string();
        let template = ChatTemplate::from_config_text(&config, "fixture")
            .unwrap()
            .unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 3);
        for case in cases {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = template.render(&messages, add).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{case:#}");
        }
    }

    #[test]
    fn broken_templates_and_settings_are_refused_clearly() {
        let e = ChatTemplate::from_config_text(r#"{"chat_template": "{% for %}"}"#, "tc.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not parse"), "{e}");
        assert!(
            ChatTemplate::from_config_text("{}", "tc.json")
                .unwrap()
                .is_none()
        );
        let raising = ChatTemplate::from_config_text(
            r#"{"chat_template": "{{ raise_exception('only user and assistant roles') }}"}"#,
            "tc.json",
        )
        .unwrap()
        .unwrap();
        let e = raising.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("only user and assistant roles"), "{e}");
        for bad in [
            Sampling {
                temperature: -1.0,
                ..Sampling::default()
            },
            Sampling {
                top_k: Some(0),
                ..Sampling::default()
            },
            Sampling {
                top_p: Some(1.5),
                ..Sampling::default()
            },
            Sampling {
                repetition_penalty: 0.0,
                ..Sampling::default()
            },
            Sampling {
                frequency_penalty: 2.5,
                ..Sampling::default()
            },
            Sampling {
                presence_penalty: f32::NAN,
                ..Sampling::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        let (name, _) = Sampling {
            presence_penalty: -3.0,
            ..Sampling::default()
        }
        .invalid_setting()
        .unwrap();
        assert_eq!(name, "presence_penalty");
    }

    /// The penalties as transformers (repetition: prompt and reply, divide a positive logit,
    /// multiply a negative one) and OpenAI (frequency and presence: the reply's counts) define
    /// them; greedy then picks another token than the repeated one.
    #[test]
    fn penalties_lower_the_logits_of_tokens_already_seen() {
        let logits = [2.0f32, -1.0, 0.5, 1.9];
        let repetition = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        assert!(repetition.penalizes() && !Sampling::default().penalizes());
        let seen = |prompt: &[u32], reply: &[u32]| {
            let mut seen = Seen::new(prompt);
            reply.iter().for_each(|&t| seen.push(t));
            seen
        };
        // Token 0 twice in the prompt and once in the reply is divided once; token 1 (twice in
        // the reply) is multiplied, being negative; 2 and 3 are unseen.
        assert_eq!(
            seen(&[0, 0], &[1, 1, 0]).penalized(&logits, &repetition),
            [1.0, -2.0, 0.5, 1.9]
        );
        let openai = Sampling {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Sampling::default()
        };
        // The prompt does not count for OpenAI's penalties.
        assert_eq!(
            seen(&[3], &[1, 0, 1]).penalized(&logits, &openai),
            [2.0 - 0.5 - 0.25, -1.0 - 1.0 - 0.25, 0.5, 1.9]
        );
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(choose(&logits, &openai, &mut rng), 0);
        let penalized = seen(&[], &[0]).penalized(&logits, &openai);
        assert_eq!(choose(&penalized, &openai, &mut rng), 3);
    }

    #[test]
    fn greedy_generation_equals_the_evaluation_path_and_sampling_is_seeded() {
        let model = espalier_engine::load_model("builtin:tiny-llama").unwrap();
        let session = Session::new(&model).unwrap();
        let tokenizer = Tokenizer::for_model(&model).unwrap();
        let prompt = tokenizer.encode("The garden wall").unwrap();
        let spec = GenerateSpec {
            max_tokens: 12,
            ..GenerateSpec::default()
        };
        let cancel = crate::cancel::CancelToken::new();
        let mut streamed = String::new();
        let g = generate(
            &session,
            &tokenizer,
            &prompt,
            &spec,
            &mut |t| {
                streamed.push_str(t);
                true
            },
            &cancel,
        )
        .unwrap();
        let reference = espalier_engine::eval::latency(&session, &prompt, 12).unwrap();
        assert_eq!(g.tokens, reference.generated);
        assert_eq!(g.finish, FinishReason::Length);
        assert_eq!(streamed, g.text);
        let sampled = |seed| {
            let spec = GenerateSpec {
                max_tokens: 12,
                sampling: Sampling {
                    temperature: 1.0,
                    top_k: Some(50),
                    top_p: Some(0.9),
                    seed,
                    ..Sampling::default()
                },
                ..GenerateSpec::default()
            };
            generate(&session, &tokenizer, &prompt, &spec, &mut |_| true, &cancel)
                .unwrap()
                .tokens
        };
        assert_eq!(sampled(7), sampled(7));
        assert_ne!(sampled(7), sampled(8));

        // Log-probabilities: one per chosen token, each handed out once; under greedy choice
        // each token is its position's most likely one.
        let spec = GenerateSpec {
            logprobs: Some(2),
            ..spec
        };
        let g = generate(&session, &tokenizer, &prompt, &spec, &mut |_| true, &cancel).unwrap();
        let chosen: Vec<u32> = g.logprobs.iter().map(|t| t.token).collect();
        assert_eq!(chosen, reference.generated);
        for t in &g.logprobs {
            assert_eq!(t.top.len(), 2);
            assert_eq!(t.top[0], (t.token, t.logprob), "{t:?}");
            assert!(t.logprob <= 0.0 && t.top[1].1 <= t.logprob, "{t:?}");
        }
    }

    #[test]
    fn stop_strings_cut_the_text_and_are_not_streamed() {
        assert_eq!(settled_len("abc<|im", &["<|im_end|>".into()]), 3);
        assert_eq!(settled_len("abc\u{FFFD}", &[]), 3);
        assert_eq!(settled_len("abc", &["x".into()]), 3);
        let model = espalier_engine::load_model("builtin:tiny-llama").unwrap();
        let session = Session::new(&model).unwrap();
        let tokenizer = Tokenizer::for_model(&model).unwrap();
        let prompt = tokenizer.encode("Once").unwrap();
        let cancel = crate::cancel::CancelToken::new();
        let free = GenerateSpec {
            max_tokens: 16,
            ..GenerateSpec::default()
        };
        let full = generate(&session, &tokenizer, &prompt, &free, &mut |_| true, &cancel).unwrap();
        // Stop at the text's third character: the text ends before it.
        let Some((at, ch)) = full.text.char_indices().nth(2) else {
            return;
        };
        let stop = GenerateSpec {
            stop: vec![ch.to_string()],
            ..free
        };
        let mut streamed = String::new();
        let cut = generate(
            &session,
            &tokenizer,
            &prompt,
            &stop,
            &mut |t| {
                streamed.push_str(t);
                true
            },
            &cancel,
        )
        .unwrap();
        assert_eq!(cut.finish, FinishReason::Stop);
        assert!(!cut.text.contains(ch) && full.text[..at].starts_with(&cut.text));
        assert_eq!(streamed, cut.text);
    }
}
