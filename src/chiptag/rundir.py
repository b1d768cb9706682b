"""Run directories: naming, summary.json (atomic), and the printed result."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import numpy as np

from chiptag import __version__
from chiptag.progress import out

SUMMARY = "summary.json"


def new_run_dir(cfg) -> Path:
    base = cfg.output.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.name}"
    runs = Path(cfg.output.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = runs / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a new run directory under {runs}")


def build_summary(cfg, run_dir: Path, ds, splits, bb, head_spec, n_params, pw, history, best_epoch,
                  results, baseline, thresholds, timings, extract_info) -> dict:
    entry, sc = cfg.model, cfg.training.scheduler
    tags = ds.table.tags
    summary = {
        "run_id": run_dir.name, "run_dir": str(run_dir), "status": "completed", "chiptag_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "active_model_index": cfg.active_model_index,
        "model": entry.name, "backbone": bb.name, "weights": entry.weights, "weights_id": bb.weights_id,
        "frozen": entry.freeze, "image_size": bb.preprocessing.image_size, "head": head_spec.describe(),
        "parameters": n_params, "optimizer": f"Adam(lr={entry.learning_rate:g})",
        "scheduler": f"ReduceLROnPlateau(factor={sc.factor:g}, patience={sc.patience})",
        "epochs": entry.epochs, "best_epoch": best_epoch,
        "pos_weight": None if pw is None else dict(zip(tags, map(float, pw))),
        "tags": tags, "n_images": {s: int(len(i)) for s, i in splits.items()},
        "data": {"labels": str(ds.labels_path), "images": str(ds.image_dir)},
        "metrics": results, "baseline": baseline,
        "thresholds": dict(zip(tags, map(float, np.round(thresholds, 4)))),
        "timings": timings, "features": extract_info, "history": history,
    }
    return summary


def print_result(s: dict) -> None:
    m, b = s["metrics"], s["baseline"]
    out.print(
        f"\n[bold]{s['model']}[/] best epoch {s['best_epoch']}\n"
        f"  val  F2 {m['val']['f2']:.4f} (tuned thresholds)   {m['val']['f2_at_0.5']:.4f} @0.5   "
        f"baseline {b['val']['f2']:.4f}\n"
        f"  test F2 {m['test']['f2']:.4f} (tuned thresholds)   {m['test']['f2_at_0.5']:.4f} @0.5   "
        f"baseline {b['test']['f2']:.4f}  (constant {{{', '.join(b['tags'])}}})\n"
        f"  run dir {s['run_dir']}  ({s['timings']['total_s']:.1f}s)"
    )
