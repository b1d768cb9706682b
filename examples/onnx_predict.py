"""Tag satellite chips with a chiptag ONNX export, without chiptag or torch: numpy + Pillow + onnxruntime.

    python examples/onnx_predict.py model.onnx IMAGE_OR_FOLDER... --out probs.csv [--submission sub.csv]

Everything the model needs is read from the file's metadata: image_size, resize, mean, std (preprocessing), tags,
thresholds and label_rules (decisions). Preprocessing matches chiptag's (chiptag.data.images.resize): RGB,
scaled to [0, 1], made square as `resize` says (squash: the whole image stretched; pad: letterboxed, aspect kept,
borders in the mean colour; crop: the centred square; exports from before `resize` existed squash), normalised as
(x - mean) / std, NCHW float32. Each channel is resized as a float ("F" mode) image with Pillow's bilinear
filter, which computes the weights of chiptag's antialiased bilinear resize; chiptag resizes 8-bit pixels on CPU,
so a resized pixel may differ from chiptag's by up to one 8-bit level (measured: at most 1.0/255 for 300x444,
89x140 and 500x333 images), and probabilities by up to ~1e-3 (measured: 6.7e-4 on padded 80x48 and 48x64 images,
tests/inference/test_predict_export.py). Images already at image_size are not resized.

Rows come in the order given: the files as listed, a folder's images in natural name order (train_2 before
train_10), as `chiptag predict` lists a folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
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
        "resize": meta.get("resize", "squash"),
        # the pad border: the mean colour as an 8-bit pixel, exactly as chiptag fills it
        "fill": np.asarray([round(255 * m) / 255 for m in json.loads(meta["mean"])], dtype=np.float32),
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


def _scaled(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """float 3xHxW -> 3xhxw, each channel by Pillow's bilinear filter (antialiased when shrinking)."""
    return np.stack([np.asarray(Image.fromarray(ch).resize((w, h), Image.Resampling.BILINEAR)) for ch in x])


def fit(x: np.ndarray, size: int, mode: str, fill: np.ndarray) -> np.ndarray:
    """float 3xHxW in [0, 1] -> 3 x size x size, as chiptag.data.images.resize does it."""
    h, w = x.shape[1:]
    if (h, w) == (size, size):
        return x
    if mode == "squash" or h == w:
        return _scaled(x, size, size)
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _scaled(np.ascontiguousarray(x[:, top:top + side, left:left + side]), size, size)
    if mode != "pad":
        raise ValueError(f"unknown resize mode {mode!r} in the model's metadata (squash, pad or crop)")
    nh, nw = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    out = np.empty((3, size, size), dtype=np.float32)
    out[:] = fill.reshape(3, 1, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = _scaled(x, nh, nw)
    return out


def preprocess(path: Path, info: dict) -> np.ndarray:
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    x = fit(np.ascontiguousarray(x), info["size"], info["resize"], info["fill"])
    return (x - info["mean"]) / info["std"]


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def collect(inputs: list[str]) -> list[Path]:
    """Files in the order given; a folder's images in natural name order."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted((p for p in item.iterdir() if p.suffix.lower() in EXTENSIONS),
                            key=lambda p: _natural_key(p.name))
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
