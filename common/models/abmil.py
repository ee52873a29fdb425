"""ABMIL (Ilse et al. 2018): attention-based MIL pooling, plain or gated."""

from __future__ import annotations

import torch

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import AttentionPool, InstanceEncoder, init_linear, prepare_bags


class ABMIL(MILModel):
    """Instance MLP, (gated) attention pooling over real instances, classifier head."""

    attention_pooling = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.pool = AttentionPool(hidden_dim, attention_dim, gated=gated, dropout=0.0)
        init_linear(self)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        features, mask = prepare_bags(features, mask, self.in_dim)
        h = self.encoder(features)
        embedding, attention = self.pool(h, mask)
        return MILOutput(logits=self.head(embedding), embedding=embedding, attention=attention, instance_embedding=h)
