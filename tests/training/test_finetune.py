"""Fine-tuning schedule: head-only epochs on cached features, then the last stages unfrozen."""

from __future__ import annotations

import pytest
import torch

from chiptag.models import checkpoint
from chiptag.errors import ChiptagError
from chiptag.models.stages import backbone_stages, unfreeze
from chiptag.models.backbones import build_backbone
from chiptag.models.head import HeadSpec, Tagger
from chiptag.training.main import build_network, run_train
from chiptag.training.settings import Settings


def _tagger(name="resnet18"):
    torch.manual_seed(0)
    bb = build_backbone(name, None, 32, progress=False)
    return Tagger(bb.net, HeadSpec(bb.dim, 17, 8).build(), frozen=False)


def test_unfreeze_last_stage_only_and_keep_the_rest_in_eval():
    t = _tagger()
    model = unfreeze(t, 1, "train")
    trainable = {n.split(".")[0] for n, p in t.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    model.train()
    assert t.backbone.layer4.training and not t.backbone.layer3.training and not t.backbone.bn1.training
    assert t.head.training


def test_batchnorm_frozen_policy_keeps_stats_and_affine():
    t = _tagger()
    model = unfreeze(t, "all", "frozen").train()
    bn = t.backbone.layer4[0].bn1
    assert not bn.training and not bn.weight.requires_grad
    assert t.backbone.layer4[0].conv1.weight.requires_grad
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(before, bn.running_mean)


def test_efficientnet_stages_and_bad_count():
    t = _tagger("efficientnet_b0")
    assert len(backbone_stages(t.backbone)) == 9
    with pytest.raises(ChiptagError, match="has 9 stages"):
        unfreeze(t, 12, "train")


def test_unfreeze_after_trains_head_then_top_stage(tiny_config, monkeypatch):
    cfg = tiny_config(freeze=False, epochs=2, unfreeze_after=1, unfreeze_stages=1, backbone_lr_mult=0.5)
    cfg.training.grad_accum_steps = 2
    fresh = build_network(Settings.from_config(cfg).network, 17, cfg.training.seed).tagger
    # Keep the last epoch's weights instead of the best epoch's, so the final checkpoint shows what the
    # fine-tuning phase changed whichever epoch validation prefers.
    monkeypatch.setattr("chiptag.training.main.resume_mod.load_trained_state", lambda tagger, state: None)
    s = run_train(cfg)
    assert [h["phase"] for h in s["history"]] == ["head", "finetune"]
    assert s["features"]["cache"] == "miss"  # the head phase used the feature cache
    trained = checkpoint.load_tagger(checkpoint.load(f"{s['run_dir']}/checkpoint.pt")).backbone.state_dict()
    before = fresh.backbone.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], trained[k])}
    assert changed == {"layer4"}  # the unfrozen stage moved, BatchNorm statistics included; nothing else did


def test_schedule_must_leave_epochs_to_finetune(tiny_config):
    with pytest.raises(ChiptagError, match="unfreeze_after"):
        tiny_config(freeze=False, epochs=2, unfreeze_after=2)
