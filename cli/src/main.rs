//! The `espalier` command line: run pipelines, inspect plugins and models, benchmark.
//!
//! Output goes through `out!` and `err!` only (the print macros are denied here): they never
//! panic on a closed pipe. When the reader of standard output goes away (`espalier model
//! layers M | head`), the command stops quietly with exit status 0: the reader chose to stop,
//! nothing failed. Text that a plugin, a model folder or a GGUF file supplied is shown through
//! `espalier::display_safe` (control characters escaped, lengths capped). SIGINT and SIGTERM
//! remove the temporary folder of an export in progress, then exit with status 130 or 143.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Cell, CellAlignment};
use espalier::app::{App, AppError, Config, ErrorKind, RunOverrides};
use espalier::cancel::CancelToken;
use espalier::display_safe::{self, name as safe};
use espalier::evaluate::{EvalSpec, EvalText};
use espalier::events::{EventSink, RunEvent};
use espalier::pipeline::PipelineError;
use espalier::plugin::Sandbox;
use espalier::plugin::bindings::ParamValue;
use espalier::plugin::registry::{PluginSummary, kind_name, load_file};
use espalier::report::RunReport;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use render::{mib, pct};

mod bench_api;
mod bench_serve;
#[cfg(target_os = "linux")]
use espalier_engine::hugepages;

/// Large buffers (weights, packed arrays, KV caches) on transparent huge pages, scratch
/// buffers reused: see [`hugepages`].
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: hugepages::HugePageAlloc = hugepages::HugePageAlloc;

#[derive(Parser)]
#[command(
    name = "espalier",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ESPALIER_BUILD"), ")"),
    about = "Prune large language models with sandboxed WebAssembly criteria"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct PluginDirs {
    /// Folder of extra plugin `.wasm` files (repeatable; also $ESPALIER_PLUGIN_DIR).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// Trust plugins signed by this public key (repeatable; also $ESPALIER_TRUST, a path list).
    #[arg(long = "trust", value_name = "KEY.pub")]
    trust: Vec<PathBuf>,
    /// Refuse every plugin file that is not signed by a trusted key (also
    /// $ESPALIER_REQUIRE_SIGNATURES=1).
    #[arg(long)]
    require_signatures: bool,
}

impl PluginDirs {
    fn all(&self) -> Vec<PathBuf> {
        let mut dirs = self.dirs.clone();
        if let Some(env) = std::env::var_os("ESPALIER_PLUGIN_DIR") {
            dirs.extend(std::env::split_paths(&env));
        }
        dirs
    }

    /// The signers to trust: `--trust` keys and `$ESPALIER_TRUST`, required with
    /// `--require-signatures` or `$ESPALIER_REQUIRE_SIGNATURES=1`.
    fn trust(&self) -> Result<espalier::plugin::signing::Trust> {
        let mut keys = self.trust.clone();
        if let Some(env) = std::env::var_os("ESPALIER_TRUST") {
            keys.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
        }
        let require = self.require_signatures
            || std::env::var_os("ESPALIER_REQUIRE_SIGNATURES").is_some_and(|v| v == "1");
        Ok(espalier::plugin::signing::Trust::from_files(
            &keys, require,
        )?)
    }

    /// The core's configuration for this command: the folders and keys given here and in the
    /// environment (`ESPALIER_MODELS`, default `models/`; `ESPALIER_CACHE`, default
    /// `$XDG_CACHE_HOME/espalier` or `~/.cache/espalier`; `ESPALIER_CACHE=off` disables it).
    fn config(&self, sandbox: Sandbox) -> Result<Config> {
        Ok(Config {
            plugin_dirs: self.all(),
            models_dir: models_dir(),
            cache_dir: cache_dir(),
            sandbox,
            per_model_peak: true,
            trust: self.trust()?,
        })
    }
}

/// Where `fetch:` models go: `$ESPALIER_MODELS`, default `models/`.
fn models_dir() -> PathBuf {
    std::env::var_os("ESPALIER_MODELS").map_or_else(|| PathBuf::from("models"), PathBuf::from)
}

/// Where compiled plugins are cached between runs (see [`PluginDirs::config`]).
fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("ESPALIER_CACHE") {
        Some(v) if v == "off" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("espalier")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run pipeline files: prune, report, export. With several, the dense model is evaluated
    /// once for all that share its model and protocol, and the runs are compared at the end.
    Run {
        /// The pipelines (TOML), e.g. pipelines/quickstart.toml, or strategies (a `.tar` from
        /// `espalier strategy pack`, or the folder `strategy unpack` wrote).
        #[arg(required_unless_present = "from")]
        pipelines: Vec<PathBuf>,
        /// Rerun exactly the pipeline a report.json records (plugins and texts pinned by
        /// sha256; any other version is refused).
        #[arg(long, value_name = "REPORT", conflicts_with = "pipelines")]
        from: Option<PathBuf>,
        /// Use this model instead of the pipeline's `model` (a directory or builtin:NAME).
        #[arg(long)]
        model: Option<String>,
        /// Export here instead of the pipeline's `export.dir`.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Do not export, only report.
        #[arg(long, conflicts_with = "out")]
        no_export: bool,
        /// Replace the export folder even when it is not an earlier Espalier export (as
        /// `[export] force = true`). Never replaces the model folder or another input.
        #[arg(long, conflicts_with = "no_export")]
        force: bool,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// Also print the per-layer table.
        #[arg(long)]
        layers: bool,
        #[command(flatten)]
        plugins: PluginDirs,
    },
    /// List or inspect plugins.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Signing keys for plugins.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Share pruning strategies: a pipeline with the exact plugins and texts it uses.
    Strategy {
        #[command(subcommand)]
        command: StrategyCommand,
    },
    /// Inspect models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate text from a model (dense, or a pruned export on its sparse kernels), streamed
    /// as it is produced: `--chat` applies the model's chat template; greedy unless
    /// `--temperature` is above 0.
    Generate(generate::GenerateArgs),
    /// Evaluate a model under the evaluation protocol `[evaluate]` uses (same defaults):
    /// perplexity on a text, prefill and decode speed, weights held and peak memory.
    Eval {
        /// A model directory, builtin:NAME, or fetch:smollm2-135m-instruct (downloaded on first use). A pruned export of `espalier run` runs on the sparse kernels its masks.safetensors plans, as the run evaluated it.
        model: String,
        #[command(flatten)]
        args: EvalArgs,
        /// Evaluate a pruned export's weights on the dense kernels, ignoring its masks.safetensors.
        #[arg(long)]
        dense: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare runs side by side from their report.json files: parameters that differ,
    /// perplexity, speed, density per role.
    Compare {
        /// Two or more report.json files (e.g. out/quickstart/report.json).
        #[arg(required = true, num_args = 2..)]
        reports: Vec<PathBuf>,
        /// Print the reports as one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Convert a GGUF file (LLaMA family) into a Hugging Face–style directory (dequantized f32).
    Import {
        /// The .gguf file.
        gguf: PathBuf,
        /// Output directory (must not exist, or be empty).
        out: PathBuf,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Run as a daemon: REST API, watched plugin and pipeline folders, run history.
    Serve {
        /// A TOML config file (keys: listen, state_dir, concurrency, token | token_file,
        /// max_upload_mb, on_shutdown, debounce_ms); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on (default 127.0.0.1:7878; port 0 picks a free one).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// State folder (plugins/, pipelines/, models/, runs/, data/, cache/, the run database).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Runs executing at once.
        #[arg(long)]
        concurrency: Option<usize>,
        /// File holding the bearer token mutating calls must send (also $ESPALIER_TOKEN).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Largest request body (plugin upload, pipeline), MiB.
        #[arg(long)]
        max_upload_mb: Option<usize>,
        /// On SIGTERM: `cancel` running runs or let them `finish`.
        #[arg(long)]
        on_shutdown: Option<espalier_server::config::ShutdownMode>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StorageArg {
    /// f32, exact.
    F32,
    /// bf16 with f32 accumulation: half the bytes.
    Bf16,
    /// int8 with one f32 scale per output row (symmetric, max |w| / 127), f32 accumulation: a
    /// quarter of the bytes; every linear, the LM head included.
    Int8,
}

impl From<StorageArg> for espalier::sparse::Storage {
    fn from(s: StorageArg) -> Self {
        match s {
            StorageArg::F32 => espalier::sparse::Storage::F32,
            StorageArg::Bf16 => espalier::sparse::Storage::Bf16,
            StorageArg::Int8 => espalier::sparse::Storage::Int8,
        }
    }
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// List the built-in plugins and those in plugin folders.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        plugins: PluginDirs,
    },
    /// Sign a plugin file: an ed25519 signature over its sha256, name and version, written
    /// beside it as FILE.wasm.sig.
    Sign {
        /// The plugin file.
        file: PathBuf,
        /// The secret key file (from `espalier keys generate`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        /// Replace an existing FILE.wasm.sig.
        #[arg(long)]
        force: bool,
    },
    /// Check a plugin file's signature (FILE.wasm.sig): it must be signed, unchanged since, and
    /// (with --trust) by a trusted key. Exit status 2 when it is not.
    Verify {
        /// The plugin file.
        file: PathBuf,
        /// Trusted public keys (repeatable; also $ESPALIER_TRUST).
        #[arg(long = "trust", value_name = "KEY.pub")]
        trust: Vec<PathBuf>,
    },
    /// Publish a plugin file to an OCI registry as a wasm component artifact (the layout `wkg`
    /// and `oras` read); its signature (FILE.wasm.sig), if any, travels in the manifest.
    /// Credentials: the Docker config file or $ESPALIER_REGISTRY_HOST/_USERNAME/_PASSWORD.
    Push {
        /// The plugin file.
        file: PathBuf,
        /// Where to: REGISTRY/REPOSITORY:TAG, e.g. localhost:5000/team-a/wanda:1.0 (plain http
        /// only for loopback registries).
        reference: String,
    },
    /// Fetch a plugin from an OCI registry (REGISTRY/REPOSITORY:TAG or @sha256:DIGEST), verify
    /// every digest and its signature (as --trust and --require-signatures ask), and write it
    /// to DIR as NAME.wasm (with NAME.wasm.sig when signed). Never replaces a different file.
    Pull {
        /// The reference, e.g. localhost:5000/team-a/wanda:1.0.
        reference: String,
        /// The plugin folder to write to.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// Trust plugins signed by this public key (repeatable; also $ESPALIER_TRUST).
        #[arg(long = "trust", value_name = "KEY.pub")]
        trust: Vec<PathBuf>,
        /// Refuse the plugin unless it is signed by a trusted key (also
        /// $ESPALIER_REQUIRE_SIGNATURES=1).
        #[arg(long)]
        require_signatures: bool,
    },
    /// Show what a plugin describes: version, parameters, needs, output.
    Inspect {
        /// A registered plugin name or a path to a .wasm file.
        plugin: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        plugins: PluginDirs,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an ed25519 key pair for signing plugins: KEY (secret, readable by you only) and
    /// KEY.pub (give it to the teams that run your plugins). Never overwrites.
    Generate {
        /// Path of the secret key file, e.g. keys/team-a.
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum StrategyCommand {
    /// Bundle a pipeline, the plugins its stages use (pinned by sha256) and its texts into one
    /// tar file that `espalier run` and `strategy unpack` read.
    Pack {
        /// The pipeline file.
        pipeline: PathBuf,
        /// The strategy file to write (must not exist), e.g. wanda.strategy.tar.
        out: PathBuf,
        #[command(flatten)]
        plugins: PluginDirs,
    },
    /// Restore a strategy file into a new folder (pipeline.toml, plugins/, texts/), checking
    /// every file's sha256; `espalier run FOLDER` runs it.
    Unpack {
        /// The strategy file.
        strategy: PathBuf,
        /// The folder to create (must not exist, or be empty).
        dest: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// List a model's weights with their roles and shapes (the names `targets` globs match).
    Layers {
        /// A model directory, builtin:NAME, or fetch:smollm2-135m-instruct (downloaded on
        /// first use).
        model: String,
        /// Print JSON (attention geometry and every weight).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Sparse kernels vs dense on every SmolLM2-135M linear shape, with a bandwidth probe.
    Kernels {
        /// A short run (a few repetitions) instead of the full one (~2-3 min).
        #[arg(long)]
        quick: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// End-to-end decode: ms/token and tokens/s of the dense and the pruned model, same prompt,
    /// same process, with the peak resident memory of each.
    Decode {
        /// A model directory, builtin:NAME or fetch:smollm2-135m-instruct.
        model: String,
        /// The pipeline whose stages prune the model. Without one, MODEL must be a pruned
        /// export of `espalier run` and is timed with the masks it was exported with.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Prompt tokens (from data/eval.txt, or a fixed prompt when it is absent).
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Weight storage of the pruned model's linears [default: for an export timed with its
        /// own masks, the storage its run evaluated it in (from its report.json); else f32].
        #[arg(long, value_enum)]
        storage: Option<StorageArg>,
        /// Weight storage of the dense baseline's linears [default: the pruned model's, so the
        /// ratio is the pruning's alone; for a packed export, the dtype it was packed in].
        #[arg(long, value_enum)]
        dense_storage: Option<StorageArg>,
        /// Times the dense and the pruned model are decoded, in turn; each is reported by its
        /// median round (one decode's speed drifts by tens of percent on a shared machine).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load-test the daemon on loopback: concurrent clients poll runs, list plugins and follow
    /// events while runs execute and a plugin file is replaced every second.
    Api {
        /// Concurrent clients.
        #[arg(long, default_value_t = 200)]
        clients: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Pipelines to run during the load (repeatable; each is also run by the CLI to compare).
        #[arg(long = "pipeline", default_values = ["pipelines/quickstart.toml", "pipelines/smollm2-2-4.toml"])]
        pipelines: Vec<PathBuf>,
        /// Model every pipeline runs on.
        #[arg(long, default_value = "fetch:smollm2-135m-instruct")]
        model: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Load-test the daemon's OpenAI-compatible API on loopback: 1, 4 and 16 concurrent
    /// greedy streams against the dense and the pruned model (continuous batching): time to
    /// first token, decode tokens/s per stream, aggregate tokens/s (the prompts' prefill
    /// included) and aggregate decode tokens/s (the streams' decode rates summed), each vs
    /// one stream.
    Serve {
        /// The dense model: a directory, builtin:NAME or fetch:smollm2-135m-instruct.
        model: String,
        /// A pruned export of it (`espalier run`'s export folder, dense-with-zeros or packed),
        /// or a packed bf16/int8 export of the dense model; repeatable, each measured after
        /// the dense model and compared with it at equal concurrency. Without its own
        /// tokenizer an export uses the dense model's.
        #[arg(long, value_name = "EXPORT")]
        pruned: Vec<PathBuf>,
        /// Concurrent streams per round (comma-separated, each in 1..=64).
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16])]
        streams: Vec<usize>,
        /// Tokens each stream asks for (greedy; EOS may end a stream earlier).
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Time limit of the whole benchmark, seconds; rounds not started by then are skipped.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time the built-in criteria and the share spent inside the sandbox.
    Plugins {
        /// Model to prune (random weights are fine).
        #[arg(long, default_value = "builtin:smollm2-135m-shapes")]
        model: String,
        /// Repetitions per case (the median is shown).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Writes one line to standard output. A closed pipe ends the process quietly with status 0
/// (see the module docs); any other write error ends it with status 1 and a message.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            write_stderr(format_args!("error: cannot write to standard output: {e}"));
            std::process::exit(1);
        }
    }
}

/// Writes one line to standard error; a failure to write there cannot be reported anywhere,
/// so it is ignored rather than turned into a panic.
fn write_stderr(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stderr = std::io::stderr().lock();
    let _ = stderr
        .write_fmt(args)
        .and_then(|()| stderr.write_all(b"\n"));
}

/// `println!` that survives a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
macro_rules! err {
    ($($arg:tt)*) => { $crate::write_stderr(format_args!($($arg)*)) };
}

// After the output macros, which they use.
mod generate;
mod render;

/// Removes the temporary folder of an export in progress when the user interrupts (SIGINT) or
/// the system stops (SIGTERM) the process, then exits with the conventional 128 + signal.
fn install_signal_cleanup() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot install the signal handlers: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("espalier-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let removed = espalier::export::remove_temporaries_and_block();
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if removed > 0 {
                    err!("\nespalier: {name}: stopped; the unfinished export was removed");
                } else {
                    err!("\nespalier: {name}: stopped");
                }
                std::process::exit(128 + signal);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the signal thread: {e}");
    }
}

/// Longest error text printed (the full text of a plugin's message stays in its error).
const ERROR_MAX: usize = 16 << 10;

fn main() -> ExitCode {
    #[cfg(target_os = "linux")]
    hugepages::HugePageAlloc::configure();
    espalier::set_build(env!("ESPALIER_BUILD"));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ESPALIER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // The daemon handles SIGTERM and SIGINT itself (an ordered shutdown); every other command
    // removes an unfinished export and exits 128 + signal.
    if !matches!(cli.command, Command::Serve { .. }) {
        install_signal_cleanup();
    }
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err!(
                "error: {}",
                display_safe::terminal(&error_chain(&e), ERROR_MAX)
            );
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit status of a failed command, from the stable kind of its error: 2 bad input (a
/// pipeline, model or plugin that cannot be used; clap's usage errors are 2 too), 3 a plugin
/// failed or returned something invalid, 4 the export was refused or failed, 130 cancelled,
/// 1 anything else.
fn exit_code(e: &anyhow::Error) -> u8 {
    let kind = if let Some(app) = e.downcast_ref::<AppError>() {
        app.kind()
    } else if e.downcast_ref::<PipelineError>().is_some()
        || e.downcast_ref::<espalier::strategy::StrategyError>()
            .is_some()
        || e.downcast_ref::<espalier::plugin::signing::SigningError>()
            .is_some()
    {
        ErrorKind::InvalidPipeline
    } else if let Some(o) = e.downcast_ref::<espalier::plugin::oci::OciError>() {
        // A malformed reference or an artifact that fails verification is bad input; a
        // registry that is down or refuses is not.
        use espalier::plugin::oci::OciError;
        match o {
            OciError::Reference { .. } | OciError::Verify { .. } => ErrorKind::InvalidPlugin,
            _ => return 1,
        }
    } else if let Some(p) = e.downcast_ref::<espalier::plugin::PluginError>() {
        match p {
            espalier::plugin::PluginError::Invalid { .. }
            | espalier::plugin::PluginError::Refused { .. } => ErrorKind::InvalidPlugin,
            _ => ErrorKind::PluginFailed,
        }
    } else {
        return 1;
    };
    match kind {
        ErrorKind::InvalidPipeline | ErrorKind::InvalidModel | ErrorKind::InvalidPlugin => 2,
        ErrorKind::PluginFailed | ErrorKind::InvalidOutput => 3,
        ErrorKind::Export => 4,
        ErrorKind::Cancelled => 130,
        ErrorKind::Evaluation | ErrorKind::Internal => 1,
    }
}

/// The error and its causes, skipping causes whose text the message already includes (our
/// error types embed their source in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

use espalier::plugin::registry::{need_name, origin_text, produces_name};

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            pipelines,
            from,
            model,
            out,
            no_export,
            force,
            json,
            layers,
            plugins,
        } => cmd_run(
            &pipelines,
            from.as_deref(),
            RunOverrides {
                model,
                export_dir: out,
                no_export,
                force,
                ..RunOverrides::default()
            },
            json,
            layers,
            &plugins,
        ),
        Command::Plugins { command } => match command {
            PluginsCommand::List { json, plugins } => cmd_plugins_list(json, &plugins),
            PluginsCommand::Inspect {
                plugin,
                json,
                plugins,
            } => cmd_plugins_inspect(&plugin, json, &plugins),
            PluginsCommand::Sign { file, key, force } => cmd_plugins_sign(&file, &key, force),
            PluginsCommand::Verify { file, trust } => cmd_plugins_verify(&file, trust),
            PluginsCommand::Push { file, reference } => cmd_plugins_push(&file, &reference),
            PluginsCommand::Pull {
                reference,
                dir,
                trust,
                require_signatures,
            } => cmd_plugins_pull(&reference, &dir, trust, require_signatures),
        },
        Command::Keys { command } => match command {
            KeysCommand::Generate { key } => {
                let public = espalier::plugin::signing::generate(&key)?;
                out!(
                    "wrote {} (secret: keep it) and {} (public: share it); key id {}",
                    key.display(),
                    espalier::plugin::signing::public_key_path(&key).display(),
                    public.id
                );
                Ok(())
            }
        },
        Command::Strategy { command } => match command {
            StrategyCommand::Pack {
                pipeline,
                out,
                plugins,
            } => cmd_strategy_pack(&pipeline, &out, &plugins),
            StrategyCommand::Unpack { strategy, dest } => cmd_strategy_unpack(&strategy, &dest),
        },
        Command::Model { command } => match command {
            ModelCommand::Layers { model, json } => cmd_model_layers(&model, json),
        },
        Command::Eval {
            model,
            args,
            dense,
            json,
        } => cmd_eval(&model, args, dense, json),
        Command::Generate(args) => generate::run(args, &models_dir()),
        Command::Compare { reports, json } => cmd_compare(&reports, json),
        Command::Import { gguf, out } => cmd_import(&gguf, &out),
        Command::Serve {
            config,
            listen,
            state,
            concurrency,
            token_file,
            max_upload_mb,
            on_shutdown,
        } => cmd_serve(
            config,
            listen,
            state,
            concurrency,
            token_file,
            max_upload_mb,
            on_shutdown,
        ),
        Command::Bench { command } => match command {
            BenchCommand::Plugins {
                model,
                repeat,
                json,
            } => cmd_bench_plugins(&model, repeat, json),
            BenchCommand::Kernels { quick, json } => cmd_bench_kernels(quick, json),
            BenchCommand::Api {
                clients,
                seconds,
                pipelines,
                model,
                json,
            } => cmd_bench_api(clients, seconds, pipelines, model, json),
            BenchCommand::Decode {
                model,
                pipeline,
                prompt_tokens,
                new_tokens,
                storage,
                dense_storage,
                rounds,
                json,
            } => espalier_decode_bench(
                &model,
                pipeline.as_deref(),
                espalier::bench::DecodeBenchOptions {
                    prompt_tokens,
                    new_tokens,
                    storage: storage.map(Into::into),
                    dense_storage: dense_storage.map(Into::into),
                    rounds: rounds as usize,
                },
                json,
            ),
            BenchCommand::Serve {
                model,
                pruned,
                streams,
                max_tokens,
                seconds,
                json,
            } => cmd_bench_serve(&model, pruned, streams, max_tokens, seconds, json),
        },
    }
}

fn start_app(dirs: &PluginDirs) -> Result<App> {
    let app = App::start(dirs.config(Sandbox::default())?)?;
    warn_skipped(&app);
    Ok(app)
}

fn warn_skipped(app: &App) {
    for w in &app.plugin_warnings {
        err!(
            "warning: skipped a plugin: {}",
            display_safe::terminal(&w.to_string(), ERROR_MAX)
        );
    }
}

/// Draws one line over the stages (a spinner until there is something to count, then a bar)
/// with a line per finished stage, and under it a bar for the step in progress when its length
/// is known: calibration sequences, evaluation windows, a plugin's own progress reports. A bar
/// is drawn only once its length is known, so none reads full before its work starts.
///
/// When stderr is not a terminal (a log file, CI, `nohup`), indicatif draws nothing, so the
/// same progress goes to stderr as plain lines instead: every status and finished stage, and
/// the step in progress at most every [`PLAIN_PROGRESS_EVERY`] and when it completes, so a
/// 30-minute fine-tune in a log still says where it is.
struct Bars {
    multi: MultiProgress,
    bar: ProgressBar,
    spinner: ProgressStyle,
    counting: ProgressStyle,
    stages: u64,
    /// The current step's bar, while one is shown.
    step: Option<ProgressBar>,
    /// Plain-line mode (stderr is not a terminal): when the step in progress was last printed.
    plain: Option<Option<Instant>>,
}

/// How often plain-line mode prints the step in progress.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(30);

impl Bars {
    /// A spinner (ticking) until the first count.
    fn new() -> Result<Self> {
        let multi = MultiProgress::new();
        let bar = multi.add(ProgressBar::new_spinner());
        let spinner = ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .context("progress template")?;
        bar.set_style(spinner.clone());
        bar.enable_steady_tick(Duration::from_millis(120));
        Ok(Bars {
            multi,
            bar,
            spinner,
            counting: ProgressStyle::with_template(
                "{spinner} [{bar:24}] {pos}/{len} {msg} {elapsed}",
            )
            .context("progress template")?
            .progress_chars("=> "),
            stages: 0,
            step: None,
            plain: (!std::io::IsTerminal::is_terminal(&std::io::stderr())).then_some(None),
        })
    }

    /// Prints `text` above the bars, or as a plain line on stderr when no bar is drawn.
    fn line(&self, text: String) {
        if self.plain.is_some() {
            err!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    /// Sets the main line's message (printed as a line of its own in plain-line mode).
    fn status(&self, message: String) {
        if self.plain.is_some() {
            err!("{message}");
        }
        self.bar.set_message(message);
    }

    /// Counts `done` of `total` on the main line (a bar), or spins when `total` is 0.
    fn count(&self, done: u64, total: u64) {
        if total == 0 {
            self.bar.set_style(self.spinner.clone());
        } else {
            self.bar.set_style(self.counting.clone());
            self.bar.set_length(total);
            self.bar.set_position(done.min(total));
        }
    }

    /// Shows `done` of `total` for the current step, with `message`.
    fn step(&mut self, done: u64, total: u64, message: String) {
        if let Some(last) = &mut self.plain {
            let due = last.is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY);
            if (due && done > 0) || (total > 0 && done >= total) {
                err!("  {}/{total} {message}", done.min(total));
                *last = Some(Instant::now());
            }
        }
        let bar = self.step.get_or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::no_length());
            if let Ok(style) = ProgressStyle::with_template("  [{bar:24}] {pos}/{len} {msg}") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        bar.set_length(total);
        bar.set_position(done.min(total));
        bar.set_message(message);
    }

    /// Removes the current step's bar (its step is over).
    fn end_step(&mut self) {
        if let Some(last) = &mut self.plain {
            *last = None;
        }
        if let Some(bar) = self.step.take() {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }

    /// Clears every bar (the command prints its results next).
    fn finish(&mut self) {
        self.end_step();
        self.bar.finish_and_clear();
    }
}

impl EventSink for Bars {
    fn emit(&mut self, event: RunEvent) {
        match event {
            RunEvent::RunStarted { stages, .. } => {
                self.stages = stages as u64;
                self.count(0, self.stages);
            }
            RunEvent::StageStarted {
                index,
                total,
                name,
                plugin,
                targets,
                ..
            } => {
                self.end_step();
                self.stages = total as u64;
                self.count(index as u64, self.stages);
                self.status(format!(
                    "stage {}/{total} `{}` ({}, {targets} layers)",
                    index + 1,
                    safe(&name),
                    safe(&plugin),
                ));
            }
            RunEvent::StageProgress {
                index,
                step,
                done,
                total,
            } => match (done, total) {
                // A plugin's own progress: a real bar under the stage's line.
                (Some(done), Some(total)) => self.step(done, total, safe(&step)),
                _ => {
                    self.end_step();
                    self.status(format!(
                        "stage {}/{}: {}",
                        index + 1,
                        self.stages,
                        safe(&step)
                    ));
                }
            },
            RunEvent::CalibrationProgress {
                pass, done, total, ..
            } => self.step(
                done as u64,
                total as u64,
                format!("calibration sequences ({pass})"),
            ),
            RunEvent::EvaluationStarted { which } => {
                self.end_step();
                self.status(format!("evaluating the {which} model"));
            }
            RunEvent::EvaluationProgress {
                which,
                windows_done,
                windows_total,
            } => self.step(
                windows_done as u64,
                windows_total as u64,
                format!("{which} model: perplexity windows"),
            ),
            RunEvent::EvaluationFinished { .. } => self.end_step(),
            RunEvent::FinetuneStarted {
                steps,
                rounds,
                start_step,
                sequences_per_step,
                seq_len,
                ..
            } => {
                self.end_step();
                let rounds = rounds.map_or(String::new(), |r| format!(" in {r} lottery rounds"));
                self.status(format!(
                    "fine-tuning: {steps} steps{rounds} of {sequences_per_step} × {seq_len} tokens"
                ));
                self.step(start_step, steps, "fine-tuning steps".into());
            }
            RunEvent::FinetuneProgress { step } => self.step(
                step.step,
                step.steps,
                format!(
                    "{}loss {:.4}{}, lr {:.2e}, {:.0} tokens/s, ETA {}",
                    step.round.map_or(String::new(), |r| format!("round {r}: ")),
                    step.loss,
                    step.parts.map_or(String::new(), |p| format!(
                        " (CE {:.4}, KL {:.4}{})",
                        p.cross_entropy,
                        p.kl,
                        p.hidden
                            .map_or(String::new(), |h| format!(", hidden {h:.4}"))
                    )),
                    step.learning_rate,
                    step.tokens_per_second,
                    eta(step.eta_seconds)
                ),
            ),
            RunEvent::FinetunePruned { event } => {
                self.line(format!(
                    "  ✓ {} pruned after step {}: density {:.4} (schedule {:.4}) in {:.2} s",
                    safe(&event.stage),
                    event.step,
                    event.density,
                    event.target_density,
                    event.seconds
                ));
            }
            RunEvent::FinetuneMaskUpdated { event } => {
                self.line(format!(
                    "  ✓ {} updated masks after step {}: {} dropped, {} grown (drop fraction {:.4}), density {:.4} in {:.2} s",
                    safe(&event.stage),
                    event.step,
                    event.dropped,
                    event.grown,
                    event.drop_fraction,
                    event.density,
                    event.seconds
                ));
            }
            RunEvent::FinetuneRound { round } => {
                let after = match (round.pruned_to, round.rewound_to) {
                    (Some(d), Some(0)) => {
                        format!("; pruned to {d:.4}, survivors rewound to the starting weights")
                    }
                    (Some(d), Some(k)) => {
                        format!("; pruned to {d:.4}, survivors rewound to step {k}")
                    }
                    _ => "; the winning ticket".to_string(),
                };
                self.line(format!(
                    "  ✓ lottery round {}/{}: {} steps at density {:.4}, loss {:.4}{after}",
                    round.round, round.rounds, round.steps, round.density, round.final_loss
                ));
            }
            RunEvent::FinetuneFinished { report } => {
                self.end_step();
                self.line(format!(
                    "  ✓ fine-tuned {} steps: loss {:.4} → {:.4} in {:.1} s ({:.0} tokens/s)",
                    report
                        .loss_curve
                        .last()
                        .map_or(report.spec.steps, |p| p.last),
                    report.first_loss,
                    report.final_loss,
                    report.seconds,
                    report.tokens_per_second
                ));
            }
            RunEvent::StageFinished { index, report } => {
                self.end_step();
                self.count(index as u64 + 1, self.stages);
                self.line(format!(
                    "  ✓ {} ({}): density {:.4} in {:.2} s",
                    safe(&report.name),
                    safe(&report.plugin),
                    report.density_after,
                    report.seconds
                ));
            }
            RunEvent::Notice { message } => {
                self.line(format!("espalier: {}", safe(&message)));
            }
            RunEvent::Warning { message } => {
                self.line(format!(
                    "warning: {}",
                    display_safe::terminal(&message, ERROR_MAX)
                ));
            }
            _ => {}
        }
    }
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
fn eta(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Reads the pipeline a report recorded (`run --from`).
fn pipeline_from_report(path: &std::path::Path) -> Result<espalier::pipeline::Pipeline> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: RunReport = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not an Espalier report.json (written by `espalier run` with an [export] section)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        !report.resolved_pipeline.is_empty(),
        "{} was written by an Espalier before 0.1.0's report version 2 and records no resolved pipeline; run its pipeline file instead",
        path.display()
    );
    Ok(espalier::pipeline::Pipeline::parse(
        &format!("{} (resolved_pipeline)", path.display()),
        &report.resolved_pipeline,
    )?)
}

fn cmd_run(
    files: &[PathBuf],
    from: Option<&std::path::Path>,
    mut overrides: RunOverrides,
    json: bool,
    layers: bool,
    dirs: &PluginDirs,
) -> Result<()> {
    // Parsed first, all of them: a mistake in the last file is reported before the first runs,
    // and the first pipeline's [sandbox] limits also bind the `describe` of folder plugins.
    // A strategy's plugins join the plugin folders; an archive is unpacked into a temporary
    // folder that lives until the command ends.
    let mut unpacked = Vec::new();
    let mut strategy_dirs = Vec::new();
    let pipelines = match from {
        Some(report) => vec![pipeline_from_report(report)?],
        None => files
            .iter()
            .map(|f| load_run_input(f, &mut unpacked, &mut strategy_dirs))
            .collect::<Result<Vec<_>>>()?,
    };
    anyhow::ensure!(
        pipelines.len() == 1 || overrides.export_dir.is_none(),
        "--out names one folder; with several pipelines each exports to its own [export] dir (or use --no-export)"
    );
    let sandbox = pipelines.first().map(|p| p.sandbox).unwrap_or_default();
    let mut config = dirs.config(sandbox)?;
    config.plugin_dirs.extend(strategy_dirs);
    let app = App::start(config)?;
    warn_skipped(&app);
    if pipelines.len() > 1 {
        overrides.dense_baselines = Some(Default::default());
    }
    let mut reports = Vec::with_capacity(pipelines.len());
    let several = pipelines.len() > 1;
    for pipeline in pipelines {
        let label = pipeline.name.clone();
        let mut observer = Bars::new()?;
        observer.bar.set_message("planning");
        let result = app.run_pipeline(pipeline, &overrides, &mut observer, &CancelToken::new());
        observer.finish();
        let result = result?;
        if json {
            if !several {
                out!("{}", serde_json::to_string_pretty(&result.report)?);
            }
        } else {
            render::print_report(&result.report, layers);
            match &result.exported_to {
                Some(dir) => out!("exported to {} ({})", dir.display(), exported_files(dir)),
                None => out!("not exported (no [export] section, or --no-export)"),
            }
        }
        reports.push((label, result.report));
    }
    if several {
        if json {
            let all: Vec<&RunReport> = reports.iter().map(|(_, r)| r).collect();
            out!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            out!("");
            render::print_compare(&reports);
        }
    }
    Ok(())
}

/// A pipeline file, a strategy archive (`.tar`, unpacked into a temporary folder kept in
/// `unpacked`) or a strategy folder; a strategy's plugin folder goes to `plugin_dirs`.
fn load_run_input(
    path: &std::path::Path,
    unpacked: &mut Vec<tempfile::TempDir>,
    plugin_dirs: &mut Vec<PathBuf>,
) -> Result<espalier::pipeline::Pipeline> {
    use espalier::strategy;
    let dir = if path.is_file() && path.extension().is_some_and(|e| e == "tar") {
        let tmp = tempfile::Builder::new()
            .prefix("espalier-strategy-")
            .tempdir()
            .context("cannot create a temporary folder for the strategy")?;
        let dest = tmp.path().join("strategy");
        strategy::unpack(path, &dest)?;
        unpacked.push(tmp);
        dest
    } else if strategy::is_strategy_dir(path) {
        path.to_path_buf()
    } else {
        return Ok(espalier::pipeline::Pipeline::load(path)?);
    };
    let opened = strategy::open_dir(&dir)?;
    err!(
        "espalier: strategy {} ({}): {}",
        path.display(),
        safe(&opened.manifest.name),
        opened
            .manifest
            .plugins
            .iter()
            .map(|p| format!("{}@sha256:{}", safe(&p.name), &p.sha256[..12]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    plugin_dirs.push(opened.plugin_dir);
    Ok(opened.pipeline)
}

/// `espalier strategy pack`.
fn cmd_strategy_pack(
    pipeline: &std::path::Path,
    out: &std::path::Path,
    dirs: &PluginDirs,
) -> Result<()> {
    let app = start_app(dirs)?;
    let manifest = espalier::strategy::pack(&app, pipeline, out)?;
    out!(
        "packed {} into {}: pipeline.toml, {} plugin(s), {} text(s)",
        pipeline.display(),
        out.display(),
        manifest.plugins.len(),
        manifest.texts.len()
    );
    print_strategy_plugins(&manifest);
    Ok(())
}

/// One line per plugin a strategy holds.
fn print_strategy_plugins(manifest: &espalier::strategy::Manifest) {
    for p in &manifest.plugins {
        out!(
            "  {} {} sha256:{}",
            safe(&p.name),
            safe(&p.version),
            p.sha256
        );
    }
}

/// `espalier strategy unpack`.
fn cmd_strategy_unpack(strategy: &std::path::Path, dest: &std::path::Path) -> Result<()> {
    let manifest = espalier::strategy::unpack(strategy, dest)?;
    out!(
        "unpacked {} into {} (every sha256 checked); run it with `espalier run {}`",
        strategy.display(),
        dest.display(),
        dest.display()
    );
    print_strategy_plugins(&manifest);
    Ok(())
}

/// `espalier compare`: runs side by side from their report.json files.
fn cmd_compare(files: &[PathBuf], json: bool) -> Result<()> {
    let mut reports = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        let report: RunReport = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not an Espalier report.json", f.display()))?;
        // Label by the run's folder (`out/quickstart/report.json` → `quickstart`).
        let label = f.parent().and_then(|p| p.file_name()).map_or_else(
            || report.pipeline.clone(),
            |n| n.to_string_lossy().into_owned(),
        );
        reports.push((label, report));
    }
    if json {
        let all: Vec<&RunReport> = reports.iter().map(|(_, r)| r).collect();
        out!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    render::print_compare(&reports);
    Ok(())
}

/// What `espalier eval` was asked to measure (the protocol's defaults unless changed).
#[derive(Args)]
struct EvalArgs {
    /// Text file for perplexity (default: the shipped data/eval.txt, built in).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens per forward pass (default: 1024, fewer when the model was trained on fewer positions or the text is shorter).
    #[arg(long)]
    window: Option<usize>,
    /// Tokens between window starts (default: the window, i.e. no overlap).
    #[arg(long)]
    stride: Option<usize>,
    /// Score at most this many tokens from the start of the text (0 = all of it).
    #[arg(long, default_value_t = espalier::evaluate::DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Prompt tokens for the latency measurement (taken from the start of the text).
    #[arg(long, default_value_t = espalier::evaluate::DEFAULT_PROMPT_TOKENS)]
    prompt_tokens: usize,
    /// Tokens generated for the latency measurement (0 = skip latency).
    #[arg(long, default_value_t = espalier::evaluate::DEFAULT_NEW_TOKENS)]
    new_tokens: usize,
    /// Weight storage of the linears [default: for a pruned export, the storage its run
    /// evaluated it in, from its report.json, so the figures are the run's pruned column; else
    /// f32].
    #[arg(long, value_enum)]
    storage: Option<StorageArg>,
}

impl EvalArgs {
    /// The protocol's defaults ([`EvalSpec::default`]) with what the command line changed.
    fn spec(self) -> Result<EvalSpec> {
        if let Some(t) = &self.text {
            anyhow::ensure!(
                t.is_file(),
                "--text {} is not a readable file (leave --text out to use the shipped data/eval.txt)",
                t.display()
            );
        }
        anyhow::ensure!(
            self.max_tokens != 1,
            "--max-tokens must be at least 2 (or 0 for the whole text)"
        );
        anyhow::ensure!(
            self.new_tokens != 1 && (self.new_tokens == 0 || self.prompt_tokens > 0),
            "latency needs --new-tokens >= 2 and --prompt-tokens >= 1 (or --new-tokens 0 to skip it)"
        );
        Ok(EvalSpec {
            text: self.text.map_or(EvalText::Shipped, EvalText::File),
            window: self.window,
            stride: self.stride,
            max_tokens: (self.max_tokens > 0).then_some(self.max_tokens),
            latency: (self.new_tokens > 0).then_some((self.prompt_tokens, self.new_tokens)),
            ..EvalSpec::default()
        })
    }
}

fn cmd_eval(model_ref: &str, args: EvalArgs, dense: bool, json: bool) -> Result<()> {
    let storage_arg = args.storage;
    let spec = args.spec()?;
    let model_ref =
        &espalier::fetch::resolve(model_ref, &models_dir(), &mut |m| err!("espalier: {m}"))?;
    // A pruned export (dense weights with zeros, and the masks it was pruned with) runs on the
    // kernels the run's own pruned evaluation planned, so the two report the same figures; it
    // is packed layer by layer as it loads. A packed one is already on them.
    let (model, storage) = espalier::sparse::load_to_run(
        model_ref,
        storage_arg.map(espalier::sparse::Storage::from),
        !dense,
    )
    .map_err(|e| {
        let masked = !dense
            && std::path::Path::new(model_ref)
                .join("masks.safetensors")
                .is_file();
        let hint = if masked {
            " (or pass --dense to ignore the masks)"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    let spec = EvalSpec { storage, ..spec };
    let which = if model.is_packed() { "pruned" } else { "dense" };
    // A dense model in rounded storage has every linear packed dense in it.
    let no_masks = std::collections::BTreeMap::new();
    let pack_dense =
        (!model.is_packed() && spec.storage != espalier::sparse::Storage::F32).then_some(&no_masks);
    let mut observer = Bars::new()?;
    let result = espalier::app::evaluate_model_alone(
        model,
        pack_dense,
        &spec,
        which,
        &mut observer,
        &CancelToken::new(),
    );
    observer.finish();
    let e = result?;
    if json {
        out!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    render::print_evaluation(model_ref, &e);
    Ok(())
}

fn cmd_import(gguf: &std::path::Path, out: &std::path::Path) -> Result<()> {
    // A spinner until the file says how many tensors it holds: no bar before its length.
    let bars = Bars::new()?;
    let bar = bars.bar.clone();
    bar.set_message(format!("reading {}", gguf.display()));
    let summary = espalier_engine::gguf::import(gguf, out, &mut |p| match p {
        espalier_engine::gguf::ImportProgress::Opened { tensors, .. } => {
            bars.count(0, tensors as u64)
        }
        espalier_engine::gguf::ImportProgress::Tensor { hf_name, index, .. } => {
            bar.set_position(index as u64);
            bar.set_message(hf_name.to_string());
        }
        espalier_engine::gguf::ImportProgress::Wrote { file } => {
            bar.set_message(format!("wrote {file}"))
        }
    });
    bar.finish_and_clear();
    let s = summary?;
    out!(
        "imported {} ({}) into {}: {} tensors, {} parameters, vocab {}, types {}{}",
        safe(s.name.as_deref().unwrap_or("model")),
        safe(&s.architecture),
        s.out_dir.display(),
        s.tensors,
        s.parameters,
        s.vocab_size,
        safe(&format!("{:?}", s.tensor_types)),
        if s.tie_word_embeddings {
            ", tied LM head"
        } else {
            ""
        }
    );
    out!("files: {}", safe(&s.files.join(", ")));
    Ok(())
}

fn show_value(v: &ParamValue) -> String {
    match v {
        ParamValue::Boolean(b) => b.to_string(),
        ParamValue::Integer(i) => i.to_string(),
        ParamValue::Float(f) => f.to_string(),
        ParamValue::Text(s) => format!("\"{}\"", display_safe::line(s, display_safe::NAME_MAX)),
        ParamValue::Integers(v) => format!("{v:?}"),
        ParamValue::Floats(v) => format!("{v:?}"),
    }
}

fn cmd_plugins_list(json: bool, dirs: &PluginDirs) -> Result<()> {
    let app = start_app(dirs)?;
    let registry = app.registry();
    if json {
        let all: Vec<_> = registry
            .iter()
            .map(|p| PluginSummary::of(p, &registry))
            .collect();
        out!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let mut t = render::table(vec![
        "name", "version", "wit", "produces", "origin", "size", "sha256", "signer",
    ]);
    for p in registry.iter() {
        t.add_row(vec![
            safe(&p.info.name),
            safe(&p.info.version),
            p.compiled.wit.to_string(),
            produces_name(p.info.produces).to_string(),
            if registry.shadows_builtin(&p.info.name) {
                format!("{} (shadows the built-in)", origin_text(&p.origin))
            } else {
                origin_text(&p.origin)
            },
            format!("{:.1} KB", p.size as f64 / 1024.0),
            p.compiled.sha256[..12].to_string(),
            p.signer.to_string(),
        ]);
    }
    render::drop_when_narrow(&mut t, &[2, 5, 7]);
    out!("{t}");
    Ok(())
}

/// Compiles and describes a plugin file with no folder plugins (for sign and verify).
fn describe_file(file: &std::path::Path) -> Result<espalier::plugin::Plugin> {
    let runtime =
        espalier::plugin::Runtime::new().map_err(|e| AppError::Runtime(format!("{e:#}")))?;
    Ok(load_file(&runtime, file)?)
}

/// `espalier plugins sign`.
fn cmd_plugins_sign(file: &std::path::Path, key: &std::path::Path, force: bool) -> Result<()> {
    use espalier::plugin::signing;
    let secret = signing::read_secret_key(key)?;
    let plugin = describe_file(file)?;
    let sig = signing::sign(
        &secret,
        &plugin.info.name,
        &plugin.info.version,
        &plugin.compiled.sha256,
    );
    let path = signing::signature_path(file);
    anyhow::ensure!(
        force || !path.exists(),
        "{} exists; pass --force to replace it",
        path.display()
    );
    espalier::atomic::write_atomic(&path, sig.to_text().as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    out!(
        "signed {} ({} {}, sha256 {}) with key {}: {}",
        file.display(),
        safe(&plugin.info.name),
        safe(&plugin.info.version),
        plugin.compiled.sha256,
        sig.key_id,
        path.display()
    );
    Ok(())
}

/// `espalier plugins verify`.
fn cmd_plugins_verify(file: &std::path::Path, trust: Vec<PathBuf>) -> Result<()> {
    use espalier::plugin::signing;
    let dirs = PluginDirs {
        trust,
        require_signatures: false,
        ..PluginDirs::default()
    };
    let mut trust = dirs.trust()?;
    // With keys to trust, verifying means "signed by one of them"; without, "signed at all".
    trust.require = !trust.keys.is_empty();
    let signature = signing::read_signature_beside(file)?;
    let Some(sig) = &signature else {
        anyhow::bail!(
            "{}: not signed (no {} beside it; sign it with `espalier plugins sign`)",
            file.display(),
            signing::signature_path(file).display()
        );
    };
    let refused = |message: String| {
        AppError::Plugin(espalier::plugin::PluginError::Refused {
            plugin: file.display().to_string(),
            message,
        })
    };
    // The digest first: a changed component is named as changed, not as one that does not
    // compile.
    let bytes = espalier_engine::files::read(file, espalier_engine::files::PLUGIN_LIMIT)
        .with_context(|| format!("cannot read {}", file.display()))?;
    signing::check_digest(sig, &espalier::plugin::runtime::sha256_hex(&bytes)).map_err(refused)?;
    let plugin = describe_file(file)?;
    let signer = trust
        .check(
            &plugin.info.name,
            &plugin.info.version,
            &plugin.compiled.sha256,
            signature.as_deref(),
        )
        .map_err(refused)?;
    out!(
        "{}: {} {} (sha256 {}): signed by {signer}",
        file.display(),
        safe(&plugin.info.name),
        safe(&plugin.info.version),
        plugin.compiled.sha256
    );
    Ok(())
}

/// `espalier plugins push`.
fn cmd_plugins_push(file: &std::path::Path, reference: &str) -> Result<()> {
    use espalier::plugin::{oci, signing};
    let bytes = espalier_engine::files::read(file, espalier_engine::files::PLUGIN_LIMIT)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let runtime =
        espalier::plugin::Runtime::new().map_err(|e| AppError::Runtime(format!("{e:#}")))?;
    let label = file.display().to_string();
    let plugin = espalier::plugin::registry::load_bytes(
        &runtime,
        &label,
        &bytes,
        espalier::plugin::Origin::File(file.to_path_buf()),
    )?;
    // A signature that does not verify for this build is refused here, not at every pull.
    let signature = signing::read_signature_beside(file)?;
    let signer = espalier::plugin::signing::Trust::default()
        .check(
            &plugin.info.name,
            &plugin.info.version,
            &plugin.compiled.sha256,
            signature.as_deref(),
        )
        .map_err(|message| {
            AppError::Plugin(espalier::plugin::PluginError::Refused {
                plugin: label.clone(),
                message,
            })
        })?;
    let (imports, exports) = runtime.interfaces(&plugin.compiled);
    let pushed = oci::push(
        reference,
        &oci::PushRequest {
            wasm: &bytes,
            signature: signature.as_deref(),
            name: &plugin.info.name,
            version: &plugin.info.version,
            interfaces: oci::ComponentInterfaces {
                exports,
                imports,
                target: None,
            },
        },
    )?;
    let signer = match signer {
        espalier::plugin::signing::Signer::Signed { key_id, .. } => {
            format!("signed by key {key_id}")
        }
        other => other.to_string(),
    };
    out!(
        "pushed {} {} (sha256 {}, {signer}) to {reference}",
        safe(&plugin.info.name),
        safe(&plugin.info.version),
        plugin.compiled.sha256
    );
    out!("manifest digest: {}", pushed.manifest_digest);
    out!("pinned reference: {}", pushed.pinned);
    Ok(())
}

/// `espalier plugins pull`.
fn cmd_plugins_pull(
    reference: &str,
    dir: &std::path::Path,
    trust: Vec<PathBuf>,
    require_signatures: bool,
) -> Result<()> {
    use espalier::plugin::{oci, registry, signing};
    let trust = PluginDirs {
        trust,
        require_signatures,
        ..PluginDirs::default()
    }
    .trust()?;
    let pulled = oci::pull(reference)?;
    let runtime =
        espalier::plugin::Runtime::new().map_err(|e| AppError::Runtime(format!("{e:#}")))?;
    let plugin = registry::load_bytes(
        &runtime,
        reference,
        &pulled.wasm,
        espalier::plugin::Origin::File(dir.to_path_buf()),
    )?;
    let plugin = registry::admit(plugin, pulled.signature.as_deref(), &trust, reference)?;
    let name = &plugin.info.name;
    anyhow::ensure!(
        espalier_server::daemon::safe_file_stem(name),
        "the plugin's name `{}` cannot be a file name; nothing was written",
        safe(name)
    );
    let path = dir.join(format!("{name}.wasm"));
    let sig_path = signing::signature_path(&path);
    // Never replace a file that is not this very plugin (or its signature).
    let differs = |p: &std::path::Path, want: Option<&[u8]>| -> Result<bool> {
        match std::fs::read(p) {
            Ok(have) => Ok(want != Some(have.as_slice())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", p.display())),
        }
    };
    anyhow::ensure!(
        !differs(&path, Some(&pulled.wasm))?,
        "{} exists and is not this plugin (sha256 {}); nothing was written: remove it or pull into another --dir",
        path.display(),
        plugin.compiled.sha256
    );
    anyhow::ensure!(
        !differs(&sig_path, pulled.signature.as_deref())?,
        "{} exists and is not this plugin's signature; nothing was written: remove it or pull into another --dir",
        sig_path.display()
    );
    // The signature first: a watched folder checks the component against it on arrival.
    if let Some(sig) = &pulled.signature {
        espalier::atomic::write_atomic(&sig_path, sig)
            .with_context(|| format!("cannot write {}", sig_path.display()))?;
    }
    espalier::atomic::write_atomic(&path, &pulled.wasm)
        .with_context(|| format!("cannot write {}", path.display()))?;
    out!(
        "pulled {} {} (sha256 {}, {}) from {}",
        safe(name),
        safe(&plugin.info.version),
        plugin.compiled.sha256,
        plugin.signer,
        pulled.pinned
    );
    out!("wrote {}", path.display());
    Ok(())
}

fn cmd_plugins_inspect(name: &str, json: bool, dirs: &PluginDirs) -> Result<()> {
    let app = start_app(dirs)?;
    let registry = app.registry();
    let plugin = if name.ends_with(".wasm") || std::path::Path::new(name).is_file() {
        espalier::plugin::registry::load_file_trusted(
            &app.runtime,
            std::path::Path::new(name),
            &Sandbox::default(),
            registry.trust(),
        )?
    } else {
        registry.get(name).cloned().with_context(|| {
            format!(
                "no plugin named `{name}`; available: {} (or pass a .wasm path)",
                registry.names().join(", ")
            )
        })?
    };
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&PluginSummary::of(&plugin, &registry))?
        );
        return Ok(());
    }
    let i = &plugin.info;
    out!("{} {}", safe(&i.name), safe(&i.version));
    out!("{}", display_safe::message(&i.description, ""));
    out!(
        "produces: {}   needs: {}   sha256: {}   size: {:.1} KB   signer: {}",
        produces_name(i.produces),
        i.needs
            .iter()
            .map(|n| need_name(*n).to_string())
            .collect::<Vec<_>>()
            .join(", "),
        plugin.compiled.sha256,
        plugin.size as f64 / 1024.0,
        plugin.signer
    );
    let mut t = render::table(vec!["parameter", "type", "default", "doc"]);
    for p in &i.params {
        t.add_row(vec![
            safe(&p.name),
            kind_name(p.kind).to_string(),
            p.default.as_ref().map_or("(required)".into(), show_value),
            display_safe::message(&p.doc, ""),
        ]);
    }
    out!("{t}");
    Ok(())
}

fn cmd_model_layers(model: &str, json: bool) -> Result<()> {
    let model = espalier::fetch::resolve(model, &models_dir(), &mut |m| err!("espalier: {m}"))?;
    let m = espalier_engine::load_model(&model)?;
    let c = &m.config;
    if json {
        let layers: Vec<serde_json::Value> = m
            .layers()
            .iter()
            .map(|l| {
                serde_json::json!({
                    "name": l.name,
                    "role": l.role.as_str(),
                    "block": l.block,
                    "shape": l.shape,
                })
            })
            .collect();
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model,
                "architecture": c.model_type,
                "blocks": c.num_layers,
                "hidden_size": c.hidden_size,
                "heads": c.num_heads,
                "kv_heads": c.num_kv_heads,
                "head_size": c.head_dim,
                "layers": layers,
            }))?
        );
        return Ok(());
    }
    out!(
        "{}: {} blocks, hidden size {}, {} attention heads, {} KV heads, head size {}",
        safe(&model),
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim
    );
    let mut t = render::table(vec!["name", "role", "block", "shape"]);
    for l in m.layers() {
        t.add_row(vec![
            safe(&l.name),
            l.role.as_str().to_string(),
            l.block.map_or("-".into(), |b| b.to_string()),
            format!("{:?}", l.shape),
        ]);
    }
    out!("{t}");
    Ok(())
}

fn cmd_bench_plugins(model_ref: &str, repeat: usize, json: bool) -> Result<()> {
    let app = start_app(&PluginDirs::default())?;
    let model_ref =
        &espalier::fetch::resolve(model_ref, &models_dir(), &mut |m| err!("espalier: {m}"))?;
    err!("loading {model_ref} ...");
    let model = espalier_engine::load_model(model_ref)?;
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let results = espalier::bench::bench_plugins(&app, model_ref, &model, repeat, &mut |m| {
        bar.set_message(m.to_string())
    })?;
    bar.finish_and_clear();
    if json {
        out!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(());
    }
    out!(
        "plugin overhead on {model_ref} ({} parameters), median of {repeat}; target: sandbox share <= 10%",
        model.num_parameters()
    );
    let mut t = render::table(vec![
        "case",
        "layers",
        "weights",
        "stage",
        "guest + boundary",
        "host kernels",
        "validate + apply",
        "sandbox share",
    ]);
    for r in &results {
        t.add_row(vec![
            Cell::new(&r.label),
            Cell::new(r.targets).set_alignment(CellAlignment::Right),
            Cell::new(r.target_weights).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.3} s", r.stage_seconds)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.1} ms", r.guest_seconds * 1e3))
                .set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.3} s", r.host_kernel_seconds))
                .set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.3} s", r.apply_seconds)).set_alignment(CellAlignment::Right),
            Cell::new(format!(
                "{} {}",
                pct(r.guest_share),
                if r.guest_share <= 0.10 { "✓" } else { "✗" }
            ))
            .set_alignment(CellAlignment::Right),
        ]);
    }
    render::drop_when_narrow(&mut t, &[2, 6]);
    out!("{t}");
    if let Some(m) = results.iter().find(|r| r.label.starts_with("magnitude")) {
        out!(
            "magnitude 50% pass: {:.2} s (target <= 3 s) {}",
            m.stage_seconds,
            if m.stage_seconds <= 3.0 { "✓" } else { "✗" }
        );
    }
    Ok(())
}

fn cmd_bench_kernels(quick: bool, json: bool) -> Result<()> {
    let opts = if quick {
        espalier_kernels::bench::KernelBenchOptions::quick()
    } else {
        espalier_kernels::bench::KernelBenchOptions::default()
    };
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let report =
        espalier_kernels::bench::run_kernel_bench(&opts, &mut |m| bar.set_message(m.to_string()));
    bar.finish_and_clear();
    let report = report?;
    if json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        render::print_kernel_bench(&report, &opts.shapes, quick);
    }
    Ok(())
}

fn cmd_bench_serve(
    model: &str,
    pruned: Vec<PathBuf>,
    streams: Vec<usize>,
    max_tokens: usize,
    seconds: u64,
    json: bool,
) -> Result<()> {
    let dense = espalier::fetch::resolve(model, &models_dir(), &mut |m| err!("{m}"))?;
    let served = |label: &str, reference: &str, storage, baseline: &str| bench_serve::ServedModel {
        label: label.to_string(),
        reference: reference.to_string(),
        storage,
        baseline: baseline.to_string(),
    };
    let mut models = vec![served("dense", &dense, None, "dense")];
    // Each export is compared with the dense model in the storage the daemon serves it in, so
    // the dense model is served once more in each such storage other than f32.
    let mut exports = Vec::new();
    for p in pruned {
        let storage = espalier::sparse::served_storage(&p)
            .with_context(|| format!("reading {}", p.display()))?;
        if storage != espalier::sparse::Storage::F32 && !exports.iter().any(|(_, s)| *s == storage)
        {
            let label = format!("dense-{}", storage.name());
            models.push(served(&label, &dense, Some(storage), &label));
        }
        exports.push((p, storage));
    }
    for (p, storage) in exports {
        // Each export is labelled by its folder name (so several can be told apart), made
        // unique when two folders share a name.
        let base = p.file_name().map_or_else(
            || "pruned".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut label = base.clone();
        let mut k = 2;
        while models.iter().any(|m| m.label == label) {
            label = format!("{base}-{k}");
            k += 1;
        }
        let baseline = match storage {
            espalier::sparse::Storage::F32 => "dense".to_string(),
            s => format!("dense-{}", s.name()),
        };
        models.push(served(&label, &p.display().to_string(), None, &baseline));
    }
    let opts = bench_serve::Options {
        models,
        streams,
        max_tokens,
        seconds,
    };
    let b = bench_serve::run(&opts, &mut |m| err!("{m} ..."))?;
    if json {
        out!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let mut t = render::table(vec![
        "model",
        "streams",
        "prompt",
        "tokens",
        "TTFT p50",
        "TTFT p99",
        "tok/s per stream",
        "tok/s aggregate",
        "vs 1 stream",
        "decode tok/s aggregate",
        "vs 1 stream",
        "vs dense",
    ]);
    for r in &b.rounds {
        t.add_row(vec![
            r.model.clone(),
            r.streams.to_string(),
            r.prompt_tokens.to_string(),
            r.tokens.to_string(),
            format!("{:.0} ms", r.ttft_p50_ms),
            format!("{:.0} ms", r.ttft_p99_ms),
            format!("{:.1}", r.stream_tokens_per_s),
            format!("{:.1}", r.aggregate_tokens_per_s),
            r.vs_single.map_or("-".into(), |v| format!("{v:.2}x")),
            format!("{:.1}", r.decode_aggregate_tokens_per_s),
            r.decode_vs_single
                .map_or("-".into(), |v| format!("{v:.2}x")),
            r.vs_dense
                .map_or("-".into(), |v| format!("{v:.2}x ({})", r.baseline)),
        ]);
    }
    out!("{t}");
    for (m, n) in &b.skipped {
        out!("skipped for the time limit: {m} with {n} streams");
    }
    Ok(())
}

/// The files an export wrote (what a dense-with-zeros export and a packed one hold differs),
/// comma-separated, its bookkeeping file left out.
fn exported_files(dir: &std::path::Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(", ")
}

fn espalier_decode_bench(
    model_ref: &str,
    pipeline: Option<&std::path::Path>,
    opts: espalier::bench::DecodeBenchOptions,
    json: bool,
) -> Result<()> {
    let app = start_app(&PluginDirs::default())?;
    let pipe = pipeline
        .map(espalier::pipeline::Pipeline::load)
        .transpose()?;
    // The prompt comes from the shipped evaluation text when run from the repository.
    let text = std::fs::read_to_string("data/eval.txt").ok();
    let new_tokens = opts.new_tokens;
    let b =
        espalier::bench::bench_decode(&app, model_ref, pipe, text.as_deref(), opts, &mut |m| {
            err!("{m} ...")
        })?;
    let (dense, pruned, pruned_peak, formats) = (
        &b.dense,
        &b.pruned,
        b.pruned_peak_rss_bytes,
        &b.pruned_formats,
    );
    if json {
        out!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let speedup = b.decode_speedup;
    let dense_head = format!("dense {}", b.dense_storage);
    let pruned_head = format!("pruned {}", b.storage);
    let mut t = render::table(vec![
        "decode, batch 1",
        dense_head.as_str(),
        pruned_head.as_str(),
        "ratio",
    ]);
    t.add_row(vec![
        "ms / token".to_string(),
        format!("{:.2}", dense.ms_per_token),
        format!("{:.2}", pruned.ms_per_token),
        format!("{speedup:.2}x faster"),
    ]);
    t.add_row(vec![
        "decode tokens/s".to_string(),
        format!("{:.1}", dense.decode_tokens_per_s),
        format!("{:.1}", pruned.decode_tokens_per_s),
        format!(
            "{:.2}x",
            pruned.decode_tokens_per_s / dense.decode_tokens_per_s
        ),
    ]);
    t.add_row(vec![
        "prefill tokens/s".to_string(),
        format!("{:.1}", dense.prefill_tokens_per_s),
        format!("{:.1}", pruned.prefill_tokens_per_s),
        format!(
            "{:.2}x",
            pruned.prefill_tokens_per_s / dense.prefill_tokens_per_s
        ),
    ]);
    t.add_row(vec![
        "peak RSS during decode".to_string(),
        mib(dense.peak_rss_bytes),
        mib(pruned_peak),
        match (dense.peak_rss_bytes, pruned_peak) {
            (Some(d), Some(p)) if p > 0 => format!("{:.2}x smaller", d as f64 / p as f64),
            _ => "-".into(),
        },
    ]);
    t.add_row(vec![
        "weights held by the forward pass".to_string(),
        mib(Some(b.weight_bytes.dense as u64)),
        mib(Some(b.weight_bytes.pruned as u64)),
        format!(
            "{:.2}x smaller",
            b.weight_bytes.dense as f64 / b.weight_bytes.pruned.max(1) as f64
        ),
    ]);
    t.add_row(vec![
        "weights read / decode step".to_string(),
        mib(Some(dense.weight_bytes_per_token as u64)),
        mib(Some(pruned.weight_bytes_per_token as u64)),
        format!(
            "{:.2}x fewer",
            dense.weight_bytes_per_token as f64 / pruned.weight_bytes_per_token.max(1) as f64
        ),
    ]);
    let bw = b.memory_bandwidth_gbps;
    t.add_row(vec![
        "weight bandwidth reached".to_string(),
        format!(
            "{:.1} GB/s ({:.0}%)",
            dense.weight_gb_per_s,
            100.0 * dense.weight_gb_per_s / bw
        ),
        format!(
            "{:.1} GB/s ({:.0}%)",
            pruned.weight_gb_per_s,
            100.0 * pruned.weight_gb_per_s / bw
        ),
        format!("probe: {bw:.1} GB/s"),
    ]);
    out!("{t}");
    out!(
        "bandwidth reached = weights read per step / ms per token, as a share of the read \
         bandwidth probed in this run (its ceiling)"
    );
    out!(
        "peak RSS is process-wide: the pruned row still counts allocator pages the dense model and \
         the pruning run left behind; the weights row counts the bytes each forward pass holds"
    );
    let formats = if formats.is_empty() {
        "none (all dense)".to_string()
    } else {
        formats
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out!(
        "dense: {}; pruned: {} by {}",
        b.dense_model,
        b.model,
        b.pipeline
    );
    out!("pruned linear formats: {formats}");
    if b.rounds.len() > 1 {
        let rounds = b
            .rounds
            .iter()
            .map(|r| format!("{:.1} / {:.1}", r.dense, r.pruned))
            .collect::<Vec<_>>()
            .join(", ");
        out!(
            "decode tokens/s per round, dense / pruned in turn: {rounds}; the table shows each \
             model's median round"
        );
    }
    out!(
        "same prompt ({} tokens), {new_tokens} new tokens, greedy; same generated ids: {}",
        b.prompt_tokens,
        b.same_generated_ids
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_serve(
    config: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    state: Option<PathBuf>,
    concurrency: Option<usize>,
    token_file: Option<PathBuf>,
    max_upload_mb: Option<usize>,
    on_shutdown: Option<espalier_server::config::ShutdownMode>,
) -> Result<()> {
    use espalier_server::config::ServeConfig;
    let mut c = match &config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    if let Some(l) = listen {
        c.listen = l;
    }
    if let Some(s) = state {
        c.state_dir = s;
    }
    if let Some(n) = concurrency {
        c.concurrency = n;
    }
    if let Some(f) = token_file {
        let t = espalier_engine::files::read_to_string(&f, 4096)
            .with_context(|| format!("--token-file {}", f.display()))?;
        c.token = Some(t.trim().to_string());
    } else if let Ok(t) = std::env::var("ESPALIER_TOKEN")
        && !t.is_empty()
    {
        c.token = Some(t);
    }
    if let Some(mb) = max_upload_mb {
        c.max_upload_bytes = mb
            .checked_mul(1 << 20)
            .context("--max-upload-mb is too large")?;
    }
    if let Some(m) = on_shutdown {
        c.on_shutdown = m;
    }
    c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let state_dir = c.state_dir.clone();
    espalier_server::serve::serve(c, |addr| {
        out!(
            "espalier serving http://{addr} (state folder {}; API at /v1, OpenAPI at /openapi.json)",
            state_dir.display()
        );
    })?;
    Ok(())
}

fn cmd_bench_api(
    clients: usize,
    seconds: u64,
    pipelines: Vec<PathBuf>,
    model: String,
    json: bool,
) -> Result<()> {
    let opts = bench_api::Options {
        clients,
        seconds,
        pipelines,
        model,
        models_dir: models_dir(),
    };
    let b = bench_api::run(&opts, &mut |m| err!("{m} ..."))?;
    if json {
        out!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(());
    }
    let mut t = render::table(vec!["daemon under load", "value", "goal"]);
    let rows: Vec<(String, String, String)> = vec![
        (
            "clients x seconds".into(),
            format!("{} x {:.0}", b.clients, b.seconds),
            String::new(),
        ),
        (
            "requests served".into(),
            b.requests.to_string(),
            String::new(),
        ),
        (
            "unexpected failures".into(),
            b.unexpected_failures.to_string(),
            "0".into(),
        ),
        (
            "read p50".into(),
            format!("{:.1} ms", b.read_p50_ms),
            String::new(),
        ),
        (
            "read p99".into(),
            format!("{:.1} ms", b.read_p99_ms),
            "<= 100 ms".into(),
        ),
        (
            "read max".into(),
            format!("{:.1} ms", b.read_max_ms),
            String::new(),
        ),
        (
            "events streamed".into(),
            b.events_received.to_string(),
            String::new(),
        ),
        (
            "plugin files replaced".into(),
            b.plugin_replacements.to_string(),
            String::new(),
        ),
        (
            "daemon peak RSS".into(),
            mib(b.daemon_peak_rss_bytes),
            String::new(),
        ),
    ];
    for (k, v, g) in rows {
        t.add_row(vec![k, v, g]);
    }
    out!("{t}");
    for r in &b.runs {
        out!(
            "run {} ({}): {} in {} s, pruned perplexity {}, same result as the CLI: {}",
            r["id"],
            r["pipeline"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.1}")),
            r["perplexity_pruned"]
                .as_f64()
                .map_or("-".into(), |p| format!("{p:.3}")),
            r["equals_cli"]
        );
    }
    Ok(())
}
