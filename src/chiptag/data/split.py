"""Seeded train/val/test split by iterative stratification, so rare tags land in every split."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

from chiptag.atomic import write_text
from chiptag.config import DataConfig
from chiptag.data.dataset import Dataset
from chiptag.errors import ChiptagError
from chiptag.progress import console

SPLITS = ("train", "val", "test")


def split_indices(y: np.ndarray, train: float = 0.7, val: float = 0.15, test: float = 0.15,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Return sorted index arrays per split. Two stratified cuts: test off the whole, then val off the rest."""
    n = len(y)
    if n < 3:
        raise ChiptagError(f"need at least 3 labelled images to make train/val/test splits (got {n})")
    if abs(train + val + test - 1.0) > 1e-6:
        raise ChiptagError(f"split fractions must sum to 1 (got {train + val + test:g})")
    x = np.zeros((n, 1))
    first = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=test, random_state=seed)
    rest, test_idx = next(first.split(x, y))
    second = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val / (train + val), random_state=seed + 1)
    tr, va = next(second.split(x[rest], y[rest]))
    out = {"train": np.sort(rest[tr]), "val": np.sort(rest[va]), "test": np.sort(test_idx)}
    for name, idx in out.items():
        if len(idx) == 0:
            raise ChiptagError(f"split '{name}' is empty with {n} images; use more data or larger fractions")
    return out


def save_split(names: list[str], splits: dict[str, np.ndarray], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, idx in splits.items():
        write_text(out_dir / f"{name}.txt", "".join(names[i] + "\n" for i in idx))  # resume reads these


def load_split(names: list[str], split_dir: Path) -> dict[str, np.ndarray]:
    pos = {n: i for i, n in enumerate(names)}
    out = {}
    for name in SPLITS:
        path = split_dir / f"{name}.txt"
        if not path.is_file():
            raise ChiptagError(f"split list missing: {path}")
        items = [s for s in path.read_text(encoding="utf-8").splitlines() if s]
        missing = [s for s in items if s not in pos]
        if missing:
            raise ChiptagError(f"{path}: {len(missing)} image(s) not in the label table, e.g. {missing[0]!r}")
        out[name] = np.array([pos[s] for s in items], dtype=np.int64)
    return out


def read_name_list(path: Path) -> list[str]:
    """Image names from a text file (one a line; blank lines ignored) or a CSV (its first column, after the
    header). Used for given splits and by `chiptag predict`."""
    if not path.is_file():
        raise ChiptagError(f"name list not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChiptagError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))[1:]  # after the header
        lines = [r[0].strip() if r else "" for r in rows]
    else:
        lines = [s.strip() for s in text.splitlines()]
    names = [s for s in lines if s]
    if not names:
        raise ChiptagError(f"{path}: no image names in it")
    return names


OVERLAP_NAMES_SHOWN = 50  # per pair of lists: a real set had five; thousands would drown the message


def _check_no_overlap(listed: dict[str, list[str]], files: dict[str, Path]) -> None:
    """Every name listed in two split lists, counted per pair of lists, in one error (not just the first)."""
    problems, overlapping = [], set()
    for i, a in enumerate(SPLITS):
        seen = set(listed[a])
        for b in SPLITS[i + 1:]:
            shared = list(dict.fromkeys(n for n in listed[b] if n in seen))  # in list order, once each
            if not shared:
                continue
            overlapping.update(shared)
            shown = ", ".join(repr(n) for n in shared[:OVERLAP_NAMES_SHOWN])
            more = f" and {len(shared) - OVERLAP_NAMES_SHOWN} more" if len(shared) > OVERLAP_NAMES_SHOWN else ""
            problems.append(f"{len(shared)} in both {files[a]} ({a}) and {files[b]} ({b}): {shown}{more}")
    if problems:
        raise ChiptagError(f"the split lists must not overlap: {len(overlapping)} name(s) are in more than one list; "
                           + "; ".join(problems))


def _examples(missing: list[str]) -> str:
    return "e.g. " + ", ".join(repr(m) for m in missing[:3]) + (" ..." if len(missing) > 3 else "")


def given_split(names: list[str], left_out: frozenset[str], files: dict[str, Path],
                extension: str = "") -> dict[str, np.ndarray]:
    """The dataset's own split (data.split.files): each list's names -> row indices, exactly as listed.

    Names the label table lacks, and names in two lists, are errors; names validation left out (on_bad_image
    skip) are dropped from their list and counted."""
    pos = {n: i for i, n in enumerate(names)}
    listed = {}
    for split in SPLITS:
        listed[split] = [n[: -len(extension)] if n not in pos and extension and n.endswith(extension) else n
                         for n in read_name_list(files[split])]  # a list of file names rather than ids
    _check_no_overlap(listed, files)
    out, dropped = {}, 0
    for split in SPLITS:
        path = files[split]
        idx, missing = [], []
        for name in listed[split]:
            if name in left_out:
                dropped += 1
                continue
            if name in pos:
                idx.append(pos[name])
            else:
                missing.append(name)
        if missing:
            raise ChiptagError(f"{path}: {len(missing)} name(s) not in the label table "
                               f"({_examples(missing)})")
        if not idx:
            raise ChiptagError(f"{path}: no usable image in the {split} list")
        out[split] = np.array(sorted(set(idx)), dtype=np.int64)
    unused = len(names) - sum(len(v) for v in out.values())
    if dropped or unused:
        console.print(f"given split: {dropped} listed image(s) left out by validation, {unused} labelled "
                      "image(s) in no list (not used)")
    return out


def make_split(data: DataConfig, ds: Dataset) -> dict[str, np.ndarray]:
    """The run's split: data.split.files when given (paths relative to data.root), else a stratified draw."""
    sp = data.split
    if sp.files is None:
        return split_indices(ds.table.y, sp.train, sp.val, sp.test, seed=sp.seed)
    files = {s: Path(data.root) / getattr(sp.files, s) for s in SPLITS}
    return given_split(ds.table.names, ds.left_out, files, data.extension)


def untrained_tags(y: np.ndarray, train_rows: np.ndarray, tags: list[str]) -> list[str]:
    """Tags with no positive among the rows a model trains on: it cannot learn them, so their per-class figures
    are undefined (evaluation.metrics reports them as None, `n/a`)."""
    return [t for t, n in zip(tags, np.asarray(y)[np.asarray(train_rows, dtype=np.int64)].sum(axis=0)) if n == 0]


def untrained_warning(y: np.ndarray, splits: dict[str, np.ndarray], untrained: list[str], tags: list[str],
                      trained_on: tuple[str, ...] = ("train",)) -> str:
    """The warning train and validate print for `untrained` tags, with where their rows went."""
    col = {t: j for j, t in enumerate(tags)}
    where = []
    for t in untrained:
        counts = [f"{int(y[splits[s], col[t]].sum())} {s}" for s in SPLITS if s not in trained_on]
        where.append(f"{t} ({', '.join(counts)})")
    return (f"{len(untrained)} tag(s) with no positive in the training rows ({' + '.join(trained_on)}): "
            f"{'; '.join(where)}. The model cannot learn them; their per-class figures are reported as n/a. "
            "Add examples, or drop the tag from the label table.")


def check_plan(data: DataConfig, ds: Dataset, folds: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """The checks `train` runs on validated data before it trains, for `chiptag validate`: the split (given lists
    or a stratified draw: too few rows, an empty split and bad lists are errors) and, with training.folds, the
    k-fold cut; -> (splits, warnings: tags the training rows have no positive of)."""
    splits = make_split(data, ds)
    trained_on: tuple[str, ...] = ("train",)
    if folds:
        pool = np.concatenate([splits["train"], splits["val"]])
        fold_indices(ds.table.y, pool, folds, seed=data.split.seed)
        trained_on = ("train", "val")  # k-fold: the heads together train on every non-test row
    rows = np.concatenate([splits[s] for s in trained_on])
    untrained = untrained_tags(ds.table.y, rows, ds.table.tags)
    return splits, [untrained_warning(ds.table.y, splits, untrained, ds.table.tags, trained_on)] if untrained else []


def fold_indices(y: np.ndarray, pool: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """`pool` (indices into y: every non-test image) cut into k iterative-stratified folds -> k sorted index
    arrays into y, disjoint, covering pool. Fold i validates model i; the other folds train it."""
    pool = np.sort(np.asarray(pool, dtype=np.int64))
    if k < 2:
        raise ChiptagError(f"k-fold needs at least 2 folds (got {k})")
    if len(pool) < k:
        raise ChiptagError(f"cannot cut {len(pool)} non-test images into {k} folds; use fewer folds")
    kf = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [np.sort(pool[va]) for _, va in kf.split(np.zeros((len(pool), 1)), y[pool])]
    for i, f in enumerate(folds):
        if len(f) == 0:
            raise ChiptagError(f"fold {i + 1} of {k} is empty with {len(pool)} non-test images; use fewer folds")
    return folds


def save_folds(names: list[str], folds: list[np.ndarray], path: Path) -> None:
    """One line per non-test image: `name,fold` (fold 1..K), what --resume reads back."""
    rows = sorted((int(i), k + 1) for k, f in enumerate(folds) for i in f)
    write_text(path, "image_name,fold\n" + "".join(f"{names[i]},{k}\n" for i, k in rows))


def load_folds(names: list[str], path: Path) -> list[np.ndarray]:
    if not path.is_file():
        raise ChiptagError(f"fold list missing: {path}")
    pos = {n: i for i, n in enumerate(names)}
    by_fold: dict[int, list[int]] = {}
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], start=2):
        name, _, fold = line.rpartition(",")
        if name not in pos or not fold.isdigit():
            raise ChiptagError(f"{path} row {row}: {line!r} is not an image of the label table with a fold number")
        by_fold.setdefault(int(fold), []).append(pos[name])
    return [np.sort(np.array(by_fold[k], dtype=np.int64)) for k in sorted(by_fold)]
