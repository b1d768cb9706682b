"""Command line: parse arguments, call one function per command, print chiptag errors as one clean line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import List, Optional

import typer

from chiptag.errors import ChiptagError
from chiptag.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate, track and serve multilabel taggers for satellite image chips.")


def friendly(fn):
    """ChiptagError -> 'error: ...' on stderr and exit 2; never a traceback for an expected failure."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ChiptagError as exc:
            console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("demo-data")
@friendly
def demo_data(out: Path = typer.Argument(..., help="output folder (Kaggle layout)"),
              n: int = typer.Option(2000, help="number of chips"),
              size: int = typer.Option(128, help="chip size in pixels"),
              seed: int = typer.Option(0, help="random seed")) -> None:
    """Write a synthetic Planet-format dataset: OUT/train_classes.csv and OUT/train-jpg/*.jpg."""
    import time

    from chiptag.data.synthetic import generate_dataset

    t0 = time.perf_counter()
    generate_dataset(out, n=n, size=size, seed=seed)
    print(f"wrote {n} chips ({size}px) to {out} in {time.perf_counter() - t0:.1f}s")


@app.command()
@friendly
def train(config: Path = typer.Option(..., "--config", "-c", help="YAML config"),
          set_: Optional[List[str]] = typer.Option(None, "--set", help="override, e.g. model.epochs=3"),
          all_: bool = typer.Option(False, "--all", help="train every models entry, then write EXPERIMENTS.md"),
          ) -> None:
    """Train the active model entry of CONFIG (or, with --all, every entry in turn)."""
    from chiptag import config as config_mod

    cfg = config_mod.load(config, set_ or [])
    if all_:
        from chiptag.sweep import run_sweep

        result = run_sweep(cfg, str(config))
        if result.failed:
            raise ChiptagError(f"{len(result.failed)} of {len(cfg.models)} entries failed: "
                               + "; ".join(result.failed))
        return
    from chiptag.train import run_train

    run_train(cfg)


@app.command()
@friendly
def runs(runs_dir: Path = typer.Argument(Path("runs"), help="folder of run directories"),
         markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table"),
         sort: str = typer.Option("run", "--sort", help="run, f2, f2_05, model or duration")) -> None:
    """The experiments table: one row per run in RUNS_DIR (broken and unfinished runs included)."""
    from chiptag.progress import out
    from chiptag.runs import list_runs, print_table, sort_rows, to_markdown

    rows = sort_rows(list_runs(runs_dir), sort)
    if markdown:
        print(to_markdown(rows), end="")
    elif rows:
        print_table(rows, title=str(runs_dir))
    else:
        out.print(f"no runs in {runs_dir}")


@app.command()
@friendly
def evaluate(run: Path = typer.Argument(..., help="run directory")) -> None:
    """Recompute a run's metrics from its checkpoint and split lists."""
    from chiptag.evaluate import evaluate_run

    evaluate_run(run)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
