"""The one input object (data.inputs.ImageInput): a file and its bytes give the same chip, views, resize modes
and normalisation go through it, the decoder is resolved once, and the fine-tuning loader's batches are its
chips with their targets."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from chiptag.data.images import IMAGENET_MEAN, Preprocessing, d4, read_rgb, resize
from chiptag.data.inputs import ImageInput, labelled_loader
from chiptag.errors import ChiptagError


@pytest.fixture(scope="module")
def chips(tiny_data):
    return sorted((tiny_data / "train-jpg").glob("*.jpg"))[:6]


def _cmyk_jpeg(path):
    rgb = np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(path, "JPEG")  # Planet's real chips are CMYK JPEGs
    return path


def test_a_file_and_its_bytes_give_the_same_chip(chips, tmp_path):
    png = tmp_path / "chip.png"
    Image.open(chips[0]).save(png)
    images = ImageInput(Preprocessing(32))
    for path in (chips[0], png, _cmyk_jpeg(tmp_path / "cmyk.jpg")):
        from_file, from_bytes = images.chip(path), images.chip(path.read_bytes(), name=path.name)
        assert from_file.dtype == torch.uint8 and from_file.shape == (3, 32, 32)
        assert torch.equal(from_file, from_bytes), path.name
    with pytest.raises(ChiptagError, match="upload.jpg"):  # bytes: errors name the upload
        images.chip(b"not an image", name="upload.jpg")
    with pytest.raises(ChiptagError, match="missing.jpg"):
        images.chip(tmp_path / "missing.jpg")


@pytest.mark.parametrize("view", [0, 1, 5, 7])
def test_views_are_the_d4_views_of_the_chip_in_batches_too(chips, view):
    images = ImageInput(Preprocessing(32))
    one = torch.stack([images.chip(p, view=view) for p in chips])
    assert torch.equal(one, torch.stack([d4(images.chip(p), view) for p in chips]))
    (x, idx, errors), = list(images.batches(chips, len(chips), 0, view=view))
    assert torch.equal(x, one) and idx.tolist() == list(range(len(chips))) and errors == [""] * len(chips)


def test_normalisation_is_the_weights_mean_and_std_on_the_device(chips):
    pre = Preprocessing(48, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    images = ImageInput(pre)
    raw = torch.stack([images.chip(p) for p in chips])
    want = (raw.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    for got in (images.stack([images.chip(p) for p in chips]), images.to_model(raw), images.normalize(raw)):
        assert got.dtype == torch.float32 and got.device == images.device
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_resize_modes_go_through_the_input_object(tmp_path, mode):
    wide = tmp_path / "wide.png"
    rgb = np.random.default_rng(2).integers(0, 255, (24, 40, 3), dtype=np.uint8)  # not square
    Image.fromarray(rgb).save(wide)
    images = ImageInput(Preprocessing(16, resize=mode))
    want = resize(read_rgb(wide), 16, mode, IMAGENET_MEAN)
    assert torch.equal(images.chip(wide), want) and torch.equal(images.chip(wide.read_bytes()), want)
    (x, _, _), = list(images.batches([wide], 4, 0))
    assert torch.equal(x[0], want)


def test_the_decoder_is_resolved_when_the_object_is_built():
    pre = Preprocessing(32)
    assert ImageInput.resolve(pre, "cpu").decoder == "cpu"
    assert ImageInput.resolve(pre, torch.device("cuda")).decoder == "nvjpeg"  # no CUDA needed to decide
    with pytest.raises(ChiptagError, match="nvjpeg"):
        ImageInput.resolve(pre, "cpu", "nvjpeg")
    with pytest.raises(ValueError, match="resolved"):
        ImageInput(pre, decoder="auto")  # built directly, it takes a decision already made
    assert ImageInput(pre, "cpu").device == torch.device("cpu")
    assert pickle.loads(pickle.dumps(ImageInput(pre))) == ImageInput(pre)  # it travels to DataLoader workers


@pytest.mark.parametrize("decoder, workers", [("cpu", 0), ("cpu", 1), ("nvjpeg", 0)])
def test_labelled_loader_gives_normalised_chips_with_their_targets(chips, decoder, workers):
    images = ImageInput(Preprocessing(32), decoder=decoder)  # nvjpeg on CPU: torchvision's CPU kernel
    targets = np.arange(len(chips), dtype=np.float32)[:, None]  # row i's target says which chip it is
    every = images.stack([images.chip(p) for p in chips])

    def epoch(seed):
        loader = labelled_loader(images, chips, targets, 4, shuffle=True, num_workers=workers,
                                 generator=torch.Generator().manual_seed(seed))
        batches = list(loader)
        assert len(loader) == len(batches) == 2 and [len(y) for _, y in batches] == [4, 2]
        for x, y in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.float32
            # the CPU kernel resizes in float on the nvjpeg path: within a grey level of the uint8 resize
            torch.testing.assert_close(x, every[y[:, 0].long()], atol=1.01 / 255 / 0.224, rtol=0)
        return torch.cat([y for _, y in batches])[:, 0].long().tolist()

    order = epoch(0)
    assert sorted(order) == list(range(len(chips))) and order == epoch(0)  # the generator fixes the order
    plain = list(labelled_loader(images, chips, targets, 4))
    assert torch.cat([y for _, y in plain])[:, 0].long().tolist() == list(range(len(chips)))  # no shuffle
