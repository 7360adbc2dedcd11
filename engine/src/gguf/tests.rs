//! Tests of the GGUF import on tiny files written with candle's GGUF writer: dequantized values,
//! the RoPE un-permutation, config and tokenizer files, and refusals with clear messages.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::*;
use crate::model::Model;

const HIDDEN: usize = 64;
const FFN: usize = 96;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const CONTROL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Deterministic values in [-1, 1).
fn values(rows: usize, cols: usize, seed: usize) -> Tensor {
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
}

fn vector(n: usize, seed: usize) -> Tensor {
    values(1, n, seed).reshape(n).unwrap()
}

/// Control tokens, the 256 byte-alphabet characters, and two merged tokens.
fn vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = CONTROL.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; CONTROL.len()];
    for c in tokenizer_alphabet() {
        tokens.push(c.to_string());
        types.push(1);
    }
    tokens.push("Ġt".into());
    tokens.push("Ġth".into());
    types.extend([1, 1]);
    (tokens, types, vec!["Ġ t".into(), "Ġt h".into()])
}

fn tokenizer_alphabet() -> Vec<char> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let c = if printable {
            char::from(b)
        } else {
            char::from_u32(256 + seen.len() as u32).unwrap()
        };
        if !printable {
            seen.insert(b);
        }
        out.push(c);
    }
    out
}

/// The Hugging Face weights of the tiny model and how each is stored in the GGUF.
struct Tiny {
    /// (gguf name, HF-layout f32 tensor, storage type)
    tensors: Vec<(String, Tensor, GgmlDType)>,
}

fn tiny(vocab_size: usize) -> Tiny {
    let q = |n: &str| n.to_string();
    let tensors = vec![
        (
            q("token_embd.weight"),
            values(vocab_size, HIDDEN, 1),
            GgmlDType::Q8_0,
        ),
        (q("output_norm.weight"), vector(HIDDEN, 2), GgmlDType::F32),
        (
            q("blk.0.attn_norm.weight"),
            vector(HIDDEN, 3),
            GgmlDType::F32,
        ),
        (
            q("blk.0.ffn_norm.weight"),
            vector(HIDDEN, 4),
            GgmlDType::F32,
        ),
        (
            q("blk.0.attn_q.weight"),
            values(HIDDEN, HIDDEN, 5),
            GgmlDType::Q4_1,
        ),
        (
            q("blk.0.attn_k.weight"),
            values(KV_HEADS * HEAD_DIM, HIDDEN, 6),
            GgmlDType::Q4_1,
        ),
        (
            q("blk.0.attn_v.weight"),
            values(KV_HEADS * HEAD_DIM, HIDDEN, 7),
            GgmlDType::F32,
        ),
        (
            q("blk.0.attn_output.weight"),
            values(HIDDEN, HIDDEN, 8),
            GgmlDType::Q4_1,
        ),
        (
            q("blk.0.ffn_gate.weight"),
            values(FFN, HIDDEN, 9),
            GgmlDType::Q4_1,
        ),
        (
            q("blk.0.ffn_up.weight"),
            values(FFN, HIDDEN, 10),
            GgmlDType::Q8_0,
        ),
        (
            q("blk.0.ffn_down.weight"),
            values(HIDDEN, FFN, 11),
            GgmlDType::Q4_1,
        ),
    ];
    Tiny { tensors }
}

fn metadata(arch: &str, n_tokens: usize) -> Vec<(String, Value)> {
    let (tokens, types, merges) = vocab();
    assert_eq!(tokens.len(), n_tokens);
    let a = |k: &str| format!("{arch}.{k}");
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String("tiny".into())),
        (a("block_count"), Value::U32(1)),
        (a("context_length"), Value::U32(256)),
        (a("embedding_length"), Value::U32(HIDDEN as u32)),
        (a("feed_forward_length"), Value::U32(FFN as u32)),
        (a("attention.head_count"), Value::U32(HEADS as u32)),
        (a("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (a("rope.freq_base"), Value::F32(100_000.0)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (a("rope.dimension_count"), Value::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

/// Writes a GGUF the way llama.cpp's converter does (q/k rows permuted for RoPE).
fn write_gguf(path: &Path, meta: &[(String, Value)], tiny: &Tiny) {
    let mut qtensors = Vec::new();
    for (name, t, dtype) in &tiny.tensors {
        let stored = if name.ends_with("attn_q.weight") {
            permute_rope_rows(t, HEADS).unwrap()
        } else if name.ends_with("attn_k.weight") {
            permute_rope_rows(t, KV_HEADS).unwrap()
        } else {
            t.clone()
        };
        qtensors.push((name.clone(), QTensor::quantize(&stored, *dtype).unwrap()));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

fn n_tokens() -> usize {
    vocab().0.len()
}

fn setup(meta: Vec<(String, Value)>) -> (tempfile::TempDir, PathBuf, Tiny) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let t = tiny(n_tokens());
    write_gguf(&path, &meta, &t);
    (dir, path, t)
}

fn run(path: &Path, out: &Path) -> Result<ImportSummary, EngineError> {
    import(path, out, &mut |_| {})
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Leftover entries of `dir` other than the GGUF (a failed import must leave nothing).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "tiny.gguf")
        .collect()
}

#[test]
fn imports_dequantized_weights_in_hf_layout() {
    let (dir, path, tiny) = setup(metadata("llama", n_tokens()));
    let out = dir.path().join("out");
    let mut events = 0;
    let summary = import(&path, &out, &mut |_| events += 1).unwrap();
    assert_eq!(summary.tensors, tiny.tensors.len());
    assert!(summary.tie_word_embeddings);
    assert_eq!(summary.tensor_types.get("Q4_1"), Some(&5));
    assert_eq!(summary.tensor_types.get("Q8_0"), Some(&2));
    assert_eq!(summary.tensor_types.get("F32"), Some(&4));
    assert_eq!(summary.name.as_deref(), Some("tiny"));
    assert!(events > tiny.tensors.len());
    for f in &summary.files {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    let model = Model::load(&out).unwrap();
    for (gguf_name, original, dtype) in &tiny.tensors {
        let hf = hf_tensor_name(gguf_name).unwrap();
        let got = model.weight(&hf).unwrap();
        // The imported tensor is exactly the dequantized stored block values, in HF row order
        // (quantization blocks run along rows, so they commute with the row permutation).
        let expected = QTensor::quantize(original, *dtype)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        assert_eq!(got.dims(), original.dims(), "{hf}");
        assert_eq!(max_abs_diff(got, &expected), 0.0, "{hf} ({dtype:?})");
        // And close to the original values: Q4_1 steps are range/15 ≈ 0.13 here.
        let tol = match dtype {
            GgmlDType::F32 => 0.0,
            GgmlDType::Q8_0 => 0.01,
            _ => 0.07,
        };
        assert!(max_abs_diff(got, original) <= tol, "{hf}");
    }
    assert!(model.weight("lm_head.weight").is_none());
}

#[test]
fn writes_config_the_engine_and_transformers_read() {
    let (dir, path, _) = setup(metadata("llama", n_tokens()));
    let out = dir.path().join("nested").join("out");
    run(&path, &out).unwrap();
    let c = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(c.hidden_size, HIDDEN);
    assert_eq!(c.intermediate_size, FFN);
    assert_eq!(c.num_layers, 1);
    assert_eq!(c.num_heads, HEADS);
    assert_eq!(c.num_kv_heads, KV_HEADS);
    assert_eq!(c.head_dim, HEAD_DIM);
    assert_eq!(c.vocab_size, n_tokens());
    assert_eq!(c.max_position_embeddings, 256);
    assert_eq!(c.rope_theta, 100_000.0);
    // The f32 epsilon is written as the decimal it came from.
    assert_eq!(c.norm_eps, 1e-5);
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
    assert_eq!(c.raw["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c.raw["model_type"], "llama");
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(g["eos_token_id"], 2);
}

#[test]
fn writes_a_byte_level_tokenizer_with_single_digits() {
    let (dir, path, _) = setup(metadata("llama", n_tokens()));
    let out = dir.path().join("out");
    run(&path, &out).unwrap();
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(f)).unwrap()).unwrap()
    };
    let tok = read("tokenizer.json");
    let pre = &tok["pre_tokenizer"];
    assert_eq!(pre["type"], "Sequence");
    assert_eq!(pre["pretokenizers"][0]["type"], "Digits");
    assert_eq!(pre["pretokenizers"][0]["individual_digits"], true);
    assert_eq!(pre["pretokenizers"][1]["type"], "ByteLevel");
    assert_eq!(pre["pretokenizers"][1]["add_prefix_space"], false);
    assert_eq!(tok["model"]["type"], "BPE");
    assert_eq!(tok["model"]["vocab"].as_object().unwrap().len(), n_tokens());
    assert_eq!(tok["model"]["vocab"]["Ġth"], n_tokens() - 1);
    assert_eq!(tok["model"]["merges"][1], "Ġt h");
    let added = tok["added_tokens"].as_array().unwrap();
    assert_eq!(added.len(), CONTROL.len());
    assert_eq!(added[1]["content"], "<|im_start|>");
    assert_eq!(added[1]["special"], true);
    // No BOS added on encode (add_bos_token = false): no template post-processor.
    assert_eq!(tok["post_processor"]["type"], "ByteLevel");
    let cfg = read("tokenizer_config.json");
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["bos_token"], "<|im_start|>");
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["unk_token"], "<|endoftext|>");
}

#[test]
fn bos_flag_becomes_a_template() {
    let mut meta = metadata("llama", n_tokens());
    for (k, v) in &mut meta {
        if k == "tokenizer.ggml.add_bos_token" {
            *v = Value::Bool(true);
        }
    }
    let (dir, path, _) = setup(meta);
    let out = dir.path().join("out");
    run(&path, &out).unwrap();
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
    let pp = &tok["post_processor"]["processors"][1];
    assert_eq!(pp["type"], "TemplateProcessing");
    assert_eq!(pp["single"][0]["SpecialToken"]["id"], "<|im_start|>");
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    let w = values(2 * 8, 3, 0);
    let p = permute_rope_rows(&w, 2).unwrap();
    // llama.cpp: HF row h*d + half*p + i goes to row h*d + 2i + p.
    let (d, half) = (8, 4);
    for h in 0..2 {
        for part in 0..2 {
            for i in 0..half {
                let hf_row = w.get(h * d + part * half + i).unwrap();
                let gg_row = p.get(h * d + 2 * i + part).unwrap();
                assert_eq!(max_abs_diff(&hf_row, &gg_row), 0.0);
            }
        }
    }
    let back = unpermute_rope_rows(&p, 2).unwrap();
    assert_eq!(max_abs_diff(&back, &w), 0.0);
    assert!(unpermute_rope_rows(&values(6, 2, 0), 2).is_err());
}

#[test]
fn refuses_other_architectures() {
    let (dir, path, _) = setup(metadata("gpt2", n_tokens()));
    let out = dir.path().join("out");
    let err = run(&path, &out).unwrap_err().to_string();
    assert!(err.contains("unsupported architecture `gpt2`"), "{err}");
    assert!(err.contains("general.architecture"), "{err}");
    assert!(!out.exists());
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn names_a_missing_metadata_key() {
    for key in [
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.layer_norm_rms_epsilon",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "general.architecture",
    ] {
        let meta: Vec<_> = metadata("llama", n_tokens())
            .into_iter()
            .filter(|(k, _)| k != key)
            .collect();
        let (dir, path, _) = setup(meta);
        let out = dir.path().join("out");
        let err = run(&path, &out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("missing metadata key `{key}`")),
            "{err}"
        );
        assert!(leftovers(dir.path()).is_empty());
    }
}

/// Rewrites the ggml type id of one tensor in a written GGUF file.
fn patch_tensor_type(path: &Path, tensor: &str, new_type: u32) {
    let mut bytes = std::fs::read(path).unwrap();
    let name = tensor.as_bytes();
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in header");
    // name, then n_dims (u32), dims (u64 each), then the type (u32).
    let n_dims_at = at + name.len();
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let type_at = n_dims_at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&new_type.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn refuses_unsupported_quantization_types() {
    let (dir, path, _) = setup(metadata("llama", n_tokens()));
    // 20 is IQ4_NL in ggml: an i-quant candle cannot dequantize.
    patch_tensor_type(&path, "blk.0.ffn_down.weight", 20);
    let out = dir.path().join("out");
    let err = run(&path, &out).unwrap_err().to_string();
    assert!(err.contains("unsupported quantization type"), "{err}");
    assert!(err.contains("id 20"), "{err}");
    assert!(err.contains("Q4_1"), "{err}");
    assert!(!out.exists());
}

#[test]
fn refuses_unsupported_tokenizers_and_mismatched_vocabularies() {
    let with = |key: &str, value: Value| {
        let mut meta = metadata("llama", n_tokens());
        for (k, v) in &mut meta {
            if k == key {
                *v = value.clone();
            }
        }
        meta
    };
    let cases = [
        (
            with("tokenizer.ggml.model", Value::String("llama".into())),
            "unsupported tokenizer `llama`",
        ),
        (
            with("tokenizer.ggml.pre", Value::String("qwen2".into())),
            "unsupported pre-tokenizer `qwen2`",
        ),
        (
            with("tokenizer.ggml.eos_token_id", Value::U32(100_000)),
            "outside the vocabulary",
        ),
        (
            {
                let mut m = metadata("llama", n_tokens());
                m.push(("llama.vocab_size".into(), Value::U32(1000)));
                m
            },
            "tokenizer does not match the model",
        ),
    ];
    for (meta, want) in cases {
        let (dir, path, _) = setup(meta);
        let out = dir.path().join("out");
        let err = run(&path, &out).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
        assert!(leftovers(dir.path()).is_empty());
    }
}

#[test]
fn refuses_embedding_and_tokenizer_size_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, &metadata("llama", n_tokens()), &tiny(n_tokens() + 3));
    let err = run(&path, &dir.path().join("out")).unwrap_err().to_string();
    assert!(err.contains("tokenizer does not match the model"), "{err}");
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn refuses_a_non_empty_output_directory_and_bad_files() {
    let (dir, path, _) = setup(metadata("llama", n_tokens()));
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // An empty directory is fine ...
    run(&path, &out).unwrap();
    // ... a full one is not, and is left untouched.
    let err = run(&path, &out).unwrap_err().to_string();
    assert!(err.contains("not empty"), "{err}");
    assert!(out.join("model.safetensors").is_file());

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let err = run(&junk, &dir.path().join("out2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a readable GGUF file"), "{err}");
    let err = run(&dir.path().join("missing.gguf"), &dir.path().join("out3"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.gguf"), "{err}");
    assert!(!dir.path().join("out2").exists() && !dir.path().join("out3").exists());
}

#[test]
fn tokenizer_json_loads_and_splits_digits_one_by_one() {
    let (dir, path, _) = setup(metadata("llama", n_tokens()));
    let out = dir.path().join("out");
    run(&path, &out).unwrap();
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    // Ids: 3 control tokens, then the byte alphabet in byte order (byte b has id 3 + b), then
    // `Ġt` and `Ġth`.
    let byte = |b: u8| 3 + u32::from(b);
    let th = n_tokens() as u32 - 1;
    let enc = tok.encode(" th 12<|im_start|>", true).unwrap();
    assert_eq!(
        enc.get_ids(),
        &[th, byte(b' '), byte(b'1'), byte(b'2'), 1],
        "{:?}",
        enc.get_tokens()
    );
    // No prefix space and no BOS are added.
    let enc = tok.encode("t", true).unwrap();
    assert_eq!(enc.get_ids(), &[byte(b't')]);
    assert_eq!(tok.decode(&[th, byte(b'1')], false).unwrap(), " th1");
}

#[cfg(unix)]
#[test]
fn refuses_non_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("model.gguf");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for path in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
        let err = run(path, &dir.path().join("out")).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}

#[test]
fn refuses_a_zero_alignment_instead_of_dividing_by_it() {
    let mut meta = metadata("llama", n_tokens());
    meta.push(("general.alignment".into(), Value::U32(0)));
    let (dir, path, _) = setup(meta);
    let err = run(&path, &dir.path().join("out")).unwrap_err().to_string();
    assert!(
        err.contains("general.alignment") && err.contains("is 0"),
        "{err}"
    );
}

#[test]
fn layer_counts_are_checked_against_the_tensors_before_reading_them() {
    for (blocks, want) in [
        (1_000_000u32, "more than the 65536"),
        (60_000, "hold 1 blocks"),
    ] {
        let mut meta = metadata("llama", n_tokens());
        for (k, v) in &mut meta {
            if k == "llama.block_count" {
                *v = Value::U32(blocks);
            }
        }
        let (dir, path, _) = setup(meta);
        let mut tensors_read = 0;
        let err = import(&path, &dir.path().join("out"), &mut |p| {
            if matches!(p, ImportProgress::Tensor { .. }) {
                tensors_read += 1;
            }
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("num_hidden_layers") && err.contains(want),
            "{err}"
        );
        assert_eq!(tensors_read, 0);
    }
}

/// Writes the `gguf_import` fuzz seed into `fuzz/regressions/gguf_import/` (fuzz/README.md).
#[test]
#[ignore = "writes the fuzz seed; run by hand (fuzz/README.md)"]
fn write_gguf_fuzz_seed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/gguf_import");
    std::fs::create_dir_all(&dir).unwrap();
    write_gguf(
        &dir.join("valid-tiny-llama.gguf"),
        &metadata("llama", n_tokens()),
        &tiny(n_tokens()),
    );
}

#[test]
fn refuses_ambiguous_and_surplus_block_tensors() {
    // `blk.00.` is a second spelling of block 0; `blk.1.` lies beyond `llama.block_count` = 1.
    for (from, to, want) in [
        (
            "blk.0.attn_norm.weight",
            "blk.00.attn_norm.weight",
            "both name",
        ),
        (
            "blk.0.ffn_norm.weight",
            "blk.1.ffn_norm.weight",
            "beyond `llama.block_count`",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let mut t = tiny(n_tokens());
        let original = t.tensors.iter().find(|x| x.0 == from).unwrap().clone();
        if want == "both name" {
            t.tensors.push((to.to_string(), original.1, original.2));
        } else {
            t.tensors.iter_mut().find(|x| x.0 == from).unwrap().0 = to.to_string();
            t.tensors.push((from.to_string(), original.1, original.2));
        }
        write_gguf(&path, &metadata("llama", n_tokens()), &t);
        let err = run(&path, &dir.path().join("out")).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}
