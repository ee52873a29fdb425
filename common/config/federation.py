"""Config of a federated run (the ServerApp's and ClientApps' shared run config, section [federation]).

In a Flower deployment the same settings come from `pyproject.toml`'s `[tool.flwr.app.config]`
(flattened, kebab-case keys, `teacher.name`-style for the nested tables) and `flwr run -c`
overrides; `FederationConfig.from_run_config` reads that form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fedslide.common.config.base import ConfigError, StageConfig, format_validation_error
from fedslide.common.config.classes import CLASSES_HELP, ClassNames
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.config.distill import (
    AdapterConfig,
    ClusterConfig,
    DistillModelConfig,
    ExpertConfig,
    KDConfig,
    MILTrainingConfig,
)
from fedslide.common.config.finetune import FederatedFinetuneConfig
from fedslide.common.config.vib import FederatedVIBConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.splits import SplitCarving


_ROUNDS_HINT = (
    "a federated phase trains rounds.<phase> x rounds.local-epochs local epochs (rounds.adapter x "
    "rounds.adapter-local-epochs for the adapter, rounds.clinical x rounds.clinical-local-epochs for BD) and keeps the round with the lowest validation loss; set those instead"
)


def _refuse_unused(data: Any, unused: frozenset[str], hint: str) -> Any:
    """Refuse keys a federated run would silently ignore, naming them and what to set instead."""
    if isinstance(data, dict):
        given = sorted(str(k).replace("_", "-") for k in data if str(k).replace("_", "-") in unused)
        if given:
            raise PydanticCustomError(
                "not_used", "{keys}: not used by a federated run; {hint}", {"keys": ", ".join(given), "hint": hint}
            )
    return data


_TRAINING_UNUSED = frozenset({"epochs", "teacher-epochs", "expert-epochs", "student-epochs"})


def _unused(default: Any) -> Any:
    return Field(default=default, exclude=True, description="not used by a federated run (refused)")


class FederatedTrainingConfig(MILTrainingConfig):
    """Local training of every federated MIL model (the centralized defaults but a constant lr).

    Epoch counts are not set here: rounds and local epochs come from [federation.rounds], and each model keeps
    its best round by validation loss. Early stopping applies to logits mode's server-side student only."""

    scheduler: Literal["cosine", "step", "none"] = Field(
        default="none",
        description="per-epoch LR schedule; a curve spans each phase's rounds x local epochs (round r's local "
        "epochs continue it); constant by default",
    )
    epochs: PositiveInt = _unused(50)
    teacher_epochs: PositiveInt | None = _unused(None)
    expert_epochs: PositiveInt | None = _unused(None)
    student_epochs: PositiveInt | None = _unused(None)
    early_stopping_patience: NonNegativeInt = Field(
        default=10,
        description="logits mode: the server-side student stops after this many epochs without validation "
        "improvement (0 = never); federated phases keep their best round instead",
    )
    early_stopping_metric: Literal["loss", "auc"] = Field(
        default="loss", description="logits mode: validation quantity that picks the server-side student's epoch"
    )
    min_epochs: NonNegativeInt = Field(
        default=0, description="logits mode: epochs the server-side student always runs before it may stop"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_epoch_keys(cls, data: Any) -> Any:
        return _refuse_unused(
            data, _TRAINING_UNUSED, _ROUNDS_HINT + " (proxy-epochs for logits mode's server-side student)"
        )

    def _min_epochs_fit(self) -> "FederatedTrainingConfig":  # type: ignore[override]  # shadows the parent's validator
        return self  # `epochs` is hidden here: FederationConfig checks min-epochs against proxy-epochs


class FederatedAdapterConfig(AdapterConfig):
    """The cross-resolution adapter as each site trains it (its epochs come from [federation.rounds])."""

    batch_size: PositiveInt = Field(
        default=32,
        description="patch pairs per local step; smaller than the centralized 256 because a site holds a fraction "
        "of the pairs (why 32: docs/federation.md)",
    )
    epochs: PositiveInt = _unused(30)
    patience: NonNegativeInt = _unused(5)

    @model_validator(mode="before")
    @classmethod
    def _no_epoch_keys(cls, data: Any) -> Any:
        return _refuse_unused(data, frozenset({"epochs", "patience"}), _ROUNDS_HINT)


class FederatedClinicalConfig(ClinicalConfig):
    """The clinical (BD) phase of a federated run (section [federation.clinical]): the clinical.csv schema every
    site reads its table against and the BD model; its local epochs come from rounds.clinical-local-epochs.

    Flower's run config holds scalars: `variables` travels as one JSON string, `missing-tokens` comma-separated."""

    enabled: bool = Field(
        default=False,
        description="federated BD phase after the student: each site sends its training slides' clinical sums at "
        "the handshake (withheld below suppress-below slides), trains the BD model on its student instances for "
        "rounds.clinical FedAvg rounds, and every site's bundle carries it (clinical.pt)",
    )
    epochs: PositiveInt = _unused(30)

    @model_validator(mode="before")
    @classmethod
    def _from_run_config(cls, data: Any) -> Any:
        data = _refuse_unused(data, frozenset({"epochs"}), _ROUNDS_HINT)
        if isinstance(data, dict):
            data = dict(data)
            for key in ("variables",):
                if isinstance(data.get(key), str):
                    try:
                        data[key] = json.loads(data[key])
                    except json.JSONDecodeError as exc:
                        raise PydanticCustomError(
                            "json", "variables: not a JSON list of columns ({error})", {"error": str(exc)}
                        ) from None
            for key in ("missing-tokens", "missing_tokens"):
                if isinstance(data.get(key), str):
                    data[key] = data[key].split(",")
        return data


class RoundsConfig(StageConfig):
    """Federated rounds per phase and local epochs per round."""

    adapter: PositiveInt = Field(default=3, description="FedAvg rounds of the cross-resolution adapter")
    teacher: PositiveInt = Field(default=8, description="rounds of the high-res teacher")
    experts: PositiveInt = Field(default=3, description="rounds of the D&D experts (all C experts per message)")
    baseline: PositiveInt = Field(
        default=8,
        description="rounds of the low-res baseline (raw features, CE only); it trains in the teacher phase's messages",
    )
    student: PositiveInt = Field(default=8, description="rounds of the low-res student (weights mode)")
    cluster_iterations: PositiveInt = Field(default=5, description="federated k-means iterations (one round trip each)")
    local_epochs: PositiveInt = Field(
        default=2, description="local epochs per round (teacher, experts, baseline, student)"
    )
    adapter_local_epochs: PositiveInt = Field(
        default=10, description="local epochs per adapter round (3 rounds x 10 = the centralized adapter's 30 epochs)"
    )
    pixel_stage1: PositiveInt = Field(
        default=3, description="FedAvg rounds of the 5x encoder's trainable parameters (with pixel-stage1 = true)"
    )
    pixel_stage1_local_epochs: PositiveInt = Field(
        default=1, description="passes over the site's sampled 5x patches per pixel-stage1 round"
    )
    clinical: PositiveInt = Field(default=5, description="FedAvg rounds of the BD model (with clinical.enabled)")
    clinical_local_epochs: PositiveInt = Field(
        default=6, description="local epochs per BD round (5 rounds x 6 = the centralized BD stage's 30 epochs)"
    )


class FederationConfig(StageConfig):
    """A federated teacher -> experts -> low-res student run (TOML section [federation])."""

    run_id: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$", description="run name (default: made from the time)")
    runs_dir: Path | None = Field(default=None, description="coordinating site's output root: <runs-dir>/<run-id>/")
    resume: bool = Field(default=False, description="continue run-id from its last checkpoint")
    mode: Literal["weights", "logits"] = Field(
        default="weights",
        description="student distillation: local KD + FedAvg of weights, or server-side KD from logits on a proxy cohort",
    )
    proxy_dir: Path | None = Field(
        default=None, description="logits mode: the coordinating site's proxy cohort (a site directory)"
    )
    strategy: Literal["fedavg", "fedprox"] = Field(default="fedavg", description="teacher/expert/student aggregation")
    proximal_mu: float = Field(default=0.01, ge=0.0, description="FedProx proximal term weight")
    student_server_momentum: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description="student phase (weights mode): Flower FedAvgM server momentum on the averaged update, 0 = plain "
        "FedAvg; not with robust aggregation or DP, which keep their own update",
    )
    min_nodes: PositiveInt = Field(default=2, description="a round needs replies from at least this many sites")
    expected_nodes: NonNegativeInt = Field(
        default=0, description="wait (up to 2 min) for this many connected sites before the handshake (0 = min-nodes)"
    )
    aggregation: Literal["mean", "median", "trimmed-mean"] = Field(
        default="mean",
        description="aggregation of every weights phase (adapter, teacher/baseline, experts, student) and of logits "
        "mode's logits: mean weighted by the handshake's training slides (strategy), or robust coordinate-wise median "
        "/ trimmed mean, which also pick each model's best round by the median of the sites' validation losses",
    )
    trim_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=0.5,
        description="trimmed-mean: fraction cut at each end, at least one site per end (refused with fewer than "
        "3 sites)",
    )
    max_update_norm: PositiveFloat | None = Field(
        default=None, description="reject updates with a larger L2 norm (off when unset)"
    )
    update_norm_factor: PositiveFloat | None = Field(
        default=10.0, description="reject updates whose norm exceeds this × the round's median (with ≥ 3 sites)"
    )
    round_timeout: PositiveFloat = Field(default=900.0, description="seconds to wait for the replies of one round")
    encoder: str | None = Field(default=None, description="features/<encoder> subfolder every site must use")
    eval_only_sites: list[str] = Field(
        default_factory=list,
        description="sites (by name) that train nothing: they receive the final models and report metrics on all their slides",
    )
    seed: int = Field(default=0, description="seed of every init, sample and batch order")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda[:i], mps")
    threads: PositiveInt | None = Field(default=None, description="torch CPU threads per process")
    ece_bins: PositiveInt = Field(default=15, description="equal-width confidence bins of the ECE")
    classes: ClassNames = Field(default=None, examples=[["benign", "carcinoma", "normal"]], description=CLASSES_HELP)
    carve: SplitCarving = Field(
        default_factory=SplitCarving,
        description="test/validation splits each site carves (at the site) when its labels.csv has no split column",
    )
    pixel_stage1: bool = Field(
        default=False,
        description="federated LRMIL stage 1 on pixels before every other phase: each site fine-tunes the trainable "
        "part of a 5x copy of its encoder (finetune.*), the server averages it, and the sites re-encode their 5x "
        "features with the global encoder (features/<encoder>-ft-<hash12>/low), which every later phase reads",
    )
    pixel_stage1_objective: Literal["lrmil", "vib"] = Field(
        default="lrmil",
        description="what pixel stage 1 trains: lrmil (the 5x copy against the 20x encoder, finetune.*) or vib (the "
        "20x encoder through each site's information-bottleneck selection of instances, vib.*; the encoder and its "
        "fine-tuning head are averaged, the sites re-encode both levels into features/<encoder>-vib-<hash12>)",
    )
    standardize: bool = Field(
        default=False,
        description="federated input standardisation: each site sends its training bags' 20x feature sums, sums "
        "of squares and counts (withheld below suppress-below slides), the server pools them into one per-feature "
        "mean/sd, and the teacher, experts and adapted student read standardised instances (stored in the bundle)",
    )
    ood_stats: bool = Field(
        default=False,
        description="out-of-distribution statistics for the bundle (opt-in: exact sums, no DP noise): each site sends "
        "the per-feature sums, sums of squares and count of its training slides' mean 5x features (withheld below "
        "suppress-below slides; skipped with pixel-stage1's lrmil objective, refused with vib), the server pools them, and each site's bundle scores slides against them with a flag "
        "threshold set on its own validation slides (none at an evaluation-only site)",
    )
    calibrate: bool = Field(
        default=False,
        description="temperature scaling of the final teacher and student: each site sends its val slides' summed "
        "NLL over a fixed temperature grid (scalars only; none below suppress-below val slides), the server picks "
        "the temperature of the least pooled NLL, and the sites' bundles carry it",
    )
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    clinical: FederatedClinicalConfig = Field(
        default_factory=FederatedClinicalConfig,
        description="clinical data with a missing modality: the bidirectional-distillation phase (off by default)",
    )
    finetune: FederatedFinetuneConfig = Field(
        default_factory=FederatedFinetuneConfig, description="pixel stage 1's local step at each site"
    )
    vib: FederatedVIBConfig = Field(
        default_factory=FederatedVIBConfig, description="pixel stage 1's local step with pixel-stage1-objective = vib"
    )
    adapter: FederatedAdapterConfig = Field(default_factory=FederatedAdapterConfig)
    teacher: DistillModelConfig = Field(
        default_factory=DistillModelConfig, description="teacher (and experts') MIL model"
    )
    student: DistillModelConfig = Field(
        default_factory=DistillModelConfig, description="student (and baseline) MIL model"
    )
    training: FederatedTrainingConfig = Field(
        default_factory=FederatedTrainingConfig, description="local training of every MIL model"
    )
    clusters: ClusterConfig = Field(default_factory=ClusterConfig)
    experts: ExpertConfig = Field(default_factory=ExpertConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    dp_noise_multiplier: float = Field(
        default=0.0, ge=0.0, description="central DP of every weights phase: Gaussian noise σ / clipping norm (0 = off)"
    )
    dp_clipping_norm: PositiveFloat = Field(
        default=1.0, description="DP: each site's update is clipped to this L2 norm"
    )
    dp_delta: float = Field(default=1e-5, gt=0.0, lt=1.0, description="DP: δ at which ε is reported")
    dp_max_epsilon: PositiveFloat | None = Field(
        default=None, description="DP: stop before a release would exceed this ε"
    )
    local_dp_noise_multiplier: float = Field(
        default=0.0,
        ge=0.0,
        description="site-side DP of every weights phase: each site clips its update to local-dp-clipping-norm and adds "
        "Gaussian noise of this × the clip before it leaves, so ε holds against the coordinator too (0 = off)",
    )
    local_dp_clipping_norm: PositiveFloat = Field(
        default=1.0, description="site-side DP: each site clips its update (reply − global model) to this L2 norm"
    )
    cluster_noise_std: float = Field(
        default=0.0, ge=0.0, description="Gaussian noise a site adds to its cluster sums before sending (0 = none)"
    )
    cluster_clip_norm: PositiveFloat | None = Field(
        default=None,
        description="each slide's clustering vector is clipped to this L2 norm before a site sums it, so "
        "cluster-noise-std bounds what two releases' difference tells about one slide (unset = no clipping)",
    )
    proxy_epochs: PositiveInt = Field(
        default=30, description="logits mode: server-side student epochs on the proxy cohort"
    )
    suppress_below: NonNegativeInt | None = Field(
        default=None, description="cluster statistics of fewer slides are withheld (default: clusters.suppress-below)"
    )

    @field_validator("eval_only_sites", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _logits_needs_proxy(self) -> "FederationConfig":
        if self.mode == "logits" and self.proxy_dir is None:
            raise ValueError("mode = 'logits' needs proxy-dir (the coordinating site's proxy cohort)")
        if self.mode == "logits" and (self.dp_noise_multiplier > 0 or self.local_dp_noise_multiplier > 0):
            key = "dp-noise-multiplier" if self.dp_noise_multiplier > 0 else "local-dp-noise-multiplier"
            raise ValueError(
                f"{key} > 0 with mode = 'logits': logits mode sends un-noised logits, so no ε would "
                "hold; use mode = 'weights' for DP"
            )
        return self

    @model_validator(mode="after")
    def _vib_handshake_stats(self) -> "FederationConfig":
        # the handshake's statistics come from the frozen features; VIB re-encodes both levels before they are read
        if self.pixel_stage1 and self.pixel_stage1_objective == "vib":
            for key, on in (("standardize", self.standardize), ("ood-stats", self.ood_stats)):
                if on:
                    raise ValueError(
                        f"{key} = true with pixel-stage1-objective = 'vib': the handshake computes its statistics "
                        "from the frozen encoder's features, but VIB re-encodes both levels that every later phase "
                        f"reads; set {key} = false or pixel-stage1-objective = 'lrmil'"
                    )
        return self

    @model_validator(mode="after")
    def _min_epochs_fit(self) -> "FederationConfig":
        if self.training.min_epochs > self.proxy_epochs:
            raise ValueError(
                f"training.min-epochs ({self.training.min_epochs}) exceeds proxy-epochs ({self.proxy_epochs}), "
                "the logits-mode student's epochs"
            )
        return self

    @property
    def min_count(self) -> int:
        """Smallest cluster count a site may report."""
        return self.clusters.suppress_below if self.suppress_below is None else self.suppress_below

    def to_run_config(self, unset: str | None = None) -> dict[str, Any]:
        """Flat kebab-case run config (`teacher.name` keys) for `flwr run`; unset values are left out, or given as
        `unset` (the app's declared defaults: "")."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for key, value in node.items():
                name = f"{prefix}{key}"
                if isinstance(value, dict):
                    walk(f"{name}.", value)
                elif isinstance(value, list) and any(isinstance(v, dict) for v in value):  # tables: one JSON string
                    flat[name] = json.dumps(value, separators=(",", ":"))
                elif isinstance(value, list):  # Flower's run config holds scalars: lists travel comma-separated
                    flat[name] = ",".join(str(v) for v in value)
                elif value is not None:
                    flat[name] = value
                elif unset is not None:
                    flat[name] = unset

        walk("", self.to_toml_dict())
        for model in ("teacher", "student"):
            cfg = getattr(self, model)
            for key in ("in_dim", "num_classes"):  # taken from the data unless set on purpose
                if key not in cfg.model_fields_set:
                    flat.pop(f"{model}.{key.replace('_', '-')}", None)
            # an architecture's options travel when set on purpose (else its defaults apply); the app declares every
            # architecture's keys, so `flwr run -c teacher.name=transmil -c teacher.layers=4` can set any of them
            for key in ModelConfig.option_keys():
                if key.replace("-", "_") not in cfg.options.model_fields_set:
                    flat.pop(f"{model}.{key}", None)
                    if unset is not None:
                        flat[f"{model}.{key}"] = unset
        return flat

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "FederationConfig":
        """Build from Flower's flat run config; empty strings mean "unset"; errors name key and value."""
        data: dict[str, Any] = {}
        for key, value in run_config.items():
            if value == "":
                continue
            node = data
            parts = str(key).split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, source="run config")) from None
