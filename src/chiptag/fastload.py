"""Extraction input pipeline: workers decode (and resize only if needed), the main process normalises.

Same numbers as data.images.preprocess (float /255 -> antialiased resize -> (x - mean) / std -> D4 view),
split so the per-image work in a decode worker is the minimum: a chip already at the model's size leaves
the worker as uint8 (a quarter of the bytes through shared memory, no float work), and normalisation runs
once per batch, vectorised, next to the forward. On a 2-core machine the decode worker shares the cores
with the forward, so every millisecond it saves is extraction throughput.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from chiptag.data.images import Preprocessing, d4, read_rgb


class RawImageDataset(torch.utils.data.Dataset):
    """Item: (uint8 3xSxS, or float 3xSxS in [0, 1] when resized, index)."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, view: int = 0):
        self.paths, self.pre, self.view = list(paths), pre, view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = read_rgb(self.paths[i])
        s = self.pre.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x.float().div_(255.0).unsqueeze(0), size=(s, s), mode="bilinear",
                              antialias=True, align_corners=False).squeeze(0)
        return (d4(x, self.view) if self.view else x), i


def collate(batch):
    """Stack uint8 and float items apart from each other only if a batch mixes them (odd-sized chips)."""
    xs = [x for x, _ in batch]
    if all(x.dtype == torch.uint8 for x in xs):
        return torch.stack(xs), torch.tensor([i for _, i in batch])
    return torch.stack([x.float().div(255.0) if x.dtype == torch.uint8 else x for x in xs]), \
        torch.tensor([i for _, i in batch])


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 or [0, 1] float batch -> the model's normalised input (float32)."""
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def prefetched(dataset: RawImageDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches decoded one ahead by a thread of this process (for num_workers 0): decoding overlaps the
    forward, which releases the GIL, without a worker process and its copies."""

    def load(start: int):
        return collate([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load, 0) if len(dataset) else None
        for start in range(0, len(dataset), batch_size):
            batch = nxt.result()
            if start + batch_size < len(dataset):
                nxt = pool.submit(load, start + batch_size)
            yield batch
