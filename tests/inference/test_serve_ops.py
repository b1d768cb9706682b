"""Operating `chiptag serve`: /metrics in Prometheus text format (counts that match what was sent, summed over
--workers processes), the JSON access log, SIGTERM finishing the requests in flight before exit, and --workers
serving the same probabilities as one process (a killed worker is replaced)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import running, wait_ready

from chiptag.inference.predictor import Predictor
from chiptag.inference.workers import core_shares

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return Path(trained_run["run_dir"])


@pytest.fixture(scope="module")
def chips(tiny_data) -> list[Path]:
    return sorted((tiny_data / "train-jpg").glob("*.jpg"))[:4]


def samples(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(sample name, sorted labels...): value}."""
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_was_served(run_dir, chips):
    with running(run_dir, engine="torch") as (url, _):
        files = [("files", (p.name, p.read_bytes())) for p in chips[:2]] + [("files", ("junk.jpg", b"nope"))]
        assert httpx.post(f"{url}/v1/predict", files=files, timeout=60).status_code == 200
        assert httpx.post(f"{url}/v1/predict", json={}).status_code == 415
        httpx.get(f"{url}/no/such/page")
        r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    assert got[("chiptag_requests_total", ("endpoint", "/v1/predict"), ("status", "200"))] == 1
    assert got[("chiptag_requests_total", ("endpoint", "/v1/predict"), ("status", "415"))] == 1
    assert got[("chiptag_requests_total", ("endpoint", "other"), ("status", "404"))] == 1  # no label per URL
    assert got[("chiptag_images_total", ("outcome", "tagged"))] == 2
    assert got[("chiptag_images_total", ("outcome", "error"))] == 1
    assert got[("chiptag_request_duration_seconds_count", ("endpoint", "/v1/predict"))] == 2
    assert got[("chiptag_batch_size_count",)] == 2 and got[("chiptag_batch_size_sum",)] == 3  # warm-up + 2 chips
    assert got[("chiptag_queue_depth",)] == 0
    assert got[("chiptag_requests_in_flight",)] == 1  # this scrape
    assert 0 < got[("chiptag_model_load_seconds",)] < 120
    assert all(name.startswith("chiptag_") for name, *_ in got)


def test_json_access_log_is_one_object_per_request(run_dir, chips, capfd):
    with running(run_dir, engine="torch", access_log="json") as (url, _):
        capfd.readouterr()
        httpx.post(f"{url}/v1/predict", files=[("files", ("a.jpg", chips[0].read_bytes()))], timeout=60)
        httpx.get(f"{url}/v1/model", headers={"User-Agent": "probe/1"})
        time.sleep(0.2)
    lines = [json.loads(x) for x in capfd.readouterr().err.splitlines() if x.startswith("{")]
    lines = [x for x in lines if x["path"] != "/readyz"]  # wait_ready's probe may be logged after it returned
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [("POST", "/v1/predict", 200),
                                                                      ("GET", "/v1/model", 200)]
    assert lines[1]["user_agent"] == "probe/1" and lines[0]["duration_ms"] > 0
    assert lines[0]["client"].startswith("127.0.0.1:") and lines[0]["pid"] == os.getpid() and "T" in lines[0]["time"]


# -- the real command, in a subprocess ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from chiptag.cli import app; app()", "serve", str(run_dir),
                             "--port", str(port), "--device", "cpu", "--engine", "torch", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited: {proc.stdout.read()}")
        try:
            wait_ready(url, timeout=180)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("serve did not start")


def half_sent_request(url: str, chip: bytes) -> tuple[socket.socket, bytes]:
    """A /v1/predict whose headers and first half of the body are sent: a request in flight."""
    req = httpx.Request("POST", f"{url}/v1/predict", files=[("files", ("slow.jpg", chip))])
    body = req.read()
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
    conn.sendall(f"POST /v1/predict HTTP/1.1\r\n{head}\r\n".encode() + body[: len(body) // 2])
    return conn, body[len(body) // 2:]


def finish(conn: socket.socket, rest: bytes) -> tuple[int, dict]:
    """Send the rest of the body; read the answer up to the close (a draining server closes after it)."""
    conn.sendall(rest)
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_the_request_in_flight_then_exits(run_dir, chips, workers):
    proc, url = start(run_dir, "--workers", workers)
    try:
        conn, rest = half_sent_request(url, chips[0].read_bytes())
        time.sleep(0.5)  # the server holds the half-read request
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # still draining: the request in flight is not done
        status, body = finish(conn, rest)
        assert status == 200 and body["results"][0]["error"] is None and body["results"][0]["probabilities"]
        assert proc.wait(timeout=60) == -signal.SIGTERM  # drained, then ended by the signal (143 in a shell)
        out = proc.stdout.read()
        assert "Traceback" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


def worker_pids(pid: int) -> list[int]:
    kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    return [k for k in kids if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text()]


@pytest.mark.parametrize("layout, models", [("--shared-model", 1), ("--model-per-worker", 2)])
def test_workers_serve_the_predictor_probabilities_and_share_metrics(run_dir, chips, layout, models):
    """Both layouts (a model per worker is the CPU default) answer what Predictor computes; /metrics sums every
    process; a worker that dies is replaced."""
    predictor = Predictor.from_run(run_dir, device="cpu")
    expected = predictor.predict(chips)
    proc, url = start(run_dir, "--workers", "2", layout)
    try:
        n = 12
        for i in range(n):
            p = chips[i % len(chips)]
            body = httpx.post(f"{url}/v1/predict", files=[("files", (p.name, p.read_bytes()))], timeout=60).json()
            entry = body["results"][0]
            np.testing.assert_allclose([entry["probabilities"][t] for t in predictor.tags], expected[i % len(chips)],
                                       atol=1e-6, rtol=0)
        got = samples(httpx.get(f"{url}/metrics").text)  # whichever worker answers sums every process
        assert got[("chiptag_requests_total", ("endpoint", "/v1/predict"), ("status", "200"))] == n
        assert got[("chiptag_images_total", ("outcome", "tagged"))] == n
        assert got[("chiptag_batch_size_sum",)] == n + models  # every model's warm-up chip + the n chips
        assert got[("chiptag_model_load_seconds",)] > 0
        pids = worker_pids(proc.pid)
        assert len(pids) == 2
        shares = core_shares(os.sched_getaffinity(0), 2) if layout == "--model-per-worker" else None
        if shares:  # a model per worker: each kept on its own share of the cores
            assert sorted(map(sorted, map(os.sched_getaffinity, pids))) == sorted(map(sorted, shares))
        os.kill(pids[0], signal.SIGKILL)  # a worker dies: another takes its place
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(worker_pids(proc.pid)) < 2 or pids[0] in worker_pids(proc.pid)):
            time.sleep(0.2)
        if shares:  # ... on the share of the one that died (set as its process starts, after the imports)
            def pinned():
                now = sorted(map(sorted, map(os.sched_getaffinity, worker_pids(proc.pid))))
                return now == sorted(map(sorted, shares))

            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not pinned():
                time.sleep(0.2)
            assert pinned()
        for _ in range(6):
            r = httpx.post(f"{url}/v1/predict", files=[("files", ("a.jpg", chips[0].read_bytes()))], timeout=60)
            assert r.status_code == 200 and r.json()["results"][0]["error"] is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


def test_core_shares_cut_the_cores_evenly_or_not_at_all():
    assert core_shares([1, 0], 2) == [{0}, {1}]
    assert core_shares(range(4), 2) == [{0, 1}, {2, 3}]
    assert core_shares([0, 1, 2, 3], 1) == [{0, 1, 2, 3}]
    assert core_shares([0, 1, 2], 2) is None  # uneven: no pinning
    assert core_shares([0, 1], 4) is None  # more workers than cores
