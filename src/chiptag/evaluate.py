"""`chiptag evaluate RUN`: recompute a run's metrics from its checkpoint, config and split lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chiptag import checkpoint, config as config_mod, metrics
from chiptag.data.prepare import load_dataset
from chiptag.data.split import load_split
from chiptag.errors import ChiptagError
from chiptag.features import default_workers
from chiptag.progress import out
from chiptag.atomic import write_json
from chiptag.views import tta_probabilities, view_features


def evaluate_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ChiptagError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_mod.load(run_dir / "config.yaml")
    ckpt = checkpoint.load(run_dir / "checkpoint.pt")
    tagger = checkpoint.build_tagger(ckpt)
    ds = load_dataset(cfg.data, vocabulary=ckpt["tags"])  # validated; tags outside the run are reported
    if ds.table.tags != ckpt["tags"]:
        raise ChiptagError(f"the label table's tags differ from the checkpoint's: {ds.table.tags} vs {ckpt['tags']}")
    splits = load_split(ds.table.names, run_dir / "split")
    pre = checkpoint.preprocessing(ckpt)
    # A frozen backbone's features are usually already in the cache from training.
    cache = cfg.features.cache_dir if ckpt["frozen"] else None
    # Same views as training: with views 8 and tta, the metrics average the 8 views' probabilities.
    views = cfg.features.views if ckpt["frozen"] and cfg.features.tta else 1
    feats, _ = view_features(tagger.backbone, ckpt["backbone"], ds.paths, pre, cfg.features, torch.device("cpu"),
                             cache_dir=cache, views=views, num_workers=default_workers(cfg.training.num_workers, "cpu"),
                             show_progress=cfg.training.progress, label="features")
    thresholds = np.asarray(ckpt["thresholds"])
    result = {}
    for s in ("val", "test"):
        idx = splits[s]
        probs = tta_probabilities(tagger.head, feats[:, idx]).numpy()
        y = ds.table.y[idx]
        m = metrics.classification_metrics(y, probs, thresholds, ds.table.tags)
        m["f2_at_0.5"] = metrics.f2_samples(y, metrics.binarize(probs, 0.5))
        result[s] = m
        out.print(f"{s:>4}: F2 {m['f2']:.4f} (stored thresholds)  {m['f2_at_0.5']:.4f} @0.5  ({len(idx)} images)")
    write_json(run_dir / "evaluation.json", result)
    return result
