//! The wasmtime side of plugins: one Engine per process, components compiled once and cached
//! by the sha256 of their bytes, one Store per plugin instance with a memory cap and an epoch
//! deadline, and classification of guest failures into errors a user can act on. Every call
//! (`describe`, `validate`, `apply`) gets the same limits, so a planning-time `validate` that
//! loops or traps fails like an `apply` would, as a [`PluginError`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};

use crate::cancel::{CancelToken, Cancelled};

use super::bindings::{
    ParamProblem, PlanningContext, PluginInfo, StageContext, StageOutput, UpdateContext, v0_1,
    v0_2, v0_3, v0_4, v0_5, v0_6,
};
use super::compat;
use super::progress::{Progress, ProgressGate};
use super::state::{Limits, ModelView, PluginState};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(10);

/// Sandbox settings for running one plugin call.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    /// Wall-clock budget of one call into the guest.
    pub timeout: Duration,
    /// Guest linear-memory cap, bytes.
    pub guest_memory: usize,
    /// Cap on host tensors allocated for the plugin, bytes.
    pub host_memory: usize,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            timeout: Duration::from_secs(60),
            guest_memory: 1 << 30,
            host_memory: 8 << 30,
        }
    }
}

/// Why a plugin call failed.
///
/// The fields keep the full text; `Display` shows the plugin-supplied parts escaped and capped
/// ([`crate::display_safe`]), so an error printed to a terminal cannot drive it.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a loadable component.
    #[error("`{}` is not a valid Espalier plugin: {}", safe_name(.plugin), safe_message(.message))]
    Invalid {
        /// Plugin name or file.
        plugin: String,
        /// What is wrong, with a hint.
        message: String,
    },
    /// A plugin named by registry reference could not be pulled or failed verification.
    #[error(transparent)]
    Pull(#[from] super::oci::OciError),
    /// The plugin is refused by the signature policy (unsigned, tampered, untrusted).
    #[error("plugin `{}` is refused: {}", safe_name(.plugin), safe_message(.message))]
    Refused {
        /// Plugin name or file.
        plugin: String,
        /// Why, with the fix.
        message: String,
    },
    /// The guest ran past its deadline and was stopped.
    #[error(
        "plugin `{}` exceeded its time limit of {seconds:.1} s and was stopped (raise `sandbox.timeout_s` if it is legitimately slow)",
        safe_name(.plugin)
    )]
    Timeout {
        /// Plugin name.
        plugin: String,
        /// The limit.
        seconds: f64,
    },
    /// The guest tried to grow its memory past the cap.
    #[error(
        "plugin `{}` exceeded its memory limit of {mib} MiB and was stopped (raise `sandbox.memory_mb` if it legitimately needs more)",
        safe_name(.plugin)
    )]
    Memory {
        /// Plugin name.
        plugin: String,
        /// The cap.
        mib: usize,
    },
    /// The guest panicked; its panic message (from what it printed) is the cause.
    #[error("plugin `{}` panicked: {}", safe_name(.plugin), safe_message(.message))]
    Panicked {
        /// Plugin name.
        plugin: String,
        /// The panic message and where it was raised.
        message: String,
        /// The trap that ended the call, with its backtrace.
        trap: String,
    },
    /// The guest trapped (unreachable, bad handle, ...) without a panic message.
    #[error("plugin `{}` crashed: {}", safe_name(.plugin), safe_message(.message))]
    Trap {
        /// Plugin name.
        plugin: String,
        /// The trap and its backtrace.
        message: String,
    },
    /// The run was cancelled from outside while the guest ran.
    #[error("plugin `{}` was stopped: the run was cancelled", safe_name(.plugin))]
    Cancelled {
        /// Plugin name.
        plugin: String,
    },
    /// The guest returned an error of its own.
    #[error("plugin `{}` failed: {}", safe_name(.plugin), safe_message(.message))]
    Failed {
        /// Plugin name.
        plugin: String,
        /// The guest's message.
        message: String,
    },
}

fn safe_name(s: &str) -> String {
    crate::display_safe::name(s)
}

fn safe_message(s: &str) -> String {
    crate::display_safe::message(s, "  ")
}

/// Advances the engine's epoch on a background thread until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("espalier-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .ok();
        EpochTicker { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The version of the `espalier:prune` WIT package a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum WitVersion {
    /// `espalier:prune@0.1.0` (weights and kernels only).
    #[serde(rename = "0.1.0")]
    V0_1,
    /// `espalier:prune@0.2.0` (adds calibration statistics).
    #[serde(rename = "0.2.0")]
    V0_2,
    /// `espalier:prune@0.3.0` (adds gradients and multi-layer loss trials).
    #[serde(rename = "0.3.0")]
    V0_3,
    /// `espalier:prune@0.4.0` (adds planning-time `validate` and `progress` reports).
    #[serde(rename = "0.4.0")]
    V0_4,
    /// `espalier:prune@0.5.0` (adds OBS kernels on Hessian handles and updated-weight outputs).
    #[serde(rename = "0.5.0")]
    V0_5,
    /// `espalier:prune@0.6.0` (adds mask updates during fine-tuning: RigL, SET).
    #[serde(rename = "0.6.0")]
    V0_6,
}

impl std::fmt::Display for WitVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WitVersion::V0_1 => "0.1.0",
            WitVersion::V0_2 => "0.2.0",
            WitVersion::V0_3 => "0.3.0",
            WitVersion::V0_4 => "0.4.0",
            WitVersion::V0_5 => "0.5.0",
            WitVersion::V0_6 => "0.6.0",
        })
    }
}

/// A compiled plugin, ready to instantiate.
#[derive(Clone)]
pub struct CompiledPlugin {
    /// sha256 of the component bytes, hex.
    pub sha256: String,
    /// The WIT version it imports, which picks the world it is instantiated in.
    pub wit: WitVersion,
    /// Whether it imports `progress` (0.4 and later): only then does an `apply` watch for its reports.
    pub reports_progress: bool,
    component: Component,
}

/// An instance of any served world.
enum Instance {
    V0_1(v0_1::Criterion),
    V0_2(v0_2::Criterion),
    V0_3(v0_3::Criterion),
    V0_4(v0_4::Criterion),
    V0_5(v0_5::Criterion),
    V0_6(v0_6::Criterion),
}

/// Timings of one `apply` call.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CallTimings {
    /// Wall time of the call, guest and host imports together.
    pub call: Duration,
    /// Time spent in host imports (kernels, reads) during the call.
    pub host: Duration,
    /// Instantiation time.
    pub instantiate: Duration,
}

impl CallTimings {
    /// Time inside the guest plus crossing the boundary.
    pub fn guest_and_boundary(&self) -> Duration {
        self.call.saturating_sub(self.host)
    }
}

/// The process-wide plugin runtime.
pub struct Runtime {
    engine: Engine,
    /// One linker per served WIT version; all link the same host state and WASI.
    linker_v0_1: Linker<PluginState>,
    linker_v0_2: Linker<PluginState>,
    linker_v0_3: Linker<PluginState>,
    linker_v0_4: Linker<PluginState>,
    linker_v0_5: Linker<PluginState>,
    linker_v0_6: Linker<PluginState>,
    /// Compiled components by sha256, most recently inserted last; bounded, since a daemon
    /// sees every version of every hot-reloaded plugin. Runs hold their own clones, so
    /// eviction never affects a run in flight.
    cache: Mutex<MemoryCache>,
    /// Where compiled components are kept between processes (`None`: compile every start).
    disk_cache: Option<PathBuf>,
    /// Components compiled by this runtime, and loaded from the disk cache instead.
    compiled: std::sync::atomic::AtomicUsize,
    loaded_from_disk: std::sync::atomic::AtomicUsize,
    _ticker: EpochTicker,
}

/// Components kept in memory at most.
const MEMORY_CACHE_ENTRIES: usize = 64;

#[derive(Default)]
struct MemoryCache {
    by_sha: HashMap<String, Component>,
    order: VecDeque<String>,
}

impl MemoryCache {
    fn get(&self, sha256: &str) -> Option<Component> {
        self.by_sha.get(sha256).cloned()
    }

    fn insert(&mut self, sha256: String, component: Component) {
        if self.by_sha.insert(sha256.clone(), component).is_none() {
            self.order.push_back(sha256);
        }
        while self.order.len() > MEMORY_CACHE_ENTRIES {
            if let Some(old) = self.order.pop_front() {
                self.by_sha.remove(&old);
            }
        }
    }
}

/// The compiled-code key of this engine: wasmtime's compatibility hash (target, compiler
/// settings, features, and wasmtime's own version), so a cache written by another build is
/// never loaded.
fn engine_key(engine: &Engine) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("engine-{:016x}", h.finish())
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Runtime {
    /// Builds the engine (epoch interruption on, component-model concurrency off: it makes
    /// every component call about 4x slower and plugins do not use async) and the linker.
    pub fn new() -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.concurrency_support(false);
        let engine =
            Engine::new(&config).map_err(|e| anyhow::anyhow!("cannot start wasmtime: {e}"))?;
        let mut linker_v0_1 = Linker::new(&engine);
        let mut linker_v0_2 = Linker::new(&engine);
        let mut linker_v0_3 = Linker::new(&engine);
        let mut linker_v0_4 = Linker::new(&engine);
        let mut linker_v0_5 = Linker::new(&engine);
        let mut linker_v0_6 = Linker::new(&engine);
        for linker in [
            &mut linker_v0_1,
            &mut linker_v0_2,
            &mut linker_v0_3,
            &mut linker_v0_4,
            &mut linker_v0_5,
            &mut linker_v0_6,
        ] {
            wasmtime_wasi::p2::add_to_linker_sync(linker)
                .map_err(|e| anyhow::anyhow!("cannot link WASI: {e}"))?;
        }
        v0_1::Criterion::add_to_linker::<_, HasSelf<_>>(&mut linker_v0_1, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the espalier:prune@0.1.0 imports: {e}"))?;
        v0_2::Criterion::add_to_linker::<_, HasSelf<_>>(&mut linker_v0_2, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the espalier:prune@0.2.0 imports: {e}"))?;
        v0_3::Criterion::add_to_linker::<_, HasSelf<_>>(&mut linker_v0_3, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the espalier:prune@0.3.0 imports: {e}"))?;
        v0_4::Criterion::add_to_linker::<_, HasSelf<_>>(&mut linker_v0_4, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the espalier:prune@0.4.0 imports: {e}"))?;
        v0_5::Criterion::add_to_linker::<_, HasSelf<_>>(&mut linker_v0_5, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the espalier:prune@0.5.0 imports: {e}"))?;
        v0_6::Criterion::add_to_linker::<_, HasSelf<_>>(&mut linker_v0_6, |s| s)
            .map_err(|e| anyhow::anyhow!("cannot link the espalier:prune@0.6.0 imports: {e}"))?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(Runtime {
            engine,
            linker_v0_1,
            linker_v0_2,
            linker_v0_3,
            linker_v0_4,
            linker_v0_5,
            linker_v0_6,
            cache: Mutex::new(MemoryCache::default()),
            disk_cache: None,
            compiled: Default::default(),
            loaded_from_disk: Default::default(),
            _ticker: ticker,
        })
    }

    /// As [`Runtime::new`], keeping compiled components in `dir` (created if missing) so the
    /// next process loads them instead of compiling: files `SHA256.cwasm` under a folder named
    /// after wasmtime's compatibility hash (which covers its version). The folder must be as trusted as the
    /// binary (wasmtime maps its files as native code); only Espalier writes there, each file
    /// written to a temporary name and renamed, so a crash never leaves a partial one.
    pub fn with_disk_cache(dir: &Path) -> anyhow::Result<Self> {
        let mut runtime = Self::new()?;
        let dir = dir.join(engine_key(&runtime.engine));
        std::fs::create_dir_all(&dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the compiled-plugin cache {}: {e}",
                dir.display()
            )
        })?;
        runtime.disk_cache = Some(dir);
        Ok(runtime)
    }

    /// The folder compiled components are cached in, if any.
    pub fn disk_cache(&self) -> Option<&Path> {
        self.disk_cache.as_deref()
    }

    /// (components compiled, components loaded from the disk cache) so far.
    pub fn compile_counts(&self) -> (usize, usize) {
        (
            self.compiled.load(Ordering::Relaxed),
            self.loaded_from_disk.load(Ordering::Relaxed),
        )
    }

    fn cached_on_disk(&self, sha256: &str) -> Option<Component> {
        let path = self.disk_cache.as_ref()?.join(format!("{sha256}.cwasm"));
        if !path.is_file() {
            return None;
        }
        // SAFETY: files in the cache folder are written only by `store_on_disk` below, from
        // `Component::serialize` of this engine configuration (the folder name carries
        // wasmtime's compatibility hash, which covers its version; wasmtime checks both again
        // on load).
        match unsafe { Component::deserialize_file(&self.engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    "ignoring compiled-plugin cache file {}: {e:#}",
                    path.display()
                );
                None
            }
        }
    }

    fn store_on_disk(&self, sha256: &str, component: &Component) {
        let Some(dir) = &self.disk_cache else { return };
        let path = dir.join(format!("{sha256}.cwasm"));
        let written = component
            .serialize()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| {
                crate::atomic::write_atomic(&path, &bytes).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!("cannot cache the compiled plugin in {}: {e}", dir.display());
        }
    }

    /// The names a compiled component imports and exports (listed in an OCI artifact's
    /// config, which registries and other wasm tools show).
    pub fn interfaces(&self, compiled: &CompiledPlugin) -> (Vec<String>, Vec<String>) {
        let ty = compiled.component.component_type();
        (
            ty.imports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
            ty.exports(&self.engine)
                .map(|(n, _)| n.to_string())
                .collect(),
        )
    }

    /// Compiles component bytes, or returns the cached compilation of identical bytes.
    pub fn compile(&self, label: &str, bytes: &[u8]) -> Result<CompiledPlugin, PluginError> {
        let sha256 = sha256_hex(bytes);
        if let Some(c) = self.cache.lock().ok().and_then(|c| c.get(&sha256)) {
            return Ok(self.compiled_plugin(sha256, c));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(PluginError::Invalid {
                plugin: label.to_string(),
                message: "the file is not WebAssembly (no `\\0asm` header); build plugins with \
                          `cargo build --release --target wasm32-wasip2`"
                    .into(),
            });
        }
        // Byte 4..8 is the version/layer field: components have layer 1, core modules 0.
        if bytes.len() >= 8 && bytes[6] == 0 && bytes[7] == 0 {
            return Err(PluginError::Invalid {
                plugin: label.to_string(),
                message: "this is a core WebAssembly module, not a component; build for the \
                          `wasm32-wasip2` target (or wrap it with `wasm-tools component new`)"
                    .into(),
            });
        }
        let component = match self.cached_on_disk(&sha256) {
            Some(c) => {
                self.loaded_from_disk.fetch_add(1, Ordering::Relaxed);
                c
            }
            None => {
                self.compiled.fetch_add(1, Ordering::Relaxed);
                let c = Component::new(&self.engine, bytes).map_err(|e| PluginError::Invalid {
                    plugin: label.to_string(),
                    message: format!("cannot compile the component: {e:#}"),
                })?;
                self.store_on_disk(&sha256, &c);
                c
            }
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(sha256.clone(), component.clone());
        }
        Ok(self.compiled_plugin(sha256, component))
    }

    fn compiled_plugin(&self, sha256: String, component: Component) -> CompiledPlugin {
        let ty = component.component_type();
        let ours: Vec<String> = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .filter(|n| n.starts_with("espalier:prune/"))
            .collect();
        let exports_validate = ty.exports(&self.engine).any(|(name, _)| name == "validate");
        CompiledPlugin {
            sha256,
            wit: wit_version(&ours, exports_validate),
            reports_progress: ours.iter().any(|n| {
                n == "espalier:prune/progress@0.4.0"
                    || n == "espalier:prune/progress@0.5.0"
                    || n == "espalier:prune/progress@0.6.0"
            }),
            component,
        }
    }

    fn store(
        &self,
        model: Arc<ModelView>,
        sandbox: &Sandbox,
        cancel: &CancelToken,
    ) -> Store<PluginState> {
        let state = PluginState::new(
            model,
            Limits {
                guest_memory: sandbox.guest_memory,
                host_memory: sandbox.host_memory,
            },
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        arm_deadline(&mut store, sandbox.timeout, cancel);
        store
    }

    fn instantiate(
        &self,
        label: &str,
        plugin: &CompiledPlugin,
        store: &mut Store<PluginState>,
        sandbox: &Sandbox,
    ) -> Result<Instance, PluginError> {
        let instance = match plugin.wit {
            WitVersion::V0_1 => {
                v0_1::Criterion::instantiate(&mut *store, &plugin.component, &self.linker_v0_1)
                    .map(Instance::V0_1)
            }
            WitVersion::V0_2 => {
                v0_2::Criterion::instantiate(&mut *store, &plugin.component, &self.linker_v0_2)
                    .map(Instance::V0_2)
            }
            WitVersion::V0_3 => {
                v0_3::Criterion::instantiate(&mut *store, &plugin.component, &self.linker_v0_3)
                    .map(Instance::V0_3)
            }
            WitVersion::V0_4 => {
                v0_4::Criterion::instantiate(&mut *store, &plugin.component, &self.linker_v0_4)
                    .map(Instance::V0_4)
            }
            WitVersion::V0_5 => {
                v0_5::Criterion::instantiate(&mut *store, &plugin.component, &self.linker_v0_5)
                    .map(Instance::V0_5)
            }
            WitVersion::V0_6 => {
                v0_6::Criterion::instantiate(&mut *store, &plugin.component, &self.linker_v0_6)
                    .map(Instance::V0_6)
            }
        };
        instance.map_err(|e| {
            let message = format!("{e:#}");
            if message.contains("matching implementation was not found")
                || message.contains("import")
            {
                PluginError::Invalid {
                    plugin: label.to_string(),
                    message: format!(
                        "it needs imports this host does not provide ({message}); it may target \
                         another version of the espalier:prune WIT package"
                    ),
                }
            } else {
                classify(label, e, sandbox, &store.data().output().1)
            }
        })
    }

    /// Instantiates the plugin in a fresh Store and calls `describe`.
    pub fn describe(
        &self,
        label: &str,
        plugin: &CompiledPlugin,
        model: Arc<ModelView>,
        sandbox: &Sandbox,
    ) -> Result<PluginInfo, PluginError> {
        let mut store = self.store(model, sandbox, &CancelToken::new());
        let instance = self.instantiate(label, plugin, &mut store, sandbox)?;
        let info = match instance {
            Instance::V0_1(i) => i
                .call_describe(&mut store)
                .map(compat::v1::plugin_info_from),
            Instance::V0_2(i) => i
                .call_describe(&mut store)
                .map(compat::v2::plugin_info_from),
            Instance::V0_3(i) => i
                .call_describe(&mut store)
                .map(compat::v3::plugin_info_from),
            Instance::V0_4(i) => i
                .call_describe(&mut store)
                .map(compat::v4::plugin_info_from),
            Instance::V0_5(i) => i
                .call_describe(&mut store)
                .map(compat::v5::plugin_info_from),
            Instance::V0_6(i) => i.call_describe(&mut store),
        };
        log_output(label, &store);
        info.map_err(|e| classify(label, e, sandbox, &store.data().output().1))
    }

    /// Instantiates the plugin in a fresh Store and calls `validate` (0.4 and later) on a
    /// stage at planning: `Ok(Err(problems))` when it refuses the stage. A plugin of an older
    /// version has no `validate`: nothing is instantiated and the stage passes (the host's own
    /// checks still apply). `model` describes the model without weights: planning runs before
    /// anything is computed.
    pub fn validate(
        &self,
        label: &str,
        plugin: &CompiledPlugin,
        model: Arc<ModelView>,
        sandbox: &Sandbox,
        ctx: &PlanningContext,
    ) -> Result<Result<(), Vec<ParamProblem>>, PluginError> {
        if plugin.wit < WitVersion::V0_4 {
            return Ok(Ok(()));
        }
        let cancel = CancelToken::new();
        let mut store = self.store(model, sandbox, &cancel);
        let instance = self.instantiate(label, plugin, &mut store, sandbox)?;
        // The deadline counts from the call, as for `apply`.
        arm_deadline(&mut store, sandbox.timeout, &cancel);
        let result = match instance {
            Instance::V0_6(i) => i.call_validate(&mut store, ctx),
            Instance::V0_5(i) => i
                .call_validate(&mut store, &compat::v5_planning::planning_context_to(ctx))
                .map(|r| r.map_err(compat::v5_planning::problems_from)),
            Instance::V0_4(i) => i
                .call_validate(&mut store, &compat::v4_planning::planning_context_to(ctx))
                .map(|r| r.map_err(compat::v4_planning::problems_from)),
            _ => return Ok(Ok(())),
        };
        log_output(label, &store);
        result.map_err(|e| classify(label, e, sandbox, &store.data().output().1))
    }

    /// Instantiates the plugin in a fresh Store and calls `apply`. The Store (and with it every
    /// handle the plugin held) is dropped when the call returns, whatever happened; the
    /// returned closure-free state lets the caller take the masks out first.
    ///
    /// `progress` receives the plugin's progress reports (0.4 plugins that import `progress`),
    /// filtered by a [`ProgressGate`], while the guest runs: a helper thread drains them, so the
    /// guest runs on this thread (in the caller's rayon pool) and never waits for the receiver.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &self,
        label: &str,
        plugin: &CompiledPlugin,
        model: Arc<ModelView>,
        sandbox: &Sandbox,
        ctx: &StageContext,
        cancel: &CancelToken,
        progress: Option<&mut (dyn FnMut(Progress) + Send)>,
    ) -> Result<(StageOutput, Store<PluginState>, CallTimings), PluginError> {
        let mut store = self.store(model, sandbox, cancel);
        let started = Instant::now();
        let instance = self.instantiate(label, plugin, &mut store, sandbox)?;
        let instantiate = started.elapsed();
        // The deadline counts from the call, not from instantiation.
        arm_deadline(&mut store, sandbox.timeout, cancel);
        let call_start = Instant::now();
        let call_guest = |store: &mut Store<PluginState>| match instance {
            Instance::V0_1(i) => i
                .call_apply(&mut *store, &compat::v1::stage_context_to(ctx))
                .map(|r| r.map(compat::v1::stage_output_from)),
            Instance::V0_2(i) => i
                .call_apply(&mut *store, &compat::v2::stage_context_to(ctx))
                .map(|r| r.map(compat::v2::stage_output_from)),
            Instance::V0_3(i) => i
                .call_apply(&mut *store, &compat::v3::stage_context_to(ctx))
                .map(|r| r.map(compat::v3::stage_output_from)),
            Instance::V0_4(i) => i
                .call_apply(&mut *store, &compat::v4::stage_context_to(ctx))
                .map(|r| r.map(compat::v4::stage_output_from)),
            Instance::V0_5(i) => i
                .call_apply(&mut *store, &compat::v5::stage_context_to(ctx))
                .map(|r| r.map(compat::v5::stage_output_from)),
            Instance::V0_6(i) => i.call_apply(&mut *store, ctx),
        };
        let result = match progress {
            Some(receiver) if plugin.reports_progress => {
                let (gate, reports) = ProgressGate::new();
                store.data_mut().progress = Some(gate);
                with_drain(reports, receiver, || {
                    let r = call_guest(&mut store);
                    // Closes the channel: the drain ends once it has passed on what is left.
                    store.data_mut().progress = None;
                    r
                })
            }
            _ => call_guest(&mut store),
        };
        let call = call_start.elapsed();
        log_output(label, &store);
        let output = result.map_err(|e| classify(label, e, sandbox, &store.data().output().1))?;
        let output = output.map_err(|message| PluginError::Failed {
            plugin: label.to_string(),
            message,
        })?;
        let timings = CallTimings {
            call,
            host: store.data().host_time,
            instantiate,
        };
        Ok((output, store, timings))
    }

    /// Instantiates a 0.6 plugin in a fresh Store and calls `update-masks` at one mask update
    /// during fine-tuning (see [`crate::dynamic`]). `ctx` is made by `make_ctx` inside the
    /// Store, which puts the layers' handles in its table (booked like any handle the plugin
    /// holds). Returns the plugin's masks by layer, taken out of the Store, and the call's
    /// timings. A plugin of an older version has no such export: refused with a message.
    pub fn update_masks(
        &self,
        label: &str,
        plugin: &CompiledPlugin,
        model: Arc<ModelView>,
        sandbox: &Sandbox,
        make_ctx: impl FnOnce(&mut PluginState) -> Result<UpdateContext, String>,
        cancel: &CancelToken,
    ) -> Result<(Vec<(String, crate::mask::Mask)>, CallTimings), PluginError> {
        if plugin.wit < WitVersion::V0_6 {
            return Err(PluginError::Invalid {
                plugin: label.to_string(),
                message: format!(
                    "it was built against espalier:prune@{}, which has no `update-masks` (mask updates during fine-tuning need 0.6.0)",
                    plugin.wit
                ),
            });
        }
        let mut store = self.store(model, sandbox, cancel);
        let started = Instant::now();
        let instance = self.instantiate(label, plugin, &mut store, sandbox)?;
        let instantiate = started.elapsed();
        let Instance::V0_6(instance) = instance else {
            return Err(PluginError::Invalid {
                plugin: label.to_string(),
                message: "internal: a 0.6 plugin instantiated in another world".into(),
            });
        };
        let ctx = make_ctx(store.data_mut()).map_err(|message| PluginError::Failed {
            plugin: label.to_string(),
            message,
        })?;
        arm_deadline(&mut store, sandbox.timeout, cancel);
        let call_start = Instant::now();
        let result = instance.call_update_masks(&mut store, &ctx);
        let call = call_start.elapsed();
        log_output(label, &store);
        let output = result.map_err(|e| classify(label, e, sandbox, &store.data().output().1))?;
        let output = output.map_err(|message| PluginError::Failed {
            plugin: label.to_string(),
            message,
        })?;
        let mut masks = Vec::with_capacity(output.len());
        for m in output {
            let mask = store
                .data_mut()
                .take_mask(m.mask)
                .map_err(|e| classify(label, e, sandbox, ""))?;
            masks.push((m.layer, mask));
        }
        let timings = CallTimings {
            call,
            host: store.data().host_time,
            instantiate,
        };
        Ok((masks, timings))
    }
}

/// Runs `call` on this thread while a scoped helper thread passes the reports arriving on
/// `reports` to `receiver`. The helper ends when the channel closes (the call drops the sender
/// when it is done) or, should `call` unwind, shortly after it (a flag set on drop), so this
/// never waits on a guest that is gone.
fn with_drain<R>(
    reports: std::sync::mpsc::Receiver<Progress>,
    receiver: &mut (dyn FnMut(Progress) + Send),
    call: impl FnOnce() -> R,
) -> R {
    use std::sync::mpsc::RecvTimeoutError;
    struct SetOnDrop<'a>(&'a AtomicBool);
    impl Drop for SetOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let finished = AtomicBool::new(false);
    let flag = &finished;
    std::thread::scope(|s| {
        // The receiving end moves to the helper (it is not `Sync`); the callback is borrowed.
        s.spawn(move || {
            loop {
                match reports.recv_timeout(Duration::from_millis(50)) {
                    Ok(p) => receiver(p),
                    Err(RecvTimeoutError::Timeout) if !flag.load(Ordering::Acquire) => {}
                    Err(_) => break,
                }
            }
        });
        let _finished = SetOnDrop(flag);
        call()
    })
}

/// The world a component is served from the `espalier:prune` interfaces it imports (`ours`)
/// and whether it exports `validate`. The oldest version named wins (a component built against
/// 0.1 imports only 0.1 interfaces); one that imports none of them (possible: the exports are
/// plain functions) is told apart by `validate`, which only 0.4 and later have (and is served
/// as 0.4: it imports nothing 0.5 added).
fn wit_version(ours: &[String], exports_validate: bool) -> WitVersion {
    let imports = |v: &str| ours.iter().any(|n| n.ends_with(v));
    if imports("@0.1.0") {
        WitVersion::V0_1
    } else if imports("@0.2.0") {
        WitVersion::V0_2
    } else if imports("@0.3.0") {
        WitVersion::V0_3
    } else if imports("@0.4.0") || (exports_validate && !imports("@0.5.0") && !imports("@0.6.0")) {
        WitVersion::V0_4
    } else if imports("@0.5.0") {
        WitVersion::V0_5
    } else if imports("@0.6.0") {
        WitVersion::V0_6
    } else {
        WitVersion::V0_3
    }
}

/// Stops the guest `timeout` from now, or at the next tick after `cancel` is cancelled: the
/// callback runs on every epoch tick (10 ms), reads the token, and interrupts the guest (a
/// timeout trap) once the wall-clock deadline has passed.
fn arm_deadline(store: &mut Store<PluginState>, timeout: Duration, cancel: &CancelToken) {
    let deadline = Instant::now() + timeout;
    let cancel = cancel.clone();
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if cancel.is_cancelled() {
            return Err(wasmtime::Error::new(Cancelled));
        }
        if Instant::now() >= deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Continue(1))
    });
}

/// Logs what the guest printed, escaped and capped: it goes to the user's terminal.
fn log_output(label: &str, store: &Store<PluginState>) {
    let (out, err) = store.data().output();
    let plugin = crate::display_safe::name(label);
    for (stream, text) in [("stdout", out), ("stderr", err)] {
        for line in crate::display_safe::log_lines(&text) {
            tracing::info!(plugin = %plugin, stream, "{line}");
        }
    }
}

/// The message of a Rust panic in what a guest printed to stderr, with its location:
/// `thread '…' panicked at src/lib.rs:3:5:\nMESSAGE\nnote: …` becomes `MESSAGE (at src/lib.rs:3:5)`.
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.rfind("panicked at ")? + "panicked at ".len();
    let rest = &stderr[start..];
    let (location, body) = match rest.split_once(":\n") {
        Some((loc, body)) if !loc.contains('\n') => (Some(loc.trim()), body),
        _ => (None, rest),
    };
    let message: Vec<&str> = body
        .lines()
        .take_while(|l| !l.starts_with("note: ") && !l.starts_with("stack backtrace:"))
        .collect();
    let message = message.join("\n");
    let message = message.trim();
    let message = if message.is_empty() {
        "(no message)"
    } else {
        message
    };
    Some(match location {
        Some(loc) => format!("{message} (at {loc})"),
        None => message.to_string(),
    })
}

/// Turns a wasmtime error from a guest call into a [`PluginError`]; `stderr` is what the guest
/// printed, where a panicking guest leaves its message.
fn classify(label: &str, e: wasmtime::Error, sandbox: &Sandbox, stderr: &str) -> PluginError {
    let plugin = label.to_string();
    if e.downcast_ref::<Cancelled>().is_some() {
        return PluginError::Cancelled { plugin };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return PluginError::Timeout {
            plugin,
            seconds: sandbox.timeout.as_secs_f64(),
        };
    }
    let message = format!("{e:#}");
    // StoreLimits with trap_on_grow_failure reports "forcing trap when growing memory".
    if message.contains("growing memory") || message.contains("memory minimum size") {
        return PluginError::Memory {
            plugin,
            mib: sandbox.guest_memory >> 20,
        };
    }
    if let Some(panic) = panic_message(stderr) {
        return PluginError::Panicked {
            plugin,
            message: panic,
            trap: message,
        };
    }
    PluginError::Trap { plugin, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_found_in_what_the_guest_printed() {
        let printed = "some log\nthread '<unnamed>' panicked at src/lib.rs:17:9:\nboom: 3 > 2\nsecond line\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(printed).unwrap(),
            "boom: 3 > 2\nsecond line (at src/lib.rs:17:9)"
        );
        assert_eq!(panic_message("just a log line\n"), None);
        assert_eq!(
            panic_message("thread 'main' panicked at src/x.rs:1:1:\n").unwrap(),
            "(no message) (at src/x.rs:1:1)"
        );
    }

    #[test]
    fn compiled_components_are_reused_from_disk_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = super::super::registry::BUILTIN_PLUGINS[0];
        let first = Runtime::with_disk_cache(dir.path()).unwrap();
        let a = first.compile("first", bytes).unwrap();
        assert_eq!(first.compile_counts(), (1, 0));
        let folder = first.disk_cache().unwrap().to_path_buf();
        assert!(folder.join(format!("{}.cwasm", a.sha256)).is_file());
        drop(first);
        // A new runtime (as after a restart) loads it instead of compiling, and it works.
        let second = Runtime::with_disk_cache(dir.path()).unwrap();
        let b = second.compile("second", bytes).unwrap();
        assert_eq!(second.compile_counts(), (0, 1));
        assert_eq!(a.sha256, b.sha256);
        let info = second
            .describe(
                "second",
                &b,
                super::super::registry::empty_view(),
                &Sandbox::default(),
            )
            .unwrap();
        assert!(!info.name.is_empty());
        // The loaded component maps the file: let go of it before damaging it (the cache itself
        // only ever replaces files by renaming, which leaves existing mappings intact).
        drop((b, second));
        // A damaged cache file is ignored and replaced, not trusted.
        std::fs::write(folder.join(format!("{}.cwasm", a.sha256)), b"garbage").unwrap();
        let third = Runtime::with_disk_cache(dir.path()).unwrap();
        third.compile("third", bytes).unwrap();
        assert_eq!(third.compile_counts(), (1, 0));
        assert_ne!(
            std::fs::read(folder.join(format!("{}.cwasm", a.sha256))).unwrap(),
            b"garbage"
        );
    }

    #[test]
    fn the_world_follows_the_imported_version_then_the_validate_export() {
        let ours = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let v = |imports: &[&str], validate| wit_version(&ours(imports), validate);
        assert_eq!(v(&["espalier:prune/model@0.1.0"], false), WitVersion::V0_1);
        assert_eq!(
            v(&["espalier:prune/calibration@0.2.0"], false),
            WitVersion::V0_2
        );
        assert_eq!(v(&["espalier:prune/model@0.3.0"], false), WitVersion::V0_3);
        assert_eq!(
            v(&["espalier:prune/progress@0.4.0"], true),
            WitVersion::V0_4
        );
        assert_eq!(v(&["espalier:prune/obs@0.5.0"], true), WitVersion::V0_5);
        assert_eq!(
            v(&["espalier:prune/training@0.6.0"], true),
            WitVersion::V0_6
        );
        // Importing nothing of ours: `validate` tells 0.4 from the older worlds.
        assert_eq!(v(&[], true), WitVersion::V0_4);
        assert_eq!(v(&[], false), WitVersion::V0_3);
    }

    #[test]
    fn built_ins_speak_0_6_and_their_validate_runs_under_the_sandbox() {
        use super::super::bindings::{ParamValue, PlannedDensity, PlanningContext, ProblemAt};
        let runtime = Runtime::new().unwrap();
        let (_, bytes) = super::super::registry::BUILTIN_PLUGINS
            .iter()
            .find(|(n, _)| *n == "n-m")
            .unwrap();
        let plugin = runtime.compile("n-m", bytes).unwrap();
        assert_eq!(plugin.wit, WitVersion::V0_6);
        assert!(plugin.reports_progress);
        let ctx = |density| PlanningContext {
            stage: "n-m".into(),
            density,
            targets: Vec::new(),
            params: vec![
                ("n".into(), ParamValue::Integer(2)),
                ("m".into(), ParamValue::Integer(4)),
            ],
            masked_earlier: Vec::new(),
        };
        let view = super::super::registry::empty_view();
        let sandbox = Sandbox::default();
        let ok = runtime.validate(
            "n-m",
            &plugin,
            view.clone(),
            &sandbox,
            &ctx(PlannedDensity::Fixed(0.5)),
        );
        assert!(matches!(ok, Ok(Ok(()))), "{ok:?}");
        let refused = runtime
            .validate(
                "n-m",
                &plugin,
                view,
                &sandbox,
                &ctx(PlannedDensity::Fixed(0.3)),
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.len(), 1);
        assert!(matches!(refused[0].at, ProblemAt::Density));
        assert!(
            refused[0].message.contains("set density = 0.5"),
            "{}",
            refused[0].message
        );
    }

    #[test]
    fn errors_escape_what_the_plugin_said() {
        let e = PluginError::Failed {
            plugin: "evil\u{1b}]0;title\u{7}".into(),
            message: format!("\u{1b}[2J{}", "x".repeat(1 << 20)),
        };
        let shown = e.to_string();
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}'),
            "{shown:.200}"
        );
        assert!(shown.len() < 8 << 10, "{}", shown.len());
        // The full text stays in the error.
        let PluginError::Failed { message, .. } = &e else {
            unreachable!()
        };
        assert_eq!(message.len(), 4 + (1 << 20));
    }
}
