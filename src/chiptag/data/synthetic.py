"""Procedural Planet-style chips in the exact Kaggle layout: the embedded demo data and test fixtures.

Each tag paints a signature that is distinctive in colour and coarse texture and large enough to
move global image statistics, because the demo learns from a frozen, randomly initialised CNN
whose pooled features see little more than that.
"""

from __future__ import annotations

import pathlib
import re
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from chiptag.atomic import write_text
from chiptag.errors import ChiptagError

# Fraction of real Kaggle training chips carrying each tag.
TAG_FREQUENCIES: dict[str, float] = {
    "primary": 0.927, "clear": 0.702, "agriculture": 0.304, "road": 0.199, "water": 0.183,
    "partly_cloudy": 0.179, "cultivation": 0.111, "habitation": 0.090, "haze": 0.067,
    "cloudy": 0.052, "bare_ground": 0.021, "selective_logging": 0.008, "artisinal_mine": 0.008,
    "blooming": 0.008, "slash_burn": 0.005, "conventional_mine": 0.0025, "blow_down": 0.0024,
}
PLANET_TAGS: tuple[str, ...] = tuple(sorted(TAG_FREQUENCIES))
WEATHER_TAGS: tuple[str, ...] = ("clear", "cloudy", "haze", "partly_cloudy")
LAND_TAGS: tuple[str, ...] = tuple(
    sorted((t for t in TAG_FREQUENCIES if t not in WEATHER_TAGS), key=lambda t: -TAG_FREQUENCIES[t]))

_WEATHER_P = np.array([TAG_FREQUENCIES[t] for t in WEATHER_TAGS])
_WEATHER_P /= _WEATHER_P.sum()
# Cloudy chips carry no land tags, so land tags are conditioned on "not cloudy" to keep marginals.
_LAND_P = {t: TAG_FREQUENCIES[t] / (1.0 - TAG_FREQUENCIES["cloudy"]) for t in LAND_TAGS}
# Habitation mostly comes with road (as in the real data); road's other branch keeps its marginal.
_ROAD_GIVEN_HAB = 0.8
_P_HAB = _LAND_P["habitation"]
_ROAD_GIVEN_NO_HAB = (_LAND_P["road"] - _ROAD_GIVEN_HAB * _P_HAB) / (1 - _P_HAB)


def sample_tags(rng: np.random.Generator) -> list[str]:
    """One chip's tags: exactly one weather tag first, then land tags in frequency order."""
    weather = WEATHER_TAGS[int(rng.choice(len(WEATHER_TAGS), p=_WEATHER_P))]
    draws = rng.random(len(LAND_TAGS))  # always drawn, so the rng stream does not depend on weather
    if weather == "cloudy":
        return [weather]
    chosen = {t for t, u in zip(LAND_TAGS, draws) if t != "road" and u < _LAND_P[t]}
    p_road = _ROAD_GIVEN_HAB if "habitation" in chosen else _ROAD_GIVEN_NO_HAB
    if draws[LAND_TAGS.index("road")] < p_road:
        chosen.add("road")
    return [weather] + [t for t in LAND_TAGS if t in chosen]


class _Canvas:
    """Float image in [0, 1] plus broadcastable normalised coordinates and shared noise fields."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng = size, rng
        self.img = np.zeros((size, size, 3), np.float32)
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.yy, self.xx = axis[:, None], axis[None, :]
        # One warp field and one fine texture per chip, shared by all painters, keeps chips cheap.
        self.warp = _noise(rng, size, 6)
        self.fine = _noise(rng, size, max(4, size // 3))

    def color(self, rgb, spread: float = 0.04) -> np.ndarray:
        return np.clip(np.asarray(rgb) + self.rng.normal(0, spread, 3), 0, 1).astype(np.float32)

    def textured(self, rgb, amount: float = 0.3) -> np.ndarray:
        """A colour modulated by the fine texture, so areas are not flat."""
        return self.color(rgb)[None, None, :] * (1 - amount / 2 + amount * self.fine)[..., None]

    def paint(self, mask: np.ndarray, rgb) -> None:
        self.img += (np.asarray(rgb, np.float32) - self.img) * mask[..., None]

    def blob(self, cy: float, cx: float, r: float, edge: float = 0.25, warp: float = 0.5) -> np.ndarray:
        """Soft irregular disc; the shared warp field is rolled so blobs differ in shape."""
        shift = self.rng.integers(0, self.size, 2)
        w = np.roll(self.warp, tuple(shift), axis=(0, 1))
        d = np.hypot(self.yy - cy, self.xx - cx) / r + warp * (w - 0.5)
        return np.clip((1.0 - d) / edge, 0.0, 1.0)

    def line(self, cy: float, cx: float, angle: float, width_px: float) -> np.ndarray:
        """Antialiased infinite straight line through (cy, cx), width in pixels."""
        dist = np.abs((self.xx - cx) * np.sin(angle) - (self.yy - cy) * np.cos(angle)) * self.size
        return np.clip(width_px / 2 + 0.5 - dist, 0.0, 1.0)

    def px(self, base: float) -> float:
        """A pixel length given for 128 px chips, scaled to this chip size."""
        return max(1.0, base * self.size / 128)


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: a random grid upsampled with smoothstep bilinear weights."""
    # The grid wraps around, so the field tiles and np.roll on it leaves no seams.
    grid = np.pad(rng.random((cells, cells), dtype=np.float32), ((0, 1), (0, 1)), mode="wrap")
    t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
    i = t.astype(np.intp)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _background(c: _Canvas, forest: bool) -> None:
    coarse = _noise(c.rng, c.size, 4)[..., None]
    if forest:  # dark green canopy with crown-scale texture
        base = c.color((0.16, 0.30, 0.14), 0.02)
        c.img[:] = base * (0.55 + 0.7 * c.fine[..., None]) * (0.85 + 0.3 * coarse)
    else:  # savanna: tan/olive, smoother
        base = c.color((0.58, 0.53, 0.34), 0.05)
        c.img[:] = base * (0.8 + 0.25 * coarse + 0.1 * c.fine[..., None])


def _agriculture(c: _Canvas) -> None:
    angle = c.rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    for _ in range(c.rng.integers(3, 6)):
        cy, cx = c.rng.uniform(0.1, 0.9, 2)
        hw, hh = c.rng.uniform(0.1, 0.25, 2)
        u = (c.xx - cx) * ca + (c.yy - cy) * sa
        v = (c.yy - cy) * ca - (c.xx - cx) * sa
        mask = ((np.abs(u) < hw) & (np.abs(v) < hh)).astype(np.float32)
        rgb = (0.56, 0.68, 0.34) if c.rng.random() < 0.6 else (0.76, 0.66, 0.46)
        rows = 0.92 + 0.08 * np.sin(v * c.size * 1.5)  # crop rows: a regular fine texture
        c.paint(mask, c.color(rgb)[None, None, :] * rows[..., None])


def _patches(c: _Canvas, count: tuple[int, int], radius: tuple[float, float], rgb) -> None:
    for _ in range(c.rng.integers(*count)):
        cy, cx = c.rng.uniform(0.1, 0.9, 2)
        c.paint(c.blob(cy, cx, c.rng.uniform(*radius)), c.textured(rgb, 0.4))


def _conventional_mine(c: _Canvas) -> None:
    cy, cx = c.rng.uniform(0.3, 0.7, 2)
    r = c.rng.uniform(0.25, 0.32)
    terraces = 0.5 + 0.5 * np.sin(np.hypot(c.yy - cy, c.xx - cx) * c.size * 0.6)
    grey, ochre = c.color((0.62, 0.60, 0.58)), c.color((0.78, 0.56, 0.30))
    c.paint(c.blob(cy, cx, r, warp=0.3), grey + (ochre - grey) * terraces[..., None])


def _water(c: _Canvas) -> None:
    rgb = (0.13, 0.27, 0.55)
    if c.rng.random() < 0.3:  # lake
        mask = c.blob(*c.rng.uniform(0.25, 0.75, 2), c.rng.uniform(0.18, 0.3), edge=0.1)
    else:  # meandering river crossing the chip
        along, across = (c.xx, c.yy) if c.rng.random() < 0.5 else (c.yy, c.xx)
        centre = c.rng.uniform(0.3, 0.7) + c.rng.uniform(0.05, 0.2) * np.sin(
            2 * np.pi * c.rng.uniform(0.4, 1.2) * along + c.rng.uniform(0, 2 * np.pi))
        half = c.rng.uniform(0.07, 0.12)
        mask = np.clip((half - np.abs(across - centre)) * c.size / 2, 0, 1)
    c.paint(mask, c.textured(rgb, 0.15))


def _road(c: _Canvas) -> None:
    for _ in range(c.rng.integers(2, 5)):
        mask = c.line(*c.rng.uniform(0.15, 0.85, 2), c.rng.uniform(0, np.pi), c.px(c.rng.uniform(2, 4)))
        c.paint(mask, c.color((0.82, 0.78, 0.70)))


def _habitation(c: _Canvas) -> None:
    for _ in range(c.rng.integers(2, 4)):
        cy, cx = c.rng.uniform(0.15, 0.85, 2)
        for _ in range(c.rng.integers(10, 22)):  # per block, not per pixel
            y, x = (np.array([cy, cx]) + c.rng.normal(0, 0.07, 2)) * c.size
            h, w = (c.rng.integers(2, 6, 2) * c.size / 128).astype(int) + 1
            y0, x0 = int(np.clip(y, 0, c.size - h)), int(np.clip(x, 0, c.size - w))
            rgb = (0.95, 0.94, 0.92) if c.rng.random() < 0.6 else (0.80, 0.32, 0.25)
            c.img[y0:y0 + h, x0:x0 + w] = c.color(rgb)


def _selective_logging(c: _Canvas) -> None:
    for _ in range(c.rng.integers(4, 8)):
        cy, cx = c.rng.uniform(0.1, 0.9, 2)
        seg = c.blob(cy, cx, c.rng.uniform(0.15, 0.3), edge=0.05, warp=0.0)  # limits the track length
        c.paint(c.line(cy, cx, c.rng.uniform(0, np.pi), c.px(1.5)) * seg, c.color((0.52, 0.38, 0.24)))
        c.paint(c.blob(cy, cx, 0.03, edge=0.3), c.color((0.45, 0.40, 0.22)))  # log landing


def _artisinal_mine(c: _Canvas) -> None:
    # A thin muddy stream with orange pits strung along it, as in real garimpo chips.
    cy, angle = c.rng.uniform(0.3, 0.7), c.rng.uniform(-0.5, 0.5)
    c.paint(c.line(cy, 0.5, angle, c.px(3)), c.color((0.45, 0.42, 0.35)))
    for _ in range(c.rng.integers(6, 12)):
        t = c.rng.uniform(-0.45, 0.45)
        py, px = cy + t * np.sin(angle) + c.rng.normal(0, 0.04), 0.5 + t * np.cos(angle)
        c.paint(c.blob(py, px, c.rng.uniform(0.03, 0.06), edge=0.4), c.textured((0.88, 0.56, 0.24), 0.3))


def _blooming(c: _Canvas) -> None:
    region = c.blob(*c.rng.uniform(0.3, 0.7, 2), c.rng.uniform(0.3, 0.45))
    half = max(1, c.size // 64)  # 2 px speckles at 128 px
    spots = c.rng.random((c.size // half + 1,) * 2) < 0.12
    spots = np.repeat(np.repeat(spots, half, 0), half, 1)[:c.size, :c.size]
    rgb = (0.97, 0.88, 0.30) if c.rng.random() < 0.6 else (0.93, 0.55, 0.75)
    c.paint(region * spots, c.color(rgb))


def _slash_burn(c: _Canvas) -> None:
    for _ in range(c.rng.integers(1, 4)):
        cy, cx = c.rng.uniform(0.2, 0.8, 2)
        c.paint(c.blob(cy, cx, c.rng.uniform(0.08, 0.15)), c.textured((0.12, 0.10, 0.09), 0.5))
        c.paint(0.45 * c.blob(cy - 0.1, cx + 0.05, 0.22, edge=1.0), c.color((0.70, 0.70, 0.72)))  # smoke


def _blow_down(c: _Canvas) -> None:
    cy, cx = c.rng.uniform(0.3, 0.7, 2)
    angle = c.rng.uniform(0, np.pi)
    across = (c.xx - cx) * np.cos(angle) + (c.yy - cy) * np.sin(angle)
    streaks = (0.75 + 0.25 * np.sin(across * c.size * 1.2))[..., None]  # trees felled in one direction
    c.paint(c.blob(cy, cx, c.rng.uniform(0.2, 0.3)), c.color((0.48, 0.66, 0.30))[None, None, :] * streaks)


def _haze(c: _Canvas) -> None:
    alpha = c.rng.uniform(0.4, 0.55) * (0.9 + 0.2 * c.warp)  # nearly uniform veil
    c.paint(alpha, c.color((0.76, 0.79, 0.86), 0.02))


def _partly_cloudy(c: _Canvas) -> None:
    for _ in range(c.rng.integers(2, 5)):
        cy, cx = c.rng.uniform(0, 1, 2)
        mask = c.blob(cy, cx, c.rng.uniform(0.15, 0.3), edge=0.6, warp=0.8)
        c.paint(0.5 * c.blob(cy + 0.08, cx + 0.08, 0.2, edge=0.6), np.zeros(3))  # cloud shadow
        c.paint(mask, c.textured((0.95, 0.95, 0.96), 0.1))


def _cloudy(c: _Canvas) -> None:
    shade = (0.78 + 0.2 * _noise(c.rng, c.size, 5))[..., None]
    c.paint(np.full((c.size, c.size), c.rng.uniform(0.88, 1.0), np.float32),
            c.color((0.9, 0.9, 0.92), 0.03) * shade * (0.95 + 0.1 * c.fine[..., None]))


# Painting order: ground cover first, thin structures over it, weather last.
_PAINTERS: dict[str, Callable[[_Canvas], None]] = {
    "agriculture": _agriculture, "conventional_mine": _conventional_mine,
    "bare_ground": lambda c: _patches(c, (1, 4), (0.15, 0.25), (0.80, 0.67, 0.50)),
    "cultivation": lambda c: _patches(c, (4, 9), (0.07, 0.13), (0.55, 0.38, 0.22)),
    "blow_down": _blow_down, "slash_burn": _slash_burn, "selective_logging": _selective_logging,
    "blooming": _blooming, "water": _water, "artisinal_mine": _artisinal_mine,
    "road": _road, "habitation": _habitation,
    "haze": _haze, "partly_cloudy": _partly_cloudy, "cloudy": _cloudy, "clear": lambda c: None,
}


def draw_chip(tags: Iterable[str], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one size x size RGB uint8 chip showing every tag in `tags`."""
    tagset = set(tags)
    unknown = tagset - set(PLANET_TAGS)
    if unknown:
        raise ChiptagError(f"unknown tag(s) for a synthetic chip: {', '.join(sorted(unknown))}")
    _check_int("chip size", size, 16, 1024)
    c = _Canvas(size, rng)
    _background(c, forest="primary" in tagset)
    for tag, painter in _PAINTERS.items():
        if tag in tagset:
            painter(c)
    # Per-chip sensor jitter (gain, offset) and pixel noise, so no tag maps to a constant image.
    img = c.img * rng.normal(1.0, 0.05, 3).astype(np.float32) + np.float32(rng.normal(0, 0.02))
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _check_int(what: str, value, lo: int, hi: float = float("inf")) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        bounds = f"in {lo}..{hi}" if hi != float("inf") else f">= {lo}"
        raise ChiptagError(f"{what} must be an integer {bounds}, got {value!r}")


def _clear_earlier_chips(img_dir: pathlib.Path, n: int, prefix: str) -> None:
    """Writing into a folder written before: the chips of an earlier, larger dataset (<prefix><i>.jpg, i >= n)
    are removed, so the folder holds exactly the new table's images (a stale chip is an unlabelled image there).
    A file this generator does not write is never touched: its presence is an error, before anything is written."""
    if not img_dir.is_dir():
        return
    ours = re.compile(rf"{re.escape(prefix)}(\d+)\.jpg")
    stale, foreign = [], []
    for path in img_dir.iterdir():
        match = ours.fullmatch(path.name)
        if match and path.is_file():
            if int(match.group(1)) >= n:
                stale.append(path)
        else:
            foreign.append(path.name)
    if foreign:
        raise ChiptagError(f"{img_dir} holds {len(foreign)} file(s) that are not this dataset's chips "
                           f"({prefix}<i>.jpg), e.g. {sorted(foreign)[0]}: write the demo data into a new or empty "
                           "folder (nothing was written)")
    for path in stale:
        path.unlink()


def generate_dataset(out_dir, n: int = 2000, size: int = 128, seed: int = 0,
                     prefix: str = "train_", quality: int = 92) -> pathlib.Path:
    """Write a Kaggle-layout dataset: out_dir/train_classes.csv and out_dir/train-jpg/<name>.jpg.

    Chip i depends only on (seed, i), so a k-chip dataset is a prefix of any larger one.
    """
    _check_int("number of chips", n, 1)
    _check_int("chip size", size, 16, 1024)
    _check_int("seed", seed, 0)
    _check_int("JPEG quality", quality, 1, 100)
    if not isinstance(prefix, str) or any(ch in prefix for ch in "/\\, \t\n"):
        raise ChiptagError(f"image name prefix must not contain separators or spaces, got {prefix!r}")
    out = pathlib.Path(out_dir)
    img_dir = out / "train-jpg"
    _clear_earlier_chips(img_dir, int(n), prefix)
    try:
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChiptagError(f"cannot create dataset directory {img_dir}: {exc}") from exc
    rows = []
    for i in range(int(n)):
        rng = np.random.default_rng([int(seed), i])
        tags = sample_tags(rng)
        name = f"{prefix}{i}"
        Image.fromarray(draw_chip(tags, int(size), rng)).save(
            img_dir / f"{name}.jpg", "JPEG", quality=int(quality))
        rows.append((name, " ".join(tags)))
    # Written last and atomically: a present CSV means every image it names is already on disk. Names and
    # tags hold no commas or quotes (the prefix is checked above), so plain joins are valid CSV.
    write_text(out / "train_classes.csv", "image_name,tags\n" + "".join(f"{n},{t}\n" for n, t in rows))
    return out
