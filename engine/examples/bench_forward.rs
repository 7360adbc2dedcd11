//! Forward-pass throughput: prefill tokens/s, decode ms/token and perplexity seconds.
//!
//! ```text
//! cargo run --release -p espalier-engine --example bench_forward -- \
//!     [MODEL] [--ppl-tokens N] [--window W] [--stride S] [--prompt P] [--new N] \
//!     [--prefill-reps R] [--batch B] [--kv-cache f32|f16]
//! ```
//!
//! `--batch B` times `--new` batched decode steps of B sequences (each prefilled with the
//! prompt into its own cache): what the server's continuous batching runs per step.
//! `--prefill-reps R` also runs the prompt's prefill R more times (no cache) and prints the
//! best and median: a prefill-only loop to profile (`perf record` around it).
//! `--kv-cache f16` keeps the KV caches in f16 (as `espalier generate` and the daemon do for
//! bf16 and int8 models); the default is f32.
//! `--ppl-tokens 0` skips the perplexity run (a decode-only profile). MODEL defaults to `builtin:smollm2-135m-shapes` (random weights, SmolLM2-135M's shapes), so
//! the figures need no download; tokens are a fixed pseudo-random sequence.

/// The allocator the `espalier` binary runs with, so these figures are the binary's.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: espalier_engine::hugepages::HugePageAlloc =
    espalier_engine::hugepages::HugePageAlloc;

use std::time::Instant;

use espalier_engine::eval::{self, PerplexityOptions};
use espalier_engine::{KvCache, KvDtype, Session, load_model};

/// CPU seconds (user + system) this process used so far, from `/proc/self/stat`: on a shared
/// machine wall-clock time depends on the neighbours, CPU time much less.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(target_os = "linux")]
    espalier_engine::hugepages::HugePageAlloc::configure();
    let mut model_ref = "builtin:smollm2-135m-shapes".to_string();
    let (mut ppl_tokens, mut window, mut stride, mut prompt, mut new) =
        (4096usize, 1024usize, 1024usize, 128usize, 32usize);
    let (mut prefill_reps, mut batch) = (0usize, 0usize);
    let mut kv = KvDtype::F32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Box<dyn std::error::Error>> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse()?)
        };
        match a.as_str() {
            "--ppl-tokens" => ppl_tokens = num("--ppl-tokens")?,
            "--window" => window = num("--window")?,
            "--stride" => stride = num("--stride")?,
            "--prompt" => prompt = num("--prompt")?,
            "--new" => new = num("--new")?,
            "--prefill-reps" => prefill_reps = num("--prefill-reps")?,
            "--batch" => batch = num("--batch")?,
            "--kv-cache" => kv = args.next().ok_or("--kv-cache needs f32 or f16")?.parse()?,
            other if !other.starts_with("--") => model_ref = other.to_string(),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let t0 = Instant::now();
    let model = load_model(&model_ref)?;
    let mut session = Session::new(&model)?;
    session.set_kv_dtype(kv);
    println!(
        "model {model_ref}: loaded in {:.2} s, {} threads",
        t0.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    // An export of `espalier run` keeps its masks beside dense weights, which `load_model`
    // reads as they are: the figures below are then the dense kernels', zeros included.
    if let Some(dir) = &model.source_dir
        && dir.join("masks.safetensors").is_file()
        && !dir.join(espalier_engine::packed::PACKED_FILE).is_file()
    {
        println!(
            "note: {model_ref} holds its masks beside dense weights, and this example runs the \
             dense weights (zeros included); `espalier eval` and `espalier generate` run it on \
             its sparse kernels, and a packed export loads them here"
        );
    }
    let vocab = session.vocab_size() as u64;
    // A fixed LCG sequence: reproducible and spread over the whole vocabulary.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let tokens: Vec<u32> = (0..ppl_tokens.max(prompt))
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % vocab) as u32
        })
        .collect();

    // Warm-up: first-touch page faults and rayon start-up stay out of the figures.
    session.forward_last(&tokens[..16.min(tokens.len())], None)?;

    let cpu0 = cpu_seconds();
    let lat = eval::latency(&session, &tokens[..prompt], new)?;
    let cpu1 = cpu_seconds();
    println!(
        "latency: prompt {prompt} tokens prefill {:.1} ms ({:.0} tok/s); decode {:.2} ms/token ({:.1} tok/s) over {} steps; {:.1} CPU s",
        lat.prefill_ms,
        lat.prefill_tokens_per_s,
        lat.ms_per_token,
        lat.decode_tokens_per_s,
        lat.decode_steps,
        cpu1 - cpu0
    );

    if prefill_reps > 0 {
        let mut ms: Vec<f64> = Vec::with_capacity(prefill_reps);
        for _ in 0..prefill_reps {
            let t = Instant::now();
            session.forward_last(&tokens[..prompt], None)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "prefill of {prompt} tokens, {prefill_reps} runs: best {:.1} ms ({:.0} tok/s), median {:.1} ms",
            ms[0],
            prompt as f64 / ms[0] * 1e3,
            ms[ms.len() / 2]
        );
    }
    if batch > 0 {
        // Reserved for the whole sequence, as the daemon reserves each request's cache.
        let mut caches: Vec<KvCache> = (0..batch)
            .map(|_| KvCache::with_capacity(prompt + new))
            .collect();
        let mut next: Vec<u32> = Vec::with_capacity(batch);
        for (i, cache) in caches.iter_mut().enumerate() {
            // Prompts differ in their first token, so no two sequences are the same.
            let mut p = tokens[..prompt].to_vec();
            p[0] = tokens[i % tokens.len()];
            next.push(session.next_token(&p, Some(cache))?);
        }
        let t = Instant::now();
        for _ in 0..new {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let logits = session.decode_batch(&next, &mut refs)?;
            let rows = logits.to_vec2::<f32>()?;
            for (n, row) in next.iter_mut().zip(&rows) {
                *n = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "batched decode, {batch} sequences: {:.2} ms per step, {:.1} tok/s in all over {new} steps",
            s * 1e3 / new as f64,
            (batch * new) as f64 / s
        );
    }
    if ppl_tokens == 0 {
        return Ok(());
    }
    let opts = PerplexityOptions { window, stride };
    let report = eval::perplexity(&session, &tokens[..ppl_tokens], &opts, &mut |p| {
        eprint!(
            "\r  window {}/{} ({:.1} s)",
            p.windows_done, p.windows_total, p.elapsed_s
        );
    })?;
    eprintln!();
    let cpu2 = cpu_seconds();
    println!(
        "perplexity: {} tokens, window {window}, stride {stride}: {:.1} s ({:.0} tok/s; {:.1} s per 16k tokens; {:.1} CPU s), ppl {:.1}",
        report.tokens,
        report.seconds,
        report.tokens_per_second,
        report.seconds * 16_384.0 / report.tokens as f64,
        cpu2 - cpu1,
        report.perplexity
    );
    println!(
        "peak RSS {:.0} MiB",
        eval::peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
    );
    Ok(())
}
