"""LRMIL stage 1: patch-level cross-resolution distillation (low-res token -> the high-res child it covers).

With tokens, token t of a low patch is regressed onto the high-res embedding of child t (the
high patch with `parent` = that low patch and `child` = t); children that were not kept (no
tissue) are masked out. Without tokens, the pooled low feature is regressed onto the mean of
its existing children. Training is patch-level over the training slides' low patches.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedslide.common.config.distill import AdapterConfig
from fedslide.common.distillation.adapter import CrossResAdapter
from fedslide.common.distillation.data import SlidePair
from fedslide.common.distillation.losses import regression_loss


@dataclass
class PatchPairs:
    """Low-res inputs and their high-res targets: inputs [P, S, D], targets [P, S, E], mask [P, S].

    S = T token slots, or 1 (`pooled`: the pooled low feature against its children's mean).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    pooled: bool

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def child_targets(
    num_low: int, high_features: torch.Tensor, parent: torch.Tensor, child: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [num_low, slots, E], mask [num_low, slots]): high patch k lands at [parent[k], child[k]]."""
    parent, child = torch.as_tensor(parent, dtype=torch.long), torch.as_tensor(child, dtype=torch.long)
    if child.numel() and (int(child.min()) < 0 or int(child.max()) >= slots):
        raise ValueError(f"child slots must lie in 0..{slots - 1}, got {int(child.min())}..{int(child.max())}")
    targets = high_features.new_zeros(num_low, slots, high_features.shape[1])
    mask = torch.zeros(num_low, slots, dtype=torch.bool)
    targets[parent, child] = high_features
    mask[parent, child] = True
    return targets, mask


def pooled_targets(
    num_low: int, high_features: torch.Tensor, parent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of each low patch's children [num_low, 1, E], mask [num_low, 1] = has children)."""
    parent = torch.as_tensor(parent, dtype=torch.long)
    sums = high_features.new_zeros(num_low, high_features.shape[1]).index_add_(0, parent, high_features)
    counts = torch.bincount(parent, minlength=num_low).to(high_features.dtype)
    return (sums / counts.clamp_min(1)[:, None])[:, None], (counts > 0)[:, None]


def slide_pairs(slide: SlidePair, use_tokens: bool, slots: int) -> PatchPairs:
    """The patch pairs of one slide (tokens vs. children, or pooled feature vs. children's mean)."""
    high = torch.from_numpy(slide.high.features)
    n = len(slide.low)
    parent = torch.from_numpy(slide.high.parent)
    if use_tokens:
        if slide.low.tokens is None:
            raise ValueError(f"{slide.low.path}: no tokens")
        targets, mask = child_targets(n, high, parent, torch.from_numpy(slide.high.child), slots)
        inputs = torch.from_numpy(slide.low.tokens).to(torch.float16)
    else:
        targets, mask = pooled_targets(n, high, parent)
        inputs = torch.from_numpy(slide.low.features)[:, None].to(torch.float16)
    return PatchPairs(inputs=inputs, targets=targets.to(torch.float16), mask=mask, pooled=not use_tokens)


def collect_pairs(
    slides: Sequence[SlidePair], use_tokens: bool, slots: int, max_per_slide: int | None = None, seed: int = 0
) -> PatchPairs:
    """Patch pairs of several slides (only low patches with at least one child); held in float16."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for slide in slides:
        p = slide_pairs(slide, use_tokens, slots)
        keep = torch.nonzero(p.mask.any(dim=1)).flatten()
        if max_per_slide is not None and keep.numel() > max_per_slide:
            keep = keep[torch.randperm(keep.numel(), generator=generator)[:max_per_slide]].sort().values
        parts.append(PatchPairs(p.inputs[keep], p.targets[keep], p.mask[keep], p.pooled))
    if not parts:
        raise ValueError("no slides to build patch pairs from")
    return PatchPairs(
        inputs=torch.cat([p.inputs for p in parts]),
        targets=torch.cat([p.targets for p in parts]),
        mask=torch.cat([p.mask for p in parts]),
        pooled=parts[0].pooled,
    )


def adapt(adapter: CrossResAdapter, inputs: torch.Tensor, pooled: bool) -> torch.Tensor:
    """Adapter output for a batch of pair inputs [B, S, D] -> [B, S, E]."""
    if pooled:
        return adapter.adapt_pooled(inputs[:, 0])[:, None]
    return adapter.adapt_tokens(inputs)


def train_adapter_epochs(
    adapter: CrossResAdapter,
    pairs: PatchPairs,
    cfg: AdapterConfig,
    epochs: int = 1,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train `adapter` for `epochs` passes over `pairs` from its current weights; mean loss per epoch.

    The federated client calls this with the global weights loaded and a few local epochs.
    """
    adapter.to(device).train()
    optimizer = optimizer or torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = pairs.inputs[idx].to(device, torch.float32)
            y = pairs.targets[idx].to(device, torch.float32)
            m = pairs.mask[idx].to(device)
            loss = regression_loss(adapt(adapter, x, pairs.pooled), y, m, cfg.loss, cfg.cosine_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"adapter loss became {loss.item()} (lower adapter.lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / max(count, 1))
    return losses


@torch.no_grad()
def evaluate_adapter(
    adapter: CrossResAdapter, pairs: PatchPairs, cfg: AdapterConfig, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Masked loss, MSE and mean cosine of predicted vs. true children; also the unadapted inputs' cosine."""
    adapter.to(device).eval()
    sums = {"loss": 0.0, "mse": 0.0, "cosine": 0.0, "cosine_unadapted": 0.0}
    weight = 0.0
    same_dim = pairs.inputs.shape[-1] == pairs.targets.shape[-1]
    for start in range(0, len(pairs), max(cfg.batch_size, 1024)):
        x = pairs.inputs[start : start + max(cfg.batch_size, 1024)].to(device, torch.float32)
        y = pairs.targets[start : start + x.shape[0]].to(device, torch.float32)
        m = pairs.mask[start : start + x.shape[0]].to(device)
        pred = adapt(adapter, x, pairs.pooled)
        n = float(m.sum())
        if n == 0:
            continue
        sums["loss"] += float(regression_loss(pred, y, m, cfg.loss, cfg.cosine_weight)) * n
        sums["mse"] += float(regression_loss(pred, y, m, "mse")) * n
        sums["cosine"] += float((F.cosine_similarity(pred, y, dim=-1) * m).sum())
        if same_dim:
            sums["cosine_unadapted"] += float((F.cosine_similarity(x, y, dim=-1) * m).sum())
        weight += n
    if weight == 0:
        return {k: math.nan for k in sums} | {"children": 0}
    out = {k: v / weight for k, v in sums.items()}
    if not same_dim:
        out["cosine_unadapted"] = math.nan
    out["children"] = int(weight)
    return out


@dataclass
class AdapterFit:
    """The best-validation adapter weights and the training record."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    val: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def fit_adapter(
    adapter: CrossResAdapter,
    train: PatchPairs,
    val: PatchPairs | None,
    cfg: AdapterConfig,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> AdapterFit:
    """Train up to cfg.epochs, keep the epoch with the lowest validation loss (training loss without val)."""
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_epoch, bad = math.inf, -1, 0
    best_state = copy.deepcopy(adapter.state_dict())
    history: list[dict[str, float]] = []
    best_val: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        train_loss = train_adapter_epochs(adapter, train, cfg, 1, seed + epoch, optimizer, device)[0]
        metrics = evaluate_adapter(adapter, val, cfg, device) if val is not None and len(val) else {"loss": train_loss}
        history.append({"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in metrics.items()}})
        score = metrics["loss"]
        if score < best or best_epoch < 0:
            best, best_epoch, bad, best_val = score, epoch, 0, metrics
            best_state = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                break
    adapter.load_state_dict(best_state)
    adapter.eval()
    return AdapterFit(best_state, best_epoch, best_val, history, time.perf_counter() - start)
