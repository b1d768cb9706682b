"""Multiband raster chips (TIFF / GeoTIFF): read, pick bands, per-band statistics.

Read with tifffile (pinned with imagecodecs, which decodes the LZW and other codecs GeoTIFFs use): a pure-Python
wheel over numpy, no GDAL to install, and it reads what chips come as — uint8, uint16, int16 or float32 samples,
any band count, bands interleaved (H, W, B: "contig") or separate (B, H, W: "separate" planar config). rasterio
reads the same files through GDAL: a much larger binary dependency, and the georeferencing it adds is not used
to tag a chip.

A raster becomes the model's input through the same one input path as a JPEG (data.inputs.ImageInput): decode
(here) -> the bands the model sees, in its order (`data.bands`, 0-based, e.g. [2, 1, 0, 3] for Planet's
B,G,R,NIR files -> R,G,B,NIR), float32 (B, H, W) in the file's own units -> resize per band -> D4 view ->
batch -> normalise per band with statistics of the training split (`band_statistics`: mean/std after optional
percentile clipping), which travel in the checkpoint's Preprocessing like the RGB mean/std.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from chiptag.errors import ChiptagError

RASTER_EXTENSIONS = (".tif", ".tiff")
# samples kept as they are (as float32): integer counts and float reflectances. float64 is converted to float32
# (a chip's reflectances fit); complex (SAR) and other kinds are refused by name.
SAMPLE_KINDS = {"u", "i", "f"}
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def is_tiff(raw: bytes) -> bool:
    return raw[:4] in TIFF_MAGIC


def _tifffile():
    try:
        import tifffile
    except ImportError:  # a venv made before the dependency was pinned
        raise ChiptagError("multiband TIFF chips need tifffile and imagecodecs: pip install tifffile==2026.3.3 "
                           "imagecodecs==2026.3.6 (pinned in chiptag's dependencies)") from None
    return tifffile


def raster_shape(raw: bytes, name: str | Path) -> tuple[int, int, int, str]:
    """(bands, height, width, dtype) from the TIFF's first page header, without decoding pixels."""
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            page = tif.pages.first
            h, w = int(page.imagelength), int(page.imagewidth)
            return int(page.samplesperpixel), h, w, str(page.dtype)
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError, struct.error) as exc:
        raise ChiptagError(f"cannot read TIFF {name}: {exc.__class__.__name__}: {exc}") from None


def _frame_axis(axes: str) -> bool:
    """Whether a series' first axis counts images rather than bands: a stack of pages that each hold a
    multi-sample image (axes IYXS), not one page per band (IYX, the band-separate layout)."""
    return len(axes) == 4 and axes[0] not in "YXS" and axes.endswith("S")


def raster_frames(raw: bytes) -> int:
    """How many whole images a TIFF stacks (1 for a chip, whatever its band layout); the readers use the first."""
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            series = tif.series[0]
            return int(series.shape[0]) if _frame_axis(series.axes) else 1
    except Exception:  # noqa: BLE001 - a damaged file: read_bands reports it
        return 1


def read_bands(raw: bytes, name: str | Path, bands: Sequence[int] | None,
               max_pixels: int | None = None) -> np.ndarray:
    """TIFF bytes -> float32 (B, H, W): the `bands` (0-based, in this order; None: all) of the first image.
    Every way this can fail is a ChiptagError naming the file: not a TIFF, corrupt or truncated data, an
    unsupported codec, too few bands, complex samples, NaN/inf pixels, more pixels than `max_pixels`."""
    tifffile = _tifffile()
    _, h, w, _ = raster_shape(raw, name)
    if max_pixels and h * w > max_pixels:
        raise ChiptagError(f"{name}: {w}x{h} px is over the pixel cap ({max_pixels:,}; data.max_image_pixels)")
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            series = tif.series[0]  # bands as samples (contig or separate) or as a stack of pages
            arr, axes = series.asarray(), series.axes
    except Exception as exc:  # noqa: BLE001 - tifffile and its codecs raise many kinds on corrupt data
        raise ChiptagError(f"cannot decode TIFF {name}: {exc.__class__.__name__}: {str(exc)[:160]}") from None
    if arr.dtype.kind not in SAMPLE_KINDS:
        raise ChiptagError(f"{name}: {arr.dtype} samples are not supported (uint8, uint16, int16, float32)")
    if _frame_axis(axes):  # pages that are whole images (a multi-page RGB TIFF): the first, as Pillow reads it
        arr, axes = arr[0], axes[1:]
    other = [i for i, a in enumerate(axes) if a not in "YX"]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and len(other) == 1:
        arr = np.moveaxis(arr, other[0], 0)  # (bands, height, width) whichever way the file stores them
    else:
        raise ChiptagError(f"{name}: an image of shape {arr.shape} (axes {axes}); expected one chip of "
                           "(bands, height, width) or (height, width, bands)")
    if bands is not None:
        wanted = max(bands) + 1
        if arr.shape[0] < wanted:
            raise ChiptagError(f"{name} has {arr.shape[0]} band(s); data.bands {list(bands)} needs at least "
                               f"{wanted}")
        arr = arr[list(bands)]
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise ChiptagError(f"{name}: {bad} NaN/inf pixel value(s) (nodata?); fill them before training")
    return out


def band_statistics(arrays, clip_percentiles: tuple[float, float] | None,
                    pixels_per_image: int = 4096, seed: int = 0) -> tuple[list[float], list[float],
                                                                          list[tuple[float, float]] | None]:
    """Per-band (mean, std, clip) of `arrays` (float32 (B, H, W) each, e.g. the training split's chips):
    a seeded sample of up to `pixels_per_image` pixels of each image, then per band the percentile clip range
    (when asked) and the mean/std of the clipped values — what normalisation uses."""
    rng = np.random.default_rng(seed)
    samples = []
    for a in arrays:
        flat = a.reshape(a.shape[0], -1)
        k = min(pixels_per_image, flat.shape[1])
        samples.append(flat[:, rng.choice(flat.shape[1], k, replace=False)] if k < flat.shape[1] else flat)
    if not samples:
        raise ChiptagError("no training images to compute band statistics from")
    x = np.concatenate(samples, axis=1).astype(np.float64)
    clip = None
    if clip_percentiles is not None:
        lo, hi = np.percentile(x, clip_percentiles, axis=1)
        clip = [(float(a), float(b)) for a, b in zip(lo, hi)]
        x = np.clip(x, lo[:, None], hi[:, None])
    mean, std = x.mean(axis=1), x.std(axis=1)
    std = np.where(std > 0, std, 1.0)  # a constant band normalises to 0, not to inf
    return [float(v) for v in mean], [float(v) for v in std], clip


def training_preprocessing(data, train_paths: Sequence[Path], base, seed: int = 0):
    """The multiband Preprocessing of a run: data.bands (None: every band of the first training chip, in file
    order) and per-band statistics of a seeded sample of up to data.stats_images training chips; image size
    and resize mode from `base` (the backbone's). Computed once, at training; it travels in the checkpoint."""
    from dataclasses import replace

    if not train_paths:
        raise ChiptagError("no training images to compute band statistics from")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(train_paths), min(len(train_paths), data.stats_images), replace=False))
    bands = data.bands
    if bands is None:
        bands = list(range(raster_shape(Path(train_paths[0]).read_bytes(), train_paths[0])[0]))
    arrays = (read_bands(Path(train_paths[i]).read_bytes(), train_paths[i], bands, data.max_image_pixels)
              for i in picked)
    mean, std, clip = band_statistics(arrays, data.clip_percentiles, seed=seed)
    return replace(base, mean=tuple(mean), std=tuple(std), bands=tuple(bands),
                   clip=tuple(clip) if clip else None,
                   band_names=tuple(data.band_names) if data.band_names else None)
