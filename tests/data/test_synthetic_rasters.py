"""`chiptag demo-data --bands 4 --format tif`: B, G, R, NIR chips whose visible bands are the JPEG demo's, and a tag
only the near-infrared band shows."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.data.synthetic import draw_chip, sample_tags
from chiptag.data.synthetic_rasters import NIR_TAG, REFLECTANCE_SCALE, generate_raster_dataset, nir_band

tifffile = pytest.importorskip("tifffile")


def test_four_band_chips_keep_the_demo_colours_and_hide_the_nir_tag_from_them(tmp_path):
    root = generate_raster_dataset(tmp_path / "d", n=40, size=32, seed=3)
    rows = [line.split(",") for line in (root / "train_classes.csv").read_text().splitlines()[1:]]
    assert len(rows) == 40 and any(NIR_TAG in tags.split() for _, tags in rows)
    for i, (name, tags) in enumerate(rows[:8]):
        chip = tifffile.imread(root / "train-tif" / f"{name}.tif")
        assert chip.shape == (4, 32, 32) and chip.dtype == np.uint16
        rng = np.random.default_rng([3, i])
        rgb = draw_chip(sample_tags(rng), 32, rng)  # the JPEG demo's chip i, before compression
        blue_green_red = np.round(np.moveaxis(rgb[..., ::-1], -1, 0) / 255 * REFLECTANCE_SCALE)
        assert np.array_equal(chip[:3], blue_green_red)  # the tag changes nothing a colour model sees


def test_a_stressed_patch_lowers_the_near_infrared_only():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 1] = 160  # green canopy everywhere
    healthy = nir_band(rgb, False, np.random.default_rng(0))
    stressed = nir_band(rgb, True, np.random.default_rng(0))
    assert healthy.mean() > 0.6 and (stressed < 0.5 * healthy).mean() > 0.05


def test_demo_data_cli_writes_rasters_and_refuses_a_mixed_request(tmp_path):
    r = CliRunner().invoke(app, ["demo-data", str(tmp_path / "r"), "--n", "5", "--size", "32", "--bands", "4",
                                 "--format", "tif"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "r" / "train-tif").glob("*.tif"))) == 5
    bad = CliRunner().invoke(app, ["demo-data", str(tmp_path / "x"), "--bands", "4"])
    assert bad.exit_code != 0 and "--bands 4 --format tif" in bad.output
