//! Lottery-ticket rewinding: iterative magnitude pruning over rounds (Frankle & Carbin 2019),
//! with the surviving weights rewound between rounds to the weights the fine-tune started from
//! (`rewind = "init"`: the pretrained weights, as the LTH studies of pre-trained language
//! models do) or to those it had after `k` optimizer steps of the first round
//! (`rewind = { step = k }`: late rewinding, Frankle et al. 2019, "Stabilizing the Lottery
//! Ticket Hypothesis").
//!
//! A stage with `lottery = { rounds = R, rewind = … }` does not run before `[finetune]` but at
//! the end of each of its first `R` training rounds (see [`crate::finetune`] for the loop and
//! [`crate::run::ScheduledStages`] for the stage calls):
//!
//! 1. round 1 trains `finetune.steps` steps with the masks held, recording the rewind weights
//!    at step `k` (the starting weights for `init`);
//! 2. the stage's plugin prunes the trained weights of its targets to the round's density,
//!    intersected with the current masks (masks only shrink, so they are nested);
//! 3. every trained weight is rewound: the surviving ones to the recorded weights, the pruned
//!    ones to exact zeros; both AdamW moments restart from zero, and the learning-rate schedule
//!    from step `k` (weight rewinding as Renda et al. 2020 compare it: weights and schedule go
//!    back to the same point; the optimizer state starts afresh, as open_lth's does);
//! 4. rounds 2 … R+1 train the remaining `steps − k` steps of the schedule; round R+1, after
//!    the last pruning, trains the winning ticket.
//!
//! The densities are geometric, `d_r = D^(r/R)` after round `r`, so every round removes the
//! same share of what survived and round `R` reaches the stage's `density` `D` exactly.
//!
//! Steps: the fine-tune counts optimizer steps across rounds (`global` steps here). Round 0
//! (the first) covers global steps `0 .. S`, round `r ≥ 1` the `S − k` after
//! `S + (r − 1)(S − k)`, where `S` is `finetune.steps`. The data order runs on across rounds
//! (each round reads the next sequences of the text, as a longer fine-tune would).

use serde::{Deserialize, Serialize};

/// What the surviving weights are rewound to between rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rewind {
    /// The weights the fine-tune started from (the pretrained model, with the earlier stages'
    /// masks applied).
    Init,
    /// The weights after this many optimizer steps of the first round (late rewinding).
    Step(u64),
}

impl Rewind {
    /// The first round's step whose weights are rewound to (0 for `init`).
    pub fn step(self) -> u64 {
        match self {
            Rewind::Init => 0,
            Rewind::Step(k) => k,
        }
    }

    /// As written in a pipeline and shown in reports.
    pub fn describe(self) -> String {
        match self {
            Rewind::Init => "the starting weights".into(),
            Rewind::Step(k) => format!("the weights of step {k}"),
        }
    }
}

/// A stage's lottery rounds, checked: `count ≥ 1`, `0 < final_density ≤ 1`, and (against
/// `[finetune]`) a rewind step below `finetune.steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rounds {
    /// Pruning rounds `R` (a final round trains the winning ticket after the last one).
    pub count: u32,
    /// What the surviving weights are rewound to.
    pub rewind: Rewind,
    /// The density after the last pruning round (the stage's `density`).
    pub final_density: f64,
}

/// Where a global step falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// 0-based training round (`count` is the final one).
    pub round: u32,
    /// The global step the round starts after.
    pub round_start: u64,
    /// The position in the learning-rate schedule (optimizer steps of `finetune.steps`).
    pub schedule_step: u64,
}

impl Rounds {
    /// Optimizer steps of each round after the first: the schedule from the rewind step on.
    fn later_steps(&self, steps: u64) -> u64 {
        steps.saturating_sub(self.rewind.step())
    }

    /// Training rounds: the pruning rounds and the final one.
    pub fn training_rounds(&self) -> u32 {
        self.count.saturating_add(1)
    }

    /// The global step round `round` (0-based) starts after.
    pub fn round_start(&self, round: u32, steps: u64) -> u64 {
        if round == 0 {
            return 0;
        }
        steps.saturating_add(u64::from(round - 1).saturating_mul(self.later_steps(steps)))
    }

    /// Optimizer steps of round `round` (0-based).
    pub fn round_steps(&self, round: u32, steps: u64) -> u64 {
        if round == 0 {
            steps
        } else {
            self.later_steps(steps)
        }
    }

    /// Optimizer steps over every round.
    pub fn total_steps(&self, steps: u64) -> u64 {
        self.round_start(self.training_rounds(), steps)
    }

    /// The round that trains the step after global step `step` (`step` below
    /// [`Rounds::total_steps`]; later steps are placed in the final round).
    pub fn place(&self, step: u64, steps: u64) -> Place {
        let later = self.later_steps(steps).max(1);
        let round = if step < steps {
            0
        } else {
            let r = 1 + (step - steps) / later;
            u32::try_from(r).unwrap_or(u32::MAX).min(self.count)
        };
        let round_start = self.round_start(round, steps);
        let into = step.saturating_sub(round_start);
        let schedule_step = if round == 0 {
            into
        } else {
            self.rewind.step().saturating_add(into)
        };
        Place {
            round,
            round_start,
            schedule_step,
        }
    }

    /// The 0-based round that ends after global step `step`, if one does (the final round
    /// ends at [`Rounds::total_steps`]).
    pub fn round_ending_at(&self, step: u64, steps: u64) -> Option<u32> {
        if step == 0 {
            return None;
        }
        let place = self.place(step - 1, steps);
        (self.round_start(place.round + 1, steps) == step).then_some(place.round)
    }

    /// Whether the stage prunes after global step `step` (the end of a pruning round).
    pub fn is_prune(&self, step: u64, steps: u64) -> bool {
        self.round_ending_at(step, steps)
            .is_some_and(|r| r < self.count)
    }

    /// The density the stage prunes to at the end of round `round` (0-based, below `count`):
    /// `D^((round + 1)/count)`, exactly `D` at the last.
    pub fn density_after(&self, round: u32) -> f64 {
        let done = round.saturating_add(1);
        if done >= self.count {
            return self.final_density;
        }
        self.final_density
            .powf(f64::from(done) / f64::from(self.count.max(1)))
    }
}

/// What one training round did (`finetune.rounds` in `report.json`, a `finetune-round` event).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// 1-based round; the last one trains the winning ticket.
    pub round: u32,
    /// Training rounds in the run (pruning rounds + 1).
    pub rounds: u32,
    /// Optimizer steps it trained.
    pub steps: u64,
    /// The global step it ended after.
    pub last_step: u64,
    /// Kept fraction of the lottery stage's targets while it trained.
    pub density: f64,
    /// Loss of its last step.
    pub final_loss: f64,
    /// Kept fraction of the targets after the pruning at its end (none after the last round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned_to: Option<f64>,
    /// The step of the first round the weights were rewound to after the pruning (none after
    /// the last round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewound_to: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rounds(count: u32, rewind: Rewind) -> Rounds {
        Rounds {
            count,
            rewind,
            final_density: 0.125,
        }
    }

    #[test]
    fn densities_are_geometric_and_end_exactly_at_the_stage_density() {
        let r = rounds(3, Rewind::Init);
        assert_eq!(r.density_after(0), 0.5);
        assert!((r.density_after(1) - 0.25).abs() < 1e-15);
        assert_eq!(r.density_after(2), 0.125);
        // Every round keeps the same share of what survived.
        let r = Rounds {
            final_density: 0.3,
            ..rounds(4, Rewind::Init)
        };
        let ratio = r.density_after(0);
        for i in 1..4 {
            assert!((r.density_after(i) / r.density_after(i - 1) - ratio).abs() < 1e-12);
        }
        assert_eq!(r.density_after(3), 0.3);
        assert_eq!(rounds(1, Rewind::Init).density_after(0), 0.125);
    }

    #[test]
    fn rounds_cover_the_steps_the_rewind_leaves() {
        // 10 steps per round, rewound to step 4: rounds of 10, 6, 6, 6.
        let r = rounds(3, Rewind::Step(4));
        assert_eq!(r.total_steps(10), 28);
        assert_eq!(
            (0..4).map(|i| r.round_start(i, 10)).collect::<Vec<_>>(),
            [0, 10, 16, 22]
        );
        let ends: Vec<(u64, u32)> = (0..=28)
            .filter_map(|s| r.round_ending_at(s, 10).map(|i| (s, i)))
            .collect();
        assert_eq!(ends, [(10, 0), (16, 1), (22, 2), (28, 3)]);
        let prunes: Vec<u64> = (0..=28).filter(|&s| r.is_prune(s, 10)).collect();
        assert_eq!(prunes, [10, 16, 22]);
        // The schedule restarts at the rewind step in every later round.
        let at = |s| {
            let p = r.place(s, 10);
            (p.round, p.round_start, p.schedule_step)
        };
        assert_eq!(at(0), (0, 0, 0));
        assert_eq!(at(9), (0, 0, 9));
        assert_eq!(at(10), (1, 10, 4));
        assert_eq!(at(15), (1, 10, 9));
        assert_eq!(at(16), (2, 16, 4));
        assert_eq!(at(27), (3, 22, 9));
        // `init`: every round is the whole schedule.
        let r = rounds(2, Rewind::Init);
        assert_eq!(r.total_steps(5), 15);
        assert_eq!(r.place(5, 5).schedule_step, 0);
        assert_eq!(
            r.place(14, 5),
            Place {
                round: 2,
                round_start: 10,
                schedule_step: 4
            }
        );
        assert!(!r.is_prune(0, 5) && r.is_prune(5, 5) && r.is_prune(10, 5));
        assert!(!r.is_prune(15, 5));
        assert_eq!(r.round_ending_at(15, 5), Some(2));
    }
}
