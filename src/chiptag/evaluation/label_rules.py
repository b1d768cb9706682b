"""From probabilities to tags with the label structure (config `labels`): exclusive groups and implied absences.

The rules act on probabilities before thresholding (`LabelRules.condition`): an exclusive group's pick gets
probability 1 and the rest 0; a tag ruled out by a trigger gets 0. Every threshold in (0, 1] then decodes the
same way (`decode`), so threshold tuning on conditioned probabilities takes the rules into account: it tunes
the tags the rules leave free, given what the rules decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from chiptag.evaluation import metrics
from chiptag.evaluation.thresholds import tune_thresholds


@dataclass(frozen=True)
class LabelRules:
    exclusive: list[np.ndarray] = field(default_factory=list)  # column indices of each group
    implies_none: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (trigger, ruled-out columns)

    @classmethod
    def from_config(cls, labels: dict | None, tags: Sequence[str]) -> LabelRules:
        """labels: config's `labels` section as a dict (a checkpoint stores it so); tags: the run's vocabulary.
        A tag the run does not have is left out of the rules (a rare tag absent from a small data set);
        `unknown_tags` names them, so a typo is reported rather than silently ignored."""
        labels = labels or {}
        col = {t: i for i, t in enumerate(tags)}
        groups = [np.array([col[t] for t in g if t in col]) for g in labels.get("exclusive") or []]
        implies = [(col[trigger], np.array([col[t] for t in ruled if t in col], dtype=np.int64))
                   for trigger, ruled in (labels.get("implies_none") or {}).items() if trigger in col]
        return cls([g for g in groups if len(g) >= 2], implies)

    def __bool__(self) -> bool:
        return bool(self.exclusive or self.implies_none)

    def condition(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> the same with the rules applied (a copy; NaN rows stay NaN)."""
        p = np.array(probs, dtype=np.float64, copy=True)
        if not self or p.size == 0:
            return p
        for g in self.exclusive:
            sub = np.nan_to_num(p[:, g], nan=-1.0)
            pick = np.zeros(sub.shape, dtype=bool)
            pick[np.arange(len(p)), sub.argmax(axis=1)] = True
            nan = np.isnan(p[:, g]).any(axis=1)
            p[:, g] = np.where(nan[:, None], np.nan, pick.astype(np.float64))
        for trigger, ruled in self.implies_none:  # a grouped trigger is now 1 (its group's pick) or 0
            holds = np.nan_to_num(p[:, trigger], nan=0.0) >= 0.5
            p[np.ix_(holds, ruled)] = 0.0
        return p

    def to_dict(self, tags: Sequence[str]) -> dict:
        return {"exclusive": [[tags[i] for i in g] for g in self.exclusive],
                "implies_none": {tags[t]: [tags[i] for i in r] for t, r in self.implies_none}}


def unknown_tags(labels: dict | None, tags: Sequence[str]) -> list[str]:
    """'key: tag' for every tag the rules name that the run's vocabulary lacks."""
    labels, known = labels or {}, set(tags)
    named = [("labels.exclusive", t) for g in labels.get("exclusive") or [] for t in g]
    for trigger, ruled in (labels.get("implies_none") or {}).items():
        named += [("labels.implies_none", trigger)] + [(f"labels.implies_none.{trigger}", t) for t in ruled]
    return [f"{key}: {t}" for key, t in named if t not in known]


def decode(probs: np.ndarray, thresholds, rules: LabelRules) -> np.ndarray:
    """(N, C) probabilities -> 0/1 tags: the rules, then the thresholds."""
    return metrics.binarize(rules.condition(probs), thresholds)


def tune_and_score(val: tuple[np.ndarray, np.ndarray], scored: dict[str, tuple[np.ndarray, np.ndarray]],
                   tags: Sequence[str], rules: LabelRules, *,
                   untrained: Sequence[str] = ()) -> tuple[np.ndarray, dict]:
    """Thresholds tuned on val = (targets, probs) under the rules; -> (thresholds, {split: split_metrics}) for
    every (targets, probs) in `scored`. Each split's entry also says what F2 the same thresholds give without
    the rules (`f2_without_rules`), the rules' effect at a glance. `untrained`: tags the training rows had no
    positive of, whose per-class figures are undefined (metrics.split_metrics)."""
    y_val, p_val = val
    thresholds = tune_thresholds(y_val, rules.condition(p_val))
    out = {}
    for name, (y, p) in scored.items():
        m = metrics.split_metrics(y, rules.condition(p), thresholds, tags, untrained=untrained)
        if rules:
            m["f2_without_rules"] = metrics.f2_samples(y, metrics.binarize(p, thresholds))
        out[name] = m
    return thresholds, out
