"""A checkpoint file's record read without torch: what `chiptag runs` checks every run's checkpoint with.

The runs table lists many runs and stays free of the torch import (~2 s with torchvision), so it cannot
`checkpoint.load` each file. A torch checkpoint is a zip archive: its central directory (at the end of the file:
a truncated, empty or random file has none) lists `<name>/data.pkl`, the pickled record with tensors as
references to `<name>/data/<key>` entries. The record is unpickled with every torch class replaced by an inert
placeholder and any other class refused (nothing in the file runs), then checked for the keys `checkpoint.load`
requires; every tensor it references must be in the archive. Cost: the central directory and data.pkl (~20 KB for
a ResNet18), whatever the size of the weights; the weights' bytes are not read (their CRCs are not checked).
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
REQUIRED = ("format_version", "backbone", "weights_id", "head", "tags", "thresholds", "preprocessing",
            "frozen", "state_dict")


class _Placeholder:
    """Stands for any torch object in the record (a tensor, its storage type, a rebuild function)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _RecordUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: list[str]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _Placeholder
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")

    def persistent_load(self, pid: Any) -> _Placeholder:
        # ('storage', storage type, key, location, numel): the tensor's bytes are the archive's data/<key>
        if isinstance(pid, tuple) and len(pid) > 2:
            self.storages.append(str(pid[2]))
        return _Placeholder()


def read_record(path: Path) -> dict:
    """The checkpoint's record (tensors as placeholders); ValueError with a one-line reason if it is not a
    complete chiptag checkpoint."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"truncated or not a checkpoint ({size:,} bytes, no zip directory)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ValueError("not a torch checkpoint (no data.pkl in the archive)")
            storages: list[str] = []
            with archive.open(pkl) as f:
                obj = _RecordUnpickler(f, storages).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise ValueError(f"damaged archive ({exc.__class__.__name__}: {exc})") from None
    prefix = pkl[: -len("data.pkl")]
    lost = [key for key in storages if f"{prefix}data/{key}" not in names]
    if lost:
        raise ValueError(f"damaged: {len(lost)} tensor(s) missing from the archive")
    if not isinstance(obj, dict):
        raise ValueError("not a chiptag checkpoint (not a mapping)")
    missing = [k for k in REQUIRED if obj.get(k) is None]
    if missing:
        raise ValueError(f"not a chiptag checkpoint or damaged: missing {', '.join(missing)}")
    if obj["format_version"] != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {obj['format_version']!r}; this chiptag reads format {FORMAT_VERSION}")
    return obj


def problem(path: Path) -> str | None:
    """None for a complete chiptag checkpoint, else why not, in one line naming the file."""
    path = Path(path)
    if not path.is_file():
        return f"no {path.name}"
    try:
        read_record(path)
    except (ValueError, OSError) as exc:
        return f"{path.name}: {exc}"
    return None
