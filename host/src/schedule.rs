//! Gradual pruning schedules: a stage with `schedule = { kind, start, end, every }` does not run
//! once before fine-tuning but during it, at steps `start`, `start + every`, … and exactly at
//! `end`, each time at the density the schedule gives for that step, on the weights as trained
//! so far (see [`crate::finetune`]). The density falls from `initial` (1.0 by default) to the
//! stage's `density`:
//!
//! - `constant`: the final density at `start`, then held (one-shot pruning at a chosen step);
//! - `linear`: `d_t = d_f + (d_i − d_f)(1 − p)`;
//! - `cubic` (Zhu & Gupta 2017, "To prune, or not to prune"): `d_t = d_f + (d_i − d_f)(1 − p)³`,
//!   their `s_t = s_f + (s_i − s_f)(1 − p)³` written in densities (`d = 1 − s`): it prunes fast
//!   while many redundant weights remain and slowly near the end;
//! - `cosine`: `d_t = d_f + (d_i − d_f)(1 + cos πp)/2`;
//!
//! with `p = (t − start)/(end − start)` (0 at `start`, 1 at `end`, and 1 when `start = end`).
//! Every kind reaches the final density exactly at `end`, and no kind ever raises the density.
//! A step `t` here is the number of optimizer steps done: the event at `t` runs before step
//! `t + 1` (the event at `t = steps` after the last one).

use serde::{Deserialize, Serialize};

/// The shape of the density curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The final density at `start`, then held.
    Constant,
    /// Linear from the initial to the final density.
    Linear,
    /// Zhu & Gupta's cubic.
    Cubic,
    /// Half a cosine period.
    Cosine,
}

impl ScheduleKind {
    /// Every kind, as written in a pipeline.
    pub const NAMES: &'static [&'static str] = &["constant", "linear", "cubic", "cosine"];

    /// The kind of a pipeline's `kind = "…"`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "constant" => Some(ScheduleKind::Constant),
            "linear" => Some(ScheduleKind::Linear),
            "cubic" => Some(ScheduleKind::Cubic),
            "cosine" => Some(ScheduleKind::Cosine),
            _ => None,
        }
    }

    /// The name as written in a pipeline.
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cubic => "cubic",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

/// A stage's schedule, checked: `start <= end`, `every >= 1`, `0 <= final <= initial <= 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The curve.
    pub kind: ScheduleKind,
    /// The first prune event (optimizer steps done).
    pub start: u64,
    /// The last prune event, at the final density.
    pub end: u64,
    /// Steps between events (ΔT).
    pub every: u64,
    /// Density the curve starts from.
    pub initial: f64,
    /// Density reached at `end` (the stage's `density`).
    pub final_density: f64,
}

impl Schedule {
    /// The steps at which the stage runs: `start`, `start + every`, … below `end`, and `end`
    /// (only `start` for `constant`: the density never changes after it).
    pub fn events(&self) -> Vec<u64> {
        if self.kind == ScheduleKind::Constant {
            return vec![self.start];
        }
        let every = self.every.max(1);
        let mut steps: Vec<u64> = (0..)
            .map(|k: u64| self.start.saturating_add(k.saturating_mul(every)))
            .take_while(|&t| t < self.end)
            .collect();
        steps.push(self.end);
        steps
    }

    /// Whether the stage runs after `step` optimizer steps.
    pub fn is_event(&self, step: u64) -> bool {
        if step < self.start || step > self.end {
            return false;
        }
        match self.kind {
            ScheduleKind::Constant => step == self.start,
            _ => step == self.end || (step - self.start).is_multiple_of(self.every.max(1)),
        }
    }

    /// The density the schedule asks for after `step` optimizer steps (the initial one
    /// before `start`, the final one from `end` on).
    pub fn density_at(&self, step: u64) -> f64 {
        if step < self.start {
            return self.initial;
        }
        if step >= self.end || self.kind == ScheduleKind::Constant {
            return self.final_density;
        }
        let p = (step - self.start) as f64 / (self.end - self.start) as f64;
        let left = match self.kind {
            ScheduleKind::Constant => 0.0,
            ScheduleKind::Linear => 1.0 - p,
            ScheduleKind::Cubic => (1.0 - p).powi(3),
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        // Written from the initial end, so `p = 0` gives the initial density exactly (the
        // final one is exact from `end` on, above).
        let d = self.initial - (self.initial - self.final_density) * (1.0 - left);
        // Rounding never takes it outside the two ends.
        d.clamp(self.final_density, self.initial)
    }
}

/// One run of a scheduled stage during fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneEvent {
    /// The stage's name.
    pub stage: String,
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// The density the schedule asked for.
    pub target_density: f64,
    /// Kept fraction of the stage's targets afterwards (masks only shrink, so it can fall
    /// below the target when earlier masks and the new one disagree).
    pub density: f64,
    /// Wall time of the event (calibration, plugin, applying the masks).
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            start: 10,
            end: 110,
            every: 25,
            initial: 1.0,
            final_density: 0.2,
        }
    }

    const KINDS: [ScheduleKind; 4] = [
        ScheduleKind::Constant,
        ScheduleKind::Linear,
        ScheduleKind::Cubic,
        ScheduleKind::Cosine,
    ];

    #[test]
    fn every_kind_reaches_its_endpoints_and_never_rises() {
        for kind in KINDS {
            let s = schedule(kind);
            assert_eq!(s.density_at(0), 1.0, "{kind:?} before start");
            assert_eq!(s.density_at(110), 0.2, "{kind:?} at end");
            assert_eq!(s.density_at(500), 0.2, "{kind:?} after end");
            let expected_start = if kind == ScheduleKind::Constant {
                0.2
            } else {
                1.0
            };
            assert_eq!(s.density_at(10), expected_start, "{kind:?} at start");
            let mut last = f64::INFINITY;
            for t in 0..=200 {
                let d = s.density_at(t);
                assert!(d <= last, "{kind:?} rises at {t}: {last} -> {d}");
                assert!((0.2..=1.0).contains(&d), "{kind:?} at {t}: {d}");
                last = d;
            }
        }
    }

    #[test]
    fn kinds_follow_their_formulas() {
        // Halfway: p = 0.5.
        let at = |k| schedule(k).density_at(60);
        assert!((at(ScheduleKind::Linear) - (0.2 + 0.8 * 0.5)).abs() < 1e-12);
        assert!((at(ScheduleKind::Cubic) - (0.2 + 0.8 * 0.125)).abs() < 1e-12);
        assert!((at(ScheduleKind::Cosine) - (0.2 + 0.8 * 0.5)).abs() < 1e-12);
        // Zhu & Gupta in sparsity terms at p = 0.25: s = s_f + (s_i - s_f)(1 - p)^3.
        let s = schedule(ScheduleKind::Cubic);
        let sparsity = 0.8 + (0.0 - 0.8) * 0.75f64.powi(3);
        assert!((1.0 - s.density_at(35) - sparsity).abs() < 1e-12);
        // Cosine at p = 0.25: (1 + cos(pi/4)) / 2 of the way left.
        let c = schedule(ScheduleKind::Cosine).density_at(35);
        let left = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert!((c - (0.2 + 0.8 * left)).abs() < 1e-12);
        // The cubic prunes faster early than the linear.
        let l = schedule(ScheduleKind::Linear).density_at(35);
        assert!(s.density_at(35) < l);
    }

    #[test]
    fn events_are_every_delta_t_and_exactly_the_end() {
        let s = schedule(ScheduleKind::Cubic);
        assert_eq!(s.events(), vec![10, 35, 60, 85, 110]);
        for t in 0..200 {
            assert_eq!(s.is_event(t), s.events().contains(&t), "step {t}");
        }
        let s = Schedule {
            every: 30,
            ..schedule(ScheduleKind::Linear)
        };
        assert_eq!(s.events(), vec![10, 40, 70, 100, 110]);
        assert!(s.is_event(110) && !s.is_event(111));
        assert_eq!(schedule(ScheduleKind::Constant).events(), vec![10]);
        let point = Schedule {
            end: 10,
            ..schedule(ScheduleKind::Cosine)
        };
        assert_eq!(point.events(), vec![10]);
        assert_eq!(point.density_at(10), 0.2);
    }
}
