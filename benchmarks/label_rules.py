"""Planet's label rules on generated data: no rules vs hard rules vs soft rules, and what `labels.apply: auto` keeps.

Data: `chiptag demo-data` chips (64 px), once as generated (every chip obeys the rules: one weather tag, cloudy
chips bare) and once with the label noise of benchmarks/folds.py written into the table (5% of land tags
dropped, 3% of chips given a random extra land tag, 5% of weather tags swapped for another). Model: frozen
random-init ResNet18 (weights: null, no download; a smoke-test backbone, not a real model), the demo's head, 20
epochs, one single-split run per seed (split and training seed 0, 1, 2). The rules change decoding only, never
training, so every form is scored on the run's stored validation/test probabilities (eval_probs.npz) through the
same function the end of training calls (evaluation.label_rules.choose_and_score), thresholds tuned on
validation each way:

    none            labels.apply: never
    hard            apply: always, form: hard  (configs/planet.yaml's rules: a group's pick on every chip)
    soft            apply: always, form: soft  (confidence tuned on validation)
    auto hard/soft  apply: auto: whichever of rules / none scores higher on validation

    python benchmarks/label_rules.py --n 1500 --seeds 0 1 2 --out benchmarks/results/label_rules.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from folds import PLANET_RULES, add_noise

from chiptag import config as config_mod
from chiptag.data.synthetic import generate_dataset
from chiptag.evaluation.label_rules import choose_and_score
from chiptag.evaluation.report import load_eval_probs
from chiptag.progress import out
from chiptag.training.main import run_train

FORMS = {"none": {"apply": "never"}, "hard": {"apply": "always"}, "soft": {"apply": "always", "form": "soft"},
         "auto (hard)": {"apply": "auto"}, "auto (soft)": {"apply": "auto", "form": "soft"}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path(".cache/bench-label-rules"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/label_rules.json"))
    return p.parse_args()


def train(a: argparse.Namespace, data: Path, seed: int) -> dict:
    raw = {"data": {"root": str(data), "labels": "train_classes.csv", "split": {"seed": seed}},
           "models": [{"name": f"r18-s{seed}", "backbone": "resnet18", "weights": None, "freeze": True,
                       "image_size": a.size, "hidden_dim": 512, "dropout": 0.2, "learning_rate": 1e-3,
                       "epochs": a.epochs}],
           "training": {"seed": seed, "device": "cpu", "progress": False,
                        "scheduler": {"factor": 0.5, "patience": 3}},
           "features": {"cache_dir": str(a.work / "cache")}, "output": {"runs_dir": str(a.work / "runs")},
           "report": {"error_sheets": False}, "labels": {}}
    return run_train(config_mod.from_dict(raw))


def main() -> None:
    a = parse_args()
    out.quiet = True
    rows = []
    t0 = time.perf_counter()
    for condition, noise in (("noisy labels", argparse.Namespace(drop=0.05, add=0.03, weather=0.05)),
                             ("clean labels", None)):
        data = a.work / f"data-{a.n}-{a.size}-{'noisy' if noise else 'clean'}"
        if not (data / "train_classes.csv").is_file():
            generate_dataset(data, n=a.n, size=a.size, seed=0)
            if noise:
                add_noise(data, noise)
        for seed in a.seeds:
            s = train(a, data, seed)
            probs = load_eval_probs(Path(s["run_dir"]))
            tags = [str(t) for t in probs["tags"]]
            val, test = (probs["val_targets"], probs["val_probs"]), (probs["test_targets"], probs["test_probs"])
            for form, labels in FORMS.items():
                _, m, d = choose_and_score(val, {"val": val, "test": test}, tags, {**PLANET_RULES, **labels})
                rows.append({"condition": condition, "seed": seed, "form": form, "val_f2": m["val"]["f2"],
                             "test_f2": m["test"]["f2"], "kept": d.kept, "confidence": d.confidence})
                print(json.dumps(rows[-1]), flush=True)
    table = {}
    for condition in dict.fromkeys(r["condition"] for r in rows):
        none = {r["seed"]: r["test_f2"] for r in rows if r["condition"] == condition and r["form"] == "none"}
        for form in FORMS:
            sel = [r for r in rows if r["condition"] == condition and r["form"] == form]
            test = [r["test_f2"] for r in sel]
            diff = [r["test_f2"] - none[r["seed"]] for r in sel]
            table[f"{condition}, {form}"] = {
                "test_f2": (statistics.mean(test), statistics.pstdev(test)),
                "minus_none": (statistics.mean(diff), statistics.pstdev(diff)),
                "kept": f"{sum(r['kept'] for r in sel)}/{len(sel)}",
                "confidences": [r["confidence"] for r in sel if r["confidence"] is not None]}
    result = {"command": "python " + " ".join(sys.argv), "n": a.n, "size": a.size, "epochs": a.epochs,
              "rules": PLANET_RULES, "runs": rows, "table": table, "wall_s": time.perf_counter() - t0,
              "note": "frozen random-init ResNet18 at 64 px (a smoke-test backbone); 2-core CPU shared with others"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("| labels | rules | test F2 (tuned), mean ± sd | minus no rules (paired) | rules kept | confidence |\n"
          "|---|---|---|---|---|---|")
    for key, v in table.items():
        condition, form = key.split(", ")
        print(f"| {condition} | {form} | {v['test_f2'][0]:.4f} ± {v['test_f2'][1]:.4f} | "
              f"{v['minus_none'][0]:+.4f} ± {v['minus_none'][1]:.4f} | {v['kept']} | "
              f"{', '.join(f'{c:g}' for c in v['confidences'])} |")
    print(f"wall time {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
