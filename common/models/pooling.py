"""Instance-MLP baselines: masked mean pooling and masked max pooling."""

from __future__ import annotations

from typing import Literal

import torch

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import InstanceEncoder, init_linear, masked_max, masked_mean, prepare_bags


class PoolingMIL(MILModel):
    """Instance MLP (Linear, ReLU, Dropout) then masked mean or max over the bag, then the head."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        pooling: Literal["mean", "max"] = "mean",
        hidden_dim: int = 512,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        self.in_dim, self.pooling = in_dim, pooling
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        init_linear(self)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        features, mask = prepare_bags(features, mask, self.in_dim)
        h = self.encoder(features)
        embedding = masked_mean(h, mask) if self.pooling == "mean" else masked_max(h, mask)
        return MILOutput(logits=self.head(embedding), embedding=embedding)
