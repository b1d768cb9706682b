"""From probabilities to tags with the label structure (config `labels`): exclusive groups and implied absences.

The rules act on probabilities before thresholding (`LabelRules.condition`): an exclusive group's pick gets
probability 1 and the rest 0; a tag ruled out by a trigger gets 0. Every threshold in (0, 1] then decodes the
same way (`decode`), so threshold tuning on conditioned probabilities takes the rules into account: it tunes
the tags the rules leave free, given what the rules decided. The soft form (`form: soft`) does so only where
the model is confident (`confidence`), so a wrong pick on an uncertain chip costs no recall.

Whether the rules are used at all is decided on validation (`labels.apply`, `choose_and_score`): F2 weighs
recall four times, and forcing one weather tag loses recall whenever the pick is wrong, so rules that describe
the labels exactly can still lower F2. The kept choice travels in the checkpoint's `labels` section
(`apply: always | never`, the tuned `confidence`), which predict, serve, evaluate and the ONNX metadata read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from chiptag.evaluation import metrics
from chiptag.evaluation.thresholds import tune_thresholds

# The soft form's confidences tried on validation when `labels.confidence` is unset. Above ~0.95 the rules touch
# almost no chip whose tags the thresholds would not already decide the same way.
SOFT_CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class LabelRules:
    exclusive: list[np.ndarray] = field(default_factory=list)  # column indices of each group
    implies_none: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (trigger, ruled-out columns)
    # None: hard rules (every row's group decided, a trigger outside a group holds at >= 0.5). A number: the soft
    # form, the rules act only where the model is this confident: a group on rows whose top probability in it
    # reaches it, a trigger when its (conditioned) probability does; other rows keep their probabilities.
    confidence: float | None = None

    @classmethod
    def from_config(cls, labels: dict | None, tags: Sequence[str]) -> LabelRules:
        """labels: config's `labels` section as a dict (a checkpoint stores it so); tags: the run's vocabulary.
        A tag the run does not have is left out of the rules (a rare tag absent from a small data set);
        `unknown_tags` names them, so a typo is reported rather than silently ignored.

        `apply: never` (a run that kept no rules) gives no rules; `auto` and `always` give the rules (a section
        without `apply`, from before it existed, applies them, as it always did). `form: soft` acts at
        `confidence`; unset (a checkpoint of a run stopped before its thresholds were tuned) at the lowest."""
        labels = labels or {}
        if labels.get("apply") == "never":
            return cls()
        col = {t: i for i, t in enumerate(tags)}
        groups = [np.array([col[t] for t in g if t in col]) for g in labels.get("exclusive") or []]
        implies = [(col[trigger], np.array([col[t] for t in ruled if t in col], dtype=np.int64))
                   for trigger, ruled in (labels.get("implies_none") or {}).items() if trigger in col]
        confidence = None
        if labels.get("form") == "soft":
            confidence = SOFT_CONFIDENCES[0] if labels.get("confidence") is None else float(labels["confidence"])
        return cls([g for g in groups if len(g) >= 2], implies, confidence)

    def __bool__(self) -> bool:
        return bool(self.exclusive or self.implies_none)

    def condition(self, probs: np.ndarray) -> np.ndarray:
        """(N, C) probabilities -> the same with the rules applied (a copy; NaN rows stay NaN)."""
        p = np.array(probs, dtype=np.float64, copy=True)
        if not self or p.size == 0:
            return p
        sure = 0.0 if self.confidence is None else self.confidence
        for g in self.exclusive:
            sub = np.nan_to_num(p[:, g], nan=-1.0)
            pick = np.zeros(sub.shape, dtype=bool)
            pick[np.arange(len(p)), sub.argmax(axis=1)] = True
            nan = np.isnan(p[:, g]).any(axis=1)
            decided = np.where(nan[:, None], np.nan, pick.astype(np.float64))
            p[:, g] = np.where((sub.max(axis=1) >= sure)[:, None] | nan[:, None], decided, p[:, g])
        # a grouped trigger is now 1 (its group's pick) or 0, or (soft form) its own probability, below `sure`
        for trigger, ruled in self.implies_none:
            holds = np.nan_to_num(p[:, trigger], nan=0.0) >= max(sure, 0.5)
            p[np.ix_(holds, ruled)] = 0.0
        return p

    def to_dict(self, tags: Sequence[str]) -> dict:
        """The config `labels` section that reads back into these rules (form and confidence when soft)."""
        d = {"exclusive": [[tags[i] for i in g] for g in self.exclusive],
             "implies_none": {tags[t]: [tags[i] for i in r] for t, r in self.implies_none}}
        if self.confidence is not None:
            d.update(form="soft", confidence=self.confidence)
        return d

    def structure(self, tags: Sequence[str]) -> dict:
        """The groups and implied absences alone: what two runs must share to be ensembled."""
        d = self.to_dict(tags)
        return {"exclusive": d["exclusive"], "implies_none": d["implies_none"]}


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


@dataclass(frozen=True)
class RulesDecision:
    """What a run decided about its label rules on validation (config `labels.apply`), for the summary, the
    report, the runs table and the checkpoint."""

    apply: str  # as configured: auto | always | never
    form: str  # hard | soft
    kept: bool  # the rules decide the tags
    confidence: float | None  # the soft form's confidence (tuned when not set); None: hard
    val_f2_with_rules: float | None  # validation F2, thresholds tuned with the rules; None: no rules configured
    val_f2_without_rules: float  # ... and tuned without them
    rules: LabelRules = field(repr=False, compare=False)  # the rules kept (none: LabelRules())

    def labels(self, configured: dict | None) -> dict:
        """The `labels` section predictions decode with (the checkpoint's): the configured rules, `apply`
        resolved to the kept choice (always | never) and the soft form's confidence."""
        return {**(configured or {}), "apply": "always" if self.kept else "never", "confidence": self.confidence}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "rules"}

    def describe(self) -> str:
        return describe_decision(self.to_dict())


def describe_decision(d: dict) -> str:
    """A RulesDecision's dict (summary.json `label_rules_decision`) -> one line: which was kept, and both
    validation figures."""
    if d.get("val_f2_with_rules") is None:
        return "none configured"
    rules = f"soft rules (confidence {d['confidence']:g})" if d.get("confidence") is not None else "hard rules"
    how = {"auto": "higher on validation", "always": "labels.apply: always",
           "never": "labels.apply: never"}.get(d.get("apply"), "")
    kept, with_ = (rules, "them") if d.get("kept") else ("no rules", rules)
    return (f"{kept} kept ({how}): validation F2 {d['val_f2_with_rules']:.4f} with {with_}, "
            f"{d['val_f2_without_rules']:.4f} without (thresholds tuned each way)")


def choose_and_score(val: tuple[np.ndarray, np.ndarray], scored: dict[str, tuple[np.ndarray, np.ndarray]],
                     tags: Sequence[str], labels: dict | None,
                     untrained: Sequence[str] = ()) -> tuple[np.ndarray, dict, RulesDecision]:
    """Thresholds tuned on val = (targets, probs) with the configured rules and without them; the run keeps the
    rules when `labels.apply` is always, or auto and they score a strictly higher val F2 (never: no rules).
    The soft form with no `confidence` set tunes it on val too (SOFT_CONFIDENCES; a tie keeps the higher, the
    rules acting on fewer chips). `untrained`: as tune_and_score (per-class figures of tags never trained on).
    -> (thresholds, {split: split_metrics} as tune_and_score, the decision)."""
    labels = dict(labels or {})
    apply, form = labels.get("apply", "auto"), labels.get("form", "hard")
    configured = LabelRules.from_config({**labels, "apply": "always"}, tags)  # the rules, whatever apply says
    none = tune_and_score(val, {"val": val}, tags, LabelRules())[1]["val"]["f2"]
    best = None  # (val F2, rules) with the rules
    if configured:
        set_confidence = labels.get("confidence")
        tried = [None] if form != "soft" else [set_confidence] if set_confidence is not None else SOFT_CONFIDENCES
        for confidence in sorted(tried, key=lambda c: -(c or 0)):  # highest first: ties keep it
            rules = LabelRules(configured.exclusive, configured.implies_none, confidence)
            f2 = tune_and_score(val, {"val": val}, tags, rules)[1]["val"]["f2"]
            if best is None or f2 > best[0]:
                best = (f2, rules)
    kept = best is not None and (apply == "always" or (apply == "auto" and best[0] > none))
    rules = best[1] if kept else LabelRules()
    # tuning is deterministic: these thresholds are the ones the comparison above scored
    thresholds, out = tune_and_score(val, scored, tags, rules, untrained=untrained)
    decision = RulesDecision(apply, form, kept, best[1].confidence if best else None,
                             None if best is None else float(best[0]), float(none), rules)
    return thresholds, out, decision
