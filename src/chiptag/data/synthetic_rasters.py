"""`chiptag demo-data --bands 4 --format tif`: the demo's chips as 16-bit B, G, R, NIR rasters (the band order of
Planet's 4-band analytic GeoTIFFs), with one extra tag that shows only in the near-infrared band.

The visible bands are the demo's own chip (data.synthetic.draw_chip, the same pixels as the JPEG demo before
compression). Near-infrared follows what vegetation does: green canopy reflects strongly there, water, bare ground
and cloud less. `stressed` (NIR_TAG) marks a chip with a patch of vegetation whose near-infrared collapses (the
red edge of stressed or drying canopy) while its colour stays the same: a model that sees R, G, B only cannot
tell, one that sees the NIR band can (benchmarks/nir_bands.py measures it). Values are reflectance x 10,000 in
uint16, as Planet's analytic products store them.
"""

from __future__ import annotations

import pathlib

import numpy as np

from chiptag.atomic import write_text
from chiptag.data.synthetic import draw_chip, sample_tags
from chiptag.errors import ChiptagError

NIR_TAG = "stressed"
NIR_TAG_P = 0.2  # common enough for a small demo to learn
BANDS = ("blue", "green", "red", "nir")  # the file's band order; the model's RGB is data.bands [2, 1, 0]
REFLECTANCE_SCALE = 10_000


def nir_band(rgb: np.ndarray, stressed: bool, rng: np.random.Generator) -> np.ndarray:
    """(H, W) near-infrared reflectance in [0, 1] for an RGB uint8 chip: high where it is green (canopy), low
    elsewhere; a stressed chip gets a patch of canopy whose NIR falls to a third."""
    r, g = rgb[..., 0].astype(np.float32) / 255, rgb[..., 1].astype(np.float32) / 255
    nir = 0.12 + 0.25 * (r + g) + 1.8 * np.clip(g - r, 0, None)
    nir += rng.normal(0, 0.01, nir.shape).astype(np.float32)
    if stressed:
        size = rgb.shape[0]
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        radius = rng.uniform(0.18, 0.3) * size
        yy, xx = np.mgrid[:size, :size]
        nir[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] *= 0.35
    return np.clip(nir, 0, 1)


def generate_raster_dataset(out_dir, n: int = 2000, size: int = 128, seed: int = 0,
                            prefix: str = "train_") -> pathlib.Path:
    """Write out_dir/train_classes.csv and out_dir/train-tif/<name>.tif (4 bands, uint16, band-separate).
    Chip i depends only on (seed, i), and its visible bands are the JPEG demo's chip i (same seed)."""
    import tifffile  # a pinned dependency; imported here so the JPEG demo never needs it

    if not isinstance(n, int) or n < 1:
        raise ChiptagError(f"number of chips must be an integer >= 1, got {n!r}")
    out = pathlib.Path(out_dir)
    img_dir = out / "train-tif"
    if img_dir.is_dir() and any(p.suffix != ".tif" for p in img_dir.iterdir()):
        raise ChiptagError(f"{img_dir} holds files that are not this dataset's chips: write the demo data into a "
                           "new or empty folder (nothing was written)")
    img_dir.mkdir(parents=True, exist_ok=True)
    for stale in img_dir.glob(f"{prefix}*.tif"):  # a larger earlier set's chips would be unlabelled images
        stale.unlink()
    rows = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        tags = sample_tags(rng)
        rgb = draw_chip(tags, int(size), rng)
        extra = np.random.default_rng([int(seed), i, 1])  # its own stream: the visible bands stay the demo's
        stressed = "primary" in tags and extra.random() < NIR_TAG_P / 0.927  # canopy needed; overall ~NIR_TAG_P
        nir = nir_band(rgb, stressed, extra)
        bgrn = np.stack([rgb[..., 2] / 255, rgb[..., 1] / 255, rgb[..., 0] / 255, nir])
        name = f"{prefix}{i}"
        tifffile.imwrite(img_dir / f"{name}.tif", np.round(bgrn * REFLECTANCE_SCALE).astype(np.uint16),
                         photometric="minisblack", planarconfig="separate")
        rows.append((name, " ".join(tags + [NIR_TAG] if stressed else tags)))
    # written last and atomically: a present CSV means every chip it names is on disk
    write_text(out / "train_classes.csv", "image_name,tags\n" + "".join(f"{a},{t}\n" for a, t in rows))
    return out
