//! Watching a folder (the plugin folder) and reporting each file once it is complete.
//!
//! Hot reload in other servers failed in three ways we design against: a poller saw a file
//! half-written and then stopped reloading after the failed load; a watcher with a short
//! debounce hashed a file that an editor had just truncated and not yet rewritten; and a watch on
//! a single file died when the file was replaced by an atomic rename (the watch follows the old
//! inode). So [`FolderWatcher`]:
//!
//! - watches the *folder*, non-recursively, with the platform's notifier (`notify`), and also
//!   rescans it every [`WatchOptions::rescan_interval`], so a lost or overflowed event delays a
//!   change but never loses it;
//! - reports a file as [`WatchEvent::Ready`] only when its size, mtime, inode and ctime stayed the
//!   same over a whole [`WatchOptions::debounce`] window with no event for it in between, and the
//!   bytes read back match that size and the file did not change while being read; the bytes
//!   come with the event, so what the consumer validates is exactly what was hashed;
//! - reports the same content (same sha256) for the same name only once; a new content is
//!   reported again, whatever the consumer made of the previous one (its verdict never stops the
//!   watcher, and a panic in the handler is caught and counted);
//! - considers only names with one of [`WatchOptions::extensions`], never hidden names (leading
//!   `.`, which is how our own uploads stage `.NAME.tmp-*` before renaming) or temporary names
//!   (`*.tmp`, `*.part`, `*~`, ...);
//! - never opens anything but a regular file, and opens without blocking, so a FIFO dropped in the
//!   folder cannot hang it; symbolic links are rejected rather than followed out of the folder.
//!
//! Empty files produce no event at all (the status lists them): an empty file is what a
//! truncate-then-rewrite looks like mid-way, and a writer stalled for longer than the debounce
//! (a busy disk, a slow copy) must not make a plugin disappear; the content that follows is
//! reported when it is stable. A writer stalled *mid-content* for longer than the debounce does
//! get its partial file reported: the consumer's validation refuses it, and the complete file,
//! being a new content, is reported again.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// How many recent problems [`WatchStatus::last_errors`] keeps.
const MAX_RECENT_ERRORS: usize = 32;

/// How long dropping a [`FolderWatcher`] waits for its thread (which may be inside the handler,
/// compiling a plugin) before leaving it to finish on its own.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The least time between two rescans asked for by events.
const MIN_RESCAN_GAP: Duration = Duration::from_millis(100);

/// Name endings of temporary files written by editors, browsers and copy tools.
const TEMP_SUFFIXES: &[&str] = &[
    "~",
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".swp",
    ".swx",
    ".bak",
];

/// What to watch for and how patiently.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// File name extensions to report, without the dot, compared case-insensitively
    /// (e.g. `["wasm", "toml"]`).
    pub extensions: Vec<String>,
    /// How long a file must stay unchanged before it is read and reported.
    pub debounce: Duration,
    /// How often the whole folder is listed again, in case an event was missed.
    pub rescan_interval: Duration,
    /// Files larger than this are rejected without being read.
    pub max_file_size: u64,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            extensions: vec!["wasm".to_owned()],
            debounce: Duration::from_millis(500),
            rescan_interval: Duration::from_secs(5),
            // The plugin limit the CLI applies to components (engine::files::PLUGIN_LIMIT).
            max_file_size: 64 << 20,
        }
    }
}

/// A file that is complete and stable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyFile {
    pub path: PathBuf,
    pub len: u64,
    pub modified: SystemTime,
    /// Lowercase hex sha256 of `bytes`.
    pub sha256: String,
    /// The whole content, as hashed.
    pub bytes: Vec<u8>,
}

/// What the watcher reports to its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A new or changed file, complete (see the module documentation).
    Ready(ReadyFile),
    /// A file with a watched extension that will not be reported as it is (too large, not a
    /// regular file, unreadable). Reported once per state of the file; a previously reported
    /// version of it should be considered gone.
    Rejected { path: PathBuf, reason: String },
    /// A file that had been reported as ready no longer exists.
    Removed { path: PathBuf },
}

/// A problem the watcher met, kept for the status API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchProblem {
    pub at: SystemTime,
    pub path: Option<PathBuf>,
    pub message: String,
}

/// Counters and recent problems, for the daemon's status endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStatus {
    pub ready_events: u64,
    pub rejected_events: u64,
    pub removed_events: u64,
    /// Full listings of the folder done (the initial one and the periodic ones).
    pub rescans: u64,
    /// Files read and hashed (a file is read once per stable version).
    pub files_read: u64,
    /// Panics caught in the handler.
    pub handler_panics: u64,
    /// Files currently rejected (or empty, which is not reported as an event), with the reason.
    pub rejected: BTreeMap<PathBuf, String>,
    /// The most recent problems, oldest first (at most 32).
    pub last_errors: VecDeque<WatchProblem>,
}

/// Why a watcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {}: {source}", dir.display())]
    NoFolder {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch {}: not a folder", dir.display())]
    NotAFolder { dir: PathBuf },
    #[error("cannot watch folder {}: {source}", dir.display())]
    Notify {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot list folder {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid watch options: {0}")]
    InvalidOptions(String),
    #[error("cannot start the folder watcher thread: {0}")]
    Thread(#[source] io::Error),
}

type Handler = Box<dyn Fn(WatchEvent) + Send + 'static>;

enum Msg {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// A running watch on one folder. Dropping it (or [`FolderWatcher::stop`]) stops the watch.
pub struct FolderWatcher {
    dir: PathBuf,
    status: Arc<Mutex<WatchStatus>>,
    stop: Arc<AtomicBool>,
    tx: Sender<Msg>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FolderWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolderWatcher")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FolderWatcher {
    /// Starts watching `dir`.
    ///
    /// Before returning, lists the folder, waits one debounce window (only if it holds candidate
    /// files) and calls `handler` — on the calling thread — for every file that was stable over
    /// it, so the caller can register the folder's contents before it serves requests. Files
    /// still changing are reported later from the watcher's own thread, like every later change.
    pub fn start(
        dir: PathBuf,
        options: WatchOptions,
        handler: impl Fn(WatchEvent) + Send + 'static,
    ) -> Result<FolderWatcher, WatchError> {
        if options.extensions.is_empty() {
            return Err(WatchError::InvalidOptions(
                "no file extensions to watch".to_owned(),
            ));
        }
        if options.rescan_interval.is_zero() {
            return Err(WatchError::InvalidOptions(
                "the rescan interval must be above zero".to_owned(),
            ));
        }
        let meta = std::fs::metadata(&dir).map_err(|source| WatchError::NoFolder {
            dir: dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(WatchError::NotAFolder { dir });
        }
        // Canonical, so that paths in notify's events and in our listings agree even when `dir`
        // was given through a symbolic link or with `..`.
        let dir = dir
            .canonicalize()
            .map_err(|source| WatchError::NoFolder { dir, source })?;

        let (tx, rx) = mpsc::channel();
        let fs_tx = tx.clone();
        let mut notifier = notify::recommended_watcher(move |event| {
            // The receiver is gone only once the watcher thread has stopped.
            let _ = fs_tx.send(Msg::Fs(event));
        })
        .map_err(|source| WatchError::Notify {
            dir: dir.clone(),
            source,
        })?;
        // Watch before the first listing, so nothing that changes during it is missed.
        notifier
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| WatchError::Notify {
                dir: dir.clone(),
                source,
            })?;

        let status = Arc::new(Mutex::new(WatchStatus::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = State {
            dir: dir.clone(),
            options,
            files: HashMap::new(),
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
            handler: Box::new(handler),
            notifier,
            watching: true,
            rescan_wanted: false,
        };

        let names = state.list_folder().map_err(|source| WatchError::ReadDir {
            dir: dir.clone(),
            source,
        })?;
        state.bump(|s| s.rescans += 1);
        let start = Instant::now();
        for path in names {
            state.observe(&path, start, false);
        }
        if state.files.values().any(|f| !f.settled) {
            std::thread::sleep(state.options.debounce);
        }
        state.settle_due(Instant::now());

        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("espalier-watch".to_owned())
            .spawn(move || {
                state.run(&rx);
                let _ = done_tx.send(());
            })
            .map_err(WatchError::Thread)?;
        tracing::info!(dir = %dir.display(), "watching folder");
        Ok(FolderWatcher {
            dir,
            status,
            stop,
            tx,
            done,
            thread: Some(thread),
        })
    }

    /// The folder watched (canonical path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Counters, currently rejected files and recent problems.
    pub fn status(&self) -> WatchStatus {
        match self.status.lock() {
            Ok(status) => status.clone(),
            // Only our own code holds this lock, briefly, and never calls out while holding it;
            // a poisoned lock still holds consistent counters.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Stops the watch; returns once the thread has ended, or after a bounded wait if the handler
    /// is busy (the thread then ends on its own after the handler returns).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Stop);
        match self.done.recv_timeout(STOP_WAIT) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if thread.join().is_err() {
                    tracing::error!(dir = %self.dir.display(), "folder watcher thread panicked");
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    "folder watcher still busy in its handler; not waiting for it"
                );
            }
        }
    }
}

impl Drop for FolderWatcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What identifies one version of a directory entry: any write, truncation, rename over it or
/// permission change alters at least one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature {
    kind: EntryKind,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    ctime: (i64, i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Signature {
    fn of(meta: &Metadata) -> Signature {
        let t = meta.file_type();
        let kind = if t.is_file() {
            EntryKind::File
        } else if t.is_dir() {
            EntryKind::Dir
        } else if t.is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::Other
        };
        #[cfg(unix)]
        let (inode, ctime) = {
            use std::os::unix::fs::MetadataExt;
            (meta.ino(), (meta.ctime(), meta.ctime_nsec()))
        };
        #[cfg(not(unix))]
        let (inode, ctime) = (0, (0, 0));
        Signature {
            kind,
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
            ctime,
        }
    }
}

/// What the watcher knows about one candidate name.
struct FileState {
    sig: Signature,
    /// When `sig` was first seen (or an event last touched the file).
    since: Instant,
    /// Whether the current `sig` has been dealt with (reported, rejected, or found identical).
    settled: bool,
    /// The sha256 last reported as ready for this name.
    reported: Option<String>,
}

/// Everything the watcher thread owns.
struct State {
    dir: PathBuf,
    options: WatchOptions,
    files: HashMap<PathBuf, FileState>,
    status: Arc<Mutex<WatchStatus>>,
    stop: Arc<AtomicBool>,
    handler: Handler,
    notifier: RecommendedWatcher,
    /// Whether `notifier` currently watches `dir` (the folder may disappear and come back).
    watching: bool,
    /// An event asked for a full listing (overflow, an event on the folder itself).
    rescan_wanted: bool,
}

/// The outcome of trying to read a stable file.
enum ReadOutcome {
    Complete(Vec<u8>),
    /// Stable and empty: wait for content without reporting anything.
    Empty,
    /// The file changed while we looked; try again after another window.
    Changed,
    Refused(String),
}

impl State {
    fn run(&mut self, rx: &Receiver<Msg>) {
        let mut last_rescan = Instant::now();
        // Rescans asked for by events come at most once per gap: should something make every
        // listing trigger an event on the folder, the watcher must not spin on it.
        let gap = self.options.debounce.max(MIN_RESCAN_GAP);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let mut next_rescan = last_rescan + self.options.rescan_interval;
            if self.rescan_wanted {
                next_rescan = next_rescan.min(last_rescan + gap);
            }
            let next_due = self
                .files
                .values()
                .filter(|f| !f.settled)
                .map(|f| f.since + self.options.debounce)
                .min();
            let wake = next_due.map_or(next_rescan, |due| due.min(next_rescan));
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(Msg::Fs(event)) => {
                    self.on_event(event);
                    // Take everything already queued before settling: a burst of writes is one
                    // change, not many.
                    loop {
                        match rx.try_recv() {
                            Ok(Msg::Fs(event)) => self.on_event(event),
                            Ok(Msg::Stop) => return,
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            let periodic_due = now >= last_rescan + self.options.rescan_interval;
            let wanted_due = self.rescan_wanted && now >= last_rescan + gap;
            if periodic_due || wanted_due {
                self.rescan();
                last_rescan = Instant::now();
            }
            self.settle_due(Instant::now());
        }
        tracing::debug!(dir = %self.dir.display(), "folder watcher stopped");
    }

    fn on_event(&mut self, event: notify::Result<notify::Event>) {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                self.problem(None, format!("watch error: {e}; rescanning"));
                self.rescan_wanted = true;
                return;
            }
        };
        // Opens and reads change nothing, and our own read of a file would otherwise restart
        // its window and make us read it again, forever. The end of a write does matter.
        if let EventKind::Access(kind) = event.kind
            && kind != AccessKind::Close(AccessMode::Write)
        {
            return;
        }
        if event.need_rescan() || event.paths.is_empty() {
            self.rescan_wanted = true;
            return;
        }
        let now = Instant::now();
        for path in &event.paths {
            // Non-recursive: events name the folder itself or one of its entries.
            match (path.parent(), path.file_name()) {
                (Some(parent), Some(name)) if parent == self.dir => {
                    let path = self.dir.join(name);
                    if self.is_candidate(&path) {
                        self.observe(&path, now, true);
                    }
                }
                _ => self.rescan_wanted = true,
            }
        }
    }

    /// Lists the candidate names in the folder.
    fn list_folder(&self) -> io::Result<Vec<PathBuf>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if self.is_candidate(&path) {
                names.push(path);
            }
        }
        Ok(names)
    }

    fn rescan(&mut self) {
        self.rescan_wanted = false;
        self.bump(|s| s.rescans += 1);
        let names = match self.list_folder() {
            Ok(names) => names,
            Err(e) => {
                self.problem(
                    None,
                    format!("cannot list folder {}: {e}", self.dir.display()),
                );
                if self.watching {
                    // The folder is gone or unreadable: its watch is dead. Re-arm when it is back.
                    let _ = self.notifier.unwatch(&self.dir);
                    self.watching = false;
                }
                Vec::new()
            }
        };
        if !self.watching && self.dir.is_dir() {
            match self.notifier.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watching = true;
                    tracing::info!(dir = %self.dir.display(), "folder is back; watching it again");
                }
                Err(e) => self.problem(None, format!("cannot watch folder again: {e}")),
            }
        }
        let now = Instant::now();
        let known: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !names.contains(p))
            .cloned()
            .collect();
        for path in known {
            self.observe(&path, now, false);
        }
        for path in names {
            self.observe(&path, now, false);
        }
    }

    /// Looks at one candidate name now. `touched`: an event named it, so even an unchanged
    /// signature restarts its window (a write may not have moved a coarse mtime yet).
    fn observe(&mut self, path: &Path, now: Instant, touched: bool) {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.gone(path);
                return;
            }
            Err(e) => {
                self.problem(Some(path), format!("cannot look at the file: {e}"));
                return;
            }
        };
        let sig = Signature::of(&meta);
        if sig.kind == EntryKind::Dir {
            // Sub-folders are not ours to report, whatever their name.
            self.gone(path);
            return;
        }
        match self.files.get_mut(path) {
            Some(state) if state.sig == sig && !touched => {}
            Some(state) => {
                state.sig = sig;
                state.since = now;
                state.settled = false;
            }
            None => {
                self.files.insert(
                    path.to_owned(),
                    FileState {
                        sig,
                        since: now,
                        settled: false,
                        reported: None,
                    },
                );
            }
        }
    }

    fn gone(&mut self, path: &Path) {
        if let Some(state) = self.files.remove(path) {
            self.bump(|s| {
                s.rejected.remove(path);
            });
            if state.reported.is_some() {
                tracing::info!(path = %path.display(), "watched file removed");
                self.bump(|s| s.removed_events += 1);
                self.emit(WatchEvent::Removed {
                    path: path.to_owned(),
                });
            }
        }
    }

    /// Settles every file whose window has passed.
    fn settle_due(&mut self, now: Instant) {
        let due: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, f)| !f.settled && f.since + self.options.debounce <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for path in due {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.settle(&path);
        }
    }

    fn settle(&mut self, path: &Path) {
        let Some(expected) = self.files.get(path).map(|f| f.sig.clone()) else {
            return;
        };
        // The window is over only if nothing changed during it.
        let now_sig = match std::fs::symlink_metadata(path) {
            Ok(meta) => Signature::of(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.gone(path);
                return;
            }
            Err(e) => {
                self.reject(path, format!("cannot look at the file: {e}"));
                return;
            }
        };
        if now_sig != expected {
            self.observe(path, Instant::now(), false);
            return;
        }
        let outcome = match expected.kind {
            EntryKind::File => self.read_stable(path, &expected),
            EntryKind::Symlink => {
                ReadOutcome::Refused("symbolic links are not followed".to_owned())
            }
            EntryKind::Other | EntryKind::Dir => {
                ReadOutcome::Refused("not a regular file".to_owned())
            }
        };
        match outcome {
            ReadOutcome::Changed => self.observe(path, Instant::now(), true),
            ReadOutcome::Refused(reason) => self.reject(path, reason),
            ReadOutcome::Empty => {
                if let Some(state) = self.files.get_mut(path) {
                    state.settled = true;
                }
                tracing::debug!(path = %path.display(), "watched file is empty; waiting for content");
                self.bump(|s| {
                    s.rejected
                        .insert(path.to_owned(), "file is empty".to_owned());
                });
            }
            ReadOutcome::Complete(bytes) => self.ready(path, &expected, bytes),
        }
    }

    fn read_stable(&self, path: &Path, expected: &Signature) -> ReadOutcome {
        let cap = self.options.max_file_size;
        if expected.len > cap {
            return ReadOutcome::Refused(format!(
                "file is too large: {} bytes, more than the {cap} allowed",
                expected.len
            ));
        }
        if expected.len == 0 {
            return ReadOutcome::Empty;
        }
        let mut file = match open_no_block(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return ReadOutcome::Changed,
            Err(e) => return ReadOutcome::Refused(format!("cannot open: {e}")),
        };
        // Check what was opened, not the path: it may have been swapped since the stat.
        let opened = match file.metadata() {
            Ok(meta) => Signature::of(&meta),
            Err(e) => return ReadOutcome::Refused(format!("cannot look at the file: {e}")),
        };
        if opened != *expected {
            return ReadOutcome::Changed;
        }
        let mut bytes = Vec::with_capacity(usize::try_from(expected.len).unwrap_or(0));
        // One byte past the size tells a file that grew from one that is complete.
        if let Err(e) = (&mut file)
            .take(expected.len.saturating_add(1))
            .read_to_end(&mut bytes)
        {
            return ReadOutcome::Refused(format!("cannot read: {e}"));
        }
        let after = match file.metadata() {
            Ok(meta) => Signature::of(&meta),
            Err(_) => return ReadOutcome::Changed,
        };
        if bytes.len() as u64 != expected.len || after != *expected {
            return ReadOutcome::Changed;
        }
        self.bump(|s| s.files_read += 1);
        ReadOutcome::Complete(bytes)
    }

    fn ready(&mut self, path: &Path, sig: &Signature, bytes: Vec<u8>) {
        let sha256 = espalier::plugin::runtime::sha256_hex(&bytes);
        self.bump(|s| {
            s.rejected.remove(path);
        });
        let Some(state) = self.files.get_mut(path) else {
            return;
        };
        state.settled = true;
        if state.reported.as_deref() == Some(sha256.as_str()) {
            tracing::debug!(path = %path.display(), "file touched, content unchanged");
            return;
        }
        state.reported = Some(sha256.clone());
        tracing::info!(path = %path.display(), len = sig.len, %sha256, "watched file ready");
        self.bump(|s| s.ready_events += 1);
        self.emit(WatchEvent::Ready(ReadyFile {
            path: path.to_owned(),
            len: sig.len,
            modified: sig.modified.unwrap_or(SystemTime::UNIX_EPOCH),
            sha256,
            bytes,
        }));
    }

    fn reject(&mut self, path: &Path, reason: String) {
        if let Some(state) = self.files.get_mut(path) {
            state.settled = true;
            // The consumer drops what it had for this name, so good content must be reported
            // again even if it is what it was before.
            state.reported = None;
        }
        tracing::warn!(path = %path.display(), %reason, "watched file rejected");
        self.problem(Some(path), reason.clone());
        self.bump(|s| {
            s.rejected_events += 1;
            s.rejected.insert(path.to_owned(), reason.clone());
        });
        self.emit(WatchEvent::Rejected {
            path: path.to_owned(),
            reason,
        });
    }

    fn emit(&self, event: WatchEvent) {
        // A panicking handler must not end the watch: later changes still need reporting.
        if catch_unwind(AssertUnwindSafe(|| (self.handler)(event))).is_err() {
            self.bump(|s| s.handler_panics += 1);
            self.problem(None, "the watch handler panicked".to_owned());
        }
    }

    fn problem(&self, path: Option<&Path>, message: String) {
        self.bump(|s| {
            if s.last_errors.len() == MAX_RECENT_ERRORS {
                s.last_errors.pop_front();
            }
            s.last_errors.push_back(WatchProblem {
                at: SystemTime::now(),
                path: path.map(Path::to_owned),
                message,
            });
        });
    }

    fn bump(&self, f: impl FnOnce(&mut WatchStatus)) {
        let mut status = match self.status.lock() {
            Ok(status) => status,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut status);
    }

    fn is_candidate(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else {
            return false;
        };
        is_candidate_name(name, &self.options.extensions)
    }
}

/// Whether a directory entry name is one the watcher reports: a watched extension, not hidden,
/// not a temporary file.
pub fn is_candidate_name(name: &OsStr, extensions: &[String]) -> bool {
    let name_bytes = name.as_encoded_bytes();
    if name_bytes.first() == Some(&b'.') || name_bytes.first() == Some(&b'#') {
        return false;
    }
    let lossy = name.to_string_lossy().to_ascii_lowercase();
    if TEMP_SUFFIXES.iter().any(|s| lossy.ends_with(s)) || lossy.contains(".tmp-") {
        return false;
    }
    let Some(ext) = Path::new(name).extension().and_then(OsStr::to_str) else {
        return false;
    };
    extensions.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// Opens a file for reading without following a final symbolic link and without blocking
/// (a FIFO swapped in after the stat would otherwise wait for a writer forever).
fn open_no_block(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc::Receiver;

    const DEBOUNCE: Duration = Duration::from_millis(150);
    /// A writer's pause between pieces: well inside the debounce window even when a loaded
    /// machine oversleeps, yet several clock ticks, so the pieces land at distinct times.
    const PAUSE: Duration = Duration::from_millis(30);
    /// Generous: CI machines are slow and shared; tests normally finish far sooner.
    const WAIT: Duration = Duration::from_secs(10);

    fn options() -> WatchOptions {
        WatchOptions {
            extensions: vec!["wasm".to_owned(), "toml".to_owned()],
            debounce: DEBOUNCE,
            rescan_interval: Duration::from_secs(2),
            max_file_size: 1 << 20,
        }
    }

    fn start(dir: &Path, options: WatchOptions) -> (FolderWatcher, Receiver<WatchEvent>) {
        let (tx, rx) = mpsc::channel();
        let watcher = FolderWatcher::start(dir.to_owned(), options, move |event| {
            let _ = tx.send(event);
        })
        .unwrap();
        (watcher, rx)
    }

    fn sha(bytes: &[u8]) -> String {
        espalier::plugin::runtime::sha256_hex(bytes)
    }

    /// The next event, or a test failure after [`WAIT`].
    fn next(rx: &Receiver<WatchEvent>) -> WatchEvent {
        rx.recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no watch event within {WAIT:?}: {e}"))
    }

    /// Every event that arrives until `quiet` passes without one.
    fn drain(rx: &Receiver<WatchEvent>, quiet: Duration) -> Vec<WatchEvent> {
        let mut events = Vec::new();
        while let Ok(event) = rx.recv_timeout(quiet) {
            events.push(event);
        }
        events
    }

    fn expect_ready(event: WatchEvent) -> ReadyFile {
        match event {
            WatchEvent::Ready(ready) => ready,
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn quiet() -> Duration {
        DEBOUNCE * 4
    }

    #[test]
    fn initial_scan_reports_present_files_before_start_returns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wasm"), b"component a").unwrap();
        std::fs::write(dir.path().join("b.toml"), b"name = 'b'").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"not watched").unwrap();
        std::fs::write(dir.path().join(".hidden.wasm"), b"hidden").unwrap();
        let (watcher, rx) = start(dir.path(), options());
        let mut got: Vec<ReadyFile> = rx.try_iter().map(expect_ready).collect();
        got.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].path.ends_with("a.wasm"));
        assert_eq!(got[0].bytes, b"component a");
        assert_eq!(got[0].sha256, sha(b"component a"));
        assert_eq!(got[0].len, 11);
        assert!(got[1].path.ends_with("b.toml"));
        // Nothing more: present files are reported once.
        assert!(drain(&rx, quiet()).is_empty());
        assert_eq!(watcher.status().ready_events, 2);
    }

    #[test]
    fn slowly_written_file_is_reported_once_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (_watcher, rx) = start(dir.path(), options());
        let content: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let (first, second) = content.split_at(content.len() / 2);
        let path = dir.path().join("slow.wasm");
        let mut file = File::create(&path).unwrap();
        file.write_all(first).unwrap();
        file.flush().unwrap();
        std::thread::sleep(PAUSE);
        file.write_all(&second[..100]).unwrap();
        std::thread::sleep(PAUSE);
        file.write_all(&second[100..]).unwrap();
        drop(file);

        let ready = expect_ready(next(&rx));
        assert_eq!(ready.len, content.len() as u64);
        assert_eq!(ready.sha256, sha(&content));
        assert_eq!(ready.bytes, content);
        assert!(drain(&rx, quiet()).is_empty(), "reported once");
    }

    #[test]
    fn atomic_rename_replace_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (watcher, rx) = start(dir.path(), options());
        let path = dir.path().join("p.wasm");

        // Our upload path: a hidden temp name, then a rename into place.
        let staged = dir.path().join(".p.wasm.tmp-1234");
        std::fs::write(&staged, b"version 1").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        let v1 = expect_ready(next(&rx));
        assert_eq!(v1.path, watcher.dir().join("p.wasm"));
        assert_eq!(v1.sha256, sha(b"version 1"));

        // Replaced by a second rename: the folder watch survives it (a file watch would not).
        std::fs::write(&staged, b"version 2").unwrap();
        std::fs::rename(&staged, &path).unwrap();
        assert_eq!(expect_ready(next(&rx)).sha256, sha(b"version 2"));

        // Rewritten in place with the same content: not reported again.
        std::fs::write(&path, b"version 2").unwrap();
        let events = drain(&rx, quiet());
        assert!(events.is_empty(), "{events:?}");

        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            next(&rx),
            WatchEvent::Removed {
                path: watcher.dir().join("p.wasm")
            }
        );
        // Back with the old content: reported again, it is new to the consumer.
        std::fs::write(&path, b"version 1").unwrap();
        assert_eq!(expect_ready(next(&rx)).sha256, sha(b"version 1"));
        let status = watcher.status();
        assert_eq!(
            (status.ready_events, status.removed_events),
            (3, 1),
            "{status:?}"
        );
    }

    #[test]
    fn truncate_then_rewrite_never_reports_empty_or_partial_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edit.toml");
        std::fs::write(&path, b"old = 1\n").unwrap();
        let (_watcher, rx) = start(dir.path(), options());
        assert_eq!(expect_ready(next(&rx)).sha256, sha(b"old = 1\n"));

        // An editor saving in place: truncate, then a stall longer than the debounce (a busy
        // disk), then the content in two pieces a moment apart.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::thread::sleep(DEBOUNCE * 2);
        file.write_all(b"new = ").unwrap();
        std::thread::sleep(PAUSE);
        file.write_all(b"2\n").unwrap();
        drop(file);

        let events = drain(&rx, quiet());
        assert_eq!(events.len(), 1, "{events:?}");
        let ready = expect_ready(events.into_iter().next().unwrap());
        assert_eq!(ready.bytes, b"new = 2\n");
    }

    #[test]
    fn reading_a_file_does_not_make_the_watcher_read_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.wasm");
        std::fs::write(&path, b"read me").unwrap();
        let (watcher, rx) = start(dir.path(), options());
        expect_ready(next(&rx));
        // Our own read opened the file; others read it too (the daemon, `plugins list`).
        for _ in 0..3 {
            assert_eq!(std::fs::read(&path).unwrap(), b"read me");
        }
        assert!(drain(&rx, quiet()).is_empty());
        let status = watcher.status();
        assert_eq!(status.files_read, 1, "{status:?}");
        // The initial listing, maybe one periodic one: no listing loop either.
        assert!(status.rescans <= 2, "{status:?}");
    }

    #[test]
    fn hidden_temp_and_other_names_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (watcher, rx) = start(dir.path(), options());
        for name in [
            ".hidden.wasm",
            ".x.wasm.tmp-99",
            "x.wasm.tmp",
            "x.wasm.part",
            "x.wasm~",
            "#x.wasm#",
            "readme.md",
            "noext",
        ] {
            std::fs::write(dir.path().join(name), b"data").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.wasm")).unwrap();
        std::fs::write(dir.path().join("sub.wasm").join("inner.wasm"), b"x").unwrap();
        std::fs::write(dir.path().join("UPPER.WASM"), b"upper").unwrap();
        let ready = expect_ready(next(&rx));
        assert!(ready.path.ends_with("UPPER.WASM"), "{ready:?}");
        assert!(drain(&rx, quiet()).is_empty());
        assert!(watcher.status().rejected.is_empty());
    }

    #[test]
    fn oversized_rejected_once_empty_never_reported_and_watch_continues() {
        let dir = tempfile::tempdir().unwrap();
        let (watcher, rx) = start(
            dir.path(),
            WatchOptions {
                max_file_size: 16,
                ..options()
            },
        );
        let big = dir.path().join("big.wasm");
        std::fs::write(&big, [7u8; 17]).unwrap();
        match next(&rx) {
            WatchEvent::Rejected { path, reason } => {
                assert!(path.ends_with("big.wasm"));
                assert!(reason.contains("too large"), "{reason}");
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        // Empty: no event (it may be mid-rewrite), but the status says so.
        let empty = dir.path().join("empty.wasm");
        std::fs::write(&empty, b"").unwrap();
        assert!(drain(&rx, quiet()).is_empty(), "rejected once, empty never");
        let rejected = watcher.status().rejected;
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert_eq!(rejected[&watcher.dir().join("empty.wasm")], "file is empty");
        std::fs::write(&empty, b"now full").unwrap();
        assert_eq!(expect_ready(next(&rx)).bytes, b"now full");
        // Fixed: reported, and no longer listed as rejected.
        std::fs::write(&big, [7u8; 16]).unwrap();
        assert_eq!(expect_ready(next(&rx)).len, 16);
        let status = watcher.status();
        assert!(status.rejected.is_empty(), "{status:?}");
        assert!(!status.last_errors.is_empty());
    }

    #[test]
    fn a_panicking_handler_does_not_stop_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let watcher = FolderWatcher::start(dir.path().to_owned(), options(), move |event| {
            if let WatchEvent::Ready(ready) = &event
                && ready.path.ends_with("bad.wasm")
            {
                panic!("consumer bug");
            }
            let _ = tx.send(event);
        })
        .unwrap();
        std::fs::write(dir.path().join("bad.wasm"), b"bad").unwrap();
        // Let the panic happen before the good file appears.
        let deadline = Instant::now() + WAIT;
        while watcher.status().handler_panics == 0 {
            assert!(Instant::now() < deadline, "handler never called");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(dir.path().join("good.wasm"), b"good").unwrap();
        assert!(expect_ready(next(&rx)).path.ends_with("good.wasm"));
    }

    #[cfg(unix)]
    #[test]
    fn fifo_and_symlink_are_rejected_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.wasm");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("t.wasm"), b"outside").unwrap();
        std::os::unix::fs::symlink(outside.path().join("t.wasm"), dir.path().join("link.wasm"))
            .unwrap();
        std::fs::write(dir.path().join("ok.wasm"), b"fine").unwrap();

        let started = Instant::now();
        let (watcher, rx) = start(dir.path(), options());
        assert!(started.elapsed() < WAIT, "start blocked");
        let mut events: Vec<WatchEvent> = rx.try_iter().collect();
        events.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(events.len(), 3, "{events:?}");
        let rejected = watcher.status().rejected;
        assert!(
            rejected[&watcher.dir().join("pipe.wasm")].contains("not a regular file"),
            "{rejected:?}"
        );
        assert!(rejected[&watcher.dir().join("link.wasm")].contains("symbolic link"));
        // The watcher thread is alive and reports later files.
        std::fs::write(dir.path().join("later.wasm"), b"later").unwrap();
        assert!(expect_ready(next(&rx)).path.ends_with("later.wasm"));
    }

    #[test]
    fn folder_removed_and_recreated_is_watched_again() {
        // Removing the folder kills its notify watch with it; the periodic rescan must notice,
        // and pick the folder up again (listing and watch) once it is back.
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let watcher = FolderWatcher::start(
            dir.path().to_owned(),
            WatchOptions {
                rescan_interval: Duration::from_millis(300),
                ..options()
            },
            move |event| {
                let _ = tx.send(event);
            },
        )
        .unwrap();
        // Remove and recreate the folder: the inotify watch dies with the old folder.
        let path = dir.path().to_owned();
        std::fs::remove_dir(&path).unwrap();
        let deadline = Instant::now() + WAIT;
        while watcher.status().last_errors.is_empty() {
            assert!(
                Instant::now() < deadline,
                "rescan never noticed the folder gone"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("back.wasm"), b"back").unwrap();
        assert!(expect_ready(next(&rx)).path.ends_with("back.wasm"));
        assert!(watcher.status().rescans >= 2);
    }

    #[test]
    fn missing_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-plugins-here");
        let err = FolderWatcher::start(missing, options(), |_| {}).unwrap_err();
        assert!(matches!(err, WatchError::NoFolder { .. }), "{err:?}");
        assert!(err.to_string().contains("no-plugins-here"), "{err}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = FolderWatcher::start(file, options(), |_| {}).unwrap_err();
        assert!(matches!(err, WatchError::NotAFolder { .. }), "{err:?}");
    }

    #[test]
    fn stop_is_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let (watcher, _rx) = start(
            dir.path(),
            WatchOptions {
                rescan_interval: Duration::from_secs(3600),
                debounce: Duration::from_secs(3600),
                ..options()
            },
        );
        // A pending file with an hour-long window: stop must not wait for it.
        std::fs::write(dir.path().join("pending.wasm"), b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        watcher.stop();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn candidate_names() {
        let ext = vec!["wasm".to_owned()];
        let ok = |n: &str| is_candidate_name(OsStr::new(n), &ext);
        assert!(ok("a.wasm") && ok("A.Wasm") && ok("my.plugin.wasm"));
        assert!(!ok(".a.wasm") && !ok("a.wasm.tmp") && !ok("a.wasm~") && !ok("a.toml"));
        assert!(!ok("a.tmp-3.wasm") && !ok("wasm") && !ok("a.part"));
    }
}
