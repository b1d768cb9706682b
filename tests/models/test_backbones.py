"""Backbone registry: every architecture gets the custom head as its real head; weights resolution."""

from __future__ import annotations

import pytest
import torch

from chiptag.errors import ChiptagError
import torchvision.models as tvm

from chiptag.models.backbones import (FAMILIES, REGISTRY, build_backbone, get_module, get_spec, replace_head,
                                      state_fingerprint)
from chiptag.models.head import HeadSpec, Tagger, count_parameters
from chiptag.models.stages import backbone_stages, unfreeze

REQUIRED = {"resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0", "efficientnet_b1",
            "efficientnet_b2", "efficientnet_b3"}


def test_registry_has_required_architectures():
    assert REQUIRED <= set(REGISTRY)


# One architecture per family in `make test`; every registered name under the all_backbones marker
# (`make test-all`). Sizes: the smallest input each architecture takes (AlexNet's pools, Inception's stem,
# MaxViT's 7x7 partitions of a /32 grid; ViT-H/14 needs a multiple of its 14 px patches).
REPRESENTATIVES = {"resnet18", "regnet_x_400mf", "shufflenet_v2_x0_5",
                   "googlenet", "inception_v3", "efficientnet_b0", "efficientnet_v2_s", "mobilenet_v3_small",
                   "mnasnet0_5", "densenet121", "alexnet", "vgg11", "convnext_tiny", "maxvit_t",
                   "squeezenet1_1", "swin_t", "vit_b_32"}
SIZES = {"alexnet": 64, "inception": 80, "maxvit": 224}


def size_of(name: str) -> int:
    if name == "vit_h_14":
        return 28
    return SIZES.get(get_spec(name).family, 32)


def test_one_representative_per_family():
    assert {get_spec(n).family for n in REPRESENTATIVES} == set(FAMILIES)
    assert set(REGISTRY) == set(tvm.list_models(module=tvm))  # every torchvision classifier is registered


def backbone_case(name: str):
    """Build at a small input, compare with torchvision, count parameters, take one training step."""
    size = size_of(name)
    torch.manual_seed(0)
    bb = build_backbone(name, None, image_size=size)
    spec = get_spec(name)
    head = HeadSpec(bb.dim, 17, hidden_dim=8, dropout=0.2).build()
    tagger = Tagger(bb.net, head, frozen=True).eval()
    x = torch.randn(2, 3, size, size)
    tv = spec.builder(weights=None, image_size=size)
    replaced = sum(p.numel() for p in get_module(tv, spec.head_attr).parameters())
    assert count_parameters(bb.net)["frozen"] == sum(p.numel() for p in tv.parameters()) - replaced
    with torch.no_grad():
        ours = tagger(x)
        if not FAMILIES[spec.family].pooled:  # torchvision's own forward with our head in the classifier's place
            result = tv.load_state_dict(bb.net.state_dict(), strict=False)
            assert all(k.startswith(spec.head_attr + ".") for k in result.missing_keys)
            replace_head(tv, spec)
            parent, _, last = spec.head_attr.rpartition(".")
            holder = get_module(tv, parent) if parent else tv
            if last.isdigit():
                holder[int(last)] = head
            else:
                setattr(holder, last, head)
            assert torch.allclose(ours, tv.eval()(x), atol=1e-4)
    assert ours.shape == (2, 17) and torch.isfinite(ours).all()
    counts = count_parameters(tagger)
    assert counts["trainable"] == sum(p.numel() for p in head.parameters())
    tagger.train()  # one training step: only the head moves
    before = [p.clone() for p in head.parameters()]
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(tagger(x), torch.ones(2, 17))
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    stages = backbone_stages(bb.net, spec.family)  # what fine-tuning unfreezes
    ids = lambda ss: [[id(p) for p in m.parameters()] for m in ss]  # noqa: E731
    assert len(stages) >= 2 and ids(backbone_stages(bb.net)) == ids(stages)
    ft = unfreeze(Tagger(bb.net, head, frozen=True), 1, "train")
    live = count_parameters(ft.tagger.backbone)["trainable"]
    assert 0 < live < count_parameters(bb.net)["trainable"] + count_parameters(bb.net)["frozen"]


@pytest.mark.parametrize("name", sorted(REPRESENTATIVES))
def test_backbone_family(name):
    backbone_case(name)


@pytest.mark.all_backbones
@pytest.mark.parametrize("name", sorted(set(REGISTRY) - REPRESENTATIVES))
def test_every_registered_backbone(name):
    backbone_case(name)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ChiptagError, match="valid: .*resnet50.*vit_b_16"):
        build_backbone("resnet9000", None)


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
