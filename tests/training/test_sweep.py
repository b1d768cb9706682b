"""`chiptag train --all`: every entry in turn, a failing entry recorded without losing the others."""

from __future__ import annotations

import json
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


def test_interrupt_stops_the_whole_sweep(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C in entry 1 must not be recorded as a failed entry while the sweep moves on to entry 2."""
    import signal

    import chiptag.training.main
    from chiptag import config as config_mod
    from chiptag.interrupt import Interrupted
    from chiptag.training.sweep import run_sweep

    raw = make_config_dict(tiny_data, tmp_path)
    raw["models"].append({**raw["models"][0], "name": "second"})
    calls = []

    def fake_run_train(cfg):
        calls.append(cfg.model.name)
        raise Interrupted(signal.SIGINT, "training stopped at epoch 1")

    monkeypatch.setattr(chiptag.training.main, "run_train", fake_run_train)
    with pytest.raises(Interrupted):
        run_sweep(config_mod.from_dict(raw))
    assert calls == ["tiny"]
