//! Mistakes caught at planning, end to end: the `espalier` binary runs a pipeline whose first
//! stage needs calibration (`sensitivity`, which prints each layer's loss measurement once the
//! calibration pass and its trials have run) and whose last stage holds one mistake. Each
//! mistake must be reported at `file:line:col` with its fix, with exit code 2, and before any
//! calibration: the run's log (at `info`, where plugin output goes) has no loss measurement.
//! The same pipeline without the mistake does log them, so the check can fail.

use std::path::Path;

#[path = "common/binary.rs"]
mod binary;
use binary::{bin, repo, text};

/// What `sensitivity` prints for every group, after the calibration pass and its loss trials.
const CALIBRATED: &str = "loss increase at density";

/// A pipeline whose first two stages would calibrate and prune, followed by `last`.
fn pipeline(last: &str) -> String {
    format!(
        "model = \"builtin:tiny-llama\"\n\
         [calibration]\ntext = {:?}\nsamples = 2\nseq_len = 16\n\
         [[stage]]\nname = \"budgets\"\nplugin = \"sensitivity\"\ndensity = 0.6\ngranularity = \"layer\"\n\
         [[stage]]\nname = \"prune\"\nplugin = \"magnitude\"\ndensity = \"budget\"\n\
         {last}",
        repo().join("data/calibration.txt").display().to_string()
    )
}

/// The 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
        + 1
}

/// Runs `espalier run pipeline.toml --no-export` on `body` with plugin output logged; returns
/// (exit code, stderr).
fn run(dir: &Path, body: &str) -> (Option<i32>, String) {
    std::fs::write(dir.join("pipeline.toml"), body).unwrap();
    let o = bin()
        .args(["run", "pipeline.toml", "--no-export"])
        .env("ESPALIER_LOG", "info")
        .current_dir(dir)
        .output()
        .expect("run espalier");
    let (stdout, stderr) = text(&o);
    (o.status.code(), format!("{stdout}\n{stderr}"))
}

/// Checks a refused run: exit 2, the message at `pipeline.toml:LINE:COL: FIELD: ...` containing
/// `fix`, and no calibration.
fn assert_refused_at(body: &str, line: usize, column: usize, field: &str, fix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(dir.path(), body);
    assert_eq!(code, Some(2), "{out}");
    let at = format!("pipeline.toml:{line}:{column}: {field}: ");
    let reported = out
        .lines()
        .find(|l| l.contains(&at))
        .unwrap_or_else(|| panic!("no `{at}` in:\n{out}"));
    assert!(
        reported.contains(fix) || out.contains(fix),
        "`{fix}` not in:\n{out}"
    );
    assert!(
        !out.contains(CALIBRATED),
        "the run calibrated before it refused the pipeline:\n{out}"
    );
}

#[test]
fn the_pipeline_without_a_mistake_calibrates_so_the_check_can_fail() {
    let dir = tempfile::tempdir().unwrap();
    let body = pipeline("[[stage]]\nplugin = \"n-m\"\nn = 2\nm = 4\n");
    let (code, out) = run(dir.path(), &body);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(CALIBRATED), "{out}");
}

#[test]
fn an_n_m_density_that_disagrees_with_n_over_m_is_refused_at_its_line() {
    let body = pipeline("[[stage]]\nplugin = \"n-m\"\nn = 2\nm = 4\ndensity = 0.3\n");
    assert_refused_at(
        &body,
        line_of(&body, "density = 0.3"),
        1,
        "stage[2].density",
        "n = 2, m = 4 keeps exactly 0.5 of each group; set density = 0.5 or drop it",
    );
    // n > m, at the `n` line.
    let body = pipeline("[[stage]]\nplugin = \"n-m\"\nn = 5\nm = 4\n");
    assert_refused_at(
        &body,
        line_of(&body, "n = 5"),
        1,
        "stage[2].n",
        "keep between 1 and m = 4",
    );
}

#[test]
fn a_heads_stage_on_mlp_targets_is_refused_at_its_targets_line() {
    let body = pipeline("[[stage]]\nplugin = \"heads\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.5\n");
    assert_refused_at(
        &body,
        line_of(&body, "targets = [\"*.mlp.*\"]"),
        1,
        "stage[2].targets",
        "set `targets = [\"*.self_attn.*\"]`",
    );
    // Defaulted targets (every block linear) are refused at the stage's line.
    let body = pipeline("[[stage]]\nname = \"cut\"\nplugin = \"heads\"\ndensity = 0.5\n");
    assert_refused_at(
        &body,
        line_of(&body, "name = \"cut\"") - 1,
        1,
        "stage[2].targets",
        "it has no `targets`",
    );
}

#[test]
fn a_typo_inside_a_section_names_the_section() {
    let body = pipeline("[[stage]]\nplugin = \"n-m\"\n").replace("samples = 2", "sampels = 2");
    assert_refused_at(
        &body,
        line_of(&body, "sampels"),
        1,
        "calibration",
        "unknown field `sampels` in [calibration], expected one of `text`, `sha256`, `samples`, `seq_len`, `sequential`; did you mean `samples`?",
    );
    let body = pipeline("[[stage]]\nplugin = \"magnitude\"\ndensty = 0.5\n");
    assert_refused_at(
        &body,
        line_of(&body, "densty"),
        1,
        "stage[2].densty",
        "unknown key `densty` in [[stage]] `magnitude-3`: did you mean `density`?",
    );
}

#[test]
fn a_problem_a_plugin_finds_in_a_parameter_is_reported_at_that_parameter() {
    let body = pipeline("[[stage]]\nplugin = \"block\"\ndensity = 0.5\nblock = [0, 16]\n");
    assert_refused_at(
        &body,
        line_of(&body, "block = [0, 16]"),
        1,
        "stage[2].block",
        "`block` entries must be in 1..=4096, got [0, 16]",
    );
    // Several problems: each at its own line.
    let body = pipeline(
        "[[stage]]\nplugin = \"sensitivity\"\ndensity = 0.5\nmethod = \"los\"\nowl_m = -1.0\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run(dir.path(), &body);
    assert_eq!(code, Some(2), "{out}");
    for (prefix, field) in [("method", "stage[2].method"), ("owl_m", "stage[2].owl_m")] {
        let at = format!("pipeline.toml:{}:1: {field}: ", line_of(&body, prefix));
        assert!(out.contains(&at), "no `{at}` in:\n{out}");
    }
    assert!(!out.contains(CALIBRATED), "{out}");
}

/// A `schedule` on a stage that cannot prune gradually is refused at planning, at its line:
/// a plugin whose density is fixed (N:M refuses the schedule's first density), one that
/// produces budgets or weights, and targets that fine-tuning does not train.
#[test]
fn a_schedule_on_a_stage_that_cannot_follow_it_is_refused_at_its_line() {
    let finetune = format!(
        "[finetune]\ntext = {:?}\nsteps = 10\n",
        repo().join("data/calibration.txt").display().to_string()
    );
    let schedule = "schedule = { kind = \"cubic\", end = 8, every = 4 }\n";
    for (stage, field, fix) in [
        (
            "plugin = \"n-m\"\nn = 2\nm = 4\ndensity = 0.5\n",
            "stage[2].schedule",
            "cannot follow a schedule",
        ),
        (
            "plugin = \"sensitivity\"\ndensity = 0.5\n",
            "stage[2].schedule",
            "produces budgets",
        ),
        (
            "plugin = \"sparsegpt\"\ndensity = 0.5\n",
            "stage[2].schedule",
            "produces weights",
        ),
    ] {
        let body = pipeline(&format!("[[stage]]\n{stage}{schedule}{finetune}"));
        assert_refused_at(&body, line_of(&body, "schedule = {"), 1, field, fix);
    }
    let body = pipeline(&format!(
        "[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*embed_tokens*\"]\ndensity = 0.5\n{schedule}{finetune}"
    ));
    assert_refused_at(
        &body,
        line_of(&body, "targets = [\"*embed_tokens*\"]"),
        1,
        "stage[2].targets",
        "is not a block linear",
    );
}

/// `lottery` on a stage that cannot prune in lottery rounds is refused at planning, at its
/// line, before any calibration: a plugin whose density is fixed (N:M refuses the first
/// round's density), one that produces budgets, one that updates weights (SparseGPT), and
/// targets that fine-tuning does not train.
#[test]
fn a_lottery_on_a_stage_that_cannot_prune_in_rounds_is_refused_at_its_line() {
    let finetune = format!(
        "[finetune]\ntext = {:?}\nsteps = 10\n",
        repo().join("data/calibration.txt").display().to_string()
    );
    let lottery = "lottery = { rounds = 3, rewind = { step = 2 } }\n";
    for (stage, fix) in [
        (
            "plugin = \"n-m\"\nn = 2\nm = 4\ndensity = 0.5\n",
            "cannot prune in rounds",
        ),
        (
            "plugin = \"sensitivity\"\ndensity = 0.5\n",
            "produces budgets",
        ),
        (
            "plugin = \"sparsegpt\"\ndensity = 0.5\n",
            "produces weights",
        ),
    ] {
        let body = pipeline(&format!("[[stage]]\n{stage}{lottery}{finetune}"));
        assert_refused_at(
            &body,
            line_of(&body, "lottery = {"),
            1,
            "stage[2].lottery",
            fix,
        );
    }
    let body = pipeline(&format!(
        "[[stage]]\nplugin = \"magnitude\"\ntargets = [\"*embed_tokens*\"]\ndensity = 0.5\n{lottery}{finetune}"
    ));
    assert_refused_at(
        &body,
        line_of(&body, "targets = [\"*embed_tokens*\"]"),
        1,
        "stage[2].targets",
        "is not a block linear",
    );
    // A rewind step past the first round's steps: at the step, before any calibration.
    let body = pipeline(&format!(
        "[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\nlottery = {{ rounds = 3, rewind = {{ step = 10 }} }}\n{finetune}"
    ));
    assert_refused_at(
        &body,
        line_of(&body, "lottery = {"),
        36,
        "stage[2].lottery.rewind.step",
        "first round's 10 steps",
    );
}
