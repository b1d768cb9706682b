"""Augmentation of fine-tuning chips (data.augment): what each transform does, and that a chip's transform
depends on (seed, epoch, its index) only — not on its batch, the worker count or the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chiptag import config as config_mod
from chiptag.data.augment import Augment
from chiptag.data.images import Preprocessing, d4
from chiptag.data.inputs import ImageInput, labelled_loader
from chiptag.errors import ChiptagError
from conftest import make_config_dict


def _chips(n=6, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def test_no_transform_is_the_plain_scaling():
    x = _chips()
    out = Augment(d4=False)(x, torch.arange(len(x)), epoch=1)
    assert out.dtype == torch.float32 and torch.equal(out, x.float() / 255)


def test_d4_gives_each_chip_one_of_its_8_views_drawn_from_seed_epoch_and_index():
    x, idx = _chips(), torch.arange(6)
    aug = Augment(seed=3)
    out = aug(x, idx, epoch=2)
    views = aug.draw(idx, 2)[:, 0].astype(int)
    for k in range(len(x)):
        assert torch.equal(out[k], d4(x[k], views[k]).float() / 255)
    # a chip's transform does not depend on the batch it came in: chip 4 alone, or in another order
    assert torch.equal(aug(x[4:5], idx[4:5], 2)[0], out[4])
    assert torch.equal(aug(x.flip(0), idx.flip(0), 2), out.flip(0))
    again = Augment(seed=3)(x, idx, epoch=2)
    assert torch.equal(again, out)
    draws = {tuple(aug.draw(idx, e)[:, 0]) for e in range(1, 6)}  # the epochs draw different views
    assert len(draws) > 1


def test_scale_brightness_contrast_hue_stay_in_range_and_shape():
    x, idx = _chips(8, 24), torch.arange(8)
    aug = Augment(d4=True, scale=0.3, brightness=0.3, contrast=0.3, hue=0.2)
    out = aug(x, idx, epoch=1)
    assert out.shape == (8, 3, 24, 24) and out.min() >= 0 and out.max() <= 1
    p = aug.draw(idx, 1)
    assert (p[:, 1] >= 0.7).all() and (p[:, 1] <= 1).all()  # crop side in [1 - scale, 1]
    assert (abs(p[:, 4] - 1) <= 0.3).all() and (abs(p[:, 5] - 1) <= 0.3).all() and (abs(p[:, 6]) <= 0.2).all()
    assert not torch.allclose(out, Augment(d4=True)(x, idx, epoch=1))


def test_hue_rotation_keeps_grey_and_a_full_turn_is_the_identity():
    from chiptag.data.augment import _rotate_hue

    grey = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(_rotate_hue(grey, torch.tensor([1.0])), grey, atol=1e-6)
    x = torch.rand(2, 3, 4, 4) * 0.5 + 0.25
    assert torch.allclose(_rotate_hue(x, torch.tensor([2 * np.pi, 0.0])), x, atol=1e-5)
    assert not torch.allclose(_rotate_hue(x, torch.tensor([np.pi, np.pi])), x, atol=1e-2)


def test_multiband_chips_keep_their_units():
    x = torch.rand(3, 4, 16, 16) * 3000  # raster units
    aug = Augment(d4=True, brightness=0.2, hue=0.3)
    out = aug(x, torch.arange(3), epoch=1)
    assert out.shape == x.shape and out.max() > 1  # not scaled to [0, 1], not clamped; hue skipped
    plain = Augment(d4=False)(x, torch.arange(3), epoch=1)
    assert torch.equal(plain, x)


def test_describe():
    assert Augment(d4=False).describe() == "none"
    assert Augment(scale=0.1, brightness=0.2).describe() == "d4, scale 0.1, brightness 0.2"


def _batches(images, paths, y, workers, epoch, aug):
    loader = labelled_loader(images, paths, y, 8, shuffle=True, generator=torch.Generator().manual_seed(0),
                             num_workers=workers, augment=aug)
    loader.set_epoch(epoch)
    return [(x.clone(), t.clone()) for x, t in loader]


@pytest.mark.slow
def test_same_batches_with_or_without_workers_and_with_the_batch_decoder(tiny_data):
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:20]
    y = np.eye(20, 4, dtype=np.float32)
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    aug = Augment(scale=0.2, brightness=0.2, contrast=0.2, hue=0.1, seed=1)
    cpu = ImageInput(pre)
    inline = _batches(cpu, paths, y, 0, 3, aug)
    workers = _batches(cpu, paths, y, 2, 3, aug)
    batch_decoder = _batches(ImageInput(pre, decoder="nvjpeg"), paths, y, 2, 3, aug)  # its CPU kernel here
    for (a, ya), (b, yb), (c, yc) in zip(inline, workers, batch_decoder):
        assert torch.equal(a, b) and torch.equal(ya, yb) and torch.equal(ya, yc)
        assert (a - c).abs().max() < 0.05  # the same transforms; the decoders' pixels differ by a grey level
    other_epoch = _batches(cpu, paths, y, 0, 4, aug)
    assert not torch.equal(inline[0][0], other_epoch[0][0])


def test_config_section_and_its_errors(tiny_data, tmp_path):
    raw = make_config_dict(tiny_data, tmp_path, freeze=False)
    cfg = config_mod.from_dict(raw)
    assert cfg.augment.d4 and cfg.augment.scale == 0  # D4 on by default
    raw["augment"] = {"scale": 0.1, "hue": 0.05}
    assert config_mod.from_dict(raw).augment.scale == 0.1
    raw["augment"] = {"hue": 0.1}
    raw["data"]["extension"] = ".tif"
    with pytest.raises(ChiptagError, match="augment.hue rotates RGB hues"):
        config_mod.from_dict(raw)
    raw = make_config_dict(tiny_data, tmp_path)
    raw["augment"] = {"scale": 1.5}
    with pytest.raises(ChiptagError, match="scale"):
        config_mod.from_dict(raw)
