"""Single split vs 5-fold ensemble, with and without the label rules, on generated data with label noise.

Data: `chiptag demo-data` chips (rare tags at the real Planet frequencies: blow_down 0.24%, conventional_mine
0.25% ...), then label noise written into the table: each land tag of each chip is dropped with probability
--drop, a random land tag is added with probability --add, and the weather tag is swapped for another with
probability --weather (the table keeps exactly one weather tag per chip, as Planet's does).
Model: frozen random-init ResNet18 at 64 px (weights: null: no download), the demo's head, --epochs epochs.
Per seed (data.split.seed and training.seed) four runs through `run_train`: single / 5-fold x rules off / on
(rules: Planet's, configs/planet.yaml). The cache is warmed first, so every timed run reads cached features.
Reported: test F2 at tuned thresholds (mean ± sd over seeds), the rare tags' test F2 (tags under 2% of chips,
per-class F2 averaged over those with test positives; also the uncommon ones, 2-12%), and wall time of 5-fold over single.

    python benchmarks/folds.py --n 3000 --epochs 20 --seeds 0 1 2 --out benchmarks/results/folds.json

--wall: whole-process wall time of `chiptag train` on the demo (configs/demo.yaml, `make demo`'s data, warm
feature cache), side by side in one run, --repeats times in turn: a single run; `--folds 5` (heads trained
together, training.heads); `--folds 5` with the heads one after another (the epoch loop per fold, as before);
a 4-entry `--all` sweep of heads on the demo's backbone (entries differing in hidden_dim, dropout, learning rate,
pos_weight); `uptime` before each. Ratios are of medians.

    python benchmarks/folds.py --wall --repeats 3 --out benchmarks/results/folds_wall.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from chiptag import config as config_mod
from chiptag.data.synthetic import LAND_TAGS, TAG_FREQUENCIES, WEATHER_TAGS, generate_dataset
from chiptag.progress import out
from chiptag.training.main import run_train

PLANET_RULES = {"exclusive": [["clear", "partly_cloudy", "haze", "cloudy"]],
                "implies_none": {"cloudy": list(LAND_TAGS)}}
RARE = [t for t, f in TAG_FREQUENCIES.items() if f < 0.02]
UNCOMMON = [t for t, f in TAG_FREQUENCIES.items() if 0.02 <= f < 0.12]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--drop", type=float, default=0.05, help="P(a true land tag is dropped from the table)")
    p.add_argument("--add", type=float, default=0.03, help="P(a chip gets a random extra land tag)")
    p.add_argument("--weather", type=float, default=0.05, help="P(a chip's weather tag is swapped)")
    p.add_argument("--work", type=Path, default=Path(".cache/bench-folds"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/folds.json"))
    p.add_argument("--wall", action="store_true", help="whole-process wall times on the demo (see above)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    return p.parse_args()


ONE_AT_A_TIME = ("import sys; from chiptag.training import main; main.heads_mod.batchable = lambda *a, **k: []; "
                 "from chiptag.cli import app; sys.argv[0] = 'chiptag'; app()")
SWEEP_HEADS = [{"hidden_dim": 512, "dropout": 0.2, "learning_rate": 1e-3, "pos_weight": False},
               {"hidden_dim": 512, "dropout": 0.2, "learning_rate": 1e-3, "pos_weight": True},
               {"hidden_dim": 256, "dropout": 0.5, "learning_rate": 1e-3, "pos_weight": False},
               {"hidden_dim": 512, "dropout": 0.2, "learning_rate": 3e-4, "pos_weight": False}]


def wall(a: argparse.Namespace) -> None:
    """Whole-process wall times of single / 5-fold (together, one at a time) / 4-entry sweep, side by side."""
    raw = yaml.safe_load(a.config.read_text(encoding="utf-8"))
    if not (Path(raw["data"]["root"]) / raw["data"]["labels"]).is_file():
        sys.exit(f"no demo data at {raw['data']['root']}: run `make demo` (or chiptag demo-data) first")
    runs = a.work / "wall-runs"
    base = dict(raw["models"][0])
    raw["models"] = [{**base, **h, "name": f"sweep-{i}"} for i, h in enumerate(SWEEP_HEADS)]
    sweep = a.work / "sweep4.yaml"
    sweep.parent.mkdir(parents=True, exist_ok=True)
    sweep.write_text(yaml.safe_dump(raw), encoding="utf-8")
    chiptag = [sys.executable, "-c", "import sys; from chiptag.cli import app; sys.argv[0] = 'chiptag'; app()"]
    common = ["--set", f"output.runs_dir={runs}", "--set", "training.progress=false"]
    commands = {"single": chiptag + ["train", "-c", str(a.config)] + common,
                "folds5": chiptag + ["train", "-c", str(a.config), "--folds", "5"] + common,
                "folds5_one_at_a_time": [sys.executable, "-c", ONE_AT_A_TIME, "train", "-c", str(a.config),
                                         "--folds", "5"] + common,
                "sweep4": chiptag + ["train", "-c", str(sweep), "--all"] + common}
    subprocess.run(commands["single"], check=True, capture_output=True)  # warm the feature cache (and the disk)
    rows = []
    for rep in range(a.repeats):
        for name, cmd in commands.items():
            load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if done.returncode:
                sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            rows.append({"repeat": rep, "run": name, "wall_s": seconds, "uptime": load})
            print(json.dumps(rows[-1]), flush=True)
    med = {name: statistics.median(r["wall_s"] for r in rows if r["run"] == name) for name in commands}
    result = {"command": "python " + " ".join(sys.argv), "commands": {k: " ".join(v[3:] if v[1] == "-c" else v)
                                                                       for k, v in commands.items()},
              "runs": rows, "median_s": med,
              "ratio_folds5_over_single": med["folds5"] / med["single"],
              "ratio_folds5_one_at_a_time_over_single": med["folds5_one_at_a_time"] / med["single"],
              "ratio_sweep4_over_single": med["sweep4"] / med["single"],
              "note": "whole-process wall time (imports, validation, training, report), warm feature cache, "
                      "demo data (2,000 chips, frozen random ResNet18 at 128 px, 40 epochs); 2-core CPU shared "
                      "with other jobs: see uptime per run"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("| run | median wall s | x single |\n|---|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:.1f} | {v / med['single']:.2f}x |")


def add_noise(root: Path, a: argparse.Namespace) -> None:
    rng = np.random.default_rng(1234)
    table = root / "train_classes.csv"
    rows = list(csv.reader(table.open(encoding="utf-8")))
    for row in rows[1:]:
        tags = row[1].split()
        weather = [t for t in tags if t in WEATHER_TAGS]
        land = [t for t in tags if t not in WEATHER_TAGS and rng.random() >= a.drop]
        if rng.random() < a.weather:
            weather = [str(rng.choice([w for w in WEATHER_TAGS if w not in weather]))]
        if weather != ["cloudy"] and rng.random() < a.add:
            land.append(str(rng.choice(LAND_TAGS)))
        if weather == ["cloudy"]:
            land = []  # the structure of the table stays Planet's
        row[1] = " ".join(weather + sorted(set(land)))
    with table.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def config(a: argparse.Namespace, data: Path, seed: int, folds: int, rules: bool):
    raw = {"data": {"root": str(data), "labels": "train_classes.csv", "split": {"seed": seed}},
           "models": [{"name": f"r18-s{seed}-k{folds}-{'rules' if rules else 'plain'}", "backbone": "resnet18",
                       "weights": None, "freeze": True, "image_size": 64, "hidden_dim": 512, "dropout": 0.2,
                       "learning_rate": 1e-3, "epochs": a.epochs}],
           "training": {"seed": seed, "device": "cpu", "progress": False, "folds": folds,
                        "scheduler": {"factor": 0.5, "patience": 3}},
           "features": {"cache_dir": str(a.work / "cache")}, "output": {"runs_dir": str(a.work / "runs")},
           "labels": {**PLANET_RULES, "apply": "always"} if rules else {}}  # rules on: applied, hard
    return config_mod.from_dict(raw)


def tags_f2(summary: dict, tags: list[str]) -> float:
    pc = summary["metrics"]["test"]["per_class"]
    vals = [pc[t]["f2"] for t in tags if pc[t]["support"] > 0]
    return float(np.mean(vals)) if vals else float("nan")


def main() -> None:
    a = parse_args()
    if a.wall:
        wall(a)
        return
    data = a.work / f"data-{a.n}-{a.size}"
    if not (data / "train_classes.csv").is_file():
        generate_dataset(data, n=a.n, size=a.size, seed=0)
        add_noise(data, a)
    out.quiet = True
    rows, extract = [], []
    for seed in a.seeds:
        warm = run_train(config(a, data, seed, 0, False))  # the seed's random backbone: warm its features' cache
        if warm["features"].get("cache") == "miss":  # a cache left by an earlier run is not a cold extraction
            extract.append(warm["timings"]["extract_s"])
        for folds in (0, a.folds):
            for rules in (False, True):
                t0 = time.perf_counter()
                s = run_train(config(a, data, seed, folds, rules))
                rows.append({"seed": seed, "folds": folds, "rules": rules, "test_f2": s["metrics"]["test"]["f2"],
                             "test_f2_at_0.5": s["metrics"]["test"]["f2_at_0.5"], "rare_test_f2": tags_f2(s, RARE),
                             "uncommon_test_f2": tags_f2(s, UNCOMMON), "timings": s["timings"],
                             "val_f2": s["metrics"]["val"]["f2"], "wall_s": time.perf_counter() - t0,
                             "cache": s["features"].get("cache"), "run_dir": s["run_dir"]})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "run_dir"}), flush=True)
    table = {}
    for folds in (0, a.folds):
        for rules in (False, True):
            sel = [r for r in rows if r["folds"] == folds and r["rules"] == rules]
            key = f"{'single' if not folds else f'{folds}-fold'}, rules {'on' if rules else 'off'}"
            table[key] = {m: (statistics.mean(r[m] for r in sel), statistics.pstdev(r[m] for r in sel))
                          for m in ("test_f2", "rare_test_f2", "uncommon_test_f2", "wall_s")}
    single = statistics.mean(r["wall_s"] for r in rows if not r["folds"])
    kfold = statistics.mean(r["wall_s"] for r in rows if r["folds"])
    result = {"command": "python " + " ".join(sys.argv), "n": a.n, "size": a.size, "epochs": a.epochs,
              "noise": {"drop": a.drop, "add": a.add, "weather": a.weather}, "rare_tags": RARE,
              "runs": rows, "table": table, "wall_ratio_kfold_over_single": kfold / single,
              "extract_s": extract, "cold_ratio_kfold_over_single": (statistics.mean(extract) + kfold)
              / (statistics.mean(extract) + single) if extract else None,
              "note": "2-core CPU shared with other jobs; frozen random-init ResNet18 at 64 px, warm cache"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print("| setting | test F2 (tuned) | rare tags (<2%) F2 | uncommon tags (2-12%) F2 | wall s |\n"
          "|---|---|---|---|---|")
    for key, v in table.items():
        print(f"| {key} | {v['test_f2'][0]:.4f} ± {v['test_f2'][1]:.4f} | {v['rare_test_f2'][0]:.3f} ± "
              f"{v['rare_test_f2'][1]:.3f} | {v['uncommon_test_f2'][0]:.3f} ± {v['uncommon_test_f2'][1]:.3f} | "
              f"{v['wall_s'][0]:.1f} |")
    print(f"5-fold / single wall time: {kfold / single:.2f}x with a warm cache"
          + (f", {result['cold_ratio_kfold_over_single']:.2f}x cold (extraction {statistics.mean(extract):.1f}s)"
             if extract else ""))


if __name__ == "__main__":
    main()
