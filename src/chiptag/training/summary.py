"""summary.json of a finished run (what `chiptag runs`, the report and the trackers read) and its printout."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from chiptag import __version__
from chiptag.data.dataset import Dataset
from chiptag.evaluation.label_rules import describe_decision
from chiptag.evaluation.metrics import BASELINE_TOLERANCE
from chiptag.features.extraction import FeatureInfo
from chiptag.progress import console, out
from chiptag.runs.layout import RunDir
from chiptag.training.settings import Settings


@dataclass
class Outcome:
    """What training produced, beside the model: best epoch, history, final scores, timings, features."""

    best_epoch: int | None  # None: a k-fold run (each fold has its own)
    history: list[dict]  # per epoch (and fold)
    scores: dict  # {"metrics": {val, test}, "baseline": {...}, "thresholds": array}
    timings: dict
    features: FeatureInfo
    pos_weight: torch.Tensor | None
    parameters: dict


def build_summary(s: Settings, run: RunDir, ds: Dataset, splits: dict, net, outcome: Outcome) -> dict:
    """net: training.main.Network (backbone, head spec, tagger)."""
    tags, bb = ds.table.tags, net.backbone
    optimizer, scheduler = s.optim.describe()
    pw, thresholds = outcome.pos_weight, outcome.scores["thresholds"]
    scores = outcome.scores["metrics"]
    scores["test"]["f2_minus_baseline"] = scores["test"]["f2"] - outcome.scores["baseline"]["test"]["f2"]
    files = s.data.split.files
    return {
        "run_id": run.name, "run_dir": str(run.path), "status": "completed", "chiptag_version": __version__,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "active_model_index": s.active_model_index,
        "model": s.network.name, "backbone": bb.name, "weights": s.network.weights, "weights_id": bb.weights_id,
        "frozen": s.network.freeze, "image_size": bb.preprocessing.image_size, "head": net.head.describe(),
        "parameters": outcome.parameters, "optimizer": optimizer, "scheduler": scheduler,
        "epochs": s.optim.epochs, "best_epoch": outcome.best_epoch,
        "pos_weight": None if pw is None else dict(zip(tags, map(float, pw))),
        "tags": tags, "n_images": {s: int(len(i)) for s, i in splits.items()},
        "data": {"labels": str(ds.labels_path), "images": str(ds.image_dir)},
        "metrics": outcome.scores["metrics"], "baseline": outcome.scores["baseline"],
        "thresholds": dict(zip(tags, map(float, np.round(thresholds, 4)))),
        "timings": outcome.timings, "features": outcome.features.to_dict(), "history": outcome.history,
        "split": {"given": files is not None,
                  "files": None if files is None else {k: str(v) for k, v in files.model_dump().items()}},
        "select": s.select, "resize": s.data.resize, "views": s.features.views,
        "tta": s.features.views > 1 and s.features.tta,
        # end-to-end phases only (a frozen run augments through its cached views): what they trained with
        "augment": None if s.network.freeze else s.augment.describe(),
        "finetune": None if s.network.freeze else s.optim.describe_finetune(),
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
        f"  run dir {s['run_dir']}  ({s['timings']['total_s']:.1f}s"
        + (f", report {s['timings']['report_s']:.1f}s)" if "report_s" in s["timings"] else ")")
    )
    decision = s.get("label_rules_decision") or {}
    if decision.get("val_f2_with_rules") is not None:
        out.print(f"  label rules: {describe_decision(decision)}")
    report_md = RunDir(s["run_dir"]).report_md
    if report_md.is_file():  # not when drawing it failed (a warning said so)
        out.print(f"  report  {report_md}  (per-class F2, curves, the test chips it gets wrong)")
    gap = m["test"].get("f2_minus_baseline")
    if gap is not None and abs(gap) < BASELINE_TOLERANCE:
        console.print(f"[yellow]warning:[/] test F2 {m['test']['f2']:.4f} is within {BASELINE_TOLERANCE} of the "
                      f"constant baseline {b['test']['f2']:.4f}: the model learned nothing beyond tag frequencies. "
                      f"Check the features ({s.get('backbone')}, weights {s.get('weights_id')}: random-init "
                      "backbones give near-useless features), the labels, the learning rate and epochs.")
