//! The application core as both front ends use it: the event stream of a run, cancellation
//! between stages, inside calibration passes and inside evaluation (each triggered by the event
//! that proves the run is there, so the tests do not depend on timing), stable error kinds, and
//! a registry that changes while a planned run keeps its plugin versions.

use std::path::{Path, PathBuf};

use espalier::app::{AppError, ErrorKind, RunOverrides};
use espalier::cancel::CancelToken;
use espalier::events::RunEvent;
use espalier::pipeline::Pipeline;
use espalier::plugin::registry::load_file;

#[allow(dead_code)] // the helpers other test binaries use
mod common;
use common::app;

const TINY: &str = "model = \"builtin:tiny-llama\"\n";

fn text(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name)
}

fn no_export() -> RunOverrides {
    RunOverrides {
        no_export: true,
        ..RunOverrides::default()
    }
}

/// Runs `pipeline` text, calling `on_event` for every event with the run's token.
fn run_with(
    pipeline: &str,
    mut on_event: impl FnMut(&RunEvent, &CancelToken) + Send,
) -> (Result<espalier::app::RunResult, AppError>, Vec<RunEvent>) {
    let p = Pipeline::parse("events.toml", pipeline).unwrap();
    let cancel = CancelToken::new();
    let mut seen = Vec::new();
    let result = app().run_pipeline(
        p,
        &no_export(),
        &mut |e: RunEvent| {
            on_event(&e, &cancel);
            seen.push(e);
        },
        &cancel,
    );
    (result, seen)
}

fn kinds(events: &[RunEvent]) -> Vec<&'static str> {
    events.iter().map(RunEvent::kind).collect()
}

#[test]
fn a_run_reports_every_step_in_order() {
    let pipeline = format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"n-m\"\nn = 2\nm = 4\n[evaluate]\ntext = {:?}\nwindow = 32\nmax_tokens = 128\n",
        text("eval.txt").display().to_string()
    );
    let (result, events) = run_with(&pipeline, |_, _| {});
    result.unwrap();
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&"run-started"), "{k:?}");
    assert_eq!(k.last(), Some(&"run-finished"), "{k:?}");
    let order = [
        "evaluation-started",
        "evaluation-finished",
        "stage-started",
        "stage-finished",
        "stage-started",
        "stage-finished",
        "evaluation-started",
        "evaluation-finished",
    ];
    let mut at = 0;
    for kind in k.iter().filter(|k| order.contains(k)) {
        assert_eq!(*kind, order[at], "{k:?}");
        at += 1;
    }
    assert_eq!(at, order.len(), "{k:?}");
    let RunEvent::RunStarted {
        plugins, stages, ..
    } = &events[0]
    else {
        unreachable!()
    };
    assert_eq!(*stages, 2);
    assert_eq!(plugins.len(), 2);
    // Every event serialises with its kind as `type`.
    for e in &events {
        assert_eq!(serde_json::to_value(e).unwrap()["type"], e.kind());
    }
}

#[test]
fn calibration_passes_report_real_progress_from_zero_to_all_sequences() {
    let pipeline = format!(
        "{TINY}[calibration]\ntext = {:?}\nsamples = 5\nseq_len = 32\n[[stage]]\nplugin = \"wanda\"\ndensity = 0.5\n[[stage]]\nplugin = \"taylor\"\ndensity = 0.5\n",
        text("calibration.txt").display().to_string()
    );
    let (result, events) = run_with(&pipeline, |_, _| {});
    result.unwrap();
    for wanted in ["activation statistics", "gradients"] {
        let steps: Vec<(usize, usize)> = events
            .iter()
            .filter_map(|e| match e {
                RunEvent::CalibrationProgress {
                    pass, done, total, ..
                } if pass == wanted => Some((*done, *total)),
                _ => None,
            })
            .collect();
        // Starts at 0 (no bar reads full before the work), ends at every sequence, never
        // goes back.
        assert_eq!(steps.first(), Some(&(0, 5)), "{wanted}: {steps:?}");
        assert_eq!(steps.last(), Some(&(5, 5)), "{wanted}: {steps:?}");
        assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "{steps:?}");
    }
}

#[test]
fn cancelling_between_stages_skips_the_rest() {
    let pipeline = format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"n-m\"\nn = 2\nm = 4\n"
    );
    let (result, events) = run_with(&pipeline, |e, cancel| {
        if matches!(e, RunEvent::StageFinished { index: 0, .. }) {
            cancel.cancel();
        }
    });
    let err = result.err().expect("cancelled");
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    let k = kinds(&events);
    assert_eq!(
        k.iter().filter(|k| **k == "stage-started").count(),
        1,
        "{k:?}"
    );
    assert_eq!(k.last(), Some(&"run-cancelled"), "{k:?}");
}

#[test]
fn cancelling_stops_calibration_and_evaluation_midway() {
    // Calibration: cancelled when the stage announces its activation pass; the pass stops at
    // the next sequence and the plugin is never called.
    let pipeline = format!(
        "{TINY}[calibration]\ntext = {:?}\nsamples = 64\nseq_len = 64\n[[stage]]\nplugin = \"wanda\"\ndensity = 0.5\n",
        text("calibration.txt").display().to_string()
    );
    let (result, events) = run_with(&pipeline, |e, cancel| {
        if let RunEvent::StageProgress { step, .. } = e
            && step.starts_with("calibration")
        {
            cancel.cancel();
        }
    });
    assert_eq!(result.err().map(|e| e.kind()), Some(ErrorKind::Cancelled));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, RunEvent::StageProgress { step, .. } if step.contains("plugin"))),
        "{:?}",
        kinds(&events)
    );

    // Evaluation: cancelled after the first window of the dense evaluation.
    let pipeline = format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[evaluate]\ntext = {:?}\nwindow = 32\nmax_tokens = 2048\n",
        text("eval.txt").display().to_string()
    );
    let (result, events) = run_with(&pipeline, |e, cancel| {
        if matches!(
            e,
            RunEvent::EvaluationProgress {
                windows_done: 1,
                ..
            }
        ) {
            cancel.cancel();
        }
    });
    assert_eq!(result.err().map(|e| e.kind()), Some(ErrorKind::Cancelled));
    let windows = events
        .iter()
        .filter(|e| matches!(e, RunEvent::EvaluationProgress { .. }))
        .count();
    assert_eq!(windows, 1, "the evaluation went on after the cancel");
    assert!(!kinds(&events).contains(&"stage-started"));
}

#[test]
fn cancelling_interrupts_a_plugin_that_never_returns() {
    let looping = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_hostile_loop.wasm");
    let pipeline = format!(
        "{TINY}[sandbox]\ntimeout_s = 600\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
        looping.display().to_string()
    );
    let started = std::time::Instant::now();
    let (result, _) = run_with(&pipeline, |e, cancel| {
        if let RunEvent::StageProgress { step, .. } = e
            && step.contains("plugin")
        {
            // The guest is about to spin; cancel from another thread a little later.
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                cancel.cancel();
            });
        }
    });
    let err = result.err().expect("cancelled");
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    // Far below the 600 s deadline: the epoch callback saw the token.
    assert!(started.elapsed().as_secs() < 60, "{:?}", started.elapsed());
}

#[test]
fn errors_carry_stable_kinds() {
    let (result, events) = run_with(
        &format!(
            "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\ntargets = [\"nothing-matches\"]\n"
        ),
        |_, _| {},
    );
    let err = result.err().expect("no target");
    assert_eq!(err.kind(), ErrorKind::InvalidPipeline, "{err}");
    let last = serde_json::to_value(events.last().unwrap()).unwrap();
    assert_eq!(last["type"], "run-failed");
    assert_eq!(last["kind"], "invalid-pipeline");

    let trap = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_hostile_trap.wasm");
    let (result, _) = run_with(
        &format!(
            "{TINY}[[stage]]\nplugin = {:?}\ndensity = 0.5\n",
            trap.display().to_string()
        ),
        |_, _| {},
    );
    assert_eq!(
        result.err().map(|e| e.kind()),
        Some(ErrorKind::PluginFailed)
    );
}

#[test]
fn a_planned_run_keeps_its_plugin_versions_while_the_registry_changes() {
    let before = app().registry();
    let sha = before.get("magnitude").unwrap().compiled.sha256.clone();
    // Another plugin registered under the built-in's name shadows it for new snapshots only.
    let other = load_file(
        &app().runtime,
        &PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
            .join("espalier_test_slow_magnitude.wasm"),
    )
    .unwrap();
    let mut shadow = other.clone();
    shadow.info.name = "magnitude".into();
    shadow.origin = espalier::plugin::Origin::File("shadow.wasm".into());
    let registry = espalier::plugin::registry::SharedRegistry::new((*before).clone());
    let held = registry.snapshot();
    registry.update(|r| {
        r.insert(shadow);
    });
    assert_eq!(held.get("magnitude").unwrap().compiled.sha256, sha);
    let now = registry.snapshot();
    assert_ne!(now.get("magnitude").unwrap().compiled.sha256, sha);
    assert!(now.shadows_builtin("magnitude"));
    // Removing the file brings the built-in back.
    registry.update(|r| r.remove_file(Path::new("shadow.wasm")));
    assert_eq!(
        registry
            .snapshot()
            .get("magnitude")
            .unwrap()
            .compiled
            .sha256,
        sha
    );
}

/// The hostile test plugin (`plugins/testing/hostile-calls`) running `attack` after no other
/// stage, with calibration (it declares every need).
fn hostile(attack: &str) -> String {
    format!(
        "{TINY}[sandbox]\ntimeout_s = 5\n[calibration]\ntext = {:?}\nsamples = 2\nseq_len = 16\n[[stage]]\nname = \"hostile\"\nplugin = {:?}\ndensity = 0.5\nattack = {attack:?}\n",
        text("calibration.txt").display().to_string(),
        PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
            .join("espalier_test_hostile_calls.wasm")
            .display()
            .to_string()
    )
}

/// The `(done, total, step)` of every progress report a plugin made, in order.
fn plugin_progress(events: &[RunEvent]) -> Vec<(u64, u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            RunEvent::StageProgress {
                done: Some(done),
                total: Some(total),
                step,
                ..
            } => Some((*done, *total, step.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_plugin_reports_its_progress_as_stage_progress_events() {
    // `sensitivity` reports every loss trial: 4 layers of block 0 x 3 probes here.
    let pipeline = format!(
        "{TINY}[calibration]\ntext = {:?}\nsamples = 2\nseq_len = 16\n[[stage]]\nplugin = \"sensitivity\"\ntargets = [\"*.layers.0.self_attn.*\"]\ndensity = 0.5\ngranularity = \"layer\"\n",
        text("calibration.txt").display().to_string()
    );
    let (result, events) = run_with(&pipeline, |_, _| {});
    result.unwrap();
    let reports = plugin_progress(&events);
    assert!(reports.len() >= 2, "{reports:?}");
    let total = reports[0].1;
    assert_eq!(total, 12, "{reports:?}");
    // No bar reads full before the work starts: the first report is at 0 of the total, and
    // the counts only grow, to the total.
    assert_eq!(reports[0].0, 0, "{reports:?}");
    assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0), "{reports:?}");
    assert_eq!(reports.last().map(|r| r.0), Some(total), "{reports:?}");
    assert!(reports[0].2.contains("loss trial 1/12"), "{reports:?}");
    // They arrive inside the stage: after its start, before its end, with its index.
    let k = kinds(&events);
    let first = events
        .iter()
        .position(|e| matches!(e, RunEvent::StageProgress { done: Some(_), .. }))
        .unwrap();
    let started = k.iter().position(|k| *k == "stage-started").unwrap();
    let finished = k.iter().position(|k| *k == "stage-finished").unwrap();
    assert!(started < first && first < finished, "{k:?}");
    // The daemon streams events as this JSON: the counts are in it.
    let json = serde_json::to_value(&events[first]).unwrap();
    assert_eq!(json["type"], "stage-progress");
    assert_eq!(
        (json["done"].as_u64(), json["total"].as_u64()),
        (Some(0), Some(12))
    );
}

#[test]
fn a_plugin_flooding_the_progress_import_cannot_flood_the_run() {
    // Two million reports in a tight loop: a handful arrive, the first and the last.
    let started = std::time::Instant::now();
    let (result, events) = run_with(&hostile("progress-flood"), |_, _| {});
    let err = result.err().expect("the attack fails its run").to_string();
    assert!(err.contains("ended without a host refusal"), "{err}");
    let reports = plugin_progress(&events);
    assert!(
        (2..=100).contains(&reports.len()),
        "{} reports",
        reports.len()
    );
    assert_eq!(reports[0].0, 0);
    assert_eq!(
        reports.last().map(|r| (r.0, r.1)),
        Some((2_000_000, 2_000_000))
    );
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());

    // Messages of 16 MiB full of terminal escapes arrive escaped and short.
    let (result, events) = run_with(&hostile("progress-huge-message"), |_, _| {});
    assert!(result.is_err());
    let reports = plugin_progress(&events);
    assert!(!reports.is_empty());
    for (_, _, step) in &reports {
        assert!(step.len() < 512, "{} bytes", step.len());
        assert!(!step.chars().any(char::is_control), "{step:?}");
    }

    // Absurd counts: done never exceeds a known total, and a total of 0 shows no bar.
    let (result, events) = run_with(&hostile("progress-absurd-counts"), |_, _| {});
    assert!(result.is_err());
    for (done, total, _) in plugin_progress(&events) {
        assert!(total > 0 && done <= total, "{done}/{total}");
    }
}

#[test]
fn a_validate_that_traps_loops_or_floods_fails_at_planning_without_harm() {
    for (attack, kind, says) in [
        (
            "validate-trap",
            ErrorKind::PluginFailed,
            "checking its parameters at planning",
        ),
        ("validate-loop", ErrorKind::PluginFailed, "time limit"),
        (
            "validate-flood",
            ErrorKind::InvalidPipeline,
            "more problems in this stage",
        ),
    ] {
        let (result, events) = run_with(&hostile(attack), |_, _| {});
        let err = result.err().expect("refused");
        assert_eq!(err.kind(), kind, "{attack}: {err}");
        let shown = err.to_string();
        assert!(shown.contains(says), "{attack}: {shown:.400}");
        assert!(shown.len() < 64 << 10, "{attack}: {} bytes", shown.len());
        assert!(!shown.contains('\u{1b}'), "{attack}: {shown:.400}");
        // Nothing ran: planning failed before the run started.
        assert_eq!(kinds(&events), ["run-failed"], "{attack}");
    }
}

#[test]
fn plugins_of_every_served_version_plan_and_run_together() {
    // 0.1 to 0.3 (no `validate`) next to 0.4, 0.5 and 0.6 ones (validated): all plan and run.
    let legacy = |stem: &str| {
        PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
            .join(format!("espalier_test_{stem}.wasm"))
            .display()
            .to_string()
    };
    let pipeline = format!(
        "{TINY}[calibration]\ntext = {:?}\nsamples = 2\nseq_len = 16\n[[stage]]\nplugin = {:?}\ndensity = 0.9\n[[stage]]\nplugin = {:?}\ndensity = 0.8\n[[stage]]\nplugin = {:?}\ndensity = 0.7\n[[stage]]\nplugin = {:?}\ndensity = 0.6\n[[stage]]\nplugin = {:?}\ndensity = 0.55\n[[stage]]\nplugin = \"n-m\"\n",
        text("calibration.txt").display().to_string(),
        legacy("legacy_v01"),
        legacy("legacy_v02"),
        legacy("legacy_v03"),
        legacy("legacy_v04"),
        legacy("legacy_v05"),
    );
    let (result, events) = run_with(&pipeline, |_, _| {});
    let result = result.unwrap();
    assert_eq!(
        kinds(&events)
            .iter()
            .filter(|k| **k == "stage-finished")
            .count(),
        6
    );
    let v04 = &result.report.stages[3];
    assert_eq!(v04.plugin, "legacy-v04");
    assert!(v04.density_after <= 0.6 + 0.01, "{}", v04.density_after);
    let v05 = &result.report.stages[4];
    assert_eq!(v05.plugin, "legacy-v05");
    assert!(v05.density_after <= 0.55 + 0.01, "{}", v05.density_after);
    // A 0.4 plugin's `validate` still runs (through the 0.4 world) and its problem is reported
    // at the line of the parameter it names.
    let refused = format!(
        "{TINY}[[stage]]\nplugin = {:?}\ndensity = 0.5\nrefuse = true\n",
        legacy("legacy_v04")
    );
    let (result, _) = run_with(&refused, |_, _| {});
    let err = result.err().expect("refused").to_string();
    assert!(err.contains("refused by a 0.4 plugin"), "{err}");
    assert!(err.contains("events.toml:5"), "{err}");
    // So does a 0.5 plugin's, through the 0.5 world.
    let refused = format!(
        "{TINY}[[stage]]\nplugin = {:?}\ndensity = 0.5\nrefuse = true\n",
        legacy("legacy_v05")
    );
    let (result, _) = run_with(&refused, |_, _| {});
    let err = result.err().expect("refused").to_string();
    assert!(err.contains("refused by a 0.5 plugin"), "{err}");
    assert!(err.contains("events.toml:5"), "{err}");
}

/// A scheduled `wanda` stage (calibration statistics taken afresh on the model as trained at
/// each event) does not run before the fine-tune: its events come between the steps, as
/// `finetune-pruned` at the schedule's densities, and its stage report after the fine-tune.
#[test]
fn scheduled_stages_prune_between_finetune_steps() {
    let pipeline = format!(
        "{TINY}[calibration]\ntext = {cal:?}\nsamples = 2\nseq_len = 16\n[[stage]]\nplugin = \"wanda\"\ndensity = 0.4\nschedule = {{ kind = \"cubic\", end = 2, every = 1 }}\n[finetune]\ntext = {cal:?}\nsteps = 3\nbatch = 1\nseq_len = 16\nlr = 0.001\nwarmup = 0\n",
        cal = text("calibration.txt").display().to_string()
    );
    let (result, events) = run_with(&pipeline, |_, _| {});
    let result = result.unwrap();
    let k: Vec<&str> = kinds(&events)
        .into_iter()
        .filter(|k| k.starts_with("finetune") || k.starts_with("stage-"))
        .collect();
    assert_eq!(
        k,
        [
            "finetune-started",
            "finetune-pruned",
            "finetune-progress",
            "finetune-pruned",
            "finetune-progress",
            "finetune-pruned",
            "finetune-progress",
            "finetune-finished",
            "stage-finished",
        ],
        "{k:?}"
    );
    let pruned: Vec<(u64, f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::FinetunePruned { event } => {
                Some((event.step, event.target_density, event.density))
            }
            _ => None,
        })
        .collect();
    // Cubic from 1.0 to 0.4 over steps 0..=2: 1.0, 0.4 + 0.6 / 8, 0.4.
    let want = [(0, 1.0), (1, 0.475), (2, 0.4)];
    for ((step, target, reached), (s, d)) in pruned.iter().zip(want) {
        assert_eq!(*step, s);
        assert!((target - d).abs() < 1e-12, "{pruned:?}");
        assert!((reached - d).abs() < 0.01, "{pruned:?}");
    }
    let stage = &result.report.stages[0];
    assert!((stage.density_after - 0.4).abs() < 0.01, "{stage:?}");
    assert!((result.report.summary.block_linear_density - 0.4).abs() < 0.01);
}

/// Magnitude pruning to 50%, then `plugin` (rigl or set, with `extra` stage lines) updating the
/// masks every 2 steps of a 6-step fine-tune (after steps 2 and 4), a checkpoint after every
/// step in `dir`.
fn dynamic_pipeline(plugin: &str, extra: &str, dir: &Path) -> String {
    format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = {plugin:?}\nupdate = {{ every = 2, end = 1.0, drop_fraction = 0.3 }}\n{extra}[finetune]\ntext = {cal:?}\nsteps = 6\nbatch = 1\nseq_len = 16\nlr = 0.01\nwarmup = 0\ncheckpoint_every = 1\ncheckpoint_dir = {dir:?}\n",
        cal = text("calibration.txt").display().to_string(),
        dir = dir.display().to_string()
    )
}

/// Every masked layer's flags, weights as bits, by name.
fn masked_weights(state: &espalier::run::RunState) -> Vec<(String, Vec<bool>, Vec<u32>)> {
    state
        .masks
        .iter()
        .map(|(name, mask)| {
            let w = state.model.weight(name).unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                name.clone(),
                mask.keep().to_vec(),
                w.iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

/// Checks one fine-tuning checkpoint: every layer keeps exactly half its weights (as the
/// magnitude stage left it), and the weights and both AdamW moments are exact zeros wherever
/// its mask prunes. Returns the layers checked.
fn check_checkpoint(path: &Path) -> usize {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut layers = 0;
    for (key, keep) in tensors.iter().filter(|(k, _)| k.starts_with("keep/")) {
        let name = &key["keep/".len()..];
        let keep = keep.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let want = (keep.len() as f64 * 0.5).round() as usize;
        assert_eq!(keep.iter().filter(|k| **k != 0).count(), want, "{name}");
        for prefix in ["weight", "m", "v"] {
            let t = tensors[&format!("{prefix}/{name}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (x, k) in t.iter().zip(&keep) {
                assert!(
                    *k != 0 || x.to_bits() == 0,
                    "{prefix}/{name}: a pruned value"
                );
            }
        }
        layers += 1;
    }
    layers
}

/// RigL end to end on the tiny model: two updates (after steps 2 and 4) swap weights in every
/// layer, each layer keeps exactly its count, and every checkpoint holds the masked-weights-
/// stay-zero invariant in weights and moments; the updates are events, report entries and the
/// stage's report.
#[test]
fn rigl_swaps_weights_at_constant_density_during_finetuning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("finetune-checkpoint.safetensors");
    let mut checked = 0;
    let (result, events) = run_with(&dynamic_pipeline("rigl", "", dir.path()), |e, _| {
        // At each step the checkpoint on disk is the previous step's.
        if matches!(e, RunEvent::FinetuneProgress { .. }) && path.exists() {
            assert!(check_checkpoint(&path) > 0);
            checked += 1;
        }
    });
    let result = result.unwrap();
    assert_eq!(
        checked, 5,
        "steps 2..=6 saw the checkpoint of the step before"
    );
    assert_eq!(check_checkpoint(&path), result.state.masks.len());
    for (name, mask) in &result.state.masks {
        assert_eq!(
            mask.kept(),
            (mask.keep().len() as f64 * 0.5).round() as usize,
            "{name}"
        );
    }
    let updates: Vec<&espalier::dynamic::UpdateEvent> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::FinetuneMaskUpdated { event } => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(updates.iter().map(|u| u.step).collect::<Vec<_>>(), [2, 4]);
    for u in &updates {
        assert!(u.grown > 0 && u.grown == u.dropped, "{u:?}");
        assert!((u.density - 0.5).abs() < 0.01, "{u:?}");
        assert_eq!(u.gradient_steps, 2, "{u:?}");
    }
    // Cosine from 0.3 at step 0 to 0 at step 5 (the last one an update may follow).
    let cosine = |t: f64| 0.15 * (1.0 + (std::f64::consts::PI * t / 5.0).cos());
    assert!((updates[0].drop_fraction - cosine(2.0)).abs() < 1e-12);
    assert!((updates[1].drop_fraction - cosine(4.0)).abs() < 1e-12);
    let finetune = result.report.finetune.as_ref().unwrap();
    assert_eq!(finetune.mask_updates.len(), 2);
    let stage = result
        .report
        .stages
        .iter()
        .find(|s| s.plugin == "rigl")
        .unwrap();
    assert_eq!(stage.produces, "mask-updates");
    assert!((stage.density_after - 0.5).abs() < 0.01, "{stage:?}");
    // The final model: masked weights are exact zeros.
    for (name, keep, bits) in masked_weights(&result.state) {
        assert!(
            keep.iter().zip(&bits).all(|(k, b)| *k || *b == 0),
            "{name}: a pruned weight is not zero"
        );
    }
}

/// Interrupted after step 3 (between the updates: the gradient summed since step 2 is in the
/// checkpoint) and run again, a RigL fine-tune ends with exactly the masks and weights of a run
/// that was never interrupted.
#[test]
fn rigl_resumes_bit_for_bit() {
    let whole = tempfile::tempdir().unwrap();
    let (full, _) = run_with(&dynamic_pipeline("rigl", "", whole.path()), |_, _| {});
    let full = full.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dynamic_pipeline("rigl", "", dir.path());
    let (stopped, _) = run_with(&pipeline, |e, cancel| {
        if let RunEvent::FinetuneProgress { step } = e
            && step.step == 3
        {
            cancel.cancel();
        }
    });
    assert!(
        matches!(stopped, Err(AppError::Cancelled)),
        "{:?}",
        stopped.err()
    );
    let (resumed, _) = run_with(&pipeline, |_, _| {});
    let resumed = resumed.unwrap();
    let finetune = resumed.report.finetune.as_ref().unwrap();
    assert_eq!(finetune.resumed_from, Some(3));
    assert_eq!(
        masked_weights(&resumed.state),
        masked_weights(&full.state),
        "masks or weights differ after resuming"
    );
    let strip = |r: &espalier::app::RunResult| -> Vec<(u64, usize, usize)> {
        r.report
            .finetune
            .as_ref()
            .unwrap()
            .mask_updates
            .iter()
            .map(|u| (u.step, u.dropped, u.grown))
            .collect()
    };
    assert_eq!(strip(&resumed), strip(&full));
}

/// SET's random growth follows its seed: the same seed gives the same masks, another seed other
/// masks, and each keeps every layer's count.
#[test]
fn set_with_the_same_seed_gives_the_same_masks_end_to_end() {
    let run = |seed: u64| {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = run_with(
            &dynamic_pipeline("set", &format!("seed = {seed}\n"), dir.path()),
            |_, _| {},
        );
        let r = r.unwrap();
        for (name, mask) in &r.state.masks {
            assert_eq!(
                mask.kept(),
                (mask.keep().len() as f64 * 0.5).round() as usize,
                "{name}"
            );
        }
        masked_weights(&r.state)
    };
    let a = run(7);
    assert_eq!(a, run(7));
    let masks = |m: &[(String, Vec<bool>, Vec<u32>)]| -> Vec<Vec<bool>> {
        m.iter().map(|(_, k, _)| k.clone()).collect()
    };
    assert_ne!(masks(&a), masks(&run(8)));
}

/// A mask-update plugin without `update`, `update` on a plugin that does not update masks, and
/// targets no earlier stage pruned are refused at planning, at the line of what is wrong.
#[test]
fn mask_update_stages_are_checked_at_planning() {
    let cal = text("calibration.txt").display().to_string();
    let finetune = format!("[finetune]\ntext = {cal:?}\nsteps = 4\nbatch = 1\nseq_len = 16\n");
    for (stages, line, says) in [
        (
            "[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"rigl\"\n",
            5,
            "give the stage `update",
        ),
        (
            "[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\nupdate = { every = 1 }\n",
            5,
            "only a plugin that produces mask-updates",
        ),
        (
            "[[stage]]\nplugin = \"rigl\"\nupdate = { every = 1 }\n",
            2,
            "no earlier stage prunes it",
        ),
        (
            "[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[[stage]]\nplugin = \"rigl\"\ndensity = 0.5\nupdate = { every = 1 }\n",
            7,
            "drop `density`",
        ),
    ] {
        let (result, events) = run_with(&format!("{TINY}{stages}{finetune}"), |_, _| {});
        let err = result.err().expect("refused").to_string();
        assert!(err.contains(says), "{err}");
        assert!(err.contains(&format!("events.toml:{line}:")), "{err}");
        assert_eq!(kinds(&events), ["run-failed"], "{err}");
    }
}

/// Magnitude pruning of every block linear to 0.25 in two lottery rounds of 3 steps each
/// (`lottery` as written), then the winning ticket trained for a third; a checkpoint after
/// every step (and at each round boundary) in `dir`.
fn lottery_pipeline(lottery: &str, dir: &Path) -> String {
    format!(
        "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.25\nlottery = {lottery}\n[finetune]\ntext = {cal:?}\nsteps = 3\nbatch = 1\nseq_len = 16\nlr = 0.01\nwarmup = 0\ncheckpoint_every = 1\ncheckpoint_dir = {dir:?}\n",
        cal = text("calibration.txt").display().to_string(),
        dir = dir.display().to_string()
    )
}

/// A checkpoint's tensors under `prefix/`, by layer, as f32 (masks as 0 and 1).
fn checkpoint_part(path: &Path, prefix: &str) -> std::collections::BTreeMap<String, Vec<f32>> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    tensors
        .iter()
        .filter_map(|(k, t)| {
            let name = k.strip_prefix(&format!("{prefix}/"))?;
            let t = t.flatten_all().unwrap();
            let v = match t.dtype() {
                candle_core::DType::U8 => t
                    .to_vec1::<u8>()
                    .unwrap()
                    .into_iter()
                    .map(f32::from)
                    .collect(),
                _ => t.to_vec1::<f32>().unwrap(),
            };
            Some((name.to_string(), v))
        })
        .collect()
}

/// Lottery rounds end to end with the `magnitude` plugin, rewound to the pretrained weights:
/// the stage prunes after steps 3 and 6 (`finetune-pruned`), each layer keeps exactly
/// `round(d · n)` weights for d = 0.5 and then 0.25, masks are nested, and at every round's
/// start (the checkpoint written at the boundary, read at the `finetune-round` event) the
/// survivors hold the pretrained weights bit for bit, the pruned weights are exact zeros and
/// both moments are zero. Events, `finetune.rounds` and the stage's report show each round,
/// and the resolved pipeline keeps `lottery`.
#[test]
fn lottery_rounds_prune_nested_masks_and_rewind_to_the_pretrained_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("finetune-checkpoint.safetensors");
    let pretrained = espalier_engine::builtin_model("tiny-llama").unwrap();
    let mut boundaries: Vec<std::collections::BTreeMap<String, Vec<f32>>> = Vec::new();
    let (result, events) = run_with(&lottery_pipeline("{ rounds = 2 }", dir.path()), |e, _| {
        let RunEvent::FinetuneRound { round } = e else {
            return;
        };
        let Some(pruned_to) = round.pruned_to else {
            return;
        };
        let density = [0.5, 0.25][round.round as usize - 1];
        let keeps = checkpoint_part(&path, "keep");
        let weights = checkpoint_part(&path, "weight");
        let (m, v) = (checkpoint_part(&path, "m"), checkpoint_part(&path, "v"));
        let linears = pretrained
            .layers()
            .into_iter()
            .filter(|l| l.role.is_block_linear())
            .count();
        assert_eq!(keeps.len(), linears, "every block linear is pruned");
        let (mut kept, mut numel) = (0, 0);
        for (name, keep) in &keeps {
            let n = keep.iter().filter(|k| **k != 0.0).count();
            assert_eq!(n, (density * keep.len() as f64).round() as usize, "{name}");
            kept += n;
            numel += keep.len();
            if let Some(before) = boundaries.last() {
                assert!(
                    keep.iter()
                        .zip(&before[name])
                        .all(|(k, b)| *k == 0.0 || *b != 0.0),
                    "{name}: a weight pruned in round 1 came back"
                );
            }
            let w0 = pretrained.weight(name).unwrap().flatten_all().unwrap();
            let w0 = w0.to_vec1::<f32>().unwrap();
            for (i, (w, k)) in weights[name].iter().zip(keep).enumerate() {
                let want = if *k != 0.0 { w0[i] } else { 0.0 };
                assert_eq!(w.to_bits(), want.to_bits(), "{name}[{i}] not rewound");
            }
            assert!(
                m[name].iter().chain(&v[name]).all(|x| x.to_bits() == 0),
                "{name}: moments not reset"
            );
        }
        assert_eq!(pruned_to, kept as f64 / numel as f64);
        boundaries.push(keeps);
    });
    let result = result.unwrap();
    assert_eq!(boundaries.len(), 2, "both prunings were checked");
    let k: Vec<&str> = kinds(&events)
        .into_iter()
        .filter(|k| {
            *k != "finetune-progress" && (k.starts_with("finetune") || k.starts_with("stage-"))
        })
        .collect();
    assert_eq!(
        k,
        [
            "finetune-started",
            "finetune-pruned",
            "finetune-round",
            "finetune-pruned",
            "finetune-round",
            "finetune-round",
            "finetune-finished",
            "stage-finished",
        ],
        "{k:?}"
    );
    let started = events.iter().find_map(|e| match e {
        RunEvent::FinetuneStarted { steps, rounds, .. } => Some((*steps, *rounds)),
        _ => None,
    });
    assert_eq!(started, Some((9, Some(3))));
    let progress: Vec<(u64, Option<u32>)> = events
        .iter()
        .filter_map(|e| match e {
            RunEvent::FinetuneProgress { step } => Some((step.step, step.round)),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 9);
    assert_eq!(progress[3], (4, Some(2)));
    let finetune = result.report.finetune.as_ref().unwrap();
    let rounds: Vec<(u32, u64, Option<u64>)> = finetune
        .rounds
        .iter()
        .map(|r| (r.round, r.steps, r.rewound_to))
        .collect();
    assert_eq!(rounds, [(1, 3, Some(0)), (2, 3, Some(0)), (3, 3, None)]);
    assert!(finetune.rounds.iter().all(|r| r.final_loss.is_finite()));
    assert_eq!(finetune.rounds[0].density, 1.0);
    assert_eq!(
        finetune
            .prune_events
            .iter()
            .map(|e| e.step)
            .collect::<Vec<_>>(),
        [3, 6]
    );
    // The ticket: every layer at exactly 0.25, zeros in place.
    for (name, keep, bits) in masked_weights(&result.state) {
        let n = keep.iter().filter(|k| **k).count();
        assert_eq!(n, (0.25 * keep.len() as f64).round() as usize, "{name}");
        assert!(keep.iter().zip(&bits).all(|(k, b)| *k || *b == 0), "{name}");
    }
    let stage = &result.report.stages[0];
    assert!((stage.density_after - 0.25).abs() < 1e-3, "{stage:?}");
    assert!(stage.density_from.contains("lottery rounds"), "{stage:?}");
    // `report.json` shows each round, and `run --from` reads the rounds back.
    let json = serde_json::to_value(&result.report).unwrap();
    assert_eq!(json["finetune"]["rounds"].as_array().map(Vec::len), Some(3));
    assert!(json["finetune"]["rounds"][0]["final_loss"].is_number());
    let resolved = Pipeline::parse("resolved.toml", &result.report.resolved_pipeline).unwrap();
    let r = resolved.stages[0].lottery.as_ref().unwrap().rounds;
    assert_eq!((r.count, r.rewind), (2, espalier::lottery::Rewind::Init));
}

/// Late rewinding (to step 1) interrupted and resumed across a round boundary ends with the
/// masks and weights of an uninterrupted run, bit for bit: from step 2's checkpoint (the
/// resumed run prunes and rewinds at step 3 itself, the rewind weights coming from the
/// checkpoint) and from the one written at the boundary (after the pruning). A checkpoint of
/// the same pipeline with other rounds is refused, naming `finetune.checkpoint_dir`, and left
/// as it was.
#[test]
fn lottery_resumes_bit_for_bit_across_a_round_boundary() {
    let lottery = "{ rounds = 2, rewind = { step = 1 } }";
    let whole = tempfile::tempdir().unwrap();
    let (full, _) = run_with(&lottery_pipeline(lottery, whole.path()), |_, _| {});
    let full = full.unwrap();
    let steps: Vec<u64> = full
        .report
        .finetune
        .as_ref()
        .unwrap()
        .rounds
        .iter()
        .map(|r| r.steps)
        .collect();
    assert_eq!(steps, [3, 2, 2]);
    // (checkpoint_every, interrupted after, resumed from)
    for (every, stop, from) in [(2, 3, 2), (7, 4, 3)] {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = lottery_pipeline(lottery, dir.path()).replace(
            "checkpoint_every = 1",
            &format!("checkpoint_every = {every}"),
        );
        let (stopped, _) = run_with(&pipeline, |e, cancel| {
            if let RunEvent::FinetuneProgress { step } = e
                && step.step == stop
            {
                cancel.cancel();
            }
        });
        assert!(
            matches!(stopped, Err(AppError::Cancelled)),
            "{:?}",
            stopped.err()
        );
        let (resumed, _) = run_with(&pipeline, |_, _| {});
        let resumed = resumed.unwrap();
        let finetune = resumed.report.finetune.as_ref().unwrap();
        assert_eq!(finetune.resumed_from, Some(from));
        assert_eq!(
            masked_weights(&resumed.state),
            masked_weights(&full.state),
            "masks or weights differ after resuming from step {from}"
        );
        assert_eq!(
            finetune.rounds,
            full.report.finetune.as_ref().unwrap().rounds
        );
    }
    // Other rounds are another run: refused, the checkpoint untouched.
    let path = whole.path().join("finetune-checkpoint.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let other = lottery_pipeline("{ rounds = 3, rewind = { step = 1 } }", whole.path());
    let (refused, _) = run_with(&other, |_, _| {});
    let err = refused.err().expect("refused").to_string();
    assert!(
        err.contains("finetune.checkpoint_dir") && err.contains("another run"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}
