"""The low-res student's bags: adapted instances (with their coords) for every slide."""

from __future__ import annotations

import numpy as np
import torch

from fedslide.common.config.base import ConfigError
from fedslide.common.config.model import ModelConfig
from fedslide.common.distillation.adapter import CrossResAdapter
from fedslide.common.distillation.data import DistillData
from fedslide.common.distillation.instances import instance_coords, student_instances
from fedslide.common.models.registry import build_model


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


def starts_from_teacher(init: str, student_input: str, student: ModelConfig, teacher: ModelConfig) -> bool:
    """Whether KD students start from the teacher's weights (kd.student-init): 'auto' when both models have the
    same parameters and the student reads adapted features; 'teacher' with other parameters is a ConfigError."""
    if init == "scratch":
        return False
    with torch.random.fork_rng(devices=[]):  # building the models must not move the seeded generators
        shapes = [{k: tuple(v.shape) for k, v in build_model(c).state_dict().items()} for c in (student, teacher)]
    same = shapes[0] == shapes[1]
    if init == "teacher" and not same:
        raise ConfigError(
            f"kd.student-init = 'teacher' needs a student with the teacher's parameters; student {student.name} "
            f"(in-dim {student.in_dim}, hidden-dim {student.hidden_dim}) vs teacher {teacher.name} (in-dim "
            f"{teacher.in_dim}, hidden-dim {teacher.hidden_dim}): set kd.student-init = 'scratch' or 'auto'"
        )
    return same and (init == "teacher" or student_input != "raw")
