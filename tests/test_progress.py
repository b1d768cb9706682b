"""Progress that reaches a log: plain lines at most every LOG_EVERY_S when stderr is not a terminal."""

from __future__ import annotations

import chiptag.progress as progress
from chiptag.progress import LogProgress, progress_bar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_log_lines_are_throttled_and_carry_done_total_and_rate():
    clock, lines = Clock(), []
    log = LogProgress(1000, "extract", clock=clock, write=lines.append)
    for _ in range(10):  # 100 images per second of fake time, one call each second
        clock.t += 1.0
        log(100)
    assert lines == ["extract: 1000/1000 (100.0 img/s, 10s)"]  # one line in 10 s, not ten
    log.finish()
    assert len(lines) == 2


def test_short_step_prints_nothing():
    clock, lines = Clock(), []
    log = LogProgress(10, "predict", clock=clock, write=lines.append)
    clock.t = 3.0
    log(10)
    log.finish()
    assert lines == []


def test_progress_bar_logs_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every advance prints
    assert not progress.console.is_terminal  # pytest captures stderr
    with progress_bar(4, "epoch 0") as advance:
        advance(2)
        advance(2)
    err = capsys.readouterr().err
    assert "epoch 0: 2/4" in err and "epoch 0: 4/4" in err and "img/s" in err


def test_disabled_progress_prints_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with progress_bar(4, "epoch 0", enabled=False) as advance:
        advance(4)
    assert capsys.readouterr().err == ""
