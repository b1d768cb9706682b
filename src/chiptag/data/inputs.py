"""The one input object: how every consumer turns a file path or uploaded bytes into the model's input.

    images = ImageInput.resolve(pre, device)        # decoder "auto": nvjpeg on CUDA, cpu elsewhere, chosen here once
    for x, idx, errors in images.batches(paths, 64, workers, view=v): f = forward(images.to_model(x))
    chip = images.chip(upload_bytes, name="a.jpg")  # decode -> resize mode -> D4 view, one uint8 chip
    x = images.stack([chip, ...])                   # -> normalised float32 batch on the device
    loader = labelled_loader(images, paths, targets, 32, shuffle=True, generator=gen)   # fine-tuning batches

Feature extraction, prediction, serving, the error-sheet tiles and fine-tuning all go through an ImageInput, so a
chip is decoded, resized, viewed and normalised the same way everywhere, and the cpu/nvjpeg decoder choice is
made once, when the object is built. The steps themselves live next door: data.images (decode, resize, D4,
normalise, the worker-side ImageDataset) and data.decoders (the nvjpeg batch source). Uint8 leaves the decoder
(a quarter of the bytes through shared memory and across to the device); normalisation runs once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from chiptag import distributed
from chiptag.data.augment import Augment
from chiptag.data.decoders import FileBytes, as_list, decode_batch, device_batches, resolve_decoder
from chiptag.data.images import (ImageDataset, Preprocessing, batches, collate, d4, decode, fit, normalize,
                                 read_image)
from chiptag.interrupt import ignore_sigint_in_worker

# uint8 images (N, 3, S, S) (multiband: float32 (N, B, S, S), raster units), indices, per-image errors
Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


@dataclass(frozen=True)
class ImageInput:
    """The model's preprocessing plus where its batches are decoded and computed. Frozen and small, so it
    travels to DataLoader workers inside a collate function.

    decoder: already resolved, "cpu" (libjpeg in workers) or "nvjpeg" (file bytes in workers, batches decoded
    on `device`); `resolve` applies the resolve_decoder rule. Built directly, "nvjpeg" on a CPU device runs the
    nvjpeg path with torchvision's CPU kernel (how CPU tests cover it)."""

    pre: Preprocessing
    device: torch.device = torch.device("cpu")
    decoder: str = "cpu"

    def __post_init__(self):
        if self.decoder not in ("cpu", "nvjpeg"):
            raise ValueError(f"ImageInput.decoder is resolved: cpu or nvjpeg, got {self.decoder!r} "
                             "(ImageInput.resolve applies the auto rule)")
        object.__setattr__(self, "device", torch.device(self.device))

    @classmethod
    def resolve(cls, pre: Preprocessing, device: torch.device | str, decoder: str = "auto") -> ImageInput:
        """The decoder by the one rule (data.decoders.resolve_decoder): auto -> nvjpeg on CUDA, cpu elsewhere."""
        device = torch.device(device)
        return cls(pre, device, resolve_decoder(decoder, device))

    # -- one chip: a file or uploaded bytes -------------------------------------------------------------------

    def chip(self, source: str | Path | bytes, *, name: str | Path | None = None, view: int = 0) -> torch.Tensor:
        """A file path or image bytes -> uint8 3xSxS on CPU (a multiband input: float32 BxSxS in the raster's
        units), decoded, resized by the run's mode and in D4 `view`:
        exactly the item ImageDataset yields for a file of the same bytes. ChiptagError names the file (or
        `name`, for bytes) when it cannot be read."""
        if isinstance(source, (bytes, bytearray)):
            img = decode(bytes(source), name if name is not None else "<bytes>", self.pre)
        else:
            img = read_image(source, self.pre)
        x = fit(img, self.pre)
        return d4(x, view) if view else x

    # -- batches --------------------------------------------------------------------------------------------

    def batches(self, paths: Sequence[Path], batch_size: int, num_workers: int, *, view: int = 0,
                keep_errors: bool = False, prefetch: int = 2) -> Iterator[Batch]:
        """Ordered uint8 batches of `paths` in D4 `view` from the decoder (on the device for nvjpeg; on CPU,
        pinned on CUDA, for cpu). keep_errors: an unreadable image is a zero image plus its message, else a
        ChiptagError naming it. A generator: closing it early (a stop request) shuts the workers down at once."""
        data = ImageDataset(paths, self.pre, view=view, keep_errors=keep_errors)
        if self.decoder == "nvjpeg":
            yield from device_batches(data, batch_size, num_workers, self.device, prefetch)
        else:
            yield from batches(data, batch_size, num_workers, self.device, prefetch)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) batch -> the model's normalised float32 input, on x's own device (a collate
        function normalises in its worker)."""
        return normalize(x, self.pre)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """A decoded uint8 batch -> normalised float32 on the device: uint8 crosses (a quarter of the bytes,
        asynchronously from pinned memory), normalisation runs there."""
        return self.normalize(x.to(self.device, non_blocking=True))

    def stack(self, chips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Chips from `chip` -> the normalised batch on the device (the server batches its uploads this way)."""
        return self.to_model(torch.stack(list(chips)))


class WithTargets:
    """collate_fn for training on images: -> (normalised batch, the targets of its rows). A class, not a
    closure, so DataLoader workers can pickle it; it augments (training batches) and normalises in the worker,
    on CPU. `epoch` is set before each pass (LabelledBatches.set_epoch): workers start with it."""

    def __init__(self, targets: np.ndarray | torch.Tensor, images: ImageInput, augment: Augment | None = None):
        self.targets, self.images = torch.as_tensor(targets, dtype=torch.float32), images
        self.augment, self.epoch = augment, 0

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, idx, _ = collate(batch)
        if self.augment is not None:
            x = self.augment(x, idx, self.epoch)
        return self.images.normalize(x), self.targets[idx]


class LabelledBatches:
    """(normalised images, targets) batches for fine-tuning: a DataLoader whose collate function decodes,
    augments and normalises in the workers (cpu decoder), or a DataLoader over FileBytes whose batches are
    decoded, augmented and normalised on the device (nvjpeg). Quacks like the DataLoader it wraps (len,
    dataset, sampler) for the epoch loop; `set_epoch` before a pass sets the epoch the augmentation draws from
    (and a DistributedSampler's shuffle)."""

    def __init__(self, loader: DataLoader, data: ImageDataset, targets: torch.Tensor, images: ImageInput,
                 augment: Augment | None):
        self.loader, self.data, self.targets, self.images, self.augment = loader, data, targets, images, augment
        self.dataset, self.sampler, self.epoch = loader.dataset, loader.sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.loader.collate_fn, WithTargets):
            self.loader.collate_fn.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):  # DistributedSampler: a new shuffle per epoch
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.images.decoder != "nvjpeg":
            yield from self.loader
            return
        for items in self.loader:
            x, idx, _ = decode_batch(items, self.data, self.images.device)
            if self.augment is not None:
                x = self.augment(x, idx, self.epoch)
            yield self.images.normalize(x), self.targets[idx.to(self.targets.device)]


def labelled_loader(images: ImageInput, paths: Sequence[Path], targets: np.ndarray, batch_size: int, *,
                    shuffle: bool = False, generator: torch.Generator | None = None, seed: int = 0,
                    num_workers: int = 0, augment: Augment | None = None) -> LabelledBatches:
    """(normalised images, float32 targets) batches of `paths` for fine-tuning (shuffle, augment) and its
    evaluation.

    shuffle: a new order each epoch from `generator` (its state is what resume saves); under torchrun a
    DistributedSampler seeded with `seed` gives each rank its shard and `batch_size` stays the global batch.
    augment: each chip transformed as drawn for (augment.seed, epoch, its index in `paths`) — in the workers
    (cpu decoder) or on the device after the batch decode (nvjpeg); None: as decoded.
    Workers ignore Ctrl-C (the main process finishes its step and saves progress). An unreadable image raises
    ChiptagError naming it: training data was validated first."""
    data = ImageDataset(paths, images.pre)
    y = torch.as_tensor(targets, dtype=torch.float32)
    augment = augment if augment is not None and augment.active else None
    nvjpeg = images.decoder == "nvjpeg"
    source = FileBytes(data.paths, data.pre) if nvjpeg else data  # nvjpeg: workers read bytes (decode the rest)
    common = {"num_workers": num_workers, "worker_init_fn": ignore_sigint_in_worker if num_workers else None,
              "collate_fn": as_list if nvjpeg else WithTargets(y, images, augment)}
    if shuffle and distributed.active():
        sampler = DistributedSampler(source, shuffle=True, seed=seed)
        loader = DataLoader(source, batch_size=max(1, batch_size // distributed.world()), sampler=sampler, **common)
    else:
        loader = DataLoader(source, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None,
                            pin_memory=images.device.type == "cuda", **common)
    return LabelledBatches(loader, data, y, images, augment)
