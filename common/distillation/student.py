"""The low-res student's bags: adapted instances (with their coords) for every slide."""

from __future__ import annotations

import numpy as np
import torch

from common.distillation.adapter import CrossResAdapter
from common.distillation.data import DistillData
from common.distillation.instances import instance_coords, student_instances


@torch.no_grad()
def student_bags(
    adapter: CrossResAdapter | None, data: DistillData, mode: str, batch_patches: int = 4096
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """slide key -> (instances [M, E] float32, coords [M, 2] or None) as the bundle builds them at inference."""
    if adapter is not None:
        adapter.eval()
    use_tokens = mode == "tokens" or (mode == "pooled" and data.has_tokens)
    grid = data.token_grid if mode == "tokens" else 0
    bags: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for slide in data.slides:
        features = torch.from_numpy(slide.low.features)
        tokens = torch.from_numpy(slide.low.tokens) if use_tokens and slide.low.tokens is not None else None
        parts, lows, slots = [], [], []
        for start in range(0, features.shape[0], batch_patches):
            stop = start + batch_patches
            inst, low, slot = student_instances(
                adapter, mode, features[start:stop], None if tokens is None else tokens[start:stop].float(), use_tokens
            )
            parts.append(inst)
            lows.append(low + start)
            slots.append(slot)
        instances = torch.cat(parts).float()
        coords = None
        if slide.low.coords is not None:
            coords = instance_coords(
                torch.from_numpy(slide.low.coords), torch.cat(lows), torch.cat(slots), grid, slide.low_size_level0
            ).numpy()
        bags[slide.key] = (instances.numpy(), coords)
    return bags
