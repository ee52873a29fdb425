"""Model registry: build any MIL model from a ModelConfig by name; each builder reads its architecture's options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fedslide.common.config.model import (
    MODEL_NAMES,
    ABMILOptions,
    ACMILOptions,
    CLAMOptions,
    DSMILOptions,
    LongMILOptions,
    MambaMILOptions,
    ModelConfig,
    ModelOptions,
    S4MILOptions,
    TransMILOptions,
)
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

OptionsT = TypeVar("OptionsT", bound=ModelOptions)


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


def _options(cfg: ModelConfig, kind: type[OptionsT]) -> OptionsT:
    """The architecture's own options, checked to be the kind its constructor reads."""
    if not isinstance(cfg.options, kind):
        raise TypeError(f"model {cfg.name!r} reads {kind.__name__}, got {type(cfg.options).__name__}")
    return cfg.options


def _abmil(c: ModelConfig) -> MILModel:
    return ABMIL(attention_dim=_options(c, ABMILOptions).attention_dim, gated=c.name == "abmil_gated", **_common(c))


def _transmil(c: ModelConfig) -> MILModel:
    o = _options(c, TransMILOptions)
    return TransMIL(
        heads=o.num_heads, layers=o.layers, landmarks=o.landmarks, pinv_iterations=o.pinv_iterations, **_common(c)
    )


def _dsmil(c: ModelConfig) -> MILModel:
    o = _options(c, DSMILOptions)
    return DSMIL(query_dim=o.query_dim, passing_v=o.passing_v, **_common(c))


def _clam(c: ModelConfig) -> MILModel:
    o = _options(c, CLAMOptions)
    return CLAMSB(
        attention_dim=o.attention_dim,
        k_sample=o.k_sample,
        instance_loss_weight=o.instance_loss_weight,
        subtyping=o.subtyping,
        **_common(c),
    )


def _acmil(c: ModelConfig) -> MILModel:
    o = _options(c, ACMILOptions)
    return ACMIL(
        attention_dim=o.attention_dim,
        n_token=o.branches,
        n_masked_patch=o.top_k,
        mask_drop=o.mask_drop,
        diversity_weight=o.diversity_weight,
        **_common(c),
    )


def _longmil(c: ModelConfig) -> MILModel:
    o = _options(c, LongMILOptions)
    return LongMIL(
        heads=o.num_heads,
        layers=o.layers,
        window=o.window,
        shift_windows=o.shift_windows,
        alibi=o.alibi,
        attention_dim=o.attention_dim,
        **_common(c),
    )


def _s4mil(c: ModelConfig) -> MILModel:
    o = _options(c, S4MILOptions)
    return S4MIL(state_dim=o.state_dim, layers=o.layers, pooling=o.pooling, attention_dim=o.attention_dim, **_common(c))


def _mambamil(c: ModelConfig) -> MILModel:
    o = _options(c, MambaMILOptions)
    return MambaMIL(
        layers=o.layers,
        state_dim=o.state_dim,
        expand=o.expand,
        conv_kernel=o.conv_kernel,
        sr_rate=o.sr_rate,
        chunk=o.chunk,
        attention_dim=o.attention_dim,
        **_common(c),
    )


_BUILDERS: dict[str, Callable[[ModelConfig], MILModel]] = {
    "mean": lambda c: PoolingMIL(pooling="mean", **_common(c)),
    "max": lambda c: PoolingMIL(pooling="max", **_common(c)),
    "abmil": _abmil,
    "abmil_gated": _abmil,
    "transmil": _transmil,
    "dsmil": _dsmil,
    "clam_sb": _clam,
    "acmil": _acmil,
    "longmil": _longmil,
    "s4mil": _s4mil,
    "mambamil": _mambamil,
}
if set(_BUILDERS) != set(MODEL_NAMES):  # pragma: no cover - guards edits to either list
    raise RuntimeError(f"model registry {sorted(_BUILDERS)} and ModelConfig names {sorted(MODEL_NAMES)} disagree")


def build_model(cfg: ModelConfig) -> MILModel:
    """The MIL model `cfg.name`, freshly initialised from the config."""
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ValueError(f"unknown model {cfg.name!r}; available: {', '.join(MODEL_NAMES)}")
    return builder(cfg)
