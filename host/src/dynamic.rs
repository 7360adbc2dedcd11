//! Dynamic sparsity during fine-tuning (RigL, SET): a stage with
//! `update = { every, start, end, drop_fraction, anneal }` whose plugin produces `mask-updates`
//! (WIT 0.6) does not prune before fine-tuning. Every `every` optimizer steps between `start`
//! and `end` (fractions of `finetune.steps`) the fine-tune hands the plugin each target layer's
//! weights, mask and dense gradient (averaged since the previous update, taken before masking)
//! and gets back one mask per layer, which the host checks ([`check_update`]: the layer's
//! shape, exactly as many kept weights as before, the old mask's structure) before applying
//! any. Newly kept weights start at exactly zero with both AdamW moments reset; dropped weights
//! and their moments become exact zeros (see [`crate::finetune`]).
//!
//! Defaults are the RigL paper's (Evci et al. 2020): ΔT = 100 steps, updates end at 75% of
//! training, drop fraction 0.3 annealed by cosine, `f_t = f/2 · (1 + cos(π · p))` with
//! `p = (t − start)/(end − start)`. Updates run after steps `start + every`, `start + 2·every`,
//! … up to `end` (never after the last step, where nothing would train the grown weights). An
//! update's position (step, drop fraction, seed) is a function of the step alone, so a resumed
//! run makes exactly the updates an uninterrupted one makes.

use serde::{Deserialize, Serialize};

use crate::mask::Mask;

/// How the drop fraction falls over the updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anneal {
    /// RigL's `f/2 · (1 + cos(π p))`.
    Cosine,
    /// `f · (1 − p)`.
    Linear,
    /// `f` at every update (SET's original setting).
    Constant,
}

impl Anneal {
    /// Every curve, as written in a pipeline.
    pub const NAMES: &'static [&'static str] = &["cosine", "linear", "constant"];

    /// The curve of a pipeline's `anneal = "…"`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "cosine" => Some(Anneal::Cosine),
            "linear" => Some(Anneal::Linear),
            "constant" => Some(Anneal::Constant),
            _ => None,
        }
    }

    /// The name as written in a pipeline.
    pub fn as_str(self) -> &'static str {
        match self {
            Anneal::Cosine => "cosine",
            Anneal::Linear => "linear",
            Anneal::Constant => "constant",
        }
    }
}

/// A stage's mask-update setting, checked: `every >= 1`, `0 <= start <= end <= 1`,
/// `0 < drop_fraction < 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateSchedule {
    /// Steps between updates (ΔT).
    pub every: u64,
    /// Where updates start, as a fraction of the fine-tune's steps.
    pub start: f64,
    /// Where they end, as a fraction of the fine-tune's steps (RigL: 0.75).
    pub end: f64,
    /// Share of each layer's kept weights swapped at the first update (RigL: 0.3).
    pub drop_fraction: f64,
    /// How the share falls towards `end`.
    pub anneal: Anneal,
}

impl UpdateSchedule {
    /// RigL's defaults: every 100 steps from the start to 75% of training, 0.3 annealed by
    /// cosine.
    pub fn rigl() -> Self {
        UpdateSchedule {
            every: 100,
            start: 0.0,
            end: 0.75,
            drop_fraction: 0.3,
            anneal: Anneal::Cosine,
        }
    }

    /// The step updates are counted from, of a fine-tune of `steps` steps.
    pub fn start_step(&self, steps: u64) -> u64 {
        ((self.start * steps as f64).round() as u64).min(steps)
    }

    /// The last step an update may follow (at most `steps − 1`: an update after the last step
    /// would grow weights nothing trains).
    pub fn end_step(&self, steps: u64) -> u64 {
        ((self.end * steps as f64).floor() as u64).min(steps.saturating_sub(1))
    }

    /// The steps after which the stage updates masks.
    pub fn events(&self, steps: u64) -> Vec<u64> {
        let (start, end) = (self.start_step(steps), self.end_step(steps));
        let every = self.every.max(1);
        (1..)
            .map(|k: u64| start.saturating_add(k.saturating_mul(every)))
            .take_while(|&t| t <= end)
            .collect()
    }

    /// Whether the stage updates masks after `step` of `steps` steps.
    pub fn is_event(&self, step: u64, steps: u64) -> bool {
        let start = self.start_step(steps);
        step > start
            && step <= self.end_step(steps)
            && (step - start).is_multiple_of(self.every.max(1))
    }

    /// The 0-based index of the update after `step` (meaningful at an event).
    pub fn index_of(&self, step: u64, steps: u64) -> u32 {
        let start = self.start_step(steps);
        (step.saturating_sub(start) / self.every.max(1)).saturating_sub(1) as u32
    }

    /// The drop fraction after `step` of `steps` steps: `drop_fraction` annealed from `start`
    /// (p = 0) to `end` (p = 1).
    pub fn drop_fraction_at(&self, step: u64, steps: u64) -> f64 {
        let (start, end) = (self.start_step(steps), self.end_step(steps));
        let p = if end > start {
            (step.saturating_sub(start) as f64 / (end - start) as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let f = self.drop_fraction;
        match self.anneal {
            Anneal::Cosine => f / 2.0 * (1.0 + (std::f64::consts::PI * p).cos()),
            Anneal::Linear => f * (1.0 - p),
            Anneal::Constant => f,
        }
    }
}

/// The seed of one update: a SplitMix64 finaliser of the fine-tune's seed, the stage's index
/// and the step, so every update draws afresh and a resumed run draws the same.
pub fn update_seed(seed: u64, stage: usize, step: u64) -> u64 {
    let mut z = seed
        ^ (stage as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ step.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One mask update of one stage during fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateEvent {
    /// The stage's name.
    pub stage: String,
    /// Optimizer steps done when it ran.
    pub step: u64,
    /// The annealed drop fraction the plugin was given.
    pub drop_fraction: f64,
    /// Weights kept before and not after, over the stage's targets.
    pub dropped: usize,
    /// Weights kept after and not before (they start at zero).
    pub grown: usize,
    /// Kept fraction of the stage's targets (unchanged by construction).
    pub density: f64,
    /// Optimizer steps averaged into the gradient the plugin saw.
    pub gradient_steps: u32,
    /// Wall time of the update (plugin and applying the masks).
    pub seconds: f64,
}

/// Checks a plugin's new mask of `layer` against its current one: the same shape, exactly as
/// many kept weights, and the current mask's structure (unstructured masks stay unstructured,
/// N:M groups keep n each, blocks stay whole). Returns (dropped, grown) weight counts.
pub fn check_update(layer: &str, old: &Mask, new: &Mask) -> Result<(usize, usize), String> {
    if new.shape() != old.shape() {
        return Err(format!(
            "the new mask of `{}` has shape {:?}, the layer {:?}",
            crate::display_safe::name(layer),
            new.shape(),
            old.shape()
        ));
    }
    if new.kept() != old.kept() {
        return Err(format!(
            "the new mask of `{}` keeps {} weights, the current one {}: a mask update must keep the density exactly",
            crate::display_safe::name(layer),
            new.kept(),
            old.kept()
        ));
    }
    // The flags under the old structure: `Mask::new` checks the structure's rules.
    Mask::new(old.shape().to_vec(), new.keep().to_vec(), old.structure()).map_err(|e| {
        format!(
            "the new mask of `{}` breaks the layer's {} structure: {e}",
            crate::display_safe::name(layer),
            old.structure()
        )
    })?;
    let (mut dropped, mut grown) = (0, 0);
    for (&a, &b) in old.keep().iter().zip(new.keep()) {
        dropped += usize::from(a && !b);
        grown += usize::from(!a && b);
    }
    Ok((dropped, grown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Structure;

    #[test]
    fn rigl_defaults_update_every_100_steps_until_75_percent() {
        let s = UpdateSchedule::rigl();
        assert_eq!(s.events(1000), (1..=7).map(|k| k * 100).collect::<Vec<_>>());
        assert!(s.is_event(700, 1000) && !s.is_event(800, 1000) && !s.is_event(0, 1000));
        for t in 0..1000 {
            assert_eq!(s.is_event(t, 1000), s.events(1000).contains(&t), "{t}");
        }
        assert_eq!(s.index_of(100, 1000), 0);
        assert_eq!(s.index_of(700, 1000), 6);
        // Cosine from 0.3 at the start to 0 at 75%.
        assert!((s.drop_fraction_at(0, 1000) - 0.3).abs() < 1e-15);
        assert!((s.drop_fraction_at(375, 1000) - 0.15).abs() < 1e-12);
        assert!(s.drop_fraction_at(750, 1000).abs() < 1e-15);
        let c = UpdateSchedule {
            anneal: Anneal::Constant,
            ..s.clone()
        };
        assert_eq!(c.drop_fraction_at(600, 1000), 0.3);
        // Never after the last step.
        let late = UpdateSchedule {
            every: 5,
            end: 1.0,
            ..s
        };
        assert_eq!(late.events(10), vec![5]);
    }

    #[test]
    fn updates_must_keep_count_and_structure() {
        let old = Mask::new(
            vec![1, 8],
            vec![true, true, false, false, true, false, true, false],
            Structure::NOfM { n: 2, m: 4 },
        )
        .unwrap();
        let swap_in_group = Mask::new(
            vec![1, 8],
            vec![true, false, true, false, true, false, true, false],
            Structure::Unstructured,
        )
        .unwrap();
        assert_eq!(check_update("l", &old, &swap_in_group).unwrap(), (1, 1));
        let across_groups = Mask::new(
            vec![1, 8],
            vec![true, true, true, false, false, false, true, false],
            Structure::Unstructured,
        )
        .unwrap();
        let e = check_update("l", &old, &across_groups).unwrap_err();
        assert!(e.contains("structure"), "{e}");
        let fewer = Mask::new(vec![1, 8], vec![true; 8], Structure::Unstructured).unwrap();
        assert!(
            check_update("l", &old, &fewer)
                .unwrap_err()
                .contains("keeps 8")
        );
        let shape = Mask::new(vec![2, 4], old.keep().to_vec(), Structure::Unstructured).unwrap();
        assert!(
            check_update("l", &old, &shape)
                .unwrap_err()
                .contains("shape")
        );
    }

    /// What `rigl`/`set` get and return through the WIT 0.6 boundary, for one call.
    struct Layer {
        shape: Vec<usize>,
        weights: Vec<f32>,
        mask: Mask,
        gradient: Vec<f32>,
    }

    /// Calls the built-in `plugin`'s `update-masks` on `layers` at drop fraction `f`.
    fn call(
        plugin: &str,
        layers: &[Layer],
        f: f64,
        params: Vec<(String, crate::plugin::bindings::ParamValue)>,
        seed: u64,
    ) -> Result<Vec<Mask>, String> {
        use crate::plugin::bindings::{
            UpdateContext, UpdatePosition, WitLayerInfo, WitLayerState, WitRole,
        };
        use crate::plugin::registry::{BUILTIN_PLUGINS, empty_view};
        use crate::plugin::{Runtime, Sandbox};
        use crate::tensor_util::tensor_from;
        let runtime = Runtime::new().unwrap();
        let (_, bytes) = BUILTIN_PLUGINS.iter().find(|(n, _)| *n == plugin).unwrap();
        let compiled = runtime.compile(plugin, bytes).unwrap();
        let ctx = |state: &mut crate::plugin::state::PluginState| {
            let mut out = Vec::new();
            for (i, l) in layers.iter().enumerate() {
                out.push(WitLayerState {
                    layer: WitLayerInfo {
                        name: format!("layer{i}"),
                        role: WitRole::MlpUp,
                        block: Some(0),
                        shape: l.shape.iter().map(|&d| d as u32).collect(),
                        heads: None,
                        kv_heads: None,
                        head_dim: None,
                    },
                    weights: state.give_tensor(tensor_from(l.weights.clone(), &l.shape)?)?,
                    mask: state.give_mask(&l.mask)?,
                    gradient: state.give_tensor(tensor_from(l.gradient.clone(), &l.shape)?)?,
                    gradient_steps: 1,
                });
            }
            Ok(UpdateContext {
                stage: plugin.to_string(),
                position: UpdatePosition {
                    step: 10,
                    total_steps: 100,
                    fraction: 0.1,
                    update: 0,
                    updates: 7,
                    drop_fraction: f,
                    seed,
                },
                layers: out,
                params,
            })
        };
        let (masks, _) = runtime
            .update_masks(
                plugin,
                &compiled,
                empty_view(),
                &Sandbox::default(),
                ctx,
                &crate::cancel::CancelToken::new(),
            )
            .map_err(|e| e.to_string())?;
        Ok(masks
            .into_iter()
            .enumerate()
            .map(|(i, (name, m))| {
                assert_eq!(name, format!("layer{i}"));
                m
            })
            .collect())
    }

    /// RigL written out plainly: drop the round(f · kept) kept weights of least |w| (the
    /// higher index first on ties), then grow the positions not kept of largest |g| (the lower
    /// index first): over the whole layer, or, with `m`, each group of m as many as it lost.
    fn reference(keep: &[bool], w: &[f32], g: &[f32], f: f64, m: Option<usize>) -> Vec<bool> {
        let n = keep.len();
        let active: Vec<usize> = (0..n).filter(|&i| keep[i]).collect();
        let k = (f * active.len() as f64).round() as usize;
        let mut by_w = active.clone();
        by_w.sort_by(|&a, &b| w[a].abs().total_cmp(&w[b].abs()).then(b.cmp(&a)));
        let dropped = &by_w[..k];
        let mut new = keep.to_vec();
        for &i in dropped {
            new[i] = false;
        }
        let grow = |new: &mut Vec<bool>, range: std::ops::Range<usize>, count: usize| {
            let mut free: Vec<usize> = range.filter(|&i| !new[i]).collect();
            free.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()).then(a.cmp(&b)));
            for &i in &free[..count] {
                new[i] = true;
            }
        };
        match m {
            None => grow(&mut new, 0..n, k),
            Some(m) => {
                for start in (0..n).step_by(m) {
                    let lost = dropped.iter().filter(|&&i| i / m == start / m).count();
                    grow(&mut new, start..start + m, lost);
                }
            }
        }
        new
    }

    fn positions(from: &[bool], to: &[bool]) -> (Vec<usize>, Vec<usize>) {
        let dropped = (0..from.len()).filter(|&i| from[i] && !to[i]).collect();
        let grown = (0..from.len()).filter(|&i| !from[i] && to[i]).collect();
        (dropped, grown)
    }

    /// Distinct pseudo-random values (no ties), reproducible.
    fn values(n: usize, salt: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 12.9898 + salt).sin() * 43758.547).fract() - 0.5)
            .collect()
    }

    #[test]
    fn rigl_drops_and_grows_exactly_the_reference_positions() {
        // A case small enough to check by hand: k = round(0.34 · 3) = 1; the smallest kept
        // |w| is index 1, the largest |g| not kept afterwards is index 4.
        let hand = Layer {
            shape: vec![1, 6],
            weights: vec![0.5, -0.1, 0.3, 0.0, 0.0, 0.0],
            mask: Mask::new(
                vec![1, 6],
                vec![true, true, true, false, false, false],
                Structure::Unstructured,
            )
            .unwrap(),
            gradient: vec![0.0, 0.0, 0.0, 0.2, -0.9, 0.1],
        };
        let out = call("rigl", &[hand], 0.34, Vec::new(), 0).unwrap();
        assert_eq!(
            out[0].keep(),
            &[true, false, true, false, true, false],
            "hand-checked case"
        );
        // Unstructured and 2:4 layers of 8 × 16 against the reference.
        let (rows, cols) = (8, 16);
        let w = values(rows * cols, 1.0);
        let g = values(rows * cols, 2.0);
        let unstructured: Vec<bool> = w.iter().map(|x| x.abs() > 0.2).collect();
        let two_four: Vec<bool> = (0..rows * cols)
            .map(|i| {
                let group = &w[i / 4 * 4..i / 4 * 4 + 4];
                let mut sorted: Vec<f32> = group.iter().map(|x| x.abs()).collect();
                sorted.sort_by(|a, b| b.total_cmp(a));
                w[i].abs() >= sorted[1]
            })
            .collect();
        let masked = |keep: &[bool]| -> Vec<f32> {
            w.iter()
                .zip(keep)
                .map(|(x, k)| if *k { *x } else { 0.0 })
                .collect()
        };
        let layers = [
            Layer {
                shape: vec![rows, cols],
                weights: masked(&unstructured),
                mask: Mask::new(
                    vec![rows, cols],
                    unstructured.clone(),
                    Structure::Unstructured,
                )
                .unwrap(),
                gradient: g.clone(),
            },
            Layer {
                shape: vec![rows, cols],
                weights: masked(&two_four),
                mask: Mask::new(
                    vec![rows, cols],
                    two_four.clone(),
                    Structure::NOfM { n: 2, m: 4 },
                )
                .unwrap(),
                gradient: g.clone(),
            },
        ];
        let out = call("rigl", &layers, 0.3, Vec::new(), 0).unwrap();
        for (l, (new, m)) in layers.iter().zip(out.iter().zip([None, Some(4)])) {
            let want = reference(l.mask.keep(), &l.weights, &l.gradient, 0.3, m);
            let (dropped, grown) = positions(l.mask.keep(), new.keep());
            let (want_dropped, want_grown) = positions(l.mask.keep(), &want);
            assert!(!want_dropped.is_empty(), "the case swaps something");
            assert_eq!(dropped, want_dropped, "dropped, groups of {m:?}");
            assert_eq!(grown, want_grown, "grown, groups of {m:?}");
            assert_eq!(new.kept(), l.mask.kept());
            assert_eq!(new.structure(), l.mask.structure());
            check_update("l", &l.mask, new).unwrap();
        }
    }

    /// Every RigL and SET update keeps each layer's count and structure (unstructured, 2:4,
    /// 2×4 blocks), at every drop fraction; blocks swap the block of least Σ|w| for the free
    /// block of largest Σ|g|.
    #[test]
    fn rigl_and_set_updates_keep_density_and_structure() {
        let (rows, cols) = (8, 16);
        let w = values(rows * cols, 3.0);
        let g = values(rows * cols, 4.0);
        let nm: Vec<bool> = (0..rows * cols).map(|i| i % 4 < 2).collect();
        let blocks: Vec<bool> = (0..rows * cols)
            .map(|i| ((i / cols) / 2 + (i % cols) / 4) % 2 == 0)
            .collect();
        let layer = |keep: &Vec<bool>, s| Layer {
            shape: vec![rows, cols],
            weights: w
                .iter()
                .zip(keep)
                .map(|(x, k)| if *k { *x } else { 0.0 })
                .collect(),
            mask: Mask::new(vec![rows, cols], keep.clone(), s).unwrap(),
            gradient: g.clone(),
        };
        let unstructured: Vec<bool> = (0..rows * cols).map(|i| i % 3 == 0).collect();
        let layers = [
            layer(&unstructured, Structure::Unstructured),
            layer(&nm, Structure::NOfM { n: 2, m: 4 }),
            layer(&blocks, Structure::Blocks { rows: 2, cols: 4 }),
        ];
        let seed = vec![(
            "seed".to_string(),
            crate::plugin::bindings::ParamValue::Integer(3),
        )];
        for plugin in ["rigl", "set"] {
            for f in [0.05, 0.3, 0.5, 0.99] {
                let params = if plugin == "set" {
                    seed.clone()
                } else {
                    Vec::new()
                };
                let out = call(plugin, &layers, f, params, 11).unwrap();
                for (l, new) in layers.iter().zip(&out) {
                    let (dropped, grown) = check_update("l", &l.mask, new)
                        .unwrap_or_else(|e| panic!("{plugin} at {f}: {e}"));
                    assert_eq!(dropped, grown, "{plugin} at {f}");
                }
            }
        }
        // Blocks: 16 blocks, 8 kept; f = 0.125 swaps one.
        let out = call("rigl", &layers[2..], 0.125, Vec::new(), 0).unwrap();
        let block_sum = |b: usize, v: &[f32]| -> f32 {
            let (r0, c0) = ((b / 4) * 2, (b % 4) * 4);
            (r0..r0 + 2)
                .flat_map(|r| (c0..c0 + 4).map(move |c| r * cols + c))
                .map(|i| v[i].abs())
                .sum()
        };
        let kept_block = |b: usize, keep: &[bool]| keep[(b / 4) * 2 * cols + (b % 4) * 4];
        let old = layers[2].mask.keep();
        let lowest_kept = (0..16)
            .filter(|&b| kept_block(b, old))
            .min_by(|&a, &b| {
                block_sum(a, &layers[2].weights).total_cmp(&block_sum(b, &layers[2].weights))
            })
            .unwrap();
        let best_free = (0..16)
            .filter(|&b| !kept_block(b, old) || b == lowest_kept)
            .max_by(|&a, &b| {
                block_sum(a, &g)
                    .total_cmp(&block_sum(b, &g))
                    .then(b.cmp(&a))
            })
            .unwrap();
        let changed: Vec<usize> = (0..16)
            .filter(|&b| kept_block(b, old) != kept_block(b, out[0].keep()))
            .collect();
        if best_free == lowest_kept {
            assert!(changed.is_empty(), "{changed:?}");
        } else {
            assert_eq!(changed, {
                let mut c = vec![lowest_kept, best_free];
                c.sort_unstable();
                c
            });
        }
    }

    /// SET's growth is random but seeded: the same seed and update give the same masks, another
    /// seed other masks.
    #[test]
    fn set_with_the_same_seed_gives_the_same_masks() {
        let (rows, cols) = (16, 32);
        let w = values(rows * cols, 5.0);
        let keep: Vec<bool> = w.iter().map(|x| x.abs() > 0.25).collect();
        let layers = [Layer {
            shape: vec![rows, cols],
            weights: w
                .iter()
                .zip(&keep)
                .map(|(x, k)| if *k { *x } else { 0.0 })
                .collect(),
            mask: Mask::new(vec![rows, cols], keep.clone(), Structure::Unstructured).unwrap(),
            gradient: vec![0.0; rows * cols],
        }];
        let seed = |s: i64| {
            vec![(
                "seed".to_string(),
                crate::plugin::bindings::ParamValue::Integer(s),
            )]
        };
        let a = call("set", &layers, 0.3, seed(7), 99).unwrap();
        let b = call("set", &layers, 0.3, seed(7), 99).unwrap();
        assert_eq!(a[0].keep(), b[0].keep());
        let other_seed = call("set", &layers, 0.3, seed(8), 99).unwrap();
        assert_ne!(a[0].keep(), other_seed[0].keep());
        let other_update = call("set", &layers, 0.3, seed(7), 100).unwrap();
        assert_ne!(a[0].keep(), other_update[0].keep());
        assert_eq!(a[0].kept(), layers[0].mask.kept());
    }

    /// A criterion that does not produce mask updates refuses `update-masks` with a message.
    #[test]
    fn criteria_without_updates_refuse_them() {
        let e = call("wanda", &[], 0.3, Vec::new(), 0).unwrap_err();
        assert!(e.contains("does not update masks"), "{e}");
    }
}
