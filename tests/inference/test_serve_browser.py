"""The web page in a real browser: headless Debian Chromium (driven by Playwright, pointed at
/usr/bin/chromium) loads `/`, uploads two chips, a non-image and a file over the size limit; the tags it renders
are the API's, and the two errors appear on their own cards.

Outside CI a missing browser skips with the reason; with CI=true it fails (.ci/run installs chromium)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import serve_helpers
from serve_helpers import page_tags, require_browser, running


def test_page_renders_the_api_tags(trained_run, tiny_data, tmp_path):
    require_browser()
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:2]
    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image")
    big = tmp_path / "big.jpg"
    big.write_bytes(chips[0].read_bytes() + b"\0" * 50_000)
    shot = tmp_path / "serve.png"
    with running(Path(trained_run["run_dir"]), engine="torch", max_file_bytes=40_000) as (url, _):
        shown = page_tags(url, chips + [junk, big], shot, tmp_path / "profile")
        files = [("files", (p.name, p.read_bytes())) for p in chips]
        api = httpx.post(f"{url}/v1/predict", files=files, timeout=60).json()["results"]
    assert {p.name: e["tags"] for p, e in zip(chips, api)} == {p.name: shown[p.name] for p in chips}
    assert shown["notes.jpg"][0].startswith("error: ") and "not an image" in shown["notes.jpg"][0]
    assert shown["big.jpg"][0].startswith("error: big.jpg: ") and "per file (--max-file-mb)" in shown["big.jpg"][0]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_asks_for_the_token_once_and_keeps_it_for_the_tab(trained_run, tiny_data, tmp_path):
    require_browser()
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:1]
    with running(Path(trained_run["run_dir"]), engine="torch", token="s3cret-page-token") as (url, _):
        assert httpx.get(f"{url}/v1/model").status_code == 401
        shown = page_tags(url, chips, tmp_path / "serve.png", tmp_path / "profile", token="s3cret-page-token")
        files = [("files", (p.name, p.read_bytes())) for p in chips]
        api = httpx.post(f"{url}/v1/predict", files=files, timeout=60,
                         headers={"Authorization": "Bearer s3cret-page-token"}).json()["results"]
    assert shown[chips[0].name] == api[0]["tags"]


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    monkeypatch.setattr(serve_helpers, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no-chromium is missing"):
        require_browser()
