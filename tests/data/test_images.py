"""The one input path (ImageDataset -> collate -> normalize) gives the reference numbers, for every view and
size, and the prefetch thread yields exactly the DataLoader's batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chiptag.data.images import ImageDataset, Preprocessing, collate, normalize
from chiptag.data.inputs import ImageInput
from chiptag.errors import ChiptagError


def _reference(path, pre, view):
    """Pillow decode -> float /255 -> antialiased bilinear resize -> normalise -> D4 view, written out here."""
    import numpy as np

    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    if x.shape[-1] != pre.image_size:
        x = F.interpolate(x[None], size=(pre.image_size,) * 2, mode="bilinear", antialias=True)[0]
    x = (x - torch.tensor(pre.mean).view(3, 1, 1)) / torch.tensor(pre.std).view(3, 1, 1)
    if view >= 4:
        x = x.flip(-1)
    return torch.rot90(x, view % 4, dims=(-2, -1))


@pytest.mark.parametrize("size", [48, 32])  # 48: the chips' own size; 32: resized (on uint8) in the worker
@pytest.mark.parametrize("view", [0, 3, 6])
def test_input_path_gives_the_reference_numbers(tiny_data, size, view):
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:5]
    pre = Preprocessing(size, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    raw, idx, errors = collate([ImageDataset(paths, pre, view=view)[i] for i in range(5)])
    assert raw.dtype == torch.uint8  # resized chips too: the resize runs on uint8
    assert idx.tolist() == list(range(5)) and errors == [""] * 5
    ref = torch.stack([_reference(p, pre, view) for p in paths])
    # torchvision's libjpeg and Pillow's decode the same JPEG to within one grey level; the uint8 resize is
    # within one more of the float reference
    assert torch.allclose(normalize(raw, pre), ref, atol=(1.5 if size == 48 else 2.5) / 255 / 0.2)
    images = ImageInput(pre)  # one chip at a time (the server's way) is the same path
    assert torch.equal(images.stack([images.chip(p, view=view) for p in paths]), normalize(raw, pre))


def test_unreadable_image_raises_or_comes_back_as_an_error(tiny_data, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = sorted((tiny_data / "train-jpg").glob("*.jpg"))[0]
    with pytest.raises(ChiptagError, match="bad.jpg"):
        ImageDataset([good, bad], Preprocessing(48))[1]
    x, idx, errors = collate([ImageDataset([good, bad], Preprocessing(48), keep_errors=True)[i] for i in (0, 1)])
    assert errors[0] == "" and "bad.jpg" in errors[1] and x[1].abs().sum() == 0


def test_prefetched_batches_are_the_dataloader_batches(tiny_data):
    from torch.utils.data import DataLoader

    from chiptag.data.images import prefetched

    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:7]
    data = ImageDataset(paths, Preprocessing(48), view=2)
    ours = list(prefetched(data, 3))
    ref = list(DataLoader(data, batch_size=3, collate_fn=collate))
    assert len(ours) == len(ref) == 3
    for (a, i, _), (b, j, _) in zip(ours, ref):
        assert torch.equal(a, b) and torch.equal(i, j)
    assert list(prefetched(ImageDataset([], Preprocessing(48)), 3)) == []


def test_resize_modes_on_a_non_square_image():
    from chiptag.data.images import fit, resize

    img = torch.zeros(3, 40, 20, dtype=torch.uint8)  # 20 wide, 40 high
    img[:, 10:30] = 255  # the centred 20x20 square is white, the top and bottom quarters black
    squash = resize(img, 10, "squash")
    assert squash.dtype == torch.uint8  # every mode hands normalize uint8
    assert squash.shape == (3, 10, 10) and squash[:, 0].max() < 128 and squash[:, 5].min() > 230
    crop = resize(img, 10, "crop")
    assert torch.equal(crop, torch.full((3, 10, 10), 255, dtype=torch.uint8))  # the centred square only
    pre = Preprocessing(10, resize="pad")
    pad = fit(img, pre)
    assert pad.shape == (3, 10, 10)
    # letterboxed: the image fills the middle 5 columns (aspect kept), the borders are the mean colour,
    # stored as uint8: within half a grey level of 0 after normalising
    assert torch.allclose(normalize(pad[None], pre)[0][:, :, :2], torch.zeros(3, 10, 2), atol=0.5 / 255 / 0.224)
    assert pad[:, 5, 4:6].min() > 230 and pad[:, 0, 4:6].max() < 25
    assert resize(torch.zeros(3, 10, 10, dtype=torch.uint8), 10, "pad").dtype == torch.uint8  # at size: as is
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize(img, 10, "stretch")


def test_preprocessing_of_old_checkpoints_squashes():
    old = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}  # written before data.resize existed
    assert Preprocessing.from_dict(old).resize == "squash"
    assert Preprocessing.from_dict(Preprocessing(32, resize="crop").to_dict()).resize == "crop"
