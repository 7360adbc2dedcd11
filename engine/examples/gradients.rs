//! Times the gradients of the calibration loss on a model: the work a `taylor` stage asks the
//! host for. Prints JSON with the loss, the time, and the tokens per second forward + backward.
//!
//! ```text
//! cargo run --release -p espalier-engine --example gradients -- MODEL_DIR TEXT_FILE \
//!     [--samples N] [--seq-len T]
//! ```

use std::time::Instant;

use espalier_engine::{LossGradients, Session, Tokenizer, load_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let (mut samples, mut seq_len) = (8usize, 256usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Box<dyn std::error::Error>> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse()?)
        };
        match a.as_str() {
            "--samples" => samples = num("--samples")?,
            "--seq-len" => seq_len = num("--seq-len")?,
            _ => positional.push(a),
        }
    }
    let [model_ref, text_file] = positional.as_slice() else {
        return Err("usage: gradients MODEL_DIR TEXT_FILE [--samples N] [--seq-len T]".into());
    };
    let model = load_model(model_ref)?;
    let tokenizer = Tokenizer::for_model(&model)?;
    let ids = tokenizer.encode_with(&std::fs::read_to_string(text_file)?, false)?;
    let sequences: Vec<Vec<u32>> = ids
        .chunks_exact(seq_len)
        .take(samples)
        .map(<[u32]>::to_vec)
        .collect();
    let session = Session::new(&model)?;
    let started = Instant::now();
    let mut grads = LossGradients::new(&session)?.with_squares();
    grads.accumulate(&sequences)?;
    let loss = grads.mean_loss();
    let n = grads.sequences();
    let out = grads.finish()?.mean;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"sequences\": {n}, \"seq_len\": {seq_len}, \"layers\": {}, \"loss\": {loss:.5}, \"seconds\": {secs:.2}, \"tokens_per_s\": {:.1}}}",
        out.len(),
        (n * seq_len) as f64 / secs
    );
    Ok(())
}
