"""`chiptag predict RUN INPUT`: resolve the input chips, predict, write a Kaggle submission.

INPUT is a folder of images (rows in natural name order), a CSV whose first column is `image_name`
(names without extension, e.g. Planet's sample_submission.csv; rows keep the CSV's order), or a plain text
file of names, one a line (a run's `split/test.txt`; any file that is not a .csv). A list's images are
looked up in `--images` folders, in the order given (first match wins); without `--images`, in the
CSV's own folder and, when present, its `test-jpg/` and `test-jpg-additional/` (Planet's layout).

Failed images (missing or unreadable) keep their row with empty tags, so the submission still has every row
Kaggle expects; each is printed on stderr and listed in `<out stem>.errors.csv` (image_name,error), and the
command exits 1 so a script notices.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from chiptag.atomic import replacing
from chiptag.data.image_check import validate_images
from chiptag.data.problems import KINDS
from chiptag.data.split import read_name_list
from chiptag.errors import ChiptagError
from chiptag.inference.predictor import Predictor
from chiptag.progress import console

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
PLANET_TEST_DIRS = ("test-jpg", "test-jpg-additional")
SHOWN_ERRORS = 20  # on stderr; the errors file has all of them


@dataclass
class PredictOptions:
    probabilities: Path | None = None  # also write per-tag probabilities here
    tta: bool = False
    image_dirs: Sequence[Path] = ()  # where a CSV's images are looked up (default: beside it, Planet's layout)
    ext: str | None = None  # image extension (default: common ones)
    batch_size: int = 64
    device: str | torch.device = "auto"  # a torch.device is used as given (the CLI resolved it once)
    num_workers: int | str = "auto"  # decode workers (auto: as feature extraction on this device)
    engine: str = "auto"  # features.backends engines: auto = ONNX Runtime on CPU, eager torch (bf16) on CUDA
    show_progress: bool = True


@dataclass
class Inputs:
    names: list[str]
    paths: list[Path | None]  # None: not found
    missing: dict[int, str] = field(default_factory=dict)


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _index_folder(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """name (no extension) -> path for the image files directly in `folder` (one directory scan, not one
    stat per name: Planet's test set is 61k files)."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for entry in it:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in exts and entry.is_file() and stem not in found:
                found[stem] = Path(entry.path)
    return found


def inputs_from_folder(folder: Path, ext: str | None) -> Inputs:
    exts = (ext.lower(),) if ext else IMAGE_EXTENSIONS
    index = _index_folder(folder, exts)
    if not index:
        raise ChiptagError(f"no images ({', '.join(exts)}) in {folder}")
    names = sorted(index, key=_natural_key)
    return Inputs(names, [index[n] for n in names])


def read_names(csv: Path) -> list[str]:
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ChiptagError(f"{csv}: cannot read as CSV: {str(exc).splitlines()[0]}") from None
    if len(df.columns) == 0 or str(df.columns[0]).strip() != "image_name":
        raise ChiptagError(f"{csv}: the first column must be image_name (got {', '.join(map(str, df.columns))})")
    names = [s.strip() for s in df.iloc[:, 0]]
    for row, name in enumerate(names, start=2):
        if not name:
            raise ChiptagError(f"{csv}, row {row}: empty image_name")
    if not names:
        raise ChiptagError(f"{csv}: no rows")
    return names


def inputs_from_csv(csv: Path, image_dirs: Sequence[Path], ext: str | None) -> Inputs:
    """A CSV of names (first column image_name) or a text file of names, one a line."""
    names = read_names(csv) if csv.suffix.lower() == ".csv" else read_name_list(csv)
    if not image_dirs:
        image_dirs = [csv.parent] + [csv.parent / d for d in PLANET_TEST_DIRS if (csv.parent / d).is_dir()]
    for d in image_dirs:
        if not Path(d).is_dir():
            raise ChiptagError(f"--images: folder not found: {d}")
    index: dict[str, Path] = {}
    for d in image_dirs:
        for name, path in _index_folder(Path(d), (ext.lower(),) if ext else IMAGE_EXTENSIONS).items():
            index.setdefault(name, path)  # the first folder given wins
    paths = [index.get(n) for n in names]
    where = ", ".join(map(str, image_dirs))
    missing = {i: f"image not found in {where}" for i, p in enumerate(paths) if p is None}
    if len(missing) == len(names):
        raise ChiptagError(f"none of the {len(names)} images listed in {csv} was found in {where} "
                           "(point --images at the image folder(s); --ext if they are not .jpg/.png/...)")
    return Inputs(names, paths, missing)


def resolve_inputs(source: Path, image_dirs: Sequence[Path], ext: str | None) -> Inputs:
    if ext and not ext.startswith("."):
        ext = "." + ext
    if source.is_dir():
        return inputs_from_folder(source, ext)
    if source.is_file():
        return inputs_from_csv(source, image_dirs, ext)
    raise ChiptagError(f"input not found: {source} (give an image folder, a CSV or a text file of image names)")


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with replacing(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.7f")


def errors_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.errors.csv")


def _prevalidate(found: list[int], paths: list, predictor: Predictor) -> tuple[list[int], dict[int, str]]:
    """Header-level checks before any decode (chiptag.data.image_check): truncated, empty, unreadable files and
    images over the run's pixel cap (data.max_image_pixels, from the checkpoint) become error rows instead of
    reaching the decoder; a multiband model's rasters are read as the model reads them (its bands, band count
    and nodata policy). Sizes are not judged here: the model resizes every chip.
    -> (indices still to predict, {index: reason})."""
    pre = predictor.preprocessing
    report, usable = validate_images([paths[i] for i in found], max_pixels=predictor.max_pixels, check_size=False,
                                     bands=pre.reading() if pre.bands is not None else None)
    if report.converted:
        console.print("converted to RGB: " + ", ".join(f"{m} {n}" for m, n in sorted(report.converted.items())))
    multi = report.by_kind().get("multi_frame", [])
    if multi:  # animated GIF/WebP, multi-page TIFF: predicted from the first frame, as training reads them
        console.print(f"first frame used for {len(multi)} multi-frame image(s), e.g. {Path(multi[0].file).name} "
                      f"({multi[0].detail})")
    at = {str(paths[i]): i for i in found}
    bad = {at[p.file]: KINDS[p.kind][1] + (f" ({p.detail})" if p.detail else "") for p in report.bad}
    return [found[j] for j in usable], bad


def run_predict(run: Path, source: Path, out: Path, opts: PredictOptions | None = None) -> dict:
    """Predict every input chip and write the submission (and optionally the probabilities). Returns counts."""
    opts = opts or PredictOptions()
    t0 = time.perf_counter()
    predictor = Predictor.from_run(run, device=opts.device, engine=opts.engine)
    inputs = resolve_inputs(Path(source), [Path(d) for d in opts.image_dirs], opts.ext)
    found, checked = _prevalidate([i for i, p in enumerate(inputs.paths) if p is not None], inputs.paths,
                                   predictor)
    errors: dict[int, str] = {}
    probs = np.full((len(inputs.names), len(predictor.tags)), np.nan, dtype=np.float32)
    probs[found] = predictor.predict([inputs.paths[i] for i in found], tta=opts.tta, batch_size=opts.batch_size,
                                     num_workers=opts.num_workers, errors=errors,
                                     show_progress=opts.show_progress)
    errors = {**inputs.missing, **checked, **{found[i]: m for i, m in errors.items()}}
    _write_csv(pd.DataFrame({"image_name": inputs.names, "tags": predictor.tag_strings(probs)}), out)
    if opts.probabilities is not None:
        table = pd.DataFrame(probs, columns=predictor.tags)
        table.insert(0, "image_name", inputs.names)
        _write_csv(table, opts.probabilities)
    err_file = errors_path(out)
    if errors:
        rows = sorted(errors)
        _write_csv(pd.DataFrame({"image_name": [inputs.names[i] for i in rows],
                                 "error": [errors[i] for i in rows]}), err_file)
        for i in rows[:SHOWN_ERRORS]:
            console.print(f"[red]failed:[/] {inputs.names[i]}: {errors[i]}", highlight=False, soft_wrap=True)
        if len(rows) > SHOWN_ERRORS:
            console.print(f"... and {len(rows) - SHOWN_ERRORS} more", highlight=False)
    elif err_file.is_file():
        err_file.unlink()  # a stale list from an earlier run would describe a different submission
    return {"rows": len(inputs.names), "errors": len(errors), "errors_file": str(err_file) if errors else None,
            "tta": opts.tta, "seconds": time.perf_counter() - t0}
