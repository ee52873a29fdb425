"""Stage pieces that the centralised pipeline and the federated site steps share (the same code, the same numbers).

- `student_input`: the student's input mode given what the low-res files carry;
- `adapter_pairs`: the (low patch, high children) pairs of some slides, for the adapter;
- `cluster_vectors`: the teacher outputs that clustering reads;
- `scatter_kd_targets` / `kd_loss`: teacher/expert logits of the training slides placed at their cohort
  index, and the student's KD loss over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedslide.common.config.distill import AdapterConfig, KDConfig
from fedslide.common.distillation.crossres import PatchPairs, collect_pairs
from fedslide.common.distillation.data import DistillData
from fedslide.common.distillation.losses import CachedKDLoss


def student_input(requested: str, has_tokens: bool) -> str:
    """kd.student-input as it can run: "tokens" falls back to "pooled" when the low-res files carry no tokens."""
    return "pooled" if requested == "tokens" and not has_tokens else requested


def adapter_pairs(
    data: DistillData, indices: np.ndarray, adapter: AdapterConfig, seed: int, use_tokens: bool | None = None
) -> PatchPairs:
    """Patch pairs of the slides `indices` (tokens when the files carry them, unless `use_tokens` says)."""
    tokens = data.has_tokens if use_tokens is None else use_tokens
    slots = data.token_grid**2 if tokens else 1
    return collect_pairs([data.slides[i] for i in indices], tokens, slots, adapter.max_patches_per_slide, seed)


def cluster_vectors(features: str, logits: torch.Tensor, embedding: torch.Tensor) -> np.ndarray:
    """The vectors clustering reads (clusters.features: the teacher's logits or its embedding)."""
    return (logits if features == "logits" else embedding).numpy()


@dataclass
class KDTargets:
    """Teacher logits [n, K], expert logits [C, n, K] (or None) and cluster [n] (-1: none) by cohort index."""

    teacher: torch.Tensor
    experts: torch.Tensor | None
    cluster: torch.Tensor


def scatter_kd_targets(
    n: int,
    num_classes: int,
    train: np.ndarray,
    teacher: torch.Tensor,
    experts: torch.Tensor | None = None,
    assignment: np.ndarray | None = None,
) -> KDTargets:
    """Logits of the training slides (`teacher` [|train|, K], `experts` [C, |train|, K]) and their clusters placed
    at their cohort index among `n` slides; every other slide gets zeros and cluster -1."""
    rows = torch.from_numpy(train)
    teacher_full = torch.zeros(n, num_classes)
    teacher_full[rows] = teacher
    experts_full, cluster = None, torch.full((n,), -1, dtype=torch.long)
    if experts is not None:
        experts_full = torch.zeros(len(experts), n, num_classes)
        experts_full[:, rows] = experts
        if assignment is not None:
            cluster[rows] = torch.from_numpy(assignment).long()
    return KDTargets(teacher_full, experts_full, cluster)


def kd_loss(
    kd: KDConfig, targets: KDTargets, class_weight: torch.Tensor | None, use_experts: bool = True
) -> CachedKDLoss:
    """The student's loss: CE + KD from the teacher and (when there are expert targets and `use_experts`) experts."""
    experts = targets.experts if use_experts else None
    return CachedKDLoss(
        targets.teacher,
        experts,
        kd.temperature,
        kd.lambda_base,
        kd.lambda_expert if experts is not None else 0.0,
        kd.expert_kd,
        targets.cluster,
        class_weight,
    )
