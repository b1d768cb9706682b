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


def test_layer_decay_gives_each_stage_its_rate_top_stage_fastest():
    from chiptag.training.phases import FINETUNE, Phase
    from chiptag.training.settings import Optimisation

    t = _tagger()
    model = unfreeze(t, 3, "train")
    optim = Optimisation("adam", 1e-3, 0.0, "cosine", 0.5, 1, 0.0, 4, 8, False, 30.0, layer_decay=0.5)
    groups = Phase(FINETUNE, 3, None).param_groups(model, optim)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])  # head, layer4, 3, 2
    trainable = {id(p) for p in t.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable  # every trainable one, once
    assert {id(p) for p in t.backbone.layer4.parameters()} == {id(p) for p in groups[1]["params"]}


def test_layer_decay_replaces_backbone_lr_mult(tiny_config):
    with pytest.raises(ChiptagError, match="layer_decay replaces backbone_lr_mult"):
        tiny_config(freeze=False, layer_decay=0.7, backbone_lr_mult=0.2)


def test_warmup_then_cosine_per_step():
    from chiptag.training.loop import WarmupCosine

    warm = WarmupCosine("cosine", steps=100, warm_frac=0.1, floor=0.01, warm=True)
    head = WarmupCosine("cosine", steps=100, warm_frac=0.1, floor=0.01, warm=False)
    assert [round(warm(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear from 0 over 10 steps
    assert head(0) == head(9) == 1.0  # the head is not warmed up
    assert warm(10) == pytest.approx(1.0) and warm(55) == pytest.approx(0.505)
    assert warm(100) == pytest.approx(0.01) and warm(200) == pytest.approx(0.01)  # ends at min_lr
    one = WarmupCosine("onecycle", steps=100, warm_frac=0.1, floor=0.0, warm=True)
    assert one(0) == pytest.approx(1 / 25 + (1 - 1 / 25) / 10)


def test_weight_ema_averages_weights_and_warms_up_its_decay():
    from chiptag.training.loop import WeightEMA

    t = _tagger()
    ema = WeightEMA(t, decay=0.9)
    start = t.head[1].weight.detach().clone()
    with torch.no_grad():
        t.head[1].weight.add_(1.0)
    ema.update()  # the first update takes the weights as they are (AveragedModel)
    assert torch.allclose(ema.tagger.head[1].weight, start + 1, atol=1e-6)
    with torch.no_grad():
        t.head[1].weight.add_(1.0)
    ema.update()  # then decay min(0.9, 2/11): 9/11 of the way to the new weights
    assert torch.allclose(ema.tagger.head[1].weight, start + 1 + 9 / 11, atol=1e-5)
    assert ema.tagger is not t and ema.tagger.head[1].weight.data_ptr() != t.head[1].weight.data_ptr()


@pytest.mark.slow
def test_fine_tuning_recipe_end_to_end(tiny_config):
    cfg = tiny_config(freeze=False, epochs=3, unfreeze_after=1, unfreeze_stages=2, layer_decay=0.5,
                      ema_decay=0.99, clip_grad_norm=1.0, warmup_epochs=1)
    cfg.augment.scale, cfg.augment.brightness = 0.1, 0.2
    s = run_train(cfg)
    assert s["augment"] == "d4, scale 0.1, brightness 0.2"
    assert s["finetune"] == ("unfreeze 2 stages after 1 head epochs; layer_decay 0.5; schedule cosine (warm-up 1 "
                             "epochs); batchnorm frozen; EMA 0.99; clip 1")
    lrs = [h["lr"] for h in s["history"]]
    assert lrs == pytest.approx([3e-3, 3e-3, 1e-6])  # the head's rate at each epoch's end: cosine to min_lr
    backbone = [h.get("lr/backbone") for h in s["history"]]  # the lowest stage's: 3e-3 * 0.5^2 after warm-up
    assert backbone[0] is None and backbone[1] == pytest.approx(7.5e-4) and backbone[2] < 1e-5
    ckpt = checkpoint.load(f"{s['run_dir']}/checkpoint.pt")
    assert ckpt.config["augment"]["scale"] == 0.1  # the resolved config shows the augmentation
    from chiptag.runs.table import read_run

    assert read_run(s["run_dir"]).augment == "d4, scale 0.1, brightness 0.2"
