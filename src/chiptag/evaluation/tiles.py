"""Chip tiles for the error sheets: decoded through the one input object (data.inputs), laid out in inches.

A tile is the chip as the model saw it (ImageInput.chip: decoded and resized to the run's image_size in its
data.resize mode), a two-line title above it and its tags below it: black = true and predicted, red "missed" =
true but not predicted, blue "extra" = predicted but not true (a word as well as a colour, so the sheet reads in
greyscale too). A chip that cannot be read becomes a grey tile that says why; a sheet never fails on one image.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from PIL import Image

from chiptag.config import DataConfig
from chiptag.data.images import Preprocessing, read_rgb
from chiptag.data.inputs import ImageInput
from chiptag.data.rasters import composite
from chiptag.runs.layout import RunDir

COLOURS = {"ok": "#202020", "missed": "#c62828", "extra": "#1565c0"}
TILE_IN = 1.9  # tile side in inches: legible tags at 7 pt whatever the chip's pixel size (64 to 256 px and up)
GAP_IN = 0.18
FONT = 7.0
TITLE_FONT = 7.5
WRAP = 34  # characters per tag line at 7 pt across TILE_IN
LINE_IN = FONT * 1.3 / 72
TITLE_IN = 2 * TITLE_FONT * 1.3 / 72 + 0.06
GREY = 0.6


@dataclass(frozen=True)
class Tile:
    image: np.ndarray  # H x W x 3 float in [0, 1]
    title: str  # two lines: the chip's name, then its numbers
    lines: list[tuple[str, str]]  # (text, colour) below the image, already wrapped
    unreadable: str = ""  # why the image is a grey tile ("" when it was read)


def tag_lines(correct: Sequence[str], missed: Sequence[str], extra: Sequence[str]) -> list[tuple[str, str]]:
    """A tile's tag block, wrapped to the tile's width; an empty group is left out."""
    out = []
    for label, group in (("ok", correct), ("missed", missed), ("extra", extra)):
        if group or label == "ok":
            text = textwrap.fill(f"{label}: {', '.join(group) or '-'}", WRAP, subsequent_indent="  ")
            out += [(line, COLOURS[label]) for line in text.splitlines()]
    return out


@dataclass
class TileReader:
    """name -> the chip as the model saw it. Each chip is decoded at most once (sheets share chips) and the
    count is kept, so the work stays bounded by the tiles drawn, not by the size of the test split."""

    image_dir: Path | None
    extension: str
    size: int | None
    problem: str = ""  # why no image can be found at all (no usable config.yaml), "" otherwise
    mode: str = "squash"  # the run's data.resize: a tile is the square the model saw
    bands: tuple[int, ...] | None = None  # a multiband run: the file bands shown as R, G, B (data.bands[:3])
    nodata: float | None = None  # a multiband run's data.nodata and data.fill (fill mean: nodata shows black)
    fill: str = "error"
    decoded: int = 0
    cache: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)
    # The model's input object for size and mode. Its mean/std (ImageNet's) only colour pad's borders: the run's
    # own are in the checkpoint, which a report does not load for this. None: no size known, chips as they are.
    images: ImageInput | None = field(init=False, default=None)

    def __post_init__(self):
        if self.size and self.bands:  # pad borders and filled nodata: 0, the stretch maps them to black
            self.images = ImageInput(Preprocessing(self.size, (0.0,) * 3, (1.0,) * 3, self.mode, self.bands,
                                                   nodata=self.nodata, fill=self.fill))
        elif self.size:
            self.images = ImageInput(Preprocessing(self.size, resize=self.mode))

    @classmethod
    def for_run(cls, run_dir: Path, size: int | None) -> TileReader:
        """Image locations from the run's config.yaml data section (root / images / name + extension), read
        as they were at training time; the data set itself is not re-validated."""
        path = RunDir(run_dir).config
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            data = DataConfig.model_validate(raw.get("data") or {})
        except Exception as exc:  # noqa: BLE001 - every tile says why instead of the report failing
            return cls(None, "", size, f"no image location: {path}: {exc.__class__.__name__}")
        bands = None
        if data.raster:  # an RGB composite: the model's first three bands (one band: grey), file order if unset
            first = list(data.bands or [0, 1, 2])[:3]
            bands = tuple(first if len(first) == 3 else first[:1] * 3)
        return cls(Path(data.root) / data.images, data.extension, size, mode=data.resize, bands=bands,
                   nodata=data.nodata, fill=data.fill)

    def __call__(self, name: str) -> tuple[np.ndarray, str]:
        """-> (H x W x 3 float image in [0, 1], "") or (a grey square, the reason it could not be read)."""
        if name not in self.cache:
            self.cache[name] = self._read(name)
        return self.cache[name]

    def _read(self, name: str) -> tuple[np.ndarray, str]:
        if self.image_dir is None:
            return self._grey(), self.problem
        self.decoded += 1
        try:
            path = self.image_dir / f"{name}{self.extension}"
            img = self.images.chip(path) if self.images is not None else read_rgb(path)
        except Exception as exc:  # noqa: BLE001 - ChiptagError names the file; anything else is shown too
            return self._grey(), str(exc) or exc.__class__.__name__
        arr = img.permute(1, 2, 0).numpy()
        if self.bands:  # raster units -> [0, 1] by a 2-98 percentile stretch per band, as GIS viewers show it
            return composite(img.numpy()), ""
        return (arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.clip(0.0, 1.0)), ""

    def _grey(self) -> np.ndarray:
        side = self.size or 64
        return np.full((side, side, 3), GREY, dtype=np.float32)


def block_size(tiles: Sequence[Tile], ncols: int) -> tuple[float, float, float]:
    """(width, height, row pitch) in inches of a block of tiles, rows spaced for the longest tag block."""
    n_lines = max((len(t.lines) for t in tiles), default=1)
    pitch = TITLE_IN + TILE_IN + n_lines * LINE_IN + GAP_IN
    nrows = max(-(-len(tiles) // ncols), 1)
    return ncols * TILE_IN + (ncols - 1) * GAP_IN, nrows * pitch, pitch


def tile_pixels(image: np.ndarray, side: int) -> np.ndarray:
    """A chip (H x W x 3, float in [0, 1] or uint8) as uint8 pixels whose long side is `side` (aspect kept),
    resized once with PIL's Lanczos filter (it also antialiases when a large chip is shrunk)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    h, w = arr.shape[:2]
    size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
    if size == (w, h):
        return arr
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))


def place_tiles(fig, tiles: Sequence[Tile], origin_in: tuple[float, float], ncols: int) -> None:
    """Draw tiles row by row, the block's top-left corner at origin_in (inches from the figure's top-left).

    No Axes: each chip is resized once to the tile's pixel size at the figure's dpi and drawn 1:1 (figimage, no
    resampling at draw time), its text with fig.text. The figure must be saved at its own dpi."""
    pitch = block_size(tiles, ncols)[2]
    for k, tile in enumerate(tiles):
        row, col = divmod(k, ncols)
        left = origin_in[0] + col * (TILE_IN + GAP_IN)
        top = origin_in[1] + row * pitch + TITLE_IN
        _draw(fig, tile, left, top)


def _draw(fig, tile: Tile, left_in: float, top_in: float) -> None:
    """One tile whose TILE_IN square has its top-left corner at (left_in, top_in) inches from the figure's
    top-left: the chip centred in the square (a non-square chip keeps its aspect), a thin frame around it, the
    title 2 pt above it, the tag lines below it and, on a grey tile, why it is one."""
    from matplotlib.patches import Rectangle

    dpi = fig.dpi
    width, height = fig.get_size_inches() * dpi  # pixels; figure coordinates are pixels / these
    side = round(TILE_IN * dpi)
    pixels = tile_pixels(tile.image, side)
    h, w = pixels.shape[:2]
    x0 = round(left_in * dpi) + (side - w) // 2  # the image's bottom-left pixel, from the figure's bottom-left
    y0 = round(height - top_in * dpi) - side + (side - h) // 2
    fig.figimage(pixels, x0, y0, origin="upper")
    x, bottom, top = x0 / width, y0 / height, (y0 + h) / height
    fig.add_artist(Rectangle((x, bottom), w / width, h / height, transform=fig.transFigure, fill=False,
                             linewidth=0.8, edgecolor="black"))  # as an Axes' spines
    fig.text(x, top + 2 / 72 * dpi / height, tile.title, fontsize=TITLE_FONT, ha="left", va="baseline")
    if tile.unreadable:
        reason = textwrap.fill(tile.unreadable, 30, max_lines=5, placeholder=" ...")
        fig.text(x + w / 2 / width, (bottom + top) / 2, f"unreadable\n{reason}", ha="center", va="center",
                 fontsize=6, color="black")
    for i, (text, colour) in enumerate(tile.lines):
        fig.text(x, bottom - (0.02 * TILE_IN + i * LINE_IN) * dpi / height, text, ha="left", va="top",
                 fontsize=FONT, color=colour)
