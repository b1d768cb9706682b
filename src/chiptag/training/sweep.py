"""`chiptag train --all`: every entry of `models:` in turn, then the experiments table and EXPERIMENTS.md.

Every entry's backbone and weights, and the device, are checked before the first entry trains (training.checks):
a config error in entry 3 stops the sweep before entries 0-2 spend their time. Entries share the feature cache
without extra work: its key is the backbone's content and preprocessing, so a repeated frozen backbone is
extracted once. One entry failing while it trains is recorded (its run dir's failure record, when
it got a run dir) and the sweep goes on; the caller turns failures into a non-zero exit.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from chiptag import config as config_mod
from chiptag.atomic import write_text
from chiptag.config import Config
from chiptag.errors import ChiptagError
from chiptag.interrupt import Interrupted
from chiptag.progress import console, out
from chiptag.runs.layout import EXPERIMENTS, RunDir, model_label
from chiptag.runs.table import RunRow, print_table, row_from_summary, to_markdown


@dataclass
class SweepResult:
    rows: list[RunRow] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "name: reason"
    markdown_path: Path | None = None


def entry_config(cfg: Config, index: int) -> Config:
    """The config with `index` as the active entry (re-validated, so it is exactly what `train` would run)."""
    raw = cfg.to_dict()
    raw["active_model_index"] = index
    if cfg.output.run_name:  # one fixed name for all entries would only differ by -2, -3 suffixes
        entry = cfg.models[index]
        raw["output"]["run_name"] = f"{cfg.output.run_name}-{model_label(entry.name, entry.backbone)}"
    return config_mod.from_dict(raw, "config")


def _subdirs(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()


def _record_failure(cfg: Config, index: int, new_dirs: set[str], message: str) -> RunRow:
    runs_dir = Path(cfg.output.runs_dir)
    name = cfg.models[index].name
    for d in sorted(new_dirs):  # run_train made at most one run dir for this entry
        run = RunDir(runs_dir / d)
        if not run.summary.exists():
            if not run.failure.exists():  # run_train records ChiptagErrors itself; a crash leaves none
                run.write_failure(name, index, message)
            return RunRow(d, "failed", index, name, note=message)
    return RunRow("(no run dir)", "failed", index, name, note=message)


def run_sweep(cfg: Config, config_path: str = "config") -> SweepResult:
    from chiptag.training.checks import check_sweep  # torch only when a sweep really runs
    from chiptag.training.main import run_train
    from chiptag.training.settings import Settings

    configs = [entry_config(cfg, i) for i in range(len(cfg.models))]
    check_sweep([Settings.from_config(c) for c in configs])  # every entry, before the first one trains
    result = SweepResult()
    runs_dir = Path(cfg.output.runs_dir)
    for i, entry in enumerate(cfg.models):
        out.print(f"\n[bold]== {i + 1}/{len(cfg.models)}: {entry.name} ==[/]")
        before = _subdirs(runs_dir)
        try:
            summary = run_train(configs[i])
            result.rows.append(row_from_summary(summary, summary["run_id"]))
            continue
        except Interrupted:  # Ctrl-C / SIGTERM stops the whole sweep, not just this entry
            raise
        except ChiptagError as exc:
            message = str(exc)
            console.print(f"[bold red]error:[/] {entry.name}: {message}", highlight=False)
        except Exception as exc:  # a bug, not a user error: show it, keep the other entries
            message = f"{exc.__class__.__name__}: {exc}"
            console.print(f"[bold red]error:[/] {entry.name} crashed:\n{traceback.format_exc()}", highlight=False)
        result.rows.append(_record_failure(cfg, i, _subdirs(runs_dir) - before, message))
        result.failed.append(f"{entry.name}: {message}")
    result.markdown_path = write_experiments(runs_dir, result, config_path)
    print_table(result.rows, title=f"{config_path}: {len(cfg.models)} entries")
    out.print(f"wrote {result.markdown_path}")
    return result


def write_experiments(runs_dir: Path, result: SweepResult, config_path: str) -> Path:
    ok = len(result.rows) - len(result.failed)
    text = (f"# Experiments\n\nSweep of `{config_path}` finished {datetime.now():%Y-%m-%d %H:%M}: "
            f"{ok} of {len(result.rows)} entries completed. F2 is sample-averaged on the test split; "
            f"\"tuned\" uses per-tag thresholds tuned on validation.\n\n{to_markdown(result.rows)}\n"
            f"All runs in this folder: `chiptag runs {runs_dir} --markdown`.\n")
    path = runs_dir / EXPERIMENTS
    write_text(path, text)
    return path
