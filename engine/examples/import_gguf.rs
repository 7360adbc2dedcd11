//! Imports a GGUF checkpoint into a Hugging Face–style directory (what `espalier import` does):
//!
//! ```text
//! cargo run --release -p espalier-engine --example import_gguf -- FILE.gguf OUT_DIR
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use espalier_engine::gguf::{self, ImportProgress};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gguf_path, out_dir] = args.as_slice() else {
        eprintln!("usage: import_gguf FILE.gguf OUT_DIR");
        return ExitCode::from(2);
    };
    let start = std::time::Instant::now();
    let mut on_progress = |p: ImportProgress<'_>| match p {
        ImportProgress::Opened { tensors, name } => {
            eprintln!(
                "{gguf_path}: {tensors} tensors ({})",
                name.unwrap_or("unnamed")
            );
        }
        ImportProgress::Tensor { index, total, .. } if index == total => {
            eprintln!("dequantized {total} tensors");
        }
        ImportProgress::Tensor { .. } => {}
        ImportProgress::Wrote { file } => eprintln!("wrote {file}"),
    };
    match gguf::import(
        &PathBuf::from(gguf_path),
        &PathBuf::from(out_dir),
        &mut on_progress,
    ) {
        Ok(summary) => {
            println!(
                "{}: {} tensors, {} parameters, types {:?}, vocab {}, tied head: {} ({:.1} s)",
                summary.out_dir.display(),
                summary.tensors,
                summary.parameters,
                summary.tensor_types,
                summary.vocab_size,
                summary.tie_word_embeddings,
                start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
