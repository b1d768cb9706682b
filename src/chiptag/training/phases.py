"""Training phases: what each one trains, on what inputs, with which parameter groups.

freeze: true -> one `head` phase on cached features. freeze: false -> optionally `unfreeze_after` head epochs
(cheap: the cached-feature path), then a `finetune` phase on images with the last backbone stages unfrozen at a
lower learning rate, so the untrained head's large gradients do not wreck the pretrained features (the
schedule the best single Planet models used).

A phase's inputs hold the train loader's shuffling generator (`Inputs.gen`): its state is part of resume.pt,
so a resumed epoch replays the same batch order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from chiptag import distributed
from chiptag.data.augment import Augment
from chiptag.data.dataset import Dataset
from chiptag.data.inputs import ImageInput, labelled_loader
from chiptag.features.views import RandomViewSampler, TensorBatches, ViewAverage
from chiptag.models.head import Tagger
from chiptag.models.stages import backbone_stages, unfreeze
from chiptag.training.epoch import Step
from chiptag.training.settings import Optimisation

HEAD, FINETUNE = "head", "finetune"


@dataclass
class Inputs:
    """What a phase iterates: (inputs, targets) batches per split, and the train shuffling generator."""

    train: Iterable[tuple[torch.Tensor, torch.Tensor]]  # TensorBatches or data.inputs.LabelledBatches
    val: Iterable[tuple[torch.Tensor, torch.Tensor]]
    test: Iterable[tuple[torch.Tensor, torch.Tensor]]
    gen: torch.Generator


@dataclass
class Phase:
    name: str  # HEAD (cached features) or FINETUNE (images through the backbone)
    epochs: int
    inputs: Inputs
    # A head on cached features is a few small matmuls per step: one thread avoids OpenMP barrier waits that
    # made it ~6x slower with 2 threads on a shared 2-core machine (benchmarks/frozen_training.py); None: as is.
    threads: int | None = None

    def model(self, tagger: Tagger, optim: Optimisation, device: torch.device) -> nn.Module:
        """The module this phase trains: the head alone (views averaged for TTA), or the Tagger with its last
        stages unfrozen (DistributedDataParallel under torchrun)."""
        if self.name == HEAD:
            return ViewAverage(tagger.head)
        model = unfreeze(tagger, optim.unfreeze_stages, optim.batchnorm)
        if optim.channels_last:
            model.to(memory_format=torch.channels_last)
        return distributed.wrap(model, device)

    def param_groups(self, model: nn.Module, optim: Optimisation) -> list[dict]:
        """Trainable parameters only: the head at learning_rate (group 0); an unfrozen backbone at
        lr * backbone_lr_mult, or with layer_decay one group per stage, stage i from the top at
        lr * layer_decay^(i + 1) (parameters outside every stage, e.g. a ViT's class token, with the first)."""
        lr = optim.learning_rate
        if self.name == HEAD:
            return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
        tagger = getattr(model, "module", model).tagger  # through DistributedDataParallel
        head = {"params": [p for p in tagger.head.parameters() if p.requires_grad], "lr": lr}
        live = [p for p in tagger.backbone.parameters() if p.requires_grad]
        if not optim.layer_decay:
            return [head, {"params": live, "lr": lr * optim.backbone_lr_mult}]
        stages = backbone_stages(tagger.backbone)
        groups, seen = [], set()
        for i, stage in enumerate(reversed(stages)):
            params = [p for p in stage.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "lr": lr * optim.layer_decay ** (i + 1)})
        rest = [p for p in live if id(p) not in seen]
        if rest:
            groups.append({"params": rest, "lr": lr * optim.layer_decay ** (len(stages) + 1)})
        return [head, *groups]

    def step(self, loss_fn: nn.Module, device: torch.device, optim: Optimisation, progress: bool) -> Step:
        """How this phase's training step runs: a head on cached features takes plain steps; end-to-end steps
        take the accumulation, bf16 and memory-format options (and a progress bar: they are slow)."""
        if self.name == HEAD:
            return Step(loss_fn, device)
        return Step(loss_fn, device, optim.grad_accum_steps, optim.amp, optim.channels_last, progress,
                    optim.clip_grad_norm)


def plan(optim: Optimisation, freeze: bool, features: Inputs | None, images: Inputs | None) -> list[Phase]:
    if freeze:
        return [Phase(HEAD, optim.epochs, features, threads=1)]
    phases = [Phase(FINETUNE, optim.epochs - optim.unfreeze_after, images)]
    if optim.unfreeze_after:
        phases.insert(0, Phase(HEAD, optim.unfreeze_after, features, threads=1))
    return phases


def feature_inputs(feats: torch.Tensor, y: np.ndarray, splits: dict, batch_size: int, seed: int, tta: bool,
                   device: torch.device | str = "cpu") -> Inputs:
    """Batches of cached features (V, N, dim): each epoch one random view per chip; evaluation averages the
    views (TTA, `features.tta`) or uses the identity view. On CUDA the features and targets live on the device
    (float16: 1.3 GB for 40k chips x 8 views x 2048), so an epoch copies nothing per batch."""
    device = torch.device(device)
    y = torch.from_numpy(y)
    if device.type == "cuda":
        feats, y = feats.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    bs, views = batch_size, feats.shape[0]
    tta = views > 1 and tta

    def train_loader(idx):
        n = len(idx)
        if views == 1:
            return TensorBatches(feats[0, idx], y[idx], bs, order=lambda: torch.randperm(n, generator=gen))
        sampler = RandomViewSampler(n, views, gen)  # row v*n + i of the flattened views
        return TensorBatches(feats[:, idx].flatten(0, 1), y[idx].repeat(views, 1), bs, n, sampler.draw)

    def eval_loader(idx):  # TTA: (n, V, dim) rows, averaged by ViewAverage; otherwise the identity view
        return TensorBatches(feats[:, idx].transpose(0, 1) if tta else feats[0, idx], y[idx], bs)

    return Inputs(train_loader(splits["train"]), eval_loader(splits["val"]), eval_loader(splits["test"]), gen)


def image_inputs(ds: Dataset, splits: dict, images: ImageInput, batch_size: int, seed: int, workers: int,
                 augment: Augment | None = None) -> Inputs:
    """(normalised images, targets) batches of each split through the one input object (data.inputs: its
    decoder and device are resolved already); the train split's chips augmented (data.augment)."""
    gen = torch.Generator().manual_seed(seed)

    def loader(idx, train):
        return labelled_loader(images, [ds.paths[i] for i in idx], ds.table.y[idx], batch_size,
                               shuffle=train, generator=gen, seed=seed, num_workers=workers,
                               augment=augment if train else None)

    return Inputs(loader(splits["train"], True), loader(splits["val"], False), loader(splits["test"], False), gen)
