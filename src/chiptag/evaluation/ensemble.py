"""`chiptag ensemble RUN RUN... --out DIR`: the mean probability of finished runs, as a run of its own.

The members must share tags, test split, preprocessing and label rules; thresholds are tuned on the validation
images they all have predictions for (a split's val; a k-fold run's out-of-fold set holds it). Nothing is recomputed: each run's stored validation and test probabilities (eval_probs.npz)
are averaged, thresholds are tuned on the averaged validation (with the label rules where they score higher
there, as labels.apply says), and test is scored once.
The run dir holds one checkpoint with every member's weights (models.checkpoint: `ensemble`), so `predict`,
`evaluate`, `export` and `runs` take it like any run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from chiptag import __version__, config as config_mod
from chiptag.atomic import write_json
from chiptag.errors import ChiptagError
from chiptag.evaluation import report
from chiptag.evaluation.label_rules import LabelRules, choose_and_score
from chiptag.models import checkpoint
from chiptag.models.backbones import state_fingerprint
from chiptag.models.head import MeanProbability, Tagger
from chiptag.progress import out
from chiptag.runs.layout import RunDir


def _member(path: Path) -> dict:
    run = RunDir(path).require_config("ensemble")
    if not run.summary.is_file():
        raise ChiptagError(f"ensemble {run.path}: not a finished run (no summary.json)")
    probs = report.load_eval_probs(run.path)
    if probs is None:
        raise ChiptagError(f"ensemble {run.path}: no {run.eval_probs.name} (validation and test probabilities)")
    return {"run": run, "summary": json.loads(run.summary.read_text(encoding="utf-8")), "probs": probs,
            "ckpt": checkpoint.load(run.checkpoint)}


def _check_same(members: list[dict]) -> None:
    """Same tags, test images, validation images, preprocessing and label rules as the first member."""
    first = members[0]
    checks = [("tags", lambda m: m["ckpt"].tags),
              ("test split", lambda m: m["probs"]["test_names"].tolist()),
              ("preprocessing", lambda m: m["ckpt"].preprocessing),
              # the groups and implied absences; whether each member kept them is its own validation's choice
              ("label rules", lambda m: LabelRules.from_config({**m["ckpt"].label_rules, "apply": "always"},
                                                               m["ckpt"].tags).structure(m["ckpt"].tags))]
    for m in members[1:]:
        for what, get in checks:
            if get(m) != get(first):
                raise ChiptagError(f"ensemble: {m['run'].path} and {first['run'].path} differ in {what}; members "
                                   f"must share tags, test split, preprocessing and label rules")


def shared_validation(members: list[dict]) -> list[str]:
    """The validation images every member has predictions for, in the first member's order: a split's val
    and a k-fold run's out-of-fold set (train + val, which holds that val) share the split's val."""
    common = set.intersection(*(set(m["probs"]["val_names"].tolist()) for m in members))
    names = [n for n in members[0]["probs"]["val_names"].tolist() if n in common]
    if not names:
        raise ChiptagError("ensemble: the runs share no validation image to tune thresholds on")
    return names


def _mean_probs(members: list[dict], split: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mean probabilities) of `names` in a split, in that order."""
    total = np.zeros((len(names), members[0]["probs"][f"{split}_probs"].shape[1]))
    for m in members:
        order = {n: i for i, n in enumerate(m["probs"][f"{split}_names"].tolist())}
        total += m["probs"][f"{split}_probs"][[order[n] for n in names]]
    first = {n: i for i, n in enumerate(members[0]["probs"][f"{split}_names"].tolist())}
    return members[0]["probs"][f"{split}_targets"][[first[n] for n in names]], total / len(members)


def _share_backbones(taggers: list[Tagger]) -> None:
    """Members whose backbones hold the same weights (runs that differ in their heads only) share one module,
    so the ensemble's file stores that backbone once: torch.save writes a storage once, however many keys of
    the state_dict point at it."""
    seen: dict[str, torch.nn.Module] = {}
    for t in taggers:
        t.backbone = seen.setdefault(state_fingerprint(t.backbone), t.backbone)


def _checkpoint(members: list[dict], thresholds: np.ndarray, config: dict) -> checkpoint.Checkpoint:
    taggers = [checkpoint.load_tagger(m["ckpt"]) for m in members]
    _share_backbones(taggers)
    model = Tagger(torch.nn.Identity(), MeanProbability(taggers), frozen=False)
    first = members[0]["ckpt"]
    # The format asks every checkpoint for a head; an ensemble's is its first member's (build_tagger builds the
    # members). Members keep their own description but neither weights (in this state_dict) nor config.
    return checkpoint.Checkpoint(
        backbone=" + ".join(m["ckpt"].backbone for m in members), weights_id="ensemble", head=first.head,
        tags=first.tags, preprocessing=first.preprocessing, config=config,
        thresholds=[float(t) for t in thresholds], frozen=False, state_dict=model.state_dict(), epoch=None,
        ensemble=tuple(replace(m["ckpt"], state_dict=None, config=None) for m in members))


def make_ensemble(paths: list[Path], out_dir: Path) -> dict:
    t0 = time.perf_counter()
    if len(paths) < 2:
        raise ChiptagError("ensemble: give at least two run directories")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ChiptagError(f"ensemble --out {out_dir}: the folder exists and is not empty")
    members = [_member(Path(p)) for p in paths]
    _check_same(members)
    first, tags = members[0], members[0]["ckpt"].tags
    val_names, test_names = shared_validation(members), first["probs"]["test_names"].tolist()
    y_val, p_val = _mean_probs(members, "val", val_names)
    y_test, p_test = _mean_probs(members, "test", test_names)
    config = config_mod.load(first["run"].config).to_dict()  # data and split settings: what evaluate reads
    # the ensemble is a new model: it keeps the label rules only as its own validation rows say (labels.apply)
    thresholds, m, decision = choose_and_score((y_val, p_val), {"val": (y_val, p_val), "test": (y_test, p_test)},
                                               tags, config["labels"])
    config["labels"] = decision.labels(config["labels"])
    run = RunDir(out_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(first["run"].config, run.config)
    shutil.copytree(first["run"].split, run.split, dirs_exist_ok=True)
    _checkpoint(members, thresholds, config).save(run.checkpoint)
    index = {n: i for i, n in enumerate(val_names + test_names)}
    report.save_eval_probs(run.eval_probs, {"val": {"probs": p_val, "targets": y_val},
                                            "test": {"probs": p_test, "targets": y_test}},
                           list(index), {"val": np.arange(len(val_names)),
                                         "test": np.arange(len(val_names), len(index))}, tags)
    listed = [{"run": str(x["run"].path), "model": x["summary"]["model"], "backbone": x["summary"]["backbone"],
               "test_f2": x["summary"]["metrics"]["test"]["f2"]} for x in members]
    write_json(run.members, listed)
    s = first["summary"]
    summary = {"run_id": run.name, "run_dir": str(run.path), "status": "completed", "chiptag_version": __version__,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": run.name,
               "backbone": " + ".join(x["backbone"] for x in listed), "frozen": all(x["summary"]["frozen"]
                                                                                   for x in members),
               "head": f"mean of {len(members)} runs", "epochs": "-", "best_epoch": None, "members": listed,
               "tags": tags, "n_images": {"val": len(val_names), "test": len(test_names)},
               "metrics": m, "baseline": s["baseline"], "label_rules": decision.rules.to_dict(tags),
               "label_rules_decision": decision.to_dict(),
               "thresholds": dict(zip(tags, map(float, np.round(thresholds, 4)))),
               "timings": {"total_s": time.perf_counter() - t0}, "history": []}
    write_json(run.summary, summary)
    out.print(f"ensemble of {len(members)} runs -> {run.path}\n"
              + "".join(f"  member {x['model']} ({x['backbone']}): test F2 {x['test_f2']:.4f}\n" for x in listed)
              + f"  ensemble: val F2 {m['val']['f2']:.4f}, test F2 {m['test']['f2']:.4f} (tuned thresholds), "
                f"baseline {s['baseline']['test']['f2']:.4f}"
              + (f"\n  label rules: {decision.describe()}" if decision.val_f2_with_rules is not None else ""))
    return summary
