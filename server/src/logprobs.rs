//! The OpenAI API's `logprobs` objects from the tokens' log-probabilities
//! ([`TokenLogprob`]): the completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`, with `echo` the prompt's tokens first, the very first without a value) and
//! the chat shape (`content`: `token`, `logprob`, `bytes`, `top_logprobs`).
//!
//! The completions shape is what lm-evaluation-harness's `local-completions` model reads to
//! score multiple-choice tasks: it sends the context and continuation with `echo: true,
//! logprobs: 1, max_tokens: 1`, sums `token_logprobs` over the continuation and calls the
//! continuation greedy when each of its tokens' log-probability is the largest of its
//! `top_logprobs`. As vLLM does, each position's `top_logprobs` holds the token itself beside
//! the `N` most likely, so that check needs no second request.

use espalier_engine::{TokenLogprob, Tokenizer};
use serde_json::{Map, Value, json};

/// A token's text and bytes. A token that ends inside a UTF-8 character has no text of its
/// own; it is written `bytes:\xNN…` as OpenAI's API writes such tokens, and its `bytes` are
/// exact either way.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id).unwrap_or_default();
    let text = match std::str::from_utf8(&bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
            format!("bytes:{hex}")
        }
    };
    (text, bytes)
}

/// A completions `logprobs` object being built: tokens are added (an echoed prompt's, then
/// chosen ones) and [`CompletionLogprobs::take`] returns those added since the last take, as a
/// whole response's object or one stream chunk's. `text_offset` counts characters of the text
/// returned so far.
#[derive(Default)]
pub struct CompletionLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl CompletionLogprobs {
    /// Adds the prompt's tokens, echoed: the first has no log-probability (nothing comes
    /// before it), the others `scores` (one per token after the first).
    pub fn add_prompt(&mut self, tokenizer: &Tokenizer, prompt: &[u32], scores: &[TokenLogprob]) {
        if let Some(&first) = prompt.first() {
            self.push(token_text(tokenizer, first), Value::Null, Value::Null);
        }
        self.add_chosen(tokenizer, scores);
    }

    /// Adds chosen (or scored) tokens with their alternatives.
    pub fn add_chosen(&mut self, tokenizer: &Tokenizer, tokens: &[TokenLogprob]) {
        for t in tokens {
            let (text, bytes) = token_text(tokenizer, t.token);
            let mut top = Map::new();
            for &(id, logprob) in &t.top {
                top.entry(token_text(tokenizer, id).0)
                    .or_insert_with(|| json!(logprob));
            }
            top.entry(text.clone()).or_insert_with(|| json!(t.logprob));
            self.push((text, bytes), json!(t.logprob), Value::Object(top));
        }
    }

    /// Adds one token (its text and bytes); the text returned holds its bytes decoded, so
    /// the offset moves by their characters, not by a `bytes:` spelling's.
    fn push(&mut self, (token, bytes): (String, Vec<u8>), logprob: Value, top: Value) {
        self.text_offset.push(json!(self.offset));
        self.offset += String::from_utf8_lossy(&bytes).chars().count();
        self.tokens.push(json!(token));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    /// The object of the tokens added since the last take.
    pub fn take(&mut self) -> Value {
        json!({"tokens": std::mem::take(&mut self.tokens),
               "token_logprobs": std::mem::take(&mut self.token_logprobs),
               "top_logprobs": std::mem::take(&mut self.top_logprobs),
               "text_offset": std::mem::take(&mut self.text_offset)})
    }
}

/// The chat `logprobs` object of `tokens`: `{"content": [{token, logprob, bytes, top_logprobs}]}`
/// (`top_logprobs` the most likely tokens, as many as were asked for).
pub fn chat_logprobs<'a>(
    tokenizer: &Tokenizer,
    tokens: impl IntoIterator<Item = &'a TokenLogprob>,
) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (text, bytes) = token_text(tokenizer, id);
        json!({"token": text, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = tokens
        .into_iter()
        .map(|t| {
            let mut e = entry(t.token, t.logprob);
            let top: Vec<Value> = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e["top_logprobs"] = json!(top);
            e
        })
        .collect();
    json!({ "content": content })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_objects_echo_the_prompt_and_rank_the_chosen_token() {
        // The byte tokenizer: token i is byte i.
        let tok = Tokenizer::bytes();
        let mut lp = CompletionLogprobs::default();
        let prompt = [b'a' as u32, b'b' as u32];
        let scored = TokenLogprob {
            token: b'b' as u32,
            logprob: -0.5,
            top: vec![(b'c' as u32, -0.25)],
        };
        lp.add_prompt(&tok, &prompt, std::slice::from_ref(&scored));
        let echoed = lp.take();
        assert_eq!(echoed["tokens"], json!(["a", "b"]));
        assert_eq!(echoed["token_logprobs"], json!([null, -0.5]));
        assert_eq!(echoed["top_logprobs"][0], Value::Null);
        // The token itself is beside the most likely one.
        assert_eq!(echoed["top_logprobs"][1], json!({"c": -0.25, "b": -0.5}));
        // A token inside a UTF-8 character (0xC3 starts "é"); offsets go on after a take.
        let chosen = TokenLogprob {
            token: 0xC3,
            logprob: -1.0,
            top: vec![(0xC3, -1.0)],
        };
        lp.add_chosen(&tok, std::slice::from_ref(&chosen));
        let more = lp.take();
        assert_eq!(more["tokens"], json!(["bytes:\\xc3"]));
        assert_eq!(more["top_logprobs"][0], json!({"bytes:\\xc3": -1.0}));
        assert_eq!(echoed["text_offset"], json!([0, 1]));
        assert_eq!(more["text_offset"], json!([2]));
        assert_eq!(lp.take()["tokens"], json!([]));

        let chat = chat_logprobs(&tok, [&chosen]);
        assert_eq!(chat["content"][0]["bytes"], json!([0xC3]));
        assert_eq!(
            chat["content"][0]["top_logprobs"][0]["logprob"],
            json!(-1.0)
        );
    }
}
