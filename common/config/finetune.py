"""Config of `fedslide finetune`: pixel-level LRMIL stage 1 at one site, then re-encoding (section [finetune])."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator

from fedslide.common.config.base import StageConfig
from fedslide.common.config.preprocess import EncoderConfig, SlideConfig


class StainJitterConfig(StageConfig):
    """HED colour augmentation of the student's 5× patches (per patch and stain: h' = h * (1 + a) + b)."""

    enabled: bool = Field(default=True, description="jitter the student's input in HED space during fine-tuning")
    sigma: NonNegativeFloat = Field(default=0.05, le=1.0, description="a ~ U(-sigma, sigma), multiplicative")
    bias: NonNegativeFloat = Field(default=0.05, le=1.0, description="b ~ U(-bias, bias), additive")


class FinetuneConfig(StageConfig):
    """One site fine-tunes a low-res copy of its encoder against the frozen encoder on 20× children."""

    layers: list[int | Literal["early", "middle", "last"]] = Field(
        default=["early", "middle", "last"],
        description="layers aligned child by child: indices (negative from the end) or early / middle / last",
    )
    trainable: Literal["all", "last-n", "lora"] = Field(
        default="all", description="what trains: every parameter, the last N layers, or LoRA adapters (peft)"
    )
    last_n: PositiveInt = Field(default=2, description="layers trained when trainable = 'last-n'")
    lora_rank: PositiveInt = Field(default=8, description="LoRA rank (trainable = 'lora')")
    lora_alpha: PositiveFloat = Field(default=16.0, description="LoRA scaling numerator (trainable = 'lora')")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the LoRA branch")
    checkpoint_activations: bool = Field(
        default=True,
        description="recompute each layer's activations in the backward pass (about a third more compute, far less memory)",
    )
    update_bn_stats: bool = Field(
        default=False,
        description=(
            "let BatchNorm running statistics of trained layers follow the 5× batches (with checkpoint-activations "
            "the recomputation updates them a second time per step)"
        ),
    )
    attention: Literal["auto", "teacher", "uniform", "off"] = Field(
        default="auto",
        description=(
            "weights of the whole-patch term: the teacher MIL's attention on the children (from "
            "teacher-attention), uniform over the children, or off; auto = teacher when the file is set, else off"
        ),
    )
    teacher_attention: Path | None = Field(
        default=None,
        examples=["runs/teacher/attention.pt"],
        description="torch file {slide_id: attention [H]} over the rows of each slide's high-res feature file",
    )
    lambda_layer: NonNegativeFloat = Field(default=1.0, description="weight of the layer-wise child alignment")
    lambda_attention: NonNegativeFloat = Field(default=1.0, description="weight of the attention-weighted term")
    epochs: PositiveInt = Field(default=3, description="passes over the sampled 5× patches")
    batch_size: PositiveInt = Field(default=32, description="5× patches per step")
    lr: PositiveFloat = Field(default=1e-4, description="AdamW learning rate")
    weight_decay: NonNegativeFloat = Field(default=0.0, description="AdamW weight decay")
    max_patches: PositiveInt = Field(
        default=2048, description="5× patches sampled over the site's slides (seeded; held in memory with targets)"
    )
    max_patches_per_slide: PositiveInt = Field(default=256, description="at most this many from one slide")
    sample_test_slides: bool = Field(
        default=False,
        description=(
            "also sample the site's test slides (labels.csv split column, else its carved splits.csv); off: stage 1 "
            "never sees test pixels"
        ),
    )
    seed: int = Field(default=0, description="sampling, shuffling and augmentation seed")
    reencode: bool = Field(default=True, description="re-encode the site's 5× feature files afterwards")
    overwrite: bool = Field(default=False, description="fine-tune again even when weights exist; redo re-encoding")
    output: Path | None = Field(
        default=None, examples=["site/finetune"], description="folder of the fine-tuned weights (default SITE/finetune)"
    )
    progress: bool = Field(default=True, description="show progress bars")
    stain: StainJitterConfig = Field(default_factory=StainJitterConfig)
    slide: SlideConfig = Field(default_factory=SlideConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: list[int | str]) -> list[int | str]:
        if not value:
            raise ValueError("layers must name at least one layer (an index or early / middle / last)")
        return value

    @model_validator(mode="after")
    def _attention_source(self) -> "FinetuneConfig":
        if self.attention == "teacher" and self.teacher_attention is None:
            raise ValueError("attention = 'teacher' needs teacher-attention (a torch file {slide_id: attention [H]})")
        return self

    @property
    def attention_mode(self) -> str:
        """The whole-patch term's weights after resolving 'auto': teacher, uniform or off."""
        if self.attention == "auto":
            return "teacher" if self.teacher_attention is not None else "off"
        return self.attention


def split_listed(data: Any, top: tuple[str, ...] = ("layers",)) -> Any:
    """Flower's flat run config carries lists comma-separated: split them back (the `top` keys, slide.extensions and
    the encoder's mean/std)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for key in top:
        if isinstance(data.get(key), str):
            data[key] = [t.strip() for t in data[key].split(",") if t.strip()]
    for section, keys in (("slide", ("extensions",)), ("encoder", ("mean", "std"))):
        node = data.get(section)
        if isinstance(node, dict):
            data[section] = {
                k: [t.strip() for t in v.split(",") if t.strip()] if k in keys and isinstance(v, str) else v
                for k, v in node.items()
            }
    return data


class FederatedFinetuneConfig(FinetuneConfig):
    """Pixel-level LRMIL stage 1 as each site runs it in a federation (section [federation.finetune]).

    Rounds and local epochs come from [federation.rounds] (pixel-stage1, pixel-stage1-local-epochs); the global
    encoder is written to the site's run directory and re-encoding always follows."""

    epochs: PositiveInt = Field(default=3, exclude=True, description="not used by a federated run (refused)")
    reencode: bool = Field(default=True, exclude=True, description="a federated run always re-encodes")
    overwrite: bool = Field(default=False, exclude=True, description="not used by a federated run")
    output: Path | None = Field(default=None, exclude=True, description="not used: the run directory holds it")
    progress: bool = Field(default=False, description="show progress bars in the site's log")

    @model_validator(mode="before")
    @classmethod
    def _federated_keys(cls, data: Any) -> Any:
        data = split_listed(data)
        if isinstance(data, dict):
            given = sorted(str(k).replace("_", "-") for k in data if str(k).replace("_", "-") in _FEDERATED_UNUSED)
            if given:
                raise ValueError(
                    f"{', '.join(given)}: not used by a federated run; set rounds.pixel-stage1 and "
                    "rounds.pixel-stage1-local-epochs instead (the global encoder is kept in the site's run directory "
                    "and re-encoding always follows)"
                )
        return data

    @model_validator(mode="after")
    def _shared_bn_stats(self) -> "FederatedFinetuneConfig":
        if self.update_bn_stats:
            raise ValueError(
                "update-bn-stats = true: a site's BatchNorm running statistics would follow its own patches and never "
                "be averaged, so the sites' encoders would differ; keep it false in a federated run"
            )
        return self


_FEDERATED_UNUSED = frozenset({"epochs", "reencode", "overwrite", "output"})
