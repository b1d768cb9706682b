"""Prediction on the extraction engines: ONNX Runtime (the whole tagger exported once, cached by the hash of
its weights) gives the eager Predictor's probabilities within a measured tolerance, TTA included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.data.images import d4
from chiptag.errors import ChiptagError
from chiptag.features.views import mean_probabilities
from chiptag.inference.predictor import Predictor

pytest.importorskip("onnxruntime")
# Measured on this test's tiny run (resnet18 @48 px, float32): max |ONNX Runtime - eager| 2.4e-7 without TTA,
# 6e-8 with it (benchmarks/frozen_training.py reports the same figure at 128 px). The bound leaves room for other
# CPUs' kernels.
TOLERANCE = 1e-5


@pytest.fixture
def run_dir(trained_run) -> Path:
    return Path(trained_run["run_dir"])


@pytest.fixture(scope="module")
def chips(tiny_data) -> list[Path]:
    return sorted((tiny_data / "train-jpg").glob("*.jpg"))[:20]


@pytest.mark.parametrize("tta", [False, True])
def test_onnxruntime_predictions_equal_the_eager_predictor(run_dir, chips, tmp_path, tta):
    eager = Predictor.from_run(run_dir, device="cpu", engine="torch")
    fast = Predictor.from_run(run_dir, device="cpu", engine="onnxruntime", cache_dir=tmp_path)
    got = fast.predict(chips, tta=tta, batch_size=6)
    ref = eager.predict(chips, tta=tta, batch_size=6)
    assert np.abs(got - ref).max() <= TOLERANCE
    # and both are the one rule, written out: the mean over D4 views of the eager float32 model's probabilities
    x = eager.images.stack([eager.images.chip(c) for c in chips])
    with torch.inference_mode():
        model = eager.model.to(memory_format=torch.contiguous_format).float()
        want = (mean_probabilities(model.tagger(d4(x, v)) for v in range(8)) if tta else model(x)).numpy()
    assert np.abs(got - want).max() <= TOLERANCE


def test_auto_engine_is_onnxruntime_on_cpu_and_its_graph_is_cached_by_weights(run_dir, chips, tmp_path):
    p = Predictor.from_run(run_dir, device="cpu", cache_dir=tmp_path)
    assert p.engine == "onnxruntime"
    first = p.predict(chips[:3])
    (graph,) = (tmp_path / "predict" / "onnx").glob("tagger-48px-*.onnx")
    stamp = graph.stat().st_mtime_ns
    again = Predictor.from_run(run_dir, device="cpu", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.predict(chips[:3]), first)
    assert graph.stat().st_mtime_ns == stamp  # exported once, reused
    other = Predictor.from_run(run_dir, device="cpu", cache_dir=tmp_path)
    with torch.no_grad():
        next(other.model.tagger.head.parameters()).add_(0.5)  # other weights: another graph, never the stale one
    changed = other.predict(chips[:3])
    assert len(list((tmp_path / "predict" / "onnx").glob("tagger-48px-*.onnx"))) == 2
    assert np.abs(changed - first).max() > 1e-3


def test_failed_export_falls_back_to_torch_only_for_auto(run_dir, chips, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    p = Predictor.from_run(run_dir, device="cpu", cache_dir=tmp_path)
    probs = p.predict(chips[:2])
    assert p.engine == "torch" and np.isfinite(probs).all()
    with pytest.raises(ChiptagError, match="unsupported operator.*--engine torch to predict"):
        Predictor.from_run(run_dir, device="cpu", engine="onnxruntime", cache_dir=tmp_path).predict(chips[:2])
    with pytest.raises(ChiptagError, match="engine: unknown engine"):
        Predictor.from_run(run_dir, device="cpu", engine="tensorrt")


def test_cli_engine_option(run_dir, tiny_data, tmp_path):
    folder = tiny_data / "train-jpg"
    outs = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / f"{engine}.csv"
        probs = tmp_path / f"{engine}-probs.csv"
        r = CliRunner().invoke(app, ["predict", str(run_dir), str(folder), "--out", str(out), "--probabilities",
                                     str(probs), "--engine", engine, "--device", "cpu", "--batch-size", "16",
                                     "--workers", "0"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        outs[engine] = pd.read_csv(probs).iloc[:, 1:].to_numpy()
    assert np.abs(outs["torch"] - outs["onnxruntime"]).max() <= TOLERANCE
    r = CliRunner().invoke(app, ["predict", str(run_dir), str(folder), "--engine", "nope"])
    assert r.exit_code != 0 and "unknown engine" in r.output and "Traceback" not in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (eager bf16 engine)")
def test_cuda_bf16_predictions_stay_near_the_cpu_float32_ones(run_dir, chips):
    cpu = Predictor.from_run(run_dir, device="cpu", engine="torch").predict(chips, tta=True)
    cuda = Predictor.from_run(run_dir, device="cuda").predict(chips, tta=True)
    # bf16 keeps 8 mantissa bits: a bound from that, not yet measured on a GPU (no device in this session)
    assert np.abs(cuda - cpu).max() <= 2e-2


def test_predict_and_serve_take_one_engine_list(run_dir, tiny_data):
    """serve --help offers bf16: predict takes it too (eager on CUDA; on CPU a clear CUDA-only error, not
    'unknown engine')."""
    from chiptag.cli import ENGINE_HELP

    for command in ("predict", "serve"):
        text = " ".join(CliRunner().invoke(app, [command, "--help"]).output.replace("│", " ").split())
        assert ENGINE_HELP in text and "bf16 (eager, CUDA only)" in text
    r = CliRunner().invoke(app, ["predict", str(run_dir), str(tiny_data / "train-jpg"), "--engine", "bf16",
                                 "--device", "cpu"])
    assert r.exit_code == 2 and "bf16 runs on CUDA only" in r.output and "unknown engine" not in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (eager bf16 engine)")
def test_bf16_engine_is_the_eager_cuda_engine(run_dir, chips):
    bf16 = Predictor.from_run(run_dir, device="cuda", engine="bf16")
    assert bf16.engine == "bf16" and Predictor.from_run(run_dir, device="cuda").engine == "bf16"
    np.testing.assert_array_equal(bf16.predict(chips), Predictor.from_run(run_dir, device="cuda",
                                                                          engine="torch").predict(chips))
