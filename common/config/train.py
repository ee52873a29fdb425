"""Config of `fedslide train`: supervised MIL training on feature files with cross-validation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from fedslide.common.config.layout import FeatureLayoutConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.optimization import OptimizationConfig
from fedslide.common.config.splits import SplitCarving


class TrainConfig(OptimizationConfig):
    """Where the data is, which model, how it is optimised and how slides are split (TOML section [train])."""

    features_dir: Path = Field(
        examples=["features/efficientnet_lite0/high"],
        description="directory of <slide_id>.h5 feature files, or a CLAM/TRIDENT feature folder (features-layout)",
    )
    features_layout: FeatureLayoutConfig = Field(
        default_factory=FeatureLayoutConfig,
        description="whose folder features-dir is: fedslide's flat folder, CLAM's or TRIDENT's (root: unused)",
    )
    labels: Path = Field(examples=["labels.csv"], description="CSV with columns slide_id,label[,split][,patient_id]")
    out_dir: Path = Field(
        examples=["runs/train"], description="where metrics.json, predictions.csv and model.pt are written"
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="MIL model; in-dim and num-classes are filled from the feature files and labels when unset",
    )

    epochs: PositiveInt = Field(default=50, description="maximum epochs per fold")
    lr: PositiveFloat = Field(
        default=5e-4,
        description="learning rate; 5e-4: lowest inner-CV log-loss averaged over Musk1 and Elephant in nested CV on "
        "the training folds (tests/bench/mil_classic.md); distill and the federation keep 2e-4",
    )
    selection_smoothing: PositiveInt = Field(
        default=5,
        description="select on the mean validation loss/AUC of the last N epochs (the window's last epoch's weights; "
        "shortened when fewer epochs may be selected); 5: lower inner-CV log-loss than 1 at each lr tried, nested CV on "
        "the training folds of Musk1 and Elephant (tests/bench/mil_classic.md)",
    )
    refit: bool = Field(
        default=False,
        description="per fold: inner CV (refit-folds) on its training and validation slides picks the number of "
        "epochs (median of the inner folds' selected epochs); the model is then retrained on all of them for that "
        "many epochs, the temperature fitted on the inner folds' held-out predictions ('val' metrics are those)",
    )
    refit_folds: int = Field(default=5, ge=2, description="inner CV folds of refit")
    batch_size: PositiveInt = Field(default=8, description="bags per training batch (padded, with a mask)")
    eval_batch_size: PositiveInt | None = Field(
        default=None, description="bags per evaluation batch (default: batch-size)"
    )

    splits: Literal["auto", "cv", "given", "carve"] = Field(
        default="auto",
        description="'given': the CSV's split column; 'cv': k-fold; 'auto': given if the CSV has one; 'carve': the "
        "CSV's split column, else one test/val split carved by [train.carve] into splits.csv beside the labels CSV",
    )
    carve: SplitCarving = Field(
        default_factory=SplitCarving, description="splits = 'carve': the split carved when the CSV has no split column"
    )
    cv_folds: int = Field(default=5, ge=2, description="folds of patient-grouped stratified cross-validation")
    repeats: PositiveInt = Field(default=1, description="repetitions (cv: reshuffled folds; given: new seeds)")
    val_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="share of each training fold held out (by patient) for early stopping"
    )
    seed: int = Field(default=0, description="seed of splits, model init, sampling and batch order")

    num_workers: NonNegativeInt = Field(default=0, description="DataLoader worker processes")
    preload: bool = Field(default=True, description="keep all bags in memory (else read each from disk per epoch)")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda[:i], mps")
    deterministic: bool = Field(default=True, description="torch deterministic algorithms (where supported)")
    allow_missing: bool = Field(
        default=False, description="warn (listing the ids) instead of failing on labels without features or vice versa"
    )
    save_fold_checkpoints: bool = Field(
        default=True, description="also keep every fold's best model under checkpoints/"
    )
    standardize: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="per-feature mean/std of the training split's instances, applied to every bag; 'auto': on unless "
        "the feature files name their encoder (encoder_name attribute)",
    )
    standardize_clip: float = Field(
        default=10.0,
        ge=0.0,
        description="clamp standardised features to ±this many training sds (0 = no clamp); a near-constant "
        "training feature with an outlier elsewhere otherwise gives huge inputs and over-confident logits; 10: "
        "lower inner-CV log-loss than no clamp in nested CV on Elephant, a tie on Musk1 (tests/bench/mil_classic.md)",
    )
    calibration: Literal["temperature", "none"] = Field(
        default="temperature",
        description="'temperature': fit T >= 1 on the validation split; metrics report before and after, the "
        "checkpoint stores T",
    )
    ece_bins: PositiveInt = Field(default=15, description="equal-width confidence bins of the ECE")

    @property
    def resolved_eval_batch_size(self) -> int:
        """Bags per evaluation batch."""
        return self.eval_batch_size or self.batch_size
