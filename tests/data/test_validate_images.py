"""Pre-flight checks of every image: missing, empty, truncated, corrupt, converted, sized, bombs, permissions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from chiptag.data.image_check import validate_images
from chiptag.data.images import read_rgb
from chiptag.data.validate import preflight
from chiptag.errors import ChiptagError
from validate_helpers import chip, corrupt_jpeg, encode, jpeg_bytes, kinds, make_data, png_rgb16, skip


def image_problem(tmp_path, content, **cfg):
    ds, report = preflight(skip(make_data(tmp_path, [("bad", "clear primary")], {"bad": content}, **cfg)))
    return ds, kinds(report), report


def test_missing_image(tmp_path):
    ds, k, _ = image_problem(tmp_path, None)
    assert k["image_missing"][0][0] == 7 and "bad" not in ds.table.names


def test_zero_byte_image(tmp_path):
    _, k, _ = image_problem(tmp_path, b"")
    assert k["zero_bytes"][0][0] == 7


def test_truncated_jpeg(tmp_path):
    data = jpeg_bytes(chip(9, 64))
    _, k, _ = image_problem(tmp_path, data[: len(data) // 2])
    assert k["truncated"][0][0] == 7


def test_not_an_image(tmp_path):
    _, k, _ = image_problem(tmp_path, b"this is not a picture at all" * 10)
    assert k["not_an_image"][0][0] == 7


def test_png_behind_jpg_name_is_noted_and_used(tmp_path):
    buf = io.BytesIO()
    chip(3).save(buf, "PNG")
    ds, k, report = image_problem(tmp_path, buf.getvalue())
    assert k["format_mismatch"][0][0] == 7 and "PNG data behind a .jpg name" in k["format_mismatch"][0][1]
    assert "bad" in ds.table.names and not report.bad
    assert read_rgb(ds.paths[ds.table.names.index("bad")]).shape == (3, 32, 32)


def test_bit_flipped_png_is_truncated_or_corrupt(tmp_path):
    buf = io.BytesIO()
    chip(4).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[len(raw) // 2] ^= 0xFF
    _, k, _ = image_problem(tmp_path, bytes(raw))
    assert k["truncated"][0][0] == 7


def test_convertible_modes_are_counted_and_converted_consistently(tmp_path):
    base = chip(5)
    gray = np.asarray(base.convert("L"))
    variants = {
        "m_l": encode(base.convert("L"), "PNG"), "m_la": encode(base.convert("LA"), "PNG"),
        "m_p": encode(base.convert("P"), "PNG"), "m_rgba": encode(base.convert("RGBA"), "PNG"),
        "m_cmyk": encode(base.convert("CMYK"), "JPEG"),
        "m_16": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "m_48": png_rgb16(np.asarray(base).astype(np.uint16) * 257),
    }
    rows = [(n, "clear primary") for n in variants]
    ds, report = preflight(make_data(tmp_path, rows, variants))
    assert dict(report.converted) == {"L": 1, "LA": 1, "P": 1, "RGBA": 1, "CMYK": 1, "16-bit": 2}
    assert not report.bad
    read = {n: read_rgb(ds.paths[ds.table.names.index(n)]) for n in variants}
    assert all(t.dtype == torch.uint8 and t.shape == (3, 32, 32) for t in read.values())
    # 16-bit gray is scaled to 8 bits (not clipped): it equals the 8-bit gray chip
    assert np.array_equal(read["m_16"].numpy(), read["m_l"].numpy())
    assert np.array_equal(read["m_rgba"].numpy(), np.asarray(base).transpose(2, 0, 1))
    assert np.array_equal(read["m_48"].numpy(), np.asarray(base).transpose(2, 0, 1))


def test_size_far_from_usual_is_a_note_unless_expected_size_is_set(tmp_path):
    ds, k, report = image_problem(tmp_path, chip(6, size=128))
    assert k["size_unusual"][0] == (7, "128x128, most images have a longest side of 32")
    assert "bad" in ds.table.names and not report.bad
    _, k, _ = image_problem(tmp_path / "b", chip(6, size=128), expected_size=128)
    assert [r for r, _ in k["size_off"]] == [2, 3, 4, 5, 6]  # configured size wins over the majority


def test_non_square_and_tiny_images(tmp_path):
    poster = Image.fromarray(np.zeros((444, 300, 3), dtype=np.uint8))  # 300 wide, 444 high
    ds, k, report = image_problem(tmp_path, poster)
    assert "bad" in ds.table.names and not report.bad  # any shape is fine by default
    ds, k, _ = image_problem(tmp_path / "b", chip(6, size=12))
    assert k["too_small"] == [(7, "12x12, shorter side below data.min_side=16")] and "bad" not in ds.table.names
    ds, k, _ = image_problem(tmp_path / "c", chip(6, size=12), min_side=8)
    assert "too_small" not in k and "bad" in ds.table.names


def test_corrupt_jpeg_data_is_a_bad_image(tmp_path):
    path = tmp_path / "c.jpg"
    path.write_bytes(corrupt_jpeg())
    with pytest.raises(ChiptagError, match=r"corrupt JPEG data in .*c.jpg: Corrupt JPEG data: premature end"):
        read_rgb(path)  # the decoder every path uses
    ds, k, report = image_problem(tmp_path / "a", corrupt_jpeg())  # the default checks (1/8-scale decode)
    assert k["truncated"] == [(7, "OSError: Corrupt JPEG data: premature end of data segment")]
    assert "bad" not in ds.table.names
    with pytest.raises(ChiptagError, match="truncated or corrupt image data: 1\n    row 7: .*bad.jpg"):
        preflight(make_data(tmp_path / "c", [("bad", "clear")], {"bad": corrupt_jpeg()}))  # on_bad_image=error


def test_full_check_decodes_every_image(tmp_path, monkeypatch):
    import chiptag.data.image_check as image_check

    monkeypatch.setattr(image_check, "jpeg_corruption", lambda raw: None)  # as if the quick check missed it
    ds, k, _ = image_problem(tmp_path / "a", corrupt_jpeg())
    assert "bad" in ds.table.names
    ds, k, _ = image_problem(tmp_path / "b", corrupt_jpeg(), full_check=True)
    assert k["corrupt"][0][0] == 7 and "premature end of data segment" in k["corrupt"][0][1]
    assert "bad" not in ds.table.names


def test_decompression_bomb_cap_is_configurable(tmp_path):
    big = chip(7, size=100)
    ds, k, _ = image_problem(tmp_path, big, max_image_pixels=5000, expected_size=50)
    assert k["bomb"][0] == (7, "100x100 px > 5,000")
    assert "bad" not in ds.table.names


def _png_header(w: int, h: int) -> bytes:
    """A gray PNG that says it is w x h (its pixel data is a stub: the checks read the header only)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))


def test_pixel_cap_errors_quote_the_configured_cap_and_a_higher_cap_is_honoured(tmp_path, monkeypatch):
    """Pillow refuses images over twice its own limit (178,956,970 px) while opening them: the report quoted that
    limit instead of data.max_image_pixels, and a cap raised above it was not honoured."""
    from chiptag.data.image_check import check_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    huge = _png_header(20_000, 10_000)  # 200M px
    info = check_image(huge, max_pixels=5000)
    assert (info.kind, info.detail) == ("bomb", "200,000,000 px > 5,000")
    assert check_image(huge, max_pixels=300_000_000).kind is None  # the configured cap allows it
    assert check_image(_png_header(30_000, 30_000), max_pixels=300_000_000).detail == "900,000,000 px > 300,000,000"
    _, k, _ = image_problem(tmp_path, huge, max_image_pixels=1_000_000)
    assert k["bomb"][0][0] == 7 and k["bomb"][0][1].endswith(" px > 1,000,000")  # 20000x10000: Pillow's is raised


def test_unreadable_permissions(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def guarded(file, *a, **kw):
        if str(file).endswith("bad.jpg"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", guarded)  # root (as in CI containers) ignores chmod 000
    _, k, _ = image_problem(tmp_path, chip(8))
    assert k["image_unreadable"][0][0] == 7


def test_validate_images_for_prediction(tmp_path):
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg_bytes(chip(1)))
    empty = tmp_path / "b.jpg"
    empty.write_bytes(b"")
    report, usable = validate_images([good, empty, tmp_path / "c.jpg"])
    assert usable == [0]
    assert {p.kind for p in report.bad} == {"zero_bytes", "image_missing"}
    assert "c.jpg" in report.error_message()


def test_animated_gif_behind_jpg_name_is_noted_and_batches_with_the_others(tmp_path):
    """One animated GIF among the chips crashed the batch stack of train and predict; now its first frame is
    used and validation says so (row and frame count), like the other conversions it handles on read."""
    from chiptag.data.images import Preprocessing
    from chiptag.data.inputs import ImageInput

    frames = [chip(20 + k) for k in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    ds, k, report = image_problem(tmp_path, buf.getvalue())
    assert k["multi_frame"] == [(7, "GIF, 3 frames")] and not report.bad
    assert "its first frame is used" in report.format() and "bad" in ds.table.names
    (x, idx, errors), = ImageInput(Preprocessing(32)).batches(ds.paths, 8, 0)
    assert x.shape == (6, 3, 32, 32) and errors == [""] * 6


def test_preflight_reports_the_share_nvjpeg_can_take(tmp_path):
    """The real Planet chips are CMYK JPEGs, which nvJPEG cannot decode: pre-flight says how many it can."""
    images = {"cmyk1": jpeg_bytes(chip(7).convert("CMYK")), "cmyk2": jpeg_bytes(chip(8).convert("CMYK")),
              "png": encode(chip(9), "PNG"), "gone": None}
    rows = [(n, "clear primary") for n in images]
    ds, report = preflight(skip(make_data(tmp_path, rows, images)))
    assert (report.nvjpeg, report.usable) == (5, 8)  # g0..g4 are RGB JPEGs; the missing one is not counted
    assert report.nvjpeg_share == 5 / 8
    assert "nvJPEG (GPU decoding) can take 5 of 8 usable (62%" in report.format()
    assert report.to_dict()["nvjpeg_decodable"] == {"images": 5, "of": 8}
