"""Damaged JPEG scan data is a bad image even where libjpeg words it as "extraneous bytes before marker"; a few
padding bytes before EOI (what some encoders write) are not: those pixels decode exactly as encoded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from chiptag.data.image_check import check_image
from chiptag.data.images import MAX_JPEG_PADDING, decode_rgb, read_rgb
from chiptag.data.synthetic import draw_chip
from chiptag.errors import ChiptagError
from validate_helpers import make_data, skip


def _chip() -> bytes:
    """A generated 128 px chip as Pillow writes it (6 kB, like a real Planet chip's scale)."""
    buf = io.BytesIO()
    Image.fromarray(draw_chip(["clear", "primary", "road", "water"], 128, np.random.default_rng(7))).save(
        buf, "JPEG", quality=90)
    return buf.getvalue()


GOOD = _chip()
_SOS = GOOD.rfind(b"\xff\xda")
SCAN = _SOS + 2 + int.from_bytes(GOOD[_SOS + 2:_SOS + 4], "big")  # first byte of the entropy-coded data
EOI = len(GOOD) - 2


def _overwritten() -> bytes:
    raw = bytearray(GOOD)
    mid = (SCAN + EOI) // 2
    raw[mid:mid + 40] = bytes((37 * i + 11) % 255 for i in range(40))  # no 0xff: markers untouched
    return bytes(raw)


def _run_removed() -> bytes:
    raw = bytearray(GOOD)
    del raw[SCAN + 1067:SCAN + 1067 + 32]
    return bytes(raw)


def _bits_flipped() -> bytes:
    raw = bytearray(GOOD)
    for offset, bit in ((300, 1), (1200, 4), (2500, 6)):
        raw[SCAN + offset] ^= 1 << bit
    return bytes(raw)


def _padded(pad: bytes) -> bytes:
    return GOOD[:EOI] + pad + GOOD[EOI:]


CORRUPT = {"overwritten": _overwritten(), "run_removed": _run_removed(), "bits_flipped": _bits_flipped(),
           "padded_300": _padded(b"\0" * 300)}  # hundreds of bytes: no encoder pads so
INTACT = {"padded_zeros": _padded(b"\0" * 12), "padded_ff": _padded(b"\xff" * 40), "padded_text": _padded(b"pad" * 4)}


def _libjpeg_says(raw: bytes) -> str:
    try:
        simplejpeg.decode_jpeg(raw, strict=True)
    except ValueError as exc:
        return str(exc)
    return "clean"


def _pixels(raw: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(raw, colorspace="RGB", strict=False).astype(np.int64)


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_damaged_scan_data_is_corrupt(tmp_path, name):
    raw = CORRUPT[name]
    # what this test is about: libjpeg's "extraneous bytes before EOI" wording, once listed as harmless
    assert "extraneous bytes before marker 0xd9" in _libjpeg_says(raw)
    if name != "padded_300":  # the pixels really are damaged (padding_300's are not, but no encoder writes it)
        assert (np.abs(_pixels(raw) - _pixels(GOOD)) > 32).mean() > 0.2
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(raw)
    info = check_image(path)  # the pre-flight scan (validate, train): "truncated or corrupt image data"
    assert info.kind == "truncated" and "extraneous bytes" in info.detail
    with pytest.raises(ChiptagError, match=rf"corrupt JPEG data in .*{name}\.jpg: .*extraneous bytes.*damaged"):
        read_rgb(path)  # training, predict, report tiles
    with pytest.raises(ChiptagError, match=r"corrupt JPEG data in upload\.jpg"):
        decode_rgb(raw, "upload.jpg")  # serve


@pytest.mark.parametrize("name", sorted(INTACT))
def test_padding_before_eoi_passes_with_its_pixels(tmp_path, name):
    raw = INTACT[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(raw)
    assert check_image(path).kind is None
    assert np.array_equal(read_rgb(path).permute(1, 2, 0).numpy(), _pixels(GOOD))
    assert np.array_equal(decode_rgb(raw, "upload.jpg").permute(1, 2, 0).numpy(), _pixels(GOOD))


def test_the_padding_boundary():
    # libjpeg-turbo reads ~6 bytes ahead of the scan's end, so k bytes of padding are reported as about k - 6
    said = _libjpeg_says(_padded(b"\0" * (MAX_JPEG_PADDING + 6)))
    assert said == f"Corrupt JPEG data: {MAX_JPEG_PADDING} extraneous bytes before marker 0xd9"
    assert check_image(_padded(b"\0" * (MAX_JPEG_PADDING + 6))).kind is None
    assert check_image(_padded(b"\0" * (MAX_JPEG_PADDING + 7))).kind == "truncated"


def test_validate_lists_damaged_chips_with_their_files(tmp_path):
    bad = {f"bad_{name}": raw for name, raw in CORRUPT.items()}
    from chiptag.data.validate import preflight

    ds, report = preflight(skip(make_data(tmp_path, [(n, "clear primary") for n in bad] + [("pad", "clear")],
                                          {**bad, "pad": INTACT["padded_zeros"]})))
    listed = report.by_kind()["truncated"]  # each named with its file and row
    assert sorted(Path(p.file).name for p in listed) == sorted(f"{n}.jpg" for n in bad)
    assert all(p.row is not None and "extraneous bytes" in p.detail for p in listed)
    assert not set(bad) & set(ds.table.names) and "pad" in ds.table.names


def test_scan_byte_damaged_into_an_unknown_marker_is_found_by_the_quick_check(tmp_path):
    raw = bytearray(GOOD)
    raw[SCAN + 500:SCAN + 502] = b"\xff\x89"  # a marker libjpeg does not know, inside the scan
    assert _libjpeg_says(bytes(raw)) == "Unsupported marker type 0x89"
    info = check_image(bytes(raw))  # the default pre-flight check, not only validate --full
    assert info.kind == "truncated" and "Unsupported marker type 0x89" in info.detail
