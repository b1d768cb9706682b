"""Fast per-image checks: header reads, not full decodes, so 40k chips take seconds.

What each check costs and why it is enough:
- `os.stat` finds missing and empty files;
- `Image.open` reads only the header: format, mode and size (so a decompression bomb is caught before any
  pixel is decoded, and a PNG behind a `.jpg` name is seen);
- JPEG: a complete file ends with the EOI marker (FF D9); only when it is absent is the file decoded, to tell
  a truncated file from one with harmless trailing bytes; a complete one is decoded at 1/8 scale with strict
  libjpeg-turbo (data.images.jpeg_corruption), which reads all the entropy data and so finds corrupt data
  behind an intact EOI, at about half the cost of a full decode;
- PNG: `verify()` checks every chunk's CRC without decompressing pixels, which catches truncation and flips;
- other formats are rare for chips and are decoded in full.
`full=True` (data.full_check, `chiptag validate --full`) decodes every image in full with the training decoder.

Sizes: a side below data.min_side or more pixels than the cap are errors; with data.expected_size set, a
side more than 2x off it is an error too; otherwise an image far from the usual size is only noted (datasets
of posters, thumbnails and chips of any shape are all fine: data.resize makes them square).
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from chiptag.data.decoders import nvjpeg_can_take
from chiptag.data.images import decode_rgb, jpeg_corruption, read_rgb
from chiptag.data.problems import Report
from chiptag.data.rasters import BandReading, is_tiff
from chiptag.errors import ChiptagError

EXTENSION_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF",
                     ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF"}
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # read_rgb scales these to 8 bits
PILLOW_DEFAULT_MAX_PIXELS = 89_478_485
SIZE_TOLERANCE = 2.0  # a side more than 2x off the expected chip size is almost surely a different product


@dataclass
class ImageInfo:
    kind: str | None  # a report kind when the image is unusable, else None
    detail: str = ""
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    frames: int = 1  # >1: an animated or multi-page image, of which the decoders use the first frame
    nvjpeg: bool = False  # a JPEG nvJPEG decodes on the GPU (data.decoders.nvjpeg_can_take); e.g. not CMYK
    bands: int | None = None  # a raster's band count (TIFF, data.rasters)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def mode_label(im: Image.Image) -> str:
    """The source mode as counted in the report. Pillow opens 48-bit RGB PNGs as mode RGB (raw mode RGB;16B)."""
    raw = str(im.tile[0].args) if im.tile else ""
    return "16-bit" if im.mode in SIXTEEN_BIT or ";16" in raw else im.mode


_CAP_LOCK = threading.Lock()


def allow_pixels(max_pixels: int) -> None:
    """Make data.max_image_pixels the one cap. Pillow refuses images over twice its own global limit (89.5M
    pixels) while opening them, before chiptag sees their size: raised (never lowered) to the configured cap, an
    image the config allows is neither refused at validation nor by the Pillow decoder that follows."""
    with _CAP_LOCK:
        if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = max_pixels


def _bomb_detail(exc: Image.DecompressionBombError, max_pixels: int) -> str:
    """Pillow's refusal, told against the configured cap (its message quotes its own limit)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)):,} px > {max_pixels:,}" if found else f"over {max_pixels:,} px"


def frame_count(im: Image.Image) -> int:
    """Frames (pages) in an opened image. A JPEG's extra MPO pictures (a camera's preview) are not counted:
    libjpeg reads the primary picture, which is the image."""
    if im.format in ("JPEG", "MPO"):
        return 1
    return int(getattr(im, "n_frames", 1) or 1)


def _jpeg_complete(f) -> bool:
    f.seek(0, os.SEEK_END)
    end = f.tell()
    f.seek(max(0, end - 64))
    return b"\xff\xd9" in f.read()


def _deep_check(im: Image.Image, f, scan_jpeg: bool = True) -> None:
    """Raise when the image data is broken. `im` was opened from `f` and has only read its header."""
    if im.format == "PNG":
        im.verify()
    elif im.format == "JPEG" and _jpeg_complete(f):
        if not scan_jpeg:
            return
        f.seek(0)
        problem = jpeg_corruption(f.read())
        if problem:
            raise OSError(problem)
    else:
        f.seek(0)
        with Image.open(f) as again:
            again.load()


def _check_raster(raw: bytes, max_pixels: int, bands, decode: bool = True) -> ImageInfo:
    """A TIFF (data.rasters): header (band count, sample type, size, pixel cap), then a full decode of the
    bands asked for (chips are small; corrupt data, too few bands, complex samples, NaN/nodata pixels show
    there). `bands`: the band list, or a whole BandReading (nodata policy, the model's band count).
    decode=False: header only, for a caller that reads the bands next (read_bands raises the same problems)."""
    from chiptag.data.rasters import RasterProblem, raster_frames, raster_shape, read_bands  # tifffile: TIFF only

    try:
        n, h, w, dtype = raster_shape(raw, "the file")
    except ChiptagError as exc:
        return ImageInfo("truncated", str(exc)[:160], "TIFF")
    info = ImageInfo(None, "", "TIFF", f"{n}-band {dtype}", (w, h), frames=raster_frames(raw), bands=n)
    if w * h > max_pixels:
        return replace(info, kind="bomb", detail=f"{w}x{h} px > {max_pixels:,}")
    if not decode:
        return info
    try:
        read_bands(raw, "the file", bands)
    except RasterProblem as exc:
        return replace(info, kind=exc.kind, detail=str(exc)[:200])
    except ChiptagError as exc:
        return replace(info, kind="corrupt", detail=str(exc)[:200])
    return info


def check_image(source: Path | bytes, max_pixels: int = PILLOW_DEFAULT_MAX_PIXELS, full: bool = False,
                scan_jpeg: bool = True, bands: Sequence[int] | BandReading | None = None) -> ImageInfo:
    """source: an image file, or its bytes (the server checks uploads in memory, with the same checks).
    scan_jpeg=False skips the scan of a complete JPEG's data for corruption, for a caller that decodes it next
    with read_rgb/decode_rgb (strict libjpeg: the same corruption is an error there, for half the cost), and a
    TIFF's decode (read_bands finds the same problems). bands: a raster's band list, or its whole BandReading."""
    fmt = mode = size = None
    frames = 1
    allow_pixels(max_pixels)
    nvjpeg = False
    try:
        if (len(source) if isinstance(source, bytes) else os.stat(source).st_size) == 0:
            return ImageInfo("zero_bytes")
        if is_tiff(source[:4] if isinstance(source, bytes) else _head(source)):
            return _check_raster(source if isinstance(source, bytes) else Path(source).read_bytes(), max_pixels,
                                 bands, decode=scan_jpeg)
        with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as f, \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                fmt, mode, size = im.format, mode_label(im), im.size
                if size[0] * size[1] > max_pixels:
                    return ImageInfo("bomb", f"{size[0]}x{size[1]} px > {max_pixels:,}", fmt, mode, size)
                frames = frame_count(im)  # GIF and TIFF count by seeking, hence before the checks rewind f
                _deep_check(im, f, scan_jpeg)
                if fmt == "JPEG":
                    f.seek(0)
                    nvjpeg = nvjpeg_can_take(f.read(65536))  # the frame header is within the first segments
    except FileNotFoundError:
        return ImageInfo("image_missing")
    except PermissionError:
        return ImageInfo("image_unreadable", "permission denied")
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit, which is at least the cap
        return ImageInfo("bomb", _bomb_detail(exc, max_pixels))
    except UnidentifiedImageError:
        return ImageInfo("not_an_image", "unknown format")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:  # Pillow's ways of saying "broken"
        return ImageInfo("truncated", f"{exc.__class__.__name__}: {str(exc)[:80]}", fmt, mode, size)
    if full:
        try:
            decode_rgb(source, "the file") if isinstance(source, bytes) else read_rgb(source)
        except ChiptagError as exc:
            msg = str(exc) if isinstance(source, bytes) else str(exc).replace(str(source), "the file")
            return ImageInfo("corrupt", msg[:160], fmt, mode, size)
    return ImageInfo(None, "", fmt, mode, size, frames=frames, nvjpeg=nvjpeg)


def _usual_side(sizes: Iterable[tuple[int, int]]) -> int | None:
    counts = Counter(max(s) for s in sizes)
    return counts.most_common(1)[0][0] if counts else None


def _size_problem(size: tuple[int, int], expected: int | None, usual: int | None,
                  min_side: int) -> tuple[str, str] | None:
    w, h = size
    if min(w, h) < min_side:
        return "too_small", f"{w}x{h}, shorter side below data.min_side={min_side}"
    ref = expected or usual
    if ref and (max(w, h) > ref * SIZE_TOLERANCE or min(w, h) * SIZE_TOLERANCE < ref):
        if expected:
            return "size_off", f"{w}x{h}, expected about {ref}x{ref}"
        return "size_unusual", f"{w}x{h}, most images have a longest side of {ref}"
    return None


def check_images(paths: Sequence[Path], report: Report, *, rows: Sequence[int | None] | None = None,
                 max_pixels: int = PILLOW_DEFAULT_MAX_PIXELS, expected_size: int | None = None,
                 min_side: int = 16, check_size: bool = True, full: bool = False,
                 bands: Sequence[int] | BandReading | None = None) -> set[int]:
    """Check every image, adding problems and conversions to `report`. Returns the indices that are unusable.
    bands: rasters' band list, or their whole data.rasters.BandReading (nodata policy, the model's band count).

    expected_size None: sizes far from the most common longest side are notes, not problems."""
    rows = list(rows) if rows is not None else [None] * len(paths)
    infos = [check_image(Path(p), max_pixels, full, bands=bands) for p in paths]
    counts = Counter(i.bands for i in infos if i.kind is None and i.bands is not None)
    usual_bands = counts.most_common(1)[0][0] if len(counts) > 1 else None
    for i, info in enumerate(infos):  # one sensor's chips have one band count; a stray one is another product
        if usual_bands is not None and info.kind is None and info.bands not in (None, usual_bands):
            infos[i] = replace(info, kind="band_count", detail=f"{info.bands} bands, most chips have {usual_bands}")
    report.images += len(paths)
    bad: set[int] = set()
    usual = _usual_side(i.size for i in infos if i.kind is None and i.size)
    for i, (p, info) in enumerate(zip(paths, infos)):
        kind, detail = info.kind, info.detail
        if kind is None and check_size and info.size:
            found = _size_problem(info.size, expected_size, usual, min_side)
            if found and found[0] == "size_unusual":
                report.add(found[0], p, rows[i], found[1])
            elif found:
                kind, detail = found
        if kind is not None:
            report.add(kind, p, rows[i], detail)
            bad.add(i)
            continue
        wanted = EXTENSION_FORMATS.get(Path(p).suffix.lower())
        if wanted and info.format and info.format != wanted:
            report.add("format_mismatch", p, rows[i], f"{info.format} data behind a {Path(p).suffix} name")
        if info.frames > 1:
            report.add("multi_frame", p, rows[i], f"{info.format}, {info.frames} frames")
        if info.mode and info.mode != "RGB" and info.bands is None:
            report.converted[info.mode] += 1
        report.usable += 1
        report.nvjpeg += info.nvjpeg
    return bad


def validate_images(paths: Sequence[Path], *, max_pixels: int = PILLOW_DEFAULT_MAX_PIXELS,
                    expected_size: int | None = None, check_size: bool = True,
                    bands: Sequence[int] | BandReading | None = None) -> tuple[Report, list[int]]:
    """For prediction: check `paths`; returns (report, indices of usable images).

    The caller applies its policy: `report.bad` non-empty with on_bad_image=error ->
    `raise ChiptagError(report.error_message())`; with skip -> predict only the usable indices."""
    report = Report()
    bad = check_images(paths, report, max_pixels=max_pixels, expected_size=expected_size, check_size=check_size,
                       bands=bands)
    return report, [i for i in range(len(paths)) if i not in bad]
