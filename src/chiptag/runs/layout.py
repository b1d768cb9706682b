"""The run directory: every file a run dir holds is named here, and only here.

    runs/<YYYYmmdd-HHMMSS>-<model>/
      config.yaml        the resolved config (what --resume and evaluate read back)
      split/             train.txt, val.txt, test.txt (image names)
      metrics.jsonl      one line per epoch (the local tracker)
      checkpoint.pt      best epoch, self-describing (models.checkpoint)
      resume.pt          resumable loop state while a run is unfinished (training.resume; heads trained
                         together write it too, training.heads)
      summary.json       the finished run's record: metrics, baseline, thresholds, timings, history
      failure.json       the record of a run that stopped on an error
      eval_probs.npz     final validation/test probabilities (report plots, re-thresholding)
      evaluation.json    what `chiptag evaluate` recomputed
      skipped.csv        every item data validation left out, with its reason
      validation.json    the data validation report
      report/            report.md and its PNGs (evaluation.report); the error sheets top_errors.png,
                         cooccurrence.png and per_tag/<tag>.png (evaluation.sheets)
    k-fold runs (training.folds) and ensembles (`chiptag ensemble`) also hold:
      split/folds.csv    image_name,fold of every non-test image
      fold-<k>/          fold k's own run dir: checkpoint.pt (its head; the backbone is ../checkpoint.pt's),
                         resume.pt, metrics.jsonl, fold.json (its val F2 and out-of-fold probabilities,
                         written when the fold is done)
      oof_probs.npz      out-of-fold probabilities of every non-test image (what the thresholds were tuned on)
      members.json       an ensemble's member runs
    and checkpoint.pt is then the ensemble (one backbone, K heads averaged; models.checkpoint).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from chiptag.atomic import write_json
from chiptag.errors import ChiptagError

EXPERIMENTS = "EXPERIMENTS.md"  # in the runs folder, beside the run dirs: the sweep's table


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.yaml")
    split = property(lambda self: self.path / "split")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    resume = property(lambda self: self.path / "resume.pt")
    summary = property(lambda self: self.path / "summary.json")
    failure = property(lambda self: self.path / "failure.json")
    eval_probs = property(lambda self: self.path / "eval_probs.npz")
    evaluation = property(lambda self: self.path / "evaluation.json")
    skipped = property(lambda self: self.path / "skipped.csv")
    validation = property(lambda self: self.path / "validation.json")
    report_dir = property(lambda self: self.path / "report")
    report_md = property(lambda self: self.path / "report" / "report.md")
    top_errors = property(lambda self: self.path / "report" / "top_errors.png")
    cooccurrence = property(lambda self: self.path / "report" / "cooccurrence.png")
    per_tag_dir = property(lambda self: self.path / "report" / "per_tag")  # <tag>.png, one per tag sheet
    folds = property(lambda self: self.path / "split" / "folds.csv")
    fold_result = property(lambda self: self.path / "fold.json")
    oof_probs = property(lambda self: self.path / "oof_probs.npz")
    members = property(lambda self: self.path / "members.json")

    def fold(self, k: int) -> RunDir:
        """Fold k's (1..K) run dir inside a k-fold run."""
        return RunDir(self.path / f"fold-{k}")

    def require_config(self, what: str) -> RunDir:
        """This run dir, or a ChiptagError saying `what` needs a run directory."""
        if not self.config.is_file():
            raise ChiptagError(f"{what} {self.path}: not a run directory (no config.yaml)")
        return self

    def write_failure(self, model: str, index: int, error: str) -> None:
        """The one writer of failure records: the runs table lists the run as failed, not unfinished."""
        write_json(self.failure, {"status": "failed", "model": model, "active_model_index": index,
                                  "error": error})


def checkpoint_file(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file (what predict and export accept)."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).checkpoint
    if not path.is_file():
        raise ChiptagError(f"no checkpoint at {path} (give a run directory or a checkpoint.pt file)")
    return path


def model_label(model: str, backbone: str | None) -> str:
    """A model entry's name as runs are named and listed: with the backbone actually trained appended when
    the name does not already say it (an entry `resnet50` run with --set model.backbone=efficientnet_b0
    reads `resnet50-efficientnet_b0`, not `resnet50`)."""
    if not backbone or backbone.lower() in model.lower():
        return model
    return f"{model}-{backbone}"


def safe_name(name: str) -> str:
    """`name` with every run of characters outside [A-Za-z0-9._-] made one '-': a timm backbone's
    `timm:tf_efficientnet_lite0` put a ':' in run dir names, which breaks scp/rsync paths (host:path), Windows
    and container volume mounts; '/' would nest directories."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return safe or "run"


def new_run_dir(runs_dir: Path, base: str | None, model: str) -> RunDir:
    """A fresh run dir under `runs_dir`: `base` (default <timestamp>-<model>), suffixed -2, -3... if taken;
    its name kept to safe characters (safe_name)."""
    base = safe_name(base or f"{datetime.now():%Y%m%d-%H%M%S}-{model}")
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = runs / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
            return RunDir(path)
        except FileExistsError:
            continue
    raise ChiptagError(f"cannot create a new run directory under {runs}: {base}-2 .. {base}-999 all exist")
