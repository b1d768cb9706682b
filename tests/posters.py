"""A generated dataset shaped like a real multilabel poster set (issue 11), for the end-to-end tests.

What makes it unlike Planet chips, on purpose:
- images are non-square: mostly ~300x444 portrait, some 216x318, a few 89x140 thumbnails;
- labels are a one-hot CSV `Id,Genre,<tag columns>` with a free-text column and identical duplicate rows;
- the dataset brings its own train/val/test lists (val as a CSV with an `Id` header, the others as text).

Each tag paints a band of its own colour at its own height, so even a frozen random-init backbone's features
carry the tags (a model beats the constant baseline) while the tag frequencies differ (so the baseline
predicts some tags).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TAGS = ("action", "comedy", "drama", "horror", "romance", "scifi")
FREQ = (0.35, 0.3, 0.6, 0.15, 0.25, 0.2)
COLOURS = ((230, 40, 40), (240, 220, 30), (40, 60, 220), (20, 20, 20), (240, 120, 200), (40, 220, 120))
SIZES = ((300, 444), (300, 444), (300, 444), (216, 318))  # (width, height); plus thumbnails
THUMB = (89, 140)
DUPLICATES = 3


def _poster(rng: np.random.Generator, tags: np.ndarray, size: tuple[int, int]) -> Image.Image:
    w, h = size
    arr = rng.integers(90, 170, (h, w, 3)).astype(np.uint8)
    band = h // len(TAGS)
    for i in np.flatnonzero(tags):  # tag i: a band of its colour in the i-th sixth of the height, width varies
        x = int(rng.integers(0, w // 3))
        arr[i * band:(i + 1) * band, x:w - x // 2] = COLOURS[i]
    return Image.fromarray(arr)


def make_posters(root: Path, n: int = 160, seed: int = 0, thumbs: int = 6) -> Path:
    """Write root/posters.csv, root/images/<Id>.jpg and root/lists/{train.txt, val.csv, test.txt}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "lists").mkdir(exist_ok=True)
    y = (rng.random((n, len(TAGS))) < np.asarray(FREQ)).astype(int)
    y[y.sum(1) == 0, 2] = 1  # every poster has a genre (drama, the common one, as in real sets)
    ids = [f"tt{1000 + i:05d}" for i in range(n)]
    for i, name in enumerate(ids):
        size = THUMB if i < thumbs else SIZES[i % len(SIZES)]
        _poster(rng, y[i], size).save(root / "images" / f"{name}.jpg", quality=90)
    lines = ["Id,Genre," + ",".join(TAGS)]
    rows = [f"{name},\"{'|'.join(t.title() for t, on in zip(TAGS, y[i]) if on)}\"," + ",".join(map(str, y[i]))
            for i, name in enumerate(ids)]
    rows += rows[5:5 + DUPLICATES]  # identical duplicates, as the real table has
    (root / "posters.csv").write_text("\n".join(lines + rows) + "\n", encoding="utf-8")
    order = rng.permutation(n)
    cut1, cut2 = int(0.6 * n), int(0.8 * n)
    train, val, test = ([ids[i] for i in sorted(part)] for part in np.split(order, [cut1, cut2]))
    (root / "lists" / "train.txt").write_text("".join(f"{s}\n" for s in train), encoding="utf-8")
    (root / "lists" / "val.csv").write_text("Id\n" + "".join(f"{s}\n" for s in val), encoding="utf-8")
    (root / "lists" / "test.txt").write_text("".join(f"{s}.jpg\n" for s in test), encoding="utf-8")  # file names
    return root
