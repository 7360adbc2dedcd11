//! Runs the kernel benchmark outside the CLI:
//! `cargo run --release -p espalier-kernels --example bench_kernels [-- --quick] [--json]
//! [--layers N] [--reps N] [--portable | --avx2] [--f32-only | --dtypes f32,bf16,i8]
//! [--sparsities 0.5,0.8]
//! [--no-prefill] [--no-24] [--probe-mib N] [--evict-mib N]`.

use espalier_kernels::bench::{KernelBenchOptions, run_kernel_bench};
use espalier_kernels::{Dtype, Isa};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = if args.iter().any(|a| a == "--quick") {
        KernelBenchOptions::quick()
    } else {
        KernelBenchOptions::default()
    };
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<usize>().ok())
    };
    if let Some(n) = value("--layers") {
        opts.layers = n;
    }
    if let Some(n) = value("--reps") {
        opts.reps = n;
    }
    if let Some(n) = value("--evict-mib") {
        opts.evict_bytes = n << 20;
    }
    if let Some(n) = value("--probe-mib") {
        opts.probe_bytes = n << 20;
    }
    if args.iter().any(|a| a == "--portable") {
        opts.isa = Isa::Portable;
    }
    if args.iter().any(|a| a == "--avx2") {
        opts.isa = Isa::Avx2Fma;
    }
    if let Some(list) = args
        .iter()
        .position(|a| a == "--sparsities")
        .and_then(|i| args.get(i + 1))
    {
        opts.sparsities = list.split(',').filter_map(|v| v.parse().ok()).collect();
    }
    if args.iter().any(|a| a == "--no-prefill") {
        opts.prefill_tokens = 0;
    }
    if args.iter().any(|a| a == "--no-24") {
        opts.two_four = false;
    }
    if args.iter().any(|a| a == "--f32-only") {
        opts.dtypes = vec![Dtype::F32];
    }
    if let Some(list) = args
        .iter()
        .position(|a| a == "--dtypes")
        .and_then(|i| args.get(i + 1))
    {
        let mut dtypes = Vec::new();
        for name in list.split(',') {
            match name {
                "f32" => dtypes.push(Dtype::F32),
                "bf16" => dtypes.push(Dtype::Bf16),
                "i8" => dtypes.push(Dtype::I8),
                other => {
                    eprintln!("error: --dtypes: unknown dtype `{other}` (f32, bf16, i8)");
                    std::process::exit(2);
                }
            }
        }
        opts.dtypes = dtypes;
    }
    let json = args.iter().any(|a| a == "--json");
    match run_kernel_bench(&opts, &mut |line| eprintln!("{line}")) {
        Ok(report) if json => match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
