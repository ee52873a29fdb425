"""The hospital's Flower ClientApp: the site step of every declared phase; every reply passes the egress policy.

The SuperNode's node config names the site (`site-dir`, optional `runs-dir`, `site-name`); the run
config is the federation's (`FederationConfig`). Each reply is checked by `common.egress.check_reply`
and appended to `<runs-dir>/<run_id>/egress.jsonl` (hash-chained; mirrored to syslog with the node config's
`ledger-syslog`) before it is returned to Flower. A failure is logged here in full and leaves as an error reply
with an `ErrorCode` and its fixed message only, ledgered like any reply.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedslide.client import clinical_site
from fedslide.client import local_phases as phases
from fedslide.client.local_dp import apply_local_dp
from fedslide.client.site_run import EGRESS_FILE, RunIdError, SiteConfigError, SiteRun, private_umask, run_dir_for
from fedslide.common.clinical import ClinicalDataError
from fedslide.common.config.base import ConfigError
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.floors import SiteFloors, SiteRefusal
from fedslide.common.distillation.bundle import BundleMismatchError
from fedslide.common.distillation.clustering import ClusteringError
from fedslide.common.distillation.instances import MissingTokensError
from fedslide.common.egress import (
    Allowed,
    ArraySpec,
    EgressLedger,
    EgressViolation,
    ErrorCode,
    arrays_reply,
    check_reply,
    error_of,
    specs_of,
    weights_reply,
)
from fedslide.common.features import FeatureFileError
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.clinical_sums import with_clinical_sums
from fedslide.common.federation.feature_stats import feature_sums_allowed, feature_sums_record, stats_from_record
from fedslide.common.federation.models import fingerprint
from fedslide.common.federation.ood_stats import site_ood_sums, with_ood_sums
from fedslide.common.training.errors import TrainingInputError
from fedslide.common.training.standardize import site_feature_sums

log = logging.getLogger(__name__)

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def _site(message: Message, context: Context) -> SiteRun:
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    config = message.content.config_records[p.CONFIG]
    site = SiteRun.from_node_config(dict(context.node_config), cfg, str(config[ph.RUN_ID]))
    if "classes" in config:
        site.facts = p.Facts.from_config(config)
        if ph.STANDARDIZE in message.content.array_records:  # the federation's pooled standardisation
            site.feature_stats = stats_from_record(
                message.content.array_records[ph.STANDARDIZE], site.facts.feature_dim
            )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return site


def _round(config: ConfigRecord) -> int:
    return int(cast(int, config.get(ph.SERVER_ROUND, 0))) + int(cast(int, config.get(ph.ROUND_OFFSET, 0)))


def _send(message: Message, site: SiteRun, content: RecordDict, allowed: Allowed) -> Message:
    check_reply(content, allowed)
    site.ledger.append(allowed.phase, _round(message.content.config_records[p.CONFIG]), content)
    return Message(content, reply_to=message)


def error_code(exc: BaseException) -> tuple[ErrorCode, str | None]:
    """The error code a site failure is sent as, and the text that may go with it: a privacy floor's refusal only
    (its text is made of the run config and the site's floors); any other text stays in the site's log."""
    if isinstance(exc, SiteRefusal):
        return ErrorCode.PRIVACY_FLOOR, str(exc)
    if isinstance(exc, EgressViolation):
        return ErrorCode.EGRESS_REFUSED, None
    if isinstance(exc, SiteConfigError | RunIdError):
        return ErrorCode.SITE_CONFIG, None
    if isinstance(
        exc, TrainingInputError | FeatureFileError | MissingTokensError | ClusteringError | ClinicalDataError
    ):
        return ErrorCode.SITE_DATA, None
    if isinstance(exc, ConfigError | BundleMismatchError | KeyError):  # the run config or the server's message
        return ErrorCode.RUN_REQUEST, None
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return ErrorCode.RESOURCES, None
    return ErrorCode.INTERNAL, None


def _phase_of(message: Message) -> str:
    """The phase a message belongs to (its config's `phase` for train/evaluate, else its message type)."""
    try:
        config = message.content.config_records[p.CONFIG]
        if ph.PHASE in config:
            return ph.by_config(str(config[ph.PHASE])).name
    except (KeyError, ValueError):
        pass
    for phase in ph.ALL:
        if phase.message_type == message.metadata.message_type:
            return phase.name
    return str(message.metadata.message_type)


def _error_ledger(message: Message, context: Context, site: SiteRun | None) -> EgressLedger | None:
    """The run's ledger, also where the site could not be set up (e.g. a privacy floor refused the run); None when
    there is no run directory to write it in (no site-dir, or a run id that would leave `runs/`)."""
    if site is not None:
        return site.ledger
    try:
        node = dict(context.node_config)
        site_dir = Path(str(node["site-dir"])).expanduser()
        runs_dir = Path(str(node.get("runs-dir") or site_dir / "runs")).expanduser()
        run_dir = run_dir_for(runs_dir, str(message.content.config_records[p.CONFIG][ph.RUN_ID]))
    except (KeyError, RunIdError):
        return None
    if not site_dir.is_dir():
        return None
    syslog = node.get("ledger-syslog")
    return EgressLedger(run_dir / EGRESS_FILE, str(syslog) if syslog else None)


def guarded(handler: Callable[[Message, Context, SiteRun], Message]) -> Handler:
    """Build the site, run the handler; a failure is logged here in full and answered with an error reply that
    carries only its code and fixed message (ledgered where the run has a directory)."""

    @private_umask()  # everything the step writes at the site is private: files 0600, directories 0700
    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        site = None
        try:
            site = _site(message, context)
            return handler(message, context, site)
        except Exception as exc:
            code, detail = error_code(exc)
            log.exception(
                "site %s: %s failed; sent as error %d %s",
                site.name if site else "?",
                message.metadata.message_type,
                int(code),
                code.label,
            )
            error = error_of(code, detail)
            try:
                ledger = _error_ledger(message, context, site)
                if ledger is not None:
                    config = message.content.config_records.get(p.CONFIG, ConfigRecord())
                    ledger.append_error(_phase_of(message), _round(config), error)
            except Exception:  # the reply holds the fixed text only; it is sent even when it cannot be ledgered
                log.exception("site %s: the error reply could not be written to the ledger", site.name if site else "?")
            return Message(error, reply_to=message)

    return wrapper


def _stats_record(stats: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {
            ph.SUMS: Array(np.asarray(stats[ph.SUMS], dtype=np.float64)),
            ph.COUNTS: Array(np.asarray(stats[ph.COUNTS], dtype=np.int64)),
        }
    )


def _stats_allowed(phase: ph.Phase, clusters: int, dim: int) -> Allowed:
    return arrays_reply(
        phase.name, {ph.SUMS: ArraySpec((clusters, dim), "float64"), ph.COUNTS: ArraySpec((clusters,), "int64")}
    )


def _fingerprint(content: RecordDict) -> str:
    return str(content.config_records[p.CONFIG].get(ph.TEACHER_FINGERPRINT, ""))


def _centroids(content: RecordDict) -> np.ndarray | None:
    return content.array_records[p.CENTROIDS][ph.CENTROIDS].numpy() if p.CENTROIDS in content else None


@guarded
def handshake(message: Message, context: Context, site: SiteRun) -> Message:
    """Counts, class balance and encoder identity of the site (no slide ids)."""
    site.facts = None  # the handshake reads the site's own class list
    site.own_low_features = True  # and its own encoder's 5x files, also after pixel stage 1
    data = site.data()
    attrs = data.low_attrs
    counts: phases.Metrics = {
        ph.ENCODER_DIM: data.feature_dim,
        ph.TOKEN_GRID: data.token_grid,
        ph.CHILD_GRID: data.child_grid,
    }
    for split in ph.SPLITS:
        idx = data.split(split)
        counts[ph.split_count(split)] = int(idx.size)
        for k, n in enumerate(np.bincount(data.labels[idx], minlength=len(data.classes)).tolist()):
            counts[ph.split_count(split, k)] = int(n)
    info = ConfigRecord(
        {
            ph.SITE_NAME: site.name,
            ph.ENCODER_NAME: str(attrs.get("encoder_name") or data.encoder),
            ph.ENCODER_HASH: str(attrs.get("encoder_weights_hash", "")),
            ph.ENCODER_FINGERPRINT: str(attrs.get("encoder_fingerprint", "")),
            ph.CLASSES: list(data.classes),
        }
    )
    content = RecordDict({p.SITE: info, p.METRICS: p.metric_record(counts)})
    allowed = Allowed(ph.HANDSHAKE.name)
    if site.cfg.standardize:  # the training bags' 20x feature sums, withheld below suppress-below slides
        sums = site_feature_sums(site.high_cohort(), data.split("train"), site.cfg.min_count)
        content[p.STATS] = feature_sums_record(sums)
        allowed = feature_sums_allowed(data.feature_dim)
    if site.cfg.ood_stats and not site.cfg.pixel_stage1:  # the training slides' mean 5x features (OOD score)
        bags = [data.slides[i].low.features for i in data.split("train")]
        release = site_ood_sums(bags, data.feature_dim, site.cfg.min_count)
        stats = content.array_records[p.STATS] if p.STATS in content.array_records else None
        content[p.STATS], allowed = with_ood_sums(stats, allowed, release, data.feature_dim)
    if site.cfg.clinical.enabled:  # the training slides' clinical sums (the BD model's input normalisation)
        stats = content.array_records[p.STATS] if p.STATS in content.array_records else None
        dim = site.cfg.clinical.encoded_dim
        content[p.STATS], allowed = with_clinical_sums(stats, allowed, clinical_site.clinical_release(site), dim)
    return _send(message, site, content, allowed)


@guarded
def train(message: Message, context: Context, site: SiteRun) -> Message:
    """One local round of the weights phase named in the config (adapter, teacher with the baseline, experts,
    student); with site-side DP on, the update is clipped and noised here before it leaves."""
    config = message.content.config_records[p.CONFIG]
    phase = ph.by_config(str(config[ph.PHASE]))
    mu = float(cast(float, config.get(ph.PROXIMAL_MU, 0.0)))
    arrays, metrics = phases.train(site, phase, message.content, _round(config), mu)
    sent = message.content.array_records[p.ARRAYS]
    arrays = apply_local_dp(
        sent, arrays, site.cfg, SiteFloors.from_node_config(dict(context.node_config)), site.run_dir
    )
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: p.metric_record(metrics)})
    return _send(message, site, content, weights_reply(phase.name, message.content.array_records[p.ARRAYS]))


@guarded
def evaluate(message: Message, context: Context, site: SiteRun) -> Message:
    """Validation of a weights phase's global model, or (the evaluation phase) the push-back and local test
    evaluation."""
    config = message.content.config_records[p.CONFIG]
    phase = ph.by_config(str(config[ph.PHASE]))
    if phase is ph.EVALUATION:
        c = message.content
        bd, split = clinical_site.bundle_model(site, c), str(config.get(ph.EVAL_SPLIT, "test"))
        metrics = phases.final_evaluation(
            site,
            c.array_records[p.TEACHER],
            c.array_records[p.STUDENT],
            c.array_records[p.BASELINE],
            c.array_records[p.ADAPTER],
            split,
            {
                model: float(cast(float, config[key]))
                for model, key in (("teacher_high", ph.TEACHER_TEMPERATURE), ("student_low", ph.STUDENT_TEMPERATURE))
                if key in config
            },
            c.array_records.get(ph.OOD),
            bd,
        )
        metrics.update(clinical_site.evaluation_metrics(site, c, bd, split))  # BD rows: with / without clinical
    else:
        metrics = phases.validate(site, phase, message.content)
    return _send(message, site, RecordDict({p.METRICS: p.metric_record(metrics)}), Allowed(phase.name))


@guarded
def pixel_stage1_init(message: Message, context: Context, site: SiteRun) -> Message:
    """The site's initial trainable 5x encoder parameters (exactly those its finetune settings train)."""
    arrays, metrics = phases.pixel_stage1_init(site)
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: p.metric_record(metrics)})
    return _send(message, site, content, arrays_reply(ph.PIXEL_STAGE1_INIT.name, specs_of(arrays)))


@guarded
def pixel_stage1_reencode(message: Message, context: Context, site: SiteRun) -> Message:
    """Keep the global fine-tuned 5x encoder and re-encode the site's 5x features with it (only counts leave)."""
    metrics = phases.pixel_stage1_reencode(site, message.content.array_records[p.ARRAYS])
    content = RecordDict({p.METRICS: p.metric_record(metrics)})
    return _send(message, site, content, Allowed(ph.PIXEL_STAGE1_REENCODE.name))


@guarded
def cluster_init(message: Message, context: Context, site: SiteRun) -> Message:
    """Teacher outputs of the training slides (kept) and local k-means sums/counts (sent)."""
    teacher = message.content.array_records[p.TEACHER]
    stats, metrics = phases.cluster_init(site, teacher, fingerprint(teacher))
    c, e = stats[ph.SUMS].shape
    content = RecordDict({p.STATS: _stats_record(stats), p.METRICS: p.metric_record(metrics)})
    return _send(message, site, content, _stats_allowed(ph.CLUSTER_INIT, c, e))


@guarded
def cluster_stats(message: Message, context: Context, site: SiteRun) -> Message:
    """Per-cluster sums and counts under the server's centroids."""
    centroids = message.content.array_records[p.CENTROIDS][ph.CENTROIDS].numpy()
    stats, metrics = phases.cluster_stats(
        site, centroids, str(message.content.config_records[p.CONFIG][ph.TEACHER_FINGERPRINT])
    )
    content = RecordDict({p.STATS: _stats_record(stats), p.METRICS: p.metric_record(metrics)})
    return _send(message, site, content, _stats_allowed(ph.CLUSTER_STATS, *centroids.shape))


@guarded
def calibrate(message: Message, context: Context, site: SiteRun) -> Message:
    """The final teacher's and student's summed val NLL over the temperature grid (scalars only)."""
    c = message.content
    metrics = phases.calibrate(site, c.array_records[p.TEACHER], c.array_records[p.STUDENT], c.array_records[p.ADAPTER])
    return _send(message, site, RecordDict({p.METRICS: p.metric_record(metrics)}), Allowed(ph.CALIBRATE.name))


@guarded
def kd_cache(message: Message, context: Context, site: SiteRun) -> Message:
    """Cache teacher/expert logits and the adapted student bags at the site (only counts are sent)."""
    c = message.content
    metrics = phases.kd_cache(
        site,
        c.array_records[p.TEACHER],
        c.array_records.get(p.EXPERTS),
        c.array_records[p.ADAPTER],
        _centroids(c),
        _fingerprint(c),
    )
    metrics[ph.NUM_EXAMPLES] = metrics[ph.N_TRAIN]
    return _send(message, site, RecordDict({p.METRICS: p.metric_record(metrics)}), Allowed(ph.KD_CACHE.name))


@guarded
def logits(message: Message, context: Context, site: SiteRun) -> Message:
    """Logits mode: teacher/expert logits on the proxy cohort the server sent (nothing about the site's slides)."""
    c = message.content
    out, metrics = phases.proxy_logits(
        site,
        c.array_records[p.TEACHER],
        c.array_records.get(p.EXPERTS),
        _centroids(c),
        c.array_records[p.PROXY],
        _fingerprint(c),
    )
    record = ArrayRecord({k: Array(v) for k, v in out.items()})
    content = RecordDict({p.LOGITS_RECORD: record, p.METRICS: p.metric_record(metrics)})
    assert site.facts is not None
    n, k = (
        int(c.array_records[p.PROXY]["offsets"].numpy().size) - 1,
        len(site.facts.classes),
    )  # what the server asked about
    allowed = {ph.TEACHER_LOGITS: ArraySpec((n, k), "float32")}
    if p.EXPERTS in c:
        experts = len({name.split(".", 1)[0] for name in c.array_records[p.EXPERTS]})
        allowed[ph.EXPERT_LOGITS] = ArraySpec((experts, n, k), "float32")
        allowed[ph.EXPERT_WEIGHTS] = ArraySpec((experts,), "float32")
    return _send(message, site, content, arrays_reply(ph.LOGITS.name, allowed))


# the site step of every phase: queries by their own message type; the weights phases share `train` (their local
# rounds, dispatched by the config's phase) and `evaluate` (validation of the global model) with the final evaluation
SITE_STEPS: dict[ph.Phase, Handler] = {
    ph.HANDSHAKE: handshake,
    ph.PIXEL_STAGE1_INIT: pixel_stage1_init,
    ph.PIXEL_STAGE1_REENCODE: pixel_stage1_reencode,
    ph.CLUSTER_INIT: cluster_init,
    ph.CLUSTER_STATS: cluster_stats,
    ph.KD_CACHE: kd_cache,
    ph.LOGITS: logits,
    ph.CALIBRATE: calibrate,
    **{phase: train for phase in phases.TRAIN_STEPS},
    ph.EVALUATION: evaluate,
}
_ROUTES = {(phase.category, phase.action): step for phase, step in SITE_STEPS.items()}  # Flower's routing key
for (_category, _action), _step in _ROUTES.items():
    _register = {ph.QUERY: app.query, ph.TRAIN: app.train, ph.EVALUATE: app.evaluate}[_category]
    (_register(_action) if _action else _register())(_step)
