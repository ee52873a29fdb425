"""The federation's models built identically at the server and every site, and their ArrayRecord form."""

from __future__ import annotations

import hashlib
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.distillation.adapter import (
    AdapterSpec,
    CrossResAdapter,
    build_adapter,
)
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.protocol import Facts
from fedslide.common.models.base import MILModel
from fedslide.common.models.registry import build_model
from fedslide.common.training.repro import seed_everything
from fedslide.common.training.run import resolve_model_config

PARAMS_KEY = "params"  # a model on the wire: every float32 tensor of its state dict, flattened in state-dict order


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def teacher_config(cfg: FederationConfig, facts: Facts) -> ModelConfig:
    """The teacher's (and experts') model config for these features."""
    return resolve_model_config(cfg.teacher, facts.feature_dim, len(facts.classes))


def student_config(cfg: FederationConfig, facts: Facts) -> ModelConfig:
    """The student's (and baseline's) model config for these features."""
    return resolve_model_config(cfg.student, facts.feature_dim, len(facts.classes))


def adapter_spec(cfg: FederationConfig, facts: Facts) -> AdapterSpec:
    """The cross-resolution adapter's shape."""
    return AdapterSpec(
        in_dim=facts.feature_dim,
        out_dim=facts.feature_dim,
        hidden_dim=cfg.adapter.hidden_dim,
        num_slots=max(facts.token_grid**2, 1),
        dropout=cfg.adapter.dropout,
    )


def new_model(model_cfg: ModelConfig, seed: int) -> MILModel:
    """A freshly initialised MIL model (the same weights for the same seed everywhere)."""
    seed_everything(seed)
    return build_model(model_cfg)


def new_adapter(cfg: FederationConfig, facts: Facts, seed: int) -> CrossResAdapter:
    """A freshly initialised adapter."""
    seed_everything(seed)
    return build_adapter(adapter_spec(cfg, facts))


def _flat_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.dtype == torch.float32]


def to_record(module: torch.nn.Module) -> ArrayRecord:
    """A module's state dict as an ArrayRecord: its float32 tensors as one flat `params` array (one object to
    move per model, not one per tensor); any other tensor under its own name."""
    state = module.state_dict()
    flat = _flat_names(state)
    arrays: dict[str, Array] = {}
    if flat:
        arrays[PARAMS_KEY] = Array(torch.cat([state[k].detach().cpu().reshape(-1) for k in flat]).numpy())
    arrays.update({k: Array(v.detach().cpu().numpy().copy()) for k, v in state.items() if k not in flat})
    return ArrayRecord(arrays)


def load_record(module: ModuleT, record: ArrayRecord) -> ModuleT:
    """Load an ArrayRecord made by `to_record` into a module (strict: names and sizes must match)."""
    state = module.state_dict()
    flat = _flat_names(state)
    expected = ({PARAMS_KEY} if flat else set()) | {k for k in state if k not in flat}
    if set(record) != expected:
        raise ValueError(
            f"record does not fit {type(module).__name__}: extra arrays {sorted(set(record) - expected)[:5]}, "
            f"missing {sorted(expected - set(record))[:5]}"
        )
    loaded = {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in state if k not in flat}
    if flat:
        values = record[PARAMS_KEY].numpy()
        sizes = [state[k].numel() for k in flat]
        if values.dtype != np.float32 or values.shape != (sum(sizes),):
            raise ValueError(
                f"record's {PARAMS_KEY!r} is {values.dtype}{values.shape}; "
                f"{type(module).__name__} needs float32({sum(sizes)},)"
            )
        chunks = torch.from_numpy(np.array(values, copy=True)).split(sizes)
        loaded.update({k: chunk.view(state[k].shape) for k, chunk in zip(flat, chunks)})
    module.load_state_dict(loaded, strict=True)
    return module


def named_record(module: torch.nn.Module, record: ArrayRecord) -> ArrayRecord:
    """A `to_record` record with one array per state-dict tensor, under its name (for files people open)."""
    load_record(module, record)
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in module.state_dict().items()})


def named_models(cfg: FederationConfig, facts: Facts, models: dict[str, ArrayRecord]) -> dict[str, ArrayRecord]:
    """The run's global models (adapter, teacher, baseline, student, experts) in named form."""
    builders = {
        p.ADAPTER: lambda: build_adapter(adapter_spec(cfg, facts)),
        p.TEACHER: lambda: build_model(teacher_config(cfg, facts)),
        p.BASELINE: lambda: build_model(student_config(cfg, facts)),
        p.STUDENT: lambda: build_model(student_config(cfg, facts)),
    }
    out = {name: named_record(builders[name](), record) for name, record in models.items() if name in builders}
    if p.EXPERTS in models:
        out[p.EXPERTS] = pack_experts(
            [named_record(builders[p.TEACHER](), r) for r in unpack_experts(models[p.EXPERTS])]
        )
    return out


def pack_models(records: dict[str, ArrayRecord]) -> ArrayRecord:
    """Several models in one record (one message, one aggregation): `<name>.<param>`, the packing prefixes of
    `Phase.best_groups`."""
    return ArrayRecord({f"{name}.{k}": v for name, record in records.items() for k, v in record.items()})


def unpack_models(record: ArrayRecord) -> dict[str, ArrayRecord]:
    """Inverse of pack_models."""
    parts: dict[str, dict[str, Array]] = {}
    for key, value in record.items():
        name, _, param = key.partition(".")
        parts.setdefault(name, {})[param] = value
    return {name: ArrayRecord(arrays) for name, arrays in parts.items()}


def pack_experts(records: list[ArrayRecord]) -> ArrayRecord:
    """C expert models in one record, as the experts phase declares them: `expert-<c>.<param>`."""
    return pack_models({ph.EXPERTS.member(c): record for c, record in enumerate(records)})


def unpack_experts(record: ArrayRecord) -> list[ArrayRecord]:
    """Inverse of pack_experts."""
    parts = unpack_models(record)
    return [parts[name] for name in sorted(parts, key=ph.EXPERTS.member_index)]


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
