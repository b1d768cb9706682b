"""The web page in a real browser: headless Debian Chromium (driven by Playwright, pointed at
/usr/bin/chromium) loads `/`, uploads two chips and a non-image, and the tags it renders are the API's.

Outside CI a missing browser skips with the reason; with CI=true it fails (.ci/run installs chromium)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from serve_helpers import chromium_missing, page_tags, running


def test_page_renders_the_api_tags(trained_run, tiny_data, tmp_path):
    missing = chromium_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run in CI: {missing}")
        pytest.skip(missing)
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:2]
    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image")
    shot = tmp_path / "serve.png"
    with running(Path(trained_run["run_dir"]), engine="torch") as (url, _):
        shown = page_tags(url, chips + [junk], shot, tmp_path / "profile")
        files = [("files", (p.name, p.read_bytes())) for p in chips]
        api = httpx.post(f"{url}/v1/predict", files=files, timeout=60).json()["results"]
    assert {p.name: e["tags"] for p, e in zip(chips, api)} == {p.name: shown[p.name] for p in chips}
    assert shown["notes.jpg"][0].startswith("error: ") and "not an image" in shown["notes.jpg"][0]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
