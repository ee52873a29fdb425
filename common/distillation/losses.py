"""Losses: cross-resolution regression (stage 1) and CE + teacher/expert KD (D&D stage 2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedslide.common.training.data import BagBatch


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², averaged over the batch (rows = slides)."""
    t = float(temperature)
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=-1),
            F.log_softmax(teacher_logits.to(student_logits) / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


@dataclass
class KDTerms:
    """The parts of one distillation loss (each a scalar tensor)."""

    total: torch.Tensor
    ce: torch.Tensor
    base: torch.Tensor
    expert: torch.Tensor


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    expert_logits: torch.Tensor | None,
    temperature: float,
    lambda_base: float = 1.0,
    lambda_expert: float = 1.0,
    class_weight: torch.Tensor | None = None,
) -> KDTerms:
    """`CE + λ_base·KL(teacher‖student)·T² + (λ_expert/E)·Σ_e KL(expert_e‖student)·T²`.

    student_logits [B, K]; teacher_logits [B, K] or None; expert_logits [B, E, K] (E experts per
    slide: all C experts, or just the slide's own with E = 1) or None. A term whose λ is 0 or
    whose logits are None is left out (it is reported as 0).
    """
    zero = student_logits.new_zeros(())
    ce = F.cross_entropy(
        student_logits, labels, weight=None if class_weight is None else class_weight.to(student_logits)
    )
    base = zero
    if teacher_logits is not None and lambda_base > 0:
        base = kl_teacher_student(student_logits, teacher_logits, temperature)
    expert = zero
    if expert_logits is not None and lambda_expert > 0 and expert_logits.shape[1] > 0:
        e = expert_logits.shape[1]
        expert = sum((kl_teacher_student(student_logits, expert_logits[:, i], temperature) for i in range(e)), zero) / e
    total = ce + lambda_base * base + lambda_expert * expert
    return KDTerms(total=total, ce=ce, base=base, expert=expert)


class CachedKDLoss:
    """Training loss of a student batch from teacher/expert logits cached per cohort slide index.

    teacher [n, K] (or None); experts [C, n, K] (or None); cluster [n] (cluster of each slide,
    -1 when unknown; needed for expert_kd = "own"). Callable as `(logits, batch) -> loss`, the
    `batch_loss` hook of common.training.loop.fit.
    """

    def __init__(
        self,
        teacher: torch.Tensor | None,
        experts: torch.Tensor | None,
        temperature: float,
        lambda_base: float = 1.0,
        lambda_expert: float = 1.0,
        expert_kd: str = "all",
        cluster: torch.Tensor | None = None,
        class_weight: torch.Tensor | None = None,
    ):
        if expert_kd not in ("all", "own"):
            raise ValueError(f"expert_kd must be 'all' or 'own', got {expert_kd!r}")
        if expert_kd == "own" and experts is not None and cluster is None:
            raise ValueError("expert_kd = 'own' needs each slide's cluster")
        self.teacher, self.experts, self.cluster = teacher, experts, cluster
        self.temperature, self.lambda_base, self.lambda_expert = temperature, lambda_base, lambda_expert
        self.expert_kd, self.class_weight = expert_kd, class_weight

    def terms(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> KDTerms:
        """All loss terms for slides `indices` (cohort indices, CPU)."""
        idx = indices.cpu()
        teacher = None if self.teacher is None else self.teacher[idx].to(logits.device)
        experts = None
        if self.experts is not None:
            if self.expert_kd == "all":
                experts = self.experts[:, idx].permute(1, 0, 2)
            else:
                assert self.cluster is not None
                own = self.cluster[idx]
                if bool((own < 0).any()):
                    raise ValueError(f"slides {idx[own < 0].tolist()} have no cluster (expert_kd = 'own')")
                experts = self.experts[own, idx].unsqueeze(1)
            experts = experts.to(logits.device)
        return distillation_loss(
            logits, labels, teacher, experts, self.temperature, self.lambda_base, self.lambda_expert, self.class_weight
        )

    def __call__(self, logits: torch.Tensor, batch: BagBatch) -> torch.Tensor:
        return self.terms(logits, batch.labels, batch.indices).total


def regression_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str, cosine_weight: float = 1.0
) -> torch.Tensor:
    """Masked patch regression: mean over real children of MSE (per dim), (1 - cosine), or both."""
    m = mask.to(pred.dtype)
    n = m.sum().clamp_min(1.0)
    total = pred.new_zeros(())
    if kind in ("mse", "mse+cosine"):
        total = total + (((pred - target) ** 2).mean(dim=-1) * m).sum() / n
    if kind in ("cosine", "mse+cosine"):
        weight = 1.0 if kind == "cosine" else cosine_weight
        total = total + weight * ((1.0 - F.cosine_similarity(pred, target, dim=-1)) * m).sum() / n
    if kind not in ("mse", "cosine", "mse+cosine"):
        raise ValueError(f"adapter loss must be mse, cosine or mse+cosine, got {kind!r}")
    return total
