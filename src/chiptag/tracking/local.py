"""Local tracking: per-epoch rows in the run dir's metrics.jsonl (always on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chiptag.runs.layout import RunDir


class LocalTracker:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics_path = RunDir(run_dir).metrics

    def start(self, run_id: str, name: str, config: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def log_scalars(self, epoch: int, scalars: dict[str, float]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"epoch": epoch, **scalars}) + "\n")

    def log_figure(self, name: str, path: Path) -> None:
        pass

    def log_artifact(self, name: str, path: Path) -> None:
        pass

    def log_model(self, path: Path) -> None:
        pass

    def finish(self, summary: dict) -> dict[str, Any]:
        return {"local": str(self.run_dir)}
