//! Which plugins exist: the built-in criteria embedded at build time, `.wasm` files from
//! plugin folders, and single files named in a pipeline. Each is compiled (cached by content
//! hash) and asked to `describe` itself once when it is registered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use espalier_engine::files;

use super::bindings::{ParamKind, ParamValue, PluginInfo};
use super::runtime::{CompiledPlugin, PluginError, Runtime, Sandbox};
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
}

/// Plugins by name.
#[derive(Default)]
pub struct Registry {
    plugins: BTreeMap<String, Plugin>,
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
        calibration: None,
    })
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
        info,
        origin,
        compiled,
        size: bytes.len(),
    })
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
            reg.plugins.insert(plugin.info.name.clone(), plugin);
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
            match load_file_sandboxed(runtime, &path, sandbox) {
                Ok(p) => self.insert(p),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Registers a plugin under its described name.
    pub fn insert(&mut self, plugin: Plugin) {
        if let Some(old) = self.plugins.get(&plugin.info.name) {
            tracing::warn!(
                name = %crate::display_safe::name(&plugin.info.name),
                "plugin from {} replaces the one from {}",
                origin_text(&plugin.origin),
                origin_text(&old.origin)
            );
        }
        self.plugins.insert(plugin.info.name.clone(), plugin);
    }

    /// Looks a plugin up by name.
    pub fn get(&self, name: &str) -> Option<&Plugin> {
        self.plugins.get(name)
    }

    /// All plugins, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.values()
    }

    /// Names, for "did you mean" hints.
    pub fn names(&self) -> Vec<String> {
        self.plugins.keys().cloned().collect()
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
    }
}
