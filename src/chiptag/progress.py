"""Progress for long steps (extraction, epochs, prediction): a rich bar on a terminal, plain lines in a log.

When stderr is not a terminal (CI, nohup, a file), a bar would print nothing useful; a plain line
`label: done/total (img/s)` is printed instead, at most every LOG_EVERY_S seconds, so a 4-minute extraction
shows it is alive without flooding the log. A step shorter than that prints nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)
LOG_EVERY_S = 10.0


class LogProgress:
    """advance(n) for a log: a plain line when LOG_EVERY_S has passed since the last one (or the start)."""

    def __init__(self, total: int, label: str, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] | None = None, every_s: float | None = None):
        self.total, self.label, self.clock = total, label, clock
        self.write = write or (lambda line: console.print(line, highlight=False, markup=False))
        self.every_s = LOG_EVERY_S if every_s is None else every_s
        self.start = self.last = clock()
        self.done, self.lines = 0, 0

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = f"{self.done / elapsed:.1f} img/s" if elapsed > 0 else "- img/s"
        return f"{self.label}: {self.done}/{self.total} ({rate}, {elapsed:.0f}s)"

    def __call__(self, n: int) -> None:
        self.done += n
        if self.clock() - self.last >= self.every_s:
            self.last = self.clock()
            self.lines += 1
            self.write(self.line())

    def finish(self) -> None:
        """A closing line, only when the step was long enough to have printed one (short steps stay quiet)."""
        if self.lines:
            self.write(self.line())


@contextmanager
def progress_bar(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    if not console.is_terminal:
        log = LogProgress(total, label)
        yield log
        log.finish()
        return
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)

# Results and per-epoch lines go to stdout; progress bars and warnings to stderr.
out = Console(highlight=False, soft_wrap=True)
