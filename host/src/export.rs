//! Export of a pruned model: a Hugging Face–style directory (config.json, model.safetensors
//! with zeros in place and removed heads cut out, companion tokenizer files), the masks
//! (`masks.safetensors`, one u8 tensor per pruned layer, 1 = kept) and `report.json`.
//!
//! Everything is written into a temporary sibling directory that replaces the destination by
//! rename only once complete: a failed export leaves the previous output (or nothing) in
//! place, never a half-written one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::report::RunReport;
use crate::run::RunState;

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

/// Removes the temporary directory unless disarmed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf, ExportError> {
    let name = dir
        .file_name()
        .ok_or_else(|| err(dir, "the export path has no final component"))?
        .to_string_lossy()
        .into_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Ok(dir.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id())))
}

/// Writes the masks as u8 tensors (1 = keep).
fn write_masks(state: &RunState, path: &Path) -> Result<(), String> {
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

/// Exports the run's model, masks and report to `dir`, atomically.
pub fn export(
    state: &RunState,
    report: &RunReport,
    dir: &Path,
    masks: bool,
) -> Result<(), ExportError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| err(dir, format!("cannot create {}: {e}", parent.display())))?;
    }
    if dir.exists() && !dir.is_dir() {
        return Err(err(dir, "it exists and is not a directory"));
    }
    let tmp = sibling(dir, "tmp")?;
    std::fs::create_dir(&tmp)
        .map_err(|e| err(dir, format!("cannot create {}: {e}", tmp.display())))?;
    let mut guard = TempDir(Some(tmp.clone()));

    state
        .model
        .save_into(&tmp)
        .map_err(|e| err(dir, e.to_string()))?;
    if masks {
        write_masks(state, &tmp.join("masks.safetensors"))
            .map_err(|e| err(dir, format!("masks: {e}")))?;
    }
    let json = serde_json::to_vec_pretty(report).map_err(|e| err(dir, format!("report: {e}")))?;
    std::fs::write(tmp.join("report.json"), json)
        .map_err(|e| err(dir, format!("report.json: {e}")))?;

    // Swap in: move the old output aside, rename the new one in, then delete the old one.
    let old = if dir.exists() {
        let old = sibling(dir, "old")?;
        std::fs::rename(dir, &old)
            .map_err(|e| err(dir, format!("cannot move the previous output aside: {e}")))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dir);
        }
        return Err(err(
            dir,
            format!("cannot move the new output into place: {e}"),
        ));
    }
    // The temporary directory is now the output: disarm the cleanup.
    guard.0 = None;
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}
