"""Experiment tracking: a small Tracker protocol; the local tracker (run dir) is always on."""

from __future__ import annotations

from chiptag.tracking.base import MultiTracker, Tracker
from chiptag.tracking.local import LocalTracker

__all__ = ["LocalTracker", "MultiTracker", "Tracker", "make_tracker"]


def make_tracker(tracking, run_dir) -> MultiTracker:
    """The local tracker, plus ClearML when `tracking.backend: clearml` (imported lazily). tracking: the
    config's `tracking` section."""
    trackers: list[Tracker] = [LocalTracker(run_dir)]
    if tracking.backend == "clearml":
        from chiptag.tracking.clearml import ClearMLTracker

        trackers.append(ClearMLTracker(tracking, run_dir))
    return MultiTracker(trackers)
