"""How long the report's error sheets take (measured, not asserted): on a finished run, and on a 40,000-chip test
split made from it.

    chiptag demo-data data/demo --n 2000 --size 128 --seed 0 && chiptag train -c configs/demo.yaml
    PYTHONPATH=src python benchmarks/report_sheets.py runs/<id> --out benchmarks/results/report_sheets.json

1. `write_report(RUN)` as `chiptag report` runs it (all plots + the sheets), best of --repeats.
2. The sheets alone on a copy of the run whose test split is --large chips: the run's test rows repeated, each
   copy pointing at its own file (a symlink to the original chip), with probabilities jittered so the chips
   differ. Reports the seconds and how many chips were decoded (bounded by the tiles drawn, not the split).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from chiptag.evaluation.report import load_eval_probs, write_report
from chiptag.evaluation.sheets import options, write_sheets
from chiptag.runs.layout import RunDir


def _large_copy(run_dir: Path, work: Path, n: int) -> tuple[Path, dict]:
    """A run dir whose test split has n chips (symlinks to the original test chips)."""
    cfg = yaml.safe_load(RunDir(run_dir).config.read_text())
    data = cfg["data"]
    src = Path(data["root"]) / data.get("images", "train-jpg")
    ext = data.get("extension", ".jpg")
    probs = load_eval_probs(run_dir)
    base = [str(s) for s in probs["test_names"]]
    images = work / "images"
    images.mkdir(parents=True)
    names, rows = [], []
    for i in range(n):
        j = i % len(base)
        name = f"{base[j]}-copy{i}"
        (images / f"{name}{ext}").symlink_to((src / f"{base[j]}{ext}").resolve())
        names.append(name)
        rows.append(j)
    rng = np.random.default_rng(0)
    run = work / "run"
    shutil.copytree(run_dir, run)
    cfg["data"] = {**data, "root": str(work), "images": "images"}
    RunDir(run).config.write_text(yaml.safe_dump(cfg))
    p = np.clip(probs["test_probs"][rows] + rng.normal(0, 0.02, (n, probs["test_probs"].shape[1])), 0, 1)
    return run, {"test_probs": p, "test_targets": probs["test_targets"][rows], "test_names": np.asarray(names)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--large", type=int, default=40_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    times, cpu = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        files = write_report(args.run)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)  # less sensitive than wall time to other jobs on a shared machine
    n_test = len(load_eval_probs(args.run)["test_names"])
    print(f"write_report on {args.run} ({n_test} test chips, {len(files) - 1} figures): best {min(times):.1f}s "
          f"wall, {min(cpu):.1f}s CPU")
    summary = json.loads(RunDir(args.run).summary.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        run, probs = _large_copy(args.run, Path(tmp), args.large)
        t, c = time.perf_counter(), time.process_time()
        sheets = write_sheets(run, summary, probs, options(run))
        large_s, large_cpu = time.perf_counter() - t, time.process_time() - c
    print(f"sheets alone on {args.large:,} test chips: {large_s:.1f}s wall, {large_cpu:.1f}s CPU, "
          f"{sheets.decoded} chips decoded, "
          f"{len(sheets.figures)} figures")
    result = {"command": "PYTHONPATH=src python " + " ".join(sys.argv), "run": str(args.run), "test_chips": n_test,
              "report_seconds_best": round(min(times), 2), "report_seconds": [round(x, 2) for x in times],
              "report_cpu_seconds_best": round(min(cpu), 2),
              "large_test_chips": args.large, "large_sheets_seconds": round(large_s, 2),
              "large_sheets_cpu_seconds": round(large_cpu, 2),
              "large_decoded": sheets.decoded, "large_figures": len(sheets.figures),
              "note": "2-core CPU shared with other jobs while measured"}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
