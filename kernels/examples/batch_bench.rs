//! Decode steps of a few tokens (continuous batching) through SmolLM2's block linears: 2:4
//! and 50% bitmap beside dense in each dtype, same rounds (the library's [`run_batch_bench`]).
//!
//! `cargo run --release -p espalier-kernels --example batch_bench -- [TOKENS] [DTYPES]`
//! (defaults: `1,4,8,16` and `bf16,i8,f32`). Prints ms per step for the 30 blocks and the
//! ratio to dense (`> 1`: faster than dense).

use espalier_kernels::Dtype;
use espalier_kernels::bench::run_batch_bench;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokens: Vec<usize> = match args.first() {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 4, 8, 16],
    };
    let dtypes: Vec<Dtype> = match args.get(1) {
        Some(s) => s
            .split(',')
            .map(|d| match d {
                "f32" => Ok(Dtype::F32),
                "bf16" => Ok(Dtype::Bf16),
                "i8" => Ok(Dtype::I8),
                other => Err(format!("unknown dtype {other:?} (f32, bf16, i8)")),
            })
            .collect::<Result<_, _>>()?,
        None => vec![Dtype::Bf16, Dtype::I8, Dtype::F32],
    };
    for r in run_batch_bench(&tokens, &dtypes, 7)? {
        println!(
            "{} tokens={}: dense {:.2} ms, 2:4 {:.2} ms ({:.2}x dense), bitmap 50% {:.2} ms ({:.2}x dense)",
            r.dtype,
            r.tokens,
            r.dense_ms,
            r.two_four_ms,
            r.dense_ms / r.two_four_ms,
            r.bitmap_ms,
            r.dense_ms / r.bitmap_ms
        );
    }
    Ok(())
}
