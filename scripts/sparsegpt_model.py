#!/usr/bin/env python3
"""SparseGPT on a whole model in PyTorch + transformers, block by block as the paper runs it: the
end-to-end reference for Espalier's `sparsegpt` pipelines (e.g. pipelines/smollm2-sparsegpt-seq.toml).

    python3 scripts/sparsegpt_model.py MODEL_DIR [--density 0.5 | --nm 2:4] [--sequential]
        [--calibration data/calibration.txt --samples 64 --seq-len 256]
        [--eval data/eval.txt --max-tokens 16384 --window 1024] [--threads 2] [--dense]

With `--golden OUT.safetensors` it instead prunes MODEL_DIR (a tiny golden model) three ways
(sequential 50%, sequential 2:4, whole-model 50%) and saves every block linear's updated weights
and keep-mask as `CASE/LAYER` and `CASE/LAYER.keep`: the fixture `tests/criteria.rs` holds
Espalier's SparseGPT to (masks exactly, weights within 1e-4 of each layer's largest):

    python3 scripts/sparsegpt_model.py engine/tests/fixtures/llama --samples 4 --seq-len 32 \
        --blocksize 16 --golden host/tests/fixtures/sparsegpt_golden_llama.safetensors

Needs torch and transformers (CPU is enough). Written from the paper (Frantar & Alistarh 2023,
Algorithm 1), not from any implementation, and driven with Espalier's inputs and conventions so
the two perplexities can be compared:

* Calibration: the text tokenized with the model's tokenizer (no special tokens), cut into
  `samples` consecutive non-overlapping windows of `seq_len` tokens, as Espalier's
  `[calibration]` does. Hessians are summed over batches of 8 windows (f32 products, f64 sums).
* Each block linear's input Hessian H = XᵀX / tokens over the calibration windows (float64 sums).
  With `--sequential` block b's Hessians are taken on the outputs of blocks 0..b as already
  pruned and updated (every linear of block b from one pass over the block as it was before
  pruning it), and the pruned block then carries the states on; without it every Hessian comes
  from the dense model.
* Per linear: columns whose inputs are always zero get a unit diagonal and zero weights;
  λ = damping · mean(diag H) on the diagonal; U = upper Cholesky factor of H⁻¹ (float64, then
  float32 like the weights). Columns are processed left to right in lazy blocks of `blocksize`;
  a removed weight's error is spread over the later columns of its row through U. The mask is
  chosen by the OBS saliency w²/U[j][j]² of the weights as they are at selection time: once per
  block of `blocksize` columns over all rows (unstructured, keeping round(density · rows · cols)
  of the block: Espalier's `mask_blocksize` equal to `blocksize`) or per row and group of M
  columns (N:M). Ties keep the lower index.
* Perplexity: transformers' loss over non-overlapping windows of `window` tokens of the first
  `max_tokens` tokens of the evaluation text (scripts/hf_perplexity.py's protocol, which
  `espalier eval` matches), so compare with an `[evaluate]` section of window = stride = 1024.

Before pruning, the script checks that its block-by-block forward pass gives the model's own
logits (so a transformers version that changed the layer call is caught, not silently wrong).
Prints one line of JSON: perplexities, the seconds each phase took, and the sparsity reached.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_perplexity import perplexity  # noqa: E402
from sparsegpt_reference import inverse_factor  # noqa: E402

LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
BATCH = 8


def keep_top(scores, k):
    """Flags the k highest entries of a 1-D tensor; ties keep the lower index."""
    order = torch.sort(-scores, stable=True).indices
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def prune_linear(w, h, density, n, m, blocksize, damping):
    """SparseGPT on one weight `w [rows, cols]` (float32) with input Hessian `h` (float64):
    returns the updated weights, zero where removed."""
    u, dead = inverse_factor(h, damping)
    w = w.clone()
    w[:, dead] = 0.0
    rows, cols = w.shape
    d2 = torch.diag(u) ** 2
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        removed = torch.zeros_like(w1, dtype=torch.bool)
        if n == 0:
            s = w1**2 / d2[i1:i2].reshape(1, -1)
            k = math.floor(density * s.numel() + 0.5)
            removed = ~keep_top(s.flatten(), k).reshape(s.shape)
        for i in range(i2 - i1):
            if n > 0 and i % m == 0:
                s = w1[:, i : i + m] ** 2 / d2[i1 + i : i1 + i + m].reshape(1, -1)
                order = torch.sort(-s, dim=1, stable=True).indices
                group = torch.ones_like(s, dtype=torch.bool)
                group.scatter_(1, order[:, :n], False)
                removed[:, i : i + m] = group
            q = torch.where(removed[:, i], torch.zeros(rows), w1[:, i])
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i + 1 :] -= err.reshape(-1, 1) * u1[i, i + 1 :].reshape(1, -1)
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def calibration_windows(tok, path, samples, seq_len):
    with open(path, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False).input_ids
    windows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(len(ids) // seq_len)]
    return torch.tensor(windows[:samples], dtype=torch.long)


def run_block(layer, states, rotary):
    out = []
    for b in range(0, states.size(0), BATCH):
        x = states[b : b + BATCH]
        pos = torch.arange(x.size(1)).unsqueeze(0)
        y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=rotary(x, pos))
        out.append(y[0] if isinstance(y, tuple) else y)
    return torch.cat(out)


def hessians(layer, states, rotary):
    """Runs the block on `states`; returns each linear's input Hessian (XᵀX / tokens) and the
    block's outputs."""
    sums, hooks = {}, []

    def hook(name):
        def record(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()
            g = (x.T @ x).double()
            h, t = sums.get(name, (0.0, 0))
            sums[name] = (h + g, t + x.size(0))

        return record

    for name in LINEARS:
        hooks.append(layer.get_submodule(name).register_forward_hook(hook(name)))
    try:
        outputs = run_block(layer, states, rotary)
    finally:
        for h in hooks:
            h.remove()
    return {name: h / t for name, (h, t) in sums.items()}, outputs


def check_forward(model, ids):
    """The block-by-block pass must give the model's own logits."""
    inner = model.model
    x = inner.embed_tokens(ids)
    for layer in inner.layers:
        x = run_block(layer, x, inner.rotary_emb)
    mine = model.lm_head(inner.norm(x))
    theirs = model(ids).logits
    diff = (mine - theirs).abs().max().item()
    if not diff < 1e-3:
        raise SystemExit(f"block-by-block forward differs from the model's by {diff}: transformers changed the layer call")
    return diff


def prune_model(model, calib, density, n, m, blocksize, damping, sequential, log=None):
    """Prunes every block linear of `model` in place; returns seconds per phase and the density."""
    inner = model.model
    states = inner.embed_tokens(calib)
    kept = total = 0
    stats_s = prune_s = carry_s = 0.0
    for index, layer in enumerate(inner.layers):
        t0 = time.time()
        hs, outputs = hessians(layer, states, inner.rotary_emb)
        t1 = time.time()
        for name in LINEARS:
            lin = layer.get_submodule(name)
            w = prune_linear(lin.weight.data, hs[name], density, n, m, blocksize, damping)
            if not torch.isfinite(w).all():
                raise SystemExit(f"layer {index} {name}: non-finite weights")
            lin.weight.data = w
            kept += int((w != 0).sum())
            total += w.numel()
        t2 = time.time()
        # Sequential: the pruned block carries the states on. Otherwise every Hessian comes
        # from the dense model: the outputs of the pass before pruning carry on.
        states = run_block(layer, states, inner.rotary_emb) if sequential else outputs
        t3 = time.time()
        stats_s += t1 - t0
        prune_s += t2 - t1
        carry_s += t3 - t2
        if log:
            log(f"block {index + 1}/{len(inner.layers)}: {t3 - t0:.1f} s")
    return {
        "hessian_seconds": round(stats_s, 1),
        "obs_seconds": round(prune_s, 1),
        "carry_seconds": round(carry_s, 1),
        "density": kept / total,
    }


GOLDEN_CASES = [
    # name, density, n, m, sequential
    ("sequential-50", 0.5, 0, 0, True),
    ("sequential-2-4", 0.5, 2, 4, True),
    ("whole-50", 0.5, 0, 0, False),
]


def golden(args, load, calib):
    from safetensors.torch import save_file

    tensors = {}
    for case, density, n, m, sequential in GOLDEN_CASES:
        model = load()
        with torch.no_grad():
            prune_model(model, calib, density, n, m, args.blocksize, args.damping, sequential)
        for index, layer in enumerate(model.model.layers):
            for name in LINEARS:
                w = layer.get_submodule(name).weight.data
                key = f"{case}/model.layers.{index}.{name}.weight"
                tensors[key] = w.contiguous()
                tensors[key + ".keep"] = (w != 0).to(torch.uint8)
    meta = {
        "torch": torch.__version__,
        "blocksize": str(args.blocksize),
        "damping": str(args.damping),
        "samples": str(calib.size(0)),
        "seq_len": str(calib.size(1)),
        "calibration": args.calibration,
    }
    save_file(tensors, args.golden, metadata=meta)
    print(json.dumps({"golden": args.golden, "cases": [c[0] for c in GOLDEN_CASES], **meta}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--nm", default=None, help="N:M instead of unstructured, e.g. 2:4")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--calibration", default="data/calibration.txt")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--eval", default="data/eval.txt")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--golden", default=None, help="write the golden fixture here instead (see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, m = (0, 0)
    if args.nm:
        n, m = (int(v) for v in args.nm.split(":"))
        if args.blocksize % m:
            raise SystemExit(f"--blocksize {args.blocksize} must be a multiple of M = {m}")

    tok = AutoTokenizer.from_pretrained(args.model_dir)

    def load():
        return AutoModelForCausalLM.from_pretrained(
            args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
        ).eval()

    model = load()
    if args.golden:
        calib = calibration_windows(tok, args.calibration, args.samples, args.seq_len)
        with torch.no_grad():
            check_forward(model, calib[:1])
        golden(args, load, calib)
        return
    with open(args.eval, encoding="utf-8") as f:
        eval_ids = tok(f.read(), return_tensors="pt", add_special_tokens=False).input_ids
    eval_ids = eval_ids[:, : args.max_tokens]
    calib = calibration_windows(tok, args.calibration, args.samples, args.seq_len)
    out = {
        "model_dir": args.model_dir,
        "structure": args.nm or f"unstructured {args.density}",
        "sequential": args.sequential,
        "calibration": [calib.size(0), calib.size(1)],
        "eval_tokens": eval_ids.size(1),
        "window": args.window,
        "threads": args.threads,
        "torch": torch.__version__,
    }
    with torch.no_grad():
        out["forward_check_max_diff"] = check_forward(model, calib[:1])
        if args.dense:
            t = time.time()
            out["dense_perplexity"] = perplexity(model, eval_ids, args.window, args.window)[0]
            out["dense_eval_seconds"] = round(time.time() - t, 1)
        t = time.time()
        log = lambda line: print(line, file=sys.stderr)  # noqa: E731
        out.update(prune_model(model, calib, args.density, n, m, args.blocksize, args.damping, args.sequential, log))
        out["prune_seconds"] = round(time.time() - t, 1)
        t = time.time()
        out["pruned_perplexity"] = perplexity(model, eval_ids, args.window, args.window)[0]
        out["pruned_eval_seconds"] = round(time.time() - t, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
