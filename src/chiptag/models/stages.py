"""What fine-tuning unfreezes: a backbone's stages, and a Tagger with the last N of them trainable.

Frozen stages stay in eval mode while the rest trains (PartialTrain), so their BatchNorm statistics never move.
"""

from __future__ import annotations

from torch import nn

from chiptag.errors import ChiptagError
from chiptag.models import timm_backbones
from chiptag.models.head import Tagger


def _children(net: nn.Module) -> list[nn.Module]:
    """Top-level blocks with parameters, in order (GoogLeNet, Inception, ShuffleNet: flat module lists)."""
    return [m for m in net.children() if any(True for _ in m.parameters())]


_RESNET = lambda n: [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4]  # noqa: E731
_FEATURES = lambda n: list(n.features)  # noqa: E731
# Family (models.backbones.FAMILIES) -> the backbone's stages, input to output. A classifier part that stays in
# the backbone (ConvNeXt's LayerNorm, MaxViT's pre-logits layer, Swin's final norm) is the last stage.
STAGES = {
    "resnet": _RESNET,
    "regnet": lambda n: [n.stem, *n.trunk_output],
    "efficientnet": _FEATURES, "efficientnet_v2": _FEATURES, "mobilenet": _FEATURES, "densenet": _FEATURES,
    "vgg": lambda n: [*n.features, n.classifier], "alexnet": lambda n: [*n.features, n.classifier],
    "squeezenet": _FEATURES, "mnasnet": lambda n: list(n.layers),
    "convnext": lambda n: [*n.features, n.classifier], "swin": lambda n: [*n.features, n.norm],
    "maxvit": lambda n: [n.stem, *n.blocks, n.classifier],
    # ViT: patch projection, each encoder block, final norm (class token and position embedding train with 'all')
    "vit": lambda n: [n.conv_proj, *n.encoder.layers, n.encoder.ln],
    "googlenet": _children, "inception": _children, "shufflenet": _children,
    "timm": lambda n: timm_backbones.stages(n),
}


def backbone_stages(net: nn.Module, family: str | None = None) -> list[nn.Module]:
    """The backbone's stages, input to output (what unfreeze_stages counts from the end)."""
    if family is None:  # a bare network: its family from the class torchvision (or timm) builds it with
        family = ("timm" if hasattr(net, "pretrained_cfg") else "resnet" if hasattr(net, "layer4")
                  else _family_of_class(net))
    stages = STAGES.get(family)
    if stages is None:
        raise ChiptagError(f"unfreeze_stages: do not know the stages of {type(net).__name__}; use 'all'")
    return [m for m in stages(net) if any(True for _ in m.parameters())]


def _family_of_class(net: nn.Module) -> str | None:
    names = {"EfficientNet": "efficientnet", "MobileNetV2": "mobilenet", "MobileNetV3": "mobilenet",
             "DenseNet": "densenet", "VGG": "vgg", "AlexNet": "alexnet", "SqueezeNet": "squeezenet",
             "MNASNet": "mnasnet", "ConvNeXt": "convnext", "SwinTransformer": "swin", "MaxVit": "maxvit",
             "VisionTransformer": "vit", "GoogLeNet": "googlenet", "Inception3": "inception",
             "ShuffleNetV2": "shufflenet", "RegNet": "regnet"}
    return names.get(type(net).__name__)


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
