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
from dataclasses import dataclass
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


NODATA_SHARE = 0.5  # a chip with more of its pixels nodata (in any band) has too little left to tag: a bad image
GDAL_NODATA = 42113  # the TIFF tag GDAL writes a band's nodata value in (ASCII, e.g. "0", "-9999", "nan")


class RasterProblem(ChiptagError):
    """A raster that cannot be used; `kind` is its pre-flight report kind (data.problems.KINDS)."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class BandReading:
    """How a raster file's pixels become the model's bands: which bands, what counts as no data and what to do
    with it, the band count the model's files have and the pixel cap. Built from a run's Preprocessing
    (`Preprocessing.reading`: predict, serve, evaluate, training batches) or from the config (pre-flight, band
    statistics: no means yet)."""

    bands: tuple[int, ...] | None = None  # 0-based, in the model's order; None: every band, in file order
    nodata: float | None = None  # data.nodata (raster units); None: the file's own GDAL_NODATA tag, when it has one
    fill: str = "error"  # data.fill: error (a nodata pixel is a bad image) | mean (the band's training mean)
    means: tuple[float, ...] | None = None  # fill mean: the value per band; None: nodata left NaN (pre-flight, stats)
    file_bands: int | None = None  # the band count of the training files; another count is refused (None: any)
    max_pixels: int | None = None  # data.max_image_pixels, checked on the header before decoding


def raster_shape(raw: bytes, name: str | Path) -> tuple[int, int, int, str]:
    """(bands, height, width, dtype) from the TIFF's first page header, without decoding pixels."""
    if raw and not is_tiff(raw):  # e.g. a JPEG given to a multiband model
        raise RasterProblem(f"{name} is not a TIFF: a multiband model reads its bands from TIFF rasters",
                            "not_an_image")
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            page = tif.pages.first
            h, w = int(page.imagelength), int(page.imagewidth)
            return int(page.samplesperpixel), h, w, str(page.dtype)
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError, struct.error) as exc:
        raise RasterProblem(f"cannot read TIFF {name}: {exc.__class__.__name__}: {exc}", "truncated") from None


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


def _file_nodata(tif) -> float | None:
    """The GDAL_NODATA tag's value (GDAL writes one value for every band), None when absent or unparsable."""
    tag = tif.pages.first.tags.get(GDAL_NODATA)
    try:
        return float(str(tag.value).strip().strip("\x00")) if tag is not None else None
    except ValueError:
        return None


def read_bands(raw: bytes, name: str | Path, reading: BandReading | Sequence[int] | None,
               max_pixels: int | None = None) -> np.ndarray:
    """TIFF bytes -> float32 (B, H, W): the bands `reading` asks for (a BandReading, or just the 0-based band
    list; None: all) of the first image, nodata handled as it says. Every way this can fail is a RasterProblem
    naming the file (and the band, for nodata): not a TIFF, corrupt or truncated data, an unsupported codec, too
    few bands or another band count than the model's files, complex samples, NaN/nodata pixels (data.fill:
    error) or mostly nodata, more pixels than the cap (checked on the header, before any pixel is decoded)."""
    if not isinstance(reading, BandReading):
        reading = BandReading(tuple(reading) if reading is not None else None)
    cap = max_pixels or reading.max_pixels
    tifffile = _tifffile()
    _, h, w, _ = raster_shape(raw, name)
    if cap and h * w > cap:
        raise RasterProblem(f"{name}: {w}x{h} px is over the pixel cap ({cap:,}; data.max_image_pixels): "
                            "refused before decoding", "bomb")
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            series = tif.series[0]  # bands as samples (contig or separate) or as a stack of pages
            arr, axes = series.asarray(), series.axes
            file_nodata = _file_nodata(tif)
    except Exception as exc:  # noqa: BLE001 - tifffile and its codecs raise many kinds on corrupt data
        raise RasterProblem(f"cannot decode TIFF {name}: {exc.__class__.__name__}: {str(exc)[:160]}") from None
    if arr.dtype.kind not in SAMPLE_KINDS:
        raise RasterProblem(f"{name}: {arr.dtype} samples are not supported (uint8, uint16, int16, float32; "
                            "complex SAR data: convert to amplitude or dB first)", "sample_type")
    if _frame_axis(axes):  # pages that are whole images (a multi-page RGB TIFF): the first, as Pillow reads it
        arr, axes = arr[0], axes[1:]
    other = [i for i, a in enumerate(axes) if a not in "YX"]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and len(other) == 1:
        arr = np.moveaxis(arr, other[0], 0)  # (bands, height, width) whichever way the file stores them
    else:
        raise RasterProblem(f"{name}: an image of shape {arr.shape} (axes {axes}); expected one chip of "
                            "(bands, height, width) or (height, width, bands)")
    if reading.file_bands is not None and arr.shape[0] != reading.file_bands:
        raise RasterProblem(f"{name} has {arr.shape[0]} band(s); the model was trained on {reading.file_bands}-band "
                            "files (another sensor or product: its bands would be misread)", "band_count")
    bands = list(reading.bands) if reading.bands is not None else list(range(arr.shape[0]))
    if arr.shape[0] < max(bands) + 1:
        raise RasterProblem(f"{name} has {arr.shape[0]} band(s); data.bands {bands} needs at least "
                            f"{max(bands) + 1}", "band_missing")
    arr = arr[bands]
    if arr.dtype == np.float64:  # read as float32; values float32 cannot hold would become inf, not data
        finite = arr[np.isfinite(arr)]
        if finite.size and np.abs(finite).max() > np.finfo(np.float32).max:
            raise RasterProblem(f"{name}: float64 values beyond float32's range ({np.abs(finite).max():.3g})",
                                "sample_type")
    return _nodata(arr.astype(np.float32), arr, name, bands, reading, file_nodata)


def _nodata(out: np.ndarray, arr: np.ndarray, name, bands: list[int], reading: BandReading,
            file_nodata: float | None) -> np.ndarray:
    """NaN/inf pixels and those equal to the nodata value (data.nodata, else the file's GDAL_NODATA tag):
    an error naming the file and band (fill: error), too many of them a bad image, otherwise filled with the
    band's training mean (fill: mean) or left NaN (no means given: pre-flight, statistics)."""
    value = reading.nodata if reading.nodata is not None else file_nodata
    mask = ~np.isfinite(out)
    if value is not None and not np.isnan(value):
        mask |= arr == value
    if not mask.any():
        return out
    where = "NaN/inf" if value is None else f"NaN/inf or nodata {value:g}"
    source = "" if value is None else (" (data.nodata)" if reading.nodata is not None else " (its GDAL_NODATA tag)")
    share = float(mask.any(axis=0).mean())
    if share > NODATA_SHARE:
        raise RasterProblem(f"{name}: {share:.0%} of its pixels are {where}{source} (over "
                            f"{NODATA_SHARE:.0%}): too little data to tag", "mostly_nodata")
    if reading.fill == "error":
        b = int(np.flatnonzero(mask.any(axis=(1, 2)))[0])
        raise RasterProblem(f"{name}: band {bands[b]} has {int(mask[b].sum())} {where} pixel(s){source}; "
                            "data.fill: mean fills them with the band's training mean", "nodata")
    if reading.means is None:
        out[mask] = np.nan
    else:
        for b in range(out.shape[0]):
            out[b][mask[b]] = reading.means[b]
    return out


def band_statistics(arrays, clip_percentiles: tuple[float, float] | None,
                    pixels_per_image: int = 4096, seed: int = 0) -> tuple[list[float], list[float],
                                                                          list[tuple[float, float]] | None]:
    """Per-band (mean, std, clip) of `arrays` (float32 (B, H, W) each, e.g. the training split's chips; NaN marks
    nodata, left out): a seeded sample of up to `pixels_per_image` pixels of each image, then per band the
    percentile clip range (when asked) and the mean/std of the clipped values — what normalisation uses."""
    rng = np.random.default_rng(seed)
    samples = []
    for a in arrays:
        flat = a.reshape(a.shape[0], -1)
        k = min(pixels_per_image, flat.shape[1])
        samples.append(flat[:, rng.choice(flat.shape[1], k, replace=False)] if k < flat.shape[1] else flat)
    if not samples:
        raise ChiptagError("no training images to compute band statistics from")
    x = np.concatenate(samples, axis=1).astype(np.float64)
    empty = np.isnan(x).all(axis=1)
    if empty.any():
        raise ChiptagError(f"band(s) {np.flatnonzero(empty).tolist()} (of the model's) are nodata in every sampled "
                           "training chip: nothing to normalise them with")
    clip = None
    if clip_percentiles is not None:
        lo, hi = np.nanpercentile(x, clip_percentiles, axis=1)
        clip = [(float(a), float(b)) for a, b in zip(lo, hi)]
        x = np.clip(x, lo[:, None], hi[:, None])  # NaN stays NaN
    mean, std = np.nanmean(x, axis=1), np.nanstd(x, axis=1)
    std = np.where(std > 0, std, 1.0)  # a constant band normalises to 0, not to inf
    return [float(v) for v in mean], [float(v) for v in std], clip


def config_reading(data) -> BandReading:
    """The BandReading data.* describes before training has statistics: nodata stays NaN (fill: mean) or is an
    error (fill: error). Pre-flight and band statistics read chips this way."""
    return BandReading(tuple(data.bands) if data.bands is not None else None, data.nodata, data.fill,
                       max_pixels=data.max_image_pixels)


def training_preprocessing(data, train_paths: Sequence[Path], base, seed: int = 0):
    """The multiband Preprocessing of a run: data.bands (None: every band of the first training chip, in file
    order), per-band statistics of a seeded sample of up to data.stats_images training chips (nodata pixels left
    out), the nodata policy (data.nodata, data.fill) and the training files' band count; image size and resize
    mode from `base` (the backbone's). Computed once, at training; it travels in the checkpoint."""
    from dataclasses import replace

    if not train_paths:
        raise ChiptagError("no training images to compute band statistics from")
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(train_paths), min(len(train_paths), data.stats_images), replace=False))
    file_bands = raster_shape(Path(train_paths[0]).read_bytes(), train_paths[0])[0]
    bands = data.bands if data.bands is not None else list(range(file_bands))
    reading = replace(config_reading(data), bands=tuple(bands), file_bands=file_bands)
    arrays = (read_bands(Path(train_paths[i]).read_bytes(), train_paths[i], reading) for i in picked)
    mean, std, clip = band_statistics(arrays, data.clip_percentiles, seed=seed)
    return replace(base, mean=tuple(mean), std=tuple(std), bands=tuple(bands),
                   clip=tuple(clip) if clip else None,
                   band_names=tuple(data.band_names) if data.band_names else None,
                   nodata=data.nodata, fill=data.fill, file_bands=file_bands)


def composite(bands: np.ndarray, percentiles: tuple[float, float] = (2, 98)) -> np.ndarray:
    """A raster chip (B, H, W) in its own units -> an RGB picture H x W x 3 in [0, 1]: its first three bands as
    R, G, B (one or two bands: the first as grey), each stretched between its own `percentiles` (2-98, as GIS
    viewers show a raster by default). NaN (unfilled nodata) shows black."""
    rgb = bands[:3] if bands.shape[0] >= 3 else np.repeat(bands[:1], 3, axis=0)
    rgb = np.moveaxis(np.asarray(rgb, dtype=np.float32), 0, -1)
    if np.isnan(rgb).all():
        return np.zeros(rgb.shape, np.float32)
    lo, hi = np.nanpercentile(rgb, percentiles, axis=(0, 1))
    out = (rgb - lo) / np.maximum(hi - lo, 1e-12)
    return np.nan_to_num(out, nan=0.0).clip(0.0, 1.0).astype(np.float32)
