//! Reading input files safely: only regular files, and never more bytes than the kind of file
//! can legitimately hold.
//!
//! Every file Espalier reads on a user's behalf (model folders, pipelines, plugins, texts) may
//! come from someone else. A path naming `/dev/zero` would be read without end, a FIFO would
//! block the open or the read forever, and a directory gives a confusing error. [`open_regular`]
//! refuses all of these: it looks at the path first (so opening a device, which can have side
//! effects, is normally not even tried), then opens without blocking and checks the *opened*
//! handle with `fstat`, so that a path swapped between the check and the open cannot slip
//! through. [`read`] and [`read_to_string`] then read at most a per-kind limit, checked both
//! against the size the file reports and against the bytes actually read (a file may grow while
//! it is read).
//!
//! Errors are plain [`std::io::Error`]s whose message says what is wrong; callers add the path,
//! as they already do for any other read error.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::Path;

/// Pipeline files: a pipeline is a few dozen lines of TOML; 1 MiB is far beyond any real one and
/// keeps a hostile one from costing the parser more than a moment.
pub const PIPELINE_LIMIT: u64 = 1 << 20;

/// Calibration and evaluation texts: WikiText-103's training split is about 540 MB, but runs
/// read at most a few million tokens; 256 MiB holds any text a run can use.
pub const TEXT_LIMIT: u64 = 256 << 20;

/// Plugin components: the built-in criteria are a few hundred KiB each; 64 MiB leaves room for
/// plugins that embed tables or a language runtime, while bounding what one file costs.
pub const PLUGIN_LIMIT: u64 = 64 << 20;

/// `config.json`, `tokenizer.json`, `model.safetensors.index.json` and the other companion files:
/// the largest real tokenizer.json files (256k-token vocabularies) are about 35 MB; configs and
/// indexes are far smaller.
pub const JSON_LIMIT: u64 = 64 << 20;

fn kind_of(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a plain file"
}

fn not_regular(meta: &Metadata) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file (it is {})", kind_of(meta)),
    )
}

/// Opens `path` for reading if, and only if, it is a regular file (symbolic links are followed);
/// returns the file and its size.
///
/// A FIFO, device, socket or directory is refused with an error saying "not a regular file";
/// the open itself never blocks.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    // Check the path first: opening a device or FIFO is what we want to avoid altogether.
    let before = std::fs::metadata(path)?;
    if !before.is_file() {
        return Err(not_regular(&before));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // If the path was swapped for a FIFO after the check, a plain open would wait for a
        // writer; O_NONBLOCK makes it return at once (and has no effect on regular files).
        // O_NOCTTY keeps a terminal device from becoming our controlling terminal.
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path)?;
    // Check what was opened, not the path: this closes the race with the check above.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok((file, meta.len()))
}

fn too_large(size: u64, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "file is too large: {size} bytes, more than the {limit} bytes allowed for this kind of file"
        ),
    )
}

/// Reads a regular file of at most `limit` bytes (see the `*_LIMIT` constants).
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, size) = open_regular(path)?;
    if size > limit {
        return Err(too_large(size, limit));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // One byte past the limit tells a file that grew past it from one that fits exactly.
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64, limit));
    }
    Ok(bytes)
}

/// Reads a regular UTF-8 text file of at most `limit` bytes.
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    let bytes = read(path, limit)?;
    String::from_utf8(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not valid UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, "hello").unwrap();
        assert_eq!(read_to_string(&path, 5).unwrap(), "hello");
        let err = read(&path, 4).unwrap_err().to_string();
        assert!(
            err.contains("too large") && err.contains("5 bytes"),
            "{err}"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let err = read_to_string(&path, 5).unwrap_err().to_string();
        assert!(err.contains("UTF-8"), "{err}");
    }

    #[test]
    fn directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path(), 10).unwrap_err().to_string();
        assert!(
            err.contains("not a regular file") && err.contains("directory"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn devices_and_fifos_are_refused_without_blocking() {
        let err = read(Path::new("/dev/zero"), u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a regular file") && err.contains("device"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without the checks this would block forever waiting for a writer.
        let err = read(&fifo, 10).unwrap_err().to_string();
        assert!(
            err.contains("not a regular file") && err.contains("FIFO"),
            "{err}"
        );

        // A symbolic link is followed, and what it names is checked.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let err = read(&link, 10).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
