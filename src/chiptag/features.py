"""Frozen-backbone features: extracted once per image (and view), cached on disk as float16, reused.

The cache key covers everything that changes the numbers: the backbone's actual parameters (a hash, so
random-init and file weights are covered too), the preprocessing, the view, and each image's name, size and
modification time. Files carry a SHA-256 of their features and are written to a temporary name and renamed;
extraction saves chunks as it goes and resumes from them (chiptag.cachefile), so an interrupted extraction
is continued, a half-written cache never looks complete, and a corrupt one is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from chiptag import distributed, fastload
from chiptag.cachefile import PartialCache, load_features, save_features
from chiptag.data.images import Preprocessing
from chiptag.errors import ChiptagError
from chiptag.extract_engines import Forward, torch_forward
from chiptag.fastload import RawImageDataset
from chiptag.interrupt import Interrupted, ignore_sigint_in_worker, stop_requested
from chiptag.progress import console, progress_bar

CACHE_VERSION = 2  # 2: files carry a sha256 of their features
CHUNK_IMAGES = 2048  # progress is saved at least every this many images (and on SIGINT/SIGTERM)


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
            show_progress: bool = True, label: str = "extract", forward: Forward | None = None,
            should_stop: Callable[[], object] | None = None) -> torch.Tensor:
    """Backbone forward over images -> (N, dim) float16 on CPU. The backbone is put in eval mode.

    Workers (or, with num_workers 0, a thread) decode the next batches while the forward runs;
    `forward` is an engine from chiptag.extract_engines (default: eager torch).
    should_stop: polled after each batch; when true, returns the rows done so far (fewer than len(paths))."""
    forward = forward or torch_forward(net, torch.device(device), channels_last=False)
    data = RawImageDataset(paths, pre, view=view)
    loader = fastload.prefetched(data, batch_size) if num_workers == 0 else DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda", collate_fn=fastload.collate,
        worker_init_fn=ignore_sigint_in_worker)
    chunks = []
    with progress_bar(len(paths), label, enabled=show_progress) as advance:
        for x, _ in loader:
            # uint8 crosses to the device (a quarter of the bytes) and is normalised there
            x = x.to(device, non_blocking=True)
            chunks.append(forward(fastload.normalize(x, pre)).cpu().half())
            advance(len(x))
            if should_stop is not None and should_stop():
                break
    return torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.float16)


def _extract_resumable(net, paths: Sequence[Path], pre: Preprocessing, key: str, path: Path, view: int,
                       info: dict, **kwargs) -> torch.Tensor:
    """Extract in chunks saved next to `path`, continuing from a previous interrupted extraction."""
    partial = PartialCache(path, key)
    chunks, dropped = partial.load()
    for note in dropped:
        console.print(f"[yellow]warning:[/] partial feature cache chunk dropped and recomputed: {note}")
    done = sum(len(c) for c in chunks)
    if done:
        info["resumed_from"] = done
        console.print(f"resuming feature extraction at image {done}/{len(paths)} ({partial.dir})")
    while done < len(paths):
        part = extract(net, paths[done:done + CHUNK_IMAGES], pre, view=view, should_stop=stop_requested, **kwargs)
        partial.save(done, part)
        chunks.append(part)
        done += len(part)
        signum = stop_requested()
        if signum and done < len(paths):
            raise Interrupted(signum, f"feature extraction stopped at image {done}/{len(paths)}; progress "
                                      f"saved in {partial.dir}")
    feats = torch.cat(chunks) if chunks else torch.empty(0, 0, dtype=torch.float16)
    save_features(path, key, feats, [p.name for p in paths])
    partial.clear()
    return feats


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
    info: dict = {"cache": "miss", "path": str(path)}
    if path.is_file():
        feats, problem = load_features(path, key, len(paths))
        if feats is not None:
            return feats, {"cache": "hit", "path": str(path), "seconds": 0.0}
        console.print(f"[yellow]warning:[/] feature cache {path} is not usable: {problem}; recomputing it")
        info["recomputed_because"] = problem
        path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    if distributed.active():  # each rank extracts its shard; gathered on every rank; rank 0 writes the cache
        feats = distributed.shard_extract(extract, net, paths, pre, view=view, **kwargs)
        if distributed.is_main():
            save_features(path, key, feats, [p.name for p in paths])
    else:
        feats = _extract_resumable(net, paths, pre, key, path, view, info, **kwargs)
    seconds = time.perf_counter() - t0
    n_new = len(paths) - info.get("resumed_from", 0)
    return feats, {**info, "seconds": seconds, "images_per_s": n_new / seconds if seconds else None}
