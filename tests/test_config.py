"""Config: validated data, typed overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chiptag import config as config_mod
from chiptag.errors import ChiptagError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "planet.yaml"])
def test_shipped_configs_load(name):
    cfg = config_mod.load(REPO / "configs" / name)
    assert cfg.model.name


def test_planet_config_has_the_plan_experiments():
    cfg = config_mod.load(REPO / "configs" / "planet.yaml")
    entries = [(m.backbone, m.pos_weight, m.epochs) for m in cfg.models]
    assert ("resnet50", False, 5) in entries and ("resnet50", True, 5) in entries
    assert ("resnet50", False, 15) in entries
    assert {"efficientnet_b0", "efficientnet_b1", "resnet18"} <= {m.backbone for m in cfg.models}
    assert all(m.weights for m in cfg.models)
    assert [m.name for m in cfg.models if not m.freeze] == ["resnet50-finetune"]  # the plan's unfrozen scores


def _raw():
    return {"models": [{"name": "a", "backbone": "resnet18"}, {"name": "b", "backbone": "resnet34"}]}


def test_overrides_are_typed_and_model_shorthand_hits_active_entry():
    cfg = config_mod.from_dict(_raw(), overrides=["active_model_index=1", "model.epochs=7",
                                                  "training.batch_size=16", "model.weights=null"])
    assert cfg.model.name == "b" and cfg.model.epochs == 7 and cfg.model.weights is None
    assert cfg.training.batch_size == 16 and cfg.models[0].epochs == 5


def _error(raw, overrides=()):
    with pytest.raises(ChiptagError) as exc:
        config_mod.from_dict(raw, "cfg.yaml", list(overrides))
    return str(exc.value)


def test_unknown_key_lists_valid_keys():
    msg = _error(_raw(), ["training.batchsize=3"])
    assert "unknown key 'training.batchsize'" in msg and "batch_size" in msg
    assert "\n" not in msg


def test_unknown_key_in_model_entry():
    raw = _raw()
    raw["models"][0]["lr"] = 0.1
    msg = _error(raw)
    assert "models.0.lr" in msg and "learning_rate" in msg


def test_wrong_type_is_one_line():
    msg = _error(_raw(), ["model.epochs=many"])
    assert "models.0.epochs" in msg and "'many'" in msg and "\n" not in msg


def test_index_out_of_range():
    msg = _error(_raw(), ["active_model_index=5"])
    assert "active_model_index 5 is out of range" in msg and "0..1" in msg
    msg = _error(_raw(), ["active_model_index=-1"])  # was taken as Python's "last entry"
    assert "active_model_index -1 is out of range" in msg and "0..1" in msg


def test_split_fractions_must_sum_to_one():
    assert "sum to 1" in _error(_raw(), ["data.split.train=0.9"])


def test_bad_override_syntax():
    assert "KEY=VALUE" in _error(_raw(), ["epochs"])
    assert "not an index" in _error(_raw(), ["models.9.epochs=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ChiptagError, match="not found"):
        config_mod.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n  - {name: x\n")
    with pytest.raises(ChiptagError, match="invalid YAML"):
        config_mod.load(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ChiptagError, match="mapping"):
        config_mod.load(bad)


def test_dump_round_trips(tmp_path):
    cfg = config_mod.from_dict(_raw(), overrides=["model.dropout=0.3"])
    again = config_mod.from_dict(yaml.safe_load(config_mod.dump(cfg)))
    assert again == cfg


def test_an_override_error_names_the_override_not_the_file():
    msg = _error(_raw(), ["active_model_index=1", "model.epochs=many", "training.batchsize=3",
                          "models.-1.dropout=7"])
    lines = msg.splitlines()
    assert "--set model.epochs=many: models.1.epochs:" in msg and "(got 'many')" in msg
    assert "--set training.batchsize=3: unknown key 'training.batchsize'" in msg
    assert "--set models.-1.dropout=7: models.1.dropout:" in msg
    assert not any(line.startswith("cfg.yaml") for line in lines)
    # an error in the file is still the file's, also when --set touched something else
    raw = _raw()
    raw["models"][0]["lr"] = 0.1
    assert _error(raw, ["model.epochs=3"]).startswith("cfg.yaml: unknown key 'models.0.lr'")
    # a later --set of a whole section replaces the one inside it
    msg = _error(_raw(), ["model.epochs=many", "models.0={name: a, backbone: 3}"])
    assert msg.startswith("--set models.0={name: a, backbone: 3}: models.0.backbone")


def test_nodata_and_fill_are_raster_keys():
    assert "nodata and fill are for raster chips" in _error(_raw(), ["data.fill=mean"])
    assert "'error' or 'mean'" in _error(_raw(), ["data.extension=.tif", "data.fill=zero"])
    cfg = config_mod.load(REPO / "configs" / "demo.yaml", ["data.extension=.tif", "data.nodata=-9999",
                                                           "data.fill=mean"])
    assert cfg.data.nodata == -9999 and cfg.data.fill == "mean"
