"""The epoch loop: phases in order; per epoch train -> evaluate -> log -> checkpoint -> scheduler.

The loop owns the optimizer and LR schedule of each phase, the best-state tracking (`training.select`:
validation loss, F2 at 0.5 or F2 at tuned thresholds; training.select) and the checkpoint of the best epoch.
Its state is a `LoopState` (training.resume); after every epoch, and when SIGINT/SIGTERM arrives mid-epoch, it
goes to resume.pt, so `chiptag train --resume` continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from chiptag import distributed
from chiptag.config import Config
from chiptag.evaluation import metrics
from chiptag.interrupt import Interrupted, stop_requested
from chiptag.models import checkpoint
from chiptag.models.checkpoint import ModelCard
from chiptag.models.head import Tagger
from chiptag.progress import out
from chiptag.runs.layout import RunDir
from chiptag.training import resume as resume_mod, select
from chiptag.training.epoch import EpochResult, Step, evaluate, train_one_epoch
from chiptag.training.phases import HEAD, Inputs, Phase
from chiptag.training.resume import LoopState

OPTIMIZERS = {
    "adam": lambda groups, e: torch.optim.Adam(groups, lr=e.learning_rate, weight_decay=e.weight_decay),
    "adamw": lambda groups, e: torch.optim.AdamW(groups, lr=e.learning_rate, weight_decay=e.weight_decay),
    "sgd": lambda groups, e: torch.optim.SGD(groups, lr=e.learning_rate, momentum=0.9,
                                             weight_decay=e.weight_decay),
}


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: object
    plateau: bool  # ReduceLROnPlateau steps on the validation loss; the others on the epoch


@dataclass
class Fitted:
    """What the loop leaves: its state (history, best epoch and weights) and the last phase's model and inputs
    (for the final evaluation)."""

    state: LoopState
    model: nn.Module
    inputs: Inputs


@contextlib.contextmanager
def torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_optim(cfg: Config, phase: Phase, model: nn.Module) -> Optim:
    """training.optimizer and training.scheduler for one phase; the optimizer sees trainable parameters only."""
    entry, sc = cfg.model, cfg.training.scheduler
    groups = phase.param_groups(model, entry.learning_rate, entry.backbone_lr_mult)
    opt = OPTIMIZERS[entry.optimizer](groups, entry)
    if sc.name == "reduce_on_plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=sc.factor,
                                                           patience=sc.patience, min_lr=sc.min_lr)
    elif sc.name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, phase.epochs), eta_min=sc.min_lr)
    else:  # constant
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return Optim(opt, sched, sc.name == "reduce_on_plateau")


def describe_optim(cfg: Config) -> tuple[str, str]:
    """(optimizer, scheduler) as the summary and the runs table show them."""
    entry, sc = cfg.model, cfg.training.scheduler
    name = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[entry.optimizer]
    opt = f"{name}(lr={entry.learning_rate:g}" + (", momentum=0.9" if entry.optimizer == "sgd" else "")
    opt += f", weight_decay={entry.weight_decay:g})" if entry.weight_decay else ")"
    sched = {"reduce_on_plateau": f"ReduceLROnPlateau(factor={sc.factor:g}, patience={sc.patience})",
             "cosine": f"CosineAnnealingLR(eta_min={sc.min_lr:g})", "constant": "constant"}[sc.name]
    return opt, sched


class Trainer:
    """Runs the phases of one run; `fit` is the whole loop."""

    def __init__(self, cfg: Config, run: RunDir, tagger: Tagger, card: ModelCard, step: Step, tracker):
        self.cfg, self.run, self.tagger, self.card, self.step, self.tracker = cfg, run, tagger, card, step, tracker
        self.head_only = False  # set by fit: what resume.pt and the best state hold
        self.n_phases = 1

    def fit(self, phases: list[Phase], saved: dict | None = None) -> Fitted:
        self.head_only, self.n_phases = all(p.name == HEAD for p in phases), len(phases)
        st = resume_mod.restore_model(saved, self.tagger) if saved else LoopState()
        model, start = None, 0
        for k, phase in enumerate(phases):
            end = start + phase.epochs
            if end <= st.epoch:  # finished before the interruption
                start = end
                continue
            model = phase.model(self.tagger, self.cfg, self.step.device)
            optim = make_optim(self.cfg, phase, model)
            if saved is not None:
                same = st.phase == k  # else the saved optimizer belongs to a finished phase
                resume_mod.restore_training(saved, optim.optimizer if same else None,
                                            optim.scheduler if same else None)
                saved = None
            with torch_threads(phase.threads):
                for epoch in range(max(st.epoch, start) + 1, end + 1):
                    self._epoch(k, phase, model, optim, epoch, st)
            start = end
        if model is None:  # every epoch was done before the interruption: only the final evaluation is left
            model = phases[-1].model(self.tagger, self.cfg, self.step.device)
            if saved is not None:
                resume_mod.restore_training(saved)
        return Fitted(st, model, phases[-1].inputs)

    def _train_part(self, phase: Phase, model: nn.Module, optim: Optim, epoch: int, st: LoopState) -> EpochResult:
        inputs = phase.inputs
        if st.epoch_gen_state is None:
            st.epoch_gen_state = inputs.gen.get_state()
        inputs.gen.set_state(st.epoch_gen_state)  # a resumed epoch replays its batch order
        sampler = getattr(inputs.train, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: a new shuffle per epoch
            sampler.set_epoch(epoch)
        step = self.step
        if phase.name != HEAD:
            tr = self.cfg.training
            step = Step(step.loss_fn, step.device, tr.grad_accum_steps, tr.amp, tr.channels_last, tr.progress)
        resume = EpochResult(0.0, st.totals, st.step) if st.step else None
        return train_one_epoch(model, inputs.train, optim.optimizer, step, epoch=epoch, resume=resume,
                               should_stop=stop_requested)

    def _epoch(self, k: int, phase: Phase, model: nn.Module, optim: Optim, epoch: int, st: LoopState) -> None:
        t0 = time.perf_counter()
        lr = optim.optimizer.param_groups[0]["lr"]
        tr = self._train_part(phase, model, optim, epoch, st)
        if tr.stopped_at is not None:
            st.step, st.totals, st.phase = tr.stopped_at, tr.totals, k
            path = self._save_state(st, optim)
            raise Interrupted(stop_requested(), f"training stopped at epoch {epoch}, step {st.step}; "
                                                f"state saved to {path}")
        ev = evaluate(model, phase.inputs.val, self.step.loss_fn, self.step.device)
        f2 = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], 0.5))
        row = {"train/loss": distributed.mean(tr.loss),  # each rank saw its shard
               "val/loss": ev["loss"], "val/f2": f2, "lr": lr}
        best, extra = select.score(self.cfg.training.select, ev, f2)
        row.update(extra, seconds=time.perf_counter() - t0)
        self.tracker.log_scalars(epoch, row)
        st.history.append({"epoch": epoch, "phase": phase.name, **row})
        out.print(f"epoch {epoch:>3}/{self.cfg.model.epochs}  train/loss {row['train/loss']:.4f}  "
                  f"val/loss {ev['loss']:.4f}  val/f2 {f2:.4f}  lr {lr:.2e}  ({row['seconds']:.1f}s)"
                  + (f"  ({phase.name})" if self.n_phases > 1 else ""))
        if best > st.best_score:
            st.mark_best(epoch, best, self.tagger, self.head_only)
            self.save_checkpoint(None, epoch)
        if optim.plateau:
            optim.scheduler.step(ev["loss"])
        else:
            optim.scheduler.step()
        st.epoch, st.step, st.totals, st.phase = epoch, 0, (0.0, 0), k
        st.epoch_gen_state = phase.inputs.gen.get_state()
        path = self._save_state(st, optim)  # the last good state
        if stop_requested() and epoch < self.cfg.model.epochs:
            raise Interrupted(stop_requested(), f"training stopped after epoch {epoch}; state saved to {path}")

    def _save_state(self, st: LoopState, optim: Optim):
        return resume_mod.save(self.run.resume, st, self.tagger, self.head_only, optim.optimizer, optim.scheduler)

    def save_checkpoint(self, thresholds, epoch: int) -> None:
        """The tagger as it is now (rank 0 only); thresholds None during training (see checkpoint.save)."""
        if distributed.is_main():
            checkpoint.save(self.run.checkpoint, self.tagger, self.card, thresholds, epoch)
