"""The command line as a user meets it: one-line errors, exit codes, and the Planet layout end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.data.synthetic import generate_dataset
from chiptag.models.backbones import get_spec

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_bad_config_key_is_one_line_error(tiny_config_file):
    r = invoke("train", "-c", tiny_config_file, "--set", "training.lr=1")
    assert r.exit_code == 2
    assert "unknown key 'training.lr'" in r.output and "Traceback" not in r.output


def test_wrong_type_and_index(tiny_config_file):
    r = invoke("train", "-c", tiny_config_file, "--set", "model.epochs=abc")
    assert r.exit_code == 2 and "models.0.epochs" in r.output
    r = invoke("train", "-c", tiny_config_file, "--set", "active_model_index=3")
    assert r.exit_code == 2 and "out of range" in r.output


def test_missing_data_path(tiny_config_file, tmp_path):
    r = invoke("train", "-c", tiny_config_file, "--set", f"data.root={tmp_path / 'nowhere'}")
    assert r.exit_code == 2 and "data.root: directory not found" in r.output


def test_missing_image_names_row(tiny_data, tiny_config_file, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "train-jpg" / "train_7.jpg").unlink()
    r = invoke("train", "-c", tiny_config_file, "--set", f"data.root={data}")
    assert r.exit_code == 2 and "row 9" in r.output and "train_7.jpg" in r.output


def test_demo_data_command(tmp_path):
    r = invoke("demo-data", tmp_path / "d", "--n", 5, "--size", 32)
    assert r.exit_code == 0
    assert len(list((tmp_path / "d" / "train-jpg").glob("*.jpg"))) == 5
    r = invoke("demo-data", tmp_path / "e", "--n", 0)
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_planet_config_on_real_kaggle_layout(tmp_path, monkeypatch):
    """configs/planet.yaml unchanged but for paths/sizes, on train_v2.csv + train-jpg/train_N.jpg, with an
    ImageNet-style weights file written by the test (no download)."""
    root = generate_dataset(tmp_path / "planet", n=90, size=40, seed=1)
    (root / "train_classes.csv").rename(root / "train_v2.csv")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(get_spec("resnet18").builder(weights=None).state_dict(), weights)
    monkeypatch.chdir(tmp_path)
    r = invoke("train", "-c", REPO / "configs" / "planet.yaml", "--set", f"data.root={root}",
               "--set", "active_model_index=4", "--set", f"model.weights={weights}",
               "--set", "model.image_size=32", "--set", "model.epochs=2", "--set", "training.progress=false")
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "resnet18" and summary["weights_id"].startswith("file:")
    assert summary["data"]["labels"].endswith("train_v2.csv")
    assert yaml.safe_load((run / "config.yaml").read_text())["active_model_index"] == 4
    r = invoke("evaluate", run)
    assert r.exit_code == 0 and "test: F2" in r.output


def test_validate_finds_corrupt_jpeg_data(tiny_data, tiny_config_file, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    chip = sorted((data / "train-jpg").glob("*.jpg"))[0]
    raw = chip.read_bytes()
    sos = raw.find(b"\xff\xda")
    chip.write_bytes(raw[: sos + (len(raw) - sos) // 3] + b"\xff\xd9")  # entropy data cut, EOI intact
    fast = runner.invoke(app, ["validate", "-c", str(tiny_config_file), "--set", f"data.root={data}"])
    assert fast.exit_code == 2 and "premature end of data segment" in fast.output and chip.name in fast.output
    full = runner.invoke(app, ["validate", "-c", str(tiny_config_file), "--set", f"data.root={data}", "--full",
                               "--set", "data.on_bad_image=skip"])
    assert full.exit_code == 0 and "1 would be skipped" in full.output
