//! What a run reports while it runs: one serialisable [`RunEvent`] stream that every front end
//! renders its own way (the CLI as progress bars and lines, the daemon as server-sent events
//! and run records). The core prints nothing; everything it has to say goes through an
//! [`EventSink`].

use serde::Serialize;

use crate::evaluate::Evaluation;
use crate::report::StageReport;

/// One thing that happened in a run, in order.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RunEvent {
    /// Planning passed: the stages are about to run.
    RunStarted {
        /// Pipeline name.
        pipeline: String,
        /// Model reference as resolved (a directory or `builtin:NAME`).
        model: String,
        /// Number of stages.
        stages: usize,
        /// Plugin name → sha256 of every plugin the run will call (the versions it holds).
        plugins: std::collections::BTreeMap<String, String>,
    },
    /// Something worth telling whoever watches (a model download, a fallback).
    Notice {
        /// What happened.
        message: String,
    },
    /// Something the user should look at; the run goes on.
    Warning {
        /// What is wrong.
        message: String,
    },
    /// A stage is about to run.
    StageStarted {
        /// 0-based stage index.
        index: usize,
        /// Stages in the run.
        total: usize,
        /// Stage name.
        name: String,
        /// Plugin name.
        plugin: String,
        /// sha256 of the plugin's component.
        plugin_sha256: String,
        /// Number of target layers.
        targets: usize,
    },
    /// A stage is preparing calibration statistics or calling its plugin, or its plugin
    /// reported how far it is (`progress.report`, WIT 0.4).
    StageProgress {
        /// 0-based stage index.
        index: usize,
        /// What it is doing now (a plugin's own words are escaped and capped).
        step: String,
        /// Units of work finished, when the plugin reported a known amount (`done` of
        /// `total`); absent for the host's own steps, whose length is unknown.
        #[serde(skip_serializing_if = "Option::is_none")]
        done: Option<u64>,
        /// Units of work in all (at least 1, at least `done`), with `done`.
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
    },
    /// A stage's calibration pass went over more sequences.
    CalibrationProgress {
        /// 0-based stage index.
        index: usize,
        /// The pass: `activation statistics`, `hidden states for loss trials` or `gradients`.
        pass: String,
        /// Sequences done.
        done: usize,
        /// Sequences in the pass.
        total: usize,
    },
    /// A stage finished.
    StageFinished {
        /// 0-based stage index.
        index: usize,
        /// What it did and cost.
        report: StageReport,
    },
    /// Masked fine-tuning (the pipeline's `[finetune]`) starts, after the stages.
    FinetuneStarted {
        /// Steps in the run (over every lottery round, when there are rounds).
        steps: u64,
        /// With lottery rounds, the training rounds (pruning rounds + the final one).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rounds: Option<u32>,
        /// The step it starts after (a checkpoint's; 0 from the beginning).
        start_step: u64,
        /// Sequences per optimizer step (`batch × accumulate`).
        sequences_per_step: usize,
        /// Tokens per sequence.
        seq_len: usize,
        /// Tokens in the training text.
        text_tokens: usize,
    },
    /// A fine-tuning step finished.
    FinetuneProgress {
        /// What the step did: step, loss, learning rate, gradient norm, tokens/s, ETA.
        #[serde(flatten)]
        step: crate::finetune::StepReport,
    },
    /// A scheduled stage pruned during fine-tuning (see [`crate::schedule`]).
    FinetunePruned {
        /// The stage, step, target and reached densities, seconds.
        #[serde(flatten)]
        event: crate::schedule::PruneEvent,
    },
    /// A mask-update stage swapped weights during fine-tuning (see [`crate::dynamic`]).
    FinetuneMaskUpdated {
        /// The stage, step, drop fraction, weights dropped and grown, density, seconds.
        #[serde(flatten)]
        event: crate::dynamic::UpdateEvent,
    },
    /// A lottery round ended (see [`crate::lottery`]): pruned and rewound, or the last one,
    /// which trained the winning ticket.
    FinetuneRound {
        /// The round, its steps, density, last loss, and the pruning and rewind after it.
        #[serde(flatten)]
        round: crate::lottery::RoundReport,
    },
    /// The fine-tune finished.
    FinetuneFinished {
        /// What it did (also in the run report).
        report: Box<crate::finetune::FinetuneReport>,
    },
    /// An evaluation (`dense` or `pruned`) starts.
    EvaluationStarted {
        /// `dense` or `pruned`.
        which: String,
    },
    /// An evaluation scored another window.
    EvaluationProgress {
        /// `dense` or `pruned`.
        which: String,
        /// Windows scored.
        windows_done: usize,
        /// Windows in total.
        windows_total: usize,
    },
    /// An evaluation finished.
    EvaluationFinished {
        /// `dense` or `pruned`.
        which: String,
        /// Its results.
        evaluation: Evaluation,
    },
    /// The pruned model was written.
    Exported {
        /// The export folder.
        dir: String,
    },
    /// The run finished.
    RunFinished {
        /// Wall time, seconds.
        seconds: f64,
    },
    /// The run failed.
    RunFailed {
        /// Stable kind of the error (see [`crate::app::ErrorKind`]).
        kind: crate::app::ErrorKind,
        /// What went wrong.
        message: String,
    },
    /// The run was cancelled from outside.
    RunCancelled {
        /// Wall time until it stopped, seconds.
        seconds: f64,
    },
}

impl RunEvent {
    /// The event's `type` tag (the SSE event name).
    pub fn kind(&self) -> &'static str {
        match self {
            RunEvent::RunStarted { .. } => "run-started",
            RunEvent::Notice { .. } => "notice",
            RunEvent::Warning { .. } => "warning",
            RunEvent::StageStarted { .. } => "stage-started",
            RunEvent::StageProgress { .. } => "stage-progress",
            RunEvent::CalibrationProgress { .. } => "calibration-progress",
            RunEvent::StageFinished { .. } => "stage-finished",
            RunEvent::FinetuneStarted { .. } => "finetune-started",
            RunEvent::FinetuneProgress { .. } => "finetune-progress",
            RunEvent::FinetunePruned { .. } => "finetune-pruned",
            RunEvent::FinetuneMaskUpdated { .. } => "finetune-mask-updated",
            RunEvent::FinetuneRound { .. } => "finetune-round",
            RunEvent::FinetuneFinished { .. } => "finetune-finished",
            RunEvent::EvaluationStarted { .. } => "evaluation-started",
            RunEvent::EvaluationProgress { .. } => "evaluation-progress",
            RunEvent::EvaluationFinished { .. } => "evaluation-finished",
            RunEvent::Exported { .. } => "exported",
            RunEvent::RunFinished { .. } => "run-finished",
            RunEvent::RunFailed { .. } => "run-failed",
            RunEvent::RunCancelled { .. } => "run-cancelled",
        }
    }
}

/// Receives a run's events (the CLI draws bars; the daemon stores and streams them).
///
/// `Send`, because a plugin's progress reports arrive while its guest runs on the run's own
/// thread: a helper thread passes them to the sink meanwhile (the run does not emit anything
/// else until the call returns).
pub trait EventSink: Send {
    /// One event, in order.
    fn emit(&mut self, event: RunEvent);
}

/// Any `FnMut(RunEvent) + Send` is a sink.
impl<F: FnMut(RunEvent) + Send> EventSink for F {
    fn emit(&mut self, event: RunEvent) {
        self(event)
    }
}

/// A sink that drops everything.
pub struct Quiet;

impl EventSink for Quiet {
    fn emit(&mut self, _event: RunEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_their_type_tag() {
        let e = RunEvent::EvaluationProgress {
            which: "dense".into(),
            windows_done: 2,
            windows_total: 5,
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["type"], e.kind());
        assert_eq!(json["windows_done"], 2);
        let mut seen = Vec::new();
        let mut sink = |e: RunEvent| seen.push(e.kind());
        sink.emit(RunEvent::Notice {
            message: "x".into(),
        });
        assert_eq!(seen, ["notice"]);
    }

    #[test]
    fn stage_progress_carries_counts_only_when_a_plugin_reported_them() {
        let host_step = RunEvent::StageProgress {
            index: 0,
            step: "calling the plugin".into(),
            done: None,
            total: None,
        };
        let json = serde_json::to_value(&host_step).unwrap();
        assert!(
            json.get("done").is_none() && json.get("total").is_none(),
            "{json}"
        );
        let plugin = RunEvent::StageProgress {
            index: 1,
            step: "trial 3/40".into(),
            done: Some(3),
            total: Some(40),
        };
        let json = serde_json::to_value(&plugin).unwrap();
        assert_eq!(
            (json["done"].as_u64(), json["total"].as_u64()),
            (Some(3), Some(40))
        );
    }
}
