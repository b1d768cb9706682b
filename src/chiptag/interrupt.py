"""Graceful stop on SIGINT/SIGTERM: finish the current step, save resumable state, exit 130/143.

`graceful_stop()` installs handlers that only set a flag; the extraction and training loops poll
`stop_requested()` after each batch or step, save their progress and raise `Interrupted`. A second signal
aborts at once (KeyboardInterrupt), for when saving itself hangs.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from chiptag.errors import ChiptagError
from chiptag.progress import console

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []


class Interrupted(ChiptagError):
    """Stopped by a signal after saving progress. exit_code follows the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    def with_hint(self, hint: str) -> Interrupted:
        return Interrupted(self.signum, f"{self}; {hint}")


def stop_requested() -> int | None:
    """The signal number received since graceful_stop() began, or None."""
    return _received[0] if _received else None


def request_stop(signum: int = signal.SIGTERM) -> None:
    """What the handler does; also lets a caller (a GUI, a time budget) stop a run the same way."""
    _received.append(signum)


def _handler(signum, frame) -> None:
    if _received:
        raise KeyboardInterrupt  # second signal: stop now, without saving
    request_stop(signum)
    console.print(f"[yellow]{signal.Signals(signum).name} received:[/] finishing the current step and saving "
                  "progress (send it again to abort at once)")


@contextmanager
def graceful_stop() -> Iterator[None]:
    """Handle SIGINT/SIGTERM as a stop request while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()


def ignore_sigint_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group; the workers leave it to the main
    process, which finishes its step (a worker dying on SIGINT would break the batch being fetched)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
