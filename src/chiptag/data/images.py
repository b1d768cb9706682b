"""Decoding and preprocessing: file -> RGB uint8 tensor -> resized, normalised float tensor.

The same path serves extraction, end-to-end training and prediction, so a chip is preprocessed identically
everywhere. Normalisation uses the backbone weights' own mean/std (see models.backbones.Preprocessing).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from chiptag.errors import ChiptagError

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, but they still work and decode JPEG
# about twice as fast as Pillow; the warning would otherwise repeat once per image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))

    def key(self) -> str:
        return repr(sorted(asdict(self).items()))


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    """16-bit decodes (torchvision returns uint16 for 16-bit PNG) -> 8 bits, rounding v*255/65535."""
    if t.dtype == torch.uint8:
        return t
    return ((t.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def _pillow_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # Pillow's own convert would clip at 255
        gray = np.asarray(im, dtype=np.int64)
        gray = np.clip((gray * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to a 3xHxW uint8 RGB tensor. Grayscale, palette, RGBA/LA (alpha dropped), CMYK
    and 16-bit inputs are converted, the same way in training and prediction (both call this)."""
    path = Path(path)
    try:
        return _to_uint8(decode_image(str(path), mode=ImageReadMode.RGB))
    except Exception:  # torchvision cannot decode some inputs (some CMYK, 16-bit gray); Pillow is the fallback
        pass
    try:
        with Image.open(path) as im:
            arr = _pillow_rgb(im)
    except FileNotFoundError:
        raise ChiptagError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ChiptagError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def preprocess(img: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 3xHxW -> float 3xSxS, resized (whole chip, no crop: tags may sit at the edges) and normalised."""
    x = img.float().div_(255.0).unsqueeze(0)
    if x.shape[-2:] != (pre.image_size, pre.image_size):
        x = F.interpolate(x, size=(pre.image_size, pre.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return ((x - mean) / std).squeeze(0)


def d4(x: torch.Tensor, view: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square (view 0 is the identity). Works on (..., H, W)."""
    if not 0 <= view < 8:
        raise ValueError(f"D4 view must be in 0..7, got {view}")
    if view >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=view % 4, dims=(-2, -1))


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images (optionally with targets). Item: (image, target-or-index)."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, targets: np.ndarray | None = None,
                 view: int = 0):
        self.paths = list(paths)
        self.pre = pre
        self.targets = None if targets is None else torch.as_tensor(targets, dtype=torch.float32)
        self.view = view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = preprocess(read_rgb(self.paths[i]), self.pre)
        if self.view:
            x = d4(x, self.view)
        return x, (self.targets[i] if self.targets is not None else i)


def image_paths(root: Path, names: Sequence[str], extension: str) -> list[Path]:
    return [root / f"{n}{extension}" for n in names]
