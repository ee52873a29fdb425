"""The cross-resolution adapter (LRMIL stage 1): low-res token or pooled feature -> predicted high-res embedding."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to rebuild an adapter (stored beside its weights)."""

    in_dim: int
    out_dim: int
    hidden_dim: int = 512
    num_slots: int = 16  # token slots (token_grid²); slot `num_slots` is the pooled-feature slot
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON / weights_only friendly)."""
        return asdict(self)


class CrossResAdapter(nn.Module):
    """Small residual MLP with a learned embedding per child slot.

    `forward(x, slot)`: x [..., in_dim], slot [...] long (0..num_slots-1 for tokens, num_slots for a
    pooled low feature) -> [..., out_dim] predicted high-res embedding of that child (or children mean).
    """

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.slot_embedding = nn.Embedding(spec.num_slots + 1, spec.in_dim)
        nn.init.normal_(self.slot_embedding.weight, std=0.02)
        self.norm = nn.LayerNorm(spec.in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(spec.in_dim, spec.hidden_dim),
            nn.GELU(),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden_dim, spec.out_dim),
        )
        self.skip: nn.Module = nn.Identity() if spec.in_dim == spec.out_dim else nn.Linear(spec.in_dim, spec.out_dim)

    @property
    def pooled_slot(self) -> int:
        """Slot index of a pooled (whole low patch) feature."""
        return self.spec.num_slots

    def forward(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        h = x + self.slot_embedding(slot)
        return self.skip(x) + self.mlp(self.norm(h))

    def adapt_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, T, D] -> [N, T, out_dim], token t in slot t."""
        slots = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2])
        return self(tokens, slots)

    def adapt_pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled low features [N, D] -> [N, out_dim] (predicted mean of the children)."""
        slots = torch.full(features.shape[:1], self.pooled_slot, dtype=torch.long, device=features.device)
        return self(features, slots)


def build_adapter(spec: AdapterSpec | dict[str, Any]) -> CrossResAdapter:
    """A freshly initialised adapter from a spec or its dict."""
    return CrossResAdapter(spec if isinstance(spec, AdapterSpec) else AdapterSpec(**spec))
