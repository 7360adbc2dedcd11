//! The `pipeline_parse` fuzz input: the text of a pipeline file. Shared by the fuzz target and
//! the regression test (`tests/fuzz_pipeline.rs`), which include this file by path.

use espalier::pipeline::Pipeline;

/// Parses `data` as a pipeline (bytes that are not UTF-8 are refused, as a file read would).
pub fn run(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    Pipeline::parse("fuzz.toml", text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
