"""What the epoch loop iterates: cached features (head phase) or images (fine-tuning), per split.

The train loader's shuffling generator is exposed (`Loaders.gen`) because its state is part of the resume
state: a resumed epoch replays the same batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from chiptag import distributed
from chiptag.config import Config
from chiptag.data.images import ImageDataset
from chiptag.data.prepare import Dataset
from chiptag.features import default_workers
from chiptag.interrupt import ignore_sigint_in_worker
from chiptag.models.backbones import Backbone
from chiptag.models.head import Tagger
from chiptag.views import RandomViewSampler, TensorBatches, ViewAverage, view_features


@dataclass
class Loaders:
    train: object
    val: object
    test: object
    model: nn.Module  # what the engine trains: the head (on features) or the (partly unfrozen) Tagger
    extract: dict
    gen: torch.Generator  # the train loader's shuffling generator (its state is part of resume.pt)


def feature_loaders(cfg: Config, ds: Dataset, splits: dict, bb: Backbone, tagger: Tagger,
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
                   ViewAverage(tagger.head), info, gen)


def image_loaders(cfg: Config, ds: Dataset, splits: dict, bb: Backbone, tagger: Tagger) -> Loaders:
    workers = default_workers(cfg.training.num_workers)
    gen = torch.Generator().manual_seed(cfg.training.seed)
    init = ignore_sigint_in_worker if workers else None

    def loader(idx, shuffle):
        data = ImageDataset([ds.paths[i] for i in idx], bb.preprocessing, ds.table.y[idx])
        if shuffle and distributed.active():  # each rank its shard; batch_size stays the global batch
            sampler = DistributedSampler(data, shuffle=True, seed=cfg.training.seed)
            return DataLoader(data, batch_size=max(1, cfg.batch_size() // distributed.world()),
                              sampler=sampler, num_workers=workers, worker_init_fn=init)
        return DataLoader(data, batch_size=cfg.batch_size(), shuffle=shuffle, num_workers=workers,
                          generator=gen if shuffle else None, worker_init_fn=init)

    return Loaders(loader(splits["train"], True), loader(splits["val"], False), loader(splits["test"], False),
                   tagger, {"cache": "not used (freeze: false)"}, gen)
