"""Backbone registry: every architecture gets the custom head as its real head; weights resolution."""

from __future__ import annotations

import pytest
import torch

from chiptag.errors import ChiptagError
from chiptag.models.backbones import REGISTRY, build_backbone, get_spec, state_fingerprint
from chiptag.models.head import HeadSpec, Tagger, count_parameters

REQUIRED = {"resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1",
            "efficientnet_b2", "efficientnet_b3"}


def test_registry_has_required_architectures():
    assert REQUIRED <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_custom_head_is_the_head(name):
    """Tagger(x) equals torchvision's own forward with its classifier attribute set to our head."""
    torch.manual_seed(0)
    bb = build_backbone(name, None, image_size=32)
    spec = HeadSpec(bb.dim, 17, hidden_dim=8, dropout=0.2)
    head = spec.build()
    tagger = Tagger(bb.net, head, frozen=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tagger(x)
        tv = get_spec(name).builder(weights=None)
        result = tv.load_state_dict(bb.net.state_dict(), strict=False)
        assert all(k.startswith(bb.head_attr + ".") for k in result.missing_keys)
        setattr(tv, bb.head_attr, head)
        reference = tv.eval()(x)
    assert ours.shape == (2, 17)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert [type(m).__name__ for m in head] == ["Dropout", "Linear", "ReLU", "Linear"]
    counts = count_parameters(tagger)
    assert counts["trainable"] == sum(p.numel() for p in head.parameters())


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ChiptagError, match="valid: .*resnet50"):
        build_backbone("vgg16", None)


def test_unknown_weights_name():
    with pytest.raises(ChiptagError, match="IMAGENET1K_V2"):
        build_backbone("resnet50", "IMAGENET_FOO")


def test_weights_file_written_by_test(tmp_path):
    torch.manual_seed(1)
    src = build_backbone("resnet18", None)
    full = get_spec("resnet18").builder(weights=None)
    full.load_state_dict(src.net.state_dict(), strict=False)
    path = tmp_path / "r18.pth"
    torch.save(full.state_dict(), path)
    torch.manual_seed(2)
    bb = build_backbone("resnet18", str(path), image_size=64)
    assert bb.weights_id.startswith("file:")
    assert state_fingerprint(bb.net) == state_fingerprint(src.net)
    assert bb.preprocessing.image_size == 64


def test_weights_file_for_wrong_architecture(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(get_spec("resnet18").builder(weights=None).state_dict(), path)
    with pytest.raises(ChiptagError, match="does not fit resnet50"):
        build_backbone("resnet50", str(path))
    with pytest.raises(ChiptagError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))


def test_offline_download_says_where_to_put_the_file(monkeypatch, tmp_path):
    """No network: torchvision's download fails; the message names the hub path and weights: null."""
    import urllib.error

    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ChiptagError) as exc:
        build_backbone("resnet50", "IMAGENET1K_V2")
    msg = str(exc.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg
    assert "weights: null" in msg
