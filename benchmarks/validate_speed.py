"""Pre-flight validation speed on a demo dataset (measured, not asserted).

    chiptag demo-data /tmp/demo --n 2000 --size 128
    PYTHONPATH=src python benchmarks/validate_speed.py /tmp/demo

Prints images/s for the header-level image checks (what `chiptag validate` and training run), for the whole
preflight (label table + images) and, for comparison, for a full decode of every image (read_rgb).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from chiptag.config import DataConfig
from chiptag.data.image_check import validate_images
from chiptag.data.images import read_rgb
from chiptag.data.validate import preflight


def main(root: str) -> None:
    paths = sorted(Path(root, "train-jpg").glob("*.jpg"))
    for _ in range(2):  # the second pass is the warm-cache number
        t = time.perf_counter()
        validate_images(paths)
        dt = time.perf_counter() - t
    print(f"image checks: {len(paths)} images in {dt:.2f}s ({len(paths) / dt:,.0f} img/s, warm file cache)")
    t = time.perf_counter()
    ds, _ = preflight(DataConfig(root=Path(root), labels="train_classes.csv"))
    dt = time.perf_counter() - t
    print(f"preflight (labels + images): {len(ds.table)} rows in {dt:.2f}s ({len(ds.table) / dt:,.0f} rows/s)")
    t = time.perf_counter()
    for p in paths:
        read_rgb(p)
    dt = time.perf_counter() - t
    print(f"full decode (read_rgb), for comparison: {len(paths) / dt:,.0f} img/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
