"""run_train(cfg): data -> split -> model -> (cached features) -> epochs -> best checkpoint -> summary.

Protocol: the validation split drives the LR schedule, the checkpoint choice and threshold tuning; the test
split is evaluated once, at the end, and is the headline.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from chiptag import checkpoint, config as config_mod, distributed, finetune, metrics, report
from chiptag import resume as resume_mod
from chiptag.atomic import write_json, write_text
from chiptag.config import Config
from chiptag.data.labels import LabelTable
from chiptag.data.prepare import Dataset
from chiptag.data.split import load_split, save_split, split_indices
from chiptag.data.validate import preflight
from chiptag.engine import NonFiniteLoss, evaluate, pos_weight
from chiptag.errors import ChiptagError
from chiptag.finetune import Phase
from chiptag.interrupt import Interrupted, graceful_stop
from chiptag.loaders import Loaders, feature_loaders, image_loaders
from chiptag.loop import epoch_loop
from chiptag.models.backbones import Backbone, build_backbone
from chiptag.models.head import HeadSpec, Tagger, count_parameters
from chiptag.progress import console, out
from chiptag.runs import FAILURE
from chiptag.rundir import SUMMARY, build_summary, new_run_dir, print_result
from chiptag.tracking import MultiTracker, make_tracker


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ChiptagError(f"training.device: unknown device {name!r} (use auto, cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChiptagError("training.device is cuda but no CUDA device is available; use device: auto or cpu")
    return dev


def build_tagger(cfg: Config, n_tags: int) -> tuple[Backbone, HeadSpec, Tagger]:
    entry = cfg.model
    if entry.freeze and entry.weights is None:
        console.print("[yellow]warning:[/] freeze: true with weights: null trains a head on a random backbone "
                      "— fine for smoke tests and the demo, not for real results.")
    torch.manual_seed(cfg.training.seed)  # random-init backbones and the head start from the seed
    bb = build_backbone(entry.backbone, entry.weights, entry.image_size, progress=cfg.training.progress)
    spec = HeadSpec(bb.dim, n_tags, entry.hidden_dim, entry.dropout)
    return bb, spec, Tagger(bb.net, spec.build(), frozen=entry.freeze)


def _phases(cfg: Config, ds: Dataset, splits: dict, bb: Backbone, tagger: Tagger,
            device: torch.device) -> tuple[list[Phase], Loaders]:
    """The training phases, the first one's loaders built now (extraction, when it trains on features)."""
    phases = finetune.plan(cfg, lambda: feature_loaders(cfg, ds, splits, bb, tagger, device),
                           lambda: image_loaders(cfg, ds, splits, bb, tagger), tagger, device)
    ld0 = phases[0].loaders()
    phases[0].loaders = lambda: ld0
    return phases, ld0


def _final_metrics(ld: Loaders, loss_fn: nn.Module, device: torch.device, table: LabelTable,
                   splits: dict, run_dir: Path) -> tuple[dict, dict, np.ndarray]:
    ev = {s: evaluate(ld.model, getattr(ld, s), loss_fn, device) for s in ("val", "test")}
    report.save_eval_probs(run_dir / report.EVAL_PROBS, ev, table.names, splits, table.tags)
    thresholds = metrics.tune_thresholds(ev["val"]["targets"], ev["val"]["probs"])
    out = {}
    for s, e in ev.items():
        m = metrics.classification_metrics(e["targets"], e["probs"], thresholds, table.tags)
        m["f2_at_0.5"] = metrics.f2_samples(e["targets"], metrics.binarize(e["probs"], 0.5))
        m["loss"] = e["loss"]
        out[s] = m
    mask = metrics.constant_baseline(table.y[splits["train"]])
    baseline = {"tags": [t for t, on in zip(table.tags, mask) if on]}
    for s in ("val", "test"):
        baseline[s] = {"f2": metrics.baseline_metrics(table.y[splits[s]], mask, table.tags)["f2"]}
    return out, baseline, thresholds


def _open_run(cfg: Config | None, resume: Path | None):
    """A new run dir (validated data, fresh split), or the interrupted run `resume` (its config and split).
    Under torchrun only rank 0 writes the run dir; the other ranks work in a scratch dir."""
    if resume is None:
        ds, vreport = preflight(cfg.data)
        sp = cfg.data.split
        splits = split_indices(ds.table.y, sp.train, sp.val, sp.test, seed=sp.seed)
        run_dir = new_run_dir(cfg) if distributed.is_main() else distributed.scratch_dir()
        write_text(run_dir / "config.yaml", config_mod.dump(cfg))  # --resume reads it back
        save_split(ds.table.names, splits, run_dir / "split")
        return cfg, ds, vreport, splits, run_dir, None
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise ChiptagError(f"--resume {run_dir}: not a run directory (no config.yaml)")
    if (run_dir / SUMMARY).is_file() and not (run_dir / resume_mod.RESUME).is_file():
        raise ChiptagError(f"--resume {run_dir}: the run is already complete (summary.json is written)")
    cfg = config_mod.load(run_dir / "config.yaml")
    ds, vreport = preflight(cfg.data)
    splits = load_split(ds.table.names, run_dir / "split")
    saved = resume_mod.load(run_dir)
    where = f"after epoch {saved['state']['epoch']}, step {saved['state']['step']}" if saved else "at epoch 1"
    out.print(f"resuming run [bold]{run_dir.name}[/] {where}")
    return cfg, ds, vreport, splits, run_dir, saved


def _report_validation(vreport, ds, run_dir: Path) -> dict:
    skipped = vreport.rows - len(ds.table)
    if vreport.problems or vreport.converted:
        console.print(f"data validation: {vreport.format()}")
    if skipped:
        console.print(f"[yellow]skipped {skipped} row(s)[/] (data.on_bad_image=skip); listed in "
                      f"{run_dir / 'skipped.csv'}")
    vreport.write(run_dir, skipped)
    return vreport.to_dict(skipped)


def _last_good(run_dir: Path) -> str:
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return "No epoch finished, so there is no checkpoint."
    epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch")
    return f"The last good checkpoint is kept: {path} (best epoch {epoch})."


def _mark_failed(run_dir: Path, cfg: Config, message: str) -> None:
    """A run that stopped on an error says so (chiptag runs lists it as failed, not unfinished)."""
    if distributed.is_main():
        write_json(run_dir / FAILURE, {"status": "failed", "model": cfg.model.name,
                                       "active_model_index": cfg.active_model_index, "error": message})


def run_train(cfg: Config | None = None, *, resume: Path | None = None) -> dict:
    """Train cfg's active model in a new run dir, or continue the interrupted run dir `resume`.

    SIGINT/SIGTERM stop after the current step with resumable state saved (Interrupted, exit 130/143)."""
    dist_device = distributed.setup()  # under torchrun: join the group; rank 0 alone writes and tracks
    out.quiet = not distributed.is_main()
    try:
        with graceful_stop():
            cfg, ds, vreport, splits, run_dir, saved = _open_run(cfg, resume)
            validation = _report_validation(vreport, ds, run_dir)
            try:
                summary = _train(cfg, ds, splits, run_dir, saved, validation, dist_device)
            except Interrupted as exc:
                raise exc.with_hint(f"continue with: chiptag train --resume {run_dir}") from None
            except NonFiniteLoss as exc:
                _mark_failed(run_dir, cfg, f"{exc} {_last_good(run_dir)}")
                raise NonFiniteLoss(f"{exc} {_last_good(run_dir)}") from None
            except ChiptagError as exc:
                _mark_failed(run_dir, cfg, str(exc))
                raise
        write_json(run_dir / SUMMARY, summary)
        (run_dir / resume_mod.RESUME).unlink(missing_ok=True)  # complete: nothing left to resume
        print_result(summary)
        if not distributed.is_main():
            shutil.rmtree(run_dir, ignore_errors=True)
        return summary
    finally:
        distributed.shutdown()


def _train(cfg: Config, ds: Dataset, splits: dict, run_dir: Path, saved: dict | None, validation: dict,
           dist_device: torch.device | None) -> dict:
    t_start = time.perf_counter()
    entry = cfg.model
    tracker = make_tracker(cfg, run_dir) if distributed.is_main() else MultiTracker([])
    tracker.start(run_dir.name, entry.name, cfg.to_dict())  # before heavy work: a bad tracker fails fast
    device = dist_device or resolve_device(cfg.training.device)
    out.print(f"run [bold]{run_dir.name}[/]: {entry.name} ({entry.backbone}, weights={entry.weights}, "
              f"freeze={entry.freeze}) on {device}; {len(splits['train'])}/{len(splits['val'])}/"
              f"{len(splits['test'])} train/val/test images, {len(ds.table.tags)} tags")
    bb, head_spec, tagger = build_tagger(cfg, len(ds.table.tags))
    tagger.to(device)
    n_params = count_parameters(tagger)
    out.print(f"parameters: {n_params['trainable']:,} trainable, {n_params['frozen']:,} frozen; "
              f"head {head_spec.describe()}")
    t_extract = time.perf_counter()
    phases, ld0 = _phases(cfg, ds, splits, bb, tagger, device)
    t_extract = time.perf_counter() - t_extract
    pw = pos_weight(ds.table.y[splits["train"]], cfg.training.pos_weight_max) if entry.pos_weight else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=None if pw is None else pw.to(device))

    def save_ckpt(thresholds, epoch):
        if distributed.is_main():
            checkpoint.save(run_dir / "checkpoint.pt", tagger=tagger, backbone=bb.name, weights_id=bb.weights_id,
                            head=head_spec, tags=ds.table.tags, thresholds=thresholds,
                            preprocessing=bb.preprocessing, config=cfg.to_dict(), extra={"epoch": epoch})

    torch.manual_seed(cfg.training.seed)  # dropout and shuffling do not depend on whether the cache was hit
    t_train = time.perf_counter()
    st, ld = epoch_loop(cfg, phases, tagger, loss_fn, device, tracker,
                        lambda epoch: save_ckpt([0.5] * len(ds.table.tags), epoch), run_dir, saved)
    t_train = time.perf_counter() - t_train
    resume_mod.load_trained_state(tagger, st.best_state)
    results, baseline, thresholds = _final_metrics(ld, loss_fn, device, ds.table, splits, run_dir)
    save_ckpt(thresholds.tolist(), st.best_epoch)
    timings = {"extract_s": t_extract, "train_s": t_train, "total_s": time.perf_counter() - t_start}
    summary = build_summary(cfg, run_dir, ds, splits, bb, head_spec, n_params, pw, st.history, st.best_epoch,
                            results, baseline, thresholds, timings, ld0.extract)
    summary["validation"] = validation  # what was checked, converted and skipped (every item)
    write_json(run_dir / SUMMARY, summary)  # complete before the tracker uploads it
    report.report_after_training(run_dir, tracker)
    summary["tracker"] = tracker.finish(summary)
    return summary
