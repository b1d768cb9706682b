"""Would training K fold heads as one batched model (stacked weights, bmm) be faster than one after another?

The plan's head (Dropout -> Linear(512, 512) -> ReLU -> Linear(512, 17)) on random 512-d features, Adam, batch 64,
the demo's fold size (1,361 training rows), K heads for --epochs epochs: one after another (what a k-fold run does
today), then as one batched model whose weights are stacked along a fold dimension (what issue 23 proposes), each
with Adam's default single-tensor step and with fused=True, under 1 and 2 torch threads. Prints seconds; the
batched model does the same arithmetic, so it only wins what per-step overhead it saves.

    python benchmarks/head_batching.py --folds 5 --epochs 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


def sequential(x, y, k, epochs, batch, fused):
    heads = [nn.Sequential(nn.Dropout(0.2), nn.Linear(x.shape[1], 512), nn.ReLU(), nn.Linear(512, y.shape[1]))
             for _ in range(k)]
    opts = [torch.optim.Adam(h.parameters(), lr=1e-3, fused=fused) for h in heads]
    t0 = time.perf_counter()
    for head, opt in zip(heads, opts):
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), batch):
                idx = perm[i:i + batch]
                F.binary_cross_entropy_with_logits(head(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def batched(x, y, k, epochs, batch, fused):
    d, c = x.shape[1], y.shape[1]
    w1 = (torch.randn(k, d, 512) * d ** -0.5).requires_grad_()
    b1 = torch.zeros(k, 1, 512, requires_grad=True)
    w2 = (torch.randn(k, 512, c) * 512 ** -0.5).requires_grad_()
    b2 = torch.zeros(k, 1, c, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=1e-3, fused=fused)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perms = torch.stack([torch.randperm(len(x)) for _ in range(k)])  # each fold its own order
        for i in range(0, len(x), batch):
            idx = perms[:, i:i + batch]
            h = torch.relu(torch.baddbmm(b1, F.dropout(x[idx], 0.2, True), w1))
            logits = torch.baddbmm(b2, h, w2)
            F.binary_cross_entropy_with_logits(logits, y[idx], reduction="none").mean(dim=(1, 2)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--rows", type=int, default=1361)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    x, y = torch.randn(a.rows, 512), (torch.rand(a.rows, 17) < 0.2).float()
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fn in (("sequential", sequential), ("batched", batched)):
            for fused in (None, True):
                key = f"{name}{'_fused' if fused else ''}_{threads}t"
                results[key] = min(fn(x, y, a.folds, a.epochs, 64, fused) for _ in range(2))  # best of 2
                print(f"{key:24s} {results[key]:6.2f} s", flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
