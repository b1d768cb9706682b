"""Frozen-backbone features: extracted once per image (and view), cached on disk (features.cache), reused.

The cache key covers everything that changes the numbers: the backbone's actual parameters (a hash, so
random-init and file weights are covered too), the preprocessing, the view, and each image's name, size and
modification time. Files carry a SHA-256 of their features and are written to a temporary name and renamed;
extraction saves chunks as it goes and resumes from them (features.cache), so an interrupted extraction
is continued, a half-written cache never looks complete, and a corrupt one is reported and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from chiptag import distributed
from chiptag.data.images import Preprocessing
from chiptag.data.inputs import ImageInput
from chiptag.errors import ChiptagError
from chiptag.features.backends import Forward
from chiptag.features.cache import PartialCache, load_features, save_features, stored
from chiptag.interrupt import Interrupted, stop_requested
from chiptag.progress import console, progress_bar

CACHE_VERSION = 4  # 2: sha256 of the features; 3: per-dimension scaled float16, data.resize;
#                   4: resize on uint8, the decoder in the fingerprint
TINY_FEATURES = 1e-6  # largest |feature| below this: a head's weights barely move, as if they were zero
CHUNK_IMAGES = 2048  # progress is saved about every this many images, in whole batches (and on SIGINT/SIGTERM)


@dataclass
class Extractor:
    """A backbone ready to extract: its forward (an engine from features.backends), what identifies its
    numbers in the cache (name, parameter hash, and its input's preprocessing and decoder), and how to feed it
    (`images`: the one input object, which holds the preprocessing, the device and the decoder)."""

    name: str
    backbone_hash: str
    images: ImageInput
    forward: Forward
    batch_size: int = 64
    num_workers: int = 0
    show_progress: bool = True
    label: str = "extract"


@dataclass
class FeatureInfo:
    """What one extraction did, for the log and summary.json["features"]."""

    cache: str  # hit | miss | off (no cache: fine-tuned backbones) | not used (no head phase)
    seconds: float = 0.0
    path: str | None = None
    images_per_s: float | None = None
    resumed_from: int | None = None  # images already in saved chunks of an interrupted extraction
    recomputed_because: str | None = None  # why an existing cache file was not used
    views: int = 1
    engine: str | None = None
    decoder: str | None = None  # which decoder produced the features (cpu | nvjpeg): data.decoders
    tta: bool | None = None
    degenerate: str | None = None  # what is wrong with the features (features.extraction.degenerate)
    per_view: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != []}


def fingerprint(backbone_hash: str, pre: Preprocessing, paths: Sequence[Path], view: int,
                decoder: str = "cpu") -> str:
    """The decoder is part of the key: nvJPEG and libjpeg decodes differ slightly (data.decoders), so features
    of one are never served as the other's."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "backbone": backbone_hash, "pre": pre.to_dict(),
                         "view": view, "decoder": decoder}, sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            raise ChiptagError(f"image not found: {p}") from None
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def degenerate(feats: torch.Tensor) -> str | None:
    """What is wrong with features no head can learn from (all zero, constant across images, vanishingly
    small), or None. feats: (..., N, dim)."""
    x = feats.float().reshape(-1, feats.shape[-1]) if feats.numel() else feats
    if not x.numel():
        return None
    top = float(x.abs().max())
    if top == 0:
        return "all zero"
    if len(x) > 1 and float((x.max(0).values - x.min(0).values).max()) == 0:
        return "constant across images"
    if top < TINY_FEATURES:
        return f"vanishingly small (largest |value| {top:.1e})"
    return None


def feature_warning(feats: torch.Tensor, backbone: str, weights: str | None) -> str | None:
    """A warning naming the backbone and what to do when its features are degenerate, else None."""
    what = degenerate(feats)
    if what is None:
        return None
    return (f"the frozen {backbone} (weights {weights}) gives features that are {what}: a head trained on them "
            "can only learn tag frequencies (the constant baseline). Use pretrained weights (model.weights: "
            "DEFAULT or a state-dict file), or train the backbone (model.freeze: false).")


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


def _feature_batches(ex: Extractor, paths: Sequence[Path], view: int) -> Iterator[torch.Tensor]:
    """Backbone forward over images, batch by batch -> (B, dim) float32 on CPU, through the one input path.
    One loader for all of `paths`: its workers live as long as the extraction (no restart per saved chunk)."""
    with progress_bar(len(paths), ex.label, enabled=ex.show_progress) as advance, \
            closing(ex.images.batches(paths, ex.batch_size, ex.num_workers, view=view)) as stream:
        for x, _, _ in stream:
            with torch.inference_mode():  # not around the yield: the consumer's mode is its own
                # float32 here: the cache's scaled float16 keeps what plain float16 would flush to 0
                f = ex.forward(ex.images.to_model(x)).float().cpu()
            yield f
            advance(len(f))


def extract(ex: Extractor, paths: Sequence[Path], *, view: int = 0,
            should_stop: Callable[[], object] | None = None) -> torch.Tensor:
    """Backbone forward over images -> (N, dim) float32 on CPU, through the one input object (data.inputs).

    should_stop: polled after each batch; when true, returns the rows done so far (fewer than len(paths))."""
    chunks = []
    with closing(_feature_batches(ex, paths, view)) as stream:
        for f in stream:
            chunks.append(f)
            if should_stop is not None and should_stop():
                break
    return torch.cat(chunks) if chunks else torch.empty(0, 0)


def _extract_resumable(ex: Extractor, paths: Sequence[Path], key: str, path: Path, view: int,
                       info: FeatureInfo) -> torch.Tensor:
    """Extract in chunks of about CHUNK_IMAGES saved next to `path`, continuing from a previous interrupted
    extraction. A stop request (SIGINT/SIGTERM) saves the rows done so far as a last, shorter chunk. Chunks end
    on batch boundaries, so a resumed extraction runs the very batches an uninterrupted one runs (a forward's
    last bits may depend on the batch it ran in), and they are exact (features.cache): resumed features are
    bit for bit the uninterrupted ones."""
    partial = PartialCache(path, key)
    chunks, dropped = partial.load()
    for note in dropped:
        console.print(f"[yellow]warning:[/] partial feature cache chunk dropped and recomputed: {note}")
    done = sum(len(c) for c in chunks)
    if done:
        info.resumed_from = done
        console.print(f"resuming feature extraction at image {done}/{len(paths)} ({partial.dir})")
    pending: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal done, pending
        part, pending = torch.cat(pending), []
        partial.save(done, part)
        chunks.append(part)
        done += len(part)

    with closing(_feature_batches(ex, paths[done:], view)) as stream:
        for f in stream:
            pending.append(f)
            if sum(len(t) for t in pending) >= CHUNK_IMAGES:
                flush()
            signum = stop_requested()
            if signum and pending:
                flush()
            if signum and done < len(paths):
                raise Interrupted(signum, f"feature extraction stopped at image {done}/{len(paths)}; progress "
                                          f"saved in {partial.dir}")
    if pending:
        flush()
    feats = stored(torch.cat(chunks) if chunks else torch.empty(0, 0))  # exactly what a cache hit returns
    save_features(path, key, feats, [p.name for p in paths])
    partial.clear()
    return feats


def cached_features(ex: Extractor, paths: Sequence[Path], cache_dir: Path | None, *,
                    view: int = 0) -> tuple[torch.Tensor, FeatureInfo]:
    """Features for `paths` from the cache, extracting (and caching) them when absent.

    cache_dir None: extract without caching (a fine-tuned backbone's features are used once)."""
    sharded = (lambda shard: extract(ex, shard, view=view))
    if cache_dir is None:
        t0 = time.perf_counter()
        feats = distributed.shard_extract(sharded, paths)
        return feats, FeatureInfo("off", time.perf_counter() - t0)
    pre, decoder = ex.images.pre, ex.images.decoder
    key = fingerprint(ex.backbone_hash, pre, paths, view, decoder)
    path = Path(cache_dir) / f"{ex.name}-{pre.image_size}px-v{view}-{key[:20]}.pt"
    info = FeatureInfo("miss", path=str(path), decoder=decoder)
    if path.is_file():
        feats, problem = load_features(path, key, len(paths))
        if feats is not None:
            return feats, FeatureInfo("hit", 0.0, path=str(path), decoder=decoder)
        console.print(f"[yellow]warning:[/] feature cache {path} is not usable: {problem}; recomputing it")
        info.recomputed_because = problem
        path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    if distributed.active():  # each rank extracts its shard; gathered on every rank; rank 0 writes the cache
        feats = stored(distributed.shard_extract(sharded, paths))
        if distributed.is_main():
            save_features(path, key, feats, [p.name for p in paths])
    else:
        feats = _extract_resumable(ex, paths, key, path, view, info)
    info.seconds = time.perf_counter() - t0
    n_new = len(paths) - (info.resumed_from or 0)
    info.images_per_s = n_new / info.seconds if info.seconds else None
    return feats, info
