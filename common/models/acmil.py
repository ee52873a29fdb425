"""ACMIL (Zhang et al. 2023): attention-challenging MIL.

Multiple-branch attention (MBA): M gated attention branches, each with its own classifier,
pushed apart by a diversity loss; stochastic top-K instance masking (STKIM): in training,
a random `mask_drop` share of each branch's top-K instances is hidden from its softmax.
The slide prediction uses the branch-averaged attention.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import AttentionScorer, InstanceEncoder, init_linear, masked_softmax, prepare_bags


class ACMIL(MILModel):
    """M-branch gated attention MIL with STKIM in training; attention is [B, M, N].

    aux_loss (training only): `diversity_weight` x mean pairwise cosine similarity of the
    branch attention maps, plus, when `labels` are passed, the mean cross-entropy of the
    branch classifiers.
    """

    accepts_labels = True
    attention_pooling = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        n_token: int = 5,
        n_masked_patch: int = 10,
        mask_drop: float = 0.6,
        diversity_weight: float = 1.0,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_drop < 1.0:
            raise ValueError(f"mask_drop must be in [0, 1), got {mask_drop}")
        self.in_dim = in_dim
        self.n_token, self.n_masked_patch, self.mask_drop = n_token, n_masked_patch, mask_drop
        self.diversity_weight = diversity_weight
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.scorer = AttentionScorer(hidden_dim, attention_dim, n_token, gated=True, dropout=0.0)
        self.branch_classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, num_classes)) for _ in range(n_token)
        )
        init_linear(self)
        self.head = make_head(head, hidden_dim, num_classes, cka_degree)

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
    ) -> MILOutput:
        features, mask = prepare_bags(features, mask, self.in_dim)
        h = self.encoder(features)
        branch_mask = mask.unsqueeze(1).expand(-1, self.n_token, -1)  # [B, M, N]
        scores = self.scorer(h)  # [B, M, N]
        if self.training and self.mask_drop > 0 and self.n_masked_patch > 0:
            branch_mask = branch_mask & ~self.stochastic_topk_mask(scores.detach(), mask)
        attention = masked_softmax(scores, branch_mask)  # [B, M, N]
        embedding = torch.einsum("bn,bnh->bh", attention.mean(dim=1), h)
        logits = self.head(embedding)
        aux = None
        if self.training:
            aux = self.diversity_weight * self.diversity(attention)
            if labels is not None:
                branch_feats = torch.einsum("bmn,bnh->bmh", attention, h)
                branch_logits = torch.stack(
                    [clf(branch_feats[:, i]) for i, clf in enumerate(self.branch_classifiers)], dim=1
                )
                aux = aux + F.cross_entropy(
                    branch_logits.flatten(0, 1), labels.repeat_interleave(self.n_token).to(h.device)
                )
        return MILOutput(logits=logits, embedding=embedding, attention=attention, aux_loss=aux, instance_embedding=h)

    def stochastic_topk_mask(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bool [B, M, N]: True where a top-K instance of a branch is randomly hidden (STKIM)."""
        hidden = torch.zeros_like(scores, dtype=torch.bool)
        for b in range(scores.shape[0]):
            n = int(mask[b].sum())
            k = min(self.n_masked_patch, n)
            n_drop = int(k * self.mask_drop)
            if n_drop == 0:
                continue
            top = torch.topk(scores[b].masked_fill(~mask[b], float("-inf")), k, dim=-1).indices  # [M, k]
            pick = torch.argsort(torch.rand(top.shape, device=scores.device), dim=-1)[:, :n_drop]
            hidden[b].scatter_(-1, torch.gather(top, -1, pick), True)
        return hidden

    def diversity(self, attention: torch.Tensor) -> torch.Tensor:
        """Mean pairwise cosine similarity between the branches' attention maps."""
        if self.n_token < 2:
            return attention.new_zeros(())
        sims = [
            F.cosine_similarity(attention[:, i], attention[:, j], dim=-1)
            for i, j in itertools.combinations(range(self.n_token), 2)
        ]
        return torch.stack(sims).mean()
