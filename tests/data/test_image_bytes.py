"""The server checks and decodes uploads in memory: check_image(bytes) and decode_rgb(bytes) must say and give
exactly what check_image(path) and read_rgb(path) say and give for a file of the same bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
import pytest
from PIL import Image

from chiptag.data.image_check import check_image
from chiptag.data.images import decode_rgb, read_rgb
from chiptag.errors import ChiptagError
from validate_helpers import chip, corrupt_jpeg, encode, jpeg_bytes, png_rgb16


def _variants() -> dict[str, bytes]:
    base = chip(5, 40)
    gray = np.asarray(base.convert("L"))
    good = jpeg_bytes(base)
    flipped = bytearray(encode(base, "PNG"))
    flipped[len(flipped) // 2] ^= 0xFF
    return {
        "jpeg": good, "png": encode(base, "PNG"), "cmyk": encode(base.convert("CMYK"), "JPEG"),
        "la": encode(base.convert("LA"), "PNG"), "p": encode(base.convert("P"), "PNG"),
        "gray16": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "rgb48": png_rgb16(np.asarray(base).astype(np.uint16) * 257),
        "webp": encode(base, "WEBP"), "bmp": encode(base, "BMP"),
        "truncated": good[: len(good) // 2], "corrupt": corrupt_jpeg(), "flipped_png": bytes(flipped),
        "not_an_image": b"these are words, not pixels" * 3, "empty": b"",
        "bomb": encode(Image.new("RGB", (1200, 1000)), "PNG"),
    }


VARIANTS = _variants()


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("scan_jpeg", [True, False])
def test_bytes_are_checked_as_the_file_is(tmp_path, name, scan_jpeg):
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(VARIANTS[name])
    from_file = check_image(path, max_pixels=1_000_000, scan_jpeg=scan_jpeg)
    from_bytes = check_image(VARIANTS[name], max_pixels=1_000_000, scan_jpeg=scan_jpeg)
    assert from_bytes == from_file
    bad = {"truncated", "flipped_png", "not_an_image", "empty", "bomb"} | ({"corrupt"} if scan_jpeg else set())
    assert (from_file.kind is not None) == (name in bad), from_file


@pytest.mark.parametrize("name", ["jpeg", "png", "cmyk", "la", "p", "gray16", "rgb48", "webp", "bmp", "corrupt"])
def test_bytes_decode_to_the_files_pixels(tmp_path, name):
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(VARIANTS[name])
    if name == "corrupt":  # what scan_jpeg=False leaves to the decoder: strict libjpeg names the upload
        with pytest.raises(ChiptagError, match=r"corrupt JPEG data in up\.jpg: Corrupt JPEG data"):
            decode_rgb(VARIANTS[name], "up.jpg")
        with pytest.raises(ChiptagError, match="corrupt JPEG data in .*corrupt.jpg"):
            read_rgb(path)
        return
    from_bytes = decode_rgb(VARIANTS[name], "up.jpg")
    assert from_bytes.shape == (3, 40, 40) and from_bytes.dtype == read_rgb(path).dtype
    assert np.array_equal(from_bytes.numpy(), read_rgb(path).numpy())


def test_undecodable_bytes_name_the_upload():
    with pytest.raises(ChiptagError, match="cannot read image notes.txt"):
        decode_rgb(b"not an image", "notes.txt")
    assert check_image(io.BytesIO(b"").getvalue()).kind == "zero_bytes"


def _frames(seed: int, n: int = 3, size: int = 40) -> list[Image.Image]:
    """n frames that differ clearly (each its own random chip), so a decoder that mixes or stacks frames shows."""
    return [chip(seed + k, size) for k in range(n)]


def _multi_frame(fmt: str, frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **extra)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ext", [("GIF", ".gif"), ("GIF", ".jpg"), ("WEBP", ".webp"), ("WEBP", ".jpg"),
                                      ("TIFF", ".tif"), ("PNG", ".png")])
def test_multi_frame_images_give_their_first_frame_from_a_file_and_from_bytes(tmp_path, fmt, ext):
    """An animated GIF decoded to (frames, 3, H, W) and crashed train/predict ('stack expects each tensor to be
    equal size'); every multi-frame image now gives its first frame, the same through a file and an upload, and
    validation notes it."""
    frames = _frames(11)
    raw = _multi_frame(fmt, frames)
    path = tmp_path / f"anim{ext}"
    path.write_bytes(raw)
    first = _multi_frame(fmt, frames[:1])  # the first frame saved alone, in the same format (GIF: its palette)
    expected = decode_rgb(first, "first")
    from_file, from_bytes = read_rgb(path), decode_rgb(raw, "up" + ext)
    assert from_file.shape == (3, 40, 40) and from_file.dtype == torch.uint8
    assert torch.equal(from_file, from_bytes) and torch.equal(from_file, expected)
    info = check_image(path)
    assert info.kind is None and info.frames == 3 and check_image(raw) == info
    assert check_image(first).frames == 1
