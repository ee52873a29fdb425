"""Losses: cross-resolution regression (stage 1); CE + teacher/expert logit KD (D&D) + LRMIL's attention KD and
top-k/bottom-k instance loss (stage 2)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.training.data import BagBatch

INSTANCE_HEAD = "kd_instance_head"  # the instance head's name on the student while it trains (never saved with it)


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
    attention: torch.Tensor | None = None  # attention KD (None: not computed)
    instance: torch.Tensor | None = None  # top-k/bottom-k instance loss (None: not computed)


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


def attention_logits(output: MILOutput) -> torch.Tensor:
    """The student's attention logits [B, N] (up to a per-bag constant, which every softmax ignores): the log of its
    pooling distribution (the branch mean for [B, M, N] attention)."""
    if output.attention is None:
        raise ValueError("the model returns no attention")
    attention = output.attention.mean(dim=1) if output.attention.dim() == 3 else output.attention
    return torch.log(attention.clamp_min(torch.finfo(attention.dtype).tiny))


def attention_kl(student_logits: torch.Tensor, guided: torch.Tensor, temperature: float) -> torch.Tensor:
    """LRMIL's attention KD of one bag: KL(softmax(g/T) ‖ softmax(s/T)) over its n instances, divided by n, · T².

    The division by n is the reference code's (utils/losses.py attention_kl_loss: `reduction="batchmean"` on a 1-D
    tensor divides by its length).
    """
    t = float(temperature)
    return (
        F.kl_div(
            F.log_softmax(student_logits / t, dim=0),
            F.log_softmax(guided.to(student_logits) / t, dim=0),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def topk_instances(guided: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, bottom): indices of the k instances with the highest and the lowest teacher-guided attention, with
    k = min(k, n // 2) as in the reference's hard_topk_instance_loss (empty when the bag has one instance)."""
    k = min(int(k), guided.numel() // 2)
    if k < 1:
        empty = torch.zeros(0, dtype=torch.long, device=guided.device)
        return empty, empty
    return torch.topk(guided, k).indices, torch.topk(-guided, k).indices


def instance_loss(features: torch.Tensor, guided: torch.Tensor, head: nn.Module, k: int) -> torch.Tensor:
    """LRMIL's hard top-k instance loss of one bag: the head classifies the top-k instances (by teacher-guided
    attention) as 1 and the bottom-k as 0 (cross-entropy, mean over the 2k). These pseudo-labels do not depend on
    the slide label (reference utils/losses.py hard_topk_instance_loss); for a positive slide of a binary task top =
    the slide's label and bottom = negative."""
    top, bottom = topk_instances(guided, k)
    if top.numel() == 0:
        return features.new_zeros(())
    targets = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)])
    return F.cross_entropy(head(features[torch.cat([top, bottom])]), targets)


@dataclass
class AttentionGuidance:
    """LRMIL's attention terms of the student loss.

    `targets[i]`: the teacher's attention logits mapped onto slide i's student instances ([M_i], NaN where an
    instance has no 20x child; see stages.guided_attention), None for slides without (not training slides).
    `head`: the instance classifier (Linear(width, 2)); needed when lambda_instance > 0.
    """

    targets: Sequence[torch.Tensor | None]
    lambda_attention: float = 1.0
    temperature: float = 1.0
    lambda_instance: float = 1.0
    k: int = 4
    features: str = "embedding"  # "embedding": the student's instance embeddings; "input": its input instances
    head: nn.Module | None = None
    _output: MILOutput | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """Some attention term has a positive weight."""
        return self.lambda_attention > 0 or self.lambda_instance > 0

    @contextmanager
    def attached(self, model: MILModel) -> Iterator[None]:
        """While the student trains: capture its outputs (the terms read its attention and instance embeddings) and
        carry the instance head on it as `kd_instance_head` (so the optimiser, the device moves and the best-epoch
        selection include it); both are removed on exit, the head keeping its trained weights."""
        handle = model.register_forward_hook(self._capture)
        if self.head is not None and self.lambda_instance > 0:
            model.add_module(INSTANCE_HEAD, self.head)
        try:
            yield
        finally:
            handle.remove()
            if INSTANCE_HEAD in model._modules:
                del model._modules[INSTANCE_HEAD]
            self._output = None

    def _capture(self, module: nn.Module, args: object, output: MILOutput) -> None:
        self._output = output

    def terms(self, logits: torch.Tensor, batch: BagBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention KD, instance loss) of the batch, each the mean over bags with teacher attention on some
        instance (the reference skips a bag whose guided attention is all zero)."""
        output = self._output
        if output is None or output.logits is not logits:
            raise RuntimeError("attention terms need the student's output: train inside AttentionGuidance.attached")
        zero = logits.new_zeros(())
        student = attention_logits(output) if self.lambda_attention > 0 else None
        inst: torch.Tensor | None = None
        if self.lambda_instance > 0:
            if self.head is None:
                raise ValueError("lambda_instance > 0 needs an instance head")
            inst = output.instance_embedding if self.features == "embedding" else batch.features
            if inst is None:
                raise ValueError("the student returns no instance embeddings (kd.instance-features = 'embedding')")
        kl_sum, inst_sum, bags = zero, zero, 0
        for b, index in enumerate(batch.indices.tolist()):
            n = int(batch.mask[b].sum())
            guided = self.targets[index] if index < len(self.targets) else None
            if guided is None:
                raise ValueError(f"slide {index} has no teacher attention (only training slides have)")
            if guided.numel() != n:
                raise ValueError(
                    f"slide {index}: {n} student instances but teacher attention for {guided.numel()} "
                    "(bags must not be subsampled: training.max-instances unset)"
                )
            guided = guided.to(logits.device)
            valid = ~torch.isnan(guided)
            if not bool(valid.any()):
                continue
            g = guided[valid]
            bags += 1
            if student is not None:
                kl_sum = kl_sum + attention_kl(student[b, :n][valid], g, self.temperature)
            if inst is not None:
                assert self.head is not None
                inst_sum = inst_sum + instance_loss(inst[b, :n][valid], g, self.head, self.k)
        scale = 1.0 / max(bags, 1)
        return kl_sum * scale, inst_sum * scale


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
        guidance: AttentionGuidance | None = None,
    ):
        if expert_kd not in ("all", "own"):
            raise ValueError(f"expert_kd must be 'all' or 'own', got {expert_kd!r}")
        if expert_kd == "own" and experts is not None and cluster is None:
            raise ValueError("expert_kd = 'own' needs each slide's cluster")
        self.teacher, self.experts, self.cluster = teacher, experts, cluster
        self.temperature, self.lambda_base, self.lambda_expert = temperature, lambda_base, lambda_expert
        self.expert_kd, self.class_weight = expert_kd, class_weight
        self.guidance = guidance if guidance is not None and guidance.active else None

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

    def batch_terms(self, logits: torch.Tensor, batch: BagBatch) -> KDTerms:
        """All loss terms of a training batch, LRMIL's attention terms included when there is guidance."""
        terms = self.terms(logits, batch.labels, batch.indices)
        g = self.guidance
        if g is None:
            return terms
        attention, instance = g.terms(logits, batch)
        total = terms.total + g.lambda_attention * attention + g.lambda_instance * instance
        return KDTerms(total, terms.ce, terms.base, terms.expert, attention, instance)

    @contextmanager
    def attached(self, model: MILModel) -> Iterator[None]:
        """The context the student trains in (see AttentionGuidance.attached; nothing without attention terms)."""
        if self.guidance is None:
            yield
            return
        with self.guidance.attached(model):
            yield

    def __call__(self, logits: torch.Tensor, batch: BagBatch) -> torch.Tensor:
        return self.batch_terms(logits, batch).total


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
