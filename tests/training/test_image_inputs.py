"""Fine-tuning batches through the nvjpeg decoder path (run here with the CPU kernel) are the cpu decoder's:
the same shuffled order, the same targets, images within one level."""

from __future__ import annotations

import numpy as np
import torch

from chiptag.data.images import Preprocessing
from chiptag.data.inputs import ImageInput
from chiptag.data.validate import load_dataset
from chiptag.training.phases import image_inputs


def test_device_decoded_training_batches_match_the_cpu_loader(tiny_config):
    cfg = tiny_config(freeze=False, image_size=32)
    ds = load_dataset(cfg.data)
    n = len(ds.paths)
    splits = {"train": np.arange(0, n // 2), "val": np.arange(n // 2, n - 10), "test": np.arange(n - 10, n)}
    pre = Preprocessing(32)
    bs, seed = cfg.batch_size(), cfg.training.seed
    cpu = image_inputs(ds, splits, ImageInput(pre), bs, seed, 0)
    dev = image_inputs(ds, splits, ImageInput(pre, torch.device("cpu"), "nvjpeg"), bs, seed, 0)
    assert len(dev.train) == len(cpu.train) and len(dev.train.dataset) == len(cpu.train.dataset)
    for split in ("train", "val"):
        for (xc, yc), (xd, yd) in zip(getattr(cpu, split), getattr(dev, split)):
            assert torch.equal(yc, yd)  # same order: the shuffling generators agree
            assert (xc - xd).abs().max() <= 1.01 / 255 / 0.224  # one grey level after normalisation
