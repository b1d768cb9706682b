"""Resumable training state: the run dir's resume.pt (runs.layout), written at each epoch end and on
SIGINT/SIGTERM.

It holds what the next step depends on — the trained module, optimizer, scheduler, epoch and step, the loss
sums of an unfinished epoch, the history, the best state so far, and every random state (global torch,
numpy, python, and the shuffling generator as it was when the unfinished epoch began, so that epoch's
batches come again in the same order). With the same seed a resumed run therefore reproduces an
uninterrupted one exactly. The file is removed when the run completes.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chiptag.atomic import torch_save
from chiptag.errors import ChiptagError

FORMAT = 2  # 2: training phases; the trained part saved as {"head"} or {"tagger"}


@dataclass
class LoopState:
    epoch: int = 0  # last completed epoch
    step: int = 0  # steps done in epoch+1 (0: at an epoch boundary)
    totals: tuple[float, int] = (0.0, 0)  # loss sum and sample count of the unfinished epoch
    history: list[dict] = field(default_factory=list)
    best_score: float = float("-inf")  # of training.select, higher is better (val_loss: its negative)
    best_epoch: int | None = None
    best_state: dict | None = None
    epoch_gen_state: torch.Tensor | None = None  # shuffling generator at the start of the unfinished epoch
    phase: int = 0  # index of the training phase the saved optimizer and scheduler belong to

    def mark_best(self, epoch: int, score: float, tagger, head_only: bool) -> None:
        self.best_score, self.best_epoch = score, epoch
        self.best_state = copy.deepcopy(trained_state(tagger, head_only))


def trained_state(tagger, head_only: bool) -> dict:
    """What training changes: the head alone while the backbone stays frozen throughout (small, so saving it
    every epoch is cheap), else the whole tagger."""
    return {"head": tagger.head.state_dict()} if head_only else {"tagger": tagger.state_dict()}


def load_trained_state(tagger, state: dict) -> None:
    if "tagger" in state:
        tagger.load_state_dict(state["tagger"])
    else:
        tagger.head.load_state_dict(state["head"])


def rng_states() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain tensors, ints and tuples only, so the file loads with torch.load(weights_only=True)
    out = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(cached)),
           "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(path: Path, st: LoopState, tagger, head_only: bool, optimizer, scheduler, ema=None) -> Path:
    """ema: the phase's weight average (training.loop.WeightEMA.model), when it keeps one."""
    obj = {"format": FORMAT, "state": vars(st), "module": trained_state(tagger, head_only),
           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()}
    if ema is not None:
        obj["ema"] = ema.state_dict()
    torch_save(obj, path)
    return path


def load(path: Path) -> dict | None:
    """The saved state, or None when the run stopped before its first epoch ended (start from epoch 1). Heads
    trained together save theirs in this format too (training.heads), marked "together"."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ChiptagError(f"cannot read {path} ({exc.__class__.__name__}); the run cannot be resumed from "
                           "it — start a new run") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else None
        raise ChiptagError(f"{path} is not a resume state this chiptag can read (format {found!r}, "
                           f"expected {FORMAT})")
    return obj


def _schedule_kind(state: dict) -> str:
    """Which schedule a scheduler's state_dict belongs to (training.loop.make_optim's kinds)."""
    if "lr_lambdas" in state:  # LambdaLR: the fine-tuning warm-up/cosine saves its factor objects; constant a lambda
        per_step = any(isinstance(f, dict) for f in state["lr_lambdas"])
        return "per-step warm-up/cosine" if per_step else "constant"
    return "reduce on plateau" if "patience" in state else "cosine per epoch" if "T_max" in state else "unknown"


def restore_model(obj: dict, tagger) -> LoopState:
    """First half of a resume: the trained weights and the loop's bookkeeping."""
    load_trained_state(tagger, obj["module"])
    return loop_state(obj["state"])


def loop_state(saved: dict) -> LoopState:
    """The loop's bookkeeping as saved (vars(LoopState)) -> LoopState."""
    state = dict(saved)
    state["totals"] = tuple(state["totals"])
    if "best_f2" in state:  # saved before training.select existed: the score was validation F2 at 0.5
        state["best_score"] = state.pop("best_f2")
    return LoopState(**state)


def restore_training(obj: dict, optimizer=None, scheduler=None, ema=None) -> None:
    """Second half, once the interrupted phase is reached: its optimizer, scheduler and weight average (None
    when the saved ones belong to an earlier, finished phase), and every random state."""
    if optimizer is not None:
        if _schedule_kind(obj["scheduler"]) != _schedule_kind(scheduler.state_dict()):
            raise ChiptagError(
                f"the saved learning-rate schedule ({_schedule_kind(obj['scheduler'])}) is not the one this run's "
                f"config asks for ({_schedule_kind(scheduler.state_dict())}): the run's config.yaml was changed, or "
                "an older chiptag wrote the state (fine-tuning now defaults to model.finetune_scheduler: cosine). "
                "Resume with the schedule it was started with, or start a new run")
        optimizer.load_state_dict(obj["optimizer"])
        scheduler.load_state_dict(obj["scheduler"])
    if ema is not None and "ema" in obj:
        ema.load_state_dict(obj["ema"])
    set_rng_states(obj["rng"])
