"""A multiband (4-band TIFF) run through every consumer of images: `chiptag serve` (TIFF uploads, RGB composite
previews, clear refusals), `chiptag predict` on a folder of .tif (every kind of bad raster a row naming the file),
`chiptag evaluate`, and nodata filled with the band's training mean the same way in each."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from chiptag import config as config_mod  # noqa: E402
from chiptag.data.synthetic_rasters import generate_raster_dataset  # noqa: E402
from chiptag.inference.predictor import Predictor  # noqa: E402
from chiptag.inference.serve import create_app  # noqa: E402
from chiptag.inference.service import ServeOptions, Service  # noqa: E402
from chiptag.models import checkpoint  # noqa: E402
from conftest import make_config_dict  # noqa: E402

SIZE = 32  # chips' side (the model's input too: no resize between predict and the reference)
CAP = 10_000  # data.max_image_pixels of the run: a 128x128 raster (16,384 px) is over it


def tif(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack", planarconfig="separate", **kw)
    return buf.getvalue()


def with_nodata(raw: bytes, share: float) -> np.ndarray:
    """A chip's bands with the first `share` of its NIR pixels set to 0, the run's data.nodata."""
    arr = tifffile.imread(io.BytesIO(raw)).copy()
    arr[3].flat[: int(share * arr[3].size)] = 0
    return arr


@pytest.fixture(scope="module")
def raster_run(tmp_path_factory) -> dict:
    """A 4-band B,G,R,NIR run (R,G,B,NIR to the model) with nodata 0 filled by the band means: 40 chips, two of
    them with some nodata (trained on, filled) and one mostly nodata (skipped by on_bad_image: skip)."""
    from chiptag.training.main import run_train

    work = tmp_path_factory.mktemp("raster_run")
    root = generate_raster_dataset(work / "data", n=40, size=SIZE, seed=0)
    chips = sorted((root / "train-tif").glob("*.tif"))
    for path, share in ((chips[0], 0.1), (chips[1], 0.3), (chips[2], 0.8)):
        path.write_bytes(tif(with_nodata(path.read_bytes(), share)))
    raw = make_config_dict(root, work, image_size=SIZE, epochs=2)
    raw["data"].update(images="train-tif", extension=".tif", bands=[2, 1, 0, 3],
                       band_names=["red", "green", "blue", "nir"], nodata=0, fill="mean", on_bad_image="skip",
                       max_image_pixels=CAP)
    summary = run_train(config_mod.from_dict(raw))
    return {"summary": summary, "dir": Path(summary["run_dir"]), "chips": chips, "work": work}


@pytest.fixture(scope="module")
def predictor(raster_run) -> Predictor:
    return Predictor.from_run(raster_run["dir"], device="cpu", engine="torch")


@pytest.fixture(scope="module")
def client(raster_run):
    service = Service(raster_run["dir"], ServeOptions(device="cpu", engine="torch", max_wait_ms=1))
    with TestClient(create_app(service)) as c:
        service.warm()
        assert c.get("/readyz").status_code == 200
        yield c


def post(client, files, **params):
    return client.post("/v1/predict", files=[("files", (n, b)) for n, b in files], params=params)


def test_training_keeps_the_nodata_policy_and_skips_the_mostly_nodata_chip(raster_run):
    ckpt = checkpoint.load(raster_run["dir"] / "checkpoint.pt")
    pre = ckpt.preprocessing
    assert (pre.bands, pre.nodata, pre.fill, pre.file_bands) == ((2, 1, 0, 3), 0.0, "mean", 4)
    skipped = pd.read_csv(raster_run["dir"] / "skipped.csv")
    assert list(skipped["kind"]) == ["mostly_nodata"] and skipped["file"][0].endswith(raster_run["chips"][2].name)
    assert "80% of its pixels are NaN/inf or nodata 0" in skipped["detail"][0]


def test_serve_tags_tiff_uploads_as_predict_does_and_previews_an_rgb_composite(client, raster_run, predictor):
    chips = raster_run["chips"]
    files = [(p.name, p.read_bytes()) for p in (chips[3], chips[4], chips[1])]  # chips[1]: 30% nodata, filled
    r = post(client, files, preview="true")
    assert r.status_code == 200, r.text
    expected = predictor.predict([chips[3], chips[4], chips[1]])
    for entry, want in zip(r.json()["results"], expected):
        assert entry["error"] is None
        np.testing.assert_allclose([entry["probabilities"][t] for t in predictor.tags], want, atol=1e-5)
        head, data = entry["preview"].split(",", 1)
        assert head == "data:image/png;base64"
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))
        assert img.shape == (SIZE, SIZE, 3) and img.min() == 0 and img.max() == 255  # stretched composite
    assert "preview" not in post(client, files[:1]).json()["results"][0]  # only when asked
    info = client.get("/v1/model").json()
    assert info["bands"] == [2, 1, 0, 3] and info["band_names"] == ["red", "green", "blue", "nir"]
    assert info["fill"] == "mean" and info["limits"]["max_pixels"] == CAP  # the run's cap, lower than --max-pixels


def test_serve_refuses_what_a_4band_model_cannot_read_naming_the_upload(client, raster_run):
    good = raster_run["chips"][3].read_bytes()
    arr = tifffile.imread(io.BytesIO(good))
    jpeg = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), "green").save(jpeg, format="JPEG")
    bad = {"photo.jpg": (jpeg.getvalue(), "a JPEG image, but this model reads 4 bands (file bands [2, 1, 0, 3]: "
                                          "red, green, blue, nir of 4-band files) from TIFF rasters"),
           "three.tif": (tif(arr[:3]), "three.tif has 3 band(s); the model was trained on 4-band files"),
           "eight.tif": (tif(np.concatenate([arr, arr])), "eight.tif has 8 band(s)"),
           "holes.tif": (tif(with_nodata(good, 0.7)), "holes.tif: 70% of its pixels are NaN/inf or nodata 0"),
           "sar.tif": (tif(arr.astype(np.complex64)), "sar.tif: complex64 samples are not supported"),
           "cut.tif": (good[: len(good) // 2], "cut.tif"),
           "huge.tif": (tif(np.zeros((4, 128, 128), np.uint16)), "huge.tif: image over the pixel cap (128x128 px > "
                                                                 "10,000")}
    for name, (raw, words) in bad.items():
        r = post(client, [(name, raw)])
        assert r.status_code == (413 if name == "huge.tif" else 422), (name, r.text)
        assert words in r.json()["error"], (name, r.json()["error"])
        assert r.json()["results"][0]["error"] == r.json()["error"]
    r = post(client, [("ok.tif", good), ("photo.jpg", bad["photo.jpg"][0])])  # a batch: only the bad entry fails
    assert r.status_code == 200 and r.json()["results"][0]["error"] is None
    assert "photo.jpg" in r.json()["results"][1]["error"]


def test_predict_a_folder_of_tifs_every_bad_raster_a_row_naming_it(raster_run, predictor, tmp_path):
    from chiptag.inference.submission import PredictOptions, run_predict

    chips = raster_run["chips"]
    folder = tmp_path / "in"
    folder.mkdir()
    good = [chips[3], chips[4], chips[1]]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    arr = tifffile.imread(io.BytesIO(chips[5].read_bytes()))
    (folder / "z1_three.tif").write_bytes(tif(arr[:3]))
    (folder / "z2_five.tif").write_bytes(tif(np.concatenate([arr, arr[:1]])))
    (folder / "z3_cut.tif").write_bytes(chips[5].read_bytes()[:300])
    (folder / "z4_sar.tif").write_bytes(tif(arr.astype(np.complex64)))
    (folder / "z5_holes.tif").write_bytes(tif(with_nodata(chips[5].read_bytes(), 0.9)))
    (folder / "z6_huge.tif").write_bytes(tif(np.zeros((4, 128, 128), np.uint16)))
    (folder / "z7_nan.tif").write_bytes(tif(np.full((4, SIZE, SIZE), np.nan, np.float32)))
    Image.new("RGB", (128, 128)).save(folder / "z8_big.jpg")  # over the run's cap: refused on its header
    Image.new("RGB", (SIZE, SIZE)).save(folder / "z9_photo.jpg")
    out = tmp_path / "pred.csv"
    r = run_predict(raster_run["dir"], folder, out, PredictOptions(device="cpu", engine="torch", num_workers=0,
                                                                    probabilities=tmp_path / "p.csv",
                                                                    show_progress=False))
    assert r["rows"] == 12 and r["errors"] == 9
    errors = dict(pd.read_csv(tmp_path / "pred.errors.csv").values)
    assert "3 band(s)" in errors["z1_three"] and "5 band(s)" in errors["z2_five"]
    assert "truncated" in errors["z3_cut"] or "corrupt" in errors["z3_cut"]
    assert "complex64" in errors["z4_sar"] and "90%" in errors["z5_holes"] and "100%" in errors["z7_nan"]
    assert "pixel cap" in errors["z6_huge"] and "128x128" in errors["z6_huge"]
    assert "pixel cap" in errors["z8_big"] and "z9_photo.jpg is not a TIFF" in errors["z9_photo"]
    probs = pd.read_csv(tmp_path / "p.csv").set_index("image_name")
    np.testing.assert_allclose(probs.loc[[p.stem for p in good], predictor.tags].to_numpy(),
                               predictor.predict(good), atol=1e-5)


def test_nodata_is_filled_with_the_band_mean_identically_everywhere(raster_run, predictor):
    """A chip whose NIR pixels are nodata predicts as the same chip with those pixels set to the NIR mean."""
    chip = raster_run["chips"][1]  # 30% of its NIR pixels are 0 (nodata)
    arr = tifffile.imread(chip).astype(np.float32)
    arr[3][arr[3] == 0] = predictor.preprocessing.mean[3]  # model band 3 is file band 3 (NIR)
    x = predictor.images.stack([predictor.images.chip(chip)])
    assert float(x[0, 3].abs().flatten()[: int(0.3 * SIZE * SIZE)].max()) < 1e-4  # 0 once normalised
    filled = predictor.images.stack([predictor.images.chip(tif(arr), name="filled.tif")])
    assert np.allclose(x.numpy(), filled.numpy(), atol=1e-4)


def test_evaluate_a_multiband_run_reproduces_its_test_score(raster_run):
    from chiptag.evaluation.evaluate import evaluate_run

    result = evaluate_run(raster_run["dir"])
    assert result["test"]["f2"] == pytest.approx(raster_run["summary"]["metrics"]["test"]["f2"], abs=1e-6)


def test_report_tiles_fill_nodata_and_grey_out_a_mostly_nodata_chip(raster_run):
    from chiptag.evaluation.tiles import TileReader

    arr = tifffile.imread(raster_run["chips"][5])
    folder = raster_run["chips"][5].parent
    for name, share in (("tile_some", 0.2), ("tile_most", 0.8)):  # nodata in the red band (file band 2): shown
        red = arr.copy()
        red[2].flat[: int(share * red[2].size)] = 0
        (folder / f"{name}.tif").write_bytes(tif(red))  # not in the label table: nothing else reads it
    read = TileReader.for_run(raster_run["dir"], SIZE)
    tile, problem = read("tile_some")  # filled, then a stretched composite: nodata black
    assert problem == "" and tile.shape == (SIZE, SIZE, 3) and tile.max() == 1
    assert tile[0, 0, 0] == 0 and tile[-1, -1, 0] > 0  # the first red pixels were nodata
    tile, problem = read("tile_most")  # a grey tile that says why
    assert "tile_most.tif: 80% of its pixels are NaN/inf or nodata 0" in problem


def test_onnx_export_names_the_nodata_policy(raster_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    from chiptag.inference.export import export_run

    res = export_run(raster_run["dir"], "onnx", tmp_path / "model.onnx")
    meta = {p.key: p.value for p in onnx.load(res["path"]).metadata_props}
    assert (meta["nodata"], meta["fill"], meta["file_bands"], meta["bands"]) == ("0.0", "mean", "4", "[2, 1, 0, 3]")
    assert '"nir"' in meta["band_names"] and len(json.loads(meta["mean"])) == 4 and res["max_abs_diff"] < 1e-4


def test_page_shows_an_rgb_composite_of_an_uploaded_tiff(raster_run, predictor, tmp_path):
    from serve_helpers import page_cards, require_browser, running

    require_browser()
    chip = raster_run["chips"][3]
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (SIZE, SIZE), "green").save(jpeg)
    with running(raster_run["dir"], engine="torch") as (url, _):
        cards = page_cards(url, [chip, jpeg], tmp_path / "page.png", tmp_path / "profile")
    want = predictor.tag_strings(predictor.predict([chip]))[0].split()
    assert cards[chip.name]["shown"] == want
    assert cards[chip.name]["img"].startswith("data:image/png;base64,") and cards[chip.name]["img_size"] == [SIZE, SIZE]
    assert cards["photo.jpg"]["shown"][0].startswith("error: photo.jpg: a JPEG image, but this model reads 4 bands")
