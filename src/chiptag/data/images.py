"""The steps of the one input path: file or bytes -> RGB uint8 -> resized -> D4 view -> batch -> normalised.

Consumers do not call these one by one: they hold a data.inputs.ImageInput, which runs them in this order for
every one of them. The split keeps the per-image work in a decode worker to the minimum: a chip already at the
model's size leaves the worker as uint8 (a quarter of the bytes through shared memory, no float work), and
normalisation (the weights' own mean/std) runs once per batch, vectorised, next to the forward.
"""

from __future__ import annotations

import io
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from chiptag.errors import ChiptagError
from chiptag.interrupt import ignore_sigint_in_worker

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, but they still work and decode JPEG
# about twice as fast as Pillow; the warning would otherwise repeat once per image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


RESIZE_MODES = ("squash", "pad", "crop")
CORRUPT_HINT = (" — `chiptag validate --full` lists every such file; data.full_check: true with "
                "data.on_bad_image: skip leaves them out of training")
# libjpeg's "N extraneous bytes before marker 0xXX" counts the bytes left between the point where the decoder had
# read every block of a scan and the next marker. A few of them before EOI (0xd9) are padding some encoders write
# after the last scan: the SQ908 camera leaves 8 (libjpeg-turbo reads ~6 ahead, so k bytes of padding are reported
# as k - 6), webcams 1-10; Pillow 13, simplejpeg 1.9 and torchvision 0.29 (all libjpeg-turbo) write none, in every
# mode tried. A scan whose entropy data is damaged desynchronises the Huffman decoder, which then finishes its
# blocks early and leaves a whole block's bytes or more behind (generated 256 px chips: a median of 71, at most 16
# in 4 of 1,557 such corruptions, benchmarks/jpeg_corruption.py) - its pixels are garbage. So only up to
# MAX_JPEG_PADDING bytes before EOI are harmless; more, or leftovers before any other marker (a restart interval or
# an earlier progressive scan that ended early; the strict decode stops there, so the rest is unchecked), are
# corrupt, like every other libjpeg data warning (pixels invented: a grey or smeared lower part).
MAX_JPEG_PADDING = 16
_EXTRANEOUS = re.compile(r"(\d+) extraneous bytes before marker 0x([0-9a-f]{2})", re.IGNORECASE)


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input. RGB (bands None): decoded to uint8 RGB, normalised with the
    weights' mean/std on [0, 1]. Multiband (bands set: a raster, data.rasters): the file's `bands` (0-based, in
    the model's channel order; the first three are the ones the pretrained stem saw as R, G, B) as float32 in
    the file's units, clipped to `clip` per band when set, normalised with per-band mean/std in those units
    (training-split statistics)."""

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "squash"  # data.resize: how a non-square image becomes the square input
    bands: tuple[int, ...] | None = None
    clip: tuple[tuple[float, float], ...] | None = None  # per-band (low, high), from training percentiles
    band_names: tuple[str, ...] | None = None  # data.band_names: for people (export metadata, reports)
    # data.nodata (None: the file's GDAL_NODATA tag, if any) and data.fill: error | mean (nodata pixels take the
    # band's `mean`, so they normalise to 0); file_bands: the training files' band count (another is refused)
    nodata: float | None = None
    fill: str = "error"
    file_bands: int | None = None

    @property
    def channels(self) -> int:
        return 3 if self.bands is None else len(self.bands)

    def to_dict(self) -> dict:
        d = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize}
        if self.bands is not None:  # RGB records stay as they were (feature cache keys, old checkpoints)
            d.update(bands=list(self.bands), clip=[list(c) for c in self.clip] if self.clip else None,
                     band_names=list(self.band_names) if self.band_names else None, nodata=self.nodata,
                     fill=self.fill, file_bands=self.file_bands)
        return d

    def reading(self, max_pixels: int | None = None):
        """How a raster file becomes this model's bands (data.rasters.BandReading): nodata filled with the
        band means when fill is mean."""
        from chiptag.data.rasters import BandReading

        return BandReading(self.bands, self.nodata, self.fill, self.mean if self.fill == "mean" else None,
                           self.file_bands, max_pixels)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        # checkpoints written before data.resize existed squashed every image; before data.bands, RGB only
        bands, clip, names = d.get("bands"), d.get("clip"), d.get("band_names")
        nodata, file_bands = d.get("nodata"), d.get("file_bands")  # absent before data.nodata existed
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), str(d.get("resize", "squash")),
                   tuple(int(b) for b in bands) if bands is not None else None,
                   tuple((float(a), float(b)) for a, b in clip) if clip else None,
                   tuple(str(n) for n in names) if names else None,
                   float(nodata) if nodata is not None else None, str(d.get("fill", "error")),
                   int(file_bands) if file_bands is not None else None)


def _to_uint8(t: torch.Tensor) -> torch.Tensor:
    """16-bit decodes (torchvision returns uint16 for 16-bit PNG) -> 8 bits, rounding v*255/65535."""
    if t.dtype == torch.uint8:
        return t
    return ((t.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def _pillow_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # Pillow's own convert would clip at 255
        gray = np.asarray(im, dtype=np.int64)
        gray = np.clip((gray * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _jpeg_warning(msg: str) -> str | None:
    """libjpeg's message -> "corrupt", "harmless" (padding before EOI: every pixel decoded as encoded) or None
    (not a data warning)."""
    if "Corrupt JPEG" not in msg and "Premature end" not in msg:
        return None
    extra = _EXTRANEOUS.search(msg)
    if extra and extra.group(2).lower() == "d9" and int(extra.group(1)) <= MAX_JPEG_PADDING:
        return "harmless"
    return "corrupt"


def _explained(msg: str) -> str:
    """libjpeg's wording of a damaged scan ("extraneous bytes") sounds benign; say what it means here."""
    if _EXTRANEOUS.search(msg):
        return (f"{msg} (the entropy-coded data did not end where its last block did: damaged image data, not "
                f"the <= {MAX_JPEG_PADDING} padding bytes before EOI some encoders write)")
    return msg


def jpeg_corruption(raw: bytes) -> str | None:
    """libjpeg's complaint about corrupt data in JPEG bytes, or None. Decodes at 1/8 scale: every block's
    entropy data is still read (where corruption shows) but little else is done, so it costs about half a
    full decode — cheap enough for the pre-flight checks."""
    try:
        simplejpeg.decode_jpeg(raw, strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        kind = _jpeg_warning(str(exc))
        if kind is None:
            # libjpeg-turbo cannot read it at all: a flavour it lacks, or (far more often) a byte of the scan
            # damaged into a marker it does not know ("Unsupported marker type"). decode_rgb's fallbacks
            # decide, as they would when the image is read, so such a file is a bad image here already.
            try:
                decode_rgb(raw, "")
            except ChiptagError:
                return f"{exc} (no decoder reads the image data)"
        return _explained(str(exc)) if kind == "corrupt" else None
    return None


def _strict_jpeg(path: str | Path, raw: bytes) -> torch.Tensor | None:
    """JPEG bytes -> 3xHxW uint8, raising ChiptagError when libjpeg reports corrupt data (torchvision and
    Pillow only print that on stderr and return made-up pixels). None: not decodable here (fall back)."""
    try:
        arr = simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=True)
    except ValueError as exc:
        kind = _jpeg_warning(str(exc))
        if kind is None:
            return None  # e.g. a JPEG flavour libjpeg-turbo does not read: torchvision / Pillow may
        if kind == "corrupt":
            raise ChiptagError(f"corrupt JPEG data in {path}: {_explained(str(exc))}") from None
        arr = simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=False)
    return torch.from_numpy(arr).permute(2, 0, 1)  # a view: the resize or the batch stack copies it anyway


def read_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to a 3xHxW uint8 RGB tensor. Grayscale, palette, RGBA/LA (alpha dropped), CMYK
    and 16-bit inputs are converted, the same way in training and prediction (both call this). Corrupt JPEG
    data is an error naming the file."""
    return decode_rgb(_read_file(path), Path(path))


def _read_file(path: str | Path) -> bytes:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ChiptagError(f"image not found: {path}") from None
    except OSError as exc:
        raise ChiptagError(f"cannot read image {path}: {exc.strerror or exc}") from None


def decode_rgb(raw: bytes, name: str | Path) -> torch.Tensor:
    """Image bytes -> 3xHxW uint8 RGB, exactly as read_rgb decodes a file's bytes (the server decodes uploads
    in memory with it); errors name `name`. A multi-frame image (animated GIF/WebP/PNG, multi-page TIFF) gives
    its first frame."""
    if raw[:2] == b"\xff\xd8":
        img = _strict_jpeg(name, raw)
        if img is not None:
            return img
    try:
        buffer = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        img = decode_image(buffer, mode=ImageReadMode.RGB)
    except Exception:  # torchvision cannot decode some inputs (some CMYK, 16-bit gray); Pillow is the fallback
        pass
    else:
        # An animated GIF decodes to (frames, 3, H, W); its first frame is the image, as Pillow reads the first
        # frame of an animated WebP or PNG and the first page of a TIFF. Validation notes such files
        # (data.image_check: multi_frame), so the frames left unused are not silently lost.
        return _to_uint8(img[0] if img.ndim == 4 else img)
    try:
        with Image.open(io.BytesIO(raw)) as im:  # a multi-frame file: Pillow reads frame 0 unless told to seek
            arr = _pillow_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ChiptagError(f"cannot read image {name}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _scaled(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """uint8 3xHxW -> uint8 3xhxw, antialiased bilinear. On CPU torch resizes uint8 directly (~3x faster than
    in float, a quarter of the bytes leave the worker, within 1 level of the float resize); CUDA has no uint8
    antialiased kernel, so there it resizes in float and rounds back: every decoder hands `normalize` uint8.
    A float raster (any band count) is resized per band in float and stays float."""
    x = img.unsqueeze(0)
    if x.is_floating_point():
        return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).squeeze(0)
    if x.device.type != "cpu" or x.dtype != torch.uint8:
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False).squeeze(0)


def resize(img: torch.Tensor, size: int, mode: str = "squash",
           fill: tuple[float, ...] = IMAGENET_MEAN) -> torch.Tensor:
    """uint8 3xHxW -> uint8 size x size by `mode` (data.resize): squash stretches the whole image (default:
    tags may sit at the edges), pad letterboxes it (aspect kept, borders in `fill`, the mean colour, so they
    normalise to about 0), crop takes the centred square. Already at size: the tensor itself. A float CxHxW
    raster the same way, per band, its borders the band means (`fill` in the raster's units)."""
    h, w = img.shape[-2:]
    if (h, w) == (size, size):
        return img
    if mode == "squash" or h == w:
        return _scaled(img, size, size)
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _scaled(img[:, top:top + side, left:left + side], size, size)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r} (valid: {', '.join(RESIZE_MODES)})")
    nh, nw = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    values = list(fill) if img.is_floating_point() else [round(255 * c) for c in fill]
    colour = torch.tensor(values, dtype=img.dtype, device=img.device)
    out = colour.view(-1, 1, 1).repeat(1, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = _scaled(img, nh, nw)
    return out


def fit(img: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """A decoded image -> the model's square input as `pre` says (size and data.resize mode)."""
    return resize(img, pre.image_size, pre.resize, pre.mean)


def normalize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 or [0, 1] float batch (N, 3, S, S) -> the model's normalised input (float32), on x's device.
    Multiband (pre.bands): a float batch (N, B, S, S) in the raster's units, clipped per band, standardised."""
    if pre.bands is not None:
        x = x.float()
        if pre.clip:
            lo, hi = (torch.tensor(v, device=x.device).view(1, -1, 1, 1) for v in zip(*pre.clip))
            x = torch.maximum(torch.minimum(x, hi), lo)
    else:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def decode(raw: bytes, name: str | Path, pre: Preprocessing) -> torch.Tensor:
    """Image bytes -> the decoded image `pre` asks for: uint8 3xHxW RGB (decode_rgb), or for a multiband
    `pre` the raster's bands as float32 BxHxW (data.rasters.read_bands). Errors name `name`."""
    if pre.bands is None:
        return decode_rgb(raw, name)
    from chiptag.data.rasters import read_bands  # tifffile only when rasters are read

    return torch.from_numpy(read_bands(raw, name, pre.reading()))


def read_image(path: str | Path, pre: Preprocessing) -> torch.Tensor:
    """A file -> decode(its bytes, pre); a missing or unreadable file is an error naming it."""
    return decode(_read_file(path), path, pre) if pre.bands is not None else read_rgb(path)


def blank(pre: Preprocessing) -> torch.Tensor:
    """The stand-in for an unreadable image in a batch (its error travels beside it)."""
    if pre.bands is None:
        return torch.zeros(3, pre.image_size, pre.image_size, dtype=torch.uint8)
    return torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1).repeat(1, pre.image_size, pre.image_size)


def d4(x: torch.Tensor, view: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the square (view 0 is the identity). Works on (..., H, W)."""
    if not 0 <= view < 8:
        raise ValueError(f"D4 view must be in 0..7, got {view}")
    if view >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=view % 4, dims=(-2, -1))


class ImageDataset(torch.utils.data.Dataset):
    """The one image dataset. Item: (image, index, error): image is uint8 3xSxS, in D4 view `view`; error is
    "" for a good image.

    keep_errors=False: an unreadable image raises ChiptagError naming it (training: the data was validated).
    keep_errors=True: it becomes a zero image plus its message, so one bad file never ends a batch of
    thousands (prediction reports it per image)."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, *, view: int = 0, keep_errors: bool = False):
        self.paths, self.pre, self.view, self.keep_errors = list(paths), pre, view, keep_errors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            x = fit(read_image(self.paths[i], self.pre), self.pre)
        except ChiptagError as exc:
            if not self.keep_errors:
                raise ChiptagError(f"{exc}{CORRUPT_HINT if str(exc).startswith('corrupt') else ''}") from None
            return self._blank(), i, str(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a decoder's RuntimeError, reported per image
            if not self.keep_errors:
                raise ChiptagError(f"cannot read image {self.paths[i]}: {exc.__class__.__name__}: {exc}") from None
            return self._blank(), i, f"cannot read image {self.paths[i]}: {exc.__class__.__name__}: {exc}"
        return (d4(x, self.view) if self.view else x), i, ""

    def _blank(self) -> torch.Tensor:
        return blank(self.pre)


def collate(batch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """-> (images uint8 (N, 3, S, S), indices, errors)."""
    return torch.stack([x for x, _, _ in batch]), torch.tensor([i for _, i, _ in batch]), [e for _, _, e in batch]


def prefetched(dataset, batch_size: int, depth: int = 2, collate_fn=None) -> Iterator:
    """Batches decoded `depth` ahead by a thread of this process (for num_workers 0): decoding overlaps the
    forward, which releases the GIL, without a worker process and its copies."""

    def load(start: int):
        return (collate_fn or collate)([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))])

    starts = range(0, len(dataset), batch_size)
    with ThreadPoolExecutor(1) as pool:
        queue = [pool.submit(load, s) for s in starts[:max(1, depth)]]
        try:
            for k in range(len(starts)):
                batch = queue.pop(0).result()
                if k + len(queue) + 1 < len(starts):
                    queue.append(pool.submit(load, starts[k + len(queue) + 1]))
                yield batch
        finally:
            for f in queue:  # the consumer stopped early: do not decode what nobody will read
                f.cancel()


def batches(dataset: ImageDataset, batch_size: int, num_workers: int, device: torch.device | str = "cpu",
            prefetch: int = 2):
    """Ordered (images, indices, errors) batches: a prefetch thread (num_workers 0) or DataLoader workers
    that ignore Ctrl-C (the main process finishes its step and saves progress). `prefetch` batches are
    decoded ahead (per worker); on CUDA they land in pinned memory, so the copy to the device is asynchronous."""
    if num_workers == 0:
        return prefetched(dataset, batch_size, prefetch)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       pin_memory=torch.device(device).type == "cuda", collate_fn=collate,
                                       worker_init_fn=ignore_sigint_in_worker, prefetch_factor=prefetch)
