"""`backbone: timm:<model name>`: any timm model as a frozen or fine-tuned backbone (the optional timm extra).

timm builds the model without its classifier (`num_classes=0`: forward returns pooled features), its
`pretrained_cfg` gives the preprocessing (mean, std, native input size) and its `feature_info` the stages that
fine-tuning unfreezes (models.stages). weights: null (random init), a path to a timm state-dict file, or
DEFAULT / pretrained: timm's own weights, which it downloads from the Hugging Face hub only because the config
asks; offline, the error says what to do instead.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from chiptag.data.images import Preprocessing
from chiptag.errors import ChiptagError
from chiptag.models.weights import read_state_dict

PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:
        raise ChiptagError("timm backbones need the optional timm extra: pip install 'chiptag[timm]'") from None
    return timm


def model_name(name: str) -> str:
    """'timm:resnet10t' -> 'resnet10t', checked against timm's registry (close names suggested)."""
    timm, model = _timm(), name.removeprefix(PREFIX)
    if not timm.is_model(model):
        near = difflib.get_close_matches(model, timm.list_models(), n=5)
        raise ChiptagError(f"unknown timm model {model!r}" + (f"; close: {', '.join(near)}" if near else "")
                           + " (timm.list_models('pattern*') lists them)")
    return model


def create(name: str, image_size: int | None = None, pretrained: bool = False) -> nn.Module:
    """The timm model without classifier; a ViT-style model is built for `image_size` (its position
    embedding depends on it), a convolutional one takes any size."""
    timm, model = _timm(), model_name(name)
    try:
        return timm.create_model(model, pretrained=pretrained, num_classes=0,
                                 **({"img_size": image_size} if image_size else {}))
    except TypeError:  # convolutional models have no img_size argument
        return timm.create_model(model, pretrained=pretrained, num_classes=0)


def _pretrained(name: str, image_size: int | None) -> nn.Module:
    try:
        return create(name, image_size, pretrained=True)
    except ChiptagError:
        raise
    except Exception as exc:  # no network, no cached file, gated repo: all mean "no usable weights here"
        raise ChiptagError(
            f"cannot load timm's pretrained weights for {name}: {exc.__class__.__name__}: {str(exc)[:200]}. "
            "Offline? Download the model's weights elsewhere (timm/huggingface hub cache, ~/.cache/huggingface), "
            "or save its state_dict to a file and set weights to that path, or use `weights: null`.") from None


def _load_file(net: nn.Module, name: str, path: Path) -> str:
    state, weights_id = read_state_dict(path)
    classifier = str(net.pretrained_cfg.get("classifier") or "\0")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}  # the head is replaced
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ChiptagError(f"{path} does not fit {name}: {str(exc).splitlines()[1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ChiptagError(f"{path} does not fit {name}: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
    return weights_id


def build(name: str, weights: str | None, image_size: int | None) -> tuple[nn.Module, int, Preprocessing, str]:
    """-> (features network, feature dim, preprocessing, weights id)."""
    if weights is None or str(weights).lower() in ("none", "null"):
        net, weights_id = create(name, image_size), "none"
    elif str(weights).upper() in ("DEFAULT", "PRETRAINED"):
        net = _pretrained(name, image_size)
        weights_id = f"timm:{net.pretrained_cfg.get('hf_hub_id') or net.pretrained_cfg.get('tag') or 'pretrained'}"
    else:
        net = create(name, image_size)
        weights_id = _load_file(net, name, Path(weights))
    cfg = net.pretrained_cfg
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    net.eval()
    with torch.no_grad():  # the pooled width: num_features is not it for every model (MobileNetV3's head conv)
        dim = int(net(torch.zeros(1, 3, size, size)).shape[1])
    pre = Preprocessing(size, tuple(map(float, cfg.get("mean", (0.485, 0.456, 0.406)))),
                        tuple(map(float, cfg.get("std", (0.229, 0.224, 0.225)))))
    return net, dim, pre, weights_id


def stages(net: nn.Module) -> list[nn.Module]:
    """The network cut into consecutive stages at timm's feature_info levels, input to output: stage i ends with
    the module feature level i comes from; the stem goes with the first level and whatever follows the last
    level (an EfficientNet's conv_head and bn2, a ViT's final norm) with the last stage. Every module of the net
    is in one stage (feature_info alone names only some: EfficientNet's blocks.3 and blocks.5 are no level)."""
    ends = [info["module"] for info in getattr(net, "feature_info", [])]
    if not ends:
        return []
    groups: list[list[nn.Module]] = [[]]
    for name, module in _in_order(net, "", ends):
        groups[-1].append(module)
        if name in ends and len(groups) < len(ends):
            groups.append([])
    return [g[0] if len(g) == 1 else nn.ModuleList(g) for g in groups if g]


def _in_order(module: nn.Module, prefix: str, ends: list[str]):
    """(name, module) of the children in registration order (timm registers them in forward order), opened
    wherever a feature level lies deeper inside."""
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if any(end.startswith(full + ".") for end in ends):
            yield from _in_order(child, full + ".", ends)
        else:
            yield full, child
