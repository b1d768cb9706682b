"""The epoch loop of one fold: phases in order; per epoch train -> evaluate -> log -> select -> checkpoint ->
schedule.

`fit` owns the optimizer and LR schedule of each phase and the best state (`training.select`: validation loss,
F2 at 0.5 or F2 at tuned thresholds). Its state is a `LoopState` (training.resume); after every epoch, and when
SIGINT/SIGTERM arrives mid-epoch, it goes to the fold's resume.pt, so `chiptag train --resume` continues exactly
where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from chiptag import distributed
from chiptag.evaluation import metrics
from chiptag.interrupt import Interrupted, stop_requested
from chiptag.models import checkpoint
from chiptag.models.checkpoint import ModelCard
from chiptag.models.head import Tagger
from chiptag.progress import out
from chiptag.training import resume as resume_mod, select as select_mod
from chiptag.training.epoch import EpochResult, evaluate, train_one_epoch
from chiptag.training.folds import Fold
from chiptag.training.phases import HEAD, Inputs, Phase
from chiptag.training.resume import LoopState
from chiptag.training.settings import Optimisation

OPTIMIZERS = {
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.learning_rate, weight_decay=o.weight_decay),
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.learning_rate, weight_decay=o.weight_decay),
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.learning_rate, momentum=0.9, weight_decay=o.weight_decay),
}


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    plateau: bool  # ReduceLROnPlateau steps on the validation loss; the others on the epoch
    per_step: bool = False  # the fine-tuning phase's own schedule: stepped after every optimiser step

    def step_schedule(self, val_loss: float) -> None:
        """At an epoch's end (a per-step schedule has moved with the steps already)."""
        if self.per_step:
            return
        if self.plateau:
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()


@dataclass
class Fitted:
    """What the loop leaves: its state (history, best epoch and weights) and the last phase's model and inputs
    (for the final evaluation)."""

    state: LoopState
    model: nn.Module
    inputs: Inputs


@contextlib.contextmanager
def training_compute(threads: int | None):
    """Training's CPU settings for the block: `threads` intra-op threads (None: as they are), and subnormal
    floats flushed to zero on this thread. Late in head training some products in the backward matmuls fall
    into the subnormal range (< 1.2e-38), where a CPU computes ~10-100x slower: on the demo's five batched fold
    heads the backward `bmm` calls of epoch 36 took 3.9 ms each unflushed, 0.38 ms flushed (torch.profiler);
    the epochs went from 0.2-0.6 s to 0.1 s, `--folds 5` from 20.1 s to 16.5 s (whole process). Flushing values
    that small changes nothing a head learns: the demo's figures are identical to the fourth decimal. Both
    settings are restored after (flushing is off by default in torch)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def make_optim(optim: Optimisation, phase: Phase, model: nn.Module) -> Optim:
    """The optimizer and LR schedule of one phase; the optimizer sees trainable parameters only."""
    opt = OPTIMIZERS[optim.optimizer](phase.param_groups(model, optim), optim)
    if phase.name != HEAD and optim.finetune_scheduler != "training":
        steps = phase.epochs * math.ceil(len(phase.inputs.train) / optim.grad_accum_steps)
        lambdas = [WarmupCosine(optim.finetune_scheduler, steps, optim.warmup_epochs / phase.epochs,
                                 optim.min_lr / g["lr"], warm=i > 0 or optim.finetune_scheduler == "onecycle")
                   for i, g in enumerate(opt.param_groups)]
        return Optim(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas), plateau=False, per_step=True)
    if optim.scheduler == "reduce_on_plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=optim.factor,
                                                           patience=optim.patience, min_lr=optim.min_lr)
    elif optim.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, phase.epochs), eta_min=optim.min_lr)
    else:  # constant
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return Optim(opt, sched, optim.scheduler == "reduce_on_plateau")


class WarmupCosine:
    """The fine-tuning phase's learning-rate factor at optimiser step s of `steps` (torch LambdaLR): a linear
    warm-up over the first `warm_frac` of the steps (from 0, or from 1/25 for onecycle; only where `warm`:
    the newly unfrozen groups), then a cosine to `floor` (min_lr / the group's rate)."""

    def __init__(self, kind: str, steps: int, warm_frac: float, floor: float, warm: bool):
        self.start = 1 / 25 if kind == "onecycle" else 0.0
        self.steps, self.floor, self.warm = max(1, steps), min(max(floor, 0.0), 1.0), warm
        self.warm_steps = min(self.steps, round(warm_frac * self.steps))

    def __call__(self, s: int) -> float:
        if s < self.warm_steps:
            return self.start + (1 - self.start) * (s + 1) / self.warm_steps if self.warm else 1.0
        t = (s - self.warm_steps) / max(1, self.steps - self.warm_steps)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class WeightEMA:
    """The exponential moving average of a tagger's weights (torch.optim.swa_utils.AveragedModel, buffers
    included: BatchNorm statistics are averaged too). The decay warms up as timm's ModelEmaV3 does,
    min(decay, (1 + n) / (10 + n)) after n updates, so a short fine-tune is not dominated by its start."""

    def __init__(self, tagger: Tagger, decay: float):
        def ema(averaged: list[torch.Tensor], current: list[torch.Tensor], n) -> None:
            d = min(decay, (1 + int(n)) / (10 + int(n)))
            if averaged[0].is_floating_point():
                torch._foreach_lerp_(averaged, current, 1 - d)
            else:  # integer buffers (BatchNorm's batch count) follow the model
                for a, c in zip(averaged, current):
                    a.copy_(c)

        self.model = torch.optim.swa_utils.AveragedModel(tagger, multi_avg_fn=ema, use_buffers=True)
        self.tagger = self.model.module  # the averaged tagger: what validation scores and the checkpoint keeps
        self.source = tagger

    def update(self) -> None:
        self.model.update_parameters(self.source)


def fit(fold: Fold, phases: list[Phase], tagger: Tagger, optim: Optimisation, select: str, card: ModelCard,
        saved: dict | None, progress: bool) -> Fitted:
    """Train `tagger` on `fold` through `phases`; `saved` is the fold's resume state (None: from epoch 1).
    The tagger is left with its last epoch's weights; the best are in the returned state."""
    head_only = all(p.name == HEAD for p in phases)  # what resume.pt and the best state hold
    st = resume_mod.restore_model(saved, tagger) if saved else LoopState()
    model, start = None, 0
    for k, phase in enumerate(phases):
        end = start + phase.epochs
        if end <= st.epoch:  # finished before the interruption
            start = end
            continue
        model = phase.model(tagger, optim, fold.device)
        opt = make_optim(optim, phase, model)
        step = phase.step(fold.loss_fn, fold.device, optim, progress)
        ema = WeightEMA(tagger, optim.ema_decay) if optim.ema_decay and phase.name != HEAD else None
        if saved is not None:  # the saved optimizer belongs to this phase only if it stopped in it
            same = st.phase == k
            resume_mod.restore_training(saved, opt.optimizer if same else None, opt.scheduler if same else None,
                                        ema.model if ema and same else None)
            saved = None
        scored = ema.tagger if ema else tagger  # what validation scores and the best state keeps

        def after_update() -> None:
            if opt.per_step:
                opt.scheduler.step()
            if ema is not None:
                ema.update()

        def save_state() -> str:
            return resume_mod.save(fold.run.resume, st, tagger, head_only, opt.optimizer, opt.scheduler,
                                   ema.model if ema else None)

        with training_compute(phase.threads):
            for epoch in range(max(st.epoch, start) + 1, end + 1):
                t0 = time.perf_counter()
                tr = _train_part(phase, model, opt, step, epoch, st, after_update)
                if tr.stopped_at is not None:  # SIGINT/SIGTERM mid-epoch: keep the steps done so far
                    st.step, st.totals, st.phase = tr.stopped_at, tr.totals, k
                    raise Interrupted(stop_requested(), f"training stopped at epoch {epoch}, step {st.step}; "
                                                        f"state saved to {save_state()}")
                # the rates the epoch ended with (a per-step schedule moves within the epoch; resumed or not, the
                # end is the same): the head's, and the lowest of an unfrozen backbone's
                lr = opt.optimizer.param_groups[0]["lr"]
                backbone_lr = min(g["lr"] for g in opt.optimizer.param_groups[1:]) if phase.name != HEAD else None
                ev = evaluate(scored if ema else model, phase.inputs.val, fold.loss_fn, fold.device)
                f2 = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], 0.5))
                row = {"train/loss": distributed.mean(tr.loss),  # each rank saw its shard
                       "val/loss": ev["loss"], "val/f2": f2, "lr": lr}
                if backbone_lr is not None:
                    row["lr/backbone"] = backbone_lr
                score, extra = select_mod.score(select, ev, f2)
                row.update(extra, seconds=time.perf_counter() - t0)
                fold.tracker.log_scalars(epoch, row)
                st.history.append({"epoch": epoch, "phase": phase.name, **row})
                out.print(f"epoch {epoch:>3}/{optim.epochs}  train/loss {row['train/loss']:.4f}  "
                          f"val/loss {ev['loss']:.4f}  val/f2 {f2:.4f}  lr {lr:.2e}"
                          + (f" (backbone {backbone_lr:.2e})" if backbone_lr is not None else "")
                          + f"  ({row['seconds']:.1f}s)"
                          + (f"  ({phase.name})" if len(phases) > 1 else ""))
                if score > st.best_score:
                    st.mark_best(epoch, score, scored, head_only)
                    if fold.checkpoint_each_best and distributed.is_main():
                        checkpoint.save(fold.run.checkpoint, scored, card, None, epoch)
                opt.step_schedule(ev["loss"])
                st.epoch, st.step, st.totals, st.phase = epoch, 0, (0.0, 0), k
                st.epoch_gen_state = phase.inputs.gen.get_state()
                path = save_state()  # the last good state
                if stop_requested() and epoch < optim.epochs:
                    raise Interrupted(stop_requested(), f"training stopped after epoch {epoch}; state saved to "
                                                        f"{path}")
        start = end
    if model is None:  # every epoch was done before the interruption: only the final evaluation is left
        model = phases[-1].model(tagger, optim, fold.device)
        if saved is not None:
            resume_mod.restore_training(saved)
    return Fitted(st, model, phases[-1].inputs)


def _train_part(phase: Phase, model: nn.Module, opt: Optim, step, epoch: int, st: LoopState,
                after_update) -> EpochResult:
    """train_one_epoch, continuing an interrupted epoch: the same batch order (the shuffling generator as it
    was when the epoch began) and the steps already done skipped."""
    inputs = phase.inputs
    if st.epoch_gen_state is None:
        st.epoch_gen_state = inputs.gen.get_state()
    inputs.gen.set_state(st.epoch_gen_state)  # a resumed epoch replays its batch order
    if hasattr(inputs.train, "set_epoch"):  # image batches: the augmentation's draw, a DistributedSampler's shuffle
        inputs.train.set_epoch(epoch)
    resume = EpochResult(0.0, st.totals, st.step) if st.step else None
    return train_one_epoch(model, inputs.train, opt.optimizer, step, epoch=epoch, resume=resume,
                           should_stop=stop_requested, after_update=after_update)
