"""RGB-pretrained stems on N bands (models.backbones.adapt_stem), torchvision and timm alike."""

from __future__ import annotations

import pytest
import torch

from chiptag.models.backbones import adapt_input_conv, adapt_stem, build_backbone, first_conv


def test_adapt_input_conv_keeps_rgb_filters_and_fills_extra_bands_with_their_mean():
    w = torch.randn(8, 3, 3, 3)
    four = adapt_input_conv(w, 4)
    assert torch.allclose(four[:, :3], w * 0.75) and torch.allclose(four[:, 3], w.mean(1) * 0.75)
    assert torch.allclose(adapt_input_conv(w, 1)[:, 0], w.sum(1))  # one band: the sum (timm's rule)
    assert torch.equal(adapt_input_conv(w, 3), w)
    assert torch.allclose(adapt_input_conv(w, 2), w.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_b_16", "timm:resnet10t",
                                  "timm:efficientnet_b0"])
def test_a_backbone_takes_n_bands_and_its_rgb_response_is_kept(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    size = 224 if name == "vit_b_16" else 64
    bb = build_backbone(name, None, size, progress=False)
    stem = first_conv(bb.net)
    x = torch.randn(2, 3, size, size)
    before = stem(x)
    adapt_stem(bb.net, 5)
    assert stem is first_conv(bb.net) and stem.in_channels == 5 and stem.weight.shape[1] == 5
    # an input whose extra bands are 0 gives the RGB response scaled by 3/5
    assert torch.allclose(stem(torch.cat([x, torch.zeros(2, 2, size, size)], 1)), before * 0.6, atol=1e-5)
    bb.net.eval()
    assert bb.net(torch.randn(1, 5, size, size)).shape == (1, bb.dim)
