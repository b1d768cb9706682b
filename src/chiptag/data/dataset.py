"""A loaded data set: the validated label table and the image path of every row (built by data.validate)."""

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
    left_out: frozenset[str] = frozenset()  # names of rows validation left out (data.on_bad_image=skip)
