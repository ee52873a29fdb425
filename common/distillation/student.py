"""The low-res student's bags: adapted instances (with their coords) for every slide."""

from __future__ import annotations

import numpy as np
import torch

from fedslide.common.config.base import ConfigError
from fedslide.common.config.distill import KDConfig
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


def _probe(cfg: ModelConfig) -> tuple[bool, int | None]:
    """(pools with softmax attention, width of its instance embeddings or None) of a model config."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build_model(cfg).eval()
        if not model.attention_pooling:
            return False, None
        out = model(torch.zeros(1, 2, cfg.in_dim))
    width = None if out.instance_embedding is None else int(out.instance_embedding.shape[-1])
    return out.attention is not None, width


def attention_kd_width(
    kd: KDConfig, student: ModelConfig, teacher: ModelConfig, max_instances: int | None
) -> int | None:
    """Check that LRMIL's attention terms (kd.lambda-attention, kd.lambda-instance) can run with these models and
    return the instance head's input width (None: no instance loss). A ConfigError names what does not fit."""
    on = {k: v for k, v in (("kd.lambda-attention", kd.lambda_attention), ("kd.lambda-instance", kd.lambda_instance))}
    on = {k: v for k, v in on.items() if v > 0}
    if not on:
        return None
    switch = " and ".join(f"{k} = {v}" for k, v in on.items())
    off = " and ".join(f"{k} = 0" for k in on)
    if max_instances is not None:
        raise ConfigError(
            f"{switch} map the teacher's attention onto every student instance, but training.max-instances = "
            f"{max_instances} subsamples the bags: unset training.max-instances or set {off}"
        )
    for role, cfg in (("student", student), ("teacher", teacher)):
        if not _probe(cfg)[0]:
            raise ConfigError(
                f"{switch} need a {role} that pools its instances with attention; {role} {cfg.name} has none "
                f"(attention models: {', '.join(ATTENTION_MODELS)}): choose one of them or set {off}"
            )
    if kd.lambda_instance <= 0:
        return None
    if kd.instance_features == "input":
        return student.in_dim
    width = _probe(student)[1]
    if width is None:
        raise ConfigError(
            f"kd.lambda-instance = {kd.lambda_instance} with kd.instance-features = 'embedding' needs a student that "
            f"returns its instance embeddings; student {student.name} does not (those that do: "
            f"{', '.join(INSTANCE_EMBEDDING_MODELS)}): set kd.instance-features = 'input' or kd.lambda-instance = 0"
        )
    return width


ATTENTION_MODELS = ("abmil", "abmil_gated", "clam_sb", "acmil", "longmil", "mambamil")
INSTANCE_EMBEDDING_MODELS = ("abmil", "abmil_gated", "clam_sb", "acmil")
