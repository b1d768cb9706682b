"""Helpers for the serve tests: an in-process server on a free 127.0.0.1 port, and the page driven by the
system Chromium through Playwright (never a downloaded browser: that cannot work offline).

Also the code path of the README screenshot:
    python tests/inference/serve_helpers.py RUN docs/serve.png CHIP.jpg [CHIP.jpg ...]
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from chiptag.inference.serve import BackgroundServer, create_app
from chiptag.inference.service import ServeOptions, Service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_ready(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/readyz", timeout=10)
        if r.status_code == 200:
            return
        if "failed" in r.text:
            raise RuntimeError(r.text)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def running(run_dir, **options):
    """-> (base url, Service) of a server on RUN, ready (warm-up done); stopped on exit."""
    service = Service(run_dir, ServeOptions(**{"device": "cpu", **options}))
    with BackgroundServer(create_app(service)) as url:
        wait_ready(url)
        yield url, service


def chromium_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install 'chiptag[test]')"
    return None


def require_browser() -> None:
    """Skip with the reason when the browser test cannot run here; in CI (CI=true) fail instead, so a CI image
    without Chromium is noticed rather than silently skipped."""
    import pytest

    missing = chromium_missing()
    if missing and os.environ.get("CI", "").strip().lower() in ("true", "1"):
        pytest.fail(f"browser test cannot run in CI: {missing}")
    if missing:
        pytest.skip(missing)


def page_tags(url: str, files: list[Path], screenshot: Path, user_data_dir: Path,
              token: str | None = None) -> dict[str, list[str]]:
    """Load the page in headless Chromium, upload `files` through its file input, wait for every card, save
    a screenshot, and return {file name: the tags the page rendered} (the error text as ["error: ..."])."""
    cards = page_cards(url, files, screenshot, user_data_dir, token)
    return {name: card["shown"] for name, card in cards.items()}


def page_cards(url: str, files: list[Path], screenshot: Path, user_data_dir: Path,
               token: str | None = None) -> dict[str, dict]:
    """As page_tags, each card as {"shown": its tags (or ["error: ..."]), "img": its thumbnail's src ("" where
    the page shows "no preview"), "img_size": [natural width, height]}.

    token: the server wants one: the page must ask for it (its form appears), take it once, and keep it for the
    tab: after a reload the model panel loads without asking again."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(user_data_dir), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                    headless=True, viewport={"width": 1100, "height": 720})
        try:
            page = ctx.new_page()
            page.goto(url + "/", wait_until="load")
            if token is not None:
                page.wait_for_selector("#token-form:not([hidden])", timeout=30_000)  # the 401 asked for it
                page.fill("#token", token)
                page.click("#token-use")
                page.wait_for_selector("#model-facts", timeout=30_000)
                page.reload(wait_until="load")  # the tab keeps the token: no second prompt
                page.wait_for_selector("#model-facts", timeout=30_000)
                assert page.is_hidden("#token-form")
            page.wait_for_selector("#model-facts", timeout=30_000)  # the model panel came from /v1/model
            page.set_input_files("#pick", [str(f) for f in files])
            page.wait_for_function(f"document.querySelectorAll('.card[data-done]').length === {len(files)}",
                                   timeout=60_000)
            page.screenshot(path=str(screenshot), full_page=True)
            page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete)",
                                   timeout=30_000)  # thumbnails (and server previews) decoded
            return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.card')].map(c => {
                const img = c.querySelector('img');
                return [c.dataset.name, {
                  shown: c.classList.contains('failed') ? ['error: ' + c.querySelector('.status').textContent]
                                                        : [...c.querySelectorAll('.tags .tag')].map(t => t.textContent),
                  img: img ? img.src : '', img_size: img ? [img.naturalWidth, img.naturalHeight] : [0, 0]}]; }))""")
        finally:
            ctx.close()


if __name__ == "__main__":  # the README screenshot, made by the browser test's own code path
    import tempfile

    run, out, chips = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
    with running(run, engine="torch") as (base, _), tempfile.TemporaryDirectory() as profile:
        print(page_tags(base, chips, out, Path(profile)))
