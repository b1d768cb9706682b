"""`chiptag train --all`: every entry of `models:` in turn, then the experiments table and EXPERIMENTS.md.

Every entry's backbone and weights, and the device, are checked before the first entry trains (training.checks):
a config error in entry 3 stops the sweep before entries 0-2 spend their time. Entries share the feature cache
without extra work: its key is the backbone's content and preprocessing, so a repeated frozen backbone is
extracted once. Entries that train a head on the same cached features (frozen backbone, same backbone and image
size, same epochs and batch size; any head widths, dropouts, learning rates, optimizers, loss weighting) train
their heads together, as one batched model (training.heads), each in its own run dir with its own figures —
the same as alone. One entry failing is recorded (its run dir's failure record, when it got a run dir) and the
sweep goes on, inside a batch too; the caller turns failures into a non-zero exit. Ctrl-C / SIGTERM stops the
sweep; each interrupted entry continues alone with `chiptag train --resume RUN`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
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
    from chiptag.training.settings import Settings

    configs = [entry_config(cfg, i) for i in range(len(cfg.models))]
    settings = [Settings.from_config(c) for c in configs]
    check_sweep(settings)  # every entry, before the first one trains
    rows: dict[int, RunRow] = {}
    result = SweepResult()
    for group in _groups(settings):
        if len(group) == 1:
            i = group[0]
            _header(cfg, i)
            _attempt(cfg, i, lambda i=i: _train_alone(configs[i]), rows, result)
        else:
            _train_group(cfg, configs, group, rows, result)
    result.rows = [rows[i] for i in sorted(rows)]
    result.markdown_path = write_experiments(Path(cfg.output.runs_dir), result, config_path)
    print_table(result.rows, title=f"{config_path}: {len(cfg.models)} entries")
    out.print(f"wrote {result.markdown_path}")
    return result


def _groups(settings: list) -> list[list[int]]:
    """Entry indices in groups that may train their heads together (a head on cached features of the same
    backbone, image size and resize, for the same epochs and batches, tracked locally), in the order of their
    first entry; anything else alone."""
    from chiptag import distributed

    groups: dict[object, list[int]] = {}
    for i, s in enumerate(settings):
        n, o = s.network, s.optim
        # ClearML tracks one task per process at a time (Task.init): its entries train one after another
        together = (n.freeze and not s.folds and not o.unfreeze_after and s.tracking.backend == "local"
                    and not distributed.active())
        key = ((n.backbone, n.weights, n.image_size, n.resize, n.hidden_dim is None, o.epochs, o.batch_size)
               if together else ("alone", i))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _header(cfg: Config, i: int) -> None:
    out.print(f"\n[bold]== {i + 1}/{len(cfg.models)}: {cfg.models[i].name} ==[/]")


def _train_alone(cfg: Config) -> dict:
    from chiptag.training.main import run_train

    return run_train(cfg)


def _attempt(cfg: Config, i: int, work: Callable[[], dict | None], rows: dict, result: SweepResult,
             run_name: str | None = None) -> dict | None:
    """Run one step of entry i -> what work returns: its summary (its row in the table), or None (a step before
    there is one, or a failure). A failure is recorded (its row, its run dir: the one made meanwhile, or
    run_name) and the sweep goes on."""
    runs_dir = Path(cfg.output.runs_dir)
    name = cfg.models[i].name
    before = _subdirs(runs_dir)
    try:
        summary = work()
    except Interrupted:  # Ctrl-C / SIGTERM stops the whole sweep, not just this entry
        raise
    except ChiptagError as exc:
        message = str(exc)
        console.print(f"[bold red]error:[/] {name}: {message}", highlight=False)
    except Exception as exc:  # a bug, not a user error: show it, keep the other entries
        message = f"{exc.__class__.__name__}: {exc}"
        console.print(f"[bold red]error:[/] {name} crashed:\n{traceback.format_exc()}", highlight=False)
    else:
        if summary is not None:
            rows[i] = row_from_summary(summary, summary["run_id"])
        return summary
    made = _subdirs(runs_dir) - before
    rows[i] = _record_failure(cfg, i, made | {run_name} if run_name else made, message)
    result.failed.append(f"{name}: {message}")
    return None


def _train_group(cfg: Config, configs: list[Config], group: list[int], rows: dict, result: SweepResult) -> None:
    """Entries whose heads may train together: each opened and prepared (run dir, network, cached features) in
    turn; those reading the same cached features train as one batch (training.heads), then each finishes
    (thresholds, checkpoint, report) in its own run dir. An entry alone on its features trains alone."""
    from chiptag.device import resolve_device
    from chiptag.interrupt import graceful_stop
    from chiptag.training import main

    device = resolve_device(configs[group[0]].training.device, "training.device")
    with graceful_stop():
        prepared: dict[int, main.Prepared] = {}
        for i in group:
            _header(cfg, i)
            _attempt(cfg, i, lambda i=i: _prepare(configs[i], device, prepared, i), rows, result)
        by_features: dict[tuple, list[int]] = {}
        for i, p in prepared.items():
            by_features.setdefault(_features_key(p, i), []).append(i)
        for batch in by_features.values():
            if len(batch) == 1:
                p = prepared[batch[0]]
                _attempt(cfg, batch[0], lambda p=p: _finish(p, None), rows, result, p.r.run.name)
            else:
                _train_batch(cfg, [(i, prepared[i]) for i in batch], rows, result)


def _prepare(cfg: Config, device, prepared: dict, i: int) -> None:
    """Open entry i's run dir and prepare it (network, cached features, folds) into prepared[i]; features
    read from the same cache file as an entry prepared before share its tensor (one copy in memory)."""
    from chiptag.training import main

    r = main.open_run(cfg, None)
    with main.recorded(r):
        p = main.prepare(r, device)
    twin = next((q for q in prepared.values() if q.info.path and _features_key(q, 0) == _features_key(p, 0)), None)
    if twin is not None:
        p.feats = twin.feats
    prepared[i] = p


def _features_key(p, i: int) -> tuple:
    """Which cached features an entry read (its cache files), or a key of its own when there is no cache."""
    return (p.info.path, tuple(v.get("path") for v in p.info.per_view)) if p.info.path else ("alone", i)


def _finish(p, trained, draw_report: bool = True) -> dict:
    """A prepared entry to its summary: its head as the batch trained it (trained: (member, inputs, seconds)),
    or through the epoch loop (None: alone on its features). draw_report False: its report comes later
    (_publish), drawn with the batch's others."""
    import time

    from chiptag.features.views import ViewAverage
    from chiptag.training import main

    with main.recorded(p.r):
        t0 = time.perf_counter()
        if trained is None:
            results = main.train_folds(p)
            seconds = time.perf_counter() - t0
        else:
            m, inputs, seconds = trained
            if m.failed is not None:
                raise m.failed
            results = [main.fold_result(p, m.fold, m.tagger, ViewAverage(m.head), inputs, m.st, seconds)]
        summary = main.finish(p, results, seconds, draw_report)
    if draw_report:
        main.done(p.r, summary)
    return summary


def _train_batch(cfg: Config, entries: list, rows: dict, result: SweepResult) -> None:
    """The heads of prepared entries reading the same features, trained together; each entry finished in turn,
    then their reports drawn in parallel (evaluation.report.draw_reports) and each published."""
    import time

    import torch

    from chiptag.evaluation import report
    from chiptag.training import heads, main

    first = entries[0][1]
    feats, y, test = first.feats, first.r.ds.table.y, first.r.splits["test"]
    members = []
    for _, p in entries:
        members.append(heads.member(p.folds[0], p.net.tagger, torch.Generator().manual_seed(p.r.s.seed), feats, y,
                                    p.r.s))
    out.print(f"\n[bold]== {len(entries)} heads trained together: "
              f"{', '.join(cfg.models[i].name for i, _ in entries)} ==[/]")
    try:
        trained = heads.train_together(members, feats, y, test, drop_failed=True)
    except Interrupted as exc:
        raise exc.with_hint("continue each with: " + "; ".join(f"chiptag train --resume {p.r.run.path}"
                                                                for _, p in entries)) from None
    except Exception as exc:  # noqa: BLE001 - the batch failed: each entry of it is recorded, the sweep goes on
        for i, p in entries:
            _attempt(cfg, i, lambda exc=exc: _reraise(exc), rows, result, p.r.run.name)
        return
    finished: dict[int, dict] = {}  # summaries before their reports
    for (i, p), one in zip(entries, trained):
        _header(cfg, i)
        summary = _attempt(cfg, i, lambda p=p, one=one: _finish(p, one, False), rows, result, p.r.run.name)
        if summary is not None:
            finished[i] = summary
    ready = [(i, p) for i, p in entries if i in finished]
    out.print(f"drawing {len(ready)} reports: plots and error sheets into each run dir's report/ ...")
    t0 = time.perf_counter()
    drawn = report.draw_reports([p.r.run.path for _, p in ready])
    seconds = (time.perf_counter() - t0) / max(len(ready), 1)
    for (i, p), one in zip(ready, drawn):
        _header(cfg, i)
        _attempt(cfg, i, lambda i=i, p=p, one=one: _publish(p, finished[i], one, seconds), rows, result,
                 p.r.run.name)


def _reraise(exc: Exception) -> dict:
    raise exc


def _publish(p, summary: dict, drawn, report_s: float) -> dict:
    from chiptag.training import main

    with main.recorded(p.r):
        main.publish(p, summary, drawn, report_s)
    main.done(p.r, summary)
    return summary


def write_experiments(runs_dir: Path, result: SweepResult, config_path: str) -> Path:
    ok = len(result.rows) - len(result.failed)
    text = (f"# Experiments\n\nSweep of `{config_path}` finished {datetime.now():%Y-%m-%d %H:%M}: "
            f"{ok} of {len(result.rows)} entries completed. F2 is sample-averaged on the test split; "
            f"\"tuned\" uses per-tag thresholds tuned on validation.\n\n{to_markdown(result.rows)}\n"
            f"All runs in this folder: `chiptag runs {runs_dir} --markdown`.\n")
    path = runs_dir / EXPERIMENTS
    write_text(path, text)
    return path
