"""`chiptag evaluate RUN`: recompute a run's metrics from its checkpoint, config and split lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chiptag import config as config_mod
from chiptag.atomic import write_json
from chiptag.data.inputs import ImageInput
from chiptag.data.split import load_split, untrained_tags
from chiptag.data.validate import load_dataset
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics
from chiptag.evaluation.label_rules import LabelRules
from chiptag.features.extraction import default_workers
from chiptag.features.views import make_extractor, tta_probabilities, view_features
from chiptag.models import checkpoint
from chiptag.progress import out
from chiptag.runs.layout import RunDir


def _feature_probabilities(cfg, ckpt: checkpoint.Checkpoint, tagger, paths):
    """idx -> probabilities through the backbone's features (the training path; cached for a frozen one)."""
    # A frozen backbone's features are usually already in the cache from training.
    cache = cfg.features.cache_dir if ckpt.frozen else None
    # Same views as training: with views 8 and tta, the metrics average the 8 views' probabilities.
    views = cfg.features.views if ckpt.frozen and cfg.features.tta else 1
    device = torch.device("cpu")
    images = ImageInput.resolve(ckpt.preprocessing, device, cfg.features.decoder)
    ex = make_extractor(tagger.backbone, ckpt.backbone, images, cfg.features,
                        num_workers=default_workers(cfg.training.num_workers, device),
                        show_progress=cfg.training.progress, label="features")
    feats, _ = view_features(ex, paths, cache, views)
    return lambda idx: tta_probabilities(tagger.head, feats[:, idx]).numpy()


def _trained_on_val(ckpt: checkpoint.Checkpoint) -> bool:
    return bool(ckpt.members) or any(_trained_on_val(m) for m in ckpt.ensemble)


def evaluate_run(run_dir: Path) -> dict:
    run = RunDir(run_dir).require_config("evaluate")
    cfg = config_mod.load(run.config)
    ckpt = checkpoint.load(run.checkpoint)
    tagger = checkpoint.load_tagger(ckpt)
    ds = load_dataset(cfg.data, vocabulary=ckpt.tags)  # validated; tags outside the run are reported
    if ds.table.tags != ckpt.tags:
        raise ChiptagError(f"the label table's tags differ from the checkpoint's: {ds.table.tags} vs {ckpt.tags}")
    splits = load_split(ds.table.names, run.split)
    if ckpt.ensemble:  # members with backbones of their own: through the images, as predict sees them
        from chiptag.inference.predictor import Predictor

        predictor = Predictor(tagger, ckpt.tags, ckpt.thresholds, ckpt.preprocessing)
        probs_of = lambda idx: predictor.predict([ds.paths[i] for i in idx])  # noqa: E731
    else:
        probs_of = _feature_probabilities(cfg, ckpt, tagger, ds.paths)
    thresholds = np.asarray(ckpt.thresholds)
    rules = LabelRules.from_config(ckpt.label_rules, ckpt.tags)
    trained_on = ("train", "val") if _trained_on_val(ckpt) else ("train",)
    untrained = untrained_tags(ds.table.y, np.concatenate([splits[s] for s in trained_on]), ds.table.tags)
    result = {}
    # A k-fold ensemble saw every non-test chip in training (each head all but one fold): its val figure is the
    # out-of-fold F2 of the separate heads in summary.json, which the ensemble cannot reproduce; test it is.
    scored = ("test",) if _trained_on_val(ckpt) else ("val", "test")
    if _trained_on_val(ckpt):
        out.print("a k-fold ensemble trained on every non-test chip: its val is the out-of-fold F2 in "
                  "summary.json; scoring test")
    for s in scored:
        idx = splits[s]
        probs = rules.condition(probs_of(idx))
        m = metrics.split_metrics(ds.table.y[idx], probs, thresholds, ds.table.tags, untrained=untrained)
        result[s] = m
        out.print(f"{s:>4}: F2 {m['f2']:.4f} (stored thresholds)  {m['f2_at_0.5']:.4f} @0.5  ({len(idx)} images)")
    write_json(run.evaluation, result)
    return result
