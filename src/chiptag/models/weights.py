"""Reading a weights file a config names (`weights: path/to/file.pt`): torchvision and timm backbones alike."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from chiptag.errors import ChiptagError


def read_state_dict(path: Path) -> tuple[dict, str]:
    """-> (the state dict, "file:<sha256 prefix>"). Accepts a bare state dict or one under `state_dict` / `model`
    (how training scripts commonly save them); anything else is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ChiptagError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChiptagError(f"cannot load weights file {path}: {exc.__class__.__name__}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ChiptagError(f"{path}: expected a state dict (mapping of tensor names to tensors)")
    return obj, f"file:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
