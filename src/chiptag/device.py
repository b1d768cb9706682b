"""Device choice shared by training, prediction and serving: `auto` is CUDA when available, else CPU.

One rule everywhere, so the CLI and the Python API compute on the same device by default (the numbers of a
cuDNN/TF32 GPU forward differ from the CPU's by up to ~6e-5 in probability, measured on an H200).
"""

from __future__ import annotations

import torch

from chiptag.errors import ChiptagError


def resolve_device(name: str | torch.device = "auto", what: str = "device") -> torch.device:
    """auto, cpu, cuda, cuda:N (or a torch.device) -> torch.device; a clear error for a bad or absent one."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ChiptagError(f"{what}: unknown device {name!r} (use auto, cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChiptagError(f"{what} is {name} but no CUDA device is available; use auto or cpu")
    return dev
