//! Log-probabilities of tokens under the model, with the most likely alternatives: what the
//! OpenAI API's `logprobs` report for generated tokens and, with `echo`, for a prompt's
//! tokens (which is how lm-evaluation-harness scores multiple-choice tasks through a server).
//!
//! The log-softmax uses the same `ln Σ e^x` as the evaluation's NLL (`ops::log_sum_exp`),
//! so a prompt's log-probabilities summed are exactly minus the NLL `espalier eval` sums.

use super::ops;

/// Most alternatives a caller may ask for per token (OpenAI's chat API allows 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token's log-probability and the `top` most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// `log p(token | what came before)`, natural log.
    pub logprob: f32,
    /// The most likely tokens at this position with their log-probabilities, most likely
    /// first (equal ones by lower id), as many as were asked for.
    pub top: Vec<(u32, f32)>,
}

/// The log-probability of `token` under `logits` (one row, `[vocab]`) and the `top` most
/// likely tokens (at most [`MAX_TOP_LOGPROBS`]). `token` must be inside the row.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lse = ops::log_sum_exp(logits);
    let logprob_of = |i: usize| (f64::from(logits[i]) - lse) as f32;
    TokenLogprob {
        token,
        logprob: logprob_of(token as usize),
        top: top_ids(logits, top.min(MAX_TOP_LOGPROBS))
            .into_iter()
            .map(|i| (i as u32, logprob_of(i)))
            .collect(),
    }
}

/// Ids of the `n` largest logits, largest first (equal ones by lower id); NaN never counts.
fn top_ids(logits: &[f32], n: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        // `best` stays sorted, so only a value above its last entry can enter.
        if best.len() == n && v <= logits[best[n - 1]] {
            continue;
        }
        let at = best.partition_point(|&j| logits[j] >= v);
        best.insert(at, i);
        best.truncate(n);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_normalise_and_rank_the_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let lse = logits.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
        let t = token_logprob(&logits, 2, 3);
        assert_eq!(t.token, 2);
        assert!((f64::from(t.logprob) - (2.0 - lse)).abs() < 1e-6, "{t:?}");
        // Ties by lower id.
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert_eq!(
            t.top[2].1, t.logprob,
            "the same arithmetic for a token and its rank"
        );
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprob(&logits, 0, 99).top.len(), 5);
        // A NaN never ranks.
        assert_eq!(top_ids(&[f32::NAN, 0.5, 2.0], 3), [2, 1]);
    }
}
