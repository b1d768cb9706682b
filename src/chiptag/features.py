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

from chiptag.cachefile import PartialCache, load_features, save_features
from chiptag.data.images import ImageDataset, Preprocessing
from chiptag.errors import ChiptagError
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


def default_workers(requested: int | str) -> int:
    if requested != "auto":
        return int(requested)
    # One decoding worker per spare core keeps the backbone (main process) busy; 0 on a single core.
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@torch.inference_mode()
def extract(net: torch.nn.Module, paths: Sequence[Path], pre: Preprocessing, *, batch_size: int = 64,
            device: str | torch.device = "cpu", num_workers: int = 0, view: int = 0,
            show_progress: bool = True, label: str = "extract",
            should_stop: Callable[[], object] | None = None) -> torch.Tensor:
    """Backbone forward over images -> (N, dim) float16 on CPU. The backbone is put in eval mode.

    should_stop: polled after each batch; when true, returns the rows done so far (fewer than len(paths))."""
    net.eval().to(device)
    loader = DataLoader(ImageDataset(paths, pre, view=view), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                        worker_init_fn=ignore_sigint_in_worker if num_workers else None)
    chunks = []
    with progress_bar(len(paths), label, enabled=show_progress) as advance:
        for x, _ in loader:
            chunks.append(net(x.to(device, non_blocking=True)).float().cpu().half())
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
        feats = extract(net, paths, pre, view=view, **kwargs)
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
    feats = _extract_resumable(net, paths, pre, key, path, view, info, **kwargs)
    seconds = time.perf_counter() - t0
    n_new = len(paths) - info.get("resumed_from", 0)
    return feats, {**info, "seconds": seconds, "images_per_s": n_new / seconds if seconds else None}
