"""Multiband GeoTIFF chips end to end (CPU): train (band order, training-split statistics, adapted stem) ->
checkpoint -> predict on .tif files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

tifffile = pytest.importorskip("tifffile")

from chiptag import config as config_mod  # noqa: E402
from chiptag.data.images import Preprocessing  # noqa: E402
from chiptag.data.rasters import training_preprocessing  # noqa: E402
from chiptag.inference.predictor import Predictor  # noqa: E402
from chiptag.models import checkpoint  # noqa: E402
from chiptag.training.main import run_train  # noqa: E402
from conftest import make_config_dict  # noqa: E402


@pytest.fixture(scope="module")
def raster_data(tiny_data, tmp_path_factory):
    """The tiny chips as 16-bit B,G,R,NIR GeoTIFF-style rasters (bands separate), Planet's analytic layout."""
    root = tmp_path_factory.mktemp("rasters") / "data"
    (root / "train-tif").mkdir(parents=True)
    shutil.copy(tiny_data / "train_classes.csv", root / "train_classes.csv")
    for jpg in sorted((tiny_data / "train-jpg").glob("*.jpg")):
        rgb = np.asarray(Image.open(jpg).convert("RGB"), dtype=np.uint16).transpose(2, 0, 1) * 40
        nir = rgb[1] // 2 + 3000
        bgrn = np.stack([rgb[2], rgb[1], rgb[0], nir]).astype(np.uint16)
        tifffile.imwrite(root / "train-tif" / f"{jpg.stem}.tif", bgrn, photometric="minisblack",
                         planarconfig="separate")
    return root


@pytest.mark.slow
def test_multiband_run_trains_stores_band_stats_and_predicts_tifs(raster_data, tmp_path):
    raw = make_config_dict(raster_data, tmp_path, image_size=32, epochs=2)
    raw["data"].update(images="train-tif", extension=".tif", bands=[2, 1, 0, 3],
                       band_names=["red", "green", "blue", "nir"], clip_percentiles=[1, 99])
    cfg = config_mod.from_dict(raw)
    s = run_train(cfg)
    ckpt = checkpoint.load(f"{s['run_dir']}/checkpoint.pt")
    pre = ckpt.preprocessing
    assert pre.bands == (2, 1, 0, 3) and pre.band_names == ("red", "green", "blue", "nir") and len(pre.clip) == 4
    train = (tmp_path / "runs" / s["run_id"] / "split" / "train.txt").read_text().split()
    expected = training_preprocessing(cfg.data, [raster_data / "train-tif" / f"{n}.tif" for n in train],
                                      Preprocessing(32), cfg.training.seed)
    assert pre.mean == pytest.approx(expected.mean) and pre.std == pytest.approx(expected.std)
    assert pre.mean[3] > pre.mean[0]  # the NIR band (offset 3000) is band 3 of the model's input
    tagger = checkpoint.load_tagger(ckpt)
    assert tagger.backbone.conv1.weight.shape[1] == 4
    tifs = sorted((raster_data / "train-tif").glob("*.tif"))[:5]
    eager = np.asarray(Predictor.from_run(s["run_dir"], device="cpu", engine="torch").predict(tifs))
    assert eager.shape == (5, len(ckpt.tags))
    pytest.importorskip("onnxruntime")
    ort = np.asarray(Predictor.from_run(s["run_dir"], device="cpu", engine="onnxruntime").predict(tifs))
    assert np.abs(ort - eager).max() < 1e-4  # the 4-channel graph
    from chiptag.inference.export import export_run
    import onnx

    res = export_run(tmp_path / "runs" / s["run_id"], "onnx", tmp_path / "model.onnx")
    meta = {p.key: p.value for p in onnx.load(res["path"]).metadata_props}
    assert res["max_abs_diff"] < 1e-4 and meta["bands"] == "[2, 1, 0, 3]" and "N x 4 x" in meta["input"]
    assert '"nir"' in meta["band_names"] and len(json.loads(meta["mean"])) == 4
    assert 0 < s["metrics"]["test"]["f2"] <= 1
    from chiptag.evaluation.tiles import TileReader

    tile, problem = TileReader.for_run(tmp_path / "runs" / s["run_id"], 32)(tifs[0].stem)
    assert problem == "" and tile.shape == (32, 32, 3) and tile.min() == 0 and tile.max() == 1  # stretched RGB
