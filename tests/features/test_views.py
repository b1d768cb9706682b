"""D4 view cache: 8 cached views per chip, one random view per chip and epoch, TTA at evaluation."""

from __future__ import annotations

import pytest
import torch

from chiptag import config as config_mod
from chiptag.evaluation.evaluate import evaluate_run
from chiptag.training.main import run_train
from chiptag.features.views import RandomViewSampler, ViewAverage, tta_probabilities

from conftest import make_config_dict


def test_sampler_visits_every_chip_once_per_epoch_with_random_views():
    n, views = 50, 8
    s = RandomViewSampler(n, views, torch.Generator().manual_seed(0))
    epochs = [list(s) for _ in range(3)]
    for idx in epochs:
        assert sorted(i % n for i in idx) == list(range(n))  # each chip exactly once
        assert all(0 <= i < n * views for i in idx)
    assert len({i // n for i in epochs[0]}) > 4  # many different views drawn
    assert epochs[0] != epochs[1]  # a fresh draw every epoch
    again = RandomViewSampler(n, views, torch.Generator().manual_seed(0))
    assert list(again) == epochs[0]  # seeded


def test_view_average_is_the_mean_of_view_probabilities():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 3)
    x = torch.randn(4, 8, 5)
    avg = ViewAverage(head)
    expected = torch.sigmoid(head(x)).mean(1)
    assert torch.allclose(torch.sigmoid(avg(x)), expected, atol=1e-5)
    assert torch.equal(avg(x[:, 0]), head(x[:, 0]))  # plain (B, dim) rows go straight through
    probs = tta_probabilities(head, x.transpose(0, 1))
    assert torch.allclose(probs.float(), expected, atol=1e-5)


def _config(tiny_data, tmp_path, **features):
    raw = make_config_dict(tiny_data, tmp_path, epochs=2)
    raw["features"].update(features)
    return config_mod.from_dict(raw)


def test_eight_views_train_and_evaluate_with_tta(tiny_data, tmp_path):
    s = run_train(_config(tiny_data, tmp_path, views=8, engine="torch"))
    assert s["features"]["views"] == 8 and s["features"]["tta"] is True
    assert s["features"]["cache"] == "miss" and len(s["features"]["per_view"]) == 8
    cached = sorted((tmp_path / "cache").glob("resnet18-32px-v*.pt"))
    assert [p.name.split("-")[2] for p in cached] == [f"v{v}" for v in range(8)]
    again = evaluate_run(s["run_dir"])  # recomputes the TTA metrics from the cached views
    assert again["test"]["f2"] == pytest.approx(s["metrics"]["test"]["f2"], abs=1e-6)
    second = run_train(_config(tiny_data, tmp_path, views=8, engine="torch"))
    assert second["features"]["cache"] == "hit"


def test_views_differ_and_view_zero_is_the_plain_cache(tiny_data, tmp_path):
    from chiptag.models.backbones import build_backbone
    from chiptag.data.inputs import ImageInput
    from chiptag.features.views import make_extractor, view_features

    cfg = _config(tiny_data, tmp_path, views=8, engine="torch")
    torch.manual_seed(0)
    bb = build_backbone("resnet18", None, 32, progress=False)
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:6]
    ex = make_extractor(bb.net, bb.name, ImageInput(bb.preprocessing), cfg.features, show_progress=False)
    eight, _ = view_features(ex, paths, tmp_path / "c", views=8)
    one, info = view_features(ex, paths, tmp_path / "c", views=1)
    assert eight.shape == (8, 6, bb.dim) and info.cache == "hit"
    assert torch.equal(one[0], eight[0])
    assert not torch.equal(eight[0], eight[5])


def test_views_must_be_one_or_eight(tiny_data, tmp_path):
    from chiptag.errors import ChiptagError

    with pytest.raises(ChiptagError, match="features.views"):
        _config(tiny_data, tmp_path, views=4)


def test_tensor_batches_cover_every_row_once_in_the_drawn_order():
    from chiptag.features.views import TensorBatches

    x = torch.arange(10).float().unsqueeze(1)
    gen = torch.Generator().manual_seed(0)
    tb = TensorBatches(x, x * 2, 4, order=lambda: torch.randperm(10, generator=gen))
    batches = list(tb)
    assert len(tb) == len(batches) == 3 and [len(b[0]) for b in batches] == [4, 4, 2]
    rows = torch.cat([b[0] for b in batches]).squeeze(1)
    assert sorted(rows.tolist()) == list(range(10)) and rows.tolist() != list(range(10))
    assert all(torch.equal(b[1], b[0] * 2) for b in batches)  # targets stay with their rows
    assert [b[0].squeeze(1).tolist() for b in TensorBatches(x, x, 4)][0] == [0, 1, 2, 3]  # no order: as stored
