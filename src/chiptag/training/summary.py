"""summary.json of a finished run (what `chiptag runs`, the report and the trackers read) and its printout."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from chiptag import __version__
from chiptag.config import Config
from chiptag.data.dataset import Dataset
from chiptag.evaluation.metrics import BASELINE_TOLERANCE
from chiptag.features.extraction import FeatureInfo
from chiptag.progress import console, out
from chiptag.runs.layout import RunDir
from chiptag.training.loop import describe_optim
from chiptag.training.resume import LoopState


@dataclass
class Outcome:
    """What training produced, beside the model: loop state, final scores, timings, feature extraction."""

    state: LoopState
    scores: dict  # {"metrics": {val, test}, "baseline": {...}, "thresholds": array}
    timings: dict
    features: FeatureInfo
    pos_weight: torch.Tensor | None
    parameters: dict


def build_summary(cfg: Config, run: RunDir, ds: Dataset, splits: dict, model, outcome: Outcome) -> dict:
    """model: training.run.Model (backbone, head spec, tagger)."""
    entry, tags, bb = cfg.model, ds.table.tags, model.backbone
    optimizer, scheduler = describe_optim(cfg)
    pw, thresholds = outcome.pos_weight, outcome.scores["thresholds"]
    scores = outcome.scores["metrics"]
    scores["test"]["f2_minus_baseline"] = scores["test"]["f2"] - outcome.scores["baseline"]["test"]["f2"]
    files = cfg.data.split.files
    return {
        "run_id": run.name, "run_dir": str(run.path), "status": "completed", "chiptag_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "active_model_index": cfg.active_model_index,
        "model": entry.name, "backbone": bb.name, "weights": entry.weights, "weights_id": bb.weights_id,
        "frozen": entry.freeze, "image_size": bb.preprocessing.image_size, "head": model.head.describe(),
        "parameters": outcome.parameters, "optimizer": optimizer, "scheduler": scheduler,
        "epochs": entry.epochs, "best_epoch": outcome.state.best_epoch,
        "pos_weight": None if pw is None else dict(zip(tags, map(float, pw))),
        "tags": tags, "n_images": {s: int(len(i)) for s, i in splits.items()},
        "data": {"labels": str(ds.labels_path), "images": str(ds.image_dir)},
        "metrics": outcome.scores["metrics"], "baseline": outcome.scores["baseline"],
        "thresholds": dict(zip(tags, map(float, np.round(thresholds, 4)))),
        "timings": outcome.timings, "features": outcome.features.to_dict(), "history": outcome.state.history,
        "split": {"given": files is not None,
                  "files": None if files is None else {k: str(v) for k, v in files.model_dump().items()}},
        "select": cfg.training.select, "resize": cfg.data.resize, "views": cfg.features.views,
        "tta": cfg.features.views > 1 and cfg.features.tta,
    }


def print_result(s: dict) -> None:
    m, b = s["metrics"], s["baseline"]
    out.print(
        f"\n[bold]{s['model']}[/] " + (f"best epoch {s['best_epoch']}" if "folds" not in s else
                                       f"{s['folds']['k']}-fold ensemble (val = out-of-fold predictions)") + "\n"
        f"  val  F2 {m['val']['f2']:.4f} (tuned thresholds)   {m['val']['f2_at_0.5']:.4f} @0.5   "
        f"baseline {b['val']['f2']:.4f}\n"
        f"  test F2 {m['test']['f2']:.4f} (tuned thresholds)   {m['test']['f2_at_0.5']:.4f} @0.5   "
        f"baseline {b['test']['f2']:.4f}  (constant {{{', '.join(b['tags'])}}})\n"
        f"  run dir {s['run_dir']}  ({s['timings']['total_s']:.1f}s)"
    )
    gap = m["test"].get("f2_minus_baseline")
    if gap is not None and abs(gap) < BASELINE_TOLERANCE:
        console.print(f"[yellow]warning:[/] test F2 {m['test']['f2']:.4f} is within {BASELINE_TOLERANCE} of the "
                      f"constant baseline {b['test']['f2']:.4f}: the model learned nothing beyond tag frequencies. "
                      f"Check the features ({s.get('backbone')}, weights {s.get('weights_id')}: random-init "
                      "backbones give near-useless features), the labels, the learning rate and epochs.")
