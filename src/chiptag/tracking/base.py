"""The Tracker protocol and a fan-out to several trackers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def start(self, run_id: str, name: str, config: dict) -> None: ...
    def log_scalars(self, epoch: int, scalars: dict[str, float]) -> None: ...
    def log_figure(self, name: str, path: Path) -> None: ...
    def log_artifact(self, name: str, path: Path) -> None: ...
    def log_model(self, path: Path) -> None: ...
    def finish(self, summary: dict) -> dict[str, Any]: ...  # returns what goes into summary["tracker"]


class MultiTracker:
    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def __getattr__(self, method: str):
        def call(*args, **kwargs):
            result: dict[str, Any] = {}
            for t in self.trackers:
                out = getattr(t, method)(*args, **kwargs)
                if isinstance(out, dict):
                    result.update(out)
            return result

        return call
