"""Checkpoints read back into the typed record they are written from; files written before the record load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chiptag.data.images import Preprocessing
from chiptag.errors import ChiptagError
from chiptag.inference.predictor import Predictor
from chiptag.models import checkpoint
from chiptag.models.backbones import build_backbone
from chiptag.models.head import HeadSpec, MeanProbability, Tagger

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "checkpoint_v1_shufflenet.pt"  # written by checkpoint.save at 3ded504 (make_checkpoint_v1.py)
EXPECTED = json.loads((FIXTURES / "checkpoint_v1_shufflenet.json").read_text(encoding="utf-8"))


def probe() -> torch.Tensor:
    """The batch make_checkpoint_v1.py predicted (RNG-free, so the same everywhere)."""
    return torch.linspace(-2.0, 2.0, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)


def raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_on_disk(a: dict, b: dict) -> None:
    """Two on-disk dicts hold the same keys and values (tensors bit-equal)."""
    assert a.keys() == b.keys()
    for key in a:
        if key == "state_dict":
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        else:
            assert a[key] == b[key], key


def test_a_checkpoint_written_before_the_record_loads_and_predicts_the_same():
    ckpt = checkpoint.load(OLD)
    assert isinstance(ckpt, checkpoint.Checkpoint)
    assert (ckpt.backbone, ckpt.weights_id, ckpt.chiptag_version) == ("shufflenet_v2_x0_5", "none", "0.1.0")
    assert ckpt.head == HeadSpec(1024, 5, hidden_dim=16, dropout=0.1)
    assert ckpt.tags == ["clear", "haze", "cloudy", "primary", "water"]
    assert ckpt.thresholds == [0.2, 0.3, 0.4, 0.5, 0.6]
    assert ckpt.preprocessing == Preprocessing(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "squash")
    assert ckpt.frozen and ckpt.epoch == 7 and ckpt.members is None and ckpt.ensemble == ()
    assert ckpt.label_rules == {"exclusive": [["clear", "haze", "cloudy"]],
                                "implies_none": {"cloudy": ["primary", "water"]}}
    assert ckpt.config["models"][0]["backbone"] == "resnet18"  # the run's whole config travels with it
    with torch.inference_mode():
        logits = checkpoint.load_tagger(ckpt)(probe())
    torch.testing.assert_close(logits, torch.tensor(EXPECTED["logits"]), rtol=0, atol=1e-6)
    predictor = Predictor.from_run(OLD, device="cpu", engine="torch")
    probs = predictor.predict_tensor(probe())
    torch.testing.assert_close(probs, torch.tensor(EXPECTED["probabilities"]), rtol=0, atol=1e-6)
    # The predictor keeps what it read (Service shows its backbone) but not a second copy of the weights.
    assert predictor.card == ckpt and predictor.card.state_dict is None


def test_saving_a_loaded_old_checkpoint_writes_the_same_dict(tmp_path):
    checkpoint.load(OLD).save(tmp_path / "again.pt")
    assert_same_on_disk(raw(OLD), raw(tmp_path / "again.pt"))


def _old_kfold(old: dict, k: int) -> dict:
    """A k-fold checkpoint as checkpoint.save wrote it before the record: one backbone, `members` K, the head's
    weights under head.members.<i>. (Here K copies of the fixture's head, so it predicts as the fixture does.)"""
    state = {key: v for key, v in old["state_dict"].items() if not key.startswith("head.")}
    for i in range(k):
        state.update({f"head.members.{i}.{key.removeprefix('head.')}": v
                      for key, v in old["state_dict"].items() if key.startswith("head.")})
    return {**old, "state_dict": state, "members": k}


def _old_ensemble(members: list[dict]) -> dict:
    """An ensemble checkpoint as evaluation.ensemble._checkpoint wrote it before the record (its code, on
    dicts): the first member's required keys, members without weights or config, their weights in one dict."""
    model = Tagger(torch.nn.Identity(), MeanProbability(
        [checkpoint.load_tagger(checkpoint.Checkpoint.from_dict(m, "member")) for m in members]), frozen=False)
    first = members[0]
    specs = [{k: v for k, v in m.items() if k not in ("state_dict", "config")} for m in members]
    return {**{k: first[k] for k in checkpoint.REQUIRED}, "chiptag_version": "0.1.0",
            "backbone": " + ".join(m["backbone"] for m in members), "weights_id": "ensemble",
            "thresholds": [0.25] * len(first["tags"]), "frozen": False, "ensemble": specs, "config": first["config"],
            "state_dict": model.state_dict(), "epoch": None}


def test_old_kfold_and_ensemble_layouts_load_predict_and_save_back_unchanged(tmp_path):
    old = raw(OLD)
    kfold = _old_kfold(old, 3)
    torch.save(kfold, tmp_path / "kfold.pt")
    ensemble = _old_ensemble([old, kfold])
    torch.save(ensemble, tmp_path / "ensemble.pt")

    k = checkpoint.load(tmp_path / "kfold.pt")
    assert k.members == 3 and isinstance(checkpoint.build_tagger(k).head, MeanProbability)
    e = checkpoint.load(tmp_path / "ensemble.pt")
    assert e.weights_id == "ensemble" and e.epoch is None and not e.frozen
    assert [m.backbone for m in e.ensemble] == ["shufflenet_v2_x0_5"] * 2 and e.ensemble[1].members == 3
    assert all(m.state_dict is None and m.config is None for m in e.ensemble)
    assert e.label_rules == checkpoint.load(OLD).label_rules  # the ensemble's own config
    for ckpt in (k, e):  # identical members: the mean probability is the fixture's
        with torch.inference_mode():
            probs = torch.sigmoid(checkpoint.load_tagger(ckpt)(probe()))
        torch.testing.assert_close(probs, torch.tensor(EXPECTED["probabilities"]), rtol=0, atol=1e-6)
    for name, written in (("kfold", kfold), ("ensemble", ensemble)):
        checkpoint.load(tmp_path / f"{name}.pt").save(tmp_path / f"{name}-again.pt")
        again = raw(tmp_path / f"{name}-again.pt")
        assert_same_on_disk({k: v for k, v in written.items() if k != "ensemble"},
                            {k: v for k, v in again.items() if k != "ensemble"})
        for before, after in zip(written.get("ensemble", []), again.get("ensemble", [])):
            assert_same_on_disk(before, after)


@pytest.fixture(scope="module")
def small() -> tuple[Tagger, checkpoint.ModelCard]:
    backbone = build_backbone("shufflenet_v2_x0_5", None, image_size=32)
    head = HeadSpec(backbone.dim, 3, hidden_dim=8)
    card = checkpoint.ModelCard(backbone.name, backbone.weights_id, head, ["a", "b", "c"], backbone.preprocessing,
                                {"labels": {"exclusive": [["a", "b"]]}})
    return Tagger(backbone.net, head.build(), frozen=True), card


def test_save_then_load_gives_the_record_back(small, tmp_path):
    tagger, card = small
    written = checkpoint.Checkpoint.of(tagger, card, None, epoch=3)
    assert written.thresholds == [0.5, 0.5, 0.5]  # during training, before tuning
    written.save(tmp_path / "c.pt")
    read = checkpoint.load(tmp_path / "c.pt")
    assert read == written  # every field but the weights (not compared: tensors)
    assert read.state_dict.keys() == written.state_dict.keys()
    assert all(torch.equal(read.state_dict[k], v) for k, v in written.state_dict.items())
    assert read.label_rules == {"exclusive": [["a", "b"]]}
    checkpoint.save(tmp_path / "d.pt", tagger, card, [0.1, 0.2, 0.3], epoch=4)  # training's call
    assert replace(checkpoint.load(tmp_path / "d.pt"), thresholds=[0.5] * 3, epoch=3) == written


def test_a_missing_key_is_named_with_the_file(tmp_path):
    old = raw(OLD)
    path = tmp_path / "no-tags.pt"
    torch.save({k: v for k, v in old.items() if k != "tags"}, path)
    with pytest.raises(ChiptagError, match=f"{path}.* missing tags"):
        checkpoint.load(path)
    member = {k: v for k, v in old.items() if k not in ("state_dict", "config", "head")}
    torch.save(_old_ensemble([old, old]) | {"ensemble": [old, member]}, path)
    with pytest.raises(ChiptagError, match=r"no-tags.pt \(ensemble member 2\).* missing head"):
        checkpoint.load(path)


def test_a_bad_value_is_named_with_the_file(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({**raw(OLD), "head": {"in_dim": 1024, "n_tags": 5, "width": 3}}, path)
    with pytest.raises(ChiptagError, match=f"{path} is damaged: bad head .*width"):
        checkpoint.load(path)


def test_an_unknown_format_version_is_a_clear_error(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({**raw(OLD), "format_version": 2, "chiptag_version": "9.0"}, path)
    with pytest.raises(ChiptagError, match=f"{path} has checkpoint format 2 \\(written by chiptag 9.0\\); "
                                           "this chiptag .* reads format 1"):
        checkpoint.load(path)


def test_a_record_without_weights_says_so():
    member = replace(checkpoint.load(OLD), state_dict=None)
    with pytest.raises(ChiptagError, match="holds no weights"):
        checkpoint.load_tagger(member)


class _Custom:  # a class torch.load(weights_only=True) refuses: what a pickled whole model looks like
    pass


@pytest.mark.parametrize("content, says", [
    (b"", r"the file is empty \(0 bytes\), not a checkpoint"),
    (b"these are words, not weights\n" * 4, "not a checkpoint, or a damaged one"),
    (b"xyz", "not a checkpoint, or a damaged one"),
    ("custom", "it holds Python objects besides tensors"),
])
def test_a_file_that_is_no_checkpoint_says_so_without_unsafe_advice(tmp_path, content, says):
    """Before: `EOFError: ` for an empty file, and torch's advice to retry with weights_only=False (which runs the
    file's code) for garbage or pickled objects."""
    path = tmp_path / "checkpoint.pt"
    if content == "custom":
        torch.save({"model": _Custom()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ChiptagError, match=f"cannot read checkpoint {path}: {says}") as err:
        checkpoint.load(path)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_a_garbage_weights_file_is_named_as_such(tmp_path):
    from chiptag.models.weights import read_state_dict

    path = tmp_path / "w.pth"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))  # e.g. an image saved under the weights' name
    with pytest.raises(ChiptagError, match=f"cannot read weights file {path}: not a weights file") as err:
        read_state_dict(path)
    assert "weights_only" not in str(err.value)
    torch.save({"model": _Custom()}, path)
    with pytest.raises(ChiptagError, match=r"not a weights file chiptag loads .* torch.save\(model.state_dict"):
        read_state_dict(path)
