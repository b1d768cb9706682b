"""Shared fixtures: tiny generated datasets and configs. Everything runs on CPU in tmp_path."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from chiptag import config as config_mod
from chiptag.data.synthetic import generate_dataset


def signal_after_steps(monkeypatch, n: int, sig: int = signal.SIGTERM, action=None) -> None:
    """Send `sig` to this process right after the n-th optimizer step (or run `action` there instead): a real
    Ctrl-C/SIGTERM mid-training, for the interrupt and resume tests."""
    real = torch.optim.Adam.step
    count = {"n": 0}

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == n:
            action(self) if action else os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory):
    """Prediction graphs (Predictor's ONNX export) go to $XDG_CACHE_HOME/chiptag: a session-private one here,
    never the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """120 chips of 48 px in the Kaggle layout (train_classes.csv + train-jpg/). Read-only for tests."""
    return generate_dataset(tmp_path_factory.mktemp("tiny") / "data", n=120, size=48, seed=0)


def make_config_dict(data_root: Path, work: Path, **model) -> dict:
    entry = {"name": "tiny", "backbone": "resnet18", "weights": None, "freeze": True, "image_size": 32,
             "hidden_dim": 32, "dropout": 0.1, "learning_rate": 3e-3, "epochs": 3}
    entry.update(model)
    return {
        "data": {"root": str(data_root), "labels": "train_classes.csv"},
        "models": [entry],
        "training": {"batch_size": 32, "seed": 0, "device": "cpu", "num_workers": 0, "progress": False},
        "features": {"cache_dir": str(work / "cache"), "batch_size": 64},
        "output": {"runs_dir": str(work / "runs")},
        # The error sheets render ~20 figures per run: drawn by the shared trained_run and their own tests only.
        "report": {"error_sheets": False},
    }


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A factory: tiny_config(**model_overrides) -> Config for a 3-epoch frozen resnet18 at 32 px."""

    def make(**model):
        return config_mod.from_dict(make_config_dict(tiny_data, tmp_path, **model))

    return make


@pytest.fixture
def tiny_config_file(tiny_data, tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_config_dict(tiny_data, tmp_path)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> dict:
    """One finished tiny run (summary dict), shared read-only by the report, predict and export tests.
    image_size 48 == the chips' size, so exported models can be compared without any resize."""
    from chiptag.training.main import run_train

    work = tmp_path_factory.mktemp("trained_run")
    raw = make_config_dict(tiny_data, work, image_size=48, epochs=4)
    # The report tests check the sheets written at the end of training; three tag sheets keep them quick.
    raw["report"] = {"error_sheets": True, "top_errors": 8, "tag_sheets": 3}
    return run_train(config_mod.from_dict(raw))
