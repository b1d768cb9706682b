"""`chiptag train`: data -> model -> features -> phases -> epoch loop -> final metrics -> checkpoint -> summary.

Protocol: the validation split drives the LR schedule, the checkpoint choice and threshold tuning; the test
split is evaluated once, at the end, and is the headline.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from chiptag import config as config_mod, distributed
from chiptag.atomic import write_json, write_text
from chiptag.config import Config
from chiptag.data.dataset import Dataset
from chiptag.data.problems import Report
from chiptag.data.split import load_split, make_split, save_split
from chiptag.data.validate import preflight
from chiptag.data.decoders import resolve_decoder
from chiptag.device import resolve_device
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics, report
from chiptag.evaluation.label_rules import LabelRules, tune_and_score, unknown_tags
from chiptag.features.extraction import FeatureInfo, default_workers, degenerate, feature_warning
from chiptag.features.views import make_extractor, view_features
from chiptag.interrupt import Interrupted, graceful_stop
from chiptag.models.backbones import Backbone, build_backbone
from chiptag.models.checkpoint import ModelCard
from chiptag.models.head import HeadSpec, Tagger, count_parameters
from chiptag.progress import console, out
from chiptag.runs.layout import RunDir, model_label, new_run_dir
from chiptag.tracking import MultiTracker, make_tracker
from chiptag.training import folds as folds_mod, phases as phases_mod, resume as resume_mod
from chiptag.training.epoch import NonFiniteLoss, Step, evaluate, pos_weight
from chiptag.training.loop import Fitted, Trainer
from chiptag.training.summary import Outcome, build_summary, print_result


@dataclass
class OpenRun:
    """A run about to train: its config, validated data, split, run dir and (when resuming) saved state."""

    cfg: Config
    ds: Dataset
    validation: Report
    splits: dict
    run: RunDir
    saved: dict | None = None


@dataclass
class Model:
    backbone: Backbone
    head: HeadSpec
    tagger: Tagger


def build_model(cfg: Config, n_tags: int) -> Model:
    """The active entry's backbone (weights loaded, classifier replaced) with a new head on top."""
    entry = cfg.model
    if entry.freeze and entry.weights is None:
        console.print("[yellow]warning:[/] freeze: true with weights: null trains a head on a random backbone "
                      "— fine for smoke tests and the demo, not for real results.")
    torch.manual_seed(cfg.training.seed)  # random-init backbones and the head start from the seed
    bb = build_backbone(entry.backbone, entry.weights, entry.image_size, progress=cfg.training.progress)
    bb.preprocessing = replace(bb.preprocessing, resize=cfg.data.resize)  # travels in the checkpoint
    spec = HeadSpec(bb.dim, n_tags, entry.hidden_dim, entry.dropout)
    return Model(bb, spec, Tagger(bb.net, spec.build(), frozen=entry.freeze))


def open_run(cfg: Config | None, resume: Path | None) -> OpenRun:
    """A new run dir (validated data, fresh split), or the interrupted run `resume` (its config and split).
    Under torchrun only rank 0 writes the run dir; the other ranks work in a scratch dir."""
    if resume is None:
        ds, vreport = preflight(cfg.data)
        splits = make_split(cfg.data, ds)
        if distributed.is_main():
            label = model_label(cfg.model.name, cfg.model.backbone)  # the backbone actually trained
            run = new_run_dir(cfg.output.runs_dir, cfg.output.run_name, label)
        else:
            run = RunDir(distributed.scratch_dir())
        write_text(run.config, config_mod.dump(cfg))  # --resume reads it back
        save_split(ds.table.names, splits, run.split)
        return OpenRun(cfg, ds, vreport, splits, run)
    run = RunDir(resume).require_config("--resume")
    if run.summary.is_file() and not run.resume.is_file():
        raise ChiptagError(f"--resume {run.path}: the run is already complete (summary.json is written)")
    cfg = config_mod.load(run.config)
    ds, vreport = preflight(cfg.data)
    splits = load_split(ds.table.names, run.split)
    saved = resume_mod.load(run.resume)
    where = (f"after epoch {saved['state']['epoch']}, step {saved['state']['step']}" if saved
             else "in the fold it stopped in" if cfg.training.folds else "at epoch 1")
    out.print(f"resuming run [bold]{run.name}[/] {where}")
    return OpenRun(cfg, ds, vreport, splits, run, saved)


def _record_validation(r: OpenRun) -> dict:
    skipped = r.validation.skipped_rows(len(r.ds.table))
    if r.validation.problems or r.validation.converted:
        console.print(f"data validation: {r.validation.format()}")
    if skipped:
        console.print(f"[yellow]skipped {skipped} row(s)[/] (data.on_bad_image=skip); listed in {r.run.skipped}")
    r.validation.write(r.run.skipped, r.run.validation, skipped)
    return r.validation.to_dict(skipped)


def _last_good(run: RunDir) -> str:
    if not run.checkpoint.is_file():
        return "No epoch finished, so there is no checkpoint."
    epoch = torch.load(run.checkpoint, map_location="cpu", weights_only=True).get("epoch")
    return f"The last good checkpoint is kept: {run.checkpoint} (best epoch {epoch})."


def _failed(r: OpenRun, message: str) -> None:
    """A run that stopped on an error says so (chiptag runs lists it as failed, not unfinished)."""
    if distributed.is_main():
        r.run.write_failure(r.cfg.model.name, r.cfg.active_model_index, message)


def run_train(cfg: Config | None = None, *, resume: Path | None = None) -> dict:
    """Train cfg's active model in a new run dir, or continue the interrupted run dir `resume`.

    SIGINT/SIGTERM stop after the current step with resumable state saved (Interrupted, exit 130/143)."""
    dist_device = distributed.setup()  # under torchrun: join the group; rank 0 alone writes and tracks
    out.quiet = not distributed.is_main()
    try:
        with graceful_stop():
            r = open_run(cfg, resume)
            try:
                summary = train(r, dist_device)
            except Interrupted as exc:
                raise exc.with_hint(f"continue with: chiptag train --resume {r.run.path}") from None
            except NonFiniteLoss as exc:
                _failed(r, f"{exc} {_last_good(r.run)}")
                raise NonFiniteLoss(f"{exc} {_last_good(r.run)}") from None
            except ChiptagError as exc:
                _failed(r, str(exc))
                raise
        r.run.resume.unlink(missing_ok=True)  # complete: nothing left to resume
        print_result(summary)
        if "folds" in summary:
            folds_mod.print_folds(summary)
        if not distributed.is_main():
            shutil.rmtree(r.run.path, ignore_errors=True)
        return summary
    finally:
        distributed.shutdown()


def extract_features(r: OpenRun, model: Model, device: torch.device) -> tuple[torch.Tensor, FeatureInfo]:
    """The frozen backbone over every image (and D4 view), once: from the feature cache when it is there."""
    cfg, bb = r.cfg, model.backbone
    ex = make_extractor(bb.net, bb.name, bb.preprocessing, cfg.features, device,
                        num_workers=default_workers(cfg.training.num_workers, device),
                        show_progress=cfg.training.progress, label=f"features {bb.name}")
    feats, info = view_features(ex, r.ds.paths, cfg.features.cache_dir, cfg.features.views)
    info.engine, info.tta = cfg.features.engine, feats.shape[0] > 1 and cfg.features.tta
    warning = feature_warning(feats, bb.name, cfg.model.weights)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    info.degenerate = degenerate(feats)
    return feats, info


def final_scores(fitted: Fitted, loss_fn: nn.Module, device: torch.device, r: OpenRun) -> dict:
    """Validation and test evaluated once with the best weights; thresholds tuned on validation."""
    table = r.ds.table
    ev = {s: evaluate(fitted.model, getattr(fitted.inputs, s), loss_fn, device) for s in ("val", "test")}
    report.save_eval_probs(r.run.eval_probs, ev, table.names, r.splits, table.tags)
    rules = LabelRules.from_config(r.cfg.labels.model_dump(), table.tags)  # tuned and scored under the rules
    thresholds, results = tune_and_score((ev["val"]["targets"], ev["val"]["probs"]),
                                         {s: (e["targets"], e["probs"]) for s, e in ev.items()}, table.tags, rules)
    for s, e in ev.items():
        results[s]["loss"] = e["loss"]
    return {"metrics": results, "baseline": metrics.baseline_summary(table.y, r.splits, table.tags),
            "thresholds": thresholds}


def _fold_context(r: OpenRun, model: Model, feats, info, device, tracker) -> folds_mod.FoldContext:
    folds_mod.check_folds(r.cfg)
    card = ModelCard(model.backbone.name, model.backbone.weights_id, model.head, r.ds.table.tags,
                     model.backbone.preprocessing, r.cfg.to_dict())
    return folds_mod.FoldContext(r, model, feats, folds_mod.fold_splits(r, r.cfg.training.folds), device, card,
                                 tracker, LabelRules.from_config(r.cfg.labels.model_dump(), r.ds.table.tags), info)


def train(r: OpenRun, dist_device: torch.device | None = None) -> dict:
    """The training flow of one opened run, top to bottom; -> summary (also written to the run dir)."""
    t_start = time.perf_counter()
    cfg, ds, splits, entry = r.cfg, r.ds, r.splits, r.cfg.model
    validation = _record_validation(r)
    missing = unknown_tags(cfg.labels.model_dump(), ds.table.tags)  # a typo, or a tag absent from this data
    if missing:
        console.print(f"[yellow]warning:[/] label rules name tags this data does not have, left out: "
                      f"{'; '.join(missing)}")
    tracker = make_tracker(cfg, r.run.path) if distributed.is_main() else MultiTracker([])
    tracker.start(r.run.name, entry.name, cfg.to_dict())  # before heavy work: a bad tracker fails fast
    device = dist_device or resolve_device(cfg.training.device, "training.device")
    out.print(f"run [bold]{r.run.name}[/]: {entry.name} ({entry.backbone}, weights={entry.weights}, "
              f"freeze={entry.freeze}) on {device}; {len(splits['train'])}/{len(splits['val'])}/"
              f"{len(splits['test'])} train/val/test images, {len(ds.table.tags)} tags")

    model = build_model(cfg, len(ds.table.tags))
    model.tagger.to(device)
    n_params = count_parameters(model.tagger)
    out.print(f"parameters: {n_params['trainable']:,} trainable, {n_params['frozen']:,} frozen; "
              f"head {model.head.describe()}")

    t_extract = time.perf_counter()
    features, images, info = None, None, FeatureInfo("not used (freeze: false)")
    if phases_mod.uses_features(cfg):
        feats, info = extract_features(r, model, device)
        if cfg.training.folds:  # K heads on these features: training.folds
            return folds_mod.train_folds(_fold_context(r, model, feats, info, device, tracker), validation,
                                         t_start, time.perf_counter() - t_extract)
        features = phases_mod.feature_inputs(cfg, feats, ds.table.y, splits, device)
    if not entry.freeze:
        images = phases_mod.image_inputs(cfg, ds, splits, model.backbone.preprocessing,
                                         default_workers(cfg.training.num_workers),
                                         resolve_decoder(cfg.features.decoder, device), device)
    t_extract = time.perf_counter() - t_extract
    phases = phases_mod.plan(cfg, features, images)

    pw = pos_weight(ds.table.y[splits["train"]], cfg.training.pos_weight_max) if entry.pos_weight else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if pw is None else pw.to(device))
    card = ModelCard(model.backbone.name, model.backbone.weights_id, model.head, ds.table.tags,
                     model.backbone.preprocessing, cfg.to_dict())
    trainer = Trainer(cfg, r.run, model.tagger, card, Step(loss_fn, device), tracker)
    torch.manual_seed(cfg.training.seed)  # dropout and shuffling do not depend on whether the cache was hit
    t_train = time.perf_counter()
    fitted = trainer.fit(phases, r.saved)
    t_train = time.perf_counter() - t_train

    resume_mod.load_trained_state(model.tagger, fitted.state.best_state)
    scores = final_scores(fitted, loss_fn, device, r)
    trainer.save_checkpoint(scores["thresholds"].tolist(), fitted.state.best_epoch)
    timings = {"extract_s": t_extract, "train_s": t_train, "total_s": time.perf_counter() - t_start}
    summary = build_summary(cfg, r.run, ds, splits, model,
                            Outcome(fitted.state, scores, timings, info, pw, n_params))
    summary["validation"] = validation  # what was checked, converted and skipped (every item)
    write_json(r.run.summary, summary)  # complete before the tracker uploads it
    report.report_after_training(r.run.path, tracker)
    summary["tracker"] = tracker.finish(summary)
    write_json(r.run.summary, summary)  # with the tracker's link
    return summary
