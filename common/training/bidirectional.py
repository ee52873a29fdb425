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
    clinical_sums_allowed,
    clinical_sums_record,
    encode,
    pooled_clinical_stats,
    present_mask,
    site_clinical_sums,
)
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.egress import check_reply
from fedslide.common.federation import protocol as p
from fedslide.common.models.bimodal import BidirectionalMIL, FusionBranch, bd_losses
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


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one training run (centralised) or of one site's local round (federated)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4


def build(kind: ModelKind, in_dim: int, cfg: ClinicalConfig, num_classes: int = 2) -> nn.Module:
    """A fresh model of `kind`: BD's single-modal branch alone (slide-only: gated ABMIL ⊕ prompt, the same
    architecture as the branch BD reads without clinical data), one multi-modal branch (the fills) or BD."""
    if kind == "slide-only":
        return FusionBranch(in_dim, None, num_classes, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)
    if kind == "bd":
        return BidirectionalMIL(
            in_dim,
            cfg.encoded_dim,
            num_classes,
            cfg.hidden_dim,
            cfg.attention_dim,
            cfg.dropout,
            shared_slide_encoder=cfg.shared_slide_encoder,
        )
    return FusionBranch(in_dim, cfg.encoded_dim, num_classes, cfg.hidden_dim, cfg.attention_dim, cfg.dropout)


def _fill(kind: ModelKind) -> FillMode:
    return "zero" if kind == "zero-fill" else "mean"


def _batch_loss(
    model: nn.Module, kind: ModelKind, bags: ClinicalBags, idx: np.ndarray, stats: FeatureStats, cfg: ClinicalConfig
) -> torch.Tensor:
    x, m, y = bags.features[idx], bags.mask[idx], bags.labels[idx]
    if kind == "slide-only":
        return F.cross_entropy(model(x, m), y)
    z, present = encode(bags.raw[idx], stats, _fill(kind))
    if kind == "bd":
        assert isinstance(model, BidirectionalMIL)
        out = model(x, m, torch.from_numpy(z), torch.from_numpy(present))
        return bd_losses(out, y, cfg.temperature, cfg.weight_m2s, cfg.weight_s2m)["total"]
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
    """Train `model` in place on `bags` (mini-batches, AdamW) and return it."""
    gen = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    for _ in range(settings.epochs):
        order = gen.permutation(len(bags))
        for start in range(0, len(order), settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            _batch_loss(model, kind, bags, order[start : start + settings.batch_size], stats, cfg).backward()
            optimizer.step()
    return model


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


def federate(
    kind: ModelKind,
    sites: Sequence[ClinicalBags],
    cfg: ClinicalConfig,
    rounds: int,
    settings: TrainSettings,
    seed: int,
    min_slides: int = 0,
) -> FederatedResult:
    """FedAvg of `kind` over the sites' training bags, in process, with the normalisation pooled from the sites'
    suppressed clinical sums (see the module docstring)."""
    from fedslide.common.clinical import clinical_sums_from_record

    dim = cfg.encoded_dim
    releases = [clinical_sums_from_record(site_release(bags, min_slides).array_records[p.STATS], dim) for bags in sites]
    stats = pooled_clinical_stats(releases, min_slides)
    torch.manual_seed(seed)
    in_dim = int(sites[0].features.shape[-1])
    global_model = build(kind, in_dim, cfg)
    for round_index in range(rounds):
        states, weights = [], []
        for site_index, bags in enumerate(sites):
            local = build(kind, in_dim, cfg)
            local.load_state_dict(global_model.state_dict())
            train(local, kind, bags, stats, cfg, settings, seed=seed * 1000 + round_index * 100 + site_index)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(_site_weights(local, kind, bags))
        global_model.load_state_dict(fedavg(states, weights))
    return FederatedResult(global_model, stats, tuple(release.slides for release in releases))
