//! Host kernels that plugins call through the WIT `kernels` interface: group scores and norms,
//! and selection of the top fraction of groups under a structure.
//!
//! Selection is exact and deterministic everywhere: a tensor with `g` groups keeps exactly
//! `round(density * g)` of them, and ties go to the lower index (so the same inputs give the
//! same mask on every machine). NaN scores rank below everything.

use rayon::prelude::*;

use crate::mask::{Mask, Structure, rows_cols};

/// Number of groups to keep: `round(density * groups)`, after checking the density.
pub fn kept_count(density: f64, groups: usize) -> Result<usize, String> {
    if !(0.0..=1.0).contains(&density) || density.is_nan() {
        return Err(format!("density {density} is outside [0, 1]"));
    }
    Ok(((density * groups as f64).round() as usize).min(groups))
}

fn sanitize(x: f32) -> f32 {
    if x.is_nan() { f32::NEG_INFINITY } else { x }
}

/// Order-preserving map of a score to an unsigned key (larger score, larger key; NaN lowest,
/// tied with -inf). Matches `f32::total_cmp` on everything else, including -0 < +0.
#[inline]
fn key(x: f32) -> u32 {
    let b = sanitize(x).to_bits();
    if b >> 31 == 1 { !b } else { b | 0x8000_0000 }
}

/// Elements per parallel task: large enough to amortise scheduling and per-task histograms.
const CHUNK: usize = 1 << 17;
/// Key bits below the histogram's: 12 bucket bits (sign, exponent, 3 mantissa bits) keep the
/// histogram in L1 while splitting typical weight magnitudes into many buckets.
const BUCKET_SHIFT: u32 = 20;
const BUCKETS: usize = 1 << (32 - BUCKET_SHIFT);

/// Flags the `k` highest scores; ties at the threshold go to the lowest indices.
///
/// A parallel radix select: a histogram of the top 12 key bits finds the bucket holding the
/// k-th largest key, an exact selection inside that bucket finds the threshold, and a prefix
/// sum of tie counts per chunk hands the remaining places to the earliest ties. Every pass
/// streams the scores once, so the cost is a few reads of the tensor on all cores.
pub fn top_k_flags(scores: &[f32], k: usize) -> Vec<bool> {
    let n = scores.len();
    if k == 0 {
        return vec![false; n];
    }
    if k >= n {
        return vec![true; n];
    }
    let hist = scores
        .par_chunks(CHUNK)
        .map(|chunk| {
            let mut h = vec![0u32; BUCKETS];
            for &x in chunk {
                h[(key(x) >> BUCKET_SHIFT) as usize] += 1;
            }
            h
        })
        .reduce(
            || vec![0u32; BUCKETS],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    // Walk buckets from the top until k elements are covered.
    let mut above_bucket = 0usize;
    let mut bucket = 0usize;
    for b in (0..BUCKETS).rev() {
        let c = hist[b] as usize;
        if above_bucket + c >= k {
            bucket = b;
            break;
        }
        above_bucket += c;
    }
    // Exact k-th largest key among the bucket's members.
    let mut members: Vec<u32> = scores
        .par_iter()
        .map(|&x| key(x))
        .filter(|&kx| (kx >> BUCKET_SHIFT) as usize == bucket)
        .collect();
    let rank = k - above_bucket; // 1-based rank inside the bucket, from the top
    let idx = members.len() - rank;
    let (_, &mut threshold, _) = members.select_nth_unstable(idx);
    drop(members);

    // Places left for elements equal to the threshold, given to the earliest ones.
    let counts: Vec<(usize, usize)> = scores
        .par_chunks(CHUNK)
        .map(|chunk| {
            chunk.iter().fold((0, 0), |(gt, eq), &x| {
                let kx = key(x);
                (
                    gt + usize::from(kx > threshold),
                    eq + usize::from(kx == threshold),
                )
            })
        })
        .collect();
    let above: usize = counts.iter().map(|c| c.0).sum();
    let mut ties_left = k - above;
    let budgets: Vec<usize> = counts
        .iter()
        .map(|&(_, eq)| {
            let take = eq.min(ties_left);
            ties_left -= take;
            take
        })
        .collect();
    let mut flags = vec![false; n];
    flags
        .par_chunks_mut(CHUNK)
        .zip(scores.par_chunks(CHUNK))
        .zip(budgets.par_iter())
        .for_each(|((out, chunk), &budget)| {
            let mut ties = budget;
            for (f, &x) in out.iter_mut().zip(chunk) {
                let kx = key(x);
                *f = if kx > threshold {
                    true
                } else if kx == threshold && ties > 0 {
                    ties -= 1;
                    true
                } else {
                    false
                };
            }
        });
    flags
}

/// Shape of the group grid of a `[r, c]` tensor under `s`, with a check that it applies.
pub fn group_grid(shape: &[usize], s: Structure) -> Result<(usize, usize), String> {
    let (r, c) = rows_cols(shape);
    let need = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    Ok(match s {
        Structure::Unstructured => (r, c),
        Structure::Blocks { rows, cols } => {
            need(rows > 0 && cols > 0, "block shape must be positive".into())?;
            (r.div_ceil(rows), c.div_ceil(cols))
        }
        Structure::NOfM { n, m } => {
            need(m > 0 && n <= m, format!("invalid N:M pattern {n}:{m}"))?;
            need(
                c % m == 0,
                format!("{c} columns are not a multiple of m = {m}"),
            )?;
            (r, c / m)
        }
        Structure::Rows => (r, 1),
        Structure::Columns => (1, c),
        Structure::RowGroups { size } => {
            need(
                size > 0 && r % size == 0,
                format!("{r} rows do not split into groups of {size}"),
            )?;
            (r / size, 1)
        }
        Structure::ColumnGroups { size } => {
            need(
                size > 0 && c % size == 0,
                format!("{c} columns do not split into groups of {size}"),
            )?;
            (1, c / size)
        }
    })
}

/// Group index (row-major on the grid) of element (i, j).
fn group_of(s: Structure, gc: usize, i: usize, j: usize) -> usize {
    match s {
        Structure::Unstructured => i * gc + j,
        Structure::Blocks { rows, cols } => (i / rows) * gc + j / cols,
        Structure::NOfM { m, .. } => i * gc + j / m,
        Structure::Rows => i,
        Structure::Columns => j,
        Structure::RowGroups { size } => i / size,
        Structure::ColumnGroups { size } => j / size,
    }
}

/// Reduces element values to per-group values: `sum f(x)` over each group, in f64.
fn group_reduce(
    values: &[f32],
    shape: &[usize],
    s: Structure,
    f: impl Fn(f32) -> f64 + Sync,
) -> Result<(Vec<f64>, (usize, usize)), String> {
    let (gr, gc) = group_grid(shape, s)?;
    let (r, c) = rows_cols(shape);
    let mut acc = vec![0f64; gr * gc];
    if acc.is_empty() {
        // An empty tensor has an empty grid (and a zero-width grid row cannot be chunked).
        return Ok((acc, (gr, gc)));
    }
    if let Structure::Unstructured = s {
        acc.par_iter_mut()
            .zip(values.par_iter())
            .for_each(|(a, &x)| *a = f(x));
        return Ok((acc, (gr, gc)));
    }
    // Tensor rows feeding one row of the group grid, and tensor columns feeding one group.
    let (band, width) = match s {
        Structure::Blocks { rows, cols } => (rows, cols),
        Structure::RowGroups { size } => (size, c),
        Structure::NOfM { m, .. } => (1, m),
        Structure::Rows => (1, c),
        Structure::ColumnGroups { size } => (r, size),
        Structure::Columns => (r, 1),
        Structure::Unstructured => (1, 1),
    };
    let (band, width) = (band.max(1), width.max(1));
    acc.par_chunks_mut(gc)
        .enumerate()
        .for_each(|(gi, acc_row)| {
            let first = gi * band;
            let last = ((gi + 1) * band).min(r);
            for i in first..last {
                let row = &values[i * c..(i + 1) * c];
                for (slot, chunk) in acc_row.iter_mut().zip(row.chunks(width)) {
                    *slot += chunk.iter().map(|&x| f(x)).sum::<f64>();
                }
            }
        });
    Ok((acc, (gr, gc)))
}

/// The p-norm of every group, laid out on the group grid.
pub fn group_norms(
    values: &[f32],
    shape: &[usize],
    s: Structure,
    p: f32,
) -> Result<(Vec<f32>, Vec<usize>), String> {
    if p.is_nan() || p <= 0.0 {
        return Err(format!("norm order p must be positive, got {p}"));
    }
    let (sums, (gr, gc)) = if p.is_infinite() {
        // Max-abs: reduce with max instead of sum.
        let (gr, gc) = group_grid(shape, s)?;
        let (r, c) = rows_cols(shape);
        let mut acc = vec![0f64; gr * gc];
        for i in 0..r {
            for j in 0..c {
                let g = group_of(s, gc, i, j);
                acc[g] = acc[g].max(f64::from(values[i * c + j].abs()));
            }
        }
        (acc, (gr, gc))
    } else {
        let p64 = f64::from(p);
        group_reduce(values, shape, s, move |x| {
            let a = f64::from(x.abs());
            if p64 == 2.0 {
                a * a
            } else if p64 == 1.0 {
                a
            } else {
                a.powf(p64)
            }
        })?
    };
    let out = if p.is_infinite() {
        sums.iter().map(|&v| v as f32).collect()
    } else {
        let inv = 1.0 / f64::from(p);
        sums.iter()
            .map(|&v| {
                if p == 2.0 {
                    v.sqrt() as f32
                } else {
                    v.powf(inv) as f32
                }
            })
            .collect()
    };
    Ok((out, vec![gr, gc]))
}

/// Keeps the highest-scoring groups of one tensor (see the module doc for the exact rule).
/// `scores` has the weight's shape; a group's score is the sum of its elements' scores. For
/// N:M the density is implied: each group keeps its `n` best elements.
pub fn select(scores: &[f32], shape: &[usize], s: Structure, density: f64) -> Result<Mask, String> {
    let numel: usize = shape.iter().product();
    if scores.len() != numel {
        return Err(format!(
            "scores have {} elements, shape {shape:?} has {numel}",
            scores.len()
        ));
    }
    let (_, c) = rows_cols(shape);
    let keep = match s {
        Structure::Unstructured => top_k_flags(scores, kept_count(density, numel)?),
        Structure::NOfM { n, m } => {
            group_grid(shape, s)?;
            let mut keep = vec![false; numel];
            // Whole rows per task; inside a group, n passes of "best not yet kept" (n <= m is
            // small) avoid any allocation per group.
            keep.par_chunks_mut(c.max(1))
                .zip(scores.par_chunks(c.max(1)))
                .for_each(|(krow, srow)| {
                    for (k, sc) in krow.chunks_mut(m).zip(srow.chunks(m)) {
                        for _ in 0..n.min(sc.len()) {
                            let mut best: Option<usize> = None;
                            for (i, &x) in sc.iter().enumerate() {
                                if k[i] {
                                    continue;
                                }
                                // Strictly greater: ties keep the lower index.
                                if best.is_none_or(|b| key(x) > key(sc[b])) {
                                    best = Some(i);
                                }
                            }
                            if let Some(b) = best {
                                k[b] = true;
                            }
                        }
                    }
                });
            keep
        }
        _ => {
            let (group_scores, (_, gc)) = group_reduce(scores, shape, s, f64::from)?;
            let as_f32: Vec<f32> = group_scores.iter().map(|&v| v as f32).collect();
            let flags = top_k_flags(&as_f32, kept_count(density, as_f32.len())?);
            let mut keep = vec![false; numel];
            keep.par_chunks_mut(c.max(1))
                .enumerate()
                .for_each(|(i, row)| {
                    for (j, k) in row.iter_mut().enumerate() {
                        *k = flags[group_of(s, gc, i, j)];
                    }
                });
            keep
        }
    };
    Mask::new(shape.to_vec(), keep, s)
}

/// One unstructured threshold over several tensors: exactly `round(density * total)` survive.
/// `scores` holds the tensors' scores one after the other, in the order of `shapes`.
pub fn select_global(
    scores: &[f32],
    shapes: &[&[usize]],
    density: f64,
) -> Result<Vec<Mask>, String> {
    let mut total = 0usize;
    for shape in shapes {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or("a tensor's element count overflows")?;
        total = total
            .checked_add(n)
            .ok_or("the total element count overflows")?;
    }
    if total != scores.len() {
        return Err(format!(
            "scores have {} elements, the shapes {total}",
            scores.len()
        ));
    }
    let k = kept_count(density, total)?;
    let flags = top_k_flags(scores, k);
    let mut out = Vec::with_capacity(shapes.len());
    let mut offset = 0;
    for shape in shapes {
        let n: usize = shape.iter().product();
        out.push(Mask::new(
            shape.to_vec(),
            flags[offset..offset + n].to_vec(),
            Structure::Unstructured,
        )?);
        offset += n;
    }
    Ok(out)
}

/// Fixed scratch of one `top_k_flags` call besides its keys: the bucket histograms rayon keeps
/// alive while reducing (one per worker and level, bounded generously).
pub const TOP_K_FIXED_SCRATCH: usize = 64 * BUCKETS * 4;

/// Worst-case scratch of `top_k_flags` over `n` scores: the keys of the threshold's bucket
/// (all of them, when the scores are equal), per-chunk tie counts and the histograms.
pub fn top_k_scratch_bytes(n: usize) -> usize {
    n.saturating_mul(4)
        .saturating_add((n / CHUNK + 1).saturating_mul(16))
        .saturating_add(TOP_K_FIXED_SCRATCH)
}

/// Worst-case scratch of [`select`] on a tensor of `shape` under `s`, besides the mask it
/// returns: the ranking of elements (unstructured), or the group scores and their ranking.
pub fn select_scratch_bytes(shape: &[usize], s: Structure) -> Result<usize, String> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the element count overflows")?;
    Ok(match s {
        Structure::Unstructured => top_k_scratch_bytes(numel),
        Structure::NOfM { .. } => {
            group_grid(shape, s)?;
            0
        }
        _ => {
            let (gr, gc) = group_grid(shape, s)?;
            let groups = gr.saturating_mul(gc);
            // f64 sums, their f32 copy, the group flags, and their ranking.
            groups
                .saturating_mul(13)
                .saturating_add(top_k_scratch_bytes(groups))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random scores with deliberate ties.
    fn scores(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) % 97) as f32 / 7.0 - 5.0
            })
            .collect()
    }

    /// Reference: sort (score desc, index asc), keep the first k.
    fn reference_top_k(s: &[f32], k: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let mut keep = vec![false; s.len()];
        for &i in idx.iter().take(k) {
            keep[i] = true;
        }
        keep
    }

    #[test]
    fn top_k_matches_sorting_reference_with_ties() {
        // Sizes beyond one parallel chunk exercise the per-chunk tie budgets.
        for (n, seed) in [(1, 1), (10, 2), (257, 3), (4096, 4), (3 * CHUNK + 17, 5)] {
            let s = scores(n, seed);
            for k in [0, 1, n / 3, n / 2, n - 1, n] {
                assert_eq!(top_k_flags(&s, k), reference_top_k(&s, k), "n={n} k={k}");
            }
        }
    }

    #[test]
    fn block_selection_matches_reference() {
        let (r, c, br, bc) = (48, 64, 16, 16);
        let s = scores(r * c, 7);
        let m = select(&s, &[r, c], Structure::Blocks { rows: br, cols: bc }, 0.2).unwrap();
        // Reference: block sums, sort, keep round(0.2 * 12) = 2 blocks.
        let mut sums = vec![0f64; (r / br) * (c / bc)];
        for i in 0..r {
            for j in 0..c {
                sums[(i / br) * (c / bc) + j / bc] += f64::from(s[i * c + j]);
            }
        }
        let sums32: Vec<f32> = sums.iter().map(|&v| v as f32).collect();
        let flags = reference_top_k(&sums32, 2);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(m.keep()[i * c + j], flags[(i / br) * (c / bc) + j / bc]);
            }
        }
        assert_eq!(m.kept(), 2 * br * bc);
    }

    #[test]
    fn n_of_m_keeps_exactly_n_per_group() {
        let s = scores(8 * 32, 9);
        let m = select(&s, &[8, 32], Structure::NOfM { n: 2, m: 4 }, 0.0).unwrap();
        for g in m.keep().chunks(4) {
            assert_eq!(g.iter().filter(|&&k| k).count(), 2);
        }
        assert!((m.density() - 0.5).abs() < 1e-12);
        assert!(select(&s, &[8, 32], Structure::NOfM { n: 2, m: 3 }, 0.0).is_err());
    }

    #[test]
    fn global_threshold_is_exact_across_tensors() {
        let a = scores(100, 1);
        let b = scores(300, 2);
        let all: Vec<f32> = a.iter().chain(&b).copied().collect();
        let masks = select_global(&all, &[&[10, 10], &[10, 30]], 0.25).unwrap();
        assert_eq!(masks[0].kept() + masks[1].kept(), 100);
        let mut all = a.clone();
        all.extend(&b);
        let reference = reference_top_k(&all, 100);
        assert_eq!(masks[0].keep(), &reference[..100]);
        assert_eq!(masks[1].keep(), &reference[100..]);
    }

    #[test]
    fn group_norms_layouts() {
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let (n, shape) = group_norms(&v, &[4, 6], Structure::RowGroups { size: 2 }, 2.0).unwrap();
        assert_eq!(shape, vec![2, 1]);
        let expect0 = (0..12).map(|x| (x * x) as f32).sum::<f32>().sqrt();
        assert!((n[0] - expect0).abs() < 1e-4);
        let (_, shape) =
            group_norms(&v, &[4, 6], Structure::ColumnGroups { size: 3 }, 1.0).unwrap();
        assert_eq!(shape, vec![1, 2]);
        assert!(group_norms(&v, &[4, 6], Structure::RowGroups { size: 3 }, 2.0).is_err());
        assert!(kept_count(1.5, 10).is_err());
    }
}
