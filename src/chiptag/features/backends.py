"""Forward functions for feature extraction: eager torch (any device) or ONNX Runtime (CPU).

`make_forward` returns a callable `float batch (N,3,S,S) -> features (N, dim)`. The ONNX model is exported
once per backbone state and image size and cached next to the features, under a name that carries the
backbone's parameter hash, so a changed backbone never reuses a stale graph. Features from the two engines
agree to about 1e-5 relative (float32 kernels in a different order), far below the float16 the cache stores;
tests/test_extract_engines.py checks it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from chiptag.atomic import replacing
from chiptag.errors import ChiptagError

ENGINES = ("auto", "torch", "onnxruntime")  # feature extraction (features.engine)
# Prediction (`chiptag predict`, Predictor) and `chiptag serve`, one list: they also name the eager CUDA engine by
# what it computes in, bf16 (autocast) — what torch is on CUDA, and what auto picks there.
INFERENCE_ENGINES = ENGINES + ("bf16",)
Forward = Callable[[torch.Tensor], torch.Tensor]


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str, device: torch.device, what: str = "features.engine",
                   valid: tuple[str, ...] = ENGINES) -> str:
    """The one engine rule (extraction, predict, serve): auto -> onnxruntime on CPU when it is installed (it won
    in benchmarks/frozen_training.py, and served 154.1 img/s against 111.2 for eager torch on an idle 2-core
    machine: benchmarks/serve_load.py), else torch; on CUDA bf16 where `valid` names it (predict and serve:
    INFERENCE_ENGINES), the same eager forward under bf16 autocast. `what` names the option in errors
    (features.engine, --engine)."""
    if engine not in valid:
        raise ChiptagError(f"{what}: unknown engine {engine!r} (valid: {', '.join(valid)})")
    if engine == "auto":
        if device.type == "cuda" and "bf16" in valid:
            return "bf16"
        return "onnxruntime" if device.type == "cpu" and onnxruntime_available() else "torch"
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise ChiptagError(f"{what}: onnxruntime runs on CPU here; use engine: torch on "
                               f"{device.type} (or engine: auto)")
        if not onnxruntime_available():
            raise ChiptagError(f"{what} is onnxruntime but it is not installed: "
                               "pip install 'chiptag[export]' (or use engine: torch)")
    if engine == "bf16" and device.type != "cuda":
        raise ChiptagError(f"{what} bf16 runs on CUDA only; use torch or onnxruntime on CPU")
    return engine


def torch_forward(net: torch.nn.Module, device: torch.device, channels_last: bool = True) -> Forward:
    """Eager forward in inference mode; channels_last where it helps (CPU oneDNN and CUDA convolutions),
    bf16 autocast on CUDA (features are stored as float16 anyway)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode(False):  # built lazily inside extract(): parameters must stay normal tensors
        net.eval().to(device, memory_format=fmt)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        with amp:
            return net(x).float()

    return forward


def onnx_file(cache_dir: Path, backbone_name: str, backbone_hash: str, image_size: int) -> Path:
    return Path(cache_dir) / "onnx" / f"{backbone_name}-{image_size}px-{backbone_hash}.onnx"


def export_onnx(net: torch.nn.Module, path: Path, image_size: int, output_name: str = "features") -> Path:
    """Export once (atomic rename); a file already there for this backbone hash is reused."""
    if path.is_file():
        return path
    was_training = net.training
    net.eval().to("cpu", memory_format=torch.contiguous_format)
    # the input's channels: 3, or a multiband model's bands (its stem convolution, models.backbones.adapt_stem)
    stem = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    dummy = torch.zeros(2, stem.in_channels if stem is not None else 3, image_size, image_size)
    try:
        with replacing(path) as tmp, warnings.catch_warnings():  # the TorchScript-based exporter warns it is
            warnings.simplefilter("ignore")  # legacy; it is fast and exact
            torch.onnx.export(net, (dummy,), str(tmp), input_names=["images"], output_names=[output_name],
                              dynamic_axes={"images": {0: "n"}, output_name: {0: "n"}}, dynamo=False)
    except Exception as exc:
        raise ChiptagError(f"cannot export the model to ONNX ({exc.__class__.__name__}: {exc}); use the torch "
                           "engine (features.engine: torch to train, --engine torch to predict or serve)") from None
    finally:
        net.train(was_training)
    return path


def onnx_forward(path: Path, threads: int | None = None) -> Forward:
    import onnxruntime as ort

    so = ort.SessionOptions()
    # The same thread count torch would use: decode workers are separate processes either way.
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if os.environ.get("CHIPTAG_ORT_SPIN", "0") != "1":
        # Idle ORT threads otherwise busy-wait for the next op, taking the core the decode worker needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {"images": x.float().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return forward


def make_forward(net: torch.nn.Module, engine: str, device: torch.device | str, *, cache_dir: Path | None,
                 backbone_name: str, backbone_hash: str, image_size: int, channels_last: bool = True) -> Forward:
    device = torch.device(device)
    engine = resolve_engine(engine, device)
    if engine == "torch":
        return torch_forward(net, device, channels_last)
    base = Path(cache_dir) if cache_dir is not None else Path(".cache/chiptag/features")
    path = export_onnx(net, onnx_file(base, backbone_name, backbone_hash, image_size), image_size)
    return onnx_forward(path)


class LazyForward:
    """Builds the engine on the first batch: a full cache hit never exports an ONNX graph."""

    def __init__(self, factory: Callable[[], Forward]):
        self.factory, self.fn = factory, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fn is None:
            self.fn = self.factory()
        return self.fn(x)
