"""A dataset with one of each bad input: training stops with the full listing, or skips and lists every item."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from chiptag import config as config_mod
from chiptag.cli import app
from chiptag.training.main import run_train
from conftest import make_config_dict


def _img(seed: int, size: int = 48, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _bytes(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


# name -> (tags, file content or None for "no file") ; the expected kind for each bad one
BAD = {
    "x_missing": ("clear primary", None, "image_missing"),
    "x_empty": ("clear primary", b"", "zero_bytes"),
    "x_trunc": ("clear primary", _bytes(_img(1), "JPEG")[:300], "truncated"),
    "x_junk": ("clear primary", b"GIF-not-really" * 20, "not_an_image"),
    "x_tiny": ("clear primary", _bytes(_img(2, size=10), "JPEG"), "too_small"),
    "x_notags": ("", _bytes(_img(3), "JPEG"), "empty_tags"),
}
NOTES = {"x_png": ("clear primary", _bytes(_img(4), "PNG")),
         "x_gray": ("haze primary", _bytes(_img(5, mode="L"), "JPEG")),
         "x_cmyk": ("cloudy", _bytes(_img(6, mode="CMYK"), "JPEG"))}


def bad_dataset(tiny_data: Path, dest: Path) -> Path:
    root = shutil.copytree(tiny_data, dest / "data")
    labels = root / "train_classes.csv"
    rows = labels.read_text(encoding="utf-8").splitlines()
    rows.append(rows[1].split(",")[0] + ",clear primary")  # duplicate name, conflicting tags
    for name, (tags, content, *_) in {**BAD, **NOTES}.items():
        rows.append(f"{name},{tags}")
        if content is not None:
            (root / "train-jpg" / f"{name}.jpg").write_bytes(content)
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_one_of_each_bad_input_stops_with_full_listing(tiny_data, tmp_path):
    root = bad_dataset(tiny_data, tmp_path)
    cfg = config_mod.from_dict(make_config_dict(root, tmp_path, epochs=1))
    try:
        run_train(cfg)
    except Exception as exc:  # noqa: BLE001 - the type is asserted below
        from chiptag.errors import ChiptagError

        assert isinstance(exc, ChiptagError)
        msg = str(exc)
    else:
        raise AssertionError("training did not stop")
    for label in ("image file missing: 1", "image file is empty (0 bytes): 1", "truncated or corrupt image data: 1",
                  "not an image Pillow can identify: 1", "image smaller than data.min_side: 1", "empty tag list: 1",
                  "duplicate image name with conflicting tags", "content does not match its extension",
                  "converted to RGB: CMYK 1, L 1"):
        assert label in msg, label
    assert "x_missing.jpg" in msg and "row 123" in msg  # file and CSV row
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # before any run dir


def test_skip_policy_trains_and_lists_every_skipped_item(tiny_data, tmp_path):
    root = bad_dataset(tiny_data, tmp_path)
    raw = make_config_dict(root, tmp_path, epochs=1)
    raw["data"]["on_bad_image"] = "skip"
    s = run_train(config_mod.from_dict(raw))
    run = Path(s["run_dir"])
    with (run / "skipped.csv").open(encoding="utf-8") as f:
        skipped = list(csv.DictReader(f))
    by_kind = {r["kind"] for r in skipped}
    assert by_kind == {k for *_, k in BAD.values()} | {"duplicate_conflict"}
    assert len(skipped) == len(BAD) + 2  # both copies of the conflicting duplicate
    assert all(r["row"] and r["file"] for r in skipped)
    summary = json.loads((run / "summary.json").read_text())
    v = summary["validation"]
    assert v["skipped"] == len(BAD) + 2 and len(v["skipped_items"]) == len(skipped)
    assert v["converted_to_rgb"] == {"CMYK": 1, "L": 1}
    assert sum(s["n_images"].values()) == 120 - 1 + len(NOTES)  # the duplicated good chip is out too


def test_cli_validate_lists_problems_and_exits_nonzero(tiny_data, tmp_path):
    root = bad_dataset(tiny_data, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(make_config_dict(root, tmp_path)), encoding="utf-8")
    res = CliRunner().invoke(app, ["validate", "-c", str(path)])
    assert res.exit_code == 2
    assert "image file missing: 1" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["validate", "-c", str(path), "--set", "data.on_bad_image=skip"])
    usable, skipped = 120 - 1 + len(NOTES), len(BAD) + 2
    assert res.exit_code == 0 and f"ok: {usable} usable rows, {skipped} would be skipped" in res.output


def test_predict_prevalidates_images(tiny_config, tiny_data, tmp_path):
    import pandas as pd

    from chiptag.inference.submission import PredictOptions, run_predict

    s = run_train(tiny_config(epochs=1))
    folder = tmp_path / "pred"
    folder.mkdir()
    for i, src in enumerate(sorted((tiny_data / "train-jpg").glob("*.jpg"))[:3]):
        shutil.copy(src, folder / f"ok_{i}.jpg")
    (folder / "cut.jpg").write_bytes(_bytes(_img(1), "JPEG")[:300])
    (folder / "gray.jpg").write_bytes(_bytes(_img(2, mode="L"), "PNG"))
    r = run_predict(Path(s["run_dir"]), folder, tmp_path / "sub.csv", PredictOptions(show_progress=False))
    assert r["rows"] == 5 and r["errors"] == 1
    errors = pd.read_csv(tmp_path / "sub.errors.csv")
    assert errors["image_name"].tolist() == ["cut"] and "truncated" in errors["error"][0]
