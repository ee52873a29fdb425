"""The one interface every MIL model follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MILOutput:
    """What a MIL model returns for a batch of B padded bags of up to N instances."""

    logits: torch.Tensor  # [B, C] class logits
    embedding: torch.Tensor  # [B, E] slide embedding (input of the classifier head)
    attention: torch.Tensor | None = None  # [B, N] (or [B, H, N] / [B, C, N]) instance attention/scores
    aux_loss: torch.Tensor | None = None  # scalar added to the training loss (e.g. ACMIL diversity)
    instance_embedding: torch.Tensor | None = None  # [B, N, H] instance embeddings the attention scores (input order)


class MILModel(nn.Module):
    """Base class: a bag of instance features (+ optional coords, padding mask) -> MILOutput.

    features: [B, N, D] float; mask: [B, N] bool, True = real instance (None = all real);
    coords: [B, N, 2] level-0 pixel coordinates or None.
    Models whose training aux_loss can use the bag labels set `accepts_labels = True` and take
    an optional keyword `labels` ([B] long); without it they fall back to a label-free aux_loss.
    Models that pool instances with a softmax attention set `attention_pooling = True`: their `attention`
    is that distribution over the real instances in input order ([B, N], or [B, M, N] for M branches whose
    mean is the pooling weight), which attention distillation reads.
    """

    accepts_labels: bool = False
    attention_pooling: bool = False

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> MILOutput:  # pragma: no cover - interface
        raise NotImplementedError
