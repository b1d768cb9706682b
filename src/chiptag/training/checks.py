"""Checks that run before a run dir is made or any data is read: every models entry's backbone and weights, and
the device. A run that cannot start says so at once, leaves no failed run dir behind, and a sweep (`--all`) finds
entry 3's unknown backbone before entries 0-2 train.
"""

from __future__ import annotations

from chiptag import distributed
from chiptag.device import resolve_device
from chiptag.errors import ChiptagError
from chiptag.models.backbones import check_backbone
from chiptag.training.settings import NetworkSpec, Settings


def entry_problem(index: int, network: NetworkSpec) -> str | None:
    """Why entry `index` cannot be built (unknown backbone, unknown weights, missing weights file), or None."""
    try:
        check_backbone(network.backbone, network.weights)
    except ChiptagError as exc:
        return f"models.{index} ({network.name}): {exc}"
    return None


def check_can_run(s: Settings) -> None:
    """The active entry's backbone and weights, and training.device (under torchrun each rank's device is the
    launcher's, so training.device is not read)."""
    problem = entry_problem(s.active_model_index, s.network)
    if problem:
        raise ChiptagError(problem)
    if not distributed.active():
        resolve_device(s.device, "training.device")


def check_sweep(entries: list[Settings]) -> None:
    """Every entry of a sweep, all at once: one error listing each entry that cannot run, before any trains."""
    problems = [p for s in entries if (p := entry_problem(s.active_model_index, s.network))]
    if problems:
        raise ChiptagError(f"{len(problems)} of {len(entries)} models entries cannot run; nothing was trained:\n  "
                           + "\n  ".join(problems))
    if entries and not distributed.active():
        resolve_device(entries[0].device, "training.device")
