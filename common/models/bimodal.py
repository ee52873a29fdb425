"""Slide + clinical MIL with a missing clinical modality: bidirectional distillation (BD).

Zhang et al., BIBM 2023, "Multi-modal Learning with Missing Modality in Predicting Axillary Lymph Node
Metastasis". Two parallel branches, each an ABMIL slide embedding fused with a second vector by a small MLP:
the multi-modal branch fuses the embedded clinical vector, the single-modal branch a learnable prompt in its
place. Training distils both ways on logits, at temperature T with T² scaling, on the slides that have clinical
data: multi → single (the fused knowledge reaches the branch used when clinical data is missing) and
single → multi (pure image evidence regularises the fused branch against noisy clinical data). At inference a
slide with clinical data is read by the multi-modal branch, one without by the single-modal branch.

No public reference code for this paper is known to us; the losses follow the paper's description: CE on each
branch (the multi-modal one on slides with clinical data only) plus the two KL terms, each against the other
branch's detached softened logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedslide.common.models.abmil import ABMIL


def slide_encoder(in_dim: int, hidden_dim: int, attention_dim: int, dropout: float) -> ABMIL:
    """The zoo's gated ABMIL with its head removed: it returns the attention-pooled slide embedding [B, hidden]."""
    model = ABMIL(in_dim, 2, hidden_dim=hidden_dim, attention_dim=attention_dim, gated=True, dropout=dropout)
    model.head = nn.Identity()
    return model


class FusionHead(nn.Module):
    """A slide embedding ⊕ a second vector (the embedded clinical vector, or a learnable prompt) -> logits."""

    def __init__(self, clinical_dim: int | None, num_classes: int, hidden_dim: int = 64, dropout: float = 0.25) -> None:
        super().__init__()
        self.clinical: nn.Module | None = None
        self.prompt: nn.Parameter | None = None
        if clinical_dim is None:
            self.prompt = nn.Parameter(torch.zeros(hidden_dim).normal_(0.0, 0.02))
        else:
            self.clinical = nn.Sequential(
                nn.Linear(clinical_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim)
            )
        self.fuse = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, h: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, C] of slide embeddings `h` [B, hidden]; `clinical` [B, clinical_dim] is required by a clinical
        head and ignored by a prompt one."""
        if self.clinical is not None:
            if clinical is None:
                raise ValueError("the multi-modal branch needs the clinical vectors")
            second = self.clinical(clinical)
        else:
            assert self.prompt is not None
            second = self.prompt.expand(h.shape[0], -1)
        return self.head(self.fuse(torch.cat([h, second], dim=-1)))


class FusionBranch(nn.Module):
    """One branch on its own: ABMIL slide embedding and a FusionHead (the baselines' model)."""

    def __init__(
        self,
        in_dim: int,
        clinical_dim: int | None,
        num_classes: int,
        hidden_dim: int = 64,
        attention_dim: int = 32,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.slide = slide_encoder(in_dim, hidden_dim, attention_dim, dropout)
        self.fusion = FusionHead(clinical_dim, num_classes, hidden_dim, dropout)

    @property
    def prompt(self) -> nn.Parameter | None:
        """The learnable prompt of a single-modal branch (None for a multi-modal one)."""
        return self.fusion.prompt

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, clinical: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, C]."""
        return self.fusion(self.slide(features, mask).logits, clinical)


@dataclass(frozen=True)
class BDOutput:
    """Both branches' logits and the routed prediction (multi-modal where clinical data is present)."""

    multi: torch.Tensor  # [B, C]
    single: torch.Tensor  # [B, C]
    present: torch.Tensor  # [B] bool

    @property
    def logits(self) -> torch.Tensor:
        """Inference logits: the multi-modal branch's where the slide has clinical data, else the single branch's."""
        return torch.where(self.present.unsqueeze(-1), self.multi, self.single)


class BidirectionalMIL(nn.Module):
    """The two BD branches (see the module docstring). With `shared_slide_encoder` both branches read one ABMIL
    slide embedding (trained by every slide; the multi-modal branch's own parameters are its clinical encoder and
    fusion head, under `multi.`); without it each branch has its own (`multi.slide`, `single.slide`)."""

    def __init__(
        self,
        in_dim: int,
        clinical_dim: int,
        num_classes: int = 2,
        hidden_dim: int = 64,
        attention_dim: int = 32,
        dropout: float = 0.25,
        shared_slide_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.slide: nn.Module | None = None
        self.multi: nn.Module
        self.single: nn.Module
        if shared_slide_encoder:
            self.slide = slide_encoder(in_dim, hidden_dim, attention_dim, dropout)
            self.multi = FusionHead(clinical_dim, num_classes, hidden_dim, dropout)
            self.single = FusionHead(None, num_classes, hidden_dim, dropout)
        else:
            self.multi = FusionBranch(in_dim, clinical_dim, num_classes, hidden_dim, attention_dim, dropout)
            self.single = FusionBranch(in_dim, None, num_classes, hidden_dim, attention_dim, dropout)

    @property
    def prompt(self) -> nn.Parameter:
        """The single-modal branch's learnable prompt."""
        prompt = self.single.prompt
        assert isinstance(prompt, nn.Parameter)
        return prompt

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None, clinical: torch.Tensor, present: torch.Tensor
    ) -> BDOutput:
        """Both branches on the batch; missing clinical rows are zeroed before the multi-modal branch (whose output
        on them is never used: not in the losses, not in `BDOutput.logits`)."""
        present = present.to(torch.bool)
        safe = clinical.masked_fill(~present.unsqueeze(-1), 0.0)
        if self.slide is not None:
            h = self.slide(features, mask).logits
            return BDOutput(self.multi(h, safe), self.single(h), present)
        return BDOutput(self.multi(features, mask, safe), self.single(features, mask), present)


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over rows; the teacher is detached."""
    t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    s = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def bd_losses(
    out: BDOutput, labels: torch.Tensor, temperature: float, weight_m2s: float, weight_s2m: float
) -> dict[str, torch.Tensor]:
    """The BD loss terms and `total` = ce-single + ce-multi + weight_m2s·kd-m2s + weight_s2m·kd-s2m. The multi-modal
    terms average over the slides with clinical data and are 0 when the batch has none."""
    ce_single = F.cross_entropy(out.single, labels)
    zero = out.single.sum() * 0.0
    if bool(out.present.any()):
        multi, single, y = out.multi[out.present], out.single[out.present], labels[out.present]
        ce_multi = F.cross_entropy(multi, y)
        kd_m2s = soft_kl(multi, single, temperature)
        kd_s2m = soft_kl(single, multi, temperature)
    else:
        ce_multi = kd_m2s = kd_s2m = zero
    total = ce_single + ce_multi + weight_m2s * kd_m2s + weight_s2m * kd_s2m
    return {"total": total, "ce-single": ce_single, "ce-multi": ce_multi, "kd-m2s": kd_m2s, "kd-s2m": kd_s2m}
