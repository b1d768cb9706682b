"""Reading a ClearML offline session zip back (what `clearml-task --import-offline-session` would upload)."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest


def session_events(zip_path: str | Path) -> list[dict]:
    """Every reported event (scalars, single values, plots, images) in the zip's metrics.jsonl."""
    with zipfile.ZipFile(zip_path) as zf:
        lines = zf.read("metrics.jsonl").decode().splitlines()
    events: list[dict] = []
    for line in lines:
        if line.strip():
            batch = json.loads(line)
            events.extend(batch if isinstance(batch, list) else [batch])
    return events


def scalars(events: list[dict], metric: str, variant: str) -> dict[int, float]:
    """{iteration: value} of one scalar series; ClearML stores 'val/f2' as metric 'f2', variant 'val'."""
    return {e["iter"]: e["value"] for e in events
            if e.get("type") == "training_stats_scalar" and e.get("metric") == metric
            and e.get("variant") == variant}


def single_values(events: list[dict]) -> dict[str, float]:
    """Logger.report_single_value() entries (ClearML's 'Summary' table)."""
    return {e["variant"]: e["value"] for e in events
            if e.get("type") == "training_stats_scalar" and e.get("metric") == "Summary"}


def task_json(zip_path: str | Path) -> dict:
    with zipfile.ZipFile(zip_path) as zf:
        return json.loads(zf.read("task.json"))


def names(zip_path: str | Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        return zf.namelist()


@pytest.fixture
def clearml_env(tmp_path, monkeypatch) -> Path:
    """ClearML with a temp home, cache and empty clearml.conf: nothing reads ~/ or reaches the network.
    Returns ClearML's cache dir (offline sessions are written under it).

    The clearml extra is optional for users: without it these tests skip. `make test` installs it, and in CI
    (CI=true) a missing package fails the test instead, so CI never silently stops covering ClearML."""
    if os.environ.get("CI") == "true":
        import clearml  # noqa: F401
    else:
        pytest.importorskip("clearml", reason="the clearml extra is not installed (pip install 'chiptag[clearml]')")
    home = tmp_path / "clearml-home"
    home.mkdir()
    conf = home / "clearml.conf"
    conf.write_text("# empty: no server, no credentials\n", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(conf))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(home / "cache"))
    # Task.set_offline() writes CLEARML_OFFLINE_MODE into os.environ; monkeypatch restores it afterwards.
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "0")
    for var in ("CLEARML_API_HOST", "CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY", "CLEARML_WEB_HOST",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return home / "cache"
