//! Perplexity of a model directory on a text file, printed as JSON: the library call the CLI's
//! `eval` makes, runnable on its own to compare with transformers.
//!
//! ```text
//! cargo run --release -p espalier-engine --example perplexity -- MODEL_DIR TEXT_FILE \
//!     [--window W] [--stride S] [--max-chars N] [--cached N]
//! ```
//!
//! `--cached N` instead feeds the text's first N tokens one at a time through a KV cache, as
//! generation does, once with an f32 cache and once with an f16 one, and prints both
//! perplexities, how often their next-token argmax agrees and their largest logit difference:
//! what the f16 cache costs in quality.

use espalier_engine::eval::{self, PerplexityOptions};
use espalier_engine::{KvCache, KvDtype, Session, Tokenizer, load_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let mut opts = PerplexityOptions::default();
    let mut max_chars = usize::MAX;
    let mut cached = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Box<dyn std::error::Error>> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse()?)
        };
        match a.as_str() {
            "--window" => opts.window = num("--window")?,
            "--stride" => opts.stride = num("--stride")?,
            "--max-chars" => max_chars = num("--max-chars")?,
            "--cached" => cached = num("--cached")?,
            _ => positional.push(a),
        }
    }
    let [model_ref, text_file] = positional.as_slice() else {
        return Err(
            "usage: perplexity MODEL_DIR TEXT_FILE [--window W] [--stride S] [--max-chars N]"
                .into(),
        );
    };
    let model = load_model(model_ref)?;
    let tokenizer = Tokenizer::for_model(&model)?;
    let text = std::fs::read_to_string(text_file)?;
    let text: String = text.chars().take(max_chars).collect();
    let tokens = tokenizer.encode(&text)?;
    let mut session = Session::new(&model)?;
    if cached > 0 {
        return through_the_cache(&mut session, &tokens[..cached.min(tokens.len())]);
    }
    let report = eval::perplexity(&session, &tokens, &opts, &mut |p| {
        eprint!("\rwindow {}/{}", p.windows_done, p.windows_total);
    })?;
    eprintln!();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Teacher-forced decoding of `tokens` one at a time through an f32 and an f16 KV cache.
fn through_the_cache(
    session: &mut Session,
    tokens: &[u32],
) -> Result<(), Box<dyn std::error::Error>> {
    if tokens.len() < 2 {
        return Err("--cached needs at least 2 tokens of text".into());
    }
    let mut runs = Vec::new();
    for dtype in [KvDtype::F32, KvDtype::F16] {
        session.set_kv_dtype(dtype);
        let mut cache = KvCache::with_capacity(tokens.len());
        let (mut nll, mut rows) = (0f64, Vec::new());
        for (i, pair) in tokens.windows(2).enumerate() {
            let logits: Vec<f32> = session
                .forward(&pair[..1], Some(&mut cache))?
                .squeeze(0)?
                .to_vec1()?;
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
            nll += f64::from(max) + sum.ln() - f64::from(logits[pair[1] as usize]);
            rows.push(logits);
            eprint!("\r{dtype} cache: token {}/{}", i + 1, tokens.len() - 1);
        }
        eprintln!();
        runs.push(((nll / rows.len() as f64).exp(), rows));
    }
    let argmax = |r: &[f32]| {
        r.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let (exact, half) = (&runs[0].1, &runs[1].1);
    let agree = exact
        .iter()
        .zip(half)
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    let diff = exact
        .iter()
        .zip(half)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    let report = serde_json::json!({
        "tokens": tokens.len() - 1,
        "perplexity_f32_cache": runs[0].0,
        "perplexity_f16_cache": runs[1].0,
        "argmax_agreement": agree as f64 / exact.len() as f64,
        "max_logit_difference": diff,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
