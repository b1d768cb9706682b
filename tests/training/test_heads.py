"""k-fold heads trained together (training.heads): the same per-fold figures as one at a time, resume, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from chiptag import config as config_mod
from chiptag.errors import ChiptagError
from chiptag.interrupt import Interrupted
from chiptag.models.head import HeadSpec
from chiptag.runs.layout import RunDir
from chiptag.training import heads, main
from chiptag.training.epoch import NonFiniteLoss
from chiptag.training.main import run_train
from conftest import make_config_dict, signal_after_steps


def kfold_config(tiny_data, work, k=3, epochs=3, folds_extra=None, **model):
    raw = make_config_dict(tiny_data, work, epochs=epochs, **model)
    raw["training"]["folds"] = k
    raw["features"].update(folds_extra or {})
    return config_mod.from_dict(raw)


def one_at_a_time(monkeypatch) -> None:
    """The epoch loop alone for every fold (what k-fold runs did before heads were trained together)."""
    monkeypatch.setattr(main.heads_mod, "batchable", lambda *a, **k: [])


def same_figures(a: dict, b: dict, tol: float = 1e-5) -> None:
    for x, y in zip(a["folds"]["per_fold"], b["folds"]["per_fold"], strict=True):
        assert x["best_epoch"] == y["best_epoch"] and x["n_train"] == y["n_train"]
        assert x["val_loss"] == pytest.approx(y["val_loss"], abs=tol)
        assert x["val_f2_tuned"] == pytest.approx(y["val_f2_tuned"], abs=tol)
    ha, hb = a["history"], b["history"]
    assert [(h.get("fold"), h["epoch"]) for h in ha] == [(h.get("fold"), h["epoch"]) for h in hb]
    for key in ("train/loss", "val/loss", "val/f2", "lr"):
        assert [h[key] for h in ha] == pytest.approx([h[key] for h in hb], abs=tol), key
    assert a["metrics"]["test"]["f2"] == pytest.approx(b["metrics"]["test"]["f2"], abs=tol)


@pytest.mark.parametrize("model, features", [
    ({}, {}),  # one view; folds of different sizes: padded batches, masked rows
    ({"pos_weight": True, "hidden_dim": None, "dropout": 0.3}, {"views": 8}),  # D4 views, TTA, per-fold weights
])
def test_heads_together_match_one_at_a_time(tiny_data, tmp_path, monkeypatch, model, features):
    together = run_train(kfold_config(tiny_data, tmp_path / "a", folds_extra=features, **model))
    run = RunDir(together["run_dir"])
    assert not any(run.fold(k).resume.exists() for k in (1, 2, 3))  # done: nothing left to resume
    with monkeypatch.context() as m:
        one_at_a_time(m)
        alone = run_train(kfold_config(tiny_data, tmp_path / "b", folds_extra=features, **model))
    assert len({f["n_train"] for f in together["folds"]["per_fold"]}) > 1 or features  # uneven folds exercised
    same_figures(together, alone)


def test_reduce_on_plateau_and_selection_per_fold(tiny_data, tmp_path, monkeypatch):
    """Each fold's schedule reacts to its own validation loss; each keeps its own best epoch (val_f2_tuned)."""
    raw = make_config_dict(tiny_data, tmp_path / "a", epochs=6, learning_rate=0.05)
    raw["training"].update(folds=3, select="val_f2_tuned", scheduler={"factor": 0.5, "patience": 0})
    together = run_train(config_mod.from_dict(raw))
    with monkeypatch.context() as m:
        one_at_a_time(m)
        raw["output"]["runs_dir"] = str(tmp_path / "b" / "runs")
        alone = run_train(config_mod.from_dict(raw))
    same_figures(together, alone)
    lrs = {k: [h["lr"] for h in together["history"] if h["fold"] == k] for k in (1, 2, 3)}
    assert any(min(v) < 0.05 for v in lrs.values())  # some fold's LR dropped ...
    assert len({tuple(v) for v in lrs.values()}) > 1  # ... and not in step with every other fold


@pytest.mark.slow
def test_interrupted_heads_resume_to_the_same_result(tiny_data, tmp_path, monkeypatch):
    reference = run_train(kfold_config(tiny_data, tmp_path / "a", epochs=3))
    cfg = kfold_config(tiny_data, tmp_path / "b", epochs=3)
    with monkeypatch.context() as m:
        signal_after_steps(m, 3 * 3 + 1)  # 3 folds x 3 steps per epoch (67/67/68 chips): in epoch 2, which completes
        with pytest.raises(Interrupted, match="after epoch 2; state saved to resume.pt in .*fold-1, .*fold-3"):
            run_train(cfg)
    run = RunDir(next((tmp_path / "b" / "runs").iterdir()))
    state = run.fold(2).resume
    assert all(run.fold(k).resume.is_file() for k in (1, 2, 3)) and not run.fold(1).fold_result.exists()
    good = state.read_bytes()
    state.write_bytes(b"not a torch file")  # a damaged state: a clear error, not a traceback
    with pytest.raises(ChiptagError, match="cannot read .*fold-2.resume.pt.*start a new run"):
        run_train(resume=run.path)
    state.write_bytes(good)
    resumed = run_train(resume=run.path)
    same_figures(resumed, reference, tol=0)  # the saved state replays exactly
    assert len(run.fold(2).metrics.read_text().splitlines()) == 3  # every epoch logged once
    assert not any(run.fold(k).resume.exists() for k in (1, 2, 3))


@pytest.mark.slow
def test_a_fold_saved_with_the_batch_resumes_in_the_epoch_loop_too(tiny_data, tmp_path, monkeypatch):
    """The batch saves each fold in the epoch loop's format: a fold can continue alone (the loop reads it),
    with the figures of the uninterrupted run."""
    reference = run_train(kfold_config(tiny_data, tmp_path / "a", epochs=3))
    with monkeypatch.context() as m:
        signal_after_steps(m, 3 * 3 + 1)
        with pytest.raises(Interrupted):
            run_train(kfold_config(tiny_data, tmp_path / "b", epochs=3))
    run = RunDir(next((tmp_path / "b" / "runs").iterdir()))
    one_at_a_time(monkeypatch)
    resumed = run_train(resume=run.path)
    same_figures(resumed, reference)


def test_a_run_with_an_older_chiptags_heads_state_is_a_clear_error(tiny_data, tmp_path):
    cfg = kfold_config(tiny_data, tmp_path, epochs=1)
    run = RunDir(run_train(cfg)["run_dir"])
    (run.path / "resume-heads.pt").write_bytes(b"old")
    run.summary.unlink()
    with pytest.raises(ChiptagError, match="resume-heads.pt was written by an older chiptag.*start a new run"):
        run_train(resume=run.path)


@pytest.mark.slow
def test_a_fold_left_in_the_one_at_a_time_loop_resumes_there(tiny_data, tmp_path, monkeypatch):
    """A run interrupted inside fold 2 by a chiptag that trained folds one at a time: fold 2 continues from its
    resume.pt in the epoch loop, fold 3 trains with the heads batch; the figures are the uninterrupted run's."""
    reference = run_train(kfold_config(tiny_data, tmp_path / "a", epochs=2))
    cfg = kfold_config(tiny_data, tmp_path / "b", epochs=2)
    with monkeypatch.context() as m:
        one_at_a_time(m)
        signal_after_steps(m, 2 * 3 + 3 + 1)  # fold 1: 2 epochs x 3 steps; then inside fold 2's second epoch
        with pytest.raises(Interrupted, match="epoch 2, step 1"):
            run_train(cfg)
    run = RunDir(next((tmp_path / "b" / "runs").iterdir()))
    assert run.fold(1).fold_result.is_file() and run.fold(2).resume.is_file()
    batched = []
    real = heads.train_together
    monkeypatch.setattr(main.heads_mod, "train_together",
                        lambda members, *a, **k: batched.append([m.fold.k for m in members]) or real(members, *a, **k))
    resumed = run_train(resume=run.path)
    assert batched == [[3]]
    same_figures(resumed, reference)


def test_stacked_heads_compute_each_head(tmp_path):
    for spec in (HeadSpec(8, 3, 5, 0.2), HeadSpec(8, 3, None, 0.0)):
        torch.manual_seed(0)
        modules = [spec.build().eval() for _ in range(3)]
        with torch.no_grad():
            expected = [h(torch.ones(4, 8) * (k + 1)) for k, h in enumerate(modules)]
        stacked = heads.StackedHeads(modules)
        x = torch.stack([torch.ones(4, 8) * (k + 1) for k in range(3)])
        got = stacked.forward(x, None)
        assert torch.allclose(got, torch.stack(expected), atol=1e-6)
        with torch.no_grad():  # the heads' weights are views of the stacked ones
            stacked.params[0][0][1].zero_()
        assert all(torch.count_nonzero(p) == 0 for p in [modules[1][1].weight])
        stacked.release(modules)
        assert modules[0][1].weight.untyped_storage().nbytes() == modules[0][1].weight.numel() * 4


def test_nan_in_one_fold_names_the_fold(tiny_data, tmp_path, monkeypatch):
    real = nn.functional.binary_cross_entropy_with_logits

    def poisoned(logits, target, **kw):
        out = real(logits, target, **kw)
        return out if out.dim() < 3 else torch.cat([out[:1], out[1:2] * float("nan"), out[2:]])

    monkeypatch.setattr(heads.F, "binary_cross_entropy_with_logits", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"fold 2: loss is nan at epoch 1, step 0.*lower learning rate"):
        run_train(kfold_config(tiny_data, tmp_path, epochs=2))


def test_heads_of_different_widths_stack_padded_and_train_as_alone():
    """Sweep entries' heads of different hidden widths and dropouts: padded with zeros, each computes what it
    would alone, and an Adam step leaves the padding at 0 and moves each head as its own step would."""
    torch.manual_seed(0)
    specs = [HeadSpec(8, 3, 5, 0.2), HeadSpec(8, 3, 2, 0.5), HeadSpec(8, 3, 4, 0.0)]
    modules = [spec.build().eval() for spec in specs]
    alone = [copy.deepcopy(h) for h in modules]
    x = torch.randn(3, 4, 8)
    stacked = heads.StackedHeads(modules)
    assert stacked.params[0][0].shape == (3, 8, 5) and stacked.shapes[1] == [(8, 2), (2,), (2, 3), (3,)]
    assert torch.allclose(stacked.forward(x, None), torch.stack([h(x[k]) for k, h in enumerate(alone)]), atol=1e-6)
    opts = [torch.optim.Adam(views, 0.1, fused=True) for views in stacked.views]
    stacked.forward(x, None).square().sum().backward()
    stacked.hand_out_grads([0, 1, 2])
    for opt in opts:
        opt.step()
    for k, h in enumerate(alone):
        opt = torch.optim.Adam(h.parameters(), 0.1)
        h(x[k]).square().sum().backward()
        opt.step()
        for mine, theirs in zip(modules[k].parameters(), h.parameters()):
            assert torch.allclose(mine, theirs, atol=1e-6)
    w1 = stacked.params[0][0].detach()
    assert torch.count_nonzero(w1[1, :, 2:]) == 0 and torch.count_nonzero(stacked.params[1][0].detach()[1, 2:]) == 0
