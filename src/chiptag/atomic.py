"""Atomic writes: a temporary file in the same folder, then rename, so readers (a resumed run, the runs table,
a cache lookup) see the old file or the new one, never half of one. Every file chiptag writes goes through here.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` when the block succeeds, remove it if not.
    The temporary name keeps the suffix, so writers that infer the format from it (savefig, np.savez) work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    import torch  # not at module level: validation and the runs table stay free of the torch import

    with replacing(path) as tmp:
        torch.save(obj, tmp)
