"""Training phases: head-only on cached features, then (freeze: false) the last backbone stages unfrozen.

The schedule the best single Planet models used: a few epochs that fit the new head on a fixed backbone
(cheap here: the cached-feature path), then end-to-end training of the top of the backbone at a lower
learning rate so the untrained head's large gradients do not wreck the pretrained features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from chiptag import distributed
from chiptag.errors import ChiptagError
from chiptag.models.head import Tagger


@dataclass
class Phase:
    name: str  # "head" (cached features) or "finetune" (images through the backbone)
    epochs: int
    loaders: Callable[[], object]  # -> train.Loaders, built when the phase starts
    param_groups: Callable[[nn.Module], list[dict]]
    step: dict = field(default_factory=dict)  # extra train_one_epoch arguments (accum, amp, channels_last)
    # A head on cached features is a few small matmuls per step: one thread avoids OpenMP barrier waits that
    # made it ~6x slower with 2 threads on a shared 2-core machine (benchmarks/frozen_training.py); None: as is.
    threads: int | None = None


@contextlib.contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def backbone_stages(net: nn.Module) -> list[nn.Module]:
    """The backbone's stages, input to output (what unfreeze_stages counts from the end)."""
    if hasattr(net, "layer4"):  # ResNet: stem, then the four residual stages
        return [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4]
    if hasattr(net, "features") and isinstance(net.features, nn.Sequential):  # EfficientNet
        return list(net.features)
    raise ChiptagError(f"unfreeze_stages: do not know the stages of {type(net).__name__}; use 'all'")


class PartialTrain(nn.Module):
    """Tagger whose frozen stages (and, with batchnorm: frozen, every BatchNorm) stay in eval mode in train():
    frozen means frozen, so their running statistics never move."""

    def __init__(self, tagger: Tagger, keep_eval: list[nn.Module]):
        super().__init__()
        self.tagger = tagger
        self.keep_eval = keep_eval  # a plain list: not registered twice in the state dict

    def train(self, mode: bool = True) -> PartialTrain:
        super().train(mode)
        for m in self.keep_eval:
            m.eval()
        return self

    def forward(self, x):
        return self.tagger(x)


def unfreeze(tagger: Tagger, stages: int | str, batchnorm: str) -> PartialTrain:
    """requires_grad on the last `stages` stages (or all), off elsewhere; -> the model to train."""
    net = tagger.backbone
    tagger.frozen = False
    all_stages = backbone_stages(net) if stages != "all" else [net]
    if stages != "all" and stages > len(all_stages):
        raise ChiptagError(f"unfreeze_stages {stages}: the backbone has {len(all_stages)} stages")
    live = all_stages if stages == "all" else all_stages[-stages:]
    for p in net.parameters():
        p.requires_grad_(False)
    for m in live:
        for p in m.parameters():
            p.requires_grad_(True)
    keep_eval = [m for m in all_stages if m not in live] if stages != "all" else []
    if batchnorm == "frozen":
        bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            for p in m.parameters():
                p.requires_grad_(False)
        keep_eval += bns
    return PartialTrain(tagger, keep_eval)


def finetune_groups(entry) -> Callable[[nn.Module], list[dict]]:
    """Head at learning_rate, backbone at learning_rate * backbone_lr_mult; trainable parameters only."""

    def groups(model: nn.Module) -> list[dict]:
        t = getattr(model, "module", model).tagger  # through DistributedDataParallel
        head = [p for p in t.head.parameters() if p.requires_grad]
        body = [p for p in t.backbone.parameters() if p.requires_grad]
        return [{"params": head, "lr": entry.learning_rate},
                {"params": body, "lr": entry.learning_rate * entry.backbone_lr_mult}]

    return groups


def head_groups(entry) -> Callable[[nn.Module], list[dict]]:
    return lambda model: [{"params": [p for p in model.parameters() if p.requires_grad],
                           "lr": entry.learning_rate}]


def plan(cfg, feature_loaders: Callable, image_loaders: Callable, tagger: Tagger,
         device: torch.device) -> list[Phase]:
    """freeze: true -> one head phase. freeze: false -> [head phase for unfreeze_after epochs], finetune."""
    entry, tr = cfg.model, cfg.training
    if entry.freeze:
        return [Phase("head", entry.epochs, feature_loaders, head_groups(entry), threads=1)]
    step = {"accum_steps": tr.grad_accum_steps, "amp": tr.amp, "channels_last": tr.channels_last}

    def images():
        ld = image_loaders()
        model = unfreeze(tagger, entry.unfreeze_stages, entry.batchnorm)
        if tr.channels_last:
            model.to(memory_format=torch.channels_last)
        ld.model = distributed.wrap(model, device)  # DistributedDataParallel under torchrun
        return ld

    phases = [Phase("finetune", entry.epochs - entry.unfreeze_after, images, finetune_groups(entry), step)]
    if entry.unfreeze_after:
        phases.insert(0, Phase("head", entry.unfreeze_after, feature_loaders, head_groups(entry), threads=1))
    return phases
