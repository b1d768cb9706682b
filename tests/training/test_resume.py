"""Interruption and resume: a real run is signalled mid-training (or mid-extraction), resumed, and compared
with an uninterrupted run of the same seed. Numerical faults stop with the epoch and step named."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from chiptag import config as config_mod
from chiptag.data.inputs import ImageInput
from chiptag.features import extraction as features
from chiptag.models import checkpoint
from chiptag.runs.layout import RunDir
from chiptag.cli import app
from chiptag.errors import ChiptagError
from chiptag.training.epoch import NonFiniteLoss
from chiptag.interrupt import Interrupted
from chiptag.training.main import run_train
from conftest import make_config_dict, signal_after_steps


def run_dir_of(tmp_path: Path) -> Path:
    (run,) = [p for p in (tmp_path / "runs").iterdir() if not (p / "summary.json").is_file()]
    return run


def same_result(a: dict, b: dict) -> None:
    assert a["metrics"]["test"]["f2"] == b["metrics"]["test"]["f2"]
    assert a["metrics"]["val"]["f2"] == b["metrics"]["val"]["f2"]
    assert a["thresholds"] == b["thresholds"] and a["best_epoch"] == b["best_epoch"]
    for key in ("train/loss", "val/loss", "val/f2", "lr"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key


# 84 training chips / batch 32 = 3 steps per epoch
@pytest.mark.slow
@pytest.mark.parametrize("sig, after_steps, where", [
    (signal.SIGTERM, 5, "epoch 2, step 2"),  # mid-epoch: the epoch's batch order and RNG are replayed
    (signal.SIGINT, 3, "after epoch 1"),  # on the last step of an epoch: the epoch completes first
])
def test_interrupted_run_resumes_to_identical_result(tiny_config, tmp_path, monkeypatch, sig, after_steps, where):
    cfg = tiny_config(epochs=3)
    reference = run_train(cfg)
    with monkeypatch.context() as m:
        signal_after_steps(m, after_steps, sig)
        with pytest.raises(Interrupted) as stopped:
            run_train(cfg)
    assert stopped.value.exit_code == 128 + sig
    assert where in str(stopped.value) and "chiptag train --resume" in str(stopped.value)
    run = run_dir_of(tmp_path)
    assert RunDir(run).resume.is_file() and not (run / "summary.json").exists()
    resumed = run_train(resume=run)
    same_result(resumed, reference)
    assert not RunDir(run).resume.exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # every epoch logged once
    with pytest.raises(Exception, match="already complete"):
        run_train(resume=run)


@pytest.mark.slow
@pytest.mark.parametrize("after_steps, where, recipe", [
    (5, "epoch 2, step 2", {}),  # inside the fine-tuning phase: its optimizer and per-step schedule are restored
    (3, "after epoch 1", {}),  # at the end of the head phase: fine-tuning starts fresh after the resume
    # the whole recipe: the weights' EMA, clipping, layer-wise rates, every augmentation
    (5, "epoch 2, step 2", {"ema_decay": 0.9, "clip_grad_norm": 0.5, "layer_decay": 0.5,
                            "finetune_scheduler": "onecycle", "batchnorm": "train"}),
])
def test_interrupted_fine_tuning_resumes_to_identical_result(tiny_config, tmp_path, monkeypatch, after_steps,
                                                             where, recipe):
    cfg = tiny_config(freeze=False, epochs=3, unfreeze_after=1, unfreeze_stages=1, **recipe)
    if recipe:
        cfg.augment.scale, cfg.augment.brightness, cfg.augment.contrast, cfg.augment.hue = 0.2, 0.2, 0.2, 0.1
    reference = run_train(cfg)
    assert [h["phase"] for h in reference["history"]] == ["head", "finetune", "finetune"]
    with monkeypatch.context() as m:
        signal_after_steps(m, after_steps, signal.SIGTERM)
        with pytest.raises(Interrupted) as stopped:
            run_train(cfg)
    assert where in str(stopped.value)
    resumed = run_train(resume=run_dir_of(tmp_path))
    same_result(resumed, reference)


def test_cli_exits_143_on_sigterm_and_resumes(tiny_config_file, tmp_path, monkeypatch):
    runner = CliRunner()
    with monkeypatch.context() as m:
        signal_after_steps(m, 4)
        res = runner.invoke(app, ["train", "-c", str(tiny_config_file)])
    assert res.exit_code == 143, res.output
    assert "Traceback" not in res.output and "--resume" in res.output
    run = run_dir_of(tmp_path)
    res = runner.invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_interrupted_extraction_resumes_from_saved_chunks(tiny_data, tmp_path, monkeypatch):
    """Interrupted mid-extraction and resumed: only the rest is decoded, and features and metrics are exactly
    those of an uninterrupted run (the saved chunks are float32; one float16 encode at the end)."""
    import chiptag.data.images as images

    raw = make_config_dict(tiny_data, tmp_path, epochs=1)
    raw["features"]["batch_size"] = 16
    cfg = config_mod.from_dict(raw)
    reference = run_train(config_mod.from_dict({**raw, "features": {**raw["features"],
                                                                    "cache_dir": str(tmp_path / "cache-ref")}}))
    monkeypatch.setattr(features, "CHUNK_IMAGES", 40)
    real_save, real_batches, real_read = features.PartialCache.save, ImageInput.batches, images.read_rgb
    loaders, decoded, armed = [], [], {"on": True}

    def save(self, start, feats):  # signal while the first chunk is saved (whole batches: 3 x 16 = 48 images)
        real_save(self, start, feats)
        if armed["on"]:
            armed["on"] = False
            os.kill(os.getpid(), signal.SIGINT)

    def batches(self, paths, *args, **kwargs):
        loaders.append(len(paths))
        return real_batches(self, paths, *args, **kwargs)

    def read_rgb(path):
        decoded.append(path)
        return real_read(path)

    monkeypatch.setattr(features.PartialCache, "save", save)
    monkeypatch.setattr(ImageInput, "batches", batches)
    monkeypatch.setattr(images, "read_rgb", read_rgb)
    with pytest.raises(Interrupted, match="feature extraction stopped at image 48/120") as stopped:
        run_train(cfg)
    assert stopped.value.exit_code == 130
    assert loaders == [120]  # one loader for the whole extraction, not one per saved chunk
    cache = tmp_path / "cache"
    assert not list(cache.glob("*.pt"))  # never looks complete
    (partial,) = cache.glob("*.partial")
    assert sorted(f.name for f in partial.glob("*.pt")) == ["000000000.pt"]  # 48 rows: chunks end on batches
    loaders.clear()
    decoded.clear()
    s = run_train(resume=run_dir_of(tmp_path))
    assert s["features"]["resumed_from"] == 48 and loaders == [72] and len(decoded) == 72  # only the rest
    assert not partial.exists() and len(list(cache.glob("*.pt"))) == 1
    resumed, straight = (torch.load(next(d.glob("*.pt")), weights_only=True)
                         for d in (cache, tmp_path / "cache-ref"))
    assert all(torch.equal(resumed[k], straight[k]) for k in ("features", "scale"))
    same_result(s, reference)


def test_nan_loss_names_epoch_and_step_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    def poison(opt):
        for group in opt.param_groups:
            for p in group["params"]:
                p.data.fill_(float("nan"))

    signal_after_steps(monkeypatch, 4, action=poison)  # epoch 2, after its first step
    with pytest.raises(NonFiniteLoss) as err:
        run_train(tiny_config(epochs=3))
    msg = str(err.value)
    assert "loss is nan at epoch 2, step 1" in msg and "lower learning rate" in msg
    assert "last good checkpoint is kept" in msg
    run = run_dir_of(tmp_path)
    ckpt = checkpoint.load(run / "checkpoint.pt")
    assert ckpt.epoch == 1
    assert all(torch.isfinite(v).all() for v in ckpt.state_dict.values() if v.is_floating_point())


def test_huge_learning_rate_fails_cleanly_from_the_cli(tiny_config_file):
    res = CliRunner().invoke(app, ["train", "-c", str(tiny_config_file), "--set", "model.learning_rate=1e30"])
    assert res.exit_code == 2, res.output
    assert "loss is" in res.output and "at epoch" in res.output and "step" in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_resume_with_another_schedule_than_saved_is_a_clear_error(tiny_config, tmp_path, monkeypatch):
    """A run interrupted under the per-epoch schedule (as an older chiptag fine-tuned), its config.yaml then asking
    for the per-step one: the saved scheduler state does not fit, and the error says so instead of mixing them."""
    cfg = tiny_config(freeze=False, epochs=3, unfreeze_after=1, unfreeze_stages=1, finetune_scheduler="training")
    with monkeypatch.context() as m:
        signal_after_steps(m, 5, signal.SIGTERM)  # inside the fine-tuning phase
        with pytest.raises(Interrupted):
            run_train(cfg)
    run = run_dir_of(tmp_path)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("finetune_scheduler: training", "finetune_scheduler: cosine"))
    with pytest.raises(ChiptagError, match=r"saved learning-rate schedule \(reduce on plateau\) is not the one .*"
                                           r"\(per-step warm-up/cosine\)"):
        run_train(resume=run)
