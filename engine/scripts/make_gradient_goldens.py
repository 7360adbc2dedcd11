#!/usr/bin/env python3
"""Reference gradients of the calibration loss, from PyTorch autograd through transformers.

For each tiny model written by make_goldens.py (llama, llama-pruned, gpt2) this loads the
committed Hugging Face directory under engine/tests/fixtures/, takes the two token sequences
recorded in golden/golden.json ("random" and "text"), and computes the calibration loss as
Espalier defines it: the mean over sequences of each sequence's mean next-token loss
(transformers' `model(ids, labels=ids).loss`). It then records, for every linear weight inside
the transformer blocks, the gradient of that loss in Espalier's canonical `[out, in]` layout
(GPT-2's Conv1D weights are transposed), to

    engine/tests/fixtures/golden/<model>.grads.safetensors

with the loss itself in the file's metadata. It also records the empirical Fisher diagonal as
Espalier defines it (`calibration.fisher`): for every sequence alone, the gradient of that
sequence's mean next-token loss; squared element-wise; averaged over the sequences, to

    engine/tests/fixtures/golden/<model>.fisher.safetensors

Usage, from the repository root with torch,
transformers and safetensors installed:

    python engine/scripts/make_gradient_goldens.py [--fixtures engine/tests/fixtures]

Everything is deterministic (f32 on the CPU, no dropout); rerun only when the fixtures change.
"""

import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

MODELS = ["llama", "llama-pruned", "gpt2"]
# Block linears, by suffix of their weight's name.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def is_block_linear(name: str) -> bool:
    if not name.endswith(".weight") or ".h." not in name and ".layers." not in name:
        return False
    stem = name[: -len(".weight")]
    return stem.endswith(LLAMA_LINEARS) or stem.endswith(GPT2_LINEARS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", default="engine/tests/fixtures")
    args = parser.parse_args()
    torch.manual_seed(0)
    with open(os.path.join(args.fixtures, "golden", "golden.json")) as f:
        golden = json.load(f)
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(args.fixtures, name), torch_dtype=torch.float32
        )
        model.eval()
        sequences = golden["models"][name]["sequences"]
        losses = []
        for key in ("random", "text"):
            ids = torch.tensor([sequences[key]["ids"]])
            losses.append(model(ids, labels=ids).loss)
        loss = torch.stack(losses).mean()
        loss.backward()
        conv1d = model.config.model_type == "gpt2"
        grads = {}
        for pname, param in model.named_parameters():
            if not is_block_linear(pname):
                continue
            g = param.grad.detach()
            grads[pname] = (g.t() if conv1d else g).contiguous()
        out = os.path.join(args.fixtures, "golden", f"{name}.grads.safetensors")
        save_file(
            grads,
            out,
            metadata={
                "loss": repr(loss.item()),
                "sequences": "random,text",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        )
        print(f"{name}: loss {loss.item():.6f}, {len(grads)} gradients -> {out}")

        # Fisher diagonal: one backward pass per sequence, squared gradients averaged.
        squares = {}
        for key in ("random", "text"):
            model.zero_grad(set_to_none=True)
            ids = torch.tensor([sequences[key]["ids"]])
            model(ids, labels=ids).loss.backward()
            for pname, param in model.named_parameters():
                if not is_block_linear(pname):
                    continue
                g = param.grad.detach()
                g = (g.t() if conv1d else g).contiguous()
                squares[pname] = squares.get(pname, 0) + g * g
        fisher = {k: (v / 2).contiguous() for k, v in squares.items()}
        out = os.path.join(args.fixtures, "golden", f"{name}.fisher.safetensors")
        save_file(
            fisher,
            out,
            metadata={
                "sequences": "random,text",
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        )
        print(f"{name}: {len(fisher)} Fisher diagonals -> {out}")


if __name__ == "__main__":
    main()
