//! Perplexity of a model directory on a text file, printed as JSON: the library call the CLI's
//! `eval` makes, runnable on its own to compare with transformers.
//!
//! ```text
//! cargo run --release -p espalier-engine --example perplexity -- MODEL_DIR TEXT_FILE \
//!     [--window W] [--stride S] [--max-chars N]
//! ```

use espalier_engine::eval::{self, PerplexityOptions};
use espalier_engine::{Session, Tokenizer, load_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let mut opts = PerplexityOptions::default();
    let mut max_chars = usize::MAX;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Box<dyn std::error::Error>> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse()?)
        };
        match a.as_str() {
            "--window" => opts.window = num("--window")?,
            "--stride" => opts.stride = num("--stride")?,
            "--max-chars" => max_chars = num("--max-chars")?,
            _ => positional.push(a),
        }
    }
    let [model_ref, text_file] = positional.as_slice() else {
        return Err(
            "usage: perplexity MODEL_DIR TEXT_FILE [--window W] [--stride S] [--max-chars N]"
                .into(),
        );
    };
    let model = load_model(model_ref)?;
    let tokenizer = Tokenizer::for_model(&model)?;
    let text = std::fs::read_to_string(text_file)?;
    let text: String = text.chars().take(max_chars).collect();
    let tokens = tokenizer.encode(&text)?;
    let session = Session::new(&model)?;
    let report = eval::perplexity(&session, &tokens, &opts, &mut |p| {
        eprint!("\rwindow {}/{}", p.windows_done, p.windows_total);
    })?;
    eprintln!();
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
