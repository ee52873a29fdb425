"""Stage pieces that the centralised pipeline and the federated site steps share (the same code, the same numbers).

- `student_input`: the student's input mode given what the low-res files carry;
- `adapter_pairs`: the (low patch, high children) pairs of some slides, for the adapter;
- `cluster_vectors`: the teacher outputs that clustering reads;
- `scatter_kd_targets` / `kd_loss`: teacher/expert logits of the training slides placed at their cohort
  index, and the student's KD loss over them;
- `teacher_attention` / `guided_attention` / `attention_targets` / `instance_head`: LRMIL's attention terms (the
  teacher's attention on each training slide mapped onto the student's instances, and the instance classifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedslide.common.config.distill import AdapterConfig, KDConfig
from fedslide.common.distillation.crossres import PatchPairs, collect_pairs
from fedslide.common.distillation.data import DistillData
from fedslide.common.distillation.losses import AttentionGuidance, CachedKDLoss, attention_logits
from fedslide.common.models.base import MILModel
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.data import Indices


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


def attention_terms_on(kd: KDConfig) -> bool:
    """Whether the student loss has LRMIL's attention KD or instance loss."""
    return kd.lambda_attention > 0 or kd.lambda_instance > 0


@torch.no_grad()
def teacher_attention(model: MILModel, cohort: Cohort, indices: Indices, device: torch.device) -> list[torch.Tensor]:
    """The teacher's attention logits over each slide's high-res patches (file order; up to a per-slide constant),
    float32 on the CPU, one whole bag at a time in eval mode."""
    model.to(device).eval()
    out: list[torch.Tensor] = []
    for i in indices:
        features, coords = cohort.load(int(i))
        output = model(
            torch.from_numpy(features).float()[None].to(device),
            coords=None if coords is None else torch.from_numpy(coords)[None].to(device),
        )
        out.append(attention_logits(output)[0].float().cpu())
    return out


def guided_attention(
    teacher: torch.Tensor, parent: torch.Tensor, child: torch.Tensor, num_low: int, token_slots: int, agg: str
) -> torch.Tensor:
    """The teacher's attention logits `teacher` [H] (one per 20x patch) placed on the student's instances.

    Pooled/raw instances (token_slots = 0, one per 5x patch): the mean or max (`agg`) over the patch's 20x children,
    as LRMIL's build_teacher_guided_attention (utils/trainer.py) does over the children's coordinates; [num_low].
    Token instances (token_slots = T, instance k = patch k // T, child slot k % T): each token takes its own child's
    value; [num_low * T]. An instance without a child is NaN (left out of the terms; the reference gives it 0).
    """
    parent = torch.as_tensor(parent, dtype=torch.long)
    teacher = teacher.float()
    if token_slots > 0:
        out = torch.full((num_low * token_slots,), float("nan"))
        out[parent * token_slots + torch.as_tensor(child, dtype=torch.long)] = teacher
        return out
    if agg not in ("mean", "max"):
        raise ValueError(f"kd.attention-agg must be 'mean' or 'max', got {agg!r}")
    out = torch.full((num_low,), float("nan"))
    return out.scatter_reduce(0, parent, teacher, reduce="mean" if agg == "mean" else "amax", include_self=False)


def attention_targets(
    data: DistillData, indices: np.ndarray, teacher: Sequence[torch.Tensor], mode: str, agg: str
) -> list[torch.Tensor | None]:
    """Per cohort slide: the teacher attention (`teacher`, one per slide of `indices`) on its student instances
    (mode "tokens": one per token, else one per 5x patch); None for the other slides."""
    targets: list[torch.Tensor | None] = [None] * len(data.slides)
    slots = data.token_grid**2 if mode == "tokens" else 0
    for i, scores in zip(indices, teacher):
        slide = data.slides[int(i)]
        assert slide.high.parent is not None and slide.high.child is not None
        targets[int(i)] = guided_attention(
            scores, torch.from_numpy(slide.high.parent), torch.from_numpy(slide.high.child), len(slide.low), slots, agg
        )
    return targets


def instance_head(width: int, seed: int) -> nn.Linear:
    """The instance classifier of the instance loss (Linear(width, 2) as the reference's inst_classifier), its
    weights drawn from `seed` without moving the global generators."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(width, 2)


def kd_loss(
    kd: KDConfig,
    targets: KDTargets,
    class_weight: torch.Tensor | None,
    use_experts: bool = True,
    attention: Sequence[torch.Tensor | None] | None = None,
    head: nn.Module | None = None,
) -> CachedKDLoss:
    """The student's loss: CE + KD from the teacher and (when there are expert targets and `use_experts`) experts,
    plus LRMIL's attention KD and instance loss when `attention` (per-slide targets) is given and their weights
    are positive (train inside the loss's `attached(model)`)."""
    experts = targets.experts if use_experts else None
    guidance = None
    if attention is not None and attention_terms_on(kd):
        guidance = AttentionGuidance(
            attention,
            kd.lambda_attention,
            kd.attention_temperature,
            kd.lambda_instance,
            kd.instance_k,
            kd.instance_features,
            head,
        )
    return CachedKDLoss(
        targets.teacher,
        experts,
        kd.temperature,
        kd.lambda_base,
        kd.lambda_expert if experts is not None else 0.0,
        kd.expert_kd,
        targets.cluster,
        class_weight,
        guidance,
    )
