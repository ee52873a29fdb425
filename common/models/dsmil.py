"""DSMIL (Li et al. 2021): dual-stream MIL with critical-instance attention.

Stream 1 scores every instance with a linear instance classifier and takes, per class, the
max-scoring (critical) instance. Stream 2 attends from every instance to the critical
instance of each class (query similarity) and classifies the per-class bag vectors.
Choice made here: `logits` = mean of the max-instance scores and the bag scores, as DSMIL
trains both streams with equal weight and predicts with their average; no aux_loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import InstanceEncoder, init_linear, masked_softmax, prepare_bags


class DSMIL(MILModel):
    """Instance MLP, instance classifier (max stream), critical-instance attention (bag stream).

    embedding: the per-class bag vectors flattened, [B, C*H]; attention: [B, C, N].
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        query_dim: int = 128,
        passing_v: bool = False,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, num_classes)
        self.query = nn.Sequential(
            nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.value: nn.Module = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
            if passing_v
            else nn.Identity()
        )
        init_linear(self)
        self.head = make_head(head, num_classes * hidden_dim, num_classes, cka_degree)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        features, mask = prepare_bags(features, mask, self.in_dim)
        h = self.encoder(features)  # [B, N, H]
        instance_scores = self.instance_classifier(h).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_scores, critical = instance_scores.max(dim=1)  # [B, C], [B, C]
        q = self.query(h)  # [B, N, Q]
        q_critical = torch.gather(q, 1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # [B, C, Q]
        scores = torch.einsum("bcq,bnq->bcn", q_critical, q) / math.sqrt(q.shape[-1])
        attention = masked_softmax(scores, mask.unsqueeze(1))  # [B, C, N]
        bag = torch.einsum("bcn,bnh->bch", attention, self.value(h))
        embedding = bag.flatten(1)
        logits = 0.5 * (self.head(embedding) + max_scores)
        return MILOutput(logits=logits, embedding=embedding, attention=attention)
