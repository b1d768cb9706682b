"""RGB only vs RGB + near-infrared on 4-band chips where one tag shows only in the NIR band.

Data: `chiptag demo-data --bands 4 --format tif` (16-bit B, G, R, NIR; the tag `stressed`, ~20% of chips, is a
patch of canopy whose near-infrared collapses while its colour stays). Model: frozen random-init ResNet18 (no
download: a smoke-test backbone) with its stem adapted to the bands, the demo's head, --epochs epochs. Per seed
(data.split.seed and training.seed) two runs through `run_train`: data.bands [2, 1, 0] (R, G, B) and
[2, 1, 0, 3] (R, G, B, NIR). Reported: test F2 at tuned thresholds and the `stressed` tag's test F2, mean ± sd.

    python benchmarks/nir_bands.py --n 1000 --size 64 --epochs 20 --seeds 0 1 2 --out benchmarks/results/nir_bands.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from chiptag import config as config_mod
from chiptag.data.synthetic_rasters import NIR_TAG, generate_raster_dataset
from chiptag.progress import out
from chiptag.training.main import run_train

BANDS = {"RGB": [2, 1, 0], "RGB+NIR": [2, 1, 0, 3]}


def run(root: Path, work: Path, bands: list[int], seed: int, a: argparse.Namespace) -> dict:
    raw = {"data": {"root": str(root), "labels": "train_classes.csv", "images": "train-tif", "extension": ".tif",
                    "bands": bands, "split": {"seed": seed}},
           "models": [{"name": f"nir-{len(bands)}b-s{seed}", "backbone": "resnet18", "weights": None,
                       "freeze": True, "image_size": a.size, "epochs": a.epochs}],
           "training": {"seed": seed, "progress": False, "device": "cpu"},
           "features": {"cache_dir": str(work / "cache")}, "output": {"runs_dir": str(work / "runs")},
           "report": {"error_sheets": False}}
    s = run_train(config_mod.from_dict(raw))
    test = s["metrics"]["test"]
    return {"bands": bands, "seed": seed, "test_f2": test["f2"], "nir_tag_f2": test["per_class"][NIR_TAG]["f2"],
            "nir_tag_support": test["per_class"][NIR_TAG]["support"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path, default=Path(".cache/bench-nir"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/nir_bands.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    root = generate_raster_dataset(a.work / "data", n=a.n, size=a.size, seed=0)
    out.quiet = True
    runs = [run(root, a.work, bands, seed, a) for seed in a.seeds for bands in BANDS.values()]
    out.quiet = False
    table = {}
    for name, bands in BANDS.items():
        mine = [r for r in runs if r["bands"] == bands]
        f2, nir = [r["test_f2"] for r in mine], [r["nir_tag_f2"] for r in mine]
        table[name] = {"test_f2_mean": statistics.mean(f2), "test_f2_sd": statistics.stdev(f2) if len(f2) > 1 else 0.0,
                       "nir_tag_f2_mean": statistics.mean(nir),
                       "nir_tag_f2_sd": statistics.stdev(nir) if len(nir) > 1 else 0.0}
        print(f"{name:8s} test F2 {table[name]['test_f2_mean']:.4f} ± {table[name]['test_f2_sd']:.4f}   "
              f"{NIR_TAG} F2 {table[name]['nir_tag_f2_mean']:.4f} ± {table[name]['nir_tag_f2_sd']:.4f}")
    result = {"command": "python benchmarks/nir_bands.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items()),
        "table": table, "runs": runs, "seconds": time.perf_counter() - t0}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{time.perf_counter() - t0:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
