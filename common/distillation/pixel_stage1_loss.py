"""Pixel-level LRMIL stage 1 loss: the student's tokens over each 20× child regress the teacher's child embedding.

A low-res (5×) patch covers an R×R block of high-res (20×) children; child s = row * R + col. At each
aligned layer L, the student's token map of the 5× patch is averaged over the cell covering child s and
compared (MSE) with the frozen teacher's layer-L embedding of that child (the same architecture, so the
widths agree). A second term compares the student's final patch embedding with the children's final
teacher embeddings, weighted by the teacher MIL's attention on those children.

Follows LRMIL's reference code (github hvcl/LRMIL, utils/losses.py `patch_kd_loss` and
`attention_weighted_feature_loss`): the layer-L target is the teacher's layer-L class embedding of the
child (not its final embedding), errors are averaged over present children, then over layers, and
attention weights are renormalised over the children (uniform when they sum to zero). Here children
without tissue are masked out, and cells are `adaptive_avg_pool2d` bins (exact blocks when R divides the map).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Stage1Loss:
    """The weighted total and its two terms (each already averaged over patches)."""

    total: Tensor
    layer: Tensor
    attention: Tensor


def child_cell_means(fmap: Tensor, ratio: int) -> Tensor:
    """[B, C, h, w] -> [B, ratio², C]: the mean of the tokens in each child's cell (slot = row * ratio + col)."""
    if fmap.dim() != 4:
        raise ValueError(f"expected a token map [B, C, h, w]; got shape {tuple(fmap.shape)}")
    if fmap.shape[-2] < ratio or fmap.shape[-1] < ratio:
        raise ValueError(f"a {fmap.shape[-2]}×{fmap.shape[-1]} token map cannot be split into {ratio}×{ratio} children")
    return F.adaptive_avg_pool2d(fmap, ratio).flatten(2).transpose(1, 2)


def _per_patch_mean(errors: Tensor, weights: Tensor) -> Tensor:
    """Σ_s w[b, s] · e[b, s] / Σ_s w[b, s] per patch [B] (0 where a patch has no weight)."""
    return (errors * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(torch.finfo(errors.dtype).tiny)


def _over_patches(values: Tensor, has_children: Tensor) -> Tensor:
    """Mean over the patches that have at least one child (0 when none has)."""
    if not bool(has_children.any()):
        return values.sum() * 0.0
    return values[has_children].mean()


def layer_alignment_loss(
    student_maps: Mapping[int, Tensor], teacher_children: Mapping[int, Tensor], mask: Tensor
) -> Tensor:
    """Child ↔ token-cell MSE averaged over present children, then layers, then patches with children.

    student_maps[L]: [B, C_L, h, w]; teacher_children[L]: [B, R², C_L]; mask: [B, R²] (child present).
    """
    if not student_maps:
        raise ValueError("no layers to align")
    ratio = int(round(mask.shape[1] ** 0.5))
    if ratio * ratio != mask.shape[1]:
        raise ValueError(f"mask must have R² child slots; got {mask.shape[1]}")
    weights = mask.to(torch.float32)
    per_layer = []
    for layer, fmap in student_maps.items():
        if layer not in teacher_children:
            raise ValueError(f"no teacher targets for layer {layer}")
        cells = child_cell_means(fmap.float(), ratio)
        target = teacher_children[layer].to(cells)
        if target.shape != cells.shape:
            raise ValueError(f"layer {layer}: student cells {tuple(cells.shape)} vs teacher {tuple(target.shape)}")
        per_layer.append(_per_patch_mean(((cells - target) ** 2).mean(dim=-1), weights))
    return _over_patches(torch.stack(per_layer).mean(dim=0), mask.any(dim=1))


def attention_weighted_loss(
    student_final: Tensor, teacher_final: Tensor, mask: Tensor, attention: Tensor | None = None
) -> Tensor:
    """Σ_s a_s · MSE(student_final, teacher_final[s]) with a = attention over present children, renormalised.

    student_final: [B, D]; teacher_final: [B, R², D]; mask: [B, R²]; attention: [B, R²] or None (uniform).
    A patch whose present children's attention sums to zero weighs them uniformly (as the reference code).
    """
    weights = mask.to(torch.float32)
    if attention is not None:
        att = attention.to(torch.float32).clamp_min(0.0) * weights
        zero = att.sum(dim=1, keepdim=True) <= 0
        weights = torch.where(zero, weights, att)
    errors = ((teacher_final.float() - student_final.float()[:, None]) ** 2).mean(dim=-1)
    return _over_patches(_per_patch_mean(errors, weights), mask.any(dim=1))


def pixel_stage1_loss(
    student_maps: Mapping[int, Tensor],
    student_final: Tensor,
    teacher_children: Mapping[int, Tensor],
    teacher_final: Tensor,
    mask: Tensor,
    *,
    attention: Tensor | None,
    use_attention_term: bool,
    lambda_layer: float = 1.0,
    lambda_attention: float = 1.0,
) -> Stage1Loss:
    """lambda_layer · layer alignment + lambda_attention · attention-weighted term (off: the term is 0)."""
    layer = layer_alignment_loss(student_maps, teacher_children, mask)
    if use_attention_term:
        att = attention_weighted_loss(student_final, teacher_final, mask, attention)
    else:
        att = layer.new_zeros(())
    return Stage1Loss(total=lambda_layer * layer + lambda_attention * att, layer=layer, attention=att)
