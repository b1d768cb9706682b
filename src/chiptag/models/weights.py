"""Reading a weights file a config names (`weights: path/to/file.pt`): torchvision and timm backbones alike."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import torch

from chiptag.errors import ChiptagError


def read_torch_file(path: Path, what: str, raw: bytes | None = None):
    """torch.load(weights_only=True) of `path` (or of its bytes `raw`, already read), with one-line errors naming
    `what` and the file: checkpoints and weights files both load through here. A file that is not one never
    gets torch's advice to retry with weights_only=False: that would run whatever code the file holds."""
    path = Path(path)
    if raw is None and not path.is_file():
        raise ChiptagError(f"{what} not found: {path}")
    size = len(raw) if raw is not None else path.stat().st_size
    if size == 0:
        raise ChiptagError(f"cannot read {what} {path}: the file is empty (0 bytes), not a {what}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise about a file we refuse
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(raw) if raw is not None else path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's own messages end in advice that is unsafe here
        if "Unsupported global" in str(exc):  # a whole pickled model, an optimizer, custom classes
            advice = " Save the weights alone: torch.save(model.state_dict(), path)" if what == "weights file" else ""
            raise ChiptagError(f"cannot read {what} {path}: it holds Python objects besides tensors and plain "
                               f"containers, so it is not a {what} chiptag loads (loading it would run code from "
                               f"the file).{advice}") from None
        # a text file, random bytes, a truncated or damaged zip
        raise ChiptagError(f"cannot read {what} {path}: not a {what}, or a damaged one (not a complete file "
                           f"torch.save wrote; {exc.__class__.__name__})") from None


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
