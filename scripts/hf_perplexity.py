#!/usr/bin/env python3
"""Perplexity of a model directory on a text file, computed by transformers: the reference for
`espalier eval`.

    python3 scripts/hf_perplexity.py MODEL_DIR [TEXT_FILE] [--max-length 1024] [--stride 512]

Definition: Hugging Face's fixed-length evaluation with a sliding window ("Perplexity of
fixed-length models" in the transformers docs). The whole file is tokenized once, with no BOS
or other special token added (SmolLM2's tokenizer adds none). Windows of at most `max_length`
tokens start every `stride` tokens; in each window only the tokens not scored by the previous
window are targets (the others are context, label -100), and the last window ends at the end of
the text. The model's mean loss over a window's predicted targets is weighted by their count
(targets minus the one a causal shift drops), summed over windows, divided by the total count,
and exponentiated. With the defaults (1024/512) every token but those of the first window sees
at least 512 tokens of context.

Prints one line of JSON: {"perplexity", "nll", "tokens", "scored", "windows", "max_length",
"stride", "seconds", ...}.
"""

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def perplexity(model, input_ids, max_length, stride):
    seq_len = input_ids.size(1)
    nll_sum, n_scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        ids = input_ids[:, begin:end]
        target = ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target).loss
        n = (target != -100).sum().item() - target.size(0)  # the shift drops one label
        nll_sum += loss.item() * n
        n_scored += n
        windows += 1
        prev_end = end
        if end == seq_len:
            break
    nll = nll_sum / n_scored
    return math.exp(nll), nll, n_scored, windows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("text", nargs="?", default="data/eval.txt")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    if ids.size(1) < 2:
        raise SystemExit(f"{args.text}: fewer than two tokens")
    start = time.time()
    ppl, nll, scored, windows = perplexity(model, ids, args.max_length, args.stride)
    print(json.dumps({
        "model_dir": args.model_dir, "text": args.text, "perplexity": round(ppl, 4), "nll": round(nll, 6),
        "tokens": ids.size(1), "scored": scored, "windows": windows, "max_length": args.max_length,
        "stride": args.stride, "seconds": round(time.time() - start, 1),
    }))


if __name__ == "__main__":
    main()
