"""What fine-tuning unfreezes: a backbone's stages, and a Tagger with the last N of them trainable.

Frozen stages stay in eval mode while the rest trains (PartialTrain), so their BatchNorm statistics never move.
"""

from __future__ import annotations

from torch import nn

from chiptag.errors import ChiptagError
from chiptag.models.head import Tagger


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
