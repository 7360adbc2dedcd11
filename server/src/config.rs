//! `espalier serve` settings: a TOML file (every key optional) with command-line flags on top.
//! Defaults are safe for a shared machine: loopback only, one run at a time, uploads capped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What happens to running runs when the daemon is asked to stop (SIGTERM, SIGINT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownMode {
    /// Cancel them (they end `cancelled`; nothing half-written is left).
    Cancel,
    /// Let them finish (queued runs stay queued for the next start).
    Finish,
}

impl std::str::FromStr for ShutdownMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cancel" => Ok(ShutdownMode::Cancel),
            "finish" => Ok(ShutdownMode::Finish),
            other => Err(format!(
                "`{other}` is not a shutdown mode; use `cancel` or `finish`"
            )),
        }
    }
}

/// The daemon's settings, defaults filled in.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (default `127.0.0.1:7878`: loopback only).
    pub listen: SocketAddr,
    /// The state folder: `plugins/`, `pipelines/`, `models/`, `runs/`, `data/`, `cache/`, and
    /// the run database inside it.
    pub state_dir: PathBuf,
    /// Runs executing at once (the others wait in the queue, in order).
    pub concurrency: usize,
    /// When set, every mutating call needs `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Largest accepted request body (plugin uploads, pipeline bodies), bytes.
    pub max_upload_bytes: usize,
    /// What SIGTERM does to running runs.
    pub on_shutdown: ShutdownMode,
    /// How long a file in a watched folder must stay unchanged before it is loaded.
    pub debounce_ms: u64,
    /// Text generations (`/openai/v1`) decoding at once.
    pub generation_slots: usize,
    /// Generations that may wait for a slot; beyond them a request gets 429.
    pub generation_queue: usize,
    /// Memory for the KV caches of one loaded model's running batch, MiB (`kv_cache_mib`):
    /// each sequence reserves its prompt + `max_tokens` up front; a request that alone needs
    /// more gets 503, others wait until running ones finish.
    pub kv_cache_mib: usize,
    /// What the KV caches store (`kv_cache`: "auto", "f16" or "f32"); `None` is auto, f16
    /// for bf16/int8 models and f32 for f32 ones.
    pub kv_cache: Option<espalier_engine::KvDtype>,
    /// Longest a generation may decode, seconds (`generation_deadline_s`); then it ends with
    /// the text so far and finish_reason `length`.
    pub generation_deadline_s: u64,
    /// Public keys whose plugin signatures are trusted (`trusted_keys`), and whether every
    /// plugin file must carry one (`require_signatures`).
    pub trust: espalier::plugin::signing::Trust,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            state_dir: PathBuf::from("espalier-state"),
            concurrency: 1,
            token: None,
            max_upload_bytes: 64 << 20,
            on_shutdown: ShutdownMode::Cancel,
            debounce_ms: 500,
            generation_slots: 16,
            generation_queue: 64,
            kv_cache_mib: 2048,
            kv_cache: None,
            generation_deadline_s: 600,
            trust: Default::default(),
        }
    }
}

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    concurrency: Option<usize>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    max_upload_mb: Option<usize>,
    on_shutdown: Option<ShutdownMode>,
    debounce_ms: Option<u64>,
    generation_slots: Option<usize>,
    generation_queue: Option<usize>,
    kv_cache_mib: Option<usize>,
    kv_cache: Option<String>,
    generation_deadline_s: Option<u64>,
    trusted_keys: Option<Vec<PathBuf>>,
    require_signatures: Option<bool>,
}

/// A config file that cannot be used, naming the file (and line and key when known).
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// Line and column, when known.
    pub line: Option<(usize, usize)>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ServeConfig {
    /// Reads `path` over the defaults. Relative `state_dir` and `token_file` are relative to
    /// the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text =
            espalier_engine::files::read_to_string(path, 1 << 20).map_err(|e| ConfigError {
                file: file.clone(),
                line: None,
                message: format!("cannot read the config file: {e}"),
            })?;
        Self::parse(&file, &text, path.parent().unwrap_or(Path::new("")))
    }

    /// Parses config text; `file` names it in errors, `dir` anchors relative paths.
    pub fn parse(file: &str, text: &str, dir: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_string(),
            line: e.span().map(|s| line_col(text, s.start)),
            message: e.message().trim().to_string(),
        })?;
        let err = |message: String| ConfigError {
            file: file.to_string(),
            line: None,
            message,
        };
        let mut c = ServeConfig::default();
        if let Some(l) = raw.listen {
            c.listen = l.parse().map_err(|e| {
                err(format!(
                    "listen: `{l}` is not an address like 127.0.0.1:7878 ({e})"
                ))
            })?;
        }
        if let Some(d) = raw.state_dir {
            c.state_dir = dir.join(d);
        }
        if let Some(n) = raw.concurrency {
            c.concurrency = n;
        }
        match (raw.token, raw.token_file) {
            (Some(_), Some(_)) => {
                return Err(err("give `token` or `token_file`, not both".into()));
            }
            (Some(t), None) => c.token = Some(t),
            (None, Some(f)) => {
                let f = dir.join(f);
                let t = espalier_engine::files::read_to_string(&f, 4096)
                    .map_err(|e| err(format!("token_file {}: {e}", f.display())))?;
                c.token = Some(t.trim().to_string());
            }
            (None, None) => {}
        }
        if let Some(mb) = raw.max_upload_mb {
            c.max_upload_bytes = mb
                .checked_mul(1 << 20)
                .ok_or_else(|| err(format!("max_upload_mb: {mb} is too large")))?;
        }
        if let Some(m) = raw.on_shutdown {
            c.on_shutdown = m;
        }
        if let Some(d) = raw.debounce_ms {
            c.debounce_ms = d;
        }
        if let Some(n) = raw.generation_slots {
            c.generation_slots = n;
        }
        if let Some(n) = raw.generation_queue {
            c.generation_queue = n;
        }
        if let Some(n) = raw.kv_cache_mib {
            c.kv_cache_mib = n;
        }
        if let Some(kind) = &raw.kv_cache {
            c.kv_cache = espalier_engine::KvDtype::parse_setting(kind)
                .map_err(|e| err(format!("kv_cache: {e}")))?;
        }
        if let Some(n) = raw.generation_deadline_s {
            c.generation_deadline_s = n;
        }
        let keys: Vec<PathBuf> = raw
            .trusted_keys
            .unwrap_or_default()
            .iter()
            .map(|k| dir.join(k))
            .collect();
        c.trust = espalier::plugin::signing::Trust::from_files(
            &keys,
            raw.require_signatures.unwrap_or(false),
        )
        .map_err(|e| err(format!("trusted_keys: {e}")))?;
        c.validate().map_err(err)?;
        Ok(c)
    }

    /// Checks the values that a file or flags could get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.concurrency) {
            return Err(format!(
                "concurrency: {} must be in 1..=64",
                self.concurrency
            ));
        }
        if !(1..=64).contains(&self.generation_slots) {
            return Err(format!(
                "generation_slots: {} must be in 1..=64",
                self.generation_slots
            ));
        }
        if self.generation_queue > 10_000 {
            return Err(format!(
                "generation_queue: {} must be at most 10000",
                self.generation_queue
            ));
        }
        if !(1..=1 << 20).contains(&self.kv_cache_mib) {
            return Err(format!(
                "kv_cache_mib: {} must be in 1..=1048576",
                self.kv_cache_mib
            ));
        }
        if !(1..=86_400).contains(&self.generation_deadline_s) {
            return Err(format!(
                "generation_deadline_s: {} must be in 1..=86400",
                self.generation_deadline_s
            ));
        }
        if self.max_upload_bytes == 0 {
            return Err("max_upload_mb must be at least 1".into());
        }
        if let Some(t) = &self.token
            && t.len() < 8
        {
            return Err("token: use at least 8 characters".into());
        }
        if !(10..=60_000).contains(&self.debounce_ms) {
            return Err(format!(
                "debounce_ms: {} must be in 10..=60000",
                self.debounce_ms
            ));
        }
        Ok(())
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_one_run() {
        let c = ServeConfig::parse("c.toml", "", Path::new("/srv")).unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.on_shutdown, ShutdownMode::Cancel);
    }

    #[test]
    fn values_and_errors_name_the_file() {
        let c = ServeConfig::parse(
            "c.toml",
            "listen = \"127.0.0.1:9000\"\nstate_dir = \"st\"\nconcurrency = 2\non_shutdown = \"finish\"\n",
            Path::new("/srv"),
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.state_dir, Path::new("/srv/st"));
        assert_eq!(c.on_shutdown, ShutdownMode::Finish);
        let e = ServeConfig::parse("c.toml", "concurency = 2\n", Path::new("")).unwrap_err();
        assert!(e.to_string().starts_with("c.toml:1:1: "), "{e}");
        let e = ServeConfig::parse("c.toml", "concurrency = 0\n", Path::new("")).unwrap_err();
        assert!(e.to_string().contains("concurrency"), "{e}");
    }

    /// `kv_cache`: auto (the default) leaves the choice to the model, f16 and f32 force it,
    /// anything else names the key and the values it takes.
    #[test]
    fn kv_cache_type_is_auto_or_named() {
        let parse = |text: &str| ServeConfig::parse("c.toml", text, Path::new(""));
        assert_eq!(parse("").unwrap().kv_cache, None);
        assert_eq!(parse("kv_cache = \"auto\"\n").unwrap().kv_cache, None);
        let f16 = parse("kv_cache = \"f16\"\n").unwrap().kv_cache;
        assert_eq!(f16, Some(espalier_engine::KvDtype::F16));
        let e = parse("kv_cache = \"q8\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml") && e.contains("kv_cache: `q8`"),
            "{e}"
        );
        assert!(e.contains("use auto, f32 or f16"), "{e}");
    }
}
