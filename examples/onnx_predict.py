"""Tag satellite chips with a chiptag ONNX export, without chiptag or torch: numpy + Pillow + onnxruntime.

    python examples/onnx_predict.py model.onnx IMAGE_OR_FOLDER... --out probs.csv [--submission sub.csv]

Everything the model needs is read from the file's metadata: image_size, mean, std (preprocessing), tags
and thresholds (decisions). Preprocessing matches chiptag's: RGB, scaled to [0, 1], resized to
image_size × image_size (whole chip, no crop), normalised as (x - mean) / std, NCHW float32.
chiptag resizes with torch's antialiased bilinear filter; this script resizes each channel as a float
("F" mode) image with Pillow's bilinear filter, which computes the same weights (measured: pixel values
within ~4e-6 for 64->128, 64->48, 64->224). Resizing the 8-bit image instead would round every pixel to
1/255 and move probabilities by up to ~1e-2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


def load_model(path: str):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    info = {
        "tags": json.loads(meta["tags"]),
        "thresholds": np.asarray(json.loads(meta["thresholds"]), dtype=np.float64),
        "size": int(meta["image_size"]),
        "mean": np.asarray(json.loads(meta["mean"]), dtype=np.float32).reshape(3, 1, 1),
        "std": np.asarray(json.loads(meta["std"]), dtype=np.float32).reshape(3, 1, 1),
        "rules": json.loads(meta.get("label_rules", "{}")),
    }
    return sess, info


def apply_rules(probs: np.ndarray, tags: list[str], rules: dict) -> np.ndarray:
    """chiptag's label rules (chiptag.evaluation.label_rules), before the thresholds: an exclusive group's most
    probable tag gets 1 and the others 0; a trigger that holds (>= 0.5 after that) sets its ruled-out tags to 0.
    `apply: never`: the run kept no rules. `form: soft`: only a group whose top probability reaches
    `confidence` is decided, and a trigger holds at >= `confidence`."""
    p, col = probs.astype(np.float64).copy(), {t: i for i, t in enumerate(tags)}
    if rules.get("apply") == "never":
        return p
    soft = rules.get("form") == "soft"
    sure = float(rules.get("confidence") or 0.5) if soft else 0.0
    for group in rules.get("exclusive", []):
        idx = [col[t] for t in group]
        pick = np.zeros((len(p), len(idx)))
        pick[np.arange(len(p)), p[:, idx].argmax(axis=1)] = 1.0
        decide = p[:, idx].max(axis=1) >= sure
        p[np.ix_(decide, idx)] = pick[decide]
    for trigger, ruled in rules.get("implies_none", {}).items():
        holds = p[:, col[trigger]] >= max(sure, 0.5)
        p[np.ix_(holds, [col[t] for t in ruled])] = 0.0
    return p


def preprocess(path: Path, info: dict) -> np.ndarray:
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    size = info["size"]
    if x.shape[1:] != (size, size):
        x = np.stack([np.asarray(Image.fromarray(ch).resize((size, size), Image.Resampling.BILINEAR))
                      for ch in x])
    return (x - info["mean"]) / info["std"]


def collect(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in EXTENSIONS)
        else:
            paths.append(item)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("inputs", nargs="+", help="image files or folders")
    ap.add_argument("--out", default="probabilities.csv", help="image_name + one probability column per tag")
    ap.add_argument("--submission", help="also write image_name,tags (label rules, then the stored thresholds)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    sess, info = load_model(args.model)
    paths = collect(args.inputs)
    rows, failed = [], 0
    for start in range(0, len(paths), args.batch_size):
        batch, names = [], []
        for p in paths[start:start + args.batch_size]:
            try:
                batch.append(preprocess(p, info))
                names.append(p.stem)
            except OSError as exc:  # unreadable or missing image: report it, keep going
                print(f"failed: {p}: {exc}", file=sys.stderr)
                failed += 1
        if batch:
            probs = sess.run(["probabilities"], {"images": np.stack(batch)})[0]
            rows += list(zip(names, probs))
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", *info["tags"]])
        w.writerows([name, *(f"{v:.7f}" for v in probs)] for name, probs in rows)
    if args.submission:
        with open(args.submission, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_name", "tags"])
            for name, probs in rows:
                probs = apply_rules(probs[None, :], info["tags"], info["rules"])[0]
                w.writerow([name, " ".join(t for t, p, th in zip(info["tags"], probs, info["thresholds"]) if p >= th)])
    print(f"wrote {len(rows)} rows to {args.out}" + (f"; {failed} image(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
