"""D4 view cache: features of the 8 flips/rotations of every chip, one random view per chip and epoch.

With a frozen backbone, online D4 augmentation is exactly "pick one of the 8 cached views at random", so the
backbone runs 8 times per chip once instead of once per chip per epoch. Evaluation can average the 8 views'
probabilities (test-time augmentation, `features.tta`); `mean_probabilities` is the one TTA
rule (the mean of the views' probabilities), used here on cached features and by inference on images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Sampler

from chiptag.data.inputs import ImageInput
from chiptag.features.backends import LazyForward, make_forward
from chiptag.features.extraction import Extractor, FeatureInfo, cached_features
from chiptag.models.backbones import state_fingerprint


def make_extractor(net: nn.Module, name: str, images: ImageInput, fcfg, **options) -> Extractor:
    """An Extractor for `net` with the engine `fcfg.engine` (config.FeaturesConfig), built on first use, fed by
    the one input object (its device and decoder chosen by the caller, once per command). options:
    num_workers, show_progress, label."""
    bhash = state_fingerprint(net)
    forward = LazyForward(lambda: make_forward(
        net, fcfg.engine, images.device, cache_dir=fcfg.cache_dir, backbone_name=name, backbone_hash=bhash,
        image_size=images.pre.image_size, channels_last=fcfg.channels_last))
    return Extractor(name, bhash, images, forward, batch_size=fcfg.batch_size, **options)


def view_features(ex: Extractor, paths: Sequence[Path], cache_dir: Path | None,
                  views: int = 1) -> tuple[torch.Tensor, FeatureInfo]:
    """-> (features (V, N, dim) float32, info). One cache file per view (the view is in the fingerprint)."""
    feats, infos = [], []
    for v in range(views):
        f, info = cached_features(ex, paths, cache_dir, view=v)
        feats.append(f)
        infos.append(info)
    if views == 1:
        return torch.stack(feats), infos[0]
    cache = ("hit" if all(i.cache == "hit" for i in infos) else "off" if infos[0].cache == "off" else "miss")
    return torch.stack(feats), FeatureInfo(cache, sum(i.seconds for i in infos), views=views,
                                           per_view=[i.to_dict() for i in infos])


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
        if idx is not None and idx.device != self.x.device:
            idx = idx.to(self.x.device)  # once per epoch, not a host index per batch
        for i in range(0, len(self.dataset), self.batch_size):
            j = slice(i, i + self.batch_size) if idx is None else idx[i:i + self.batch_size]
            yield self.x[j], self.y[j]


def mean_probabilities(logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation: the mean over views of each view's probabilities (float64 for the mean)."""
    probs = [torch.sigmoid(z.double()) for z in logits]
    return torch.stack(probs).mean(0)


class ViewAverage(nn.Module):
    """head on (B, dim) as usual; on (B, V, dim) -> logit of the views' mean probability (TTA), so the loss
    and the sigmoid downstream see ordinary logits."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.head(x)
        probs = mean_probabilities(self.head(x[:, v]) for v in range(x.shape[1]))
        return torch.logit(probs, eps=1e-6).float()


def tta_probabilities(head: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """(V, N, dim) or (N, dim) features -> (N, C) probabilities (mean over views)."""
    with torch.inference_mode():
        head = head.eval()
        views = feats if feats.dim() == 3 else feats.unsqueeze(0)
        return mean_probabilities(head(f.float()) for f in views)
