"""timm backbones (`backbone: timm:<name>`, the optional timm extra): build, train, checkpoint, predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("timm")  # the timm extra; `make test` installs it

from chiptag import config as config_mod  # noqa: E402
from chiptag.errors import ChiptagError  # noqa: E402
from chiptag.inference.predictor import Predictor  # noqa: E402
from chiptag.models.backbones import build_backbone  # noqa: E402
from chiptag.models.head import HeadSpec, Tagger  # noqa: E402
from chiptag.models.stages import backbone_stages, unfreeze  # noqa: E402
from chiptag.training.main import run_train  # noqa: E402
from conftest import make_config_dict  # noqa: E402


@pytest.mark.parametrize("name, size, dim", [("timm:resnet10t", 32, 512), ("timm:test_vit", 32, 64)])
def test_timm_backbone_features_stages_and_step(name, size, dim):
    import timm

    bb = build_backbone(name, None, image_size=size)
    assert bb.dim == dim and bb.preprocessing.image_size == size
    ref = timm.create_model(name.removeprefix("timm:"), pretrained=False, num_classes=0,
                            **({"img_size": size} if "vit" in name else {}))
    assert sum(p.numel() for p in bb.net.parameters()) == sum(p.numel() for p in ref.parameters())
    assert list(bb.preprocessing.mean) == pytest.approx(list(ref.pretrained_cfg["mean"]))
    head = HeadSpec(bb.dim, 5, 8).build()
    tagger = Tagger(bb.net, head, frozen=True)
    x = torch.randn(2, 3, size, size)
    assert tagger(x).shape == (2, 5)
    assert len(backbone_stages(bb.net)) >= 3
    ft = unfreeze(tagger, 1, "train").train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(ft(x), torch.ones(2, 5))
    loss.backward()
    last = backbone_stages(bb.net)[-1]
    assert all(p.grad is not None for p in last.parameters())
    assert all(p.grad is None for p in backbone_stages(bb.net)[0].parameters())


def test_timm_stages_cover_the_whole_network():
    """timm's feature_info names only some modules (EfficientNet: blocks 0, 1, 2, 4, 6): the stages cut the
    network at those levels, so unfreezing the last N stages leaves no module of them frozen (and nothing else
    drifting: every module is in a stage that is either trained or kept in eval)."""
    bb = build_backbone("timm:tf_efficientnet_lite0", None, image_size=32)
    stages = backbone_stages(bb.net)
    assert len(stages) == 5
    assert sum(p.numel() for s in stages for p in s.parameters()) == sum(p.numel() for p in bb.net.parameters())
    tagger = Tagger(bb.net, HeadSpec(bb.dim, 3, 8).build(), frozen=True)
    model = unfreeze(tagger, 2, "train").train()
    assert bb.net.conv_head.weight.requires_grad and bb.net.blocks[5][0].conv_pw.weight.requires_grad
    assert bb.net.blocks[3][0].conv_pw.weight.requires_grad  # stage 4 = blocks 3 and 4
    assert not bb.net.blocks[2][0].conv_pw.weight.requires_grad and not bb.net.blocks[2].training
    assert bb.net.bn2.training and model.tagger.head.training


def test_timm_weights_file_and_errors(tmp_path):
    import timm

    torch.manual_seed(3)
    src = timm.create_model("resnet10t", pretrained=False)  # with its classifier, as timm saves them
    torch.save(src.state_dict(), tmp_path / "r10t.pth")
    bb = build_backbone("timm:resnet10t", str(tmp_path / "r10t.pth"), image_size=32)
    assert bb.weights_id.startswith("file:")
    assert torch.equal(bb.net.conv1[0].weight, src.conv1[0].weight)
    with pytest.raises(ChiptagError, match="does not fit timm:test_vit"):
        build_backbone("timm:test_vit", str(tmp_path / "r10t.pth"), image_size=32)
    with pytest.raises(ChiptagError, match="unknown timm model 'resnet10q'; close: .*resnet10t"):
        build_backbone("timm:resnet10q", None)


def test_timm_run_end_to_end_and_predict(tiny_data, tmp_path):
    s = run_train(config_mod.from_dict(make_config_dict(tiny_data, tmp_path, backbone="timm:resnet10t",
                                                        epochs=2)))
    assert s["backbone"] == "timm:resnet10t" and np.isfinite(s["metrics"]["test"]["f2"])
    chips = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:3]
    probs = Predictor.from_run(s["run_dir"]).predict(chips)  # rebuilt from the checkpoint, no timm download
    assert probs.shape == (3, len(s["tags"])) and np.isfinite(probs).all()
