"""Self-describing checkpoints: everything needed to predict without the config file, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chiptag import __version__
from chiptag.atomic import torch_save

from chiptag.data.images import Preprocessing
from chiptag.errors import ChiptagError
from chiptag.models.backbones import get_spec
from chiptag.models.head import HeadSpec, Tagger

FORMAT_VERSION = 1
REQUIRED = ("format_version", "backbone", "weights_id", "head", "tags", "thresholds", "preprocessing",
            "frozen", "state_dict")


def save(path: Path, *, tagger: Tagger, backbone: str, weights_id: str, head: HeadSpec, tags: list[str],
         thresholds: list[float], preprocessing: Preprocessing, config: dict, extra: dict | None = None) -> None:
    obj: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "chiptag_version": __version__, "backbone": backbone,
        "weights_id": weights_id, "head": head.to_dict(), "tags": list(tags),
        "thresholds": [float(t) for t in thresholds], "preprocessing": preprocessing.to_dict(),
        "frozen": tagger.frozen, "config": config, "state_dict": tagger.state_dict(), **(extra or {}),
    }
    torch_save(obj, path)


def load(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ChiptagError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChiptagError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None
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
    """Rebuild the exact model (no weights download: the backbone's parameters are in the checkpoint)."""
    spec = get_spec(ckpt["backbone"])
    net = spec.builder(weights=None)
    setattr(net, spec.head_attr, torch.nn.Identity())
    head = HeadSpec(**ckpt["head"]).build()
    tagger = Tagger(net, head, frozen=bool(ckpt["frozen"]))
    try:
        tagger.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ChiptagError(f"checkpoint weights do not fit {ckpt['backbone']}: {str(exc).splitlines()[0]}") from None
    return tagger.eval()


def preprocessing(ckpt: dict) -> Preprocessing:
    return Preprocessing.from_dict(ckpt["preprocessing"])
