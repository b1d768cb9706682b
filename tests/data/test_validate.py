"""Pre-flight validation: one test per bad-input kind, on files generated in the test."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from chiptag.config import DataConfig
from chiptag.data.image_check import validate_images
from chiptag.data.images import read_rgb
from chiptag.data.validate import preflight
from chiptag.errors import ChiptagError

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

def test_missing_label_file(tmp_path):
    data = make_data(tmp_path)
    data.labels = "nope.csv"
    with pytest.raises(ChiptagError, match="label table not found: .*nope.csv"):
        preflight(data)


def test_empty_label_file(tmp_path):
    with pytest.raises(ChiptagError, match="empty"):
        preflight(make_data(tmp_path, text=""))


def test_missing_columns(tmp_path):
    with pytest.raises(ChiptagError, match="missing id column 'image_name'.*columns: name, tags"):
        preflight(make_data(tmp_path, header="name,tags"))
    with pytest.raises(ChiptagError, match="missing tags column 'tags'"):
        preflight(make_data(tmp_path / "b", header="image_name,labels", format="tags"))


def test_bom_and_crlf_are_handled_and_noted(tmp_path):
    text = "\ufeffimage_name,tags\r\n" + "".join(f"g{i},{t}\r\n" for i, t in enumerate(GOOD))
    ds, report = preflight(make_data(tmp_path, text=text))
    assert ds.table.names == [f"g{i}" for i in range(5)]
    assert "cloudy" in ds.table.tags and not any("\r" in t for t in ds.table.tags)
    assert set(kinds(report)) == {"bom", "crlf"} and not report.bad


def test_identical_duplicate_rows_are_kept_once_and_noted(tmp_path):
    data = make_data(tmp_path, [("g1", "primary haze")])  # same set as row 3, other order
    ds, report = preflight(data)  # on_bad_image=error: nothing is ambiguous, so nothing stops
    assert ds.table.names.count("g1") == 1 and len(ds.table) == 5 and not report.bad
    assert kinds(report)["duplicate_same"] == [(7, "'g1' first at row 3")]
    assert "identical duplicate row (same name, same tags): kept once: 1\n    row 7:" in report.format()


def test_repeated_tag_in_a_row_is_noted(tmp_path):
    ds, report = preflight(make_data(tmp_path, [("r", "cultivation primary cultivation"), ("s", "clear clear")]))
    assert kinds(report)["repeated_tag"] == [(7, "'r': cultivation"), (8, "'s': clear")]
    assert ds.table.tag_strings()[ds.table.names.index("r")] == "cultivation primary"


def test_onehot_text_column_is_ignored_and_noted(tmp_path):
    text = ("Id,Title,clear,haze\n" + "".join(f"g{i},A title {i},{i % 2},{1 - i % 2}\n" for i in range(5))
            + "g1,A title 1,1,0\n")  # an identical duplicate too
    data = make_data(tmp_path, text=text, id_column="Id")
    ds, report = preflight(data)
    assert ds.table.tags == ["clear", "haze"] and len(ds.table) == 5 and not report.bad
    assert kinds(report)["ignored_column"] == [(1, "'Title'")]
    named = make_data(tmp_path / "b", text=text, id_column="Id", tag_columns=["haze"], on_bad_image="skip")
    ds, report = preflight(named)  # exactly the named columns: rows without a haze tag have no tags left
    assert ds.table.tags == ["haze"] and ds.table.names == ["g0", "g2", "g4"]
    assert kinds(report)["ignored_column"] == [(1, "'Title', 'clear'")]
    with pytest.raises(ChiptagError, match=r"data.tag_columns names column\(s\) not in the table: 'nope'"):
        preflight(make_data(tmp_path / "c", text=text, id_column="Id", tag_columns=["nope"]))


def test_duplicate_conflicting_tags(tmp_path):
    ds, report = preflight(skip(make_data(tmp_path, [("g1", "cloudy")])))
    assert [r for r, _ in kinds(report)["duplicate_conflict"]] == [3, 7]
    assert "g1" not in ds.table.names


def test_empty_tag_list(tmp_path):
    ds, report = preflight(skip(make_data(tmp_path, [("e", ""), ("f", "   ")])))
    assert [r for r, _ in kinds(report)["empty_tags"]] == [7, 8]
    assert len(ds.table) == 5


def test_stray_whitespace_is_stripped_and_noted(tmp_path):
    ds, report = preflight(make_data(tmp_path, [(" w ", " clear  primary ")]))
    assert "w" in ds.table.names and kinds(report)["whitespace"][0][0] == 7
    assert ds.table.tag_strings()[ds.table.names.index("w")] == "clear primary"


def test_tags_outside_vocabulary(tmp_path):
    vocab = ["clear", "cloudy", "haze", "partly_cloudy", "primary"]
    ds, report = preflight(skip(make_data(tmp_path)), vocabulary=vocab)
    assert kinds(report)["unknown_tag"] == [(5, "'g3': water")]
    assert ds.table.tags == vocab and "g3" not in ds.table.names


def test_onehot_problems_are_all_listed(tmp_path):
    text = "image_name,clear,haze\ng0,1,0\ng1,2,0\ng2,0,yes\ng3,0,0\ng4,0,1\n"
    data = make_data(tmp_path, text=text)
    with pytest.raises(ChiptagError) as err:
        preflight(data)
    msg = str(err.value)
    assert "one-hot cell that is not 0 or 1: 2\n    row 3:" in msg and "\n    row 4:" in msg and "'yes'" in msg
    assert "empty tag list: 1\n    row 5:" in msg  # every problem, not only the first
    ds, _ = preflight(skip(data))
    assert ds.table.names == ["g0", "g4"] and ds.table.tags == ["clear", "haze"]


# ---- images ---------------------------------------------------------------------------------------------------

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


def _encode(im: Image.Image, fmt: str) -> bytes:
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


def test_convertible_modes_are_counted_and_converted_consistently(tmp_path):
    base = chip(5)
    gray = np.asarray(base.convert("L"))
    variants = {
        "m_l": _encode(base.convert("L"), "PNG"), "m_la": _encode(base.convert("LA"), "PNG"),
        "m_p": _encode(base.convert("P"), "PNG"), "m_rgba": _encode(base.convert("RGBA"), "PNG"),
        "m_cmyk": _encode(base.convert("CMYK"), "JPEG"),
        "m_16": _encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
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


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose entropy data stops a third of the way in, EOI marker intact (libjpeg: 'premature end of
    data segment')."""
    rng = np.random.default_rng(seed)
    data = jpeg_bytes(Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)))
    sos = data.find(b"\xff\xda")
    return data[: sos + (len(data) - sos) // 3] + b"\xff\xd9"


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
