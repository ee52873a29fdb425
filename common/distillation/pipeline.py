"""`fedslide distill`, centralised: adapter (LRMIL stage 1) -> teacher -> clusters + experts (D&D) -> students.

One function per stage (`adapter_stage`, `teacher_stage`, `experts_stage`, `students_stage`,
`evaluation_stage`, `save_bundles`); what they share with the federated site steps is in
`common.distillation.stages`, and their seeds are `common.seeds.SEED_OFFSETS`.

Writes to the run directory:
- `metrics.json` (schema `fedslide.distill.metrics/1`): `rows` (one per model: teacher_high,
  baseline_low, lrmil_student, lrmil_dd_student, with test auc, acc, balanced_acc, f1, brier, ece,
  loss, n), `models` (val and test metrics, best epoch, epochs run, instances per slide, and the
  temperature fitted on the val slides that the model's bundle applies; the metrics are before it),
  `adapter` (stage-1 val loss / mse / cosine, and the unadapted cosine for reference),
  `clusters` (sizes, bounds, class counts), `experts`, `cache` (hits/misses), `config`,
  `classes`, `encoder`, `slides` (counts per split and site), `timings` (seconds per stage).
- bundles (common.distillation.bundle): `student/` (LRMIL + D&D student), `lrmil_student/`,
  `baseline_low/`, each with the teacher inside.
- `cache/logits.pt`: teacher/expert logits of the training slides.
- with `[clinical] enabled = true`: a BD model on the student's instances and the sites' clinical tables
  (`common.distillation.clinical_stage`) inside `student/`, its test metrics under `clinical` and as rows
  bd_clinical (clinical data as recorded) and bd_no_clinical (removed).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslide.common.config.base import ConfigError
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.config.distill import DistillConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.distillation.adapter import AdapterSpec, CrossResAdapter, build_adapter
from fedslide.common.distillation.bundle import (
    BundleMeta,
    StudentBundle,
    find_encoder_weights,
    find_low_encoder_weights,
)
from fedslide.common.distillation.clinical_model import ClinicalModel
from fedslide.common.distillation.clinical_stage import check_training_rows, clinical_stage, cohort_clinical
from fedslide.common.distillation.cache import CACHE_FILE, LogitCache, files_signature, model_fingerprint
from fedslide.common.distillation.clustering import ClusterResult, assign_nearest, balanced_kmeans, size_bounds
from fedslide.common.distillation.crossres import AdapterFit, fit_adapter
from fedslide.common.distillation.data import DistillData, load_sites
from fedslide.common.distillation.experts import Expert, train_experts
from fedslide.common.distillation.losses import CachedKDLoss
from fedslide.common.distillation.mil import evaluate_split, per_class_split, slide_outputs, train_selected, with_epochs
from fedslide.common.distillation.ood import fit_ood
from fedslide.common.distillation.stages import (
    adapter_pairs,
    attention_targets,
    attention_terms_on,
    cluster_vectors,
    instance_head,
    kd_loss,
    scatter_kd_targets,
    student_input,
    teacher_attention,
)
from fedslide.common.distillation.student import attention_kd_width, starts_from_teacher, student_bags
from fedslide.common.distillation.split_predictions import (
    TEST_PREDICTIONS_FILE,
    test_prediction_rows,
    write_test_predictions,
)
from fedslide.common.device import resolve_device
from fedslide.common.features import TILING_ATTR, TISSUE_ATTR, recorded_preprocess, shared_stain_identity
from fedslide.common.metrics import METRIC_NAMES
from fedslide.common.models.base import MILModel
from fedslide.common.models.registry import build_model
from fedslide.common.seeds import SEED_OFFSETS
from fedslide.common.training.calibration import fit_temperature
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.data import Indices
from fedslide.common.training.loop import class_weights
from fedslide.common.training.outputs import write_json
from fedslide.common.training.repro import deterministic_torch, seed_everything
from fedslide.common.training.run import resolve_model_config
from fedslide.common.training.scaling import ModelScaling

log = logging.getLogger(__name__)

METRICS_SCHEMA = "fedslide.distill.metrics/1"
MODEL_ROWS = ("teacher_high", "baseline_low", "lrmil_student", "lrmil_dd_student")
BUNDLE_DIRS = {"lrmil_dd_student": "student", "lrmil_student": "lrmil_student", "baseline_low": "baseline_low"}


@dataclass
class DistillReport:
    """What a run produced (all of it is also on disk under out_dir)."""

    out_dir: Path
    metrics: dict[str, Any]
    bundles: dict[str, Path] = field(default_factory=dict)


def train_stage1(
    data: DistillData, cfg: DistillConfig, device: torch.device, use_tokens: bool
) -> tuple[CrossResAdapter, AdapterFit, dict[str, int]]:
    """Train the cross-resolution adapter on the training slides' patches, selected on the val slides'."""
    a = cfg.adapter
    val_idx = data.split("val")
    train_pairs = adapter_pairs(data, data.split("train"), a, cfg.seed, use_tokens)
    val_pairs = adapter_pairs(data, val_idx, a, cfg.seed, use_tokens) if len(val_idx) else None
    seed = cfg.seed + SEED_OFFSETS.adapter
    seed_everything(seed)
    spec = AdapterSpec(
        in_dim=data.feature_dim,
        out_dim=data.feature_dim,
        hidden_dim=a.hidden_dim,
        num_slots=max(data.token_grid**2, 1),
        dropout=a.dropout,
    )
    adapter = build_adapter(spec)
    result = fit_adapter(adapter, train_pairs, val_pairs, a, seed, device)
    adapter.cpu().eval()
    counts = {"train_patches": len(train_pairs), "val_patches": len(val_pairs) if val_pairs is not None else 0}
    return adapter, result, counts


def _factory(model_cfg: ModelConfig) -> Callable[[], MILModel]:
    return lambda: build_model(model_cfg)


def _metrics_row(name: str, source: str, metrics: dict[str, float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "input": source, "split": "test"}
    for key in (*METRIC_NAMES, "loss", "n"):
        row[key] = None if metrics is None else metrics.get(key)
    return row


def _recorded_by_site(data: DistillData) -> dict[str, Any]:
    """Each site's recorded tissue/tiling settings ({"tissue", "tiling"}; None: not recorded or mixed)."""
    texts: dict[str, set[tuple[Any, Any]]] = {}
    for s in data.slides:
        texts.setdefault(s.site, set()).add((s.low.attrs.get(TISSUE_ATTR), s.low.attrs.get(TILING_ATTR)))
    out: dict[str, Any] = {}
    for site, found in texts.items():
        attrs = (
            {k: v for k, v in zip((TISSUE_ATTR, TILING_ATTR), found.pop()) if v is not None} if len(found) == 1 else {}
        )
        recorded = recorded_preprocess(attrs)
        out[site] = None if recorded is None else {"tissue": recorded[0], "tiling": recorded[1]}
    return out


def cohort_stain_identity(data: DistillData) -> dict[str, Any]:
    """The stain normalisation every low- and high-res feature file of the cohort records; refuses a mix."""
    return shared_stain_identity(
        [(s.low.path, s.low.attrs) for s in data.slides] + [(s.high.path, s.high.attrs) for s in data.slides]
    )


def bundle_meta(
    data: DistillData, student_input: str, preprocess: PreprocessConfig | None, extra: dict[str, Any]
) -> BundleMeta:
    """The bundle's provenance. Tissue and tiling are those the feature files record (the settings the sites
    preprocessed with, which inference must repeat); `preprocess` (default: the defaults) stands in only where
    the files record none or the sites' records differ, and then each site's record is kept under
    `extra["preprocess-by-site"]`."""
    low, high = data.low_attrs, data.high_attrs
    recorded = recorded_preprocess(low)
    if recorded is None:
        by_site = _recorded_by_site(data)
        fallback = preprocess or PreprocessConfig()
        log.warning(
            "the feature files record no one tissue/tiling setting (%s); the bundle records the [preprocess] "
            "config's (min-tissue-low %s, min-tissue-high %s), which prediction will use. `fedslide preprocess "
            "--overwrite` with one config at every site records them",
            ", ".join(f"{k}: {'own record' if v else 'none or mixed'}" for k, v in sorted(by_site.items())),
            fallback.tiling.min_tissue_low,
            fallback.tiling.min_tissue_high,
        )
        if any(by_site.values()):
            extra = {**extra, "preprocess-by-site": by_site}
        tissue, tiling = fallback.tissue.to_toml_dict(), fallback.tiling.to_toml_dict()
    else:
        tissue, tiling = recorded
    tiling = dict(tiling)
    tiling.update(
        {
            "low-mpp": float(low.get("target_mpp", tiling["low-mpp"])),
            "high-mpp": float(high.get("target_mpp", tiling["high-mpp"])),
            "low-patch-size": int(low.get("patch_size", tiling["low-patch-size"])),
            "high-patch-size": int(high.get("patch_size", tiling["high-patch-size"])),
        }
    )
    stain = cohort_stain_identity(data)
    base = high if high.get("encoder_weights_hash") else low  # the high-res (frozen) encoder; low may be fine-tuned
    low_hash = str(low.get("encoder_weights_hash") or "")
    low_finetuned = bool(low_hash) and low_hash != str(base.get("encoder_weights_hash", ""))
    return BundleMeta(
        encoder_name=str(base.get("encoder_name") or data.encoder),
        encoder_weights_hash=str(base.get("encoder_weights_hash", "")),
        encoder_dim=int(base.get("encoder_dim") or data.feature_dim),
        encoder_fingerprint=str(base["encoder_fingerprint"]) if base.get("encoder_fingerprint") else None,
        low_encoder_weights_hash=low_hash if low_finetuned else None,
        low_encoder_fingerprint=str(low.get("encoder_fingerprint") or "") or None if low_finetuned else None,
        low_mpp=tiling["low-mpp"],
        low_patch_size=tiling["low-patch-size"],
        high_mpp=tiling["high-mpp"],
        high_patch_size=tiling["high-patch-size"],
        child_grid=data.child_grid,
        token_grid=data.token_grid,
        student_input=student_input,
        class_names=list(data.classes),
        tissue=dict(tissue),
        tiling=tiling,
        extra=extra,
        stain_normalization=stain,
    )


def _cluster_vectors(
    cfg: DistillConfig,
    cache: LogitCache,
    teacher: MILModel,
    fingerprint: str,
    high: Cohort,
    train: np.ndarray,
    keys: list[str],
    signature: str,
    device: torch.device,
) -> tuple[torch.Tensor, np.ndarray]:
    """(teacher logits of the training slides, the vectors to cluster), both through the cache."""
    computed: dict[str, torch.Tensor] = {}

    def outputs(part: str) -> torch.Tensor:
        if not computed:  # one forward pass gives both
            computed["logits"], computed["embedding"] = slide_outputs(teacher, high, train, device)
        return computed[part]

    logits = cache.get_or_compute("teacher", fingerprint, keys, lambda: outputs("logits"), signature)
    if cfg.clusters.features == "logits":
        return logits, cluster_vectors(cfg.clusters.features, logits, logits)
    embedding = cache.get_or_compute("teacher_embedding", fingerprint, keys, lambda: outputs("embedding"), signature)
    return logits, cluster_vectors(cfg.clusters.features, logits, embedding)


class Laps:
    """Seconds spent per stage (`timings` of metrics.json)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = self.clock = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the last lap as stage `name`."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 3)
        self.clock = now

    def total(self) -> None:
        """Record the whole run's time."""
        self.timings["total"] = round(time.perf_counter() - self.start, 3)


@dataclass
class DistillRun:
    """What every stage of one run reads: the settings, the slides and their splits."""

    cfg: DistillConfig
    data: DistillData
    out_dir: Path
    mode: str  # the student's input as it can run (see stages.student_input)
    device: torch.device
    show: bool
    teacher_cfg: ModelConfig
    student_cfg: ModelConfig
    from_teacher: bool
    laps: Laps
    instance_width: int | None = None  # input width of the instance loss's head (None: no instance loss)

    @property
    def train(self) -> np.ndarray:
        return self.data.split("train")

    @property
    def val(self) -> np.ndarray:
        return self.data.split("val")

    @property
    def test(self) -> np.ndarray:
        return self.data.split("test")


@dataclass
class TrainedModel:
    """A trained model, its fit, the cohort it reads and how that input is described."""

    model: MILModel
    fit: Any
    cohort: Cohort
    source: str


@dataclass
class ExpertStage:
    """Teacher logits of the training slides and, with experts, the clusters, the experts and their logits."""

    teacher_logits: torch.Tensor
    info: dict[str, Any]
    clusters: ClusterResult | None = None
    experts: list[Expert] = field(default_factory=list)
    expert_logits: torch.Tensor | None = None


def prepare(cfg: DistillConfig, progress: bool | None, laps: Laps) -> DistillRun:
    """Load the sites' slides and resolve the models' configs (fails before anything trains)."""
    if not cfg.sites:
        raise ConfigError("distill needs at least one site (--sites DIR [DIR ...] or sites = [...])")
    if cfg.out_dir is None:
        raise ConfigError("distill needs a run directory (--out DIR or out-dir = ...)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_sites(
        list(cfg.sites),
        cfg.encoder,
        seed=cfg.seed,
        classes=cfg.classes,
        carving=cfg.carve,
        low_features=cfg.low_features,
    )  # refuses before any output
    cohort_stain_identity(data)  # the bundle can carry one stain normalisation: refuse a mix before training
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = student_input(cfg.kd.student_input, data.has_tokens)
    if mode != cfg.kd.student_input:
        log.warning(
            "student-input = tokens but the low-res files carry no tokens (encoder %s has no feature map); "
            "using student-input = pooled",
            data.encoder,
        )
    device = resolve_device(cfg.device)
    laps.lap("load")
    log.info(
        "distill: %d slides (%d train, %d val, %d test) from %d site(s), encoder %s, student input %s",
        len(data.slides),
        len(data.split("train")),
        len(data.split("val")),
        len(data.split("test")),
        len(data.sites),
        data.encoder,
        mode,
    )
    num_classes = len(data.classes)
    teacher_cfg = resolve_model_config(cfg.teacher, data.feature_dim, num_classes)
    student_cfg = resolve_model_config(cfg.student, data.feature_dim, num_classes)
    from_teacher = starts_from_teacher(cfg.kd.student_init, mode, student_cfg, teacher_cfg)  # fails before training
    width = attention_kd_width(cfg.kd, student_cfg, teacher_cfg, cfg.training.max_instances)  # likewise
    show = cfg.progress if progress is None else progress
    return DistillRun(cfg, data, out_dir, mode, device, show, teacher_cfg, student_cfg, from_teacher, laps, width)


def adapter_stage(run: DistillRun) -> tuple[CrossResAdapter | None, dict[str, Any]]:
    """1. The cross-resolution adapter (none when the student reads raw low-res features)."""
    adapter: CrossResAdapter | None = None
    info: dict[str, Any] = {"used": run.mode != "raw"}
    if run.mode != "raw":
        adapter, fit, counts = train_stage1(run.data, run.cfg, run.device, use_tokens=run.data.has_tokens)
        info.update(
            {
                "uses_tokens": run.data.has_tokens,
                "best_epoch": fit.best_epoch,
                "epochs_run": len(fit.history),
                **counts,
                **{f"val_{k}": v for k, v in fit.val.items()},
                "history": fit.history,
            }
        )
    run.laps.lap("adapter")
    return adapter, info


def teacher_stage(run: DistillRun) -> TrainedModel:
    """2. The high-res teacher."""
    tr = run.cfg.training
    high = run.data.cohort(run.data.high_bags())
    seed = run.cfg.seed + SEED_OFFSETS.teacher
    seed_everything(seed)
    teacher = build_model(run.teacher_cfg)
    fit = train_selected(
        teacher,
        high,
        run.train,
        run.val,
        with_epochs(tr, tr.teacher_epochs),
        run.device,
        seed,
        progress=run.show,
        description="teacher",
    )
    teacher.eval()
    run.laps.lap("teacher")
    return TrainedModel(teacher, fit, high, "high-res features")


def experts_stage(run: DistillRun, teacher: TrainedModel, cache: LogitCache) -> ExpertStage:
    """3. Teacher logits of the training slides; with kd.lambda-expert > 0, balanced clusters and their experts."""
    cfg, data, train, val, device = run.cfg, run.data, run.train, run.val, run.device
    high = teacher.cohort
    keys = [data.slides[i].key for i in train]
    signature = files_signature([data.slides[i].high.path for i in train])
    teacher_fp = model_fingerprint(teacher.model, run.teacher_cfg.model_dump(mode="json"))
    teacher_logits, vectors = _cluster_vectors(
        cfg, cache, teacher.model, teacher_fp, high, train, keys, signature, device
    )
    out = ExpertStage(teacher_logits, {"used": cfg.kd.lambda_expert > 0})
    if cfg.kd.lambda_expert <= 0:
        return out
    c = cfg.clusters
    lo, hi = size_bounds(len(train), c.num_clusters, c.min_size_ratio, c.max_size_ratio, c.min_size)
    clusters = balanced_kmeans(
        vectors, c.num_clusters, lo, hi, cfg.seed + SEED_OFFSETS.clusters, c.iterations, c.n_init, c.suppress_below
    )
    labels = data.labels[train]
    out.info.update(
        {
            "num_clusters": c.num_clusters,
            "features": c.features,
            "sizes": clusters.sizes,
            "min_size": lo,
            "max_size": hi,
            "iterations": clusters.iterations,
            "class_counts": [
                {data.classes[k]: int(v) for k, v in sorted(Counter(labels[clusters.assignment == j].tolist()).items())}
                for j in range(c.num_clusters)
            ],
        }
    )
    run.laps.lap("clusters")
    val_logits, val_embedding = slide_outputs(teacher.model, high, val, device)
    val_vectors = cluster_vectors(c.features, val_logits, val_embedding)
    val_assignment = assign_nearest(val_vectors, clusters.centroids) if len(val) else None
    tr = cfg.training
    experts = train_experts(
        teacher.model,
        _factory(run.teacher_cfg),
        high,
        train,
        clusters.assignment,
        val,
        with_epochs(tr, tr.expert_epochs),
        device,
        cfg.seed + SEED_OFFSETS.experts,
        cfg.experts.init,
        c.num_clusters,
        val_assignment,
    )
    out.expert_logits = torch.stack(
        [
            cache.get_or_compute(
                f"expert_{e.cluster}",
                model_fingerprint(e.model, run.teacher_cfg.model_dump(mode="json")),
                keys,
                partial(_logits_of, e.model, high, train, device),
                signature,
            )
            for e in experts
        ]
    )
    out.clusters, out.experts = clusters, experts
    run.laps.lap("experts")
    return out


def students_stage(
    run: DistillRun, adapter: CrossResAdapter | None, teacher: TrainedModel, experts: ExpertStage
) -> dict[str, TrainedModel]:
    """4. The students, all from the same initial weights: the labels-only low-res baseline, the LRMIL student
    (KD from the teacher) and, with experts, the LRMIL + D&D student (KD from the teacher and the experts)."""
    cfg, data, train = run.cfg, run.data, run.train
    num_classes = len(data.classes)
    with_experts = experts.expert_logits is not None and experts.clusters is not None
    targets = scatter_kd_targets(
        len(data.slides),
        num_classes,
        train,
        experts.teacher_logits,
        experts.expert_logits if with_experts else None,
        experts.clusters.assignment if experts.clusters is not None else None,
    )
    low_raw = data.cohort(data.low_bags())
    adapted = low_raw if run.mode == "raw" else data.cohort(student_bags(adapter, data, run.mode))
    tr = cfg.training
    student_tr = with_epochs(tr, tr.student_epochs)
    seed = cfg.seed + SEED_OFFSETS.student  # the same init for all three students: a fair comparison
    weights = class_weights(data.labels[train], num_classes, tr.class_weighting)
    attention = None
    if attention_terms_on(cfg.kd):  # the teacher's attention on the training slides, on the students' instances
        scores = teacher_attention(teacher.model, teacher.cohort, train, run.device)
        attention = attention_targets(data, train, scores, run.mode, cfg.kd.attention_agg)
    run.laps.lap("student_bags")

    def student(name: str, cohort: Cohort, loss: CachedKDLoss | None, source: str) -> TrainedModel:
        seed_everything(seed)
        model = build_model(run.student_cfg)
        if loss is not None and run.from_teacher:  # KD students; the labels-only baseline stays from scratch
            model.load_state_dict(teacher.model.state_dict())
        with loss.attached(model) if loss is not None else nullcontext():
            result = train_selected(model, cohort, train, run.val, student_tr, run.device, seed, loss, run.show, name)
        run.laps.lap(name)
        return TrainedModel(model.eval(), result, cohort, source)

    def loss(use_experts: bool) -> CachedKDLoss:
        head = None if run.instance_width is None else instance_head(run.instance_width, seed)
        return kd_loss(cfg.kd, targets, weights, use_experts, attention, head)

    adapted_source = f"adapted low-res ({run.mode})"
    trained = {
        "baseline_low": student("baseline_low", low_raw, None, "raw low-res features"),
        "lrmil_student": student("lrmil_student", adapted, loss(use_experts=False), adapted_source),
    }
    if experts.info["used"]:
        trained["lrmil_dd_student"] = student("lrmil_dd_student", adapted, loss(use_experts=True), adapted_source)
    return trained


def evaluation_stage(run: DistillRun, trained: dict[str, TrainedModel]) -> dict[str, dict[str, Any]]:
    """5. Val and test metrics of every model."""
    bs, bins = run.cfg.training.eval_batch_size, run.cfg.ece_bins
    models = {
        name: {
            "input": t.source,
            "val": evaluate_split(t.model, t.cohort, run.val, run.device, bins, bs),
            "test": evaluate_split(t.model, t.cohort, run.test, run.device, bins, bs),
            "best_epoch": t.fit.best_epoch,
            "epochs_run": t.fit.epochs_run,
            "instances_per_slide": float(np.mean([s.num_instances for s in t.cohort.slides])),
        }
        for name, t in trained.items()
    }
    if len(run.data.classes) > 2:  # subtyping: per-class F1 / OvR AUC / classwise ECE / confusion matrix
        for name, t in trained.items():
            models[name]["per_class_test"] = per_class_split(t.model, t.cohort, run.test, run.device, bins, bs)
    run.laps.lap("evaluation")
    return models


def val_scaling(run: DistillRun, trained: TrainedModel) -> ModelScaling:
    """A temperature fitted on the validation slides' logits (T >= 1; 1 without val slides); no standardisation
    (distill reads known-encoder features, which `fedslide train` leaves unstandardised by default)."""
    if not run.val.size:
        return ModelScaling()
    logits = _logits_of(trained.model, trained.cohort, run.val, run.device).double()
    probs = torch.softmax(logits, dim=1).numpy()
    return ModelScaling(temperature=fit_temperature(probs, run.data.labels[run.val]))


def save_bundles(
    run: DistillRun,
    adapter: CrossResAdapter | None,
    teacher: MILModel,
    trained: dict[str, TrainedModel],
    preprocess: PreprocessConfig,
    extra: dict[str, Any],
    scaling: dict[str, ModelScaling] | None = None,
    clinical: ClinicalModel | None = None,
) -> dict[str, Path]:
    """The students as bundles (teacher inside); without experts the main bundle is the LRMIL student.
    `scaling`: each model's (students' names, "teacher_high") standardisation and temperature; identity if absent;
    `clinical`: the BD model the main bundle (`student/`) carries."""
    scaling = scaling or {}
    bundles: dict[str, Path] = {}
    slides = run.data.slides  # OOD statistics of the training slides' 5x features, threshold on the val slides'
    ood = fit_ood((slides[i].low.features for i in run.train), (slides[i].low.features for i in run.val))
    roles = {name: name for name in trained if name in BUNDLE_DIRS}
    if "lrmil_dd_student" not in trained:
        roles["student"] = "lrmil_student"
    for key, name in roles.items():
        student_input = "raw" if name == "baseline_low" else run.mode
        meta = bundle_meta(run.data, student_input, preprocess, {**extra, "role": name})
        bundle = StudentBundle(
            meta,
            None if student_input == "raw" else adapter,
            trained[name].model,
            teacher,
            run.student_cfg,
            run.teacher_cfg,
            low_encoder_weights=find_low_encoder_weights(meta, list(run.cfg.sites)),
            encoder_weights=find_encoder_weights(meta, list(run.cfg.sites)),
            student_scaling=scaling.get(name),
            teacher_scaling=scaling.get("teacher_high"),
            ood=ood,
            clinical=clinical if key == ("student" if "student" in roles else "lrmil_dd_student") else None,
        )
        directory = run.out_dir / (BUNDLE_DIRS[key] if key in BUNDLE_DIRS else key)
        bundle.save(directory)
        bundles[key] = directory
    run.laps.lap("bundles")
    return bundles


def run_distill(
    cfg: DistillConfig,
    preprocess: PreprocessConfig | None = None,
    progress: bool | None = None,
    clinical: ClinicalConfig | None = None,
) -> DistillReport:
    """Run the whole centralised pipeline on cfg.sites; write metrics.json, bundles and the logit cache; with
    `clinical.enabled`, also the BD model in the main bundle."""
    preprocess = preprocess or PreprocessConfig()
    laps = Laps()
    run = prepare(cfg, progress, laps)
    data, mode, kd = run.data, run.mode, cfg.kd
    cache = LogitCache(run.out_dir / "cache" / CACHE_FILE)
    clinical_raw = None
    if clinical is not None and clinical.enabled:  # read and check the sites' tables before anything trains
        clinical_raw = cohort_clinical(data, list(cfg.sites), clinical)
        check_training_rows(clinical_raw, run.train, list(cfg.sites))
    with deterministic_torch(cfg.deterministic, cuda=run.device.type == "cuda"):
        adapter, adapter_info = adapter_stage(run)
        teacher = teacher_stage(run)
        experts = experts_stage(run, teacher, cache)
        trained = {"teacher_high": teacher, **students_stage(run, adapter, teacher, experts)}
        models = evaluation_stage(run, trained)
        write_test_predictions(
            run.out_dir / TEST_PREDICTIONS_FILE,
            test_prediction_rows(trained, data.slides, run.test, run.device),
            data.classes,
        )
        bd: ClinicalModel | None = None
        bd_info: dict[str, Any] = {"used": False}
        if clinical is not None and clinical_raw is not None:
            main = trained["lrmil_dd_student" if "lrmil_dd_student" in trained else "lrmil_student"]
            seed = cfg.seed + SEED_OFFSETS.student
            bd, bd_info = clinical_stage(
                data, list(cfg.sites), clinical_raw, main.cohort, run.train, run.test, clinical, seed, run.val
            )
            laps.lap("clinical")
    use_experts = experts.info["used"]
    common_extra = {
        "teacher_model": run.teacher_cfg.name,
        "student_model": run.student_cfg.name,
        "temperature": kd.temperature,
        "num_clusters": cfg.clusters.num_clusters if use_experts else 0,
        "sites": len(data.sites),
    }
    students = {name: t for name, t in trained.items() if name != "teacher_high"}
    scaling = {name: val_scaling(run, t) for name, t in trained.items()}
    for name, s in scaling.items():
        models[name]["temperature"] = s.temperature
    bundles = save_bundles(run, adapter, teacher.model, students, preprocess, common_extra, scaling, bd)
    laps.total()

    rows = [
        _metrics_row(name, models[name]["input"] if name in models else "", models.get(name, {}).get("test"))
        for name in MODEL_ROWS
    ]
    for row in rows:
        if row["model"] not in models:
            row["skipped"] = "kd.lambda-expert = 0"
    for name, part in (("bd_clinical", "test"), ("bd_no_clinical", "test_without_clinical")):
        if part in bd_info:
            rows.append(_metrics_row(name, "student instances + clinical", bd_info[part]))
    train, val, test = run.train, run.val, run.test
    per_site = Counter((s.site, s.split) for s in data.slides)
    metrics: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "rows": rows,
        "models": models,
        "adapter": adapter_info,
        "clusters": experts.info,
        "experts": [
            {
                "cluster": e.cluster,
                "n_train": int(e.train_indices.size),
                "n_val": int(e.val_indices.size) if e.val_indices is not None else 0,
                "best_epoch": e.fit.best_epoch,
                "epochs_run": e.fit.epochs_run,
                "init": cfg.experts.init,
            }
            for e in experts.experts
        ],
        "kd": {
            "student_input": mode,
            "temperature": kd.temperature,
            "lambda_base": kd.lambda_base,
            "lambda_expert": kd.lambda_expert,
            "expert_kd": kd.expert_kd,
            "lambda_attention": kd.lambda_attention,
            "attention_temperature": kd.attention_temperature,
            "attention_agg": kd.attention_agg,
            "lambda_instance": kd.lambda_instance,
            "instance_k": kd.instance_k,
            "instance_features": kd.instance_features,
            "student_init": "teacher" if run.from_teacher else "scratch",
        },
        "cache": {"path": str(Path("cache") / CACHE_FILE), "hits": cache.hits, "misses": cache.misses},
        "clinical": bd_info,
        "classes": list(data.classes),
        "encoder": {
            k: data.low_attrs.get(k)
            for k in ("encoder_name", "encoder_weights_hash", "encoder_dim", "encoder_fingerprint")
            if k in data.low_attrs
        },
        "slides": {
            "train": int(train.size),
            "val": int(val.size),
            "test": int(test.size),
            "per_site": {
                site: {split: per_site.get((site, split), 0) for split in ("train", "val", "test")}
                for site in data.sites
            },
        },
        "teacher": run.teacher_cfg.model_dump(mode="json"),
        "student": run.student_cfg.model_dump(mode="json"),
        "config": cfg.to_toml_dict(),
        "bundles": {name: str(path.relative_to(run.out_dir)) for name, path in bundles.items()},
        "timings": laps.timings,
    }
    write_json(run.out_dir / "metrics.json", metrics)
    _log_rows(rows)
    return DistillReport(out_dir=run.out_dir, metrics=metrics, bundles=bundles)


def _log_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        values = ", ".join(
            f"{k}={row[k]:.3f}" if isinstance(row.get(k), float) and math.isfinite(row[k]) else f"{k}=n/a"
            for k in METRIC_NAMES
        )
        log.info("%-17s test: %s", row["model"], values)


def _logits_of(model: MILModel, bags: Cohort, indices: Indices, device: torch.device) -> torch.Tensor:
    """The model's slide logits on the cohort's `indices`."""
    return slide_outputs(model, bags, indices, device)[0]
