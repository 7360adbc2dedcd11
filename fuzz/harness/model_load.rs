//! The `model_load` fuzz input: one byte of flags, then `config.json`, the weights and
//! `tokenizer.json`, each as a little-endian `u32` length and its bytes, then (for a sharded
//! model) `model.safetensors.index.json` as the rest. Shared by the fuzz target and the
//! regression test (`engine/tests/fuzz_regressions.rs`), which include this file by path.

use std::path::Path;

use espalier_engine::{Model, Tokenizer};

/// Flag bit: write the weights as a shard named by an index instead of `model.safetensors`.
pub const SHARDED: u8 = 1;

/// Name of the single shard of a sharded input.
pub const SHARD: &str = "model-00001-of-00001.safetensors";

/// The files of one input.
#[derive(Debug, Default, Clone, Copy)]
pub struct Parts<'a> {
    /// Flags (`SHARDED`).
    pub flags: u8,
    /// `config.json`.
    pub config: &'a [u8],
    /// The safetensors weights.
    pub weights: &'a [u8],
    /// `tokenizer.json` (not written when empty).
    pub tokenizer: &'a [u8],
    /// `model.safetensors.index.json` (sharded inputs only).
    pub index: &'a [u8],
}

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let (len, rest) = match data.split_first_chunk::<4>() {
        Some((len, rest)) => (u32::from_le_bytes(*len) as usize, rest),
        None => (0, &data[data.len()..]),
    };
    let (part, rest) = rest.split_at(len.min(rest.len()));
    *data = rest;
    part
}

/// Splits an input into its files (lengths past the end are cut short).
pub fn split(mut data: &[u8]) -> Parts<'_> {
    let Some((&flags, rest)) = data.split_first() else {
        return Parts::default();
    };
    data = rest;
    let config = take(&mut data);
    let weights = take(&mut data);
    let tokenizer = take(&mut data);
    Parts {
        flags,
        config,
        weights,
        tokenizer,
        index: data,
    }
}

/// The input that [`split`] turns into `parts`.
#[allow(dead_code)] // the fuzz target only splits; the seed writer (engine tests) joins
pub fn join(parts: &Parts<'_>) -> Vec<u8> {
    let mut out = vec![parts.flags];
    for part in [parts.config, parts.weights, parts.tokenizer] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(parts.index);
    out
}

/// Writes the input's files into the empty directory `dir`, loads the model and the tokenizer,
/// and returns whether each loaded (errors as text). Panics only if the loader does.
pub fn run(data: &[u8], dir: &Path) -> (Result<(), String>, Result<(), String>) {
    let parts = split(data);
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).expect("write");
    write("config.json", parts.config);
    if parts.flags & SHARDED != 0 {
        write(SHARD, parts.weights);
        write("model.safetensors.index.json", parts.index);
    } else {
        write("model.safetensors", parts.weights);
    }
    if !parts.tokenizer.is_empty() {
        write("tokenizer.json", parts.tokenizer);
    }
    let model = Model::load(dir).map_err(|e| e.to_string()).inspect(|m| {
        // Describing the loaded model must work for whatever loaded.
        let _ = m.layers();
        let _ = m.num_parameters();
    });
    let tokenizer = match &model {
        Ok(m) if !parts.tokenizer.is_empty() => Tokenizer::for_model(m).map(|_| ()),
        _ => Tokenizer::from_model_dir(dir).map(|_| ()),
    }
    .map_err(|e| e.to_string());
    (model.map(|_| ()), tokenizer)
}
