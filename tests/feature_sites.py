"""Tiny paired low/high feature files in the exact FeatureWriter format (site directories for tests)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslide.common.config.model import ModelConfig
from fedslide.common.config.preprocess import TilingConfig, TissueConfig
from fedslide.common.distillation.adapter import AdapterSpec, build_adapter
from fedslide.common.distillation.bundle import BundleMeta, StudentBundle
from fedslide.common.models.registry import build_model
from fedslide.common.features import FeatureMeta, FeatureWriter, feature_path

D = 16
GRID = 4
SLOTS = GRID * GRID
ENCODER = "toy_cnn"
HASH = "a1b2c3d4e5f6a7b8c9d0"


# ---------------------------------------------------------------------------------------------
# synthetic paired feature files (the exact FeatureWriter format)
# ---------------------------------------------------------------------------------------------
def _world(seed: int = 123) -> dict[str, np.ndarray]:
    """The fixed 'physics' shared by all slides: child = A·token + b[slot]; tumour direction v."""
    rng = np.random.default_rng(seed)
    return {
        "A": rng.normal(size=(D, D)) / math.sqrt(D),
        "b": rng.normal(size=(SLOTS, D)) * 0.5,
        "v": rng.normal(size=D) * 1.5,
    }


def write_slide(
    site: Path,
    slide_id: str,
    label: int,
    rng: np.random.Generator,
    world: dict[str, np.ndarray],
    n_low: int = 6,
    drop: float = 0.2,
    encoder: str = ENCODER,
    weights_hash: str = HASH,
    tokens: bool = True,
    attrs: dict[str, str] | None = None,
) -> None:
    """Paired low/high files: tokens ~ N(0, 1) (+ v on tumour children of positive slides); high child
    embedding = A·token + b[slot] + noise; low feature = mean of the tokens; ~`drop` children missing;
    `attrs`: more file attributes (e.g. the recorded preprocessing settings)."""
    cols = 3
    low_coords = np.array([[(i % cols) * 1024, (i // cols) * 1024] for i in range(n_low)], dtype=np.int64)
    tok = rng.normal(size=(n_low, SLOTS, D))
    if label == 1:
        tumour = rng.random((n_low, SLOTS)) < 0.5
        tok[tumour] += world["v"]
    high = np.einsum("ij,nsj->nsi", world["A"], tok) + world["b"][None] + 0.02 * rng.normal(size=(n_low, SLOTS, D))
    keep = rng.random((n_low, SLOTS)) >= drop
    keep[:, 0] = True  # every low patch keeps at least one child
    parent, child = np.nonzero(keep)
    hc = low_coords[parent] + np.stack([child % GRID, child // GRID], 1) * 256
    common = dict(
        slide_id=slide_id,
        encoder_name=encoder,
        encoder_weights_hash=weights_hash,
        encoder_dim=D,
        target_magnification=5.0,
        slide_mpp=0.5,
        level0_magnification=20.0,
    )
    extra = {
        "child_grid": GRID,
        "encoder_fingerprint": f"fp-{encoder}-{weights_hash}",
        "patch_size_level0_exact": 1024.0,
        **(attrs or {}),
    }
    low_meta = FeatureMeta(
        resolution="low",
        patch_size=256,
        patch_size_level0=1024,
        target_mpp=2.0,
        token_grid=GRID if tokens else 0,
        extra=extra,
        **common,
    )
    high_meta = FeatureMeta(
        resolution="high",
        patch_size=256,
        patch_size_level0=256,
        target_mpp=0.5,
        extra={**extra, "patch_size_level0_exact": 256.0},
        **{**common, "target_magnification": 20.0},
    )
    with FeatureWriter(feature_path(site, encoder, "low", slide_id), low_meta, with_tokens=tokens) as w:
        w.append(tok.mean(axis=1) + 0.05 * rng.normal(size=(n_low, D)), low_coords, tokens=tok if tokens else None)
    with FeatureWriter(feature_path(site, encoder, "high", slide_id), high_meta, with_parent=True) as w:
        w.append(high[parent, child], hc, parent=parent, child=child)


def make_site(root: Path, name: str, splits: dict[str, int], seed: int, **kw) -> Path:
    """A site with `splits[split]` slides per split, classes alternating (labels 'neg'/'pos')."""
    site = root / name
    site.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    world = _world()
    rows = []
    for split, count in splits.items():
        for i in range(count):
            label = i % 2
            sid = f"{name}_{split}_{i}"
            write_slide(site, sid, label, rng, world, n_low=int(rng.integers(4, 8)), **kw)
            rows.append((sid, ["neg", "pos"][label], split, f"p_{sid}"))
    with (site / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "split", "patient_id"])
        writer.writerows(rows)
    return site


def tiny(name: str = "abmil_gated", in_dim: int = D) -> ModelConfig:
    return ModelConfig(name=name, in_dim=in_dim, hidden_dim=16, attention_dim=8, dropout=0.0)


def tiny_student_bundle(
    encoder: Any, class_names: list[str], student_input: str = "pooled", weights: Path | None = None, **meta: Any
) -> StudentBundle:
    """A seeded untrained ABMIL student bundle for `encoder` (5x at 2 µm/px, 20x at 0.5, 256 px, 4×4 grids, default
    tissue and tiling); `meta` overrides BundleMeta fields (e.g. the fine-tuned 5x encoder's hash)."""
    torch.manual_seed(0)
    mc = ModelConfig(name="abmil", in_dim=encoder.dim, num_classes=len(class_names), hidden_dim=32, attention_dim=16)
    fields: dict[str, Any] = {
        "encoder_name": encoder.name,
        "encoder_weights_hash": encoder.weights_hash,
        "encoder_dim": encoder.dim,
        "encoder_fingerprint": encoder.fingerprint,
        "low_mpp": 2.0,
        "low_patch_size": 256,
        "high_mpp": 0.5,
        "high_patch_size": 256,
        "child_grid": 4,
        "token_grid": 4,
        "student_input": student_input,
        "class_names": class_names,
        "tissue": TissueConfig().model_dump(mode="json"),
        "tiling": TilingConfig().model_dump(mode="json"),
    }
    adapter = build_adapter(AdapterSpec(in_dim=encoder.dim, out_dim=encoder.dim, hidden_dim=32))
    return StudentBundle(BundleMeta(**{**fields, **meta}), adapter, build_model(mc), build_model(mc), mc, mc, weights)
