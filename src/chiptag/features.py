"""Frozen-backbone features: extracted once per image (and view), cached on disk as float16, reused.

The cache key covers everything that changes the numbers: the backbone's actual parameters (a hash, so
random-init and file weights are covered too), the preprocessing, the view, and each image's name, size and
modification time. Files are written to a temporary name and renamed, so a half-written cache never looks
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from chiptag import distributed, fastload
from chiptag.data.images import Preprocessing
from chiptag.fastload import RawImageDataset
from chiptag.errors import ChiptagError
from chiptag.extract_engines import Forward, torch_forward
from chiptag.progress import progress_bar

CACHE_VERSION = 1


def fingerprint(backbone_hash: str, pre: Preprocessing, paths: Sequence[Path], view: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "backbone": backbone_hash, "pre": pre.to_dict(),
                         "view": view}, sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            raise ChiptagError(f"image not found: {p}") from None
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_workers(requested: int | str, device: str | torch.device | None = None) -> int:
    if requested != "auto":
        return int(requested)
    cores = os.cpu_count() or 1
    if device is not None and torch.device(device).type == "cpu" and cores <= 2:
        # The forward already uses every core: on 2 cores a decode worker preempted its threads and extraction
        # ran at 0.67 of the forward limit, against 0.87 decoding in-process (benchmarks/frozen_training.py).
        return 0
    # One decoding worker per spare core keeps the backbone (main process) busy; 0 on a single core.
    return max(0, min(8, cores - 1))


@torch.inference_mode()
def extract(net: torch.nn.Module, paths: Sequence[Path], pre: Preprocessing, *, batch_size: int = 64,
            device: str | torch.device = "cpu", num_workers: int = 0, view: int = 0,
            show_progress: bool = True, label: str = "extract", forward: Forward | None = None) -> torch.Tensor:
    """Backbone forward over images -> (N, dim) float16 on CPU. The backbone is put in eval mode.

    Workers (or, with num_workers 0, a thread) decode the next batches while the forward runs;
    `forward` is an engine from chiptag.extract_engines (default: eager torch)."""
    forward = forward or torch_forward(net, torch.device(device), channels_last=False)
    data = RawImageDataset(paths, pre, view=view)
    loader = fastload.prefetched(data, batch_size) if num_workers == 0 else DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", collate_fn=fastload.collate)
    chunks = []
    with progress_bar(len(paths), label, enabled=show_progress) as advance:
        for x, _ in loader:
            # uint8 crosses to the device (a quarter of the bytes) and is normalised there
            x = x.to(device, non_blocking=True)
            chunks.append(forward(fastload.normalize(x, pre)).cpu().half())
            advance(len(x))
    return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.float16)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cached_features(net: torch.nn.Module, backbone_name: str, backbone_hash: str, paths: Sequence[Path],
                    pre: Preprocessing, cache_dir: Path | None, *, view: int = 0,
                    **kwargs) -> tuple[torch.Tensor, dict]:
    """Features for `paths` from the cache, extracting (and caching) them when absent.

    cache_dir None: extract without caching (a fine-tuned backbone's features are used once).
    Returns (features, info) where info says whether it was a hit and how long extraction took."""
    if cache_dir is None:
        t0 = time.perf_counter()
        feats = distributed.shard_extract(extract, net, paths, pre, view=view, **kwargs)
        return feats, {"cache": "off", "seconds": time.perf_counter() - t0}
    key = fingerprint(backbone_hash, pre, paths, view)
    path = Path(cache_dir) / f"{backbone_name}-{pre.image_size}px-v{view}-{key[:20]}.pt"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if obj.get("fingerprint") == key and obj["features"].shape[0] == len(paths):
                return obj["features"], {"cache": "hit", "path": str(path), "seconds": 0.0}
        except Exception:  # unreadable cache: recompute below rather than trust it
            pass
    t0 = time.perf_counter()
    feats = distributed.shard_extract(extract, net, paths, pre, view=view, **kwargs)
    seconds = time.perf_counter() - t0
    if distributed.is_main():  # under torchrun every rank holds the gathered features; one writes them
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic({"fingerprint": key, "features": feats, "names": [p.name for p in paths]}, path)
    return feats, {"cache": "miss", "path": str(path), "seconds": seconds,
                   "images_per_s": len(paths) / seconds if seconds else None}
