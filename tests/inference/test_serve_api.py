"""`chiptag serve` over real HTTP (uvicorn in a thread on 127.0.0.1, httpx as the client): the same
probabilities as Predictor.predict, per-entry errors for bad images, JSON 4xx for whole-request limits."""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import running
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.inference.predictor import Predictor
from chiptag.features.backends import INFERENCE_ENGINES, resolve_engine
from chiptag.inference.service import ServeOptions, Service

LIMITS = dict(engine="torch", max_images=4, max_file_bytes=60_000, max_request_bytes=150_000,
              max_pixels=1_000_000, max_wait_ms=5)


@pytest.fixture(scope="module")
def run_dir(trained_run) -> Path:
    return Path(trained_run["run_dir"])


@pytest.fixture(scope="module")
def chips(tiny_data) -> list[Path]:
    return sorted((tiny_data / "train-jpg").glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def server(run_dir):
    with running(run_dir, **LIMITS) as (url, service):
        yield url, service


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor.from_run(run_dir, device="cpu")


def post(url: str, files: list[tuple[str, bytes]], field: str = "files", **params) -> httpx.Response:
    return httpx.post(f"{url}/v1/predict", files=[(field, (n, b)) for n, b in files], params=params, timeout=60)


def as_probs(entry: dict, tags: list[str]) -> np.ndarray:
    return np.array([entry["probabilities"][t] for t in tags])


@pytest.mark.parametrize("tta", [False, True])
def test_batch_matches_predictor(server, chips, predictor, tta):
    url, _ = server
    r = post(url, [(p.name, p.read_bytes()) for p in chips[:4]], tta=str(tta).lower())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tta"] is tta and [e["name"] for e in body["results"]] == [p.name for p in chips[:4]]
    expected = predictor.predict(chips[:4], tta=tta)
    for entry, want, tags in zip(body["results"], expected, predictor.tag_strings(expected)):
        assert entry["error"] is None
        np.testing.assert_allclose(as_probs(entry, predictor.tags), want, atol=1e-6, rtol=0)
        assert " ".join(entry["tags"]) == tags


def test_mixed_batch_fails_only_the_bad_entries(server, chips, predictor, tmp_path):
    url, _ = server
    png = tmp_path / "chip.png"
    Image.open(chips[1]).save(png)
    jpeg = chips[2].read_bytes()
    files = [("good.jpg", chips[0].read_bytes()), ("notes.jpg", b"these are not pixels"),
             ("cut.jpg", jpeg[: len(jpeg) // 2]), ("png_inside.jpg", png.read_bytes())]
    r = post(url, files)
    assert r.status_code == 200, r.text
    good, text, cut, png_entry = r.json()["results"]
    np.testing.assert_allclose(as_probs(good, predictor.tags), predictor.predict([chips[0]])[0], atol=1e-6)
    assert "notes.jpg" in text["error"] and "not an image" in text["error"] and text["probabilities"] is None
    assert "cut.jpg" in cut["error"] and "truncated" in cut["error"]
    assert png_entry["error"] is None  # decoded by content, like `chiptag predict`
    np.testing.assert_allclose(as_probs(png_entry, predictor.tags), predictor.predict([png])[0], atol=1e-6)


def test_bomb_and_empty_file_are_entry_errors(server, chips, tmp_path):
    url, _ = server
    bomb = io.BytesIO()
    Image.new("RGB", (1500, 1500)).save(bomb, format="PNG")  # 2.25 Mpx > the 1 Mpx cap, a few KB on the wire
    r = post(url, [("bomb.png", bomb.getvalue()), ("empty.jpg", b""), ("ok.jpg", chips[0].read_bytes())])
    assert r.status_code == 200, r.text
    bomb_e, empty_e, ok_e = r.json()["results"]
    assert "pixel cap" in bomb_e["error"] and "1500x1500" in bomb_e["error"]
    assert "empty" in empty_e["error"] and ok_e["error"] is None


def test_client_file_name_is_never_read_as_a_path(server, chips, predictor):
    url, _ = server
    r = post(url, [("/etc/hostname", chips[3].read_bytes())])
    entry = r.json()["results"][0]
    assert entry["name"] == "/etc/hostname"
    np.testing.assert_allclose(as_probs(entry, predictor.tags), predictor.predict([chips[3]])[0], atol=1e-6)


@pytest.mark.parametrize("case, status, words", [
    ("empty", 422, "no images"),
    ("wrong_field", 422, "'file'"),
    ("not_multipart", 415, "multipart/form-data"),
    ("file_too_big", 413, "per file"),
    ("request_too_big", 413, "request body"),
    ("too_many", 413, "too many images"),
    ("bad_tta", 422, "tta"),
])
def test_whole_request_problems_are_json_4xx(server, chips, case, status, words):
    url, _ = server
    chip = chips[0].read_bytes()
    big = chip + b"\0" * 70_000
    r = {
        "empty": lambda: httpx.post(f"{url}/v1/predict", files={"note": (None, "x")}),
        "wrong_field": lambda: post(url, [("a.jpg", chip)], field="file"),
        "not_multipart": lambda: httpx.post(f"{url}/v1/predict", json={"path": "/etc/passwd"}),
        "file_too_big": lambda: post(url, [("ok.jpg", chip), ("big.jpg", big)]),
        "request_too_big": lambda: post(url, [(f"{i}.jpg", chip + b"\0" * 50_000) for i in range(4)]),
        "too_many": lambda: post(url, [(f"{i}.jpg", chip) for i in range(5)]),
        "bad_tta": lambda: post(url, [("a.jpg", chip)], tta="maybe"),
    }[case]()
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    if case == "file_too_big":
        assert "big.jpg" in r.json()["error"]


def test_streamed_body_over_the_limit_is_stopped(server, chips):
    """No Content-Length (chunked upload): the limit is enforced as the bytes arrive."""
    url, _ = server
    req = httpx.Request("POST", f"{url}/v1/predict", files=[("files", ("a.jpg", chips[0].read_bytes() * 200))])
    body = req.read()
    assert len(body) > LIMITS["max_request_bytes"]
    r = httpx.post(f"{url}/v1/predict", content=(body[i:i + 16384] for i in range(0, len(body), 16384)),
                   headers={"content-type": req.headers["content-type"]}, timeout=60)
    assert r.status_code == 413 and "request body over" in r.json()["error"]


def test_model_health_page(server, predictor, trained_run):
    url, _ = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").status_code == 200
    m = httpx.get(f"{url}/v1/model").json()
    assert m["run_id"] == trained_run["run_id"] and m["backbone"] == "resnet18" and m["image_size"] == 48
    assert m["tags"] == predictor.tags
    assert m["resize"] == predictor.preprocessing.resize == "squash"  # the run's data.resize mode
    assert list(m["thresholds"].values()) == pytest.approx(list(predictor.thresholds))
    assert m["test_f2"] == trained_run["metrics"]["test"]["f2"]
    assert m["baseline"]["test_f2"] == trained_run["baseline"]["test"]["f2"]
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "<title>chiptag</title>" in page.text and "http" not in page.text.split(
        "<script>")[1].split("fetch(")[0]  # no CDN script: everything the page runs is inline


def test_stays_up_under_bad_uploads(server, chips):
    url, service = server
    for i in range(40):
        junk = [(f"{i}.jpg", bytes([i]) * (i * 97)), ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * i)]
        r = post(url, junk)  # nothing usable: the request fails as a whole, each entry says why
        assert r.status_code == 422 and f"{i}.jpg" in r.json()["error"] and len(r.json()["results"]) == 2
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert post(url, [("ok.jpg", chips[0].read_bytes())]).json()["results"][0]["error"] is None
    _settled(service)


def _settled(service: Service) -> None:
    """Every request was answered: nothing counts as on its way to the batcher any more."""
    deadline = time.monotonic() + 10
    while service.expecting() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.expecting() == 0


def test_engine_failure_is_a_json_500_and_the_server_recovers(server, chips, monkeypatch):
    url, service = server

    def broken(x, tta):
        raise RuntimeError("engine broke")

    monkeypatch.setattr(service, "_probs", broken)
    r = post(url, [("a.jpg", chips[0].read_bytes())])
    assert r.status_code == 500 and "engine broke" in r.json()["error"]
    monkeypatch.undo()
    assert post(url, [("a.jpg", chips[0].read_bytes())]).status_code == 200


def test_decode_streams_a_spooled_upload_rolled_to_disk(server, chips):
    _, service = server
    spooled = tempfile.SpooledTemporaryFile(max_size=100)  # what the multipart parser hands over past 1 MiB
    spooled.write(chips[4].read_bytes())
    spooled.seek(0)
    assert torch.equal(service.decode("x.jpg", spooled), service.decode("x.jpg", chips[4].read_bytes()))


def test_large_upload_is_decoded_off_the_event_loop_and_matches_predictor(server, predictor, tmp_path):
    """Chips are decoded inline (cheaper than a thread hop); a bigger image goes to the thread pool, resized
    in the run's mode there: the same probabilities either way."""
    url, service = server
    yy, xx = np.mgrid[0:500, 0:700]
    big = tmp_path / "scene.jpg"
    Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)).save(big, quality=60)
    assert not service.small(big.read_bytes()) and big.stat().st_size < LIMITS["max_file_bytes"]
    entry = post(url, [("scene.jpg", big.read_bytes())]).json()["results"][0]
    assert entry["error"] is None
    np.testing.assert_allclose(as_probs(entry, predictor.tags), predictor.predict([big])[0], atol=1e-6, rtol=0)


def test_timeout_is_408(run_dir, chips):
    with running(run_dir, engine="torch", timeout_s=1e-4) as (url, service):
        r = post(url, [("a.jpg", chips[0].read_bytes())])
        assert r.status_code == 408 and "--timeout" in r.json()["error"]
        _settled(service)  # a timed-out request leaves no count behind that would keep later batches waiting


def test_onnxruntime_engine_agrees_with_predictor(run_dir, chips, predictor):
    pytest.importorskip("onnxruntime")
    # ONNX Runtime served faster on an idle machine (benchmarks/results/serve_load*.json)
    assert resolve_engine("auto", torch.device("cpu"), "--engine", INFERENCE_ENGINES) == "onnxruntime"
    threads = torch.get_num_threads()
    service = Service(run_dir, ServeOptions(device="cpu", engine="onnxruntime"))
    try:
        service.warm()
        assert service.ready and service.engine == "onnxruntime", service.error
        for tta in (False, True):
            decoded = [service.decode(p.name, p.read_bytes()) for p in chips]
            got = service.batcher.submit(decoded, tta).result(timeout=60).probs  # in the batcher's (1-thread) torch
            np.testing.assert_allclose(got, predictor.predict(chips, tta=tta), atol=1e-5, rtol=0)
        assert torch.get_num_threads() == threads  # the batcher's torch thread count stays in its own thread
    finally:
        service.close()


@pytest.mark.parametrize("args, words", [
    (["serve", "no/such/run"], "no checkpoint"),
    (["serve", "RUN", "--engine", "tpu"], "unknown engine"),
    (["serve", "RUN", "--device", "cpu", "--engine", "bf16"], "CUDA only"),
])
def test_cli_errors_are_one_line(run_dir, args, words):
    r = CliRunner().invoke(app, [str(run_dir) if a == "RUN" else a for a in args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output


def test_serve_loads_no_training_code(run_dir):
    """`chiptag serve` (the CLI command, its Service and app; uvicorn's loop left out) imports nothing of
    chiptag.training: a server carries only what predicting needs."""
    import subprocess
    import sys

    script = f"""
import sys
import uvicorn
uvicorn.run = lambda app, **kw: print("app built:", type(app).__name__)  # everything up to listening
from chiptag.cli import app
app(["serve", {str(run_dir)!r}, "--device", "cpu", "--engine", "torch"], standalone_mode=False)
print("loaded:", sorted(m for m in sys.modules if m.startswith("chiptag.training")))
"""
    src = Path(__file__).resolve().parents[2] / "src"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(src)})
    assert r.returncode == 0, r.stderr
    assert "app built: FastAPI" in r.stdout and "loaded: []" in r.stdout, r.stdout


def test_one_bad_entry_never_fails_other_requests(server, chips, predictor, monkeypatch):
    """Issue 25: 16 concurrent requests, one of them carrying an animated GIF (3 frames) and two a chip the
    engine refuses (here: any all-black chip): every good entry of every request is tagged, as Predictor
    tags it; the bad ones fail alone (before: 6-13 of the 15 good one-chip requests got HTTP 500)."""
    from concurrent.futures import ThreadPoolExecutor

    url, service = server
    real = service.batcher.forward

    def picky(batch, tta):  # an engine error that only some inputs trigger
        if any(int(c.max()) == 0 for c in batch):
            raise RuntimeError("engine refused this input")
        return real(batch, tta)

    monkeypatch.setattr(service.batcher, "forward", picky)
    gif, black = io.BytesIO(), io.BytesIO()
    frames = [Image.new("RGB", (48, 48), c) for c in ("red", "green", "blue")]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    Image.new("RGB", (48, 48)).save(black, format="JPEG")
    good = [(p.name, p.read_bytes()) for p in chips[:4]]
    requests = [[good[i % 4]] for i in range(13)] + [[("anim.jpg", gif.getvalue())], [("black.jpg", black.getvalue())],
                                                      [good[0], ("black.jpg", black.getvalue()), good[1]]]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda files: post(url, files), requests))
    expected = dict(zip([n for n, _ in good], predictor.predict(chips[:4])))
    for files, r in zip(requests, answers):
        if files == [("black.jpg", black.getvalue())]:
            assert r.status_code == 500 and "engine refused" in r.json()["error"]  # its only image: its failure
            continue
        assert r.status_code == 200, r.text
        for (name, _), entry in zip(files, r.json()["results"]):
            if name == "black.jpg":
                assert "black.jpg" in entry["error"] and "engine refused" in entry["error"]
            elif name == "anim.jpg":  # the first frame, or an error naming the file: never another entry's
                assert entry["error"] is None or "anim.jpg" in entry["error"]
            else:
                assert entry["error"] is None
                np.testing.assert_allclose(as_probs(entry, predictor.tags), expected[name], atol=1e-6, rtol=0)
