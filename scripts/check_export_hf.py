#!/usr/bin/env python3
"""Checks that directories exported by `espalier run` load in Hugging Face transformers as the
same architecture, with exactly the exported tensors (no missing, unexpected or re-initialised
weights), and that they run.

    python scripts/check_export_hf.py out/quickstart out/heads ...

Needs torch, transformers and safetensors (e.g. in a virtualenv; not needed by the tests).
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def check(directory: str) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"{directory}: loading problems: {problems}")
    exported = load_file(f"{directory}/model.safetensors")
    state = model.state_dict()
    prefix = model.base_model_prefix + "."
    for name, tensor in exported.items():
        ours = state.get(name, state.get(prefix + name))
        if ours is None:
            raise SystemExit(f"{directory}: transformers has no parameter for {name}")
        if not torch.equal(ours, tensor):
            raise SystemExit(f"{directory}: {name} differs after loading")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    zeros = sum(int((t == 0).sum()) for t in exported.values())
    total = sum(t.numel() for t in exported.values())
    print(
        f"{directory}: {type(model).__name__}, {len(exported)} tensors, "
        f"{zeros}/{total} zeros, logits {tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())}"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for d in sys.argv[1:]:
        check(d)
