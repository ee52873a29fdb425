"""Config of the slide-level MIL model: which architecture, its sizes, its head and its options."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, PositiveInt, ValidationInfo, field_validator

from fedslide.common.config.base import StageConfig

ModelName = Literal[
    "mean", "max", "abmil", "abmil_gated", "transmil", "dsmil", "clam_sb", "acmil", "longmil", "s4mil", "mambamil"
]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


class ModelConfig(StageConfig):
    """A MIL model: shared sizes first, then options read only by the model they name."""

    name: ModelName = Field(default="abmil", description="architecture: " + ", ".join(MODEL_NAMES))
    in_dim: PositiveInt = Field(
        default=1280, description="instance feature dim; must equal the encoder's (1280 for EfficientNet-Lite0)"
    )
    num_classes: int = Field(default=2, ge=2, description="number of slide classes (2 = binary)")
    hidden_dim: PositiveInt = Field(default=512, description="width of the instance embeddings inside the model")
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0, description="dropout rate in training")
    head: Literal["linear", "cka"] = Field(
        default="linear", description="classifier head: linear, or Chebyshev Kolmogorov-Arnold (AHDMIL)"
    )
    cka_degree: int = Field(default=4, ge=1, le=16, description="Chebyshev degree of the cka head")
    attention_dim: PositiveInt = Field(
        default=128, description="hidden size of attention scorers (abmil, clam_sb, acmil, and attention pooling)"
    )
    num_heads: PositiveInt = Field(default=8, description="self-attention heads (transmil, longmil)")

    dsmil_query_dim: PositiveInt = Field(default=128, description="dsmil: query size of the instance attention")
    dsmil_passing_v: bool = Field(default=False, description="dsmil: learn a value projection (else identity)")

    clam_k_sample: int = Field(default=8, ge=0, description="clam_sb: top/bottom-k instances for the instance loss")
    clam_instance_loss_weight: float = Field(
        default=0.3, ge=0.0, description="clam_sb: weight of the instance clustering loss in aux_loss"
    )
    clam_subtyping: bool | None = Field(
        default=None, description="clam_sb: other classes' top-k as negatives (default: num-classes > 2)"
    )

    acmil_branches: PositiveInt = Field(default=5, description="acmil: attention branches (n_token)")
    acmil_top_k: int = Field(default=10, ge=0, description="acmil: top-K instances per branch open to masking")
    acmil_mask_drop: float = Field(
        default=0.6, ge=0.0, lt=1.0, description="acmil: share of the top-K masked at random in training"
    )
    acmil_diversity_weight: float = Field(default=1.0, ge=0.0, description="acmil: weight of the branch diversity loss")

    transmil_layers: int = Field(default=2, ge=1, le=12, description="transmil: Nystrom attention layers")
    transmil_landmarks: PositiveInt | None = Field(
        default=None, description="transmil: Nystrom landmarks (default: hidden-dim / 2)"
    )
    transmil_pinv_iterations: int = Field(default=6, ge=1, le=20, description="transmil: pseudo-inverse iterations")

    longmil_window: PositiveInt = Field(
        default=256, description="longmil: instances per attention window (>= bag size: full attention)"
    )
    longmil_layers: int = Field(default=2, ge=1, le=12, description="longmil: local attention layers")
    longmil_shift_windows: bool = Field(default=True, description="longmil: shift windows by half on odd layers")
    longmil_alibi: bool = Field(default=True, description="longmil: 2-D distance bias from coords")

    s4_state_dim: int = Field(default=32, ge=2, le=256, description="s4mil: S4D state size (even)")
    s4_layers: int = Field(default=1, ge=1, le=8, description="s4mil: S4D blocks")
    s4_pooling: Literal["attention", "mean", "max"] = Field(default="attention", description="s4mil: bag pooling")

    mamba_state_dim: int = Field(default=16, ge=1, le=256, description="mambamil: SSM state size")
    mamba_expand: int = Field(default=2, ge=1, le=8, description="mambamil: inner width = expand x hidden-dim")
    mamba_conv_kernel: int = Field(default=4, ge=1, le=16, description="mambamil: causal conv kernel")
    mamba_layers: int = Field(default=2, ge=1, le=12, description="mambamil: Mamba layers")
    mamba_sr_rate: int = Field(
        default=10, ge=1, description="mambamil: sequence-reordering stride (1 = no reordered branch)"
    )
    mamba_chunk: int = Field(
        default=64, ge=1, le=1024, description="mambamil: scan chunk length (memory/speed trade-off)"
    )

    @field_validator("num_heads")
    @classmethod
    def _heads_divide_width(cls, value: int, info: ValidationInfo) -> int:
        hidden = info.data.get("hidden_dim")
        if hidden is not None and hidden % value:
            raise ValueError(f"num-heads ({value}) must divide hidden-dim ({hidden})")
        return value

    @field_validator("s4_state_dim")
    @classmethod
    def _state_even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"s4-state-dim must be even (complex conjugate pairs), got {value}")
        return value
