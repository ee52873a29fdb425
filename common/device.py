"""Choosing the torch device a job runs on, from a setting such as "auto", "cpu", "cuda:1" or "mps"."""

from __future__ import annotations

import torch

from fedslide.common.config.base import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as given, refused when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device (use auto, cpu, cuda[:i] or mps)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f'device {name!r} requested but CUDA is not available (use device = "cpu" or "auto")')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f'device {name!r} requested but MPS is not available (use device = "cpu" or "auto")')
    return device
