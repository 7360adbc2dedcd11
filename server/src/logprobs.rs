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

/// A completions `logprobs` object being built, chunk by chunk when streamed: `text_offset`
/// counts characters of the text returned so far.
#[derive(Default)]
pub struct CompletionLogprobs {
    offset: usize,
}

impl CompletionLogprobs {
    /// The object for the prompt's tokens when echoed: the first has no log-probability (nothing
    /// comes before it), the others `scores` (one per token after the first).
    pub fn prompt(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        scores: &[TokenLogprob],
    ) -> Value {
        let mut out = Columns::default();
        if let Some(&first) = prompt.first() {
            let (text, _) = token_text(tokenizer, first);
            out.push(
                text,
                Value::Null,
                Value::Null,
                self.advance_by(first, tokenizer),
            );
        }
        for s in scores {
            self.push_scored(&mut out, tokenizer, s);
        }
        out.into_value()
    }

    /// The object for chosen tokens (`logprobs` of the generation, or of one stream chunk).
    pub fn chosen(&mut self, tokenizer: &Tokenizer, tokens: &[TokenLogprob]) -> Value {
        let mut out = Columns::default();
        for t in tokens {
            self.push_scored(&mut out, tokenizer, t);
        }
        out.into_value()
    }

    fn push_scored(&mut self, out: &mut Columns, tokenizer: &Tokenizer, t: &TokenLogprob) {
        let (text, _) = token_text(tokenizer, t.token);
        let mut top = Map::new();
        for &(id, logprob) in &t.top {
            top.entry(token_text(tokenizer, id).0)
                .or_insert_with(|| json!(logprob));
        }
        top.entry(text.clone()).or_insert_with(|| json!(t.logprob));
        let offset = self.advance_by(t.token, tokenizer);
        out.push(text, json!(t.logprob), Value::Object(top), offset);
    }

    /// The offset of the token `id` in the text, and moves past it.
    fn advance_by(&mut self, id: u32, tokenizer: &Tokenizer) -> usize {
        let at = self.offset;
        let bytes = tokenizer.token_bytes(id).unwrap_or_default();
        self.offset += String::from_utf8_lossy(&bytes).chars().count();
        at
    }
}

/// The four parallel arrays of a completions `logprobs` object.
#[derive(Default)]
struct Columns {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
}

impl Columns {
    fn push(&mut self, token: String, logprob: Value, top: Value, offset: usize) {
        self.tokens.push(json!(token));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
        self.text_offset.push(json!(offset));
    }

    fn into_value(self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}

/// The chat `logprobs` object of `tokens`: `{"content": [{token, logprob, bytes, top_logprobs}]}`
/// (`top_logprobs` the most likely tokens, as many as were asked for).
pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[TokenLogprob]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (text, bytes) = token_text(tokenizer, id);
        json!({"token": text, "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t.token, t.logprob);
            let top: Vec<Value> = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e["top_logprobs"] = json!(top);
            e
        })
        .collect();
    json!({ "content": content })
}

/// Appends the completions `logprobs` object `more` to `into` (an echoed prompt's and the
/// generation's parts of one response), column by column.
pub fn append_completion(into: &mut Value, more: Value) {
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(a), Some(b)) = (into[key].as_array_mut(), more[key].as_array()) {
            a.extend(b.iter().cloned());
        }
    }
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
        let mut all = lp.prompt(&tok, &prompt, std::slice::from_ref(&scored));
        assert_eq!(all["tokens"], json!(["a", "b"]));
        assert_eq!(all["token_logprobs"], json!([null, -0.5]));
        assert_eq!(all["top_logprobs"][0], Value::Null);
        // The token itself is beside the most likely one.
        assert_eq!(all["top_logprobs"][1], json!({"c": -0.25, "b": -0.5}));
        // A token inside a UTF-8 character (0xC3 starts "é").
        let chosen = TokenLogprob {
            token: 0xC3,
            logprob: -1.0,
            top: vec![(0xC3, -1.0)],
        };
        let more = lp.chosen(&tok, std::slice::from_ref(&chosen));
        assert_eq!(more["tokens"], json!(["bytes:\\xc3"]));
        assert_eq!(more["top_logprobs"][0], json!({"bytes:\\xc3": -1.0}));
        append_completion(&mut all, more);
        assert_eq!(all["text_offset"], json!([0, 1, 2]));
        assert_eq!(all["token_logprobs"], json!([null, -0.5, -1.0]));

        let chat = chat_logprobs(&tok, &[chosen]);
        assert_eq!(chat["content"][0]["bytes"], json!([0xC3]));
        assert_eq!(
            chat["content"][0]["top_logprobs"][0]["logprob"],
            json!(-1.0)
        );
    }
}
