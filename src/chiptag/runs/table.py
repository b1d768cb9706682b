"""The experiments table: one row per run dir, read from its summary.json (never crashes on a bad run dir).

A run dir is `completed` (summary.json and a complete checkpoint), `damaged` (summary.json, but its checkpoint is
missing, empty, truncated or not a chiptag checkpoint: predict, evaluate and serve would fail on it), `failed`
(failure.json: the run stopped on an error), `unfinished` (config.yaml but no summary yet: running, interrupted or
killed) or `broken` (unreadable files). The table stays free of the torch import: checkpoints are checked with
models.checkpoint_record (the archive's directory and the record's keys, not the weights' bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chiptag.errors import ChiptagError
from chiptag.evaluation.metrics import BASELINE_TOLERANCE
from chiptag.models import checkpoint_record
from chiptag.runs.layout import RunDir

SORT_KEYS = ("run", "f2", "f2_05", "model", "duration")


@dataclass
class RunRow:
    run_id: str
    status: str  # completed | damaged | failed | unfinished | broken
    index: int | None = None
    model: str = "?"
    backbone: str = ""  # the backbone actually trained (model.backbone may override the entry's name)
    image_size: str = ""
    views: str = ""  # cached views, and whether evaluation averaged them (TTA)
    f2: float | None = None  # test split, tuned thresholds: the headline
    f2_05: float | None = None  # test split, every threshold at 0.5
    baseline: float | None = None  # test F2 of the constant baseline
    label_rules: str = ""  # config `labels`: which the run kept, and the validation F2 with and without them
    pos_weight: str = ""
    optimizer: str = ""
    scheduler: str = ""
    epochs: str = ""
    head: str = ""
    frozen: str = ""
    augment: str = ""  # a fine-tuned run's augmentation ("" for frozen runs and runs from before it)
    duration_s: float | None = None
    tracker: str = ""
    note: str = ""  # why a run failed, is damaged or broken


def _tracker_link(tracker: Any) -> str:
    """The web page (online ClearML), else the offline session zip, else 'local'."""
    clearml = tracker.get("clearml") if isinstance(tracker, dict) else None
    if isinstance(clearml, dict):
        return str(clearml.get("url") or clearml.get("offline_zip") or clearml.get("task_id") or "clearml")
    return "local"


def _views(s: dict) -> str:
    views = s.get("views") or (s.get("features") or {}).get("views") or 1
    tta = s.get("tta", (s.get("features") or {}).get("tta"))
    return f"{views}" + (" / TTA" if tta else "")


def _label_rules(decision: Any) -> str:
    """'hard kept: hard 0.8536 / none 0.8504' (validation F2 at thresholds tuned each way); '' without rules."""
    if not isinstance(decision, dict) or decision.get("val_f2_with_rules") is None:
        return ""
    rules = "hard" if decision.get("confidence") is None else f"soft@{decision['confidence']:g}"
    return (f"{rules if decision.get('kept') else 'none'} kept: {rules} {decision['val_f2_with_rules']:.4f} / "
            f"none {decision['val_f2_without_rules']:.4f}")


def row_from_summary(s: dict, run_id: str) -> RunRow:
    test = s["metrics"]["test"]
    best = s.get("best_epoch")
    base = ((s.get("baseline") or {}).get("test") or {}).get("f2")
    return RunRow(
        run_id=run_id, status=str(s.get("status", "completed")), index=s.get("active_model_index"),
        model=str(s["model"]), backbone=str(s.get("backbone", "")), image_size=str(s.get("image_size", "")),
        views=_views(s), f2=float(test["f2"]), f2_05=float(test["f2_at_0.5"]),
        baseline=None if base is None else float(base), label_rules=_label_rules(s.get("label_rules_decision")),
        pos_weight="on" if s.get("pos_weight") else "off", optimizer=str(s.get("optimizer", "")),
        scheduler=str(s.get("scheduler", "")),
        epochs=f"{s.get('epochs', '?')}" + (f" (best {best})" if best is not None else "")
        + (f" x {s['folds']['k']} folds" if isinstance(s.get("folds"), dict) else ""),
        head=str(s.get("head", "")), frozen="yes" if s.get("frozen") else "no", augment=str(s.get("augment") or ""),
        duration_s=(s.get("timings") or {}).get("total_s"), tracker=_tracker_link(s.get("tracker")))


def _model_from_config(path: Path) -> tuple[int | None, str, str]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    index = int(raw.get("active_model_index", 0))
    entry = raw["models"][index]
    return index, str(entry["name"]), str(entry.get("backbone", ""))


def read_run(run_dir: Path) -> RunRow:
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    summary, failure, config = layout.summary, layout.failure, layout.config
    try:
        if summary.is_file():
            s = json.loads(summary.read_text(encoding="utf-8"))
            if s.get("status", "completed") != "completed" and "metrics" not in s:  # a run that recorded its end
                return RunRow(run_dir.name, str(s["status"]), s.get("active_model_index"),
                              str(s.get("model", "?")), note=str(s.get("error", "")))
            row = row_from_summary(s, run_dir.name)
            damage = checkpoint_record.problem(layout.checkpoint)
            if damage:  # the figures stay visible: they are what the run measured before the file was lost
                row.status, row.note = "damaged", damage
            return row
        if failure.is_file():
            f = json.loads(failure.read_text(encoding="utf-8"))
            return RunRow(run_dir.name, "failed", f.get("active_model_index"), str(f.get("model", "?")),
                          note=str(f.get("error", "")))
        if config.is_file():
            index, model, backbone = _model_from_config(config)
            return RunRow(run_dir.name, "unfinished", index, model, backbone=backbone,
                          note="no summary.json: still running, stopped or failed")
        return RunRow(run_dir.name, "broken", note="no summary.json or config.yaml")
    except Exception as exc:  # any damage to any file: the table still shows the others
        which = summary if summary.is_file() else failure if failure.is_file() else config
        return RunRow(run_dir.name, "broken", note=f"{which.name}: {exc.__class__.__name__}: {exc}")


def list_runs(runs_dir: Path) -> list[RunRow]:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ChiptagError(f"runs directory not found: {runs_dir} (train a model first, or pass RUNS_DIR)")
    return [read_run(p) for p in sorted(runs_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def sort_rows(rows: list[RunRow], key: str = "run") -> list[RunRow]:
    if key not in SORT_KEYS:
        raise ChiptagError(f"--sort {key!r}: valid keys are {', '.join(SORT_KEYS)}")
    if key == "run":
        return sorted(rows, key=lambda r: r.run_id)
    if key == "model":
        return sorted(rows, key=lambda r: (r.model, r.run_id))
    attr = {"f2": "f2", "f2_05": "f2_05", "duration": "duration_s"}[key]
    # best F2 first, shortest duration first; runs without the number go last
    sign = 1.0 if key == "duration" else -1.0
    return sorted(rows, key=lambda r: (getattr(r, attr) is None, sign * (getattr(r, attr) or 0.0), r.run_id))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# Every column: --wide, --markdown and EXPERIMENTS.md. `entry` is the run's index in its config's `models:` list.
COLUMNS = ("entry", "run", "model", "backbone", "image size", "views/TTA", "F2 test (tuned)", "F2@0.5",
           "baseline F2", "Δ", "label rules (val F2)", "pos_weight", "optimizer", "scheduler", "epochs",
           "head layers", "frozen", "augment", "duration", "tracker", "status")
# What fits a terminal: the run (its name carries the model, and the backbone when the name does not say it), the
# headline against the baseline, and the state; under shorter headers.
COMPACT = {"run": "run", "status": "status", "F2 test (tuned)": "test F2", "baseline F2": "baseline", "Δ": "Δ",
           "entry": "entry", "image size": "px", "epochs": "epochs", "duration": "time"}
REASON_CHARS = 160  # a compact table's reasons, listed under it: one line, not a list of 80 valid backbone names


def reason(note: str, limit: int | None = None) -> str:
    """A failure note on one line: its first line, without the list of valid values some errors append
    (`unknown backbone 'x'; valid: alexnet, ...`), cut at `limit` characters."""
    lines = [ln.strip() for ln in note.strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += f" (+{len(lines) - 1} more line{'s' if len(lines) > 2 else ''})"
    for marker in ("; valid: ", " (valid: ", "; valid keys: ", " (valid keys: "):
        if marker in text:
            text = text[: text.index(marker)] + " (valid values: see chiptag train)"
            break
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def delta_cell(r: RunRow) -> str:
    """Test F2 minus the constant baseline's; a completed run within BASELINE_TOLERANCE is marked."""
    if r.f2 is None or r.baseline is None:
        return ""
    gap = r.f2 - r.baseline
    return f"{gap:+.4f}" + (" ≈ baseline" if abs(gap) < BASELINE_TOLERANCE else "")


def _cells(r: RunRow, note: str = "one line") -> list[str]:
    """The row's cells in COLUMNS order; the status cell carries the reason of a failed, damaged, broken or
    unfinished run: note `one line` (reason()), `full` (the whole note, whitespace collapsed) or `none`."""
    f = (lambda v: "" if v is None else f"{v:.4f}")
    text = {"one line": lambda: reason(r.note), "full": lambda: " ".join(r.note.split()), "none": str}[note]()
    status = r.status if not text or r.status == "completed" else f"{r.status}: {text}"
    return ["" if r.index is None else str(r.index), r.run_id, r.model, r.backbone, r.image_size, r.views,
            f(r.f2), f(r.f2_05), f(r.baseline), delta_cell(r), r.label_rules, r.pos_weight, r.optimizer,
            r.scheduler, r.epochs, r.head, r.frozen, r.augment, format_duration(r.duration_s), r.tracker, status]


def to_markdown(rows: list[RunRow]) -> str:
    def cell(text: str, col: str) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        if col == "tracker" and text.startswith(("http://", "https://")):
            return f"[task]({text})"
        return f"`{text}`" if col == "tracker" and text not in ("", "local") else text

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c, col) for c, col in zip(_cells(r), COLUMNS)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_rich(rows: list[RunRow], title: str | None = None, wide: bool = False):
    from rich.table import Table

    columns = COLUMNS if wide else tuple(COMPACT)
    table = Table(title=title, title_justify="left", header_style="bold underline", box=None, padding=(0, 1),
                  pad_edge=False)
    for col in columns:
        # only the long free-text cells wrap: a number or a run name folded over lines is unreadable
        wraps = col in ("head layers", "optimizer", "scheduler", "tracker") or (wide and col == "status")
        table.add_column(col if wide else COMPACT[col], overflow="fold" if wraps else "ellipsis", no_wrap=not wraps,
                         justify="right" if col.startswith(("F2", "entry", "baseline", "Δ", "image")) else "left")
    colour = {"completed": "", "failed": "red", "unfinished": "yellow", "broken": "red", "damaged": "red"}
    for r in rows:
        cells = dict(zip(COLUMNS, _cells(r, "full" if wide else "none")))
        cells["scheduler"] = cells["scheduler"].replace("ReduceLROnPlateau", "Plateau")  # a terminal is narrow
        table.add_row(*(cells[c] for c in columns), style=colour.get(r.status, ""))
    return table


def print_table(rows: list[RunRow], title: str | None = None, wide: bool = False) -> None:
    """Rich table on stdout (the compact columns; wide: every column); piped to a file or a log it is laid out
    one line per run, not folded at 80."""
    from rich.console import Console

    from chiptag.progress import out

    # --wide: every column at its natural width, one line per run (a terminal wraps it; `less -S` scrolls)
    console = out if out.is_terminal and not wide else Console(width=400 if wide else 260, highlight=False,
                                                                  soft_wrap=True)
    console.print(to_rich(rows, title, wide))
    if not wide:  # the reasons under the table: a status cell holding them would squeeze every other column
        for r in rows:
            if r.note and r.status != "completed":
                console.print(f"{r.run_id}: {r.status}: {reason(r.note, REASON_CHARS)}",
                              style="red" if r.status in ("failed", "damaged", "broken") else "yellow")
