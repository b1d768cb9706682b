"""Which test chips and tags a run gets wrong: arrays in, indices, matrices and one-line readings out.

No images and no plots here (evaluation.sheets draws them), so every choice a contact sheet shows — which chips,
in which order — is a pure function of the stored probabilities, targets and thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from chiptag.evaluation import metrics

# Probabilities are clipped before the log so a confidently wrong chip costs -log(1e-7) ≈ 16 per tag instead of
# infinity: the ranking stays meaningful and the number printable.
EPS = 1e-7


def chip_losses(y_true, probs) -> np.ndarray:
    """Per-chip loss: binary cross-entropy summed over tags (what training minimises, per chip, unweighted)."""
    y = metrics.as_labels(y_true).astype(np.float64)
    p = np.clip(metrics.as_probs(probs), EPS, 1 - EPS)
    metrics.same_shape(y, p, "y_true", "probs")
    return -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum(axis=1)


def top_losses(losses: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest losses, largest first; ties keep split order (a stable sort)."""
    return np.argsort(-np.asarray(losses), kind="stable")[: max(int(n), 0)]


@dataclass(frozen=True)
class TagErrors:
    """One tag's mistakes on test at its tuned threshold."""

    tag: str
    threshold: float
    f2: float
    support: int  # test chips labelled with the tag
    false_positives: np.ndarray  # all of them, most confident (highest probability) first
    false_negatives: np.ndarray  # all of them, most missed (lowest probability) first


def tag_errors(y_true, probs, thresholds, tags: Sequence[str], max_tags: int | None = None) -> list[TagErrors]:
    """Every tag with something to show (test positives, or false positives of a tag test never has), worst
    F2 first; max_tags keeps only the worst ones."""
    y, p = metrics.as_labels(y_true), metrics.as_probs(probs)
    t = np.asarray(thresholds, dtype=np.float64)
    pred = metrics.binarize(p, t)
    per_class = metrics.classification_metrics(y, p, t, tags)["per_class"]
    out = []
    for c, tag in enumerate(tags):
        if not y[:, c].any() and not pred[:, c].any():
            continue
        fp = np.flatnonzero((y[:, c] == 0) & (pred[:, c] == 1))
        fn = np.flatnonzero((y[:, c] == 1) & (pred[:, c] == 0))
        out.append(TagErrors(tag, float(t[c]), per_class[tag]["f2"], per_class[tag]["support"],
                             fp[np.argsort(-p[fp, c], kind="stable")], fn[np.argsort(p[fn, c], kind="stable")]))
    out.sort(key=lambda e: (e.f2, -e.support, e.tag))
    return out if max_tags is None else out[:max_tags]


def cooccurrence(labels) -> tuple[np.ndarray, np.ndarray]:
    """Row-normalised co-occurrence: m[i, j] = share of the chips carrying tag i that also carry tag j (the
    diagonal is 1; NaN for a tag no chip carries). Also returns each tag's chip count."""
    y = metrics.as_labels(labels, "labels").astype(np.float64)
    counts = y.sum(axis=0)
    joint = y.T @ y
    with np.errstate(invalid="ignore", divide="ignore"):
        m = joint / counts[:, None]
    m[counts == 0] = np.nan
    return m, counts.astype(int)


def cooccurrence_reading(truth: np.ndarray, pred: np.ndarray, tags: Sequence[str]) -> str:
    """One line on the largest gap between predicted and true co-occurrence (off the diagonal)."""
    diff = pred - truth
    np.fill_diagonal(diff, 0.0)
    diff = np.where(np.isnan(diff), 0.0, diff)
    if not np.abs(diff).max(initial=0.0) > 0:
        return "predicted tags co-occur exactly as the true ones do"
    i, j = np.unravel_index(np.argmax(np.abs(diff)), diff.shape)
    share = lambda m: "n/a" if np.isnan(m[i, j]) else f"{m[i, j]:.0%}"  # noqa: E731 - two uses, one line
    more = "more" if diff[i, j] > 0 else "less"
    return (f"largest gap: chips with {tags[i]} also carry {tags[j]} {more} often in the prediction "
            f"({share(pred)}) than in the truth ({share(truth)})")


def tile_tags(truth_row, pred_row, tags: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """One chip's tags split for its tile: (correct, missed = true but not predicted, extra = predicted but
    not true)."""
    correct = [t for t, a, b in zip(tags, truth_row, pred_row) if a and b]
    missed = [t for t, a, b in zip(tags, truth_row, pred_row) if a and not b]
    extra = [t for t, a, b in zip(tags, truth_row, pred_row) if b and not a]
    return correct, missed, extra
