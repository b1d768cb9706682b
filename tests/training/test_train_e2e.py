"""The real pipeline end to end on tiny generated data (CPU): train -> run dir -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chiptag.evaluation.metrics import binarize, f2_samples
from chiptag.models import checkpoint
from chiptag.evaluation.evaluate import evaluate_run
from chiptag.training.main import run_train


def test_frozen_run_writes_complete_run_dir(tiny_config):
    s = run_train(tiny_config())
    run = s["run_dir"]
    from pathlib import Path

    run = Path(run)
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "split/train.txt",
                 "split/val.txt", "split/test.txt"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("run_id", "model", "tags", "metrics", "baseline", "thresholds", "timings"):
        assert key in summary
    probs = np.load(run / "eval_probs.npz")  # the headline is sklearn's sample F2 at the stored thresholds
    thresholds = [summary["thresholds"][t] for t in summary["tags"]]
    assert summary["metrics"]["test"]["f2"] == pytest.approx(
        f2_samples(probs["test_targets"], binarize(probs["test_probs"], np.asarray(thresholds))), abs=1e-3)
    assert set(summary["metrics"]["test"]["per_class"]) == set(summary["tags"])
    assert "f2" in summary["baseline"]["test"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"train/loss", "val/loss", "val/f2", "lr"} <= set(json.loads(lines[0]))
    # splits are disjoint and cover the table
    names = [set((run / "split" / f"{s}.txt").read_text().split()) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(map(len, names)) == 120


def test_frozen_backbone_never_changes(tiny_config):
    """BatchNorm running statistics and weights of a frozen backbone are bit-identical after training."""
    cfg = tiny_config(epochs=2)
    from chiptag.training.main import build_network
    from chiptag.training.settings import Settings

    fresh = build_network(Settings.from_config(cfg).network, 17, cfg.training.seed).tagger
    s = run_train(cfg)
    ckpt = checkpoint.load(f"{s['run_dir']}/checkpoint.pt")
    trained = checkpoint.load_tagger(ckpt)
    before, after = fresh.backbone.state_dict(), trained.backbone.state_dict()
    assert any("running_mean" in k for k in before)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_feature_cache_reused_across_runs(tiny_config):
    first = run_train(tiny_config(epochs=1))
    second = run_train(tiny_config(epochs=1, learning_rate=1e-3))
    assert first["features"]["cache"] == "miss"
    assert second["features"]["cache"] == "hit"


def test_evaluate_recomputes_summary_metrics(tiny_config):
    s = run_train(tiny_config())
    again = evaluate_run(s["run_dir"])
    assert again["test"]["f2"] == pytest.approx(s["metrics"]["test"]["f2"], abs=1e-6)
    assert again["val"]["f2_at_0.5"] == pytest.approx(s["metrics"]["val"]["f2_at_0.5"], abs=1e-6)


def test_same_seed_same_result(tiny_config):
    a = run_train(tiny_config(epochs=2))
    b = run_train(tiny_config(epochs=2))
    assert a["metrics"]["test"]["f2"] == b["metrics"]["test"]["f2"]
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]


@pytest.mark.slow
def test_unfrozen_trains_end_to_end(tiny_config):
    cfg = tiny_config(freeze=False, epochs=1, image_size=32)
    s = run_train(cfg)
    assert s["frozen"] is False
    assert s["parameters"]["frozen"] == 0
    assert np.isfinite(s["metrics"]["test"]["loss"])


def test_pos_weight_is_per_class(tiny_config):
    s = run_train(tiny_config(pos_weight=True, epochs=1))
    w = s["pos_weight"]
    assert set(w) == set(s["tags"])
    assert w["primary"] < 1.0 < w["water"]  # common tag below 1, rarer tag above
    assert max(w.values()) <= 30.0
