"""Self-describing checkpoints: everything needed to predict without the config file, written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from chiptag import __version__
from chiptag.atomic import torch_save
from chiptag.data.images import Preprocessing
from chiptag.errors import ChiptagError
from chiptag.models.backbones import get_spec, replace_head
from chiptag.models.head import HeadSpec, MeanProbability, Tagger
from chiptag.models.weights import read_torch_file

FORMAT_VERSION = 1
REQUIRED = ("format_version", "backbone", "weights_id", "head", "tags", "thresholds", "preprocessing",
            "frozen", "state_dict")


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about its model besides the weights: enough to rebuild it and preprocess."""

    backbone: str
    weights_id: str
    head: HeadSpec
    tags: list[str]
    preprocessing: Preprocessing
    config: dict


def save(path: Path, tagger: Tagger, card: ModelCard, thresholds: Sequence[float] | None, epoch: int) -> None:
    """thresholds None: a checkpoint written during training, before thresholds are tuned (0.5 each, the
    threshold the best epoch was chosen at); the final one carries the tuned thresholds."""
    if thresholds is None:
        thresholds = [0.5] * len(card.tags)
    obj: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "chiptag_version": __version__, "backbone": card.backbone,
        "weights_id": card.weights_id, "head": card.head.to_dict(), "tags": list(card.tags),
        "thresholds": [float(t) for t in thresholds], "preprocessing": card.preprocessing.to_dict(),
        "frozen": tagger.frozen, "config": card.config, "state_dict": tagger.state_dict(), "epoch": epoch,
    }
    if isinstance(tagger.head, MeanProbability):  # a k-fold ensemble: one backbone, the mean of K heads
        obj["members"] = len(tagger.head.members)
    torch_save(obj, path)


def load(path: Path) -> dict:
    path = Path(path)
    obj = read_torch_file(path, "checkpoint")
    if not isinstance(obj, dict):
        raise ChiptagError(f"{path} is not a chiptag checkpoint")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise ChiptagError(f"{path} is not a chiptag checkpoint or is damaged: missing {', '.join(missing)}")
    if obj["format_version"] != FORMAT_VERSION:
        raise ChiptagError(f"{path} has checkpoint format {obj['format_version']} (written by chiptag "
                           f"{obj.get('chiptag_version', '?')}); this chiptag {__version__} reads format "
                           f"{FORMAT_VERSION}")
    return obj


def build_tagger(ckpt: dict) -> Tagger:
    """The model a checkpoint describes, untrained: one backbone + head, one backbone + K heads averaged
    (`members`, a k-fold run), or several whole models averaged (`ensemble`: member checkpoints without
    weights, `chiptag ensemble`; their weights are in the ensemble's state_dict)."""
    if ckpt.get("ensemble"):
        return Tagger(torch.nn.Identity(), MeanProbability([build_tagger(m) for m in ckpt["ensemble"]]),
                      frozen=False)
    spec = get_spec(ckpt["backbone"])
    net = replace_head(spec.builder(weights=None, image_size=ckpt["preprocessing"]["image_size"]), spec)
    head = HeadSpec(**ckpt["head"]).build()
    if ckpt.get("members"):
        head = MeanProbability([HeadSpec(**ckpt["head"]).build() for _ in range(int(ckpt["members"]))])
    return Tagger(net, head, frozen=bool(ckpt["frozen"]))


def load_tagger(ckpt: dict) -> Tagger:
    """Rebuild the exact model (no weights download: the backbone's parameters are in the checkpoint)."""
    tagger = build_tagger(ckpt)
    try:
        tagger.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ChiptagError(f"checkpoint weights do not fit {ckpt['backbone']}: {str(exc).splitlines()[0]}") from None
    return tagger.eval()


def preprocessing(ckpt: dict) -> Preprocessing:
    return Preprocessing.from_dict(ckpt["preprocessing"])


def label_rules(ckpt: dict) -> dict:
    """The `labels` rules a checkpoint decodes with (its config's section; {} before there were rules)."""
    return (ckpt.get("config") or {}).get("labels") or {}
