"""Heads trained together: one batched model over the same cached features, for the K folds of a k-fold run and
for the entries of a `--all` sweep that share a frozen backbone (training.sweep).

Such heads are tiny MLPs on the same features; one after another, most of each step is per-call overhead
(benchmarks/head_batching.py). Here their weights are stacked along a member dimension (K, in, out) and one
step runs every member's batch through grouped matmuls (`torch.baddbmm`), while each member keeps everything
the epoch loop (training.loop.fit) gives it: its own head module (the optimizer's parameters are views into the
stacked weights), its own optimizer and LR schedule (`make_optim` with its own Optimisation: the same classes,
so ReduceLROnPlateau reacts to its own validation loss), its own batch order, view choice, dropout rate and
masks, loss weighting, best epoch (training.select), history, metrics.jsonl and files. Members of different
sizes are padded and masked: folds of different row counts (to the largest batch; a member whose epoch has no
batch left at a step is not stepped), heads of different hidden widths (to the widest, with zero weights:
padded units output 0, get gradient 0, and Adam leaves them at 0, so each head computes what it would alone).

Same numbers as one at a time: member k's randomness is what the one-at-a-time loop draws. A fold's head starts
from seed + k and its dropout masks come from a generator started where the global RNG stood after that head
was built; a sweep entry's head is its run's own (training.main.build_network) and its masks start at the seed,
as the loop seeds them; batch order and views from a generator seeded like the loop's
(`phases.feature_inputs`). So the figures match the sequential path within float tolerance (grouped vs single
matmuls; tests/training/test_heads.py, tests/training/test_sweep.py).

Resume: each member's state goes to its own resume.pt (fold-k/ or the entry's run dir) in the epoch loop's
format (training.resume; the optimizer's moments unpadded and laid out as the head's own parameters), marked
as saved together, at an epoch's end — at most every SAVE_EVERY_S seconds (a save of K heads and their Adam
moments per epoch cost ~10% of head training), always when SIGINT/SIGTERM asked to stop. A stop request
finishes the current epoch (a fraction of a second for K heads) before saving. `--resume` trains the members
saved together together again; a fold the one-at-a-time loop left (a resume.pt not saved together, maybe mid-
epoch) resumes there, and so does a sweep entry (`chiptag train --resume RUN` continues it alone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
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
from chiptag.training.settings import Optimisation, Settings

SAVE_EVERY_S = 5.0  # the members' resume.pt at most this often (and always on a stop request)
# One thread, as phases.Phase.threads for one head: on the shared 2-core machine two threads made the batched
# step ~10x slower whenever another job held a core (OpenMP barrier waits); with the cores idle they gain little
# (the step is bound by memory: Adam's moments of K heads).
THREADS = 1
OLD_STATE = "resume-heads.pt"  # where an older chiptag kept the state of a run's fold heads, all in one file


@dataclass(eq=False)  # members are compared by identity
class Member:
    """One head inside the batch: its fold (rows, loss, run dir, tracker), its head (weights are views of the
    stacked ones), its own settings, generators and validation batches; opt and st once training starts."""

    fold: Fold
    tagger: Tagger  # the frozen backbone + this member's head (what mark_best, save_done and the finish take)
    optim: Optimisation  # its learning rate, optimizer, schedule, pos_weight ... (epochs and batch size shared)
    select: str
    tta: bool
    dropout_gen: torch.Generator  # the one-at-a-time loop's global RNG after this head's init
    order_gen: torch.Generator  # the one-at-a-time loop's Inputs.gen: batch order and view choice
    val: TensorBatches
    opt: Optim | None = None
    st: LoopState = field(default_factory=LoopState)
    failed: NonFiniteLoss | None = None  # its loss went non-finite (a sweep entry drops out; the others go on)

    @property
    def head(self) -> nn.Module:
        return self.tagger.head

    @property
    def name(self) -> str:
        """How messages name it: "fold k", or the sweep entry's run."""
        return f"fold {self.fold.k}" if self.fold.of_k else self.fold.run.name


class StackedHeads:
    """K heads of one layer structure as stacked leaf tensors: layer j's weight (K, in, out) and bias (K, out),
    padded with zeros to the widest member. Each head's own nn.Linear parameters become views into them, so
    its state_dict and evaluation see an ordinary head while a step runs all K at once; `views[k]` are member
    k's parameters as its optimizer steps them (its whole padded slice: contiguous, and the padding stays 0),
    `shapes[k]` their unpadded (in, out) / (out,) sizes."""

    def __init__(self, heads: list[nn.Sequential]):
        self.layers = list(heads[0])
        kinds = [layer.__class__ for layer in self.layers]
        if any([layer.__class__ for layer in h] != kinds for h in heads):
            raise ChiptagError("heads trained together need the same layers (Dropout, Linear, ReLU ...)")
        self.params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.views: list[list[nn.Parameter]] = [[] for _ in heads]
        self.shapes: list[list[tuple[int, ...]]] = [[] for _ in heads]
        for j, layer in enumerate(self.layers):
            if not isinstance(layer, nn.Linear):
                continue
            ins, outs = [h[j].in_features for h in heads], [h[j].out_features for h in heads]
            # (K, in, out): x @ w with no transpose; w[k].T is the nn.Linear weight (half the step time of
            # (K, out, in) transposed on the fly, whose backward copies the gradients)
            w = torch.zeros(len(heads), max(ins), max(outs), device=layer.weight.device)
            b = torch.zeros(len(heads), max(outs), device=layer.weight.device)
            for k, h in enumerate(heads):
                w[k, :ins[k], :outs[k]] = h[j].weight.detach().T
                b[k, :outs[k]] = h[j].bias.detach()
            w.requires_grad_(), b.requires_grad_()
            for k, h in enumerate(heads):  # views: the same storage
                h[j].weight = nn.Parameter(w.detach()[k, :ins[k], :outs[k]].T)
                h[j].bias = nn.Parameter(b.detach()[k, :outs[k]])
                # the optimizer steps the contiguous padded slice: a fused step over a strided view writes
                # outside it, and over a transposed one takes twice as long
                self.views[k] += [nn.Parameter(w.detach()[k]), nn.Parameter(b.detach()[k])]
                self.shapes[k] += [(ins[k], outs[k]), (outs[k],)]
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
        """Each active member's parameters get their slice of the stacked gradients (views, no copy)."""
        stacked = [p.grad for pair in self.params for p in pair]
        for k in active:
            for view, grad in zip(self.views[k], stacked):
                view.grad = grad[k]

    def clear(self, k: int) -> None:
        """Member k's weights to 0 (a member whose loss went non-finite: its NaNs stay out of the batch)."""
        with torch.no_grad():
            for pair in self.params:
                for p in pair:
                    p[k].zero_()

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


def batchable(folds: list[Fold], freeze: bool, feats: torch.Tensor | None, optim: Optimisation) -> list[list[Fold]]:
    """The groups of a k-fold run's folds that train together (frozen backbone, cached features): the folds
    starting afresh, and those saved together at the same epoch. A fold the one-at-a-time loop left (its own
    resume.pt, maybe mid-epoch) resumes there."""
    if not freeze or feats is None or optim.unfreeze_after:
        return []
    groups: dict[int, list[Fold]] = {}
    for f in folds:
        if not f.of_k:
            continue
        saved = resume_mod.load(f.run.resume)
        if saved is None or saved.get("together"):
            groups.setdefault(saved["state"]["epoch"] if saved else 0, []).append(f)
    return list(groups.values())


def check_no_old_state(run: RunDir) -> None:
    """A run interrupted by an older chiptag whose fold heads' state is one resume-heads.pt: a clear error."""
    if (run.path / OLD_STATE).is_file():
        raise ChiptagError(f"{run.path / OLD_STATE} was written by an older chiptag: its fold heads cannot resume "
                           "from it — start a new run")


def eval_batches(feats: torch.Tensor, y: torch.Tensor, idx: np.ndarray, batch_size: int,
                 tta: bool) -> TensorBatches:
    """A split's evaluation batches as phases.feature_inputs builds them: (n, V, dim) rows averaged by
    ViewAverage when TTA, else the identity view."""
    return TensorBatches(feats[:, idx].transpose(0, 1) if tta else feats[0, idx], y[idx], batch_size)


def _on_device(feats: torch.Tensor, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    y_t = torch.from_numpy(y)
    if device.type == "cuda":
        return feats.to(device), y_t.to(device)
    return feats, y_t


def member(fold: Fold, tagger: Tagger, dropout_gen: torch.Generator, feats: torch.Tensor, y: np.ndarray,
           s: Settings) -> Member:
    """A head to train with others: a sweep entry's (its run's tagger; its masks start at the seed, as the loop
    seeds the global RNG) or, through fold_members, a fold's."""
    tta = feats.shape[0] > 1 and s.features.tta
    feats, y_t = _on_device(feats, y, fold.device)
    return Member(fold, tagger, s.optim, s.select, tta, dropout_gen, torch.Generator().manual_seed(s.seed),
                  eval_batches(feats, y_t, fold.val, s.optim.batch_size, tta))


def fold_members(folds: list[Fold], spec: HeadSpec, backbone: nn.Module, feats: torch.Tensor, y: np.ndarray,
                 s: Settings) -> list[Member]:
    """The folds' heads, each started from seed + k as the one-at-a-time loop starts them, on the one frozen
    backbone."""
    members = []
    for fold in folds:
        fold.run.path.mkdir(exist_ok=True)
        torch.manual_seed(s.seed + fold.k)
        tagger = Tagger(backbone, spec.build(), frozen=True).to(fold.device)
        members.append(member(fold, tagger, torch.Generator().set_state(torch.get_rng_state()), feats, y, s))
    return members


def train_together(members: list[Member], feats: torch.Tensor, y: np.ndarray, test: np.ndarray,
                   drop_failed: bool = False) -> list[tuple[Member, Inputs, float]]:
    """Train the members' heads as one batched model -> (member, its evaluation inputs, seconds) per member,
    each tagger holding its last epoch's weights (its best are in member.st.best_state). test: the test
    split's rows. A member whose loss goes non-finite stops the batch (NonFiniteLoss naming it), or with
    drop_failed (sweep entries: independent runs) leaves it with `failed` set while the others go on."""
    device = members[0].fold.device
    feats, y_t = _on_device(feats, y, device)
    phase = FusedHeadPhase(HEAD, members[0].optim.epochs, None)
    stacked = StackedHeads([m.head for m in members])
    for m, views in zip(members, stacked.views):  # the optimizer steps views into the stacked weights
        m.opt = make_optim(m.optim, phase, nn.ParameterList(views))
    t0 = time.perf_counter()
    if _load(members, stacked):
        out.print(f"{len(members)} heads: resuming after epoch {members[0].st.epoch}")
    else:
        sizes = ", ".join(f"{len(m.fold.train)}/{len(m.fold.val)}" for m in members)
        out.print(f"{len(members)} heads trained together (train/validation images: {sizes})")
    with training_compute(THREADS):
        _epochs(members, stacked, feats, y_t, drop_failed)
    stacked.release([m.head for m in members])
    seconds = (time.perf_counter() - t0) / len(members)  # the batch's time, shared out
    test_batches = {tta: eval_batches(feats, y_t, test, members[0].optim.batch_size, tta)
                    for tta in {m.tta for m in members}}
    return [(m, Inputs(None, m.val, test_batches[m.tta], m.order_gen), seconds) for m in members]


def _epochs(members: list[Member], stacked: StackedHeads, feats: torch.Tensor, y: torch.Tensor,
            drop_failed: bool) -> None:
    views, n_all = feats.shape[0], feats.shape[1]
    flat = feats.flatten(0, 1)  # row v * N + i: view v of chip i
    epochs = members[0].optim.epochs
    last_save = time.perf_counter()
    for epoch in range(members[0].st.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        alive = [m for m in members if m.failed is None]
        lrs = [m.opt.optimizer.param_groups[0]["lr"] for m in members]
        train_loss = _train_epoch(members, stacked, flat, n_all, views, y, epoch)
        for k, m in enumerate(members):
            if m in alive and m.failed is not None:  # its loss went non-finite in this epoch
                if not drop_failed:
                    raise m.failed
                out.print(f"[yellow]warning:[/] {m.failed} The other heads go on.")
                stacked.clear(k)
        rows = {}
        for m, loss, lr in zip(members, train_loss, lrs):
            if m.failed is not None:
                continue
            ev = evaluate(ViewAverage(m.head), m.val, m.fold.loss_fn, m.fold.device)
            f2 = metrics.f2_samples(ev["targets"], metrics.binarize(ev["probs"], 0.5))
            row = {"train/loss": loss, "val/loss": ev["loss"], "val/f2": f2, "lr": lr}
            score, extra = select_mod.score(m.select, ev, f2)
            row.update(extra)
            rows[id(m)] = row
            if score > m.st.best_score:  # LoopState.mark_best, with copies of the views alone
                m.st.best_score, m.st.best_epoch, m.st.best_state = score, epoch, {"head": head_state(m.head)}
            m.opt.step_schedule(ev["loss"])
            m.st.epoch, m.st.step, m.st.totals, m.st.phase = epoch, 0, (0.0, 0), 0
        seconds = time.perf_counter() - t0
        done = [m for m in alive if id(m) in rows]
        for m in done:
            row = rows[id(m)]
            row["seconds"] = seconds / len(done)
            m.fold.tracker.log_scalars(epoch, row)
            m.st.history.append({"epoch": epoch, "phase": HEAD, **row})
        if not done:
            return  # every member failed
        scores = [rows[id(m)] for m in done]
        out.print(f"epoch {epoch:>3}/{epochs}  {len(done)} heads  train/loss "
                  f"{np.mean([r['train/loss'] for r in scores]):.4f}  val/loss "
                  f"{np.mean([r['val/loss'] for r in scores]):.4f}  val/f2 "
                  + " ".join(f"{r['val/f2']:.4f}" for r in scores) + f"  ({seconds:.1f}s)")
        stop = stop_requested() and epoch < epochs
        if stop or (epoch < epochs and time.perf_counter() - last_save >= SAVE_EVERY_S):
            _save(done, stacked, members)
            last_save = time.perf_counter()
        if stop:
            where = done[0].fold.run.resume.name
            raise Interrupted(stop_requested(), f"training stopped after epoch {epoch}; state saved to {where} in "
                                                + ", ".join(str(m.fold.run.path) for m in done))


def _train_epoch(members: list[Member], stacked: StackedHeads, flat: torch.Tensor, n_all: int, views: int,
                 y: torch.Tensor, epoch: int) -> list[float]:
    """One epoch of every member at once -> each one's mean training loss (nan for one that failed now or
    before; its `failed` says where). Member k's batches are its rows in the order its generator draws (the
    one-at-a-time loop's TensorBatches order), padded to the longest member."""
    k_all, bs, device = len(members), members[0].optim.batch_size, flat.device
    order = []
    for m in members:
        train, n = torch.from_numpy(m.fold.train), len(m.fold.train)
        if m.failed is not None:
            order.append(train[:0])
        elif views == 1:
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
    pos_weight = _pos_weights(members, y.shape[1], device)
    drop = [m.head[0].p for m in members]  # each head's nn.Dropout
    losses, counts = [], []
    for start in range(0, longest, bs):
        n_k = [max(0, min(bs, size - start)) for size in sizes]
        active = [k for k in range(k_all) if n_k[k]]
        width = max(n_k)
        idx = rows[:, start:start + width]
        x = flat[idx].float()  # (K, B, dim)
        target = y[idx % n_all].float()
        mask = torch.zeros(k_all, width, 1, device=device)
        noise = torch.ones_like(x) if any(drop) else None
        for k in active:
            mask[k, :n_k[k]] = 1
            if drop[k] == 1:
                noise[k] = 0
            elif drop[k] > 0:  # the one-at-a-time loop's nn.Dropout: bernoulli_(1 - p), then / (1 - p)
                drawn = torch.empty(n_k[k], x.shape[2]).bernoulli_(1 - drop[k], generator=members[k].dropout_gen)
                noise[k, :n_k[k]] = drawn.div_(1 - drop[k]).to(device)
        logits = stacked.forward(x, noise)
        elem = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
        denom = torch.tensor([max(n, 1) * target.shape[2] for n in n_k], dtype=elem.dtype, device=device)
        per_fold = (elem * mask).sum((1, 2)) / denom  # each member's mean over its own rows
        per_fold.sum().backward()
        stacked.hand_out_grads(active)
        for k in active:
            members[k].opt.optimizer.step()
        stacked.zero_grad()
        losses.append(per_fold.detach())
        counts.append(n_k)
    values = torch.stack(losses).double().cpu()  # (steps, K): one sync per epoch
    n = torch.tensor(counts, dtype=torch.float64)
    means = ((values * n).sum(0) / n.sum(0).clamp(min=1)).tolist()
    for k, m in enumerate(members):
        bad = (~torch.isfinite(values[:, k]) & (n[:, k] > 0)).nonzero()
        if m.failed is None and len(bad):
            step = int(bad[0])
            m.failed = NonFiniteLoss(
                f"{m.name}: loss is {values[step, k].item()} at epoch {epoch}, step {step}; the last good "
                "checkpoint is kept. Try a lower learning rate (model.learning_rate), and check the inputs "
                "(chiptag validate).")
        if m.failed is not None:
            means[k] = float("nan")
    return means


def _pos_weights(members: list[Member], n_tags: int, device: torch.device) -> torch.Tensor | None:
    """(K, 1, tags): each member's loss weights; ones for a member without (the same loss)."""
    pw = [m.fold.loss_fn.pos_weight for m in members]
    if all(w is None for w in pw):
        return None
    return torch.stack([torch.ones(n_tags, device=device) if w is None else w for w in pw]).unsqueeze(1)


def head_state(head: nn.Module) -> dict:
    """A head's weights as tensors of their own (not views of the stacked storage)."""
    return {name: v.detach().clone(memory_format=torch.contiguous_format)
            for name, v in head.state_dict().items()}


def _loop_optimizer_state(state: dict, shapes: list[tuple[int, ...]]) -> dict:
    """An optimizer state_dict in the epoch loop's layout: the head's own parameters (weights (out, in),
    unpadded) instead of the batch's padded (in, out) slices; both come in the same order."""
    def convert(t, shape: tuple[int, ...]):
        if not torch.is_tensor(t) or t.dim() != len(shape):  # Adam's step count
            return t
        return (t[:shape[0], :shape[1]].T if len(shape) == 2 else t[:shape[0]]).contiguous()

    return {**state, "state": {i: {key: convert(v, shapes[i]) for key, v in st.items()}
                               for i, st in state["state"].items()}}


def _save(members: list[Member], stacked: StackedHeads, everyone: list[Member]) -> None:
    """Each member's state to its own resume.pt, in the epoch loop's format, marked as saved together."""
    rng = resume_mod.rng_states()
    for m in members:
        shapes = stacked.shapes[everyone.index(m)]
        st = replace(m.st, epoch_gen_state=m.order_gen.get_state())
        torch_save({"format": resume_mod.FORMAT, "together": True, "state": vars(st),
                    "module": {"head": head_state(m.head)},
                    "optimizer": _loop_optimizer_state(m.opt.optimizer.state_dict(), shapes),
                    "scheduler": m.opt.scheduler.state_dict(),
                    "rng": {**rng, "torch": m.dropout_gen.get_state()}}, m.fold.run.resume)


def _load(members: list[Member], stacked: StackedHeads) -> bool:
    """Restore every member from its resume.pt (saved together); False when none has one (start at epoch 1)."""
    saved = [resume_mod.load(m.fold.run.resume) for m in members]
    if all(obj is None for obj in saved):
        return False
    epochs = {obj["state"]["epoch"] if obj else 0 for obj in saved}
    if len(epochs) > 1 or not all(obj and obj.get("together") for obj in saved):
        raise ChiptagError("the heads to resume together were not saved together ("
                           + ", ".join(f"{m.fold.run.resume}: epoch {obj['state']['epoch'] if obj else 0}"
                                       for m, obj in zip(members, saved)) + ") — start a new run")
    for k, (m, obj) in enumerate(zip(members, saved)):
        m.head.load_state_dict(obj["module"]["head"])  # copied into the views: the stacked storage
        m.st = resume_mod.loop_state(obj["state"])
        m.opt.optimizer.load_state_dict(obj["optimizer"])
        _pad_moments(m.opt.optimizer, stacked.views[k], stacked.shapes[k])
        m.opt.scheduler.load_state_dict(obj["scheduler"])
        m.dropout_gen.set_state(obj["rng"]["torch"])
        m.order_gen.set_state(m.st.epoch_gen_state)
    return True


def _pad_moments(optimizer: torch.optim.Optimizer, views: list[nn.Parameter], shapes: list[tuple[int, ...]]) -> None:
    """After loading the loop's state: each moment back in the batch's layout (transposed, zero-padded to the
    view it belongs to)."""
    for view, shape in zip(views, shapes):
        state = optimizer.state.get(view, {})
        for key, t in state.items():
            if torch.is_tensor(t) and t.dim() == len(shape):
                padded = torch.zeros_like(view)
                if len(shape) == 2:
                    padded[:shape[0], :shape[1]] = t.T
                else:
                    padded[:shape[0]] = t
                state[key] = padded
