"""Label tables: Planet's `image_name,tags` form or one-hot columns -> names, sorted vocabulary, 0/1 matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from chiptag.errors import ChiptagError

LABEL_FILE_NAMES = ("train_v2.csv", "train_classes.csv")


@dataclass
class LabelTable:
    names: list[str]  # image ids, without extension
    tags: list[str]  # sorted vocabulary
    y: np.ndarray  # (N, C) uint8

    def __len__(self) -> int:
        return len(self.names)

    def tag_strings(self) -> list[str]:
        return decode(self.y, self.tags)


def encode(tag_lists: Sequence[Sequence[str]], tags: Sequence[str]) -> np.ndarray:
    index = {t: i for i, t in enumerate(tags)}
    y = np.zeros((len(tag_lists), len(tags)), dtype=np.uint8)
    for row, items in enumerate(tag_lists):
        for t in items:
            if t not in index:
                raise ChiptagError(f"row {row + 2}: tag {t!r} is not in the vocabulary ({', '.join(tags)})")
            y[row, index[t]] = 1
    return y


def decode(y: np.ndarray, tags: Sequence[str]) -> list[str]:
    """0/1 matrix -> space-separated tag strings (Kaggle submission form)."""
    return [" ".join(t for t, on in zip(tags, row) if on) for row in np.asarray(y)]


def find_label_file(root: Path) -> Path:
    for name in LABEL_FILE_NAMES:
        if (root / name).is_file():
            return root / name
    raise ChiptagError(f"no label table in {root}: expected one of {', '.join(LABEL_FILE_NAMES)} "
                       "(or set data.labels)")


def read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ChiptagError(f"label table not found: {path}")
    try:
        # utf-8-sig strips a BOM; dtype=str keeps names like '0001' intact; CRLF is handled by the parser.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ChiptagError(f"{path}: the label table is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ChiptagError(f"{path}: cannot parse as CSV: {str(exc).splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if df.empty:
        raise ChiptagError(f"{path}: the label table has a header but no rows")
    return df


def _check_names(path: Path, names: list[str]) -> None:
    seen: dict[str, int] = {}
    for row, name in enumerate(names, start=2):  # row 1 is the header
        if not name:
            raise ChiptagError(f"{path}, row {row}: empty image name")
        if name in seen:
            raise ChiptagError(f"{path}, row {row}: duplicate image name {name!r} (first at row {seen[name]})")
        seen[name] = row


def _from_tags(path: Path, df: pd.DataFrame, id_col: str, tags_col: str) -> LabelTable:
    names = [s.strip() for s in df[id_col]]
    _check_names(path, names)
    tag_lists = []
    for row, text in enumerate(df[tags_col], start=2):
        items = text.split()
        if not items:
            raise ChiptagError(f"{path}, row {row}: image {names[row - 2]!r} has an empty tag list")
        tag_lists.append(items)
    tags = sorted({t for items in tag_lists for t in items})
    return LabelTable(names, tags, encode(tag_lists, tags))


def onehot_columns(path: Path, df: pd.DataFrame, id_col: str,
                   tag_columns: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """-> (label columns, ignored columns) of a one-hot table. tag_columns (data.tag_columns): exactly those.
    None: the columns whose cells are mostly (at least half) 0/1 — a text or number column is ignored, while a
    tag column with a typo stays a tag column, so its bad cells are reported rather than the tag lost."""
    others = [c for c in df.columns if c != id_col]
    if tag_columns is not None:
        missing = [c for c in tag_columns if c not in df.columns or c == id_col]
        if missing:
            raise ChiptagError(f"{path}: data.tag_columns names column(s) not in the table: "
                               f"{', '.join(map(repr, missing))} (columns: {', '.join(df.columns)})")
        if not tag_columns:
            raise ChiptagError(f"{path}: data.tag_columns is an empty list; name the label columns or use null")
        return list(dict.fromkeys(tag_columns)), [c for c in others if c not in set(tag_columns)]
    labels = [c for c in others if df[c].str.strip().isin(["0", "1"]).mean() >= 0.5]
    if not labels:
        raise ChiptagError(f"{path}: one-hot table has no 0/1 tag columns besides {id_col!r} "
                           f"(columns: {', '.join(df.columns)}); name them with data.tag_columns")
    return labels, [c for c in others if c not in set(labels)]


def _from_onehot(path: Path, df: pd.DataFrame, id_col: str, tag_columns: Sequence[str] | None) -> LabelTable:
    names = [s.strip() for s in df[id_col]]
    _check_names(path, names)
    tag_cols, _ = onehot_columns(path, df, id_col, tag_columns)
    values = df[tag_cols].apply(lambda col: col.str.strip())
    bad = ~values.isin(["0", "1"])
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise ChiptagError(f"{path}, row {r + 2}, column {tag_cols[c]!r}: expected 0 or 1, "
                           f"got {values.iat[r, c]!r}")
    order = sorted(tag_cols)
    y = values[order].to_numpy().astype(np.uint8)
    return LabelTable(names, order, y)


def resolve_format(path: Path, df: pd.DataFrame, fmt: str, id_column: str, tags_column: str,
                   tag_columns: Sequence[str] | None = None) -> str:
    """'auto' -> 'tags' when the tags column is there (and no tag_columns are named), else 'onehot'; checks
    the columns the format needs."""
    if id_column not in df.columns:
        raise ChiptagError(f"{path}: missing id column {id_column!r} (columns: {', '.join(df.columns)})")
    if fmt == "auto":
        fmt = "tags" if tags_column in df.columns and tag_columns is None else "onehot"
    if fmt == "tags" and tags_column not in df.columns:
        raise ChiptagError(f"{path}: missing tags column {tags_column!r} (columns: {', '.join(df.columns)})")
    if fmt == "onehot" and len(df.columns) < 2:
        raise ChiptagError(f"{path}: one-hot table has no tag columns besides {id_column!r}")
    return fmt


def parse_table(path: Path, df: pd.DataFrame, fmt: str, id_column: str = "image_name",
                tags_column: str = "tags", tag_columns: Sequence[str] | None = None) -> LabelTable:
    """A label table from rows of `path` (as read by read_table). fmt: 'tags' (image_name,tags), 'onehot'
    (id + 0/1 columns: `tag_columns`, or found by onehot_columns) or 'auto'. Raises ChiptagError naming the
    file and row of the first bad one."""
    fmt = resolve_format(path, df, fmt, id_column, tags_column, tag_columns)
    if fmt == "tags":
        return _from_tags(path, df, id_column, tags_column)
    return _from_onehot(path, df, id_column, tag_columns)


# A typo is a slip on a few rows of a tag typed right on many. "Few": at most 3 rows or 0.1% of them (Planet's
# rarest real tags, blow_down and conventional_mine, are on 0.24%); "many": at least 10x as many rows. No two
# real Planet tags are one edit apart, so a real rare tag is never named.
TYPO_MAX_ROWS, TYPO_MAX_SHARE, TYPO_RATIO = 3, 0.001, 10


def one_edit_apart(a: str, b: str) -> bool:
    """True when b is a with one character inserted, deleted, replaced, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if len(a) < len(b):
        return a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])


def typo_suspects(table: LabelTable) -> list[tuple[str, str, list[int]]]:
    """-> (rare tag, the common tag one edit away, the table rows carrying the rare one) for every tag that looks
    like a typo of another. Only named (a warning): a real rare tag may sit one edit from a common one."""
    counts = table.y.sum(axis=0)
    few = max(TYPO_MAX_ROWS, int(len(table) * TYPO_MAX_SHARE))
    out = []
    for j, tag in enumerate(table.tags):
        if not 0 < counts[j] <= few:
            continue
        near = [(int(counts[k]), other) for k, other in enumerate(table.tags)
                if counts[k] >= TYPO_RATIO * counts[j] and one_edit_apart(tag, other)]
        if near:
            out.append((tag, max(near)[1], np.flatnonzero(table.y[:, j]).tolist()))
    return out


def align(table: LabelTable, tags: Sequence[str]) -> LabelTable:
    """Re-express a table in another vocabulary (a run's); tags outside it are an error."""
    extra = sorted(set(table.tags) - set(tags))
    if extra:
        raise ChiptagError(f"tags not in the run's vocabulary: {', '.join(extra)}")
    y = np.zeros((len(table), len(tags)), dtype=np.uint8)
    pos = {t: i for i, t in enumerate(tags)}
    for j, t in enumerate(table.tags):
        y[:, pos[t]] = table.y[:, j]
    return LabelTable(list(table.names), list(tags), y)
