//! Export of a pruned model: a Hugging Face–style directory (config.json, model.safetensors
//! with zeros in place and removed heads cut out, companion tokenizer files), the masks
//! (`masks.safetensors`, one u8 tensor per pruned layer, 1 = kept), `report.json` and the
//! marker `.espalier-export` that lists every file the export wrote.
//!
//! Safety of the user's files comes first:
//! - [`prepare`] runs at planning, before any stage: it refuses a destination that is an input
//!   of the run (the model folder, a text, plugin or pipeline file's folder, or any parent of
//!   one; even with `force`), and an existing folder that is neither empty nor a previous
//!   Espalier export (unless forced). It then reserves the temporary sibling
//!   `.NAME.tmp-PID-NANOS` (so a read-only parent fails here too) and removes stale temporary
//!   folders that earlier, interrupted exports to the same destination left behind.
//! - [`ExportTarget::write`] writes everything into the temporary folder, checks the
//!   destination again, and only then swaps it in by rename: a failed export leaves the
//!   previous output (or nothing) in place, never a half-written one.
//! - Temporary folders being written are registered, so a signal handler can remove them with
//!   [`remove_temporaries_and_block`] before the process exits.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use candle_core::{Device, Tensor};

use espalier_engine::packed::{PACKED_FILE, write_packed};
use espalier_engine::{LinearWeight, Session};

use crate::report::RunReport;
use crate::run::RunState;
use crate::sparse::Storage;

/// Name of the marker file every export holds.
pub const MARKER: &str = ".espalier-export";
/// `format` field of the marker.
const MARKER_FORMAT: &str = "espalier-export";
/// Version of the marker's layout.
const MARKER_VERSION: u64 = 1;
/// Files an export made before the marker existed can hold (besides `report.json`).
const LEGACY_FILES: &[&str] = &[
    "model.safetensors",
    "config.json",
    "masks.safetensors",
    "report.json",
];

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot export to {dir}: {message}")]
pub struct ExportError {
    /// Destination.
    pub dir: String,
    /// What failed.
    pub message: String,
}

fn err(dir: &Path, message: impl Into<String>) -> ExportError {
    ExportError {
        dir: dir.display().to_string(),
        message: message.into(),
    }
}

/// Temporary folders this process is writing (or old outputs it is deleting).
static ACTIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Set once the process is exiting on a signal: no export may start or commit after.
static TERMINATING: AtomicBool = AtomicBool::new(false);

fn active() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic while holding the lock leaves a valid list: keep using it.
    ACTIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn unregister(list: &mut Vec<PathBuf>, path: &Path) {
    list.retain(|p| p != path);
}

/// Removes a folder even while another thread adds files to it (a write in progress can
/// create an entry between the listing and the final `rmdir`).
fn remove_tree(path: &Path) {
    for _ in 0..20 {
        match std::fs::remove_dir_all(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => continue,
            _ => return,
        }
    }
}

/// For a handler of SIGINT/SIGTERM: removes every temporary folder this process is writing
/// and keeps every export from starting or committing afterwards. Call it only right before
/// exiting: the registry stays locked so no writer can recreate or rename a folder between
/// this cleanup and the exit.
pub fn remove_temporaries_and_block() -> usize {
    TERMINATING.store(true, Ordering::SeqCst);
    let list = active();
    for p in list.iter() {
        remove_tree(p);
    }
    let n = list.len();
    std::mem::forget(list);
    n
}

/// A reserved temporary folder, removed (and unregistered) on drop unless committed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let mut list = active();
            remove_tree(&p);
            unregister(&mut list, &p);
        }
    }
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// `.NAME.TAG-PID-NANOS` next to `dir`.
fn sibling(dir: &Path, name: &str, tag: &str) -> PathBuf {
    dir.with_file_name(format!(".{name}.{tag}-{}-{}", std::process::id(), nanos()))
}

/// The PID in a name Espalier gave a sibling of export `name` (`.NAME.TAG-PID-NANOS`), with
/// the tag; `None` for any other name.
fn parse_sibling(file: &str, name: &str) -> Option<(&'static str, u32)> {
    let rest = file
        .strip_prefix('.')?
        .strip_prefix(name)?
        .strip_prefix('.')?;
    for tag in ["tmp", "old"] {
        if let Some(ids) = rest.strip_prefix(tag).and_then(|r| r.strip_prefix('-')) {
            let (pid, nanos) = ids.split_once('-')?;
            let digits =
                |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
            if !digits(pid) || !digits(nanos) {
                return None;
            }
            let pid: u32 = pid.parse().ok()?;
            return Some((tag, pid));
        }
    }
    None
}

/// Whether a process with this PID exists (a PID we may not signal exists too).
fn pid_alive(pid: u32) -> bool {
    // PID 0 and values above i32::MAX would address process groups: treat as alive (keep).
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporary folders that earlier exports to `dir` left when their process died,
/// and puts back a previous output that one of them had moved aside before dying. Only real
/// folders named like Espalier's own siblings of `dir` whose process is gone are touched.
fn clean_stale(dir: &Path, name: &str) {
    let Some(parent) = dir.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some((tag, pid)) = file.to_str().and_then(|f| parse_sibling(f, name)) else {
            continue;
        };
        let path = entry.path();
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if !is_dir || pid_alive(pid) {
            continue;
        }
        if tag == "old" && std::fs::symlink_metadata(dir).is_err() {
            // The process died between moving the previous output aside and moving the new
            // one in: restore the previous output.
            if std::fs::rename(&path, dir).is_ok() {
                tracing::warn!("restored {} from an interrupted export", dir.display());
                continue;
            }
        }
        tracing::info!("removing {} left by an interrupted export", path.display());
        remove_tree(&path);
    }
}

/// What is at the destination.
#[derive(Debug, PartialEq)]
enum Existing {
    Absent,
    Empty,
    PreviousExport,
    /// Something else; the reason says what.
    Foreign(String),
}

/// The marker's content: the format, and the files the export wrote.
fn marker_json(files: &BTreeSet<String>) -> serde_json::Value {
    serde_json::json!({
        "format": MARKER_FORMAT,
        "version": MARKER_VERSION,
        "espalier_version": env!("CARGO_PKG_VERSION"),
        "files": files,
    })
}

/// The files a marker lists, when it is a valid marker.
fn marker_files(path: &Path) -> Option<BTreeSet<String>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    // A marker is small; anything else is not one of ours.
    if !meta.is_file() || meta.len() > 1 << 20 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    if v.get("format")?.as_str()? != MARKER_FORMAT || v.get("version")?.as_u64()? != MARKER_VERSION
    {
        return None;
    }
    v.get("files")?
        .as_array()?
        .iter()
        .map(|f| f.as_str().map(str::to_string))
        .collect()
}

/// Whether `report.json` was written by Espalier (an export made before the marker existed).
fn is_espalier_report(path: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > 256 << 20 {
        return false;
    }
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    v.get("espalier_version").is_some_and(|x| x.is_string())
        && v.get("stages").is_some_and(|x| x.is_array())
        && v.get("summary").is_some_and(|x| x.is_object())
        && v.get("layers").is_some_and(|x| x.is_array())
}

fn list_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    let mut s = shown
        .iter()
        .map(|n| format!("`{}`", crate::display_safe::name(n)))
        .collect::<Vec<_>>()
        .join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// Looks at what `dir` holds. Only regular files count as an export's files: a folder or a
/// link inside makes it foreign.
fn classify(dir: &Path) -> Result<Existing, ExportError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(err(dir, format!("cannot inspect it: {e}"))),
    };
    if meta.file_type().is_symlink() {
        return Err(err(
            dir,
            "it is a symbolic link; name the folder itself (or a new one)",
        ));
    }
    if !meta.is_dir() {
        return Err(err(dir, "it exists and is not a folder"));
    }
    let mut names = Vec::new();
    let mut regular = BTreeSet::new();
    let entries = std::fs::read_dir(dir).map_err(|e| err(dir, format!("cannot list it: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| err(dir, format!("cannot list it: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            regular.insert(name.clone());
        }
        names.push(name);
    }
    names.sort();
    if names.is_empty() {
        return Ok(Existing::Empty);
    }
    let not_ours = |allowed: &dyn Fn(&str) -> bool| -> Vec<String> {
        names
            .iter()
            .filter(|n| !regular.contains(*n) || !allowed(n))
            .cloned()
            .collect()
    };
    if regular.contains(MARKER) {
        let Some(files) = marker_files(&dir.join(MARKER)) else {
            return Ok(Existing::Foreign(format!(
                "its `{MARKER}` is not a marker Espalier wrote"
            )));
        };
        let foreign = not_ours(&|n| n == MARKER || files.contains(n));
        return Ok(if foreign.is_empty() {
            Existing::PreviousExport
        } else {
            Existing::Foreign(format!(
                "it is an Espalier export but also holds what Espalier did not write there: {}",
                list_names(&foreign)
            ))
        });
    }
    let legacy =
        |n: &str| LEGACY_FILES.contains(&n) || espalier_engine::model::COMPANION_FILES.contains(&n);
    let foreign = not_ours(&legacy);
    if foreign.is_empty() && is_espalier_report(&dir.join("report.json")) {
        return Ok(Existing::PreviousExport);
    }
    Ok(Existing::Foreign(format!(
        "it is not an Espalier export (no `{MARKER}` marker) and holds {}",
        list_names(&names)
    )))
}

/// `path` made absolute with every symbolic link resolved, also when its last components do
/// not exist yet (they are appended to the canonical form of the longest existing prefix).
fn canonical(path: &Path) -> Result<PathBuf, String> {
    let absolute = std::path::absolute(path).map_err(|e| e.to_string())?;
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut c) => {
                for part in rest.iter().rev() {
                    c.push(part);
                }
                return Ok(c);
            }
            Err(_) => {
                // Only plain names may follow the existing part: `..` after a folder that does
                // not exist has no meaning the file system could resolve.
                let (Some(Component::Normal(name)), Some(parent)) =
                    (existing.components().next_back(), existing.parent())
                else {
                    return Err(
                        "the part of it that does not exist yet must be plain folder names (no `..`)"
                            .into(),
                    );
                };
                rest.push(name.to_os_string());
                existing = parent;
            }
        }
    }
}

/// One file or folder the run reads, which an export must never replace.
#[derive(Debug, Clone)]
pub struct Input {
    /// What it is (`model folder`, `calibration text`, ...).
    pub what: String,
    /// Where.
    pub path: PathBuf,
}

impl Input {
    /// An input.
    pub fn new(what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Input {
            what: what.into(),
            path: path.into(),
        }
    }
}

/// A destination checked at planning, with its temporary folder reserved. Dropping it
/// removes the temporary folder.
pub struct ExportTarget {
    /// The destination as the user gave it (for messages).
    dir: PathBuf,
    /// Its canonical form (where the files go).
    canonical: PathBuf,
    force: bool,
    tmp: TempDir,
}

/// Checks `dir` as the destination of a run reading `inputs`, removes stale temporary folders
/// of earlier interrupted exports to it, and reserves this run's temporary folder.
///
/// Refused, whatever `force` says: a destination that is, or contains, an input; a symbolic
/// link; something that is not a folder. Refused unless `force`: an existing folder that is
/// neither empty nor a previous Espalier export.
pub fn prepare(dir: &Path, inputs: &[Input], force: bool) -> Result<ExportTarget, ExportError> {
    if dir.as_os_str().is_empty() {
        return Err(err(dir, "the export path is empty"));
    }
    let canonical = canonical(dir).map_err(|e| err(dir, e))?;
    for input in inputs {
        // An input that does not exist cannot be lost.
        let Ok(path) = input.path.canonicalize() else {
            continue;
        };
        if path.starts_with(&canonical) {
            let how = if path == canonical {
                format!("it is the {}", input.what)
            } else {
                format!(
                    "it holds the {} {} and would be replaced",
                    input.what,
                    input.path.display()
                )
            };
            return Err(err(
                dir,
                format!(
                    "{how}; Espalier never replaces an input of the run, even with --force; choose another folder"
                ),
            ));
        }
    }
    let name = canonical
        .file_name()
        .ok_or_else(|| err(dir, "the export path has no final component"))?
        .to_string_lossy()
        .into_owned();
    if let Some(parent) = canonical.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(dir, format!("cannot create {}: {e}", parent.display())))?;
    }
    clean_stale(&canonical, &name);
    if let Existing::Foreign(why) = classify(&canonical)?
        && !force
    {
        return Err(err(
            dir,
            format!(
                "{why}; Espalier replaces only an empty folder or one of its own exports. Choose a new or empty folder, or pass --force (or set `force = true` in [export]) to replace it and everything in it"
            ),
        ));
    }
    let tmp = sibling(&canonical, &name, "tmp");
    {
        let mut list = active();
        if TERMINATING.load(Ordering::SeqCst) {
            return Err(err(dir, "the process is exiting"));
        }
        std::fs::create_dir(&tmp)
            .map_err(|e| err(dir, format!("cannot create {}: {e}", tmp.display())))?;
        list.push(tmp.clone());
    }
    Ok(ExportTarget {
        dir: dir.to_path_buf(),
        canonical,
        force,
        tmp: TempDir(Some(tmp)),
    })
}

/// Writes the masks as u8 tensors (1 = keep).
pub(crate) fn write_masks(state: &RunState, path: &Path) -> Result<(), String> {
    let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(state.masks.len());
    for (name, mask) in &state.masks {
        let bytes: Vec<u8> = mask.keep().iter().map(|&k| u8::from(k)).collect();
        let t = Tensor::from_vec(bytes, mask.shape(), &Device::Cpu).map_err(|e| e.to_string())?;
        tensors.insert(name.clone(), t);
    }
    if tensors.is_empty() {
        return Ok(());
    }
    candle_core::safetensors::save(&tensors, path).map_err(|e| e.to_string())
}

impl ExportTarget {
    /// The destination as given.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The temporary folder being written (until the export is committed).
    pub fn temporary(&self) -> Option<&Path> {
        self.tmp.0.as_deref()
    }

    /// Writes the run's model, masks, report and marker, then swaps them in atomically.
    ///
    /// With `packed`, the linears are written as the planner packs them in that storage
    /// (`packed.safetensors`) and left out of `model.safetensors`; see [`write_packed_model`].
    pub fn write(
        mut self,
        state: &RunState,
        report: &RunReport,
        masks: bool,
        packed: Option<Storage>,
    ) -> Result<(), ExportError> {
        let dir = self.dir.clone();
        let tmp = self
            .tmp
            .0
            .clone()
            .ok_or_else(|| err(&dir, "the export was already written"))?;
        match packed {
            Some(storage) => write_packed_model(state, storage, &tmp),
            None => state.model.save_into(&tmp).map_err(|e| e.to_string()),
        }
        .map_err(|e| err(&dir, e))?;
        if masks {
            write_masks(state, &tmp.join("masks.safetensors"))
                .map_err(|e| err(&dir, format!("masks: {e}")))?;
        }
        let json =
            serde_json::to_vec_pretty(report).map_err(|e| err(&dir, format!("report: {e}")))?;
        std::fs::write(tmp.join("report.json"), json)
            .map_err(|e| err(&dir, format!("report.json: {e}")))?;
        let mut files = BTreeSet::new();
        for entry in std::fs::read_dir(&tmp).map_err(|e| err(&dir, e.to_string()))? {
            let entry = entry.map_err(|e| err(&dir, e.to_string()))?;
            files.insert(entry.file_name().to_string_lossy().into_owned());
        }
        let marker = serde_json::to_vec_pretty(&marker_json(&files))
            .map_err(|e| err(&dir, format!("marker: {e}")))?;
        std::fs::write(tmp.join(MARKER), marker)
            .map_err(|e| err(&dir, format!("{MARKER}: {e}")))?;
        self.commit(&tmp)
    }

    /// Swaps the written folder in: moves the previous output aside, renames the new one in,
    /// deletes the old one. The registry lock is held across the renames so a signal handler
    /// never deletes a folder while it is being renamed into place.
    fn commit(&mut self, tmp: &Path) -> Result<(), ExportError> {
        let dir = self.dir.clone();
        let target = self.canonical.clone();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let old = {
            let mut list = active();
            if TERMINATING.load(Ordering::SeqCst) {
                return Err(err(&dir, "the process is exiting"));
            }
            // The run took a while: what is there now must still be replaceable.
            let existing = classify(&target)?;
            if let Existing::Foreign(why) = &existing
                && !self.force
            {
                return Err(err(
                    &dir,
                    format!("{why} (it changed during the run); nothing was replaced"),
                ));
            }
            let old = if existing == Existing::Absent {
                None
            } else {
                let old = sibling(&target, &name, "old");
                std::fs::rename(&target, &old).map_err(|e| {
                    err(&dir, format!("cannot move the previous output aside: {e}"))
                })?;
                list.push(old.clone());
                Some(old)
            };
            if let Err(e) = std::fs::rename(tmp, &target) {
                if let Some(old) = &old {
                    let _ = std::fs::rename(old, &target);
                    unregister(&mut list, old);
                }
                return Err(err(
                    &dir,
                    format!("cannot move the new output into place: {e}"),
                ));
            }
            // The temporary folder is now the output: disarm its cleanup.
            unregister(&mut list, tmp);
            self.tmp.0 = None;
            old
        };
        if let Some(old) = old {
            remove_tree(&old);
            unregister(&mut active(), &old);
        }
        Ok(())
    }
}

/// Checks `dir` (no inputs, no force) and exports the run's model, masks and report to it.
pub fn export(
    state: &RunState,
    report: &RunReport,
    dir: &Path,
    masks: bool,
    packed: Option<Storage>,
) -> Result<(), ExportError> {
    prepare(dir, &[], false)?.write(state, report, masks, packed)
}

/// Writes a packed checkpoint of the run's model into `dir`: every linear the planner packs
/// (in `storage`, exactly as evaluation runs it) goes to `packed.safetensors`, everything else
/// (embeddings, norms, biases, linears left on the dense f32 path) to `model.safetensors`, with
/// `config.json` and the companion files. A tied embedding stays in `model.safetensors` for
/// the lookups; its packed copy is the LM head.
pub fn write_packed_model(state: &RunState, storage: Storage, dir: &Path) -> Result<(), String> {
    let model = &state.model;
    let mut session = Session::new(model).map_err(|e| e.to_string())?;
    crate::sparse::attach(&mut session, model, &state.masks, storage)
        .map_err(|e| format!("packing: {e}"))?;
    let embedding = model.embedding_name();
    let mut layers = Vec::new();
    let mut skip = BTreeSet::new();
    for linear in session.linears() {
        if let LinearWeight::Kernel(kernel) = linear.weight()
            && let Some(packed) = kernel.packed()
        {
            layers.push((linear.name().to_string(), packed));
            if linear.name() != embedding {
                skip.insert(linear.name().to_string());
            }
        }
    }
    write_packed(&dir.join(PACKED_FILE), &layers).map_err(|e| e.to_string())?;
    model
        .save_into_except(dir, &skip)
        .map_err(|e| e.to_string())
}

/// An export's masks (`DIR/masks.safetensors`, 1 = kept), read one layer at a time, each with
/// its structure from the export's `report.json` (unstructured when it names none): a whole
/// model's masks are ~100 MB as bytes, so a loader that packs layer by layer asks for each
/// mask as it needs it.
pub struct MaskFile {
    path: std::path::PathBuf,
    file: espalier_engine::TensorFile,
    structures: HashMap<String, crate::mask::Structure>,
    evaluated_storage: Option<Storage>,
}

impl MaskFile {
    /// Opens `DIR/masks.safetensors` and reads `DIR/report.json` once for the structures and
    /// the evaluated storage; `None` when the folder holds no masks (a dense model, or another
    /// tool's export).
    pub fn open(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join("masks.safetensors");
        if !path.is_file() {
            return Ok(None);
        }
        let report = std::fs::read(dir.join("report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<RunReport>(&b).ok());
        let evaluated_storage = report
            .as_ref()
            .and_then(|r| r.evaluation.as_ref())
            .map(|e| storage_of_kernels(&e.pruned.kernels));
        let structures = report
            .map(|r| {
                r.layers
                    .into_iter()
                    .filter_map(|l| Some((l.name, l.structure?.parse().ok()?)))
                    .collect()
            })
            .unwrap_or_default();
        let file = espalier_engine::TensorFile::open(&path).map_err(|e| e.to_string())?;
        Ok(Some(MaskFile {
            path,
            file,
            structures,
            evaluated_storage,
        }))
    }

    /// The storage the export's run evaluated its pruned model in, read from the kernels its
    /// `report.json` records (`bitmap/bf16`, `dense/int8`, ...); `None` without a readable
    /// report or a pruned evaluation in it.
    pub fn evaluated_storage(&self) -> Option<Storage> {
        self.evaluated_storage
    }

    /// The file read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The masked layers' names, in file order.
    pub fn names(&self) -> Vec<String> {
        self.file.names()
    }

    /// The mask of layer `name`; `None` when the file holds none for it. A structure the bits
    /// do not satisfy (an edited file) falls back to unstructured.
    pub fn read(&mut self, name: &str) -> Result<Option<crate::mask::Mask>, String> {
        use crate::mask::{Mask, Structure};
        let err = |e: &dyn std::fmt::Display| format!("{}: {name}: {e}", self.path.display());
        let Some(tensor) = self.file.read(name).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let shape = tensor.dims().to_vec();
        let keep: Vec<bool> = tensor
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::U8))
            .and_then(|t| t.to_vec1::<u8>())
            .map_err(|e| err(&e))?
            .into_iter()
            .map(|b| b != 0)
            .collect();
        let structure = self
            .structures
            .get(name)
            .copied()
            .unwrap_or(Structure::Unstructured);
        // Only a declared structure needs the copy of the bits its fallback takes.
        let mask = if structure == Structure::Unstructured {
            Mask::new(shape, keep, structure)
        } else {
            Mask::new(shape.clone(), keep.clone(), structure)
                .or_else(|_| Mask::new(shape, keep, Structure::Unstructured))
        }
        .map_err(|e| err(&e))?;
        Ok(Some(mask))
    }
}

/// The storage of an evaluation's packed kernels (`bitmap/bf16`, `dense/int8`, ...): f32 when
/// none names another dtype.
fn storage_of_kernels(kernels: &crate::evaluate::KernelUse) -> Storage {
    kernels
        .layers
        .keys()
        .filter_map(|k| k.rsplit_once('/'))
        .find_map(|(_, dtype)| Storage::from_name(dtype).filter(|s| *s != Storage::F32))
        .unwrap_or(Storage::F32)
}

/// Every mask an export wrote (see [`MaskFile`]); `None` when the folder holds no masks.
pub fn read_masks(
    dir: &Path,
) -> Result<Option<std::collections::BTreeMap<String, crate::mask::Mask>>, String> {
    let Some(mut file) = MaskFile::open(dir)? else {
        return Ok(None);
    };
    let mut masks = std::collections::BTreeMap::new();
    for name in file.names() {
        if let Some(mask) = file.read(&name)? {
            masks.insert(name, mask);
        }
    }
    Ok(Some(masks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, body: &str) {
        std::fs::write(path, body).unwrap();
    }

    fn written_export(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        touch(&dir.join("model.safetensors"), "w");
        touch(&dir.join("report.json"), "{}");
        let files: BTreeSet<String> = ["model.safetensors", "report.json"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        touch(&dir.join(MARKER), &marker_json(&files).to_string());
    }

    #[test]
    fn recognises_only_its_own_exports() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("out");
        assert_eq!(classify(&d).unwrap(), Existing::Absent);
        std::fs::create_dir(&d).unwrap();
        assert_eq!(classify(&d).unwrap(), Existing::Empty);
        // A random folder that happens to hold a report.json.
        touch(&d.join("report.json"), "{\"espalier_version\": \"x\"}");
        assert!(matches!(classify(&d).unwrap(), Existing::Foreign(_)));
        // A forged or broken marker.
        touch(&d.join(MARKER), "hello");
        assert!(matches!(classify(&d).unwrap(), Existing::Foreign(_)));
        // A marker whose list does not cover everything in the folder.
        written_export(&d);
        assert_eq!(classify(&d).unwrap(), Existing::PreviousExport);
        touch(&d.join("notes.txt"), "mine");
        match classify(&d).unwrap() {
            Existing::Foreign(why) => assert!(why.contains("notes.txt"), "{why}"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(d.join("notes.txt")).unwrap();
        // A sub-folder is never part of an export.
        std::fs::create_dir(d.join("model.safetensors.d")).unwrap();
        assert!(matches!(classify(&d).unwrap(), Existing::Foreign(_)));
    }

    #[test]
    fn recognises_exports_made_before_the_marker() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("old");
        std::fs::create_dir(&d).unwrap();
        touch(&d.join("model.safetensors"), "w");
        touch(&d.join("config.json"), "{}");
        touch(
            &d.join("report.json"),
            "{\"espalier_version\":\"0.1.0\",\"stages\":[],\"summary\":{},\"layers\":[]}",
        );
        assert_eq!(classify(&d).unwrap(), Existing::PreviousExport);
        touch(&d.join("thesis.tex"), "years of work");
        assert!(matches!(classify(&d).unwrap(), Existing::Foreign(_)));
    }

    #[test]
    fn sibling_names_are_parsed_strictly() {
        assert_eq!(parse_sibling(".out.tmp-123-456", "out"), Some(("tmp", 123)));
        assert_eq!(parse_sibling(".out.old-7-0", "out"), Some(("old", 7)));
        for other in [
            ".out.tmp-123",
            ".out.tmp-12a-4",
            ".out.tmp--4",
            ".other.tmp-1-2",
            "out.tmp-1-2",
            ".out.tmp-1-2-3",
            ".out.bak-1-2",
            ".out.tmp-99999999999-1",
        ] {
            assert_eq!(parse_sibling(other, "out"), None, "{other}");
        }
    }

    #[test]
    fn a_dead_pid_is_dead_and_ours_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(pid_alive(0));
        // PIDs above the kernel's maximum never exist.
        assert!(!pid_alive(i32::MAX as u32));
    }

    #[test]
    fn stale_temporaries_are_removed_and_an_old_output_restored() {
        let t = tempfile::tempdir().unwrap();
        let dead = i32::MAX as u32;
        let out = t.path().join("out");
        let stale = t.path().join(format!(".out.tmp-{dead}-1"));
        let live = t.path().join(format!(".out.tmp-{}-1", std::process::id()));
        let old = t.path().join(format!(".out.old-{dead}-2"));
        let foreign = t.path().join(".out.tmp-keep-me");
        for d in [&stale, &live, &old, &foreign] {
            std::fs::create_dir(d).unwrap();
        }
        touch(&old.join("report.json"), "previous");
        clean_stale(&out, "out");
        assert!(!stale.exists());
        assert!(live.exists() && foreign.exists());
        assert_eq!(
            std::fs::read_to_string(out.join("report.json")).unwrap(),
            "previous"
        );
    }

    #[test]
    fn inputs_and_their_parents_are_refused_even_with_force() {
        let t = tempfile::tempdir().unwrap();
        let model = t.path().join("models/m");
        std::fs::create_dir_all(&model).unwrap();
        let inputs = [Input::new("model folder", &model)];
        for dir in [model.clone(), t.path().join("models"), model.join("..")] {
            let e = prepare(&dir, &inputs, true).err().expect("refused");
            assert!(e.message.contains("never replaces an input"), "{e}");
        }
        // Inside the model folder is fine (nothing of it is replaced).
        let inside = prepare(&model.join("pruned"), &inputs, false).unwrap();
        assert!(inside.temporary().unwrap().exists());
        let tmp = inside.temporary().unwrap().to_path_buf();
        drop(inside);
        assert!(
            !tmp.exists(),
            "dropping the target removes its temporary folder"
        );
    }

    #[test]
    fn canonical_paths_resolve_missing_tails() {
        let t = tempfile::tempdir().unwrap();
        let c = canonical(&t.path().join("a/b")).unwrap();
        assert_eq!(c, t.path().canonicalize().unwrap().join("a/b"));
        assert!(canonical(&t.path().join("a/../b")).is_err());
        // `..` inside the existing part resolves.
        std::fs::create_dir(t.path().join("x")).unwrap();
        let c = canonical(&t.path().join("x/../y")).unwrap();
        assert_eq!(c, t.path().canonicalize().unwrap().join("y"));
    }
}
