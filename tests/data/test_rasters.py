"""Multiband raster chips (data.rasters): tifffile reading in every layout, band order, per-band statistics,
the same input path as JPEGs (resize per band, views, normalisation), pre-flight on rasters, bad rasters."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

tifffile = pytest.importorskip("tifffile")  # pinned in pyproject; a venv made before it lacks it

from chiptag.data.image_check import check_images  # noqa: E402
from chiptag.data.images import Preprocessing  # noqa: E402
from chiptag.data.inputs import ImageInput  # noqa: E402
from chiptag.data.problems import Report  # noqa: E402
from chiptag.data.rasters import BandReading, RasterProblem, band_statistics, read_bands  # noqa: E402
from chiptag.errors import ChiptagError  # noqa: E402


def tif_bytes(arr: np.ndarray, layout: str = "separate", **kw) -> bytes:
    """arr: (bands, H, W). layout: separate (planar), contig (interleaved) or pages (one page a band)."""
    buf = io.BytesIO()
    if layout == "contig":
        tifffile.imwrite(buf, np.moveaxis(arr, 0, -1), photometric="minisblack", planarconfig="contig", **kw)
    elif layout == "separate":
        tifffile.imwrite(buf, arr, photometric="minisblack", planarconfig="separate", **kw)
    else:
        tifffile.imwrite(buf, arr, photometric="minisblack", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("layout", ["separate", "contig", "pages"])
def test_every_layout_and_sample_type_reads_the_same_bands_in_the_asked_order(dtype, layout):
    rng = np.random.default_rng(0)
    arr = (rng.random((5, 12, 20)) * (200 if dtype == np.uint8 else 60000)).astype(dtype)
    got = read_bands(tif_bytes(arr, layout), "x.tif", [2, 1, 0, 4])
    assert got.dtype == np.float32 and got.shape == (4, 12, 20)
    assert np.array_equal(got, arr[[2, 1, 0, 4]].astype(np.float32))
    assert read_bands(tif_bytes(arr, layout), "x.tif", None).shape == (5, 12, 20)


def test_compressed_geotiffs_read(tmp_path):
    arr = (np.random.default_rng(1).random((4, 16, 16)) * 60000).astype(np.uint16)
    for compression in ("zlib", "lzw"):  # GDAL's usual codecs; LZW needs imagecodecs (pinned)
        assert np.array_equal(read_bands(tif_bytes(arr, compression=compression), "x.tif", None), arr)


def test_bad_rasters_are_errors_naming_the_file():
    arr = np.ones((3, 8, 8), np.uint16)
    with pytest.raises(ChiptagError, match=r"chip.tif has 3 band\(s\); data.bands \[0, 3\] needs at least 4"):
        read_bands(tif_bytes(arr), "chip.tif", [0, 3])
    nan = np.ones((2, 8, 8), np.float32)
    nan[0, 1, 1] = np.nan
    with pytest.raises(ChiptagError, match=r"chip.tif: band 0 has 1 NaN/inf pixel\(s\); data.fill: mean"):
        read_bands(tif_bytes(nan), "chip.tif", None)
    with pytest.raises(ChiptagError, match=r"chip.tif: complex64 samples are not supported"):
        read_bands(tif_bytes(np.ones((2, 8, 8), np.complex64)), "chip.tif", None)
    with pytest.raises(ChiptagError, match=r"chip.tif"):
        read_bands(tif_bytes(arr)[:60], "chip.tif", None)  # truncated
    with pytest.raises(ChiptagError, match=r"chip.tif: 8x8 px is over the pixel cap \(10;.*before decoding"):
        read_bands(tif_bytes(arr), "chip.tif", None, max_pixels=10)
    with pytest.raises(ChiptagError, match=r"chip.tif has 3 band\(s\); the model was trained on 4-band files"):
        read_bands(tif_bytes(arr), "chip.tif", BandReading((0, 1, 2), file_bands=4))
    with pytest.raises(ChiptagError, match=r"chip.tif: float64 values beyond float32's range"):
        read_bands(tif_bytes(np.full((2, 8, 8), 1e300)), "chip.tif", None)
    f64 = np.random.default_rng(0).random((2, 8, 8))
    assert np.array_equal(read_bands(tif_bytes(f64), "chip.tif", None), f64.astype(np.float32))  # read as float32
    with pytest.raises(ChiptagError, match=r"cannot decode TIFF chip.tif|cannot read TIFF chip.tif"):
        raw = bytearray(tif_bytes(arr, compression="zlib"))
        raw[-40:] = b"\xff" * 40  # damaged compressed strip
        read_bands(bytes(raw), "chip.tif", None)


def _nodata_chip(value, share: float, dtype=np.uint16, side: int = 10) -> np.ndarray:
    a = (np.arange(4 * side * side).reshape(4, side, side) % 97 + 100).astype(dtype)
    a[3].flat[: int(round(share * side * side))] = value  # the NIR band's first pixels
    return a


def test_nodata_is_an_error_naming_file_and_band_unless_filled_with_the_band_mean():
    raw = tif_bytes(_nodata_chip(0, 0.2))
    with pytest.raises(RasterProblem, match=r"x.tif: band 3 has 20 NaN/inf or nodata 0 pixel\(s\) \(data.nodata\)"):
        read_bands(raw, "x.tif", BandReading(None, nodata=0))
    assert read_bands(raw, "x.tif", None).min() == 0  # without a nodata value, 0 is a reading like any other
    means = (1.0, 2.0, 3.0, 555.0)
    got = read_bands(raw, "x.tif", BandReading((3, 0), nodata=0, fill="mean", means=(555.0, 1.0)))
    assert (got[0].flat[:20] == 555.0).all() and got[0].flat[20] > 0 and got[1].min() >= 100
    masked = read_bands(raw, "x.tif", BandReading(None, nodata=0, fill="mean"))  # pre-flight / statistics
    assert np.isnan(masked[3]).sum() == 20 and not np.isnan(masked[:3]).any()
    mean, _, _ = band_statistics([masked], None, pixels_per_image=100)
    assert mean[3] == pytest.approx(float(_nodata_chip(0, 0.2)[3].flat[20:].mean()))  # nodata left out
    nan = _nodata_chip(np.nan, 0.3, np.float32)
    filled = read_bands(tif_bytes(nan), "x.tif", BandReading(None, fill="mean", means=means))
    assert (filled[3].flat[:30] == 555.0).all()  # NaN is nodata always
    with pytest.raises(RasterProblem, match=r"x.tif: 60% of its pixels are NaN/inf or nodata 0 \(data.nodata\) "
                                            r"\(over 50%\)") as exc:
        read_bands(tif_bytes(_nodata_chip(0, 0.6)), "x.tif", BandReading(None, nodata=0, fill="mean", means=means))
    assert exc.value.kind == "mostly_nodata"


def test_the_files_own_gdal_nodata_tag_marks_nodata():
    raw = tif_bytes(_nodata_chip(9, 0.1), extratags=[(42113, "s", 0, "9", True)])
    with pytest.raises(RasterProblem, match=r"band 3 has 10 NaN/inf or nodata 9 pixel\(s\) \(its GDAL_NODATA tag\)"):
        read_bands(raw, "x.tif", None)
    assert read_bands(raw, "x.tif", BandReading(None, nodata=-1)).min() == 9  # data.nodata overrides the tag
    filled = read_bands(raw, "x.tif", BandReading(None, fill="mean", means=(0.0, 0.0, 0.0, 42.0)))
    assert (filled[3].flat[:10] == 42.0).all()


def test_nodata_policy_travels_in_the_preprocessing_and_the_preflight(tmp_path):
    pre = Preprocessing(16, (1.0,) * 4, (2.0,) * 4, bands=(0, 1, 2, 3), nodata=0.0, fill="mean", file_bands=4)
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    old = pre.to_dict()
    for key in ("nodata", "fill", "file_bands"):
        old.pop(key)
    assert Preprocessing.from_dict(old) == Preprocessing(16, (1.0,) * 4, (2.0,) * 4, bands=(0, 1, 2, 3))  # older runs
    paths = []
    for name, share in (("ok", 0.0), ("some", 0.2), ("most", 0.7)):
        paths.append(tmp_path / f"{name}.tif")
        paths[-1].write_bytes(tif_bytes(_nodata_chip(0, share, side=20)))
    report = Report()
    assert check_images(paths, report, bands=BandReading(None, nodata=0)) == {1, 2}
    assert [p.kind for p in report.bad] == ["nodata", "mostly_nodata"]
    report = Report()
    assert check_images(paths, report, bands=BandReading(None, nodata=0, fill="mean")) == {2}
    assert "most.tif" in report.bad[0].file and "70%" in report.bad[0].detail


def test_band_statistics_clip_at_percentiles_then_standardise():
    rng = np.random.default_rng(0)
    a = rng.normal(1000, 50, (2, 64, 64)).astype(np.float32)
    a[1] = 7.0  # a constant band normalises to 0, not to inf
    a[0, 0, :8] = 1e6  # hot pixels the clip removes
    mean, std, clip = band_statistics([a], (1, 99), pixels_per_image=64 * 64)
    assert clip[0][1] < 1200 and abs(mean[0] - 1000) < 5 and 40 < std[0] < 60
    assert mean[1] == 7.0 and std[1] == 1.0
    mean, _, clip = band_statistics([a], None, pixels_per_image=64 * 64)
    assert clip is None and mean[0] > 1500  # without clipping the hot pixels pull the mean


def test_raster_goes_through_the_one_input_path(tmp_path):
    """Resize per band (float), D4 views and per-band normalisation, in the batches and in chip()."""
    arr = (np.random.default_rng(2).random((4, 24, 40)) * 60000).astype(np.uint16)
    path = tmp_path / "a.tif"
    path.write_bytes(tif_bytes(arr))
    pre = Preprocessing(16, mean=(100.0, 200.0, 300.0, 400.0), std=(10.0, 20.0, 30.0, 40.0), resize="pad",
                        bands=(3, 0, 1, 2), clip=((0, 50000),) * 4)
    images = ImageInput(pre)
    chip = images.chip(path, view=3)
    assert chip.dtype == torch.float32 and chip.shape == (4, 16, 16)
    assert chip[:, 0, 0].tolist() == [100.0, 200.0, 300.0, 400.0]  # pad borders: the band means
    (x, idx, errors), = list(images.batches([path], 4, 0, view=3))
    assert torch.equal(x[0], chip) and errors == [""]
    z = images.normalize(x)
    assert z.shape == (1, 4, 16, 16) and z[0, :, 0, 0].abs().max() == 0  # the mean normalises to 0
    assert z.max() <= (50000 - 100) / 10 + 1e-3  # clipped before standardising
    (xd, _, _), = list(ImageInput(pre, torch.device("cpu"), "nvjpeg").batches([path], 4, 0, view=3))
    assert torch.equal(xd, x)  # the nvjpeg path decodes rasters in its workers, identically
    pre_rt = Preprocessing.from_dict(pre.to_dict())
    assert pre_rt == pre and Preprocessing.from_dict(Preprocessing(32).to_dict()).bands is None
    assert set(Preprocessing(32).to_dict()) == {"image_size", "mean", "std", "resize"}  # RGB records as before


def test_preflight_on_rasters_finds_missing_bands_mixed_counts_and_corrupt_files(tmp_path):
    good = np.ones((4, 16, 16), np.uint16)
    files = {"a": tif_bytes(good), "b": tif_bytes(good), "c": tif_bytes(good), "five": tif_bytes(np.ones((5, 16, 16),
             np.uint16)), "cut": tif_bytes(good)[:100]}
    paths = []
    for name, raw in files.items():
        paths.append(tmp_path / f"{name}.tif")
        paths[-1].write_bytes(raw)
    report = Report()
    bad = check_images(paths, report)
    kinds = {p.kind: Path(p.file).stem for p in report.bad}
    assert bad == {3, 4} and kinds == {"band_count": "five", "truncated": "cut"}
    assert not report.converted  # rasters are not "converted to RGB"
    report = Report()
    assert check_images(paths[:1], report, bands=[0, 4]) == {0} and report.bad[0].kind == "band_missing"


def test_feature_cache_key_covers_bands_and_statistics(tmp_path):
    from chiptag.features.extraction import fingerprint

    path = tmp_path / "a.tif"
    path.write_bytes(tif_bytes(np.ones((4, 8, 8), np.uint16)))
    pre = Preprocessing(16, (1.0,) * 4, (2.0,) * 4, bands=(2, 1, 0, 3))
    keys = {fingerprint("h", p, [path], 0) for p in (pre, Preprocessing(16, (1.0,) * 4, (2.0,) * 4, bands=(0, 1, 2, 3)),
                                                      Preprocessing(16, (1.5,) + (1.0,) * 3, (2.0,) * 4, bands=(2, 1, 0, 3)),
                                                      Preprocessing(16, (1.0,) * 4, (2.0,) * 4, bands=(2, 1, 0, 3),
                                                                    clip=((0, 9),) * 4))}
    assert len(keys) == 4
