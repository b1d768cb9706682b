"""Small pure epoch functions shared by head-on-features and end-to-end training.

`train_one_epoch` and `evaluate` take a model, a loader of (inputs, targets) and return plain dicts; the
orchestrator (train.py) owns logging, checkpoints and the scheduler.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from chiptag.errors import ChiptagError
from chiptag.progress import progress_bar


class NonFiniteLoss(ChiptagError):
    """The loss became NaN or Inf."""


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, *, epoch: int = 0, show_progress: bool = False, start_step: int = 0,
                    totals: tuple[float, int] = (0.0, 0), should_stop=None, accum_steps: int = 1,
                    amp: bool = False, channels_last: bool = False) -> dict[str, float]:
    """One pass over `loader`. To continue an interrupted epoch: the same loader order (its generator reset to
    the epoch's start), `start_step` = steps already done and their `totals`. `should_stop` is polled after
    each optimiser step; when it fires, the result has "stopped_at" = the number of steps done.
    accum_steps: gradients of that many batches are summed before one optimiser step (a larger effective
    batch in the same memory). amp: bf16 autocast, CUDA only (no loss scaling needed for bf16)."""
    model.train()
    total, count = totals
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    fmt = torch.channels_last if channels_last else torch.preserve_format
    optimizer.zero_grad(set_to_none=True)
    with progress_bar(len(loader.dataset), f"epoch {epoch}", enabled=show_progress) as advance:
        for step, (x, y) in enumerate(loader):
            if step < start_step:  # done before the interruption (the batches still come in the same order)
                continue
            x = x.to(device, non_blocking=True).float()
            if x.dim() == 4:
                x = x.contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True).float()
            with autocast:
                loss = loss_fn(model(x).float(), y)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss.item()} at epoch {epoch}, step {step}; the last good checkpoint is kept. "
                    "Try a lower learning rate (model.learning_rate), and check the inputs (chiptag validate).")
            (loss / accum_steps).backward()
            stepped = (step + 1) % accum_steps == 0 or step + 1 == len(loader)
            if stepped:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(x)
            count += len(x)
            advance(len(x))
            # stop only on an optimiser-step boundary, so no accumulated gradient is lost
            if stepped and should_stop is not None and should_stop() and step + 1 < len(loader):
                return {"loss": total / max(count, 1), "stopped_at": step + 1, "totals": (total, count)}
    return {"loss": total / max(count, 1)}


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
