"""What a site computes in each phase of the federation, on its own slides (results are what may leave).

Each function takes the site's run and the arrays the server sent, does the local work with the
centralised pipeline's pieces (adapter fitting, MIL training, clustering statistics, KD losses) and
returns only what the egress policy allows: updated weights, cluster sums/counts, proxy logits,
metrics.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from fedslide.client.clinical_site import clinical_train, validate_clinical
from fedslide.client.site_run import STAGE1_ENCODER, STAGE1_RECORD, SiteRun
from fedslide.common.config.base import ConfigError
from fedslide.common.device import resolve_device
from fedslide.common.features import FeatureFileError
from fedslide.common.atomic import atomic_write
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.clinical_model import ClinicalModel
from fedslide.common.distillation.clustering import (
    ClusteringError,
    assign_nearest,
    constrained_assignment,
    kmeans_init,
    released_statistics,
    size_bounds,
    squared_distances,
)
from fedslide.common.distillation.crossres import evaluate_adapter, train_adapter_epochs
from fedslide.common.distillation.mil import metrics_from_logits, slide_outputs, train_epochs
from fedslide.common.distillation.ood import OODStats, slide_embeddings
from fedslide.common.distillation.pipeline import bundle_meta
from fedslide.common.distillation.stages import (
    KDTargets,
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
from fedslide.common.distillation.student import attention_kd_width, student_bags
from fedslide.common.federation import per_class
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.temperature import grid_metrics
from fedslide.common.federation.ood_stats import ood_from_record
from fedslide.common.federation.models import (
    adapter_spec,
    load_record,
    new_model,
    pack_experts,
    pack_models,
    student_config,
    teacher_config,
    to_record,
    unpack_bags,
    unpack_experts,
    unpack_models,
)
from fedslide.common.distillation.adapter import CrossResAdapter, build_adapter
from fedslide.common.models.base import MILModel
from fedslide.common.seeds import SEED_OFFSETS
from fedslide.common.training.cohort import Cohort
from fedslide.common.training.data import BagBatch
from fedslide.common.training.loop import BatchLoss, class_weights
from fedslide.common.training.repro import seed_everything
from fedslide.common.training.scaling import ModelScaling
from fedslide.common.training.standardize import FeatureStats

if TYPE_CHECKING:  # pixel stage 1 loads lazily: its slide reading and stain jitter would slow every message
    from fedslide.client.encoders.base import PatchEncoder
    from fedslide.client.lowres_finetune import PatchSet, Stage1Trainer

TEACHER_OUTPUTS = "teacher_outputs.pt"
KD_CACHE = "kd_cache.pt"
INSTANCE_HEAD_FILE = "kd_instance_head.pt"  # the student's instance-loss head: trained and kept at the site
BUNDLE_DIR = "student_bundle"

Metrics = dict[str, float | int]


def _adapter(site: SiteRun, record: ArrayRecord) -> CrossResAdapter:
    assert site.facts is not None
    return load_record(build_adapter(adapter_spec(site.cfg, site.facts)), record).eval()


def _model(site: SiteRun, kind: str, record: ArrayRecord) -> MILModel:
    assert site.facts is not None
    cfg = (
        teacher_config(site.cfg, site.facts) if kind in (p.TEACHER, p.EXPERTS) else student_config(site.cfg, site.facts)
    )
    return load_record(new_model(cfg, site.cfg.seed), record)


def _mode(site: SiteRun) -> str:
    return student_input(site.cfg.kd.student_input, site.data().has_tokens)


def student_stats(site: SiteRun) -> FeatureStats | None:
    """The standardisation of the student's instances: the federation's 20x statistics when the student reads
    adapted instances (they regress 20x features) in weights mode; None (raw) for raw 5x input or logits mode,
    whose student the server trains on the proxy cohort."""
    if site.cfg.mode != "weights" or _mode(site) == "raw":
        return None
    return site.feature_stats


def _seed(site: SiteRun, phase_offset: int, server_round: int) -> int:
    """The seed of one local round: per run seed, site, phase (its `SEED_OFFSETS` entry) and round, so that sites
    draw their own shuffles and dropout masks."""
    key = [site.cfg.seed, zlib.crc32(site.name.encode()), phase_offset, server_round]
    return int(np.random.SeedSequence(key).generate_state(1)[0])


# ---- adapter --------------------------------------------------------------------------------------
def adapter_round(site: SiteRun, record: ArrayRecord, server_round: int) -> tuple[ArrayRecord, Metrics]:
    """Validate the global adapter on the site's val patches, then train it for local epochs."""
    data, a = site.data(), site.cfg.adapter
    train = adapter_pairs(data, data.split("train"), a, site.cfg.seed)
    adapter = _adapter(site, record)
    metrics: Metrics = {ph.NUM_EXAMPLES: len(train), ph.UNIT_WEIGHT: 1, **_adapter_val_metrics(site, adapter)}
    start = time.perf_counter()
    seed = _seed(site, SEED_OFFSETS.adapter, server_round)
    seed_everything(seed)  # dropout draws from the global generator
    losses = train_adapter_epochs(adapter, train, a, site.cfg.rounds.adapter_local_epochs, seed, device=site.device)
    metrics.update({ph.TRAIN_LOSS: losses[-1], ph.EPOCHS: len(losses), ph.SECONDS: time.perf_counter() - start})
    return to_record(adapter.cpu()), metrics


def _adapter_val_metrics(site: SiteRun, adapter: CrossResAdapter) -> Metrics:
    """The adapter's loss on the site's val patches."""
    data = site.data()
    val = data.split("val")
    if not val.size:
        return {ph.VAL_LOSS: 0.0, ph.VAL_N: 0}
    pairs = adapter_pairs(data, val, site.cfg.adapter, site.cfg.seed)
    return {
        ph.VAL_LOSS: float(evaluate_adapter(adapter, pairs, site.cfg.adapter, site.device)["loss"]),
        ph.VAL_N: len(pairs),
    }


# ---- pixel stage 1: the 5x encoder's trainable parameters ----------------------------------------
STAGE1_PATCHES = "pixel_stage1/patches.pt"  # the sampled 5x patches and the frozen encoder's targets (site only)


@dataclass
class Stage1Site:
    """What a pixel-stage-1 step needs at a site: the frozen encoder (teacher), a trainer holding the 5x copy and
    the device."""

    teacher: PatchEncoder
    trainer: Stage1Trainer
    device: torch.device


def _stage1(site: SiteRun, server_round: int = 0) -> Stage1Site:
    """The site's frozen encoder (checked against its 5x feature files' weights hash) and a stage-1 trainer whose
    trainable parameters finetune.trainable names; shuffling and jitter seeded per site and round."""
    from fedslide.client.encoders.registry import build_encoder
    from fedslide.client.lowres_finetune import Stage1Trainer

    cfg = site.cfg.finetune
    site.own_low_features = True  # stage 1 reads the site's own encoder's files
    device = resolve_device(cfg.encoder.device)
    teacher = build_encoder(cfg.encoder)
    recorded = str(site.data().high_attrs.get("encoder_weights_hash", ""))
    if recorded and recorded != teacher.weights_hash:
        raise FeatureFileError(
            f"finetune.encoder ({teacher.name}, weights {teacher.weights_hash[:12]}) is not the encoder of "
            f"{site.site_dir}/features ({recorded[:12]}): point finetune.encoder.weights at the site's encoder"
        )
    teacher = teacher.to(device).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    trainer = Stage1Trainer(teacher, cfg, device, seed=_seed(site, SEED_OFFSETS.pixel_stage1, server_round))
    return Stage1Site(teacher, trainer, device)


def encoder_record(trainer: Stage1Trainer) -> ArrayRecord:
    """The trainable parameters as they travel: `encoder.<name>`, one float32 array each."""
    return ArrayRecord({f"{ph.ENCODER_PREFIX}{k}": Array(v) for k, v in trainer.trainable_arrays().items()})


def _load_encoder_record(trainer: Stage1Trainer, record: ArrayRecord) -> None:
    unnamed = sorted(k for k in record if not k.startswith(ph.ENCODER_PREFIX))
    if unnamed:
        raise ConfigError(f"pixel stage 1: arrays {unnamed[:3]} are not encoder parameters ({ph.ENCODER_PREFIX}*)")
    trainer.load_trainable({k.removeprefix(ph.ENCODER_PREFIX): v.numpy() for k, v in record.items()})


def _stage1_patches(site: SiteRun, s1: Stage1Site) -> PatchSet:
    from fedslide.client.lowres_finetune import cached_patches

    return cached_patches(
        site.site_dir, site.cfg.finetune, s1.teacher, s1.trainer.layers, s1.device, site.run_dir / STAGE1_PATCHES
    )


def pixel_stage1_init(site: SiteRun) -> tuple[ArrayRecord, Metrics]:
    """The site's initial trainable encoder parameters (the server starts the phase from one site's)."""
    if site.cfg.pixel_stage1_objective == "vib":
        from fedslide.client.vib_phases import vib_init

        return vib_init(site, _seed(site, SEED_OFFSETS.pixel_stage1, 0))
    s1 = _stage1(site)
    return encoder_record(s1.trainer), {ph.NUM_EXAMPLES: int(site.split("train").size)}


def pixel_stage1_round(site: SiteRun, record: ArrayRecord, server_round: int) -> tuple[ArrayRecord, Metrics]:
    """Validate the global encoder (the stage-1 loss on the site's patches, no jitter), then train it for the local
    epochs; only the trainable parameters go back. Pixels, patches and targets stay here."""
    if site.cfg.pixel_stage1_objective == "vib":
        from fedslide.client.vib_phases import vib_round

        seed = _seed(site, SEED_OFFSETS.pixel_stage1, 0)
        return vib_round(site, record, seed, _seed(site, SEED_OFFSETS.pixel_stage1, server_round))
    s1 = _stage1(site, server_round)
    _load_encoder_record(s1.trainer, record)
    patches = _stage1_patches(site, s1)
    metrics: Metrics = {
        ph.NUM_EXAMPLES: len(patches),
        ph.UNIT_WEIGHT: 1,
        ph.VAL_LOSS: s1.trainer.evaluate(patches)["total"],
        ph.VAL_N: len(patches),
    }
    start = time.perf_counter()
    history = s1.trainer.fit(patches, site.cfg.rounds.pixel_stage1_local_epochs)
    metrics.update(
        {ph.TRAIN_LOSS: history[-1]["total"], ph.EPOCHS: len(history), ph.SECONDS: time.perf_counter() - start}
    )
    return encoder_record(s1.trainer), metrics


def _validate_pixel_stage1(site: SiteRun, content: RecordDict) -> Metrics:
    if site.cfg.pixel_stage1_objective == "vib":
        from fedslide.client.vib_phases import vib_validate

        return vib_validate(site, content.array_records[p.ARRAYS], _seed(site, SEED_OFFSETS.pixel_stage1, 0))
    s1 = _stage1(site)
    _load_encoder_record(s1.trainer, content.array_records[p.ARRAYS])
    patches = _stage1_patches(site, s1)
    return {
        ph.NUM_EXAMPLES: len(patches),
        ph.VAL_LOSS: s1.trainer.evaluate(patches)["total"],
        ph.VAL_N: len(patches),
    }


def pixel_stage1_reencode(site: SiteRun, record: ArrayRecord) -> Metrics:
    """Keep the global encoder here (`<run>/pixel_stage1/low_encoder.pt`) and re-encode the site's 5x files with it
    into `features/<encoder>-ft-<hash12>` (resumable; a folder per weights hash, so runs never overwrite each other's
    files); the later phases of the run read those files."""
    from fedslide.client.lowres_finetune import reencode_site, save_weights

    if site.cfg.pixel_stage1_objective == "vib":
        from fedslide.client.vib_phases import vib_reencode

        return vib_reencode(site, record, _seed(site, SEED_OFFSETS.pixel_stage1, 0))
    start = time.perf_counter()
    cfg = site.cfg.finetune
    s1 = _stage1(site)
    _load_encoder_record(s1.trainer, record)
    weights = site.run_dir / STAGE1_ENCODER
    weights_hash = save_weights(s1.trainer.student, weights)
    summary = reencode_site(site.site_dir, cfg, weights)
    if summary.weights_hash != weights_hash:  # pragma: no cover - the registry hashes the same file
        raise RuntimeError(f"{weights}: re-encoded under {summary.weights_hash}, saved as {weights_hash}")
    with atomic_write(site.run_dir / STAGE1_RECORD) as handle:
        json.dump({"weights_hash": weights_hash, "features": summary.features}, handle)  # <encoder>-ft-<hash12>
    return {
        ph.REENCODED: len(summary.done) + len(summary.skipped),
        ph.NUM_EXAMPLES: int(site.split("train").size),
        ph.SECONDS: time.perf_counter() - start,
    }


# ---- MIL models: teacher, baseline, student -------------------------------------------------------
def with_proximal(base: BatchLoss, model: nn.Module, mu: float) -> BatchLoss:
    """`base` + (mu/2)·‖w − w_global‖² (FedProx), w_global = the weights the round started from."""
    if mu <= 0:
        return base
    anchor = [p.detach().clone() for p in model.parameters()]

    def loss(logits: torch.Tensor, batch: BagBatch) -> torch.Tensor:
        prox = sum(((p - a.to(p.device)) ** 2).sum() for p, a in zip(model.parameters(), anchor))
        return base(logits, batch) + 0.5 * mu * prox

    return loss


def _cross_entropy(site: SiteRun, cohort: Cohort, train: np.ndarray) -> BatchLoss:
    weights = class_weights(cohort.labels[train], len(cohort.classes), site.cfg.training.class_weighting)

    def loss(logits: torch.Tensor, batch: BagBatch) -> torch.Tensor:
        w = None if weights is None else weights.to(logits.device)
        return nn.functional.cross_entropy(logits, batch.labels, weight=w)

    return loss


def _val_metrics(site: SiteRun, model: MILModel, cohort: Cohort, val: np.ndarray) -> Metrics:
    if not val.size:
        return {ph.VAL_LOSS: 0.0, ph.VAL_N: 0}
    logits, _ = slide_outputs(model, cohort, val, site.device, site.cfg.training.eval_batch_size)
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(cohort.labels[val]).long())
    return {ph.VAL_LOSS: float(loss), ph.VAL_N: int(val.size)}  # the loss only: metrics would import scikit-learn


def train_model(
    site: SiteRun,
    model: MILModel,
    cohort: Cohort,
    server_round: int,
    seed_offset: int,
    members: np.ndarray | None = None,
    val: np.ndarray | None = None,
    batch_loss: BatchLoss | None = None,
    proximal_mu: float = 0.0,
    rounds: int | None = None,
) -> Metrics:
    """Validate `model` (the global weights) on `val`, then train local epochs on `members`; with `rounds` (the
    phase's number of rounds) the local epochs follow training.scheduler's LR curve over all of them."""
    train = site.split("train") if members is None else members
    val = site.split("val") if val is None else val
    metrics: Metrics = {ph.NUM_EXAMPLES: int(train.size), ph.UNIT_WEIGHT: 1, **_val_metrics(site, model, cohort, val)}
    if train.size == 0:
        return metrics | {ph.TRAIN_LOSS: 0.0, ph.EPOCHS: 0, ph.SECONDS: 0.0}
    start = time.perf_counter()
    loss = with_proximal(batch_loss or _cross_entropy(site, cohort, train), model, proximal_mu)
    epochs = site.cfg.rounds.local_epochs
    schedule = None if rounds is None else ((server_round - 1) * epochs, rounds * epochs)
    losses = train_epochs(
        model,
        cohort,
        train,
        site.cfg.training,
        site.device,
        epochs,
        _seed(site, seed_offset, server_round),
        loss,
        schedule,
    )
    model.cpu()
    return metrics | {ph.TRAIN_LOSS: losses[-1], ph.EPOCHS: len(losses), ph.SECONDS: time.perf_counter() - start}


def _teacher_phase_models(site: SiteRun) -> dict[str, tuple[Callable[[], Cohort], int, int]]:
    """The models trained in the teacher phase's messages (its declared members): name -> (cohort, seed offset,
    rounds)."""
    rounds = site.cfg.rounds
    models = {
        p.TEACHER: (site.high_cohort, SEED_OFFSETS.teacher, rounds.teacher),
        p.BASELINE: (site.low_cohort, SEED_OFFSETS.baseline_rounds, rounds.baseline),
    }
    assert tuple(models) == ph.TEACHER.members
    return models


def teacher_round(
    site: SiteRun, record: ArrayRecord, server_round: int, mu: float = 0.0
) -> tuple[ArrayRecord, Metrics]:
    """One local round of the high-res teacher and, in the same message, of the low-res baseline (raw low features,
    cross-entropy only); a model past its own number of rounds is validated and sent back as it came."""
    received = unpack_models(record)
    out: dict[str, ArrayRecord] = {}
    metrics: Metrics = {
        ph.NUM_EXAMPLES: int(site.split("train").size),
        ph.UNIT_WEIGHT: 1,
        ph.EPOCHS: 0,
        ph.SECONDS: 0.0,
    }
    for name, (cohort, seed_offset, rounds) in _teacher_phase_models(site).items():
        model = _model(site, name, received[name])
        if server_round <= rounds:
            m = train_model(site, model, cohort(), server_round, seed_offset, proximal_mu=mu, rounds=rounds)
            out[name] = to_record(model)
            metrics[ph.EPOCHS] += m[ph.EPOCHS]
            metrics[ph.SECONDS] += m[ph.SECONDS]
            metrics[ph.member_metric(ph.TRAIN_LOSS, name)] = m[ph.TRAIN_LOSS]
        else:
            m = _val_metrics(site, model, cohort(), site.split("val"))
            out[name] = received[name]
        metrics.update(_member_val(m, name))
    if ph.member_metric(ph.TRAIN_LOSS, p.TEACHER) in metrics:
        metrics[ph.TRAIN_LOSS] = metrics[ph.member_metric(ph.TRAIN_LOSS, p.TEACHER)]
    return pack_models(out), metrics


def _member_val(metrics: Metrics, member: str | int) -> Metrics:
    """A packed model's val loss and count under its own metric names (`val-loss-teacher`, `val-n-2`)."""
    return {
        ph.member_metric(ph.VAL_LOSS, member): metrics[ph.VAL_LOSS],
        ph.member_metric(ph.VAL_N, member): metrics[ph.VAL_N],
    }


def _kd_cache(site: SiteRun) -> dict[str, Any]:
    cache = site.load(KD_CACHE)
    if cache is None:
        raise RuntimeError(f"{site.run_dir / KD_CACHE} is missing: the kd-cache phase has not run at this site")
    return cache


def student_round(
    site: SiteRun, record: ArrayRecord, server_round: int, mu: float = 0.0
) -> tuple[ArrayRecord, Metrics]:
    """One local round of the low-res student: CE + KD from the cached teacher/expert logits and, when on, LRMIL's
    attention KD and instance loss from the cached teacher attention. The instance head stays at the site (its
    weights carry over between rounds in the run directory); only the student's weights leave."""
    cache = _kd_cache(site)
    cohort = site.data().cohort(cache["bags"])
    kd = site.cfg.kd
    train = site.split("train")
    weights = class_weights(cohort.labels[train], len(cohort.classes), site.cfg.training.class_weighting)
    targets = KDTargets(cache["teacher"], cache["experts"], cache["cluster"])
    attention, head = cache.get("attention"), None
    width = cache.get("instance_width")
    if attention is not None and width is not None:
        head = instance_head(int(width), _seed(site, SEED_OFFSETS.student_rounds, 0))
        saved = site.load(INSTANCE_HEAD_FILE)
        if saved is not None:
            head.load_state_dict(saved["state"])
    loss = kd_loss(kd, targets, weights, attention=attention, head=head)
    model = _model(site, p.STUDENT, record)
    with loss.attached(model):
        metrics = train_model(
            site,
            model,
            cohort,
            server_round,
            SEED_OFFSETS.student_rounds,
            batch_loss=loss,
            proximal_mu=mu,
            rounds=site.cfg.rounds.student,
        )
    if head is not None and loss.guidance is not None:
        site.save(INSTANCE_HEAD_FILE, {"state": {k: v.cpu() for k, v in head.state_dict().items()}})
    return to_record(model), metrics


# ---- clusters and experts -------------------------------------------------------------------------
def _vectors(site: SiteRun, outputs: dict[str, Any], prefix: str = "") -> np.ndarray:
    """The vectors clustering reads, of the training slides (or with prefix "val_" the val slides)."""
    return cluster_vectors(site.cfg.clusters.features, outputs[f"{prefix}logits"], outputs[f"{prefix}embedding"])


def local_assignment(site: SiteRun, vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cluster of each local training slide: size-constrained at the site's scale, else nearest centroid."""
    c = site.cfg.clusters
    try:
        lo, hi = size_bounds(len(vectors), len(centroids), c.min_size_ratio, c.max_size_ratio, 1)
        return constrained_assignment(squared_distances(vectors, centroids), lo, hi)
    except ClusteringError:
        return assign_nearest(vectors, centroids)


def _released(
    site: SiteRun, vectors: np.ndarray, centroids: np.ndarray, assignment: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Cluster sums/counts as sent: vectors clipped (cluster-clip-norm), fresh unseeded noise on every release
    (cluster-noise-std), clusters of fewer than suppress-below slides withheld."""
    cfg, rng = site.cfg, np.random.default_rng()
    sums, counts = released_statistics(
        vectors, centroids, assignment, cfg.min_count, cfg.cluster_clip_norm, cfg.cluster_noise_std, rng
    )
    return {ph.SUMS: sums, ph.COUNTS: counts}


def cluster_init(site: SiteRun, teacher: ArrayRecord, fingerprint: str) -> tuple[dict[str, np.ndarray], Metrics]:
    """Teacher outputs of the site's training slides (kept here) and local k-means sums/counts to seed the centroids."""
    model = _model(site, p.TEACHER, teacher)
    cohort = site.high_cohort()
    train, val = site.split("train"), site.split("val")
    logits, embedding = slide_outputs(model, cohort, train, site.device)
    val_logits, val_embedding = slide_outputs(model, cohort, val, site.device)
    outputs = {
        "fingerprint": fingerprint,
        "logits": logits,
        "embedding": embedding,
        "val_logits": val_logits,
        "val_embedding": val_embedding,
    }
    site.save(TEACHER_OUTPUTS, outputs)
    vectors = _vectors(site, outputs)
    k = min(site.cfg.clusters.num_clusters, len(vectors))
    local = kmeans_init(vectors, k, site.cfg.seed, site.cfg.clusters.n_init)
    return (
        _released(site, vectors, local),
        {ph.N_TRAIN: int(train.size), ph.EMBEDDING_DIM: int(vectors.shape[1])},
    )


def _teacher_outputs(site: SiteRun, fingerprint: str) -> dict[str, Any]:
    outputs = site.load(TEACHER_OUTPUTS, fingerprint)
    if outputs is None:
        raise RuntimeError(
            f"{site.run_dir / TEACHER_OUTPUTS} is missing or from another teacher: run cluster-init first"
        )
    return outputs


def cluster_stats(site: SiteRun, centroids: np.ndarray, fingerprint: str) -> tuple[dict[str, np.ndarray], Metrics]:
    """Per-cluster sums and counts of the site's training slides under `centroids` (small counts withheld)."""
    vectors = _vectors(site, _teacher_outputs(site, fingerprint))
    assignment = local_assignment(site, vectors, centroids)
    return _released(site, vectors, centroids, assignment), {ph.N_TRAIN: int(len(vectors))}


def _assignments(site: SiteRun, centroids: np.ndarray, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    outputs = _teacher_outputs(site, fingerprint)
    train = local_assignment(site, _vectors(site, outputs), centroids)
    val_vectors = _vectors(site, outputs, "val_")
    val = assign_nearest(val_vectors, centroids) if len(val_vectors) else np.zeros(0, int)
    return train, val


def experts_round(
    site: SiteRun, record: ArrayRecord, centroids: np.ndarray, fingerprint: str, server_round: int, mu: float = 0.0
) -> tuple[ArrayRecord, Metrics]:
    """One local round of every expert, each on the site's training slides of its cluster."""
    cohort = site.high_cohort()
    train, val = site.split("train"), site.split("val")
    train_assign, val_assign = _assignments(site, centroids, fingerprint)
    experts = unpack_experts(record)
    out: list[ArrayRecord] = []
    metrics: Metrics = {ph.NUM_EXAMPLES: int(train.size), ph.UNIT_WEIGHT: 1}
    for c, expert_record in enumerate(experts):
        model = _model(site, p.EXPERTS, expert_record)
        members, own_val = train[train_assign == c], val[val_assign == c]
        if members.size < site.cfg.min_count:  # too few slides to share an update about
            members = members[:0]
        m = train_model(
            site,
            model,
            cohort,
            server_round,
            SEED_OFFSETS.experts + c,
            members=members,
            val=own_val,
            proximal_mu=mu,
            rounds=site.cfg.rounds.experts,
        )
        metrics[ph.member_metric(ph.N_EXPERT, c)] = int(members.size)
        metrics.update(_member_val(m, c))
        metrics[ph.member_metric(ph.TRAIN_LOSS, c)] = m[ph.TRAIN_LOSS]
        out.append(to_record(model) if members.size else expert_record)
    return pack_experts(out), metrics


# ---- student distillation (weights mode) ----------------------------------------------------------
def kd_cache(
    site: SiteRun,
    teacher: ArrayRecord,
    experts: ArrayRecord | None,
    adapter: ArrayRecord,
    centroids: np.ndarray | None,
    fingerprint: str,
) -> Metrics:
    """Cache teacher/expert logits of the training slides, the student's adapted bags and, with LRMIL's attention
    terms on, the global teacher's attention mapped onto the student's instances (all stays here)."""
    start = time.perf_counter()
    data = site.data()
    train = data.split("train")
    high = site.high_cohort()
    kd = site.cfg.kd
    assert site.facts is not None
    width = attention_kd_width(  # refuses models without attention before anything is computed
        kd, student_config(site.cfg, site.facts), teacher_config(site.cfg, site.facts), site.cfg.training.max_instances
    )
    teacher_model = _model(site, p.TEACHER, teacher)
    t_logits, _ = slide_outputs(teacher_model, high, train, site.device)
    attention = None
    if attention_terms_on(kd):
        scores = teacher_attention(teacher_model, high, train, site.device)
        attention = attention_targets(data, train, scores, _mode(site), kd.attention_agg)
    e_logits = assign = None
    if experts is not None and centroids is not None:
        e_logits = torch.stack(
            [
                slide_outputs(_model(site, p.EXPERTS, rec), high, train, site.device)[0]
                for rec in unpack_experts(experts)
            ]
        )
        assign, _ = _assignments(site, centroids, fingerprint)
    targets = scatter_kd_targets(len(data.slides), len(data.classes), train, t_logits, e_logits, assign)
    bags = student_bags(_adapter(site, adapter), data, _mode(site))
    if student_stats(site) is not None:  # the cache holds the instances the student reads: standardised
        bags = site.standardised(bags)
    site.save(
        KD_CACHE,
        {
            "teacher": targets.teacher,
            "experts": targets.experts,
            "cluster": targets.cluster,
            "bags": bags,
            "attention": attention,
            "instance_width": width,
        },
    )
    (site.run_dir / INSTANCE_HEAD_FILE).unlink(missing_ok=True)  # a new cache starts a new instance head
    return {ph.N_TRAIN: int(train.size), ph.SECONDS: time.perf_counter() - start}


# ---- push-back and evaluation ---------------------------------------------------------------------
PREDICTIONS = "predictions.csv"


def _timed_logits(model: MILModel, cohort: Cohort, idx: np.ndarray, site: SiteRun) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    logits, _ = slide_outputs(model, cohort, idx, site.device)
    return logits, (time.perf_counter() - start) / max(int(idx.size), 1)


def _write_predictions(site: SiteRun, idx: np.ndarray, logits: dict[str, torch.Tensor]) -> None:
    """Per-slide probabilities of every model, kept at the site (`<run>/predictions.csv`)."""
    import csv

    data = site.data()
    probs = {name: torch.softmax(v.double(), dim=1).numpy() for name, v in logits.items()}
    site.run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(site.run_dir / PREDICTIONS, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["slide_id", "patient_id", "split", "label"]
            + [f"{name}_p{k}" for name in probs for k in range(len(data.classes))]
        )
        for row, i in enumerate(idx):
            s = data.slides[int(i)]
            writer.writerow(
                [s.slide_id, s.patient_id.split("/", 1)[-1], s.split, data.classes[s.label]]
                + [f"{p:.6f}" for name in probs for p in probs[name][row]]
            )


def _adapted_cohort(site: SiteRun, adapter_model: CrossResAdapter) -> Cohort:
    """Every slide's student instances (standardised as the student reads them)."""
    data = site.data()
    bags = student_bags(adapter_model, data, _mode(site))
    return data.cohort(site.standardised(bags) if student_stats(site) is not None else bags)


def calibrate(site: SiteRun, teacher: ArrayRecord, student: ArrayRecord, adapter: ArrayRecord) -> Metrics:
    """The final teacher's and student's summed NLL on the site's val slides at each grid temperature; nothing but
    val-n 0 when the site has fewer than suppress-below val slides."""
    val = site.split("val")
    if val.size == 0 or val.size < site.cfg.min_count:
        return {ph.VAL_N: 0}
    labels = site.data().labels[val]
    t_logits, _ = slide_outputs(_model(site, p.TEACHER, teacher), site.high_cohort(), val, site.device)
    s_cohort = _adapted_cohort(site, _adapter(site, adapter))
    s_logits, _ = slide_outputs(_model(site, p.STUDENT, student), s_cohort, val, site.device)
    metrics: Metrics = {ph.VAL_N: int(val.size)}
    metrics.update(grid_metrics("teacher_high", t_logits, labels))
    metrics.update(grid_metrics("student_low", s_logits, labels))
    return metrics


def final_evaluation(
    site: SiteRun,
    teacher: ArrayRecord,
    student: ArrayRecord,
    baseline: ArrayRecord,
    adapter: ArrayRecord,
    split: str = "test",
    temperatures: dict[str, float] | None = None,
    ood: ArrayRecord | None = None,
    clinical: ClinicalModel | None = None,
) -> Metrics:
    """Keep the final adapter + student as a bundle and per-slide predictions here; metrics of teacher (high),
    student and baseline (low) on the site's `split` slides ("all": every labelled slide, an evaluation-only site).
    `temperatures` ("teacher_high", "student_low"; 1 when absent) go into the bundle and scale the logits of the
    metrics and predictions, so that they are the bundle's outputs (as `fedslide evaluate` scores bundles).
    `ood`: the federation's pooled OOD statistics (the evaluation's `ood` record; none: no OOD score);
    `clinical`: the federated BD model the bundle carries (`clinical.pt`; None: none)."""
    temperatures = temperatures or {}
    data = site.data()
    idx = np.arange(len(data.slides)) if split == "all" else data.split(split)
    teacher_model, student_model = _model(site, p.TEACHER, teacher), _model(site, p.STUDENT, student)
    baseline_model, adapter_model = _model(site, p.BASELINE, baseline), _adapter(site, adapter)
    mode = _mode(site)
    assert site.facts is not None
    # VIB fine-tunes the encoder of both levels: the bundle carries it (encoder.pt) and its meta says so
    vib_tuned = site.cfg.pixel_stage1_objective == "vib" and site.finetuned_low() is not None
    run_facts = {"role": "federated_student", "run": site.run_dir.name}
    # the tissue/tiling settings this site preprocessed with, as its feature files record them
    meta = bundle_meta(data, mode, None, run_facts | ({"encoder_finetuned": "vib"} if vib_tuned else {}))
    s_stats = student_stats(site)
    StudentBundle(
        meta,
        adapter_model,
        student_model,
        teacher_model,
        student_config(site.cfg, site.facts),
        teacher_config(site.cfg, site.facts),
        # the VIB objective fine-tunes the encoder of both levels: no separate low-res encoder
        low_encoder_weights=(
            site.run_dir / STAGE1_ENCODER
            if site.finetuned_low() and site.cfg.pixel_stage1_objective == "lrmil"
            else None
        ),
        student_scaling=ModelScaling(s_stats, temperatures.get("student_low", 1.0)),
        teacher_scaling=ModelScaling(site.feature_stats, temperatures.get("teacher_high", 1.0)),
        ood=site_ood(site, ood, split),
        encoder_weights=site.run_dir / STAGE1_ENCODER if vib_tuned else None,
        clinical=clinical,
    ).save(site.run_dir / BUNDLE_DIR)
    metrics: Metrics = {ph.N_TEST: int(idx.size), ph.NUM_EXAMPLES: int(idx.size)}
    if not idx.size:
        return metrics
    adapted = _adapted_cohort(site, adapter_model)
    timed = {
        "teacher_high": _timed_logits(teacher_model, site.high_cohort(), idx, site),
        "student_low": _timed_logits(student_model, adapted, idx, site),
        "baseline_low": _timed_logits(baseline_model, site.low_cohort(), idx, site),
    }
    # the bundle's outputs: logits over each model's temperature (1 unless the run calibrated it)
    scaled = {name: logits / temperatures.get(name, 1.0) for name, (logits, _) in timed.items()}
    _write_predictions(site, idx, scaled)
    labels = data.labels[idx]
    for name, logits in scaled.items():
        for key, value in metrics_from_logits(logits, labels, site.cfg.ece_bins).items():
            if value is not None and np.isfinite(value):
                metrics[ph.model_metric(name, key)] = float(value)
        probs = torch.softmax(logits.double(), dim=1).numpy()
        metrics.update(per_class.site_metrics(name, labels, probs, site.cfg.ece_bins))  # C > 2 only
    metrics[ph.cost_metric("high", "patches_per_slide")] = float(np.mean([len(data.slides[i].high) for i in idx]))
    metrics[ph.cost_metric("low", "patches_per_slide")] = float(np.mean([len(data.slides[i].low) for i in idx]))
    metrics[ph.cost_metric("high", "seconds_per_slide")] = timed["teacher_high"][1]
    metrics[ph.cost_metric("low", "seconds_per_slide")] = timed["student_low"][1]
    return metrics


def site_ood(site: SiteRun, record: ArrayRecord | None, split: str) -> OODStats | None:
    """The pooled OOD statistics with the flag threshold set on this site's validation slides (which stay here);
    no threshold at an evaluation-only site (`split` "all": its slides may themselves be out of distribution)."""
    if record is None:
        return None
    data = site.data()
    stats = ood_from_record(record, data.feature_dim)
    val = [] if split == "all" else [data.slides[i].low.features for i in data.split("val")]
    return stats.with_threshold(slide_embeddings(val) if val else np.zeros((0, data.feature_dim)))


# ---- the site steps of the weights phases, by phase: one local round, and validation of the global model ----
TrainStep = Callable[[SiteRun, RecordDict, int, float], tuple[ArrayRecord, Metrics]]
ValidateStep = Callable[[SiteRun, RecordDict], Metrics]


def _centroids(content: RecordDict) -> np.ndarray:
    return content.array_records[p.CENTROIDS][ph.CENTROIDS].numpy()


def _validate_adapter(site: SiteRun, content: RecordDict) -> Metrics:
    return {
        ph.NUM_EXAMPLES: int(site.split("train").size),
        **_adapter_val_metrics(site, _adapter(site, content.array_records[p.ARRAYS])),
    }


def _validate_teacher(site: SiteRun, content: RecordDict) -> Metrics:
    members = unpack_models(content.array_records[p.ARRAYS])
    metrics: Metrics = {ph.NUM_EXAMPLES: int(site.split("train").size)}
    for name, (cohort, _, _) in _teacher_phase_models(site).items():
        metrics.update(
            _member_val(_val_metrics(site, _model(site, name, members[name]), cohort(), site.split("val")), name)
        )
    return metrics


def _validate_experts(site: SiteRun, content: RecordDict) -> Metrics:
    _, val_assign = _assignments(
        site, _centroids(content), str(content.config_records[p.CONFIG][ph.TEACHER_FINGERPRINT])
    )
    cohort, val = site.high_cohort(), site.split("val")
    metrics: Metrics = {ph.NUM_EXAMPLES: int(site.split("train").size)}
    for c, rec in enumerate(unpack_experts(content.array_records[p.ARRAYS])):
        metrics.update(_member_val(_val_metrics(site, _model(site, p.EXPERTS, rec), cohort, val[val_assign == c]), c))
    return metrics


def _validate_student(site: SiteRun, content: RecordDict) -> Metrics:
    cohort = site.data().cohort(_kd_cache(site)["bags"])
    return {
        ph.NUM_EXAMPLES: int(site.split("train").size),
        **_val_metrics(site, _model(site, p.STUDENT, content.array_records[p.ARRAYS]), cohort, site.split("val")),
    }


TRAIN_STEPS: dict[ph.Phase, TrainStep] = {
    ph.PIXEL_STAGE1: lambda site, content, server_round, mu: pixel_stage1_round(
        site, content.array_records[p.ARRAYS], server_round
    ),
    ph.ADAPTER: lambda site, content, server_round, mu: adapter_round(
        site, content.array_records[p.ARRAYS], server_round
    ),
    ph.TEACHER: lambda site, content, server_round, mu: teacher_round(
        site, content.array_records[p.ARRAYS], server_round, mu
    ),
    ph.EXPERTS: lambda site, content, server_round, mu: experts_round(
        site,
        content.array_records[p.ARRAYS],
        _centroids(content),
        str(content.config_records[p.CONFIG][ph.TEACHER_FINGERPRINT]),
        server_round,
        mu,
    ),
    ph.STUDENT: lambda site, content, server_round, mu: student_round(
        site, content.array_records[p.ARRAYS], server_round, mu
    ),
    ph.CLINICAL: clinical_train,
}
VALIDATE_STEPS: dict[ph.Phase, ValidateStep] = {
    ph.PIXEL_STAGE1: _validate_pixel_stage1,
    ph.ADAPTER: _validate_adapter,
    ph.TEACHER: _validate_teacher,
    ph.EXPERTS: _validate_experts,
    ph.STUDENT: _validate_student,
    ph.CLINICAL: validate_clinical,
}


def train(
    site: SiteRun, phase: ph.Phase, content: RecordDict, server_round: int, mu: float
) -> tuple[ArrayRecord, Metrics]:
    """One local round of a weights phase's model(s), from the arrays in `content`."""
    if phase not in TRAIN_STEPS:
        raise ValueError(f"phase {phase.name!r} has no local training; weights phases: {[x.name for x in TRAIN_STEPS]}")
    return TRAIN_STEPS[phase](site, content, server_round, mu)


def validate(site: SiteRun, phase: ph.Phase, content: RecordDict) -> Metrics:
    """Validation loss of a phase's global model on the site's val slides (per model of a packed phase)."""
    if phase not in VALIDATE_STEPS:
        raise ValueError(
            f"unknown phase {phase.name!r} to validate; weights phases: {[x.name for x in VALIDATE_STEPS]}"
        )
    return VALIDATE_STEPS[phase](site, content)


# ---- student distillation (logits mode) -----------------------------------------------------------
def bags_cohort(bags: list[np.ndarray], classes: tuple[str, ...]) -> Cohort:
    """A label-free cohort over anonymous bags (the proxy cohort as a site sees it)."""
    from pathlib import Path

    from fedslide.common.training.cohort import Slide

    slides = [Slide(f"proxy-{i}", 0, f"proxy-{i}", "test", Path("."), len(b)) for i, b in enumerate(bags)]
    return Cohort(
        slides, classes, int(bags[0].shape[1]), False, {}, {s.slide_id: (b, None) for s, b in zip(slides, bags)}
    )


def proxy_logits(
    site: SiteRun,
    teacher: ArrayRecord,
    experts: ArrayRecord | None,
    centroids: np.ndarray | None,
    proxy: ArrayRecord,
    fingerprint: str,
) -> tuple[dict[str, np.ndarray], Metrics]:
    """Fine-tune the global teacher (and each expert on its cluster) on the site's slides; their logits on the proxy."""
    start = time.perf_counter()
    assert site.facts is not None
    proxy_bags = unpack_bags(proxy)
    if site.feature_stats is not None:  # the teacher and experts read standardised 20x-like instances
        proxy_bags = [
            site.feature_stats.apply(torch.from_numpy(np.array(b, dtype=np.float32))).numpy() for b in proxy_bags
        ]
    proxy_cohort = bags_cohort(proxy_bags, site.facts.classes)
    everyone = np.arange(len(proxy_cohort.slides))
    high = site.high_cohort()
    train, val = site.split("train"), site.split("val")
    model = _model(site, p.TEACHER, teacher)
    train_model(site, model, high, 0, SEED_OFFSETS.proxy_teacher, members=train, val=val[:0])
    out = {ph.TEACHER_LOGITS: slide_outputs(model, proxy_cohort, everyone, site.device)[0].numpy().astype(np.float32)}
    if experts is not None and centroids is not None:
        assign, _ = _assignments(site, centroids, fingerprint)
        logits, weights = [], []
        for c, record in enumerate(unpack_experts(experts)):
            members = train[assign == c]
            if members.size < site.cfg.min_count:
                members = members[:0]
            expert = _model(site, p.EXPERTS, record)
            train_model(site, expert, high, 0, SEED_OFFSETS.proxy_experts + c, members=members, val=val[:0])
            logits.append(slide_outputs(expert, proxy_cohort, everyone, site.device)[0].numpy())
            weights.append(float(members.size))
        out[ph.EXPERT_LOGITS] = np.stack(logits).astype(np.float32)
        out[ph.EXPERT_WEIGHTS] = np.asarray(weights, dtype=np.float32)
    return out, {ph.N_TRAIN: int(train.size), ph.PROXY_N: int(everyone.size), ph.SECONDS: time.perf_counter() - start}
