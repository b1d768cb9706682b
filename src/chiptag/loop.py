"""The epoch loop: phases in order, evaluate -> log -> checkpoint -> scheduler, resumable at any step.

Each phase (finetune.plan: head on cached features, then optionally unfrozen stages on images) has its own
optimizer and LR schedule. After every epoch, and when SIGINT/SIGTERM arrives mid-epoch, the loop state goes to
`resume.pt` (chiptag.resume), so `chiptag train --resume` continues exactly where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from chiptag import distributed, finetune, metrics, resume as resume_mod
from chiptag.config import Config
from chiptag.engine import evaluate, train_one_epoch
from chiptag.finetune import Phase
from chiptag.interrupt import Interrupted, stop_requested
from chiptag.progress import out


def _optimizer(cfg: Config, phase: Phase, model: nn.Module):
    entry, sc = cfg.model, cfg.training.scheduler
    opt = torch.optim.Adam(phase.param_groups(model), lr=entry.learning_rate,
                           weight_decay=entry.weight_decay)  # the optimizer sees trainable parameters only
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=sc.factor, patience=sc.patience,
                                                       min_lr=sc.min_lr)
    return opt, sched


def _train_part(cfg, phase, ld, opt, loss_fn, device, epoch: int, st: resume_mod.LoopState) -> dict:
    if st.epoch_gen_state is None:
        st.epoch_gen_state = ld.gen.get_state()
    ld.gen.set_state(st.epoch_gen_state)  # a resumed epoch replays its batch order
    if hasattr(getattr(ld.train, "sampler", None), "set_epoch"):  # DistributedSampler: new shuffle per epoch
        ld.train.sampler.set_epoch(epoch)
    return train_one_epoch(ld.model, ld.train, loss_fn, opt, device, epoch=epoch,
                           show_progress=cfg.training.progress and phase.name != "head", start_step=st.step,
                           totals=st.totals, should_stop=stop_requested, **phase.step)


def _run_phase(cfg, k: int, phase: Phase, ld, opt, sched, loss_fn, device, tracker, on_best, run_dir: Path,
               st: resume_mod.LoopState, first: int, last: int, ctx: dict) -> None:
    total = cfg.model.epochs
    for epoch in range(first, last + 1):
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        tr = _train_part(cfg, phase, ld, opt, loss_fn, device, epoch, st)
        if "stopped_at" in tr:
            st.step, st.totals, st.phase = tr["stopped_at"], tr["totals"], k
            path = resume_mod.save(run_dir, st, ctx["tagger"], ctx["head_only"], opt, sched)
            raise Interrupted(stop_requested(), f"training stopped at epoch {epoch}, step {st.step}; "
                                                f"state saved to {path}")
        ev = evaluate(ld.model, ld.val, loss_fn, device)
        f2 = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], 0.5))
        row = {"train/loss": distributed.mean(tr["loss"]),  # each rank saw its shard
               "val/loss": ev["loss"], "val/f2": f2, "lr": lr, "seconds": time.perf_counter() - t0}
        tracker.log_scalars(epoch, row)
        st.history.append({"epoch": epoch, "phase": phase.name, **row})
        out.print(f"epoch {epoch:>3}/{total}  train/loss {row['train/loss']:.4f}  val/loss {ev['loss']:.4f}"
                  f"  val/f2 {f2:.4f}  lr {lr:.2e}  ({row['seconds']:.1f}s)"
                  + (f"  ({phase.name})" if ctx["n_phases"] > 1 else ""))
        if f2 > st.best_f2:  # the checkpoint follows validation F2, the task's metric
            st.mark_best(epoch, f2, ctx["tagger"], ctx["head_only"])
            on_best(epoch)
        sched.step(ev["loss"])
        st.epoch, st.step, st.totals, st.epoch_gen_state, st.phase = epoch, 0, (0.0, 0), ld.gen.get_state(), k
        path = resume_mod.save(run_dir, st, ctx["tagger"], ctx["head_only"], opt, sched)  # last good state
        if stop_requested() and epoch < total:
            raise Interrupted(stop_requested(), f"training stopped after epoch {epoch}; state saved to {path}")


def epoch_loop(cfg: Config, phases: list[Phase], tagger, loss_fn: nn.Module, device: torch.device, tracker,
               on_best, run_dir: Path, saved: dict | None = None):
    """-> (LoopState with history and best state, the last phase's loaders)."""
    ctx = {"tagger": tagger, "head_only": all(p.name == "head" for p in phases), "n_phases": len(phases)}
    st = resume_mod.restore_model(saved, tagger) if saved else resume_mod.LoopState()
    ld, start = None, 0
    for k, phase in enumerate(phases):
        end = start + phase.epochs
        if end <= st.epoch:  # finished before the interruption
            start = end
            continue
        ld = phase.loaders()
        opt, sched = _optimizer(cfg, phase, ld.model)
        if saved is not None:
            same = st.phase == k  # else the saved optimizer belongs to a finished phase
            resume_mod.restore_training(saved, opt if same else None, sched if same else None)
            saved = None
        with finetune.torch_threads(phase.threads):
            _run_phase(cfg, k, phase, ld, opt, sched, loss_fn, device, tracker, on_best, run_dir, st,
                       max(st.epoch, start) + 1, end, ctx)
        start = end
    if ld is None:  # every epoch was done before the interruption: only the final evaluation is left
        ld = phases[-1].loaders()
        if saved is not None:
            resume_mod.restore_training(saved)
    return st, ld
