//! The REST API under `/v1` (axum), its OpenAPI document (utoipa, generated from these
//! handlers and types), bearer-token checks on mutating calls, HTTP metrics, and server-sent
//! events for following a run. Handlers only translate HTTP to [`Daemon`] calls; anything that
//! touches the disk, the database or the wasm runtime runs on the blocking pool, never on the
//! async workers, so the API answers while runs keep the cores busy.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use utoipa::{OpenApi, ToSchema};

use crate::daemon::{Daemon, DaemonError, PipelineEntry, RejectedPlugin, RunRequest};
use crate::store::{RunFilter, RunRecord, RunStatus, StoredEvent};

/// Shared by every handler.
#[derive(Clone)]
pub struct ApiState {
    /// The daemon.
    pub daemon: Arc<Daemon>,
    /// Flips to `true` when the daemon stops: event streams end so shutdown is not held up.
    pub stopping: watch::Receiver<bool>,
}

/// The error body of every failed request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A failed request's kind and message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable kind: `bad-request`, `invalid-pipeline`, `invalid-plugin`, `not-found`,
    /// `conflict`, `unauthorized`, `payload-too-large`, `shutting-down`, `internal`.
    pub kind: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// An HTTP error: status, kind, message.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                kind: self.1.to_string(),
                message: self.2,
            },
        };
        let mut response = (self.0, Json(body)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"espalier\""),
            );
        }
        response
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        let message = e.to_string();
        match e {
            DaemonError::BadRequest(_) => ApiError(StatusCode::BAD_REQUEST, "bad-request", message),
            DaemonError::Pipeline(_) => {
                ApiError(StatusCode::BAD_REQUEST, "invalid-pipeline", message)
            }
            DaemonError::Plugin(_) => ApiError(StatusCode::BAD_REQUEST, "invalid-plugin", message),
            DaemonError::NotFound(_) => ApiError(StatusCode::NOT_FOUND, "not-found", message),
            DaemonError::Conflict(_) => ApiError(StatusCode::CONFLICT, "conflict", message),
            DaemonError::Registry(espalier::plugin::oci::OciError::Reference { .. }) => {
                ApiError(StatusCode::BAD_REQUEST, "bad-request", message)
            }
            DaemonError::Registry(_) => ApiError(StatusCode::BAD_GATEWAY, "registry", message),
            DaemonError::ShuttingDown => {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", message)
            }
            DaemonError::Internal(_) => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` on the blocking pool (disk, database, wasm runtime).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's work failed: {e}"),
        )),
    }
}

fn json_error(rejection: JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            rejection.body_text(),
        );
    }
    ApiError(
        StatusCode::BAD_REQUEST,
        "bad-request",
        rejection.body_text(),
    )
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Espalier",
        description = "Prune language models with sandboxed WebAssembly criteria: plugins, pipelines, runs."
    ),
    paths(
        healthz, metrics, list_plugins, upload_plugin, pull_plugin, get_plugin, download_plugin,
        delete_plugin,
        list_pipelines, get_pipeline, validate_pipeline, create_run, list_runs, get_run,
        run_report, run_masks, run_events, all_events, cancel_run, list_models, fetch_model
    ),
    components(schemas(
        ErrorBody, ErrorDetail, PluginList, RejectedPlugin, PipelineEntry, RunRequest,
        crate::daemon::RunRequestOverrides, RunRecord, RunStatus, ValidateResult, FetchRequest,
        PullRequest
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The router: `/v1/...`, `/healthz`, `/metrics`, `/openapi.json`, and the dashboard at `/`.
pub fn router(state: ApiState) -> Router {
    let limit = state.daemon.config.max_upload_bytes;
    Router::new()
        .route("/", get(crate::dashboard::index))
        .route("/ui/{file}", get(crate::dashboard::asset))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/v1/plugins", get(list_plugins).post(upload_plugin))
        .route("/v1/plugins/pull", post(pull_plugin))
        .route("/v1/plugins/{name}", get(get_plugin).delete(delete_plugin))
        .route("/v1/plugins/{name}/wasm", get(download_plugin))
        .route("/v1/pipelines", get(list_pipelines))
        .route("/v1/pipelines/{name}", get(get_pipeline))
        .route("/v1/pipelines/validate", post(validate_pipeline))
        .route("/v1/runs", get(list_runs).post(create_run))
        .route("/v1/runs/{id}", get(get_run).delete(cancel_run))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/runs/{id}/report", get(run_report))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/runs/{id}/masks", get(run_masks))
        .route("/v1/events", get(all_events))
        .route("/v1/models", get(list_models))
        .route("/v1/models/fetch", post(fetch_model))
        .nest(
            "/openai/v1",
            crate::openai::router(crate::openai::OpenAiState::new(state.daemon.clone())),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such route; see /openapi.json for the API".into(),
    )
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("{method} is not allowed here; see /openapi.json for the API"),
    )
}

/// With a token configured, every call that changes something needs `Authorization: Bearer
/// TOKEN`; reads stay open (they are as visible as the state folder itself).
async fn authorize(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let mutating = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if let (true, Some(token)) = (mutating, &state.daemon.config.token) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !ok {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this call needs `Authorization: Bearer TOKEN` (the daemon's token)".into(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Request counts and latency per route template (not raw path: ids would explode the labels).
async fn track(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(request).await;
    state.daemon.metrics.observe_http(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The daemon is up")))]
async fn healthz(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({"status": "ok", "accepting_runs": state.daemon.accepting()}))
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
async fn metrics(State(state): State<ApiState>) -> ApiResult<Response> {
    let daemon = state.daemon.clone();
    let text = blocking(move || {
        daemon.refresh_gauges();
        daemon
            .metrics
            .encode_prometheus_text()
            .map_err(|e| DaemonError::Internal(e.to_string()))
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            crate::metrics::PROMETHEUS_TEXT_CONTENT_TYPE,
        )],
        text,
    )
        .into_response())
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Registered plugins and refused plugin files.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginList {
    /// Every plugin a stage can name (built-ins, folder plugins, uploads).
    #[schema(value_type = Vec<Object>)]
    pub plugins: Vec<crate::daemon::PluginView>,
    /// Files in the plugin folder that are not registered, with why.
    pub rejected: Vec<RejectedPlugin>,
}

#[utoipa::path(get, path = "/v1/plugins", responses((status = 200, body = PluginList)))]
async fn list_plugins(State(state): State<ApiState>) -> Json<PluginList> {
    Json(PluginList {
        plugins: state.daemon.plugins(),
        rejected: state.daemon.rejected_plugins(),
    })
}

/// `?replace=true` replaces a different file of the same name.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadQuery {
    #[serde(default)]
    replace: bool,
}

#[utoipa::path(
    post, path = "/v1/plugins",
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "A WebAssembly component; its signature file (FILE.wasm.sig, one line of JSON) in the `x-espalier-signature` header when it is signed (required with `require_signatures`)"),
    params(UploadQuery),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered; written to the plugin folder as NAME.wasm"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)
    )
)]
async fn upload_plugin(
    State(state): State<ApiState>,
    Query(q): Query<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    // The plugin's signature file (one line of JSON), when it is signed.
    let signature = headers
        .get("x-espalier-signature")
        .map(|v| v.as_bytes().to_vec());
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                format!(
                    "the upload is larger than the daemon's limit of {} MiB (max_upload_mb)",
                    state.daemon.config.max_upload_bytes >> 20
                ),
            )
        } else {
            ApiError(StatusCode::BAD_REQUEST, "bad-request", r.body_text())
        }
    })?;
    let daemon = state.daemon.clone();
    let summary =
        blocking(move || daemon.upload_plugin(body.to_vec(), signature, q.replace)).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

/// A plugin to pull from an OCI registry.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `REGISTRY/REPOSITORY:TAG` or `REGISTRY/REPOSITORY@sha256:DIGEST` (`oci://` optional);
    /// plain http only for loopback registries. Credentials are the daemon's (its Docker
    /// config file or `ESPALIER_REGISTRY_*`), never the request's.
    pub reference: String,
    /// Replace a different plugin file of the same name.
    #[serde(default)]
    pub replace: bool,
}

#[utoipa::path(
    post, path = "/v1/plugins/pull", request_body = PullRequest, security(("bearer" = [])),
    responses(
        (status = 201, description = "Pulled, every digest checked, admitted by the daemon's signature policy (the signature travels in the manifest), written to the plugin folder as NAME.wasm and registered"),
        (status = 400, body = ErrorBody, description = "A malformed reference, or the plugin is refused (not a usable component, or unsigned/untrusted with `require_signatures`)"),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 502, body = ErrorBody, description = "The registry is down, refused, asks for credentials the daemon lacks, or sent something too large, too slow or not matching its digest; nothing was registered")
    )
)]
async fn pull_plugin(
    State(state): State<ApiState>,
    body: Result<Json<PullRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body.map_err(json_error)?;
    let daemon = state.daemon.clone();
    let summary = blocking(move || daemon.pull_plugin(&req.reference, req.replace)).await?;
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

#[utoipa::path(get, path = "/v1/plugins/{name}", params(("name" = String, Path)), responses((status = 200), (status = 404, body = ErrorBody)))]
async fn get_plugin(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    Ok(Json(state.daemon.plugin(&name)?).into_response())
}

#[utoipa::path(
    get, path = "/v1/plugins/{name}/wasm",
    params(("name" = String, Path, description = "A plugin name, or the sha256 of any version the daemon holds")),
    responses((status = 200, content_type = "application/wasm", body = Vec<u8>), (status = 404, body = ErrorBody))
)]
async fn download_plugin(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let (sha, bytes) = state.daemon.plugin_bytes(&name)?;
    let mut response = (
        [(header::CONTENT_TYPE, "application/wasm")],
        bytes.as_ref().clone(),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&sha) {
        response.headers_mut().insert("x-espalier-sha256", v);
    }
    Ok(response)
}

#[utoipa::path(delete, path = "/v1/plugins/{name}", params(("name" = String, Path)), security(("bearer" = [])), responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_plugin(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let daemon = state.daemon.clone();
    blocking(move || daemon.delete_plugin(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/pipelines", responses((status = 200, body = Vec<PipelineEntry>)))]
async fn list_pipelines(State(state): State<ApiState>) -> Json<Vec<PipelineEntry>> {
    Json(state.daemon.pipelines())
}

#[utoipa::path(get, path = "/v1/pipelines/{name}", params(("name" = String, Path)), responses((status = 200, body = PipelineEntry), (status = 404, body = ErrorBody)))]
async fn get_pipeline(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<PipelineEntry>> {
    Ok(Json(state.daemon.pipeline(&name)?))
}

/// A pipeline that would run.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidateResult {
    /// Its name.
    pub name: String,
    /// The model it prunes.
    pub model: String,
    /// Stage names, in order.
    pub stages: Vec<String>,
}

#[utoipa::path(
    post, path = "/v1/pipelines/validate",
    request_body(content = String, content_type = "application/toml", description = "Pipeline TOML"),
    security(("bearer" = [])),
    responses((status = 200, body = ValidateResult), (status = 400, description = "The error names request.toml:LINE:COL and the field", body = ErrorBody))
)]
async fn validate_pipeline(
    State(state): State<ApiState>,
    body: Bytes,
) -> ApiResult<Json<ValidateResult>> {
    let text = String::from_utf8(body.to_vec()).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("the pipeline is not UTF-8 text: {e}"),
        )
    })?;
    let daemon = state.daemon.clone();
    let p = blocking(move || daemon.check_pipeline("request.toml", &text)).await?;
    Ok(Json(ValidateResult {
        name: p.name,
        model: p.model.value,
        stages: p.stages.into_iter().map(|s| s.name).collect(),
    }))
}

#[utoipa::path(
    post, path = "/v1/runs", request_body = RunRequest, security(("bearer" = [])),
    responses((status = 201, body = RunRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody))
)]
async fn create_run(
    State(state): State<ApiState>,
    body: Result<Json<RunRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(request) = body.map_err(json_error)?;
    let daemon = state.daemon.clone();
    let record = blocking(move || daemon.submit(request)).await?;
    let location = format!("/v1/runs/{}", record.id);
    let mut response = (StatusCode::CREATED, Json(record)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// Filters of `GET /v1/runs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// queued, running, succeeded, failed, cancelled or interrupted.
    status: Option<String>,
    /// Pipeline name.
    pipeline: Option<String>,
    /// At most this many (default 50, at most 1000).
    limit: Option<u32>,
    /// Only runs with a smaller id (the next page).
    before: Option<i64>,
}

#[utoipa::path(get, path = "/v1/runs", params(ListQuery), responses((status = 200, body = Vec<RunRecord>), (status = 400, body = ErrorBody)))]
async fn list_runs(
    State(state): State<ApiState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<RunRecord>>> {
    let Query(q) =
        query.map_err(|r| ApiError(StatusCode::BAD_REQUEST, "bad-request", r.body_text()))?;
    let status = match &q.status {
        Some(s) => Some(s.parse::<RunStatus>().map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("status `{s}` is not one of queued, running, succeeded, failed, cancelled, interrupted"),
            )
        })?),
        None => None,
    };
    let filter = RunFilter {
        status,
        pipeline_name: q.pipeline,
        limit: q.limit,
        before: q.before,
    };
    let daemon = state.daemon.clone();
    Ok(Json(blocking(move || daemon.runs(&filter)).await?))
}

fn parse_id(id: &str) -> ApiResult<i64> {
    id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("`{id}` is not a run id (a positive integer)"),
        )
    })
}

#[utoipa::path(get, path = "/v1/runs/{id}", params(("id" = i64, Path)), responses((status = 200, body = RunRecord), (status = 404, body = ErrorBody)))]
async fn get_run(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<RunRecord>> {
    let id = parse_id(&id)?;
    let daemon = state.daemon.clone();
    Ok(Json(blocking(move || daemon.run(id)).await?))
}

#[utoipa::path(get, path = "/v1/runs/{id}/report", params(("id" = i64, Path)), responses((status = 200, description = "report.json of a finished run"), (status = 404, body = ErrorBody)))]
async fn run_report(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let daemon = state.daemon.clone();
    let bytes = blocking(move || {
        let record = daemon.run(id)?;
        let path = record.report_path.ok_or_else(|| {
            DaemonError::NotFound(format!("run {id} has no report ({})", record.status))
        })?;
        std::fs::read(&path).map_err(|e| DaemonError::Internal(format!("cannot read {path}: {e}")))
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

#[utoipa::path(
    delete, path = "/v1/runs/{id}", params(("id" = i64, Path)), security(("bearer" = [])),
    responses((status = 202, description = "Cancelled (queued) or cancelling (running)", body = RunRecord), (status = 404, body = ErrorBody), (status = 409, description = "The run already ended", body = ErrorBody))
)]
async fn cancel_run(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let daemon = state.daemon.clone();
    let record = blocking(move || daemon.cancel(id)).await?;
    Ok((StatusCode::ACCEPTED, Json(record)).into_response())
}

/// `?after=SEQ` (or the `Last-Event-ID` header) resumes after that event.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    after: Option<u64>,
}

#[utoipa::path(
    get, path = "/v1/runs/{id}/events", params(("id" = i64, Path), EventsQuery),
    responses((status = 200, description = "Server-sent events; `id` is the event's sequence number, `event` its type; the stream ends after run-finished, run-failed, run-cancelled or run-interrupted", content_type = "text/event-stream"), (status = 404, body = ErrorBody))
)]
async fn run_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let id = parse_id(&id)?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(q.after)
        .unwrap_or(0);
    let daemon = state.daemon.clone();
    // Subscribe before reading what is stored, so nothing falls between the two.
    let live = daemon.subscribe(id);
    let d = daemon.clone();
    let (record, stored) = blocking(move || Ok((d.run(id)?, d.events_after(id, after)?))).await?;
    let mut stopping = state.stopping.clone();
    let stream = async_stream::stream! {
        let mut last = after;
        let mut ended = false;
        for e in stored {
            last = e.seq;
            ended |= is_terminal(&e.event_type);
            yield Ok(sse_event(&e));
        }
        if ended || record.status.is_terminal() && live.is_none() {
            return;
        }
        let Some(mut live) = live else { return };
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(e) => {
                        if e.seq <= last { continue; }
                        last = e.seq;
                        let end = is_terminal(&e.event_type);
                        yield Ok(sse_event(&e));
                        if end { return; }
                    }
                    // Fell behind, or the run ended and its channel closed: what was missed
                    // is in the store.
                    Err(e) => {
                        let closed = matches!(e, tokio::sync::broadcast::error::RecvError::Closed);
                        let d = daemon.clone();
                        let missed = tokio::task::spawn_blocking(move || d.events_after(id, last)).await;
                        if let Ok(Ok(missed)) = missed {
                            for e in missed {
                                last = e.seq;
                                let end = is_terminal(&e.event_type);
                                yield Ok(sse_event(&e));
                                if end { return; }
                            }
                        }
                        if closed { return; }
                    }
                },
                _ = stopping.changed() => return,
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[utoipa::path(
    get, path = "/v1/runs/{id}/masks", params(("id" = i64, Path)),
    responses(
        (status = 200, description = "masks.safetensors of the run's export: one u8 tensor per pruned layer, 1 = kept", content_type = "application/octet-stream"),
        (status = 404, description = "No such run, or it exported nothing", body = ErrorBody),
        (status = 410, description = "A later run exported to the same folder and replaced these masks", body = ErrorBody)
    )
)]
async fn run_masks(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let daemon = state.daemon.clone();
    let bytes = blocking(move || daemon.run_masks(id)).await?;
    let Some(bytes) = bytes else {
        return Err(ApiError(
            StatusCode::GONE,
            "gone",
            format!(
                "a later run exported to the same folder as run {id} and replaced its masks; give pipelines their own [export] dir to keep each run's"
            ),
        ));
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"run-{id}-masks.safetensors\""),
            ),
        ],
        bytes,
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/v1/events",
    responses((status = 200, description = "Server-sent events of every run from now on: `event` is the type (`run-queued` when a run is submitted, then the types of `/v1/runs/{id}/events`), `data` is `{\"run\": ID, \"seq\": N, \"event\": {...}}` (for `run-queued`, `event` is the run record). `resync` means events were dropped for a slow reader: read `GET /v1/runs` again.", content_type = "text/event-stream"))
)]
async fn all_events(
    State(state): State<ApiState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut feed = state.daemon.subscribe_all();
    let mut stopping = state.stopping.clone();
    let stream = async_stream::stream! {
        // A first event, so a client knows the stream is open before any run moves.
        yield Ok(Event::default().event("hello").data("{}"));
        loop {
            tokio::select! {
                received = feed.recv() => match received {
                    Ok(e) => {
                        let data = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
                        yield Ok(Event::default().event(e.event_type.clone()).data(data));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        yield Ok(Event::default().event("resync").data(json!({"dropped": n}).to_string()));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = stopping.changed() => return,
            }
        }
    };
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn is_terminal(kind: &str) -> bool {
    matches!(
        kind,
        "run-finished" | "run-failed" | "run-cancelled" | "run-interrupted"
    )
}

fn sse_event(e: &StoredEvent) -> Event {
    Event::default()
        .id(e.seq.to_string())
        .event(e.event_type.clone())
        .data(e.data.to_string())
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, description = "Model folders in models/, fetchable and built-in models")))]
async fn list_models(State(state): State<ApiState>) -> ApiResult<Json<Value>> {
    let daemon = state.daemon.clone();
    Ok(Json(blocking(move || Ok(daemon.models())).await?))
}

/// A model to download and import.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// A name from `GET /v1/models` `fetchable` (without `fetch:`).
    pub name: String,
}

#[utoipa::path(
    post, path = "/v1/models/fetch", request_body = FetchRequest, security(("bearer" = [])),
    responses((status = 200, description = "Downloaded and imported (or already there)"), (status = 404, body = ErrorBody))
)]
async fn fetch_model(
    State(state): State<ApiState>,
    body: Result<Json<FetchRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(req) = body.map_err(json_error)?;
    let daemon = state.daemon.clone();
    let name = req.name.clone();
    let dir = blocking(move || daemon.fetch_model(&name)).await?;
    Ok(Json(
        json!({"reference": format!("fetch:{}", req.name), "dir": dir}),
    ))
}
