"""run_train(cfg): data -> split -> model -> (cached features) -> epochs -> best checkpoint -> summary.

Protocol: the validation split drives the LR schedule, the checkpoint choice and threshold tuning; the test
split is evaluated once, at the end, and is the headline.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from chiptag import checkpoint, config as config_mod, distributed, finetune, metrics
from chiptag.config import Config
from chiptag.data.images import ImageDataset
from chiptag.data.labels import LabelTable
from chiptag.data.prepare import Dataset, load_dataset
from chiptag.data.split import save_split, split_indices
from chiptag.engine import evaluate, pos_weight, train_one_epoch
from chiptag.errors import ChiptagError
from chiptag.finetune import Phase
from chiptag.features import default_workers
from chiptag.models.backbones import Backbone, build_backbone
from chiptag.models.head import HeadSpec, Tagger, count_parameters
from chiptag.progress import console, out
from chiptag.rundir import SUMMARY, build_summary, new_run_dir, print_result, write_json
from chiptag.tracking import MultiTracker, make_tracker
from chiptag.views import RandomViewSampler, TensorBatches, ViewAverage, view_features


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


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    model: nn.Module  # what the engine trains: the head (frozen) or the whole Tagger
    extract: dict


def _feature_loaders(cfg: Config, ds: Dataset, splits: dict, bb: Backbone, tagger: Tagger,
                     device: torch.device) -> Loaders:
    workers = default_workers(cfg.training.num_workers, device)
    feats, info = view_features(bb.net, bb.name, ds.paths, bb.preprocessing, cfg.features, device,
                                cache_dir=cfg.features.cache_dir, num_workers=workers,
                                show_progress=cfg.training.progress, label=f"features {bb.name}")
    y = torch.from_numpy(ds.table.y)
    gen = torch.Generator().manual_seed(cfg.training.seed)
    bs, views = cfg.batch_size(), feats.shape[0]
    tta = views > 1 and cfg.features.tta

    def train_loader(idx):
        n = len(idx)
        if views == 1:
            return TensorBatches(feats[0, idx], y[idx], bs, order=lambda: torch.randperm(n, generator=gen))
        sampler = RandomViewSampler(n, views, gen)  # row v*n + i of the flattened views
        return TensorBatches(feats[:, idx].flatten(0, 1), y[idx].repeat(views, 1), bs, n, sampler.draw)

    def eval_loader(idx):  # TTA: (n, V, dim) rows, averaged by ViewAverage; otherwise the identity view
        return TensorBatches(feats[:, idx].transpose(0, 1) if tta else feats[0, idx], y[idx], bs)

    info["tta"] = tta
    return Loaders(train_loader(splits["train"]), eval_loader(splits["val"]), eval_loader(splits["test"]),
                   ViewAverage(tagger.head), info)


def _image_loaders(cfg: Config, ds: Dataset, splits: dict, bb: Backbone, tagger: Tagger) -> Loaders:
    workers = default_workers(cfg.training.num_workers)
    gen = torch.Generator().manual_seed(cfg.training.seed)

    def loader(idx, shuffle):
        data = ImageDataset([ds.paths[i] for i in idx], bb.preprocessing, ds.table.y[idx])
        if shuffle and distributed.active():  # each rank its shard; batch_size stays the global batch
            sampler = DistributedSampler(data, shuffle=True, seed=cfg.training.seed)
            return DataLoader(data, batch_size=max(1, cfg.batch_size() // distributed.world()),
                              sampler=sampler, num_workers=workers)
        return DataLoader(data, batch_size=cfg.batch_size(), shuffle=shuffle, num_workers=workers,
                          generator=gen if shuffle else None)

    return Loaders(loader(splits["train"], True), loader(splits["val"], False), loader(splits["test"], False),
                   tagger, {"cache": "not used (freeze: false)"})


def build_tagger(cfg: Config, n_tags: int) -> tuple[Backbone, HeadSpec, Tagger]:
    entry = cfg.model
    if entry.freeze and entry.weights is None:
        console.print("[yellow]warning:[/] freeze: true with weights: null trains a head on a random backbone "
                      "— fine for smoke tests and the demo, not for real results.")
    torch.manual_seed(cfg.training.seed)  # random-init backbones and the head start from the seed
    bb = build_backbone(entry.backbone, entry.weights, entry.image_size, progress=cfg.training.progress)
    spec = HeadSpec(bb.dim, n_tags, entry.hidden_dim, entry.dropout)
    return bb, spec, Tagger(bb.net, spec.build(), frozen=entry.freeze)


def _one_epoch(cfg: Config, phase: Phase, ld: Loaders, opt, loss_fn: nn.Module, device: torch.device,
               epoch: int) -> dict:
    t0 = time.perf_counter()
    if hasattr(ld.train.sampler, "set_epoch"):  # DistributedSampler: a new shuffle every epoch
        ld.train.sampler.set_epoch(epoch)
    tr = train_one_epoch(ld.model, ld.train, loss_fn, opt, device, epoch=epoch,
                         show_progress=cfg.training.progress and phase.name != "head", **phase.step)
    ev = evaluate(ld.model, ld.val, loss_fn, device)
    f2 = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], 0.5))
    return {"train/loss": distributed.mean(tr["loss"]),  # each rank saw its shard
            "val/loss": ev["loss"], "val/f2": f2, "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0}


def _epoch_loop(cfg: Config, phases: list[Phase], loss_fn: nn.Module, device: torch.device, tracker,
                on_best) -> tuple[list[dict], Loaders]:
    """Runs the phases in order (each with its own optimiser and LR schedule); -> (history, last loaders)."""
    entry, sc = cfg.model, cfg.training.scheduler
    history, best, epoch = [], -1.0, 0
    for phase in phases:
        ld = phase.loaders()
        opt = torch.optim.Adam(phase.param_groups(ld.model), lr=entry.learning_rate,
                               weight_decay=entry.weight_decay)  # the optimizer sees trainable ones only
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=sc.factor,
                                                           patience=sc.patience, min_lr=sc.min_lr)
        with finetune.torch_threads(phase.threads):
            for _ in range(phase.epochs):
                epoch += 1
                row = _one_epoch(cfg, phase, ld, opt, loss_fn, device, epoch)
                tracker.log_scalars(epoch, row)
                history.append({"epoch": epoch, "phase": phase.name, **row})
                out.print(f"epoch {epoch:>3}/{entry.epochs}  train/loss {row['train/loss']:.4f}  val/loss "
                          f"{row['val/loss']:.4f}  val/f2 {row['val/f2']:.4f}  lr {row['lr']:.2e}  "
                          f"({row['seconds']:.1f}s)" + (f"  ({phase.name})" if len(phases) > 1 else ""))
                if row["val/f2"] > best:  # the checkpoint follows validation F2, the task's metric
                    best = row["val/f2"]
                    on_best(epoch)
                sched.step(row["val/loss"])
    return history, ld


def _final_metrics(ld: Loaders, loss_fn: nn.Module, device: torch.device, table: LabelTable,
                   splits: dict) -> tuple[dict, dict, np.ndarray]:
    ev = {s: evaluate(ld.model, getattr(ld, s), loss_fn, device) for s in ("val", "test")}
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


def _phases(cfg: Config, ds: Dataset, splits: dict, bb: Backbone, tagger: Tagger,
            device: torch.device) -> tuple[list[Phase], Loaders]:
    """The training phases, the first one's loaders built now (extraction, when it trains on features)."""
    phases = finetune.plan(cfg, lambda: _feature_loaders(cfg, ds, splits, bb, tagger, device),
                           lambda: _image_loaders(cfg, ds, splits, bb, tagger), tagger, device)
    ld0 = phases[0].loaders()
    phases[0].loaders = lambda: ld0
    return phases, ld0


def run_train(cfg: Config) -> dict:
    t_start = time.perf_counter()
    entry = cfg.model
    ds = load_dataset(cfg.data)
    sp = cfg.data.split
    splits = split_indices(ds.table.y, sp.train, sp.val, sp.test, seed=sp.seed)
    dist_device = distributed.setup()  # under torchrun: join the group; rank 0 alone writes and tracks
    run_dir = new_run_dir(cfg) if distributed.is_main() else distributed.scratch_dir()
    out.quiet = not distributed.is_main()
    (run_dir / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")
    save_split(ds.table.names, splits, run_dir / "split")
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
    ckpt_path = run_dir / "checkpoint.pt"
    best: dict = {}

    def save_ckpt(thresholds, epoch):
        checkpoint.save(ckpt_path, tagger=tagger, backbone=bb.name, weights_id=bb.weights_id, head=head_spec,
                        tags=ds.table.tags, thresholds=thresholds, preprocessing=bb.preprocessing,
                        config=cfg.to_dict(), extra={"epoch": epoch})

    def on_best(epoch):  # the whole tagger: a fine-tune schedule changes the backbone after the head phase
        best.update(epoch=epoch, state=copy.deepcopy(tagger.state_dict()))
        save_ckpt([0.5] * len(ds.table.tags), epoch)

    torch.manual_seed(cfg.training.seed)  # dropout and shuffling do not depend on whether the cache was hit
    t_train = time.perf_counter()
    history, ld = _epoch_loop(cfg, phases, loss_fn, device, tracker, on_best)
    t_train = time.perf_counter() - t_train
    tagger.load_state_dict(best["state"])
    results, baseline, thresholds = _final_metrics(ld, loss_fn, device, ds.table, splits)
    save_ckpt(thresholds.tolist(), best["epoch"])
    timings = {"extract_s": t_extract, "train_s": t_train, "total_s": time.perf_counter() - t_start}
    summary = build_summary(cfg, run_dir, ds, splits, bb, head_spec, n_params, pw, history, best["epoch"],
                            results, baseline, thresholds, timings, ld0.extract)
    write_json(run_dir / SUMMARY, summary)  # complete before the tracker uploads it
    summary["tracker"] = tracker.finish(summary)
    write_json(run_dir / SUMMARY, summary)
    print_result(summary)
    if not distributed.is_main():
        shutil.rmtree(run_dir, ignore_errors=True)
    distributed.shutdown()
    return summary
