"""What training needs of the config, read once: `Settings.from_config` is the only reader of `Config` in
training (training.main calls it). Everything below takes these small frozen records instead of the whole
config, so a function's parameters say what it depends on.

The data, features, output and tracking sections travel as they are (config.DataConfig, ...): the packages
that read them (data, features, runs, tracking) take exactly those sections.
"""

from __future__ import annotations

from dataclasses import dataclass

from chiptag.config import Config, DataConfig, FeaturesConfig, OutputConfig, TrackingConfig
from chiptag.data.augment import Augment

OPTIMIZER_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}


@dataclass(frozen=True)
class NetworkSpec:
    """What to build: the active entry's backbone and head, and whether the backbone stays frozen."""

    name: str  # the entry's name (run dir label, tracker, summary)
    backbone: str
    weights: str | None
    image_size: int | None  # None: the weights' own crop size
    resize: str  # data.resize: travels with the preprocessing into the checkpoint
    hidden_dim: int | None
    dropout: float
    freeze: bool


@dataclass(frozen=True)
class Optimisation:
    """How the head (and an unfrozen backbone) train: optimiser, schedule, phases, batches, loss weighting."""

    optimizer: str  # adam | adamw | sgd (momentum 0.9)
    learning_rate: float
    weight_decay: float
    scheduler: str  # reduce_on_plateau | cosine | constant
    factor: float  # reduce_on_plateau
    patience: int  # reduce_on_plateau
    min_lr: float
    epochs: int  # all phases together
    batch_size: int
    pos_weight: bool  # per-class negatives/positives of the train rows, clamped at pos_weight_max
    pos_weight_max: float
    # fine-tuning (freeze: false): head epochs first, then the last stages unfrozen at lr * backbone_lr_mult
    unfreeze_after: int = 0
    unfreeze_stages: int | str = "all"
    backbone_lr_mult: float = 0.1
    batchnorm: str = "train"  # resolved: train | frozen (Settings.from_config applies model.batchnorm: auto)
    layer_decay: float | None = None  # in place of backbone_lr_mult: stage i from the top at lr * decay^(i+1)
    finetune_scheduler: str = "training"  # cosine | onecycle (per step, warm-up) | training (the head's)
    warmup_epochs: float = 0.0
    ema_decay: float | None = None
    clip_grad_norm: float | None = None
    # end-to-end steps only (a head on cached features is a few matmuls)
    grad_accum_steps: int = 1
    amp: bool = True
    channels_last: bool = True

    def describe_finetune(self) -> str:
        """How the unfrozen phase trains, for the summary and the runs table."""
        rates = (f"layer_decay {self.layer_decay:g}" if self.layer_decay
                 else f"backbone_lr_mult {self.backbone_lr_mult:g}")
        sched = (self.finetune_scheduler if self.finetune_scheduler == "training"
                 else f"{self.finetune_scheduler} (warm-up {self.warmup_epochs:g} epochs)")
        parts = [f"unfreeze {self.unfreeze_stages} stages after {self.unfreeze_after} head epochs", rates,
                 f"schedule {sched}", f"batchnorm {self.batchnorm}"]
        parts += [f"EMA {self.ema_decay:g}"] if self.ema_decay else []
        parts += [f"clip {self.clip_grad_norm:g}"] if self.clip_grad_norm else []
        return "; ".join(parts)

    def describe(self) -> tuple[str, str]:
        """(optimizer, scheduler) as the summary and the runs table show them."""
        opt = f"{OPTIMIZER_NAMES[self.optimizer]}(lr={self.learning_rate:g}"
        opt += ", momentum=0.9" if self.optimizer == "sgd" else ""
        opt += f", weight_decay={self.weight_decay:g})" if self.weight_decay else ")"
        sched = {"reduce_on_plateau": f"ReduceLROnPlateau(factor={self.factor:g}, patience={self.patience})",
                 "cosine": f"CosineAnnealingLR(eta_min={self.min_lr:g})", "constant": "constant"}[self.scheduler]
        return opt, sched


@dataclass(frozen=True)
class Settings:
    data: DataConfig  # labels, images, split
    network: NetworkSpec  # the active `models` entry: what to build
    optim: Optimisation
    augment: Augment  # end-to-end phases' training chips (the cached-feature path has its D4 views)
    features: FeaturesConfig  # the frozen backbone's pass: cache, views, engine, decoder
    output: OutputConfig  # where run dirs go
    tracking: TrackingConfig
    select: str  # training.select: which epoch's weights are kept
    folds: int  # 0: the run's train/val split; K >= 2: K folds of train + val
    seed: int
    device: str  # training.device, resolved once by training.main
    num_workers: int | str
    progress: bool
    labels: dict  # the label rules (config `labels`)
    active_model_index: int
    config: dict  # the whole resolved config: into the checkpoint, the tracker and the run dir

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        entry, tr, sc = cfg.model, cfg.training, cfg.training.scheduler
        network = NetworkSpec(entry.name, entry.backbone, entry.weights, entry.image_size, cfg.data.resize,
                          entry.hidden_dim, entry.dropout, entry.freeze)
        optim = Optimisation(
            entry.optimizer, entry.learning_rate, entry.weight_decay, sc.name, sc.factor, sc.patience, sc.min_lr,
            entry.epochs, cfg.batch_size(), entry.pos_weight, tr.pos_weight_max, entry.unfreeze_after,
            entry.unfreeze_stages, entry.backbone_lr_mult or 0.1, _batchnorm(entry.batchnorm, cfg.batch_size()),
            entry.layer_decay, entry.finetune_scheduler, entry.warmup_epochs, entry.ema_decay,
            entry.clip_grad_norm, tr.grad_accum_steps, tr.amp, tr.channels_last)
        return cls(cfg.data, network, optim, Augment.of(cfg.augment, tr.seed), cfg.features, cfg.output,
                   cfg.tracking, tr.select, tr.folds, tr.seed, tr.device, tr.num_workers, tr.progress,
                   cfg.labels.model_dump(), cfg.active_model_index, cfg.to_dict())

    @property
    def uses_features(self) -> bool:
        """Whether a head phase trains on cached features (a frozen backbone, or head epochs before unfreezing)."""
        return self.network.freeze or self.optim.unfreeze_after > 0


# model.batchnorm: auto -> frozen below this many images per step (batch statistics of fewer images are noisy)
BATCHNORM_AUTO_MIN = 64


def _batchnorm(mode: str, batch_size: int) -> str:
    """model.batchnorm resolved: auto -> frozen when a step's batch is below BATCHNORM_AUTO_MIN images."""
    if mode != "auto":
        return mode
    return "frozen" if batch_size < BATCHNORM_AUTO_MIN else "train"
