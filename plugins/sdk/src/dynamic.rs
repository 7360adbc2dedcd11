//! Drop-and-grow mask updates for dynamic sparse training (RigL, Evci et al. 2020; SET, Mocanu
//! et al. 2018), shared by the `rigl` and `set` criteria.
//!
//! One update of one layer: drop the `k` kept weights (or kept blocks) of lowest magnitude, then
//! grow `k` of the positions not kept after the drop with the highest grow score (RigL: the
//! magnitude of the dense gradient; SET: a seeded random number). As in RigL's reference code,
//! a weight dropped at this update may be grown back at once (then it simply stays), so the
//! positions that change are the drops not grown back and the grown ones that were not kept.
//! The layer keeps exactly as many weights as before, under the structure of its mask:
//!
//! - unstructured: `k = round(f · kept)` over the layer;
//! - N:M: the `k` drops are chosen over the whole layer as above, and each group of `m`
//!   grows as many as it lost, inside the group, so every group keeps exactly `n`;
//! - blocks (shapes the block divides): blocks are scored by the sum of their elements' scores
//!   and `k = round(f · kept blocks)` blocks are swapped.
//!
//! Ties: among equal drop scores the higher index is dropped first, among equal grow scores the
//! lower index is grown first (the host's `select` keeps the lower index on ties too). The
//! functions here are plain Rust over slices, so they are the same on every host and testable
//! without one.

use crate::{BlockShape, LayerMask, LayerState, NOfM, Structure, kernels, read_all, read_mask};

/// The group structure an update preserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Groups {
    /// Single weights.
    Unstructured,
    /// `n` kept in every `m` consecutive columns of a row.
    NOfM {
        /// Kept per group.
        n: usize,
        /// Group width.
        m: usize,
    },
    /// `rows × cols` blocks that tile the layer exactly.
    Blocks {
        /// Block height.
        rows: usize,
        /// Block width.
        cols: usize,
    },
}

impl Groups {
    /// The groups of a mask's structure, or why an update cannot keep it.
    pub fn of(s: Structure, shape: [usize; 2]) -> Result<Self, String> {
        let [r, c] = shape;
        match s {
            Structure::Unstructured => Ok(Groups::Unstructured),
            Structure::NOfM(NOfM { n, m }) if m > 0 && c % m as usize == 0 => Ok(Groups::NOfM {
                n: n as usize,
                m: m as usize,
            }),
            Structure::Blocks(BlockShape { rows, cols })
                if rows > 0 && cols > 0 && r % rows as usize == 0 && c % cols as usize == 0 =>
            {
                Ok(Groups::Blocks {
                    rows: rows as usize,
                    cols: cols as usize,
                })
            }
            Structure::Blocks(b) => Err(format!(
                "blocks of {}x{} do not tile a [{r}, {c}] layer: an exchange of an edge block for a whole one would change the density",
                b.rows, b.cols
            )),
            Structure::NOfM(nm) => Err(format!("{}:{} groups do not tile {c} columns", nm.n, nm.m)),
            other => Err(format!(
                "a mask structured as {other:?} cannot be updated by drop and grow (unstructured, N:M and block masks can)"
            )),
        }
    }
}

/// The number of weights (or blocks) to swap out of `kept` at drop fraction `f`.
pub fn swap_count(f: f64, kept: usize) -> usize {
    if f.is_nan() || f <= 0.0 {
        return 0;
    }
    ((f.min(1.0) * kept as f64).round() as usize).min(kept)
}

/// Indices of the `k` lowest `score`s among `candidates` (ties: the higher index first).
fn lowest(candidates: &[usize], score: impl Fn(usize) -> f32, k: usize) -> Vec<usize> {
    let mut c = candidates.to_vec();
    c.sort_unstable_by(|&a, &b| score(a).total_cmp(&score(b)).then(b.cmp(&a)));
    c.truncate(k);
    c
}

/// Indices of the `k` highest `score`s among `candidates` (ties: the lower index first).
fn highest(candidates: &[usize], score: impl Fn(usize) -> f32, k: usize) -> Vec<usize> {
    let mut c = candidates.to_vec();
    c.sort_unstable_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    c.truncate(k);
    c
}

/// The new keep flags of a `[rows, cols]` layer after one drop-and-grow update at drop
/// fraction `f`: `drop[i]` is the drop score of weight `i` (its magnitude), `grow[i]` its
/// grow score, `keep` the current flags. Keeps exactly as many weights as `keep`, and the
/// groups of `groups`.
pub fn drop_and_grow(
    shape: [usize; 2],
    groups: Groups,
    keep: &[bool],
    drop: &[f32],
    grow: &[f32],
    f: f64,
) -> Result<Vec<bool>, String> {
    let [rows, cols] = shape;
    let numel = rows * cols;
    if keep.len() != numel || drop.len() != numel || grow.len() != numel {
        return Err(format!(
            "a [{rows}, {cols}] layer with {} flags, {} drop scores and {} grow scores",
            keep.len(),
            drop.len(),
            grow.len()
        ));
    }
    let mut out = keep.to_vec();
    match groups {
        Groups::Unstructured | Groups::NOfM { .. } => {
            let active: Vec<usize> = (0..numel).filter(|&i| keep[i]).collect();
            let k = swap_count(f, active.len());
            let dropped = lowest(&active, |i| drop[i].abs(), k);
            for &i in &dropped {
                out[i] = false;
            }
            match groups {
                Groups::NOfM { m, .. } => {
                    // Each group grows what it lost, inside itself.
                    let mut lost = vec![0usize; numel / m.max(1)];
                    for &i in &dropped {
                        lost[i / m] += 1;
                    }
                    for (g, &d) in lost.iter().enumerate().filter(|(_, d)| **d > 0) {
                        let free: Vec<usize> = (g * m..(g + 1) * m).filter(|&i| !out[i]).collect();
                        for i in highest(&free, |i| grow[i], d) {
                            out[i] = true;
                        }
                    }
                }
                _ => {
                    let free: Vec<usize> = (0..numel).filter(|&i| !out[i]).collect();
                    for i in highest(&free, |i| grow[i], k) {
                        out[i] = true;
                    }
                }
            }
        }
        Groups::Blocks { rows: br, cols: bc } => {
            let (gr, gc) = (rows / br, cols / bc);
            let block_of = |b: usize| {
                let (r0, c0) = ((b / gc) * br, (b % gc) * bc);
                (r0..r0 + br).flat_map(move |r| (c0..c0 + bc).map(move |c| r * cols + c))
            };
            let sum = |b: usize, v: &[f32], abs: bool| -> f32 {
                block_of(b)
                    .map(|i| if abs { v[i].abs() } else { v[i] })
                    .sum()
            };
            let blocks = gr * gc;
            let drop_score: Vec<f32> = (0..blocks).map(|b| sum(b, drop, true)).collect();
            let grow_score: Vec<f32> = (0..blocks).map(|b| sum(b, grow, false)).collect();
            let mut kept_block: Vec<bool> =
                (0..blocks).map(|b| block_of(b).all(|i| keep[i])).collect();
            let active: Vec<usize> = (0..blocks).filter(|&b| kept_block[b]).collect();
            let k = swap_count(f, active.len());
            let dropped = lowest(&active, |b| drop_score[b], k);
            for &b in &dropped {
                kept_block[b] = false;
            }
            let free: Vec<usize> = (0..blocks).filter(|&b| !kept_block[b]).collect();
            for b in highest(&free, |b| grow_score[b], k) {
                kept_block[b] = true;
            }
            for (b, &kb) in kept_block.iter().enumerate() {
                // Blocks neither fully kept nor fully removed (cannot occur in a valid block
                // mask) are left as they were.
                if block_of(b).all(|i| keep[i]) || block_of(b).all(|i| !keep[i]) {
                    for i in block_of(b) {
                        out[i] = kb;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A small deterministic generator (SplitMix64): the same stream for the same seed on every
/// host, with no dependency.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1) with 24 random bits (exact in `f32`).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// How an update scores the positions it may grow.
pub enum Grow {
    /// By the magnitude of the layer's dense gradient (RigL).
    Gradient,
    /// By seeded random numbers (SET); the seed is mixed with the layer's index.
    Random(u64),
}

/// Updates every layer of an update: reads each layer's weights, mask (and gradient for
/// [`Grow::Gradient`]) into the guest, runs [`drop_and_grow`] at `f`, and returns the new mask
/// under the old one's structure.
pub fn update_layers(layers: &[LayerState], f: f64, grow: Grow) -> Result<Vec<LayerMask>, String> {
    let mut out = Vec::with_capacity(layers.len());
    for (index, l) in layers.iter().enumerate() {
        let name = &l.layer.name;
        let shape = l.weights.shape();
        let &[rows, cols] = shape.as_slice() else {
            return Err(format!(
                "`{name}`: a weight of shape {shape:?}, not [out, in]"
            ));
        };
        let dims = [rows as usize, cols as usize];
        let structure = l.mask.structure();
        let groups = Groups::of(structure, dims).map_err(|e| format!("`{name}`: {e}"))?;
        let keep = read_mask(&l.mask)?;
        let weights = read_all(&l.weights)?;
        let scores = match grow {
            Grow::Gradient => read_all(&l.gradient)?.into_iter().map(f32::abs).collect(),
            Grow::Random(seed) => {
                let mut rng =
                    SplitMix64::new(seed ^ (index as u64).wrapping_mul(0xd134_2543_de82_ef95));
                (0..weights.len())
                    .map(|_| rng.next_f32())
                    .collect::<Vec<f32>>()
            }
        };
        let new = drop_and_grow(dims, groups, &keep, &weights, &scores, f)
            .map_err(|e| format!("`{name}`: {e}"))?;
        let bytes: Vec<u8> = new.iter().map(|&k| u8::from(k)).collect();
        let mask = kernels::mask_from_bytes(&shape, &bytes, structure)?;
        out.push(LayerMask {
            layer: name.clone(),
            mask,
        });
    }
    Ok(out)
}
