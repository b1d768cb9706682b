"""CPU decode + resize throughput: chiptag's uint8 antialiased resize vs the float-per-image resize it replaced.

One thread (what a decode worker or the prefetch thread does per image), generated JPEG chips resized to the
model's size, rounds interleaved, best of --rounds:

    python benchmarks/decode_resize.py --n 400 --size 256 --image-size 128 --out benchmarks/results/decode_resize.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from chiptag.data.images import read_rgb, resize
from chiptag.data.synthetic import generate_dataset


def float_resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """The resize chiptag's workers did before: float [0, 1] per image, antialiased bilinear."""
    return F.interpolate(img.float().div_(255.0).unsqueeze(0), size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False).squeeze(0)


def rate(paths, fn, size: int) -> float:
    t0 = time.perf_counter()
    for p in paths:
        fn(read_rgb(p), size)
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_resize.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_dataset(Path(tmp) / "data", n=args.n, size=args.size, seed=0)
        paths = sorted((data / "train-jpg").glob("*.jpg"))
        decode_only = lambda img, size: img  # noqa: E731
        runs = {"decode_only": [], "float_resize": [], "uint8_resize": []}
        for _ in range(args.rounds):
            for name, fn in (("decode_only", decode_only), ("float_resize", float_resize), ("uint8_resize", resize)):
                runs[name].append(rate(paths, fn, args.image_size))
    res = {f"{k}_img_s": max(v) for k, v in runs.items()}
    res["uint8_over_float"] = res["uint8_resize_img_s"] / res["float_resize_img_s"]
    res["command"] = " ".join(["python"] + sys.argv)
    print(f"{args.n} chips {args.size}px -> {args.image_size}px, one thread: " + ", ".join(
        f"{k} {v:.0f} img/s" for k, v in res.items() if k.endswith("img_s")) +
        f"; uint8 resize {res['uint8_over_float']:.2f}x the float one")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
