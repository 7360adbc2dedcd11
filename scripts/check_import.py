#!/usr/bin/env python3
"""Checks an `espalier import` of a GGUF file against transformers' own GGUF loader.

    python3 scripts/check_import.py models/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2-135m

Needs torch, transformers (>= 4.42, with GGUF support), tokenizers and gguf. Checks, and exits
non-zero on any failure:

1. transformers loads the imported directory as LlamaForCausalLM (AutoModelForCausalLM) and its
   tokenizer (AutoTokenizer); the config matches the GGUF metadata.
2. Weights: every tensor of the imported model equals what transformers dequantizes from the same
   GGUF (`from_pretrained(dir, gguf_file=...)`), Q/K un-permutation included (max abs diff ≤
   1e-6), and the logits of both models on a sample agree.
3. Token ids: the vocabulary equals the GGUF's `tokenizer.ggml.tokens` by id; on sample texts
   (digits, punctuation, whitespace, unicode, special tokens) the imported tokenizer gives the
   same ids as transformers' GGUF tokenizer with SmolLM2's pre-tokenizer (digits split one by
   one, then byte-level BPE without a prefix space). transformers' GGUF tokenizer itself uses
   plain GPT-2 splitting for `tokenizer.ggml.pre = smollm`, so its ids are reported and expected
   to differ only on texts with runs of digits. Every text round-trips through decode.
"""

import argparse
import json
import os
import sys

import torch
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1564, Shakespeare was born; by 1616 he had written 37 plays (or 38?).",
    "Pi is 3.14159265 and 2+2=4, 100% of the time: 12345678901234567890.",
    "  Leading spaces,\ttabs\tand\nnew\n\nlines   trailing  ",
    "Unicode: café, naïve, Straße, Ελληνικά, 日本語のテキスト, emoji 🚀🔥, “quotes” — dashes…",
    "def f(x):\n    return x ** 2  # squares\nprint(f(12))",
    "<|im_start|>user\nWhat is 7 times 6?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
    "It's, we're, they'll, I'd, don't; URLs: https://example.org/a?b=1&c=2 #tag @user",
]

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", help="the GGUF file that was imported")
    ap.add_argument("imported", help="the directory `espalier import` wrote")
    args = ap.parse_args()
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))

    import gguf

    reader = gguf.GGUFReader(args.gguf)
    field = reader.fields["tokenizer.ggml.tokens"]
    gguf_tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    # 1. Loading with transformers.
    ours = AutoModelForCausalLM.from_pretrained(args.imported, dtype=torch.float32).eval()
    check(type(ours).__name__ == "LlamaForCausalLM", f"imported dir loads as {type(ours).__name__}")
    tok = AutoTokenizer.from_pretrained(args.imported)
    print(f"      tokenizer class {type(tok).__name__}, vocab {len(tok)}")
    cfg = ours.config
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("llama.")}
    check(
        (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
         cfg.num_key_value_heads, cfg.max_position_embeddings)
        == (meta["llama.embedding_length"], meta["llama.feed_forward_length"], meta["llama.block_count"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.context_length"]),
        "config shapes match the GGUF metadata",
    )
    rope_theta = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    check(abs(rope_theta - meta["llama.rope.freq_base"]) < 1e-3
          and abs(cfg.rms_norm_eps - meta["llama.attention.layer_norm_rms_epsilon"]) < 1e-9,
          f"rope_theta {rope_theta}, rms_norm_eps {cfg.rms_norm_eps}")
    check(cfg.tie_word_embeddings and "output.weight" not in [t.name for t in reader.tensors],
          "LM head tied to the embedding (no output.weight in the GGUF)")

    # 2. Weights against transformers' own dequantization.
    ref = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32).eval()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    check(set(ours_sd) == set(ref_sd), f"same tensor names ({len(ours_sd)})")
    worst, worst_name = 0.0, None
    for name, t in ours_sd.items():
        if name in ref_sd:
            d = (t - ref_sd[name]).abs().max().item()
            if d > worst:
                worst, worst_name = d, name
    check(worst <= 1e-6, f"weights equal transformers' GGUF dequantization (max abs diff {worst:.3g} in {worst_name})")
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        lo, lr = ours(ids).logits, ref(ids).logits
    check((lo - lr).abs().max().item() <= 1e-4, f"logits agree (max abs diff {(lo - lr).abs().max().item():.3g})")

    # 3. Tokenizer.
    vocab = tok.get_vocab()
    check(all(vocab.get(t) == i for i, t in enumerate(gguf_tokens)) and len(vocab) == len(gguf_tokens),
          f"vocabulary equals tokenizer.ggml.tokens by id ({len(gguf_tokens)} tokens)")
    ref_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    smollm = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    smollm.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    report = []
    for text in TEXTS:
        a = tok(text, add_special_tokens=True)["input_ids"]
        b = smollm(text, add_special_tokens=True)["input_ids"]
        c = ref_tok(text, add_special_tokens=True)["input_ids"]
        pieces = [tok.decode([i]) for i in a]
        digits_ok = all(not any(ch in "0123456789" for ch in p) or len(p.strip()) == 1 for p in pieces)
        check(a == b, f"ids equal GGUF vocab + SmolLM2 pre-tokenizer ({len(a)} ids): {text[:40]!r}")
        check(digits_ok, "  digits are single tokens")
        check(tok.decode(a) == text, "  decode round-trips")
        has_digit_run = any(x.isdigit() and y.isdigit() for x, y in zip(text, text[1:]))
        if a == c:
            note = "same as transformers' GGUF tokenizer"
        else:
            note = "differs from transformers' GGUF tokenizer (GPT-2 digit grouping)"
            check(has_digit_run, "  a difference only where digits run together")
        report.append({"text": text, "ids": a, "transformers_gguf_ids": c, "note": note})
        print(f"      {note}")
    if os.environ.get("CHECK_IMPORT_DUMP"):
        with open(os.environ["CHECK_IMPORT_DUMP"], "w") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)

    print(f"\n{len(failures)} failed" if failures else "\nall checks passed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
