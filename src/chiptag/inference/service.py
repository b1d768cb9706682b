"""What `chiptag serve` serves, without the HTTP: a run's Predictor, its engine, upload checks and decoding.

Uploads take the path `chiptag predict` takes, in memory: the bytes (never a path a client named) are checked by
data.image_check.check_image (header checks, the pixel cap against decompression bombs, truncated and corrupt
JPEGs), then the Predictor's input object (data.inputs.ImageInput) decodes and resizes them exactly as it reads
a file (`chip`) and normalises each batch (`stack`) for Predictor.predict_tensor. So a chip gets the same
probabilities over HTTP as from the CLI (tests/inference/test_serve_api.py checks it to 1e-6).

Engines are the Predictor's: `torch` (eager float32 on CPU), `onnxruntime` (CPU: the tagger exported once,
cached by its weights' hash; about 1e-6 from torch), `bf16` (CUDA: eager under bf16 autocast). `auto` picks bf16
on CUDA and ONNX Runtime on CPU (the faster engine on an idle machine, as for `chiptag predict`; the recorded
pair: benchmarks/results/serve_load.json and serve_load-torch.json); the rule is features.backends.resolve_engine.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from chiptag.data.image_check import check_image
from chiptag.data.images import blank
from chiptag.data.rasters import composite
from chiptag.data.problems import KINDS
from chiptag.errors import ChiptagError
from chiptag.evaluation.label_rules import LabelRules
from chiptag.features.backends import INFERENCE_ENGINES, resolve_engine
from chiptag.inference.batcher import MicroBatcher
from chiptag.inference.metrics import Metrics
from chiptag.inference.predictor import Predictor
from chiptag.models import checkpoint
from chiptag.runs.layout import RunDir, checkpoint_file

MB = 1024 * 1024
INLINE_PIXELS = 512 * 512  # an upload this small is decoded on the event loop: a thread hop costs more (serve.py)
RESIZE_MODES = {"squash": "whole image resized to image_size x image_size (aspect not kept, no crop)",
                "pad": "letterboxed to a square in the mean colour (aspect kept), then resized",
                "crop": "centred square cropped, then resized"}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    device: torch.device = torch.device("cpu")  # resolved once by the command (chiptag.device.resolve_device)
    engine: str = "auto"
    max_batch: int = 64  # images per forward
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_images: int = 64  # per request
    max_file_bytes: int = 20 * MB
    max_request_bytes: int = 100 * MB
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked on the header before any decode
    timeout_s: float = 60.0  # a request (upload + decode + forward) that takes longer gets a 408
    max_connections: int = 128  # uvicorn answers 503 beyond this many concurrent connections (per worker)
    workers: int = 1  # HTTP processes (parsing, decoding); where the forward runs: inference/workers.py
    # with workers > 1 on CPU: a model in each worker instead of one shared (`chiptag serve` makes it the CPU
    # default; this record keeps what the caller chose)
    model_per_worker: bool = False
    token: str | None = None  # required as `Authorization: Bearer <token>` on /v1/* and /metrics when set
    cors_origins: tuple[str, ...] = ()  # origins allowed to call the API from a browser page; none by default
    access_log: str = "text"  # text (uvicorn's lines) | json (one JSON object per request, stderr) | off

    def __post_init__(self):  # a resolved device may come by name ("cpu", "cuda:0"); "auto" is the command's job
        object.__setattr__(self, "device", torch.device(self.device))


class OnTheWay:
    """How many requests are on their way to the batcher (being read or decoded, or just answered: their
    clients often send the next one at once); a batch waits for company only while this is above 0. A plain
    counter in one process; with --workers the model process reads the workers' shared counter (a
    multiprocessing Value passed as `shared`)."""

    def __init__(self, shared=None):
        self.shared, self._n, self._lock = shared, 0, threading.Lock()

    def add(self, delta: int) -> None:
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared.value += delta
        else:
            with self._lock:  # changed from the batcher's thread and the event loop
                self._n += delta

    @property
    def value(self) -> int:
        return self.shared.value if self.shared is not None else self._n


class UploadError(Exception):
    """One upload that cannot be used; the message names it. Fails only its own entry of a batch."""


def require_serve_deps() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ChiptagError(f"chiptag serve needs {', '.join(missing)}: pip install 'chiptag[serve]'")


def _summary(run: Path) -> dict:
    """The run's summary.json (scores for the model panel); {} when serving a bare checkpoint file."""
    path = RunDir(run if run.is_dir() else run.parent).summary
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _band_words(pre) -> str:
    """"4 bands (file bands [2, 1, 0, 3]: red, green, blue, nir)": what a multiband model reads."""
    names = f": {', '.join(pre.band_names)}" if pre.band_names else ""
    count = f" of {pre.file_bands}-band files" if pre.file_bands else ""
    return f"{len(pre.bands)} bands (file bands {list(pre.bands)}{names}{count})"


def _upload_problem(kind: str, detail: str) -> str:
    if kind == "bomb":
        return (f"image over the pixel cap ({detail}; --max-pixels, or the run's data.max_image_pixels where lower): "
                "refused before decoding")
    return KINDS[kind][1] + (f" ({detail})" if detail else "")


def _front_predictor(run: Path) -> Predictor:
    """The run's predictor without its network: tags, thresholds, label rules and the input object on CPU, for
    an HTTP worker whose forward runs in the model process (serve --workers on one model)."""
    ckpt = checkpoint.load(checkpoint_file(run))
    predictor = Predictor(nn.Identity(), ckpt.tags, ckpt.thresholds, ckpt.preprocessing, device=torch.device("cpu"),
                          engine="torch", rules=LabelRules.from_config(ckpt.label_rules, ckpt.tags))
    predictor.card = replace(ckpt, state_dict=None)
    return predictor


class Service:
    """The loaded model and its micro-batcher. `warm()` (run in a thread) builds the engine and runs one
    forward; `ready` turns True after it.

    remote: an HTTP worker's handle on the model process's batcher (workers.ForwardClient: `submit` like
    MicroBatcher's); the worker then holds no network and decodes on CPU, and the model process batches."""

    def __init__(self, run: str | Path, opts: ServeOptions, remote=None, on_the_way: OnTheWay | None = None):
        t0 = time.perf_counter()
        self.run, self.opts = Path(run), opts
        self.engine = resolve_engine(opts.engine, opts.device, "--engine", INFERENCE_ENGINES)
        if remote is None:  # torch and bf16: the Predictor's eager engine (bf16 autocast on CUDA); onnxruntime
            self.predictor = Predictor.from_run(self.run, device=opts.device,
                                                engine="onnxruntime" if self.engine == "onnxruntime" else "torch")
        else:
            self.predictor = _front_predictor(self.run)
        self.backbone = self.predictor.card.backbone  # the checkpoint is read once, by from_run
        self.images = self.predictor.images  # decode, resize and normalise exactly as `chiptag predict`
        self.summary = _summary(self.run)
        self.run_id = self.summary.get("run_id", self.run.name if self.run.is_dir() else self.run.parent.name)
        self.remote = remote
        self.batcher: MicroBatcher | None = None
        self.ready, self.error = False, None
        self.on_the_way = on_the_way or OnTheWay()
        self.metrics = Metrics()
        self._warm_lock = threading.Lock()
        self._load_s = time.perf_counter() - t0

    def _probabilities(self) -> Callable[[torch.Tensor, bool], torch.Tensor]:
        """normalised batch, tta -> probabilities (N, n_tags) float32 on CPU: the Predictor's own engine (torch
        float32 on CPU, bf16 autocast on CUDA, or ONNX Runtime), built now so /readyz means ready."""
        self.predictor.logits()
        return self.predictor.predict_tensor

    def warm(self) -> None:
        with self._warm_lock:
            if self.ready or self.error:
                return
            if self.remote is not None:  # the model process was warm before this worker started
                self.batcher, self.ready = self.remote, True
                return
            t0 = time.perf_counter()
            try:
                self._probs = self._probabilities()
                self.batcher = MicroBatcher(self.forward, self.opts.max_batch, self.opts.max_wait_ms / 1000,
                                            expecting=self.expecting, setup=self._batcher_setup,
                                            monitor=self.metrics)
                self.batcher.submit([blank(self.images.pre)]).result()  # a chip of the model's kind
                self.metrics.model_load.set(self._load_s + time.perf_counter() - t0)
                self.ready = True
            except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log, the process stays up
                self.error = f"{exc.__class__.__name__}: {exc}"

    def expecting(self) -> int:
        """Requests on their way to the batcher (see OnTheWay)."""
        return self.on_the_way.value

    def _batcher_setup(self) -> None:
        """In the batcher's thread: with ONNX Runtime (its own intra-op threads) torch only stacks and normalises
        the batch there, single-threaded: torch's idle OpenMP threads otherwise spin on the cores the forward and
        the event loop need (+4% served img/s on 2 cores, benchmarks/serve_load.py). Per thread under OpenMP."""
        if self.engine == "onnxruntime":
            torch.set_num_threads(1)

    def forward(self, chips: Sequence[torch.Tensor], tta: bool) -> np.ndarray:
        """Decoded chips (from `decode`) -> probabilities, the way Predictor.predict batches them."""
        return self._probs(self.images.stack(chips), tta).numpy()

    @staticmethod
    def small(raw: bytes) -> bool:
        """Whether the upload's header says at most INLINE_PIXELS (a chip: checked and decoded in ~0.1 ms)."""
        try:
            with Image.open(io.BytesIO(raw)) as im:
                return im.size[0] * im.size[1] <= INLINE_PIXELS
        except Exception:  # noqa: BLE001 - not an image: decode() names the problem, in the thread pool
            return False

    @property
    def max_pixels(self) -> int:
        """The pixel cap an upload's header is checked against before any decode: --max-pixels, or the run's own
        data.max_image_pixels (in its checkpoint) where that is lower."""
        return min(self.opts.max_pixels, self.predictor.max_pixels)

    def decode(self, name: str, data: bytes | BinaryIO) -> torch.Tensor:
        """Upload bytes (or a file object at its start) -> the chip as ImageDataset yields it for a file of the
        same bytes (the same checks, decoder and resize, in memory); UploadError naming `name` when unusable.
        A multiband model takes TIFF rasters only (the bands it was trained on, its nodata policy)."""
        raw = data if isinstance(data, bytes) else data.read()
        pre = self.images.pre
        # decode_rgb is strict (it finds corrupt JPEG data), read_bands finds a raster's problems: header checks here
        info = check_image(raw, self.max_pixels, scan_jpeg=False)
        if info.kind is not None:
            raise UploadError(f"{name}: {_upload_problem(info.kind, info.detail)}")
        if pre.bands is not None and info.format != "TIFF":
            raise UploadError(f"{name}: a {info.format or 'non-TIFF'} image, but this model reads "
                              f"{_band_words(pre)} from TIFF rasters: send the chip as a .tif")
        try:
            chip = self.images.chip(raw, name=name)
        except ChiptagError as exc:
            raise UploadError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a decoder's own error fails only this upload
            raise UploadError(f"cannot read image {name}: {exc.__class__.__name__}: {exc}") from None
        size, dtype = pre.image_size, torch.uint8 if pre.bands is None else torch.float32
        if tuple(chip.shape) != (pre.channels, size, size) or chip.dtype != dtype:
            # e.g. a multi-frame image decoded to 4-D: it would fail (or silently skew) the batch it joined
            raise UploadError(f"{name}: decoded to a {'x'.join(map(str, chip.shape))} {chip.dtype} array, not one "
                              f"{pre.channels}x{size}x{size} image (a multi-frame image? send one frame)")
        return chip

    def preview(self, chip: torch.Tensor) -> str:
        """A decoded chip -> a PNG data URL of it as the model sees it (size, resize mode): an RGB chip as it is,
        a raster as the RGB composite of its first three bands, percentile-stretched (browsers show no TIFF)."""
        if chip.dtype == torch.uint8:
            rgb = chip.permute(1, 2, 0).numpy()
        else:
            rgb = (composite(chip.numpy()) * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def entry(self, name: str, probs: np.ndarray | None, error: str | None) -> dict:
        if probs is None:
            return {"name": name, "tags": [], "probabilities": None, "error": error}
        on = self.predictor.binarize(probs[None])[0]
        return {"name": name, "tags": [t for t, b in zip(self.predictor.tags, on) if b],
                "probabilities": {t: float(p) for t, p in zip(self.predictor.tags, probs)}, "error": None}

    def model_info(self) -> dict:
        s, pre = self.summary, self.images.pre
        metrics, baseline = s.get("metrics", {}), s.get("baseline", {})
        return {
            "run_id": self.run_id,
            "backbone": self.backbone, "image_size": pre.image_size, "resize": pre.resize,
            "resize_means": RESIZE_MODES.get(pre.resize, pre.resize),
            "tags": self.predictor.tags,
            # a multiband model: uploads are TIFF rasters with these file bands (0-based, the model's order)
            "bands": list(pre.bands) if pre.bands is not None else None,
            "band_names": list(pre.band_names) if pre.band_names else None,
            "file_bands": pre.file_bands, "nodata": pre.nodata if pre.bands is not None else None,
            "fill": pre.fill if pre.bands is not None else None,
            "thresholds": {t: float(v) for t, v in zip(self.predictor.tags, self.predictor.thresholds)},
            "val_f2": metrics.get("val", {}).get("f2"), "test_f2": metrics.get("test", {}).get("f2"),
            "baseline": {"val_f2": baseline.get("val", {}).get("f2"), "test_f2": baseline.get("test", {}).get("f2"),
                         "tags": baseline.get("tags")},
            "engine": self.engine, "device": str(self.opts.device), "ready": self.ready,  # a worker decodes on CPU
            "limits": {"max_images": self.opts.max_images, "max_file_bytes": self.opts.max_file_bytes,
                       "max_request_bytes": self.opts.max_request_bytes, "max_pixels": self.max_pixels,
                       "timeout_s": self.opts.timeout_s, "max_batch": self.opts.max_batch},
        }

    def close(self) -> None:
        if self.batcher is not None and self.remote is None:
            self.batcher.close()
