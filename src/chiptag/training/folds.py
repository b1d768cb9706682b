"""Folds: the splits a run trains on. A run with one train/val split is one fold (the run dir itself); a k-fold
run (`training.folds: K`, `chiptag train --folds K`) is K of them, each a run dir of its own inside the run.

k-fold: test is held out once (the run's split/test.txt); train + val are cut into K iterative-stratified folds
(split/folds.csv). Features are extracted (or read from the cache) once, then head k trains on the other folds
and is validated on fold k. Thresholds are tuned on the concatenated out-of-fold predictions, i.e. on every
non-test chip instead of 15% of them, and the K heads' mean probability (models.head.MeanProbability) is scored
once on test. The K heads train together, as one batched model (training.heads); fold k writes fold-k/
(checkpoint.pt, metrics.jsonl, fold.json when done; resume.pt while it trains, together or alone in the epoch
loop), so an interrupted run resumes where it stopped and finished folds are not trained again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np
import torch
from torch import nn

from chiptag.atomic import replacing, write_json
from chiptag.data.split import fold_indices, load_folds, save_folds
from chiptag.models import checkpoint
from chiptag.models.checkpoint import ModelCard
from chiptag.models.head import Tagger
from chiptag.progress import out
from chiptag.runs.layout import RunDir
from chiptag.tracking import LocalTracker
from chiptag.training.epoch import pos_weight


class EpochLog(Protocol):
    """Where a fold's epoch rows go: the run's trackers (tracking.MultiTracker) or a FoldTracker."""

    def log_scalars(self, epoch: int, scalars: dict[str, float]) -> None: ...


@dataclass
class Fold:
    """One split to train on and where its training state goes."""

    k: int  # 0: the run's own train/val split; 1..K: fold k of a k-fold run
    train: np.ndarray  # row indices
    val: np.ndarray
    run: RunDir  # resume.pt, checkpoint.pt, metrics.jsonl: the run dir itself, or fold-k/ inside it
    tracker: EpochLog  # the run's trackers, or fold k's (FoldTracker)
    loss_fn: nn.Module  # BCE with this fold's own pos_weight (from its train rows), on the device
    device: torch.device
    # A single split's checkpoint follows its best epoch, so a failed run keeps its last good model; a fold's
    # is written once, when the fold is done (K x best epochs of full checkpoints would cost time for nothing:
    # the best head is in fold-k/resume.pt after every epoch anyway).
    checkpoint_each_best: bool

    @property
    def of_k(self) -> bool:
        return self.k > 0


@dataclass
class FoldResult:
    """A trained fold: its best weights and its validation (out-of-fold) predictions."""

    k: int
    val_idx: np.ndarray
    val_probs: np.ndarray  # raw probabilities, before label rules
    val_targets: np.ndarray
    trained: dict  # the best state: {"head": ...} or {"tagger": ...} (training.resume.trained_state)
    record: dict  # best epoch, val F2, sizes, seconds, history (fold.json for fold k)
    model: nn.Module | None = None  # as the last phase ran it, best weights loaded; None: loaded from disk
    # the last phase's test batches (every fold's test split is the run's); None: loaded from disk
    test_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None


def make_loss(y_train: np.ndarray, use_pos_weight: bool, max_weight: float, device: torch.device) -> nn.Module:
    """BCEWithLogitsLoss, with per-class pos_weight of these train rows when asked (model.pos_weight)."""
    pw = pos_weight(y_train, max_weight) if use_pos_weight else None
    return nn.BCEWithLogitsLoss(pos_weight=None if pw is None else pw.to(device))


def cut_folds(run: RunDir, names: list[str], y: np.ndarray, pool: np.ndarray, k: int,
              seed: int) -> list[np.ndarray]:
    """The run's K validation folds of `pool` (train + val rows): read back on --resume, else cut and saved."""
    if run.folds.is_file():
        return load_folds(names, run.folds)
    folds = fold_indices(y, pool, k, seed=seed)
    save_folds(names, folds, run.folds)
    return folds


class FoldTracker:
    """Fold k's epochs go to fold-k/metrics.jsonl and, as `fold<k>/...` scalars, to the run's trackers."""

    def __init__(self, parent, run: RunDir, k: int):
        self.parent, self.local, self.k = parent, LocalTracker(run.path), k

    def log_scalars(self, epoch: int, scalars: dict) -> None:
        self.local.log_scalars(epoch, scalars)
        self.parent.log_scalars(epoch, {f"fold{self.k}/{key}": v for key, v in scalars.items()})


def load_done(fold: Fold, y: np.ndarray) -> FoldResult | None:
    """Fold k finished before an interruption (its fold.json is there): its result, without training again."""
    run = fold.run
    if not fold.of_k or not run.fold_result.is_file():
        return None
    record = json.loads(run.fold_result.read_text(encoding="utf-8"))
    with np.load(run.oof_probs) as z:
        probs = z["probs"]
    ckpt = checkpoint.load(run.checkpoint, with_backbone=False)  # the run's backbone: not written yet
    if ckpt.backbone_file is None:  # a fine-tuned fold: its whole model
        trained = {"tagger": ckpt.state_dict}
    else:
        trained = {"head": {key.removeprefix("head."): v for key, v in ckpt.state_dict.items()
                            if key.startswith("head.")}}
    out.print(f"fold {fold.k}: done before (val F2 {record['val_f2_tuned']:.4f}), not trained again")
    return FoldResult(fold.k, fold.val, probs, y[fold.val], trained, record)


def save_done(fold: Fold, tagger: Tagger, card: ModelCard, result: FoldResult) -> None:
    """Fold k's files: its best model, its out-of-fold probabilities, and fold.json last (its presence marks the
    fold as done); the resume state is no longer needed. A frozen fold's checkpoint keeps the head alone and
    refers to the run's checkpoint for the backbone every fold shares (one copy per run dir, not K + 1); a
    fine-tuned fold's holds its own backbone."""
    shared = os.path.relpath(fold.run.path.parent / fold.run.checkpoint.name, fold.run.path)
    checkpoint.save(fold.run.checkpoint, tagger, card, None, result.record["best_epoch"],
                    backbone_file=shared if tagger.frozen else None)
    with replacing(fold.run.oof_probs) as tmp:
        np.savez_compressed(tmp, probs=result.val_probs, index=fold.val)
    write_json(fold.run.fold_result, result.record)
    fold.run.resume.unlink(missing_ok=True)


def folds_section(results: list[FoldResult], m: dict) -> dict:
    """summary.json["folds"] of a k-fold run: per-fold, mean ± sd, out-of-fold and ensemble figures."""
    per_fold = [{k: v for k, v in res.record.items() if k != "history"} for res in results]
    val_f2 = [f["val_f2_tuned"] for f in per_fold]
    return {"k": len(results), "per_fold": per_fold, "val_f2_mean": float(np.mean(val_f2)),
            "val_f2_sd": float(np.std(val_f2)), "oof_f2": m["val"]["f2"], "ensemble_test_f2": m["test"]["f2"]}


def print_folds(s: dict) -> None:
    f = s["folds"]
    per = "  ".join(f"{x['val_f2_tuned']:.4f}" for x in f["per_fold"])
    out.print(f"  {f['k']} folds: val F2 per fold {per} (mean {f['val_f2_mean']:.4f} ± {f['val_f2_sd']:.4f}); "
              f"out-of-fold F2 {f['oof_f2']:.4f}; ensemble test F2 {f['ensemble_test_f2']:.4f}")
