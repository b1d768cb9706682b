"""Frozen training at the real dataset's size: 40,479 generated chips, four backbones, caches reused.

    python benchmarks/scale.py                       # make bench-scale: 40,479 chips at 64 px
    python benchmarks/scale.py --n 4000 --extrapolate 40479   # scaled down; times extrapolated, labelled so

Each backbone is trained twice through chiptag's real pipeline (run_train): the first run extracts the
features into the cache, the second (another learning rate, as in a sweep) reuses them. Random-init weights
(offline): the F2 numbers are for the pipeline, not the architectures, and random EfficientNets give
constant features (see DESIGN.md), so their F2 is the constant baseline's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from chiptag import config as config_mod
from chiptag.data.synthetic import generate_dataset
from chiptag.training.main import run_train

BACKBONES = ("resnet18", "resnet50", "efficientnet_b0", "efficientnet_b1")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40479)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime"])
    p.add_argument("--work", type=Path, help="data, cache and runs (default: a tmp dir)")
    p.add_argument("--extrapolate", type=int, help="also report times scaled linearly to this many chips")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    return p.parse_args()


def config(work: Path, backbone: str, args, lr: float) -> config_mod.Config:
    return config_mod.from_dict({
        "data": {"root": str(work / "data"), "labels": "train_classes.csv"},
        "models": [{"name": f"{backbone}-scale", "backbone": backbone, "weights": None, "freeze": True,
                    "image_size": args.size, "learning_rate": lr, "epochs": args.epochs}],
        "training": {"batch_size": 256, "seed": 0, "device": "cpu", "progress": False},
        "features": {"cache_dir": str(work / "cache"), "batch_size": 128, "engine": args.engine},
        "output": {"runs_dir": str(work / "runs")},
    })


def main() -> None:
    args = parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="chiptag-scale-")
    work = args.work or Path(tmp.name)
    t0 = time.perf_counter()
    if not (work / "data" / "train_classes.csv").is_file():
        generate_dataset(work / "data", n=args.n, size=args.size, seed=0)
    rows = [{"step": "generate", "seconds": time.perf_counter() - t0}]
    for bb in args.backbones:
        for lr in (1e-3, 3e-4):
            s = run_train(config(work, bb, args, lr))
            rows.append({"step": f"{bb} lr={lr:g}", "cache": s["features"]["cache"],
                         "extract_s": s["timings"]["extract_s"], "train_s": s["timings"]["train_s"],
                         "seconds": s["timings"]["total_s"], "test_f2": s["metrics"]["test"]["f2"]})
    total = time.perf_counter() - t0
    print(f"{args.n} chips at {args.size}px, {args.epochs} epochs, engine {args.engine}")
    print(f"{'step':<28}{'cache':>6}{'extract s':>11}{'train s':>9}{'total s':>9}{'test F2':>9}")
    for r in rows:
        print(f"{r['step']:<28}{r.get('cache', ''):>6}{r.get('extract_s', 0):>11.1f}{r.get('train_s', 0):>9.1f}"
              f"{r['seconds']:>9.1f}{r.get('test_f2', float('nan')):>9.3f}")
    print(f"total {total:.1f}s ({total / 60:.1f} min)")
    result = {"n": args.n, "size": args.size, "epochs": args.epochs, "rows": rows, "total_s": total}
    if args.extrapolate:  # generation, extraction and epochs grow with the chips; the rest is per run
        factor = args.extrapolate / args.n
        per_chip = rows[0]["seconds"] + sum(r["extract_s"] + r["train_s"] for r in rows[1:])
        est = total - per_chip + per_chip * factor
        result["extrapolated_total_s"] = est
        print(f"EXTRAPOLATED to {args.extrapolate} chips (per-chip parts x{factor:.2f}, the other "
              f"{total - per_chip:.0f}s kept): {est:.0f}s ({est / 60:.1f} min) -- an estimate, not a measurement")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
