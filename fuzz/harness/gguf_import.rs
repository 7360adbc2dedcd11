//! The `gguf_import` fuzz input: the bytes of a `.gguf` file. Shared by the fuzz target and the
//! regression test (`engine/tests/fuzz_regressions.rs`), which include this file by path.

use std::path::Path;

use espalier_engine::gguf;
use espalier_engine::{Model, Tokenizer};

/// Writes `data` as `DIR/model.gguf`, imports it into `DIR/out`, and returns the result (errors
/// as text). A successful import must load back as a model with its tokenizer; that is asserted.
pub fn run(data: &[u8], dir: &Path) -> Result<(), String> {
    let file = dir.join("model.gguf");
    std::fs::write(&file, data).expect("write");
    let out = dir.join("out");
    gguf::import(&file, &out, &mut |_| {}).map_err(|e| e.to_string())?;
    let model = Model::load(&out).expect("an imported model loads");
    Tokenizer::for_model(&model).expect("an imported model's tokenizer loads");
    Ok(())
}
