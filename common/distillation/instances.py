"""How the low-res student's instances are built from one slide's low-res features (shared by training and inference).

- "tokens": every low patch contributes its T = token_grid² adapted tokens (predicted high-res
  embeddings of its children), a bag of T·N instances; instance k is low patch k // T, slot k % T.
- "pooled": one instance per low patch: the mean of its adapted tokens, or, for encoders without
  tokens, the adapter's pooled-slot output (predicted mean of the children).
- "raw": the unadapted low features (the low-res baseline).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from fedslide.common.distillation.adapter import CrossResAdapter

StudentInput = Literal["tokens", "pooled", "raw"]
STUDENT_INPUTS: tuple[str, ...] = get_args(StudentInput)


class MissingTokensError(ValueError):
    """The student reads tokens but the low-res feature file has none."""


def student_instances(
    adapter: CrossResAdapter | None,
    mode: str,
    features: torch.Tensor,
    tokens: torch.Tensor | None = None,
    use_tokens: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(instances [M, E], low_index [M], slot [M]) for one slide's low features [N, D] / tokens [N, T, D].

    `use_tokens` (for "pooled"): average adapted tokens (True) or adapt the pooled feature (False);
    None = tokens when given.
    """
    if mode not in STUDENT_INPUTS:
        raise ValueError(f"student input must be one of {STUDENT_INPUTS}, got {mode!r}")
    n = features.shape[0]
    device = features.device
    low_index = torch.arange(n, device=device)
    zeros = torch.zeros(n, dtype=torch.long, device=device)
    if mode == "raw":
        return features, low_index, zeros
    if adapter is None:
        raise ValueError(f"student input {mode!r} needs an adapter")
    if use_tokens is None:
        use_tokens = tokens is not None
    if mode == "tokens" or use_tokens:
        if tokens is None:
            raise MissingTokensError(
                f"the student reads {mode!r} built from low-res tokens, but the features carry no 'tokens' dataset "
                "(encoder without a feature map, or preprocessing with encoder.write-tokens = false)"
            )
        adapted = adapter.adapt_tokens(tokens.to(features.dtype))
        if mode == "pooled":
            return adapted.mean(dim=1), low_index, zeros
        t = adapted.shape[1]
        return (
            adapted.reshape(n * t, -1),
            low_index.repeat_interleave(t),
            torch.arange(t, device=device).repeat(n),
        )
    return adapter.adapt_pooled(features), low_index, zeros


def instance_coords(
    coords: torch.Tensor, low_index: torch.Tensor, slot: torch.Tensor, token_grid: int, low_size_level0: float
) -> torch.Tensor:
    """Level-0 top-left (x, y) of each instance: its low patch's corner shifted to its child slot."""
    base = coords[low_index].to(torch.float32)
    if token_grid <= 0:
        return base
    step = float(low_size_level0) / token_grid
    offset = torch.stack([slot % token_grid, slot // token_grid], dim=1).to(torch.float32) * step
    return base + offset


def estimate_patch_size_level0(coords: torch.Tensor) -> float | None:
    """The grid step of a regular patch grid (smallest positive gap between distinct x or y), or None."""
    gaps = []
    for axis in range(2):
        values = torch.unique(coords[:, axis].to(torch.float64))
        if values.numel() > 1:
            gaps.append(float(torch.diff(values).min()))
    return min(gaps) if gaps else None
