"""torchrun with 2 CPU processes (gloo) gives the same result as one process, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import chiptag
from chiptag import config as config_mod
from chiptag.training.main import run_train

from conftest import make_config_dict

# Full-batch steps, no dropout and frozen BatchNorm statistics make the gradient independent of how the
# batch is split across ranks, so the only differences left are float summation order and float16 features.
MODEL = {"freeze": False, "epochs": 2, "unfreeze_after": 1, "unfreeze_stages": 1, "batchnorm": "frozen",
         "dropout": 0.0}


def _raw(tiny_data, work: Path, name: str) -> dict:
    raw = make_config_dict(tiny_data, work, **MODEL)
    raw["training"]["batch_size"] = 128  # >= the 84 training chips: one step per epoch
    raw["features"]["engine"] = "torch"
    raw["output"]["run_name"] = name
    return raw


@pytest.mark.slow
def _prepend_pythonpath(src: Path) -> str:
    """This checkout's src first, then whatever PYTHONPATH the environment relies on for its packages."""
    return os.pathsep.join([str(src), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def test_child_pythonpath_keeps_the_environments_entries(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/opt/site-a", "/opt/site-b"]))
    assert _prepend_pythonpath(tmp_path).split(os.pathsep) == [str(tmp_path), "/opt/site-a", "/opt/site-b"]
    monkeypatch.delenv("PYTHONPATH")
    assert _prepend_pythonpath(tmp_path) == str(tmp_path)


def test_torchrun_two_processes_matches_one(tiny_data, tmp_path):
    single = run_train(config_mod.from_dict(_raw(tiny_data, tmp_path / "one", "single")))
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(_raw(tiny_data, tmp_path / "two", "ddp")), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": _prepend_pythonpath(Path(chiptag.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "chiptag", "train", "-c", str(cfg_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "two" / "runs").iterdir())
    assert [r.name for r in runs] == ["ddp"]  # rank 1 wrote no run dir
    assert proc.stdout.count("best epoch") == 1  # and printed nothing
    ddp = json.loads((runs[0] / "summary.json").read_text())
    assert len(single["history"]) == len(ddp["history"]) == 2
    for a, b in zip(single["history"], ddp["history"]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3, abs=1e-4)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=1e-3, abs=1e-4)
    assert ddp["metrics"]["test"]["loss"] == pytest.approx(single["metrics"]["test"]["loss"], rel=1e-3)
    assert ddp["metrics"]["test"]["f2_at_0.5"] == pytest.approx(single["metrics"]["test"]["f2_at_0.5"], abs=0.02)
