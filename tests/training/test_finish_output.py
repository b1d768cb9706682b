"""What `chiptag train` says at its end: where the report is, what it is doing while the report is drawn, and a
time that counts the report."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import make_config_dict
from typer.testing import CliRunner

from chiptag import __version__
from chiptag.cli import app
from chiptag.config import from_dict
from chiptag.training.main import run_train


def test_the_headline_names_the_report_and_counts_its_time(tiny_data, tmp_path, capsys):
    summary = run_train(from_dict(make_config_dict(tiny_data, tmp_path, epochs=1)))
    printed = capsys.readouterr().out
    report_md = Path(summary["run_dir"]) / "report" / "report.md"
    assert report_md.is_file()
    drawing = printed.index("drawing the report")
    assert drawing < printed.index(f"report  {report_md}")
    t = summary["timings"]
    assert t["report_s"] > 0 and t["total_s"] >= t["extract_s"] + t["train_s"] + t["report_s"]
    assert f"({t['total_s']:.1f}s, report {t['report_s']:.1f}s)" in printed
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["timings"] == t


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"chiptag {__version__}"
