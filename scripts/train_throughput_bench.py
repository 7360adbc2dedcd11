#!/usr/bin/env python3
"""Training throughput, Espalier beside PyTorch in one run: forward + backward + AdamW over every
block linear of a model (embeddings, norms and LM head frozen), batch 4 x 256 tokens, 2 threads.

    python3 scripts/train_throughput_bench.py MODEL_DIR --espalier target/release/espalier
        [--rounds 2] [--steps 7] [--batch 4] [--seq-len 256] [--threads 2]
        [--text data/calibration.txt] [--block-density D] [--bf16]

Each round runs PyTorch (`scripts/torch_train_throughput.py`: `steps - 2` timed steps after 2
untimed) and then `espalier run` of a generated pipeline with a `[finetune]` section of `steps`
steps on the same text, batch and sequence length (AdamW at 5e-5, constant rate, no checkpoint,
no evaluation, no export); Espalier's figure is the report's `steady_tokens_per_second` (every
step after the first). The two alternate, so a machine that slows down or speeds up during the
run moves both. Prints one JSON line per round and a summary with the ratio of the means.
`--block-density 0.2` adds a `block` stage (16x16 blocks, that density, every block linear) before
Espalier's fine-tuning, so it trains the block-pruned model on its block-sparse kernels; PyTorch
still trains dense (its CPU training gains nothing from zeros, and holding a mask only adds the
two multiplies per weight of `torch_train_throughput.py --mask-2-4`).
`--bf16` trains both in mixed precision: PyTorch under bf16 autocast (`torch_train_throughput.py
--bf16`), Espalier with `precision = "bf16"` (a CPU with AVX512-BF16).
Needs torch and transformers for the PyTorch side; the machine should be otherwise idle.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_torch(args):
    cmd = [sys.executable, os.path.join(HERE, "torch_train_throughput.py"), args.model_dir,
           "--batch", str(args.batch), "--seq-len", str(args.seq_len),
           "--steps", str(args.steps - 2), "--warmup", "2",
           "--threads", str(args.threads), "--text", args.text] + (["--bf16"] if args.bf16 else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_second"]


def run_espalier(args, workdir):
    pipeline = os.path.join(workdir, "train-throughput.toml")
    stage = ""
    if args.block_density is not None:
        stage = f"""
[[stage]]
plugin = "block"
density = {args.block_density}
block = [16, 16]
"""
    with open(pipeline, "w", encoding="utf-8") as f:
        f.write(f"""name = "train-throughput"
model = {json.dumps(os.path.abspath(args.model_dir))}
{stage}
[finetune]
text = {json.dumps(os.path.abspath(args.text))}
steps = {args.steps}
batch = {args.batch}
seq_len = {args.seq_len}
lr = 5e-5
warmup = 0
decay = "constant"
seed = 0
precision = "{'bf16' if args.bf16 else 'f32'}"
""")
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    out = subprocess.run([args.espalier, "run", pipeline, "--no-export", "--json"],
                         check=True, capture_output=True, text=True, env=env).stdout
    report = json.loads(out)
    finetune = find_finetune(report)
    if finetune is None:
        raise SystemExit("espalier's report has no fine-tuning section")
    return finetune["steady_tokens_per_second"]


def find_finetune(node):
    """The first object holding `steady_tokens_per_second` in the run report."""
    if isinstance(node, dict):
        if "steady_tokens_per_second" in node:
            return node
        node = list(node.values())
    if isinstance(node, list):
        for v in node:
            found = find_finetune(v)
            if found is not None:
                return found
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--espalier", required=True, help="path of the espalier binary")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7, help="steps per run, the first 2 (PyTorch) / 1 (Espalier) untimed")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="data/calibration.txt")
    ap.add_argument("--block-density", type=float, default=None,
                    help="prune Espalier's model to this density of 16x16 blocks first")
    ap.add_argument("--bf16", action="store_true",
                    help="mixed precision on both sides (PyTorch bf16 autocast, precision = \"bf16\")")
    args = ap.parse_args()
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3")
    torch_tps, espalier_tps = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(args.rounds):
            torch_tps.append(run_torch(args))
            espalier_tps.append(run_espalier(args, workdir))
            print(json.dumps({"round": r + 1, "pytorch_tokens_per_s": torch_tps[-1],
                              "espalier_tokens_per_s": round(espalier_tps[-1], 1),
                              "ratio": round(espalier_tps[-1] / torch_tps[-1], 3)}), flush=True)
    mean = lambda xs: sum(xs) / len(xs)
    print(json.dumps({"model_dir": args.model_dir, "block_density": args.block_density,
                      "bf16": args.bf16,
                      "batch": args.batch, "seq_len": args.seq_len,
                      "threads": args.threads, "rounds": args.rounds,
                      "pytorch_tokens_per_s": round(mean(torch_tps), 1),
                      "espalier_tokens_per_s": round(mean(espalier_tps), 1),
                      "espalier_over_pytorch": round(mean(espalier_tps) / mean(torch_tps), 3)}))


if __name__ == "__main__":
    main()
