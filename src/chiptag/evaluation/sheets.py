"""The report's error sheets, for the test split: top_errors.png (the chips with the largest loss),
per_tag/<tag>.png (a tag's most confident false positives beside its most missed false negatives) and
cooccurrence.png (tag co-occurrence of the truth beside the prediction's).

Inputs are what training leaves in the run dir: eval_probs.npz (test probabilities, targets, names),
summary.json (tags, thresholds, image_size) and config.yaml (where the images are). Work is bounded by the tiles
drawn — at most top_errors + 2 × tag_tiles per tag sheet chips are decoded — not by the size of the test split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from chiptag.atomic import replacing
from chiptag.config import ReportConfig
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics, mistakes
from chiptag.evaluation.label_rules import LabelRules
from chiptag.evaluation.tiles import COLOURS, GAP_IN, TITLE_IN, Tile, TileReader, block_size, place_tiles, tag_lines
from chiptag.runs.layout import RunDir

LEGEND = ('tags under each chip: black "ok" = true and predicted, red "missed" = true but not predicted, '
          'blue "extra" = predicted but not true (at the tuned thresholds)')
COLUMNS = 6  # tiles per row on top_errors.png
DPI = 100  # every sheet is saved at this; a tile figure is made at it too (its chips are drawn 1:1 in pixels)


def options(run_dir: Path, overrides: dict | None = None) -> ReportConfig:
    """The run's `report:` config section (defaults for a run written before it existed), with overrides (the
    `chiptag report` options) validated the same way."""
    try:
        raw = (yaml.safe_load(RunDir(run_dir).config.read_text(encoding="utf-8")) or {}).get("report") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        raw = {}  # the sheets' tiles say what is wrong with config.yaml; the options fall back to defaults
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    try:
        return ReportConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise ChiptagError(f"{RunDir(run_dir).config}: report.{key}: {err['msg']} "
                           f"(got {err.get('input')!r})") from None


@dataclass
class Sheets:
    """What write_sheets drew: figure paths by tracker name, the report's Errors section and the chosen chips
    (so a caller or a test can check the selection without reading the PNGs)."""

    figures: dict[str, Path] = field(default_factory=dict)
    markdown: list[str] = field(default_factory=list)
    top_names: list[str] = field(default_factory=list)
    tag_names: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # tag -> (FP, FN)
    unreadable: dict[str, str] = field(default_factory=dict)  # chip -> why it is a grey tile
    decoded: int = 0


@dataclass(frozen=True)
class _Test:
    """The test split at the tuned thresholds, and the reader of its chips."""

    names: list[str]
    y: np.ndarray
    p: np.ndarray
    pred: np.ndarray
    thresholds: np.ndarray
    tags: list[str]
    reader: TileReader

    def tile(self, i: int, numbers: str) -> Tile:
        image, why = self.reader(self.names[i])
        lines = tag_lines(*mistakes.tile_tags(self.y[i], self.pred[i], self.tags))
        return Tile(image, f"{self.names[i]}\n{numbers}", lines, why)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # zlib level 1: a fifth less CPU than the default 6 for ~15 % larger files
        fig.savefig(tmp, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
    return path


def _tile_figure(blocks: list[tuple[str, list[Tile]]], ncols: int, title: str):
    """Blocks of tiles side by side, each under its own heading, the whole under a title and the legend."""
    from matplotlib.figure import Figure

    sizes = [block_size(tiles, ncols if tiles else 1) for _, tiles in blocks]  # an empty block: one tile wide
    head = 0.55 if any(heading for heading, _ in blocks) else 0.3  # title + legend (+ the blocks' headings)
    width = sum(w for w, _, _ in sizes) + 0.6 * (len(blocks) - 1) + 2 * GAP_IN
    height = head + TITLE_IN + max(h for _, h, _ in sizes) + GAP_IN
    fig = Figure(figsize=(width, height), dpi=DPI)
    fig.text(GAP_IN / width, 1 - 0.08 / height, title, fontsize=10, weight="bold", va="top")
    fig.text(GAP_IN / width, 1 - 0.3 / height, LEGEND, fontsize=7, va="top", color=COLOURS["ok"])
    left = GAP_IN
    for (heading, tiles), (w, _, _) in zip(blocks, sizes):
        fig.text(left / width, 1 - head / height, heading, fontsize=8.5, va="top", weight="bold")
        if tiles:
            place_tiles(fig, tiles, (left, head + TITLE_IN), ncols)
        else:
            fig.text(left / width, 1 - (head + TITLE_IN + 0.2) / height, "none", fontsize=8, va="top")
        left += w + 0.6
    return fig


def _top_errors(t: _Test, opts: ReportConfig, run: RunDir, result: Sheets) -> str:
    losses = mistakes.chip_losses(t.y, t.p)
    f2 = metrics.f2_per_sample(t.y, t.pred)
    top = mistakes.top_losses(losses, opts.top_errors)
    result.top_names = [t.names[i] for i in top]
    tiles = [t.tile(i, f"F2 {f2[i]:.2f} · loss {losses[i]:.2f}") for i in top]
    title = f"the {len(top)} test chips with the largest loss (of {len(t.names)}), largest first"
    result.figures["top_errors"] = _save(_tile_figure([("", tiles)], COLUMNS, title), run.top_errors)
    missed = t.y[top] & (1 - t.pred[top])
    extra = t.pred[top] & (1 - t.y[top])
    return (f"[{run.top_errors.name}]({run.top_errors.name}): the {len(top)} test chips with the largest loss "
            f"(cross-entropy summed over tags); among them the most missed tag is {_most(missed, t.tags)}, "
            f"the most often added one {_most(extra, t.tags)}.")


def _most(mask: np.ndarray, tags: list[str]) -> str:
    """The tag set most often in a (chips, tags) mask, with its number of chips."""
    counts = mask.sum(axis=0)
    return f"{tags[int(counts.argmax())]} ({int(counts.max())} chips)" if counts.any() else "none"


def _stem(tag: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag).strip(".") or "tag"
    base, k = stem, 2
    while stem.lower() in taken:  # case-insensitive file systems would merge "Road" and "road"
        stem, k = f"{base}-{k}", k + 1
    taken.add(stem.lower())
    return stem


def _per_tag(t: _Test, opts: ReportConfig, run: RunDir, result: Sheets) -> list[str]:
    folder = run.per_tag_dir
    stale = set(folder.glob("*.png")) if folder.is_dir() else set()
    errors = mistakes.tag_errors(t.y, t.p, t.thresholds, t.tags, opts.tag_sheets)
    lines, taken = [], set()
    ncols = max(1, min(3, opts.tag_tiles))
    for e in errors:
        if not len(e.false_positives) and not len(e.false_negatives):
            lines.append(f"  - {e.tag}: F2 {e.f2:.2f} at threshold {e.threshold:.2f}, no errors on test (no sheet)")
            continue
        c = t.tags.index(e.tag)
        fp, fn = e.false_positives[: opts.tag_tiles], e.false_negatives[: opts.tag_tiles]
        result.tag_names[e.tag] = ([t.names[i] for i in fp], [t.names[i] for i in fn])
        blocks = [(f"most confident false positives ({len(e.false_positives)} in all)",
                   [t.tile(i, f"p({e.tag}) {t.p[i, c]:.2f}") for i in fp]),
                  (f"most missed false negatives ({len(e.false_negatives)} in all)",
                   [t.tile(i, f"p({e.tag}) {t.p[i, c]:.2f}") for i in fn])]
        title = f"{e.tag}: test F2 {e.f2:.2f} at threshold {e.threshold:.2f}, {e.support} positive chips"
        path = folder / f"{_stem(e.tag, taken)}.png"
        result.figures[f"per_tag/{e.tag}"] = _save(_tile_figure(blocks, ncols, title), path)
        stale.discard(path)
        lines.append(f"  - [{e.tag}]({folder.name}/{path.name}): F2 {e.f2:.2f} at threshold {e.threshold:.2f}; "
                     f"{len(e.false_positives)} false positives, {len(e.false_negatives)} false negatives of "
                     f"{e.support} positives")
    for old in stale:  # a sheet from an earlier report whose tag has nothing to show now
        old.unlink(missing_ok=True)
    return lines


def _cooccurrence(t: _Test, run: RunDir, result: Sheets) -> str:
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    (truth, n_true), (pred, n_pred) = mistakes.cooccurrence(t.y), mistakes.cooccurrence(t.pred)
    n = len(t.tags)
    side = max(2.5, 0.27 * n)  # a cell stays ~0.27 in: two-digit percentages at 5.5 pt fit up to 25+ tags
    fig = Figure(figsize=(3 * (side + 2.2), side + 2.0), layout="constrained")  # + tag labels and colour bar
    axes = fig.subplots(1, 3)
    panels = ((truth, "truth", n_true, "Blues", (0, 1)), (pred, "prediction (tuned thresholds)", n_pred, "Blues",
              (0, 1)), (pred - truth, "prediction - truth", None, "RdBu_r", (-1, 1)))
    for ax, (m, name, counts, cmap, (lo, hi)) in zip(axes, panels):
        im = ax.imshow(np.ma.masked_invalid(m), cmap=colormaps[cmap].with_extremes(bad="#d9d9d9"), vmin=lo, vmax=hi)
        labels = [f"{tag} ({c})" for tag, c in zip(t.tags, counts)] if counts is not None else t.tags
        ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xticks(range(n), t.tags, fontsize=7, rotation=90)
        ax.set_title(name, fontsize=9)
        for i, j in zip(*np.nonzero(np.nan_to_num(np.abs(m)) >= 0.05)):
            ax.text(j, i, f"{m[i, j] * 100:.0f}", ha="center", va="center", fontsize=5.5,
                    color="white" if abs(m[i, j]) > 0.6 else "black")
        fig.colorbar(im, ax=ax, shrink=0.6)
    fig.suptitle(f"tag co-occurrence on test ({len(t.names)} chips): row = a tag, cell = % of the chips carrying "
                 "it that also carry the column's tag; (n) = chips carrying it; grey = none", fontsize=9)
    result.figures["cooccurrence"] = _save(fig, run.cooccurrence)
    name = run.cooccurrence.name
    return f"[{name}]({name}): {mistakes.cooccurrence_reading(truth, pred, t.tags)}."


def _load_test(run_dir: Path, summary: dict, probs: dict) -> _Test:
    tags = list(summary["tags"])
    thresholds = np.array([summary["thresholds"][tag] for tag in tags], dtype=np.float64)
    y = metrics.as_labels(probs["test_targets"], "test_targets")
    p = metrics.as_probs(probs["test_probs"], "test_probs")
    metrics.same_shape(y, p, "test_targets", "test_probs")
    names = [str(n) for n in probs["test_names"]]
    if len(names) != len(y) or y.shape[1] != len(tags):
        raise ChiptagError(f"{RunDir(run_dir).eval_probs}: {len(names)} test names, targets {y.shape}, "
                           f"{len(tags)} tags in summary.json: they should agree")
    reader = TileReader.for_run(run_dir, summary.get("image_size"))
    p = _label_rules(run_dir, summary, tags).condition(p)  # what the run decides, as predict does
    return _Test(names, y, p, metrics.binarize(p, thresholds), thresholds, tags, reader)


def _label_rules(run_dir: Path, summary: dict, tags: list[str]) -> LabelRules:
    """The rules the run kept (summary.json `label_rules`, the checkpoint's choice); a run from before the choice
    existed: its config.yaml's `labels` section; none when it has none or the file is unusable."""
    if isinstance(summary.get("label_rules_decision"), dict) and isinstance(summary.get("label_rules"), dict):
        return LabelRules.from_config(summary["label_rules"], tags)
    try:
        raw = yaml.safe_load(RunDir(run_dir).config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return LabelRules()
    return LabelRules.from_config(raw.get("labels") if isinstance(raw, dict) else None, tags)


def write_sheets(run_dir: Path, summary: dict, probs: dict, opts: ReportConfig) -> Sheets:
    """Draw the three kinds of sheet into run_dir's report/ for the test split; returns what was drawn and the
    report's Errors section."""
    result = Sheets()
    if len(probs["test_names"]) == 0:
        result.markdown = ["## Errors", "", "The test split is empty: no error sheets.", ""]
        return result
    t = _load_test(Path(run_dir), summary, probs)
    run = RunDir(run_dir)
    top = _top_errors(t, opts, run, result)
    co = _cooccurrence(t, run, result)
    per_tag = _per_tag(t, opts, run, result)
    result.unreadable = {n: why for n, (_, why) in t.reader.cache.items() if why}
    result.decoded = t.reader.decoded
    size = f"resized to {t.reader.size} px as in training" if t.reader.size else "at their own size"
    md = ["## Errors", "",
          f"Test chips, read through the training input path ({size}); {LEGEND}.", "",
          f"- {top}", "", f"  ![top errors]({run.top_errors.name})", "", f"- {co}", "",
          f"  ![co-occurrence]({run.cooccurrence.name})", ""]
    if per_tag:
        md += ["- Per tag, its most confident false positives beside its most missed false negatives, worst F2 "
               "first:", *per_tag, ""]
    if result.unreadable:
        name, why = next(iter(result.unreadable.items()))
        md += [f"{len(result.unreadable)} chip(s) could not be read and show as grey tiles (first: {name}: "
               f"{why}).", ""]
    result.markdown = md
    return result
