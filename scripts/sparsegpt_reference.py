#!/usr/bin/env python3
"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", 2023, Algorithm 1) in PyTorch: the reference for Espalier's OBS host kernels
(host/src/obs.rs) driven the way a SparseGPT criterion drives them.

    python3 scripts/sparsegpt_reference.py > host/tests/fixtures/sparsegpt_kernels.json

Needs torch (CPU is enough). Written from the paper, not from any implementation:

* H = XᵀX / tokens over the layer's calibration inputs; columns whose inputs are always zero get
  a unit diagonal and their weights are set to zero; λ = damping · mean(diag H) is added to the
  diagonal.
* U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), computed here the textbook way (Cholesky of
  H, inverse, Cholesky again) in float64, then used in float32 like the weights.
* Columns are processed left to right. Removing w[r][i] sets it to zero and updates the later
  columns of the row by w[r][j] -= (w[r][i] / U[i][i]) · U[i][j], applied at once here (the
  paper's lazy batching over blocks of B columns is an exact reordering of these updates, which
  is what the Rust side does; every case runs it with a different B).
* Mask selection uses the OBS saliency w² / U[j][j]² of the weights as they are when the
  selection is made: unstructured, once per mask block of Bs columns, keeping the
  round(density · rows · Bs) highest of the block (all rows together, the paper's adaptive mask
  selection); N:M, once per group of M columns, keeping the N highest of each row's group. Ties
  keep the lower index (row-major within the block), Espalier's convention.

The output holds each case's inputs (W, H), parameters and results (removed flags, updated W).
"""

import json
import math

import torch


def inverse_factor(h, damping):
    h = h.clone()
    n = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(n, dtype=torch.float64)
    l = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(l)
    u = torch.linalg.cholesky(hinv, upper=True)
    return u.float(), dead


def keep_top(scores, k):
    """Flags the k highest of a 1-D tensor, ties to the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-scores[i].item(), i))
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def sparsegpt(w, h, density, n, m, mask_block, damping):
    u, dead = inverse_factor(h, damping)
    w = w.clone()
    w[:, dead] = 0.0
    rows, cols = w.shape
    removed = torch.zeros(rows, cols, dtype=torch.bool)
    d = torch.diag(u)
    for i in range(cols):
        if n == 0 and i % mask_block == 0:
            j2 = min(i + mask_block, cols)
            s = w[:, i:j2] ** 2 / (d[i:j2] ** 2).reshape(1, -1)
            k = math.floor(density * s.numel() + 0.5)
            removed[:, i:j2] = ~keep_top(s.flatten(), k).reshape(s.shape)
        if n > 0 and i % m == 0:
            j2 = min(i + m, cols)
            s = w[:, i:j2] ** 2 / (d[i:j2] ** 2).reshape(1, -1)
            for r in range(rows):
                removed[r, i:j2] = ~keep_top(s[r], n)
        err = torch.where(removed[:, i], w[:, i], torch.zeros(rows)) / u[i, i]
        w[:, i] = torch.where(removed[:, i], torch.zeros(rows), w[:, i])
        w[:, i + 1 :] -= err.reshape(-1, 1) * u[i, i + 1 :].reshape(1, -1)
    return removed, w


def layer(seed, rows, cols, tokens, dead_col=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    x = z + 0.5 * z @ mix
    if dead_col is not None:
        x[:, dead_col] = 0.0
    h = x.T @ x / tokens
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    return w, h


CASES = [
    # name, seed, rows, cols, tokens, dead column, density, n, m, blocksize, mask block
    ("unstructured-50", 1, 8, 24, 64, 5, 0.5, 0, 0, 8, 8),
    ("unstructured-40-mask-block-4", 2, 8, 24, 64, None, 0.4, 0, 0, 8, 4),
    ("unstructured-50-mask-block-6-lazy-4", 3, 6, 20, 48, None, 0.5, 0, 0, 4, 6),
    ("2-4", 4, 8, 24, 64, None, 0.5, 2, 4, 8, 0),
    ("4-8-lazy-4", 5, 5, 32, 80, 9, 0.5, 4, 8, 4, 0),
]

DAMPING = 0.01


def main():
    torch.set_num_threads(1)
    out = {"damping": DAMPING, "torch": torch.__version__, "cases": []}
    for name, seed, rows, cols, tokens, dead, density, n, m, bs, mb in CASES:
        w, h = layer(seed, rows, cols, tokens, dead)
        removed, updated = sparsegpt(w, h, density, n, m, mb, DAMPING)
        out["cases"].append(
            {
                "name": name,
                "rows": rows,
                "cols": cols,
                "tokens": tokens,
                "density": density,
                "n": n,
                "m": m,
                "blocksize": bs,
                "mask_block": mb,
                "weights": [float(v) for v in w.flatten()],
                "hessian": [float(v) for v in h.flatten()],
                "removed": [bool(v) for v in removed.flatten()],
                "updated": [float(v) for v in updated.flatten()],
            }
        )
    json.dump(out, __import__("sys").stdout, indent=None)
    print()


if __name__ == "__main__":
    main()
