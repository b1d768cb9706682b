"""D4 view cache: features of the 8 flips/rotations of every chip, one random view per chip and epoch.

With a frozen backbone, online D4 augmentation is exactly "pick one of the 8 cached views at random", so the
backbone runs 8 times per chip once instead of once per chip per epoch. Evaluation can average the 8 views'
probabilities (test-time augmentation, `features.tta`); ViewAverage does that inside the model so the
engine's evaluate() and its loss see ordinary logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Sampler

from chiptag.extract_engines import Forward, make_forward
from chiptag.features import cached_features
from chiptag.models.backbones import state_fingerprint


class LazyForward:
    """Builds the engine on the first batch: a full cache hit never exports an ONNX graph."""

    def __init__(self, factory):
        self.factory, self.fn = factory, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            self.fn = self.factory()
        return self.fn(x)


def engine_forward(net: nn.Module, name: str, backbone_hash: str, image_size: int, fcfg,
                   device: torch.device) -> Forward:
    return LazyForward(lambda: make_forward(
        net, fcfg.engine, device, cache_dir=fcfg.cache_dir, backbone_name=name, backbone_hash=backbone_hash,
        image_size=image_size, channels_last=fcfg.channels_last))


def view_features(net: nn.Module, name: str, paths: Sequence[Path], pre, fcfg, device: torch.device, *,
                  cache_dir: Path | None, views: int | None = None, **kwargs) -> tuple[torch.Tensor, dict]:
    """-> (features (V, N, dim) float16, info). One cache file per view (the view is in the fingerprint)."""
    views = fcfg.views if views is None else views
    bhash = state_fingerprint(net)
    forward = engine_forward(net, name, bhash, pre.image_size, fcfg, device)
    feats, infos = [], []
    for v in range(views):
        f, info = cached_features(net, name, bhash, paths, pre, cache_dir, view=v, device=device,
                                  batch_size=fcfg.batch_size, forward=forward, **kwargs)
        feats.append(f)
        infos.append(info)
    info = dict(infos[0]) if views == 1 else {
        "cache": "hit" if all(i["cache"] == "hit" for i in infos) else
                 ("off" if infos[0]["cache"] == "off" else "miss"),
        "views": views, "seconds": sum(i["seconds"] for i in infos), "per_view": infos}
    if views == 1:
        info["views"] = 1
    info["engine"] = fcfg.engine
    return torch.stack(feats), info


class RandomViewSampler(Sampler[int]):
    """Indices into features flattened as (V*N, dim): a fresh permutation of the N chips each epoch, each with
    a view drawn uniformly from V, both from `generator` (so a seed fixes the whole sequence)."""

    def __init__(self, n: int, views: int, generator: torch.Generator):
        self.n, self.views, self.generator = n, views, generator

    def __len__(self) -> int:
        return self.n

    def draw(self) -> torch.Tensor:
        order = torch.randperm(self.n, generator=self.generator)
        view = torch.randint(self.views, (self.n,), generator=self.generator)
        return view * self.n + order

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw().tolist())


class TensorBatches:
    """(features, targets) batches from tensors in memory by direct indexing, in `order()` each epoch (None:
    in order). A DataLoader over a TensorDataset fetches and collates row by row; for a small head that
    made training ~10x slower (benchmarks/frozen_training.py). Quacks like a DataLoader for the engine."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, n: int | None = None,
                 order: Callable[[], torch.Tensor] | None = None):
        self.x, self.y, self.batch_size, self.order = x, y, batch_size, order
        self.dataset = range(len(x) if n is None else n)  # samples per epoch (progress bars use len())
        self.sampler = None

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.order() if self.order is not None else None
        for i in range(0, len(self.dataset), self.batch_size):
            j = slice(i, i + self.batch_size) if idx is None else idx[i:i + self.batch_size]
            yield self.x[j], self.y[j]


class ViewAverage(nn.Module):
    """head on (B, dim) as usual; on (B, V, dim) -> logit of the mean of the V views' probabilities (TTA)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.head(x)
        b, v = x.shape[:2]
        probs = torch.sigmoid(self.head(x.flatten(0, 1)).float()).view(b, v, -1).mean(1)
        return torch.logit(probs, eps=1e-6)  # back to logits: the loss and sigmoid downstream stay valid


def tta_probabilities(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(V, N, dim) or (N, dim) features -> (N, C) probabilities (mean over views)."""
    with torch.inference_mode():
        head = head.eval()
        if feats.dim() == 2:
            return torch.sigmoid(head(feats.float()).double())
        return torch.stack([torch.sigmoid(head(f.float()).double()) for f in feats]).mean(0)
