"""Model registry: build any MIL model from a ModelConfig by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedslide.common.config.model import MODEL_NAMES, ModelConfig
from fedslide.common.models.abmil import ABMIL
from fedslide.common.models.acmil import ACMIL
from fedslide.common.models.base import MILModel
from fedslide.common.models.clam import CLAMSB
from fedslide.common.models.dsmil import DSMIL
from fedslide.common.models.longmil import LongMIL
from fedslide.common.models.mambamil import MambaMIL
from fedslide.common.models.pooling import PoolingMIL
from fedslide.common.models.s4mil import S4MIL
from fedslide.common.models.transmil import TransMIL


def _common(cfg: ModelConfig) -> dict[str, Any]:
    """Constructor arguments every model shares."""
    return {
        "in_dim": cfg.in_dim,
        "num_classes": cfg.num_classes,
        "hidden_dim": cfg.hidden_dim,
        "dropout": cfg.dropout,
        "head": cfg.head,
        "cka_degree": cfg.cka_degree,
    }


_BUILDERS: dict[str, Callable[[ModelConfig], MILModel]] = {
    "mean": lambda c: PoolingMIL(pooling="mean", **_common(c)),
    "max": lambda c: PoolingMIL(pooling="max", **_common(c)),
    "abmil": lambda c: ABMIL(attention_dim=c.attention_dim, gated=False, **_common(c)),
    "abmil_gated": lambda c: ABMIL(attention_dim=c.attention_dim, gated=True, **_common(c)),
    "transmil": lambda c: TransMIL(
        heads=c.num_heads,
        layers=c.transmil_layers,
        landmarks=c.transmil_landmarks,
        pinv_iterations=c.transmil_pinv_iterations,
        **_common(c),
    ),
    "dsmil": lambda c: DSMIL(query_dim=c.dsmil_query_dim, passing_v=c.dsmil_passing_v, **_common(c)),
    "clam_sb": lambda c: CLAMSB(
        attention_dim=c.attention_dim,
        k_sample=c.clam_k_sample,
        instance_loss_weight=c.clam_instance_loss_weight,
        subtyping=c.clam_subtyping,
        **_common(c),
    ),
    "acmil": lambda c: ACMIL(
        attention_dim=c.attention_dim,
        n_token=c.acmil_branches,
        n_masked_patch=c.acmil_top_k,
        mask_drop=c.acmil_mask_drop,
        diversity_weight=c.acmil_diversity_weight,
        **_common(c),
    ),
    "longmil": lambda c: LongMIL(
        heads=c.num_heads,
        layers=c.longmil_layers,
        window=c.longmil_window,
        shift_windows=c.longmil_shift_windows,
        alibi=c.longmil_alibi,
        attention_dim=c.attention_dim,
        **_common(c),
    ),
    "s4mil": lambda c: S4MIL(
        state_dim=c.s4_state_dim,
        layers=c.s4_layers,
        pooling=c.s4_pooling,
        attention_dim=c.attention_dim,
        **_common(c),
    ),
    "mambamil": lambda c: MambaMIL(
        layers=c.mamba_layers,
        state_dim=c.mamba_state_dim,
        expand=c.mamba_expand,
        conv_kernel=c.mamba_conv_kernel,
        sr_rate=c.mamba_sr_rate,
        chunk=c.mamba_chunk,
        attention_dim=c.attention_dim,
        **_common(c),
    ),
}
if set(_BUILDERS) != set(MODEL_NAMES):  # pragma: no cover - guards edits to either list
    raise RuntimeError(f"model registry {sorted(_BUILDERS)} and ModelConfig names {sorted(MODEL_NAMES)} disagree")


def build_model(cfg: ModelConfig) -> MILModel:
    """The MIL model `cfg.name`, freshly initialised from the config."""
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ValueError(f"unknown model {cfg.name!r}; available: {', '.join(MODEL_NAMES)}")
    return builder(cfg)
