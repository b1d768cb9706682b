"""Checks before anything is created: a backbone, weights or device that cannot work is an error before data
validation runs and before a run dir exists; a sweep checks every entry before the first one trains."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import make_config_dict
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.config import from_dict
from chiptag.errors import ChiptagError
from chiptag.training.main import run_train


@pytest.fixture
def no_preflight(monkeypatch):
    """Data validation must not even start: fail loudly if it does."""
    import chiptag.training.main

    def boom(*_a, **_k):
        raise AssertionError("data validation ran before the checks")

    monkeypatch.setattr(chiptag.training.main, "preflight", boom)


@pytest.mark.parametrize("entry,training,message", [
    ({"backbone": "resnet99"}, {}, "models.0 (tiny): unknown backbone 'resnet99'"),
    ({"weights": "weights/missing.pt"}, {}, "models.0 (tiny): weights file not found: weights/missing.pt"),
    ({"weights": "IMAGENET1K_V9"}, {}, "models.0 (tiny): unknown weights 'IMAGENET1K_V9' for resnet18"),
    ({}, {"device": "cuda:0"}, "training.device is cuda:0 but no CUDA device is available"),
])
def test_a_run_that_cannot_start_leaves_nothing_behind(tiny_data, tmp_path, no_preflight, entry, training,
                                                       message):
    if training.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    raw = make_config_dict(tiny_data, tmp_path, **entry)
    raw["training"].update(training)
    with pytest.raises(ChiptagError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        run_train(from_dict(raw))
    assert not (tmp_path / "runs").exists()


def test_a_sweep_checks_every_entry_before_the_first_trains(tiny_data, tmp_path):
    raw = make_config_dict(tiny_data, tmp_path, epochs=1)
    base = raw["models"][0]
    raw["models"] += [{**base, "name": "ok-2"}, {**base, "name": "typo", "backbone": "resnet99"},
                      {**base, "name": "nofile", "weights": str(tmp_path / "w.pt")}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    res = CliRunner().invoke(app, ["train", "-c", str(path), "--all"])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "2 of 4 models entries cannot run; nothing was trained" in text
    assert "models.2 (typo): unknown backbone 'resnet99'" in text
    assert "models.3 (nofile): weights file not found" in text
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
