//! Tables for the terminal. Every command's tabular output is built by [`table`], which fits
//! it to the terminal: `$COLUMNS` when set, else the terminal's width, no limit when the output
//! is not a terminal. Cells wrap to fit, and below 100 columns the low-value columns a caller
//! names are dropped. Also the run report, evaluation and comparison tables.

use comfy_table::{
    Cell, CellAlignment, ColumnConstraint, ContentArrangement, Table, presets::UTF8_FULL_CONDENSED,
};
use espalier::display_safe::name as safe;
use espalier::evaluate::{Comparison, Evaluation, MemoryReport, Protocol};
use espalier::report::RunReport;

/// Below this width, tables drop their low-value columns.
const NARROW: u16 = 100;

/// `$COLUMNS`, when it holds a usable width.
fn columns_env() -> Option<u16> {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|v| v.trim().parse::<u16>().ok())
        .filter(|&w| w >= 20)
}

/// A table with `header` that fits the terminal.
pub fn table<T: Into<Cell>>(header: impl IntoIterator<Item = T>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_content_arrangement(ContentArrangement::Dynamic);
    if let Some(w) = columns_env() {
        t.set_width(w);
    }
    t.set_header(header);
    t
}

/// Whether the table's width is known and below [`NARROW`].
pub fn is_narrow(t: &Table) -> bool {
    t.width().is_some_and(|w| w < NARROW)
}

/// Drops the columns at `indices` when the terminal is narrow (they still appear in `--json`).
pub fn drop_when_narrow(t: &mut Table, indices: &[usize]) {
    if is_narrow(t) {
        for &i in indices {
            if let Some(c) = t.column_mut(i) {
                c.set_constraint(ColumnConstraint::Hidden);
            }
        }
    }
}

/// A right-aligned cell.
pub fn right(text: impl Into<String>) -> Cell {
    Cell::new(text.into()).set_alignment(CellAlignment::Right)
}

/// A fraction as a percentage.
pub fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// Bytes as MiB (KiB below one MiB, so small models do not read 0).
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| {
        if b < 1 << 20 {
            format!("{:.0} KiB", b as f64 / 1024.0)
        } else {
            format!("{:.0} MiB", b as f64 / (1 << 20) as f64)
        }
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// Prints the protocol rows of an evaluation table: text, windows, tokens, latency.
fn protocol_rows(p: &Protocol) -> Vec<(String, String)> {
    let scored = match p.max_tokens {
        Some(m) if m < p.text_tokens => format!("first {m} of {} tokens", p.text_tokens),
        _ => format!("all {} tokens", p.text_tokens),
    };
    vec![
        (
            "text".into(),
            format!(
                "{} (sha256 {})",
                safe(&p.text),
                p.text_sha256.get(..12).unwrap_or(&p.text_sha256)
            ),
        ),
        (
            "window / stride".into(),
            format!("{} / {} tokens, {scored}", p.window, p.stride),
        ),
        (
            "latency prompt".into(),
            match (p.prompt_tokens, p.new_tokens) {
                (Some(prompt), Some(new)) => {
                    format!("{prompt} tokens, then {new} generated (batch 1, greedy)")
                }
                _ => "not measured".into(),
            },
        ),
    ]
}

/// One figure of an evaluation: label, how to read it from an evaluation, how to show it.
struct Metric {
    label: &'static str,
    value: fn(&Evaluation) -> Option<f64>,
    show: fn(f64) -> String,
}

const METRICS: &[Metric] = &[
    Metric {
        label: "perplexity",
        value: |e| e.perplexity.as_ref().map(|p| p.perplexity),
        show: |v| format!("{v:.3}"),
    },
    Metric {
        label: "eval tokens/s (prefill of windows)",
        value: |e| e.perplexity.as_ref().map(|p| p.tokens_per_second),
        show: |v| format!("{v:.1}"),
    },
    Metric {
        label: "prefill tokens/s (prompt)",
        value: |e| e.latency.as_ref().map(|l| l.prefill_tokens_per_s),
        show: |v| format!("{v:.1}"),
    },
    Metric {
        label: "decode ms / token",
        value: |e| e.latency.as_ref().map(|l| l.ms_per_token),
        show: |v| format!("{v:.2}"),
    },
    Metric {
        label: "decode tokens/s",
        value: |e| e.latency.as_ref().map(|l| l.decode_tokens_per_s),
        show: |v| format!("{v:.1}"),
    },
    Metric {
        label: "weights held by the forward pass",
        value: |e| Some(e.memory.weight_bytes as f64),
        show: |v| mib(Some(v as u64)),
    },
    Metric {
        label: "peak RSS during its evaluation",
        value: |e| e.memory.peak_rss_bytes.map(|b| b as f64),
        show: |v| mib(Some(v as u64)),
    },
];

fn kernel_line(e: &Evaluation) -> String {
    e.kernels
        .layers
        .iter()
        .map(|(k, n)| format!("{}: {n}", safe(k)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn peak_note(e: &Evaluation) -> &'static str {
    if e.memory.per_model_peak {
        ""
    } else {
        " (process-wide high-water mark)"
    }
}

/// The dense and pruned evaluations side by side, with the pruned/dense ratio, the kernels
/// each linear ran on and why pruned layers stayed dense.
pub fn print_comparison(c: &Comparison) {
    let mut t = table(["evaluation", "dense", "pruned", "pruned ÷ dense"]);
    let same = c.dense.protocol == c.pruned.protocol;
    for (label, value) in protocol_rows(&c.pruned.protocol) {
        let (dense, value) = if same {
            (value, "same".to_string())
        } else {
            protocol_rows(&c.dense.protocol)
                .into_iter()
                .find(|(l, _)| *l == label)
                .map_or_else(
                    || (String::new(), value.clone()),
                    |(_, v)| (v, value.clone()),
                )
        };
        t.add_row(vec![Cell::new(label), Cell::new(dense), Cell::new(value)]);
    }
    for m in METRICS {
        let (d, p) = ((m.value)(&c.dense), (m.value)(&c.pruned));
        t.add_row(vec![
            Cell::new(m.label),
            right(d.map_or("-".into(), m.show)),
            right(p.map_or("-".into(), m.show)),
            right(ratio(p, d)),
        ]);
    }
    t.add_row(vec![
        Cell::new("linear kernels"),
        Cell::new(kernel_line(&c.dense)),
        Cell::new(kernel_line(&c.pruned)),
    ]);
    out!("{t}");
    if c.dense_shared {
        out!("dense figures: measured once in this process for every pipeline on this model");
    }
    let notes = [peak_note(&c.dense), peak_note(&c.pruned)];
    if notes.iter().any(|n| !n.is_empty()) {
        out!("peak RSS: process-wide high-water marks (other work shares this process)");
    }
    print_kernel_reasons(&c.pruned);
    // A sparse format that loses at prefill is flagged (the planner optimises batch-1 decode).
    let prefill = |e: &Evaluation| e.latency.as_ref().map(|l| l.prefill_tokens_per_s);
    if let (Some(d), Some(p)) = (prefill(&c.dense), prefill(&c.pruned))
        && p < 0.95 * d
    {
        let sparse: Vec<String> = c
            .pruned
            .kernels
            .layers
            .keys()
            .filter(|k| k.as_str() != "dense")
            .map(|k| safe(k))
            .collect();
        out!(
            "note: the pruned model's prefill runs at {:.2}x dense's: the sparse kernels ({}) are chosen for batch-1 decode, and at {} prompt tokens they run slower than the dense kernels",
            p / d,
            if sparse.is_empty() {
                "none".to_string()
            } else {
                sparse.join(", ")
            },
            c.pruned.protocol.prompt_tokens.unwrap_or(0)
        );
    }
    if let Some(note) = held_model_note(&c.dense.memory, &c.pruned.memory) {
        out!("{note}");
    }
}

/// A pruned model that holds fewer weights than dense but peaks higher: the process also
/// held something of the run while the pruned one ran, which the reader should not charge to
/// it. The note names the likely case without claiming it: layers packed exactly in f32 are
/// set aside then (`app::evaluate_pruned_in_run`), and those packed in bf16 or int8 (rounded,
/// so their kernels cannot give the tensors back) wait in a temporary file, so the run holds
/// them only where that file cannot be written.
fn held_model_note(dense: &MemoryReport, pruned: &MemoryReport) -> Option<String> {
    let (dense_peak, pruned_peak) = (dense.peak_rss_bytes?, pruned.peak_rss_bytes?);
    (pruned_peak > dense_peak && pruned.weight_bytes < dense.weight_bytes).then(|| {
        format!(
            "note: peak RSS is the whole process's, so it includes what the run still held while the pruned model was evaluated, such as the unpacked weights of layers packed in bf16 or int8 (up to {} in all) where no temporary file could be written for them (the log says so); `espalier eval` of the export measures the pruned model alone",
            mib(Some(dense.weight_bytes))
        )
    })
}

/// Why layers stayed on the dense kernel, and how many run on each sparse format.
fn print_kernel_reasons(e: &Evaluation) {
    let mut t = table(["pruned model: kernel", "layers", "why"]);
    for (reason, n) in &e.kernels.dense_because {
        t.add_row(vec![
            Cell::new("dense"),
            right(n.to_string()),
            Cell::new(safe(reason)),
        ]);
    }
    for (kernel, n) in &e.kernels.layers {
        if kernel != "dense" {
            // "dense/bf16", "dense/i8": the dense kernel in the evaluation's storage dtype,
            // which the reasons above (or the planner, for a sparse layer) account for.
            let why = if kernel.starts_with("dense/") {
                "dense, in the evaluation's storage dtype (not pruned, or no sparse format faster)"
            } else {
                "the planner's choice: faster than dense by its estimate (bytes + compute)"
            };
            t.add_row(vec![
                Cell::new(safe(kernel)),
                right(n.to_string()),
                Cell::new(why),
            ]);
        }
    }
    out!("{t}");
}

/// One model's evaluation (`espalier eval`).
pub fn print_evaluation(model: &str, e: &Evaluation) {
    let mut t = table(["evaluation".to_string(), safe(model)]);
    for (label, value) in protocol_rows(&e.protocol) {
        t.add_row(vec![label, value]);
    }
    for m in METRICS {
        t.add_row(vec![
            Cell::new(m.label),
            right((m.value)(e).map_or("-".into(), m.show)),
        ]);
    }
    t.add_row(vec![Cell::new("linear kernels"), Cell::new(kernel_line(e))]);
    out!("{t}");
    if !e.memory.per_model_peak {
        out!("peak RSS: the process-wide high-water mark");
    }
}

/// The run report: stages, optionally every layer, the summary and the evaluation.
pub fn print_report(r: &RunReport, layers: bool) {
    out!(
        "pipeline `{}` on {} ({})",
        safe(&r.pipeline),
        safe(&r.model),
        safe(&r.architecture)
    );
    let mut t = table([
        "stage",
        "plugin",
        "version",
        "targets",
        "asked",
        "kept after",
        "time",
        "sandbox share",
        "sha256",
        "signer",
    ]);
    for s in &r.stages {
        t.add_row(vec![
            Cell::new(safe(&s.name)),
            Cell::new(safe(&s.plugin)),
            Cell::new(safe(&s.plugin_version)),
            right(s.targets.to_string()),
            right(s.requested_density.map_or("-".into(), pct)),
            right(pct(s.density_after)),
            right(format!("{:.3} s", s.seconds)),
            right(pct(s.guest_share)),
            Cell::new(s.plugin_sha256.get(..12).unwrap_or(&s.plugin_sha256)),
            Cell::new(safe(&s.plugin_signer)),
        ]);
    }
    drop_when_narrow(&mut t, &[2, 7, 8, 9]);
    out!("{t}");
    if layers {
        let mut t = table(["layer", "role", "shape", "kept", "structure"]);
        for l in &r.layers {
            t.add_row(vec![
                Cell::new(safe(&l.name)),
                Cell::new(l.role.as_str()),
                Cell::new(format!("{:?}", l.shape)),
                right(pct(l.density)),
                Cell::new(safe(l.structure.as_deref().unwrap_or("-"))),
            ]);
        }
        drop_when_narrow(&mut t, &[2]);
        out!("{t}");
    }
    let s = &r.summary;
    let mut t = table(["summary", "value"]);
    let rows = [
        (
            "layers pruned (masked / shrunk by head removal)",
            format!(
                "{} ({} / {})",
                s.pruned_layers + s.shrunk_layers,
                s.pruned_layers,
                s.shrunk_layers
            ),
        ),
        ("kept in pruned layers", pct(s.pruned_density)),
        ("kept in block linears", pct(s.block_linear_density)),
        ("kept in all 2-D weights", pct(s.all_weights_density)),
        (
            "parameters (stored / non-zero)",
            format!(
                "{} → {} / {}",
                s.parameters_before, s.parameters_after, s.nonzero_parameters_after
            ),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
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
    if let Some(f) = &r.finetune {
        let resumed = f
            .resumed_from
            .map_or(String::new(), |s| format!(", resumed from step {s}"));
        // The linear products' precision, named when it is not the default f32.
        let title = match f.spec.precision {
            espalier::finetune::TrainingPrecision::F32 => "fine-tune (masks held)".to_string(),
            p => format!("fine-tune (masks held, {} products)", p.as_str()),
        };
        t.add_row(vec![
            title,
            format!(
                "{} steps, {} tokens{resumed}: loss {:.4} → {:.4} (last tenth {:.4}), {:.1} s, {:.0} tokens/s",
                // Over every lottery round when there are rounds (the spec's are per round).
                f.loss_curve.last().map_or(f.spec.steps, |p| p.last),
                f.tokens_trained,
                f.first_loss,
                f.final_loss,
                f.final_loss_mean,
                f.seconds,
                f.tokens_per_second
            ),
        ]);
        if let (Some(d), Some([first, last, tail])) = (&f.spec.distill, &f.parts) {
            let hidden = match (first.hidden, last.hidden, tail.hidden) {
                (Some(a), Some(b), Some(c)) => {
                    format!(", hidden {a:.4} → {b:.4} (last tenth {c:.4})")
                }
                _ => String::new(),
            };
            let setting = if d.hidden > 0.0 {
                format!(
                    "distillation (weight {}, T {}, hidden {})",
                    d.weight, d.temperature, d.hidden
                )
            } else {
                format!("distillation (weight {}, T {})", d.weight, d.temperature)
            };
            t.add_row(vec![
                setting,
                format!(
                    "CE {:.4} → {:.4} (last tenth {:.4}), KL {:.4} → {:.4} (last tenth {:.4}){hidden}",
                    first.cross_entropy,
                    last.cross_entropy,
                    tail.cross_entropy,
                    first.kl,
                    last.kl,
                    tail.kl
                ),
            ]);
        }
        if !f.rounds.is_empty() {
            let rounds: Vec<String> = f
                .rounds
                .iter()
                .map(|r| {
                    let after = match (r.pruned_to, r.rewound_to) {
                        (Some(d), Some(k)) => format!(", pruned to {d:.4}, rewound to step {k}"),
                        _ => String::new(),
                    };
                    format!(
                        "{}: {} steps at density {:.4}, loss {:.4}{after}",
                        r.round, r.steps, r.density, r.final_loss
                    )
                })
                .collect();
            t.add_row(vec!["lottery rounds".to_string(), rounds.join("\n")]);
        }
        if let (Some(first), Some(last)) = (f.prune_events.first(), f.prune_events.last()) {
            t.add_row(vec![
                "scheduled pruning".to_string(),
                format!(
                    "{} events (steps {}..={}): density {:.4} → {:.4} (last asked {:.4}), {:.1} s",
                    f.prune_events.len(),
                    first.step,
                    last.step,
                    first.density,
                    last.density,
                    last.target_density,
                    f.prune_events.iter().map(|e| e.seconds).sum::<f64>()
                ),
            ]);
        }
    }
    out!("{t}");
    if let Some(c) = &r.evaluation {
        print_comparison(c);
    }
}

/// Runs side by side (`espalier compare`, `espalier run A.toml B.toml`): what differs between
/// their pipelines, perplexity, speed and density per role.
pub fn print_compare(reports: &[(String, RunReport)]) {
    let mut header = vec!["".to_string()];
    header.extend(reports.iter().map(|(label, _)| safe(label)));
    let mut t = table(header);
    let row = |t: &mut Table, label: &str, cells: Vec<String>| {
        let mut r = vec![Cell::new(label)];
        r.extend(cells.into_iter().map(right));
        t.add_row(r);
    };
    let each = |f: &dyn Fn(&RunReport) -> String| -> Vec<String> {
        reports.iter().map(|(_, r)| f(r)).collect()
    };
    row(&mut t, "pipeline", each(&|r| safe(&r.pipeline)));
    row(&mut t, "model", each(&|r| safe(&r.model)));
    // Stage by stage: plugin and every parameter whose value differs between the runs.
    let stages = reports
        .iter()
        .map(|(_, r)| r.stages.len())
        .max()
        .unwrap_or(0);
    for i in 0..stages {
        let stage = |r: &RunReport| r.stages.get(i).cloned();
        let plugin = each(&|r| {
            stage(r).map_or("-".into(), |s| {
                format!(
                    "{}@{}",
                    safe(&s.plugin),
                    s.plugin_sha256.get(..8).unwrap_or("")
                )
            })
        });
        row(&mut t, &format!("stage {} plugin", i + 1), plugin);
        let mut keys: Vec<String> = reports
            .iter()
            .filter_map(|(_, r)| r.stages.get(i))
            .flat_map(|s| s.params.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        let mut fields: Vec<(String, Vec<String>)> = vec![(
            "density".into(),
            each(&|r| stage(r).map_or("-".into(), |s| safe(&s.density_from))),
        )];
        fields.push((
            "targets".into(),
            each(&|r| {
                stage(r).map_or("-".into(), |s| {
                    s.target_patterns
                        .as_ref()
                        .map_or("block linears".into(), |p| safe(&p.join(", ")))
                })
            }),
        ));
        for k in keys {
            fields.push((
                k.clone(),
                each(&|r| {
                    stage(r)
                        .and_then(|s| s.params.get(&k).map(|v| safe(&v.to_string())))
                        .unwrap_or_else(|| "-".into())
                }),
            ));
        }
        for (name, values) in fields {
            if values.windows(2).any(|w| w[0] != w[1]) {
                row(&mut t, &format!("stage {} {name}", i + 1), values);
            }
        }
    }
    let protocols: Vec<Option<&Protocol>> = reports
        .iter()
        .map(|(_, r)| r.evaluation.as_ref().map(|c| &c.pruned.protocol))
        .collect();
    row(
        &mut t,
        "evaluation text",
        protocols
            .iter()
            .map(|p| {
                p.map_or("-".into(), |p| {
                    format!(
                        "{} tok, w{}/s{}, {}",
                        p.max_tokens.unwrap_or(p.text_tokens).min(p.text_tokens),
                        p.window,
                        p.stride,
                        p.text_sha256.get(..8).unwrap_or("")
                    )
                })
            })
            .collect(),
    );
    let eval = |f: fn(&Comparison) -> Option<f64>, show: fn(f64) -> String| -> Vec<String> {
        reports
            .iter()
            .map(|(_, r)| r.evaluation.as_ref().and_then(f).map_or("-".into(), show))
            .collect()
    };
    let three = |v: f64| format!("{v:.3}");
    let one = |v: f64| format!("{v:.1}");
    let two = |v: f64| format!("{v:.2}");
    let times = |v: f64| format!("{v:.2}x");
    row(
        &mut t,
        "perplexity dense",
        eval(|c| c.dense.perplexity.as_ref().map(|p| p.perplexity), three),
    );
    row(
        &mut t,
        "perplexity pruned",
        eval(
            |c| c.pruned.perplexity.as_ref().map(|p| p.perplexity),
            three,
        ),
    );
    row(
        &mut t,
        "decode ms / token",
        eval(|c| c.pruned.latency.as_ref().map(|l| l.ms_per_token), two),
    );
    row(
        &mut t,
        "decode vs dense",
        eval(
            |c| {
                Some(
                    c.pruned.latency.as_ref()?.decode_tokens_per_s
                        / c.dense.latency.as_ref()?.decode_tokens_per_s,
                )
            },
            times,
        ),
    );
    row(
        &mut t,
        "prefill tokens/s",
        eval(
            |c| c.pruned.latency.as_ref().map(|l| l.prefill_tokens_per_s),
            one,
        ),
    );
    row(
        &mut t,
        "weights held",
        eval(
            |c| Some(c.pruned.memory.weight_bytes as f64),
            |v| mib(Some(v as u64)),
        ),
    );
    row(
        &mut t,
        "kept in block linears",
        each(&|r| pct(r.summary.block_linear_density)),
    );
    // Computed once per report: every role's row reads it.
    let by_role: Vec<_> = reports.iter().map(|(_, r)| r.density_by_role()).collect();
    let roles: std::collections::BTreeSet<&String> =
        by_role.iter().flat_map(|m| m.keys()).collect();
    for role in roles {
        row(
            &mut t,
            &format!("kept in {role}"),
            by_role
                .iter()
                .map(|m| m.get(role).map_or("-".into(), |d| pct(*d)))
                .collect(),
        );
    }
    out!("{t}");
    // Comparable when the text's bytes and every number agree (its name may differ).
    let key = |p: &Protocol| {
        (
            p.text_sha256.clone(),
            p.window,
            p.stride,
            p.max_tokens,
            p.prompt_tokens,
            p.new_tokens,
        )
    };
    let first = protocols.iter().flatten().next().map(|p| key(p));
    if protocols.iter().flatten().any(|p| Some(key(p)) != first) {
        out!(
            "warning: the runs were evaluated under different protocols (text, window, stride or tokens); their perplexities are not comparable"
        );
    }
}

/// `espalier bench kernels`: which shapes were measured, then the GEMV rows, the per-block
/// summary and the prefill rows, as tables.
pub fn print_kernel_bench(
    report: &espalier_kernels::bench::KernelBenchReport,
    shapes: &[(usize, usize)],
    quick: bool,
) {
    let list = shapes
        .iter()
        .map(|(r, c)| format!("{r}x{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    if quick {
        out!(
            "quick run: shapes {list} (tiny and cache-resident: every kernel path runs, but the figures say little); the full run measures SmolLM2-135M's layer shapes"
        );
    } else {
        out!("shapes (out x in): {list}, SmolLM2-135M's block linears and LM head");
    }
    out!(
        "memory read bandwidth: {:.1} GB/s ({} threads), {:.1} GB/s (1 thread); isa {}; {} matrices streamed per figure (fewer past 256 MiB of f32 weights: the LM head)",
        report.probe_gbps,
        report.threads,
        report.probe_gbps_one_thread,
        report.isa,
        report.layers
    );
    out!(
        "speed-up: against the faster of candle's matmul and our dense f32 GEMV on the same shape, in the same rounds; vs dense: against our dense GEMV in the row's own dtype, same rounds"
    );
    let mut t = table([
        "shape", "kernel", "dtype", "sparsity", "KiB", "ms", "GB/s", "% bw", "speed-up", "vs best",
        "vs dense", "planner",
    ]);
    for r in &report.decode {
        t.add_row(vec![
            Cell::new(format!("{}x{}", r.shape.0, r.shape.1)),
            Cell::new(&r.kernel),
            Cell::new(&r.dtype),
            right(format!("{:.0}%", r.sparsity * 100.0)),
            right(format!("{:.1}", r.bytes as f64 / 1024.0)),
            right(format!("{:.4}", r.ms)),
            right(format!("{:.1}", r.gbps)),
            right(format!("{:.0}%", r.share_of_bandwidth * 100.0)),
            right(format!("{:.2}x", r.speedup)),
            right(format!("{:.2}x", r.speedup_vs_best)),
            right(format!("{:.2}x", r.vs_dense_same_dtype)),
            Cell::new(r.planned.as_deref().unwrap_or("")),
        ]);
    }
    drop_when_narrow(&mut t, &[4, 6, 9]);
    out!("{t}");
    if !report.summary.is_empty() {
        let mut t = table([
            "per SmolLM2 block",
            "speed-up",
            "vs best",
            "vs dense",
            "% bw",
        ]);
        for s in &report.summary {
            t.add_row(vec![
                Cell::new(&s.label),
                right(format!("{:.2}x", s.speedup)),
                right(format!("{:.2}x", s.speedup_vs_best)),
                right(format!("{:.2}x", s.vs_dense_same_dtype)),
                right(format!("{:.0}%", s.share_of_bandwidth * 100.0)),
            ]);
        }
        out!("{t}");
    }
    if !report.prefill.is_empty() {
        let mut t = table([
            format!(
                "prefill, {} tokens (f32 unless the kernel names a dtype)",
                report.prefill_tokens
            ),
            "kernel".into(),
            "sparsity".into(),
            "ms".into(),
            "vs candle".into(),
        ]);
        for r in &report.prefill {
            t.add_row(vec![
                Cell::new(format!("{}x{}", r.shape.0, r.shape.1)),
                Cell::new(&r.kernel),
                right(format!("{:.0}%", r.sparsity * 100.0)),
                right(format!("{:.3}", r.ms)),
                right(format!("{:.2}x", r.speedup_vs_candle)),
            ]);
        }
        out!("{t}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(weights_mib: u64, peak_mib: Option<u64>) -> MemoryReport {
        MemoryReport {
            weight_bytes: weights_mib << 20,
            rss_at_start_bytes: None,
            peak_rss_bytes: peak_mib.map(|m| m << 20),
            per_model_peak: true,
        }
    }

    #[test]
    fn a_smaller_model_peaking_higher_is_explained() {
        let note = held_model_note(&memory(513, Some(763)), &memory(324, Some(1209)))
            .expect("pruned holds less but peaks higher");
        assert!(note.contains("(up to 513 MiB in all)"), "{note}");
        // Nothing to explain: a lower peak, a model that holds as much, or no reading.
        assert_eq!(
            held_model_note(&memory(513, Some(763)), &memory(324, Some(700))),
            None
        );
        assert_eq!(
            held_model_note(&memory(513, Some(763)), &memory(513, Some(900))),
            None
        );
        assert_eq!(
            held_model_note(&memory(513, None), &memory(324, Some(1209))),
            None
        );
    }
}
