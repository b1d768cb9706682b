"""Without the optional clearml package the ClearML tests skip (outside CI) and the tracker says how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import chiptag
from chiptag.config import TrackingConfig
from chiptag.errors import ChiptagError

TESTS = Path(__file__).resolve().parents[1]


def _no_clearml(tmp_path: Path) -> Path:
    """A folder that, first on sys.path, makes `import clearml` fail as it does when the extra is absent."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "clearml.py").write_text("raise ModuleNotFoundError(\"No module named 'clearml'\", name='clearml')\n")
    return blocker


def test_clearml_tests_skip_when_the_extra_is_missing(tmp_path):
    src = Path(chiptag.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_no_clearml(tmp_path)), str(src)])}
    env.pop("CI", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(TESTS / "tracking" / "test_tracking_clearml.py")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "failed" not in proc.stdout and "7 skipped" in proc.stdout, proc.stdout[-3000:]
    assert "the clearml extra is not installed" in proc.stdout


def test_tracker_without_clearml_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_no_clearml(tmp_path)))
    monkeypatch.delitem(sys.modules, "clearml", raising=False)
    from chiptag.tracking.clearml import ClearMLTracker

    with pytest.raises(ChiptagError, match="clearml package is not installed"):
        ClearMLTracker(TrackingConfig(backend="clearml", offline=True), tmp_path)
