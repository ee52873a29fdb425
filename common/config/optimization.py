"""Optimisation and checkpoint-selection settings shared by every stage that trains MIL models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from fedslide.common.config.base import StageConfig


class OptimizationConfig(StageConfig):
    """Optimizer, schedule, batching and early stopping (base of [train] and [distill.training])."""

    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="torch optimizer")
    lr: PositiveFloat = Field(default=2e-4, description="learning rate")
    weight_decay: float = Field(default=1e-4, ge=0.0, description="weight decay (decoupled for AdamW)")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum")
    scheduler: Literal["cosine", "step", "none"] = Field(default="cosine", description="per-epoch LR schedule")
    step_size: PositiveInt = Field(default=10, description="epochs between LR drops (scheduler = step)")
    step_gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="LR factor at each drop (scheduler = step)")
    epochs: PositiveInt = Field(default=50, description="maximum epochs")
    group_by_length: bool = Field(
        default=True, description="batch bags of similar length together (less padding); order stays seeded"
    )
    grad_accum: PositiveInt = Field(default=1, description="batches whose gradients are summed before a step")
    max_grad_norm: PositiveFloat | None = Field(
        default=None, examples=[1.0], description="clip the gradient norm (off when unset)"
    )
    class_weighting: Literal["none", "balanced"] = Field(
        default="none", description="'balanced': cross-entropy weights n / (C * n_c) from each training split"
    )
    early_stopping_patience: NonNegativeInt = Field(
        default=10, description="stop after this many epochs without validation improvement (0 = never stop early)"
    )
    early_stopping_metric: Literal["loss", "auc"] = Field(
        default="loss", description="validation quantity that picks the best epoch"
    )
    min_epochs: NonNegativeInt = Field(default=0, description="epochs always run before early stopping may stop")
    selection_smoothing: PositiveInt = Field(
        default=1,
        description="select on the mean validation score of the last N epochs (the window's last epoch's weights; "
        "shortened when fewer epochs may be selected); 1 = the epoch's own score",
    )
    selection_min_epochs: NonNegativeInt = Field(
        default=0, description="epochs trained before any epoch's weights may be selected (the first N never are)"
    )
    max_instances: PositiveInt | None = Field(
        default=None,
        examples=[8192],
        description="randomly sample at most this many instances per bag in training (memory cap)",
    )

    @model_validator(mode="after")
    def _min_epochs_fit(self) -> "OptimizationConfig":
        if self.min_epochs > self.epochs:
            raise ValueError(f"min-epochs ({self.min_epochs}) exceeds epochs ({self.epochs})")
        if self.selection_min_epochs >= self.epochs:
            raise ValueError(
                f"selection-min-epochs ({self.selection_min_epochs}) must be below epochs ({self.epochs}): "
                "no epoch could be selected"
            )
        return self

    @property
    def selection_window(self) -> int:
        """selection-smoothing, shortened to the epochs that may be selected when there are fewer."""
        return max(1, min(self.selection_smoothing, self.epochs - self.selection_min_epochs))
