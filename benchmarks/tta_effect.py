"""TTA effect on a finished run: sample F2 on the run's val/test split with and without D4 TTA.

    PYTHONPATH=src python benchmarks/tta_effect.py RUN_DIR

Measured, not asserted. The run's thresholds were tuned on plain (non-TTA) validation probabilities, so the
TTA rows are shown both at those thresholds and at thresholds re-tuned on TTA validation probabilities.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chiptag import config as config_mod
from chiptag.evaluation import metrics
from chiptag.evaluation.thresholds import tune_thresholds
from chiptag.data.validate import load_dataset
from chiptag.data.split import load_split
from chiptag.inference.predictor import Predictor


def main(run_dir: str) -> None:
    run = Path(run_dir)
    ds = load_dataset(config_mod.load(run / "config.yaml").data)
    splits = load_split(ds.table.names, run / "split")
    p = Predictor.from_run(run)
    probs, seconds = {}, {}
    for tta in (False, True):
        for s in ("val", "test"):
            t0 = time.perf_counter()
            probs[s, tta] = p.predict([ds.paths[i] for i in splits[s]], tta=tta)
            seconds[s, tta] = time.perf_counter() - t0
    y = {s: ds.table.y[splits[s]] for s in ("val", "test")}
    retuned = tune_thresholds(y["val"], probs["val", True])
    print(f"{'':28} {'val F2':>8} {'test F2':>8} {'test s':>7}")
    rows = [("plain @0.5", False, 0.5), ("plain @stored thresholds", False, p.thresholds),
            ("TTA @0.5", True, 0.5), ("TTA @stored thresholds", True, p.thresholds),
            ("TTA @re-tuned on TTA val", True, retuned)]
    for label, tta, thr in rows:
        f2 = {s: metrics.f2_samples(y[s], metrics.binarize(probs[s, tta], thr)) for s in ("val", "test")}
        print(f"{label:28} {f2['val']:8.4f} {f2['test']:8.4f} {seconds['test', tta]:7.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
