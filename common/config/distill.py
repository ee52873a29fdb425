"""Config of `fedslide distill`: LRMIL stage 1 (adapter), teacher, D&D clusters/experts, KD student (section [distill])."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from fedslide.common.config.base import StageConfig
from fedslide.common.config.classes import CLASSES_HELP, ClassNames
from fedslide.common.config.model import ModelConfig, ModelName
from fedslide.common.config.optimization import OptimizationConfig
from fedslide.common.config.splits import SplitCarving


class DistillModelConfig(ModelConfig):
    """A MIL model of the distillation pipeline (default gated ABMIL, which trains reliably)."""

    name: ModelName = Field(default="abmil_gated", description="architecture (any zoo model)")


class AdapterConfig(StageConfig):
    """LRMIL stage 1: the low-res -> high-res adapter and how it is trained."""

    hidden_dim: PositiveInt = Field(default=512, description="width of the adapter's residual MLP")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout inside the adapter MLP")
    loss: Literal["mse", "cosine", "mse+cosine"] = Field(
        default="mse+cosine", description="regression loss of predicted vs. high-res child embeddings"
    )
    cosine_weight: float = Field(default=1.0, ge=0.0, description="weight of (1 - cosine) in 'mse+cosine'")
    epochs: PositiveInt = Field(default=30, description="maximum epochs over the training slides' low patches")
    patience: NonNegativeInt = Field(
        default=5, description="stop after this many epochs without val improvement (0 = never)"
    )
    batch_size: PositiveInt = Field(default=256, description="low-res patches (each with its children) per step")
    lr: PositiveFloat = Field(default=1e-3, description="AdamW learning rate")
    weight_decay: float = Field(default=1e-4, ge=0.0, description="AdamW weight decay")
    max_patches_per_slide: PositiveInt | None = Field(
        default=None,
        examples=[512],
        description="use at most this many low patches per slide (seeded sample; memory cap)",
    )


class MILTrainingConfig(OptimizationConfig):
    """How the teacher, the experts and the students are optimised and selected (shared)."""

    epochs: PositiveInt = Field(default=50, description="maximum epochs (teacher, experts, students unless set below)")
    teacher_epochs: PositiveInt | None = Field(default=None, description="teacher's maximum epochs (default: epochs)")
    expert_epochs: PositiveInt | None = Field(
        default=None, description="each expert's maximum epochs (default: epochs)"
    )
    student_epochs: PositiveInt | None = Field(default=None, description="students' maximum epochs (default: epochs)")
    batch_size: PositiveInt = Field(default=4, description="bags per training batch")
    eval_batch_size: PositiveInt = Field(default=4, description="bags per evaluation batch")


class ClusterConfig(StageConfig):
    """D&D 'divide': size-constrained k-means of the training slides."""

    num_clusters: int = Field(default=3, ge=1, description="clusters C = number of experts")
    features: Literal["embedding", "logits"] = Field(
        default="embedding", description="cluster teacher slide embeddings (paper) or teacher logits (reference code)"
    )
    min_size_ratio: float = Field(
        default=0.5, ge=0.0, le=1.0, description="smallest cluster >= floor(ratio * n / C) slides"
    )
    max_size_ratio: float = Field(default=1.5, ge=1.0, description="largest cluster <= ceil(ratio * n / C) slides")
    min_size: PositiveInt = Field(default=2, description="absolute floor on every cluster's size")
    iterations: PositiveInt = Field(default=20, description="constrained Lloyd iterations after the k-means init")
    n_init: PositiveInt = Field(default=10, description="k-means restarts of the initialisation")
    suppress_below: NonNegativeInt = Field(
        default=2, description="cluster statistics with fewer slides are zeroed (what a site may share)"
    )


class ExpertConfig(StageConfig):
    """D&D experts: one MIL model (the teacher's architecture) per cluster."""

    init: Literal["teacher", "scratch"] = Field(
        default="teacher", description="start from the teacher's weights or afresh"
    )


class KDConfig(StageConfig):
    """Slide-level distillation into the low-res student."""

    student_input: Literal["tokens", "pooled", "raw"] = Field(
        default="tokens",
        description="student instances: 16 adapted tokens per low patch, their mean per patch, or raw low features",
    )
    temperature: PositiveFloat = Field(default=2.0, description="softmax temperature T (KL terms scaled by T²)")
    lambda_base: float = Field(default=1.0, ge=0.0, description="weight of KL(teacher ‖ student); 0 turns it off")
    lambda_expert: float = Field(default=1.0, ge=0.0, description="weight of the experts' KL; 0 turns it off")
    expert_kd: Literal["all", "own"] = Field(
        default="all",
        description="'all': (λ/C)·Σ_c KL(expert_c ‖ student); 'own': λ·KL(expert of the slide's cluster ‖ student)",
    )
    # Attention KD and the instance loss follow LRMIL's reference code (github hvcl/LRMIL, utils/losses.py
    # attention_kl_loss / hard_topk_instance_loss, utils/trainer.py train_stage2_student): its argument defaults
    # give T = 1 (attention_kl_loss), k = 4 (hard_topk_instance_loss) and mean over the children
    # (build_teacher_guided_attention); its weights (lambda_soft, lambda_hard) have no default there, so they are
    # 1.0 like the logit term's. Both are off by default until the ablation (issue 31) has measured them.
    lambda_attention: float = Field(
        default=0.0,
        ge=0.0,
        description="weight of KL(teacher-guided attention ‖ student attention) over the student's instances; 0 turns "
        "it off (needs an attention student and teacher; LRMIL: 1)",
    )
    attention_temperature: PositiveFloat = Field(
        default=1.0, description="temperature of the attention KL (scaled by T²)"
    )
    attention_agg: Literal["mean", "max"] = Field(
        default="mean",
        description="teacher attention of a 5x patch (pooled/raw instances): mean or max of its 20x children's "
        "attention logits (token instances take their own child's)",
    )
    lambda_instance: float = Field(
        default=0.0,
        ge=0.0,
        description="weight of the top-k/bottom-k instance loss (instance head on the student's instances picked "
        "by the teacher-guided attention); 0 turns it off (LRMIL: 1)",
    )
    instance_k: PositiveInt = Field(
        default=4, description="top-k and bottom-k instances per bag (at most half the bag's instances)"
    )
    instance_features: Literal["embedding", "input"] = Field(
        default="embedding",
        description="what the instance head reads: the student's instance embeddings (gradient reaches the student) "
        "or its input instances (the reference code's choice: with fixed features it trains only the head)",
    )
    student_init: Literal["auto", "teacher", "scratch"] = Field(
        default="auto",
        description="KD students start from the teacher's weights ('teacher': adapted tokens live in the teacher's "
        "input space; needs the same architecture), afresh ('scratch'), or 'auto': the teacher's when the "
        "architectures match",
    )


class DistillConfig(StageConfig):
    """`fedslide distill` (TOML section [distill])."""

    sites: list[Path] = Field(default_factory=list, description="site directories (labels.csv + features/<encoder>/)")
    out_dir: Path | None = Field(
        default=None, examples=["runs/distill"], description="run directory (metrics.json, bundles, cache)"
    )
    encoder: str | None = Field(
        default=None,
        examples=["efficientnet_lite0"],
        description="features/<encoder> subfolder (default: the only one present)",
    )
    low_features: str | None = Field(
        default=None,
        examples=["efficientnet_lite0-ft-0123456789ab"],
        description="features/<name>/low subfolder of the 5x files, e.g. the fine-tuned encoder's "
        "<encoder>-ft-<hash12> from `fedslide finetune` (default: the encoder's own)",
    )
    seed: int = Field(default=0, description="seed of every model init, sample and batch order")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda[:i], mps")
    deterministic: bool = Field(default=True, description="torch deterministic algorithms (where supported)")
    threads: PositiveInt | None = Field(
        default=None, examples=[2], description="torch CPU threads (default: torch's choice)"
    )
    ece_bins: PositiveInt = Field(default=15, description="equal-width confidence bins of the ECE")
    classes: ClassNames = Field(default=None, examples=[["benign", "carcinoma", "normal"]], description=CLASSES_HELP)
    progress: bool = Field(default=False, description="show progress bars")
    carve: SplitCarving = Field(
        default_factory=SplitCarving,
        description="test/validation splits carved for a site whose labels.csv has no split column",
    )
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    teacher: DistillModelConfig = Field(
        default_factory=DistillModelConfig, description="high-res teacher (and experts') MIL model"
    )
    student: DistillModelConfig = Field(
        default_factory=DistillModelConfig, description="low-res student (and baseline) MIL model"
    )
    training: MILTrainingConfig = Field(default_factory=MILTrainingConfig)
    clusters: ClusterConfig = Field(default_factory=ClusterConfig)
    experts: ExpertConfig = Field(default_factory=ExpertConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
