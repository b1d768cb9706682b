"""k-fold training (training.folds), frozen and fine-tuned: folds, the run dir, the ensemble, resume, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chiptag import config as config_mod
from chiptag.data.split import fold_indices, load_folds, save_folds, split_indices
from chiptag.errors import ChiptagError
from chiptag.evaluation.ensemble import make_ensemble
from chiptag.evaluation.evaluate import evaluate_run
from chiptag.evaluation.metrics import binarize, f2_samples
from chiptag.features import views
from chiptag.inference.export import export_run
from chiptag.inference.predictor import Predictor
from chiptag.interrupt import Interrupted
from chiptag.models import checkpoint
from chiptag.runs.layout import RunDir
from chiptag.runs.table import list_runs
from chiptag.training.main import run_train
from conftest import make_config_dict, signal_after_steps

WEATHER = ["clear", "partly_cloudy", "haze", "cloudy"]


def folds_config(tiny_data, work: Path, k: int = 3, epochs: int = 3, **extra):
    raw = make_config_dict(tiny_data, work, epochs=epochs)
    raw["training"]["folds"] = k
    raw.update(extra)
    return config_mod.from_dict(raw)


def test_folds_are_disjoint_stratified_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((300, 5)) < [0.5, 0.3, 0.1, 0.05, 0.02]).astype(np.uint8)
    splits = split_indices(y, seed=0)
    pool = np.concatenate([splits["train"], splits["val"]])
    folds = fold_indices(y, pool, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == sorted(pool.tolist())
    assert not set(np.concatenate(folds)) & set(splits["test"])
    for c in range(5):  # iterative stratification: each fold holds its share of every tag (±2)
        share = y[pool, c].sum() / 5
        assert all(abs(y[f, c].sum() - share) <= 2 for f in folds), c
    names = [f"img{i}" for i in range(300)]
    save_folds(names, folds, tmp_path / "folds.csv")
    back = load_folds(names, tmp_path / "folds.csv")
    assert all(np.array_equal(a, b) for a, b in zip(folds, back))
    with pytest.raises(ChiptagError, match="into 400 folds"):
        fold_indices(y, pool, 400)


def test_kfold_run_end_to_end(tiny_data, tmp_path, monkeypatch):
    calls = []
    real = views.view_features
    monkeypatch.setattr("chiptag.training.main.view_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = run_train(folds_config(tiny_data, tmp_path))
    assert len(calls) == 1  # one backbone pass for the three heads
    run = RunDir(s["run_dir"])
    f = s["folds"]
    assert f["k"] == 3 and [p["fold"] for p in f["per_fold"]] == [1, 2, 3]
    assert s["n_images"]["oof"] == s["n_images"]["train"] + s["n_images"]["val"]
    assert f["oof_f2"] == s["metrics"]["val"]["f2"] and f["ensemble_test_f2"] == s["metrics"]["test"]["f2"]
    for k in (1, 2, 3):
        assert run.fold(k).fold_result.is_file() and run.fold(k).checkpoint.is_file()
        assert not run.fold(k).resume.exists()
    oof = np.load(run.oof_probs)
    assert len(set(oof["names"].tolist())) == s["n_images"]["oof"]
    thresholds = np.array([s["thresholds"][t] for t in s["tags"]])
    assert f2_samples(oof["targets"], binarize(oof["probs"], thresholds)) == pytest.approx(f["oof_f2"], abs=1e-3)
    # The run's checkpoint is the ensemble: its probability is the mean of the three fold models'.
    ckpt = checkpoint.load(run.checkpoint)
    assert ckpt.members == 3
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:6]
    ens = Predictor.from_run(run.path).predict(chips)
    members = [Predictor.from_run(run.fold(k).path).predict(chips) for k in (1, 2, 3)]
    assert np.abs(ens - np.mean(members, axis=0)).max() < 1e-5
    again = evaluate_run(run.path)  # test recomputed from the ensemble checkpoint
    assert again["test"]["f2"] == pytest.approx(s["metrics"]["test"]["f2"], abs=1e-6)
    pytest.importorskip("onnxruntime")
    import onnx

    exported = export_run(run.path, "onnx", tmp_path / "folds.onnx")  # one graph averaging the three heads
    assert exported["max_abs_diff"] < 1e-4
    meta = {p.key: p.value for p in onnx.load(tmp_path / "folds.onnx").metadata_props}
    assert meta["members"] == "3"
    row = list_runs(run.path.parent)[0]
    assert row.status == "completed" and row.epochs.endswith("x 3 folds")
    # One backbone per run dir: each fold's checkpoint keeps its head and refers to the run's checkpoint.
    raw = torch.load(run.fold(1).checkpoint, map_location="cpu", weights_only=True)
    assert raw["backbone_file"] == "../checkpoint.pt" and all(k.startswith("head.") for k in raw["state_dict"])
    # A single run on the same split and the k-fold run: thresholds on the single run's val (inside the OOF set).
    single = run_train(config_mod.from_dict(make_config_dict(tiny_data, tmp_path, epochs=2)))
    assert disk(run.path) <= 1.3 * disk(single["run_dir"])  # 3 folds + the ensemble: one backbone
    ens = make_ensemble([single["run_dir"], run.path], tmp_path / "ens")
    assert ens["n_images"]["val"] == single["n_images"]["val"]
    assert list(evaluate_run(tmp_path / "ens")) == ["test"]  # its val was in the k-fold run's training folds
    # Both runs froze the same (seeded) backbone: the ensemble's file holds it once.
    assert RunDir(tmp_path / "ens").checkpoint.stat().st_size < 1.2 * RunDir(single["run_dir"]).checkpoint.stat().st_size


def disk(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_a_fold_dir_moved_out_of_its_run_names_the_missing_backbone(tiny_data, tmp_path):
    s = run_train(folds_config(tiny_data, tmp_path, k=2, epochs=1))
    moved = tmp_path / "fold-1"
    RunDir(s["run_dir"]).fold(1).path.rename(moved)
    with pytest.raises(ChiptagError, match="takes its backbone from .*checkpoint.pt, which is missing"):
        Predictor.from_run(moved)


def test_kfold_with_label_rules_decodes_one_weather_tag(tiny_data, tmp_path):
    labels = {"exclusive": [WEATHER], "implies_none": {"cloudy": ["primary", "agriculture", "road", "water"]},
              "apply": "always"}
    s = run_train(folds_config(tiny_data, tmp_path, k=2, labels=labels))
    assert s["label_rules"]["exclusive"] == [WEATHER]
    assert "f2_without_rules" in s["metrics"]["test"]
    p = Predictor.from_run(s["run_dir"])
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:20]
    decoded = [set(t.split()) for t in p.tag_strings(p.predict(chips))]
    assert all(len(d & set(WEATHER)) == 1 for d in decoded)
    assert all(not d & {"primary", "agriculture", "road", "water"} for d in decoded if "cloudy" in d)


def test_kfold_config_errors(tiny_data, tmp_path):
    raw = make_config_dict(tiny_data, tmp_path)
    raw["training"]["folds"] = 1
    with pytest.raises(ChiptagError, match="1 fold is no cross-validation"):
        config_mod.from_dict(raw)
    raw["training"]["folds"] = 3
    raw["labels"] = {"exclusive": [["clear", "sunny"], ["sunny", "rainy"]]}
    with pytest.raises(ChiptagError, match="exclusive groups must not share tags: 'sunny'"):
        config_mod.from_dict(raw)


@pytest.mark.slow
def test_kfold_fine_tuning_end_to_end_and_resume_inside_a_fold(tiny_data, tmp_path, monkeypatch):
    """freeze: false with folds: K fine-tuned models (each from the pretrained weights), one ensemble checkpoint
    that predict, evaluate and export take, and --resume inside a fold."""
    model = {"freeze": False, "unfreeze_stages": 1, "epochs": 2}
    reference = run_train(folds_config(tiny_data, tmp_path / "a", k=2, epochs=2, models=[
        {**make_config_dict(tiny_data, tmp_path)["models"][0], **model}]))
    run = RunDir(reference["run_dir"])
    assert reference["folds"]["k"] == 2 and reference["frozen"] is False
    ckpt = checkpoint.load(run.checkpoint)
    assert len(ckpt.ensemble) == 2 and ckpt.members is None
    raw = torch.load(run.fold(1).checkpoint, map_location="cpu", weights_only=True)
    assert "backbone_file" not in raw and any(k.startswith("backbone.layer4") for k in raw["state_dict"])
    fold_weights = [checkpoint.load(run.fold(k).checkpoint).state_dict["backbone.layer4.0.conv1.weight"]
                    for k in (1, 2)]
    assert not torch.equal(*fold_weights)  # each fold fine-tuned its own backbone
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:6]
    ens = Predictor.from_run(run.path).predict(chips)
    members = [Predictor.from_run(run.fold(k).path).predict(chips) for k in (1, 2)]
    assert np.abs(ens - np.mean(members, axis=0)).max() < 1e-5
    assert evaluate_run(run.path)["test"]["f2"] == pytest.approx(reference["metrics"]["test"]["f2"], abs=1e-6)
    pytest.importorskip("onnxruntime")
    assert export_run(run.path, "onnx", tmp_path / "ft.onnx")["max_abs_diff"] < 1e-4  # one graph, two models

    cfg = folds_config(tiny_data, tmp_path / "b", k=2, epochs=2, models=[
        {**make_config_dict(tiny_data, tmp_path)["models"][0], **model}])
    with monkeypatch.context() as m:
        signal_after_steps(m, 4 + 3)  # fold 1 is 2 epochs x 2 steps: stop in fold 2's second epoch
        with pytest.raises(Interrupted, match="training stopped at epoch 2, step 1; state saved to .*fold-2"):
            run_train(cfg)
    stopped = RunDir(next((tmp_path / "b" / "runs").iterdir()))
    assert stopped.fold(1).fold_result.is_file() and stopped.fold(2).resume.is_file()
    resumed = run_train(resume=stopped.path)
    for a, b in zip(resumed["folds"]["per_fold"], reference["folds"]["per_fold"]):
        assert a["val_f2_tuned"] == b["val_f2_tuned"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert resumed["metrics"]["test"]["f2"] == reference["metrics"]["test"]["f2"]
