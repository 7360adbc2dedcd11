//! Fuzz target `model_load`: see `harness/model_load.rs` for the input format and fuzz/README.md for how to run it.
#![no_main]

#[path = "../harness/model_load.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temporary directory");
    let _ = harness::run(data, dir.path());
});
