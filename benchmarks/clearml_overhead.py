"""Time ClearML adds to a run (offline mode), and what its reporter subprocess costs on close.

    PYTHONPATH=src python benchmarks/clearml_overhead.py [--runs 2] [--epochs 10] [--modes local,clearml]

Each mode runs in a fresh process (ClearML settings are process-wide) with a temp ClearML home, on tiny
generated data: `local` (no ClearML), `clearml` (chiptag's setting: report_use_subprocess false) and
`clearml+subprocess` (ClearML's Linux default). Prints per-run wall time and the time inside the tracker.
Measured, not asserted. With ClearML's default, one close() took 308 s here (the second task in a process),
so expect `clearml+subprocess` to take minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("local", "clearml", "clearml+subprocess")


def _timed(cls, name: str, sink: dict) -> None:
    fn = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            sink[name] = sink.get(name, 0.0) + time.perf_counter() - t0

    setattr(cls, name, wrapper)


def worker(mode: str, data: Path, work: Path, runs: int, epochs: int) -> list[dict]:
    from chiptag import config as config_mod
    from chiptag.training.main import run_train

    timings: dict = {}
    if mode != "local":
        from chiptag.tracking import clearml_setup
        from chiptag.tracking.clearml import ClearMLTracker

        if mode == "clearml+subprocess":
            clearml_setup._OVERRIDES = {"sdk": {"development": {"report_use_subprocess": True}}}
        for name in ("__init__", "start", "log_scalars", "finish", "_close"):  # __init__ imports clearml
            _timed(ClearMLTracker, name, timings)
    raw = {"data": {"root": str(data), "labels": "train_classes.csv"},
           "models": [{"name": "bench", "backbone": "resnet18", "weights": None, "image_size": 32,
                       "hidden_dim": 32, "epochs": epochs}],
           "training": {"batch_size": 32, "device": "cpu", "num_workers": 0, "progress": False},
           "features": {"cache_dir": str(work / "cache")}, "output": {"runs_dir": str(work / "runs")},
           "tracking": {"backend": "local" if mode == "local" else "clearml", "offline": True}}
    cfg = config_mod.from_dict(raw)
    rows = []
    for i in range(runs + 1):  # the first run in a process also extracts features and imports clearml
        timings.clear()
        t0 = time.perf_counter()
        run_train(cfg)
        rows.append({"mode": mode, "run": "first" if i == 0 else f"next{i}",
                     "wall_s": time.perf_counter() - t0, **timings})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--worker", choices=MODES)
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.worker:
        work = Path(args.work)
        rows = worker(args.worker, work / "data", work / args.worker, args.runs, args.epochs)
        print("RESULT " + json.dumps(rows))
        return
    from chiptag.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory(prefix="chiptag-bench-") as tmp:
        work = Path(tmp)
        generate_dataset(work / "data", n=200, size=48, seed=0)
        (work / "clearml.conf").write_text("# empty\n")
        env = {**os.environ, "HOME": str(work), "CLEARML_CONFIG_FILE": str(work / "clearml.conf"),
               "CLEARML_CACHE_DIR": str(work / "clearml-cache")}
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--work", str(work),
                                   "--runs", str(args.runs), "--epochs", str(args.epochs)],
                                  env=env, capture_output=True, text=True, check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            for row in json.loads(line[7:]):
                extra = "  ".join(f"{k} {v:.3f}s" for k, v in row.items() if k not in ("mode", "run", "wall_s"))
                print(f"{mode:<20} {row['run']:<6} run {row['wall_s']:6.2f}s  {extra}")


if __name__ == "__main__":
    main()
