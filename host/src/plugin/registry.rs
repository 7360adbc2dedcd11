//! Which plugins exist: the built-in criteria embedded at build time, `.wasm` files from
//! plugin folders, and single files named in a pipeline. Each is compiled (cached by content
//! hash) and asked to `describe` itself once when it is registered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use espalier_engine::files;

use super::bindings::{ParamKind, ParamValue, PluginInfo};
use super::oci::PullCache;
use super::runtime::{CompiledPlugin, PluginError, Runtime, Sandbox};
use super::signing::{Signer, Trust, read_signature_beside};
use super::state::ModelView;

include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));

/// Where a plugin came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "kebab-case")]
pub enum Origin {
    /// Compiled into the binary.
    Builtin,
    /// A `.wasm` file.
    File(PathBuf),
}

/// A registered plugin.
#[derive(Clone)]
pub struct Plugin {
    /// What `describe` returned.
    pub info: PluginInfo,
    /// Where it came from.
    pub origin: Origin,
    /// The compiled component and its sha256.
    pub compiled: CompiledPlugin,
    /// Size of the component in bytes.
    pub size: usize,
    /// Who vouches for it: built in, unsigned, or the key whose signature beside the file
    /// verified (see [`super::signing`]).
    pub signer: Signer,
    /// For a plugin pulled from an OCI registry, the reference pinned to the manifest it came
    /// from (`oci://REGISTRY/REPOSITORY@sha256:HEX`).
    pub source: Option<String>,
}

/// Plugins by name: the built-ins, and the folder (or uploaded) plugins on top, a folder plugin
/// named like a built-in shadowing it. Cloning is cheap (compiled components are shared), so a
/// daemon swaps whole registries ([`SharedRegistry`]) while runs keep the one they planned with.
#[derive(Default, Clone)]
pub struct Registry {
    builtins: BTreeMap<String, Plugin>,
    plugins: BTreeMap<String, Plugin>,
    /// The signers this process accepts, for every plugin file it loads.
    trust: Arc<Trust>,
    /// Plugin files refused by the signature policy, by described name, with the reason (so
    /// a stage naming one says why it is missing).
    refused: BTreeMap<String, String>,
    /// Where plugins that pipelines name by OCI reference are cached (`None`: no cache, so
    /// such pipelines are refused).
    pull_cache: Option<PullCache>,
}

/// The registry a long-lived process changes while runs are in flight: readers take a
/// snapshot (an `Arc` of the registry as it was) and keep it for as long as they like; writers
/// build a changed copy and swap it in.
#[derive(Default)]
pub struct SharedRegistry {
    current: std::sync::RwLock<Arc<Registry>>,
}

impl SharedRegistry {
    /// Starts from `registry`.
    pub fn new(registry: Registry) -> Self {
        SharedRegistry {
            current: std::sync::RwLock::new(Arc::new(registry)),
        }
    }

    /// The registry as it is now; later changes do not affect the snapshot.
    pub fn snapshot(&self) -> Arc<Registry> {
        match self.current.read() {
            Ok(r) => r.clone(),
            // A writer panicked mid-swap: the Arc it left is still a whole registry.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies `change` to a copy of the current registry and swaps the copy in; returns what
    /// `change` returned. Writers are serialised; readers never wait for a change to finish.
    pub fn update<R>(&self, change: impl FnOnce(&mut Registry) -> R) -> R {
        let mut guard = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = Registry::clone(&guard);
        let result = change(&mut next);
        *guard = Arc::new(next);
        result
    }
}

/// A model view with no weights, for calling `describe` (which must not need the model).
pub fn empty_view() -> Arc<ModelView> {
    use super::bindings::espalier::prune::model::ModelInfo;
    Arc::new(ModelView {
        info: ModelInfo {
            architecture: String::new(),
            hidden_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            vocab_size: 0,
        },
        layers: Vec::new(),
        weights: BTreeMap::new(),
        masks: BTreeMap::new(),
        original_weights: BTreeMap::new(),
        calibration: None,
    })
}

/// Pulls the plugin `reference` names (`oci://…`) through the registry's pull cache, checks
/// it (digests, then compile, describe and the signature policy) and returns it with its
/// pinned source. Nothing is registered.
pub fn load_oci(
    registry: &Registry,
    runtime: &Runtime,
    reference: &str,
    sandbox: &Sandbox,
) -> Result<Plugin, PluginError> {
    let cache = registry
        .pull_cache()
        .ok_or_else(|| PluginError::Refused {
            plugin: reference.to_string(),
            message: "plugins named by registry reference are cached by digest in the plugin cache, which is off (ESPALIER_CACHE=off)".into(),
        })?;
    let cached = cache.fetch(reference)?;
    let label = reference.to_string();
    let plugin = load_bytes_sandboxed(
        runtime,
        &label,
        &cached.pulled.wasm,
        Origin::File(cached.path.clone()),
        sandbox,
    )?;
    let mut plugin = admit(
        plugin,
        cached.pulled.signature.as_deref(),
        &registry.trust,
        &label,
    )?;
    plugin.source = Some(cached.pulled.pinned);
    Ok(plugin)
}

/// Loads one plugin from bytes: compile, then describe under the default sandbox.
pub fn load_bytes(
    runtime: &Runtime,
    label: &str,
    bytes: &[u8],
    origin: Origin,
) -> Result<Plugin, PluginError> {
    load_bytes_sandboxed(runtime, label, bytes, origin, &Sandbox::default())
}

/// Loads one plugin from bytes: compile, then describe under `sandbox` (a pipeline's limits
/// bind its plugins' `describe` as much as their `apply`).
pub fn load_bytes_sandboxed(
    runtime: &Runtime,
    label: &str,
    bytes: &[u8],
    origin: Origin,
    sandbox: &Sandbox,
) -> Result<Plugin, PluginError> {
    let compiled = runtime.compile(label, bytes)?;
    let info = runtime.describe(label, &compiled, empty_view(), sandbox)?;
    if info.name.trim().is_empty() {
        return Err(PluginError::Invalid {
            plugin: label.to_string(),
            message: "describe() returned an empty name".into(),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &info.params {
        if !seen.insert(p.name.as_str()) {
            return Err(PluginError::Invalid {
                plugin: label.to_string(),
                message: format!("describe() lists parameter `{}` twice", p.name),
            });
        }
        if let Some(d) = &p.default
            && !value_fits(d, p.kind)
        {
            return Err(PluginError::Invalid {
                plugin: label.to_string(),
                message: format!(
                    "the default of parameter `{}` does not have its declared type",
                    p.name
                ),
            });
        }
    }
    Ok(Plugin {
        signer: if origin == Origin::Builtin {
            Signer::Builtin
        } else {
            Signer::Unsigned
        },
        info,
        origin,
        compiled,
        size: bytes.len(),
        source: None,
    })
}

/// Checks `plugin` (loaded from bytes) against `trust` with its signature file's bytes
/// (`None`: unsigned) and records the signer, or refuses it with the reason.
pub fn admit(
    mut plugin: Plugin,
    signature: Option<&[u8]>,
    trust: &Trust,
    label: &str,
) -> Result<Plugin, PluginError> {
    plugin.signer = trust
        .check(
            &plugin.info.name,
            &plugin.info.version,
            &plugin.compiled.sha256,
            signature,
        )
        .map_err(|message| PluginError::Refused {
            plugin: label.to_string(),
            message,
        })?;
    Ok(plugin)
}

/// Loads a `.wasm` file described under `sandbox` and admits it under `trust` with the
/// signature file beside it (`FILE.wasm.sig`), if any.
pub fn load_file_trusted(
    runtime: &Runtime,
    path: &Path,
    sandbox: &Sandbox,
    trust: &Trust,
) -> Result<Plugin, PluginError> {
    let label = path.display().to_string();
    let plugin = load_file_sandboxed(runtime, path, sandbox)?;
    let signature = read_signature_beside(path).map_err(|e| PluginError::Refused {
        plugin: label.clone(),
        message: e.to_string(),
    })?;
    admit(plugin, signature.as_deref(), trust, &label)
}

/// Loads a `.wasm` file, described under the default sandbox.
pub fn load_file(runtime: &Runtime, path: &Path) -> Result<Plugin, PluginError> {
    load_file_sandboxed(runtime, path, &Sandbox::default())
}

/// Loads a `.wasm` file, described under `sandbox`.
pub fn load_file_sandboxed(
    runtime: &Runtime,
    path: &Path,
    sandbox: &Sandbox,
) -> Result<Plugin, PluginError> {
    let label = path.display().to_string();
    let bytes = files::read(path, files::PLUGIN_LIMIT).map_err(|e| PluginError::Invalid {
        plugin: label.clone(),
        message: format!("cannot read the file: {e}"),
    })?;
    load_bytes_sandboxed(
        runtime,
        &label,
        &bytes,
        Origin::File(path.to_path_buf()),
        sandbox,
    )
}

/// Whether a value has the declared kind (integers are accepted where floats are).
pub fn value_fits(v: &ParamValue, kind: ParamKind) -> bool {
    matches!(
        (v, kind),
        (ParamValue::Boolean(_), ParamKind::Boolean)
            | (ParamValue::Integer(_), ParamKind::Integer)
            | (ParamValue::Float(_), ParamKind::Float)
            | (ParamValue::Integer(_), ParamKind::Float)
            | (ParamValue::Text(_), ParamKind::Text)
            | (ParamValue::Integers(_), ParamKind::Integers)
            | (ParamValue::Floats(_), ParamKind::Floats)
            | (ParamValue::Integers(_), ParamKind::Floats)
    )
}

impl Registry {
    /// The built-in criteria.
    pub fn with_builtins(runtime: &Runtime) -> Result<Self, PluginError> {
        let mut reg = Registry::default();
        for (name, bytes) in BUILTIN_PLUGINS {
            let plugin = load_bytes(runtime, name, bytes, Origin::Builtin)?;
            reg.builtins.insert(plugin.info.name.clone(), plugin);
        }
        Ok(reg)
    }

    /// Adds every `*.wasm` in `dir`, each described under `sandbox`; a file named like a
    /// built-in replaces it (with a warning), so a team can ship an updated criterion. Broken
    /// files are reported and skipped.
    pub fn add_dir(
        &mut self,
        runtime: &Runtime,
        dir: &Path,
        sandbox: &Sandbox,
    ) -> Vec<PluginError> {
        let mut errors = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(PluginError::Invalid {
                    plugin: dir.display().to_string(),
                    message: format!("cannot read the plugin folder: {e}"),
                });
                return errors;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        paths.sort();
        for path in paths {
            let label = path.display().to_string();
            let loaded = load_file_sandboxed(runtime, &path, sandbox).and_then(|p| {
                let signature = read_signature_beside(&path).map_err(|e| PluginError::Refused {
                    plugin: label.clone(),
                    message: e.to_string(),
                })?;
                let name = p.info.name.clone();
                admit(p, signature.as_deref(), &self.trust, &label).inspect_err(|e| {
                    if let PluginError::Refused { message, .. } = e {
                        self.refused.insert(name, message.clone());
                    }
                })
            });
            match loaded {
                Ok(p) => {
                    self.insert(p);
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Registers a plugin under its described name (a built-in goes with the built-ins; any
    /// other replaces a plugin of the same name and shadows a built-in of that name). Returns
    /// the plugin it replaced, if any.
    pub fn insert(&mut self, plugin: Plugin) -> Option<Plugin> {
        if plugin.origin == Origin::Builtin {
            return self.builtins.insert(plugin.info.name.clone(), plugin);
        }
        let replaced = self.plugins.insert(plugin.info.name.clone(), plugin);
        if let Some(old) = &replaced
            && let Some(new) = self.plugins.get(&old.info.name)
        {
            tracing::info!(
                name = %crate::display_safe::name(&new.info.name),
                "plugin from {} replaces the one from {}",
                origin_text(&new.origin),
                origin_text(&old.origin)
            );
        }
        replaced
    }

    /// Removes the non-built-in plugin that came from `path` (a file deleted from a watched
    /// folder); a built-in it shadowed is visible again. Returns the removed plugin.
    pub fn remove_file(&mut self, path: &Path) -> Option<Plugin> {
        let name = self
            .plugins
            .iter()
            .find(|(_, p)| matches!(&p.origin, Origin::File(f) if f == path))
            .map(|(n, _)| n.clone())?;
        self.plugins.remove(&name)
    }

    /// Removes the non-built-in plugin named `name`. Returns it.
    pub fn remove(&mut self, name: &str) -> Option<Plugin> {
        self.plugins.remove(name)
    }

    /// Sets the signers plugin files must come from (before any folder is added).
    pub fn set_trust(&mut self, trust: Trust) {
        self.trust = Arc::new(trust);
    }

    /// Caches plugins that pipelines name by OCI reference in `cache`.
    pub fn set_pull_cache(&mut self, cache: Option<PullCache>) {
        self.pull_cache = cache;
    }

    /// Where plugins named by OCI reference are cached.
    pub fn pull_cache(&self) -> Option<&PullCache> {
        self.pull_cache.as_ref()
    }

    /// The signers plugin files must come from.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// Why a plugin file describing itself as `name` was refused by the signature policy.
    pub fn refused(&self, name: &str) -> Option<&str> {
        self.refused.get(name).map(String::as_str)
    }

    /// Looks a plugin up by name (a folder plugin before a built-in of the same name).
    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.plugins.get(name).or_else(|| self.builtins.get(name))
    }

    /// Whether a non-built-in plugin `name` hides the built-in of that name.
    pub fn shadows_builtin(&self, name: &str) -> bool {
        self.plugins.contains_key(name) && self.builtins.contains_key(name)
    }

    /// Every plugin a stage can name, by name (shadowed built-ins left out).
    pub fn iter(&self) -> impl Iterator<Item = &Plugin> {
        let shadowed = |name: &String| self.plugins.contains_key(name);
        let mut all: Vec<&Plugin> = self
            .builtins
            .iter()
            .filter(|(n, _)| !shadowed(n))
            .map(|(_, p)| p)
            .chain(self.plugins.values())
            .collect();
        all.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        all.into_iter()
    }

    /// A plugin by the sha256 of its component (any origin, shadowed built-ins included).
    pub fn by_sha256(&self, sha256: &str) -> Option<&Plugin> {
        self.plugins
            .values()
            .chain(self.builtins.values())
            .find(|p| p.compiled.sha256 == sha256)
    }

    /// Names, for "did you mean" hints.
    pub fn names(&self) -> Vec<String> {
        self.iter().map(|p| p.info.name.clone()).collect()
    }
}

/// What a front end shows about a plugin (`plugins list --json`, `GET /v1/plugins`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginSummary {
    /// Name from `describe`.
    pub name: String,
    /// Version from `describe`.
    pub version: String,
    /// Description from `describe`.
    pub description: String,
    /// `builtin`, or the file it came from.
    pub origin: String,
    /// Whether it hides a built-in of the same name.
    pub shadows_builtin: bool,
    /// sha256 of the component bytes.
    pub sha256: String,
    /// Who vouches for it: `builtin`, `unsigned`, or `key ID (trusted)` / `key ID (not trusted)`.
    pub signer: String,
    /// WIT version it targets.
    pub wit: String,
    /// Component size.
    pub size_bytes: usize,
    /// `masks`, `budgets` or `heads`.
    pub produces: String,
    /// Statistics it needs.
    pub needs: Vec<String>,
    /// Its parameters.
    pub params: Vec<ParamSummary>,
}

/// One parameter a plugin declares.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParamSummary {
    /// Name.
    pub name: String,
    /// `bool`, `int`, `float`, `string`, `[int]` or `[float]`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The default as a typed JSON value; `None` = required.
    pub default: Option<serde_json::Value>,
    /// What it does.
    pub doc: String,
}

/// A parameter kind as users write it.
pub fn kind_name(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Boolean => "bool",
        ParamKind::Integer => "int",
        ParamKind::Float => "float",
        ParamKind::Text => "string",
        ParamKind::Integers => "[int]",
        ParamKind::Floats => "[float]",
    }
}

/// A parameter value as JSON.
pub fn value_json(v: &ParamValue) -> serde_json::Value {
    match v {
        ParamValue::Boolean(b) => (*b).into(),
        ParamValue::Integer(i) => (*i).into(),
        ParamValue::Float(f) => (*f).into(),
        ParamValue::Text(s) => s.clone().into(),
        ParamValue::Integers(v) => v.clone().into(),
        ParamValue::Floats(v) => v.clone().into(),
    }
}

impl PluginSummary {
    /// The summary of `plugin` as registered in `registry`.
    pub fn of(plugin: &Plugin, registry: &Registry) -> Self {
        PluginSummary {
            name: plugin.info.name.clone(),
            version: plugin.info.version.clone(),
            description: plugin.info.description.clone(),
            origin: match &plugin.origin {
                Origin::Builtin => "builtin".to_string(),
                Origin::File(f) => f.display().to_string(),
            },
            shadows_builtin: plugin.origin != Origin::Builtin
                && registry.shadows_builtin(&plugin.info.name),
            sha256: plugin.compiled.sha256.clone(),
            signer: plugin.signer.to_string(),
            wit: plugin.compiled.wit.to_string(),
            size_bytes: plugin.size,
            produces: produces_name(plugin.info.produces).to_string(),
            needs: plugin
                .info
                .needs
                .iter()
                .map(|n| need_name(*n).to_string())
                .collect(),
            params: plugin
                .info
                .params
                .iter()
                .map(|p| ParamSummary {
                    name: p.name.clone(),
                    kind: kind_name(p.kind).to_string(),
                    default: p.default.as_ref().map(value_json),
                    doc: p.doc.clone(),
                })
                .collect(),
        }
    }
}

/// Where a plugin came from, as shown to users (`builtin` or its path, escaped).
pub fn origin_text(origin: &Origin) -> String {
    match origin {
        Origin::Builtin => "builtin".into(),
        Origin::File(f) => {
            crate::display_safe::line(&f.display().to_string(), crate::display_safe::MESSAGE_MAX)
        }
    }
}

/// `OutputKind` as users read it (`masks`, `budgets`, `heads`).
pub fn produces_name(kind: super::bindings::OutputKind) -> &'static str {
    use super::bindings::OutputKind;
    match kind {
        OutputKind::Masks => "masks",
        OutputKind::Budgets => "budgets",
        OutputKind::Heads => "heads",
        OutputKind::Weights => "weights",
        OutputKind::MaskUpdates => "mask-updates",
    }
}

/// `Need` as users read it (`weights`, `activations`, `loss`, `gradients`).
pub fn need_name(need: super::bindings::Need) -> &'static str {
    use super::bindings::Need;
    match need {
        Need::Weights => "weights",
        Need::Activations => "activations",
        Need::Loss => "loss",
        Need::Gradients => "gradients",
        Need::Hessians => "hessians",
    }
}

/// The folder `host/build.rs` compiled every plugin of `plugins/` into, test plugins included
/// (for tests that load a plugin file; a path on the machine that built this crate).
#[doc(hidden)]
pub const BUILT_PLUGIN_DIR: &str = env!("ESPALIER_PLUGIN_WASM_DIR");

/// The component bytes of the built-in plugin whose sha256 is `sha256` (for downloads).
pub fn builtin_component(sha256: &str) -> Option<&'static [u8]> {
    BUILTIN_PLUGINS
        .iter()
        .map(|(_, bytes)| *bytes)
        .find(|bytes| super::runtime::sha256_hex(bytes) == sha256)
}
