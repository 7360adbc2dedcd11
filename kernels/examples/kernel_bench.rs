//! The GEMV part of `espalier bench kernels` for chosen sparsities and dtypes, without building
//! the CLI: `cargo run --release -p espalier-kernels --example kernel_bench -- 0.5 bf16,f32`
//! (defaults: 0.5 and bf16; `2:4` among the sparsities adds the 2:4 rows, e.g. `2:4 bf16,i8`).
//! Same code, shapes (SmolLM2-135M's block linears and LM head), streaming and baselines as
//! the full run; prefill rows only when a token count follows the dtypes (`0.5 bf16 128`).

use espalier_kernels::Dtype;
use espalier_kernels::bench::{KernelBenchOptions, run_kernel_bench};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let two_four = args
        .first()
        .is_some_and(|s| s.split(',').any(|p| p == "2:4"));
    let sparsities = match args.first() {
        Some(s) => s
            .split(',')
            .filter(|p| *p != "2:4")
            .map(str::parse::<f64>)
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![0.5],
    };
    let dtypes = match args.get(1) {
        Some(s) => s
            .split(',')
            .map(|d| match d {
                "f32" => Ok(Dtype::F32),
                "bf16" => Ok(Dtype::Bf16),
                "i8" => Ok(Dtype::I8),
                other => Err(format!("unknown dtype {other:?} (f32, bf16, i8)")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![Dtype::Bf16],
    };
    let opts = KernelBenchOptions {
        sparsities,
        dtypes,
        two_four,
        // A third argument adds the prefill rows for that many tokens (e.g. 128).
        prefill_tokens: args.get(2).map(|t| t.parse()).transpose()?.unwrap_or(0),
        ..KernelBenchOptions::default()
    };
    let report = run_kernel_bench(&opts, &mut |line| eprintln!("{line}"))?;
    println!("{report}");
    Ok(())
}
