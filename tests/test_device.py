"""One device rule for training, prediction and serving."""

from __future__ import annotations

import pytest
import torch

from chiptag.device import resolve_device
from chiptag.errors import ChiptagError


def test_auto_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_bad_or_absent_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ChiptagError, match="training.device: unknown device 'gpu0'"):
        resolve_device("gpu0", "training.device")
    with pytest.raises(ChiptagError, match="--device is cuda:1 but no CUDA device is available"):
        resolve_device("cuda:1", "--device")
