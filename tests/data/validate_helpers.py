"""Shared by the data-validation tests: tiny label tables and chips written into tmp_path."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from chiptag.config import DataConfig

GOOD = ["clear primary", "haze primary", "cloudy", "clear primary water", "partly_cloudy primary"]


def chip(seed: int = 0, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_data(tmp_path, extra_rows=(), images=None, *, header="image_name,tags", text=None, **cfg) -> DataConfig:
    """Five good rows (g0..g4) plus `extra_rows`; images: name -> PIL image or raw bytes (default: a good JPEG)."""
    root = tmp_path / "data"
    (root / "train-jpg").mkdir(parents=True)
    rows = [(f"g{i}", t) for i, t in enumerate(GOOD)] + list(extra_rows)
    if text is None:
        text = header + "\n" + "".join(f"{n},{t}\n" for n, t in rows)
    (root / "labels.csv").write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    images = dict(images or {})
    for i, (n, _) in enumerate(rows):
        images.setdefault(n.strip(), chip(i))
    for n, im in images.items():
        if im is None:
            continue
        data = im if isinstance(im, bytes) else jpeg_bytes(im)
        (root / "train-jpg" / f"{n}.jpg").write_bytes(data)
    return DataConfig(root=root, labels="labels.csv", **cfg)


def kinds(report) -> dict[str, list]:
    return {k: [(p.row, p.detail) for p in v] for k, v in report.by_kind().items()}


def skip(data: DataConfig) -> DataConfig:
    data.on_bad_image = "skip"
    return data


# ---- label table --------------------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): signature, IHDR (depth 16, colour type 2), IDAT, IEND."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose entropy data stops a third of the way in, EOI marker intact (libjpeg: 'premature end of
    data segment')."""
    rng = np.random.default_rng(seed)
    data = jpeg_bytes(Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)))
    sos = data.find(b"\xff\xda")
    return data[: sos + (len(data) - sos) // 3] + b"\xff\xd9"
