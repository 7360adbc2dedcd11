#!/usr/bin/env python3
"""PyTorch's CPU training throughput on a model directory: the peer for Espalier's `[finetune]`
pass (forward + backward + AdamW over every block linear; embeddings, norms and the LM head
frozen, as Espalier trains by default).

    python3 scripts/torch_train_throughput.py MODEL_DIR [--batch 4] [--seq-len 256]
        [--steps 5] [--warmup 2] [--threads 2] [--text data/calibration.txt] [--mask-2-4] [--bf16]

Needs torch and transformers (CPU is enough). Each step is one micro-batch of `batch`
sequences of `seq_len` consecutive tokens of the text: next-token cross-entropy, backward,
AdamW (lr 5e-5, transformers' defaults otherwise), zero_grad. `--mask-2-4` holds a 2:4 mask
(of |w|, per row groups of 4 input columns) the way PyTorch users do it on a CPU: the weights
are multiplied by the mask after every step and the gradient masked before it, which costs a
little more than dense, since PyTorch has no CPU kernel that gains from the zeros. `--bf16` runs
the forward pass and the loss under `torch.autocast("cpu", dtype=torch.bfloat16)` (PyTorch's
mixed precision: the linear layers' operands in bf16, the weights, gradients and AdamW state
f32; oneDNN's AVX512-BF16 kernels where the CPU has them), the peer of Espalier's
`precision = "bf16"`.

The first `warmup` steps are not timed. Prints one line of JSON: tokens/s over the timed steps,
seconds per step, and the process's peak RSS.
"""

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def two_four_mask(w):
    """Keeps the 2 largest |w| of every group of 4 consecutive input columns of each row."""
    rows, cols = w.shape
    groups = w.abs().reshape(rows, cols // 4, 4)
    top = groups.topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="data/calibration.txt")
    ap.add_argument("--mask-2-4", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.train()
    trained, masks = [], {}
    for name, p in model.named_parameters():
        is_block_linear = ".layers." in name and name.endswith("proj.weight")
        p.requires_grad_(is_block_linear)
        if is_block_linear:
            trained.append(p)
            if args.mask_2_4:
                masks[p] = two_four_mask(p.data)
                p.data.mul_(masks[p])
    opt = torch.optim.AdamW(trained, lr=5e-5)

    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False).input_ids
    per_step = args.batch * args.seq_len
    needed = per_step * (args.warmup + args.steps)
    if len(ids) < per_step:
        raise SystemExit(f"{args.text}: {len(ids)} tokens, fewer than one step's {per_step}")
    ids = (ids * (needed // len(ids) + 1))[:needed]
    data = torch.tensor(ids).reshape(-1, args.batch, args.seq_len)

    times = []
    for step in range(args.warmup + args.steps):
        batch = data[step]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        for p, m in masks.items():
            p.grad.mul_(m)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in masks.items():
                p.data.mul_(m)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = sum(times) / len(times)
    print(json.dumps({
        "model_dir": args.model_dir,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "mask_2_4": args.mask_2_4,
        "bf16_autocast": args.bf16,
        "trained_parameters": sum(p.numel() for p in trained),
        "timed_steps": len(times),
        "step_seconds": round(step_s, 3),
        "tokens_per_second": round(per_step / step_s, 1),
        "last_loss": round(loss.item(), 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
