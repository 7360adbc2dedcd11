//! The hostile-plugin suite: the `espalier` binary runs a pipeline whose second stage is
//! `plugins/testing/hostile-calls`, once per attack (one host import, one kind of bad argument:
//! absurd, overflowing, empty, duplicated, dropped, forged, hoarding, or a malformed output; a
//! flood of `progress` reports; a planning-time `validate` that loops, traps or floods),
//! and every run must
//!
//! (a) end with a failure status of its own: no signal, no panic, no failed allocation, no
//!     abort, no hang;
//! (b) say on stderr which plugin failed and why (each attack lists the causes it accepts);
//! (c) stay within memory: the child's peak RSS, read from `wait4` for that child alone, at
//!     most the benign run's peak plus the declared host budget, the guest memory cap and a
//!     small constant;
//! (d) write nothing: neither the export folder nor a temporary sibling exists afterwards.
//!
//! Every attack runs, and one assertion at the end lists every broken guarantee; each run's
//! one-line summary goes to stderr (`cargo test --test hostile -- --nocapture`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The plugin's name, as its `describe` gives it (the host names plugins by it).
const PLUGIN: &str = "hostile-calls";
/// `[sandbox]` of every run.
const HOST_MB: u64 = 32;
const GUEST_MB: u64 = 64;
const TIMEOUT_S: f64 = 5.0;
/// What a run may hold beyond the benign run's peak, the host budget and the guest cap.
const SLACK_MB: u64 = 64;
/// A child still running after this is killed and counted as a hang.
const CHILD_LIMIT: Duration = Duration::from_secs(60);
/// Runs at a time (CI has two cores).
const PARALLEL: usize = 2;
/// A safety net for the machine, not the measure: a host that allocates without bound (what
/// this suite exists to catch) must not take the test machine with it, so each child's
/// private writable memory is capped (`RLIMIT_DATA`). Far above the RSS allowance, so a host
/// that keeps its budget never meets it; one that does not fails (c), or aborts and fails (a).
const DATA_LIMIT: u64 = 2 << 30;

/// What the plugin says when an attack's calls may legitimately succeed (the run still fails).
const DONE: &str = "ended without a host refusal";
/// What the plugin says when the host accepted a call it must refuse.
const UNREFUSED: &str = "UNREFUSED";

// Accepted causes, matched case-insensitively against stderr.
/// A handle the host never gave, or no longer holds.
const HANDLE: &[&str] = &["handle"];
/// Allocation beyond the host budget.
const BUDGET: &[&str] = &["budget"];
/// Creating without dropping: the host budget, or another limit of the sandbox.
const HOARD: &[&str] = &["budget", "limit", "live handles"];
/// A guest that fills its own memory (or runs out its time) with the answers of a host call.
const GUEST: &[&str] = &["memory limit", "time limit"];
/// A density outside [0, 1].
const DENSITY: &[&str] = &["density"];
/// An element count that overflows, or does not match the data.
const OVERFLOW: &[&str] = &[
    "overflow",
    "too large",
    "too many",
    "values",
    "elements",
    "entries",
];
/// An empty structure: refused, or answered correctly.
const EMPTY: &[&str] = &[DONE, "empty", "zero"];
/// A name the model does not have.
const UNKNOWN: &[&str] = &[
    "no weight",
    "no activation",
    "no gradient",
    "not a linear",
    "unknown layer",
    "unknown weight",
];

/// Every attack of the plugin, with the causes its run may report.
const ATTACKS: &[(&str, &[&str])] = &[
    ("tensor-shape-forged", HANDLE),
    ("tensor-shape-dropped", HANDLE),
    ("tensor-dtype-forged", HANDLE),
    ("tensor-dtype-dropped", HANDLE),
    ("tensor-numel-forged", HANDLE),
    ("tensor-numel-dropped", HANDLE),
    ("tensor-numel-mask-as-tensor", HANDLE),
    ("tensor-read-count-huge", &["exceeds", "limit", "outside"]),
    ("tensor-read-offset-overflow", &["outside", "overflow"]),
    ("tensor-read-past-end", &["outside"]),
    ("tensor-read-empty", &[DONE]),
    ("tensor-read-forged", HANDLE),
    ("tensor-read-dropped", HANDLE),
    ("tensor-read-rows-overflow", &["outside", "overflow"]),
    ("tensor-read-rows-past-end", &["outside"]),
    ("tensor-read-rows-not-2d", &["2-D"]),
    ("tensor-read-rows-empty", &[DONE]),
    ("tensor-read-rows-forged", HANDLE),
    ("tensor-read-rows-dropped", HANDLE),
    ("tensor-drop-forged", HANDLE),
    ("tensor-drop-twice", HANDLE),
    ("tensor-drop-mask-as-tensor", HANDLE),
    ("from-f32-count-wraps-to-zero", OVERFLOW),
    ("from-f32-count-overflows-u32", OVERFLOW),
    ("from-f32-count-overflows-u64", OVERFLOW),
    ("from-f32-length-mismatch", OVERFLOW),
    ("from-f32-over-budget", BUDGET),
    ("from-f32-zero-size", EMPTY),
    ("from-f32-hoard", BUDGET),
    ("mask-shape-forged", HANDLE),
    ("mask-shape-dropped", HANDLE),
    ("mask-density-forged", HANDLE),
    ("mask-density-dropped", HANDLE),
    ("mask-density-tensor-as-mask", HANDLE),
    ("mask-kept-forged", HANDLE),
    ("mask-kept-dropped", HANDLE),
    ("mask-structure-forged", HANDLE),
    ("mask-structure-dropped", HANDLE),
    ("mask-drop-forged", HANDLE),
    ("mask-drop-twice", HANDLE),
    ("unary-forged", HANDLE),
    ("unary-dropped", HANDLE),
    ("unary-mask-as-tensor", HANDLE),
    ("unary-hoard", BUDGET),
    ("binary-broadcast-huge", &["budget", "too large"]),
    ("binary-broadcast-over-budget", BUDGET),
    ("binary-shape-mismatch", &["broadcast"]),
    ("binary-forged", HANDLE),
    ("binary-dropped", HANDLE),
    ("scale-nan-factor", &[DONE, "finite", "NaN"]),
    ("scale-inf-factor", &[DONE, "finite", "inf"]),
    ("scale-forged", HANDLE),
    ("scale-dropped", HANDLE),
    ("reduce-axis-huge", &["axis"]),
    ("reduce-wrapped-shape", OVERFLOW),
    ("reduce-max-zero-rows", EMPTY),
    ("reduce-forged", HANDLE),
    ("reduce-dropped", HANDLE),
    ("group-norms-zero-block", &["positive"]),
    ("group-norms-zero-m", &["positive", "invalid"]),
    ("group-norms-nan-p", &[DONE, "finite", "NaN"]),
    ("group-norms-rows-zero-cols", EMPTY),
    ("group-norms-columns-zero-rows", EMPTY),
    ("group-norms-wrapped-shape", OVERFLOW),
    ("group-norms-forged", HANDLE),
    ("group-norms-dropped", HANDLE),
    ("select-nan-density", DENSITY),
    ("select-inf-density", DENSITY),
    ("select-negative-density", DENSITY),
    ("select-n-greater-than-m", &["n:m", "n = 3"]),
    ("select-row-groups-huge", &["groups of"]),
    ("select-rows-zero-cols", EMPTY),
    ("select-columns-zero-rows", EMPTY),
    ("select-blocks-empty", EMPTY),
    ("select-n-of-m-zero-rows", EMPTY),
    ("select-wrapped-shape", OVERFLOW),
    ("select-forged", HANDLE),
    ("select-dropped", HANDLE),
    ("select-hoard", HOARD),
    (
        "select-global-duplicate-huge",
        &["budget", "twice", "duplicate", "more than once"],
    ),
    ("select-global-empty-list", &[DONE, "empty", "no tensors"]),
    ("select-global-nan-density", DENSITY),
    ("select-global-forged", HANDLE),
    ("select-global-dropped", HANDLE),
    ("select-global-hoard", HOARD),
    ("select-per-row-nan-density", DENSITY),
    ("select-per-row-not-2d", &["2-D"]),
    ("select-per-row-zero-cols", EMPTY),
    ("select-per-row-wrapped-shape", OVERFLOW),
    ("select-per-row-forged", HANDLE),
    ("select-per-row-dropped", HANDLE),
    ("mask-from-bytes-length-mismatch", OVERFLOW),
    ("mask-from-bytes-wrapped-shape", OVERFLOW),
    ("mask-from-bytes-count-overflows-u64", OVERFLOW),
    ("mask-from-bytes-rows-zero-cols", EMPTY),
    ("mask-from-bytes-columns-zero-rows", EMPTY),
    ("mask-from-bytes-row-groups-zero-cols", EMPTY),
    ("mask-from-bytes-column-groups-zero-rows", EMPTY),
    ("mask-from-bytes-blocks-empty", EMPTY),
    ("mask-from-bytes-n-of-m-zero-rows", EMPTY),
    ("mask-from-bytes-over-budget", BUDGET),
    ("mask-from-bytes-hoard", HOARD),
    ("mask-and-shape-mismatch", &["shapes"]),
    ("mask-and-forged", HANDLE),
    ("mask-and-dropped", HANDLE),
    ("mask-and-tensor-as-mask", HANDLE),
    ("mask-and-hoard", HOARD),
    ("model-info-hoard", GUEST),
    ("model-layers-hoard", GUEST),
    ("model-weight-unknown", UNKNOWN),
    ("model-weight-empty-name", UNKNOWN),
    ("model-weight-huge-name", UNKNOWN),
    ("model-weight-hoard", HOARD),
    ("model-current-mask-unknown", &[DONE]),
    ("model-current-mask-huge-name", &[DONE]),
    ("model-current-mask-hoard", HOARD),
    ("calibration-info-hoard", GUEST),
    ("calibration-activation-norms-unknown", UNKNOWN),
    ("calibration-activation-norms-empty-name", UNKNOWN),
    ("calibration-activation-norms-huge-name", UNKNOWN),
    ("calibration-activation-norms-hoard", HOARD),
    ("calibration-loss-hoard", GUEST),
    ("calibration-loss-with-mask-unknown-layer", UNKNOWN),
    ("calibration-loss-with-mask-empty-name", UNKNOWN),
    ("calibration-loss-with-mask-shape-mismatch", &["shape"]),
    ("calibration-loss-with-mask-zero-size", &["shape"]),
    ("calibration-loss-with-mask-forged", HANDLE),
    ("calibration-loss-with-mask-dropped", HANDLE),
    ("calibration-loss-with-mask-tensor-as-mask", HANDLE),
    ("calibration-loss-with-masks-same-layer-twice", &["twice"]),
    (
        "calibration-loss-with-masks-duplicate-huge",
        // wasmtime's own per-call handle limit may refuse the list before the host sees it.
        &["twice", "budget", "handle limit"],
    ),
    ("calibration-loss-with-masks-unknown-layer", UNKNOWN),
    ("calibration-loss-with-masks-empty-list", &[DONE]),
    ("calibration-loss-with-masks-forged", HANDLE),
    ("calibration-loss-with-masks-dropped", HANDLE),
    ("calibration-gradients-unknown", UNKNOWN),
    ("calibration-gradients-huge-name", UNKNOWN),
    ("calibration-gradients-hoard", HOARD),
    ("calibration-fisher-unknown", UNKNOWN),
    ("calibration-fisher-empty-name", UNKNOWN),
    ("calibration-fisher-hoard", HOARD),
    ("output-mask-unknown-layer", &["not a target"]),
    ("output-mask-huge-layer-name", &["not a target"]),
    ("output-same-mask-two-layers", HANDLE),
    ("output-dropped-mask", HANDLE),
    ("output-forged-mask", HANDLE),
    ("output-tensor-as-mask", HANDLE),
    ("output-duplicate-layer", &["two masks"]),
    ("output-missing-mask", &["no mask for target"]),
    ("output-zero-size-mask", &["shape"]),
    ("output-wrapped-shape-mask", OVERFLOW),
    ("output-budgets-from-mask-plugin", &["budgets"]),
    ("progress-flood", &[DONE]),
    ("progress-huge-message", &[DONE]),
    ("progress-absurd-counts", &[DONE]),
    ("validate-loop", &["time limit"]),
    ("validate-trap", &["crashed"]),
    ("validate-flood", &["more problems"]),
];

fn plugin_path() -> PathBuf {
    let path = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_hostile_calls.wasm");
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

fn calibration_text() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/calibration.txt")
}

/// A magnitude stage first, so earlier masks exist (`current-mask` has something to return),
/// then the attack; calibration for the calibration imports; an export that must not happen.
fn pipeline(attack: &str) -> String {
    format!(
        "model = \"builtin:tiny-llama\"\n\
         [sandbox]\ntimeout_s = {TIMEOUT_S}\nmemory_mb = {GUEST_MB}\nhost_memory_mb = {HOST_MB}\n\
         [calibration]\ntext = {:?}\nsamples = 2\nseq_len = 16\n\
         [[stage]]\nname = \"before\"\nplugin = \"magnitude\"\ndensity = 0.9\n\
         [[stage]]\nname = \"hostile\"\nplugin = {:?}\ndensity = 0.5\nattack = {attack:?}\n\
         [export]\ndir = \"out\"\n",
        calibration_text().display().to_string(),
        plugin_path().display().to_string(),
    )
}

/// How a child ended.
#[derive(Debug)]
enum Ended {
    Exited(i32),
    Signaled(i32),
    /// Killed after [`CHILD_LIMIT`].
    Hung,
}

/// One run of the binary.
struct Outcome {
    ended: Ended,
    stderr: String,
    /// Peak resident set of the child alone, in bytes.
    peak_rss: u64,
    wall: Duration,
    /// What the working folder holds afterwards besides the pipeline file.
    left_behind: Vec<String>,
}

/// Runs `espalier run` on the attack's pipeline in a fresh folder and reaps the child with
/// `wait4`, whose `rusage` is that child's own.
fn run_attack(attack: &str) -> Outcome {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("pipeline.toml"), pipeline(attack)).unwrap();
    let stderr_path = root.path().join("stderr");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_espalier"));
    cmd.args(["run", "pipeline.toml"])
        .current_dir(&work)
        .env_remove("ESPALIER_PLUGIN_DIR")
        .env_remove("RUST_LOG")
        // Messages as a user sees them by default: a backtrace captured into an error (candle
        // does when these are set) costs hundreds of MiB of RSS to symbolise, which is not
        // the host's own memory use.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let data = libc::rlimit {
                rlim_cur: DATA_LIMIT,
                rlim_max: DATA_LIMIT,
            };
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_DATA, &data) != 0
                || libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn espalier");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut hung = false;
    loop {
        // SAFETY: `pid` is our unreaped child; status and usage are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert!(r == 0, "wait4 failed: {}", std::io::Error::last_os_error());
        if started.elapsed() > CHILD_LIMIT && !hung {
            hung = true;
            // SAFETY: the child is not reaped yet, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = started.elapsed();
    drop(child);
    let ended = if hung {
        Ended::Hung
    } else if libc::WIFEXITED(status) {
        Ended::Exited(libc::WEXITSTATUS(status))
    } else {
        Ended::Signaled(libc::WTERMSIG(status))
    };
    let stderr = String::from_utf8_lossy(&std::fs::read(&stderr_path).unwrap()).into_owned();
    let left_behind = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "pipeline.toml")
        .collect();
    Outcome {
        ended,
        stderr,
        // ru_maxrss is in KiB on Linux.
        peak_rss: usage.ru_maxrss as u64 * 1024,
        wall,
        left_behind,
    }
}

/// The last line of stderr, shortened (plugin messages can be huge).
fn last_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let mut s: String = line.chars().take(240).collect();
    if s.len() < line.len() {
        s.push_str("...");
    }
    s
}

/// The guarantees (a)–(d) a failed run broke, if any.
fn broken(outcome: &Outcome, causes: &[&str], rss_limit: u64) -> Vec<String> {
    let mut why = Vec::new();
    let err = &outcome.stderr;
    match outcome.ended {
        Ended::Exited(0) => why.push("the run succeeded".to_string()),
        Ended::Exited(_) => {}
        Ended::Signaled(sig) => why.push(format!("killed by signal {sig}")),
        Ended::Hung => why.push(format!(
            "still running after {} s (killed)",
            CHILD_LIMIT.as_secs()
        )),
    }
    for bad in ["panicked", "memory allocation of", "abort"] {
        if let Some(line) = err.lines().find(|l| l.contains(bad)) {
            let line: String = line.chars().take(240).collect();
            why.push(format!("stderr has `{bad}`: {line}"));
        }
    }
    if err.contains(UNREFUSED) {
        why.push("the host accepted a call it must refuse".into());
    }
    if !err.contains(PLUGIN) {
        why.push(format!("stderr does not name the plugin `{PLUGIN}`"));
    }
    let lower = err.to_lowercase();
    if !causes.iter().any(|c| lower.contains(&c.to_lowercase())) {
        why.push(format!("stderr names none of the causes {causes:?}"));
    }
    if outcome.peak_rss > rss_limit {
        why.push(format!(
            "peak RSS {} MiB over the limit of {} MiB",
            outcome.peak_rss >> 20,
            rss_limit >> 20
        ));
    }
    if !outcome.left_behind.is_empty() {
        why.push(format!("left behind {:?}", outcome.left_behind));
    }
    why
}

#[test]
fn every_hostile_call_fails_its_run_within_budget_and_writes_nothing() {
    let suite = Instant::now();

    // The benign run: it must succeed and export (so "nothing written" below means something),
    // and its peak RSS is the baseline.
    let benign = run_attack("benign");
    assert!(
        matches!(benign.ended, Ended::Exited(0)),
        "the benign run failed ({:?}): {}",
        benign.ended,
        benign.stderr
    );
    assert_eq!(
        benign.left_behind,
        vec!["out".to_string()],
        "the benign run exports to out/ and nothing else"
    );
    let rss_limit = benign.peak_rss + ((HOST_MB + GUEST_MB + SLACK_MB) << 20);
    eprintln!(
        "hostile: baseline {} MiB peak RSS ({:.1} s); limit {} MiB",
        benign.peak_rss >> 20,
        benign.wall.as_secs_f64(),
        rss_limit >> 20
    );

    // The suite drives exactly the plugin's attacks: the names of its table, read from its
    // source (each entry is `("name", |c| ...)`, however rustfmt breaks its lines).
    let source: String = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/testing/hostile-calls/src/lib.rs"),
    )
    .unwrap()
    .chars()
    .filter(|c| !c.is_whitespace())
    .collect();
    let (_, table) = source
        .split_once("staticATTACKS")
        .expect("the plugin has a `static ATTACKS` table");
    let listed: BTreeSet<&str> = table
        .split("(\"")
        .filter_map(|piece| piece.split_once("\",|").map(|(name, _)| name))
        .filter(|n| {
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .filter(|n| *n != "benign")
        .collect();
    let driven: BTreeSet<&str> = ATTACKS.iter().map(|(n, _)| *n).collect();
    assert_eq!(driven.len(), ATTACKS.len(), "an attack is listed twice");
    assert_eq!(
        listed, driven,
        "the plugin's attacks and this suite's table differ"
    );

    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(name, causes)) = ATTACKS.get(i) else {
                        break;
                    };
                    let outcome = run_attack(name);
                    let why = broken(&outcome, causes, rss_limit);
                    let status = match outcome.ended {
                        Ended::Exited(c) => format!("exit {c}"),
                        Ended::Signaled(s) => format!("signal {s}"),
                        Ended::Hung => "hung".into(),
                    };
                    eprintln!(
                        "hostile: {name:<46} {status:<9} {:>5.1} s {:>5} MiB  {}  | {}",
                        outcome.wall.as_secs_f64(),
                        outcome.peak_rss >> 20,
                        if why.is_empty() { "ok" } else { "BROKEN" },
                        last_line(&outcome.stderr)
                    );
                    if !why.is_empty() {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{name}: {}", why.join("; ")));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    eprintln!(
        "hostile: {} attacks in {:.1} s, {} broke a guarantee",
        ATTACKS.len(),
        suite.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} attacks broke a guarantee:\n{}",
        failures.len(),
        ATTACKS.len(),
        failures.join("\n")
    );
}
