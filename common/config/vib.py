"""Config of `fedslide finetune --method vib`: VIB task-specific fine-tuning of the 20x patch encoder at one site,
then re-encoding of its feature files (section [vib])."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from fedslide.common.config.base import StageConfig
from fedslide.common.config.finetune import StainJitterConfig, split_listed
from fedslide.common.config.preprocess import EncoderConfig, SlideConfig


class VIBConfig(StageConfig):
    """An information bottleneck picks each slide's instances; the patch encoder fine-tunes through those only."""

    rate: float = Field(default=0.1, gt=0.0, lt=1.0, description="IB target of the mean keep probability")
    tau: PositiveFloat = Field(default=0.1, description="relaxed-Bernoulli temperature of the training mask")
    samples: PositiveInt = Field(default=10, description="relaxed-Bernoulli draws averaged per instance")
    keep: PositiveInt = Field(default=1024, description="instances kept per slide by IB logit (test-time top-k)")
    bag_size: PositiveInt = Field(
        default=512, description="of those, the top instances by attention that the encoder fine-tunes through"
    )
    bag_weight: float = Field(default=0.7, ge=0.0, le=1.0, description="weight of the bag CE (1 - it: the IB term)")
    hidden_dim: PositiveInt = Field(default=512, description="selector's instance MLP width")
    attention_dim: PositiveInt = Field(default=256, description="selector's gated attention width")
    selector_epochs: PositiveInt = Field(default=20, description="passes over the train slides' frozen features")
    selector_lr: PositiveFloat = Field(default=2e-4, description="AdamW learning rate of the selector")
    trainable: Literal["all", "last-n", "lora"] = Field(
        default="last-n", description="what of the encoder fine-tunes (the reference freezes its early layers)"
    )
    last_n: PositiveInt = Field(default=2, description="layers trained when trainable = 'last-n'")
    lora_rank: PositiveInt = Field(default=8, description="LoRA rank (trainable = 'lora')")
    lora_alpha: PositiveFloat = Field(default=16.0, description="LoRA scaling numerator (trainable = 'lora')")
    checkpoint_activations: bool = Field(default=True, description="recompute layer activations in the backward pass")
    epochs: PositiveInt = Field(default=3, description="end-to-end passes over the train slides' selected bags")
    lr: PositiveFloat = Field(default=1e-5, description="AdamW learning rate of the encoder")
    head_lr: PositiveFloat = Field(default=2e-4, description="AdamW learning rate of the fine-tuning MIL head")
    weight_decay: NonNegativeFloat = Field(default=1e-5, description="AdamW weight decay")
    patch_batch: PositiveInt = Field(default=64, description="selected patches encoded per forward chunk")
    stain: StainJitterConfig = Field(
        default_factory=StainJitterConfig, description="HED jitter of the selected 20x patches at every step"
    )
    sample_test_slides: bool = Field(default=False, description="also train on the site's test slides")
    levels: list[Literal["high", "low"]] = Field(
        default=["high", "low"], description="feature levels re-encoded with the fine-tuned encoder"
    )
    seed: int = Field(default=0, description="selector init, sampling and shuffling seed")
    reencode: bool = Field(default=True, description="re-encode the site's feature files afterwards")
    overwrite: bool = Field(default=False, description="fine-tune again even when weights exist; redo re-encoding")
    output: Path | None = Field(
        default=None, examples=["site/vib"], description="folder of the fine-tuned weights (default SITE/vib)"
    )
    progress: bool = Field(default=True, description="show progress bars")
    slide: SlideConfig = Field(default_factory=SlideConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)


class FederatedVIBConfig(VIBConfig):
    """VIB as each site runs it in a federation (section [federation.vib], pixel-stage1-objective = "vib").

    Rounds and local epochs come from [federation.rounds] (pixel-stage1, pixel-stage1-local-epochs); the global
    encoder and head are FedAvg'd, the selector and its selection stay at the site, and re-encoding always follows."""

    epochs: PositiveInt = Field(default=3, exclude=True, description="not used: rounds.pixel-stage1-local-epochs")
    reencode: bool = Field(default=True, exclude=True, description="a federated run always re-encodes")
    overwrite: bool = Field(default=False, exclude=True, description="not used by a federated run")
    output: Path | None = Field(default=None, exclude=True, description="not used: the run directory holds it")
    progress: bool = Field(default=False, description="show progress bars in the site's log")

    @model_validator(mode="before")
    @classmethod
    def _flat_lists(cls, data: Any) -> Any:
        """Flower's flat run config carries lists comma-separated (levels, slide.extensions, encoder.mean/std)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = sorted(str(k).replace("_", "-") for k in data if str(k).replace("_", "-") in _FEDERATED_UNUSED)
        if given:
            raise ValueError(
                f"{', '.join(given)}: not used by a federated run; set rounds.pixel-stage1 and "
                "rounds.pixel-stage1-local-epochs instead"
            )
        return split_listed(data, top=("levels",))


_FEDERATED_UNUSED = frozenset({"epochs", "reencode", "overwrite", "output"})
