"""Which `training.select` picks the best checkpoint epoch on noisy labels? Measured, not asserted.

    PYTHONPATH=src python benchmarks/checkpoint_select.py --n 1500 --size 48 --epochs 30 --noise 0.15 \
        --seeds 0 1 2 --work .cache/bench-select --out benchmarks/results/checkpoint_select.json

Per seed: a generated Planet-like dataset (chiptag demo-data: 17 tags, the real frequencies, so rare tags
with a handful of examples), made noisy (each positive tag dropped with probability `noise`, and with the
same probability a row gains one wrong tag drawn uniformly from the vocabulary — rare tags get false
positives), then one frozen random-init ResNet18 run per select mode: same features (one cache), same
seed, same epochs; only the checkpoint epoch differs. Reports test F2 at tuned thresholds (the headline),
test F2 at 0.5 and the chosen epoch, with mean and standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from chiptag import config as config_mod
from chiptag.data.synthetic import generate_dataset
from chiptag.progress import out
from chiptag.training.main import run_train

MODES = ("val_loss", "val_f2", "val_f2_tuned")


def noisy_copy(root: Path, noise: float, seed: int) -> None:
    """Rewrite root/train_classes.csv with label noise (the images stay)."""
    path = root / "train_classes.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    vocab = sorted({t for s in df["tags"] for t in s.split()})
    rng = np.random.default_rng(1000 + seed)
    rows = []
    for text in df["tags"]:
        tags = [t for t in text.split() if rng.random() >= noise]
        if rng.random() < noise:
            tags.append(vocab[rng.integers(len(vocab))])
        rows.append(" ".join(dict.fromkeys(tags)) or text.split()[0])  # never an empty row
    df["tags"] = rows
    df.to_csv(path, index=False)


def one_run(root: Path, work: Path, seed: int, mode: str, args) -> dict:
    cfg = config_mod.from_dict({
        "data": {"root": str(root), "labels": "train_classes.csv"},
        "models": [{"name": f"select-{mode}", "backbone": "resnet18", "weights": None, "image_size": args.size,
                    "epochs": args.epochs, "learning_rate": args.lr}],
        "training": {"seed": seed, "device": "cpu", "num_workers": 0, "progress": False, "select": mode},
        "features": {"cache_dir": str(work / "cache")},
        "output": {"runs_dir": str(work / "runs"), "run_name": f"s{seed}-{mode}"},
    })
    s = run_train(cfg)
    test = s["metrics"]["test"]
    return {"seed": seed, "select": mode, "test_f2": test["f2"], "test_f2_at_0.5": test["f2_at_0.5"],
            "best_epoch": s["best_epoch"], "baseline_test_f2": s["baseline"]["test"]["f2"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--noise", type=float, default=0.15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", type=Path, default=Path(".cache/bench-select"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoint_select.json"))
    args = ap.parse_args()
    out.quiet = True
    t0 = time.perf_counter()
    results = []
    for seed in args.seeds:
        work = args.work / f"seed{seed}"
        root = generate_dataset(work / "data", n=args.n, size=args.size, seed=seed)
        noisy_copy(root, args.noise, seed)
        results += [one_run(root, work, seed, mode, args) for mode in MODES]
    table = {}
    for mode in MODES:
        rows = [r for r in results if r["select"] == mode]
        f2 = [r["test_f2"] for r in rows]
        table[mode] = {"test_f2_mean": statistics.mean(f2), "test_f2_std": statistics.pstdev(f2),
                       "test_f2_at_0.5_mean": statistics.mean(r["test_f2_at_0.5"] for r in rows),
                       "best_epochs": [r["best_epoch"] for r in rows]}
    print(f"{'select':14} {'test F2 mean':>12} {'std':>7} {'F2@0.5':>7}  best epochs (of {args.epochs})")
    for mode, t in table.items():
        print(f"{mode:14} {t['test_f2_mean']:12.4f} {t['test_f2_std']:7.4f} {t['test_f2_at_0.5_mean']:7.4f}  "
              f"{t['best_epochs']}")
    base = statistics.mean(r["baseline_test_f2"] for r in results if r["select"] == MODES[0])
    print(f"constant baseline test F2 (mean): {base:.4f}; {time.perf_counter() - t0:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "PYTHONPATH=src python " + " ".join(map(shlex.quote, sys.argv)),
        "note": "2 shared CPU cores (other jobs running)", "summary": table, "baseline_test_f2": base,
        "runs": results, "seconds": time.perf_counter() - t0}, indent=2) + "\n")


if __name__ == "__main__":
    main()
