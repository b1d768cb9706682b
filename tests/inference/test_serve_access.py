"""Who may use `chiptag serve`: loopback needs no token; any other address refuses to start without --token
(or CHIPTAG_TOKEN) unless --no-token; with a token, /v1/* and /metrics want `Authorization: Bearer <token>`
(401 JSON naming the header otherwise) while /healthz, /readyz and the page stay open; CORS only when asked."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from serve_helpers import running
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.inference.serve import is_loopback

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return Path(trained_run["run_dir"])


@pytest.fixture(scope="module")
def chip(tiny_data) -> bytes:
    return min((tiny_data / "train-jpg").glob("*.jpg")).read_bytes()


@pytest.fixture(scope="module")
def guarded(run_dir):
    with running(run_dir, engine="torch", token=TOKEN) as (url, service):
        yield url, service


@pytest.fixture
def started(monkeypatch):
    """`chiptag serve` up to listening: uvicorn.run records the app instead of serving it."""
    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: apps.append((app, kw)))
    return apps


def serve_cli(run_dir, *args, env=None):
    return CliRunner().invoke(app, ["serve", str(run_dir), "--device", "cpu", "--engine", "torch", *args], env=env)


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"])
@pytest.mark.parametrize("method, path", [("GET", "/v1/model"), ("POST", "/v1/predict"), ("GET", "/metrics")])
def test_api_and_metrics_refuse_a_missing_or_wrong_token(guarded, chip, header, method, path):
    url, _ = guarded
    headers = {"Authorization": header} if header else {}
    files = [("files", ("a.jpg", chip))] if method == "POST" else None
    r = httpx.request(method, url + path, headers=headers, files=files, timeout=30)
    assert r.status_code == 401, r.text
    assert "Authorization: Bearer <token>" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert ("needs a token" if header is None else "wrong token") in r.json()["error"]


def test_the_right_token_opens_the_api_and_probes_stay_open(guarded, chip):
    url, _ = guarded
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{url}/v1/model", headers=auth).status_code == 200
    r = httpx.post(f"{url}/v1/predict", headers=auth, files=[("files", ("a.jpg", chip))], timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["error"] is None
    assert httpx.get(f"{url}/metrics", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    for open_path in ("/healthz", "/readyz", "/"):  # load balancer probes, and the page that asks for the token
        assert httpx.get(url + open_path).status_code == 200


def test_no_cors_headers_unless_asked(run_dir, guarded):
    url, _ = guarded
    origin = {"Origin": "https://elsewhere.example"}
    r = httpx.get(f"{url}/healthz", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(f"{url}/v1/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers
    with running(run_dir, engine="torch", token=TOKEN, cors_origins=("https://app.example",)) as (cors_url, _):
        allowed = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization"}
        pre = httpx.options(f"{cors_url}/v1/predict", headers=allowed)
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        r = httpx.get(f"{cors_url}/v1/model", headers={"Origin": "https://app.example"})  # no token: a 401 the
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"  # page reads
        other = httpx.options(f"{cors_url}/v1/predict", headers={**allowed, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("[::1]", True), ("localhost", True), ("0.0.0.0", False),
                                            ("::", False), ("192.168.1.7", False), ("box.example", False)])
def test_loopback_rule(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "box.example"])
def test_refuses_to_start_beyond_loopback_without_a_token(run_dir, started, host):
    r = serve_cli(run_dir, "--host", host, env={"CHIPTAG_TOKEN": None})
    assert r.exit_code == 2, r.output
    assert "refusing to serve on" in r.output and "--token" in r.output and "--no-token" in r.output
    assert "Traceback" not in r.output and not started  # refused before anything listened


@pytest.mark.parametrize("how", ["flag", "env"])
def test_starts_beyond_loopback_with_a_token_and_requires_it(run_dir, started, how):
    args, env = (["--token", TOKEN], {"CHIPTAG_TOKEN": None}) if how == "flag" else ([], {"CHIPTAG_TOKEN": TOKEN})
    r = serve_cli(run_dir, "--host", "0.0.0.0", *args, env=env)
    assert r.exit_code == 0, r.output
    (served, kw), = started
    assert kw["host"] == "0.0.0.0" and served.state.service.opts.token == TOKEN


def test_no_token_opt_out_warns(run_dir, started):
    r = serve_cli(run_dir, "--host", "0.0.0.0", "--no-token", env={"CHIPTAG_TOKEN": None})
    assert r.exit_code == 0, r.output
    assert "warning" in r.output and "--no-token" in r.output and "anyone" in r.output
    assert started[0][0].state.service.opts.token is None


def test_loopback_needs_no_token(run_dir, started):
    r = serve_cli(run_dir, env={"CHIPTAG_TOKEN": None})
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert started[0][0].state.service.opts.token is None


@pytest.mark.parametrize("args, words", [(["--token", ""], "empty"), (["--token", "a b"], "without spaces"),
                                         (["--token", TOKEN, "--no-token"], "contradict"),
                                         (["--access-log", "xml"], "--access-log")])
def test_bad_access_options_are_one_line_errors(run_dir, started, args, words):
    r = serve_cli(run_dir, *args, env={"CHIPTAG_TOKEN": None})
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output and not started
