"""Backbone registry: name -> builder(weights) -> (feature extractor, feature dim, preprocessing).

One table (FAMILIES) covers every classification family of torchvision.models: per family, the module that
holds the classifier's last layer (ResNet `fc`, EfficientNet `classifier`, ConvNeXt `classifier.2` so its
LayerNorm stays, ViT `heads` ...), what replaces it (Identity: the module returns pooled features; SqueezeNet's
convolutional classifier becomes the global pooling it ended with), builder arguments, and the stage list
fine-tuning unfreezes (models.stages.STAGES, by family). REGISTRY holds every name torchvision lists.
models.head puts the custom head on top.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models import WeightsEnum

from chiptag.data.images import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from chiptag.errors import ChiptagError
from chiptag.models import timm_backbones
from chiptag.models.weights import read_state_dict


@dataclass(frozen=True)
class Family:
    head_attr: str  # dotted path of the module the custom head replaces
    sized: str | None = None  # builder argument that fixes the input size (ViT's position embedding, MaxViT)
    kwargs: tuple = ()  # extra builder arguments: (name, value) pairs
    drop_keys: tuple[str, ...] = ()  # weight-file keys of parts not built (auxiliary classifiers)
    pooled: bool = False  # the classifier is convolutional: replace it by global average pooling


# name prefix -> family; the longest matching prefix wins (resnext before resnet, efficientnet_v2 is its own).
_AUX = (("aux_logits", False), ("init_weights", False))  # no auxiliary heads: features come from the main path
FAMILIES: dict[str, Family] = {
    "resnet": Family("fc"), "regnet": Family("fc"),
    "shufflenet": Family("fc"), "googlenet": Family("fc", kwargs=_AUX, drop_keys=("aux1.", "aux2.")),
    "inception": Family("fc", kwargs=_AUX, drop_keys=("AuxLogits.",)),
    "efficientnet": Family("classifier"), "efficientnet_v2": Family("classifier"),
    "mobilenet": Family("classifier"), "mnasnet": Family("classifier"), "densenet": Family("classifier"),
    "alexnet": Family("classifier.6"), "vgg": Family("classifier.6"),  # keep the two 4096-wide layers
    "convnext": Family("classifier.2"), "maxvit": Family("classifier.5", sized="input_size"),
    "squeezenet": Family("classifier", pooled=True), "swin": Family("head"),
    "vit": Family("heads", sized="image_size"),
}


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum]
    head_attr: str  # the attribute the custom head replaces
    family: str = "resnet"


@dataclass
class Backbone:
    name: str
    net: nn.Module  # classifier replaced by Identity: images -> (N, dim) features
    dim: int
    preprocessing: Preprocessing
    weights_id: str  # "none", "file:<sha256 prefix>" or "<Enum>.<member>"
    head_attr: str


REGISTRY: dict[str, BackboneSpec] = {}


_ALIASES = {"resnext": "resnet", "wide_resnet": "resnet"}  # the same architecture with wider/grouped blocks


def family_of(name: str) -> str:
    for prefix, fam in _ALIASES.items():
        if name.startswith(prefix):
            return fam
    matches = [f for f in FAMILIES if name.startswith(f)]
    if not matches:
        raise ValueError(f"torchvision model {name!r} belongs to no family of chiptag.models.backbones.FAMILIES")
    return max(matches, key=len)


def register(name: str) -> None:
    fam = family_of(name)
    REGISTRY[name] = BackboneSpec(name, _builder(name, FAMILIES[fam]), tvm.get_model_weights(name),
                                  FAMILIES[fam].head_attr, fam)


def _builder(name: str, fam: Family) -> Callable[..., nn.Module]:
    """torchvision's builder with the family's arguments; `image_size` goes to a size-fixed architecture."""
    def build(weights=None, image_size: int | None = None) -> nn.Module:
        kwargs = dict(fam.kwargs)
        if fam.sized and image_size:
            kwargs[fam.sized] = image_size if fam.sized == "image_size" else (image_size, image_size)
        return getattr(tvm, name)(weights=weights, **kwargs)
    return build


def get_module(net: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        net = net[int(part)] if part.isdigit() else getattr(net, part)
    return net


def replace_head(net: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Put Identity (or, for a convolutional classifier, global pooling) where the classifier's last layer was."""
    if spec.family == "timm":  # built with num_classes=0: no classifier to replace
        return net
    parent_path, _, last = spec.head_attr.rpartition(".")
    parent = get_module(net, parent_path) if parent_path else net
    new = nn.AdaptiveAvgPool2d(1) if FAMILIES[spec.family].pooled else nn.Identity()
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)
    return net


for _n in tvm.list_models(module=tvm):  # every classification model torchvision has
    register(_n)


def get_spec(name: str) -> BackboneSpec:
    if name.startswith(timm_backbones.PREFIX):  # timm's own registry (optional extra)
        model = timm_backbones.model_name(name)
        return BackboneSpec(name, lambda weights=None, image_size=None: timm_backbones.create(model, image_size),
                            None, "", "timm")
    try:
        return REGISTRY[name]
    except KeyError:
        raise ChiptagError(f"unknown backbone {name!r}; valid: {', '.join(REGISTRY)}, "
                           "or timm:<model name> (with the timm extra)") from None


def _head_in_features(head: nn.Module) -> int:
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ChiptagError(f"cannot find the input size of classifier {head}")
    return layers[0].in_features if isinstance(layers[0], nn.Linear) else layers[0].in_channels


def _weights_member(spec: BackboneSpec, weights: str) -> WeightsEnum:
    if weights == "DEFAULT":
        return spec.weights_enum.DEFAULT
    try:
        return spec.weights_enum[weights]
    except KeyError:
        valid = ["DEFAULT", *spec.weights_enum.__members__, "null", "<path to a state-dict file>"]
        raise ChiptagError(f"unknown weights {weights!r} for {spec.name}; valid: {', '.join(valid)}") from None


def _download(spec: BackboneSpec, member: WeightsEnum, progress: bool) -> dict:
    """torchvision's own weights API; uses the hub cache when the file is already there (no network)."""
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name
    try:
        return member.get_state_dict(progress=progress, check_hash=False)
    except Exception as exc:  # URLError, timeouts, partial files: all mean "no usable weights here"
        raise ChiptagError(
            f"cannot load ImageNet weights {member} for {spec.name}: {exc.__class__.__name__}: {exc}. "
            f"Offline? Download {member.url} elsewhere and put it at {target} (or set weights to that file's "
            "path), or use `weights: null` (random init, for smoke tests only)."
        ) from None




def _apply_state(spec: BackboneSpec, net: nn.Module, state: dict, source: str) -> None:
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise ChiptagError(f"{source} does not fit {spec.name}: {first}") from None
    # A backbone-only file (no classifier) is fine: the classifier is replaced anyway.
    missing = [k for k in result.missing_keys if not k.startswith(spec.head_attr + ".")]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(FAMILIES[spec.family].drop_keys or "\0")]
    if missing or unexpected:
        raise ChiptagError(
            f"{source} does not fit {spec.name}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}")


def _no_weights(weights: str | None) -> bool:
    return weights is None or str(weights).lower() in ("none", "null")


def _weights_file(weights: str) -> bool:
    """Whether `weights` names a state-dict file (rather than a weights enum member)."""
    return Path(weights).suffix in (".pt", ".pth", ".bin") or Path(weights).exists()


def check_backbone(name: str, weights: str | None) -> None:
    """What build_backbone would refuse, found without building anything: an unknown backbone (or timm model),
    an unknown weights name, a weights file that is not there. Downloads are not attempted."""
    spec = get_spec(name)
    if _no_weights(weights):
        return
    if spec.family == "timm":
        if str(weights).upper() in ("DEFAULT", "PRETRAINED"):
            return
    elif not _weights_file(weights):
        _weights_member(spec, weights)
        return
    if not Path(weights).is_file():
        raise ChiptagError(f"weights file not found: {weights} (a path to a state-dict file"
                           + (", DEFAULT, pretrained" if spec.family == "timm" else ", DEFAULT, an enum name")
                           + " or null)")


def build_backbone(name: str, weights: str | None, image_size: int | None = None,
                   progress: bool = True) -> Backbone:
    """Build a feature extractor. weights: None, 'DEFAULT', an enum member name, or a state-dict path."""
    spec = get_spec(name)
    if spec.family == "timm":
        net, dim, pre, weights_id = timm_backbones.build(name, weights, image_size)
        return Backbone(name, net, dim, pre, weights_id, "")
    net = spec.builder(weights=None, image_size=image_size)
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    if _no_weights(weights):
        weights_id = "none"
    elif _weights_file(weights):
        state, weights_id = read_state_dict(Path(weights))
        _apply_state(spec, net, state, str(weights))
    else:
        member = _weights_member(spec, weights)
        _apply_state(spec, net, _download(spec, member, progress), str(member))
        tf = member.transforms()
        mean, std, size = tuple(tf.mean), tuple(tf.std), int(tf.crop_size[0])
        weights_id = str(member)
    dim = _head_in_features(get_module(net, spec.head_attr))
    replace_head(net, spec)
    pre = Preprocessing(image_size or size, tuple(map(float, mean)), tuple(map(float, std)))
    return Backbone(name, net, dim, pre, weights_id, spec.head_attr)


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB stem's (O, 3, k, k) filters -> (O, channels, k, k), as timm's adapt_input_conv: the RGB filters
    kept for the first three bands (the ones data.bands maps to R, G, B), every other band (or, under three
    bands, each band) from the RGB filters' mean, all scaled by 3/channels so a standardised input gives
    activations of the same size as before. One band: the sum of the RGB filters."""
    mean = weight.mean(dim=1, keepdim=True)
    kept = weight if channels >= 3 else weight[:, :0]
    new = torch.cat([kept, mean.repeat(1, channels - kept.shape[1], 1, 1)], dim=1)
    return new * (3.0 / channels)


def first_conv(net: nn.Module) -> nn.Conv2d:
    """The stem convolution that takes the image: timm names it (pretrained_cfg first_conv); in a torchvision
    model it is the first Conv2d registered (ResNet conv1, EfficientNet features.0.0, ViT conv_proj: every
    torchvision family builds its stem first)."""
    name = (getattr(net, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if name:
        return net.get_submodule(name)
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ChiptagError(f"cannot find the stem convolution of {net.__class__.__name__} to adapt to bands")
    return conv


def adapt_stem(net: nn.Module, channels: int) -> nn.Module:
    """The backbone's stem taking `channels` bands (adapt_input_conv on its weights, in place), torchvision and
    timm alike. 3 channels: unchanged."""
    if channels == 3:
        return net
    conv = first_conv(net)
    if conv.in_channels != 3 or conv.groups != 1:
        raise ChiptagError(f"the stem convolution of {net.__class__.__name__} takes {conv.in_channels} channels "
                           f"in {conv.groups} group(s); only a plain RGB stem can be adapted to {channels} bands")
    with torch.no_grad():
        conv.weight = nn.Parameter(adapt_input_conv(conv.weight.detach(), channels),
                                   requires_grad=conv.weight.requires_grad)
    conv.in_channels = channels
    if getattr(net, "transform_input", False):  # GoogLeNet/Inception re-normalise 3 ImageNet channels
        net.transform_input = False
    return net


def state_fingerprint(net: nn.Module) -> str:
    """Hash of a module's parameters and buffers: two backbones with equal hashes give equal features."""
    h = hashlib.sha256()
    for key, t in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
