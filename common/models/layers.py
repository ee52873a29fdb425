"""Building blocks shared by the MIL models: masks, masked pooling, instance encoders, attention pooling."""

from __future__ import annotations

import torch
from torch import nn


def resolve_mask(features: torch.Tensor, mask: torch.Tensor | None, in_dim: int | None = None) -> torch.Tensor:
    """Check a padded batch and return its [B, N] bool mask (True = real instance)."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    if in_dim is not None and features.shape[-1] != in_dim:
        raise ValueError(
            f"features have dim {features.shape[-1]} but the model was built with in-dim {in_dim}; "
            "set model.in-dim to the encoder's output dim"
        )
    b, n, _ = features.shape
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
    else:
        if mask.shape != (b, n):
            raise ValueError(f"mask must be [B, N] = {(b, n)}, got {tuple(mask.shape)}")
        mask = mask.to(device=features.device, dtype=torch.bool)
    if n == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError("every bag needs at least one real instance (mask row without True)")
    return mask


def prepare_bags(
    features: torch.Tensor, mask: torch.Tensor | None, in_dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (features with padded rows zeroed, [B, N] bool mask) for a padded batch."""
    mask = resolve_mask(features, mask, in_dim)
    return features.masked_fill(~mask.unsqueeze(-1), 0.0), mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` that gives padded positions (mask False) exactly zero weight."""
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=dim).masked_fill(~mask, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, N, H] over real instances -> [B, H]."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of x [B, N, H] over real instances -> [B, H]."""
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def real_first_order(mask: torch.Tensor) -> torch.Tensor:
    """Per bag, a permutation [B, N] putting real instances first, each group in its original order."""
    return torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] reordered along dim 1 by index [B, N]."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return torch.gather(x, 1, index.reshape(shape).expand(index.shape + x.shape[2:]))


def scatter_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverse of gather_rows: put row j of x back at position index[:, j]."""
    shape = index.shape + (1,) * (x.dim() - 2)
    out = torch.zeros_like(x)
    return out.scatter(1, index.reshape(shape).expand(index.shape + x.shape[2:]), x)


def init_linear(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every Linear in `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class InstanceEncoder(nn.Sequential):
    """Per-instance projection D -> H: Linear, ReLU, Dropout."""

    def __init__(self, in_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


class AttentionScorer(nn.Module):
    """Attention scores (Ilse et al.): [B, N, H] -> raw scores [B, K, N] for K branches, optionally gated."""

    def __init__(
        self, hidden_dim: int, attention_dim: int, branches: int = 1, gated: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.value = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = (
            nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        self.score = nn.Linear(attention_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.value(h)
        if self.gate is not None:
            a = a * self.gate(h)
        return self.score(a).transpose(1, 2)


class AttentionPool(nn.Module):
    """Single-branch attention pooling: [B, N, H] + mask -> (embedding [B, H], attention [B, N])."""

    def __init__(self, hidden_dim: int, attention_dim: int, gated: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.scorer = AttentionScorer(hidden_dim, attention_dim, 1, gated, dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = masked_softmax(self.scorer(h)[:, 0], mask)
        return torch.einsum("bn,bnh->bh", attention, h), attention
