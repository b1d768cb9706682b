"""How to store cached features: float16, bfloat16, float32 or per-dimension scaled float16? Measured.

    PYTHONPATH=src python benchmarks/feature_cache.py --n 20000 --dim 2048 \
        --out benchmarks/results/feature_cache.json

Two feature matrices: "pretrained-like" (ReLU outputs, per-dimension scales spread over 3 decades, as a
pretrained ResNet50's pooled features) and "random-init EfficientNet-like" (the same times 1e-14: what a
frozen random-init EfficientNet-B0 gives). For each encoding: file bytes, save and load(+decode) seconds,
the largest error relative to each dimension's range, and the share of non-zero values lost to zero.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from chiptag.features import cache


def encodings():
    return {
        "float16": (lambda x: {"v": x.half()}, lambda d: d["v"].float()),
        "bfloat16": (lambda x: {"v": x.bfloat16()}, lambda d: d["v"].float()),
        "float32": (lambda x: {"v": x.float()}, lambda d: d["v"]),
        "float16-scaled": (lambda x: dict(zip(("v", "s"), cache.encode(x))), lambda d: cache.decode(d["v"], d["s"])),
    }


def measure(x: torch.Tensor, enc, dec, path: Path) -> dict:
    t0 = time.perf_counter()
    torch.save(enc(x), path)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = dec(torch.load(path, weights_only=True))
    load_s = time.perf_counter() - t0
    span = x.abs().amax(0).clamp_min(torch.finfo(torch.float32).tiny)
    rel = float(((back - x).abs() / span).max())
    lost = float(((back == 0) & (x != 0)).sum() / max(1, int((x != 0).sum())))
    return {"bytes": path.stat().st_size, "save_s": save_s, "load_s": load_s, "max_rel_error": rel,
            "nonzero_lost_to_zero": lost}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_cache.json"))
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    base = torch.relu(torch.randn(args.n, args.dim, generator=g)) * torch.logspace(-2, 1, args.dim)
    data = {"pretrained-like": base, "random-init EfficientNet-like": base * 1e-14}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for dname, x in data.items():
            for ename, (enc, dec) in encodings().items():
                results[f"{dname} / {ename}"] = measure(x, enc, dec, Path(d) / "f.pt")
    print(f"{'features / encoding':48} {'MB':>7} {'save s':>7} {'load s':>7} {'max rel err':>11} {'lost to 0':>9}")
    for k, r in results.items():
        print(f"{k:48} {r['bytes'] / 1e6:7.1f} {r['save_s']:7.2f} {r['load_s']:7.2f} {r['max_rel_error']:11.2e} "
              f"{r['nonzero_lost_to_zero']:9.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "PYTHONPATH=src python " + " ".join(map(shlex.quote, sys.argv)),
        "note": "2 shared CPU cores (other jobs running)", "n": args.n, "dim": args.dim, "results": results},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
