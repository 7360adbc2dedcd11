//! Text to token ids through a model directory's `tokenizer.json`, with the Hugging Face
//! `tokenizers` crate (the library behind transformers' fast tokenizers, so ids match what
//! `AutoTokenizer` produces for the same file).
//!
//! Special tokens are added exactly as the file's post-processor says (GPT-2 and SmolLM2 add
//! none), which is what `tokenizer(text)` does in transformers.
//!
//! Built-in models have no `tokenizer.json`; [`Tokenizer::for_model`] gives them the UTF-8
//! bytes of the text as ids (their vocabularies have 256 entries), so every command that takes
//! text also runs on them.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::files;
use crate::model::Model;

/// The `config.json` key by which a built-in model, and an export of one, says its tokenizer is
/// the byte tokenizer ([`Tokenizer::bytes`]), which has no `tokenizer.json` to save.
pub const BYTES_MARKER: &str = "espalier_tokenizer";

enum Kind {
    /// A `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
    /// One id per UTF-8 byte (built-in models).
    Bytes,
}

/// A loaded `tokenizer.json`, or the byte tokenizer of built-in models.
pub struct Tokenizer {
    kind: Kind,
    source: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// Accepts any valid JSON document and keeps nothing. Unlike `serde::de::IgnoredAny`, which
/// serde_json skips without decoding, every string is decoded, so invalid escapes (a lone
/// surrogate `\ud800`) are found too; nesting is bounded by serde_json's recursion limit.
struct JsonCheck;

impl<'de> serde::Deserialize<'de> for JsonCheck {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonCheck)
    }
}

impl<'de> serde::de::Visitor<'de> for JsonCheck {
    type Value = JsonCheck;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(JsonCheck)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(JsonCheck)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(JsonCheck)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(JsonCheck)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(JsonCheck)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(JsonCheck)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<JsonCheck>()?.is_some() {}
        Ok(JsonCheck)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<JsonCheck, JsonCheck>()?.is_some() {}
        Ok(JsonCheck)
    }
}

impl Tokenizer {
    /// Reads a `tokenizer.json` file (a regular file of at most [`files::JSON_LIMIT`] bytes).
    pub fn from_file(path: &Path) -> Result<Self, EngineError> {
        let source = path.display().to_string();
        if !path.exists() {
            return Err(EngineError::Tokenizer {
                path: source,
                message: "missing file: the model directory needs a tokenizer.json".into(),
            });
        }
        let bytes = files::read(path, files::JSON_LIMIT).map_err(|e| EngineError::Tokenizer {
            path: source.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_bytes(&bytes, &source)
    }

    /// One id per UTF-8 byte: the tokenizer of the built-in models.
    pub fn bytes() -> Self {
        Tokenizer {
            kind: Kind::Bytes,
            source: "byte tokenizer".into(),
        }
    }

    /// The model directory's `tokenizer.json`, or for a built-in model the byte tokenizer:
    /// one generated here (no directory), or saved from one (its `config.json` says
    /// `"espalier_tokenizer": "bytes"` and there is no `tokenizer.json`, as in an export of
    /// `builtin:tiny-llama`); checked against the model's vocabulary either way.
    pub fn for_model(model: &Model) -> Result<Self, EngineError> {
        let byte_model =
            model.config.raw.get(BYTES_MARKER).and_then(|v| v.as_str()) == Some("bytes");
        let tok = match &model.source_dir {
            Some(dir) if byte_model && !dir.join("tokenizer.json").exists() => Self::bytes(),
            Some(dir) => Self::from_model_dir(dir)?,
            None if model.source.starts_with("builtin:") => Self::bytes(),
            None => {
                return Err(EngineError::Tokenizer {
                    path: model.source.clone(),
                    message: "the model has no directory to read tokenizer.json from".into(),
                });
            }
        };
        tok.check_fits(&model.config)?;
        Ok(tok)
    }

    /// Reads `DIR/tokenizer.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, EngineError> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Parses tokenizer JSON held in memory; `source` names it in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Self, EngineError> {
        let invalid = |message: String| EngineError::Tokenizer {
            path: source.to_string(),
            message: format!("not a valid tokenizer.json: {message}"),
        };
        // `tokenizers` (0.23) panics instead of failing when the JSON is malformed inside some
        // components (its decoder and normalizer deserializers `expect` success), so the whole
        // document is checked here first, strings decoded, without building anything.
        serde_json::from_slice::<JsonCheck>(bytes).map_err(|e| {
            invalid(format!(
                "not valid JSON (line {}, column {}): {e}",
                e.line(),
                e.column()
            ))
        })?;
        // Any other panic inside the library becomes an error too (the process's panic hook
        // still reports it).
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|_| invalid("the tokenizers library failed on this file".into()))?;
        let inner = parsed.map_err(|e| invalid(e.to_string()))?;
        Ok(Tokenizer {
            kind: Kind::Hf(Box::new(inner)),
            source: source.to_string(),
        })
    }

    /// Token ids of `text`, with the special tokens the post-processor adds (if any).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.encode_with(text, true)
    }

    /// Token ids of `text`; `add_special_tokens = false` skips the post-processor's tokens.
    pub fn encode_with(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let inner = match &self.kind {
            Kind::Hf(inner) => inner,
            Kind::Bytes => return Ok(text.bytes().map(u32::from).collect()),
        };
        let enc = inner
            .encode(text, add_special_tokens)
            .map_err(|e| EngineError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot encode text: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept unless `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EngineError> {
        let inner = match &self.kind {
            Kind::Hf(inner) => inner,
            Kind::Bytes => {
                let bytes = ids
                    .iter()
                    .map(|&id| u8::try_from(id))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| EngineError::Tokenizer {
                        path: self.source.clone(),
                        message: "ids above 255 are not bytes".into(),
                    })?;
                return Ok(String::from_utf8_lossy(&bytes).into_owned());
            }
        };
        inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EngineError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot decode ids: {e}"),
            })
    }

    /// The bytes one token stands for, as its text would be in a decoded sequence: what the
    /// OpenAI API's `logprobs` report per token (`bytes`), which a token's text alone cannot
    /// carry where it ends inside a UTF-8 character. Byte-level BPE tokens (GPT-2, SmolLM2)
    /// map back through the byte-to-character table; SentencePiece-style tokens give
    /// `<0xNN>` as that byte and `▁` as a space. `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let inner = match &self.kind {
            Kind::Bytes => return u8::try_from(id).ok().map(|b| vec![b]),
            Kind::Hf(inner) => inner,
        };
        let token = inner.id_to_token(id)?;
        let byte_level = matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let mut bytes = Vec::with_capacity(token.len());
        if byte_level {
            for c in token.chars() {
                match byte_level_byte(c) {
                    Some(b) => bytes.push(b),
                    // An added token's literal text (not byte-level encoded).
                    None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
        } else if let Some(b) = token
            .strip_prefix("<0x")
            .and_then(|h| h.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            bytes.push(b);
        } else {
            bytes.extend_from_slice(token.replace('\u{2581}', " ").as_bytes());
        }
        Some(bytes)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Hf(inner) => inner.get_vocab_size(true),
            Kind::Bytes => 256,
        }
    }

    /// The id of a token string (e.g. `<|endoftext|>`), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Hf(inner) => inner.token_to_id(token),
            Kind::Bytes => None,
        }
    }

    /// Fails clearly when this tokenizer can produce ids the model has no embedding for.
    /// (Models often pad their embedding beyond the tokenizer, so a smaller tokenizer is fine.)
    pub fn check_fits(&self, config: &ModelConfig) -> Result<(), EngineError> {
        // The largest id, not the count: added tokens may leave gaps.
        let max_id = match &self.kind {
            Kind::Hf(inner) => inner.get_vocab(true).values().copied().max().unwrap_or(0),
            Kind::Bytes => 255,
        };
        if max_id as usize >= config.vocab_size {
            return Err(EngineError::Tokenizer {
                path: self.source.clone(),
                message: format!(
                    "tokenizer has ids up to {max_id} but the model's vocabulary has {} entries: \
                     this tokenizer does not belong to the model",
                    config.vocab_size
                ),
            });
        }
        Ok(())
    }

    /// The `tokenizers` object, for what this wrapper does not cover (`None` for bytes).
    pub fn inner(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.kind {
            Kind::Hf(inner) => Some(inner),
            Kind::Bytes => None,
        }
    }
}

/// The byte a character of a byte-level BPE token stands for (GPT-2's table: printable bytes
/// are their own character, the other 68 map in order to U+0100..U+0143), or `None` for a
/// character outside the table.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let code = c as u32;
    if code <= 0xFF {
        return printable(code).then_some(code as u8);
    }
    let n = code.checked_sub(0x100)?;
    (0u32..=0xFF)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_models_get_the_byte_tokenizer() {
        let model = crate::builtin_model("tiny-llama").unwrap();
        let tok = Tokenizer::for_model(&model).unwrap();
        let ids = tok.encode("né").unwrap();
        assert_eq!(ids, vec![110, 195, 169]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "né");
        assert!(tok.decode(&[300], false).is_err());
        assert_eq!(tok.vocab_size(), 256);
        assert_eq!(tok.token_bytes(195), Some(vec![195]));
        assert_eq!(tok.token_bytes(256), None);
    }

    #[test]
    fn token_bytes_add_up_to_the_text() {
        // A byte-level BPE tokenizer (the test fixture's), on text with characters of two,
        // three and four UTF-8 bytes, which some tokens end inside.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let tok = Tokenizer::from_model_dir(&dir).unwrap();
        let text = "Once upon a tîme, ∑ 🌱 grew\n\tthere";
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| tok.token_bytes(id).unwrap())
            .collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        assert_eq!(tok.token_bytes(1 << 20), None);
        // The table's two ranges: printable bytes are their own character, the rest follow.
        assert_eq!(byte_level_byte('A'), Some(b'A'));
        assert_eq!(byte_level_byte('\u{120}'), Some(b' '));
        assert_eq!(byte_level_byte('\u{100}'), Some(0));
        assert_eq!(byte_level_byte('\u{143}'), Some(0xAD));
        assert_eq!(byte_level_byte('\u{144}'), None);
    }

    /// A saved built-in model (an export of `builtin:tiny-llama` has no tokenizer.json) keeps
    /// the byte tokenizer through its config's marker; a directory without the marker still
    /// needs its tokenizer.json.
    #[test]
    fn a_saved_builtin_model_keeps_the_byte_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let model = crate::builtin_model("tiny-llama").unwrap();
        model.save_into(dir.path()).unwrap();
        assert!(!dir.path().join("tokenizer.json").exists());
        let saved = crate::load_model(dir.path().to_str().unwrap()).unwrap();
        let tok = Tokenizer::for_model(&saved).unwrap();
        assert_eq!(tok.encode("né").unwrap(), vec![110, 195, 169]);

        let mut unmarked = saved;
        if let serde_json::Value::Object(map) = &mut unmarked.config.raw {
            map.remove(BYTES_MARKER);
        }
        let err = Tokenizer::for_model(&unmarked).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
