//! Evaluation: perplexity, generation latency and peak memory, as serialisable reports.
//!
//! **Perplexity** follows Hugging Face's "Perplexity of fixed-length models" guide
//! (<https://huggingface.co/docs/transformers/perplexity>) step for step, so the number equals
//! what that loop prints with transformers on the same model and tokens:
//!
//! ```text
//! prev_end = 0
//! for begin in range(0, n, stride):
//!     end = min(begin + window, n); trg_len = end - prev_end
//!     labels = ids[begin:end] with all but the last trg_len set to -100
//!     loss = model(ids[begin:end], labels=labels).loss   # mean over the shifted labels
//!     nll_sum += loss * (trg_len - 1); n_tokens += trg_len - 1
//!     prev_end = end; stop once end == n
//! ppl = exp(nll_sum / n_tokens)
//! ```
//!
//! With overlapping windows the guide weights each window's mean loss by `trg_len - 1` although
//! the mean is over `trg_len` tokens; we reproduce that (it is "the" number people compare), and
//! also report the plain per-token perplexity over exactly the scored tokens
//! ([`PerplexityReport::perplexity_token_weighted`]); the two agree when `stride == window`.
//!
//! Defaults: window 1024 tokens and stride 512 (the guide's GPT-2 setting: each token scored
//! with at least 512 tokens of context where the text allows). Each window recomputes its
//! `window - stride` tokens of context, so stride 512 costs about twice non-overlapping windows
//! (`stride == window`): for SmolLM2-135M's shapes over 16k tokens, ~137 against ~66
//! CPU-seconds here (`cargo run --release -p espalier-engine --example bench_forward`).
//!
//! **Latency** is batch 1: the prompt in one forward pass (prefill), then greedy decoding with
//! the KV cache, one token per step; EOS does not stop it, so every run does the same work.
//!
//! **Peak memory** is the process's peak resident set (`VmHWM` of `/proc/self/status`): it
//! covers everything the process did so far (loading, other models), not one evaluation alone.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::forward::{KvCache, Session};

/// Default window (tokens per forward pass) of [`perplexity`].
pub const DEFAULT_WINDOW: usize = 1024;
/// Default stride (new tokens scored per window) of [`perplexity`].
pub const DEFAULT_STRIDE: usize = 512;

/// Window and stride of a perplexity evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerplexityOptions {
    /// Tokens per forward pass (`max_length` in the HF guide).
    pub window: usize,
    /// How far each window starts after the previous one.
    pub stride: usize,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        PerplexityOptions {
            window: DEFAULT_WINDOW,
            stride: DEFAULT_STRIDE,
        }
    }
}

/// Progress of a running perplexity evaluation, passed to the callback after each window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PerplexityProgress {
    /// Windows finished.
    pub windows_done: usize,
    /// Windows in total.
    pub windows_total: usize,
    /// Seconds since the evaluation started.
    pub elapsed_s: f64,
}

/// Result of [`perplexity`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    /// Perplexity as the HF guide computes it (see the module docs).
    pub perplexity: f64,
    /// Its mean negative log-likelihood (`ln perplexity`).
    pub mean_nll: f64,
    /// exp of the mean NLL over exactly the scored tokens.
    pub perplexity_token_weighted: f64,
    /// Tokens of the text.
    pub tokens: usize,
    /// Tokens whose NLL was computed.
    pub tokens_scored: usize,
    /// Forward passes.
    pub windows: usize,
    /// Window used.
    pub window: usize,
    /// Stride used.
    pub stride: usize,
    /// Wall-clock seconds of the evaluation.
    pub seconds: f64,
    /// Text tokens per second (`tokens / seconds`).
    pub tokens_per_second: f64,
    /// Process-wide peak resident memory in bytes after the run (`None` off Linux).
    pub peak_rss_bytes: Option<u64>,
}

/// The `(begin, end, trg_len)` of each window of the HF loop.
fn windows(n: usize, window: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + window).min(n);
        out.push((begin, end, end - prev_end));
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

/// Perplexity of `tokens` under the session's model (see the module docs for the definition).
/// `progress` is called after every window.
pub fn perplexity(
    session: &Session,
    tokens: &[u32],
    options: &PerplexityOptions,
    progress: &mut dyn FnMut(&PerplexityProgress),
) -> Result<PerplexityReport, EngineError> {
    perplexity_until(session, tokens, options, progress, &|| false)
}

/// As [`perplexity`], asking `stop` before every window: once it answers `true` the evaluation
/// ends with [`EngineError::Cancelled`] (a daemon cancels a run between windows this way).
pub fn perplexity_until(
    session: &Session,
    tokens: &[u32],
    options: &PerplexityOptions,
    progress: &mut dyn FnMut(&PerplexityProgress),
    stop: &dyn Fn() -> bool,
) -> Result<PerplexityReport, EngineError> {
    let PerplexityOptions { window, stride } = *options;
    if window < 2 {
        return Err(EngineError::Input(format!(
            "perplexity window must be at least 2 tokens, got {window}"
        )));
    }
    if stride == 0 || stride > window {
        return Err(EngineError::Input(format!(
            "perplexity stride must be between 1 and the window ({window}), got {stride}"
        )));
    }
    if window > session.max_positions() {
        return Err(EngineError::Input(format!(
            "perplexity window {window} is longer than the model's {} positions",
            session.max_positions()
        )));
    }
    if tokens.len() < window {
        return Err(EngineError::Input(format!(
            "the text has {} tokens, shorter than one evaluation window of {window}: use a longer text or a smaller window",
            tokens.len()
        )));
    }
    let started = Instant::now();
    let plan = windows(tokens.len(), window, stride);
    let (mut nll_sum, mut n_tokens) = (0f64, 0usize);
    let (mut token_sum, mut tokens_scored) = (0f64, 0usize);
    for (i, &(begin, end, trg_len)) in plan.iter().enumerate() {
        if stop() {
            return Err(EngineError::Cancelled);
        }
        let ids = &tokens[begin..end];
        let len = ids.len();
        // Labels are the last trg_len positions; the shift drops position 0, whose token has
        // no context inside the window.
        let first = len.saturating_sub(trg_len).max(1);
        let hidden = session.hidden_states(ids, None, None)?;
        let nll = session.nll_rows(&hidden, first - 1, &ids[first..])?;
        let sum: f64 = nll.iter().map(|&v| f64::from(v)).sum();
        token_sum += sum;
        tokens_scored += nll.len();
        if !nll.is_empty() {
            let weight = trg_len - 1;
            nll_sum += sum / nll.len() as f64 * weight as f64;
            n_tokens += weight;
        }
        progress(&PerplexityProgress {
            windows_done: i + 1,
            windows_total: plan.len(),
            elapsed_s: started.elapsed().as_secs_f64(),
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let mean_nll = nll_sum / n_tokens.max(1) as f64;
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        perplexity_token_weighted: (token_sum / tokens_scored.max(1) as f64).exp(),
        tokens: tokens.len(),
        tokens_scored,
        windows: plan.len(),
        window,
        stride,
        seconds,
        tokens_per_second: tokens.len() as f64 / seconds.max(f64::EPSILON),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Result of [`latency`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated (the first by the prefill, the rest by decode steps).
    pub new_tokens: usize,
    /// Prefill time, including the first token's LM head and argmax (time to first token):
    /// the mean of [`PREFILL_REPS`] passes after a warm-up, as llama-bench times prompts.
    pub prefill_ms: f64,
    /// Prompt tokens per second of the prefill.
    pub prefill_tokens_per_s: f64,
    /// Mean time of one decode step: the ms per generated token at batch 1.
    pub ms_per_token: f64,
    /// Decode steps per second (`1000 / ms_per_token`).
    pub decode_tokens_per_s: f64,
    /// Decode steps timed (`new_tokens - 1`).
    pub decode_steps: usize,
    /// Bytes of weights each decode step reads ([`Session::weight_bytes_per_token`]).
    #[serde(default)]
    pub weight_bytes_per_token: usize,
    /// Those bytes over the decode step's time, in GB/s: how close decoding comes to the
    /// memory bandwidth (everything else a step does only lowers it).
    #[serde(default)]
    pub weight_gb_per_s: f64,
    /// The generated ids (greedy).
    pub generated: Vec<u32>,
    /// Process-wide peak resident memory in bytes after the run (`None` off Linux).
    pub peak_rss_bytes: Option<u64>,
}

/// Timed prefill passes [`latency`] averages (after one warm-up), as `llama-bench -r 3` does.
pub const PREFILL_REPS: usize = 3;

/// Most tokens [`latency`] generates (models with rotary positions have no table to bound it).
pub const MAX_NEW_TOKENS: usize = 1 << 20;

/// Prefills `prompt` (timed warm, see [`LatencyReport::prefill_ms`]), then generates
/// `new_tokens` tokens greedily with the KV cache, timing both phases. Needs `new_tokens >= 2` so at least one decode step is measured.
pub fn latency(
    session: &Session,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<LatencyReport, EngineError> {
    if new_tokens < 2 {
        return Err(EngineError::Input(format!(
            "latency needs at least 2 new tokens (one from the prefill, one decode step), got {new_tokens}"
        )));
    }
    if prompt.is_empty() {
        return Err(EngineError::Input(
            "latency needs a non-empty prompt".into(),
        ));
    }
    if new_tokens > MAX_NEW_TOKENS {
        return Err(EngineError::Input(format!(
            "{new_tokens} new tokens is more than the {MAX_NEW_TOKENS} a latency measurement generates"
        )));
    }
    // Checked: `new_tokens` comes from the command line and may be anything up to usize::MAX.
    let total = prompt.len().checked_add(new_tokens - 1);
    if total.is_none_or(|t| t > session.max_positions()) {
        return Err(EngineError::Input(format!(
            "prompt ({}) plus {new_tokens} new tokens exceed the model's {} positions",
            prompt.len(),
            session.max_positions()
        )));
    }
    // The prefill as llama-bench times its prompt processing: one untimed warm-up pass (first
    // touch of the scratch buffers and caches) and, as llama-bench's warm-up also generates a
    // token, one decode step on it; then the mean of PREFILL_REPS passes, each into a fresh KV
    // cache; the last one's cache goes on to the decode steps. Every cache is reserved for the
    // whole sequence up front, as `espalier generate`, the daemon and llama.cpp's context do:
    // a cache that grows doubles (and copies) every layer's buffers at the first decode step
    // after the prompt, which after a 1024-token prompt of SmolLM2 took 0.25-0.33 s, mostly
    // the kernel zeroing fresh pages, and was counted as decoding.
    let reserve = || KvCache::with_capacity(prompt.len() + new_tokens);
    let mut warm = reserve();
    let first = session.next_token(prompt, Some(&mut warm))?;
    session.next_token(&[first], Some(&mut warm))?;
    drop(warm);
    let started = Instant::now();
    let mut cache = reserve();
    let mut next = session.next_token(prompt, Some(&mut cache))?;
    for _ in 1..PREFILL_REPS {
        cache = reserve();
        next = session.next_token(prompt, Some(&mut cache))?;
    }
    let prefill = started.elapsed().as_secs_f64() / PREFILL_REPS as f64;
    let mut generated = Vec::with_capacity(new_tokens);
    generated.push(next);
    let started = Instant::now();
    for _ in 1..new_tokens {
        next = session.next_token(&[next], Some(&mut cache))?;
        generated.push(next);
    }
    let decode = started.elapsed().as_secs_f64();
    let steps = new_tokens - 1;
    let ms_per_token = decode * 1000.0 / steps as f64;
    let weight_bytes = session.weight_bytes_per_token();
    Ok(LatencyReport {
        prompt_tokens: prompt.len(),
        new_tokens,
        prefill_ms: prefill * 1000.0,
        prefill_tokens_per_s: prompt.len() as f64 / prefill.max(f64::EPSILON),
        ms_per_token,
        decode_tokens_per_s: 1000.0 / ms_per_token.max(f64::EPSILON),
        decode_steps: steps,
        weight_bytes_per_token: weight_bytes,
        weight_gb_per_s: weight_bytes as f64 / (ms_per_token * 1e6).max(f64::EPSILON),
        generated,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Reads a `kB` field of `/proc/self/status`.
fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Peak resident memory of the whole process so far, in bytes (`VmHWM`; Linux only). It is a
/// high-water mark: it never goes down, so it includes loading and anything run earlier.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kb("VmHWM:")
}

/// Current resident memory of the process, in bytes (`VmRSS`; Linux only).
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_kb("VmRSS:")
}

/// Resets the process's peak resident memory ([`peak_rss_bytes`]) to its current resident
/// memory, so that the next reading is the peak of what ran since (Linux 4.0+: writing `5`
/// to `/proc/self/clear_refs`). Returns whether it worked; where it does not, peaks stay
/// process-wide high-water marks.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin_model;

    #[test]
    fn windows_follow_the_hf_loop() {
        // n = 10, window 4, stride 2: begins 0, 2, 4, 6; the last reaches the end.
        assert_eq!(
            windows(10, 4, 2),
            vec![(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
        );
        assert_eq!(windows(8, 4, 4), vec![(0, 4, 4), (4, 8, 4)]);
        // A short tail window.
        assert_eq!(windows(9, 4, 4), vec![(0, 4, 4), (4, 8, 4), (8, 9, 1)]);
    }

    #[test]
    fn non_overlapping_perplexity_is_the_mean_loss_of_each_window() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let tokens: Vec<u32> = (0..32).map(|i| (i * 11 + 3) % 256).collect();
        let mut calls = 0;
        let opts = PerplexityOptions {
            window: 16,
            stride: 16,
        };
        let r = perplexity(&s, &tokens, &opts, &mut |_| calls += 1).unwrap();
        assert_eq!((r.windows, calls, r.tokens_scored), (2, 2, 30));
        let want = (f64::from(s.loss(&tokens[..16]).unwrap())
            + f64::from(s.loss(&tokens[16..]).unwrap()))
            / 2.0;
        assert!((r.mean_nll - want).abs() < 1e-5);
        assert!((r.perplexity - r.perplexity_token_weighted).abs() < 1e-6 * r.perplexity);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"perplexity\""));
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let model = builtin_model("tiny-gpt2").unwrap();
        let s = Session::new(&model).unwrap();
        let opts = PerplexityOptions {
            window: 64,
            stride: 32,
        };
        let err = perplexity(&s, &[1; 10], &opts, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shorter than one evaluation window of 64"),
            "{err}"
        );
        let err = perplexity(&s, &[1; 400], &PerplexityOptions::default(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("128 positions"), "{err}");
        assert!(latency(&s, &[1, 2], 1).is_err());
        assert!(latency(&s, &[1; 120], 20).is_err());
    }

    #[test]
    fn latency_generates_greedily_and_reports_memory() {
        let model = builtin_model("tiny-llama").unwrap();
        let s = Session::new(&model).unwrap();
        let prompt = [5u32, 9, 13, 200];
        let r = latency(&s, &prompt, 6).unwrap();
        assert_eq!((r.generated.len(), r.decode_steps), (6, 5));
        // The same tokens without the cache: argmax of the full forward, one token at a time.
        let mut seq = prompt.to_vec();
        for _ in 0..6 {
            let next = s.next_token(&seq, None).unwrap();
            seq.push(next);
        }
        assert_eq!(&seq[4..], r.generated.as_slice());
        assert!(r.ms_per_token > 0.0 && r.prefill_tokens_per_s > 0.0);
        if cfg!(target_os = "linux") {
            assert!(r.peak_rss_bytes.unwrap() > 1 << 20);
            assert!(current_rss_bytes().unwrap() <= peak_rss_bytes().unwrap());
        }
    }

    #[test]
    fn the_peak_can_be_reset_to_measure_one_phase() {
        if !cfg!(target_os = "linux") || !reset_peak_rss() {
            return; // Not Linux, or a kernel before 4.0: peaks stay process-wide.
        }
        // 256 MiB touched then freed (a large allocation goes back to the system on drop).
        let big = vec![1u8; 256 << 20];
        std::hint::black_box(&big);
        drop(big);
        let with_spike = peak_rss_bytes().unwrap();
        assert!(reset_peak_rss());
        let after_reset = peak_rss_bytes().unwrap();
        assert!(
            after_reset + (128 << 20) < with_spike,
            "peak {with_spike} before the reset, {after_reset} after"
        );
    }
}
