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
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::batch::{Finished, JobError, Limits, Scheduler, Update};
use crate::daemon::Daemon;

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
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    n: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    options: Options,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    options: Options,
}

/// A generation's settings from the request, checked.
fn spec(o: &Options, default_max: usize) -> Result<GenerateSpec, OpenAiError> {
    if o.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "only n = 1 is supported"));
    }
    let max = match o.max_completion_tokens.or(o.max_tokens) {
        None => default_max,
        Some(m) if m < 1 => {
            return Err(bad(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}"),
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
        ..GenerateSpec::default()
    })
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

/// Hands a generation to the model's scheduler; its text and end arrive on the receiver,
/// whose drop (client gone) frees its slot.
fn submit(
    loaded: &Loaded,
    prompt: Vec<u32>,
    spec: GenerateSpec,
) -> Result<mpsc::UnboundedReceiver<Update>, OpenAiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    loaded
        .scheduler
        .submit(prompt, spec, tx)
        .map_err(job_error)?;
    Ok(rx)
}

/// Tokenizes `text` and checks it leaves room in the context.
fn prompt_tokens(
    loaded: &Loaded,
    text: &str,
    param: &'static str,
) -> Result<Vec<u32>, OpenAiError> {
    let tokens = loaded
        .generator
        .tokenizer
        .encode(text)
        .map_err(|e| bad(param, e.to_string()))?;
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
    Ok(tokens)
}

fn usage(f: &Finished) -> Value {
    json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
           "total_tokens": f.prompt_tokens + f.completion_tokens})
}

/// Which endpoint: shapes the response objects.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

async fn respond(
    state: OpenAiState,
    loaded: Arc<Loaded>,
    prompt: Vec<u32>,
    spec: GenerateSpec,
    options: &Options,
    kind: Kind,
) -> Result<Response, OpenAiError> {
    let admission = admit(&state)?;
    let created = now();
    let id = format!(
        "{}-{created}-{}",
        match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        },
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    let model = loaded.reference.clone();
    let fingerprint = loaded.fingerprint.clone();
    let mut rx = submit(&loaded, prompt, spec)?;
    if !options.stream {
        // Dropping this future (the client went away) drops `rx`, which frees the slot.
        let f = loop {
            match rx.recv().await {
                Some(Update::Text(_)) => {}
                Some(Update::Done(r)) => break r.map_err(job_error)?,
                None => return Err(job_error(JobError::Stopped)),
            }
        };
        drop(admission);
        let choice = match kind {
            Kind::Completion => json!({"index": 0, "text": f.text, "logprobs": null,
                                       "finish_reason": finish_reason(f.finish)}),
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": f.text},
                                 "logprobs": null, "finish_reason": finish_reason(f.finish)}),
        };
        let object = match kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion",
        };
        return Ok(Json(
            json!({"id": id, "object": object, "created": created, "model": model,
                   "system_fingerprint": fingerprint, "choices": [choice], "usage": usage(&f)}),
        )
        .into_response());
    }
    let include_usage = options
        .stream_options
        .as_ref()
        .and_then(|o| o["include_usage"].as_bool())
        .unwrap_or(false);
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    let chunk = move |delta: Value, finish: Option<&str>| -> Event {
        let choice = match kind {
            Kind::Completion => json!({"index": 0, "text": delta["content"].as_str().unwrap_or(""),
                                       "logprobs": null, "finish_reason": finish}),
            Kind::Chat => {
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        Event::default().data(
            json!({"id": id, "object": object, "created": created, "model": model,
                   "system_fingerprint": fingerprint, "choices": [choice]})
            .to_string(),
        )
    };
    // The stream owns the admission and the receiver: a client that disconnects drops the
    // stream, which frees its queue place and (at the next decode step) its batch slot.
    let stream = async_stream::stream! {
        let _admission = admission;
        if matches!(kind, Kind::Chat) {
            yield Ok::<Event, Infallible>(chunk(json!({"role": "assistant", "content": ""}), None));
        }
        loop {
            match rx.recv().await {
                Some(Update::Text(piece)) => yield Ok(chunk(json!({"content": piece}), None)),
                Some(Update::Done(Ok(f))) => {
                    yield Ok(chunk(json!({}), Some(finish_reason(f.finish))));
                    if include_usage {
                        yield Ok(Event::default().data(json!({"object": object, "choices": [], "usage": usage(&f)}).to_string()));
                    }
                    break;
                }
                Some(Update::Done(Err(e))) => {
                    let e = job_error(e);
                    yield Ok(Event::default().data(json!({"error": {"message": e.2, "type": "server_error", "code": e.1}}).to_string()));
                    break;
                }
                None => break,
            }
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
    let text = match &request.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(bad(
                "prompt",
                "prompt must be a string (one prompt per request)",
            ));
        }
    };
    let loaded = model(&state, &request.options.model).await?;
    let spec = spec(&request.options, 16)?;
    let prompt = prompt_tokens(&loaded, &text, "prompt")?;
    respond(
        state,
        loaded,
        prompt,
        spec,
        &request.options,
        Kind::Completion,
    )
    .await
}

async fn chat_completions(
    State(state): State<OpenAiState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, OpenAiError> {
    let request = json_body(body)?;
    if request.messages.is_empty() {
        return Err(bad("messages", "messages must hold at least one message"));
    }
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
    let spec = spec(&request.options, 256)?;
    let prompt = prompt_tokens(&loaded, &text, "messages")?;
    respond(state, loaded, prompt, spec, &request.options, Kind::Chat).await
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
