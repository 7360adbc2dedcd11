//! Writing a file whole or not at all: the bytes go to a temporary file beside the target
//! (a dot-name the plugin watcher and readers ignore) and are renamed over it, so a reader or a
//! crash never sees half a file. One helper for every file Espalier writes this way (plugin
//! uploads and pulls, signatures, reports, the compiled-plugin cache, the state folder's texts).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of concurrent writes from one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` through a temporary file beside it and a rename, creating the
/// folder; a failed write leaves no temporary file behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Like [`write_atomic`] for writers that want a path (a serializer that streams to a file):
/// `write` fills the temporary file, which is then renamed over `path`; on failure it is
/// removed and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write(&tmp).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_files_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub")).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary file was left behind");
        // A target that cannot be replaced (a folder) fails and cleans up.
        std::fs::create_dir(dir.path().join("sub/d")).unwrap();
        assert!(write_atomic(&dir.path().join("sub/d"), b"x").is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            2
        );
    }
}
