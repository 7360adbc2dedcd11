//! The daemon's state and work, independent of HTTP: the application core, the run store and
//! queue, the runner threads that execute runs (never on the async runtime), the registry fed
//! by the watched plugin folder and uploads, the pipelines of the watched pipeline folder, and
//! live event fan-out for followers. `api.rs` is a thin layer over this.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use espalier::app::{App, Config, ErrorKind, RunOverrides};
use espalier::atomic::write_atomic;
use espalier::cancel::CancelToken;
use espalier::events::RunEvent;
use espalier::pipeline::{Pipeline, PipelineError};
use espalier::plugin::registry::{
    Plugin, PluginSummary, admit, builtin_component, load_bytes_sandboxed,
};
use espalier::plugin::signing::{read_signature_beside, signature_path};
use espalier::plugin::{Origin, PluginError, Sandbox};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::config::{ServeConfig, ShutdownMode};
use crate::layout::Layout;
use crate::metrics::{LoadFailure, Metrics};
use crate::store::{
    Finish, InterruptScope, NewRun, PipelineSource, RunErrorInfo, RunRecord, RunStatus, RunStore,
    SqliteStore, StoredEvent,
};
use crate::watch::{FolderWatcher, ReadyFile, WatchEvent, WatchOptions};

/// Limits for `describe` of a folder plugin: a looping `describe` holds the watcher this long.
const DESCRIBE_SANDBOX: Sandbox = Sandbox {
    timeout: Duration::from_secs(5),
    guest_memory: 256 << 20,
    host_memory: 64 << 20,
};

/// Pipeline files are small; a larger file in the folder is rejected unread.
const PIPELINE_FILE_LIMIT: u64 = 1 << 20;

/// Why a request cannot be served, with the status class a front end maps it to.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The request is malformed or names something unusable (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// The pipeline is wrong; the message names file, line and field (HTTP 400).
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A plugin upload is not a usable component (HTTP 400).
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Nothing by that name or id (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// A registry pull failed: a malformed reference (HTTP 400), or the registry could not be
    /// reached, refused, or sent something that failed verification (HTTP 502).
    #[error(transparent)]
    Registry(#[from] espalier::plugin::oci::OciError),
    /// The daemon is shutting down (HTTP 503).
    #[error("the daemon is shutting down and accepts no new runs")]
    ShuttingDown,
    /// Storage or file-system failure (HTTP 500).
    #[error("{0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for DaemonError {
    fn from(e: crate::store::StoreError) -> Self {
        DaemonError::Internal(e.to_string())
    }
}

/// A pipeline file of the watched folder: its text, or the error that keeps it from running.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PipelineEntry {
    /// The name runs use (the file name without `.toml`).
    pub name: String,
    /// The file.
    pub file: String,
    /// sha256 of its text.
    pub sha256: String,
    /// The text.
    pub text: String,
    /// `file:line:col: field: message` when the pipeline cannot run.
    pub error: Option<String>,
}

/// A registered plugin as the API shows it: what it describes, and where it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginView {
    /// Name, version, sha256, size, parameters, ... (as `espalier plugins list --json`).
    #[serde(flatten)]
    pub summary: PluginSummary,
    /// `built-in`, `folder` (dropped into the plugin folder) or `upload` (sent to `POST
    /// /v1/plugins` since this daemon started; it lives in the plugin folder too).
    pub source: &'static str,
}

/// A plugin file the daemon refused, with why.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RejectedPlugin {
    /// The file.
    pub file: String,
    /// Why it is not registered (the previous good version, if any, stays).
    pub reason: String,
}

/// What a client asks a run to be.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// A pipeline of the pipeline folder, by name (`GET /v1/pipelines`).
    pub pipeline: Option<String>,
    /// Or pipeline TOML text.
    pub body: Option<String>,
    /// Overrides.
    #[serde(default)]
    pub overrides: RunRequestOverrides,
}

/// Values that replace the pipeline's.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequestOverrides {
    /// Model reference (`builtin:NAME`, `fetch:NAME`, or `models/NAME` in the state folder).
    pub model: Option<String>,
    /// Density of every stage that gives a fixed one.
    pub density: Option<f64>,
}

/// One event of any run, as the daemon-wide feed (`GET /v1/events`) carries it: the run it
/// belongs to, its sequence number within that run (0 for `run-queued`, which is not stored),
/// its type and its data.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeedEvent {
    /// The run.
    pub run: i64,
    /// Sequence number within the run's own stream (`GET /v1/runs/{id}/events`).
    pub seq: u64,
    /// Event type (`run-queued`, `stage-started`, ...).
    #[serde(skip)]
    pub event_type: String,
    /// The event (for `run-queued`, the run record).
    pub event: Value,
}

/// One run as it executes here: how to cancel it and where its events go live.
struct LiveRun {
    cancel: CancelToken,
    events: broadcast::Sender<StoredEvent>,
}

/// The daemon.
pub struct Daemon {
    app: App,
    /// The state folder.
    pub layout: Layout,
    /// Settings.
    pub config: ServeConfig,
    store: Arc<dyn RunStore>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    live: Mutex<HashMap<i64, Arc<LiveRun>>>,
    /// Every run's events, for followers of the whole daemon (the dashboard's run list).
    feed_tx: broadcast::Sender<FeedEvent>,
    pipelines: RwLock<BTreeMap<String, PipelineEntry>>,
    rejected_plugins: Mutex<BTreeMap<PathBuf, String>>,
    /// Component bytes of registered non-built-in plugins, by sha256 (for downloads).
    blobs: RwLock<HashMap<String, Arc<Vec<u8>>>>,
    /// Wakes runner threads when a run is queued or the daemon stops.
    wake: (Mutex<()>, Condvar),
    accepting: AtomicBool,
    stopping: AtomicBool,
    /// Serialises uploads and deletions of plugin files.
    plugin_files: Mutex<()>,
    /// Plugin files written by uploads (shown as `upload`).
    uploaded: Mutex<std::collections::HashSet<PathBuf>>,
    /// The threads runs compute on (calibration, evaluation, kernels: rayon inside the core),
    /// at a lower priority than the HTTP threads so the API answers while runs saturate the
    /// cores.
    compute: rayon::ThreadPool,
}

/// The running daemon's background parts; dropping stops the watchers.
pub struct Background {
    runners: Vec<JoinHandle<()>>,
    _watchers: Vec<FolderWatcher>,
}

impl Daemon {
    /// Opens the state folder and the run store (runs left running by a previous process are
    /// marked interrupted), starts the core, and registers the plugin and pipeline folders.
    pub fn open(config: ServeConfig) -> Result<Arc<Self>, DaemonError> {
        let layout = Layout::init(&config.state_dir).map_err(|e| {
            DaemonError::Internal(format!(
                "cannot prepare the state folder {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let store = SqliteStore::open(&layout.database)?;
        // Runs a previous process left running end `interrupted`, with an event that says so,
        // so their event streams end too. Queued runs stay queued and run now.
        let reason = "the daemon stopped while the run was in flight";
        let in_flight = store.list(&crate::store::RunFilter {
            status: Some(RunStatus::Running),
            limit: Some(crate::store::MAX_LIST_LIMIT),
            ..Default::default()
        })?;
        let interrupted = store.mark_interrupted(reason, InterruptScope::RunningOnly)?;
        for run in &in_flight {
            store.append_event(
                run.id,
                "run-interrupted",
                &json!({"type": "run-interrupted", "reason": reason}),
            )?;
        }
        if interrupted > 0 {
            tracing::warn!("{interrupted} run(s) from the previous start marked interrupted");
        }
        let compute = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("espalier-compute-{i}"))
            .spawn_handler(|thread| {
                std::thread::Builder::new()
                    .name(thread.name().unwrap_or("espalier-compute").to_string())
                    .spawn(move || {
                        lower_priority();
                        thread.run()
                    })
                    .map(|_| ())
            })
            .build()
            .map_err(|e| DaemonError::Internal(format!("cannot start the compute threads: {e}")))?;
        let app = App::start(Config {
            plugin_dirs: Vec::new(),
            models_dir: layout.models.clone(),
            cache_dir: Some(layout.cache.clone()),
            sandbox: DESCRIBE_SANDBOX,
            // Runs share the process: one run's reset would hide another's peak.
            per_model_peak: false,
            trust: config.trust.clone(),
        })
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
        Ok(Arc::new(Daemon {
            app,
            layout,
            config,
            store: Arc::new(store),
            metrics: Metrics::new(),
            live: Mutex::new(HashMap::new()),
            feed_tx: broadcast::channel(1024).0,
            pipelines: RwLock::new(BTreeMap::new()),
            rejected_plugins: Mutex::new(BTreeMap::new()),
            blobs: RwLock::new(HashMap::new()),
            wake: (Mutex::new(()), Condvar::new()),
            accepting: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            plugin_files: Mutex::new(()),
            uploaded: Mutex::new(Default::default()),
            compute,
        }))
    }

    /// Starts the folder watchers (their first listing is registered before this returns) and
    /// the runner threads.
    pub fn start(self: &Arc<Self>) -> Result<Background, DaemonError> {
        let debounce = Duration::from_millis(self.config.debounce_ms);
        let me = self.clone();
        let plugins = FolderWatcher::start(
            self.layout.plugins.clone(),
            WatchOptions {
                extensions: vec!["wasm".into()],
                debounce,
                rescan_interval: Duration::from_secs(2),
                max_file_size: espalier_engine::files::PLUGIN_LIMIT,
            },
            move |event| me.on_plugin_file(event),
        )
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let me = self.clone();
        let pipelines = FolderWatcher::start(
            self.layout.pipelines.clone(),
            WatchOptions {
                extensions: vec!["toml".into()],
                debounce,
                rescan_interval: Duration::from_secs(2),
                max_file_size: PIPELINE_FILE_LIMIT,
            },
            move |event| me.on_pipeline_file(event),
        )
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
        let mut runners = Vec::new();
        for i in 0..self.config.concurrency {
            let me = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("espalier-runner-{i}"))
                .spawn(move || me.runner_loop())
                .map_err(|e| DaemonError::Internal(format!("cannot start a runner: {e}")))?;
            runners.push(handle);
        }
        self.refresh_gauges();
        Ok(Background {
            runners,
            _watchers: vec![plugins, pipelines],
        })
    }

    // ----- plugins -----

    fn on_plugin_file(&self, event: WatchEvent) {
        match event {
            WatchEvent::Ready(file) => {
                if let Err(e) = self.register_file(&file) {
                    self.reject_plugin(&file.path, &e);
                }
            }
            WatchEvent::Rejected { path, reason } => {
                // A truncated or unreadable file: the last good version stays registered.
                self.metrics.inc_plugin_load_failure(LoadFailure::Rejected);
                self.note_rejected(&path, reason);
            }
            WatchEvent::Removed { path } => {
                let removed = self.app.shared_registry().update(|r| r.remove_file(&path));
                if let Some(p) = removed {
                    tracing::info!(plugin = %p.info.name, "plugin file removed: {}", path.display());
                }
                self.clear_rejected(&path);
            }
        }
    }

    fn register_file(&self, file: &ReadyFile) -> Result<(), PluginError> {
        let label = file.path.display().to_string();
        let plugin = load_bytes_sandboxed(
            &self.app.runtime,
            &label,
            &file.bytes,
            Origin::File(file.path.clone()),
            &DESCRIBE_SANDBOX,
        )?;
        // The signature beside the file (copy it in before the .wasm when signatures are
        // required: the component is checked when it arrives).
        let signature = read_signature_beside(&file.path).map_err(|e| PluginError::Refused {
            plugin: label.clone(),
            message: e.to_string(),
        })?;
        let plugin = admit(plugin, signature.as_deref(), &self.config.trust, &label)?;
        self.install(plugin, Arc::new(file.bytes.clone()), &file.path);
        Ok(())
    }

    /// Swaps `plugin` in for whatever `path` held before; new runs use it, runs in flight keep
    /// the version they planned with.
    fn install(&self, plugin: Plugin, bytes: Arc<Vec<u8>>, path: &Path) {
        let sha = plugin.compiled.sha256.clone();
        if let Ok(mut blobs) = self.blobs.write() {
            blobs.insert(sha.clone(), bytes);
        }
        let name = plugin.info.name.clone();
        self.app.shared_registry().update(|r| {
            r.remove_file(path);
            r.insert(plugin);
        });
        self.clear_rejected(path);
        tracing::info!(plugin = %name, sha256 = %sha, "plugin registered from {}", path.display());
    }

    fn reject_plugin(&self, path: &Path, e: &PluginError) {
        // Not a loadable component (or `describe` said something invalid) vs. a guest that
        // failed while describing itself.
        let kind = match e {
            PluginError::Invalid { .. } => LoadFailure::Compile,
            PluginError::Refused { .. } => LoadFailure::Rejected,
            _ => LoadFailure::Interface,
        };
        self.metrics.inc_plugin_load_failure(kind);
        tracing::warn!("plugin file {} not loaded: {e}", path.display());
        self.note_rejected(path, e.to_string());
    }

    fn note_rejected(&self, path: &Path, reason: String) {
        if let Ok(mut r) = self.rejected_plugins.lock() {
            r.insert(path.to_path_buf(), reason);
        }
    }

    fn clear_rejected(&self, path: &Path) {
        if let Ok(mut r) = self.rejected_plugins.lock() {
            r.remove(path);
        }
    }

    fn view(&self, plugin: &Plugin, registry: &espalier::plugin::Registry) -> PluginView {
        let source = match &plugin.origin {
            Origin::Builtin => "built-in",
            Origin::File(path) => {
                let uploaded = self.uploaded.lock().is_ok_and(|u| u.contains(path));
                if uploaded { "upload" } else { "folder" }
            }
        };
        PluginView {
            summary: PluginSummary::of(plugin, registry),
            source,
        }
    }

    /// Every plugin a stage can name.
    pub fn plugins(&self) -> Vec<PluginView> {
        let registry = self.app.registry();
        registry.iter().map(|p| self.view(p, &registry)).collect()
    }

    /// Plugin files that were refused (the previous version of each, if any, stays).
    pub fn rejected_plugins(&self) -> Vec<RejectedPlugin> {
        self.rejected_plugins
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(p, reason)| RejectedPlugin {
                        file: p.display().to_string(),
                        reason: reason.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One plugin, by name.
    pub fn plugin(&self, name: &str) -> Result<PluginView, DaemonError> {
        let registry = self.app.registry();
        registry
            .get(name)
            .map(|p| self.view(p, &registry))
            .ok_or_else(|| DaemonError::NotFound(format!("no plugin named `{name}`")))
    }

    /// The component bytes of the plugin named `name`, or with sha256 `name`.
    pub fn plugin_bytes(&self, name_or_sha: &str) -> Result<(String, Arc<Vec<u8>>), DaemonError> {
        let registry = self.app.registry();
        let sha = match registry.get(name_or_sha) {
            Some(p) => p.compiled.sha256.clone(),
            None if is_sha256(name_or_sha) => name_or_sha.to_string(),
            None => {
                return Err(DaemonError::NotFound(format!(
                    "no plugin named `{name_or_sha}`"
                )));
            }
        };
        if let Some(b) = builtin_component(&sha) {
            return Ok((sha, Arc::new(b.to_vec())));
        }
        let bytes = self.blobs.read().ok().and_then(|b| b.get(&sha).cloned());
        bytes
            .map(|b| (sha.clone(), b))
            .ok_or_else(|| DaemonError::NotFound(format!("no plugin with sha256 {sha}")))
    }

    /// Validates an uploaded component (compiles, `describe()` answers, its name is a safe
    /// file name), writes it atomically into the plugin folder as `NAME.wasm` and registers it.
    /// An existing different file of that name is replaced only with `replace`.
    ///
    /// `signature` is the plugin's signature file (`x-espalier-signature`); it is checked
    /// against the daemon's trust and written beside the component as `NAME.wasm.sig`.
    pub fn upload_plugin(
        &self,
        bytes: Vec<u8>,
        signature: Option<Vec<u8>>,
        replace: bool,
    ) -> Result<PluginView, DaemonError> {
        let plugin = load_bytes_sandboxed(
            &self.app.runtime,
            "upload",
            &bytes,
            Origin::File(PathBuf::new()),
            &DESCRIBE_SANDBOX,
        )
        .inspect_err(|_| self.metrics.inc_plugin_load_failure(LoadFailure::Compile))?;
        let plugin = admit(plugin, signature.as_deref(), &self.config.trust, "upload")
            .inspect_err(|_| self.metrics.inc_plugin_load_failure(LoadFailure::Rejected))?;
        let name = plugin.info.name.clone();
        if !safe_file_stem(&name) {
            return Err(DaemonError::BadRequest(format!(
                "the plugin's name `{}` cannot be a file name; use letters, digits, `-`, `_` and `.` (not first), at most 64 characters",
                espalier::display_safe::name(&name)
            )));
        }
        let _guard = self
            .plugin_files
            .lock()
            .map_err(|_| DaemonError::Internal("plugin file lock poisoned".into()))?;
        let path = self.layout.plugins.join(format!("{name}.wasm"));
        if let Ok(existing) = std::fs::read(&path)
            && espalier::plugin::runtime::sha256_hex(&existing) != plugin.compiled.sha256
            && !replace
        {
            return Err(DaemonError::Conflict(format!(
                "a different plugin file {} exists; upload with ?replace=true to replace it",
                path.display()
            )));
        }
        // The signature first: the watcher checks the component against it when it appears.
        let sig_path = signature_path(&path);
        let sig_written = match &signature {
            Some(sig) => write_atomic(&sig_path, sig),
            // An unsigned upload replaces a signed file: its old signature would not match.
            None => match std::fs::remove_file(&sig_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        sig_written.map_err(|e| {
            DaemonError::Internal(format!("cannot write {}: {e}", sig_path.display()))
        })?;
        write_atomic(&path, &bytes)
            .map_err(|e| DaemonError::Internal(format!("cannot write {}: {e}", path.display())))?;
        let plugin = Plugin {
            origin: Origin::File(path.clone()),
            ..plugin
        };
        if let Ok(mut u) = self.uploaded.lock() {
            u.insert(path.clone());
        }
        self.install(plugin, Arc::new(bytes), &path);
        self.plugin(&name)
    }

    /// Pulls a plugin from an OCI registry (`POST /v1/plugins/pull`): every digest is checked,
    /// then it is admitted like an upload (the daemon's signature policy, with the signature
    /// its manifest carries), written to the plugin folder as `NAME.wasm` and registered.
    pub fn pull_plugin(&self, reference: &str, replace: bool) -> Result<PluginView, DaemonError> {
        let pulled = espalier::plugin::oci::pull(reference)?;
        tracing::info!(reference, pinned = %pulled.pinned, "plugin pulled");
        self.upload_plugin(pulled.wasm, pulled.signature, replace)
    }

    /// Deletes the plugin file of `name` from the plugin folder (built-ins cannot be deleted).
    pub fn delete_plugin(&self, name: &str) -> Result<(), DaemonError> {
        let _guard = self
            .plugin_files
            .lock()
            .map_err(|_| DaemonError::Internal("plugin file lock poisoned".into()))?;
        let registry = self.app.registry();
        let plugin = registry
            .get(name)
            .ok_or_else(|| DaemonError::NotFound(format!("no plugin named `{name}`")))?;
        let Origin::File(path) = &plugin.origin else {
            return Err(DaemonError::Conflict(format!(
                "`{name}` is built in and cannot be deleted"
            )));
        };
        if !crate::layout::inside(path, &self.layout.plugins) {
            return Err(DaemonError::Conflict(format!(
                "`{name}` does not come from the plugin folder"
            )));
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(DaemonError::Internal(format!(
                    "cannot delete {}: {e}",
                    path.display()
                )));
            }
        }
        let path = path.clone();
        self.app.shared_registry().update(|r| r.remove_file(&path));
        if let Ok(mut u) = self.uploaded.lock() {
            u.remove(&path);
        }
        Ok(())
    }

    // ----- pipelines -----

    fn on_pipeline_file(&self, event: WatchEvent) {
        let (path, entry) = match event {
            WatchEvent::Ready(f) => {
                let entry = self.pipeline_entry(&f.path, &f.bytes, &f.sha256);
                (f.path, Some(entry))
            }
            WatchEvent::Rejected { path, reason } => {
                let entry = PipelineEntry {
                    name: stem(&path),
                    file: path.display().to_string(),
                    sha256: String::new(),
                    text: String::new(),
                    error: Some(reason),
                };
                (path, Some(entry))
            }
            WatchEvent::Removed { path } => (path, None),
        };
        if let Ok(mut p) = self.pipelines.write() {
            match entry {
                Some(e) => {
                    p.insert(e.name.clone(), e);
                }
                None => {
                    p.remove(&stem(&path));
                }
            }
        }
    }

    fn pipeline_entry(&self, path: &Path, bytes: &[u8], sha256: &str) -> PipelineEntry {
        let name = stem(path);
        let file = path.display().to_string();
        let (text, error) = match std::str::from_utf8(bytes) {
            Ok(t) => {
                let error = self.check_pipeline(&file, t).err().map(|e| e.to_string());
                (t.to_string(), error)
            }
            Err(e) => (String::new(), Some(format!("{file}: not UTF-8 text: {e}"))),
        };
        PipelineEntry {
            name,
            file,
            sha256: sha256.to_string(),
            text,
            error,
        }
    }

    /// Parses pipeline text as the daemon runs it (relative paths from the state folder),
    /// keeps it inside the state folder and checks that its plugins are registered.
    pub fn check_pipeline(&self, label: &str, text: &str) -> Result<Pipeline, DaemonError> {
        let pipeline = self.layout.parse(label, text)?;
        self.layout.confine(&pipeline)?;
        let registry = self.app.registry();
        for stage in &pipeline.stages {
            if registry.get(&stage.plugin.value).is_none() {
                return Err(DaemonError::Pipeline(pipeline.error(
                    &stage.plugin.position,
                    format!("stage[{}].plugin", stage.index),
                    format!(
                        "no plugin named `{}` is registered; available: {}",
                        espalier::display_safe::name(&stage.plugin.value),
                        registry.names().join(", ")
                    ),
                )));
            }
        }
        Ok(pipeline)
    }

    /// The pipelines of the pipeline folder, by name.
    pub fn pipelines(&self) -> Vec<PipelineEntry> {
        self.pipelines
            .read()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One pipeline of the folder.
    pub fn pipeline(&self, name: &str) -> Result<PipelineEntry, DaemonError> {
        self.pipelines
            .read()
            .ok()
            .and_then(|p| p.get(name).cloned())
            .ok_or_else(|| DaemonError::NotFound(format!("no pipeline named `{name}`")))
    }

    // ----- runs -----

    /// Queues a run; it starts when a runner is free (runs start in the order they came).
    pub fn submit(&self, request: RunRequest) -> Result<RunRecord, DaemonError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(DaemonError::ShuttingDown);
        }
        let (name, source, label, text) = match (&request.pipeline, &request.body) {
            (Some(name), None) => {
                let entry = self.pipeline(name)?;
                if let Some(e) = &entry.error {
                    return Err(DaemonError::BadRequest(format!(
                        "pipeline `{name}` cannot run: {e}"
                    )));
                }
                (name.clone(), PipelineSource::Named, entry.file, entry.text)
            }
            (None, Some(body)) => (
                String::new(),
                PipelineSource::Inline,
                "request.toml".to_string(),
                body.clone(),
            ),
            _ => {
                return Err(DaemonError::BadRequest(
                    "give either `pipeline` (a name from GET /v1/pipelines) or `body` (pipeline TOML), not both".into(),
                ));
            }
        };
        let mut pipeline = self.check_pipeline(&label, &text)?;
        if let Some(d) = request.overrides.density
            && !(0.0..=1.0).contains(&d)
        {
            return Err(DaemonError::BadRequest(format!(
                "overrides.density: {d} must be in [0, 1]"
            )));
        }
        if let Some(m) = &request.overrides.model {
            pipeline.model.value = self
                .layout
                .model(m)
                .map_err(|e| DaemonError::BadRequest(format!("overrides.model: {e}")))?;
        }
        let record = self.store.create(NewRun {
            pipeline_name: if name.is_empty() {
                pipeline.name.clone()
            } else {
                name
            },
            source,
            pipeline_text: text,
            overrides: serde_json::to_value(&request.overrides).unwrap_or(Value::Null),
            model: pipeline.model.value.clone(),
            export_dir: pipeline
                .export
                .as_ref()
                .map(|e| e.dir.value.display().to_string()),
        })?;
        self.live_run(record.id);
        self.feed(
            record.id,
            0,
            "run-queued",
            serde_json::to_value(&record).unwrap_or(Value::Null),
        );
        self.refresh_gauges();
        self.wake.1.notify_all();
        Ok(record)
    }

    fn live_run(&self, id: i64) -> Arc<LiveRun> {
        let mut live = match self.live.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        live.entry(id)
            .or_insert_with(|| {
                Arc::new(LiveRun {
                    cancel: CancelToken::new(),
                    events: broadcast::channel(1024).0,
                })
            })
            .clone()
    }

    /// The live event channel of a run in flight (`None` once it finished).
    pub fn subscribe(&self, id: i64) -> Option<broadcast::Receiver<StoredEvent>> {
        self.live
            .lock()
            .ok()
            .and_then(|l| l.get(&id).map(|r| r.events.subscribe()))
    }

    /// Every run's events from now on (`GET /v1/events`).
    pub fn subscribe_all(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed_tx.subscribe()
    }

    /// Events of run `id` after sequence number `after`.
    pub fn events_after(&self, id: i64, after: u64) -> Result<Vec<StoredEvent>, DaemonError> {
        Ok(self.store.events_after(id, after, 10_000)?)
    }

    /// One run.
    pub fn run(&self, id: i64) -> Result<RunRecord, DaemonError> {
        self.store
            .get(id)?
            .ok_or_else(|| DaemonError::NotFound(format!("no run with id {id}")))
    }

    /// The export folder of finished run `id`, or `None` when a later run exported to the same
    /// folder since (its `report.json` is no longer this run's). Runs of the same pipeline share
    /// `runs/out/NAME`, so the report is what tells whose model and masks are there.
    pub fn run_export_dir(&self, id: i64) -> Result<Option<PathBuf>, DaemonError> {
        let record = self.run(id)?;
        let report = record.report_path.ok_or_else(|| {
            DaemonError::NotFound(format!("run {id} has no report ({})", record.status))
        })?;
        let dir = record.export_dir.map(PathBuf::from).ok_or_else(|| {
            DaemonError::NotFound(format!(
                "run {id} exported nothing: its pipeline has no [export] section"
            ))
        })?;
        let ours = std::fs::read(&report)
            .map_err(|e| DaemonError::Internal(format!("cannot read {report}: {e}")))?;
        Ok(match std::fs::read(dir.join("report.json")) {
            Ok(exported) if exported == ours => Some(dir),
            _ => None,
        })
    }

    /// The masks a finished run exported (`masks.safetensors` of its export folder), or `None`
    /// when a later run replaced them (see [`Daemon::run_export_dir`]).
    pub fn run_masks(&self, id: i64) -> Result<Option<Vec<u8>>, DaemonError> {
        let Some(dir) = self.run_export_dir(id)? else {
            return Ok(None);
        };
        let masks = dir.join("masks.safetensors");
        if !masks.is_file() {
            return Err(DaemonError::NotFound(format!(
                "run {id} exported no masks (no {})",
                masks.display()
            )));
        }
        std::fs::read(&masks)
            .map(Some)
            .map_err(|e| DaemonError::Internal(format!("cannot read {}: {e}", masks.display())))
    }

    /// Runs, newest first.
    pub fn runs(&self, filter: &crate::store::RunFilter) -> Result<Vec<RunRecord>, DaemonError> {
        Ok(self.store.list(filter)?)
    }

    /// Cancels a queued run (it never starts) or a running one (it stops at the next check:
    /// between stages, inside the plugin call, inside calibration or evaluation).
    pub fn cancel(&self, id: i64) -> Result<RunRecord, DaemonError> {
        let record = self.run(id)?;
        if record.status.is_terminal() {
            return Err(DaemonError::Conflict(format!(
                "run {id} already ended ({}); nothing to cancel",
                record.status
            )));
        }
        if self.store.cancel_queued(id)? {
            // It never started: its terminal event goes to the store and to anyone following
            // it, then its live channel closes.
            let event = RunEvent::RunCancelled { seconds: 0.0 };
            match self.live.lock().ok().and_then(|mut l| l.remove(&id)) {
                Some(run) => self.record_event(id, &run, &event),
                None => {
                    let data = serde_json::to_value(&event).unwrap_or(Value::Null);
                    let seq = self.store.append_event(id, event.kind(), &data)?;
                    self.feed(id, seq, event.kind(), data);
                }
            }
        } else if let Some(run) = self.live.lock().ok().and_then(|l| l.get(&id).cloned()) {
            run.cancel.cancel();
        }
        self.refresh_gauges();
        self.run(id)
    }

    fn runner_loop(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let next = match self.store.claim_next() {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!("cannot take the next run: {e}");
                    None
                }
            };
            match next {
                Some(record) => {
                    self.refresh_gauges();
                    let id = record.id;
                    // A panic in the core must not take the runner (and its capacity) with it.
                    // The run's parallel work goes to the low-priority compute pool.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.compute.install(|| self.execute(record))
                    }));
                    if outcome.is_err() {
                        tracing::error!("run {id} panicked; recorded as failed");
                        let _ = self.finish(
                            id,
                            RunStatus::Failed,
                            None,
                            None,
                            Some((
                                ErrorKind::Internal,
                                "internal error: the run panicked".into(),
                            )),
                        );
                    }
                    self.refresh_gauges();
                }
                None => {
                    let guard = match self.wake.0.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    // Woken by a submit or a stop; the timeout covers a missed wake-up.
                    let _ = self.wake.1.wait_timeout(guard, Duration::from_millis(500));
                }
            }
        }
    }

    fn execute(&self, record: RunRecord) {
        let id = record.id;
        let live = self.live_run(id);
        let started = Instant::now();
        let run_dir = self.layout.run_dir(id);
        let prepared = (|| -> Result<(Pipeline, RunOverrides), DaemonError> {
            let label = match record.source {
                PipelineSource::Named => format!("{}.toml", record.pipeline_name),
                PipelineSource::Inline => "request.toml".to_string(),
            };
            let pipeline = self.check_pipeline(&label, &record.pipeline_text)?;
            let o: RunRequestOverrides =
                serde_json::from_value(record.overrides.clone()).unwrap_or_default();
            std::fs::create_dir_all(&run_dir).map_err(|e| {
                DaemonError::Internal(format!("cannot create {}: {e}", run_dir.display()))
            })?;
            Ok((
                pipeline,
                RunOverrides {
                    model: Some(record.model.clone()),
                    density: o.density,
                    ..RunOverrides::default()
                },
            ))
        })();
        let (pipeline, overrides) = match prepared {
            Ok(p) => p,
            Err(e) => {
                let _ = self.finish(
                    id,
                    RunStatus::Failed,
                    None,
                    None,
                    Some((ErrorKind::InvalidPipeline, e.to_string())),
                );
                return;
            }
        };
        let mut held_back = None;
        let mut total_stages = 1usize;
        let mut sink = |event: RunEvent| {
            match &event {
                // The terminal event is stored after the record is final, so a client that
                // sees it and reads the run finds the final state.
                RunEvent::RunFinished { .. }
                | RunEvent::RunFailed { .. }
                | RunEvent::RunCancelled { .. } => {
                    held_back = Some(event);
                    return;
                }
                RunEvent::RunStarted { plugins, .. } => {
                    let _ = self.store.set_plugins(id, plugins);
                }
                RunEvent::StageStarted {
                    index, total, name, ..
                } => {
                    total_stages = *total;
                    let _ = self.store.set_progress(
                        id,
                        Some(name),
                        *index as f64 / (*total).max(1) as f64,
                    );
                }
                RunEvent::StageFinished { index, report } => {
                    self.metrics
                        .observe_stage(&report.plugin, Duration::from_secs_f64(report.seconds));
                    let done = (*index + 1) as f64 / total_stages.max(1) as f64;
                    let _ = self.store.set_progress(id, Some(&report.name), done);
                }
                _ => {}
            }
            self.record_event(id, &live, &event);
        };
        let result = self
            .app
            .run_pipeline(pipeline, &overrides, &mut sink, &live.cancel);
        let seconds = started.elapsed().as_secs_f64();
        let (status, metrics, report_path, error) = match &result {
            Ok(r) => {
                let path = run_dir.join("report.json");
                let report_path = serde_json::to_vec_pretty(&r.report)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()))
                    .map(|()| path.display().to_string())
                    .inspect_err(|e| tracing::error!("run {id}: cannot write the report: {e}"))
                    .ok();
                (
                    RunStatus::Succeeded,
                    Some(run_metrics(&r.report, seconds)),
                    report_path,
                    None,
                )
            }
            Err(e) if e.kind() == ErrorKind::Cancelled => (
                RunStatus::Cancelled,
                None,
                None,
                Some((e.kind(), e.to_string())),
            ),
            Err(e) => (
                RunStatus::Failed,
                None,
                None,
                Some((e.kind(), e.to_string())),
            ),
        };
        let _ = self.finish(id, status, metrics, report_path, error);
        if let Some(event) = held_back {
            self.record_event(id, &live, &event);
        }
        if let Ok(mut l) = self.live.lock() {
            l.remove(&id);
        }
    }

    /// Sends one event to the daemon-wide feed (nobody listening is not an error).
    fn feed(&self, run: i64, seq: u64, event_type: &str, event: Value) {
        let _ = self.feed_tx.send(FeedEvent {
            run,
            seq,
            event_type: event_type.to_string(),
            event,
        });
    }

    fn record_event(&self, id: i64, live: &LiveRun, event: &RunEvent) {
        let data = serde_json::to_value(event).unwrap_or(Value::Null);
        match self.store.append_event(id, event.kind(), &data) {
            Ok(seq) => {
                self.feed(id, seq, event.kind(), data.clone());
                let _ = live.events.send(StoredEvent {
                    seq,
                    event_type: event.kind().to_string(),
                    data,
                    at: String::new(),
                });
            }
            Err(e) => tracing::error!("run {id}: cannot store an event: {e}"),
        }
    }

    fn finish(
        &self,
        id: i64,
        status: RunStatus,
        metrics: Option<Value>,
        report_path: Option<String>,
        error: Option<(ErrorKind, String)>,
    ) -> Result<RunRecord, DaemonError> {
        let record = self.store.finish(
            id,
            Finish {
                status,
                metrics,
                report_path,
                error: error.map(|(kind, message)| RunErrorInfo {
                    kind: kind.as_str().to_string(),
                    message,
                }),
            },
        )?;
        Ok(record)
    }

    /// Updates the run-state gauges from the store.
    pub fn refresh_gauges(&self) {
        if let Ok(counts) = self.store.counts_by_status() {
            self.metrics.set_runs_by_state(&counts);
        }
        if let Ok(n) = self.store.queue_len() {
            self.metrics.set_queue_length(n);
        }
    }

    /// Model folders in `models/`, plus what `fetch:` can download.
    pub fn models(&self) -> Value {
        let mut local = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.layout.models) {
            for e in entries.flatten() {
                let p = e.path();
                if p.join("config.json").is_file() {
                    local.push(json!({
                        "name": e.file_name().to_string_lossy(),
                        "reference": format!("models/{}", e.file_name().to_string_lossy()),
                    }));
                }
            }
        }
        local.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let fetchable: Vec<Value> = espalier::fetch::FETCHABLE
            .iter()
            .map(|(name, _, what)| json!({"reference": format!("fetch:{name}"), "description": what}))
            .collect();
        let builtin: Vec<Value> = espalier_engine::builtin::BUILTIN_MODELS
            .iter()
            .map(
                |(name, what)| json!({"reference": format!("builtin:{name}"), "description": what}),
            )
            .collect();
        json!({"local": local, "fetchable": fetchable, "builtin": builtin})
    }

    /// Downloads and imports a `fetch:` model into `models/` (blocking; minutes on first use).
    pub fn fetch_model(&self, name: &str) -> Result<String, DaemonError> {
        let reference = format!("fetch:{name}");
        espalier::fetch::resolve(&reference, &self.layout.models, &mut |m| {
            tracing::info!("{m}")
        })
        .map_err(|e| match e {
            espalier::fetch::FetchError::Unknown(..) => DaemonError::NotFound(e.to_string()),
            other => DaemonError::Internal(other.to_string()),
        })
    }

    /// Stops taking runs; cancels running ones or lets them finish (as configured); waits for
    /// the runners. Queued runs stay queued for the next start.
    pub fn shutdown(&self, background: Background) {
        self.accepting.store(false, Ordering::SeqCst);
        if self.config.on_shutdown == ShutdownMode::Cancel
            && let Ok(live) = self.live.lock()
        {
            for run in live.values() {
                run.cancel.cancel();
            }
        }
        // Runners finish the run they hold, then see `stopping` before claiming another.
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.1.notify_all();
        for r in background.runners {
            let _ = r.join();
        }
    }

    /// Refuses new runs from now on (shutdown has begun).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Whether the daemon still accepts runs.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }
}

/// Figures a run record keeps for listing and comparing runs.
/// Lowers the calling thread's scheduling priority (nice 10), so runs that saturate the cores
/// leave the HTTP threads room to answer.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take no pointers; on Linux PRIO_PROCESS with a thread
        // id changes only that thread.
        let result = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 10)
        };
        if result != 0 {
            tracing::debug!(
                "could not lower the runner's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn run_metrics(report: &espalier::report::RunReport, seconds: f64) -> Value {
    let ppl = |e: &espalier::evaluate::Evaluation| e.perplexity.as_ref().map(|p| p.perplexity);
    json!({
        "seconds": seconds,
        "block_linear_density": report.summary.block_linear_density,
        "all_weights_density": report.summary.all_weights_density,
        "parameters_before": report.summary.parameters_before,
        "parameters_after": report.summary.parameters_after,
        "nonzero_parameters_after": report.summary.nonzero_parameters_after,
        "perplexity_dense": report.evaluation.as_ref().and_then(|c| ppl(&c.dense)),
        "perplexity_pruned": report.evaluation.as_ref().and_then(|c| ppl(&c.pruned)),
    })
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` can be used as `NAME.wasm` in the plugin folder without leaving it or
/// hiding: letters, digits, `-`, `_`, `.`, not starting with `.`, at most 64 bytes.
pub fn safe_file_stem(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_that_are_not_file_names_are_refused() {
        assert!(safe_file_stem("slow-magnitude"));
        assert!(safe_file_stem("v1.2_x"));
        for bad in ["", "../x", "a/b", ".hidden", "x\u{0}", &"y".repeat(65), "é"] {
            assert!(!safe_file_stem(bad), "{bad:?}");
        }
    }
}
