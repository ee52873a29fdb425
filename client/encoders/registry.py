"""Encoders by name: `build_encoder(cfg)` and `available_encoders()`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from fedslide.client.encoders import efficientnet_lite, resnet, vit
from fedslide.client.encoders.base import PatchEncoder
from fedslide.common.config.preprocess import EncoderConfig

DEFAULT_ENCODER = efficientnet_lite.NAME

ENCODERS: Mapping[str, Callable[[EncoderConfig], PatchEncoder]] = MappingProxyType(
    {
        efficientnet_lite.NAME: efficientnet_lite.build,
        "resnet50": resnet.build,
        "resnet50_trunc": resnet.build_truncated,
        "vit": vit.build,
    }
)


def available_encoders() -> list[str]:
    """Registered encoder names, the default first."""
    return list(ENCODERS)


def build_encoder(cfg: EncoderConfig) -> PatchEncoder:
    """The encoder named by `cfg.name`, weights loaded, in eval mode on the CPU (channels_last)."""
    builder = ENCODERS.get(cfg.name)
    if builder is None:
        raise ValueError(
            f"unknown encoder {cfg.name!r} (config key `encoder.name`); available: {', '.join(available_encoders())}"
        )
    return builder(cfg)
