"""The label rules are a decision made on validation (labels.apply): a run tunes thresholds with and without
them, keeps one, says so (summary, report, runs table), and its checkpoint decodes that way in predict, serve,
evaluate and the ONNX metadata."""

from __future__ import annotations

import json

import pytest

from chiptag import config as config_mod
from chiptag.evaluation.label_rules import LabelRules
from chiptag.inference.export import metadata
from chiptag.inference.predictor import Predictor
from chiptag.models import checkpoint
from chiptag.runs.layout import RunDir
from chiptag.runs.table import read_run
from chiptag.training.main import run_train
from conftest import make_config_dict

WEATHER = ["clear", "partly_cloudy", "haze", "cloudy"]
RULES = {"exclusive": [WEATHER], "implies_none": {"cloudy": ["primary", "agriculture", "road", "water"]}}


@pytest.mark.parametrize("labels", [{**RULES}, {**RULES, "apply": "always", "form": "soft"}],
                         ids=["auto-hard", "always-soft"])
def test_the_kept_choice_is_reported_and_travels_with_the_checkpoint(tiny_data, tmp_path, labels):
    raw = make_config_dict(tiny_data, tmp_path)
    raw["labels"] = labels
    s = run_train(config_mod.from_dict(raw))
    d = s["label_rules_decision"]
    assert d["apply"] == labels.get("apply", "auto") and d["form"] == labels.get("form", "hard")
    with_rules, without = d["val_f2_with_rules"], d["val_f2_without_rules"]
    assert 0 < with_rules <= 1 and 0 < without <= 1
    if d["apply"] == "auto":
        assert d["kept"] == (with_rules > without)
        assert d["confidence"] is None
    else:
        assert d["kept"] and d["confidence"] in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    assert s["metrics"]["val"]["f2"] == pytest.approx(with_rules if d["kept"] else without)

    ckpt = checkpoint.load(RunDir(s["run_dir"]).checkpoint)
    assert ckpt.label_rules["apply"] == ("always" if d["kept"] else "never")
    assert ckpt.label_rules["confidence"] == d["confidence"]
    assert json.loads(metadata(ckpt)["label_rules"]) == ckpt.label_rules  # the ONNX export's
    rules = Predictor.from_run(s["run_dir"], device="cpu", engine="torch").rules  # predict and serve
    assert bool(rules) == d["kept"] and rules.confidence == (d["confidence"] if d["kept"] else None)
    assert LabelRules.from_config(s["label_rules"], s["tags"]).to_dict(s["tags"]) == rules.to_dict(s["tags"])

    row = read_run(s["run_dir"])
    kept = ("hard" if d["confidence"] is None else f"soft@{d['confidence']:g}") if d["kept"] else "none"
    assert row.label_rules.startswith(f"{kept} kept:") and f"{with_rules:.4f}" in row.label_rules
    assert f"none {without:.4f}" in row.label_rules
    report = RunDir(s["run_dir"]).report_md.read_text()
    assert f"validation F2 {with_rules:.4f}" in report and f"{without:.4f} without" in report
