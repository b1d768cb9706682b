"""From the data section of a config to a label table and the image path of every row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chiptag.data.labels import LabelTable


@dataclass
class Dataset:
    table: LabelTable
    paths: list[Path]
    labels_path: Path
    image_dir: Path


def load_dataset(data, vocabulary=None) -> Dataset:
    """`data` is a config.DataConfig. Validates the label table and every image (chiptag.data.validate)
    before any heavy work and applies `data.on_bad_image`."""
    from chiptag.data.validate import preflight  # validate builds on this module's Dataset

    return preflight(data, vocabulary=vocabulary)[0]
