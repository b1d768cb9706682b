"""training.select: which epoch's weights the checkpoint keeps, scored on the validation split.

val_loss: the lowest validation loss (smooth: it moves a little every epoch). val_f2: the highest validation
F2 with every threshold at 0.5 (the task's metric, but a jumpy one: a small shift of the probabilities around
0.5 flips many tags). val_f2_tuned: the highest validation F2 at thresholds tuned on validation itself (what
the final model is scored with, optimistic on validation). benchmarks/checkpoint_select.py compares them.
"""

from __future__ import annotations

from chiptag.evaluation import metrics
from chiptag.evaluation.thresholds import tune_thresholds


def score(select: str, ev: dict, f2_at_half: float) -> tuple[float, dict]:
    """-> (score, higher is better; extra history columns). ev: training.epoch.evaluate's result on val."""
    if select == "val_loss":
        return -ev["loss"], {}
    if select == "val_f2":
        return f2_at_half, {}
    if select == "val_f2_tuned":
        thresholds = tune_thresholds(ev["targets"], ev["probs"])
        tuned = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], thresholds))
        return tuned, {"val/f2_tuned": tuned}
    raise ValueError(f"unknown training.select {select!r}")
