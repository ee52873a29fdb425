"""The federation's models built identically at the server and every site, and their ArrayRecord form."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common.config.federation import FederationConfig
from common.config.model import ModelConfig
from common.distillation.adapter import AdapterSpec, CrossResAdapter, build_adapter
from common.federation.protocol import Facts
from common.models.base import MILModel
from common.models.registry import build_model
from common.training.repro import seed_everything
from common.training.run import resolve_model_config


def teacher_config(cfg: FederationConfig, facts: Facts) -> ModelConfig:
    """The teacher's (and experts') model config for these features."""
    return resolve_model_config(cfg.teacher, facts.feature_dim, len(facts.classes))


def student_config(cfg: FederationConfig, facts: Facts) -> ModelConfig:
    """The student's (and baseline's) model config for these features."""
    return resolve_model_config(cfg.student, facts.feature_dim, len(facts.classes))


def adapter_spec(cfg: FederationConfig, facts: Facts) -> AdapterSpec:
    """The cross-resolution adapter's shape."""
    return AdapterSpec(in_dim=facts.feature_dim, out_dim=facts.feature_dim, hidden_dim=cfg.adapter.hidden_dim,
                       num_slots=max(facts.token_grid**2, 1), dropout=cfg.adapter.dropout)


def new_model(model_cfg: ModelConfig, seed: int) -> MILModel:
    """A freshly initialised MIL model (the same weights for the same seed everywhere)."""
    seed_everything(seed)
    return build_model(model_cfg)


def new_adapter(cfg: FederationConfig, facts: Facts, seed: int) -> CrossResAdapter:
    """A freshly initialised adapter."""
    seed_everything(seed)
    return build_adapter(adapter_spec(cfg, facts))


def to_record(module: torch.nn.Module) -> ArrayRecord:
    """A module's state dict as an ArrayRecord."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in module.state_dict().items()})


def load_record(module: torch.nn.Module, record: ArrayRecord) -> torch.nn.Module:
    """Load an ArrayRecord into a module (strict: names and shapes must match)."""
    state = {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}
    module.load_state_dict(state, strict=True)
    return module


def pack_models(records: dict[str, ArrayRecord]) -> ArrayRecord:
    """Several models in one record (one message, one aggregation): `<name>.<param>`."""
    return ArrayRecord({f"{name}.{k}": v for name, record in records.items() for k, v in record.items()})


def unpack_models(record: ArrayRecord) -> dict[str, ArrayRecord]:
    """Inverse of pack_models."""
    parts: dict[str, dict[str, Array]] = {}
    for key, value in record.items():
        name, _, param = key.partition(".")
        parts.setdefault(name, {})[param] = value
    return {name: ArrayRecord(arrays) for name, arrays in parts.items()}


def pack_experts(records: list[ArrayRecord]) -> ArrayRecord:
    """C expert models in one record: `expert-<c>.<param>`."""
    return pack_models({f"expert-{c}": record for c, record in enumerate(records)})


def unpack_experts(record: ArrayRecord) -> list[ArrayRecord]:
    """Inverse of pack_experts."""
    parts = unpack_models(record)
    return [parts[name] for name in sorted(parts, key=lambda n: int(n.removeprefix("expert-")))]


def fingerprint(record: ArrayRecord) -> str:
    """Short hash of a record's names and values (which global model a cache was made with)."""
    digest = hashlib.sha256()
    for key in sorted(record):
        digest.update(key.encode())
        digest.update(record[key].numpy().tobytes())
    return digest.hexdigest()[:16]


def pack_bags(bags: list[np.ndarray]) -> ArrayRecord:
    """Anonymous feature bags in one record: `features` [ΣN, D] float16 and `offsets` [P + 1] (no ids, no coords)."""
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in bags])]).astype(np.int64)
    features = np.concatenate(bags).astype(np.float16) if bags else np.zeros((0, 0), np.float16)
    return ArrayRecord({"features": Array(features), "offsets": Array(offsets)})


def unpack_bags(record: ArrayRecord) -> list[np.ndarray]:
    """Inverse of pack_bags (float32 bags)."""
    features, offsets = record["features"].numpy(), record["offsets"].numpy()
    return [features[a:b].astype(np.float32) for a, b in zip(offsets[:-1], offsets[1:])]
