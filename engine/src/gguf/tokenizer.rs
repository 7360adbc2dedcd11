//! Rebuilding a Hugging Face `tokenizer.json` from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF carries the vocabulary (`tokenizer.ggml.tokens`, already spelled in GPT-2's byte
//! alphabet for byte-level BPE), the merges, a type per token (1 normal, 3 control, 4 user
//! defined, ...), the special token ids and the *name* of the pre-tokenizer
//! (`tokenizer.ggml.pre`); the splitting rules themselves live in llama.cpp's source. This module
//! maps the known names back to the `tokenizers` pipeline the model was trained with:
//!
//! | `tokenizer.ggml.pre`   | pre-tokenizer                                                  |
//! |------------------------|----------------------------------------------------------------|
//! | `smollm`, `starcoder`  | `Digits(individual)` then `ByteLevel(no prefix space)` — what  |
//! |                        | SmolLM/SmolLM2's own `tokenizer.json` uses                     |
//! | `gpt2`, `gpt-2`        | `ByteLevel(no prefix space)`                                   |
//! | `llama-bpe`, `llama3`, | LLaMA-3's split regex then `ByteLevel(no regex)`               |
//! | `llama-v3`             |                                                                |
//!
//! Only byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported; a SentencePiece vocabulary
//! (`llama`) or an unknown pre-tokenizer name is an error that names the key. Control tokens
//! become special added tokens (as in the original `tokenizer.json`), user-defined tokens plain
//! added tokens. `tokenizer.ggml.add_bos_token` / `add_eos_token` become a `TemplateProcessing`
//! post-processor; without them (SmolLM2) encoding adds nothing, as in the original.
//!
//! `tokenizer_config.json` names `PreTrainedTokenizerFast`, so `transformers` takes the pipeline
//! from `tokenizer.json` verbatim instead of rebuilding a class default.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

use super::{Meta, gguf_err};
use crate::error::EngineError;

/// LLaMA-3's pre-tokenizer split, as in its `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer families this module knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// Single digits, then GPT-2's byte-level split (SmolLM, StarCoder).
    DigitsByteLevel,
    /// GPT-2's byte-level split.
    ByteLevel,
    /// LLaMA-3's regex split, then byte-level mapping.
    Llama3,
}

impl PreTokenizer {
    /// The pre-tokenizer of a `tokenizer.ggml.pre` name, if known.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "smollm" | "starcoder" => Self::DigitsByteLevel,
            "gpt2" | "gpt-2" => Self::ByteLevel,
            "llama-bpe" | "llama3" | "llama-v3" => Self::Llama3,
            _ => return None,
        })
    }

    fn to_json(self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        match self {
            Self::DigitsByteLevel => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ]
            }),
            Self::ByteLevel => byte_level(true),
            Self::Llama3 => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false),
                ]
            }),
        }
    }
}

/// GPT-2's map from bytes to printable characters (`bytes_to_unicode`).
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{FFFD}');
            n += 1;
            c
        };
    }
    table
}

/// The tokenizer described by a GGUF file's metadata.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// Tokens by id, in the byte alphabet.
    pub tokens: Vec<String>,
    /// Merges, `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// Token types by id (llama.cpp's `llama_token_type`), if the file has them.
    pub token_types: Vec<i64>,
    /// Pre-tokenizer.
    pub pre: PreTokenizer,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_id: Option<u32>,
    /// Unknown-token id.
    pub unk_id: Option<u32>,
    /// Padding id.
    pub pad_id: Option<u32>,
    /// Whether encoding prepends BOS.
    pub add_bos: bool,
    /// Whether encoding appends EOS.
    pub add_eos: bool,
    /// The chat template (Jinja), if any.
    pub chat_template: Option<String>,
}

/// llama.cpp's token type for control tokens (`<|im_start|>`).
const TOKEN_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined added tokens.
const TOKEN_USER_DEFINED: i64 = 4;

impl GgufTokenizer {
    /// Reads and checks the `tokenizer.ggml.*` metadata.
    pub(super) fn from_meta(meta: &Meta<'_>) -> Result<Self, EngineError> {
        let model = meta.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(gguf_err(
                meta.path,
                format!(
                    "unsupported tokenizer `{model}` (metadata `tokenizer.ggml.model`); \
                     only byte-level BPE (`gpt2`) vocabularies can be converted to tokenizer.json"
                ),
            ));
        }
        let pre_name = meta.str("tokenizer.ggml.pre")?;
        let pre = PreTokenizer::from_gguf_name(pre_name).ok_or_else(|| {
            gguf_err(
                meta.path,
                format!(
                    "unsupported pre-tokenizer `{pre_name}` (metadata `tokenizer.ggml.pre`); \
                     supported: smollm, starcoder, gpt2, llama-bpe"
                ),
            )
        })?;
        let alphabet = byte_alphabet();
        let in_alphabet: HashSet<char> = alphabet.iter().copied().collect();
        let raw_tokens = meta.string_array("tokenizer.ggml.tokens")?;
        if raw_tokens.is_empty() {
            return Err(gguf_err(meta.path, "`tokenizer.ggml.tokens` is empty"));
        }
        let token_types = meta
            .opt_int_array("tokenizer.ggml.token_type")?
            .unwrap_or_else(|| vec![1; raw_tokens.len()]);
        if token_types.len() != raw_tokens.len() {
            return Err(gguf_err(
                meta.path,
                format!(
                    "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                    token_types.len(),
                    raw_tokens.len()
                ),
            ));
        }
        // Normal tokens are stored in the byte alphabet; respell any that are not (as
        // transformers' GGUF loader does), keep added/control tokens verbatim.
        let mut tokens: Vec<String> = Vec::with_capacity(raw_tokens.len());
        // Checked after respelling: two tokens spelled alike would share one vocabulary entry.
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(raw_tokens.len());
        for (id, (tok, ty)) in raw_tokens.iter().zip(&token_types).enumerate() {
            let added = *ty == TOKEN_CONTROL || *ty == TOKEN_USER_DEFINED;
            let spelled: String = if added || tok.chars().all(|c| in_alphabet.contains(&c)) {
                (*tok).to_string()
            } else {
                tok.bytes().map(|b| alphabet[b as usize]).collect()
            };
            if spelled.is_empty() {
                return Err(gguf_err(
                    meta.path,
                    format!("`tokenizer.ggml.tokens`[{id}] is empty"),
                ));
            }
            if let Some(first) = seen.insert(spelled.clone(), id) {
                return Err(gguf_err(
                    meta.path,
                    format!("`tokenizer.ggml.tokens` lists `{tok}` twice (ids {first} and {id})"),
                ));
            }
            tokens.push(spelled);
        }
        let merges: Vec<String> = meta
            .string_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(str::to_string)
            .collect();
        for (i, m) in merges.iter().enumerate() {
            let Some((left, right)) = m
                .split_once(' ')
                .filter(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains(' '))
            else {
                return Err(gguf_err(
                    meta.path,
                    format!(
                        "`tokenizer.ggml.merges`[{i}] = `{m}` is not two tokens separated by one space"
                    ),
                ));
            };
            // A BPE merge joins two vocabulary tokens into a third; `tokenizers` refuses a
            // tokenizer.json whose merges do not, so the import would write an unloadable file.
            let merged = format!("{left}{right}");
            if let Some(missing) = [left, right, merged.as_str()]
                .into_iter()
                .find(|t| !seen.contains_key(*t))
            {
                return Err(gguf_err(
                    meta.path,
                    format!(
                        "`tokenizer.ggml.merges`[{i}] = `{m}` uses `{missing}`, which is not in `tokenizer.ggml.tokens`"
                    ),
                ));
            }
        }
        let id = |key: &str| -> Result<Option<u32>, EngineError> {
            match meta.opt_u64(key)? {
                None => Ok(None),
                Some(v) if (v as usize) < tokens.len() => Ok(Some(v as u32)),
                Some(v) => Err(gguf_err(
                    meta.path,
                    format!(
                        "`{key}` = {v} is outside the vocabulary of {} tokens",
                        tokens.len()
                    ),
                )),
            }
        };
        let chat_template = meta.opt_str("tokenizer.chat_template")?.map(str::to_string);
        Ok(GgufTokenizer {
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: meta
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            add_eos: meta
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
            tokens,
            merges,
            token_types,
            pre,
            chat_template,
        })
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// The `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> Result<Value, EngineError> {
        let added_tokens: Vec<Value> = self
            .tokens
            .iter()
            .zip(&self.token_types)
            .enumerate()
            .filter(|(_, (_, ty))| **ty == TOKEN_CONTROL || **ty == TOKEN_USER_DEFINED)
            .map(|(id, (tok, ty))| {
                json!({
                    "id": id,
                    "content": tok,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": *ty == TOKEN_CONTROL,
                })
            })
            .collect();
        let vocab: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), json!(id)))
            .collect();
        let post_processor = self.post_processor()?;
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": null,
            "pre_tokenizer": self.pre.to_json(),
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": self.merges,
            }
        }))
    }

    fn post_processor(&self) -> Result<Value, EngineError> {
        if !self.add_bos && !self.add_eos {
            // What SmolLM2's own tokenizer.json has: offsets handling only, no added tokens.
            return Ok(
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
            );
        }
        let need = |flag: &str, id: Option<u32>| {
            self.token(id)
                .map(str::to_string)
                .ok_or_else(|| EngineError::Gguf {
                    path: "tokenizer".into(),
                    message: format!("`tokenizer.ggml.{flag}` is set but the token id is missing"),
                })
        };
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special = serde_json::Map::new();
        if self.add_bos {
            let bos = need("add_bos_token", self.bos_id)?;
            single.push(json!({"SpecialToken": {"id": bos, "type_id": 0}}));
            pair.push(json!({"SpecialToken": {"id": bos, "type_id": 0}}));
            special.insert(
                bos.clone(),
                json!({"id": bos, "ids": [self.bos_id], "tokens": [bos]}),
            );
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if self.add_eos {
            let eos = need("add_eos_token", self.eos_id)?;
            single.push(json!({"SpecialToken": {"id": eos, "type_id": 0}}));
            pair.push(json!({"SpecialToken": {"id": eos, "type_id": 0}}));
            special.insert(
                eos.clone(),
                json!({"id": eos, "ids": [self.eos_id], "tokens": [eos]}),
            );
        }
        if self.add_bos {
            let bos = need("add_bos_token", self.bos_id)?;
            pair.push(json!({"SpecialToken": {"id": bos, "type_id": 1}}));
        }
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        if self.add_eos {
            let eos = need("add_eos_token", self.eos_id)?;
            pair.push(json!({"SpecialToken": {"id": eos, "type_id": 1}}));
        }
        Ok(json!({
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special},
            ]
        }))
    }

    /// `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn files(
        &self,
        model_max_length: usize,
    ) -> Result<Vec<(&'static str, Value)>, EngineError> {
        let mut special = serde_json::Map::new();
        for (key, id) in [
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_id),
            ("unk_token", self.unk_id),
            ("pad_token", self.pad_id),
        ] {
            if let Some(t) = self.token(id) {
                special.insert(key.into(), json!(t));
            }
        }
        let mut config = special.clone();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("model_max_length".into(), json!(model_max_length));
        config.insert("add_prefix_space".into(), json!(false));
        config.insert("add_bos_token".into(), json!(self.add_bos));
        config.insert("add_eos_token".into(), json!(self.add_eos));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(t) = &self.chat_template {
            config.insert("chat_template".into(), json!(t));
        }
        Ok(vec![
            ("tokenizer.json", self.tokenizer_json()?),
            ("tokenizer_config.json", Value::Object(config)),
            ("special_tokens_map.json", Value::Object(special)),
        ])
    }
}
