"""`chiptag ensemble`: runs averaged into a run that predict, evaluate, export and the runs table accept."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from chiptag import config as config_mod
from chiptag.cli import app
from chiptag.evaluation.ensemble import make_ensemble
from chiptag.evaluation.evaluate import evaluate_run
from chiptag.evaluation.metrics import binarize, f2_samples
from chiptag.inference.predictor import Predictor
from chiptag.runs.table import list_runs
from chiptag.training.main import run_train
from conftest import make_config_dict


def train(tiny_data, work, **model):
    return run_train(config_mod.from_dict(make_config_dict(tiny_data, work, **{"epochs": 2, **model})))


def test_ensemble_of_two_backbones_is_a_run(tiny_data, tmp_path):
    a = train(tiny_data, tmp_path, name="r18")
    b = train(tiny_data, tmp_path, name="mnv3", backbone="mobilenet_v3_small")
    out = tmp_path / "runs" / "ens"
    result = CliRunner().invoke(app, ["ensemble", a["run_dir"], b["run_dir"], "--out", str(out)])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert [m["backbone"] for m in s["members"]] == ["resnet18", "mobilenet_v3_small"]
    # The stored figures are the mean of the members' stored probabilities at the stored thresholds.
    probs = [np.load(f"{r['run_dir']}/eval_probs.npz") for r in (a, b)]
    mean = (probs[0]["test_probs"] + probs[1]["test_probs"]) / 2
    thr = np.array([s["thresholds"][t] for t in s["tags"]])
    assert s["metrics"]["test"]["f2"] == pytest.approx(f2_samples(probs[0]["test_targets"], binarize(mean, thr)),
                                                       abs=1e-3)
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:4]  # predict: the mean of the members
    members = np.mean([Predictor.from_run(r["run_dir"]).predict(chips) for r in (a, b)], axis=0)
    assert np.abs(Predictor.from_run(out).predict(chips) - members).max() < 1e-5
    again = evaluate_run(out)
    assert again["test"]["f2"] == pytest.approx(s["metrics"]["test"]["f2"], abs=1e-6)
    row = next(r for r in list_runs(tmp_path / "runs") if r.run_id == "ens")
    assert row.status == "completed" and row.f2 == pytest.approx(s["metrics"]["test"]["f2"])


def test_ensemble_refuses_runs_with_different_test_splits(tiny_data, tmp_path):
    a = train(tiny_data, tmp_path, name="a", epochs=1)
    raw = make_config_dict(tiny_data, tmp_path, name="b", epochs=1)
    raw["data"]["split"] = {"seed": 7}
    b = run_train(config_mod.from_dict(raw))
    result = CliRunner().invoke(app, ["ensemble", a["run_dir"], b["run_dir"], "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "differ in test split" in result.output and "Traceback" not in result.output
    with pytest.raises(Exception, match="at least two run directories"):
        make_ensemble([a["run_dir"]], tmp_path / "e")
