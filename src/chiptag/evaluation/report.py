"""The run report: `report/report.md` (headline numbers, per-class table) and PNG plots.

Inputs are what training leaves in the run dir: summary.json (metrics, thresholds, history), metrics.jsonl
(fallback for the history) and eval_probs.npz (validation and test probabilities, for the precision-recall
curves). Plots use matplotlib's object API (`Figure`, no pyplot): no GUI backend, no global state, safe headless.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from chiptag.atomic import replacing, write_text
from chiptag.config import ReportConfig
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics
from chiptag.evaluation import sheets as error_sheets
from chiptag.evaluation.label_rules import describe_decision
from chiptag.progress import console
from chiptag.runs.layout import RunDir, model_label

FIGURES = {"training_curves": "training_curves.png", "per_class_f2": "per_class_f2.png",
           "pr_curves": "pr_curves.png"}


def save_eval_probs(path: Path, ev: dict, names: list[str], splits: dict, tags: list[str]) -> None:
    """Keep the final validation/test probabilities so the report (and users) can plot and re-threshold them
    without recomputing features."""
    arrays = {"tags": np.asarray(tags)}
    for s in ("val", "test"):
        arrays[f"{s}_probs"] = ev[s]["probs"]
        arrays[f"{s}_targets"] = ev[s]["targets"]
        arrays[f"{s}_names"] = np.asarray([names[i] for i in splits[s]])
    with replacing(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def load_eval_probs(run_dir: Path) -> dict | None:
    path = RunDir(run_dir).eval_probs
    if not path.is_file():
        return None
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _read_summary(run_dir: Path) -> dict:
    path = RunDir(run_dir).summary
    if not path.is_file():
        raise ChiptagError(f"{run_dir} is not a finished run (no summary.json)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChiptagError(f"{path}: not valid JSON: {exc}") from None
    missing = [k for k in ("tags", "metrics", "baseline", "thresholds") if k not in summary]
    if missing:
        raise ChiptagError(f"{path}: missing {', '.join(missing)} (written by an older chiptag?)")
    return summary


def _history(run_dir: Path, summary: dict) -> list[dict]:
    if summary.get("history"):
        return summary["history"]
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _save(fig, path: Path) -> Path:
    """A figure with a layout engine is already fitted to its size; cropping it to its contents (bbox_inches
    "tight") would measure every artist again (~0.15 s on pr_curves) for a few pixels of margin. The others are
    cropped."""
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches=None if fig.get_layout_engine() else "tight")
    return path


def _curves_figure(history: list[dict], best_epoch: int | None):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    ax_loss, ax_f2, ax_lr = fig.subplots(1, 3)
    ep = [h["epoch"] for h in history]
    for key, style in (("train/loss", "-"), ("val/loss", "--")):
        ax_loss.plot(ep, [h[key] for h in history], style, label=key)
    ax_f2.plot(ep, [h["val/f2"] for h in history], "-o", ms=3, label="val/f2 @0.5")
    ax_lr.plot(ep, [h["lr"] for h in history], "-")
    ax_lr.set_yscale("log")
    for ax, title in ((ax_loss, "loss"), (ax_f2, "validation F2 (threshold 0.5)"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if best_epoch and ax is not ax_lr:
            ax.axvline(best_epoch, color="grey", lw=0.8, ls=":", label=f"best epoch {best_epoch}")
    ax_loss.legend(fontsize=8)
    ax_f2.legend(fontsize=8)
    return fig


def _figure(value: float | None) -> str:
    """A per-class figure for the table: `n/a` where it is undefined (None)."""
    return "n/a" if value is None else f"{value:.3f}"


def _f2_bars_figure(tags: list[str], series: dict[str, list[float]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.32 * len(tags) + 1.2))
    ax = fig.subplots()
    y = np.arange(len(tags))
    height = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        ax.barh(y + k * height, values, height=height, label=label)
    ax.set_yticks(y + height * (len(series) - 1) / 2, tags)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F2")
    ax.set_title("per-class F2 on test")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _pr_figure(tags: list[str], probs: dict, per_class: dict):
    from matplotlib.figure import Figure

    ncols = 5
    nrows = -(-len(tags) // ncols)
    fig = Figure(figsize=(3.0 * ncols, 2.7 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    curves = {s: metrics.pr_curves(probs[f"{s}_targets"], probs[f"{s}_probs"], tags) for s in ("val", "test")}
    for ax, tag in zip(axes, tags):
        for s, style in (("test", "-"), ("val", "--")):
            if tag in curves[s]:
                ax.plot(curves[s][tag]["recall"], curves[s][tag]["precision"], style, lw=1.2, label=s)
        row = per_class[tag]
        if row.get("no_training_positives"):
            ax.text(0.5, 0.5, "no positives in training: n/a", ha="center", va="center", fontsize=8)
        elif row["support"]:  # the operating point the stored threshold gives on test
            ax.plot(row["recall"], row["precision"], "o", color="k", ms=4, label=f"t={row['threshold']:.2f}")
        else:
            ax.text(0.5, 0.5, "no positives in test", ha="center", va="center", fontsize=8)
        ax.set_title(f"{tag} (test n={row['support']})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:  # a tag absent from both splits has nothing to label
            ax.legend(fontsize=6, loc="lower left")
    for ax in axes[len(tags):]:
        ax.set_visible(False)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    return fig


def _markdown(summary: dict, figures: dict[str, Path], probs_note: str, errors: list[str]) -> str:
    m, b, tags = summary["metrics"], summary["baseline"], summary["tags"]
    n = summary.get("n_images", {})
    lines = [
        f"# Run {summary.get('run_id', '?')}: {model_label(str(summary.get('model', '?')), summary.get('backbone'))}",
        "",
        f"{summary.get('backbone', '?')} (weights {summary.get('weights_id', '?')}, frozen "
        f"{summary.get('frozen', '?')}), {summary.get('image_size', '?')} px, head {summary.get('head', '?')}; "
        f"best epoch {summary.get('best_epoch', '?')} of {summary.get('epochs', '?')}.",
        "",
        "Thresholds are tuned per class on validation; the test split is scored once, at the end, and is the "
        "headline. Validation F2 at tuned thresholds is optimistic (they were chosen on it).",
        "",
        "| split | images | F2 (tuned thresholds) | F2 @0.5 | constant baseline F2 |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in ("test", "val"):
        name = f"**{s}**" if s == "test" else s
        lines.append(f"| {name} | {n.get(s, '?')} | {m[s]['f2']:.4f} | {m[s]['f2_at_0.5']:.4f} | "
                     f"{b[s]['f2']:.4f} |")
    lines += ["", f"Constant baseline: predict {{{', '.join(b.get('tags', []))}}} for every chip (chosen on "
              "train)."]
    decision = summary.get("label_rules_decision") or {}
    if decision.get("val_f2_with_rules") is not None:  # config `labels`: which the run kept, and why
        lines += ["", f"Label rules: {describe_decision(decision)}."]
    lines += ["", "## Per class (test, at the tuned thresholds)", "",
              "| tag | threshold | val support | test support | precision | recall | F2 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    test_pc, val_pc = m["test"]["per_class"], m["val"]["per_class"]
    for tag in sorted(tags, key=lambda t: (-test_pc[t]["support"] - val_pc[t]["support"], t)):
        r = test_pc[tag]
        lines.append(f"| {tag} | {summary['thresholds'][tag]:.2f} | {val_pc[tag]['support']} | {r['support']} | "
                     f"{_figure(r['precision'])} | {_figure(r['recall'])} | {_figure(r['f2'])} |")
    untrained = [t for t in tags if test_pc[t].get("no_training_positives")]
    if untrained:
        lines += ["", f"n/a: no positive in the training rows ({', '.join(untrained)}): the model never saw the "
                      "tag, so its figures are undefined."]
    lines += ["", "## Plots", ""]
    for name, path in figures.items():
        lines += [f"![{name.replace('_', ' ')}]({path.name})", ""]
    if probs_note:
        lines += [probs_note, ""]
    return "\n".join(lines + errors)


def _errors_section(run_dir: Path, summary: dict, probs: dict,
                    opts: ReportConfig) -> tuple[dict, list[str]]:
    """The error sheets and their report section; bad stored arrays cost the sheets, not the whole report.
    Sheets that are not drawn this time are removed: the report/ folder shows this report's figures only."""
    if not opts.error_sheets:
        _remove_sheets(run_dir)
        return {}, []
    try:
        drawn = error_sheets.write_sheets(run_dir, summary, probs, opts)
    except ChiptagError as exc:
        _remove_sheets(run_dir)
        return {}, ["## Errors", "", f"No error sheets: {exc}", ""]
    return drawn.figures, drawn.markdown


def _remove_sheets(run_dir: Path) -> None:
    """The error sheets of an earlier report (top_errors, cooccurrence, per_tag/<tag>)."""
    run = RunDir(run_dir)
    run.top_errors.unlink(missing_ok=True)
    run.cooccurrence.unlink(missing_ok=True)
    if run.per_tag_dir.is_dir():
        for sheet in run.per_tag_dir.glob("*.png"):
            sheet.unlink()
        if not any(run.per_tag_dir.iterdir()):
            run.per_tag_dir.rmdir()


def write_report(run_dir: Path, sheets: dict | None = None) -> dict[str, Path]:
    """(Re)write run_dir/report/: report.md, the plots and the error sheets (options: the run's `report:` config,
    overridden by `sheets`, e.g. {"top_errors": 48}). Returns {name: path} of the figures (error sheets under
    their tracker names: top_errors, cooccurrence, per_tag/<tag>) and the report."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    opts = error_sheets.options(run_dir, sheets)  # a bad option fails before any drawing
    tags, per_class = summary["tags"], summary["metrics"]["test"]["per_class"]
    out_dir = RunDir(run_dir).report_dir
    out_dir.mkdir(exist_ok=True)
    figures: dict[str, Path] = {}
    history = _history(run_dir, summary)
    if history:
        figures["training_curves"] = _save(_curves_figure(history, summary.get("best_epoch")),
                                           out_dir / FIGURES["training_curves"])
    probs = load_eval_probs(run_dir)
    # a tag the model never saw has no F2 (None in summary.json): no bar
    untrained = {t for t in tags if per_class[t].get("no_training_positives")}
    bars = {"tuned thresholds": [np.nan if per_class[t]["f2"] is None else per_class[t]["f2"] for t in tags]}
    note = ""
    if probs is not None and list(probs["tags"]) == tags:
        at_half = metrics.classification_metrics(probs["test_targets"], probs["test_probs"], 0.5, tags)
        bars["threshold 0.5"] = [np.nan if t in untrained else at_half["per_class"][t]["f2"] for t in tags]
    else:
        probs = None
        note = (f"Precision-recall curves and error sheets need {RunDir(run_dir).eval_probs.name} in the run "
                "dir (written by training); it is missing.")
    figures["per_class_f2"] = _save(_f2_bars_figure(tags, bars), out_dir / FIGURES["per_class_f2"])
    if probs is not None:
        figures["pr_curves"] = _save(_pr_figure(tags, probs, per_class), out_dir / FIGURES["pr_curves"])
    error_figures, errors = {}, []
    if probs is not None:
        error_figures, errors = _errors_section(run_dir, summary, probs, opts)
    else:
        _remove_sheets(run_dir)  # drawn from probabilities that are gone
    md = RunDir(run_dir).report_md
    write_text(md, _markdown(summary, figures, note, errors))
    return {**figures, **error_figures, "report": md}


Drawn = tuple[dict[str, Path], str]  # write_report's files, or ({}, why it could not draw them)


def report_after_training(run_dir: Path, tracker) -> None:
    """Write the report and hand its plots to the tracker. The run is already complete (checkpoint and
    summary written), so a plotting failure only warns: it must not cost the tracker's finish."""
    log_report(run_dir, tracker, draw(run_dir))


def draw(run_dir: Path) -> Drawn:
    try:
        return write_report(run_dir), ""
    except Exception as exc:  # noqa: BLE001 - see report_after_training; log_report says how to retry
        return {}, f"{exc.__class__.__name__}: {exc}"


def draw_reports(run_dirs: list[Path]) -> list[Drawn]:
    """The reports of several finished runs (a sweep's batch), drawn in parallel: one process per core, at most
    one per run ("spawn": a fresh interpreter each, nothing of this process's torch threads inherited)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = min(len(run_dirs), len(os.sched_getaffinity(0)))  # the cores this process may use, as serve's
    if workers < 2:
        return [draw(d) for d in run_dirs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(draw, run_dirs))


def log_report(run_dir: Path, tracker, drawn: Drawn) -> None:
    """A drawn report's plots to the tracker; a report that could not be drawn: a warning with the retry."""
    files, why = drawn
    if why:
        console.print(f"[yellow]warning:[/] could not write the report: {why}; retry with: chiptag report {run_dir}")
        return
    for name, path in files.items():
        if path.suffix == ".png":
            tracker.log_figure(name, path)
    tracker.log_artifact("report", files["report"])
