"""Self-describing checkpoints: everything needed to predict without the config file, written atomically and
read back into the typed record they are written from (`Checkpoint`), never used as a raw dict.

    checkpoint.save(path, tagger, card, thresholds, epoch)   # training: the card + the tagger's weights
    ckpt = checkpoint.load(path)                             # -> Checkpoint, validated, naming the file
    tagger = checkpoint.load_tagger(ckpt)                    # the exact model, weights loaded, eval mode

On disk (format 1) a checkpoint is a plain dict (torch.load(weights_only=True) reads it without running code):
format_version, chiptag_version, backbone, weights_id, head, tags, thresholds, preprocessing, frozen, config,
state_dict, epoch; `members` (K) for a k-fold run (one backbone, K heads averaged); `ensemble` (a list of
member checkpoints without state_dict or config; their weights are in the ensemble's state_dict) for
`chiptag ensemble`; `backbone_file` for a checkpoint that keeps its head alone and takes its (frozen) backbone's
weights from another checkpoint (a k-fold run's fold-k/checkpoint.pt: the run's one backbone is in the run's
checkpoint.pt, not copied K times). `load` joins them, so such a checkpoint predicts like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from chiptag import __version__
from chiptag.atomic import torch_save
from chiptag.data.images import Preprocessing
from chiptag.errors import ChiptagError
from chiptag.models.backbones import adapt_stem, get_spec, replace_head
from chiptag.models.checkpoint_record import FORMAT_VERSION, REQUIRED  # one list, also read without torch
from chiptag.models.head import HeadSpec, MeanProbability, Tagger
from chiptag.models.weights import read_torch_file

# An ensemble's members carry no weights of their own (they are in the ensemble's state_dict).
MEMBER_REQUIRED = tuple(k for k in REQUIRED if k != "state_dict")


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about its model besides the weights: enough to rebuild it and preprocess.
    Training builds one before it has weights; `save` adds the tagger's weights to make a Checkpoint."""

    backbone: str
    weights_id: str
    head: HeadSpec
    tags: list[str]
    preprocessing: Preprocessing
    config: dict | None  # the run's resolved config; None in an ensemble's members (the ensemble holds one)

    @property
    def label_rules(self) -> dict:
        """The `labels` rules predictions are decoded with (the config's section; {} before there were rules)."""
        return (self.config or {}).get("labels") or {}


@dataclass(frozen=True)
class Checkpoint(ModelCard):
    """A checkpoint as written and read back: the card, the decision thresholds, and the weights."""

    thresholds: list[float]
    frozen: bool
    # None in an ensemble's members and where the weights already live in a model (Predictor.card). Not
    # compared (tensors have no truth value: compare weights with torch.equal) nor printed (megabytes).
    state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    epoch: int | None = None  # the best epoch; None for an ensemble of runs
    members: int | None = None  # a k-fold run: K heads on one backbone, their mean probability
    ensemble: tuple[Checkpoint, ...] = ()  # `chiptag ensemble`: whole models, their mean probability
    # The checkpoint (relative to this one's folder) that holds the backbone's weights; this one's state_dict
    # then holds the head alone. None: every weight is here.
    backbone_file: str | None = None
    chiptag_version: str = __version__  # of the chiptag that wrote it ("?" where a file does not say)

    @classmethod
    def of(cls, tagger: Tagger, card: ModelCard, thresholds: Sequence[float] | None, epoch: int,
           backbone_file: str | None = None) -> Checkpoint:
        """thresholds None: a checkpoint written during training, before thresholds are tuned (0.5 each, the
        threshold the best epoch was chosen at); the final one carries the tuned thresholds. backbone_file: keep
        the head's weights alone, the backbone's are in that checkpoint (see the module's docstring)."""
        if thresholds is None:
            thresholds = [0.5] * len(card.tags)
        members, ensemble = None, ()
        if isinstance(tagger.head, MeanProbability):
            if all(isinstance(m, Tagger) for m in tagger.head.members):  # whole models (k-fold fine-tuning)
                described = {f.name: getattr(card, f.name) for f in fields(ModelCard)} | {"config": None}
                ensemble = tuple(cls(**described, thresholds=[0.5] * len(card.tags), frozen=m.frozen)
                                 for m in tagger.head.members)
            else:
                members = len(tagger.head.members)
        state = tagger.state_dict()
        if backbone_file is not None:
            state = {k: v for k, v in state.items() if k.startswith("head.")}
        return cls(**{f.name: getattr(card, f.name) for f in fields(ModelCard)},
                   thresholds=[float(t) for t in thresholds], frozen=tagger.frozen, state_dict=state,
                   epoch=epoch, members=members, ensemble=ensemble, backbone_file=backbone_file)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk layout (format 1), plain types only; keys that do not apply are left out, as always."""
        obj: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "chiptag_version": self.chiptag_version, "backbone": self.backbone,
            "weights_id": self.weights_id, "head": self.head.to_dict(), "tags": list(self.tags),
            "thresholds": [float(t) for t in self.thresholds], "preprocessing": self.preprocessing.to_dict(),
            "frozen": self.frozen,
        }
        if self.config is not None:
            obj["config"] = self.config
        if self.state_dict is not None:
            obj["state_dict"] = self.state_dict
        obj["epoch"] = self.epoch
        if self.members is not None:
            obj["members"] = self.members
        if self.ensemble:
            obj["ensemble"] = [m.to_dict() for m in self.ensemble]
        if self.backbone_file is not None:
            obj["backbone_file"] = self.backbone_file
        return obj

    @classmethod
    def from_dict(cls, obj: Any, source: str, required: Sequence[str] = REQUIRED) -> Checkpoint:
        """The record of an on-disk dict; `source` names it in errors (the file, and which member)."""
        if not isinstance(obj, dict):
            raise ChiptagError(f"{source} is not a chiptag checkpoint")
        missing = [k for k in required if obj.get(k) is None]
        if missing:
            raise ChiptagError(f"{source} is not a chiptag checkpoint or is damaged: missing {', '.join(missing)}")
        if obj["format_version"] != FORMAT_VERSION:
            raise ChiptagError(f"{source} has checkpoint format {obj['format_version']} (written by chiptag "
                               f"{obj.get('chiptag_version', '?')}); this chiptag {__version__} reads format "
                               f"{FORMAT_VERSION}")
        # Absent or None optional keys keep the record's defaults; unknown keys are ignored.
        values = {key: _parse(obj, key, parse, source) for key, parse in _PARSERS.items()
                  if obj.get(key) is not None}
        values.setdefault("config", None)
        values.setdefault("chiptag_version", "?")
        ensemble = tuple(cls.from_dict(m, f"{source} (ensemble member {i})", MEMBER_REQUIRED)
                         for i, m in enumerate(_parse(obj, "ensemble", list, source) or [], 1))
        return cls(**values, ensemble=ensemble)

    def save(self, path: Path) -> None:
        torch_save(self.to_dict(), path)


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected a mapping, got {type(value).__name__}")
    return value


# key -> the value's type in the record; a value that does not fit is an error naming the key.
_PARSERS: dict[str, Callable[[Any], Any]] = {
    "backbone": str, "weights_id": str, "head": lambda d: HeadSpec(**_mapping(d)),
    "tags": lambda v: [str(t) for t in v], "preprocessing": lambda d: Preprocessing.from_dict(_mapping(d)),
    "config": _mapping, "thresholds": lambda v: [float(t) for t in v], "frozen": bool, "state_dict": _mapping,
    "epoch": int, "members": int, "chiptag_version": str, "backbone_file": str,
}


def _parse(obj: dict, key: str, parse: Callable[[Any], Any], source: str) -> Any:
    if obj.get(key) is None:
        return None
    try:
        return parse(obj[key])
    except (TypeError, ValueError, KeyError) as exc:
        raise ChiptagError(f"{source} is damaged: bad {key} ({exc.__class__.__name__}: {exc})") from None


def save(path: Path, tagger: Tagger, card: ModelCard, thresholds: Sequence[float] | None, epoch: int,
         backbone_file: str | None = None) -> None:
    """The tagger's weights with its card (thresholds None, backbone_file: see Checkpoint.of)."""
    Checkpoint.of(tagger, card, thresholds, epoch, backbone_file).save(path)


def load(path: Path, *, with_backbone: bool = True) -> Checkpoint:
    """The checkpoint at `path`. One that keeps its head alone gets its backbone's weights from its
    `backbone_file` (with_backbone=False: its own weights only, e.g. to read a fold's head back)."""
    path = Path(path)
    ckpt = Checkpoint.from_dict(read_torch_file(path, "checkpoint"), str(path))
    if ckpt.backbone_file is None or not with_backbone:
        return ckpt
    source = path.parent / ckpt.backbone_file
    if not source.is_file():
        raise ChiptagError(f"{path} keeps its head alone and takes its backbone from {source}, which is missing "
                           "(a k-fold run that has not finished, or a fold dir moved out of its run)")
    shared = load(source).state_dict or {}
    backbone = {k: v for k, v in shared.items() if k.startswith("backbone.")}
    return replace(ckpt, state_dict={**backbone, **ckpt.state_dict}, backbone_file=None)


def build_tagger(ckpt: Checkpoint) -> Tagger:
    """The model a checkpoint describes, untrained: one backbone + head, one backbone + K heads averaged
    (`members`, a k-fold run), or several whole models averaged (`ensemble`: member checkpoints without
    weights, `chiptag ensemble`; their weights are in the ensemble's state_dict)."""
    if ckpt.ensemble:
        return Tagger(torch.nn.Identity(), MeanProbability([build_tagger(m) for m in ckpt.ensemble]), frozen=False)
    spec = get_spec(ckpt.backbone)
    net = replace_head(spec.builder(weights=None, image_size=ckpt.preprocessing.image_size), spec)
    adapt_stem(net, ckpt.preprocessing.channels)  # a multiband model's stem takes its bands
    head = MeanProbability([ckpt.head.build() for _ in range(ckpt.members)]) if ckpt.members else ckpt.head.build()
    return Tagger(net, head, frozen=ckpt.frozen)


def load_tagger(ckpt: Checkpoint) -> Tagger:
    """Rebuild the exact model (no weights download: the backbone's parameters are in the checkpoint)."""
    if ckpt.state_dict is None:
        raise ChiptagError(f"the {ckpt.backbone} checkpoint record holds no weights (an ensemble member's are in "
                           "the ensemble's)")
    tagger = build_tagger(ckpt)
    try:
        tagger.load_state_dict(ckpt.state_dict)
    except RuntimeError as exc:
        raise ChiptagError(f"checkpoint weights do not fit {ckpt.backbone}: {str(exc).splitlines()[0]}") from None
    return tagger.eval()
