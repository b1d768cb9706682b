"""`chiptag train --all`: every entry in turn, a failing entry recorded without losing the others."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from clearml_helpers import clearml_env, scalars, session_events  # noqa: F401
from conftest import make_config_dict
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.runs.table import list_runs

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*use")  # clearml's bundled pyparsing calls


def _sweep_config(tiny_data, tmp_path) -> Path:
    raw = make_config_dict(tiny_data, tmp_path, name="first", epochs=2)
    base = dict(raw["models"][0])
    # a loss that overflows: the entry fails while training (config errors are found before any entry trains)
    raw["models"] += [{**base, "name": "broken", "learning_rate": 1e30},
                      {**base, "name": "second", "learning_rate": 1e-3, "pos_weight": True}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.slow
def test_sweep_survives_a_failing_entry_and_tracks_each_run_offline(tiny_data, tmp_path, clearml_env):
    config = _sweep_config(tiny_data, tmp_path)
    res = CliRunner().invoke(app, ["train", "-c", str(config), "--all", "--set", "tracking.backend=clearml",
                                   "--set", "tracking.offline=true"])
    assert res.exit_code == 2, res.output  # the failure shows in the exit code ...
    assert "1 of 3 entries failed: broken: " in " ".join(res.output.split()) and "loss is" in res.output
    runs = tmp_path / "runs"
    rows = {r.model: r for r in list_runs(runs)}  # ... and in the table, next to the runs that worked
    assert {m: r.status for m, r in rows.items()} == {"first": "completed", "broken": "failed",
                                                      "second": "completed"}
    assert (rows["first"].index, rows["broken"].index, rows["second"].index) == (0, 1, 2)
    summaries = {m: json.loads((runs / rows[m].run_id / "summary.json").read_text()) for m in ("first", "second")}
    assert summaries["second"]["features"]["cache"] == "hit"  # same backbone: features extracted once
    zips = set()
    for s in summaries.values():
        zip_path = s["tracker"]["clearml"]["offline_zip"]
        zips.add(zip_path)
        assert scalars(session_events(zip_path), "f2", "val") == pytest.approx(
            {h["epoch"]: h["val/f2"] for h in s["history"]})
    assert len(zips) == 2  # one ClearML task per run, even after the failed one left its task open
    md = (runs / "EXPERIMENTS.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and "failed: " in table[2] and "loss is" in table[2]  # header, then models order
    assert "2 of 3 entries completed" in md
    assert Path(summaries["first"]["tracker"]["clearml"]["offline_zip"]).name in md


def test_sweep_of_good_entries_exits_zero(tiny_data, tmp_path):
    raw = make_config_dict(tiny_data, tmp_path, epochs=1)
    raw["models"].append({**raw["models"][0], "name": "tiny-b", "dropout": 0.0})
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    res = CliRunner().invoke(app, ["train", "-c", str(path), "--all"])
    assert res.exit_code == 0, res.output
    assert [r.status for r in list_runs(tmp_path / "runs")] == ["completed", "completed"]
    assert (tmp_path / "runs" / "EXPERIMENTS.md").is_file()


def _heads_sweep(tiny_data, work: Path, **extra) -> dict:
    """Three entries on one frozen backbone differing in head width, dropout, learning rate and loss weighting
    (plus extra entries' overrides: name -> model keys)."""
    raw = make_config_dict(tiny_data, work, name="a", epochs=3)
    base = dict(raw["models"][0])
    raw["models"] += [{**base, "name": "b", "hidden_dim": 16, "dropout": 0.5, "pos_weight": True},
                      {**base, "name": "c", "hidden_dim": 48, "dropout": 0.0, "learning_rate": 1e-3,
                       "optimizer": "adamw", "weight_decay": 0.01}]
    raw["models"] += [{**base, "name": name, **keys} for name, keys in extra.items()]
    return raw


def _summaries(runs: Path) -> dict:
    return {s["model"]: s for s in (json.loads(p.read_text()) for p in runs.glob("*/summary.json"))}


def test_sweep_heads_trained_together_match_each_entry_alone(tiny_data, tmp_path, monkeypatch):
    from chiptag import config as config_mod
    from chiptag.training import sweep

    together = sweep.run_sweep(config_mod.from_dict(_heads_sweep(tiny_data, tmp_path / "a")))
    monkeypatch.setattr(sweep, "_groups", lambda settings: [[i] for i in range(len(settings))])
    alone = sweep.run_sweep(config_mod.from_dict(_heads_sweep(tiny_data, tmp_path / "b")))
    assert [r.status for r in together.rows] == ["completed"] * 3 and [r.model for r in together.rows] == list("abc")
    a, b = _summaries(tmp_path / "a" / "runs"), _summaries(tmp_path / "b" / "runs")
    for name in "abc":
        ha, hb = a[name]["history"], b[name]["history"]
        assert a[name]["best_epoch"] == b[name]["best_epoch"]
        for key in ("train/loss", "val/loss", "val/f2", "lr"):
            assert [h[key] for h in ha] == pytest.approx([h[key] for h in hb], abs=1e-5), (name, key)
        assert a[name]["metrics"]["test"]["f2"] == pytest.approx(b[name]["metrics"]["test"]["f2"], abs=1e-5)
        assert a[name]["head"] == b[name]["head"]  # each keeps its own width
        run = Path(a[name]["run_dir"])
        assert (run / "checkpoint.pt").is_file() and not (run / "resume.pt").exists()


@pytest.mark.slow
def test_a_failing_entry_leaves_the_batch_and_an_interrupted_batch_resumes_per_entry(tiny_data, tmp_path,
                                                                                        monkeypatch):
    """Inside a batch an entry whose loss overflows fails alone; Ctrl-C stops the sweep with each entry's state in
    its run dir, and `chiptag train --resume RUN` finishes each alone with the uninterrupted figures."""
    from conftest import signal_after_steps

    from chiptag import config as config_mod
    from chiptag.interrupt import Interrupted
    from chiptag.training.main import run_train
    from chiptag.training.sweep import run_sweep

    raw = _heads_sweep(tiny_data, tmp_path / "ref", broken={"learning_rate": 1e30})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    res = CliRunner().invoke(app, ["train", "-c", str(path), "--all"])
    assert res.exit_code == 2, res.output
    assert "3 heads trained together" not in res.output and "4 heads trained together" in res.output
    rows = {r.model: r.status for r in list_runs(tmp_path / "ref" / "runs")}
    assert rows == {"a": "completed", "b": "completed", "c": "completed", "broken": "failed"}
    reference = _summaries(tmp_path / "ref" / "runs")

    raw = _heads_sweep(tiny_data, tmp_path / "int")
    with monkeypatch.context() as m:
        signal_after_steps(m, 3 * 3 + 1, sig=signal.SIGINT)  # 3 entries x 3 steps an epoch: inside epoch 2
        with pytest.raises(Interrupted, match="continue each with: chiptag train --resume"):
            run_sweep(config_mod.from_dict(raw))
    runs = sorted((tmp_path / "int" / "runs").iterdir())
    assert len(runs) == 3 and all((r / "resume.pt").is_file() and not (r / "failure.json").exists() for r in runs)
    for run in runs:
        s = run_train(resume=run)
        ref = reference[s["model"]]
        assert [h["val/loss"] for h in s["history"]] == pytest.approx([h["val/loss"] for h in ref["history"]],
                                                                      abs=1e-5)
        assert s["metrics"]["test"]["f2"] == pytest.approx(ref["metrics"]["test"]["f2"], abs=1e-5)


def test_interrupt_stops_the_whole_sweep(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C in entry 1 must not be recorded as a failed entry while the sweep moves on to entry 2."""
    import signal

    import chiptag.training.main
    from chiptag import config as config_mod
    from chiptag.interrupt import Interrupted
    from chiptag.training.sweep import run_sweep

    raw = make_config_dict(tiny_data, tmp_path)
    raw["models"].append({**raw["models"][0], "name": "second", "image_size": 48})  # not one batch: alone
    calls = []

    def fake_run_train(cfg):
        calls.append(cfg.model.name)
        raise Interrupted(signal.SIGINT, "training stopped at epoch 1")

    monkeypatch.setattr(chiptag.training.main, "run_train", fake_run_train)
    with pytest.raises(Interrupted):
        run_sweep(config_mod.from_dict(raw))
    assert calls == ["tiny"]


def test_a_batch_that_crashes_fails_its_entries_not_the_sweep(tiny_data, tmp_path, monkeypatch):
    from chiptag import config as config_mod
    from chiptag.training import heads
    from chiptag.training.sweep import run_sweep

    raw = _heads_sweep(tiny_data, tmp_path, other={"image_size": 48})  # "other" reads other features: alone

    def crash(*a, **k):
        raise RuntimeError("a bug in the batch")

    monkeypatch.setattr(heads, "train_together", crash)
    result = run_sweep(config_mod.from_dict(raw))
    assert [(r.model, r.status) for r in result.rows] == [("a", "failed"), ("b", "failed"), ("c", "failed"),
                                                          ("other", "completed")]
    assert all("RuntimeError: a bug in the batch" in f for f in result.failed)
    failed = [r for r in list_runs(tmp_path / "runs") if r.status == "failed"]
    assert len(failed) == 3  # each entry's run dir says so
