"""Pre-flight validation of the label table and every referenced image, before any heavy work.

`preflight(cfg.data)` is what training and evaluation call: it checks everything, collects every problem
(grouped by kind in a Report) and applies `data.on_bad_image`: `error` raises one ChiptagError listing them
all, `skip` returns the dataset without the unusable rows and images. Prediction uses
`chiptag.data.image_check.validate_images(paths)` (no label table there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from chiptag.config import DataConfig
from chiptag.data import labels as labels_mod
from chiptag.data.image_check import check_images
from chiptag.data.rasters import config_reading
from chiptag.data.dataset import Dataset
from chiptag.data.problems import Report
from chiptag.errors import ChiptagError


def _file_notes(path: Path, report: Report) -> None:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        report.add("bom", path, 1)
    crlf = raw.count(b"\r\n")
    if crlf:
        report.add("crlf", path, None, f"{crlf} line(s)")


def _row_keys(path: Path, df: pd.DataFrame, fmt: str, id_col: str, tags_col: str, tag_cols: list[str],
              vocabulary: Sequence[str] | None, report: Report) -> tuple[list[str], list, set[int]]:
    """Per-row checks. Returns (stripped names, a hashable tag key per row, bad row positions)."""
    vocab = set(vocabulary) if vocabulary is not None else None
    names, keys, bad = [], [], set()
    raw_names = df[id_col].tolist()
    cells = df[tags_col].tolist() if fmt == "tags" else df[tag_cols].to_numpy().tolist()
    for i, (raw_name, cell) in enumerate(zip(raw_names, cells)):
        row = i + 2  # the header is row 1
        name = raw_name.strip()
        names.append(name)
        if not name:
            report.add("empty_name", path, row)
            bad.add(i)
        if fmt == "tags":
            items = cell.split()
            stray = raw_name != name or (items and cell != " ".join(items))
            problems = _tags_row(items, vocab)
            keys.append(frozenset(items))
            repeated = sorted({t for t in items if items.count(t) > 1})
            if repeated:
                report.add("repeated_tag", path, row, f"{name!r}: {' '.join(repeated)}")
        else:
            values = [v.strip() for v in cell]
            stray = raw_name != name or any(v != s for v, s in zip(cell, values))
            problems = _onehot_row(values, tag_cols, vocab)
            keys.append(tuple(values))
        if stray:
            report.add("whitespace", path, row, repr(name))
        for kind, detail in problems:
            report.add(kind, path, row, f"{name!r}: {detail}" if detail else repr(name))
            bad.add(i)
    return names, keys, bad


def _tags_row(items: list[str], vocab: set[str] | None) -> list[tuple[str, str]]:
    if not items:
        return [("empty_tags", "")]
    unknown = [t for t in items if vocab is not None and t not in vocab]
    return [("unknown_tag", " ".join(unknown))] if unknown else []


def _onehot_row(values: list[str], cols: list[str], vocab: set[str] | None) -> list[tuple[str, str]]:
    out = [("onehot_value", f"column {c!r}: {v!r}") for c, v in zip(cols, values) if v not in ("0", "1")]
    if not out and "1" not in values:
        out.append(("empty_tags", "every one-hot cell is 0"))
    unknown = [c for c, v in zip(cols, values) if v == "1" and vocab is not None and c not in vocab]
    if unknown:
        out.append(("unknown_tag", " ".join(unknown)))
    return out


def _duplicates(path: Path, names: list[str], keys: list, report: Report) -> tuple[set[int], set[int]]:
    """-> (bad rows: every copy of a conflicting duplicate, repeated rows of identical duplicates: dropped,
    the first copy is kept)."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if n:
            groups.setdefault(n, []).append(i)
    bad: set[int] = set()
    repeats: set[int] = set()
    for name, idx in groups.items():
        if len(idx) == 1:
            continue
        if len({keys[i] for i in idx}) == 1:  # same tags: keeping the first loses nothing
            for i in idx[1:]:
                report.add("duplicate_same", path, i + 2, f"{name!r} first at row {idx[0] + 2}")
                repeats.add(i)
        else:
            rows = ", ".join(str(i + 2) for i in idx)
            for i in idx:
                report.add("duplicate_conflict", path, i + 2, f"{name!r} at rows {rows}")
                bad.add(i)
    return bad, repeats


def _outside(image_dir: Path, path: Path) -> bool:
    """Whether an image path built from a name leaves data.images (`../x`, `/abs/x`). Judged on the text of the
    path, not by resolving links: a symlinked image folder or symlinked chips are fine."""
    base = os.path.normpath(image_dir)
    return os.path.commonpath([base, os.path.normpath(path)]) != base


def _typo_warnings(path: Path, table: labels_mod.LabelTable, keep: list[int], report: Report) -> None:
    """Tags that look like a typo of a common tag, named with both tags and the rows (CSV row numbers)."""
    counts = dict(zip(table.tags, table.y.sum(axis=0).tolist()))
    for rare, common, rows in labels_mod.typo_suspects(table):
        at = [keep[r] + 2 for r in rows]
        listed = ", ".join(map(str, at[:10])) + (" ..." if len(at) > 10 else "")
        report.add("tag_typo", path, at[0], f"{rare!r} on {len(at)} row(s) ({listed}) is one edit from "
                                            f"{common!r} ({counts[common]} rows)")


def _build_table(path: Path, df: pd.DataFrame, keep: list[int], fmt: str, data: DataConfig, tag_cols: list[str],
                 vocabulary: Sequence[str] | None) -> labels_mod.LabelTable:
    sub = df.iloc[keep].reset_index(drop=True)
    if fmt == "onehot" and vocabulary is not None:  # rows with a 1 outside the vocabulary are gone
        tag_cols = [c for c in tag_cols if c in set(vocabulary)]
    table = labels_mod.parse_table(path, sub, fmt, data.id_column, data.tags_column,
                                   tag_cols if fmt == "onehot" else None)
    return labels_mod.align(table, vocabulary) if vocabulary is not None else table


def _label_columns(path: Path, df: pd.DataFrame, fmt: str, data: DataConfig, report: Report) -> list[str]:
    """One-hot: the label columns (data.tag_columns, or the 0/1 ones); the others are named once in a note."""
    if fmt != "onehot":
        return []
    cols, ignored = labels_mod.onehot_columns(path, df, data.id_column, data.tag_columns)
    if ignored:
        report.add("ignored_column", path, 1, ", ".join(map(repr, ignored)))
    return cols


def preflight(data: DataConfig, *, vocabulary: Sequence[str] | None = None) -> tuple[Dataset, Report]:
    """`vocabulary` (a run's tags) for evaluation. -> (usable dataset, report)."""
    root = Path(data.root)
    if not root.is_dir():
        raise ChiptagError(f"data.root: directory not found: {root} (for the demo: chiptag demo-data {root})")
    path = root / data.labels if data.labels else labels_mod.find_label_file(root)
    df = labels_mod.read_table(path)  # missing, empty, unparsable: one clear error each
    fmt = labels_mod.resolve_format(path, df, data.format, data.id_column, data.tags_column, data.tag_columns)
    report = Report(rows=len(df), policy=data.on_bad_image)
    _file_notes(path, report)
    tag_cols = _label_columns(path, df, fmt, data, report)
    names, keys, bad = _row_keys(path, df, fmt, data.id_column, data.tags_column, tag_cols, vocabulary, report)
    conflicts, repeats = _duplicates(path, names, keys, report)
    bad |= conflicts
    image_dir = root / data.images
    if not image_dir.is_dir():
        raise ChiptagError(f"data.images: image folder not found: {image_dir}")
    paths = [image_dir / f"{n}{data.extension}" for n in names]
    outside = {i for i, n in enumerate(names) if n and _outside(image_dir, paths[i])}
    for i in sorted(outside):
        report.add("outside_images", path, i + 2, f"{names[i]!r} -> {os.path.normpath(paths[i])}")
    bad |= outside
    seen: set[str] = set()
    check = [i for i, n in enumerate(names)  # each file once; never one outside data.images
             if n and i not in outside and not (n in seen or seen.add(n))]
    bad_img = check_images([paths[i] for i in check], report, rows=[i + 2 for i in check],
                           max_pixels=data.max_image_pixels, expected_size=data.expected_size,
                           min_side=data.min_side, full=data.full_check,
                           bands=config_reading(data) if data.raster else None)
    bad_img_names = {names[check[j]] for j in bad_img}
    bad |= {i for i, n in enumerate(names) if n in bad_img_names}
    if report.bad and data.on_bad_image == "error":
        raise ChiptagError(report.error_message())
    keep = [i for i in range(len(df)) if i not in bad and i not in repeats]
    if not keep:
        raise ChiptagError(f"no usable rows left in {path} after skipping:\n{report.format()}")
    table = _build_table(path, df, keep, fmt, data, tag_cols, vocabulary)
    if vocabulary is None:  # a run's vocabulary (evaluation) already makes any other tag an error
        _typo_warnings(path, table, keep, report)
    left_out = frozenset(names[i] for i in bad) - set(table.names)
    return Dataset(table, [paths[i] for i in keep], path, image_dir, left_out), report


def load_dataset(data: DataConfig, vocabulary: Sequence[str] | None = None) -> Dataset:
    """The usable dataset of `data`, validated, with `data.on_bad_image` applied."""
    return preflight(data, vocabulary=vocabulary)[0]
