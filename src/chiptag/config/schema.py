"""The configuration's pydantic models: every section and key, its type, range and default (extra="forbid")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitFiles(_Strict):
    """The dataset's own split: text files of names, one a line (or CSVs, id first), relative to data.root."""

    train: Path
    val: Path
    test: Path


class SplitConfig(_Strict):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    seed: int = 0
    files: SplitFiles | None = None  # given: used exactly as listed; the fractions and seed are then unused

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class DataConfig(_Strict):
    root: Path = Path("data/demo")
    # None = look for train_v2.csv, then train_classes.csv, in root (both names exist in the Kaggle release).
    labels: Path | None = None
    images: Path = Path("train-jpg")
    extension: str = ".jpg"
    format: Literal["auto", "tags", "onehot"] = "auto"
    id_column: str = "image_name"
    tags_column: str = "tags"
    split: SplitConfig = SplitConfig()
    on_bad_image: Literal["error", "skip"] = "error"
    # Images over this many pixels are reported as decompression bombs and never decoded (Pillow's default cap).
    max_image_pixels: int = Field(89_478_485, ge=1)
    # Set: images with a side more than 2x off this are errors (bad images). None: any shape is fine; images
    # far from the usual size are only noted.
    expected_size: int | None = Field(None, ge=1)
    min_side: int = Field(16, ge=1)  # images with a shorter side are bad images
    # How a non-square image becomes the model's square input: squash (stretch the whole image), pad
    # (letterbox: whole image, aspect kept, padded with the mean colour), crop (the centred square).
    resize: Literal["squash", "pad", "crop"] = "squash"
    # One-hot tables: the label columns. None: every column whose cells are all 0/1 (others ignored, noted).
    tag_columns: list[str] | None = None
    # True: validation decodes every image in full (slow), so corrupt data is found before training and
    # handled by on_bad_image; false: header checks only (`chiptag validate --full` sets it).
    full_check: bool = False
    # Multiband rasters (data.rasters; on with extension .tif/.tiff or with bands set): the file's bands the
    # model sees, 0-based, in its channel order (first three: the ones an RGB-pretrained stem takes as R, G, B),
    # e.g. [2, 1, 0, 3] for Planet's B,G,R,NIR files. None: every band of the file, in file order.
    bands: list[int] | None = None
    band_names: list[str] | None = None  # optional, one per entry of bands (export metadata, reports)
    # Per-band normalisation from the training split: mean/std after clipping each band to these percentiles
    # (null: no clipping), over a seeded sample of stats_images training chips.
    clip_percentiles: tuple[float, float] | None = None
    stats_images: int = Field(1000, ge=1)
    # Rasters: the sample value that means "no data" (in the file's units, e.g. 0 or -9999); null: the file's own
    # GDAL_NODATA tag when it has one. NaN/inf samples are nodata always. fill: error (a chip with nodata pixels
    # is a bad image: data.on_bad_image) | mean (each such pixel takes its band's training mean: 0 once
    # normalised, the same in training, evaluate, predict and serve). A chip over half nodata is a bad image.
    nodata: float | None = None
    fill: Literal["error", "mean"] = "error"

    @field_validator("extension")
    @classmethod
    def _dot(cls, v: str) -> str:
        return v if v.startswith(".") or v == "" else "." + v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("bands must name at least one band (or be null: every band of the file)")
            if min(v) < 0:
                raise ValueError(f"bands are 0-based indices, got {min(v)}")
            if len(set(v)) != len(v):
                raise ValueError(f"bands {v} repeats a band")
        return v

    @field_validator("clip_percentiles")
    @classmethod
    def _percentiles(cls, v):
        if v is not None and not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"clip_percentiles must be [low, high] with 0 <= low < high <= 100, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _names_match(self) -> DataConfig:
        if self.band_names is not None and (self.bands is None or len(self.band_names) != len(self.bands)):
            raise ValueError("band_names needs bands, one name per band")
        if (self.nodata is not None or self.fill != "error") and not self.raster:
            raise ValueError("nodata and fill are for raster chips (extension .tif/.tiff or bands set)")
        return self

    @property
    def raster(self) -> bool:
        """Whether the images are multiband rasters (data.rasters) rather than RGB images."""
        return self.bands is not None or self.extension.lower() in (".tif", ".tiff")


class LabelsConfig(_Strict):
    """Label structure applied when probabilities become tags (predict, evaluation, threshold tuning; the rules
    themselves: evaluation.label_rules).

    exclusive: groups of which exactly one tag holds (Planet's weather: clear, partly_cloudy, haze, cloudy): the
    most probable tag of the group is kept, the others dropped, whatever the thresholds. implies_none: a tag
    that, when it holds, rules the listed tags out (Planet: cloudy chips carry no land tags). A trigger inside an
    exclusive group holds when it is its group's pick; any other trigger when its probability is >= 0.5."""

    exclusive: list[list[str]] = []
    implies_none: dict[str, list[str]] = {}
    # Whether the rules decide the tags. auto: thresholds are tuned with and without them on the validation rows
    # (out-of-fold rows for k-fold) and the run keeps whichever scores the higher F2 there (a tie keeps none);
    # always / never skip that choice. The summary, report and runs table show both validation figures; the
    # checkpoint carries the kept choice, so predict, serve, evaluate and the ONNX metadata follow it.
    apply: Literal["auto", "always", "never"] = "auto"
    # hard: a group's pick on every chip; a trigger outside a group holds at probability >= 0.5. soft: only
    # where the model is confident: a group on chips whose top probability in it reaches `confidence`, a
    # trigger (its group's pick, or any tag) at >= `confidence`; other chips keep their probabilities, so a
    # wrong pick on an uncertain chip costs no recall.
    form: Literal["hard", "soft"] = "hard"
    # The soft form's confidence; null: tuned on validation (0.5, 0.6, 0.7, 0.8, 0.9, 0.95).
    confidence: float | None = Field(None, ge=0.5, le=1)

    @model_validator(mode="after")
    def _groups_disjoint(self) -> LabelsConfig:
        if self.confidence is not None and self.form != "soft":
            raise ValueError("labels.confidence is the soft form's: set labels.form: soft, or leave it out")
        seen: set[str] = set()
        for group in self.exclusive:
            if len(group) < 2:
                raise ValueError(f"exclusive group {group} needs at least 2 tags")
            dup = seen.intersection(group) or {t for t in group if group.count(t) > 1}
            if dup:
                raise ValueError(f"exclusive groups must not share tags: {sorted(dup)[0]!r} appears twice")
            seen.update(group)
        return self


class ModelEntry(_Strict):
    """One experiment of the plan's list; `active_model_index` picks the one `chiptag train` runs."""

    name: str
    backbone: str = "resnet50"
    # DEFAULT, a torchvision enum name (IMAGENET1K_V2), null (random init: smoke tests only) or a state-dict path.
    weights: str | None = "DEFAULT"
    freeze: bool = True
    image_size: int | None = Field(None, ge=16, le=1024)  # None: the weights' own crop size (224 for ImageNet)
    dropout: float = Field(0.2, ge=0, lt=1)
    hidden_dim: int | None = Field(512, ge=1)  # None: Dropout -> Linear only
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # sgd: momentum 0.9
    pos_weight: bool = False
    epochs: int = Field(5, ge=1)
    batch_size: int | None = Field(None, ge=1)  # None: training.batch_size
    # Fine-tuning schedule (freeze: false): `unfreeze_after` epochs of head-only training on cached features,
    # then the last `unfreeze_stages` backbone stages (ResNet: stem, layer1..4; EfficientNet: features[i])
    # train too, at learning_rate * backbone_lr_mult. batchnorm: train = batch statistics and updated running
    # stats in the unfrozen stages; frozen = running stats and affine parameters kept (small batches).
    unfreeze_after: int = Field(0, ge=0)
    unfreeze_stages: int | Literal["all"] = "all"
    backbone_lr_mult: float | None = Field(None, gt=0)  # null: 0.1 (or layer_decay's rates when that is set)
    # A stable unfreeze (the fine-tuning phase only; README "Fine-tuning" has the measurements behind the
    # defaults). layer_decay: in place of backbone_lr_mult, stage i from the top (0 = the last) trains at
    # learning_rate * layer_decay^(i + 1), so early, generic filters move least.
    layer_decay: float | None = Field(None, gt=0, le=1)
    # The fine-tuning phase's own schedule, stepped per optimiser step: cosine = the backbone's learning rates
    # warm up linearly from 0 over warmup_epochs (the head keeps its rate), then every rate anneals to
    # training.scheduler.min_lr by the last epoch; onecycle = every rate warms up from 1/25 over warmup_epochs,
    # then anneals (torch's OneCycleLR shape); training = training.scheduler, per epoch, as the head phase.
    finetune_scheduler: Literal["cosine", "onecycle", "training"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    # BatchNorm in the unfrozen stages. train: batch statistics, running stats updated; frozen: running stats and
    # affine parameters kept (eval mode); auto: frozen when a step sees fewer than 64 images (small batches give
    # noisy statistics that throw the pretrained features off at unfreeze), train otherwise.
    batchnorm: Literal["auto", "train", "frozen"] = "auto"
    # EMA of the weights (decay per optimiser step, warmed up as timm's ModelEmaV3 does): the averaged model is
    # what validation scores, the checkpoint keeps and test evaluates. null: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    clip_grad_norm: float | None = Field(None, gt=0)  # max global gradient norm per step; null: no clipping

    @model_validator(mode="after")
    def _schedule_fits(self) -> ModelEntry:
        if self.unfreeze_after >= self.epochs and not self.freeze:
            raise ValueError(f"unfreeze_after ({self.unfreeze_after}) must be below epochs ({self.epochs}): "
                             "the backbone would never train")
        if isinstance(self.unfreeze_stages, int) and self.unfreeze_stages < 1:
            raise ValueError("unfreeze_stages must be >= 1 or 'all'")
        if self.layer_decay is not None and self.backbone_lr_mult is not None:
            raise ValueError("layer_decay replaces backbone_lr_mult (stage i from the top trains at "
                             "learning_rate * layer_decay^(i+1)): set one of them")
        return self


class AugmentConfig(_Strict):
    """Augmentation of training chips in end-to-end phases (freeze: false). The cached-feature
    path keeps its cached D4 views (features.views) instead."""

    d4: bool = True  # a random flip / 90-degree rotation per chip and epoch (chips have no "up")
    scale: float = Field(0.0, ge=0, lt=1)  # zoom jitter: a random square crop, side in [1 - scale, 1], resized back
    brightness: float = Field(0.0, ge=0, lt=1)  # factor in [1 - b, 1 + b]
    contrast: float = Field(0.0, ge=0, lt=1)  # factor in [1 - c, 1 + c], around the chip's mean
    hue: float = Field(0.0, ge=0, le=0.5)  # RGB only: a hue rotation of up to this fraction of a turn


class SchedulerConfig(_Strict):
    # reduce_on_plateau: steps on the validation loss (factor, patience); cosine: anneals each phase's
    # learning rate to min_lr over its epochs; constant: no schedule.
    name: Literal["reduce_on_plateau", "cosine", "constant"] = "reduce_on_plateau"
    factor: float = Field(0.5, gt=0, lt=1)
    patience: int = Field(1, ge=0)
    min_lr: float = Field(1e-6, ge=0)


class TrainingConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    device: str = "auto"
    num_workers: int | Literal["auto"] = "auto"
    # Rare Planet tags have ~1:400 positives; an unclamped weight of 400 makes their gradients dominate and the
    # head over-predicts them. 30 keeps recall pressure without swamping the common tags.
    pos_weight_max: float = Field(30.0, gt=0)
    scheduler: SchedulerConfig = SchedulerConfig()
    progress: bool = True
    grad_accum_steps: int = Field(1, ge=1)  # end-to-end training: optimiser step every N batches
    channels_last: bool = True  # end-to-end training: faster convolutions on CPU (oneDNN) and CUDA
    amp: bool = True  # bf16 autocast for end-to-end training on CUDA; ignored on CPU
    # Which epoch's weights the checkpoint keeps: lowest validation loss, highest validation F2 at 0.5, or
    # highest validation F2 at thresholds tuned on validation (benchmarks/checkpoint_select.py).
    select: Literal["val_loss", "val_f2", "val_f2_tuned"] = "val_loss"
    # k-fold (training.folds): 0 = one train/val split; K >= 2: K models on K folds of train + val (frozen: K
    # heads on one feature pass; freeze: false: K fine-tuned models), thresholds tuned on out-of-fold
    # predictions (all non-test chips: rare tags get positives), their mean probability scored on test.
    folds: int = Field(0, ge=0, le=50)

    @field_validator("folds")
    @classmethod
    def _not_one(cls, v: int) -> int:
        if v == 1:
            raise ValueError("1 fold is no cross-validation: use 0 (one train/val split) or K >= 2")
        return v


class FeaturesConfig(_Strict):
    cache_dir: Path = Path(".cache/chiptag/features")
    batch_size: int = Field(64, ge=1)
    # 8: cache the features of the 8 flips/rotations (D4) of every chip; training sees one random view per
    # chip and epoch (= online D4 augmentation with a frozen backbone). 8x the extraction, once.
    views: Literal[1, 8] = 1
    tta: bool = True  # with views: 8, validation/test/evaluate average the probabilities of the 8 views
    # auto: ONNX Runtime on CPU when installed (faster there, see benchmarks/), eager torch otherwise.
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"
    channels_last: bool = True  # torch engine: faster convolutions on CPU (oneDNN) and CUDA
    # auto: nvJPEG on CUDA (file bytes read by workers, JPEG batches decoded on the GPU, anything else per
    # image on the CPU), libjpeg in workers on CPU. The cache records the decoder (their pixels differ slightly).
    decoder: Literal["auto", "cpu", "nvjpeg"] = "auto"


class OutputConfig(_Strict):
    runs_dir: Path = Path("runs")
    run_name: str | None = None  # None: <timestamp>-<model name>


class TrackingConfig(_Strict):
    backend: Literal["local", "clearml"] = "local"
    project: str = "chiptag"
    task_name: str | None = None  # None: "{model}-{run_id}"; a template may use {model} and {run_id}
    offline: bool = False  # ClearML offline mode: a session zip to import later, no server needed
    # Online: chiptag probes the ClearML api server itself with this timeout before training, instead of
    # letting ClearML retry for minutes.
    connect_timeout_s: float = Field(5.0, gt=0, le=120)
    fallback_offline: bool = False  # server unreachable online: track offline (with a warning) instead of failing


class ReportConfig(_Strict):
    """The report's error sheets for the test split (evaluation.sheets); `chiptag report` options override."""

    error_sheets: bool = True  # false: no top_errors.png, per_tag/, cooccurrence.png (e.g. a large sweep)
    top_errors: int = Field(24, ge=1)  # chips on top_errors.png, largest loss first
    tag_tiles: int = Field(6, ge=1)  # false positives and false negatives shown per tag sheet
    tag_sheets: int | None = Field(None, ge=1)  # None: every tag with a test error; N: the N worst by F2


class Config(_Strict):
    data: DataConfig = DataConfig()
    labels: LabelsConfig = LabelsConfig()
    models: list[ModelEntry]
    active_model_index: int = 0
    training: TrainingConfig = TrainingConfig()
    features: FeaturesConfig = FeaturesConfig()
    augment: AugmentConfig = AugmentConfig()
    output: OutputConfig = OutputConfig()
    tracking: TrackingConfig = TrackingConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _index_in_range(self) -> Config:
        if not self.models:
            raise ValueError("models: the list is empty; add at least one model entry")
        n = len(self.models)
        if not 0 <= self.active_model_index < n:  # -1 is no "last entry": run dirs and the runs table name it
            raise ValueError(f"active_model_index {self.active_model_index} is out of range: models has {n} "
                             f"entries (valid: 0..{n - 1})")
        return self

    @model_validator(mode="after")
    def _hue_needs_rgb(self) -> Config:
        if self.augment.hue and self.data.raster:
            raise ValueError("augment.hue rotates RGB hues; these chips are multiband rasters (data.bands / a .tif "
                             "extension): set augment.hue: 0")
        return self

    @property
    def model(self) -> ModelEntry:
        return self.models[self.active_model_index]

    def batch_size(self) -> int:
        return self.model.batch_size or self.training.batch_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
