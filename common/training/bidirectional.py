"""Training slide + clinical models, centralised and federated: bidirectional distillation (BD,
`common.models.bimodal`) and the baselines it is compared with (slide-only: the single-modal branch alone; one
multi-modal branch with missing clinical vectors zero- or mean-filled).

Federated (`federate`), in process: each site releases the sums of its training clinical vectors (suppressed as
a whole below `min_slides`; checked against the egress policy's handshake declaration), the pooled statistics
normalise every site's vectors, then FedAvg rounds train the model at the sites. Parameters are averaged with
the number of slides that trained them: the multi-modal branch (clinical encoder included) by each site's
training slides with clinical data, everything else (single-modal branch, prompt) by all its training slides,
so a site without clinical data trains and contributes the single-modal branch and the prompt only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from torch import nn

from fedslide.common.clinical import (
    FillMode,
    encode,
    pooled_clinical_stats,
    present_mask,
    site_clinical_sums,
)
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.distillation.clinical_model import build_bd
from fedslide.common.egress import check_reply
from fedslide.common.federation import protocol as p
from fedslide.common.federation.clinical_sums import clinical_sums_allowed, clinical_sums_record
from fedslide.common.models.bimodal import BidirectionalMIL, FusionBranch
from fedslide.common.training.bd_fit import BestState, Selection, TrainSettings, bd_batch_loss, fit
from fedslide.common.training.standardize import FeatureStats

ModelKind = Literal["slide-only", "zero-fill", "mean-fill", "bd"]
MODEL_KINDS: tuple[ModelKind, ...] = ("slide-only", "zero-fill", "mean-fill", "bd")
MULTI_PREFIX = "multi."  # BD parameters trained only by slides with clinical data


@dataclass(frozen=True)
class ClinicalBags:
    """Padded bags, labels and raw clinical vectors (NaN rows: no clinical data) of one site's split."""

    features: torch.Tensor  # [n, N, D] float32
    mask: torch.Tensor  # [n, N] bool
    labels: torch.Tensor  # [n] int64
    raw: np.ndarray  # [n, clinical_dim] float64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    def from_lists(cls, bags: Sequence[np.ndarray], labels: Sequence[int], raw: np.ndarray) -> ClinicalBags:
        """Pad bags of different sizes ([N_i, D] each) into one batch with its mask."""
        if not bags or len(bags) != len(labels) or len(bags) != len(raw):
            raise ValueError(
                f"need as many bags ({len(bags)}) as labels ({len(labels)}) and clinical rows ({len(raw)})"
            )
        size = max(bag.shape[0] for bag in bags)
        features = torch.zeros(len(bags), size, bags[0].shape[1])
        mask = torch.zeros(len(bags), size, dtype=torch.bool)
        for i, bag in enumerate(bags):
            features[i, : len(bag)] = torch.as_tensor(bag, dtype=torch.float32)
            mask[i, : len(bag)] = True
        return cls(features, mask, torch.as_tensor(list(labels), dtype=torch.long), np.asarray(raw, dtype=np.float64))

    def hide_clinical(self, fraction: float, rng: np.random.Generator) -> ClinicalBags:
        """A copy with the clinical vectors of round(fraction × n) slides (drawn among those that have one) removed."""
        raw = self.raw.copy()
        have = np.flatnonzero(present_mask(raw))
        drop = rng.choice(have, size=min(len(have), int(round(fraction * len(raw)))), replace=False)
        raw[drop] = np.nan
        return replace(self, raw=raw)


def build(kind: ModelKind, in_dim: int, cfg: ClinicalConfig, num_classes: int = 2) -> nn.Module:
    """A fresh model of `kind`: BD's single-modal branch alone (slide-only: gated ABMIL ⊕ prompt, the same
    architecture as the branch BD reads without clinical data), one multi-modal branch (the fills) or BD."""
    if kind == "slide-only":
        return FusionBranch(in_dim, None, num_classes, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
    if kind == "bd":
        return build_bd(in_dim, cfg, num_classes)
    return FusionBranch(in_dim, cfg.encoded_dim, num_classes, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)


def _fill(kind: ModelKind) -> FillMode:
    return "zero" if kind == "zero-fill" else "mean"


def _batch_loss(
    model: nn.Module, kind: ModelKind, bags: ClinicalBags, idx: np.ndarray, stats: FeatureStats, cfg: ClinicalConfig
) -> torch.Tensor:
    x, m, y = bags.features[idx], bags.mask[idx], bags.labels[idx]
    if kind == "slide-only":
        return F.cross_entropy(model(x, m), y)
    if kind == "bd":
        assert isinstance(model, BidirectionalMIL)
        return bd_batch_loss(model, x, m, y, bags.raw[idx], stats, cfg)
    z, _ = encode(bags.raw[idx], stats, _fill(kind))
    return F.cross_entropy(model(x, m, torch.from_numpy(z)), y)


def train(
    model: nn.Module,
    kind: ModelKind,
    bags: ClinicalBags,
    stats: FeatureStats,
    cfg: ClinicalConfig,
    settings: TrainSettings,
    seed: int,
) -> nn.Module:
    """Train `model` in place on `bags` (mini-batches, AdamW; `common.training.bd_fit.fit`) and return it."""
    return fit(model, len(bags), lambda idx: _batch_loss(model, kind, bags, idx, stats, cfg), settings, seed).model


@torch.no_grad()
def predict(model: nn.Module, kind: ModelKind, bags: ClinicalBags, stats: FeatureStats) -> np.ndarray:
    """Class probabilities [n, C]; BD reads each slide with the branch its clinical data calls for."""
    model.eval()
    if kind == "slide-only":
        logits = model(bags.features, bags.mask)
    else:
        z, present = encode(bags.raw, stats, _fill(kind))
        if kind == "bd":
            logits = model(bags.features, bags.mask, torch.from_numpy(z), torch.from_numpy(present)).logits
        else:
            logits = model(bags.features, bags.mask, torch.from_numpy(z))
    return torch.softmax(logits, dim=-1).numpy()


# --- validation split and model selection ---------------------------------------------------------------------
def subset(bags: ClinicalBags, idx: Sequence[int] | np.ndarray) -> ClinicalBags:
    """The slides `idx` of `bags` (padding trimmed to the longest selected bag)."""
    index = np.asarray(idx, dtype=np.int64)
    if index.size == 0:
        raise ValueError("a subset needs at least one slide")
    t = torch.from_numpy(index)
    mask = bags.mask[t]
    width = max(int(mask.sum(1).max()), 1)
    return ClinicalBags(bags.features[t, :width], mask[:, :width], bags.labels[t], bags.raw[index])


def validation_split(
    bags: ClinicalBags, fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[ClinicalBags, ClinicalBags]:
    """(train, validation) of one site's training slides: a label-stratified `fraction` held out, by patient when
    `groups` (one patient id per slide) is given, so a patient's slides all fall on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    y = bags.labels.numpy()
    if groups is None:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        train_idx, val_idx = next(splitter.split(np.zeros(len(y)), y))
    else:
        if len(groups) != len(y):
            raise ValueError(f"need one patient id per slide: {len(groups)} ids for {len(y)} slides")
        folds = StratifiedGroupKFold(n_splits=max(2, round(1.0 / fraction)), shuffle=True, random_state=seed)
        train_idx, val_idx = next(folds.split(np.zeros(len(y)), y, groups=list(groups)))
    return subset(bags, np.sort(train_idx)), subset(bags, np.sort(val_idx))


def validation_auc(model: nn.Module, kind: ModelKind, bags: ClinicalBags, stats: FeatureStats) -> float:
    """AUC on `bags` the way inference reads them (BD: multi-modal branch where clinical data is present, else the
    single-modal one); NaN when `bags` hold one class only."""
    from fedslide.common.metrics import roc_auc

    return roc_auc(bags.labels.numpy(), predict(model, kind, bags, stats))


def train_selected(
    model: nn.Module,
    kind: ModelKind,
    bags: ClinicalBags,
    val: ClinicalBags,
    stats: FeatureStats,
    cfg: ClinicalConfig,
    settings: TrainSettings,
    seed: int,
    patience: int | None = None,
    window: int = 1,
) -> Selection:
    """`train` for up to `settings.epochs`, scoring `validation_auc` on `val` after every epoch; the model is
    restored to the epoch ending the best run of `window` epochs by mean validation AUC (first of ties), and
    training stops after `patience` epochs without improvement (`common.training.bd_fit.fit`)."""
    return fit(
        model,
        len(bags),
        lambda idx: _batch_loss(model, kind, bags, idx, stats, cfg),
        settings,
        seed,
        score=lambda m: validation_auc(m, kind, val, stats),
        patience=patience,
        window=window,
    )


def federated_validation_auc(
    model: nn.Module, kind: ModelKind, val_sets: Sequence[ClinicalBags], stats: FeatureStats
) -> float:
    """Mean of the sites' validation AUCs weighted by their validation slides (each site scores its own split and
    releases one number); sites whose split holds one class are left out; NaN if all are."""
    scores = [(validation_auc(model, kind, val, stats), len(val)) for val in val_sets]
    kept = [(auc, n) for auc, n in scores if np.isfinite(auc)]
    if not kept:
        return float("nan")
    return float(sum(auc * n for auc, n in kept) / sum(n for _, n in kept))


def centralised_stats(train_sets: Sequence[ClinicalBags]) -> FeatureStats:
    """The normalisation fitted on the pooled training vectors (no suppression)."""
    return pooled_clinical_stats([site_clinical_sums(bags.raw) for bags in train_sets])


# --- federated, in process ------------------------------------------------------------------------------------
def site_release(bags: ClinicalBags, min_slides: int) -> RecordDict:
    """A site's handshake `stats` reply carrying its clinical sums, checked against the egress policy."""
    content = RecordDict({p.STATS: clinical_sums_record(site_clinical_sums(bags.raw, min_slides))})
    check_reply(content, clinical_sums_allowed(bags.raw.shape[1]))
    return content


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[dict[str, float]]) -> dict[str, torch.Tensor]:
    """Per-parameter weighted mean of the sites' states; a parameter nobody trained (all weights 0) keeps the
    first state's value (every site started the round from the same global one)."""
    out: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        w = torch.tensor([site[name] for site in weights], dtype=torch.float64)
        if not first.is_floating_point() or float(w.sum()) == 0.0:
            out[name] = first.clone()
            continue
        stacked = torch.stack([state[name].to(torch.float64) for state in states])
        out[name] = (stacked * (w / w.sum()).view(-1, *([1] * first.dim()))).sum(0).to(first.dtype)
    return out


def _site_weights(model: nn.Module, kind: ModelKind, bags: ClinicalBags) -> dict[str, float]:
    """FedAvg weight of each parameter from one site: its training slides, with clinical data where the
    parameter is trained only by those (BD's multi-modal branch; the whole model of a fill baseline is trained
    by every slide)."""
    n, with_clinical = float(len(bags)), float(present_mask(bags.raw).sum())
    return {
        name: (with_clinical if kind == "bd" and name.startswith(MULTI_PREFIX) else n) for name in model.state_dict()
    }


@dataclass(frozen=True)
class FederatedResult:
    """The global model and the pooled clinical normalisation."""

    model: nn.Module
    stats: FeatureStats
    released: tuple[int, ...]  # clinical vectors each site's release counted (0: withheld)
    best_round: int | None = None  # selected round (from 0) when validation sets were given
    val_history: tuple[float, ...] = ()  # federated validation AUC after each round


def federate(
    kind: ModelKind,
    sites: Sequence[ClinicalBags],
    cfg: ClinicalConfig,
    rounds: int,
    settings: TrainSettings,
    seed: int,
    min_slides: int = 0,
    val_sets: Sequence[ClinicalBags] | None = None,
    patience: int | None = None,
    window: int = 1,
) -> FederatedResult:
    """FedAvg of `kind` over the sites' training bags, in process, with the normalisation pooled from the sites'
    suppressed clinical sums (see the module docstring). With `val_sets` (one validation split per site) the
    global model is scored after every round (`federated_validation_auc`), the model of the round ending the best
    run of `window` rounds (mean validation AUC) is returned, and training stops after `patience` rounds without
    improvement."""
    from fedslide.common.federation.clinical_sums import clinical_sums_from_record

    dim = cfg.encoded_dim
    releases = [clinical_sums_from_record(site_release(bags, min_slides).array_records[p.STATS], dim) for bags in sites]
    stats = pooled_clinical_stats(releases, min_slides)
    torch.manual_seed(seed)
    in_dim = int(sites[0].features.shape[-1])
    global_model = build(kind, in_dim, cfg)
    best = BestState(patience, window)
    for round_index in range(rounds):
        states, weights = [], []
        for site_index, bags in enumerate(sites):
            local = build(kind, in_dim, cfg)
            local.load_state_dict(global_model.state_dict())
            train(local, kind, bags, stats, cfg, settings, seed=seed * 1000 + round_index * 100 + site_index)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(_site_weights(local, kind, bags))
        global_model.load_state_dict(fedavg(states, weights))
        if val_sets is not None and best.update(
            global_model, federated_validation_auc(global_model, kind, val_sets, stats)
        ):
            break
    released = tuple(release.slides for release in releases)
    if val_sets is None:
        return FederatedResult(global_model, stats, released)
    selection = best.restore(global_model)
    return FederatedResult(selection.model, stats, released, selection.best, selection.history)
