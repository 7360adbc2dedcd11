//! Times the training pass (forward + backward over every block linear, weight gradients
//! accumulated, no optimizer) on a model: the hand-written [`TrainingPass`] and, with
//! `--autograd`, candle's autograd ([`LossGradients`]) on the same batches in the same run, so
//! the ratio between them is not at the mercy of a noisy machine. Prints one JSON line.
//!
//! ```text
//! cargo run --release -p espalier-engine --example train_pass -- MODEL_DIR TEXT_FILE \
//!     [--batch 4] [--seq-len 256] [--steps 3] [--autograd] [--blocks DENSITY] [--distill] \
//!     [--bf16]
//! ```
//!
//! `--blocks 0.2` also times the same pass with every block linear pruned to its largest 20%
//! of 16×16 blocks (by sum of |w|) and declared block-sparse ([`TrainingPass::set_mask`]),
//! in the same run.
//!
//! `--distill` also times the pass distilling a teacher (a second session of the same model,
//! KL at temperature 1 as the recovery pipelines use): its tokens/s beside the plain pass's
//! is what distillation costs per step (the teacher's forward pass and both LM heads).
//!
//! `--bf16` also times the pass (and, with `--distill`, the distillation pass) with its linear
//! products in mixed precision ([`Precision::Bf16`]: bf16 operands, f32 sums), in the same run,
//! and prints how far its gradients are from the f32 pass's: the largest difference relative
//! to the layer's largest f32 entry, and the largest `‖Δg‖ / ‖g‖` of a layer.
//!
//! The first step of each pass is a warm-up and is not timed. The end-to-end figure beside
//! PyTorch (optimizer included) is `scripts/train_throughput_bench.py`.

use std::time::Instant;

use espalier_engine::{
    Distillation, LossGradients, Precision, Session, Tokenizer, TrainingPass, load_model,
};

/// One timed pass: seconds of the timed steps, the last loss, and the last step's mean
/// gradients in `session.block_linears()` order.
type Timed = (Vec<f64>, f64, Vec<Vec<f32>>);

/// Times `batches` through one kept [`TrainingPass`] at `precision` (masks declared as given,
/// distilling `teacher` when given), the first step untimed.
fn time_pass(
    session: &Session,
    batches: &[&[Vec<u32>]],
    masks: &[(String, Vec<bool>)],
    teacher: Option<&Session>,
    precision: Precision,
) -> Result<Timed, Box<dyn std::error::Error>> {
    let mut pass = TrainingPass::new(session)?.with_precision(precision)?;
    if let Some(teacher) = teacher {
        let d = Distillation {
            weight: 1.0,
            temperature: 1.0,
        };
        pass = pass.with_teacher(session, teacher, d)?;
    }
    let sparse = masks
        .iter()
        .map(|(name, keep)| pass.set_mask(name, Some(keep)))
        .collect::<Result<Vec<bool>, _>>()?;
    let mut grads: Vec<Vec<f32>> = Vec::new();
    let (mut times, mut loss) = (Vec::new(), 0.0);
    for (i, b) in batches.iter().enumerate() {
        let began = Instant::now();
        pass.reset();
        pass.accumulate(session, b)?;
        loss = pass.mean_loss();
        grads.resize_with(session.block_linears().len(), Vec::new);
        for (linear, grad) in session.block_linears().into_iter().zip(grads.iter_mut()) {
            pass.mean_into(linear.name(), grad);
            std::hint::black_box(&grad);
        }
        let secs = began.elapsed().as_secs_f64();
        if i > 0 {
            times.push(secs);
        }
        eprintln!(
            "step {i} ({} of {} layers block-sparse): {secs:.2} s",
            sparse.iter().filter(|&&s| s).count(),
            masks.len()
        );
    }
    Ok((times, loss, grads))
}

/// The largest `‖b − a‖ / ‖a‖` (Euclidean norms over a layer) over all layers.
fn worst_relative_norm(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let norm: f64 = a.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let diff: f64 = (a.iter().zip(b))
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum();
            (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
        })
        .fold(0.0, f64::max)
}

/// The largest `|b − a|` over a layer relative to the largest `|a|` in that layer, over all
/// layers.
fn worst_relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let scale = a
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(f32::MIN_POSITIVE);
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            f64::from(diff / scale)
        })
        .fold(0.0, f64::max)
}

fn tokens_per_s(tokens: f64, times: &[f64]) -> f64 {
    tokens * times.len() as f64 / times.iter().sum::<f64>()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut positional = Vec::new();
    let (mut batch, mut seq_len, mut steps, mut autograd) = (4usize, 256usize, 3usize, false);
    let (mut distill, mut bf16) = (false, false);
    let mut blocks: Option<f64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<usize, Box<dyn std::error::Error>> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse()?)
        };
        match a.as_str() {
            "--batch" => batch = num("--batch")?,
            "--seq-len" => seq_len = num("--seq-len")?,
            "--steps" => steps = num("--steps")?.max(2),
            "--autograd" => autograd = true,
            "--distill" => distill = true,
            "--bf16" => bf16 = true,
            "--blocks" => {
                let v = args.next().ok_or("--blocks needs a value")?;
                blocks = Some(v.parse()?);
            }
            _ => positional.push(a),
        }
    }
    let [model_ref, text_file] = positional.as_slice() else {
        return Err("usage: train_pass MODEL_DIR TEXT_FILE [--batch N] [--seq-len T] [--steps S] [--autograd] [--blocks DENSITY] [--distill] [--bf16]".into());
    };
    let model = load_model(model_ref)?;
    let tokenizer = Tokenizer::for_model(&model)?;
    let ids = tokenizer.encode_with(&std::fs::read_to_string(text_file)?, false)?;
    let windows: Vec<Vec<u32>> = ids.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
    if windows.len() < batch * steps {
        return Err(format!(
            "{text_file}: {} windows of {seq_len} tokens, {} needed",
            windows.len(),
            batch * steps
        )
        .into());
    }
    let session = Session::new(&model)?;
    let batches: Vec<&[Vec<u32>]> = windows.chunks_exact(batch).take(steps).collect();
    let tokens = (batch * seq_len) as f64;

    let (hand, hand_loss, hand_grads) = time_pass(&session, &batches, &[], None, Precision::F32)?;
    let hand_tps = tokens_per_s(tokens, &hand);
    let mut sparse_line = String::new();
    if let Some(density) = blocks {
        let mut pruned = model.clone();
        let mut masks = Vec::new();
        for linear in session.block_linears() {
            let name = linear.name().to_string();
            let w = pruned.weight(&name).ok_or("missing weight")?.clone();
            let (out, inp) = w.dims2()?;
            let mut values = w.flatten_all()?.to_vec1::<f32>()?;
            let (rows, cols) = (out / 16, inp / 16);
            let mut score: Vec<(f32, usize)> = (0..rows * cols)
                .map(|k| {
                    let (rb, cb) = (k / cols, k % cols);
                    let s = (0..16)
                        .map(|r| {
                            values[(rb * 16 + r) * inp + cb * 16..][..16]
                                .iter()
                                .map(|v| v.abs())
                                .sum::<f32>()
                        })
                        .sum();
                    (s, k)
                })
                .collect();
            score.sort_by(|a, b| b.0.total_cmp(&a.0));
            let kept_blocks = ((rows * cols) as f64 * density).round() as usize;
            let mut kept = vec![false; rows * cols];
            score
                .iter()
                .take(kept_blocks)
                .for_each(|&(_, k)| kept[k] = true);
            let keep: Vec<bool> = (0..out * inp)
                .map(|i| kept[(i / inp / 16) * cols + (i % inp) / 16])
                .collect();
            values
                .iter_mut()
                .zip(&keep)
                .filter(|(_, k)| !**k)
                .for_each(|(v, _)| *v = 0.0);
            pruned.set_weight(
                &name,
                candle_core::Tensor::from_vec(values, (out, inp), &candle_core::Device::Cpu)?,
                false,
            )?;
            masks.push((name, keep));
        }
        let pruned_session = Session::new(&pruned)?;
        let (times, loss, _) = time_pass(&pruned_session, &batches, &masks, None, Precision::F32)?;
        let tps = tokens_per_s(tokens, &times);
        sparse_line = format!(
            ", \"block_density\": {density}, \"block_sparse_tokens_per_s\": {tps:.1}, \"block_sparse_loss\": {loss:.5}, \"block_sparse_over_dense\": {:.2}",
            tps / hand_tps
        );
    }
    let mut line = format!(
        "{{\"batch\": {batch}, \"seq_len\": {seq_len}, \"threads\": {}, \"hand_written_tokens_per_s\": {hand_tps:.1}, \"hand_written_loss\": {hand_loss:.5}",
        rayon::current_num_threads()
    );
    if autograd {
        let mut auto = Vec::new();
        let mut auto_loss = 0.0;
        for (i, b) in batches.iter().enumerate() {
            let began = Instant::now();
            let mut pass = LossGradients::new(&session)?;
            pass.accumulate(b)?;
            auto_loss = pass.mean_loss();
            std::hint::black_box(pass.finish()?);
            if i > 0 {
                auto.push(began.elapsed().as_secs_f64());
            }
            eprintln!("autograd step {i}: {:.2} s", began.elapsed().as_secs_f64());
        }
        let auto_tps = tokens * auto.len() as f64 / auto.iter().sum::<f64>();
        line += &format!(
            ", \"autograd_tokens_per_s\": {auto_tps:.1}, \"autograd_loss\": {auto_loss:.5}, \"speedup\": {:.2}",
            hand_tps / auto_tps
        );
    }
    if bf16 {
        let (times, loss, grads) = time_pass(&session, &batches, &[], None, Precision::Bf16)?;
        let tps = tokens_per_s(tokens, &times);
        line += &format!(
            ", \"bf16_tokens_per_s\": {tps:.1}, \"bf16_loss\": {loss:.5}, \"bf16_over_f32\": {:.2}, \"bf16_worst_gradient_error\": {:.2e}, \"bf16_worst_gradient_norm_error\": {:.2e}",
            tps / hand_tps,
            worst_relative(&hand_grads, &grads),
            worst_relative_norm(&hand_grads, &grads)
        );
    }
    if distill {
        let teacher = Session::new(&model)?;
        let (times, loss, _) = time_pass(&session, &batches, &[], Some(&teacher), Precision::F32)?;
        let tps = tokens_per_s(tokens, &times);
        line += &format!(
            ", \"distill_tokens_per_s\": {tps:.1}, \"distill_loss\": {loss:.5}, \"distill_over_plain\": {:.2}",
            tps / hand_tps
        );
        if bf16 {
            let (times16, loss16, _) =
                time_pass(&session, &batches, &[], Some(&teacher), Precision::Bf16)?;
            let tps16 = tokens_per_s(tokens, &times16);
            line += &format!(
                ", \"bf16_distill_tokens_per_s\": {tps16:.1}, \"bf16_distill_loss\": {loss16:.5}, \"bf16_distill_over_f32_distill\": {:.2}",
                tps16 / tps
            );
        }
    }
    line += &sparse_line;
    println!("{line}}}");
    Ok(())
}
