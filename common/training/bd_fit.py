"""The training loop of the slide + clinical models (BD and its baselines) with model selection on validation AUC,
Flower-free so `fedslide distill` (centralised BD stage), the sites' federated BD round and the bench
(`common.training.bidirectional`) share it.

`fit` runs epochs of shuffled mini-batches (AdamW) over a caller's batch loss; with a `score` it scores the model
after every epoch and restores the state that ended the best run of `window` epochs (`BestState`).
`bd_probs` reads a BD model the way inference does: the multi-modal branch where a slide's clinical row is
complete, the single-modal branch and the prompt elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedslide.common.clinical import FillMode, encode
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.metrics import roc_auc
from fedslide.common.models.bimodal import BidirectionalMIL, bd_losses
from fedslide.common.training.standardize import FeatureStats

BatchLoss = Callable[[np.ndarray], torch.Tensor]  # slide indices of one mini-batch -> its loss
Score = Callable[[nn.Module], float]  # the model after an epoch -> its validation score (NaN: cannot score)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one training run (centralised) or of one site's local round (federated)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4

    @classmethod
    def of(cls, cfg: ClinicalConfig) -> TrainSettings:
        """The settings of the `[clinical]` config."""
        return cls(cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay)


@dataclass(frozen=True)
class Selection:
    """A trained model restored to its best validation point, and the validation curve that chose it."""

    model: nn.Module
    best: int  # index (epoch or round, from 0) of the selected state; -1 when nothing was selected
    history: tuple[float, ...]  # validation score after each epoch or round


class BestState:
    """Keeps the best state of a model by the mean of the last `window` validation scores (a step becomes a
    candidate once `window` scores exist); True from `update` once `patience` steps passed without improvement."""

    def __init__(self, patience: int | None, window: int = 1) -> None:
        if window < 1:
            raise ValueError(f"validation window must be at least 1, got {window}")
        self.patience, self.window = patience, window
        self.state: dict[str, torch.Tensor] | None = None
        self.best, self.score = -1, -np.inf
        self.history: list[float] = []

    def update(self, model: nn.Module, score: float) -> bool:
        """Record `score` after the latest step; True when training should stop."""
        self.history.append(score)
        step = len(self.history) - 1
        recent = self.history[-self.window :]
        smoothed = float(np.mean(recent)) if len(recent) == self.window else float("nan")
        if np.isfinite(smoothed) and smoothed > self.score:
            self.score, self.best = smoothed, step
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self.patience is not None and self.best >= 0 and step - self.best >= self.patience

    def restore(self, model: nn.Module) -> Selection:
        """`model` with the best state loaded (left as it is when no score was finite)."""
        if self.state is not None:
            model.load_state_dict(self.state)
        return Selection(model, self.best, tuple(self.history))


def fit(
    model: nn.Module,
    n: int,
    batch_loss: BatchLoss,
    settings: TrainSettings,
    seed: int,
    score: Score | None = None,
    patience: int | None = None,
    window: int = 1,
) -> Selection:
    """Train `model` in place for up to `settings.epochs` epochs of shuffled mini-batches of the `n` slides (AdamW
    on `batch_loss`). With `score`, the model is scored after every epoch, restored to the epoch ending the best
    run of `window` epochs by mean score (first of ties), and training stops after `patience` epochs without
    improvement; without, the last epoch's model is kept (`best` = last epoch, empty history)."""
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    best = BestState(patience, window)
    epoch = -1
    for epoch in range(settings.epochs):
        model.train()
        order = gen.permutation(n)
        for start in range(0, n, settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            batch_loss(order[start : start + settings.batch_size]).backward()
            optimizer.step()
        if score is not None and best.update(model, score(model)):
            break
    if score is None:
        return Selection(model.eval(), epoch, ())
    selection = best.restore(model)
    selection.model.eval()
    return selection


def pad(bags: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags [N_i, D] padded into one batch [B, max N, D] with its mask [B, max N]."""
    size = max(len(bag) for bag in bags)
    x = torch.zeros(len(bags), size, bags[0].shape[1])
    mask = torch.zeros(len(bags), size, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = torch.as_tensor(bag, dtype=torch.float32)
        mask[i, : len(bag)] = True
    return x, mask


def bd_batch_loss(
    model: BidirectionalMIL,
    x: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    raw: np.ndarray,
    stats: FeatureStats,
    cfg: ClinicalConfig,
    fill: FillMode = "mean",
) -> torch.Tensor:
    """The BD loss (`common.models.bimodal.bd_losses`, total) of one padded batch and its raw clinical rows."""
    z, present = encode(raw, stats, fill)
    out = model(x, mask, torch.from_numpy(z), torch.from_numpy(present))
    return bd_losses(out, labels, cfg.temperature, cfg.weight_m2s, cfg.weight_s2m)["total"]


@torch.no_grad()
def bd_probs(
    model: BidirectionalMIL, bags: Sequence[np.ndarray], raw: np.ndarray, stats: FeatureStats, batch_size: int = 16
) -> np.ndarray:
    """Class probabilities [n, C] of a BD model read as at inference (multi-modal branch where the raw clinical
    row is complete, else the single-modal one), in padded batches of `batch_size` slides."""
    model.eval()
    parts = []
    for start in range(0, len(bags), batch_size):
        x, mask = pad(bags[start : start + batch_size])
        z, present = encode(raw[start : start + batch_size], stats)
        logits = model(x, mask, torch.from_numpy(z), torch.from_numpy(present)).logits
        parts.append(torch.softmax(logits, dim=-1).numpy())
    return np.concatenate(parts)


def bd_auc(
    model: BidirectionalMIL,
    bags: Sequence[np.ndarray],
    labels: np.ndarray,
    raw: np.ndarray,
    stats: FeatureStats,
    batch_size: int = 16,
) -> float:
    """AUC of `bd_probs` (NaN when `labels` hold one class only)."""
    return roc_auc(np.asarray(labels), bd_probs(model, bags, raw, stats, batch_size))
