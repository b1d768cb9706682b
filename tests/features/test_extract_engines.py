"""Extraction engines: ONNX Runtime and eager torch give the same features; the ONNX graph is exported once."""

from __future__ import annotations

import pytest
import torch

from chiptag.errors import ChiptagError
from chiptag.data.inputs import ImageInput
from chiptag.features.backends import INFERENCE_ENGINES, make_forward, onnx_file, resolve_engine
from chiptag.features.extraction import Extractor, extract
from chiptag.models.backbones import build_backbone, state_fingerprint

pytest.importorskip("onnxruntime")

# Stated tolerance: both engines run float32 kernels in different orders; features agree to 1e-4 of their
# scale, ten times finer than the scaled float16 the cache stores (relative step 2**-10 ~ 1e-3).
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", None, 32, progress=False)


def test_onnxruntime_matches_torch(backbone, tmp_path):
    x = torch.randn(6, 3, 32, 32)
    kw = dict(cache_dir=tmp_path, backbone_name="resnet18", backbone_hash=state_fingerprint(backbone.net),
              image_size=32)
    ref = make_forward(backbone.net, "torch", "cpu", channels_last=False, **kw)(x)
    ort = make_forward(backbone.net, "onnxruntime", "cpu", **kw)(x)
    cl = make_forward(backbone.net, "torch", "cpu", channels_last=True, **kw)(x)
    scale = ref.abs().max()
    assert ort.shape == ref.shape == (6, backbone.dim)
    assert (ort - ref).abs().max() <= REL_TOL * scale
    assert (cl - ref).abs().max() <= REL_TOL * scale
    backbone.net.to(memory_format=torch.contiguous_format)


def test_extract_with_either_engine_agrees(backbone, tiny_data, tmp_path):
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:10]
    kw = dict(cache_dir=tmp_path, backbone_name="resnet18", backbone_hash=state_fingerprint(backbone.net),
              image_size=32)
    a, b = (extract(Extractor("resnet18", kw["backbone_hash"], ImageInput(backbone.preprocessing),
                              make_forward(backbone.net, engine, "cpu", **kw), batch_size=4, show_progress=False),
                    paths) for engine in ("torch", "onnxruntime"))
    assert a.dtype == b.dtype == torch.float32 and a.shape == (10, backbone.dim)
    assert (a - b).abs().max() <= REL_TOL * a.abs().max()
    backbone.net.to(memory_format=torch.contiguous_format)


def test_onnx_graph_is_exported_once_per_backbone_state(backbone, tmp_path):
    h = state_fingerprint(backbone.net)
    kw = dict(cache_dir=tmp_path, backbone_name="resnet18", backbone_hash=h, image_size=32)
    make_forward(backbone.net, "onnxruntime", "cpu", **kw)
    path = onnx_file(tmp_path, "resnet18", h, 32)
    stamp = path.stat().st_mtime_ns
    make_forward(backbone.net, "onnxruntime", "cpu", **kw)
    assert path.stat().st_mtime_ns == stamp
    assert onnx_file(tmp_path, "resnet18", "other", 32) != path  # another state never reuses this graph


def test_engine_choice():
    assert resolve_engine("auto", torch.device("cpu")) == "onnxruntime"
    assert resolve_engine("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ChiptagError, match="valid: auto, torch, onnxruntime"):
        resolve_engine("tensorrt", torch.device("cpu"))
    with pytest.raises(ChiptagError, match="onnxruntime runs on CPU"):
        resolve_engine("onnxruntime", torch.device("meta"))


def test_one_engine_rule_for_extraction_predict_and_serve():
    """serve's names are the same rule plus bf16, the eager forward under autocast (CUDA only)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # deciding needs no CUDA device
    assert resolve_engine("auto", cuda) == "torch"  # extraction and predict: eager (bf16 autocast) on CUDA
    assert resolve_engine("auto", cuda, "--engine", INFERENCE_ENGINES) == "bf16"  # serve names it by its dtype
    assert resolve_engine("auto", cpu, "--engine", INFERENCE_ENGINES) == "onnxruntime"
    assert resolve_engine("auto", torch.device("meta"), "--engine", INFERENCE_ENGINES) == "torch"
    with pytest.raises(ChiptagError, match="features.engine: unknown engine 'bf16'"):
        resolve_engine("bf16", cuda)  # not a features.engine / predict --engine value
    with pytest.raises(ChiptagError, match="--engine bf16 runs on CUDA only"):
        resolve_engine("bf16", cpu, "--engine", INFERENCE_ENGINES)
    with pytest.raises(ChiptagError, match="--engine: onnxruntime runs on CPU"):
        resolve_engine("onnxruntime", cuda, "--engine", INFERENCE_ENGINES)
