"""Predict tags for new chips from a run's checkpoint alone (no config file, no data set, no network).

    p = Predictor.from_run("runs/<id>")
    probs = p.predict(paths, tta=True)        # (N, n_tags) float32 probabilities
    tags = p.tag_strings(probs)               # "clear primary ..." at the run's tuned thresholds

Images go through the same input object and engines as feature extraction (data.inputs.ImageInput,
features.backends), and TTA is the same rule as on cached features (features.views.mean_probabilities), so a
chip is seen identically and predicted as fast as its features are extracted.
"""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from chiptag.data.image_check import PILLOW_DEFAULT_MAX_PIXELS
from chiptag.data.images import Preprocessing, d4
from chiptag.data.inputs import ImageInput
from chiptag.device import resolve_device
from chiptag.errors import ChiptagError
from chiptag.evaluation.label_rules import LabelRules
from chiptag.features.backends import (INFERENCE_ENGINES, Forward, export_onnx, onnx_file, onnx_forward,
                                       resolve_engine, torch_forward)
from chiptag.features.extraction import default_workers
from chiptag.features.views import mean_probabilities
from chiptag.models import checkpoint
from chiptag.models.backbones import state_fingerprint
from chiptag.progress import console, progress_bar
from chiptag.runs.layout import checkpoint_file


class ProbabilityModel(nn.Module):
    """images (N, 3, S, S), normalised -> probabilities (N, n_tags). Shared by predict and export, so both
    compute exactly the same function."""

    def __init__(self, tagger: nn.Module):
        super().__init__()
        self.tagger = tagger

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tagger(images))


def default_cache_dir() -> Path:
    """Where exported prediction graphs live: $XDG_CACHE_HOME/chiptag (default ~/.cache/chiptag)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chiptag"


class Predictor:
    """engine (features.backends.INFERENCE_ENGINES, as `chiptag serve`): auto = ONNX Runtime on CPU (the whole
    tagger exported once, cached under `cache_dir` by the hash of its weights), eager bf16 autocast on CUDA; torch
    = eager (float32 on CPU, bf16 autocast on CUDA); bf16 = eager on CUDA only.
    The eager float32 ProbabilityModel stays the reference (`model`, what `chiptag export` writes).

    device: a torch.device is used as given (a command resolved it once: chiptag.device.resolve_device); a name
    (auto, cpu, cuda:0) is resolved here, for the Python API."""

    # The checkpoint's description, without its weights, when built by from_run (Service shows its backbone).
    card: checkpoint.Checkpoint | None = None

    def __init__(self, tagger: nn.Module, tags: list[str], thresholds: Sequence[float], pre: Preprocessing,
                 device: str | torch.device = "auto", engine: str = "auto", cache_dir: str | Path | None = None,
                 rules: LabelRules | None = None):
        if len(thresholds) != len(tags):
            raise ChiptagError(f"{len(thresholds)} thresholds for {len(tags)} tags")
        # auto: CUDA when available, as `chiptag predict`
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = ProbabilityModel(tagger).eval()
        # torch and bf16 are one eager forward (bf16 autocast on CUDA; bf16 is CUDA only), onnxruntime the ORT graph
        self.engine = resolve_engine(engine, self.device, "engine", INFERENCE_ENGINES)
        self._fallback = engine == "auto"  # an auto ONNX export that fails falls back to eager torch
        self.images = ImageInput.resolve(pre, self.device)  # the decoder for this device: nvjpeg on CUDA
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.tags = list(tags)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.rules = rules or LabelRules()  # the run's label structure (config `labels`), applied in binarize
        self._forward: Forward | None = None

    @classmethod
    def from_run(cls, path: str | Path, device: str | torch.device = "auto", engine: str = "auto",
                 cache_dir: str | Path | None = None) -> Predictor:
        """path: a run directory or its checkpoint.pt. Everything needed is inside the checkpoint. A k-fold run
        or an ensemble predicts the mean probability of its members."""
        ckpt = checkpoint.load(checkpoint_file(path))
        rules = LabelRules.from_config(ckpt.label_rules, ckpt.tags)
        predictor = cls(checkpoint.load_tagger(ckpt), ckpt.tags, ckpt.thresholds, ckpt.preprocessing,
                        device, engine, cache_dir, rules)
        predictor.card = replace(ckpt, state_dict=None)  # its weights are in the model: not kept twice
        return predictor

    @property
    def max_pixels(self) -> int:
        """The run's pixel cap: data.max_image_pixels of the config in its checkpoint (Pillow's default cap where
        there is none). Inputs over it are refused on their header, before any decode (predict, serve)."""
        data = ((self.card.config if self.card is not None else None) or {}).get("data") or {}
        return int(data.get("max_image_pixels") or PILLOW_DEFAULT_MAX_PIXELS)

    @property
    def preprocessing(self) -> Preprocessing:
        """What the checkpoint says its inputs are (size, mean/std, resize mode): the input object's."""
        return self.images.pre

    def logits(self) -> Forward:
        """normalised images (N, 3, S, S) -> logits (N, n_tags), on the engine; built on first use."""
        if self._forward is None:
            self._forward = self._build_forward()
        return self._forward

    def _build_forward(self) -> Forward:
        tagger, size = self.model.tagger, self.images.pre.image_size
        if self.engine == "onnxruntime":
            path = onnx_file(self.cache_dir / "predict", "tagger", state_fingerprint(tagger), size)
            try:
                return onnx_forward(export_onnx(tagger, path, size, output_name="logits"))
            except ChiptagError as exc:
                if not self._fallback:
                    raise
                console.print(f"[yellow]warning:[/] {exc}; predicting with eager torch instead")
                self.engine = "torch"
        return torch_forward(tagger, self.device)

    @torch.inference_mode()
    def predict_tensor(self, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
        """A normalised batch (N, 3, S, S) -> probabilities (N, n_tags) on CPU. TTA averages the
        probabilities of the 8 flips/rotations (D4): tags do not depend on orientation."""
        x, forward = images.to(self.device).float(), self.logits()
        if not tta:
            return torch.sigmoid(forward(x).float()).cpu()
        return mean_probabilities(forward(d4(x, v)) for v in range(8)).float().cpu()

    def predict(self, paths: Sequence[str | Path], *, tta: bool = False, batch_size: int = 64,
                num_workers: int | str = "auto", errors: dict[int, str] | None = None,
                show_progress: bool = False) -> np.ndarray:
        """Image files -> (N, n_tags) float32 probabilities, in the order of `paths`, through the same input
        object as feature extraction (decoder, loader, normalisation). num_workers auto: as extraction.

        An image that cannot be read raises ChiptagError naming it, unless `errors` (a dict) is given: then its
        row is NaN and errors[index] holds the message, and the other images are still predicted."""
        paths = [Path(p) for p in paths]
        probs = np.full((len(paths), len(self.tags)), np.nan, dtype=np.float32)
        workers = default_workers(num_workers, self.device)
        label = "predict (TTA x8)" if tta else "predict"
        # keep_errors: an unreadable image never raises in the loader; its message comes back with the batch
        with progress_bar(len(paths), label, enabled=show_progress) as advance, closing(self.images.batches(
                paths, batch_size, workers, keep_errors=True)) as stream:
            for x, idx, msgs in stream:
                ok = torch.tensor([not m for m in msgs], dtype=torch.bool)
                for i, m in zip(idx.tolist(), msgs):
                    if m and errors is None:
                        raise ChiptagError(m)
                    if m:
                        errors[i] = m
                if ok.any():
                    x = self.images.to_model(x[ok.to(x.device)])
                    probs[idx[ok].numpy()] = self.predict_tensor(x, tta).numpy()
                advance(len(idx))
        return probs

    def binarize(self, probs: np.ndarray) -> np.ndarray:
        """(N, n_tags) probabilities -> 0/1 under the run's label rules at the stored thresholds; a NaN row
        (failed image) -> all 0."""
        p = self.rules.condition(np.asarray(probs, dtype=np.float64))
        return (np.nan_to_num(p, nan=-1.0) >= self.thresholds).astype(np.uint8)

    def tag_strings(self, probs: np.ndarray) -> list[str]:
        """Space-separated tags per row (the Kaggle submission form), in vocabulary order."""
        return [" ".join(t for t, on in zip(self.tags, row) if on) for row in self.binarize(probs)]
