"""D&D experts: one MIL model per cluster, trained only on that cluster's training slides."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedslide.common.config.distill import MILTrainingConfig
from fedslide.common.distillation.mil import train_selected
from fedslide.common.models.base import MILModel
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.data import Indices
from fedslide.common.training.loop import FitResult


@dataclass
class Expert:
    """A trained expert: its cluster, the cohort indices it was trained on and its training record."""

    cluster: int
    model: MILModel
    train_indices: np.ndarray
    fit: FitResult
    val_indices: np.ndarray | None = None


def expert_start(teacher: MILModel, factory: Callable[[], MILModel], init: str) -> MILModel:
    """A fresh expert: a copy of the teacher ('teacher') or a new model ('scratch')."""
    if init == "teacher":
        return copy.deepcopy(teacher)
    if init == "scratch":
        return factory()
    raise ValueError(f"expert init must be 'teacher' or 'scratch', got {init!r}")


def cluster_members(train: Indices, assignment: np.ndarray, cluster: int) -> np.ndarray:
    """Cohort indices of the training slides in `cluster` (assignment is aligned with `train`)."""
    return np.asarray(train, dtype=np.int64)[np.asarray(assignment) == cluster]


def train_experts(
    teacher: MILModel,
    factory: Callable[[], MILModel],
    cohort: Cohort,
    train: Indices,
    assignment: np.ndarray,
    val: Indices,
    cfg: MILTrainingConfig,
    device: torch.device,
    seed: int,
    init: str = "teacher",
    num_clusters: int | None = None,
    val_assignment: np.ndarray | None = None,
) -> list[Expert]:
    """Train expert c on exactly the training slides assigned to cluster c.

    Expert c's checkpoint is selected on the validation slides of cluster c (`val_assignment`,
    aligned with `val`, e.g. nearest centroid) so that it is judged as the specialist it is meant
    to be; on all of `val` when that is empty (or has one class while selecting on AUC).
    """
    num_clusters = int(num_clusters if num_clusters is not None else np.max(assignment) + 1)
    experts = []
    for c in range(num_clusters):
        members = cluster_members(train, assignment, c)
        if members.size == 0:
            raise ValueError(f"cluster {c} has no training slides")
        own_val = np.asarray(val, dtype=np.int64)
        if val_assignment is not None:
            candidate = cluster_members(val, val_assignment, c)
            classes = np.unique(cohort.labels[candidate]).size
            if candidate.size and (cfg.early_stopping_metric == "loss" or classes > 1):
                own_val = candidate
        torch.manual_seed(seed + c)
        model = expert_start(teacher, factory, init)
        result = train_selected(model, cohort, members, own_val, cfg, device, seed + c, description=f"expert {c}")
        experts.append(Expert(cluster=c, model=model.eval(), train_indices=members, fit=result, val_indices=own_val))
    return experts
