"""Config of the slide-level MIL model: the architecture (`name`), the sizes every model shares, and the options of
the chosen architecture alone.

In TOML the options sit beside the shared keys (`[train.model]`, `name = "transmil"`, `layers = 4`); in Python
they are `cfg.options`, a model of their own per architecture. A key the chosen architecture does not take is
refused, naming the key, the model and the keys it takes.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    Field,
    PositiveInt,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonDict

from fedslide.common.config.base import StageConfig

ModelName = Literal[
    "mean", "max", "abmil", "abmil_gated", "transmil", "dsmil", "clam_sb", "acmil", "longmil", "s4mil", "mambamil"
]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
FROM_DATA: JsonDict = {
    "dump": "commented"
}  # filled from the data unless set: written commented out in configs/defaults.toml


def _attention_dim() -> Any:
    return Field(default=128, description="hidden size of the attention scorer")


class ModelOptions(StageConfig):
    """The options of one architecture; `name` (not written) says which, and comes from the model's `name`."""

    name: str = Field(exclude=True)


class PoolingOptions(ModelOptions):
    """Instance pooling, no options of their own."""

    name: Literal["mean", "max"] = Field(exclude=True)


class ABMILOptions(ModelOptions):
    """Attention-based pooling (gated: tanh x sigmoid scorer)."""

    name: Literal["abmil", "abmil_gated"] = Field(exclude=True)
    attention_dim: PositiveInt = _attention_dim()


class TransMILOptions(ModelOptions):
    """Nystrom self-attention layers with positional encoding."""

    name: Literal["transmil"] = Field(exclude=True)
    num_heads: PositiveInt = Field(default=8, description="self-attention heads (must divide hidden-dim)")
    layers: int = Field(default=2, ge=1, le=12, description="Nystrom attention layers")
    landmarks: PositiveInt | None = Field(default=None, description="Nystrom landmarks (default: hidden-dim / 2)")
    pinv_iterations: int = Field(default=6, ge=1, le=20, description="pseudo-inverse iterations")


class DSMILOptions(ModelOptions):
    """Max-instance and instance-attention streams."""

    name: Literal["dsmil"] = Field(exclude=True)
    query_dim: PositiveInt = Field(default=128, description="query size of the instance attention")
    passing_v: bool = Field(default=False, description="learn a value projection (else identity)")


class CLAMOptions(ModelOptions):
    """Single-branch CLAM with the instance clustering loss."""

    name: Literal["clam_sb"] = Field(exclude=True)
    attention_dim: PositiveInt = _attention_dim()
    k_sample: int = Field(default=8, ge=0, description="top/bottom-k instances for the instance loss")
    instance_loss_weight: float = Field(
        default=0.3, ge=0.0, description="weight of the instance clustering loss in aux_loss"
    )
    subtyping: bool | None = Field(
        default=None, description="other classes' top-k as negatives (default: num-classes > 2)"
    )


class ACMILOptions(ModelOptions):
    """Multiple attention branches with top-K masking."""

    name: Literal["acmil"] = Field(exclude=True)
    attention_dim: PositiveInt = _attention_dim()
    branches: PositiveInt = Field(default=5, description="attention branches (n_token)")
    top_k: int = Field(default=10, ge=0, description="top-K instances per branch open to masking")
    mask_drop: float = Field(default=0.6, ge=0.0, lt=1.0, description="share of the top-K masked at random in training")
    diversity_weight: float = Field(default=1.0, ge=0.0, description="weight of the branch diversity loss")


class LongMILOptions(ModelOptions):
    """Windowed local self-attention with a 2-D distance bias."""

    name: Literal["longmil"] = Field(exclude=True)
    attention_dim: PositiveInt = _attention_dim()
    num_heads: PositiveInt = Field(default=8, description="self-attention heads (must divide hidden-dim)")
    window: PositiveInt = Field(default=256, description="instances per attention window (>= bag size: full attention)")
    layers: int = Field(default=2, ge=1, le=12, description="local attention layers")
    shift_windows: bool = Field(default=True, description="shift windows by half on odd layers")
    alibi: bool = Field(default=True, description="2-D distance bias from coords")


class S4MILOptions(ModelOptions):
    """S4D state-space blocks over the instance sequence."""

    name: Literal["s4mil"] = Field(exclude=True)
    attention_dim: PositiveInt = _attention_dim()
    state_dim: int = Field(default=32, ge=2, le=256, description="S4D state size (even)")
    layers: int = Field(default=1, ge=1, le=8, description="S4D blocks")
    pooling: Literal["attention", "mean", "max"] = Field(default="attention", description="bag pooling")

    @field_validator("state_dim")
    @classmethod
    def _state_even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"state-dim must be even (complex conjugate pairs), got {value}")
        return value


class MambaMILOptions(ModelOptions):
    """Mamba layers with a sequence-reordered branch."""

    name: Literal["mambamil"] = Field(exclude=True)
    attention_dim: PositiveInt = _attention_dim()
    state_dim: int = Field(default=16, ge=1, le=256, description="SSM state size")
    expand: int = Field(default=2, ge=1, le=8, description="inner width = expand x hidden-dim")
    conv_kernel: int = Field(default=4, ge=1, le=16, description="causal conv kernel")
    layers: int = Field(default=2, ge=1, le=12, description="Mamba layers")
    sr_rate: int = Field(default=10, ge=1, description="sequence-reordering stride (1 = no reordered branch)")
    chunk: int = Field(default=64, ge=1, le=1024, description="scan chunk length (memory/speed trade-off)")


OPTION_MODELS: tuple[type[ModelOptions], ...] = (
    PoolingOptions,
    ABMILOptions,
    TransMILOptions,
    DSMILOptions,
    CLAMOptions,
    ACMILOptions,
    LongMILOptions,
    S4MILOptions,
    MambaMILOptions,
)
OPTIONS: dict[str, type[ModelOptions]] = {
    name: kind for kind in OPTION_MODELS for name in get_args(kind.model_fields["name"].annotation)
}
AnyOptions = Annotated[
    PoolingOptions
    | ABMILOptions
    | TransMILOptions
    | DSMILOptions
    | CLAMOptions
    | ACMILOptions
    | LongMILOptions
    | S4MILOptions
    | MambaMILOptions,
    Field(discriminator="name"),
]
if set(OPTIONS) != set(MODEL_NAMES):  # pragma: no cover - guards edits to either list
    raise RuntimeError(f"model options {sorted(OPTIONS)} and model names {sorted(MODEL_NAMES)} disagree")

# the flat keys of one ModelConfig before options had models of their own (stored bundles and checkpoints)
_LEGACY: dict[str, tuple[str, str]] = {
    **{f"dsmil_{k}": ("dsmil", k) for k in ("query_dim", "passing_v")},
    **{f"clam_{k}": ("clam_sb", k) for k in ("k_sample", "instance_loss_weight", "subtyping")},
    **{f"acmil_{k}": ("acmil", k) for k in ("branches", "top_k", "mask_drop", "diversity_weight")},
    **{f"transmil_{k}": ("transmil", k) for k in ("layers", "landmarks", "pinv_iterations")},
    **{f"longmil_{k}": ("longmil", k) for k in ("window", "layers", "shift_windows", "alibi")},
    **{f"s4_{k}": ("s4mil", k) for k in ("state_dim", "layers", "pooling")},
    **{f"mamba_{k}": ("mambamil", k) for k in ("state_dim", "expand", "conv_kernel", "layers", "sr_rate", "chunk")},
}


def _from_legacy(data: dict[str, Any], name: str) -> dict[str, Any]:
    """A stored flat config of the old layout (every architecture's options, prefixed) in today's layout."""
    takes = OPTIONS[name].model_fields
    out: dict[str, Any] = {}
    for key, value in data.items():
        snake = str(key).replace("-", "_")
        if snake in _LEGACY:
            owner, option = _LEGACY[snake]
            if owner == name:
                out[option] = value
        elif snake in ("attention_dim", "num_heads"):
            if snake in takes:
                out[snake] = value
        else:
            out[key] = value
    return out


class ModelConfig(StageConfig):
    """A MIL model: the architecture, the sizes every model shares, and that architecture's options."""

    flat_fields: ClassVar[tuple[str, ...]] = ("options",)  # written beside the other keys, not as a sub-table

    name: ModelName = Field(default="abmil", description="architecture: " + ", ".join(MODEL_NAMES))
    in_dim: PositiveInt = Field(
        default=1280,
        description="instance feature dim; taken from the feature files when unset (1280 for EfficientNet-Lite0)",
        json_schema_extra=FROM_DATA,
    )
    num_classes: int = Field(
        default=2,
        ge=2,
        description="number of slide classes; taken from the labels when unset",
        json_schema_extra=FROM_DATA,
    )
    hidden_dim: PositiveInt = Field(default=512, description="width of the instance embeddings inside the model")
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0, description="dropout rate in training")
    head: Literal["linear", "cka"] = Field(
        default="linear", description="classifier head: linear, or Chebyshev Kolmogorov-Arnold (AHDMIL)"
    )
    cka_degree: int = Field(default=4, ge=1, le=16, description="Chebyshev degree of the cka head")
    options: AnyOptions = Field(
        default_factory=lambda: ABMILOptions(name="abmil"), description="the options of architecture `name`"
    )

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, data: Any) -> Any:
        """Every key that is not shared belongs to the chosen architecture's options."""
        if not isinstance(data, dict):
            return data
        name = data.get("name", cls.model_fields["name"].default)
        if name not in OPTIONS:  # the name's own error says what is allowed
            return {k: v for k, v in data.items() if str(k).replace("-", "_") in cls.model_fields}
        if any(str(k).replace("-", "_") in _LEGACY for k in data):
            data = _from_legacy(data, name)
        shared = {k: v for k, v in data.items() if str(k).replace("-", "_") in cls.model_fields and k != "options"}
        given = data.get("options")
        if isinstance(given, ModelOptions):
            return {**shared, "options": given}
        options = {k: v for k, v in data.items() if str(k).replace("-", "_") not in cls.model_fields}
        if isinstance(given, dict):
            options = {**given, **options}
        return {**shared, "options": {**options, "name": name}}

    @model_validator(mode="after")
    def _options_fit(self) -> "ModelConfig":
        if self.options.name != self.name:
            raise ValueError(f"options of {self.options.name!r} given for model {self.name!r}")
        heads = getattr(self.options, "num_heads", None)
        if heads is not None and self.hidden_dim % heads:
            raise ValueError(f"num-heads ({heads}) must divide hidden-dim ({self.hidden_dim})")
        return self

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        options = data.pop("options", None) or {}
        return {**data, **options}

    @classmethod
    def option_keys(cls) -> dict[str, list[str]]:
        """Every architecture's option (kebab-case key) -> the architectures that take it."""
        keys: dict[str, list[str]] = {}
        for name, kind in OPTIONS.items():
            for field, info in kind.model_fields.items():
                if not info.exclude:
                    keys.setdefault(info.alias or field.replace("_", "-"), []).append(name)
        return keys
