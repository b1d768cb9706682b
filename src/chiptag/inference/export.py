"""`chiptag export RUN --format onnx|torchscript --out FILE`: the model outside chiptag.

The exported function is ProbabilityModel (the same one `chiptag predict` runs): input `images`, float32
N×3×S×S, RGB scaled to [0, 1] then normalised with the stored mean/std; output `probabilities`, N×n_tags
after the sigmoid; the batch dimension is dynamic. The file carries what a user needs to preprocess and
threshold: `tags` and `thresholds` (JSON lists, tag order), `image_size`, `resize`, `mean`, `std` (JSON) — as ONNX
metadata_props, or TorchScript extra files of the same names.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager, redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from chiptag import __version__
from chiptag.atomic import replacing
from chiptag.errors import ChiptagError
from chiptag.inference.predictor import ProbabilityModel
from chiptag.models import checkpoint
from chiptag.runs.layout import checkpoint_file

FORMATS = ("onnx", "torchscript")
OPSET = 18


def metadata(ckpt: checkpoint.Checkpoint) -> dict[str, str]:
    pre = ckpt.preprocessing
    meta = {
        "tags": json.dumps(list(ckpt.tags)),
        "thresholds": json.dumps([float(t) for t in ckpt.thresholds]),
        "image_size": str(pre.image_size),
        "mean": json.dumps([float(v) for v in pre.mean]),
        "std": json.dumps([float(v) for v in pre.std]),
        # how a non-square image became the square input in training (checkpoints before it: squash, as
        # Preprocessing.from_dict reads them)
        "resize": pre.resize,
        "input": "images: float32 N x 3 x image_size x image_size (made square as `resize` says: squash = "
                 "stretch, pad = letterbox with the mean colour, crop = centred square), RGB / 255, then "
                 "(x - mean) / std",
        "output": "probabilities: float32 N x len(tags), after sigmoid; tag i is on where prob >= thresholds[i]",
        "backbone": ckpt.backbone,
        "chiptag_version": __version__,
        # The label structure (exclusive groups, implied absences) is applied to the probabilities before the
        # thresholds (chiptag.evaluation.label_rules) where the run kept it: `apply` always | never (absent:
        # always), `form` hard | soft with its `confidence`; a k-fold run's graph already averages its members.
        "label_rules": json.dumps(ckpt.label_rules),
        "members": str(ckpt.members or 1),
    }
    if pre.bands is not None:  # a multiband model: which file bands, in which order, and how they are scaled
        n = len(pre.bands)
        meta.update(bands=json.dumps(list(pre.bands)), band_names=json.dumps(list(pre.band_names or [])),
                    clip=json.dumps([list(c) for c in pre.clip] if pre.clip else None),
                    # nodata pixels (NaN/inf, `nodata`, else the file's GDAL_NODATA tag): fill "mean" gives them
                    # the band's mean before normalising (0 after it); "error": the model never saw any
                    nodata=json.dumps(pre.nodata), fill=pre.fill, file_bands=json.dumps(pre.file_bands),
                    input=f"images: float32 N x {n} x image_size x image_size: the raster's bands `bands` "
                          "(0-based, in this order) in the file's units, made square as `resize` says (pad: "
                          "borders = the band's mean), clipped per band to `clip` when set, then (x - mean) / std")
    return meta


@contextmanager
def _quiet():
    """The exporters print progress lines and deprecation notices (torch.jit is deprecated in favour of
    torch.export, but it is still the way to get a TorchScript file); the user only needs our summary."""
    with warnings.catch_warnings(), redirect_stdout(StringIO()):
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        yield


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ChiptagError(f"ONNX export needs {', '.join(missing)}: pip install 'chiptag[export]'")


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    _require("onnx", "onnxscript", "onnxruntime")  # onnxruntime: for the parity check after export
    import onnx

    # The torch.export-based exporter (torch's default and maintained path; the TorchScript-based one is
    # deprecated). external_data=False keeps one self-contained file.
    batch = torch.export.Dim("batch", min=1)
    with replacing(out) as tmp:
        with _quiet():
            torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["probabilities"],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False,
                              opset_version=OPSET)
        proto = onnx.load(str(tmp))
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    with replacing(out) as tmp:
        with _quiet():
            # A CNN has no data-dependent control flow, so tracing is exact; export_run checks the result itself.
            scripted = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(scripted, str(tmp), _extra_files=meta)


def run_exported(fmt: str, path: Path, images: np.ndarray) -> np.ndarray:
    """Run an exported file on a preprocessed batch (used by the parity check and the tests)."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(["probabilities"], {"images": images.astype(np.float32)})[0]
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(torch.from_numpy(images.astype(np.float32))).numpy()


def export_run(run: Path, fmt: str, out: Path) -> dict:
    """Export RUN's model to `out`; check it against PyTorch on a random batch of a size other than the
    traced one (which also proves the batch dimension is dynamic). Returns {path, max_abs_diff, ...}."""
    if fmt not in FORMATS:
        raise ChiptagError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    ckpt = checkpoint.load(checkpoint_file(run))
    model = ProbabilityModel(checkpoint.load_tagger(ckpt)).eval()
    size = ckpt.preprocessing.image_size
    gen = torch.Generator().manual_seed(0)
    channels = ckpt.preprocessing.channels  # 3, or a multiband model's bands
    example = torch.randn(2, channels, size, size, generator=gen)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(ckpt)
    try:
        (_export_onnx if fmt == "onnx" else _export_torchscript)(model, example, out, meta)
    except ChiptagError:
        raise
    except Exception as exc:  # exporter failures are long; the first line names the unsupported piece
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ChiptagError(f"{fmt} export of {ckpt.backbone} failed: {exc.__class__.__name__}: {first}") from None
    check = torch.randn(3, channels, size, size, generator=gen)
    with torch.inference_mode():
        expected = model(check).numpy()
    diff = float(np.abs(run_exported(fmt, out, check.numpy()) - expected).max())
    return {"path": str(out), "format": fmt, "max_abs_diff": diff, "image_size": size,
            "n_tags": len(ckpt.tags), "bytes": out.stat().st_size}
