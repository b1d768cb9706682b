"""Extraction engines on this CPU: eager torch, torch channels_last, ONNX Runtime (forward on in-memory batches).

    python benchmarks/engines.py --models resnet18:128 resnet50:128 --images 128 --rounds 3

Variants are interleaved round by round and the best round of each counts, so load from other processes
hits them alike. features.engine: auto picks ONNX Runtime on CPU because it wins here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from chiptag.features.backends import make_forward
from chiptag.models.backbones import build_backbone, state_fingerprint


def throughput(forward, x: torch.Tensor, batch: int) -> float:
    forward(x[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        forward(x[i:i + batch])
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18:128", "resnet50:128"], help="name:size")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/engines.json"))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            name, size = spec.split(":")
            torch.manual_seed(0)
            bb = build_backbone(name, None, int(size), progress=False)
            kw = dict(cache_dir=Path(tmp), backbone_name=name, backbone_hash=state_fingerprint(bb.net),
                      image_size=int(size))
            variants = {"torch": lambda: make_forward(bb.net, "torch", "cpu", channels_last=False, **kw),
                        "torch_channels_last": lambda: make_forward(bb.net, "torch", "cpu", **kw),
                        "onnxruntime": lambda: make_forward(bb.net, "onnxruntime", "cpu", **kw)}
            x = torch.randn(args.images, 3, int(size), int(size))
            best = {v: 0.0 for v in variants}
            for _ in range(args.rounds):
                for v, make in variants.items():
                    best[v] = max(best[v], throughput(make(), x, args.batch))
            results[spec] = best
            print(f"{spec:<18}" + "  ".join(f"{v} {best[v]:7.1f} img/s" for v in variants)
                  + f"  onnxruntime/torch {best['onnxruntime'] / best['torch']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
