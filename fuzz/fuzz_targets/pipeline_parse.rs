//! Fuzz target `pipeline_parse`: see `harness/pipeline_parse.rs` for the input format and
//! fuzz/README.md for how to run it.
#![no_main]

#[path = "../harness/pipeline_parse.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data);
});
