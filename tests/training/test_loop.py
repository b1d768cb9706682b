"""The epoch loop's optimizer and LR schedule follow the config (model.optimizer, training.scheduler.name)."""

from __future__ import annotations

import math

import pytest
import torch

from chiptag.training.loop import make_optim, training_compute
from chiptag.training.phases import HEAD, Phase
from chiptag.training.main import run_train
from chiptag.training.settings import Settings


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizer_choice_switches_the_optimizer(tiny_config, name, cls):
    cfg = tiny_config(optimizer=name, weight_decay=0.01)
    head = torch.nn.Linear(4, 2)
    settings = Settings.from_config(cfg).optim
    optim = make_optim(settings, Phase(HEAD, 3, None), head)
    assert type(optim.optimizer) is cls
    group = optim.optimizer.param_groups[0]
    assert group["lr"] == cfg.model.learning_rate and group["weight_decay"] == 0.01
    assert settings.describe()[0].startswith({"adam": "Adam(", "adamw": "AdamW(", "sgd": "SGD("}[name])


def test_cosine_schedule_anneals_over_the_phase(tiny_config):
    cfg = tiny_config(epochs=3, optimizer="sgd")
    cfg.training.scheduler.name = "cosine"
    s = run_train(cfg)
    lr0, floor = cfg.model.learning_rate, cfg.training.scheduler.min_lr
    expected = [floor + (lr0 - floor) * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [h["lr"] for h in s["history"]] == pytest.approx(expected)
    assert s["optimizer"].startswith("SGD(") and s["scheduler"].startswith("CosineAnnealingLR")


def test_constant_schedule_keeps_the_learning_rate(tiny_config):
    cfg = tiny_config(epochs=2)
    cfg.training.scheduler.name = "constant"
    s = run_train(cfg)
    assert [h["lr"] for h in s["history"]] == [cfg.model.learning_rate] * 2 and s["scheduler"] == "constant"


@pytest.mark.parametrize("select", ["val_loss", "val_f2_tuned"])
def test_checkpoint_epoch_follows_training_select(tiny_config, select):
    from chiptag.training.main import run_train

    cfg = tiny_config(epochs=4)
    cfg.training.select = select
    s = run_train(cfg)
    key, best = ("val/loss", min) if select == "val_loss" else ("val/f2_tuned", max)
    values = [h[key] for h in s["history"]]
    assert s["best_epoch"] == values.index(best(values)) + 1 and s["select"] == select


def test_select_scores():
    import numpy as np

    from chiptag.training.select import score

    ev = {"loss": 0.3, "targets": np.array([[1, 0], [0, 1]]), "probs": np.array([[0.4, 0.1], [0.2, 0.3]])}
    assert score("val_loss", ev, 0.0) == (-0.3, {})
    assert score("val_f2", ev, 0.25) == (0.25, {})
    tuned, extra = score("val_f2_tuned", ev, 0.0)
    assert tuned == pytest.approx(1.0) and extra == {"val/f2_tuned": tuned}


def test_training_compute_flushes_subnormals_and_restores_the_settings():
    """Training runs with subnormal floats flushed (they made late head epochs 2-5x slower) and one thread for
    the head; outside it, torch's defaults are back."""
    tiny = torch.tensor([1e-39])  # a float32 subnormal
    before = torch.get_num_threads()
    with training_compute(1):
        assert torch.get_num_threads() == 1
        assert (tiny * 1.0).item() == 0.0
    assert torch.get_num_threads() == before
    assert (tiny * 1.0).item() > 0.0
