"""Label-structure decoding (config `labels`): exclusive groups and implied absences, and tuning under them."""

from __future__ import annotations

import numpy as np
import pytest

from chiptag.evaluation.label_rules import LabelRules, decode, tune_and_score, unknown_tags
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
    ours = LabelRules.from_config(RULES, TAGS).condition(p)
    assert np.array_equal(example.apply_rules(p, TAGS, RULES), ours)
