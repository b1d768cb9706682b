"""Augmentation of training chips for end-to-end (fine-tuning) phases: the config's `augment` section.

    aug = Augment.of(cfg.augment, seed)          # frozen, small: travels to DataLoader workers
    x = aug(x, idx, epoch)                        # decoded batch -> augmented float batch, same device

Every chip's transform is drawn from (seed, epoch, the chip's index in its split): not from a stream that
depends on batch order, worker count or device. So an epoch's augmentation is the same whether its batches
are decoded by 0 or 4 workers, on the CPU (in the workers, inside the collate function) or on CUDA (after the
nvJPEG batch decode, on the device), and an interrupted run resumes to the same result without saving any
augmentation state.

The transforms, in order: D4 (one of the 8 flips/rotations of the square: chips have no "up"), a scale jitter
(a random square crop of the chip as `data.resize` made it, side in [1 - scale, 1], resized back to the model's
size: a mild zoom that keeps the whole-chip geometry), brightness and contrast factors in [1 - b, 1 + b], and
for RGB a hue rotation of up to `hue` of a turn (YIQ space). Multiband chips (float, the raster's units) take
the geometric and brightness/contrast transforms; hue has no meaning for them. The cached-feature (frozen)
path does not use this: it caches the 8 D4 views instead (features.views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from chiptag.data.images import d4

# YIQ <-> RGB (NTSC): a hue rotation is a rotation of the (I, Q) plane
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


@dataclass(frozen=True)
class Augment:
    d4: bool = True
    scale: float = 0.0  # crop side drawn from [1 - scale, 1] of the chip
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0
    hue: float = 0.0  # RGB only: rotation drawn from [-hue, hue] turns
    seed: int = 0

    @classmethod
    def of(cls, section, seed: int) -> Augment:
        """From the config's `augment` section (config.AugmentConfig)."""
        return cls(section.d4, section.scale, section.brightness, section.contrast, section.hue, seed)

    @property
    def active(self) -> bool:
        return bool(self.d4 or self.scale or self.brightness or self.contrast or self.hue)

    def describe(self) -> str:
        """What the summary and the runs table show: 'none', or e.g. 'd4, scale 0.1, brightness 0.2'."""
        parts = ["d4"] if self.d4 else []
        parts += [f"{name} {v:g}" for name, v in (("scale", self.scale), ("brightness", self.brightness),
                                                  ("contrast", self.contrast), ("hue", self.hue)) if v]
        return ", ".join(parts) or "none"

    def draw(self, idx: torch.Tensor, epoch: int) -> np.ndarray:
        """Per chip (rows of idx): [view, crop side, crop y, crop x, brightness, contrast, hue], each from the
        chip's own generator seeded with (seed, epoch, index)."""
        out = np.zeros((len(idx), 7))
        for row, i in enumerate(idx.tolist()):
            u = np.random.default_rng([self.seed, epoch, int(i)]).random(7)
            side = 1.0 - self.scale * u[1]
            out[row] = (int(u[0] * 8) if self.d4 else 0, side, u[2] * (1 - side), u[3] * (1 - side),
                        1 + self.brightness * (2 * u[4] - 1), 1 + self.contrast * (2 * u[5] - 1),
                        self.hue * (2 * u[6] - 1))
        return out

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """A decoded batch (uint8 RGB, or float multiband in raster units), its chips' indices and the epoch
        -> the augmented batch: float in [0, 1] for RGB, float raster units for multiband (what
        data.images.normalize takes), on x's device."""
        rgb = x.dtype == torch.uint8
        x = x.float().div_(255.0) if rgb else x.float()
        if not self.active:
            return x
        p = self.draw(idx, epoch)
        if self.d4:  # one flip/rotation per view present in the batch (at most 8 ops, not one per chip)
            views = torch.as_tensor(p[:, 0], dtype=torch.long)
            x = x.clone()
            for v in views.unique().tolist():
                if v:
                    rows = (views == v).nonzero().flatten().to(x.device)
                    x[rows] = d4(x[rows], v)
        if self.scale:
            x = torch.stack([self._zoom(c, p[k]) for k, c in enumerate(x)])
        if self.brightness or self.contrast:
            x = self._photometric(x, torch.as_tensor(p[:, 4:6], dtype=x.dtype, device=x.device), rgb)
        if self.hue and rgb:
            x = _rotate_hue(x, torch.as_tensor(p[:, 6] * 2 * math.pi, dtype=x.dtype, device=x.device))
        return x

    @staticmethod
    def _zoom(chip: torch.Tensor, p: np.ndarray) -> torch.Tensor:
        size = chip.shape[-1]
        side = max(1, round(p[1] * size))
        if side < size:
            y0, x0 = round(p[2] * size), round(p[3] * size)
            y0, x0 = min(y0, size - side), min(x0, size - side)
            crop = chip[None, :, y0:y0 + side, x0:x0 + side]
            chip = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
        return chip

    @staticmethod
    def _photometric(x: torch.Tensor, factors: torch.Tensor, rgb: bool) -> torch.Tensor:
        """brightness: x * b; contrast: blended with the chip's mean (per channel for multiband: bands have
        their own units; the grey level for RGB). RGB stays in [0, 1]."""
        b, c = factors[:, 0].view(-1, 1, 1, 1), factors[:, 1].view(-1, 1, 1, 1)
        x = x * b
        mean = x.mean(dim=(1, 2, 3), keepdim=True) if rgb else x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * c + mean
        return x.clamp_(0.0, 1.0) if rgb else x


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each chip's hue by its angle (radians): RGB -> YIQ, rotate (I, Q), -> RGB, clamped to [0, 1]."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(x), 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = _YIQ2RGB.to(x) @ rot @ _RGB2YIQ.to(x)  # (N, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, x).clamp_(0.0, 1.0)
