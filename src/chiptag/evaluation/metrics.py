"""Multilabel metrics for chiptag: arrays in, plain numbers out.

The Planet Amazon task is scored by F2 averaged over samples (recall weighs four
times precision), so every headline number here is sklearn's
``fbeta_score(beta=2, average="samples", zero_division=0.0)``. Only threshold
tuning (evaluation.thresholds) computes F2 by hand, because it scores thousands
of candidate threshold vectors; its incremental formula is tested against sklearn.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import fbeta_score, precision_recall_curve, precision_recall_fscore_support

from chiptag.errors import ChiptagError

BETA = 2


# --- input validation: every failure names the offending array and its shape ---


def as_labels(y, name: str = "y_true") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 2:
        raise ChiptagError(f"{name} must be 2-D (samples, classes); got shape {arr.shape}")
    if arr.size == 0:
        raise ChiptagError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype != bool:
        try:
            binary = bool(((arr == 0) | (arr == 1)).all())
        except TypeError:  # e.g. an object array of strings
            binary = False
        if not binary:
            raise ChiptagError(f"{name} must contain only 0/1 labels")
    return arr.astype(np.uint8, copy=False)


def as_probs(p, name: str = "probs") -> np.ndarray:
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ChiptagError(f"{name} must be numeric: {exc}") from None
    if arr.ndim != 2:
        raise ChiptagError(f"{name} must be 2-D (samples, classes); got shape {arr.shape}")
    if arr.size == 0:
        raise ChiptagError(f"{name} is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ChiptagError(f"{name} contains NaN or infinite values")
    # Logits passed by mistake would silently give meaningless thresholds.
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ChiptagError(
            f"{name} must be probabilities in [0, 1]; got range [{arr.min():g}, {arr.max():g}]"
        )
    return arr


def same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ChiptagError(f"shape mismatch: {name_a} is {a.shape} but {name_b} is {b.shape}")


def _as_thresholds(thresholds, n_classes: int) -> np.ndarray:
    try:
        t = np.asarray(thresholds, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ChiptagError(f"thresholds must be numeric: {exc}") from None
    if t.ndim == 0:
        t = np.full(n_classes, float(t))
    elif t.shape != (n_classes,):
        raise ChiptagError(
            f"thresholds must be a scalar or shape ({n_classes},) to match {n_classes} classes; "
            f"got shape {t.shape}"
        )
    if not np.isfinite(t).all():
        raise ChiptagError("thresholds contain NaN or infinite values")
    return t


def _check_tags(tags: Sequence[str], n_classes: int) -> list[str]:
    tags = [str(t) for t in tags]
    if len(tags) != n_classes:
        raise ChiptagError(f"got {len(tags)} tags for {n_classes} label columns")
    if len(set(tags)) != len(tags):
        raise ChiptagError("tags must be unique (per-class results are keyed by tag)")
    return tags


# --- public API ---


def binarize(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """(N, C) probabilities -> uint8 0/1, predicting 1 where prob >= threshold."""
    p = as_probs(probs)
    t = _as_thresholds(thresholds, p.shape[1])
    return (p >= t).astype(np.uint8)


def f2_samples(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Sample-averaged F2, the competition metric. A row with no true and no
    predicted tags scores 0 (zero_division=0.0), as sklearn does."""
    yt = as_labels(y_true, "y_true")
    yp = as_labels(y_pred, "y_pred")
    same_shape(yt, yp, "y_true", "y_pred")
    return float(fbeta_score(yt, yp, beta=BETA, average="samples", zero_division=0.0))


def f2_per_sample(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Each row's F2 (what f2_samples averages): 5·tp / (5·tp + 4·fn + fp), 0 for a row with no true and no
    predicted tags (zero_division=0.0, as sklearn)."""
    yt = as_labels(y_true, "y_true").astype(np.int64)
    yp = as_labels(y_pred, "y_pred").astype(np.int64)
    same_shape(yt, yp, "y_true", "y_pred")
    tp = (yt & yp).sum(axis=1)
    denom = (1 + BETA**2) * tp + BETA**2 * (yt & (1 - yp)).sum(axis=1) + ((1 - yt) & yp).sum(axis=1)
    return np.divide((1 + BETA**2) * tp, denom, out=np.zeros(len(yt)), where=denom > 0)


def classification_metrics(y_true, probs, thresholds, tags: Sequence[str]) -> dict:
    """Headline and per-tag scores at the given thresholds, as plain Python
    numbers so the result can go straight into JSON."""
    yt = as_labels(y_true)
    p = as_probs(probs)
    same_shape(yt, p, "y_true", "probs")
    tags = _check_tags(tags, yt.shape[1])
    t = _as_thresholds(thresholds, yt.shape[1])
    yp = (p >= t).astype(np.uint8)

    def f2(average):
        return fbeta_score(yt, yp, beta=BETA, average=average, zero_division=0.0)

    prec_s, rec_s, f2_s, _ = precision_recall_fscore_support(
        yt, yp, beta=BETA, average="samples", zero_division=0.0
    )
    prec_c, rec_c, f2_c, support = precision_recall_fscore_support(
        yt, yp, beta=BETA, average=None, zero_division=0.0
    )
    per_class = {
        tag: {
            "support": int(support[c]),
            "precision": float(prec_c[c]),
            "recall": float(rec_c[c]),
            "f2": float(f2_c[c]),
            "threshold": float(t[c]),
        }
        for c, tag in enumerate(tags)
    }
    return {
        "f2": float(f2_s),
        "f2_micro": float(f2("micro")),
        # Macro counts a tag absent from y_true and never predicted as 0 (zero_division=0.0).
        "f2_macro": float(f2("macro")),
        "precision": float(prec_s),
        "recall": float(rec_s),
        "per_class": per_class,
    }


def constant_baseline(y_train: np.ndarray) -> np.ndarray:
    """Best fixed tag set to predict for every chip, chosen on train: the
    frequency-ordered prefix (1 tag, 2 tags, ...) with the highest sample F2.
    Returns a (C,) uint8 mask. Ties keep the shorter prefix."""
    y = as_labels(y_train, "y_train")
    n, n_classes = y.shape
    # Stable sort so equally frequent tags keep column order: deterministic.
    order = np.argsort(-y.sum(axis=0), kind="stable")
    best_mask, best_score = None, -1.0
    for k in range(1, n_classes + 1):
        mask = np.zeros(n_classes, dtype=np.uint8)
        mask[order[:k]] = 1
        score = f2_samples(y, np.tile(mask, (n, 1)))
        if score > best_score:
            best_mask, best_score = mask, score
    return best_mask


def baseline_metrics(y_true, mask, tags) -> dict:
    """classification_metrics of predicting the fixed tag set `mask` for every row."""
    yt = as_labels(y_true)
    m = np.asarray(mask)
    if m.shape != (yt.shape[1],):
        raise ChiptagError(f"mask must have shape ({yt.shape[1]},); got {m.shape}")
    m = as_labels(m[None, :], "mask")[0]
    probs = np.tile(m.astype(np.float64), (yt.shape[0], 1))
    return classification_metrics(yt, probs, 0.5, tags)


def pr_curves(y_true, probs, tags) -> dict[str, dict[str, list[float]]]:
    """Per-tag precision/recall curves for plotting. Tags with no positives are
    omitted (recall is undefined). drop_intermediate=True drops points that do
    not change the curve's shape, keeping JSON reports small."""
    yt = as_labels(y_true)
    p = as_probs(probs)
    same_shape(yt, p, "y_true", "probs")
    tags = _check_tags(tags, yt.shape[1])
    curves = {}
    for c, tag in enumerate(tags):
        if not yt[:, c].any():
            continue
        prec, rec, _ = precision_recall_curve(yt[:, c], p[:, c], drop_intermediate=True)
        curves[tag] = {"precision": prec.tolist(), "recall": rec.tolist()}
    return curves


def split_metrics(y_true, probs, thresholds, tags: Sequence[str], *, untrained: Sequence[str] = ()) -> dict:
    """classification_metrics at `thresholds` plus the sample F2 at 0.5 everywhere (what the checkpoint
    choice uses): one split's entry in summary.json.

    untrained: tags the training rows had no positive of. A model that never saw a tag has no precision, recall
    or F2 for it to speak of (whatever its threshold happens to give on these rows): they are None (reports
    show `n/a`), marked `no_training_positives`. The headline figures still count every tag."""
    m = classification_metrics(y_true, probs, thresholds, tags)
    m["f2_at_0.5"] = f2_samples(y_true, binarize(probs, 0.5))
    unknown = sorted(set(untrained) - set(m["per_class"]))
    if unknown:
        raise ChiptagError(f"untrained tags not among the tags: {', '.join(unknown)}")
    for tag in untrained:
        m["per_class"][tag].update(precision=None, recall=None, f2=None, no_training_positives=True)
    return m


BASELINE_TOLERANCE = 0.005  # a test F2 this close to the constant baseline is marked `≈ baseline`


def baseline_summary(y: np.ndarray, splits: dict, tags: Sequence[str]) -> dict:
    """The constant-prediction baseline chosen on train, scored on val and test (printed beside every F2)."""
    mask = constant_baseline(y[splits["train"]])
    out: dict = {"tags": [t for t, on in zip(tags, mask) if on]}
    for s in ("val", "test"):
        out[s] = {"f2": baseline_metrics(y[splits[s]], mask, tags)["f2"]}
    return out
