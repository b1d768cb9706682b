"""Multilabel metrics for chiptag: arrays in, plain numbers out.

The Planet Amazon task is scored by F2 averaged over samples (recall weighs four
times precision), so every headline number here is sklearn's
``fbeta_score(beta=2, average="samples", zero_division=0.0)``. Only threshold
tuning computes F2 by hand, because it scores thousands of candidate threshold
vectors; its incremental formula is tested against sklearn to 1e-12.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import fbeta_score, precision_recall_curve, precision_recall_fscore_support

from chiptag.errors import ChiptagError

BETA = 2
_B2 = float(BETA**2)
# A candidate threshold must beat the current one by more than float noise. Real
# gains are far larger: one sample's F2 moves by >= ~0.01, i.e. >= 0.01/N in the mean.
_TIE_TOL = 1e-12


def _default_grid() -> np.ndarray:
    # Built per call so no caller can mutate a shared module-level array.
    return np.round(np.arange(0.02, 0.99, 0.01), 2)


# --- input validation: every failure names the offending array and its shape ---


def _as_labels(y, name: str = "y_true") -> np.ndarray:
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


def _as_probs(p, name: str = "probs") -> np.ndarray:
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


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
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
    p = _as_probs(probs)
    t = _as_thresholds(thresholds, p.shape[1])
    return (p >= t).astype(np.uint8)


def f2_samples(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Sample-averaged F2, the competition metric. A row with no true and no
    predicted tags scores 0 (zero_division=0.0), as sklearn does."""
    yt = _as_labels(y_true, "y_true")
    yp = _as_labels(y_pred, "y_pred")
    _same_shape(yt, yp, "y_true", "y_pred")
    return float(fbeta_score(yt, yp, beta=BETA, average="samples", zero_division=0.0))


def classification_metrics(y_true, probs, thresholds, tags: Sequence[str]) -> dict:
    """Headline and per-tag scores at the given thresholds, as plain Python
    numbers so the result can go straight into JSON."""
    yt = _as_labels(y_true)
    p = _as_probs(probs)
    _same_shape(yt, p, "y_true", "probs")
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
    y = _as_labels(y_train, "y_train")
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
    yt = _as_labels(y_true)
    m = np.asarray(mask)
    if m.shape != (yt.shape[1],):
        raise ChiptagError(f"mask must have shape ({yt.shape[1]},); got {m.shape}")
    m = _as_labels(m[None, :], "mask")[0]
    probs = np.tile(m.astype(np.float64), (yt.shape[0], 1))
    return classification_metrics(yt, probs, 0.5, tags)


def pr_curves(y_true, probs, tags) -> dict[str, dict[str, list[float]]]:
    """Per-tag precision/recall curves for plotting. Tags with no positives are
    omitted (recall is undefined). drop_intermediate=True drops points that do
    not change the curve's shape, keeping JSON reports small."""
    yt = _as_labels(y_true)
    p = _as_probs(probs)
    _same_shape(yt, p, "y_true", "probs")
    tags = _check_tags(tags, yt.shape[1])
    curves = {}
    for c, tag in enumerate(tags):
        if not yt[:, c].any():
            continue
        prec, rec, _ = precision_recall_curve(yt[:, c], p[:, c], drop_intermediate=True)
        curves[tag] = {"precision": prec.tolist(), "recall": rec.tolist()}
    return curves


# --- threshold tuning (incremental F2; equal to sklearn, see tests) ---


def _mean_fbeta(tp, true_sum, pred_sum) -> np.ndarray:
    """Sample F-beta averaged over axis 0, from per-sample counts.

    Same arithmetic as sklearn: (1+b²)·TP / (b²·|true| + |pred|), and 0 where the
    denominator is 0 (a row with no true and no predicted tags), matching
    zero_division=0.0.
    """
    denom = _B2 * true_sum + pred_sum
    out = np.zeros(np.broadcast(tp, denom).shape)
    return np.divide((1.0 + _B2) * tp, denom, out=out, where=denom > 0).mean(axis=0)


def _candidate_scores(y_c, p_c, current, candidates, tp, pred_sum, true_sum) -> np.ndarray:
    """Mean sample F2 for each candidate threshold of one class, others fixed.

    tp / pred_sum are the per-sample counts under the current thresholds; this
    class's column is swapped out, so each candidate costs O(N), not O(N·C).
    """
    old = p_c >= current
    tp_other = tp - (y_c & old)
    pred_other = pred_sum - old
    cand = p_c[:, None] >= candidates[None, :]  # (N, G)
    return _mean_fbeta(
        tp_other[:, None] + (cand & y_c[:, None]),
        true_sum[:, None],
        pred_other[:, None] + cand,
    )


def _best_global(y: np.ndarray, p: np.ndarray, candidates: np.ndarray) -> float:
    """The single threshold (same for all classes) with the best sample F2.
    Ties -> the lowest candidate (argmax), so the result is deterministic."""
    true_sum = y.sum(axis=1)
    scores = np.empty(len(candidates))
    for i, thr in enumerate(candidates):
        pred = p >= thr
        scores[i] = _mean_fbeta((pred & y).sum(axis=1), true_sum, pred.sum(axis=1))
    return float(candidates[int(np.argmax(scores))])


def tune_thresholds(
    y_true, probs, *, grid=None, rounds: int = 3, default: float = 0.5
) -> np.ndarray:
    """Per-class thresholds maximising sample F2 on (y_true, probs), by coordinate ascent.

    Start from the best global threshold on `grid` (`default` is also a candidate,
    so the start — and the result — is never worse than `default` everywhere; with
    the default grid it already is one). Then for `rounds` rounds, for each class
    in order, try every grid value with the other classes fixed and move only on a
    strict improvement, so ties keep the current value: deterministic, never worse.

    A class with no positives in y_true cannot be judged on this data: any
    threshold only adds false positives, so tuning would push it to an extreme
    for no real reason. It is left out of the ascent and set to
    max(global start, default) — never more trigger-happy than `default`. Raising
    a threshold on such a class can only remove false positives, so this never
    lowers the F2 of the global start.
    """
    y = _as_labels(y_true).astype(bool)
    p = _as_probs(probs)
    _same_shape(y, p, "y_true", "probs")
    g = _default_grid() if grid is None else np.asarray(grid, dtype=np.float64).ravel()
    if g.size == 0 or not np.isfinite(g).all():
        raise ChiptagError("grid must be a non-empty sequence of finite thresholds")
    if not np.isfinite(default):
        raise ChiptagError(f"default threshold must be finite; got {default}")
    if int(rounds) != rounds or rounds < 0:
        raise ChiptagError(f"rounds must be a non-negative integer; got {rounds}")
    g = np.unique(g)  # sorted: argmax ties then resolve to the lowest value

    start = _best_global(y, p, np.union1d(g, [float(default)]))
    has_pos = y.any(axis=0)
    thr = np.where(has_pos, start, max(start, float(default)))

    # Per-sample counts under the current thresholds, kept up to date as classes move.
    pred = p >= thr
    tp = (pred & y).sum(axis=1)
    pred_sum = pred.sum(axis=1)
    true_sum = y.sum(axis=1)
    for _ in range(int(rounds)):
        moved = False
        for c in np.flatnonzero(has_pos):
            # Column 0 is the current value, scored exactly like the candidates.
            cands = np.concatenate(([thr[c]], g))
            scores = _candidate_scores(y[:, c], p[:, c], thr[c], cands, tp, pred_sum, true_sum)
            j = 1 + int(np.argmax(scores[1:]))
            if scores[j] > scores[0] + _TIE_TOL:
                old, new = p[:, c] >= thr[c], p[:, c] >= cands[j]
                tp += (y[:, c] & new).astype(tp.dtype) - (y[:, c] & old)
                pred_sum += new.astype(pred_sum.dtype) - old
                thr[c] = cands[j]
                moved = True
        if not moved:  # a full pass with no move is a fixed point
            break
    return thr
