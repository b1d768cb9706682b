"""The classification head (the plan's Dropout -> Linear -> ReLU -> Linear) and Tagger = backbone + head."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadSpec:
    in_dim: int
    n_tags: int
    hidden_dim: int | None = 512
    dropout: float = 0.2

    def build(self) -> nn.Sequential:
        if self.hidden_dim:
            return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.in_dim, self.hidden_dim), nn.ReLU(),
                                 nn.Linear(self.hidden_dim, self.n_tags))
        return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.in_dim, self.n_tags))

    def describe(self) -> str:
        if self.hidden_dim:
            return (f"Dropout({self.dropout:g})-Linear({self.in_dim},{self.hidden_dim})-ReLU-"
                    f"Linear({self.hidden_dim},{self.n_tags})")
        return f"Dropout({self.dropout:g})-Linear({self.in_dim},{self.n_tags})"

    def to_dict(self) -> dict:
        return asdict(self)


def freeze(module: nn.Module) -> None:
    """Frozen means frozen: no gradients *and* eval mode, so BatchNorm running statistics never move."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


class Tagger(nn.Module):
    """images -> logits. forward = head(backbone(x)), exactly torchvision's forward with its classifier
    attribute set to `head` (tests check this for every registered architecture)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, frozen: bool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.frozen = frozen
        if frozen:
            freeze(backbone)

    def train(self, mode: bool = True) -> Tagger:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def count_parameters(module: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


class MeanProbability(nn.Module):
    """Members' logits -> the logit of their mean probability, so sigmoid of the output is the ensemble's mean
    probability and everything downstream (evaluation, TTA, predict, ONNX export) treats an ensemble like one
    model. Computed in log space: logit(mean p) = logsumexp(logsigmoid(l)) - logsumexp(logsigmoid(-l)) (the
    1/K cancels), exact even where a probability rounds to 0 or 1 in float32."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(x) for m in self.members])
        return (torch.logsumexp(nn.functional.logsigmoid(logits), 0)
                - torch.logsumexp(nn.functional.logsigmoid(-logits), 0))
