"""From the data section of a config to a label table and the image path of every row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chiptag.data.images import image_paths
from chiptag.data.labels import LabelTable, find_label_file, read_labels
from chiptag.errors import ChiptagError


@dataclass
class Dataset:
    table: LabelTable
    paths: list[Path]
    labels_path: Path
    image_dir: Path


def load_dataset(data) -> Dataset:
    """`data` is a config.DataConfig. Checks that every labelled image exists before any heavy work."""
    root = Path(data.root)
    if not root.is_dir():
        raise ChiptagError(f"data.root: directory not found: {root} (for the demo: chiptag demo-data {root})")
    labels_path = root / data.labels if data.labels else find_label_file(root)
    table = read_labels(labels_path, format=data.format, id_column=data.id_column,
                        tags_column=data.tags_column)
    image_dir = root / data.images
    if not image_dir.is_dir():
        raise ChiptagError(f"data.images: image folder not found: {image_dir}")
    paths = image_paths(image_dir, table.names, data.extension)
    missing = [(row, p) for row, p in enumerate(paths, start=2) if not p.is_file()]
    if missing:
        shown = "; ".join(f"row {r}: {p}" for r, p in missing[:5])
        raise ChiptagError(f"{len(missing)} image(s) listed in {labels_path} are missing from {image_dir} "
                           f"(first: {shown})")
    return Dataset(table, paths, labels_path, image_dir)
