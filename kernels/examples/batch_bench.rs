//! Decode steps of a few tokens (continuous batching) through one SmolLM2 block's linears:
//! each format and dtype beside dense in the same dtype, timed in alternating rounds (best of
//! the rounds), all 30 blocks streamed so the weights come from memory as in a real model.
//!
//! `cargo run --release -p espalier-kernels --example batch_bench -- [TOKENS] [DTYPES]`
//! (defaults: `1,4,8,16` and `bf16,i8,f32`). Prints ms per step for the 30 blocks and the
//! ratio to dense (`> 1`: faster than dense).

use std::time::Instant;

use espalier_kernels::{DenseView, Dtype, Exec, Format, PackedLinear};

/// SmolLM2-135M's block linears `(out, in)` and how many of each a block has.
const SHAPES: &[((usize, usize), usize)] = &[
    ((576, 576), 2),
    ((192, 576), 2),
    ((1536, 576), 2),
    ((576, 1536), 1),
];
const BLOCKS: usize = 30;
const ROUNDS: usize = 7;

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn weight(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// Random weights, 2:4 sparse when `two_four` (the two largest of every 4 kept).
fn weights(rng: &mut Rng, rows: usize, cols: usize, two_four: bool) -> Vec<f32> {
    let mut w: Vec<f32> = (0..rows * cols).map(|_| rng.weight()).collect();
    if two_four {
        for g in w.chunks_mut(4) {
            let mut idx = [0, 1, 2, 3];
            idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            for &i in &idx[2..] {
                g[i] = 0.0;
            }
        }
    }
    w
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    match s {
        "f32" => Ok(Dtype::F32),
        "bf16" => Ok(Dtype::Bf16),
        "i8" => Ok(Dtype::I8),
        other => Err(format!("unknown dtype {other:?} (f32, bf16, i8)")),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokens: Vec<usize> = match args.first() {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 4, 8, 16],
    };
    let dtypes: Vec<Dtype> = match args.get(1) {
        Some(s) => s.split(',').map(parse_dtype).collect::<Result<_, _>>()?,
        None => vec![Dtype::Bf16, Dtype::I8, Dtype::F32],
    };
    let exec = Exec::auto();
    let mut rng = Rng(0x5eed);
    for &dtype in &dtypes {
        // Per block, per shape: (dense, 2:4) packed layers.
        let mut layers: Vec<(PackedLinear, PackedLinear)> = Vec::new();
        for _ in 0..BLOCKS {
            for &((rows, cols), count) in SHAPES {
                for _ in 0..count {
                    let w = weights(&mut rng, rows, cols, true);
                    let view = DenseView::new(&w, rows, cols)?;
                    let dense = PackedLinear::pack("dense", &view, Format::Dense, dtype)?;
                    let nm = PackedLinear::pack("2:4", &view, Format::NM { n: 2, m: 4 }, dtype)?;
                    layers.push((dense, nm));
                }
            }
        }
        for &t in &tokens {
            let xs: Vec<Vec<f32>> = SHAPES
                .iter()
                .map(|&((_, cols), _)| (0..t * cols).map(|_| rng.weight()).collect())
                .collect();
            let mut y = vec![0.0f32; t * 1536];
            let mut pass = |sparse: bool| -> Result<f64, Box<dyn std::error::Error>> {
                let start = Instant::now();
                for (dense, nm) in &layers {
                    let p = if sparse { nm } else { dense };
                    let x = SHAPES
                        .iter()
                        .position(|&((_, c), _)| c == p.cols())
                        .map_or(&xs[0], |i| &xs[i]);
                    p.gemm_with(x, t, &mut y[..t * p.rows()], exec)?;
                }
                Ok(start.elapsed().as_secs_f64())
            };
            let (mut best_dense, mut best_nm) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..ROUNDS {
                best_dense = best_dense.min(pass(false)?);
                best_nm = best_nm.min(pass(true)?);
            }
            println!(
                "{dtype} tokens={t}: dense {:.2} ms, 2:4 {:.2} ms, 2:4 vs dense {:.2}x",
                best_dense * 1e3,
                best_nm * 1e3,
                best_dense / best_nm
            );
        }
    }
    Ok(())
}
