"""Small pure epoch functions shared by head-on-features and end-to-end training.

`train_one_epoch` and `evaluate` take a model and a loader of (inputs, targets) and return results; the epoch
loop (training.loop) owns logging, checkpoints, the optimizer and the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from chiptag.errors import ChiptagError
from chiptag.progress import progress_bar


class NonFiniteLoss(ChiptagError):
    """The loss became NaN or Inf."""


@dataclass(frozen=True)
class Step:
    """How one training step runs: the loss, the device and the step options of the phase.
    accum_steps: gradients of that many batches are summed before one optimiser step (a larger effective
    batch in the same memory). amp: bf16 autocast, CUDA only (no loss scaling needed for bf16)."""

    loss_fn: nn.Module
    device: torch.device
    accum_steps: int = 1
    amp: bool = False
    channels_last: bool = False
    show_progress: bool = False
    clip_grad_norm: float | None = None  # the gradients' global norm is clipped to this before each update


@dataclass
class EpochResult:
    loss: float  # mean training loss over the samples seen
    totals: tuple[float, int] = (0.0, 0)  # loss sum and sample count so far (to continue a stopped epoch)
    stopped_at: int | None = None  # steps done when a stop request ended the epoch early; None: it completed


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, step: Step, *, epoch: int = 0,
                    resume: EpochResult | None = None, should_stop=None, after_update=None) -> EpochResult:
    """One pass over `loader`. To continue an interrupted epoch: the same loader order (its generator reset to
    the epoch's start) and `resume` = the stopped epoch's result (its steps are skipped, its totals kept).
    `after_update` runs after each optimiser step (a per-step LR schedule, the weights' EMA).
    `should_stop` is polled after each optimiser step; when it fires, the result has `stopped_at`.
    On CUDA the step losses stay on the device until the epoch ends (no host sync per batch)."""
    model.train()
    start_step = (resume.stopped_at or 0) if resume is not None else 0
    losses = StepLosses(epoch, start_step, resume.totals if resume is not None else (0.0, 0),
                        deferred=step.device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=step.amp and step.device.type == "cuda")
    fmt = torch.channels_last if step.channels_last else torch.preserve_format
    optimizer.zero_grad(set_to_none=True)
    with progress_bar(len(loader.dataset), f"epoch {epoch}", enabled=step.show_progress) as advance:
        for i, (x, y) in enumerate(loader):
            if i < start_step:  # done before the interruption (the batches still come in the same order)
                continue
            x = x.to(step.device, non_blocking=True).float()
            if x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            y = y.to(step.device, non_blocking=True).float()
            with autocast:
                loss = step.loss_fn(model(x).float(), y)
            losses.add(loss.detach(), len(x))
            (loss / step.accum_steps).backward()
            stepped = (i + 1) % step.accum_steps == 0 or i + 1 == len(loader)
            if stepped:
                if step.clip_grad_norm:
                    nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                             step.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if after_update is not None:
                    after_update()
            advance(len(x))
            # stop only on an optimiser-step boundary, so no accumulated gradient is lost
            if stepped and should_stop is not None and should_stop() and i + 1 < len(loader):
                return losses.result(stopped_at=i + 1)
    return losses.result()


class StepLosses:
    """The losses of an epoch's steps: checked for NaN/Inf and summed at once per step (CPU) or per epoch
    (deferred: CUDA, where each check would be a host round trip)."""

    def __init__(self, epoch: int, first_step: int, totals: tuple[float, int], deferred: bool):
        self.epoch, self.first_step, self.deferred = epoch, first_step, deferred
        self.total, self.count = totals
        self.pending: list[tuple[torch.Tensor, int]] = []

    def add(self, loss: torch.Tensor, n: int) -> None:
        self.pending.append((loss, n))
        if not self.deferred:
            self._drain()

    def _drain(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for v, _ in self.pending]).float().cpu()  # the one sync
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            k = int(bad[0])
            raise NonFiniteLoss(
                f"loss is {values[k].item()} at epoch {self.epoch}, step {self.first_step + k}; the last good "
                "checkpoint is kept. Try a lower learning rate (model.learning_rate), and check the inputs "
                "(chiptag validate).")
        self.total += float(sum(v.item() * n for v, (_, n) in zip(values, self.pending)))
        self.count += sum(n for _, n in self.pending)
        self.first_step += len(self.pending)
        self.pending.clear()

    def result(self, stopped_at: int | None = None) -> EpochResult:
        self._drain()
        return EpochResult(self.total / max(self.count, 1), (self.total, self.count), stopped_at=stopped_at)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """-> (logits (N, C), targets (N, C) or the loader's second item)."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:  # results stay on the device until the end: one copy, not one per batch
        logits.append(model(x.to(device).float()).float())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits).cpu().numpy(), torch.cat([t.to(device) for t in targets]).cpu().numpy()


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> dict:
    """-> {"loss": float, "probs": (N, C) array, "targets": (N, C) array}."""
    logits, targets = predict(model, loader, device)
    loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(targets).float()).item()
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return {"loss": float(loss), "probs": probs, "targets": targets.astype(np.uint8)}


def pos_weight(y_train: np.ndarray, max_weight: float) -> torch.Tensor:
    """Per-class negatives/positives on the train split, clamped (see TrainingConfig.pos_weight_max)."""
    pos = y_train.sum(axis=0).astype(np.float64)
    neg = len(y_train) - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1), max_weight)
    return torch.tensor(np.clip(w, 1e-3, max_weight), dtype=torch.float32)
