//! The forward pass, tokenizers and perplexity against Hugging Face transformers.
//!
//! The fixtures (tiny random models, tokenizers, logits, losses, perplexities) were written by
//! `engine/scripts/make_goldens.py`; see its docstring for what each model exercises.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use espalier_engine::eval::{self, PerplexityOptions};
use espalier_engine::{KvCache, Model, Session, Tokenizer};
use serde_json::Value;

/// The bar for logits, f32 against f32.
const LOGIT_TOL: f32 = 1e-4;
/// Gradients and Fisher diagonals against PyTorch, max |Δ| relative to the layer's largest
/// entry: the precision README.md states for them (measured 1.1e-6 to 3.9e-6 on the fixtures).
const GRADIENT_REL_TOL: f32 = 5e-6;
const MODELS: [&str; 3] = ["llama", "llama-pruned", "gpt2"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixtures().join("golden/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn session(name: &str) -> (Model, Session) {
    let model = Model::load(&fixtures().join(name)).unwrap();
    let session = Session::new(&model).unwrap();
    (model, session)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

fn reference_logits(name: &str) -> Tensor {
    let path = fixtures().join(format!("golden/{name}.logits.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .remove("random")
        .unwrap()
}

#[test]
fn logits_match_transformers() {
    let g = golden();
    for name in MODELS {
        let (_, s) = session(name);
        let tokens = ids(&g["models"][name]["sequences"]["random"]["ids"]);
        let ours = s.forward(&tokens, None).unwrap();
        let theirs = reference_logits(name);
        let diff = max_abs_diff(&ours, &theirs);
        // Logits spread over several units, so this tolerance is a real check.
        let spread: f32 = theirs
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(spread > 1.0, "{name}: degenerate reference logits");
        assert!(diff <= LOGIT_TOL, "{name}: max |Δlogit| = {diff}");
        eprintln!("{name}: max |Δlogit| = {diff:.2e} (max |logit| {spread:.2})");
    }
}

#[test]
fn losses_and_token_nll_match_transformers() {
    let g = golden();
    for name in MODELS {
        let (_, s) = session(name);
        for seq in ["random", "text"] {
            let r = &g["models"][name]["sequences"][seq];
            let tokens = ids(&r["ids"]);
            let loss = f64::from(s.loss(&tokens).unwrap());
            let want = r["loss"].as_f64().unwrap();
            assert!(
                (loss - want).abs() <= 1e-5,
                "{name}/{seq}: loss {loss} vs {want}"
            );
            let nll = s.nll(&tokens).unwrap();
            for (i, (a, b)) in nll.iter().zip(floats(&r["nll"])).enumerate() {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-4,
                    "{name}/{seq}: nll[{i}] {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let g = golden();
    for name in MODELS {
        let (_, s) = session(name);
        let tokens = ids(&g["models"][name]["sequences"]["random"]["ids"]);
        let full = s.forward(&tokens, None).unwrap();
        for prompt in [1, 5, 17] {
            let mut cache = KvCache::new();
            let mut rows = vec![s.forward(&tokens[..prompt], Some(&mut cache)).unwrap()];
            for &t in &tokens[prompt..] {
                rows.push(s.forward(&[t], Some(&mut cache)).unwrap());
            }
            let inc = Tensor::cat(&rows, 0).unwrap();
            let diff = max_abs_diff(&full, &inc);
            assert!(diff <= LOGIT_TOL, "{name}, prompt {prompt}: {diff}");
            assert_eq!(cache.len(), tokens.len());
        }
        // Chunks of several tokens after the prompt use the same cache path.
        let mut cache = KvCache::new();
        let a = s.forward(&tokens[..10], Some(&mut cache)).unwrap();
        let b = s.forward(&tokens[10..], Some(&mut cache)).unwrap();
        let diff = max_abs_diff(&full, &Tensor::cat(&[a, b], 0).unwrap());
        assert!(diff <= LOGIT_TOL, "{name}, two chunks: {diff}");
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    let g = golden();
    for name in MODELS {
        let (_, s) = session(name);
        let r = &g["models"][name]["greedy"];
        let prompt = ids(&r["prompt"]);
        let want = ids(&r["generated"]);
        let report = eval::latency(&s, &prompt, want.len()).unwrap();
        assert_eq!(report.generated, want, "{name}");
    }
}

#[test]
fn perplexity_matches_the_hf_fixed_length_loop() {
    let g = golden();
    let text = g["eval_text"].as_str().unwrap();
    for name in MODELS {
        let (_, s) = session(name);
        let tok = Tokenizer::from_model_dir(&fixtures().join(name)).unwrap();
        let tokens = tok.encode(text).unwrap();
        let r = &g["models"][name]["perplexity"];
        assert_eq!(tokens.len() as u64, r["text_tokens"].as_u64().unwrap());
        // The "text" sequence the script ran is the head of the same encoding.
        let head = ids(&g["models"][name]["sequences"]["text"]["ids"]);
        assert_eq!(&tokens[..head.len()], head.as_slice());
        for run in r["runs"].as_array().unwrap() {
            let opts = PerplexityOptions {
                window: run["window"].as_u64().unwrap() as usize,
                stride: run["stride"].as_u64().unwrap() as usize,
            };
            let mut seen = 0;
            let report = eval::perplexity(&s, &tokens, &opts, &mut |p| {
                seen = p.windows_done;
                assert!(p.windows_done <= p.windows_total);
            })
            .unwrap();
            assert_eq!(seen, report.windows);
            let want = run["perplexity"].as_f64().unwrap();
            let rel = (report.perplexity - want).abs() / want;
            assert!(
                rel <= 1e-5,
                "{name} {opts:?}: perplexity {} vs transformers {want}",
                report.perplexity
            );
        }
    }
}

#[test]
fn tokenizers_match_reference_ids() {
    let g = golden();
    // The GPT-2 model carries the GPT-2-style tokenizer, the LLaMA models the SmolLM2-style one.
    for (kind, dir) in [("gpt2", "gpt2"), ("smollm", "llama")] {
        let tok = Tokenizer::from_model_dir(&fixtures().join(dir)).unwrap();
        let r = &g["tokenizers"][kind];
        assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
        for case in r["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{kind}: {text:?}");
            let decoded = tok.decode(&got, false).unwrap();
            assert_eq!(
                decoded,
                case["decoded"].as_str().unwrap(),
                "{kind}: {text:?}"
            );
        }
        let model = Model::load(&fixtures().join(dir)).unwrap();
        tok.check_fits(&model.config).unwrap();
        let via_model = Tokenizer::for_model(&model).unwrap();
        assert_eq!(
            via_model.encode("In 1911").unwrap(),
            tok.encode("In 1911").unwrap()
        );
    }
    // SmolLM2 style: every digit its own pre-token, no prefix space.
    let smol = Tokenizer::from_model_dir(&fixtures().join("llama")).unwrap();
    let ids = smol.encode("1911").unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(smol.decode(&ids, false).unwrap(), "1911");
    assert_eq!(smol.token_to_id("<|im_start|>"), Some(1));
}

#[test]
fn tokenizer_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("missing"),
        "{err}"
    );
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let err = Tokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a valid tokenizer.json"), "{err}");
    // A tokenizer with more ids than the model has embeddings.
    let tok = Tokenizer::from_model_dir(&fixtures().join("gpt2")).unwrap();
    let small = espalier_engine::builtin_model("tiny-gpt2").unwrap();
    let err = tok.check_fits(&small.config).unwrap_err().to_string();
    assert!(err.contains("does not belong to the model"), "{err}");
}

/// Gradients of the calibration loss (mean over the two recorded sequences of each one's mean
/// next-token loss) for every block linear, against PyTorch autograd through transformers
/// (`engine/scripts/make_gradient_goldens.py`).
#[test]
fn loss_gradients_match_transformers() {
    let g = golden();
    for name in MODELS {
        let (_, s) = session(name);
        let seqs = &g["models"][name]["sequences"];
        let sequences = vec![ids(&seqs["random"]["ids"]), ids(&seqs["text"]["ids"])];
        let path = fixtures().join(format!("golden/{name}.grads.safetensors"));
        let reference = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let expected_loss: f64 = meta.metadata().as_ref().unwrap()["loss"].parse().unwrap();

        let mut grads = espalier_engine::LossGradients::new(&s).unwrap();
        grads.accumulate(&sequences).unwrap();
        assert!(
            (grads.mean_loss() - expected_loss).abs() < 1e-4,
            "{name}: loss {} vs {expected_loss}",
            grads.mean_loss()
        );
        let ours = grads.finish().unwrap().mean;
        assert_eq!(ours.len(), reference.len(), "{name}: layer count");
        let mut worst = 0.0f32;
        for (layer, expected) in &reference {
            let got = &ours[layer];
            let scale = max_abs(expected);
            assert!(scale > 0.0, "{name} {layer}: degenerate reference");
            let rel = max_abs_diff(got, expected) / scale;
            worst = worst.max(rel);
            assert!(
                rel <= GRADIENT_REL_TOL,
                "{name} {layer}: max |Δg| / max |g| = {rel:.2e}"
            );
        }
        eprintln!("{name}: gradient max |Δ| / max |g| = {worst:.2e}");
    }
}

/// The hand-written training pass gives the same loss and gradients as PyTorch autograd on
/// the LLaMA-family golden models (the ones it covers; GPT-2 must be refused, not miscomputed).
#[test]
fn training_pass_gradients_match_transformers() {
    let g = golden();
    let mut covered = 0;
    for name in MODELS {
        let (_, s) = session(name);
        if !espalier_engine::TrainingPass::supports(&s) {
            assert!(
                espalier_engine::TrainingPass::new(&s).is_err(),
                "{name}: an unsupported model must be refused"
            );
            continue;
        }
        covered += 1;
        let seqs = &g["models"][name]["sequences"];
        let sequences = vec![ids(&seqs["random"]["ids"]), ids(&seqs["text"]["ids"])];
        let path = fixtures().join(format!("golden/{name}.grads.safetensors"));
        let reference = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let expected_loss: f64 = meta.metadata().as_ref().unwrap()["loss"].parse().unwrap();

        let mut pass = espalier_engine::TrainingPass::new(&s).unwrap();
        pass.accumulate(&s, &sequences).unwrap();
        assert!(
            (pass.mean_loss() - expected_loss).abs() < 1e-4,
            "{name}: loss {} vs {expected_loss}",
            pass.mean_loss()
        );
        let ours = pass.finish();
        assert_eq!(ours.len(), reference.len(), "{name}: layer count");
        let mut worst = 0.0f32;
        for (layer, expected) in &reference {
            let got = Tensor::from_vec(ours[layer].clone(), expected.dims(), &Device::Cpu).unwrap();
            let scale = max_abs(expected);
            assert!(scale > 0.0, "{name} {layer}: degenerate reference");
            let rel = max_abs_diff(&got, expected) / scale;
            worst = worst.max(rel);
            assert!(
                rel <= GRADIENT_REL_TOL,
                "{name} {layer}: max |Δg| / max |g| = {rel:.2e}"
            );
        }
        eprintln!("{name}: training pass gradient max |Δ| / max |g| = {worst:.2e}");
    }
    assert!(
        covered > 0,
        "no golden model is covered by the training pass"
    );
}

/// The empirical Fisher diagonal (mean over the two recorded sequences of each one's squared
/// loss gradient) for every block linear, against PyTorch (`make_gradient_goldens.py`).
#[test]
fn fisher_diagonal_matches_transformers() {
    let g = golden();
    for name in MODELS {
        let (_, s) = session(name);
        let seqs = &g["models"][name]["sequences"];
        let sequences = vec![ids(&seqs["random"]["ids"]), ids(&seqs["text"]["ids"])];
        let path = fixtures().join(format!("golden/{name}.fisher.safetensors"));
        let reference = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut grads = espalier_engine::LossGradients::new(&s)
            .unwrap()
            .with_squares();
        grads.accumulate(&sequences).unwrap();
        let ours = grads.finish().unwrap().mean_squares.unwrap();
        assert_eq!(ours.len(), reference.len(), "{name}: layer count");
        let mut worst = 0.0f32;
        for (layer, expected) in &reference {
            let got = &ours[layer];
            let scale = max_abs(expected);
            assert!(scale > 0.0, "{name} {layer}: degenerate reference");
            let rel = max_abs_diff(got, expected) / scale;
            worst = worst.max(rel);
            assert!(
                rel <= GRADIENT_REL_TOL,
                "{name} {layer}: max |ΔF| / max |F| = {rel:.2e}"
            );
        }
        eprintln!("{name}: Fisher max |Δ| / max |F| = {worst:.2e}");
    }
}
