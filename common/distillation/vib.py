"""VIB task-specific fine-tuning (Li et al., CVPR 2023): an information bottleneck that picks the instances worth
back-propagating through, and the sparse bag the patch encoder then fine-tunes on.

Stage A trains `VIBSelector` on a slide's frozen instance features: a per-instance logit s_i gives a relaxed-Bernoulli
mask over the instances; the masked bag is attention-pooled and classified; the loss is
`bag_weight · CE + (1 − bag_weight) · info` with the IB term `info = (mean_i sigmoid(s_i) − rate)²`.
Stage B keeps, per slide, the `keep` instances with the largest s_i (re-ranked by the selector's attention down
to `bag_size`) and fine-tunes the patch encoder end to end on those instances only (`sparse_bag`).

Follows the reference CODE (github invoker-LL/WSI-finetuning, models/vib_clam_wsi.py, extract_topK_ROIs.py,
utils/core_utils_end2end.py) where it differs from the paper:
- the IB term is an MSE pulling the MEAN keep probability towards `rate` (0.1), not the paper's per-instance KL to
  a Bernoulli(rate) prior;
- the relaxed-Bernoulli samples (temperature 0.1, 10 samples averaged) take `logsigmoid(s)` as their logits, and the
  training mask is `(z + sigmoid(s)) / (1 + rate)`;
- at test time the top 1,024 instances by s are kept (a hard top-k, not sampling), and the fine-tuning bag is the
  top-`bag_size` (512 in the reference scripts) of those by attention;
- the encoder's fine-tuning bag holds only the selected instances (the others are not encoded at all), with the
  bag-level CE alone as its loss; the reference's encoder runs with BatchNorm statistics frozen (eval mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from fedslide.common.models.layers import AttentionScorer, InstanceEncoder, init_linear


@dataclass
class VIBOutput:
    """One bag through the selector."""

    logits: Tensor  # [C] class logits of the (masked or top-k) bag
    mask_logits: Tensor  # [N] per-instance IB logit s_i over every instance given
    attention: Tensor  # [M] attention over the instances pooled (all N in training, the kept ones at test)
    kept: Tensor  # [M] indices (into the N given) of the instances pooled
    info_loss: Tensor  # scalar (mean_i sigmoid(s_i) - rate)²


def info_loss(mask_logits: Tensor, rate: float) -> Tensor:
    """The IB term of the reference code: (mean_i sigmoid(s_i) − rate)², pulling the mean keep probability down to
    `rate` (the paper's KL to a Bernoulli prior, as the code computes it)."""
    return (torch.sigmoid(mask_logits.float()).mean() - rate) ** 2


def relaxed_mask(mask_logits: Tensor, rate: float, tau: float, samples: int) -> Tensor:
    """The training mask [N]: (mean of `samples` RelaxedBernoulli(tau, logits=logsigmoid(s)) draws + sigmoid(s)) /
    (1 + rate), differentiable in s (reparameterised draws)."""
    logits = F.logsigmoid(mask_logits.float())[:, None].expand(-1, samples)
    dist = RelaxedBernoulli(torch.tensor(tau, device=mask_logits.device), logits=logits, validate_args=False)
    z = dist.rsample().mean(dim=1)
    return (z + torch.sigmoid(mask_logits.float())) / (1.0 + rate)


def top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores (all when fewer), in descending score order."""
    return torch.topk(scores, min(int(k), int(scores.numel())), sorted=True).indices


class VIBSelector(nn.Module):
    """Instance MLP, per-instance IB logit, gated attention pooling and a linear classifier over one bag [N, D]."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        rate: float = 0.1,
        tau: float = 0.1,
        samples: int = 10,
        keep: int = 1024,
    ) -> None:
        super().__init__()
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must lie in (0, 1); got {rate}")
        self.rate, self.tau, self.samples, self.keep = float(rate), float(tau), int(samples), int(keep)
        self.encoder = InstanceEncoder(in_dim, hidden_dim)
        self.instance = nn.Linear(hidden_dim, 1)
        self.scorer = AttentionScorer(hidden_dim, attention_dim, 1, gated=True)
        self.classifier = nn.Linear(hidden_dim, num_classes)
        init_linear(self)

    def forward(self, features: Tensor) -> VIBOutput:
        """Training: the relaxed mask scales every instance; eval: only the top-`keep` instances by s are pooled."""
        if features.dim() != 2 or features.shape[0] == 0:
            raise ValueError(f"expected one non-empty bag [N, D]; got shape {tuple(features.shape)}")
        h = self.encoder(features)
        s = self.instance(h)[:, 0]
        if self.training:
            kept = torch.arange(len(h), device=h.device)
            h = h * relaxed_mask(s, self.rate, self.tau, self.samples)[:, None].to(h.dtype)
        else:
            kept = top_k(s, self.keep)
            h = h[kept]
        attention = torch.softmax(self.scorer(h[None])[0, 0], dim=0)
        logits = self.classifier(attention @ h)
        return VIBOutput(
            logits=logits, mask_logits=s, attention=attention, kept=kept, info_loss=info_loss(s, self.rate)
        )


def vib_loss(out: VIBOutput, label: Tensor, bag_weight: float) -> Tensor:
    """bag_weight · CE(bag) + (1 − bag_weight) · info (CLAM's bag/instance weighting, the reference's 0.7)."""
    ce = F.cross_entropy(out.logits[None].float(), label.reshape(1).long())
    return bag_weight * ce + (1.0 - bag_weight) * out.info_loss


@torch.no_grad()
def select_instances(selector: VIBSelector, features: Tensor, bag_size: int) -> Tensor:
    """The instances a slide fine-tunes through: the top-`keep` by IB logit, then the top-`bag_size` of those by
    the selector's attention (as extract_topK_ROIs.py; indices here point into `features`, sorted ascending)."""
    was_training = selector.training
    selector.eval()
    try:
        out = selector(features)
    finally:
        selector.train(was_training)
    ranked = out.kept[top_k(out.attention, bag_size)]
    return torch.sort(ranked).values


def sparse_bag(
    encode: Callable[[Tensor], Tensor], pixels: Tensor, selected: Tensor, frozen: Tensor | None = None
) -> Tensor:
    """The bag an encoder fine-tunes on: `encode(pixels[selected])` with gradients. Without `frozen` (the reference
    code) the bag is those rows only; with `frozen` [N, D] (the encoder's cached features of every instance) the bag
    is all N rows, the selected ones replaced by the live encodings and the rest constants, so gradients still reach
    the encoder through the selected instances only."""
    live = encode(pixels[selected])
    if frozen is None:
        return live
    bag = frozen.detach().to(live.dtype).clone()
    return bag.index_copy(0, selected.to(bag.device), live)
