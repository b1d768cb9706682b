"""k-fold training of a frozen backbone's head (`training.folds: K`, `chiptag train --folds K`).

Test is held out once (the run's split/test.txt); train + val are cut into K iterative-stratified folds
(split/folds.csv). The backbone pass is shared: features are extracted (or read from the cache) once, then K
heads train on them, head k validated on fold k. Thresholds are tuned on the concatenated out-of-fold
predictions, i.e. on every non-test chip instead of 15% of them, and the ensemble (the mean probability of
the K heads, models.head.MeanProbability) is scored once on test. Each fold is a run dir of its own inside the
run (fold-k/: checkpoint, resume.pt, metrics.jsonl, fold.json when done), so an interrupted run resumes
inside the fold it stopped in and finished folds are not trained again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from chiptag import distributed
from chiptag.atomic import replacing, write_json
from chiptag.data.split import fold_indices, load_folds, save_folds
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics, report
from chiptag.evaluation.label_rules import LabelRules, tune_and_score
from chiptag.features.views import ViewAverage
from chiptag.models import checkpoint
from chiptag.models.checkpoint import ModelCard
from chiptag.models.head import MeanProbability, Tagger, count_parameters
from chiptag.progress import out
from chiptag.runs.layout import RunDir
from chiptag.tracking import LocalTracker, MultiTracker
from chiptag.training import phases as phases_mod, resume as resume_mod
from chiptag.training.epoch import Step, evaluate, pos_weight
from chiptag.training.loop import Trainer
from chiptag.training.resume import LoopState
from chiptag.training.summary import Outcome, build_summary


@dataclass
class FoldResult:
    k: int
    val_idx: np.ndarray
    val_probs: np.ndarray  # the fold's out-of-fold probabilities (raw, before label rules)
    head_state: dict
    record: dict  # fold.json: best epoch, val F2, sizes, seconds


def fold_splits(r, k_folds: int) -> list[np.ndarray]:
    """The run's folds: read back on --resume, else cut from train + val and saved."""
    if r.run.folds.is_file():
        return load_folds(r.ds.table.names, r.run.folds)
    pool = np.concatenate([r.splits["train"], r.splits["val"]])
    folds = fold_indices(r.ds.table.y, pool, k_folds, seed=r.cfg.data.split.seed)
    save_folds(r.ds.table.names, folds, r.run.folds)
    return folds


def _load_done(run: RunDir, k: int, val_idx: np.ndarray) -> FoldResult | None:
    if not run.fold_result.is_file():
        return None
    record = json.loads(run.fold_result.read_text(encoding="utf-8"))
    with np.load(run.oof_probs) as z:
        probs = z["probs"]
    head = checkpoint.load(run.checkpoint)["state_dict"]
    head = {key.removeprefix("head."): v for key, v in head.items() if key.startswith("head.")}
    out.print(f"fold {k}: done before (val F2 {record['val_f2_tuned']:.4f}), not trained again")
    return FoldResult(k, val_idx, probs, head, record)


def train_fold(ctx: FoldContext, k: int, val_idx: np.ndarray) -> FoldResult:
    """Head k on the cached features, validated on fold k; resumes from fold-k/resume.pt when present."""
    r, cfg, y = ctx.r, ctx.r.cfg, ctx.r.ds.table.y
    run = r.run.fold(k)
    done = _load_done(run, k, val_idx)
    if done is not None:
        return done
    run.path.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    train_idx = np.setdiff1d(np.concatenate(ctx.folds), val_idx)
    splits = {"train": train_idx, "val": val_idx, "test": r.splits["test"]}
    inputs = phases_mod.feature_inputs(cfg, ctx.feats, y, splits, ctx.device)
    pw = pos_weight(y[train_idx], cfg.training.pos_weight_max) if cfg.model.pos_weight else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if pw is None else pw.to(ctx.device))
    torch.manual_seed(cfg.training.seed + k)  # each head its own start; the same on every rerun
    tagger = Tagger(ctx.model.backbone.net, ctx.model.head.build(), frozen=True).to(ctx.device)
    tracker = _FoldTracker(ctx.tracker, run, k)
    trainer = _FoldTrainer(cfg, run, tagger, ctx.card, Step(loss_fn, ctx.device), tracker)
    saved = resume_mod.load(run.resume)
    if saved:
        out.print(f"fold {k}: resuming after epoch {saved['state']['epoch']}, step {saved['state']['step']}")
    else:
        out.print(f"fold {k}/{len(ctx.folds)}: {len(train_idx)} train / {len(val_idx)} validation images")
    fitted = trainer.fit(phases_mod.plan(cfg, inputs, None), saved)
    resume_mod.load_trained_state(tagger, fitted.state.best_state)
    ev = evaluate(fitted.model, inputs.val, loss_fn, ctx.device)
    _, m = tune_and_score((ev["targets"], ev["probs"]), {"val": (ev["targets"], ev["probs"])},
                          r.ds.table.tags, ctx.rules)
    record = {"fold": k, "best_epoch": fitted.state.best_epoch, "n_train": int(len(train_idx)),
              "n_val": int(len(val_idx)), "val_f2_at_0.5": m["val"]["f2_at_0.5"], "val_f2_tuned": m["val"]["f2"],
              "val_loss": ev["loss"], "seconds": time.perf_counter() - t0, "history": fitted.state.history}
    Trainer.save_checkpoint(trainer, None, fitted.state.best_epoch)  # best weights, this fold alone
    with replacing(run.oof_probs) as tmp:
        np.savez_compressed(tmp, probs=ev["probs"], index=val_idx)
    write_json(run.fold_result, record)  # last: its presence marks the fold as done
    run.resume.unlink(missing_ok=True)
    return FoldResult(k, val_idx, ev["probs"], tagger.head.state_dict(), record)


class _FoldTrainer(Trainer):
    """A fold writes its checkpoint (backbone included) once, when it is done, not at every new best epoch: the
    best head is in fold-k/resume.pt after every epoch anyway, and K x (best epochs) full checkpoints cost
    ~0.16 s each (ResNet18) for nothing."""

    def save_checkpoint(self, thresholds, epoch: int) -> None:
        pass


class _FoldTracker:
    """Fold k's epochs go to fold-k/metrics.jsonl and, as `fold<k>/...` scalars, to the run's trackers."""

    def __init__(self, parent, run: RunDir, k: int):
        self.parent, self.local, self.k = parent, LocalTracker(run.path), k

    def log_scalars(self, epoch: int, scalars: dict) -> None:
        self.local.log_scalars(epoch, scalars)
        self.parent.log_scalars(epoch, {f"fold{self.k}/{key}": v for key, v in scalars.items()})


@dataclass
class FoldContext:
    r: object  # training.run.OpenRun
    model: object  # training.run.Model: the shared backbone and the head spec
    feats: torch.Tensor
    folds: list[np.ndarray]
    device: torch.device
    card: ModelCard
    tracker: MultiTracker
    rules: LabelRules
    info: object  # features.extraction.FeatureInfo


def ensemble_scores(ctx: FoldContext, results: list[FoldResult]) -> tuple[Tagger, dict, np.ndarray]:
    """The K heads as one model; thresholds tuned on the out-of-fold predictions; test scored once."""
    r, table = ctx.r, ctx.r.ds.table
    heads = []
    for res in results:
        head = ctx.model.head.build()
        head.load_state_dict(res.head_state)
        heads.append(head)
    ensemble = Tagger(ctx.model.backbone.net, MeanProbability(heads), frozen=True).to(ctx.device).eval()
    inputs = phases_mod.feature_inputs(r.cfg, ctx.feats, table.y, r.splits, ctx.device)
    test = evaluate(ViewAverage(ensemble.head), inputs.test, nn.BCEWithLogitsLoss(), ctx.device)
    oof_idx = np.concatenate([res.val_idx for res in results])
    oof = np.concatenate([res.val_probs for res in results])
    thresholds, m = tune_and_score((table.y[oof_idx], oof), {"oof": (table.y[oof_idx], oof),
                                                            "test": (test["targets"], test["probs"])},
                                   table.tags, ctx.rules)
    m["test"]["loss"] = test["loss"]
    m["val"] = m.pop("oof")  # the validation of a k-fold run is its out-of-fold predictions
    with replacing(r.run.oof_probs) as tmp:
        np.savez_compressed(tmp, probs=oof, targets=table.y[oof_idx],
                            names=np.asarray([table.names[i] for i in oof_idx]), tags=np.asarray(table.tags))
    splits = {"val": oof_idx, "test": r.splits["test"]}
    report.save_eval_probs(r.run.eval_probs, {"val": {"probs": oof, "targets": table.y[oof_idx]},
                                              "test": test}, table.names, splits, table.tags)
    return ensemble, m, thresholds


def fold_summary(ctx: FoldContext, results: list[FoldResult], m: dict, thresholds, timings: dict) -> dict:
    r, cfg = ctx.r, ctx.r.cfg
    per_fold = [res.record for res in results]
    state = LoopState(best_epoch=None, history=[{**h, "fold": res.k} for res in results
                                                for h in res.record["history"]])
    scores = {"metrics": m, "baseline": metrics.baseline_summary(r.ds.table.y, r.splits, r.ds.table.tags),
              "thresholds": thresholds}
    params = count_parameters(Tagger(ctx.model.backbone.net, ctx.model.head.build(), frozen=True))
    # Each head's pos_weight comes from its own training folds; the summary shows the whole pool's (within a
    # few percent of every fold's), so the runs table says whether it was on.
    pool = np.concatenate(ctx.folds)
    pw = pos_weight(r.ds.table.y[pool], cfg.training.pos_weight_max) if cfg.model.pos_weight else None
    summary = build_summary(cfg, r.run, r.ds, r.splits, ctx.model,
                            Outcome(state, scores, timings, ctx.info, pw, params))
    val_f2 = [f["val_f2_tuned"] for f in per_fold]
    summary["folds"] = {"k": len(results), "per_fold": [{k: v for k, v in f.items() if k != "history"}
                                                        for f in per_fold],
                        "val_f2_mean": float(np.mean(val_f2)), "val_f2_sd": float(np.std(val_f2)),
                        "oof_f2": m["val"]["f2"], "ensemble_test_f2": m["test"]["f2"]}
    summary["n_images"]["oof"] = int(sum(f["n_val"] for f in per_fold))
    summary["label_rules"] = ctx.rules.to_dict(r.ds.table.tags)
    return summary


def check_folds(cfg) -> None:
    if not cfg.model.freeze:
        raise ChiptagError("training.folds needs freeze: true (k-fold fine-tuning is not supported)")
    if distributed.active():
        raise ChiptagError("training.folds under torchrun is not supported: run k-fold in one process")


def train_folds(ctx: FoldContext, validation: dict, t_start: float, t_extract: float) -> dict:
    """The rest of a k-fold run once its features are there: K heads, OOF thresholds, the ensemble on test,
    checkpoint.pt (backbone + K heads), summary.json (per-fold, OOF and ensemble figures) and the report."""
    r = ctx.r
    out.print(f"{len(ctx.folds)} folds of {sum(map(len, ctx.folds))} non-test images (train + val, iterative "
              f"stratification; split/folds.csv); test {len(r.splits['test'])} images, scored once by the ensemble")
    t_train = time.perf_counter()
    results = [train_fold(ctx, k, val_idx) for k, val_idx in enumerate(ctx.folds, start=1)]
    t_train = time.perf_counter() - t_train
    ensemble, m, thresholds = ensemble_scores(ctx, results)
    checkpoint.save(r.run.checkpoint, ensemble, ctx.card, thresholds.tolist(), 0)
    timings = {"extract_s": t_extract, "train_s": t_train, "total_s": time.perf_counter() - t_start}
    summary = fold_summary(ctx, results, m, thresholds, timings)
    summary["validation"] = validation
    write_json(r.run.summary, summary)
    report.report_after_training(r.run.path, ctx.tracker)
    summary["tracker"] = ctx.tracker.finish(summary)
    write_json(r.run.summary, summary)
    return summary


def print_folds(s: dict) -> None:
    f = s["folds"]
    per = "  ".join(f"{x['val_f2_tuned']:.4f}" for x in f["per_fold"])
    out.print(f"  {f['k']} folds: val F2 per fold {per} (mean {f['val_f2_mean']:.4f} ± {f['val_f2_sd']:.4f}); "
              f"out-of-fold F2 {f['oof_f2']:.4f}; ensemble test F2 {f['ensemble_test_f2']:.4f}")
