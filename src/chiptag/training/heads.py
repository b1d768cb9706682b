"""The heads of a k-fold run's folds trained together: one batched model over the same cached features.

K fold heads are tiny MLPs on the same features; one after another, most of each step is per-call overhead
(benchmarks/head_batching.py). Here their weights are stacked along a fold dimension (K, out, in) and one step
runs every fold's batch through grouped matmuls (`torch.baddbmm`), while each fold keeps everything the epoch
loop (training.loop.fit) gives it: its own head module (the optimizer's parameters are views into the stacked
weights), its own optimizer and LR schedule (`make_optim`: the same classes, so ReduceLROnPlateau reacts to its
own validation loss), its own batch order, view choice and dropout masks, its own best epoch (training.select),
history, metrics.jsonl and fold.json. Folds of different sizes are padded to the largest batch and masked; a fold
whose epoch has no batch left at a step is not stepped at all.

Same numbers as one at a time: fold k's randomness is what the one-at-a-time loop draws. Its head starts from
seed + k; its dropout masks come from a generator started where the global RNG stood after that head was built
(the loop draws them from the global RNG from there on, with the same `bernoulli_` call); its batch order and
views from a generator seeded like the loop's (`phases.feature_inputs`). So per-fold figures match the
sequential path within float tolerance (grouped vs single matmuls; tests/training/test_heads.py).

Resume: one state for the batch, `resume-heads.pt` in the run dir (every fold's head, optimizer, scheduler, loop
state and generators), written at an epoch's end — at most every SAVE_EVERY_S seconds (a save of K heads and
their Adam moments per epoch cost ~10% of head training), always when SIGINT/SIGTERM asked to stop. A stop
request finishes the current epoch (a fraction of a second for K heads) before saving. A fold left inside the
one-at-a-time loop by an older run (its fold-k/resume.pt) resumes there (training.main).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chiptag.atomic import torch_save
from chiptag.errors import ChiptagError
from chiptag.evaluation import metrics
from chiptag.features.views import RandomViewSampler, TensorBatches, ViewAverage
from chiptag.interrupt import Interrupted, stop_requested
from chiptag.models.head import HeadSpec, Tagger
from chiptag.progress import out
from chiptag.runs.layout import RunDir
from chiptag.training import resume as resume_mod, select as select_mod
from chiptag.training.epoch import NonFiniteLoss, evaluate
from chiptag.training.folds import Fold
from chiptag.training.loop import Optim, make_optim, training_compute
from chiptag.training.phases import HEAD, Inputs, Phase
from chiptag.training.resume import LoopState
from chiptag.training.settings import Optimisation

FORMAT = 1
SAVE_EVERY_S = 5.0  # resume-heads.pt at most this often (and always on a stop request)
# One thread, as phases.Phase.threads for one head: on the shared 2-core machine two threads made the batched
# step ~10x slower whenever another job held a core (OpenMP barrier waits); with the cores idle they gain little
# (the step is bound by memory: Adam's moments of K heads).
THREADS = 1


def resume_file(run: RunDir) -> Path:
    return run.path / "resume-heads.pt"


@dataclass
class Member:
    """One fold inside the batch: its head (weights are views of the stacked ones), optimizer and schedule,
    loop state, generators and rows."""

    fold: Fold
    tagger: Tagger  # the frozen backbone + this fold's head (what mark_best, save_done and the finish take)
    opt: Optim
    st: LoopState
    dropout_gen: torch.Generator  # the one-at-a-time loop's global RNG after this head's init
    order_gen: torch.Generator  # the one-at-a-time loop's Inputs.gen: batch order and view choice
    val: TensorBatches

    @property
    def head(self) -> nn.Module:
        return self.tagger.head


class StackedHeads:
    """K heads of one HeadSpec as stacked leaf tensors: layer j's weight (K, in, out) and bias (K, out). Each
    fold's own nn.Linear parameters become views into them, so its state_dict and evaluation see an ordinary
    head while a step runs all K at once; `views[k]` are fold k's parameters as its optimizer steps them."""

    def __init__(self, heads: list[nn.Sequential]):
        self.layers = list(heads[0])
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.views: list[list[nn.Parameter]] = [[] for _ in heads]
        for j, layer in enumerate(self.layers):
            if not isinstance(layer, nn.Linear):
                continue
            # (K, in, out): x @ w with no transpose; w[k].T is the nn.Linear weight (half the step time of
            # (K, out, in) transposed on the fly, whose backward copies the gradients)
            w = torch.stack([h[j].weight.detach().T for h in heads]).contiguous().requires_grad_()
            b = torch.stack([h[j].bias.detach() for h in heads]).requires_grad_()
            for k, h in enumerate(heads):  # views: the same storage
                h[j].weight, h[j].bias = nn.Parameter(w.detach()[k].T), nn.Parameter(b.detach()[k])
                # the optimizer steps the contiguous (in, out) slice: its fused step over a transposed view
                # takes twice as long
                self.views[k] += [nn.Parameter(w.detach()[k]), h[j].bias]
            self.params.append((w, b))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """x (K, B, dim) -> logits (K, B, n_tags); noise: the dropout multipliers (already divided by 1 - p)."""
        linear = iter(self.params)
        for layer in self.layers:
            if isinstance(layer, nn.Dropout):
                x = x if noise is None else x * noise
            elif isinstance(layer, nn.Linear):
                w, b = next(linear)
                x = torch.baddbmm(b.unsqueeze(1), x, w)
            elif isinstance(layer, nn.ReLU):
                x = torch.relu(x)
            else:
                raise ChiptagError(f"heads trained together do not know the layer {layer.__class__.__name__}")
        return x

    def hand_out_grads(self, active: list[int]) -> None:
        """Each active fold's parameters get their slice of the stacked gradients (views, no copy)."""
        stacked = [p.grad for pair in self.params for p in pair]
        for k in active:
            for view, grad in zip(self.views[k], stacked):
                view.grad = grad[k]

    def release(self, heads: list[nn.Sequential]) -> None:
        """Each head gets weights of its own again (a view would carry the whole stacked storage into torch.save
        and deepcopy)."""
        for h in heads:
            for layer in h:
                if isinstance(layer, nn.Linear):
                    layer.weight = nn.Parameter(layer.weight.detach().contiguous())
                    layer.bias = nn.Parameter(layer.bias.detach().clone())

    def zero_grad(self) -> None:
        for pair in self.params:
            for p in pair:
                p.grad = None
        for views in self.views:
            for view in views:
                view.grad = None


class FusedHeadPhase(Phase):
    """The head phase with the optimizer's fused step (one kernel per parameter group: 2.6x faster than the
    default per-tensor step for the plan's head on one CPU thread, the same update within float rounding)."""

    def param_groups(self, model: nn.Module, optim: Optimisation) -> list[dict]:
        return [{**group, "fused": True} for group in super().param_groups(model, optim)]


def batchable(folds: list[Fold], freeze: bool, feats: torch.Tensor | None, optim: Optimisation) -> list[Fold]:
    """The folds that train together: folds of a k-fold run of a frozen backbone on cached features, except one
    an older run left inside the one-at-a-time loop (its own resume.pt: it resumes there)."""
    if not freeze or feats is None or optim.unfreeze_after:
        return []
    return [f for f in folds if f.of_k and not f.run.resume.is_file()]


def eval_batches(feats: torch.Tensor, y: torch.Tensor, idx: np.ndarray, batch_size: int,
                 tta: bool) -> TensorBatches:
    """A split's evaluation batches as phases.feature_inputs builds them: (n, V, dim) rows averaged by
    ViewAverage when TTA, else the identity view."""
    return TensorBatches(feats[:, idx].transpose(0, 1) if tta else feats[0, idx], y[idx], batch_size)


def train_together(folds: list[Fold], spec: HeadSpec, backbone: nn.Module, feats: torch.Tensor, y: np.ndarray,
                   test: np.ndarray, optim: Optimisation, select: str, seed: int, tta: bool,
                   run: RunDir) -> list[tuple[Member, Inputs, float]]:
    """Train the folds' heads as one batched model -> (member, its evaluation inputs, seconds) per fold, each
    tagger holding its last epoch's weights (its best are in member.st.best_state). test: the test split's rows
    (its batches are the finish's); run: where resume-heads.pt goes."""
    device = folds[0].device
    y_t = torch.from_numpy(y)
    if device.type == "cuda":
        feats, y_t = feats.to(device), y_t.to(device)
    tta = feats.shape[0] > 1 and tta
    phase = FusedHeadPhase(HEAD, optim.epochs, None)
    members = []
    for fold in folds:
        fold.run.path.mkdir(exist_ok=True)
        torch.manual_seed(seed + fold.k)  # as the one-at-a-time loop: each head its own start
        tagger = Tagger(backbone, spec.build(), frozen=True).to(device)
        dropout_gen = torch.Generator().set_state(torch.get_rng_state())
        members.append(Member(fold, tagger, None, LoopState(), dropout_gen, torch.Generator().manual_seed(seed),
                              eval_batches(feats, y_t, fold.val, optim.batch_size, tta)))
    stacked = StackedHeads([m.head for m in members])
    for m, views in zip(members, stacked.views):  # the optimizer steps views into the stacked weights
        m.opt = make_optim(optim, phase, nn.ParameterList(views))
    saved = _load(resume_file(run), members)
    t0 = time.perf_counter()
    if saved:
        out.print(f"{len(members)} fold heads: resuming after epoch {members[0].st.epoch}")
    else:
        sizes = ", ".join(f"{len(m.fold.train)}/{len(m.fold.val)}" for m in members)
        out.print(f"{len(members)} fold heads trained together (train/validation images: {sizes})")
    with training_compute(THREADS):
        _epochs(members, stacked, feats, y_t, optim, select, run)
    stacked.release([m.head for m in members])
    seconds = (time.perf_counter() - t0) / len(members)  # the batch's time, shared out
    test_batches = eval_batches(feats, y_t, test, optim.batch_size, tta)
    return [(m, Inputs(None, m.val, test_batches, m.order_gen), seconds) for m in members]


def _epochs(members: list[Member], stacked: StackedHeads, feats: torch.Tensor, y: torch.Tensor,
            optim: Optimisation, select: str, run: RunDir) -> None:
    views, n_all = feats.shape[0], feats.shape[1]
    flat = feats.flatten(0, 1)  # row v * N + i: view v of chip i
    pw = [m.fold.loss_fn.pos_weight for m in members]
    pos_weight = None if pw[0] is None else torch.stack(pw).unsqueeze(1)  # (K, 1, C)
    last_save = time.perf_counter()
    for epoch in range(members[0].st.epoch + 1, optim.epochs + 1):
        t0 = time.perf_counter()
        lrs = [m.opt.optimizer.param_groups[0]["lr"] for m in members]
        train_loss = _train_epoch(members, stacked, flat, n_all, views, y, pos_weight, optim, epoch)
        rows = []
        for m, loss, lr in zip(members, train_loss, lrs):
            ev = evaluate(ViewAverage(m.head), m.val, m.fold.loss_fn, m.fold.device)
            f2 = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], 0.5))
            row = {"train/loss": loss, "val/loss": ev["loss"], "val/f2": f2, "lr": lr}
            score, extra = select_mod.score(select, ev, f2)
            row.update(extra)
            rows.append(row)
            if score > m.st.best_score:  # LoopState.mark_best, with copies of the views alone
                m.st.best_score, m.st.best_epoch, m.st.best_state = score, epoch, {"head": head_state(m.head)}
            m.opt.step_schedule(ev["loss"])
            m.st.epoch, m.st.step, m.st.totals, m.st.phase = epoch, 0, (0.0, 0), 0
        seconds = time.perf_counter() - t0
        for m, row in zip(members, rows):
            row["seconds"] = seconds / len(members)
            m.fold.tracker.log_scalars(epoch, row)
            m.st.history.append({"epoch": epoch, "phase": HEAD, **row})
        out.print(f"epoch {epoch:>3}/{optim.epochs}  {len(members)} heads  train/loss "
                  f"{np.mean([r['train/loss'] for r in rows]):.4f}  val/loss "
                  f"{np.mean([r['val/loss'] for r in rows]):.4f}  val/f2 "
                  + " ".join(f"{r['val/f2']:.4f}" for r in rows) + f"  ({seconds:.1f}s)")
        stop = stop_requested() and epoch < optim.epochs
        if stop or (epoch < optim.epochs and time.perf_counter() - last_save >= SAVE_EVERY_S):
            _save(resume_file(run), members)
            last_save = time.perf_counter()
        if stop:
            raise Interrupted(stop_requested(), f"training stopped after epoch {epoch}; state saved to "
                                                f"{resume_file(run)}")


def _train_epoch(members: list[Member], stacked: StackedHeads, flat: torch.Tensor, n_all: int, views: int,
                 y: torch.Tensor, pos_weight: torch.Tensor | None, optim: Optimisation, epoch: int) -> list[float]:
    """One epoch of every fold at once -> each fold's mean training loss. Fold k's batches are its rows in the
    order its generator draws (the one-at-a-time loop's TensorBatches order), padded to the longest fold."""
    k_all, bs, device = len(members), optim.batch_size, flat.device
    p = members[0].head[0].p
    order = []
    for m in members:
        train, n = torch.from_numpy(m.fold.train), len(m.fold.train)
        if views == 1:
            order.append(train[torch.randperm(n, generator=m.order_gen)])
        else:  # RandomViewSampler: chip order, then a view per chip
            drawn = RandomViewSampler(n, views, m.order_gen).draw()
            order.append(drawn // n * n_all + train[drawn % n])
    sizes = [len(o) for o in order]
    longest = max(sizes)
    rows = torch.zeros(k_all, longest, dtype=torch.long)
    for k, o in enumerate(order):
        rows[k, :len(o)] = o
    rows = rows.to(device)
    losses, counts = [], []
    for start in range(0, longest, bs):
        n_k = [max(0, min(bs, size - start)) for size in sizes]
        active = [k for k in range(k_all) if n_k[k]]
        width = max(n_k)
        idx = rows[:, start:start + width]
        x = flat[idx].float()  # (K, B, dim)
        target = y[idx % n_all].float()
        mask = torch.zeros(k_all, width, 1, device=device)
        noise = torch.zeros_like(x) if 0 < p < 1 else None
        for k in active:
            mask[k, :n_k[k]] = 1
            if noise is not None:  # the one-at-a-time loop's nn.Dropout: bernoulli_(1 - p), then / (1 - p)
                drawn = torch.empty(n_k[k], x.shape[2]).bernoulli_(1 - p, generator=members[k].dropout_gen)
                noise[k, :n_k[k]] = drawn.div_(1 - p).to(device)
        if p == 1:
            noise = torch.zeros_like(x)
        logits = stacked.forward(x, noise)
        elem = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
        denom = torch.tensor([max(n, 1) * target.shape[2] for n in n_k], dtype=elem.dtype, device=device)
        per_fold = (elem * mask).sum((1, 2)) / denom  # each fold's mean over its own rows
        per_fold.sum().backward()
        stacked.hand_out_grads(active)
        for k in active:
            members[k].opt.optimizer.step()
        stacked.zero_grad()
        losses.append(per_fold.detach())
        counts.append(n_k)
    values = torch.stack(losses).double().cpu()  # (steps, K): one sync per epoch
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        step, k = (int(v) for v in bad[0])
        raise NonFiniteLoss(
            f"fold {members[k].fold.k}: loss is {values[step, k].item()} at epoch {epoch}, step {step}; the last "
            "good checkpoint is kept. Try a lower learning rate (model.learning_rate), and check the inputs "
            "(chiptag validate).")
    n = torch.tensor(counts, dtype=torch.float64)
    return ((values * n).sum(0) / n.sum(0).clamp(min=1)).tolist()


def head_state(head: nn.Module) -> dict:
    """A head's weights as tensors of their own (not views of the stacked storage)."""
    return {name: v.detach().clone(memory_format=torch.contiguous_format)
            for name, v in head.state_dict().items()}


def _save(path, members: list[Member]) -> None:
    torch_save({"format": FORMAT, "folds": {m.fold.k: {
        "state": vars(m.st), "module": {"head": head_state(m.head)}, "optimizer": m.opt.optimizer.state_dict(),
        "scheduler": m.opt.scheduler.state_dict(), "dropout_gen": m.dropout_gen.get_state(),
        "order_gen": m.order_gen.get_state()} for m in members}}, path)


def _load(path, members: list[Member]) -> bool:
    """Restore every member from resume-heads.pt; False when there is none (start from epoch 1)."""
    obj = resume_mod.load(path, FORMAT)
    if obj is None:
        return False
    missing = [m.fold.k for m in members if m.fold.k not in obj["folds"]]
    if missing:
        raise ChiptagError(f"{path} holds no state for fold(s) {missing}; the run cannot be resumed from it — "
                           "start a new run")
    for m in members:
        saved = obj["folds"][m.fold.k]
        m.head.load_state_dict(saved["module"]["head"])  # copied into the views: the stacked storage
        m.st = resume_mod.loop_state(saved["state"])
        m.opt.optimizer.load_state_dict(saved["optimizer"])
        m.opt.scheduler.load_state_dict(saved["scheduler"])
        m.dropout_gen.set_state(saved["dropout_gen"])
        m.order_gen.set_state(saved["order_gen"])
    return True


def remove_resume(run: RunDir) -> None:
    resume_file(run).unlink(missing_ok=True)
