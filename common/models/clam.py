"""CLAM-SB (Lu et al. 2021): single-branch clustering-constrained attention MIL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.heads import HeadName, make_head
from fedslide.common.models.layers import AttentionScorer, InstanceEncoder, init_linear, masked_softmax, prepare_bags


class CLAMSB(MILModel):
    """Gated attention pooling plus, in training, CLAM's instance-level clustering loss as aux_loss.

    The clustering loss uses the top-k / bottom-k attended instances of each bag as pseudo
    positive / negative instances of the bag's class (and, when `subtyping`, the top-k as
    negatives of every other class). The bag class is `labels` when passed to forward,
    else the model's own (detached) prediction. Inference is unaffected.
    """

    accepts_labels = True
    attention_pooling = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        k_sample: int = 8,
        instance_loss_weight: float = 0.3,
        subtyping: bool | None = None,
        dropout: float = 0.25,
        head: HeadName = "linear",
        cka_degree: int = 4,
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.k_sample, self.instance_loss_weight = k_sample, instance_loss_weight
        self.subtyping = num_classes > 2 if subtyping is None else subtyping
        self.encoder = InstanceEncoder(in_dim, hidden_dim, dropout)
        self.scorer = AttentionScorer(hidden_dim, attention_dim, 1, gated=True, dropout=dropout)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(num_classes))
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
        scores = self.scorer(h)[:, 0]  # [B, N]
        attention = masked_softmax(scores, mask)
        embedding = torch.einsum("bn,bnh->bh", attention, h)
        logits = self.head(embedding)
        aux = None
        if self.training and self.k_sample > 0 and self.instance_loss_weight > 0:
            targets = labels if labels is not None else logits.detach().argmax(dim=1)
            aux = self.instance_loss_weight * self.instance_loss(h, scores, mask, targets)
        return MILOutput(logits=logits, embedding=embedding, attention=attention, aux_loss=aux, instance_embedding=h)

    def instance_loss(
        self, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Mean over bags of CLAM's instance clustering loss (top-k / bottom-k by attention score)."""
        losses = []
        for b in range(h.shape[0]):
            n = int(mask[b].sum())
            k = min(self.k_sample, n // 2)
            if k == 0:
                continue
            hb, sb = h[b][mask[b]], scores[b][mask[b]]
            top = hb[torch.topk(sb, k).indices]
            bottom = hb[torch.topk(sb, k, largest=False).indices]
            label = int(targets[b])
            total = h.new_zeros(())
            for c, classifier in enumerate(self.instance_classifiers):
                if c == label:
                    inst = torch.cat([top, bottom])
                    inst_targets = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                elif self.subtyping:
                    inst, inst_targets = top, torch.zeros(k, dtype=torch.long, device=h.device)
                else:
                    continue
                total = total + F.cross_entropy(classifier(inst), inst_targets)
            losses.append(total / self.num_classes if self.subtyping else total)
        if not losses:
            return h.new_zeros(()) * scores.sum()
        return torch.stack(losses).mean()
