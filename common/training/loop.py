"""One fold's training: optimizer, schedule, epochs with gradient accumulation, evaluation, early stopping."""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedslide.common.metrics import roc_auc
from fedslide.common.models.base import MILModel
from fedslide.common.training.data import BagBatch

if TYPE_CHECKING:
    from fedslide.common.config.train import TrainConfig


@dataclass
class EpochRecord:
    """What one epoch did."""

    epoch: int
    train_loss: float
    val_loss: float
    val_auc: float
    lr: float
    seconds: float


@dataclass
class EvalResult:
    """Predictions on a set of slides, in cohort-index order."""

    indices: np.ndarray  # [n] slide indices into the cohort
    labels: np.ndarray  # [n]
    probs: np.ndarray  # [n, C]
    loss: float


@dataclass
class FitResult:
    """The best epoch's weights and how training went."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    history: list[EpochRecord] = field(default_factory=list)


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD (with momentum) as configured."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, epoch: int, total_epochs: int) -> float:
    """The schedule's LR multiplier at 0-based `epoch` of `total_epochs`: cosine to 0, step decay, or 1."""
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, total_epochs) / total_epochs))
    if cfg.scheduler == "step":
        return cfg.step_gamma ** (epoch // cfg.step_size)
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, first_epoch: int = 0, total_epochs: int | None = None
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch LR schedule over `total_epochs` (default cfg.epochs), starting at epoch `first_epoch`: a
    federated round's local epochs continue the schedule its earlier rounds began."""
    if cfg.scheduler == "none":
        return None
    total = total_epochs or cfg.epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, first_epoch + e, total))


def class_weights(labels: np.ndarray, num_classes: int, mode: Literal["none", "balanced"]) -> torch.Tensor | None:
    """Cross-entropy class weights n / (C * n_c) from the training labels ('balanced'), else None."""
    if mode == "none":
        return None
    from sklearn.utils.class_weight import (
        compute_class_weight,  # lazy: see common.metrics
    )

    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=labels)
    return torch.tensor(weights, dtype=torch.float32)


def _forward(model: MILModel, batch: BagBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and aux loss; models whose aux loss uses the bag labels (CLAM, ACMIL) get them in training."""
    if model.training and getattr(model, "accepts_labels", False):
        out = model(batch.features, mask=batch.mask, coords=batch.coords, labels=batch.labels)
    else:
        out = model(batch.features, mask=batch.mask, coords=batch.coords)
    return out.logits, out.aux_loss


BatchLoss = Callable[[torch.Tensor, BagBatch], torch.Tensor]  # (logits [B, C], batch) -> scalar training loss


def train_epoch(
    model: MILModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    grad_accum: int = 1,
    max_grad_norm: float | None = None,
    batch_loss: BatchLoss | None = None,
) -> float:
    """One pass over the training batches; returns the mean loss per bag (classification + aux).

    `batch_loss`, when given, replaces `loss_fn(logits, labels)` in training (e.g. CE + distillation
    from logits cached per slide, looked up by `batch.indices`).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total, bags, steps = 0.0, 0, len(loader)
    for i, batch in enumerate(loader):
        batch = batch.to(device)
        logits, aux = _forward(model, batch)
        loss = loss_fn(logits, batch.labels) if batch_loss is None else batch_loss(logits, batch)
        if aux is not None:
            loss = loss + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (lower the lr or check the features)")
        (loss / grad_accum).backward()
        if (i + 1) % grad_accum == 0 or i + 1 == steps:
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item() * len(batch.labels)
        bags += len(batch.labels)
    return total / max(bags, 1)


@torch.no_grad()
def evaluate(model: MILModel, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> EvalResult:
    """Class probabilities of every bag, sorted by slide index, and the mean loss."""
    model.eval()
    logits, labels, indices = [], [], []
    for batch in loader:
        out, _ = _forward(model, batch.to(device))
        logits.append(out.float().cpu())
        labels.append(batch.labels)
        indices.append(batch.indices)
    all_logits = torch.cat(logits)
    all_labels = torch.cat(labels)
    loss = float(loss_fn(all_logits, all_labels)) if len(all_labels) else math.nan
    order = torch.argsort(torch.cat(indices))
    return EvalResult(
        indices=torch.cat(indices)[order].numpy(),
        labels=all_labels[order].numpy(),
        probs=torch.softmax(all_logits[order].double(), dim=1).numpy(),
        loss=loss,
    )


class EarlyStopping:
    """Tracks the best validation score ('loss': lower is better, 'auc': higher) and when to stop.

    An epoch is a candidate once `start` epochs have run and `smoothing` scores are in its window; its
    score is then the mean of the last `smoothing` epochs' scores (itself included). Patience counts
    candidate epochs that did not improve on the best.
    """

    def __init__(
        self, metric: Literal["loss", "auc"], patience: int, min_epochs: int = 0, smoothing: int = 1, start: int = 0
    ):
        self.metric = metric
        self.patience = patience
        self.min_epochs = min_epochs
        self.smoothing = smoothing
        self.start = start
        self.best = math.inf if metric == "loss" else -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self._window: deque[float] = deque(maxlen=smoothing)

    def score(self, result: EvalResult) -> float:
        """The monitored value of a validation result."""
        return result.loss if self.metric == "loss" else roc_auc(result.labels, result.probs)

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's score; True when it is the best candidate so far (ties keep the earlier epoch)."""
        self._window.append(value)
        if epoch < self.start + self.smoothing - 1 or len(self._window) < self.smoothing:
            return False
        smoothed = float(np.mean(self._window))
        better = smoothed < self.best if self.metric == "loss" else smoothed > self.best
        if better or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = smoothed, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        """Patience exhausted (and past min_epochs); patience 0 never stops."""
        return self.patience > 0 and epoch + 1 >= self.min_epochs and self.bad_epochs >= self.patience


def _fit_fixed(
    model: MILModel,
    train: DataLoader,
    cfg: TrainConfig,
    device: torch.device,
    weights: torch.Tensor | None,
    epochs: int,
    progress: bool | None,
    description: str,
    batch_loss: BatchLoss | None,
) -> FitResult:
    if not 1 <= epochs <= cfg.epochs:
        raise ValueError(f"a refit runs 1 to epochs ({cfg.epochs}) epochs, got {epochs}")
    model.to(device)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)  # the schedule of cfg.epochs, cut where the inner CV stopped
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    history: list[EpochRecord] = []
    for epoch in tqdm(range(epochs), desc=description, leave=False, disable=None if progress is None else not progress):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(
            model, train, optimizer, loss_fn, device, cfg.grad_accum, cfg.max_grad_norm, batch_loss
        )
        if scheduler is not None:
            scheduler.step()
        history.append(EpochRecord(epoch, train_loss, math.nan, math.nan, lr, time.perf_counter() - start))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return FitResult(state, epochs - 1, math.nan, epochs, False, history)


def fit(
    model: MILModel,
    train: DataLoader,
    val: DataLoader | None,
    cfg: TrainConfig,
    device: torch.device,
    weights: torch.Tensor | None = None,
    progress: bool | None = None,
    description: str = "epochs",
    batch_loss: BatchLoss | None = None,
    fixed_epochs: int | None = None,
) -> FitResult:
    """Train for up to cfg.epochs, evaluating on `val` after each epoch; keeps the best epoch's weights.

    `batch_loss` replaces the training cross-entropy (see train_epoch); validation stays cross-entropy.
    `fixed_epochs` (a refit, `val` None): exactly that many epochs on the schedule of cfg.epochs, no selection;
    the last epoch's weights are kept.
    """
    if fixed_epochs is not None:
        return _fit_fixed(model, train, cfg, device, weights, fixed_epochs, progress, description, batch_loss)
    if val is None:
        raise ValueError("fit needs a validation loader unless fixed_epochs is given")
    model.to(device)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    train_loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    val_loss_fn = nn.CrossEntropyLoss(weight=weights)  # evaluation logits are gathered on the CPU
    stopper = EarlyStopping(
        cfg.early_stopping_metric,
        cfg.early_stopping_patience,
        cfg.min_epochs,
        smoothing=cfg.selection_window,
        start=cfg.selection_min_epochs,
    )
    history: list[EpochRecord] = []
    best_state = copy.deepcopy(model.state_dict())
    stopped = False
    bar = tqdm(range(cfg.epochs), desc=description, leave=False, disable=None if progress is None else not progress)
    for epoch in bar:
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(
            model, train, optimizer, train_loss_fn, device, cfg.grad_accum, cfg.max_grad_norm, batch_loss
        )
        if scheduler is not None:
            scheduler.step()
        result = evaluate(model, val, val_loss_fn, device)
        val_auc = roc_auc(result.labels, result.probs)
        history.append(EpochRecord(epoch, train_loss, result.loss, val_auc, lr, time.perf_counter() - start))
        if stopper.update(epoch, stopper.score(result)):
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{result.loss:.3f}", val_auc=f"{val_auc:.3f}")
        if stopper.should_stop(epoch):
            stopped = epoch + 1 < cfg.epochs
            break
    bar.close()
    if stopper.best_epoch < 0 and history:  # fewer epochs ran than selection needs: keep the last
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        stopper.best_epoch, stopper.best = history[-1].epoch, stopper.score(result)
    return FitResult(
        best_state=best_state,
        best_epoch=stopper.best_epoch,
        best_score=stopper.best,
        epochs_run=len(history),
        stopped_early=stopped,
        history=history,
    )
