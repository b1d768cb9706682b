"""A dataset shaped like a real one (tests/posters.py) trains with a config and --set overrides only."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from chiptag.cli import app
from posters import DUPLICATES, TAGS, make_posters

runner = CliRunner()


def test_poster_dataset_trains_with_given_split_and_beats_baseline(tmp_path):
    root = make_posters(tmp_path / "posters", n=160, seed=0)
    cfg = {
        "data": {"root": str(root), "labels": "posters.csv", "images": "images", "id_column": "Id"},
        "models": [{"name": "posters", "backbone": "resnet18", "weights": None, "image_size": 64,
                    "hidden_dim": 64, "dropout": 0.1, "learning_rate": 1e-2, "epochs": 20}],
        "training": {"batch_size": 32, "device": "cpu", "num_workers": 0, "progress": False},
        "features": {"cache_dir": str(tmp_path / "cache")},
        "output": {"runs_dir": str(tmp_path / "runs")},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    sets = ["data.resize=pad", "data.split.files.train=lists/train.txt", "data.split.files.val=lists/val.csv",
            "data.split.files.test=lists/test.txt"]
    result = runner.invoke(app, ["train", "-c", str(config), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tags"] == sorted(TAGS) and summary["resize"] == "pad"  # the Genre text column is no tag
    assert summary["split"]["given"] is True
    given = {"train": (root / "lists/train.txt").read_text().split(),
             "val": (root / "lists/val.csv").read_text().split()[1:],
             "test": [s.removesuffix(".jpg") for s in (root / "lists/test.txt").read_text().split()]}
    for split, names in given.items():  # honoured exactly, and recorded in the run dir
        assert (run / "split" / f"{split}.txt").read_text().split() == sorted(names)
    assert summary["metrics"]["test"]["f2_minus_baseline"] > 0.1, summary["metrics"]["test"]
    validation = json.loads((run / "validation.json").read_text())
    assert validation["problems"]["duplicate_same"] == DUPLICATES and validation["skipped"] == 0
    assert validation["problems"]["ignored_column"] == 1 and validation["problems"]["size_unusual"] >= 1
    ckpt_pre = __import__("torch").load(run / "checkpoint.pt", weights_only=True)["preprocessing"]
    assert ckpt_pre["resize"] == "pad"
