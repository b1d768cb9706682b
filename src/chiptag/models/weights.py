"""Reading a weights file a config names (`weights: path/to/file.pt`): torchvision and timm backbones alike."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from chiptag.errors import ChiptagError


def read_torch_file(path: Path, what: str, raw: bytes | None = None):
    """torch.load(weights_only=True) of `path` (or of its bytes `raw`, already read), with one-line errors naming
    `what` and the file: checkpoints and weights files both load through here."""
    path = Path(path)
    if raw is None and not path.is_file():
        raise ChiptagError(f"{what} not found: {path}")
    try:
        return torch.load(io.BytesIO(raw) if raw is not None else path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChiptagError(f"cannot read {what} {path}: {exc.__class__.__name__}: {exc}") from None


def read_state_dict(path: Path) -> tuple[dict, str]:
    """-> (the state dict, "file:<sha256 prefix>"). Accepts a bare state dict or one under `state_dict` / `model`
    (how training scripts commonly save them); anything else is a one-line error naming the file. The file is
    read once: its bytes are both hashed and loaded."""
    path = Path(path)
    if not path.is_file():
        raise ChiptagError(f"weights file not found: {path}")
    raw = path.read_bytes()
    obj = read_torch_file(path, "weights file", raw)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ChiptagError(f"{path}: expected a state dict (mapping of tensor names to tensors)")
    return obj, f"file:{hashlib.sha256(raw).hexdigest()[:16]}"
