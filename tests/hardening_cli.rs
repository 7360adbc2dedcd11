//! End-to-end hardening of the `espalier` binary: exports that must not destroy the user's
//! files (checked at planning, before any stage), temporary folders removed on SIGINT/SIGTERM
//! and on the next run, plugin text escaped and capped on the terminal, panics reported by
//! their message, `describe` bound by the pipeline's sandbox, closed pipes and overflowing
//! numbers on the command line.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[path = "common/binary.rs"]
mod binary;
use binary::{bin, espalier, repo, text, wasm, write};

/// Hidden siblings of `out` that look like Espalier's temporary folders.
fn temporaries(parent: &Path, out: &str) -> Vec<String> {
    let prefix = format!(".{out}.");
    std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// A pipeline on the tiny built-in model: one magnitude stage, exported to `out`.
const TINY: &str =
    "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n";

/// A pipeline whose only stage never returns (stopped after `timeout` seconds).
fn looping(model: &str, timeout: u32) -> String {
    format!(
        "model = {model:?}\n[sandbox]\ntimeout_s = {timeout}\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
        wasm("hostile_loop").display().to_string()
    )
}

/// No character a terminal would interpret survives, except line breaks.
fn assert_inert(s: &str, what: &str) {
    let bad: Vec<char> = s
        .chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect();
    assert!(bad.is_empty(), "{what}: raw control characters {bad:?}");
}

#[test]
fn the_model_folder_and_its_parents_are_refused_before_any_stage_even_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("models/m");
    std::fs::create_dir_all(&model).unwrap();
    espalier_engine::load_model("builtin:tiny-llama")
        .unwrap()
        .save_into(&model)
        .unwrap();
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    // The only stage loops for 30 s: a check made after it would fail with a timeout instead.
    let p = write(dir.path(), "p.toml", &looping(model.to_str().unwrap(), 30));
    for out in [
        model.clone(),
        dir.path().join("models"),
        model.join(".."),
        dir.path().to_path_buf(),
    ] {
        let started = Instant::now();
        let o = espalier(
            &[
                "run",
                p.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--force",
            ],
            dir.path(),
        );
        let (stdout, stderr) = text(&o);
        assert!(!o.status.success(), "{}: {stdout}", out.display());
        assert!(
            stderr.contains("never replaces an input"),
            "{}: {stderr}",
            out.display()
        );
        assert!(!stderr.contains("time limit"), "{stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "refused only after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(temporaries(dir.path(), "models").is_empty());
    assert!(temporaries(&dir.path().join("models"), "m").is_empty());
}

#[test]
fn a_foreign_folder_is_refused_unless_forced_and_an_own_export_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.toml", TINY);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    write(&out, "notes.txt", "years of work");
    // A report.json does not make a folder an export.
    write(&out, "report.json", "{\"espalier_version\": \"0.1.0\"}");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        espalier(&args, dir.path())
    };
    let o = run(&[]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("not an Espalier export") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stderr.contains("notes.txt"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "years of work"
    );
    assert!(temporaries(dir.path(), "out").is_empty());

    // Forced: replaced, and marked as an export.
    let o = run(&["--force"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(!out.join("notes.txt").exists());
    assert!(out.join(".espalier-export").is_file());
    // A previous export is replaced without force.
    let before = std::fs::read(out.join("report.json")).unwrap();
    let o = run(&[]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_ne!(std::fs::read(out.join("report.json")).unwrap(), before);
    // A file added to an export makes it foreign again.
    write(&out, "mine.txt", "keep");
    let o = run(&[]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("mine.txt"), "{:?}", text(&o));
    assert!(out.join("mine.txt").is_file());
    assert!(temporaries(dir.path(), "out").is_empty());

    // An empty folder may be used.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = espalier(
        &["run", p.to_str().unwrap(), "--out", empty.to_str().unwrap()],
        dir.path(),
    );
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(empty.join("model.safetensors").is_file());

    // From the pipeline file: the error names its line, and `force = true` forces.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    write(&foreign, "data.csv", "1,2");
    let q = write(
        dir.path(),
        "q.toml",
        &format!("{TINY}[export]\ndir = \"foreign\"\n"),
    );
    let o = espalier(&["run", q.to_str().unwrap()], dir.path());
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("q.toml:6:7: export.dir"),
        "{:?}",
        text(&o)
    );
    let q = write(
        dir.path(),
        "q.toml",
        &format!("{TINY}[export]\ndir = \"foreign\"\nforce = true\n"),
    );
    let o = espalier(&["run", q.to_str().unwrap()], dir.path());
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(!foreign.join("data.csv").exists());
}

#[test]
fn a_stale_temporary_folder_is_removed_by_the_next_export_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.toml", TINY);
    // i32::MAX is above any kernel's pid_max: that process cannot exist.
    let stale = dir.path().join(format!(".out.tmp-{}-42", i32::MAX));
    let live = dir
        .path()
        .join(format!(".out.tmp-{}-42", std::process::id()));
    let foreign = dir.path().join(".out.tmp-backup");
    for d in [&stale, &live, &foreign] {
        std::fs::create_dir(d).unwrap();
        write(d, "model.safetensors", "half-written");
    }
    let out = dir.path().join("out");
    let o = espalier(
        &["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()],
        dir.path(),
    );
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(!stale.exists(), "the stale temporary folder is removed");
    assert!(live.exists(), "a live process's folder is kept");
    assert!(foreign.exists(), "a folder not named by Espalier is kept");
    let mut left = temporaries(dir.path(), "out");
    left.sort();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// Starts a run that loops in its only stage, waits for its export's temporary folder, sends
/// `signal`, and checks the process exits with 128 + signal leaving no temporary folder.
fn interrupted_run_leaves_nothing(signal: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.toml", &looping("builtin:tiny-llama", 60));
    let out = dir.path().join("out");
    let mut child: Child = bin()
        .args(["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    // The temporary folder is reserved at planning, before the looping stage starts.
    while temporaries(dir.path(), "out").is_empty() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("no temporary folder appeared: {:?}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the stage start (the folder exists from planning on; the signal may come anywhere).
    std::thread::sleep(Duration::from_millis(200));
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: sends a signal to the child this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("espalier did not exit on signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let o = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(128 + signal), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("unfinished export was removed"),
        "{:?}",
        text(&o)
    );
    assert!(temporaries(dir.path(), "out").is_empty());
    assert!(!out.exists());
}

#[test]
fn sigint_removes_the_temporary_export_folder_and_exits_130() {
    interrupted_run_leaves_nothing(libc::SIGINT);
}

#[test]
fn sigterm_removes_the_temporary_export_folder_and_exits_143() {
    interrupted_run_leaves_nothing(libc::SIGTERM);
}

#[test]
fn describe_is_bound_by_the_pipelines_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let looping = wasm("hostile_describe_loop");
    // Named in a stage: planning describes it under timeout_s = 1, not the default 60 s.
    let p = write(
        dir.path(),
        "p.toml",
        &format!(
            "model = \"builtin:tiny-llama\"\n[sandbox]\ntimeout_s = 1\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
            looping.display().to_string()
        ),
    );
    let started = Instant::now();
    let o = espalier(&["run", p.to_str().unwrap(), "--no-export"], dir.path());
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("p.toml:5:1: stage[0].plugin")
            && stderr.contains("exceeded its time limit of 1.0 s"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // In a plugin folder: skipped with a warning after the pipeline's timeout, and the run
    // goes on with its own stages.
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(&looping, plugins.join("loop.wasm")).unwrap();
    let q = write(
        dir.path(),
        "q.toml",
        &format!("{TINY}[sandbox]\ntimeout_s = 1\n"),
    );
    let started = Instant::now();
    let o = espalier(
        &[
            "run",
            q.to_str().unwrap(),
            "--no-export",
            "--plugin-dir",
            plugins.to_str().unwrap(),
        ],
        dir.path(),
    );
    let (_, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped a plugin") && stderr.contains("time limit of 1.0 s"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_guest_panic_is_reported_by_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "p.toml",
        &format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
            wasm("hostile_panic").display().to_string()
        ),
    );
    let o = espalier(&["run", p.to_str().unwrap(), "--no-export"], dir.path());
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("panicked: hostile-panic gave up on 14 targets: the answer is not 42 (at testing/hostile-panic/src/lib.rs:"),
        "{stderr}"
    );
    assert!(!stderr.contains("unreachable"), "{stderr}");
    // Scheduled during fine-tuning, the same panic names the event's step as well.
    write(
        dir.path(),
        "train.txt",
        &"a training text of some length. ".repeat(40),
    );
    let p = write(
        dir.path(),
        "s.toml",
        &format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = {:?}\ndensity = 0.5\nschedule = {{ kind = \"linear\", start = 1, end = 2, every = 1 }}\n[finetune]\ntext = \"train.txt\"\nsteps = 2\nbatch = 1\nseq_len = 16\n",
            wasm("hostile_panic").display().to_string()
        ),
    );
    let o = espalier(&["run", p.to_str().unwrap(), "--no-export"], dir.path());
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("scheduled pruning after step 1")
            && stderr.contains("panicked: hostile-panic gave up on 14 targets"),
        "{stderr}"
    );
}

#[test]
fn plugin_text_reaches_the_terminal_escaped_and_capped() {
    let dir = tempfile::tempdir().unwrap();
    let noisy = wasm("hostile_noisy");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(&noisy, plugins.join("noisy.wasm")).unwrap();
    let o = espalier(
        &["plugins", "list", "--plugin-dir", plugins.to_str().unwrap()],
        dir.path(),
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert_inert(&stdout, "plugins list");
    assert!(stdout.contains("hostile-noisy\\u{1b}[2J"), "{stdout}");

    let o = espalier(&["plugins", "inspect", noisy.to_str().unwrap()], dir.path());
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    assert_inert(&stdout, "plugins inspect");
    assert!(stdout.len() < 64 << 10, "{} bytes shown", stdout.len());
    assert!(stdout.contains("more bytes not shown"), "{stdout}");
    // The JSON keeps the full text (escaped by JSON itself).
    let o = espalier(
        &["plugins", "inspect", noisy.to_str().unwrap(), "--json"],
        dir.path(),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["description"].as_str().unwrap().len() > 1 << 20);

    // A run: its printed lines (logged at info) and its 20 MB error.
    let p = write(
        dir.path(),
        "p.toml",
        &format!(
            "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
            noisy.display().to_string()
        ),
    );
    let o = bin()
        .args(["run", p.to_str().unwrap(), "--no-export"])
        .current_dir(dir.path())
        .env("ESPALIER_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success());
    assert_inert(&stdout, "run stdout");
    assert_inert(&stderr, "run stderr");
    assert!(stderr.len() < 128 << 10, "{} bytes on stderr", stderr.len());
    for expected in [
        "stdout says\\u{1b}[2J",
        "stderr says\\u{1b}[2J\\u{1b}]0;pwned-title\\u{7}",
        "\\r  ✓ forged-status\\u{202e}",
        "more lines not shown",
        "failed: \\u{1b}[2J",
        "more bytes not shown",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in {stderr:.3000}"
        );
    }
}

/// Runs `args` with standard output a pipe whose reading end is closed before the command
/// writes: it must end quietly (status 0), not panic.
fn closed_pipe(args: &[&str]) {
    let mut child = bin()
        .args(args)
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
}

#[test]
fn a_closed_output_pipe_ends_commands_quietly() {
    closed_pipe(&["model", "layers", "builtin:tiny-llama"]);
    closed_pipe(&["plugins", "list"]);
    closed_pipe(&["plugins", "inspect", "magnitude", "--json"]);
}

#[test]
fn overflowing_numbers_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (new_tokens, expected) in [
        ("18446744073709551615", "new tokens"),
        ("1000000000000", "new tokens"),
    ] {
        let o = espalier(
            &[
                "eval",
                "builtin:tiny-llama",
                "--window",
                "16",
                "--max-tokens",
                "32",
                "--new-tokens",
                new_tokens,
            ],
            &repo(),
        );
        let (_, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(expected) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
    let p = write(
        dir.path(),
        "p.toml",
        "model = \"builtin:tiny-llama\"\n[sandbox]\nhost_memory_mb = 17592186044416\n",
    );
    let o = espalier(&["run", p.to_str().unwrap(), "--no-export"], dir.path());
    let (_, stderr) = text(&o);
    // A pipeline that cannot be used: exit status 2 (bad input).
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("p.toml:3:18: sandbox.host_memory_mb:"),
        "{stderr}"
    );
}
