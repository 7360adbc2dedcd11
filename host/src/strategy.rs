//! Strategies: a pipeline file plus the exact plugins (and texts) it uses, in one tar file a
//! team can hand to another.
//!
//! Layout of a strategy archive (and of the folder `unpack` writes):
//!
//! ```text
//! strategy.json           manifest: format, version, every file with its sha256
//! pipeline.toml           the pipeline, each stage's plugin pinned (`NAME@sha256:HEX`),
//!                         texts pointing into `texts/`
//! plugins/NAME-HASH.wasm  each plugin a stage uses (built-ins included: the build is what ran)
//! texts/calibration.txt   the calibration text, when a stage needs one
//! texts/evaluation.txt    the evaluation text, when `[evaluate]` names a file
//! ```
//!
//! Unpacking never trusts the archive: only those names, regular files only, each within its
//! kind's size limit, every file listed in the manifest with the hash it has, nothing else;
//! the folder is written under a temporary name and renamed, and an existing non-empty folder
//! is never replaced. Opening a strategy folder checks every hash again (a plugin edited after
//! unpacking is refused), parses the pipeline with its texts taken from the folder and its
//! export folder from the working directory, and names the plugin folder to register.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use espalier_engine::files;
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::evaluate::EvalText;
use crate::pipeline::{Pipeline, PipelineError};
use crate::plugin::bindings::Need;
use crate::plugin::registry::{Origin, builtin_component, load_bytes_sandboxed};
use crate::plugin::runtime::sha256_hex;
use crate::plugin::signing::read_signature_beside;

/// `format` of every manifest.
pub const FORMAT: &str = "espalier-strategy";
/// The manifest version this build writes and reads.
pub const VERSION: u32 = 1;
/// The manifest's name inside a strategy.
pub const MANIFEST: &str = "strategy.json";
/// The pipeline's name inside a strategy.
pub const PIPELINE: &str = "pipeline.toml";
/// Most entries an archive may hold (a pipeline has at most a few dozen stages).
const MAX_ENTRIES: usize = 256;

/// Why a strategy cannot be packed, unpacked or opened.
#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    /// The pipeline being packed, or the one inside a strategy, is wrong.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What happened.
        source: std::io::Error,
    },
    /// The strategy (or what it would hold) is not acceptable; the message says why.
    #[error("{path}: {message}")]
    Invalid {
        /// The archive, folder or pipeline.
        path: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn io_err(path: &Path, source: std::io::Error) -> StrategyError {
    StrategyError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> StrategyError {
    StrategyError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// `strategy.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The pipeline's `name`.
    pub name: String,
    /// Every plugin a stage uses, one entry per build.
    pub plugins: Vec<PackedPlugin>,
    /// The texts it carries.
    pub texts: Vec<PackedText>,
    /// sha256 of `pipeline.toml`.
    pub pipeline_sha256: String,
}

/// One plugin in a strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedPlugin {
    /// Name from `describe`.
    pub name: String,
    /// Version from `describe`.
    pub version: String,
    /// sha256 of the component.
    pub sha256: String,
    /// Its path inside the strategy (`plugins/…`).
    pub file: String,
    /// sha256 of its signature file (`FILE.sig` beside it in the strategy), when it was
    /// signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_sha256: Option<String>,
}

impl PackedPlugin {
    /// Its signature file's path inside the strategy, when it has one.
    pub fn signature_file(&self) -> Option<String> {
        self.signature_sha256
            .as_ref()
            .map(|_| format!("{}.sig", self.file))
    }
}

/// One text in a strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedText {
    /// Its path inside the strategy (`texts/…`).
    pub file: String,
    /// sha256 of its bytes.
    pub sha256: String,
}

/// A plugin being packed: its entry, its component, its signature file.
type PackedBytes = (PackedPlugin, Vec<u8>, Option<Vec<u8>>);

/// Bundles the pipeline at `pipeline_path` with the plugins its stages resolve to in `app`'s
/// registry (or the `.wasm` files they name) and the texts it reads into the tar file `out`,
/// which must not exist (written under a temporary name, then renamed).
pub fn pack(app: &App, pipeline_path: &Path, out: &Path) -> Result<Manifest, StrategyError> {
    if out.exists() {
        return Err(invalid(
            out,
            "already exists; remove it or choose another name (a strategy is never overwritten)",
        ));
    }
    let source = files::read_to_string(pipeline_path, files::PIPELINE_LIMIT)
        .map_err(|e| io_err(pipeline_path, e))?;
    let file = pipeline_path.display().to_string();
    let pipeline = Pipeline::parse(&file, &source)?;
    let mut doc: toml_edit::DocumentMut = source
        .parse()
        .map_err(|e| invalid(pipeline_path, format!("cannot edit the pipeline: {e}")))?;
    let registry = app.registry();

    // Each stage's plugin: the exact bytes and the name it describes itself with.
    let mut plugins: BTreeMap<String, PackedBytes> = BTreeMap::new();
    let mut needs_calibration = pipeline.calibration.is_some();
    for spec in &pipeline.stages {
        let reference = &spec.plugin.value;
        let field = format!("stage[{}].plugin", spec.index);
        let at = |message: String| {
            StrategyError::Pipeline(pipeline.error(&spec.plugin.position, field.clone(), message))
        };
        let (bytes, signature, name, version, plugin_needs) = if reference.starts_with("oci://") {
            // The pulled component and the signature its manifest carries, by value: the
            // strategy runs without the registry.
            let plugin = crate::plugin::registry::load_oci(
                &registry,
                &app.runtime,
                reference,
                &pipeline.sandbox,
            )
            .map_err(|e| at(e.to_string()))?;
            let cached = registry
                .pull_cache()
                .ok_or_else(|| at("the plugin cache is off".into()))?
                .fetch(reference)
                .map_err(|e| at(e.to_string()))?;
            (
                cached.pulled.wasm,
                cached.pulled.signature,
                plugin.info.name.clone(),
                plugin.info.version.clone(),
                plugin.info.needs.clone(),
            )
        } else if reference.ends_with(".wasm") || reference.contains('/') {
            let path = Path::new(reference);
            let bytes = files::read(path, files::PLUGIN_LIMIT)
                .map_err(|e| at(format!("cannot read {reference}: {e}")))?;
            let plugin = load_bytes_sandboxed(
                &app.runtime,
                reference,
                &bytes,
                Origin::File(path.to_path_buf()),
                &pipeline.sandbox,
            )
            .map_err(|e| at(e.to_string()))?;
            let signature = read_signature_beside(path).map_err(|e| at(e.to_string()))?;
            (
                bytes,
                signature,
                plugin.info.name.clone(),
                plugin.info.version.clone(),
                plugin.info.needs.clone(),
            )
        } else {
            let plugin = spec
                    .plugin_sha256
                    .as_deref()
                    .and_then(|pin| registry.by_sha256(pin))
                    .filter(|p| p.info.name == *reference)
                    .or_else(|| registry.get(reference))
                    .ok_or_else(|| {
                        at(format!(
                            "unknown plugin `{reference}`; available: {} (or give a path to a .wasm file)",
                            registry.names().join(", ")
                        ))
                    })?;
            let (bytes, signature) = match &plugin.origin {
                Origin::Builtin => (
                    builtin_component(&plugin.compiled.sha256)
                        .map(<[u8]>::to_vec)
                        .ok_or_else(
                            || at("the built-in's component is not in this build".into()),
                        )?,
                    None,
                ),
                Origin::File(path) => (
                    files::read(path, files::PLUGIN_LIMIT)
                        .map_err(|e| at(format!("cannot read {}: {e}", path.display())))?,
                    read_signature_beside(path).map_err(|e| at(e.to_string()))?,
                ),
            };
            (
                bytes,
                signature,
                plugin.info.name.clone(),
                plugin.info.version.clone(),
                plugin.info.needs.clone(),
            )
        };
        let sha256 = sha256_hex(&bytes);
        if let Some(pin) = &spec.plugin_sha256
            && *pin != sha256
        {
            return Err(at(format!(
                "`{reference}` is pinned to sha256 {pin}, but the plugin found has sha256 {sha256}"
            )));
        }
        if let Some((other, _, _)) = plugins
            .values()
            .find(|(p, _, _)| p.name == name && p.sha256 != sha256)
        {
            return Err(at(format!(
                "two builds of plugin `{}` (sha256 {} and {sha256}); a strategy carries one build per plugin name",
                crate::display_safe::name(&name),
                other.sha256
            )));
        }
        needs_calibration |= plugin_needs.iter().any(|n| {
            matches!(
                n,
                Need::Activations | Need::Loss | Need::Gradients | Need::Hessians
            )
        });
        set_stage_plugin(&mut doc, spec.index, &format!("{name}@sha256:{sha256}"))
            .ok_or_else(|| at("cannot rewrite this stage's `plugin`".into()))?;
        plugins.entry(sha256.clone()).or_insert_with(|| {
            let file = format!("plugins/{}-{}.wasm", file_safe(&name), &sha256[..12]);
            (
                PackedPlugin {
                    name,
                    version,
                    sha256,
                    file,
                    signature_sha256: signature.as_deref().map(sha256_hex),
                },
                bytes,
                signature,
            )
        });
    }

    // Texts travel with the pipeline: a criterion's masks depend on its calibration text.
    let mut texts: Vec<(PackedText, Vec<u8>)> = Vec::new();
    if needs_calibration {
        let path = pipeline.calibration_spec().text;
        let bytes = files::read(&path, files::TEXT_LIMIT).map_err(|e| io_err(&path, e))?;
        set_text(&mut doc, "calibration", "texts/calibration.txt");
        texts.push((packed_text("texts/calibration.txt", &bytes), bytes));
    }
    if let Some(eval) = &pipeline.evaluate
        && let EvalText::File(path) = &eval.value.text
    {
        let bytes = files::read(path, files::TEXT_LIMIT).map_err(|e| io_err(path, e))?;
        set_text(&mut doc, "evaluate", "texts/evaluation.txt");
        texts.push((packed_text("texts/evaluation.txt", &bytes), bytes));
    }

    // `run` and `unpack` parse it against the strategy's own texts (the round trip is tested).
    let packed_pipeline = doc.to_string();
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        name: pipeline.name.clone(),
        plugins: plugins.values().map(|(p, _, _)| p.clone()).collect(),
        texts: texts.iter().map(|(t, _)| t.clone()).collect(),
        pipeline_sha256: sha256_hex(packed_pipeline.as_bytes()),
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| invalid(out, format!("cannot write the manifest: {e}")))?;

    let mut entries: Vec<(&str, &[u8])> = vec![
        (MANIFEST, &manifest_json),
        (PIPELINE, packed_pipeline.as_bytes()),
    ];
    let signatures: Vec<(String, &[u8])> = plugins
        .values()
        .filter_map(|(p, _, sig)| Some((p.signature_file()?, sig.as_deref()?)))
        .collect();
    entries.extend(
        plugins
            .values()
            .map(|(p, b, _)| (p.file.as_str(), b.as_slice())),
    );
    entries.extend(signatures.iter().map(|(f, b)| (f.as_str(), *b)));
    entries.extend(texts.iter().map(|(t, b)| (t.file.as_str(), b.as_slice())));
    write_tar(out, &entries)?;
    Ok(manifest)
}

/// Sets `[[stage]]` number `index`'s `plugin` (array of tables or inline array).
fn set_stage_plugin(doc: &mut toml_edit::DocumentMut, index: usize, value: &str) -> Option<()> {
    let stage = doc.get_mut("stage")?.get_mut(index)?;
    let slot = stage.get_mut("plugin")?;
    *slot = toml_edit::value(value);
    Some(())
}

/// Sets `[section] text`, creating the section when the pipeline relied on defaults.
fn set_text(doc: &mut toml_edit::DocumentMut, section: &str, value: &str) {
    let item = doc
        .entry(section)
        .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
    if let Some(table) = item.as_table_like_mut() {
        table.insert("text", toml_edit::value(value));
    }
}

fn packed_text(file: &str, bytes: &[u8]) -> PackedText {
    PackedText {
        file: file.into(),
        sha256: sha256_hex(bytes),
    }
}

/// A plugin name as a file name: letters, digits, `-`, `_` and `.` kept, anything else `_`.
fn file_safe(name: &str) -> String {
    let s: String = name
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "plugin".into() } else { s }
}

/// Writes a reproducible tar (no times, owners or modes from this machine) under a temporary
/// name next to `out`, then renames it.
fn write_tar(out: &Path, entries: &[(&str, &[u8])]) -> Result<(), StrategyError> {
    let tmp = temporary_sibling(out);
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
        for (name, bytes) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_path(name)?;
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            builder.append(&header, *bytes)?;
        }
        let mut writer = builder.into_inner()?;
        std::io::Write::flush(&mut writer)?;
        writer
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?
            .sync_all()?;
        // Not over something that appeared meanwhile.
        if out.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "appeared while the strategy was written; nothing replaced",
            ));
        }
        std::fs::rename(&tmp, out)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(out, e));
    }
    Ok(())
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "strategy".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// What an entry name may be, and its size limit.
fn entry_limit(name: &str) -> Option<u64> {
    let safe_leaf = |leaf: &str| {
        !leaf.is_empty()
            && !leaf.starts_with('.')
            && leaf
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match name {
        MANIFEST => Some(files::JSON_LIMIT),
        PIPELINE => Some(files::PIPELINE_LIMIT),
        _ => match name.split_once('/') {
            Some(("plugins", leaf)) if safe_leaf(leaf) && leaf.ends_with(".wasm") => {
                Some(files::PLUGIN_LIMIT)
            }
            Some(("plugins", leaf)) if safe_leaf(leaf) && leaf.ends_with(".wasm.sig") => {
                Some(64 << 10)
            }
            Some(("texts", leaf)) if safe_leaf(leaf) => Some(files::TEXT_LIMIT),
            _ => None,
        },
    }
}

/// Reads and checks a strategy archive: the files it holds, by name.
pub fn read_archive(
    archive: &Path,
) -> Result<(Manifest, BTreeMap<String, Vec<u8>>), StrategyError> {
    let (file, _) = files::open_regular(archive).map_err(|e| io_err(archive, e))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let not_a_strategy = |e: std::io::Error| {
        invalid(
            archive,
            format!("not a readable strategy archive (written by `espalier strategy pack`): {e}"),
        )
    };
    for entry in tar.entries().map_err(not_a_strategy)? {
        let entry = entry.map_err(not_a_strategy)?;
        if entries.len() >= MAX_ENTRIES {
            return Err(invalid(archive, format!("more than {MAX_ENTRIES} entries")));
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(invalid(
                archive,
                format!(
                    "entry `{}` is not a regular file; a strategy holds files only",
                    crate::display_safe::name(&name)
                ),
            ));
        }
        let limit = entry_limit(&name).ok_or_else(|| {
            invalid(
                archive,
                format!(
                    "unexpected entry `{}`: a strategy holds {MANIFEST}, {PIPELINE}, plugins/*.wasm and texts/*",
                    crate::display_safe::name(&name)
                ),
            )
        })?;
        let mut bytes = Vec::new();
        entry
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(not_a_strategy)?;
        if bytes.len() as u64 > limit {
            return Err(invalid(
                archive,
                format!("entry `{name}` is larger than the {limit} bytes allowed"),
            ));
        }
        if entries.insert(name.clone(), bytes).is_some() {
            return Err(invalid(archive, format!("entry `{name}` appears twice")));
        }
    }
    let manifest = check_contents(archive, &entries)?;
    Ok((manifest, entries))
}

/// The manifest, once every file it lists is present with its hash and nothing else is.
fn check_contents(
    at: &Path,
    entries: &BTreeMap<String, Vec<u8>>,
) -> Result<Manifest, StrategyError> {
    let manifest_bytes = entries.get(MANIFEST).ok_or_else(|| {
        invalid(
            at,
            format!("no {MANIFEST}: not a strategy written by `espalier strategy pack`"),
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| invalid(at, format!("{MANIFEST}: {e}")))?;
    if manifest.format != FORMAT || manifest.version != VERSION {
        return Err(invalid(
            at,
            format!(
                "{MANIFEST}: format {} version {}; this Espalier reads {FORMAT} version {VERSION}",
                crate::display_safe::name(&manifest.format),
                manifest.version
            ),
        ));
    }
    let mut expected: BTreeMap<&str, &str> = BTreeMap::new();
    expected.insert(PIPELINE, &manifest.pipeline_sha256);
    let signature_files: Vec<(String, &str)> = manifest
        .plugins
        .iter()
        .filter_map(|p| Some((p.signature_file()?, p.signature_sha256.as_deref()?)))
        .collect();
    for p in &manifest.plugins {
        expected.insert(&p.file, &p.sha256);
    }
    for (file, sha) in &signature_files {
        expected.insert(file, sha);
    }
    for t in &manifest.texts {
        expected.insert(&t.file, &t.sha256);
    }
    for (file, sha) in &expected {
        if entry_limit(file).is_none() || *file == MANIFEST {
            return Err(invalid(
                at,
                format!(
                    "{MANIFEST} lists `{}`, which is not a strategy file name",
                    crate::display_safe::name(file)
                ),
            ));
        }
        let bytes = entries
            .get(*file)
            .ok_or_else(|| invalid(at, format!("{MANIFEST} lists {file}, which is missing")))?;
        let actual = sha256_hex(bytes);
        if actual != *sha {
            return Err(invalid(
                at,
                format!(
                    "{file} has sha256 {actual}, but {MANIFEST} records {sha}: the strategy was changed after it was packed"
                ),
            ));
        }
    }
    if let Some(extra) = entries
        .keys()
        .find(|k| k.as_str() != MANIFEST && !expected.contains_key(k.as_str()))
    {
        return Err(invalid(at, format!("{extra} is not listed in {MANIFEST}")));
    }
    Ok(manifest)
}

/// Restores a strategy archive into `dest` (which must not exist, or be an empty folder):
/// written into a temporary sibling, then renamed. Returns the manifest.
pub fn unpack(archive: &Path, dest: &Path) -> Result<Manifest, StrategyError> {
    let (manifest, entries) = read_archive(archive)?;
    if dest.exists() {
        let empty = std::fs::read_dir(dest)
            .map_err(|e| io_err(dest, e))?
            .next()
            .is_none();
        if !empty {
            return Err(invalid(
                dest,
                "exists and is not empty; unpack into a new folder (nothing is overwritten)",
            ));
        }
    }
    let tmp = temporary_sibling(dest);
    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir(&tmp)?;
        for (name, bytes) in &entries {
            let path = tmp.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
        }
        if dest.exists() {
            // Empty (checked above): rename replaces an empty folder.
            std::fs::remove_dir(dest)?;
        }
        std::fs::rename(&tmp, dest)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io_err(dest, e));
    }
    Ok(manifest)
}

/// A strategy ready to run.
#[derive(Debug)]
pub struct Opened {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its pipeline: texts from the strategy folder, a relative export folder from the
    /// working directory.
    pub pipeline: Pipeline,
    /// The folder of its plugins, to register before planning.
    pub plugin_dir: PathBuf,
}

/// Whether `path` is a strategy folder (holds a `strategy.json`).
pub fn is_strategy_dir(path: &Path) -> bool {
    path.is_dir() && path.join(MANIFEST).is_file()
}

/// Opens an unpacked strategy folder: every file checked against the manifest again, the
/// pipeline parsed.
pub fn open_dir(dir: &Path) -> Result<Opened, StrategyError> {
    let mut entries = BTreeMap::new();
    let manifest_path = dir.join(MANIFEST);
    entries.insert(
        MANIFEST.to_string(),
        files::read(&manifest_path, files::JSON_LIMIT).map_err(|e| io_err(&manifest_path, e))?,
    );
    let manifest: Manifest = serde_json::from_slice(&entries[MANIFEST])
        .map_err(|e| invalid(&manifest_path, e.to_string()))?;
    let listed = std::iter::once(PIPELINE.to_string())
        .chain(manifest.plugins.iter().map(|p| p.file.clone()))
        .chain(
            manifest
                .plugins
                .iter()
                .filter_map(PackedPlugin::signature_file),
        )
        .chain(manifest.texts.iter().map(|t| t.file.clone()));
    for file in listed {
        let limit = entry_limit(&file).ok_or_else(|| {
            invalid(
                &manifest_path,
                format!(
                    "lists `{}`, which is not a strategy file name",
                    crate::display_safe::name(&file)
                ),
            )
        })?;
        let path = dir.join(&file);
        let bytes = files::read(&path, limit).map_err(|e| io_err(&path, e))?;
        entries.insert(file, bytes);
    }
    // Extra files in the folder (the plugin folder is registered whole) are refused too.
    let plugin_dir = dir.join("plugins");
    if let Ok(read) = std::fs::read_dir(&plugin_dir) {
        for entry in read.flatten() {
            let name = format!("plugins/{}", entry.file_name().to_string_lossy());
            if !entries.contains_key(&name) {
                return Err(invalid(dir, format!("{name} is not listed in {MANIFEST}")));
            }
        }
    }
    let manifest = check_contents(dir, &entries)?;
    let source = String::from_utf8(entries.remove(PIPELINE).unwrap_or_default())
        .map_err(|_| invalid(dir, format!("{PIPELINE} is not UTF-8 text")))?;
    let label = dir.join(PIPELINE).display().to_string();
    let pipeline = Pipeline::parse_in_with_outputs(&label, &source, dir, Path::new(""))?;
    Ok(Opened {
        manifest,
        pipeline,
        plugin_dir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_confined_to_the_layout() {
        assert!(entry_limit("strategy.json").is_some());
        assert!(entry_limit("plugins/wanda-0123.wasm").is_some());
        assert!(entry_limit("plugins/wanda-0123.wasm.sig").is_some());
        assert!(entry_limit("texts/calibration.txt").is_some());
        for bad in [
            "../x",
            "plugins/../../x.wasm",
            "/etc/passwd",
            "plugins/x.txt",
            "plugins/.hidden.wasm",
            "texts/a/b",
            "other.toml",
            "plugins/",
        ] {
            assert!(entry_limit(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn file_names_of_plugins_are_safe() {
        assert_eq!(file_safe("wanda"), "wanda");
        assert_eq!(file_safe("../a b"), "___a_b");
        assert_eq!(file_safe(""), "plugin");
    }
}
