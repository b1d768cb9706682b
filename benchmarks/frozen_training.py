"""Frozen-backbone training: the naive loop vs chiptag's feature cache, measured in one process.

Same generated data, same backbone, same head, same optimiser and batch size for all three:
  naive        backbone forward on every batch of every epoch (what a Lightning loop with a frozen
               backbone does), head trained on top
  cached_cold  chiptag.features.extraction.cached_features into an empty cache (extraction included), then
               the head trained on the cached tensors with chiptag.training.epoch.train_one_epoch
  cached_warm  the same with the cache already on disk
`forward_limit_img_s` is the engine's forward throughput on pre-decoded tensors in memory (the physical
limit of extraction); `extract_efficiency` is extraction throughput over that limit. `predict_img_s` is
chiptag.inference.predictor.Predictor.predict on the same chips with the same engine and workers (backbone +
head as one exported graph, built once before timing as extraction's engine is), `predict_efficiency` is
predict_img_s / extract_img_s, and `predict_max_abs_diff_vs_eager` the largest probability difference between
that Predictor and the eager float32 one on 64 chips. Every variant runs once
per round, rounds interleaved, and the best round of each counts (the least-disturbed measurement on a
shared machine).

    python benchmarks/frozen_training.py --n 400 --size 128 --epochs 5 --out benchmarks/results/frozen_training.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from chiptag.data.inputs import ImageInput, labelled_loader
from chiptag.data.labels import parse_table, read_table
from chiptag.data.synthetic import generate_dataset
from chiptag.features.backends import make_forward, resolve_engine
from chiptag.features.extraction import Extractor, cached_features, default_workers
from chiptag.features.views import TensorBatches
from chiptag.inference.predictor import Predictor
from chiptag.models.backbones import build_backbone, state_fingerprint
from chiptag.models.head import HeadSpec, Tagger
from chiptag.training.epoch import Step, train_one_epoch
from chiptag.training.loop import training_compute


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="generated chips")
    p.add_argument("--size", type=int, default=128, help="generated chip size (px)")
    p.add_argument("--image-size", type=int, default=128, help="backbone input size (px)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="auto", help="decode workers (auto: chiptag's default for CPU extraction)")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime"])
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the best counts")
    p.add_argument("--data", type=Path, help="existing Kaggle-layout folder (default: generate in a tmp dir)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/frozen_training.json"))
    return p.parse_args()


def forward_limit(forward, x: torch.Tensor, batch_size: int) -> float:
    forward(x[:batch_size])  # warm-up: first-call allocations and kernel selection are not throughput
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        forward(x[i:i + batch_size])
    return len(x) / (time.perf_counter() - t0)


def new_head(dim: int, n_tags: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # every variant starts from the same head
    head = HeadSpec(dim, n_tags, 512, 0.2).build()
    return head, torch.optim.Adam(head.parameters(), lr=1e-3)


def naive(forward, paths, y, pre, args, workers: int, dim: int) -> float:
    head, opt = new_head(dim, y.shape[1])
    loss_fn = nn.BCEWithLogitsLoss()
    loader = labelled_loader(ImageInput(pre), paths, y, args.batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(0), num_workers=workers)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        head.train()
        for x, t in loader:
            f = forward(x).clone()  # out of inference mode: the head's backward needs ordinary tensors
            with training_compute(1):  # the same single-threaded head step as chiptag's, to be fair
                opt.zero_grad(set_to_none=True)
                loss_fn(head(f), t).backward()
                opt.step()
    return time.perf_counter() - t0


def cached(forward, bb, paths, y, args, workers: int, cache: Path) -> tuple[float, float]:
    """-> (total seconds, extraction seconds) for cached_features + epochs of head training."""
    t0 = time.perf_counter()
    ex = Extractor(bb.name, state_fingerprint(bb.net), ImageInput(bb.preprocessing), forward, batch_size=args.batch_size,
                   num_workers=workers, show_progress=False)
    feats, info = cached_features(ex, paths, cache)
    t_extract = time.perf_counter() - t0
    head, opt = new_head(bb.dim, y.shape[1])
    gen = torch.Generator().manual_seed(0)
    loader = TensorBatches(feats, torch.as_tensor(y), args.batch_size,
                           order=lambda: torch.randperm(len(feats), generator=gen))
    step = Step(nn.BCEWithLogitsLoss(), torch.device("cpu"))
    with training_compute(1):  # as chiptag's head phase does (training.phases.Phase.threads)
        for epoch in range(args.epochs):
            train_one_epoch(head, loader, opt, step, epoch=epoch)
    return time.perf_counter() - t0, t_extract


def predictors(bb, n_tags: int, engine: str, cache: Path):
    """(Predictor on `engine`, eager float32 Predictor) for backbone + a fresh head, as a trained run holds."""
    head, _ = new_head(bb.dim, n_tags)
    tagger = Tagger(copy.deepcopy(bb.net), head, frozen=True).eval()
    tags, thresholds = [f"t{i}" for i in range(n_tags)], [0.5] * n_tags
    fast = Predictor(tagger, tags, thresholds, bb.preprocessing, "cpu", engine, cache)
    eager = Predictor(copy.deepcopy(tagger), tags, thresholds, bb.preprocessing, "cpu", "torch", cache)
    fast.logits()  # the engine (the graph export) is built once, before timing, as extraction's is
    return fast, eager


def predict_seconds(p, paths, args, workers: int) -> float:
    t0 = time.perf_counter()
    p.predict(paths, batch_size=args.batch_size, num_workers=workers)
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    workers = default_workers(args.workers, "cpu")
    tmp = tempfile.TemporaryDirectory(prefix="chiptag-bench-")
    data = args.data or generate_dataset(Path(tmp.name) / "data", n=args.n, size=args.size, seed=0)
    labels = Path(data) / "train_classes.csv"
    table = parse_table(labels, read_table(labels), "tags")
    paths = [Path(data) / "train-jpg" / f"{n}.jpg" for n in table.names]
    y = table.y.astype("float32")
    torch.manual_seed(0)
    bb = build_backbone(args.backbone, None, args.image_size, progress=False)
    engine = resolve_engine(args.engine, torch.device("cpu"))
    cache = Path(tmp.name) / "cache"
    forward = make_forward(bb.net, engine, "cpu", cache_dir=cache, backbone_name=bb.name,
                           backbone_hash=state_fingerprint(bb.net), image_size=args.image_size)
    images = ImageInput(bb.preprocessing)
    x = images.stack([images.chip(p) for p in paths])  # pre-decoded, in memory
    # Other processes share this machine: each variant runs in every round, interleaved, and the best round
    # counts (the least-disturbed measurement), for the naive loop and the limit as much as for chiptag.
    fast, eager = predictors(bb, y.shape[1], engine, cache)
    diff = float(abs(fast.predict(paths[:64]) - eager.predict(paths[:64])).max())
    limits, naives, colds, extracts, predicts = [], [], [], [], []
    for r in range(args.rounds):
        limits.append(forward_limit(forward, x, args.batch_size))
        naives.append(naive(forward, paths, torch.as_tensor(y), bb.preprocessing, args, workers, bb.dim))
        t_cold, t_extract = cached(forward, bb, paths, y, args, workers, cache / f"round{r}")
        colds.append(t_cold)
        extracts.append(t_extract)
        predicts.append(predict_seconds(fast, paths, args, workers))
    limits.append(forward_limit(forward, x, args.batch_size))
    t_warm = min(cached(forward, bb, paths, y, args, workers, cache / "round0")[0] for _ in range(args.rounds))
    t_naive, t_cold, t_extract, limit = min(naives), min(colds), min(extracts), max(limits)
    res = {"epochs": args.epochs, "images": len(paths), "naive_s": t_naive, "cached_cold_s": t_cold,
           "cached_warm_s": t_warm, "speedup_cold": t_naive / t_cold, "speedup_warm": t_naive / t_warm,
           "extract_img_s": len(paths) / t_extract, "forward_limit_img_s": limit,
           "extract_efficiency": len(paths) / t_extract / limit,
           "predict_img_s": len(paths) / min(predicts), "predict_efficiency": t_extract / min(predicts),
           "predict_max_abs_diff_vs_eager": diff}
    print(f"{args.backbone}@{args.image_size}px, engine {engine}, {len(paths)} chips, {args.epochs} epochs, "
          f"batch {args.batch_size}, {workers} decode worker(s), {torch.get_num_threads()} torch threads")
    print(f"{'variant':<14}{'seconds':>10}{'speedup':>10}")
    for name, t in (("naive", t_naive), ("cached cold", t_cold), ("cached warm", t_warm)):
        print(f"{name:<14}{t:>10.2f}{t_naive / t:>9.1f}x")
    print(f"extraction {res['extract_img_s']:.1f} img/s; forward limit {limit:.1f} img/s "
          f"(best of {', '.join(f'{v:.0f}' for v in limits)}); efficiency {res['extract_efficiency']:.2f}")
    print(f"prediction {res['predict_img_s']:.1f} img/s (best of "
          f"{', '.join(f'{len(paths) / t:.0f}' for t in predicts)}); predict_efficiency "
          f"{res['predict_efficiency']:.2f}; max |fast - eager| probability {diff:.1e}")
    print(f"targets: speedup_cold >= {0.8 * args.epochs:.1f} -> "
          f"{'met' if res['speedup_cold'] >= 0.8 * args.epochs else 'MISSED'}; extract_efficiency >= 0.85 -> "
          f"{'met' if res['extract_efficiency'] >= 0.85 else 'MISSED'}; predict_efficiency >= 0.8 -> "
          f"{'met' if res['predict_efficiency'] >= 0.8 else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
