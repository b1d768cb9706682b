"""Verified feature-cache files: fingerprint + SHA-256 of the tensor bytes, atomic writes, resumable chunks.

Features are stored as float16 scaled per dimension (each column divided by its largest magnitude, the
float32 scales stored beside them): half the bytes of float32 with float16's ~3 significant digits relative
to each dimension's range, whatever its magnitude. Plain float16 flushed a random-init EfficientNet's ~1e-14
features to exactly 0 (benchmarks/feature_cache.py measures the options).

A cache file is trusted only when it loads, its fingerprint is the one asked for, its row count matches and
the SHA-256 of its features equals the stored one (torch.load does not check its zip CRCs, so a flipped bit
in the tensor data would otherwise load silently). Extraction writes `<final>.partial/<start>.pt` chunks as it
goes; the final file appears (by rename) only when every chunk is there, so a partial cache is never read as
complete, and an interrupted extraction resumes from its last chunk. Chunks hold float32, exactly what the
backbone gave: the one float16 encoding happens when the final file is written, over all rows at once, so a
resumed extraction gives bit for bit the features of an uninterrupted one (chunks encoded with their own
scales and re-encoded with the global ones were rounded twice: rows differed by up to 4.9e-4).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from chiptag.atomic import torch_save


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


ENCODING = "float16-scaled"
CHUNK_ENCODING = "float32"  # the chunks of an extraction in progress: lossless until the final encode


def encode(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, dim) float -> (float16 values in [-1, 1], float32 per-dimension scales)."""
    x = feats.float()
    scale = torch.maximum(x.amax(dim=0), -x.amin(dim=0)) if len(x) else torch.ones(x.shape[1:])
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.div(x, scale).half(), scale


def decode(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.mul(values, scale)  # float16 * float32 -> float32 in one pass


def stored(feats: torch.Tensor) -> torch.Tensor:
    """The features as a cache hit returns them, so a run that extracted them trains on exactly the same
    numbers as a later run that reads them."""
    return decode(*encode(feats))


def save_features(path: Path, key: str, feats: torch.Tensor, names: list[str], *, exact: bool = False) -> None:
    """exact: float32 as given, with unit scales (CHUNK_ENCODING, for chunks); else the scaled float16 cache."""
    if exact:
        values, scale, encoding = feats.float().contiguous(), torch.ones(feats.shape[1:]), CHUNK_ENCODING
    else:
        (values, scale), encoding = encode(feats), ENCODING
    torch_save({"fingerprint": key, "features": values, "scale": scale, "encoding": encoding, "names": names,
                "sha256": digest(values) + digest(scale)}, path)


def load_features(path: Path, key: str, n: int | None = None, *,
                  exact: bool = False) -> tuple[torch.Tensor | None, str]:
    """-> (features, "") when the file is complete and intact, else (None, what is wrong with it). exact: a
    chunk written with save_features(exact=True)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or damaged zip/pickle: any failure means "do not use"
        return None, f"unreadable ({exc.__class__.__name__})"
    if not isinstance(obj, dict) or not {"fingerprint", "features", "sha256"} <= set(obj):
        return None, "not a chiptag feature cache (or written by an older chiptag without a checksum)"
    if obj.get("encoding") != (CHUNK_ENCODING if exact else ENCODING) or "scale" not in obj:
        return None, f"written by an older chiptag ({obj.get('encoding') or 'plain float16'} features)"
    if obj["fingerprint"] != key:
        return None, "fingerprint mismatch (written for other images, weights or preprocessing)"
    feats = obj["features"]
    if n is not None and feats.shape[0] != n:
        return None, f"{feats.shape[0]} rows, expected {n}"
    if digest(feats) + digest(obj["scale"]) != obj["sha256"]:
        return None, "checksum mismatch (the file is corrupt)"
    return decode(feats, obj["scale"]), ""


class PartialCache:
    """Chunks of an extraction in progress, next to the final cache file."""

    def __init__(self, final: Path, key: str):
        self.dir = final.with_name(final.name + ".partial")
        self.key = key

    def load(self) -> tuple[list[torch.Tensor], list[str]]:
        """Intact chunks contiguous from image 0, and a note per chunk that was dropped (then recomputed)."""
        chunks: list[torch.Tensor] = []
        dropped: list[str] = []
        done = 0
        for f in sorted(self.dir.glob("*.pt")) if self.dir.is_dir() else []:
            start = int(f.stem) if f.stem.isdigit() else -1
            feats, why = load_features(f, self.key, exact=True) if start == done else (None, "not contiguous")
            if feats is None:
                dropped.append(f"{f.name}: {why}")
                f.unlink(missing_ok=True)
                continue
            chunks.append(feats)
            done += feats.shape[0]
        return chunks, dropped

    def save(self, start: int, feats: torch.Tensor) -> None:
        if len(feats):
            save_features(self.dir / f"{start:09d}.pt", self.key, feats, [], exact=True)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
