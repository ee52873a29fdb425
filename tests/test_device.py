"""The one device resolver (common/device.py), used by preprocessing, training, distillation and prediction."""

from __future__ import annotations

import pytest
import torch

from fedslide.client.preprocess import SitePreprocessor
from fedslide.common.config.base import ConfigError
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.device import resolve_device


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_takes_cuda_only_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.usefixtures("no_cuda")
def test_cuda_asked_for_without_cuda_is_refused_by_name() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device '{name}' requested but CUDA is not available"):
            resolve_device(name)
    # preprocessing used to take "cuda" as given and fail later inside torch; now it refuses before loading anything
    with pytest.raises(ConfigError, match="device 'cuda'"):
        SitePreprocessor(PreprocessConfig(encoder={"device": "cuda"}))


def test_missing_cuda_index_and_mps_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match="has 1 CUDA device"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("tpu9")
