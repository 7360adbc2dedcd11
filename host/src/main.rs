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
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Cell, CellAlignment, Table, presets::UTF8_FULL_CONDENSED};
use espalier::app::{App, RunOverrides};
use espalier::display_safe::{self, name as safe};
use espalier::evaluate::{Comparison, EvalSpec, Evaluation};
use espalier::plan::PlannedStage;
use espalier::plugin::bindings::{ParamKind, ParamValue};
use espalier::plugin::registry::load_file;
use espalier::plugin::{Origin, Plugin};
use espalier::report::{RunReport, StageReport};
use espalier::run::RunObserver;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "espalier",
    version,
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
}

impl PluginDirs {
    fn all(&self) -> Vec<PathBuf> {
        let mut dirs = self.dirs.clone();
        if let Some(env) = std::env::var_os("ESPALIER_PLUGIN_DIR") {
            dirs.extend(std::env::split_paths(&env));
        }
        dirs
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline file: prune, report, export.
    Run {
        /// The pipeline (TOML), e.g. pipelines/quickstart.toml.
        pipeline: PathBuf,
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
    /// Inspect models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Evaluate a model: perplexity on a text, ms per token, tokens/s, peak memory.
    Eval {
        /// A model directory, builtin:NAME, or fetch:smollm2-135m-instruct (downloaded on first use).
        model: String,
        /// Text file for perplexity (default: the shipped evaluation text, data/eval.txt).
        #[arg(long)]
        text: Option<PathBuf>,
        /// Tokens per forward pass.
        #[arg(long, default_value_t = espalier_engine::eval::DEFAULT_WINDOW)]
        window: usize,
        /// Tokens between window starts (default: the window, i.e. no overlap).
        #[arg(long)]
        stride: Option<usize>,
        /// Score at most this many tokens of the text.
        #[arg(long)]
        max_tokens: Option<usize>,
        /// Prompt tokens for the latency measurement.
        #[arg(long, default_value_t = 32)]
        prompt_tokens: usize,
        /// Tokens generated for the latency measurement (0 = skip latency).
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Print JSON.
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
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum StorageArg {
    F32,
    Bf16,
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
enum ModelCommand {
    /// List a model's weights with their roles and shapes (the names `targets` globs match).
    Layers {
        /// A model directory or builtin:NAME.
        model: String,
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
        /// The pipeline whose stages prune the model.
        #[arg(long)]
        pipeline: PathBuf,
        /// Prompt tokens (from data/eval.txt, or a fixed prompt when it is absent).
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens to generate.
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        /// Weight storage of the pruned model's linears.
        #[arg(long, value_enum, default_value = "f32")]
        storage: StorageArg,
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
    ($($arg:tt)*) => { write_stdout(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
macro_rules! err {
    ($($arg:tt)*) => { write_stderr(format_args!($($arg)*)) };
}

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ESPALIER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    install_signal_cleanup();
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err!(
                "error: {}",
                display_safe::terminal(&error_chain(&e), ERROR_MAX)
            );
            ExitCode::FAILURE
        }
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
            pipeline,
            model,
            out,
            no_export,
            force,
            json,
            layers,
            plugins,
        } => cmd_run(
            pipeline,
            RunOverrides {
                model,
                export_dir: out,
                no_export,
                force,
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
        },
        Command::Model { command } => match command {
            ModelCommand::Layers { model } => cmd_model_layers(&model),
        },
        Command::Eval {
            model,
            text,
            window,
            stride,
            max_tokens,
            prompt_tokens,
            new_tokens,
            json,
        } => cmd_eval(
            &model,
            text,
            window,
            stride,
            max_tokens,
            prompt_tokens,
            new_tokens,
            json,
        ),
        Command::Import { gguf, out } => cmd_import(&gguf, &out),
        Command::Bench { command } => match command {
            BenchCommand::Plugins {
                model,
                repeat,
                json,
            } => cmd_bench_plugins(&model, repeat, json),
            BenchCommand::Kernels { quick, json } => cmd_bench_kernels(quick, json),
            BenchCommand::Decode {
                model,
                pipeline,
                prompt_tokens,
                new_tokens,
                storage,
                json,
            } => espalier_decode_bench(&model, &pipeline, prompt_tokens, new_tokens, storage, json),
        },
    }
}

fn start_app(dirs: &PluginDirs) -> Result<App> {
    let app = App::new(&dirs.all())?;
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

/// Draws one bar over the stages, with a line per finished stage.
struct Bars {
    bar: ProgressBar,
}

impl RunObserver for Bars {
    fn stage_started(&mut self, index: usize, total: usize, stage: &PlannedStage) {
        if index == 0 {
            self.bar.set_length(total as u64);
        }
        self.bar.set_message(format!(
            "stage {}/{total} `{}` ({}, {} layers)",
            index + 1,
            safe(&stage.spec.name),
            safe(&stage.plugin.info.name),
            stage.targets.len()
        ));
    }

    fn evaluation_started(&mut self, which: &str) {
        self.bar
            .set_message(format!("evaluating the {which} model"));
    }

    fn evaluation_progress(&mut self, which: &str, p: &espalier_engine::eval::PerplexityProgress) {
        self.bar.set_message(format!(
            "evaluating the {which} model: perplexity window {}/{}",
            p.windows_done, p.windows_total
        ));
    }

    fn stage_finished(&mut self, _index: usize, report: &StageReport) {
        self.bar.inc(1);
        self.bar.println(format!(
            "  ✓ {} ({}): density {:.4} in {:.2} s",
            safe(&report.name),
            safe(&report.plugin),
            report.density_after,
            report.seconds
        ));
    }
}

fn cmd_run(
    pipeline: PathBuf,
    overrides: RunOverrides,
    json: bool,
    layers: bool,
    dirs: &PluginDirs,
) -> Result<()> {
    // Parsed first: its [sandbox] limits also bind the `describe` of plugin-folder plugins.
    let pipeline = espalier::pipeline::Pipeline::load(&pipeline)?;
    let app = App::with_sandbox(&dirs.all(), &pipeline.sandbox)?;
    warn_skipped(&app);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:24}] {pos}/{len} {msg} {elapsed}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut observer = Bars { bar: bar.clone() };
    let result = app.run_pipeline(pipeline, &overrides, &mut observer);
    bar.finish_and_clear();
    let result = result?;
    if json {
        out!("{}", serde_json::to_string_pretty(&result.report)?);
        return Ok(());
    }
    print_report(&result.report, layers);
    match &result.exported_to {
        Some(dir) => out!(
            "exported to {} (model.safetensors, config.json, masks.safetensors, report.json)",
            dir.display()
        ),
        None => out!("not exported (no [export] section, or --no-export)"),
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

fn print_report(r: &RunReport, layers: bool) {
    out!(
        "pipeline `{}` on {} ({})",
        safe(&r.pipeline),
        safe(&r.model),
        safe(&r.architecture)
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "stage",
        "plugin",
        "version",
        "targets",
        "asked",
        "kept after",
        "time",
        "sandbox share",
        "sha256",
    ]);
    for s in &r.stages {
        t.add_row(vec![
            Cell::new(safe(&s.name)),
            Cell::new(safe(&s.plugin)),
            Cell::new(safe(&s.plugin_version)),
            Cell::new(s.targets).set_alignment(CellAlignment::Right),
            Cell::new(s.requested_density.map_or("-".into(), pct))
                .set_alignment(CellAlignment::Right),
            Cell::new(pct(s.density_after)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.3} s", s.seconds)).set_alignment(CellAlignment::Right),
            Cell::new(pct(s.guest_share)).set_alignment(CellAlignment::Right),
            Cell::new(s.plugin_sha256.get(..12).unwrap_or(&s.plugin_sha256)),
        ]);
    }
    out!("{t}");
    if layers {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        t.set_header(vec!["layer", "role", "shape", "kept", "structure"]);
        for l in &r.layers {
            t.add_row(vec![
                Cell::new(safe(&l.name)),
                Cell::new(l.role.as_str()),
                Cell::new(format!("{:?}", l.shape)),
                Cell::new(pct(l.density)).set_alignment(CellAlignment::Right),
                Cell::new(safe(l.structure.as_deref().unwrap_or("-"))),
            ]);
        }
        out!("{t}");
    }
    let s = &r.summary;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["summary", "value"]);
    t.add_row(vec![
        "pruned layers".to_string(),
        s.pruned_layers.to_string(),
    ]);
    t.add_row(vec![
        "kept in pruned layers".to_string(),
        pct(s.pruned_density),
    ]);
    t.add_row(vec![
        "kept in block linears".to_string(),
        pct(s.block_linear_density),
    ]);
    t.add_row(vec![
        "kept in all 2-D weights".to_string(),
        pct(s.all_weights_density),
    ]);
    t.add_row(vec![
        "parameters (stored / non-zero)".to_string(),
        format!(
            "{} → {} / {}",
            s.parameters_before, s.parameters_after, s.nonzero_parameters_after
        ),
    ]);
    if let Some(h) = &s.heads {
        t.add_row(vec![
            "attention heads (query / kv)".to_string(),
            format!(
                "{}/{} → {}/{}",
                h.heads_before, h.kv_heads_before, h.heads_after, h.kv_heads_after
            ),
        ]);
    }
    t.add_row(vec!["time".to_string(), format!("{:.2} s", r.seconds)]);
    out!("{t}");
    if let Some(c) = &r.evaluation {
        print_comparison(c);
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| {
        format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
    })
}

fn eval_rows(e: &Evaluation) -> Vec<String> {
    let p = e.perplexity.as_ref();
    let l = e.latency.as_ref();
    vec![
        p.map_or("-".into(), |p| format!("{:.3}", p.perplexity)),
        p.map_or("-".into(), |p| {
            format!("{} ({} windows)", p.tokens_scored, p.windows)
        }),
        p.map_or("-".into(), |p| format!("{:.1}", p.tokens_per_second)),
        l.map_or("-".into(), |l| format!("{:.2}", l.ms_per_token)),
        l.map_or("-".into(), |l| format!("{:.1}", l.decode_tokens_per_s)),
        l.map_or("-".into(), |l| format!("{:.1}", l.prefill_tokens_per_s)),
        mib(l
            .and_then(|l| l.peak_rss_bytes)
            .or(p.and_then(|p| p.peak_rss_bytes))),
        e.kernels
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
    ]
}

const EVAL_LABELS: [&str; 8] = [
    "perplexity",
    "tokens scored",
    "eval tokens/s",
    "ms / token (decode)",
    "decode tokens/s",
    "prefill tokens/s",
    "peak RSS (process)",
    "linear kernels",
];

fn print_comparison(c: &Comparison) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["evaluation", "dense", "pruned"]);
    for (i, (d, p)) in eval_rows(&c.dense)
        .into_iter()
        .zip(eval_rows(&c.pruned))
        .enumerate()
    {
        t.add_row(vec![EVAL_LABELS[i].to_string(), d, p]);
    }
    out!("{t}");
}

#[allow(clippy::too_many_arguments)]
fn cmd_eval(
    model_ref: &str,
    text: Option<PathBuf>,
    window: usize,
    stride: Option<usize>,
    max_tokens: Option<usize>,
    prompt_tokens: usize,
    new_tokens: usize,
    json: bool,
) -> Result<()> {
    let text = match text {
        Some(t) => t,
        None => {
            let shipped = PathBuf::from("data/eval.txt");
            anyhow::ensure!(
                shipped.is_file(),
                "no --text given and data/eval.txt is not here; run from the repository root or pass --text FILE"
            );
            shipped
        }
    };
    let model_ref = &espalier::fetch::resolve(model_ref, &mut |m| err!("espalier: {m}"))?;
    let model = espalier_engine::load_model(model_ref)?;
    let spec = EvalSpec {
        text: Some(text),
        options: espalier_engine::eval::PerplexityOptions {
            window,
            stride: stride.unwrap_or(window),
        },
        max_tokens,
        latency: (new_tokens > 0).then_some((prompt_tokens, new_tokens)),
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{bar:24}] {pos}/{len} perplexity windows {elapsed}",
        )
        .context("progress template")?
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let session = espalier_engine::Session::new(&model)?;
    let result = espalier::evaluate::evaluate(&model, &session, &spec, &mut |p| {
        bar.set_length(p.windows_total as u64);
        bar.set_position(p.windows_done as u64);
    });
    bar.finish_and_clear();
    let e = result?;
    if json {
        out!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["evaluation", model_ref]);
    for (i, v) in eval_rows(&e).into_iter().enumerate() {
        t.add_row(vec![EVAL_LABELS[i].to_string(), v]);
    }
    out!("{t}");
    if let Some(p) = &e.perplexity {
        out!(
            "perplexity: window {}, stride {}, {} of {} tokens scored in {:.1} s",
            p.window,
            p.stride,
            p.tokens_scored,
            p.tokens,
            p.seconds
        );
    }
    Ok(())
}

fn cmd_import(gguf: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:24}] {pos}/{len} {msg} {elapsed}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let summary = espalier_engine::gguf::import(gguf, out, &mut |p| match p {
        espalier_engine::gguf::ImportProgress::Opened { tensors, .. } => {
            bar.set_length(tensors as u64)
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

fn kind_str(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Boolean => "bool",
        ParamKind::Integer => "int",
        ParamKind::Float => "float",
        ParamKind::Text => "string",
        ParamKind::Integers => "[int]",
        ParamKind::Floats => "[float]",
    }
}

fn plugin_json(p: &Plugin) -> serde_json::Value {
    serde_json::json!({
        "name": p.info.name,
        "version": p.info.version,
        "description": p.info.description,
        "origin": match &p.origin { Origin::Builtin => "builtin".to_string(), Origin::File(f) => f.display().to_string() },
        "sha256": p.compiled.sha256,
        "wit": p.compiled.wit.to_string(),
        "size_bytes": p.size,
        "produces": produces_name(p.info.produces).to_string(),
        "needs": p.info.needs.iter().map(|n| need_name(*n)).collect::<Vec<_>>(),
        "params": p.info.params.iter().map(|s| serde_json::json!({
            "name": s.name,
            "type": kind_str(s.kind),
            // The full text: JSON escapes control characters itself.
            "default": s.default.as_ref().map(|v| match v {
                ParamValue::Text(t) => format!("{t:?}"),
                other => show_value(other),
            }),
            "doc": s.doc,
        })).collect::<Vec<_>>(),
    })
}

fn cmd_plugins_list(json: bool, dirs: &PluginDirs) -> Result<()> {
    let app = start_app(dirs)?;
    if json {
        let all: Vec<_> = app.registry.iter().map(plugin_json).collect();
        out!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "name", "version", "wit", "produces", "origin", "size", "sha256",
    ]);
    for p in app.registry.iter() {
        t.add_row(vec![
            safe(&p.info.name),
            safe(&p.info.version),
            p.compiled.wit.to_string(),
            produces_name(p.info.produces).to_string(),
            origin_text(&p.origin),
            format!("{:.1} KB", p.size as f64 / 1024.0),
            p.compiled.sha256[..12].to_string(),
        ]);
    }
    out!("{t}");
    Ok(())
}

fn cmd_plugins_inspect(name: &str, json: bool, dirs: &PluginDirs) -> Result<()> {
    let app = start_app(dirs)?;
    let plugin = if name.ends_with(".wasm") || std::path::Path::new(name).is_file() {
        load_file(&app.runtime, std::path::Path::new(name))?
    } else {
        app.registry.get(name).cloned().with_context(|| {
            format!(
                "no plugin named `{name}`; available: {} (or pass a .wasm path)",
                app.registry.names().join(", ")
            )
        })?
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&plugin_json(&plugin))?);
        return Ok(());
    }
    let i = &plugin.info;
    out!("{} {}", safe(&i.name), safe(&i.version));
    out!("{}", display_safe::message(&i.description, ""));
    out!(
        "produces: {}   needs: {}   sha256: {}   size: {:.1} KB",
        produces_name(i.produces),
        i.needs
            .iter()
            .map(|n| need_name(*n).to_string())
            .collect::<Vec<_>>()
            .join(", "),
        plugin.compiled.sha256,
        plugin.size as f64 / 1024.0
    );
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["parameter", "type", "default", "doc"]);
    for p in &i.params {
        t.add_row(vec![
            safe(&p.name),
            kind_str(p.kind).to_string(),
            p.default.as_ref().map_or("(required)".into(), show_value),
            display_safe::message(&p.doc, ""),
        ]);
    }
    out!("{t}");
    Ok(())
}

fn cmd_model_layers(model: &str) -> Result<()> {
    let m = espalier_engine::load_model(model)?;
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["name", "role", "block", "shape"]);
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
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec![
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
        out!("{report}");
    }
    Ok(())
}

/// Resets the process's peak resident set (`VmHWM`) so the next reading covers what follows.
/// Freed heap pages are first handed back to the kernel, or the counter would restart from
/// memory the previous measurement already released.
fn reset_peak_rss() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of glibc's heaps; it takes no
    // pointers and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
    // Linux >= 4.0: writing 5 to clear_refs resets the peak RSS counter.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn espalier_decode_bench(
    model_ref: &str,
    pipeline: &std::path::Path,
    prompt_tokens: usize,
    new_tokens: usize,
    storage: StorageArg,
    json: bool,
) -> Result<()> {
    use espalier_engine::eval::{LatencyReport, latency, peak_rss_bytes};
    let app = start_app(&PluginDirs::default())?;
    let model_ref = espalier::fetch::resolve(model_ref, &mut |m| err!("espalier: {m}"))?;
    let prompt_for = |model: &espalier_engine::Model| -> Result<Vec<u32>> {
        let tok = espalier_engine::Tokenizer::for_model(model)?;
        let text = std::fs::read_to_string("data/eval.txt").unwrap_or_else(|_| {
            "When in the Course of human events, it becomes necessary for one people to dissolve \
             the political bands which have connected them with another. "
                .repeat(8)
        });
        let mut ids = tok.encode(&text)?;
        ids.truncate(prompt_tokens.max(1));
        Ok(ids)
    };

    err!("dense: decoding {new_tokens} tokens after a {prompt_tokens}-token prompt ...");
    let dense: LatencyReport = {
        let model = espalier_engine::load_model(&model_ref)?;
        let prompt = prompt_for(&model)?;
        reset_peak_rss();
        let session = espalier_engine::Session::new(&model)?;
        latency(&session, &prompt, new_tokens)?
    };

    err!("pruned: running {} ...", pipeline.display());
    let overrides = RunOverrides {
        model: Some(model_ref.clone()),
        export_dir: None,
        no_export: true,
        force: false,
    };
    let mut pipe = espalier::pipeline::Pipeline::load(pipeline)?;
    pipe.evaluate = None;
    let result = app.run_pipeline(pipe, &overrides, &mut espalier::run::Quiet)?;
    let prompt = prompt_for(&result.state.model)?;
    let mut session = espalier_engine::Session::new(&result.state.model)?;
    let storage = match storage {
        StorageArg::F32 => espalier::sparse::Storage::F32,
        StorageArg::Bf16 => espalier::sparse::Storage::Bf16,
    };
    let attached = espalier::sparse::attach(
        &mut session,
        &result.state.model,
        &result.state.masks,
        storage,
    )?;
    let formats = attached.formats.clone();
    // Only the packed weights (and the layers left dense) stay alive for the measurement.
    drop(result);
    reset_peak_rss();
    let pruned = latency(&session, &prompt, new_tokens)?;
    let pruned_peak = peak_rss_bytes();

    let speedup = dense.ms_per_token / pruned.ms_per_token;
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": model_ref,
                "pipeline": pipeline.display().to_string(),
                "dense": dense,
                "pruned": pruned,
                "pruned_formats": formats,
                "pruned_peak_rss_bytes": pruned_peak,
                "weight_bytes": {"dense": attached.model_bytes, "pruned": attached.packed_model_bytes},
                "decode_speedup": speedup,
            }))?
        );
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header(vec!["decode, batch 1", "dense", "pruned", "ratio"]);
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
        mib(Some(attached.model_bytes as u64)),
        mib(Some(attached.packed_model_bytes as u64)),
        format!(
            "{:.2}x smaller",
            attached.model_bytes as f64 / attached.packed_model_bytes.max(1) as f64
        ),
    ]);
    out!("{t}");
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
    out!("pruned linear formats: {formats}");
    out!(
        "same prompt ({} tokens), {new_tokens} new tokens, greedy; same generated ids: {}",
        prompt.len(),
        dense.generated == pruned.generated
    );
    Ok(())
}
