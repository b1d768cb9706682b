"""The experiments table on good, failed, unfinished and broken run dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_config_dict
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.config import from_dict
from chiptag.errors import ChiptagError
from chiptag.runs.table import COLUMNS, RunRow, format_duration, list_runs, sort_rows, to_markdown
from chiptag.training.main import run_train


@pytest.fixture(scope="module")
def good_run(tiny_data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("good")
    return Path(run_train(from_dict(make_config_dict(tiny_data, work, epochs=1)))["run_dir"])


@pytest.fixture
def runs_dir(good_run, tmp_path) -> Path:
    """One real run plus every kind of damaged run dir next to it."""
    runs, good = tmp_path / "runs", tmp_path / "runs" / good_run.name
    shutil.copytree(good_run, good)
    (runs / "b-garbled").mkdir()
    (runs / "b-garbled" / "summary.json").write_text("{not json", encoding="utf-8")
    (runs / "c-no-metrics").mkdir()
    (runs / "c-no-metrics" / "summary.json").write_text('{"model": "x"}', encoding="utf-8")
    (runs / "d-unfinished").mkdir()
    shutil.copy(good / "config.yaml", runs / "d-unfinished" / "config.yaml")
    (runs / "e-failed").mkdir()
    (runs / "e-failed" / "failure.json").write_text(
        json.dumps({"model": "bad", "active_model_index": 1, "error": "weights file not found: w.pt"}))
    (runs / "f-empty").mkdir()
    (runs / ".hidden").mkdir()
    (runs / "EXPERIMENTS.md").write_text("not a run\n")
    return runs


def test_every_run_dir_is_listed_with_its_state(runs_dir):
    rows = {r.run_id: r for r in list_runs(runs_dir)}
    assert len(rows) == 6  # hidden dirs and files are not runs
    good = next(r for r in rows.values() if r.status == "completed")
    summary = json.loads((runs_dir / good.run_id / "summary.json").read_text())
    assert good.model == "tiny" and good.f2 == summary["metrics"]["test"]["f2"]
    assert good.f2_05 == summary["metrics"]["test"]["f2_at_0.5"] and good.f2 != good.f2_05
    assert good.index == 0 and good.epochs == "1 (best 1)" and good.frozen == "yes" and good.pos_weight == "off"
    assert good.head.startswith("Dropout(0.1)-Linear(512,32)") and good.tracker == "local"
    assert rows["b-garbled"].status == "broken" and "summary.json: JSONDecodeError" in rows["b-garbled"].note
    assert rows["c-no-metrics"].status == "broken" and "KeyError" in rows["c-no-metrics"].note
    assert (rows["d-unfinished"].status, rows["d-unfinished"].model) == ("unfinished", "tiny")
    assert (rows["e-failed"].status, rows["e-failed"].index) == ("failed", 1)
    assert "weights file not found" in rows["e-failed"].note
    assert rows["f-empty"].status == "broken"


def test_markdown_has_the_plan_columns_and_one_line_per_run(runs_dir):
    md = to_markdown(list_runs(runs_dir)).splitlines()
    assert md[0] == "| " + " | ".join(COLUMNS) + " |"
    assert len(md) == 2 + 6 and all(line.count(" | ") == len(COLUMNS) - 1 for line in md[2:])
    assert any("failed: weights file not found" in line for line in md)


def test_cli_runs_markdown_sorted_by_f2(runs_dir):
    res = CliRunner().invoke(app, ["runs", str(runs_dir), "--markdown", "--sort", "f2"])
    assert res.exit_code == 0, res.output
    body = [line for line in res.output.splitlines() if line.startswith("| ")][1:]
    assert "completed" in body[0]  # the only run with an F2 comes first
    table = CliRunner().invoke(app, ["runs", str(runs_dir)])
    assert table.exit_code == 0 and "unfinished" in table.output and "broken" in table.output


def test_cli_runs_missing_dir_is_one_clean_error(tmp_path):
    res = CliRunner().invoke(app, ["runs", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "runs directory not found" in res.output


def test_sort_by_f2_best_first_and_missing_last():
    rows = [RunRow("a", "completed", f2=0.5), RunRow("b", "failed"), RunRow("c", "completed", f2=0.9)]
    assert [r.run_id for r in sort_rows(rows, "f2")] == ["c", "a", "b"]
    with pytest.raises(ChiptagError, match="valid keys are run, f2"):
        sort_rows(rows, "accuracy")


@pytest.mark.parametrize("seconds,text", [(None, ""), (4.25, "4.2s"), (125, "2m05s"), (3725, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_a_single_failed_train_is_listed_as_failed(tiny_data, tmp_path):
    """Not only sweeps: a plain `chiptag train` that stops on an error marks its run dir failed."""
    cfg = from_dict(make_config_dict(tiny_data, tmp_path, learning_rate=1e30, epochs=2))
    with pytest.raises(ChiptagError, match="loss is"):
        run_train(cfg)
    (row,) = list_runs(tmp_path / "runs")
    assert row.status == "failed" and "loss is" in row.note


def test_backbone_baseline_and_delta_columns():
    from chiptag.runs.layout import model_label
    from chiptag.runs.table import delta_cell, row_from_summary

    s = {"model": "resnet50", "backbone": "efficientnet_b0", "image_size": 224, "features": {"views": 8},
         "tta": True, "metrics": {"test": {"f2": 0.4992, "f2_at_0.5": 0.45}},
         "baseline": {"test": {"f2": 0.4990}}}
    row = row_from_summary(s, "r1")
    md = to_markdown([row])
    assert "| resnet50 | efficientnet_b0 | 224 | 8 / TTA | 0.4992 | 0.4500 | 0.4990 | +0.0002 ≈ baseline |" in md
    s["metrics"]["test"]["f2"] = 0.60
    assert delta_cell(row_from_summary(s, "r1")) == "+0.1010"
    assert model_label("resnet50", "efficientnet_b0") == "resnet50-efficientnet_b0"
    assert model_label("resnet18-demo", "resnet18") == "resnet18-demo"


def _damage(runs: Path, good: Path, name: str, data: bytes | None) -> None:
    """A copy of the good run whose checkpoint is replaced by `data` (None: removed)."""
    shutil.copytree(good, runs / name)
    ckpt = runs / name / "checkpoint.pt"
    ckpt.unlink()
    if data is not None:
        ckpt.write_bytes(data)


def test_a_run_with_a_damaged_checkpoint_is_not_completed(good_run, tmp_path):
    """A summary is not enough: predict, evaluate and serve need a loadable checkpoint."""
    import io
    import random

    import torch

    runs = tmp_path / "runs"
    shutil.copytree(good_run, runs / "a-good")
    whole = (good_run / "checkpoint.pt").read_bytes()
    other = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, other)  # a torch file, not a chiptag checkpoint
    _damage(runs, good_run, "b-truncated", whole[: len(whole) // 2])
    _damage(runs, good_run, "c-random", random.Random(0).randbytes(4096))
    _damage(runs, good_run, "d-empty", b"")
    _damage(runs, good_run, "e-other", other.getvalue())
    _damage(runs, good_run, "f-missing", None)
    rows = {r.run_id: r for r in list_runs(runs)}
    assert rows["a-good"].status == "completed" and not rows["a-good"].note
    assert {k: r.status for k, r in rows.items() if k != "a-good"} == dict.fromkeys(
        ["b-truncated", "c-random", "d-empty", "e-other", "f-missing"], "damaged")
    assert "truncated or not a checkpoint" in rows["b-truncated"].note
    assert "empty file" in rows["d-empty"].note
    assert "missing format_version, backbone" in rows["e-other"].note
    assert rows["f-missing"].note == "no checkpoint.pt"
    assert rows["b-truncated"].f2 == rows["a-good"].f2  # what the run measured stays visible
    assert all("\n" not in r.note for r in rows.values())


def test_the_terminal_table_is_compact_and_wide_shows_everything(runs_dir):
    """Compact columns, the entry index named (not `#`), reasons as one line under the table (never the list of
    every valid backbone); --wide: every column."""
    names = ", ".join(f"backbone_{i}" for i in range(80))
    (runs_dir / "g-bad-backbone").mkdir()
    (runs_dir / "g-bad-backbone" / "failure.json").write_text(json.dumps(
        {"model": "x", "active_model_index": 3, "error": f"unknown backbone 'resnet99'; valid: {names}"}))
    res = CliRunner().invoke(app, ["runs", str(runs_dir)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("run "))
    assert "entry" in header.split() and "#" not in header and "optimizer" not in header
    assert "g-bad-backbone: failed: unknown backbone 'resnet99'" in res.output
    assert "backbone_79" not in res.output
    assert max(len(line) for line in lines if "completed" in line) <= 120
    wide = CliRunner().invoke(app, ["runs", str(runs_dir), "--wide"])
    assert wide.exit_code == 0, wide.output
    assert all(col in wide.output for col in ("optimizer", "scheduler", "head layers", "tracker", "views/TTA"))
    md = CliRunner().invoke(app, ["runs", str(runs_dir), "--markdown"]).output
    assert md.startswith("| entry | run |") and "backbone_79" not in md


def test_run_dir_names_keep_to_safe_characters(tmp_path):
    """A timm backbone put a ':' in the run dir name (breaks scp/rsync host:path, Windows, volume mounts)."""
    import re

    from chiptag.runs.layout import model_label, new_run_dir

    label = model_label("lite0", "timm:tf_efficientnet_lite0")
    run = new_run_dir(tmp_path, None, label)
    assert re.fullmatch(r"\d{8}-\d{6}-lite0-timm-tf_efficientnet_lite0", run.name) and run.path.is_dir()
    assert new_run_dir(tmp_path, "exp 1/b:c", label).name == "exp-1-b-c"  # a given run_name too, not nested
    assert new_run_dir(tmp_path, "exp 1/b:c", label).name == "exp-1-b-c-2"
