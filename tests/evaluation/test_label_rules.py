"""Label-structure decoding (config `labels`): exclusive groups and implied absences, and tuning under them."""

from __future__ import annotations

import numpy as np
import pytest

from chiptag.evaluation.label_rules import (LabelRules, choose_and_score, decode, tune_and_score,
                                           unknown_tags)
from chiptag.evaluation.metrics import binarize, f2_samples
from chiptag.evaluation.thresholds import tune_thresholds

TAGS = ["clear", "haze", "cloudy", "primary", "road"]
RULES = {"exclusive": [["clear", "haze", "cloudy"]], "implies_none": {"cloudy": ["primary", "road"]}}


def test_condition_keeps_the_group_argmax_and_clears_implied_tags():
    rules = LabelRules.from_config(RULES, TAGS)
    p = np.array([[0.9, 0.8, 0.1, 0.9, 0.6],    # clear wins; haze dropped
                  [0.1, 0.2, 0.3, 0.9, 0.9],    # nothing over 0.5 in the group: cloudy is still picked...
                  [np.nan] * 5])                # a failed image stays NaN
    c = rules.condition(p)
    assert c[0].tolist() == [1.0, 0.0, 0.0, 0.9, 0.6]
    assert c[1].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]  # ...and clears the land tags
    assert np.isnan(c[2, :3]).all()
    assert decode(p[:2], 0.5, rules).tolist() == [[1, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert p[0, 1] == 0.8  # the input is not modified


def test_trigger_outside_a_group_holds_at_one_half():
    rules = LabelRules.from_config({"implies_none": {"road": ["primary"]}}, TAGS)
    c = rules.condition(np.array([[0.5, 0.5, 0.5, 0.9, 0.5], [0.5, 0.5, 0.5, 0.9, 0.49]]))
    assert c[:, 3].tolist() == [0.0, 0.9]


def test_no_rules_change_nothing_and_unknown_tags_are_named_and_left_out():
    p = np.random.default_rng(0).random((4, 5))
    assert np.array_equal(LabelRules.from_config({}, TAGS).condition(p), p)
    rules = {"exclusive": [["clear", "haze", "fog"], ["road", "mist"]], "implies_none": {"cloudy": ["land", "road"]}}
    assert unknown_tags(rules, TAGS) == ["labels.exclusive: fog", "labels.exclusive: mist",
                                         "labels.implies_none.cloudy: land"]
    r = LabelRules.from_config(rules, TAGS)  # fog and land left out; a group of one is no group
    assert [g.tolist() for g in r.exclusive] == [[0, 1]] and r.implies_none[0][1].tolist() == [4]


def test_tuning_under_the_rules_beats_tuning_without_on_structured_labels():
    """Labels with exactly one weather tag and bare cloudy chips; noisy probabilities. Thresholds tuned under
    the rules score higher than independent thresholds (held-out half)."""
    rng = np.random.default_rng(0)
    n = 2000
    weather = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    y = np.zeros((n, 5), np.uint8)
    y[np.arange(n), weather] = 1
    land = weather != 2
    y[:, 3] = land & (rng.random(n) < 0.9)
    y[:, 4] = land & (rng.random(n) < 0.3)
    p = np.clip(y * 0.45 + rng.random((n, 5)) * 0.55, 0, 1)
    rules = LabelRules.from_config(RULES, TAGS)
    fit, held = slice(0, n // 2), slice(n // 2, n)
    thr, m = tune_and_score((y[fit], p[fit]), {"test": (y[held], p[held])}, TAGS, rules)
    plain = f2_samples(y[held], binarize(p[held], tune_thresholds(y[fit], p[fit])))
    assert m["test"]["f2"] > plain
    assert m["test"]["f2"] == pytest.approx(f2_samples(y[held], decode(p[held], thr, rules)))
    assert "f2_without_rules" in m["test"]


def _weather_labels(n: int, seed: int, second_weather: float):
    """Labels with one weather tag per chip (clear, haze, cloudy) and land tags on non-cloudy chips; a fraction
    `second_weather` of chips also carries a second weather tag (which a hard group cannot give: recall lost).
    Probabilities: noisy, informative."""
    rng = np.random.default_rng(seed)
    weather = rng.choice(3, size=n, p=[0.7, 0.2, 0.1])
    y = np.zeros((n, 5), np.uint8)
    y[np.arange(n), weather] = 1
    extra = rng.random(n) < second_weather
    y[extra, (weather[extra] + 1) % 3] = 1
    land = y[:, 2] == 0
    y[:, 3] = land & (rng.random(n) < 0.9)
    y[:, 4] = land & (rng.random(n) < 0.3)
    return y, np.clip(y * 0.45 + rng.random((n, 5)) * 0.55, 0, 1)


def test_auto_keeps_the_rules_only_where_they_score_higher_on_validation():
    y, p = _weather_labels(2000, 0, second_weather=0.0)  # the rules describe the labels: they help
    val, test = (y[:1000], p[:1000]), (y[1000:], p[1000:])
    thr, m, d = choose_and_score(val, {"val": val, "test": test}, TAGS, RULES)
    assert d.kept and d.apply == "auto" and d.val_f2_with_rules > d.val_f2_without_rules
    assert m["val"]["f2"] == pytest.approx(d.val_f2_with_rules)
    assert m["test"]["f2"] == pytest.approx(f2_samples(test[0], decode(test[1], thr, d.rules)))
    assert d.labels(RULES) == {**RULES, "apply": "always", "confidence": None}
    assert "hard rules kept (higher on validation): validation F2" in d.describe()

    y, p = _weather_labels(2000, 1, second_weather=0.4)  # many chips break the rule: it costs recall
    val, test = (y[:1000], p[:1000]), (y[1000:], p[1000:])
    thr, m, d = choose_and_score(val, {"val": val, "test": test}, TAGS, RULES)
    assert not d.kept and d.val_f2_with_rules < d.val_f2_without_rules
    assert m["val"]["f2"] == pytest.approx(d.val_f2_without_rules) and "f2_without_rules" not in m["val"]
    assert np.array_equal(thr, tune_thresholds(*val))
    assert d.labels(RULES)["apply"] == "never" and not LabelRules.from_config(d.labels(RULES), TAGS)
    assert d.describe().startswith("no rules kept (higher on validation)")
    # always / never skip the choice, and still report both figures
    _, m_always, always = choose_and_score(val, {"val": val}, TAGS, {**RULES, "apply": "always"})
    assert always.kept and m_always["val"]["f2"] == pytest.approx(d.val_f2_with_rules)
    never = choose_and_score(_weather_labels(500, 0, 0.0)[:2], {}, TAGS, {**RULES, "apply": "never"})[2]
    assert not never.kept and never.val_f2_with_rules > never.val_f2_without_rules
    none = choose_and_score(val, {}, TAGS, {})[2]  # nothing configured: nothing to choose
    assert not none.kept and none.val_f2_with_rules is None and none.describe() == "none configured"


def test_soft_rules_act_only_where_the_model_is_confident():
    rules = LabelRules.from_config({**RULES, "form": "soft", "confidence": 0.7}, TAGS)
    p = np.array([[0.9, 0.6, 0.1, 0.9, 0.6],     # confident clear: the group is decided
                  [0.6, 0.55, 0.1, 0.9, 0.6],    # unsure: both weather tags keep their probabilities
                  [0.1, 0.2, 0.65, 0.9, 0.9],    # cloudy the pick but below 0.7: the land tags stay
                  [0.1, 0.2, 0.8, 0.9, 0.9]])    # confident cloudy: land tags ruled out
    c = rules.condition(p)
    assert c[0].tolist() == [1.0, 0.0, 0.0, 0.9, 0.6]
    assert c[1].tolist() == p[1].tolist() and c[2].tolist() == p[2].tolist()
    assert c[3].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    outside = LabelRules.from_config({"implies_none": {"road": ["primary"]}, "form": "soft", "confidence": 0.8}, TAGS)
    c = outside.condition(np.array([[0.5, 0.5, 0.5, 0.9, 0.79], [0.5, 0.5, 0.5, 0.9, 0.8]]))
    assert c[:, 3].tolist() == [0.9, 0.0]  # a trigger outside a group holds at the confidence, not at 0.5
    assert LabelRules.from_config(rules.to_dict(TAGS), TAGS).confidence == 0.7  # reads back soft


def test_soft_confidence_is_tuned_on_validation_and_never_loses_to_no_rules_there():
    y, p = _weather_labels(2000, 1, second_weather=0.4)
    val = (y[:1000], p[:1000])
    _, _, d = choose_and_score(val, {}, TAGS, {**RULES, "form": "soft"})
    hard = choose_and_score(val, {}, TAGS, RULES)[2]
    assert d.confidence in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95) and d.form == "soft"
    assert d.val_f2_with_rules > hard.val_f2_with_rules  # soft loses less recall than hard rules
    assert d.labels(RULES)["confidence"] == d.confidence
    fixed = choose_and_score(val, {}, TAGS, {**RULES, "form": "soft", "confidence": 0.6, "apply": "always"})[2]
    assert fixed.confidence == 0.6 and fixed.kept


def test_a_section_without_apply_applies_its_rules_as_before():
    """Checkpoints written before labels.apply: their rules decode, hard, as they always did."""
    old = LabelRules.from_config(RULES, TAGS)
    assert old and old.confidence is None
    assert old.to_dict(TAGS) == RULES
    assert not LabelRules.from_config({**RULES, "apply": "never"}, TAGS)


def test_onnx_example_applies_the_same_rules():
    """examples/onnx_predict.py (numpy only, reads the rules from the ONNX metadata) decodes as chiptag does."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("onnxruntime")
    path = Path(__file__).resolve().parents[2] / "examples" / "onnx_predict.py"
    spec = importlib.util.spec_from_file_location("onnx_predict", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    p = np.random.default_rng(1).random((50, 5))
    for labels in (RULES, {**RULES, "apply": "always", "form": "soft", "confidence": 0.7},
                   {**RULES, "apply": "never"}, {**RULES, "form": "soft", "confidence": None}):
        ours = LabelRules.from_config(labels, TAGS).condition(p)
        assert np.array_equal(example.apply_rules(p, TAGS, labels), ours), labels
