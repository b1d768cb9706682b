"""Backbone registry: name -> builder(weights) -> (feature extractor, feature dim, preprocessing).

One table maps names to torchvision builders and the attribute that holds each architecture's classifier
(ResNet: `fc`, EfficientNet: `classifier`). Building replaces that attribute with Identity, so the module
returns pooled features; models.head puts the custom head on top.
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


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type[WeightsEnum]
    head_attr: str  # the attribute the custom head replaces


@dataclass
class Backbone:
    name: str
    net: nn.Module  # classifier replaced by Identity: images -> (N, dim) features
    dim: int
    preprocessing: Preprocessing
    weights_id: str  # "none", "file:<sha256 prefix>" or "<Enum>.<member>"
    head_attr: str


REGISTRY: dict[str, BackboneSpec] = {}


def register(name: str, head_attr: str) -> None:
    REGISTRY[name] = BackboneSpec(name, getattr(tvm, name), tvm.get_model_weights(name), head_attr)


for _n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register(_n, "fc")
for _n in (f"efficientnet_b{i}" for i in range(8)):
    register(_n, "classifier")


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ChiptagError(f"unknown backbone {name!r}; valid: {', '.join(REGISTRY)}") from None


def _head_in_features(head: nn.Module) -> int:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ChiptagError(f"cannot find the input size of classifier {head}")
    return linears[0].in_features


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


def _load_file(spec: BackboneSpec, path: Path) -> tuple[dict, str]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChiptagError(f"cannot load weights file {path}: {exc.__class__.__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ChiptagError(f"{path}: expected a state dict (mapping of tensor names to tensors)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return obj, f"file:{digest}"


def _apply_state(spec: BackboneSpec, net: nn.Module, state: dict, source: str) -> None:
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise ChiptagError(f"{source} does not fit {spec.name}: {first}") from None
    # A backbone-only file (no classifier) is fine: the classifier is replaced anyway.
    missing = [k for k in result.missing_keys if not k.startswith(spec.head_attr + ".")]
    if missing or result.unexpected_keys:
        raise ChiptagError(
            f"{source} does not fit {spec.name}: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(result.unexpected_keys)} unexpected key(s) {result.unexpected_keys[:3]}")


def build_backbone(name: str, weights: str | None, image_size: int | None = None,
                   progress: bool = True) -> Backbone:
    """Build a feature extractor. weights: None, 'DEFAULT', an enum member name, or a state-dict path."""
    spec = get_spec(name)
    net = spec.builder(weights=None)
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    if weights is None or str(weights).lower() in ("none", "null"):
        weights_id = "none"
    elif Path(weights).suffix in (".pt", ".pth", ".bin") or Path(weights).exists():
        if not Path(weights).is_file():
            raise ChiptagError(f"weights file not found: {weights}")
        state, weights_id = _load_file(spec, Path(weights))
        _apply_state(spec, net, state, str(weights))
    else:
        member = _weights_member(spec, weights)
        _apply_state(spec, net, _download(spec, member, progress), str(member))
        tf = member.transforms()
        mean, std, size = tuple(tf.mean), tuple(tf.std), int(tf.crop_size[0])
        weights_id = str(member)
    dim = _head_in_features(getattr(net, spec.head_attr))
    setattr(net, spec.head_attr, nn.Identity())
    pre = Preprocessing(image_size or size, tuple(map(float, mean)), tuple(map(float, std)))
    return Backbone(name, net, dim, pre, weights_id, spec.head_attr)


def state_fingerprint(net: nn.Module) -> str:
    """Hash of a module's parameters and buffers: two backbones with equal hashes give equal features."""
    h = hashlib.sha256()
    for key, t in sorted(net.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
