"""The trained-model checkpoint: weights with everything needed to rebuild and use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedslide.common.atomic import atomic_path
from fedslide.common.models.base import MILModel
from fedslide.common.training.scaling import ModelScaling

CHECKPOINT_FORMAT = "fedslide.mil-checkpoint/1"


def save_checkpoint(
    path: Path | str,
    state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    label_map: dict[str, int],
    feature_dim: int,
    encoder: dict[str, Any],
    **extra: Any,
) -> Path:
    """Write `path` atomically: state_dict, model config dict, label map, feature dim, encoder attrs, extras.

    Only tensors and plain Python values are stored, so `torch.load(weights_only=True)` reads it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "model_config": model_config,
        "label_map": dict(label_map),
        "classes": [name for name, _ in sorted(label_map.items(), key=lambda kv: kv[1])],
        "feature_dim": int(feature_dim),
        "encoder": dict(encoder),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's payload (weights-only unpickling)."""
    payload = torch.load(Path(path), map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fedslide MIL checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def load_model(path: Path | str, map_location: str | torch.device = "cpu") -> tuple[MILModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint through the model registry; returns (model in eval mode, payload)."""
    from fedslide.common.config.model import ModelConfig
    from fedslide.common.models.registry import build_model

    payload = load_checkpoint(path, map_location)
    model = build_model(ModelConfig.model_validate(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


@torch.no_grad()
def predict_proba(
    model: MILModel, payload: dict[str, Any], features: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Class probabilities [B, C] of bags [B, N, D] as the run evaluated them: the checkpoint's
    standardisation (if any) before the model, its temperature (if any) on the logits."""
    scaling = ModelScaling.from_payload(payload)
    return scaling.probs(model(scaling.inputs(features, mask), mask=mask).logits)
