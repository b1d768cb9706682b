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


def _config_file(tmp_path: Path, root: Path, **data) -> Path:
    raw = make_config_dict(root, tmp_path)
    raw["data"].update(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_validate_runs_the_checks_train_runs(tiny_data, tmp_path):
    """`validate` said ok for data `train` then refused (1 row: no train/val/test split; more folds than rows)."""
    lines = (tiny_data / "train_classes.csv").read_text(encoding="utf-8").splitlines()

    def rows(n: int) -> Path:
        root = tmp_path / f"rows{n}"
        root.mkdir(exist_ok=True)
        (root / "train_classes.csv").write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
        return _config_file(tmp_path, root, images=str(tiny_data / "train-jpg"))

    res = CliRunner().invoke(app, ["validate", "-c", str(rows(1))])
    assert res.exit_code == 2 and "need at least 3 labelled images" in res.output and "ok:" not in res.output
    res = CliRunner().invoke(app, ["validate", "-c", str(rows(12)), "--set", "training.folds=20"])
    assert res.exit_code == 2 and "into 20 folds" in res.output and "ok:" not in res.output
    assert CliRunner().invoke(app, ["validate", "-c", str(rows(12))]).exit_code == 0


def test_a_tag_without_training_positives_is_warned_and_its_figures_are_na(tiny_data, tmp_path, capsys):
    """A tag only on a test row got a tuned threshold and per-class figures as if the model had learnt it."""
    root = tmp_path / "data"
    root.mkdir()
    lines = (tiny_data / "train_classes.csv").read_text(encoding="utf-8").splitlines()
    names = [line.split(",")[0] for line in lines[1:]]
    lines[-1] += " newtag"  # on the last chip only, which the given split puts in test
    (root / "train_classes.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split, part in (("train", names[:84]), ("val", names[84:102]), ("test", names[102:])):
        (root / f"{split}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
    split = {"files": {"train": "train.txt", "val": "val.txt", "test": "test.txt"}}
    path = _config_file(tmp_path, root, images=str(tiny_data / "train-jpg"), split=split)
    res = CliRunner().invoke(app, ["validate", "-c", str(path)])
    out = res.output.replace("\n", " ")
    assert res.exit_code == 0 and "tag(s) with no positive in the training rows (train): " in out
    assert "newtag (0 val, 1 test)" in out and "reported as n/a" in out
    summary = run_train(config_mod.load(path))
    assert "newtag (0 val, 1 test)" in capsys.readouterr().err.replace("\n", " ")
    for s in ("val", "test"):
        row = summary["metrics"][s]["per_class"]["newtag"]
        assert row["f2"] is None and row["precision"] is None and row["recall"] is None
        assert row["no_training_positives"] and row["support"] == (1 if s == "test" else 0)
    assert "no_training_positives" not in summary["metrics"]["test"]["per_class"]["primary"]
    md = (Path(summary["run_dir"]) / "report" / "report.md").read_text(encoding="utf-8")
    assert "| newtag | " in md and md.split("| newtag | ")[1].split("\n")[0].endswith("| n/a | n/a | n/a |")
