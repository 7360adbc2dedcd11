//! An OpenAI-compatible API under `/openai/v1` (point any OpenAI client's base URL there):
//! `GET /models`, `POST /completions`, `POST /chat/completions`, streamed as server-sent
//! `chat.completion.chunk` / `text_completion` events ending with `data: [DONE]`, usage counts,
//! and OpenAI-style error bodies. A request's `model` is a model of the daemon (`models/NAME`,
//! `builtin:NAME`) or a finished run's export (`run-ID`), which runs on Espalier's sparse
//! kernels, in the storage its run evaluated it in; a suffix `@f32`, `@bf16` or `@int8` loads
//! it in that storage instead (a dense model in bf16 or int8 has every linear packed dense in
//! it), as a model of its own. Every response's `system_fingerprint` says what the model runs
//! on (its linears' kernels and the KV cache's type). Models load on first use and stay
//! loaded (at most `MAX_LOADED`). Each loaded model has a continuous-batching scheduler ([`crate::batch`]): up to `config.generation_slots`
//! sequences decode together, one batched step at a time, within `config.kv_cache_mib` of KV
//! cache; at most `generation_slots + generation_queue` requests are admitted daemon-wide and
//! beyond that a request gets 429 at once. A client that disconnects frees its slot at the next
//! step; a generation still running after `generation_deadline_s` ends with the text so far
//! (finish_reason `length`), one still waiting then gets 503 `deadline_exceeded`.
//!
//! `logprobs` (completions: a count; chat: a flag with `top_logprobs`) returns each chosen
//! token's log-probability and alternatives; completions' `echo` returns the prompt first and,
//! with `logprobs`, scores it in its prefill (`max_tokens: 0` scores only), and `prompt` may be
//! token ids or a list of prompts: what lm-evaluation-harness's `local-completions` sends to
//! score multiple-choice tasks ([`crate::logprobs`] shapes the objects).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use espalier::generate::{FinishReason, GenerateError, GenerateSpec, Generator, Message, Sampling};
use espalier::sparse::Storage;
use espalier_engine::TokenLogprob;
use espalier_engine::forward::logprobs::MAX_TOP_LOGPROBS;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::batch::{Finished, JobError, Limits, Scheduler, Update};
use crate::daemon::Daemon;
use crate::logprobs::{self, CompletionLogprobs};

/// Numbers response ids (with the creation time, unique within and across starts).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Models kept loaded at once (the least recently used is dropped beyond this).
const MAX_LOADED: usize = 4;

/// A model loaded for requests, under the name requests give it.
struct Loaded {
    reference: String,
    /// What it runs on, as responses' `system_fingerprint`.
    fingerprint: String,
    generator: Arc<Generator>,
    /// Its batch; dropped with the model, which ends the scheduler thread.
    scheduler: Scheduler,
}

/// Loaded models by request name, least recently loaded first.
type LoadedModels = Arc<Mutex<Vec<(String, Arc<Loaded>)>>>;

/// Shared by the OpenAI handlers.
#[derive(Clone)]
pub struct OpenAiState {
    daemon: Arc<Daemon>,
    loaded: LoadedModels,
    loading: Arc<tokio::sync::Mutex<()>>,
    admitted: Arc<AtomicUsize>,
    capacity: usize,
}

impl OpenAiState {
    /// State for `daemon`, sized from its config.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        let slots = daemon.config.generation_slots.max(1);
        let capacity = slots + daemon.config.generation_queue;
        OpenAiState {
            daemon,
            loaded: Arc::new(Mutex::new(Vec::new())),
            loading: Arc::new(tokio::sync::Mutex::new(())),
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity,
        }
    }
}

/// The routes, to nest under `/openai/v1`.
pub fn router<S: Clone + Send + Sync + 'static>(state: OpenAiState) -> Router<S> {
    Router::new()
        .route("/models", get(list_models))
        .route("/completions", post(completions))
        .route("/chat/completions", post(chat_completions))
        .with_state(state)
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
struct OpenAiError(StatusCode, &'static str, String, Option<&'static str>);

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let kind = match self.0 {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        (
            self.0,
            Json(json!({"error": {"message": self.2, "type": kind, "param": self.3, "code": self.1}})),
        )
            .into_response()
    }
}

fn internal(e: impl std::fmt::Display) -> OpenAiError {
    OpenAiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        e.to_string(),
        None,
    )
}

fn bad(param: &'static str, message: impl Into<String>) -> OpenAiError {
    OpenAiError(
        StatusCode::BAD_REQUEST,
        "invalid_value",
        message.into(),
        Some(param),
    )
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, OpenAiError> {
    body.map(|Json(b)| b).map_err(|r| {
        OpenAiError(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not a valid request: {}", r.body_text()),
            None,
        )
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn list_models(State(state): State<OpenAiState>) -> Json<Value> {
    let daemon = state.daemon.clone();
    let ids = tokio::task::spawn_blocking(move || model_ids(&daemon))
        .await
        .unwrap_or_default();
    let data: Vec<Value> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "espalier"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Every model a request can name: built-ins, model folders, and runs whose export is theirs.
fn model_ids(daemon: &Daemon) -> Vec<String> {
    let mut ids: Vec<String> = espalier_engine::builtin::BUILTIN_MODELS
        .iter()
        .map(|(name, _)| format!("builtin:{name}"))
        .collect();
    let models = daemon.models();
    for m in models["local"].as_array().into_iter().flatten() {
        if let Some(r) = m["reference"].as_str() {
            ids.push(r.to_string());
        }
    }
    let filter = crate::store::RunFilter {
        status: Some(crate::store::RunStatus::Succeeded),
        limit: Some(100),
        ..Default::default()
    };
    for run in daemon.runs(&filter).unwrap_or_default() {
        if matches!(daemon.run_export_dir(run.id), Ok(Some(_))) {
            ids.push(format!("run-{}", run.id));
        }
    }
    ids
}

/// Loads (or finds loaded) the model a request names.
async fn model(state: &OpenAiState, name: &str) -> Result<Arc<Loaded>, OpenAiError> {
    let cached = || {
        state
            .loaded
            .lock()
            .ok()
            .and_then(|l| l.iter().find(|(n, _)| n == name).map(|(_, m)| m.clone()))
    };
    if let Some(m) = cached() {
        return Ok(m);
    }
    // One load at a time: requests that arrive while a model loads wait for it instead of
    // loading it again.
    let _loading = state.loading.lock().await;
    if let Some(m) = cached() {
        return Ok(m);
    }
    let daemon = state.daemon.clone();
    let owned = name.to_string();
    let loaded = tokio::task::spawn_blocking(move || load(&daemon, &owned))
        .await
        .map_err(internal)??;
    let loaded = Arc::new(loaded);
    if let Ok(mut l) = state.loaded.lock() {
        l.retain(|(n, _)| n != name);
        l.push((name.to_string(), loaded.clone()));
        if l.len() > MAX_LOADED {
            l.remove(0);
        }
    }
    Ok(loaded)
}

/// A request's model name without its storage suffix (`@f32`, `@bf16`, `@int8`), and that
/// storage. Any other `@` is part of the name.
fn split_storage(name: &str) -> (&str, Option<Storage>) {
    match name.rsplit_once('@') {
        Some((base, suffix)) if !base.is_empty() => match Storage::from_name(suffix) {
            Some(storage) => (base, Some(storage)),
            None => (name, None),
        },
        _ => (name, None),
    }
}

fn load(daemon: &Arc<Daemon>, requested: &str) -> Result<Loaded, OpenAiError> {
    let not_found =
        |m: String| OpenAiError(StatusCode::NOT_FOUND, "model_not_found", m, Some("model"));
    let (name, storage) = split_storage(requested);
    if name.starts_with("fetch:") {
        return Err(not_found(format!(
            "`{name}` is not downloaded yet: POST /v1/models/fetch first, then use models/NAME"
        )));
    }
    let reference = match name.strip_prefix("run-").map(str::parse::<i64>) {
        Some(Ok(id)) => daemon
            .run_export_dir(id)
            .map_err(|e| not_found(e.to_string()))?
            .ok_or_else(|| {
                not_found(format!(
                    "a later run exported to the same folder as run {id} and replaced its model"
                ))
            })?
            .display()
            .to_string(),
        _ => daemon.layout.model(name).map_err(not_found)?,
    };
    let mut generator = Generator::load_in(&reference, storage).map_err(|e| match e {
        GenerateError::Engine(e) => not_found(format!("model `{name}` cannot be loaded: {e}")),
        e => internal(e),
    })?;
    let c = &daemon.config;
    if let Some(dtype) = c.kv_cache {
        generator.session.set_kv_dtype(dtype);
    }
    let fingerprint = format!(
        "espalier-{}; {}",
        env!("CARGO_PKG_VERSION"),
        generator.runs_on()
    );
    let generator = Arc::new(generator);
    let limits = Limits {
        slots: c.generation_slots.max(1),
        kv_bytes: c.kv_cache_mib.saturating_mul(1 << 20),
        deadline: std::time::Duration::from_secs(c.generation_deadline_s),
    };
    let scheduler =
        Scheduler::start(generator.clone(), limits, daemon.clone()).map_err(internal)?;
    Ok(Loaded {
        reference: requested.to_string(),
        fingerprint,
        generator,
        scheduler,
    })
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `logprobs`: a number of alternatives for `/completions`, a flag for `/chat/completions`
/// (whose `top_logprobs` sets the number).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LogprobsParam {
    Flag(bool),
    Count(i64),
}

/// Options both endpoints take.
#[derive(Debug, Deserialize)]
struct Options {
    model: String,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    /// vLLM's extension: transformers' repetition penalty (1 = off).
    repetition_penalty: Option<f32>,
    logprobs: Option<LogprobsParam>,
    top_logprobs: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    n: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    /// Return the prompt before the completion (with `logprobs`, scored).
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    options: Options,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    options: Options,
}

/// Prompts one `/completions` request may hold (each takes a place in the queue).
const MAX_PROMPTS: usize = 64;

/// A generation's settings from the request, checked. `echo` (completions) allows
/// `max_tokens: 0`: the prompt is only scored.
fn spec(
    o: &Options,
    default_max: usize,
    kind: Kind,
    echo: bool,
) -> Result<GenerateSpec, OpenAiError> {
    if o.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "only n = 1 is supported"));
    }
    let max = match o.max_completion_tokens.or(o.max_tokens) {
        None => default_max,
        Some(0) if echo => 0,
        Some(m) if m < 1 => {
            let echo_note = match kind {
                Kind::Completion => " (0 only with echo: true, which scores the prompt)",
                Kind::Chat => "",
            };
            return Err(bad(
                "max_tokens",
                format!("max_tokens must be at least 1{echo_note}, got {m}"),
            ));
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
    };
    let top_k = match o.top_k {
        None => None,
        Some(k) if k < 1 => return Err(bad("top_k", format!("top_k must be at least 1, got {k}"))),
        Some(k) => Some(usize::try_from(k).unwrap_or(usize::MAX)),
    };
    let sampling = Sampling {
        // OpenAI's default temperature is 1.
        temperature: o.temperature.unwrap_or(1.0),
        top_k,
        top_p: o.top_p,
        seed: o.seed.unwrap_or(0),
        repetition_penalty: o.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
        presence_penalty: o.presence_penalty.unwrap_or(0.0),
    };
    if let Some((param, message)) = sampling.invalid_setting() {
        return Err(bad(param, message));
    }
    let stop = match &o.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    Ok(GenerateSpec {
        max_tokens: max,
        sampling,
        stop,
        logprobs: logprobs_setting(o, kind)?,
        ..GenerateSpec::default()
    })
}

/// How many alternatives per token the request asks for, if it asks for log-probabilities:
/// `/completions` takes `logprobs: N`, `/chat/completions` `logprobs: true` and
/// `top_logprobs: N`, each N in 0..=20.
fn logprobs_setting(o: &Options, kind: Kind) -> Result<Option<usize>, OpenAiError> {
    let count = |n: i64, param: &'static str| match usize::try_from(n) {
        Ok(n) if n <= MAX_TOP_LOGPROBS => Ok(n),
        _ => Err(bad(
            param,
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {n}"),
        )),
    };
    match kind {
        Kind::Completion => {
            if o.top_logprobs.is_some() {
                return Err(bad(
                    "top_logprobs",
                    "top_logprobs is a /chat/completions setting; /completions takes logprobs: N",
                ));
            }
            match o.logprobs {
                None => Ok(None),
                Some(LogprobsParam::Count(n)) => count(n, "logprobs").map(Some),
                Some(LogprobsParam::Flag(_)) => Err(bad(
                    "logprobs",
                    format!(
                        "logprobs of /completions is a number of alternatives per token (0 to {MAX_TOP_LOGPROBS})"
                    ),
                )),
            }
        }
        Kind::Chat => match (&o.logprobs, o.top_logprobs) {
            (None | Some(LogprobsParam::Flag(false)), None) => Ok(None),
            (None | Some(LogprobsParam::Flag(false)), Some(_)) => {
                Err(bad("top_logprobs", "top_logprobs needs logprobs: true"))
            }
            (Some(LogprobsParam::Flag(true)), top) => Ok(Some(
                top.map(|n| count(n, "top_logprobs"))
                    .transpose()?
                    .unwrap_or(0),
            )),
            (Some(LogprobsParam::Count(_)), _) => Err(bad(
                "logprobs",
                "logprobs of /chat/completions is true or false; top_logprobs sets how many alternatives",
            )),
        },
    }
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        // OpenAI has no reason for a deadline: the reply was cut short, as by max_tokens.
        FinishReason::Length | FinishReason::ContextFull | FinishReason::Deadline => "length",
    }
}

/// A place in the queue: admitted while fewer than `capacity` requests are in; released on drop.
struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(state: &OpenAiState) -> Result<Admission, OpenAiError> {
    let admitted = state
        .admitted
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < state.capacity).then_some(n + 1)
        });
    match admitted {
        Ok(_) => Ok(Admission(state.admitted.clone())),
        Err(_) => Err(OpenAiError(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!(
                "{} generations are running or waiting, the most this daemon takes (generation_slots + generation_queue); retry later",
                state.capacity
            ),
            None,
        )),
    }
}

fn job_error(e: JobError) -> OpenAiError {
    let unavailable = |code, m| OpenAiError(StatusCode::SERVICE_UNAVAILABLE, code, m, None);
    match e {
        JobError::Settings(m) => bad("max_tokens", m),
        JobError::Prompt(m) => bad("prompt", m),
        JobError::TooLarge(m) => OpenAiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "kv_cache_budget_exceeded",
            m,
            Some("max_tokens"),
        ),
        JobError::Deadline(m) => unavailable("deadline_exceeded", m),
        JobError::Stopped => unavailable("shutting_down", JobError::Stopped.to_string()),
        JobError::Failed(m) => OpenAiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation_failed",
            m,
            None,
        ),
    }
}

/// One prompt of a request: its tokens, and its text (returned with `echo`).
struct Prompt {
    tokens: Vec<u32>,
    text: String,
}

impl Prompt {
    /// A prompt given as text.
    fn from_text(loaded: &Loaded, text: &str, param: &'static str) -> Result<Self, OpenAiError> {
        let tokens = loaded
            .generator
            .tokenizer
            .encode(text)
            .map_err(|e| bad(param, e.to_string()))?;
        Self::checked(loaded, tokens, text.to_string(), param)
    }

    /// A prompt given as token ids (as lm-evaluation-harness sends them).
    fn from_ids(loaded: &Loaded, ids: &[Value]) -> Result<Self, OpenAiError> {
        let tokens = ids
            .iter()
            .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| bad("prompt", "token ids must be integers from 0 to 2^32 - 1"))?;
        loaded
            .generator
            .session
            .check_tokens(&tokens, 0)
            .map_err(|e| bad("prompt", e.to_string()))?;
        let text = loaded
            .generator
            .tokenizer
            .decode(&tokens, false)
            .map_err(|e| bad("prompt", e.to_string()))?;
        Self::checked(loaded, tokens, text, "prompt")
    }

    /// Checks the prompt is not empty and leaves room in the context.
    fn checked(
        loaded: &Loaded,
        tokens: Vec<u32>,
        text: String,
        param: &'static str,
    ) -> Result<Self, OpenAiError> {
        if tokens.is_empty() {
            return Err(bad(param, "the prompt is empty"));
        }
        let positions = loaded.generator.context;
        if tokens.len() >= positions {
            return Err(OpenAiError(
                StatusCode::BAD_REQUEST,
                "context_length_exceeded",
                format!(
                    "the prompt has {} tokens; model `{}` has a context of {positions} tokens, leaving no room for a reply",
                    tokens.len(),
                    loaded.reference
                ),
                Some(param),
            ));
        }
        Ok(Prompt { tokens, text })
    }
}

/// The prompts of a `/completions` request: a string, a list of strings, a list of token ids,
/// or a list of lists of token ids (one choice each, by `index`).
fn completion_prompts(loaded: &Loaded, prompt: &Value) -> Result<Vec<Prompt>, OpenAiError> {
    let shape_error = || {
        bad(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let items = match prompt {
        Value::String(s) => return Ok(vec![Prompt::from_text(loaded, s, "prompt")?]),
        Value::Array(a) if !a.is_empty() => a,
        _ => return Err(shape_error()),
    };
    if items.iter().all(Value::is_number) {
        return Ok(vec![Prompt::from_ids(loaded, items)?]);
    }
    if items.len() > MAX_PROMPTS {
        return Err(bad(
            "prompt",
            format!(
                "{} prompts in one request; at most {MAX_PROMPTS}",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => Prompt::from_text(loaded, s, "prompt"),
            Value::Array(ids) => Prompt::from_ids(loaded, ids),
            _ => Err(shape_error()),
        })
        .collect()
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens})
}

/// Which endpoint: shapes the response objects.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

/// What a request asked of its prompts, beside the generation settings.
#[derive(Clone, Copy)]
struct Asked {
    kind: Kind,
    /// Return the prompt before the completion (completions).
    echo: bool,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<usize>,
}

impl Asked {
    /// The prompt is scored in its prefill: echoed with log-probabilities.
    fn score_prompt(self) -> Option<usize> {
        self.logprobs.filter(|_| self.echo)
    }
}

/// The response objects of one request: ids, model and fingerprint, and the tokenizer and end
/// tokens that its `logprobs` objects need.
struct Shaper {
    asked: Asked,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    generator: Arc<Generator>,
}

impl Shaper {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.asked.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The `logprobs` object of chosen tokens (`null` unless asked for): a completion's
    /// through `columns`, which keeps its text offsets (and holds an echoed prompt's tokens
    /// added before); a chat reply's without an end token (not in its text).
    fn logprobs(&self, tokens: &[TokenLogprob], columns: &mut CompletionLogprobs) -> Value {
        if self.asked.logprobs.is_none() {
            return Value::Null;
        }
        let tokenizer = &self.generator.tokenizer;
        match self.asked.kind {
            Kind::Completion => {
                columns.add_chosen(tokenizer, tokens);
                columns.take()
            }
            Kind::Chat => {
                let eos = &self.generator.eos;
                logprobs::chat_logprobs(
                    tokenizer,
                    tokens.iter().filter(|t| !eos.contains(&t.token)),
                )
            }
        }
    }

    /// The choice of a finished, non-streamed generation of `prompt`: `logprobs` are its
    /// chosen tokens', `columns` holds the echoed prompt's.
    fn choice(
        &self,
        index: usize,
        prompt: &Prompt,
        f: &Finished,
        logprobs: &[TokenLogprob],
        columns: &mut CompletionLogprobs,
    ) -> Value {
        let finish = finish_reason(f.finish);
        let logprobs = self.logprobs(logprobs, columns);
        match self.asked.kind {
            Kind::Completion => {
                let text = if self.asked.echo {
                    format!("{}{}", prompt.text, f.text)
                } else {
                    f.text.clone()
                };
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Chat => {
                json!({"index": index, "message": {"role": "assistant", "content": f.text},
                       "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    /// A stream chunk of choice `index`: `text` (a chat delta's content) and its `logprobs`
    /// object.
    fn chunk(
        &self,
        index: usize,
        text: Option<&str>,
        logprobs: Value,
        finish: Option<&str>,
    ) -> Event {
        let choice = match self.asked.kind {
            Kind::Completion => json!({"index": index, "text": text.unwrap_or(""),
                                       "logprobs": logprobs, "finish_reason": finish}),
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs,
                       "finish_reason": finish})
            }
        };
        self.event(vec![choice])
    }

    fn event(&self, choices: Vec<Value>) -> Event {
        Event::default().data(
            json!({"id": self.id, "object": self.object(true), "created": self.created,
                   "model": self.model, "system_fingerprint": self.fingerprint,
                   "choices": choices})
            .to_string(),
        )
    }
}

/// What one prompt's stream hands the request's stream.
enum Streamed {
    Event(Event),
    /// The prompt's usage, once it finished.
    Usage(usize, usize),
}

/// The stream of choice `index`: its chunks as its generation runs, then its usage.
fn choice_stream(
    shaper: Arc<Shaper>,
    index: usize,
    prompt: Prompt,
    mut rx: mpsc::UnboundedReceiver<Update>,
    admission: Admission,
) -> impl futures_util::Stream<Item = Streamed> {
    async_stream::stream! {
        // The stream owns the admission and the receiver: a client that disconnects drops
        // the stream, which frees its queue place and (at the next decode step) its slot.
        let _admission = admission;
        let mut columns = CompletionLogprobs::default();
        if matches!(shaper.asked.kind, Kind::Chat) {
            let role = json!({"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": null, "finish_reason": null});
            yield Streamed::Event(shaper.event(vec![role]));
        }
        if shaper.asked.echo && shaper.asked.score_prompt().is_none() {
            yield Streamed::Event(shaper.chunk(index, Some(&prompt.text), Value::Null, None));
        }
        loop {
            match rx.recv().await {
                Some(Update::Prompt(scores)) => {
                    columns.add_prompt(&shaper.generator.tokenizer, &prompt.tokens, &scores);
                    let lp = columns.take();
                    yield Streamed::Event(shaper.chunk(index, Some(&prompt.text), lp, None));
                }
                Some(Update::Text { text, logprobs }) => {
                    let lp = shaper.logprobs(&logprobs, &mut columns);
                    yield Streamed::Event(shaper.chunk(index, Some(&text), lp, None));
                }
                Some(Update::Done(Ok(f))) => {
                    // Tokens whose log-probabilities no text carried (an end token).
                    let lp = if f.logprobs.is_empty() {
                        Value::Null
                    } else {
                        shaper.logprobs(&f.logprobs, &mut columns)
                    };
                    let finish = finish_reason(f.finish);
                    yield Streamed::Event(shaper.chunk(index, None, lp, Some(finish)));
                    yield Streamed::Usage(f.prompt_tokens, f.completion_tokens);
                    break;
                }
                Some(Update::Done(Err(e))) => {
                    let e = job_error(e);
                    let body = json!({"error": {"message": e.2, "type": "server_error", "code": e.1}});
                    yield Streamed::Event(Event::default().data(body.to_string()));
                    break;
                }
                None => break,
            }
        }
    }
}

async fn respond(
    state: OpenAiState,
    loaded: Arc<Loaded>,
    prompts: Vec<Prompt>,
    spec: GenerateSpec,
    options: &Options,
    asked: Asked,
) -> Result<Response, OpenAiError> {
    // Every prompt takes a place in the queue; if one cannot, the places taken are released.
    let admissions = prompts
        .iter()
        .map(|_| admit(&state))
        .collect::<Result<Vec<_>, _>>()?;
    let created = now();
    let id = format!(
        "{}-{created}-{}",
        match asked.kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        },
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    let shaper = Arc::new(Shaper {
        asked,
        id,
        created,
        model: loaded.reference.clone(),
        fingerprint: loaded.fingerprint.clone(),
        generator: loaded.generator.clone(),
    });
    let mut receivers = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let (tx, rx) = mpsc::unbounded_channel();
        loaded
            .scheduler
            .submit(p.tokens.clone(), spec.clone(), asked.score_prompt(), tx)
            .map_err(job_error)?;
        receivers.push(rx);
    }
    if !options.stream {
        // Dropping this future (the client went away) drops the receivers, which frees the
        // slots.
        let mut choices = Vec::with_capacity(prompts.len());
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (index, (prompt, mut rx)) in prompts.iter().zip(receivers).enumerate() {
            // The echoed prompt's scores and the chosen tokens' log-probabilities, as they
            // come with the updates.
            let mut columns = CompletionLogprobs::default();
            let mut chosen = Vec::new();
            let f = loop {
                match rx.recv().await {
                    Some(Update::Prompt(scores)) => {
                        columns.add_prompt(&loaded.generator.tokenizer, &prompt.tokens, &scores)
                    }
                    Some(Update::Text { logprobs, .. }) => chosen.extend(logprobs),
                    Some(Update::Done(r)) => break r.map_err(job_error)?,
                    None => return Err(job_error(JobError::Stopped)),
                }
            };
            chosen.extend_from_slice(&f.logprobs);
            prompt_tokens += f.prompt_tokens;
            completion_tokens += f.completion_tokens;
            choices.push(shaper.choice(index, prompt, &f, &chosen, &mut columns));
        }
        drop(admissions);
        return Ok(Json(json!({"id": shaper.id, "object": shaper.object(false),
                              "created": created, "model": shaper.model,
                              "system_fingerprint": shaper.fingerprint, "choices": choices,
                              "usage": usage(prompt_tokens, completion_tokens)}))
        .into_response());
    }
    let include_usage = options
        .stream_options
        .as_ref()
        .and_then(|o| o["include_usage"].as_bool())
        .unwrap_or(false);
    let choices = prompts
        .into_iter()
        .zip(receivers)
        .zip(admissions)
        .enumerate()
        .map(|(index, ((prompt, rx), admission))| {
            Box::pin(choice_stream(shaper.clone(), index, prompt, rx, admission))
        });
    let mut merged = futures_util::stream::select_all(choices);
    let object = shaper.object(true);
    let stream = async_stream::stream! {
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        while let Some(item) = merged.next().await {
            match item {
                Streamed::Event(e) => yield Ok::<Event, Infallible>(e),
                Streamed::Usage(p, c) => {
                    prompt_tokens += p;
                    completion_tokens += c;
                }
            }
        }
        if include_usage {
            let body = json!({"object": object, "choices": [],
                              "usage": usage(prompt_tokens, completion_tokens)});
            yield Ok(Event::default().data(body.to_string()));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(stream).into_response())
}

async fn completions(
    State(state): State<OpenAiState>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let request = json_body(body)?;
    let options = &request.options;
    let spec = spec(options, 16, Kind::Completion, request.echo)?;
    let loaded = model(&state, &options.model).await?;
    let prompts = completion_prompts(&loaded, &request.prompt)?;
    let asked = Asked {
        kind: Kind::Completion,
        echo: request.echo,
        logprobs: spec.logprobs,
    };
    respond(state, loaded, prompts, spec, options, asked).await
}

async fn chat_completions(
    State(state): State<OpenAiState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let request = json_body(body)?;
    if request.messages.is_empty() {
        return Err(bad("messages", "messages must hold at least one message"));
    }
    let spec = spec(&request.options, 256, Kind::Chat, false)?;
    let loaded = model(&state, &request.options.model).await?;
    let Some(template) = &loaded.generator.template else {
        return Err(bad(
            "model",
            format!(
                "model `{}` has no chat template (tokenizer_config.json chat_template); use /completions",
                loaded.reference
            ),
        ));
    };
    let text = template
        .render(&request.messages, true)
        .map_err(|e| bad("messages", e.to_string()))?;
    let prompt = Prompt::from_text(&loaded, &text, "messages")?;
    let asked = Asked {
        kind: Kind::Chat,
        echo: false,
        logprobs: spec.logprobs,
    };
    respond(state, loaded, vec![prompt], spec, &request.options, asked).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_suffix_is_split_from_the_model_name() {
        assert_eq!(
            split_storage("models/smollm2@bf16"),
            ("models/smollm2", Some(Storage::Bf16))
        );
        assert_eq!(split_storage("run-3@int8"), ("run-3", Some(Storage::Int8)));
        assert_eq!(
            split_storage("builtin:tiny-llama@f32"),
            ("builtin:tiny-llama", Some(Storage::F32))
        );
        // Anything else after an `@` is part of the name.
        assert_eq!(split_storage("models/a@b"), ("models/a@b", None));
        assert_eq!(split_storage("models/a@fp8"), ("models/a@fp8", None));
        assert_eq!(split_storage("@bf16"), ("@bf16", None));
        assert_eq!(split_storage("models/a"), ("models/a", None));
    }
}
