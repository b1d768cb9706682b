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


@dataclass
class EpochResult:
    loss: float  # mean training loss over the samples seen
    totals: tuple[float, int] = (0.0, 0)  # loss sum and sample count so far (to continue a stopped epoch)
    stopped_at: int | None = None  # steps done when a stop request ended the epoch early; None: it completed


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, step: Step, *, epoch: int = 0,
                    resume: EpochResult | None = None, should_stop=None) -> EpochResult:
    """One pass over `loader`. To continue an interrupted epoch: the same loader order (its generator reset to
    the epoch's start) and `resume` = the stopped epoch's result (its steps are skipped, its totals kept).
    `should_stop` is polled after each optimiser step; when it fires, the result has `stopped_at`."""
    model.train()
    start_step = (resume.stopped_at or 0) if resume is not None else 0
    total, count = resume.totals if resume is not None else (0.0, 0)
    device = step.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=step.amp and device.type == "cuda")
    fmt = torch.channels_last if step.channels_last else torch.preserve_format
    optimizer.zero_grad(set_to_none=True)
    with progress_bar(len(loader.dataset), f"epoch {epoch}", enabled=step.show_progress) as advance:
        for i, (x, y) in enumerate(loader):
            if i < start_step:  # done before the interruption (the batches still come in the same order)
                continue
            x = x.to(device, non_blocking=True).float()
            if x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True).float()
            with autocast:
                loss = step.loss_fn(model(x).float(), y)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss.item()} at epoch {epoch}, step {i}; the last good checkpoint is kept. "
                    "Try a lower learning rate (model.learning_rate), and check the inputs (chiptag validate).")
            (loss / step.accum_steps).backward()
            stepped = (i + 1) % step.accum_steps == 0 or i + 1 == len(loader)
            if stepped:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(x)
            count += len(x)
            advance(len(x))
            # stop only on an optimiser-step boundary, so no accumulated gradient is lost
            if stepped and should_stop is not None and should_stop() and i + 1 < len(loader):
                return EpochResult(total / max(count, 1), (total, count), stopped_at=i + 1)
    return EpochResult(total / max(count, 1), (total, count))


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """-> (logits (N, C), targets (N, C) or the loader's second item)."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        logits.append(model(x.to(device).float()).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


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
