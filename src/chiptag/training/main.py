"""`chiptag train`, top to bottom: config -> settings (once) -> data and split -> model -> features (prepare) ->
for each fold: for each epoch (train_folds: training.loop, or training.heads for heads trained together) -> one
finish: thresholds -> checkpoint -> summary -> report -> tracker. A sweep's batch (training.sweep) runs the same
three steps per entry, with its entries' heads trained together in between.

A run trains one fold (its train/val split) or K folds of train + val (`training.folds`): the same flow, one
finish. Protocol: the validation rows (out-of-fold rows for k-fold) drive the LR schedule, the checkpoint epoch
and threshold tuning; the test split is evaluated once, at the end, and is the headline.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chiptag import config as config_mod, distributed
from chiptag.atomic import replacing, write_json, write_text
from chiptag.config import Config, DataConfig
from chiptag.data.dataset import Dataset
from chiptag.data.decoders import choose_decoder
from chiptag.data.inputs import ImageInput
from chiptag.data.problems import Report
from chiptag.data.rasters import training_preprocessing
from chiptag.data.split import load_split, make_split, save_split, untrained_tags, untrained_warning
from chiptag.data.validate import preflight
from chiptag.device import resolve_device
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics, report
from chiptag.evaluation.label_rules import choose_and_score, unknown_tags
from chiptag.features.extraction import FeatureInfo, default_workers, degenerate, feature_warning
from chiptag.features.views import ViewAverage, make_extractor, view_features
from chiptag.interrupt import Interrupted, graceful_stop
from chiptag.models import checkpoint
from chiptag.models.backbones import Backbone, adapt_stem, build_backbone
from chiptag.models.checkpoint import ModelCard
from chiptag.models.head import HeadSpec, MeanProbability, Tagger, count_parameters
from chiptag.progress import console, out
from chiptag.runs.layout import RunDir, model_label, new_run_dir
from chiptag.tracking import MultiTracker, make_tracker
from chiptag.training import folds as folds_mod, heads as heads_mod, phases as phases_mod, resume as resume_mod
from chiptag.training.checks import check_can_run
from chiptag.training.epoch import NonFiniteLoss, evaluate, pos_weight
from chiptag.training.folds import Fold, FoldResult
from chiptag.training.loop import fit
from chiptag.training.settings import NetworkSpec, Settings
from chiptag.training.summary import Outcome, build_summary, print_result


@dataclass
class OpenRun:
    """A run about to train: its settings, validated data, split and run dir."""

    s: Settings
    ds: Dataset
    validation: Report
    splits: dict
    run: RunDir


@dataclass
class Network:
    """The backbone (weights loaded, classifier replaced), the head spec, and the Tagger built from them."""

    backbone: Backbone
    head: HeadSpec
    tagger: Tagger


@dataclass
class Prepared:
    """An opened run ready to train: its device and tracker, network and card, the one input object, the cached
    features, and its folds (what train_folds trains and finish finishes)."""

    r: OpenRun
    device: torch.device
    tracker: MultiTracker
    net: Network
    card: ModelCard
    images: ImageInput
    feats: torch.Tensor | None
    info: FeatureInfo
    folds: list[Fold]
    untrained: list[str]  # tags no training row carries (no tuned threshold, no per-class score)
    n_params: dict  # trainable / frozen as built (summary.json)
    validation: dict  # what was checked, converted and skipped (summary.json)
    timings: dict  # seconds so far: extract_s; t_start (perf_counter) for total_s


def run_train(cfg: Config | None = None, *, resume: Path | None = None) -> dict:
    """Train cfg's active model in a new run dir, or continue the interrupted run dir `resume`.

    SIGINT/SIGTERM stop after the current step with resumable state saved (Interrupted, exit 130/143)."""
    dist_device = distributed.setup()  # under torchrun: join the group; rank 0 alone writes and tracks
    out.quiet = not distributed.is_main()
    try:
        with graceful_stop():
            r = open_run(cfg, resume)
            with recorded(r):
                summary = train(r, dist_device or resolve_device(r.s.device, "training.device"))
        done(r, summary)
        if not distributed.is_main():
            shutil.rmtree(r.run.path, ignore_errors=True)
        return summary
    finally:
        distributed.shutdown()


@contextlib.contextmanager
def recorded(r: OpenRun):
    """How a run's errors leave it: a stop gets the resume hint; a non-finite loss and any other ChiptagError
    are written to the run dir's failure record (chiptag runs lists it as failed, not unfinished)."""
    try:
        yield
    except Interrupted as exc:
        raise exc.with_hint(f"continue with: chiptag train --resume {r.run.path}") from None
    except NonFiniteLoss as exc:
        _failed(r, f"{exc} {_last_good(r.run)}")
        raise NonFiniteLoss(f"{exc} {_last_good(r.run)}") from None
    except ChiptagError as exc:
        _failed(r, str(exc))
        raise


def done(r: OpenRun, summary: dict) -> None:
    """A completed run: nothing left to resume; its result printed."""
    r.run.resume.unlink(missing_ok=True)
    print_result(summary)
    if "folds" in summary:
        folds_mod.print_folds(summary)


def open_run(cfg: Config | None, resume: Path | None) -> OpenRun:
    """A new run dir (validated data, fresh split), or the interrupted run `resume` (its config and split).
    The config is read here, once, into Settings. Under torchrun only rank 0 writes the run dir; the other
    ranks work in a scratch dir."""
    if resume is not None:
        run = RunDir(resume).require_config("--resume")
        if run.summary.is_file() and not run.resume.is_file():
            raise ChiptagError(f"--resume {run.path}: the run is already complete (summary.json is written)")
        s = Settings.from_config(config_mod.load(run.config))
        check_can_run(s)  # the device may be gone on this machine
        ds, validation = preflight(s.data)
        out.print(f"resuming run [bold]{run.name}[/]")
        return OpenRun(s, ds, validation, load_split(ds.table.names, run.split), run)
    s = Settings.from_config(cfg)
    check_can_run(s)  # backbone, weights, device: before validation runs or a run dir is made
    ds, validation = preflight(s.data)
    splits = make_split(s.data, ds)
    if distributed.is_main():
        label = model_label(s.network.name, s.network.backbone)  # the backbone actually trained
        run = new_run_dir(s.output.runs_dir, s.output.run_name, label)
    else:
        run = RunDir(distributed.scratch_dir())
    write_text(run.config, config_mod.dump(cfg))  # --resume reads it back
    save_split(ds.table.names, splits, run.split)
    return OpenRun(s, ds, validation, splits, run)


def train(r: OpenRun, device: torch.device) -> dict:
    """The training flow of one opened run, top to bottom; -> summary (also written to the run dir)."""
    p = prepare(r, device)
    t_train = time.perf_counter()
    results = train_folds(p)
    return finish(p, results, time.perf_counter() - t_train)


def prepare(r: OpenRun, device: torch.device) -> Prepared:
    """Everything before the epochs: validation record, tracker, network, decoder, features, folds."""
    t_start = time.perf_counter()
    s, ds, splits, tags = r.s, r.ds, r.splits, r.ds.table.tags
    validation = _record_validation(r)
    missing = unknown_tags(s.labels, tags)  # a typo, or a tag absent from this data
    if missing:
        console.print(f"[yellow]warning:[/] label rules name tags this data does not have, left out: "
                      f"{'; '.join(missing)}")
    tracker = make_tracker(s.tracking, r.run.path) if distributed.is_main() else MultiTracker([])
    tracker.start(r.run.name, s.network.name, s.config)  # before heavy work: a bad tracker fails fast
    out.print(f"run [bold]{r.run.name}[/]: {s.network.name} ({s.network.backbone}, weights={s.network.weights}, "
              f"freeze={s.network.freeze}) on {device}; {len(splits['train'])}/{len(splits['val'])}/"
              f"{len(splits['test'])} train/val/test images, {len(tags)} tags")

    net = build_network(s.network, len(tags), s.seed, s.progress)
    if s.data.raster:  # multiband chips: training-split band statistics, the stem adapted to the bands
        adapt_to_bands(net, s.data, [ds.paths[i] for i in splits["train"]], s.seed)
    net.tagger.to(device)
    n_params = count_parameters(net.tagger)
    out.print(f"parameters: {n_params['trainable']:,} trainable, {n_params['frozen']:,} frozen; "
              f"head {net.head.describe()}")
    card = ModelCard(net.backbone.name, net.backbone.weights_id, net.head, tags, net.backbone.preprocessing,
                     s.config)

    # every image read in this run (feature extraction, fine-tuning) goes through this one input object: the
    # decoder (cpu, or nvjpeg on CUDA when most chips are nvJPEG-decodable) is chosen here, once
    decoder, why = choose_decoder(s.features.decoder, device, r.validation.nvjpeg_share)
    out.print(f"decoder: {decoder} ({why})")
    images = ImageInput(net.backbone.preprocessing, device, decoder)
    t_extract = time.perf_counter()
    feats, info = None, FeatureInfo("not used (freeze: false)")
    if s.uses_features:
        feats, info = extract_features(r, net.backbone, images)
    t_extract = time.perf_counter() - t_extract

    folds = plan_folds(r, tracker, device)
    untrained = untrained_tags(ds.table.y, np.concatenate([fold.train for fold in folds]), tags)
    if untrained:  # a tuned threshold and per-class scores for a tag the model never saw would mean nothing
        trained_on = ("train", "val") if s.folds else ("train",)
        console.print(f"[yellow]warning:[/] {untrained_warning(ds.table.y, splits, untrained, tags, trained_on)}")
    return Prepared(r, device, tracker, net, card, images, feats, info, folds, untrained, n_params, validation,
                    {"extract_s": t_extract, "t_start": t_start})


def finish(p: Prepared, results: list[FoldResult], train_s: float, draw_report: bool = True) -> dict:
    """One finish for one fold or K: the final model on test, thresholds tuned on the (out-of-fold) validation
    rows, the checkpoint, the summary, the report, the tracker -> the summary. draw_report False: the caller
    draws the report and publishes (a sweep's batch draws its entries' reports in parallel)."""
    r, device, net, folds = p.r, p.device, p.net, p.folds
    s, ds, splits, tags = r.s, r.ds, r.splits, r.ds.table.tags
    tagger, model, loss_fn, epoch = final_model(results, net, folds, device)
    test = evaluate(model, test_batches(results, p), loss_fn, device)
    val_idx = np.concatenate([res.val_idx for res in results])
    val = (np.concatenate([res.val_targets for res in results]), np.concatenate([res.val_probs for res in results]))
    report.save_eval_probs(r.run.eval_probs, {"val": {"targets": val[0], "probs": val[1]}, "test": test},
                           ds.table.names, {"val": val_idx, "test": splits["test"]}, tags)
    # the label rules are kept only where they score higher on validation (labels.apply); the checkpoint's
    # `labels` section carries the choice, so predict, serve, evaluate and export decode as the run chose
    thresholds, m, decision = choose_and_score(val, {"val": val, "test": (test["targets"], test["probs"])}, tags,
                                               s.labels, p.untrained)
    m["val"]["loss"], m["test"]["loss"] = _val_loss(results), test["loss"]
    if distributed.is_main():
        card = replace(p.card, config={**p.card.config, "labels": decision.labels(s.labels)})
        checkpoint.save(r.run.checkpoint, tagger, card, thresholds.tolist(), epoch)

    train_rows = np.unique(np.concatenate([fold.train for fold in folds]))  # the summary's pos_weight
    pw = pos_weight(ds.table.y[train_rows], s.optim.pos_weight_max) if s.optim.pos_weight else None
    history = [{**h, "fold": res.k} if res.k else h for res in results for h in res.record["history"]]
    scores = {"metrics": m, "baseline": metrics.baseline_summary(ds.table.y, splits, tags), "thresholds": thresholds}
    t_start = p.timings["t_start"]
    timings = {"extract_s": p.timings["extract_s"], "train_s": train_s, "total_s": time.perf_counter() - t_start}
    summary = build_summary(s, r.run, ds, splits, net, Outcome(epoch if len(results) == 1 else None, history,
                                                               scores, timings, p.info, pw, p.n_params))
    summary["label_rules"] = decision.rules.to_dict(tags)  # what predictions decode with (empty: none kept)
    summary["label_rules_decision"] = decision.to_dict()
    if len(results) > 1:
        summary["folds"] = folds_mod.folds_section(results, m)
        summary["n_images"]["oof"] = int(len(val_idx))
        with replacing(r.run.oof_probs) as tmp:
            np.savez_compressed(tmp, probs=val[1], targets=val[0], names=np.asarray([ds.table.names[i]
                                                                                     for i in val_idx]),
                                tags=np.asarray(tags))
    summary["validation"] = p.validation  # what was checked, converted and skipped (every item)
    write_json(r.run.summary, summary)  # complete before the tracker uploads it
    if draw_report:
        out.print(f"drawing the report: plots and error sheets into {r.run.report_dir} ...")
        t_report = time.perf_counter()
        publish(p, summary, report.draw(r.run.path), time.perf_counter() - t_report)
    return summary


def publish(p: Prepared, summary: dict, drawn: report.Drawn, report_s: float) -> None:
    """A finished run's report to the tracker, the tracker finished, the summary written with both."""
    report.log_report(p.r.run.path, p.tracker, drawn)
    timings = summary["timings"]
    timings["report_s"] = report_s
    timings["total_s"] = time.perf_counter() - p.timings["t_start"]  # the time printed at the end counts the report
    summary["tracker"] = p.tracker.finish(summary)
    write_json(p.r.run.summary, summary)  # with the tracker's link


def build_network(spec: NetworkSpec, n_tags: int, seed: int, progress: bool = False) -> Network:
    """The backbone (weights loaded, classifier replaced) with a new head on top."""
    if spec.freeze and spec.weights is None:
        console.print("[yellow]warning:[/] freeze: true with weights: null trains a head on a random backbone "
                      "— fine for smoke tests and the demo, not for real results.")
    torch.manual_seed(seed)  # random-init backbones and the head start from the seed
    bb = build_backbone(spec.backbone, spec.weights, spec.image_size, progress=progress)
    bb.preprocessing = replace(bb.preprocessing, resize=spec.resize)  # travels in the checkpoint
    head = HeadSpec(bb.dim, n_tags, spec.hidden_dim, spec.dropout)
    return Network(bb, head, Tagger(bb.net, head.build(), frozen=spec.freeze))


def adapt_to_bands(net: Network, data: DataConfig, train_paths: list[Path], seed: int) -> None:
    """A raster run's preprocessing gets its per-band statistics from training chips (stored in the checkpoint
    like ImageNet's mean/std), and the RGB-pretrained stem takes the configured bands (models.backbones)."""
    pre = training_preprocessing(data, train_paths, net.backbone.preprocessing, seed)
    net.backbone.preprocessing = pre
    adapt_stem(net.backbone.net, pre.channels)
    out.print(f"bands {list(pre.bands)} (mean {', '.join(f'{m:.4g}' for m in pre.mean)}); stem adapted")


def extract_features(r: OpenRun, bb: Backbone, images: ImageInput) -> tuple[torch.Tensor, FeatureInfo]:
    """The frozen backbone over every image (and D4 view), once: from the feature cache when it is there."""
    fs = r.s.features
    ex = make_extractor(bb.net, bb.name, images, fs, num_workers=default_workers(r.s.num_workers, images.device),
                        show_progress=r.s.progress, label=f"features {bb.name}")
    feats, info = view_features(ex, r.ds.paths, fs.cache_dir, fs.views)
    info.engine, info.tta = fs.engine, feats.shape[0] > 1 and fs.tta
    warning = feature_warning(feats, bb.name, r.s.network.weights)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    info.degenerate = degenerate(feats)
    return feats, info


def plan_folds(r: OpenRun, tracker, device: torch.device) -> list[Fold]:
    """The run's own train/val split as one fold (the run dir itself), or K folds of train + val, each in
    fold-k/ with its own tracker file."""
    s, y = r.s, r.ds.table.y
    cuts = [(0, r.splits["train"], r.splits["val"])]
    if s.folds:
        if distributed.active():
            raise ChiptagError("training.folds under torchrun is not supported: run k-fold in one process")
        pool = np.concatenate([r.splits["train"], r.splits["val"]])
        vals = folds_mod.cut_folds(r.run, r.ds.table.names, y, pool, s.folds, s.data.split.seed)
        out.print(f"{len(vals)} folds of {len(pool)} non-test images (train + val, iterative stratification; "
                  f"split/folds.csv); test {len(r.splits['test'])} images, scored once by the ensemble")
        cuts = [(k, np.setdiff1d(pool, val), val) for k, val in enumerate(vals, start=1)]
    folds = []
    for k, train, val in cuts:
        run = r.run.fold(k) if k else r.run
        loss_fn = folds_mod.make_loss(y[train], s.optim.pos_weight, s.optim.pos_weight_max, device)
        folds.append(Fold(k, train, val, run, folds_mod.FoldTracker(tracker, run, k) if k else tracker, loss_fn,
                          device, checkpoint_each_best=not k))
    return folds


def test_batches(results: list[FoldResult], p: Prepared):
    """The test split's batches as the last phase reads them: a trained fold's (the test split is the run's in
    every fold); built only when every fold was done before a --resume."""
    done = next((res.test_batches for res in results if res.test_batches is not None), None)
    if done is not None:
        return done
    return phases_mod.plan(p.r.s.optim, p.r.s.network.freeze, *_phase_inputs(p, p.r.splits, p.device))[-1].inputs.test


def _phase_inputs(p: Prepared, splits: dict,
                  device: torch.device) -> tuple[phases_mod.Inputs | None, phases_mod.Inputs | None]:
    """(cached-feature batches when there are features, image batches when the backbone trains)."""
    s = p.r.s
    features = image_batches = None
    if p.feats is not None:
        features = phases_mod.feature_inputs(p.feats, p.r.ds.table.y, splits, s.optim.batch_size, s.seed,
                                             s.features.tta, device)
    if not s.network.freeze:  # the backbone trains: it sees the images themselves
        image_batches = phases_mod.image_inputs(p.r.ds, splits, p.images, s.optim.batch_size, s.seed,
                                                default_workers(s.num_workers), s.augment)
    return features, image_batches


def train_fold(p: Prepared, fold: Fold) -> FoldResult:
    """One fold through the epoch loop (training.loop.fit), resumed from its resume.pt when there; its best
    weights evaluated on its validation rows."""
    s, net, t0 = p.r.s, p.net, time.perf_counter()
    splits = {"train": fold.train, "val": fold.val, "test": p.r.splits["test"]}
    phases = phases_mod.plan(s.optim, s.network.freeze, *_phase_inputs(p, splits, fold.device))
    if fold.of_k:
        fold.run.path.mkdir(exist_ok=True)
        torch.manual_seed(s.seed + fold.k)  # each head its own start; the same on every rerun
        # frozen: the K heads share the one backbone; fine-tuning: each fold trains its own copy of it, from the
        # pretrained weights (net's backbone itself is never trained in a k-fold run)
        backbone = net.backbone.net if s.network.freeze else copy.deepcopy(net.backbone.net)
        tagger = Tagger(backbone, net.head.build(), frozen=s.network.freeze).to(fold.device)
    else:
        torch.manual_seed(s.seed)  # dropout and shuffling do not depend on whether the cache was hit
        tagger = net.tagger
    saved = resume_mod.load(fold.run.resume)
    where = f"fold {fold.k}: " if fold.of_k else ""
    if saved:
        out.print(f"{where}resuming after epoch {saved['state']['epoch']}, step {saved['state']['step']}")
    elif fold.of_k:
        out.print(f"fold {fold.k}/{s.folds}: {len(fold.train)} train / {len(fold.val)} validation images")
    fitted = fit(fold, phases, tagger, s.optim, s.select, p.card, saved, s.progress)
    return fold_result(p, fold, tagger, fitted.model, fitted.inputs, fitted.state, time.perf_counter() - t0)


def train_folds(p: Prepared) -> list[FoldResult]:
    """Every fold's result: read back when it was done before a --resume; the heads of a k-fold run's folds
    trained together, as one batched model (training.heads); any other fold through the epoch loop alone."""
    s, y = p.r.s, p.r.ds.table.y
    results = {fold.k: res for fold in p.folds if (res := folds_mod.load_done(fold, y)) is not None}
    heads_mod.check_no_old_state(p.r.run)
    for group in heads_mod.batchable([f for f in p.folds if f.k not in results], s.network.freeze, p.feats,
                                     s.optim):
        members = heads_mod.fold_members(group, p.net.head, p.net.backbone.net, p.feats, y, s)
        for m, inputs, seconds in heads_mod.train_together(members, p.feats, y, p.r.splits["test"]):
            results[m.fold.k] = fold_result(p, m.fold, m.tagger, ViewAverage(m.head), inputs, m.st, seconds)
    for fold in p.folds:
        if fold.k not in results:
            results[fold.k] = train_fold(p, fold)
    return [results[fold.k] for fold in p.folds]


def fold_result(p: Prepared, fold: Fold, tagger: Tagger, model: nn.Module, inputs: phases_mod.Inputs,
                state: resume_mod.LoopState, seconds: float) -> FoldResult:
    """A trained fold: its best weights loaded and evaluated on its validation rows; fold k's files written."""
    resume_mod.load_trained_state(tagger, state.best_state)
    ev = evaluate(model, inputs.val, fold.loss_fn, fold.device)
    record = {"fold": fold.k, "best_epoch": state.best_epoch, "n_train": int(len(fold.train)),
              "n_val": int(len(fold.val)), "val_loss": ev["loss"], "seconds": seconds, "history": state.history}
    if fold.of_k:  # fold k's own figures (fold.json, the summary's per-fold table); one split's are the run's
        _, m, _ = choose_and_score((ev["targets"], ev["probs"]), {"val": (ev["targets"], ev["probs"])},
                                   p.card.tags, p.r.s.labels)
        record.update({"val_f2_at_0.5": m["val"]["f2_at_0.5"], "val_f2_tuned": m["val"]["f2"]})
    result = FoldResult(fold.k, fold.val, ev["probs"], ev["targets"], state.best_state, record, model=model,
                        test_batches=inputs.test)
    if fold.of_k:
        folds_mod.save_done(fold, tagger, p.card, result)
    return result


def final_model(results: list[FoldResult], net: Network, folds: list[Fold],
                device: torch.device) -> tuple[Tagger, nn.Module, nn.Module, int]:
    """-> (the tagger the checkpoint holds, the module test is evaluated with, its loss, the checkpoint's
    epoch). One fold: its own best model. K folds: one backbone + the mean probability of the K heads, or of the
    K fine-tuned models; the test loss is unweighted (each fold's pos_weight came from its own rows)."""
    if len(results) == 1:
        return net.tagger, results[0].model, folds[0].loss_fn, results[0].record["best_epoch"]
    if "tagger" in results[0].trained:  # fine-tuned folds: whole models, averaged (models.checkpoint: ensemble)
        members = []
        for res in results:
            member = Tagger(copy.deepcopy(net.backbone.net), net.head.build(), frozen=False)
            member.load_state_dict(res.trained["tagger"])
            members.append(member)
        ensemble = Tagger(nn.Identity(), MeanProbability(members), frozen=False).to(device).eval()
        return ensemble, ensemble, nn.BCEWithLogitsLoss(), 0
    heads = []
    for res in results:
        head = net.head.build()
        head.load_state_dict(res.trained["head"])
        heads.append(head)
    ensemble = Tagger(net.backbone.net, MeanProbability(heads), frozen=True).to(device).eval()
    return ensemble, ViewAverage(ensemble.head), nn.BCEWithLogitsLoss(), 0


def _val_loss(results: list[FoldResult]) -> float:
    """The validation loss; for K folds the out-of-fold loss (each fold's weighted by its rows)."""
    if len(results) == 1:
        return results[0].record["val_loss"]
    return float(np.average([res.record["val_loss"] for res in results],
                            weights=[res.record["n_val"] for res in results]))


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
    epoch = checkpoint.load(run.checkpoint).epoch
    return f"The last good checkpoint is kept: {run.checkpoint} (best epoch {epoch})."


def _failed(r: OpenRun, message: str) -> None:
    """A run that stopped on an error says so (chiptag runs lists it as failed, not unfinished)."""
    if distributed.is_main():
        r.run.write_failure(r.s.network.name, r.s.active_model_index, message)
