"""Training pieces for the teacher, experts and students on Cohort bags (wrapping common.training.loop)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedslide.common.config.distill import MILTrainingConfig
from fedslide.common.metrics import classification_metrics, per_class_metrics
from fedslide.common.models.base import MILModel
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.data import (
    BagDataset,
    Indices,
    collate_bags,
    eval_loader,
    train_loader,
)
from fedslide.common.training.loop import (
    BatchLoss,
    FitResult,
    class_weights,
    fit,
    make_optimizer,
    make_scheduler,
    train_epoch,
)
from fedslide.common.training.repro import seed_everything


def with_epochs(cfg: MILTrainingConfig, epochs: int | None) -> MILTrainingConfig:
    """The training config with `epochs` (when given) as its maximum."""
    if epochs is None:
        return cfg
    return cfg.model_copy(update={"epochs": epochs, "min_epochs": min(cfg.min_epochs, epochs)})


def train_selected(
    model: MILModel,
    cohort: Cohort,
    train: Indices,
    val: Indices,
    cfg: MILTrainingConfig,
    device: torch.device,
    seed: int,
    batch_loss: BatchLoss | None = None,
    progress: bool = False,
    description: str = "epochs",
) -> FitResult:
    """Train from the model's current weights, select the best validation epoch and load its weights."""
    seed_everything(seed)
    weights = class_weights(cohort.labels[np.asarray(train)], len(cohort.classes), cfg.class_weighting)
    loader = train_loader(BagDataset(cohort, train, cfg.max_instances), cfg.batch_size, seed, 0, cfg.group_by_length)
    val_loader = eval_loader(BagDataset(cohort, val), cfg.eval_batch_size)
    result = fit(model, loader, val_loader, cfg, device, weights, progress, description, batch_loss)  # type: ignore[arg-type]
    model.load_state_dict(result.best_state)
    return result


def train_epochs(
    model: MILModel,
    cohort: Cohort,
    train: Indices,
    cfg: MILTrainingConfig,
    device: torch.device,
    epochs: int,
    seed: int,
    batch_loss: BatchLoss | None = None,
    schedule: tuple[int, int] | None = None,
) -> list[float]:
    """Train `epochs` epochs from the model's current weights, no selection (a federated local round).

    `schedule` = (first epoch, total epochs) places these epochs on cfg.scheduler's LR curve over the whole
    federated training, as the centralized run's epochs are; None keeps the LR constant.
    """
    seed_everything(seed)
    model.to(device)
    weights = class_weights(cohort.labels[np.asarray(train)], len(cohort.classes), cfg.class_weighting)
    loss_fn = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(device))
    optimizer = make_optimizer(model.parameters(), cfg)  # type: ignore[arg-type]
    scheduler = None if schedule is None else make_scheduler(optimizer, cfg, *schedule)  # type: ignore[arg-type]
    loader = train_loader(BagDataset(cohort, train, cfg.max_instances), cfg.batch_size, seed, 0, cfg.group_by_length)
    losses = []
    for _ in range(epochs):
        losses.append(
            train_epoch(model, loader, optimizer, loss_fn, device, cfg.grad_accum, cfg.max_grad_norm, batch_loss)
        )
        if scheduler is not None:
            scheduler.step()
    return losses


@torch.no_grad()
def slide_outputs(
    model: MILModel, cohort: Cohort, indices: Indices, device: torch.device, batch_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, K], embeddings [n, E]) of slides `indices`, in the order given (eval mode, float32, CPU)."""
    model.to(device).eval()
    indices = [int(i) for i in indices]
    dataset = BagDataset(cohort, indices)
    logits: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    for start in range(0, len(indices), batch_size):
        batch = collate_bags([dataset[p] for p in range(start, min(start + batch_size, len(indices)))]).to(device)
        out = model(batch.features, mask=batch.mask, coords=batch.coords)
        logits.append(out.logits.float().cpu())
        embeddings.append(out.embedding.float().cpu())
    if not logits:
        return torch.zeros(0, len(cohort.classes)), torch.zeros(0, 0)
    return torch.cat(logits), torch.cat(embeddings)


def evaluate_split(
    model: MILModel, cohort: Cohort, indices: Indices, device: torch.device, ece_bins: int, batch_size: int = 1
) -> dict[str, float]:
    """Metrics (auc, acc, balanced_acc, f1, brier, ece) and mean CE loss on slides `indices`, plus n."""
    logits, _ = slide_outputs(model, cohort, indices, device, batch_size)
    return metrics_from_logits(logits, cohort.labels[np.asarray(indices, dtype=np.int64)], ece_bins)


def per_class_split(
    model: MILModel, cohort: Cohort, indices: Indices, device: torch.device, ece_bins: int, batch_size: int = 1
) -> dict[str, Any]:
    """Per-class metrics (common.metrics.per_class_metrics: F1, OvR AUC, classwise ECE, confusion matrix) of
    slides `indices`."""
    logits, _ = slide_outputs(model, cohort, indices, device, batch_size)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    return per_class_metrics(cohort.labels[np.asarray(indices, dtype=np.int64)], probs, cohort.classes, ece_bins)


def metrics_from_logits(logits: torch.Tensor, labels: np.ndarray, ece_bins: int) -> dict[str, float]:
    """Metrics (auc, acc, balanced_acc, f1, brier, ece), mean CE loss and n of slide logits [n, K]."""
    probs = torch.softmax(logits.double(), dim=1).numpy()
    metrics = classification_metrics(labels, probs, ece_bins)
    loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(labels))) if len(labels) else float("nan")
    return {**metrics, "loss": loss, "n": int(len(labels))}
