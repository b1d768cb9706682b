"""ClearML for real, in offline mode (no server exists here), and the fast failure when online has no server."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest
from clearml_helpers import clearml_env, names, scalars, session_events, single_values, task_json  # noqa: F401

from chiptag.config import ReportConfig, TrackingConfig
from chiptag.errors import ChiptagError
from chiptag.training.main import run_train

# clearml's bundled config parser calls pyparsing's old camelCase names
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*use")


def _clearml_config(tiny_config, **tracking):
    cfg = tiny_config()
    cfg.tracking = TrackingConfig(backend="clearml", **tracking)
    return cfg


def test_offline_session_zip_holds_every_epoch_and_final_metrics(tiny_config, clearml_env):
    cfg = _clearml_config(tiny_config, offline=True)
    cfg.report = ReportConfig(top_errors=4, tag_tiles=2, tag_sheets=2)  # the error sheets go up too
    s = run_train(cfg)
    info = s["tracker"]["clearml"]
    zip_path = Path(info["offline_zip"])
    assert info["offline"] is True and zip_path.is_file()
    assert zip_path.is_relative_to(clearml_env)  # ClearML's cache dir, never the real ~/
    events = session_events(zip_path)
    f2 = scalars(events, "f2", "val")
    assert f2 == pytest.approx({h["epoch"]: h["val/f2"] for h in s["history"]})
    assert sorted(scalars(events, "loss", "train")) == [1, 2, 3]
    final = single_values(events)
    assert final["test/f2"] == pytest.approx(s["metrics"]["test"]["f2"])
    assert final["test/f2_at_0.5"] == pytest.approx(s["metrics"]["test"]["f2_at_0.5"])
    assert any(e.get("type") == "plot" and e.get("metric") == "per-class (test)" for e in events)
    images = [e["variant"] for e in events if e.get("type") == "training_debug_image"]
    assert sorted(images) == sorted(set(images)) and "pr_curves" in images  # each report plot once
    sheets = sorted(p.stem for p in (Path(s["run_dir"]) / "report" / "per_tag").glob("*.png"))
    assert len(sheets) == 2 and {"top_errors", "cooccurrence", *(f"per_tag/{t}" for t in sheets)} <= set(images)
    files = names(zip_path)
    assert any(n.endswith("artifacts/summary.json/summary.json") for n in files)
    assert any("artifacts/thresholds/" in n for n in files)
    task = task_json(zip_path)
    checkpoint = Path(s["run_dir"]) / "checkpoint.pt"
    assert checkpoint.is_file()  # ClearML's auto_delete_file must not remove it
    [model] = task["offline_output_models"]  # registered by path: the import creates the output model
    assert model["weights"]["register_uri"] == checkpoint.resolve().as_uri()
    assert task["name"] == f"tiny-{s['run_id']}"
    params = task["hyperparams"]["chiptag"]
    assert params["model/learning_rate"]["value"] == "0.003"


def test_finish_logs_report_pngs_as_debug_images(tmp_path, clearml_env):
    from PIL import Image

    from chiptag.tracking.clearml import ClearMLTracker

    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(run / "report" / "pr_curves.png")
    (run / "checkpoint.pt").write_bytes(b"weights")
    tracker = ClearMLTracker(TrackingConfig(backend="clearml", offline=True, task_name="t-{run_id}"), run)
    tracker.start("r1", "m", {"models": [{"name": "m"}], "active_model_index": 0})
    tracker.log_scalars(1, {"val/f2": 0.5, "lr": 0.1})
    info = tracker.finish({"metrics": {}, "thresholds": {"a": 0.2}})["clearml"]
    events = session_events(info["offline_zip"])
    images = [e for e in events if e.get("type") == "training_debug_image"]
    assert [(e["metric"], e["variant"]) for e in images] == [("report", "pr_curves")]
    assert any(n.endswith(".png") for n in names(info["offline_zip"]))
    assert scalars(events, "lr", "lr") == {1: 0.1}
    assert task_json(info["offline_zip"])["name"] == "t-r1"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_online_without_credentials_fails_before_training(tiny_config, clearml_env, tmp_path):
    with pytest.raises(ChiptagError, match="no ClearML api server is configured.*tracking.offline=true"):
        run_train(_clearml_config(tiny_config))
    assert not list((tmp_path / "runs").glob("*/metrics.jsonl"))  # no epoch ran


def test_online_unreachable_server_fails_before_training(tiny_config, clearml_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "key")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "secret")
    with pytest.raises(ChiptagError, match="cannot reach the ClearML server http://127.0.0.1"):
        run_train(_clearml_config(tiny_config, connect_timeout_s=2))
    assert not list((tmp_path / "runs").glob("*/checkpoint.pt"))


def test_rejected_credentials_are_named(clearml_env, monkeypatch, tmp_path):
    class Deny(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "key")
        monkeypatch.setenv("CLEARML_API_SECRET_KEY", "wrong")
        from chiptag.tracking.clearml import ClearMLTracker

        tracker = ClearMLTracker(TrackingConfig(backend="clearml"), tmp_path)
        with pytest.raises(ChiptagError, match="rejected the credentials"):
            tracker.start("r", "m", {})
    finally:
        server.shutdown()


def test_fallback_offline_tracks_offline_when_server_is_missing(tmp_path, clearml_env):
    from chiptag.tracking.clearml import ClearMLTracker

    tracker = ClearMLTracker(TrackingConfig(backend="clearml", fallback_offline=True), tmp_path)
    tracker.start("r", "m", {})
    info = tracker.finish({})["clearml"]
    assert info["offline"] is True and Path(info["offline_zip"]).is_file()


def test_finish_still_closes_the_task_when_final_logging_fails(tmp_path, clearml_env):
    from chiptag.tracking.clearml import ClearMLTracker

    tracker = ClearMLTracker(TrackingConfig(backend="clearml", offline=True), tmp_path)
    tracker.start("r", "m", {})
    tracker.log_scalars(1, {"val/f2": 0.25})
    info = tracker.finish({"metrics": "not a dict"})["clearml"]  # the run is saved; tracking must not lose it
    assert scalars(session_events(info["offline_zip"]), "f2", "val") == {1: 0.25}


def test_offline_zip_is_completed_when_a_file_landed_after_zipping(tmp_path):
    import zipfile

    from chiptag.tracking.clearml import _complete_zip

    folder = tmp_path / "offline-x"
    folder.mkdir()
    (folder / "task.json").write_text("{}")
    with zipfile.ZipFile(f"{folder}.zip", "w") as zf:
        zf.write(folder / "task.json", arcname="task.json")
    (folder / "metrics.jsonl").write_text("[]\n")  # written by a late reporter thread
    assert sorted(names(_complete_zip(folder))) == ["metrics.jsonl", "task.json"]
