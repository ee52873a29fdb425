"""`fedslide distill`, centralised: adapter (LRMIL stage 1) -> teacher -> clusters + experts (D&D) -> students.

Writes to the run directory:
- `metrics.json` (schema `fedslide.distill.metrics/1`): `rows` (one per model: teacher_high,
  baseline_low, lrmil_student, lrmil_dd_student, with test auc, acc, balanced_acc, f1, brier, ece,
  loss, n), `models` (val and test metrics, best epoch, epochs run, instances per slide),
  `adapter` (stage-1 val loss / mse / cosine, and the unadapted cosine for reference),
  `clusters` (sizes, bounds, class counts), `experts`, `cache` (hits/misses), `config`,
  `classes`, `encoder`, `slides` (counts per split and site), `timings` (seconds per stage).
- bundles (common.distillation.bundle): `student/` (LRMIL + D&D student), `lrmil_student/`,
  `baseline_low/`, each with the teacher inside.
- `cache/logits.pt`: teacher/expert logits of the training slides.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedslide.common.config.base import ConfigError
from fedslide.common.config.distill import DistillConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.distillation.adapter import AdapterSpec, CrossResAdapter, build_adapter
from fedslide.common.distillation.bundle import BundleMeta, StudentBundle
from fedslide.common.distillation.cache import CACHE_FILE, LogitCache, files_signature, model_fingerprint
from fedslide.common.distillation.clustering import ClusterResult, assign_nearest, balanced_kmeans, size_bounds
from fedslide.common.distillation.crossres import AdapterFit, collect_pairs, fit_adapter
from fedslide.common.distillation.data import DistillData, load_sites
from fedslide.common.distillation.experts import Expert, train_experts
from fedslide.common.distillation.losses import CachedKDLoss
from fedslide.common.distillation.mil import evaluate_split, slide_outputs, train_selected, with_epochs
from fedslide.common.distillation.student import starts_from_teacher, student_bags
from fedslide.common.metrics import METRIC_NAMES
from fedslide.common.models.base import MILModel
from fedslide.common.models.registry import build_model
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.loop import class_weights
from fedslide.common.training.outputs import write_json
from fedslide.common.training.repro import deterministic_torch, resolve_device, seed_everything
from fedslide.common.training.run import resolve_model_config

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


def _seed(base: int, offset: int) -> int:
    return base + offset


def train_stage1(
    data: DistillData, cfg: DistillConfig, device: torch.device, use_tokens: bool
) -> tuple[CrossResAdapter, AdapterFit, dict[str, int]]:
    """Train the cross-resolution adapter on the training slides' patches, selected on the val slides'."""
    train = [data.slides[i] for i in data.split("train")]
    val = [data.slides[i] for i in data.split("val")]
    slots = data.token_grid**2 if use_tokens else 1
    a = cfg.adapter
    train_pairs = collect_pairs(train, use_tokens, slots, a.max_patches_per_slide, cfg.seed)
    val_pairs = collect_pairs(val, use_tokens, slots, a.max_patches_per_slide, cfg.seed) if val else None
    seed_everything(_seed(cfg.seed, 1))
    spec = AdapterSpec(
        in_dim=data.feature_dim, out_dim=data.feature_dim, hidden_dim=a.hidden_dim,
        num_slots=max(data.token_grid**2, 1), dropout=a.dropout,
    )
    adapter = build_adapter(spec)
    result = fit_adapter(adapter, train_pairs, val_pairs, a, _seed(cfg.seed, 1), device)
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


def bundle_meta(
    data: DistillData, student_input: str, preprocess: PreprocessConfig, extra: dict[str, Any]
) -> BundleMeta:
    low, high = data.low_attrs, data.high_attrs
    tiling = preprocess.tiling.to_toml_dict()
    tiling.update({
        "low-mpp": float(low.get("target_mpp", tiling["low-mpp"])),
        "high-mpp": float(high.get("target_mpp", tiling["high-mpp"])),
        "low-patch-size": int(low.get("patch_size", tiling["low-patch-size"])),
        "high-patch-size": int(high.get("patch_size", tiling["high-patch-size"])),
    })
    return BundleMeta(
        encoder_name=str(low.get("encoder_name") or data.encoder),
        encoder_weights_hash=str(low.get("encoder_weights_hash", "")),
        encoder_dim=int(low.get("encoder_dim") or data.feature_dim),
        encoder_fingerprint=str(low["encoder_fingerprint"]) if low.get("encoder_fingerprint") else None,
        low_mpp=tiling["low-mpp"],
        low_patch_size=tiling["low-patch-size"],
        high_mpp=tiling["high-mpp"],
        high_patch_size=tiling["high-patch-size"],
        child_grid=data.child_grid,
        token_grid=data.token_grid,
        student_input=student_input,
        class_names=list(data.classes),
        tissue=preprocess.tissue.to_toml_dict(),
        tiling=tiling,
        extra=extra,
    )


def _cluster_vectors(
    cfg: DistillConfig, cache: LogitCache, teacher: MILModel, fingerprint: str, high: Cohort,
    train: np.ndarray, keys: list[str], signature: str, device: torch.device,
) -> tuple[torch.Tensor, np.ndarray]:
    """(teacher logits of the training slides, the vectors to cluster), both through the cache."""
    computed: dict[str, torch.Tensor] = {}

    def outputs(part: str) -> torch.Tensor:
        if not computed:  # one forward pass gives both
            computed["logits"], computed["embedding"] = slide_outputs(teacher, high, train, device)
        return computed[part]

    logits = cache.get_or_compute("teacher", fingerprint, keys, lambda: outputs("logits"), signature)
    if cfg.clusters.features == "logits":
        return logits, logits.numpy()
    embedding = cache.get_or_compute("teacher_embedding", fingerprint, keys, lambda: outputs("embedding"), signature)
    return logits, embedding.numpy()


def run_distill(
    cfg: DistillConfig, preprocess: PreprocessConfig | None = None, progress: bool | None = None
) -> DistillReport:
    """Run the whole centralised pipeline on cfg.sites; write metrics.json, bundles and the logit cache."""
    if not cfg.sites:
        raise ConfigError("distill needs at least one site (--sites DIR [DIR ...] or sites = [...])")
    if cfg.out_dir is None:
        raise ConfigError("distill needs a run directory (--out DIR or out-dir = ...)")
    preprocess = preprocess or PreprocessConfig()
    show = cfg.progress if progress is None else progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}
    start_all = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 3)
        clock = now

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_sites(list(cfg.sites), cfg.encoder, seed=cfg.seed)
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    num_classes = len(data.classes)
    mode = cfg.kd.student_input
    if mode == "tokens" and not data.has_tokens:
        log.warning("student-input = tokens but the low-res files carry no tokens (encoder %s has no feature map); "
                    "using student-input = pooled", data.encoder)
        mode = "pooled"
    device = resolve_device(cfg.device)
    lap("load")
    log.info("distill: %d slides (%d train, %d val, %d test) from %d site(s), encoder %s, student input %s",
             len(data.slides), len(train), len(val), len(test), len(data.sites), data.encoder, mode)

    tr = cfg.training
    teacher_cfg = resolve_model_config(cfg.teacher, data.feature_dim, num_classes)
    student_cfg = resolve_model_config(cfg.student, data.feature_dim, num_classes)
    from_teacher = starts_from_teacher(cfg.kd.student_init, mode, student_cfg, teacher_cfg)  # fails before training
    with deterministic_torch(cfg.deterministic, cuda=device.type == "cuda"):
        # 1. cross-resolution adapter
        adapter: CrossResAdapter | None = None
        adapter_info: dict[str, Any] = {"used": mode != "raw"}
        if mode != "raw":
            adapter, adapter_fit, counts = train_stage1(data, cfg, device, use_tokens=data.has_tokens)
            adapter_info.update({
                "uses_tokens": data.has_tokens, "best_epoch": adapter_fit.best_epoch,
                "epochs_run": len(adapter_fit.history), **counts,
                **{f"val_{k}": v for k, v in adapter_fit.val.items()},
                "history": adapter_fit.history,
            })
        lap("adapter")

        # 2. teacher
        high = data.cohort(data.high_bags())
        seed_everything(_seed(cfg.seed, 2))
        teacher = build_model(teacher_cfg)
        teacher_fit = train_selected(teacher, high, train, val, with_epochs(tr, tr.teacher_epochs), device,
                                     _seed(cfg.seed, 2), progress=show, description="teacher")
        teacher.eval()
        lap("teacher")

        # 3. clusters and experts
        cache = LogitCache(out_dir / "cache" / CACHE_FILE)
        keys = [data.slides[i].key for i in train]
        signature = files_signature([data.slides[i].high.path for i in train])
        teacher_fp = model_fingerprint(teacher, teacher_cfg.model_dump(mode="json"))
        teacher_logits, vectors = _cluster_vectors(cfg, cache, teacher, teacher_fp, high, train, keys, signature, device)
        use_experts = cfg.kd.lambda_expert > 0
        clusters: ClusterResult | None = None
        experts: list[Expert] = []
        expert_logits: torch.Tensor | None = None
        cluster_info: dict[str, Any] = {"used": use_experts}
        if use_experts:
            c = cfg.clusters
            lo, hi = size_bounds(len(train), c.num_clusters, c.min_size_ratio, c.max_size_ratio, c.min_size)
            clusters = balanced_kmeans(vectors, c.num_clusters, lo, hi, _seed(cfg.seed, 3), c.iterations, c.n_init,
                                       c.suppress_below)
            labels = data.labels[train]
            cluster_info.update({
                "num_clusters": c.num_clusters, "features": c.features, "sizes": clusters.sizes,
                "min_size": lo, "max_size": hi, "iterations": clusters.iterations,
                "class_counts": [
                    {data.classes[k]: int(v) for k, v in sorted(Counter(labels[clusters.assignment == j].tolist()).items())}
                    for j in range(c.num_clusters)
                ],
            })
            lap("clusters")
            val_logits, val_embedding = slide_outputs(teacher, high, val, device)
            val_vectors = (val_logits if c.features == "logits" else val_embedding).numpy()
            val_assignment = assign_nearest(val_vectors, clusters.centroids) if len(val) else None
            experts = train_experts(
                teacher, _factory(teacher_cfg), high, train, clusters.assignment, val,
                with_epochs(tr, tr.expert_epochs), device, _seed(cfg.seed, 10), cfg.experts.init, c.num_clusters,
                val_assignment,
            )
            expert_logits = torch.stack([
                cache.get_or_compute(
                    f"expert_{e.cluster}", model_fingerprint(e.model, teacher_cfg.model_dump(mode="json")), keys,
                    lambda e=e: slide_outputs(e.model, high, train, device)[0], signature,
                )
                for e in experts
            ])
            lap("experts")

        # 4. students
        n = len(data.slides)
        teacher_full = torch.zeros(n, num_classes)
        teacher_full[torch.from_numpy(train)] = teacher_logits
        experts_full, cluster_full = None, torch.full((n,), -1, dtype=torch.long)
        if expert_logits is not None and clusters is not None:
            experts_full = torch.zeros(len(experts), n, num_classes)
            experts_full[:, torch.from_numpy(train)] = expert_logits
            cluster_full[torch.from_numpy(train)] = torch.from_numpy(clusters.assignment).long()
        low_raw = data.cohort(data.low_bags())
        student_cohort = low_raw if mode == "raw" else data.cohort(student_bags(adapter, data, mode))
        student_tr = with_epochs(tr, tr.student_epochs)
        student_seed = _seed(cfg.seed, 100)  # the same init for all three students: a fair comparison
        kd = cfg.kd
        weights = class_weights(data.labels[train], num_classes, tr.class_weighting)
        lap("student_bags")

        def student(name: str, cohort: Cohort, loss: CachedKDLoss | None) -> tuple[MILModel, Any]:
            seed_everything(student_seed)
            model = build_model(student_cfg)
            if loss is not None and from_teacher:  # KD students; the labels-only baseline stays from scratch
                model.load_state_dict(teacher.state_dict())
            result = train_selected(model, cohort, train, val, student_tr, device, student_seed, loss, show, name)
            lap(name)
            return model.eval(), result

        trained: dict[str, tuple[MILModel, Any, Cohort]] = {}
        m, r = student("baseline_low", low_raw, None)
        trained["baseline_low"] = (m, r, low_raw)
        lrmil_loss = CachedKDLoss(teacher_full, None, kd.temperature, kd.lambda_base, 0.0, class_weight=weights)
        m, r = student("lrmil_student", student_cohort, lrmil_loss)
        trained["lrmil_student"] = (m, r, student_cohort)
        if use_experts:
            dd_loss = CachedKDLoss(teacher_full, experts_full, kd.temperature, kd.lambda_base, kd.lambda_expert,
                                   kd.expert_kd, cluster_full, weights)
            m, r = student("lrmil_dd_student", student_cohort, dd_loss)
            trained["lrmil_dd_student"] = (m, r, student_cohort)

        # 5. evaluation
        bs = tr.eval_batch_size
        models: dict[str, dict[str, Any]] = {}

        def record(name: str, model: MILModel, result: Any, cohort: Cohort, source: str) -> None:
            models[name] = {
                "input": source,
                "val": evaluate_split(model, cohort, val, device, cfg.ece_bins, bs),
                "test": evaluate_split(model, cohort, test, device, cfg.ece_bins, bs),
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "instances_per_slide": float(np.mean([s.num_instances for s in cohort.slides])),
            }

        record("teacher_high", teacher, teacher_fit, high, "high-res features")
        sources = {"baseline_low": "raw low-res features", "lrmil_student": f"adapted low-res ({mode})",
                   "lrmil_dd_student": f"adapted low-res ({mode})"}
        for name, (model, result, cohort) in trained.items():
            record(name, model, result, cohort, sources[name])
        lap("evaluation")

    # bundles
    bundles: dict[str, Path] = {}
    common_extra = {
        "teacher_model": teacher_cfg.name, "student_model": student_cfg.name, "temperature": kd.temperature,
        "num_clusters": cfg.clusters.num_clusters if use_experts else 0, "sites": len(data.sites),
    }
    for name, (model, _, _) in trained.items():
        student_input = "raw" if name == "baseline_low" else mode
        meta = bundle_meta(data, student_input, preprocess, {**common_extra, "role": name})
        bundle = StudentBundle(meta, None if student_input == "raw" else adapter, model, teacher, student_cfg, teacher_cfg)
        directory = out_dir / BUNDLE_DIRS[name]
        bundle.save(directory)
        bundles[name] = directory
    if "lrmil_dd_student" not in trained:  # experts off: the main bundle is the LRMIL student
        meta = bundle_meta(data, mode, preprocess, {**common_extra, "role": "lrmil_student"})
        StudentBundle(meta, adapter, trained["lrmil_student"][0], teacher, student_cfg, teacher_cfg).save(out_dir / "student")
        bundles["student"] = out_dir / "student"
    lap("bundles")
    timings["total"] = round(time.perf_counter() - start_all, 3)

    rows = [_metrics_row(name, models[name]["input"] if name in models else "", models.get(name, {}).get("test"))
            for name in MODEL_ROWS]
    for row in rows:
        if row["model"] not in models:
            row["skipped"] = "kd.lambda-expert = 0"
    per_site = Counter((s.site, s.split) for s in data.slides)
    metrics: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "rows": rows,
        "models": models,
        "adapter": adapter_info,
        "clusters": cluster_info,
        "experts": [
            {"cluster": e.cluster, "n_train": int(e.train_indices.size),
             "n_val": int(e.val_indices.size) if e.val_indices is not None else 0, "best_epoch": e.fit.best_epoch,
             "epochs_run": e.fit.epochs_run, "init": cfg.experts.init}
            for e in experts
        ],
        "kd": {"student_input": mode, "temperature": kd.temperature, "lambda_base": kd.lambda_base,
               "lambda_expert": kd.lambda_expert, "expert_kd": kd.expert_kd,
               "student_init": "teacher" if from_teacher else "scratch"},
        "cache": {"path": str(Path("cache") / CACHE_FILE), "hits": cache.hits, "misses": cache.misses},
        "classes": list(data.classes),
        "encoder": {k: data.low_attrs.get(k) for k in ("encoder_name", "encoder_weights_hash", "encoder_dim",
                                                       "encoder_fingerprint") if k in data.low_attrs},
        "slides": {
            "train": int(train.size), "val": int(val.size), "test": int(test.size),
            "per_site": {site: {split: per_site.get((site, split), 0) for split in ("train", "val", "test")}
                         for site in data.sites},
        },
        "teacher": teacher_cfg.model_dump(mode="json"),
        "student": student_cfg.model_dump(mode="json"),
        "config": cfg.to_toml_dict(),
        "bundles": {name: str(path.relative_to(out_dir)) for name, path in bundles.items()},
        "timings": timings,
    }
    write_json(out_dir / "metrics.json", metrics)
    _log_rows(rows)
    return DistillReport(out_dir=out_dir, metrics=metrics, bundles=bundles)


def _log_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        values = ", ".join(
            f"{k}={row[k]:.3f}" if isinstance(row.get(k), float) and math.isfinite(row[k]) else f"{k}=n/a"
            for k in METRIC_NAMES
        )
        log.info("%-17s test: %s", row["model"], values)
