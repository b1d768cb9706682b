"""ClearML tracking (`tracking.backend: clearml`). This is the only module that imports clearml, lazily.

Online, the api server is probed with a short timeout before `Task.init` (a run must not hang on a missing
server); offline (`tracking.offline: true`) ClearML's offline mode writes a session zip that
`clearml-task --import-offline-session ZIP` uploads later. summary["tracker"]["clearml"] names the web page
(online) or the zip (offline).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from chiptag.atomic import replacing
from chiptag.errors import ChiptagError
from chiptag.progress import console
from chiptag.runs.layout import RunDir
from chiptag.tracking import clearml_setup


def _split_name(key: str) -> tuple[str, str]:
    """'val/f2' -> ('f2', 'val'): one ClearML chart per metric with a line per split (train and val loss
    share a chart); a bare name like 'lr' is its own chart and series."""
    split, _, metric = key.rpartition("/")
    return (metric, split) if split else (key, key)


def _hyperparameters(config: dict) -> dict:
    """The resolved config, with the active model entry as `model` (ClearML shows lists of dicts as one string)."""
    params = {k: v for k, v in config.items() if k != "models"}
    models = config.get("models") or []
    index = config.get("active_model_index", 0)
    if models:
        params["model"] = models[index]
    return params


class ClearMLTracker:
    def __init__(self, cfg, run_dir: Path):
        try:
            from clearml import Task  # noqa: F401  (fail here, with a clear message, if it is missing)
        except ImportError:
            raise ChiptagError("tracking.backend is clearml but the clearml package is not installed: "
                               "pip install clearml, or set tracking.backend: local") from None
        self.cfg = cfg
        self.run = RunDir(run_dir)
        self.offline = bool(cfg.offline)
        self.task = None
        self.figures: set[str] = set()  # names already uploaded: each plot once

    def _go_offline_or_fail(self) -> None:
        if self.offline:
            return
        try:
            clearml_setup.check_server(self.cfg.connect_timeout_s)
        except ChiptagError as exc:
            if not self.cfg.fallback_offline:
                raise
            console.print(f"[yellow]warning:[/] {exc}\n  tracking.fallback_offline is true: "
                          "tracking this run in ClearML offline mode instead.")
            self.offline = True

    def start(self, run_id: str, name: str, config: dict) -> None:
        from clearml import Task

        clearml_setup.configure()
        self._go_offline_or_fail()
        current = Task.current_task()
        if current is not None:  # left open by a run that failed earlier in this process (a sweep)
            current.mark_failed(status_reason="chiptag run did not finish", force=True)
            current.close()
        Task.set_offline(offline_mode=self.offline)
        task_name = (self.cfg.task_name or "{model}-{run_id}").format(model=name, run_id=run_id)
        try:
            self.task = Task.init(
                project_name=self.cfg.project, task_name=task_name, reuse_last_task_id=False,
                # chiptag logs its own checkpoint; ClearML's torch.save hook would log every intermediate one.
                auto_connect_frameworks=False, auto_connect_arg_parser=False,
                auto_resource_monitoring=False)
        except Exception as exc:  # ClearML raises many types; the user needs one line
            raise ChiptagError(f"ClearML Task.init failed for project {self.cfg.project!r}: "
                               f"{exc.__class__.__name__}: {exc}") from None
        self.task.connect(_hyperparameters(config), name="chiptag")
        resolved = self.run.config
        if resolved.is_file():
            self.task.connect_configuration(resolved, name="config.yaml")

    def log_scalars(self, epoch: int, scalars: dict[str, float]) -> None:
        logger = self.task.get_logger()
        for key, value in scalars.items():
            title, series = _split_name(key)
            logger.report_scalar(title, series, float(value), iteration=epoch)

    def log_figure(self, name: str, path: Path) -> None:
        if name in self.figures:  # the report hands its plots over, and finish() catches any it did not
            return
        self.figures.add(name)
        self.task.get_logger().report_image("report", name, iteration=0, local_path=str(path))

    def log_artifact(self, name: str, path: Path) -> None:
        self.task.upload_artifact(name, artifact_object=Path(path), wait_on_upload=True)

    def log_model(self, path: Path) -> None:
        from clearml import OutputModel

        model = OutputModel(task=self.task, name=self.task.name, framework="PyTorch")
        if self.offline and hasattr(model, "_update_weights_offline"):
            # clearml 2.1.12: offline, update_weights() first asks the placeholder model whether it is
            # published and fails (AttributeError: 'DummyModel' object has no attribute 'locked'); this is
            # the offline branch it would have taken. The checkpoint is registered by its path in the run dir,
            # not copied: close() deflates the whole session into the zip, and a 46 MB ResNet18 checkpoint
            # made that 2-3 s per run (benchmarks/clearml_overhead.py).
            model._update_weights_offline(register_uri=Path(path).resolve().as_uri())
        else:
            # auto_delete_file defaults to True in ClearML: it would delete the run's checkpoint after upload.
            model.update_weights(weights_filename=str(path), auto_delete_file=False)

    def _log_results(self, summary: dict) -> None:
        logger = self.task.get_logger()
        for split in ("val", "test"):
            m = summary.get("metrics", {}).get(split, {})
            for key in ("f2", "f2_at_0.5", "f2_micro", "f2_macro", "precision", "recall", "loss"):
                if isinstance(m.get(key), (int, float)):
                    logger.report_single_value(f"{split}/{key}", float(m[key]))
            if m.get("per_class"):
                import pandas as pd

                table = pd.DataFrame.from_dict(m["per_class"], orient="index")
                table.index.name = "tag"
                logger.report_table(f"per-class ({split})", split, iteration=0, table_plot=table)
        for split in ("val", "test"):
            f2 = summary.get("baseline", {}).get(split, {}).get("f2")
            if isinstance(f2, (int, float)):
                logger.report_single_value(f"baseline/{split}/f2", float(f2))

    def finish(self, summary: dict) -> dict[str, Any]:
        try:
            self._log_final(summary)
        except Exception as exc:  # the run itself is done and saved: warn, still close and name the task
            console.print(f"[yellow]warning:[/] ClearML: logging the final results failed: "
                          f"{exc.__class__.__name__}: {exc}")
        return {"clearml": self._close()}

    def _log_final(self, summary: dict) -> None:
        self._log_results(summary)
        for png in sorted(self.run.report_dir.glob("*.png")):
            self.log_figure(png.stem, png)
        if self.run.summary.is_file():
            self.log_artifact(self.run.summary.name, self.run.summary)
        if summary.get("thresholds"):  # a dict artifact is stored as JSON; no extra file in the run dir
            self.task.upload_artifact("thresholds", artifact_object=dict(summary["thresholds"]),
                                      wait_on_upload=True)
        if self.run.checkpoint.is_file():
            self.log_model(self.run.checkpoint)

    def _close(self) -> dict[str, Any]:
        task = self.task
        info: dict[str, Any] = {"task_id": task.id, "project": self.cfg.project, "task_name": task.name,
                                "offline": self.offline}
        if not self.offline:
            info["url"] = task.get_output_log_web_page()
        # close() zips the offline session without waiting for the reporter thread: in a sweep the scalars
        # were sometimes written to the folder only after the zip was made. Drain the reporter first.
        task.flush(wait_for_uploads=True)
        task.mark_completed()
        task.close()  # offline: this writes <offline folder>.zip
        if self.offline:
            folder = task.get_offline_mode_folder()
            info["offline_zip"] = str(_complete_zip(Path(folder)).resolve()) if folder else None
        self.task = None
        return info


def _complete_zip(folder: Path) -> Path:
    """ClearML's <folder>.zip, rebuilt the same way if a file in the session folder is missing from it."""
    zip_path = Path(f"{folder}.zip")
    files = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zipped = {i.filename: i.file_size for i in zf.infolist()}
    except (OSError, zipfile.BadZipFile):
        zipped = {}
    if all(zipped.get(name) == p.stat().st_size for name, p in files.items()):
        return zip_path
    with replacing(zip_path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                                                     allowZip64=True) as zf:
        for name, p in sorted(files.items()):
            zf.write(p, arcname=name)
    return zip_path
