//! Run records and the run queue: what `espalier serve` remembers about every run it was asked
//! to do, and the order in which its workers take them.
//!
//! Everything goes through one trait, [`RunStore`], so the HTTP layer and the workers never see
//! the database. [`SqliteStore`] implements it on one SQLite file (WAL journal, schema versioned
//! with `PRAGMA user_version`): history survives a daemon restart, and [`RunStore::mark_interrupted`]
//! at startup turns the runs a crash left `running` into `interrupted` ones. A run is `queued`
//! when created; [`RunStore::claim_next`] takes the oldest queued run (FIFO by id) and makes it
//! `running` in one statement, so two claimers never get the same run; [`RunStore::finish`]
//! moves a queued or running run to a terminal status exactly once. Each run also has an
//! append-only event log with a per-run sequence number starting at 1, which is what lets a
//! server-sent-events client resume with `Last-Event-ID` ([`RunStore::events_after`]).
//!
//! **Towards PostgreSQL.** The trait is the seam for a multi-machine deployment. A PostgreSQL
//! implementation keeps the same tables; `claim_next` becomes `UPDATE runs SET status =
//! 'running', started_at = now() WHERE id = (SELECT id FROM runs WHERE status = 'queued' ORDER BY
//! id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING ...`, so workers on several machines claim
//! without blocking each other; `append_event` computes the next sequence number under the run's
//! row lock (or `pg_notify`s listeners). `report_path` and `export_dir` are plain strings so they
//! can hold object-storage URLs (`s3://...`) instead of local paths. The one semantic change is
//! `mark_interrupted`: "every run left running" is only right when a single daemon owns the
//! queue; with several workers it must become a lease (a `claimed_by` and `lease_until` column
//! that a worker's heartbeat extends, and a sweeper that interrupts runs whose lease expired).
//! The trait is synchronous: callers in async code use `spawn_blocking`, which is also what a
//! blocking PostgreSQL client would need.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How many runs [`RunStore::list`] returns when the filter gives no limit.
pub const DEFAULT_LIST_LIMIT: u32 = 50;
/// The most runs (or events) one call returns, whatever the caller asks: bounds the memory and
/// time of one request.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// Written into `PRAGMA application_id` ("ESPR"): tells our file from another program's
/// SQLite database, which we must not add tables to.
const APPLICATION_ID: i32 = 0x4553_5052;

/// How long a statement waits for another connection's write lock (another process on the same
/// file, or a checkpoint) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, in order: migration `i` takes `user_version` from `i` to `i + 1`. Only
/// ever append here; a shipped migration must never change.
const MIGRATIONS: &[&str] = &[
    // Version 1: runs and their events.
    "CREATE TABLE runs (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        pipeline_name TEXT NOT NULL,
        source        TEXT NOT NULL,
        pipeline_text TEXT NOT NULL,
        overrides     TEXT NOT NULL,
        model         TEXT NOT NULL,
        status        TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        started_at    TEXT,
        finished_at   TEXT,
        current_stage TEXT,
        progress      REAL NOT NULL DEFAULT 0,
        plugins       TEXT NOT NULL DEFAULT '{}',
        metrics       TEXT,
        report_path   TEXT,
        export_dir    TEXT,
        error_kind    TEXT,
        error_message TEXT
    );
    CREATE INDEX runs_status ON runs(status, id);
    CREATE INDEX runs_pipeline ON runs(pipeline_name, id);
    CREATE TABLE run_events (
        run_id     INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        seq        INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        data       TEXT NOT NULL,
        at         TEXT NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;",
];

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Where a run is in its life. Serialised in lowercase (`"queued"`, `"running"`, ...).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker claimed it and is running it.
    Running,
    /// Finished and produced its outputs.
    Succeeded,
    /// Finished with an error (see [`RunRecord::error`]).
    Failed,
    /// Stopped on request, before or while running.
    Cancelled,
    /// The daemon stopped (crash, restart) while the run was running.
    Interrupted,
}

impl RunStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Interrupted,
    ];

    /// The lowercase name used in the database and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    /// Whether the run is over: a terminal status never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a [`RunStatus`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown run status {0:?} (expected one of queued, running, succeeded, failed, cancelled, interrupted)"
)]
pub struct UnknownStatus(pub String);

impl FromStr for RunStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Whether the run's pipeline came from the daemon's pipeline folder or in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PipelineSource {
    /// A pipeline file the daemon knows by name.
    Named,
    /// Pipeline text sent with the request.
    Inline,
}

impl PipelineSource {
    fn as_str(self) -> &'static str {
        match self {
            PipelineSource::Named => "named",
            PipelineSource::Inline => "inline",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "named" => Some(PipelineSource::Named),
            "inline" => Some(PipelineSource::Inline),
            _ => None,
        }
    }
}

/// What a caller gives to queue a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRun {
    pub pipeline_name: String,
    pub source: PipelineSource,
    /// The pipeline text as it will run (kept so a run can be reproduced after the file changed).
    pub pipeline_text: String,
    /// Parameter overrides from the request, as sent (`null` or `{}` when none).
    pub overrides: Value,
    /// The model the run prunes (a path, `builtin:...`, or a name the daemon resolves).
    pub model: String,
    /// Where the run will export the pruned model, if anywhere.
    pub export_dir: Option<String>,
}

/// Why a run failed or stopped: a machine-readable kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunErrorInfo {
    pub kind: String,
    pub message: String,
}

/// One run, as stored.
///
/// Timestamps are RFC 3339 UTC strings with millisecond precision
/// (`2026-05-01T12:34:56.789Z`), the same fixed width everywhere so they also sort as text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub id: i64,
    pub pipeline_name: String,
    pub source: PipelineSource,
    pub pipeline_text: String,
    #[schema(value_type = Object)]
    pub overrides: Value,
    pub model: String,
    pub status: RunStatus,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The stage being run, while running.
    pub current_stage: Option<String>,
    /// Overall progress, 0 to 1.
    pub progress: f64,
    /// Plugin name → sha256 (hex) of the component the run used.
    pub plugins: BTreeMap<String, String>,
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<Value>,
    pub report_path: Option<String>,
    pub export_dir: Option<String>,
    pub error: Option<RunErrorInfo>,
}

/// How a run ended: the argument of [`RunStore::finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// Must be terminal (succeeded, failed, cancelled or interrupted).
    pub status: RunStatus,
    pub metrics: Option<Value>,
    pub report_path: Option<String>,
    pub error: Option<RunErrorInfo>,
}

/// Which runs [`RunStore::list`] returns. The default lists the 50 newest runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub pipeline_name: Option<String>,
    /// At most this many ([`DEFAULT_LIST_LIMIT`] when `None`, capped at [`MAX_LIST_LIMIT`]).
    pub limit: Option<u32>,
    /// Only runs with an id below this one: pass the last id of a page to get the next page.
    pub before: Option<i64>,
}

/// Which runs [`RunStore::mark_interrupted`] interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptScope {
    /// Only runs left `running`. Queued runs stay queued and run after the restart: they never
    /// started, so running them is still what was asked for. This is what the daemon uses.
    RunningOnly,
    /// Running and queued runs: for an operator who wants a restart to drop the backlog.
    RunningAndQueued,
}

/// One entry of a run's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Per-run sequence number, from 1, without gaps.
    pub seq: u64,
    pub event_type: String,
    pub data: Value,
    pub at: String,
}

/// What can go wrong in a [`RunStore`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the run store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{} is not a SQLite database (is it the right file?)", path.display())]
    NotADatabase { path: PathBuf },
    #[error(
        "{} is a SQLite database of another program, not an Espalier run store; refusing to change it",
        path.display()
    )]
    ForeignDatabase { path: PathBuf },
    #[error(
        "the run store {} has schema version {found}, newer than the {supported} this espalier understands; upgrade espalier",
        path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("run {id} not found")]
    NotFound { id: i64 },
    #[error("run {id} has already finished ({status})")]
    AlreadyFinished { id: i64, status: RunStatus },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("run store data is corrupt: {0}")]
    Corrupt(String),
    #[error("the run store lock is poisoned (a thread panicked while using it)")]
    Poisoned,
    #[error("cannot format the current time: {0}")]
    Clock(String),
    #[error("run store database error: {0}")]
    Database(#[from] rusqlite::Error),
}

/// Run records and the run queue. See the module documentation for the semantics and for how a
/// PostgreSQL implementation would fit.
pub trait RunStore: Send + Sync {
    /// Queues a new run: status `queued`, a fresh id, `created_at` now.
    fn create(&self, new: NewRun) -> Result<RunRecord, StoreError>;

    /// Takes the oldest queued run and makes it `running` (`started_at` now), atomically: two
    /// concurrent claimers never get the same run. `None` when nothing is queued.
    fn claim_next(&self) -> Result<Option<RunRecord>, StoreError>;

    /// Records the stage being run and the overall progress (0 to 1) of an unfinished run.
    fn set_progress(&self, id: i64, stage: Option<&str>, progress: f64) -> Result<(), StoreError>;

    /// Records which plugins (name → sha256) an unfinished run uses.
    fn set_plugins(&self, id: i64, plugins: &BTreeMap<String, String>) -> Result<(), StoreError>;

    /// Ends a queued or running run with `finish.status` (which must be terminal) and returns the
    /// final record. [`StoreError::AlreadyFinished`] if the run had already ended.
    fn finish(&self, id: i64, finish: Finish) -> Result<RunRecord, StoreError>;

    /// Cancels a run that has not started: `true` if it was queued and is now `cancelled`, `false`
    /// if it had already been claimed or had finished (the caller then stops it in its worker).
    fn cancel_queued(&self, id: i64) -> Result<bool, StoreError>;

    fn get(&self, id: i64) -> Result<Option<RunRecord>, StoreError>;

    /// Runs matching `filter`, newest (highest id) first.
    fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError>;

    /// How many runs are in each status; every status is present, with 0 where there are none.
    fn counts_by_status(&self) -> Result<BTreeMap<RunStatus, u64>, StoreError>;

    /// How many runs are queued.
    fn queue_len(&self) -> Result<u64, StoreError>;

    /// Called once at startup, before any worker claims: the runs in `scope` (see
    /// [`InterruptScope`]) become `interrupted`, with an error of kind `interrupted` and `reason`
    /// as its message. Returns how many runs changed.
    fn mark_interrupted(&self, reason: &str, scope: InterruptScope) -> Result<usize, StoreError>;

    /// Appends an event to a run's log and returns its sequence number (1 for the first).
    fn append_event(&self, id: i64, event_type: &str, data: &Value) -> Result<u64, StoreError>;

    /// The run's events with a sequence number above `after_seq`, in order, at most `limit`
    /// (capped at [`MAX_LIST_LIMIT`]). `after_seq` 0 starts from the beginning.
    fn events_after(
        &self,
        id: i64,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;
}

/// A [`RunStore`] in one SQLite file.
///
/// One connection behind a mutex: SQLite serialises writers anyway, and the daemon's load (a few
/// runs, a few progress updates a second) is far below what one connection serves. Every
/// read-modify-write is an `IMMEDIATE` transaction, so even a second process on the same file
/// (an operator's `sqlite3` shell, a second daemon by mistake) cannot interleave with it.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The columns of `runs` in the order [`record_from_row`] reads them.
const RUN_COLUMNS: &str = "id, pipeline_name, source, pipeline_text, overrides, model, status, \
     created_at, started_at, finished_at, current_stage, progress, plugins, metrics, report_path, \
     export_dir, error_kind, error_message";

impl SqliteStore {
    /// Opens (creating if needed) the run store at `path` and brings its schema up to date.
    /// Opening an existing store is idempotent and keeps every record. The parent directory must
    /// exist.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(|source| open_error(path, source))?;
        configure(&conn, path)?;
        let mut conn = conn;
        migrate(&mut conn, path)?;
        tracing::debug!(path = %path.display(), version = SCHEMA_VERSION, "run store open");
        Ok(SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        // A panic while holding the lock may have left a transaction half done; SQLite rolls an
        // unfinished transaction back when its `Transaction` is dropped during the unwind, but we
        // still refuse rather than guess.
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }
}

/// Maps an error met while opening: a file that is not a database gets its own message.
fn open_error(path: &Path, source: rusqlite::Error) -> StoreError {
    if source.sqlite_error_code() == Some(rusqlite::ErrorCode::NotADatabase) {
        StoreError::NotADatabase {
            path: path.to_owned(),
        }
    } else {
        StoreError::Open {
            path: path.to_owned(),
            source,
        }
    }
}

fn configure(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| open_error(path, e))?;
    // The first statement that reads the file: a file that is not a database fails here.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| open_error(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some filesystems (network mounts) cannot do WAL; the store still works, with readers
        // and the writer blocking each other.
        tracing::warn!(path = %path.display(), %mode, "run store: WAL journal not available");
    }
    // NORMAL is durable against a crash of the daemon in WAL mode; only a power loss can lose
    // the last transactions, which for run history is an acceptable trade for fewer fsyncs.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| open_error(path, e))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| open_error(path, e))?;
    Ok(())
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| open_error(path, e))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| open_error(path, e))?;
    let app_id: i32 = tx
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(|e| open_error(path, e))?;
    let foreign = || StoreError::ForeignDatabase {
        path: path.to_owned(),
    };
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(foreign());
    }
    if app_id == 0 {
        // Not marked as ours: only an empty database may become a run store.
        let tables: i64 = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
                [],
                |row| row.get(0),
            )
            .map_err(|e| open_error(path, e))?;
        if tables > 0 || version != 0 {
            return Err(foreign());
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(|e| open_error(path, e))?;
    }
    let version = u32::try_from(version).map_err(|_| {
        StoreError::Corrupt(format!(
            "{}: negative schema version {version}",
            path.display()
        ))
    })?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(|e| open_error(path, e))?;
        let to = from + 1;
        tx.pragma_update(None, "user_version", to as i64)
            .map_err(|e| open_error(path, e))?;
        tracing::info!(path = %path.display(), from, to, "run store schema migrated");
    }
    tx.commit().map_err(|e| open_error(path, e))?;
    Ok(())
}

/// Now, as the store writes timestamps: RFC 3339, UTC, milliseconds, fixed width.
fn now() -> Result<String, StoreError> {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .map_err(|e| StoreError::Clock(e.to_string()))
}

fn to_json_text(value: &impl Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::InvalidArgument(e.to_string()))
}

fn corrupt(id: i64, column: &str, detail: impl fmt::Display) -> rusqlite::Error {
    // Carried through rusqlite's row-mapping error type; `unwrap_corrupt` takes it out again.
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        Box::new(StoreError::Corrupt(format!(
            "run {id}: column {column}: {detail}"
        ))),
    )
}

fn json_column(row: &Row<'_>, idx: usize, id: i64, column: &str) -> rusqlite::Result<Value> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| corrupt(id, column, e))
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let id: i64 = row.get(0)?;
    let source: String = row.get(2)?;
    let source = PipelineSource::parse(&source)
        .ok_or_else(|| corrupt(id, "source", format!("unknown source {source:?}")))?;
    let status: String = row.get(6)?;
    let status = status
        .parse::<RunStatus>()
        .map_err(|e| corrupt(id, "status", e))?;
    let plugins: String = row.get(12)?;
    let plugins: BTreeMap<String, String> =
        serde_json::from_str(&plugins).map_err(|e| corrupt(id, "plugins", e))?;
    let metrics = match row.get::<_, Option<String>>(13)? {
        Some(text) => Some(serde_json::from_str(&text).map_err(|e| corrupt(id, "metrics", e))?),
        None => None,
    };
    let error = match (
        row.get::<_, Option<String>>(16)?,
        row.get::<_, Option<String>>(17)?,
    ) {
        (Some(kind), message) => Some(RunErrorInfo {
            kind,
            message: message.unwrap_or_default(),
        }),
        (None, _) => None,
    };
    Ok(RunRecord {
        id,
        pipeline_name: row.get(1)?,
        source,
        pipeline_text: row.get(3)?,
        overrides: json_column(row, 4, id, "overrides")?,
        model: row.get(5)?,
        status,
        created_at: row.get(7)?,
        started_at: row.get(8)?,
        finished_at: row.get(9)?,
        current_stage: row.get(10)?,
        progress: row.get(11)?,
        plugins,
        metrics,
        report_path: row.get(14)?,
        export_dir: row.get(15)?,
        error,
    })
}

/// Turns the corruption errors smuggled through rusqlite's row mapping back into ours.
fn unwrap_corrupt(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::FromSqlConversionFailure(idx, ty, inner) => {
            match inner.downcast::<StoreError>() {
                Ok(store_error) => *store_error,
                Err(other) => {
                    StoreError::Database(rusqlite::Error::FromSqlConversionFailure(idx, ty, other))
                }
            }
        }
        other => StoreError::Database(other),
    }
}

fn get_record(conn: &Connection, id: i64) -> Result<Option<RunRecord>, StoreError> {
    conn.query_row(
        &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
        [id],
        record_from_row,
    )
    .optional()
    .map_err(unwrap_corrupt)
}

fn status_of(conn: &Connection, id: i64) -> Result<Option<RunStatus>, StoreError> {
    let status: Option<String> = conn
        .query_row("SELECT status FROM runs WHERE id = ?1", [id], |row| {
            row.get(0)
        })
        .optional()?;
    status
        .map(|s| {
            s.parse::<RunStatus>()
                .map_err(|e| StoreError::Corrupt(format!("run {id}: column status: {e}")))
        })
        .transpose()
}

/// After an update matched no unfinished run: says whether the run is missing or finished.
fn not_updatable(conn: &Connection, id: i64) -> StoreError {
    match status_of(conn, id) {
        Ok(None) => StoreError::NotFound { id },
        Ok(Some(status)) => StoreError::AlreadyFinished { id, status },
        Err(e) => e,
    }
}

fn capped(limit: u32) -> u32 {
    limit.min(MAX_LIST_LIMIT)
}

fn u64_from_db(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what}: {value}")))
}

impl RunStore for SqliteStore {
    fn create(&self, new: NewRun) -> Result<RunRecord, StoreError> {
        let created_at = now()?;
        let overrides = to_json_text(&new.overrides)?;
        let conn = self.lock()?;
        let id = conn.query_row(
            "INSERT INTO runs (pipeline_name, source, pipeline_text, overrides, model, status,
                               created_at, export_dir)
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7) RETURNING id",
            params![
                new.pipeline_name,
                new.source.as_str(),
                new.pipeline_text,
                overrides,
                new.model,
                created_at,
                new.export_dir,
            ],
            |row| row.get::<_, i64>(0),
        )?;
        tracing::debug!(run = id, pipeline = %new.pipeline_name, "run queued");
        get_record(&conn, id)?.ok_or(StoreError::NotFound { id })
    }

    fn claim_next(&self) -> Result<Option<RunRecord>, StoreError> {
        let started_at = now()?;
        let conn = self.lock()?;
        // One statement: the choice of the run and its change of status cannot be separated,
        // whatever else holds the file.
        let claimed = conn
            .query_row(
                &format!(
                    "UPDATE runs SET status = 'running', started_at = ?1
                     WHERE id = (SELECT id FROM runs WHERE status = 'queued' ORDER BY id LIMIT 1)
                       AND status = 'queued'
                     RETURNING {RUN_COLUMNS}"
                ),
                [&started_at],
                record_from_row,
            )
            .optional()
            .map_err(unwrap_corrupt)?;
        if let Some(run) = &claimed {
            tracing::debug!(run = run.id, "run claimed");
        }
        Ok(claimed)
    }

    fn set_progress(&self, id: i64, stage: Option<&str>, progress: f64) -> Result<(), StoreError> {
        if !(0.0..=1.0).contains(&progress) {
            return Err(StoreError::InvalidArgument(format!(
                "progress must be between 0 and 1, got {progress}"
            )));
        }
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE runs SET current_stage = ?2, progress = ?3
             WHERE id = ?1 AND status IN ('queued', 'running')",
            params![id, stage, progress],
        )?;
        if changed == 0 {
            return Err(not_updatable(&tx, id));
        }
        tx.commit()?;
        Ok(())
    }

    fn set_plugins(&self, id: i64, plugins: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let plugins = to_json_text(plugins)?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE runs SET plugins = ?2 WHERE id = ?1 AND status IN ('queued', 'running')",
            params![id, plugins],
        )?;
        if changed == 0 {
            return Err(not_updatable(&tx, id));
        }
        tx.commit()?;
        Ok(())
    }

    fn finish(&self, id: i64, finish: Finish) -> Result<RunRecord, StoreError> {
        if !finish.status.is_terminal() {
            return Err(StoreError::InvalidArgument(format!(
                "a run cannot finish as {}",
                finish.status
            )));
        }
        let finished_at = now()?;
        let metrics = finish.metrics.as_ref().map(to_json_text).transpose()?;
        let (error_kind, error_message) = match finish.error {
            Some(e) => (Some(e.kind), Some(e.message)),
            None => (None, None),
        };
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The status condition makes "finish exactly once" hold even against a racing finish.
        let changed = tx.execute(
            "UPDATE runs SET status = ?2, finished_at = ?3, metrics = ?4, report_path = ?5,
                             error_kind = ?6, error_message = ?7,
                             progress = CASE WHEN ?2 = 'succeeded' THEN 1.0 ELSE progress END
             WHERE id = ?1 AND status IN ('queued', 'running')",
            params![
                id,
                finish.status.as_str(),
                finished_at,
                metrics,
                finish.report_path,
                error_kind,
                error_message,
            ],
        )?;
        if changed == 0 {
            return Err(not_updatable(&tx, id));
        }
        let record = get_record(&tx, id)?.ok_or(StoreError::NotFound { id })?;
        tx.commit()?;
        tracing::debug!(run = id, status = %finish.status, "run finished");
        Ok(record)
    }

    fn cancel_queued(&self, id: i64) -> Result<bool, StoreError> {
        let finished_at = now()?;
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE runs SET status = 'cancelled', finished_at = ?2
             WHERE id = ?1 AND status = 'queued'",
            params![id, finished_at],
        )?;
        if changed == 0 {
            return match status_of(&tx, id)? {
                None => Err(StoreError::NotFound { id }),
                Some(_) => Ok(false),
            };
        }
        tx.commit()?;
        tracing::debug!(run = id, "queued run cancelled");
        Ok(true)
    }

    fn get(&self, id: i64) -> Result<Option<RunRecord>, StoreError> {
        let conn = self.lock()?;
        get_record(&conn, id)
    }

    fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        let limit = capped(filter.limit.unwrap_or(DEFAULT_LIST_LIMIT));
        // NULL parameters switch a condition off, so one statement (and one cached plan) serves
        // every combination of filters.
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {RUN_COLUMNS} FROM runs
             WHERE (?1 IS NULL OR status = ?1)
               AND (?2 IS NULL OR pipeline_name = ?2)
               AND (?3 IS NULL OR id < ?3)
             ORDER BY id DESC LIMIT ?4"
        ))?;
        let rows = stmt.query_map(
            params![
                filter.status.map(RunStatus::as_str),
                filter.pipeline_name,
                filter.before,
                limit,
            ],
            record_from_row,
        )?;
        rows.map(|row| row.map_err(unwrap_corrupt)).collect()
    }

    fn counts_by_status(&self) -> Result<BTreeMap<RunStatus, u64>, StoreError> {
        let mut counts: BTreeMap<RunStatus, u64> =
            RunStatus::ALL.into_iter().map(|s| (s, 0)).collect();
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached("SELECT status, count(*) FROM runs GROUP BY status")?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (status, count) = row?;
            let status = status
                .parse::<RunStatus>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            counts.insert(status, u64_from_db(count, "count")?);
        }
        Ok(counts)
    }

    fn queue_len(&self) -> Result<u64, StoreError> {
        let conn = self.lock()?;
        let n: i64 = conn.query_row(
            "SELECT count(*) FROM runs WHERE status = 'queued'",
            [],
            |row| row.get(0),
        )?;
        u64_from_db(n, "count")
    }

    fn mark_interrupted(&self, reason: &str, scope: InterruptScope) -> Result<usize, StoreError> {
        let finished_at = now()?;
        let statuses = match scope {
            InterruptScope::RunningOnly => "('running')",
            InterruptScope::RunningAndQueued => "('running', 'queued')",
        };
        let conn = self.lock()?;
        let changed = conn.execute(
            &format!(
                "UPDATE runs SET status = 'interrupted', finished_at = ?1,
                                 error_kind = 'interrupted', error_message = ?2
                 WHERE status IN {statuses}"
            ),
            params![finished_at, reason],
        )?;
        if changed > 0 {
            tracing::warn!(runs = changed, reason, "runs marked interrupted");
        }
        Ok(changed)
    }

    fn append_event(&self, id: i64, event_type: &str, data: &Value) -> Result<u64, StoreError> {
        let at = now()?;
        let data = to_json_text(data)?;
        let mut conn = self.lock()?;
        // IMMEDIATE: the max(seq) read and the insert must not interleave with another
        // appender, or two events would get the same number.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if status_of(&tx, id)?.is_none() {
            return Err(StoreError::NotFound { id });
        }
        let seq: i64 = tx.query_row(
            "INSERT INTO run_events (run_id, seq, event_type, data, at)
             SELECT ?1, coalesce(max(seq), 0) + 1, ?2, ?3, ?4 FROM run_events WHERE run_id = ?1
             RETURNING seq",
            params![id, event_type, data, at],
            |row| row.get(0),
        )?;
        tx.commit()?;
        u64_from_db(seq, "event sequence number")
    }

    fn events_after(
        &self,
        id: i64,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        // Sequence numbers are stored as SQLite integers (i64); anything above is past the end.
        let Ok(after) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        let conn = self.lock()?;
        if status_of(&conn, id)?.is_none() {
            return Err(StoreError::NotFound { id });
        }
        let mut stmt = conn.prepare_cached(
            "SELECT seq, event_type, data, at FROM run_events
             WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![id, after, capped(limit)], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
            ))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (seq, event_type, data, at) = row?;
            let data = serde_json::from_str(&data).map_err(|e| {
                StoreError::Corrupt(format!("run {id}: event {seq}: data is not JSON: {e}"))
            })?;
            events.push(StoredEvent {
                seq: u64_from_db(seq, "event sequence number")?,
                event_type,
                data,
                at,
            });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    fn new_run(name: &str) -> NewRun {
        NewRun {
            pipeline_name: name.to_owned(),
            source: PipelineSource::Named,
            pipeline_text: format!("# pipeline {name}\n"),
            overrides: json!({"sparsity": 0.5}),
            model: "builtin:tiny-llama".to_owned(),
            export_dir: Some(format!("out/{name}")),
        }
    }

    fn open_temp() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("runs.sqlite")).unwrap();
        (dir, store)
    }

    fn succeeded() -> Finish {
        Finish {
            status: RunStatus::Succeeded,
            metrics: Some(json!({"perplexity": 12.5})),
            report_path: Some("out/a/report.json".to_owned()),
            error: None,
        }
    }

    #[test]
    fn create_sets_queued_and_claims_are_fifo() {
        let (_dir, store) = open_temp();
        let a = store.create(new_run("a")).unwrap();
        let b = store.create(new_run("b")).unwrap();
        assert_eq!(a.status, RunStatus::Queued);
        assert!(b.id > a.id);
        assert_eq!(a.created_at.len(), "2026-01-01T00:00:00.000Z".len());
        assert!(a.created_at.ends_with('Z'), "{}", a.created_at);
        assert_eq!(a.started_at, None);
        assert_eq!(a.overrides, json!({"sparsity": 0.5}));
        assert_eq!(a.export_dir.as_deref(), Some("out/a"));
        assert_eq!(store.queue_len().unwrap(), 2);

        let first = store.claim_next().unwrap().unwrap();
        assert_eq!(first.id, a.id);
        assert_eq!(first.status, RunStatus::Running);
        assert!(first.started_at.is_some());
        assert_eq!(store.claim_next().unwrap().unwrap().id, b.id);
        assert_eq!(store.claim_next().unwrap(), None);
        assert_eq!(store.queue_len().unwrap(), 0);
    }

    #[test]
    fn concurrent_claimers_never_get_the_same_run() {
        let (_dir, store) = open_temp();
        let store = Arc::new(store);
        let total = 200;
        let ids: BTreeSet<i64> = (0..total)
            .map(|i| store.create(new_run(&format!("p{i}"))).unwrap().id)
            .collect();
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(run) = store.claim_next().unwrap() {
                        mine.push(run.id);
                    }
                    mine
                })
            })
            .collect();
        let mut claimed = Vec::new();
        for h in handles {
            claimed.extend(h.join().unwrap());
        }
        assert_eq!(claimed.len(), total, "every run claimed exactly once");
        let unique: BTreeSet<i64> = claimed.into_iter().collect();
        assert_eq!(unique, ids);
    }

    #[test]
    fn two_connections_on_one_file_never_double_claim() {
        // Two stores on the same file: the claim must be atomic in SQLite, not just in our mutex.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.sqlite");
        let a = Arc::new(SqliteStore::open(&path).unwrap());
        let b = Arc::new(SqliteStore::open(&path).unwrap());
        for i in 0..100 {
            a.create(new_run(&format!("p{i}"))).unwrap();
        }
        let claim_all = |store: Arc<SqliteStore>| {
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                while let Some(run) = store.claim_next().unwrap() {
                    mine.push(run.id);
                }
                mine
            })
        };
        let (ha, hb) = (claim_all(Arc::clone(&a)), claim_all(Arc::clone(&b)));
        let mut all = ha.join().unwrap();
        all.extend(hb.join().unwrap());
        let unique: BTreeSet<i64> = all.iter().copied().collect();
        assert_eq!(all.len(), 100);
        assert_eq!(unique.len(), 100);
    }

    #[test]
    fn finish_transitions_once() {
        let (_dir, store) = open_temp();
        let run = store.create(new_run("a")).unwrap();
        store.claim_next().unwrap();
        store
            .set_progress(run.id, Some("prune"), 0.25)
            .expect("progress on a running run");
        let plugins = BTreeMap::from([("wanda".to_owned(), "ab".repeat(32))]);
        store.set_plugins(run.id, &plugins).unwrap();
        let got = store.get(run.id).unwrap().unwrap();
        assert_eq!(got.current_stage.as_deref(), Some("prune"));
        assert_eq!(got.progress, 0.25);
        assert_eq!(got.plugins, plugins);

        let done = store.finish(run.id, succeeded()).unwrap();
        assert_eq!(done.status, RunStatus::Succeeded);
        assert!(done.finished_at.is_some());
        assert_eq!(done.metrics, Some(json!({"perplexity": 12.5})));
        assert_eq!(done.report_path.as_deref(), Some("out/a/report.json"));
        assert_eq!(done.progress, 1.0);

        let again = store.finish(
            run.id,
            Finish {
                status: RunStatus::Failed,
                metrics: None,
                report_path: None,
                error: Some(RunErrorInfo {
                    kind: "x".into(),
                    message: "y".into(),
                }),
            },
        );
        assert!(
            matches!(again, Err(StoreError::AlreadyFinished { id, status: RunStatus::Succeeded }) if id == run.id),
            "{again:?}"
        );
        // Late progress from a worker after the end is refused the same way.
        assert!(matches!(
            store.set_progress(run.id, None, 0.5),
            Err(StoreError::AlreadyFinished { .. })
        ));
        assert!(matches!(
            store.finish(9999, succeeded()),
            Err(StoreError::NotFound { id: 9999 })
        ));
        // A non-terminal status is not a way to finish.
        let other = store.create(new_run("b")).unwrap();
        let bad = store.finish(
            other.id,
            Finish {
                status: RunStatus::Running,
                ..succeeded()
            },
        );
        assert!(
            matches!(bad, Err(StoreError::InvalidArgument(_))),
            "{bad:?}"
        );
        assert!(matches!(
            store.set_progress(other.id, None, f64::NAN),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.set_progress(other.id, None, 1.5),
            Err(StoreError::InvalidArgument(_))
        ));
    }

    #[test]
    fn failure_keeps_its_error() {
        let (_dir, store) = open_temp();
        let run = store.create(new_run("a")).unwrap();
        store.claim_next().unwrap();
        let failed = store
            .finish(
                run.id,
                Finish {
                    status: RunStatus::Failed,
                    metrics: None,
                    report_path: None,
                    error: Some(RunErrorInfo {
                        kind: "plugin".into(),
                        message: "wanda trapped".into(),
                    }),
                },
            )
            .unwrap();
        assert_eq!(
            failed.error,
            Some(RunErrorInfo {
                kind: "plugin".into(),
                message: "wanda trapped".into()
            })
        );
        // The JSON the API will serve.
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["status"], "failed");
        assert_eq!(json["source"], "named");
        assert_eq!(json["error"]["kind"], "plugin");
        let back: RunRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, failed);
    }

    #[test]
    fn cancel_queued_only_cancels_queued_runs() {
        let (_dir, store) = open_temp();
        let a = store.create(new_run("a")).unwrap();
        let b = store.create(new_run("b")).unwrap();
        assert!(store.cancel_queued(a.id).unwrap());
        let got = store.get(a.id).unwrap().unwrap();
        assert_eq!(got.status, RunStatus::Cancelled);
        assert!(got.finished_at.is_some());
        assert_eq!(got.started_at, None, "never ran");
        // The cancelled run is not claimed; the next one is.
        assert_eq!(store.claim_next().unwrap().unwrap().id, b.id);
        assert!(
            !store.cancel_queued(b.id).unwrap(),
            "running: not cancelled here"
        );
        assert!(!store.cancel_queued(a.id).unwrap(), "already cancelled");
        assert!(matches!(
            store.cancel_queued(424242),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            store.finish(a.id, succeeded()),
            Err(StoreError::AlreadyFinished {
                status: RunStatus::Cancelled,
                ..
            })
        ));
    }

    #[test]
    fn list_filters_and_pages_newest_first() {
        let (_dir, store) = open_temp();
        let mut ids = Vec::new();
        for i in 0..7 {
            let name = if i % 2 == 0 { "even" } else { "odd" };
            ids.push(store.create(new_run(name)).unwrap().id);
        }
        // ids[0] runs and succeeds, ids[1] is cancelled, the rest stay queued.
        store.claim_next().unwrap();
        store.finish(ids[0], succeeded()).unwrap();
        store.cancel_queued(ids[1]).unwrap();

        let all = store.list(&RunFilter::default()).unwrap();
        let listed: Vec<i64> = all.iter().map(|r| r.id).collect();
        let mut newest_first = ids.clone();
        newest_first.reverse();
        assert_eq!(listed, newest_first);

        let even = store
            .list(&RunFilter {
                pipeline_name: Some("even".into()),
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(
            even.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![ids[6], ids[4], ids[2], ids[0]]
        );
        let queued_even = store
            .list(&RunFilter {
                status: Some(RunStatus::Queued),
                pipeline_name: Some("even".into()),
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(queued_even.len(), 3);
        let succeeded = store
            .list(&RunFilter {
                status: Some(RunStatus::Succeeded),
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(succeeded.iter().map(|r| r.id).collect::<Vec<_>>(), [ids[0]]);

        // Paging: pages of 3 using the last id of each page as `before`.
        let mut pages = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .list(&RunFilter {
                    limit: Some(3),
                    before,
                    ..RunFilter::default()
                })
                .unwrap();
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            pages.push(page.iter().map(|r| r.id).collect::<Vec<_>>());
        }
        assert_eq!(pages.len(), 3);
        assert_eq!(pages.concat(), newest_first);

        let counts = store.counts_by_status().unwrap();
        assert_eq!(counts[&RunStatus::Queued], 5);
        assert_eq!(counts[&RunStatus::Succeeded], 1);
        assert_eq!(counts[&RunStatus::Cancelled], 1);
        assert_eq!(counts[&RunStatus::Failed], 0);
        assert_eq!(counts.len(), RunStatus::ALL.len());
    }

    #[test]
    fn list_limit_defaults_and_is_capped() {
        let (_dir, store) = open_temp();
        for i in 0..60 {
            store.create(new_run(&format!("p{i}"))).unwrap();
        }
        assert_eq!(store.list(&RunFilter::default()).unwrap().len(), 50);
        let all = store
            .list(&RunFilter {
                limit: Some(u32::MAX),
                ..RunFilter::default()
            })
            .unwrap();
        assert_eq!(all.len(), 60);
        assert_eq!(capped(u32::MAX), MAX_LIST_LIMIT);
    }

    #[test]
    fn history_survives_restart_and_running_runs_are_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.sqlite");
        let (done, running, queued) = {
            let store = SqliteStore::open(&path).unwrap();
            let done = store.create(new_run("done")).unwrap().id;
            let running = store.create(new_run("running")).unwrap().id;
            let queued = store.create(new_run("queued")).unwrap().id;
            store.claim_next().unwrap();
            store.finish(done, succeeded()).unwrap();
            store.claim_next().unwrap();
            store
                .append_event(running, "stage", &json!({"n": 1}))
                .unwrap();
            (done, running, queued)
            // Dropped without any shutdown step, as a crash would.
        };

        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.list(&RunFilter::default()).unwrap().len(), 3);
        let n = store
            .mark_interrupted("daemon restarted", InterruptScope::RunningOnly)
            .unwrap();
        assert_eq!(n, 1);
        let r = store.get(running).unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Interrupted);
        assert_eq!(
            r.error,
            Some(RunErrorInfo {
                kind: "interrupted".into(),
                message: "daemon restarted".into()
            })
        );
        assert!(r.finished_at.is_some());
        let d = store.get(done).unwrap().unwrap();
        assert_eq!(d.status, RunStatus::Succeeded);
        assert_eq!(d.metrics, Some(json!({"perplexity": 12.5})));
        assert_eq!(
            store.get(queued).unwrap().unwrap().status,
            RunStatus::Queued
        );
        assert_eq!(store.events_after(running, 0, 10).unwrap().len(), 1);
        // The queued run is still claimable after the restart.
        assert_eq!(store.claim_next().unwrap().unwrap().id, queued);
        drop(store);

        // A third open, asked to drop the backlog too.
        let store = SqliteStore::open(&path).unwrap();
        store.create(new_run("later")).unwrap();
        let n = store
            .mark_interrupted("shutdown", InterruptScope::RunningAndQueued)
            .unwrap();
        assert_eq!(n, 2, "the running `queued` run and the new queued one");
        assert_eq!(store.queue_len().unwrap(), 0);
        assert_eq!(
            store.counts_by_status().unwrap()[&RunStatus::Interrupted],
            3
        );
    }

    #[test]
    fn events_are_numbered_per_run_and_resumable() {
        let (_dir, store) = open_temp();
        let a = store.create(new_run("a")).unwrap().id;
        let b = store.create(new_run("b")).unwrap().id;
        for i in 1..=5u64 {
            assert_eq!(
                store.append_event(a, "progress", &json!({"i": i})).unwrap(),
                i
            );
        }
        assert_eq!(store.append_event(b, "log", &json!("hello")).unwrap(), 1);

        let all = store.events_after(a, 0, 100).unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(all[2].data, json!({"i": 3}));
        assert_eq!(all[2].event_type, "progress");
        // Resuming after Last-Event-ID 3.
        let rest = store.events_after(a, 3, 100).unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        let two = store.events_after(a, 0, 2).unwrap();
        assert_eq!(two.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(store.events_after(a, 5, 100).unwrap().is_empty());
        assert!(store.events_after(a, u64::MAX, 100).unwrap().is_empty());
        assert_eq!(
            store.events_after(b, 0, 100).unwrap()[0].data,
            json!("hello")
        );
        assert!(matches!(
            store.append_event(777, "x", &json!(null)),
            Err(StoreError::NotFound { id: 777 })
        ));
        assert!(matches!(
            store.events_after(777, 0, 1),
            Err(StoreError::NotFound { id: 777 })
        ));
    }

    #[test]
    fn garbage_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.sqlite");
        let garbage = b"this is not a database, it is a text file that is long enough \
                        to have a header and then some more bytes to fill a page........";
        std::fs::write(&path, garbage).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::NotADatabase { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("runs.sqlite") && msg.contains("not a SQLite database"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), garbage, "file untouched");
    }

    #[test]
    fn another_programs_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');")
                .unwrap();
        }
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::ForeignDatabase { .. }), "{err:?}");
        assert!(err.to_string().contains("other.db"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 1, "no tables added to someone else's database");
    }

    #[test]
    fn newer_schema_is_refused_and_open_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.sqlite");
        let id = SqliteStore::open(&path)
            .unwrap()
            .create(new_run("a"))
            .unwrap()
            .id;
        // Reopening twice neither fails nor re-runs migrations.
        for _ in 0..2 {
            let store = SqliteStore::open(&path).unwrap();
            assert_eq!(store.get(id).unwrap().unwrap().pipeline_name, "a");
        }
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err:?}"
        );
        assert!(err.to_string().contains("runs.sqlite"), "{err}");
    }

    #[test]
    fn missing_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("runs.sqlite");
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("runs.sqlite"), "{err}");
    }

    #[test]
    fn status_names_round_trip() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>().unwrap(), status);
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                json!(status.as_str())
            );
        }
        assert!("done".parse::<RunStatus>().is_err());
        assert!(!RunStatus::Queued.is_terminal() && !RunStatus::Running.is_terminal());
        assert!(RunStatus::Interrupted.is_terminal() && RunStatus::Cancelled.is_terminal());
    }
}
