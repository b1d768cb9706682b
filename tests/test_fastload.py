"""The extraction input pipeline gives exactly data.images.preprocess's numbers, for every view and size."""

from __future__ import annotations

import pytest
import torch

from chiptag.data.images import ImageDataset, Preprocessing
from chiptag.fastload import RawImageDataset, collate, normalize


@pytest.mark.parametrize("size", [48, 32])  # 48: the chips' own size (uint8 path); 32: resized in the worker
@pytest.mark.parametrize("view", [0, 3, 6])
def test_split_pipeline_equals_preprocess(tiny_data, size, view):
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:5]
    pre = Preprocessing(size, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    ref = torch.stack([ImageDataset(paths, pre, view=view)[i][0] for i in range(5)])
    raw, idx = collate([RawImageDataset(paths, pre, view=view)[i] for i in range(5)])
    assert raw.dtype == (torch.uint8 if size == 48 else torch.float32)
    assert idx.tolist() == list(range(5))
    assert torch.allclose(normalize(raw, pre), ref, atol=1e-6)


def test_prefetched_batches_are_the_dataloader_batches(tiny_data):
    from torch.utils.data import DataLoader

    from chiptag.fastload import prefetched

    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:7]
    data = RawImageDataset(paths, Preprocessing(48), view=2)
    ours = list(prefetched(data, 3))
    ref = list(DataLoader(data, batch_size=3, collate_fn=collate))
    assert len(ours) == len(ref) == 3
    for (a, i), (b, j) in zip(ours, ref):
        assert torch.equal(a, b) and torch.equal(i, j)
    assert list(prefetched(RawImageDataset([], Preprocessing(48)), 3)) == []
