"""The hospital's Flower ClientApp: one handler per message type; every reply passes the egress policy.

The SuperNode's node config names the site (`site-dir`, optional `runs-dir`, `site-name`); the run
config is the federation's (`FederationConfig`). Each reply is checked by `common.egress.check_reply`
and appended to `<runs-dir>/<run_id>/egress.jsonl` before it is returned to Flower.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslide.client import local_phases as phases
from fedslide.client.site_run import SiteRun
from fedslide.common.config.federation import FederationConfig
from fedslide.common.egress import Allowed, ArraySpec, check_reply, weights_reply
from fedslide.common.federation import protocol as p
from fedslide.common.federation.models import fingerprint

log = logging.getLogger(__name__)

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def _site(message: Message, context: Context) -> SiteRun:
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    config = message.content[p.CONFIG]
    site = SiteRun.from_node_config(dict(context.node_config), cfg, str(config["run-id"]))
    if "classes" in config:
        site.facts = p.Facts.from_config(config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return site


def _send(message: Message, site: SiteRun, phase: str, content: RecordDict, allowed: Allowed) -> Message:
    check_reply(content, allowed)
    server_round = int(message.content[p.CONFIG].get("server-round", 0)) + int(message.content[p.CONFIG].get("round-offset", 0))
    site.ledger.append(phase, server_round, content)
    return Message(content, reply_to=message)


def _redact(text: str, site: SiteRun | None) -> str:
    """An error reason safe to send: slide ids and file names replaced."""
    text = re.sub(r"[^\s/'\"]+\.(h5|svs|tiff?|ndpi|mrxs|scn|vms|vmu|bif|png)\b", "<file>", text)
    if site is not None and site._data is not None:
        for slide in site._data.slides:
            text = text.replace(slide.slide_id, "<slide>")
    return text[:500]


def guarded(handler: Callable[[Message, Context, SiteRun], Message]) -> Handler:
    """Build the site, run the handler; a failure is logged here in full and raised with a redacted reason."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        site = None
        try:
            site = _site(message, context)
            return handler(message, context, site)
        except Exception as exc:
            log.exception("site %s: %s failed", site.name if site else "?", message.metadata.message_type)
            raise RuntimeError(f"{type(exc).__name__}: {_redact(str(exc), site)}") from None

    return wrapper


def _stats_record(stats: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({"sums": Array(np.asarray(stats["sums"], dtype=np.float64)),
                        "counts": Array(np.asarray(stats["counts"], dtype=np.int64))})


def _stats_allowed(phase: str, clusters: int, dim: int) -> Allowed:
    return Allowed(phase, p.STATS, {"sums": ArraySpec((clusters, dim), "float64"), "counts": ArraySpec((clusters,), "int64")})


@app.query("handshake")
@guarded
def handshake(message: Message, context: Context, site: SiteRun) -> Message:
    """Counts, class balance and encoder identity of the site (no slide ids)."""
    site.facts = None  # the handshake reads the site's own class list
    data = site.data()
    attrs = data.low_attrs
    counts: dict[str, int] = {"encoder-dim": data.feature_dim, "token-grid": data.token_grid, "child-grid": data.child_grid}
    for split in ("train", "val", "test"):
        idx = data.split(split)
        counts[f"n-{split}"] = int(idx.size)
        for k, n in enumerate(np.bincount(data.labels[idx], minlength=len(data.classes)).tolist()):
            counts[f"n-{split}-class-{k}"] = int(n)
    info = ConfigRecord({
        "site-name": site.name, "encoder-name": str(attrs.get("encoder_name") or data.encoder),
        "encoder-hash": str(attrs.get("encoder_weights_hash", "")),
        "encoder-fingerprint": str(attrs.get("encoder_fingerprint", "")), "classes": list(data.classes),
    })
    content = RecordDict({p.SITE: info, p.METRICS: MetricRecord(counts)})
    return _send(message, site, "handshake", content, Allowed("handshake", config_record=p.SITE))


@app.train()
@guarded
def train(message: Message, context: Context, site: SiteRun) -> Message:
    """One local round of the phase named in the config (adapter, teacher with the baseline, experts, student)."""
    config = message.content[p.CONFIG]
    phase = str(config["phase"])
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    mu = float(config.get("proximal-mu", 0.0))
    received = message.content[p.ARRAYS]
    if phase == "adapter":
        arrays, metrics = phases.adapter_round(site, received, server_round)
    elif phase == "experts":
        centroids = message.content[p.CENTROIDS]["centroids"].numpy()
        arrays, metrics = phases.experts_round(site, received, centroids, str(config["teacher-fingerprint"]),
                                               server_round, mu)
    elif phase in phases.MODEL_ROUNDS:
        arrays, metrics = phases.MODEL_ROUNDS[phase](site, received, server_round, mu)
    else:
        raise ValueError(f"unknown training phase {phase!r}")
    content = RecordDict({p.ARRAYS: arrays, p.METRICS: MetricRecord(metrics)})
    return _send(message, site, phase, content, weights_reply(phase, received))


@app.evaluate()
@guarded
def evaluate(message: Message, context: Context, site: SiteRun) -> Message:
    """Validation of a phase's global model, or (phase "final") the push-back and local test evaluation."""
    config = message.content[p.CONFIG]
    phase = str(config["phase"])
    if phase == p.FINAL:
        c = message.content
        metrics = phases.final_evaluation(site, c[p.TEACHER], c[p.STUDENT], c[p.BASELINE], c[p.ADAPTER],
                                          str(config.get("eval-split", "test")))
        return _send(message, site, "evaluate", RecordDict({p.METRICS: MetricRecord(metrics)}), Allowed("evaluate"))
    metrics = phases.validate(site, phase, message.content)
    return _send(message, site, phase, RecordDict({p.METRICS: MetricRecord(metrics)}), Allowed(phase))


@app.query("cluster_init")
@guarded
def cluster_init(message: Message, context: Context, site: SiteRun) -> Message:
    """Teacher outputs of the training slides (kept) and local k-means sums/counts (sent)."""
    teacher = message.content[p.TEACHER]
    stats, metrics = phases.cluster_init(site, teacher, fingerprint(teacher))
    c, e = stats["sums"].shape
    content = RecordDict({p.STATS: _stats_record(stats), p.METRICS: MetricRecord(metrics)})
    return _send(message, site, "cluster-init", content, _stats_allowed("cluster-init", c, e))


@app.query("cluster_stats")
@guarded
def cluster_stats(message: Message, context: Context, site: SiteRun) -> Message:
    """Per-cluster sums and counts under the server's centroids."""
    config = message.content[p.CONFIG]
    centroids = message.content[p.CENTROIDS]["centroids"].numpy()
    stats, metrics = phases.cluster_stats(site, centroids, str(config["teacher-fingerprint"]))
    content = RecordDict({p.STATS: _stats_record(stats), p.METRICS: MetricRecord(metrics)})
    return _send(message, site, "cluster-stats", content, _stats_allowed("cluster-stats", *centroids.shape))


@app.query("kd_cache")
@guarded
def kd_cache(message: Message, context: Context, site: SiteRun) -> Message:
    """Cache teacher/expert logits and the adapted student bags at the site (only counts are sent)."""
    c = message.content
    centroids = c[p.CENTROIDS]["centroids"].numpy() if p.CENTROIDS in c else None
    metrics = phases.kd_cache(site, c[p.TEACHER], c.get(p.EXPERTS), c[p.ADAPTER], centroids,
                              str(c[p.CONFIG].get("teacher-fingerprint", "")))
    metrics["num-examples"] = metrics["n-train"]
    return _send(message, site, "kd-cache", RecordDict({p.METRICS: MetricRecord(metrics)}), Allowed("kd-cache"))


@app.query("logits")
@guarded
def logits(message: Message, context: Context, site: SiteRun) -> Message:
    """Logits mode: teacher/expert logits on the proxy cohort the server sent (nothing about the site's slides)."""
    c = message.content
    centroids = c[p.CENTROIDS]["centroids"].numpy() if p.CENTROIDS in c else None
    out, metrics = phases.proxy_logits(site, c[p.TEACHER], c.get(p.EXPERTS), centroids, c[p.PROXY],
                                       str(c[p.CONFIG].get("teacher-fingerprint", "")))
    record = ArrayRecord({k: Array(v) for k, v in out.items()})
    content = RecordDict({p.LOGITS_RECORD: record, p.METRICS: MetricRecord(metrics)})
    assert site.facts is not None
    n, k = int(c[p.PROXY]["offsets"].numpy().size) - 1, len(site.facts.classes)  # what the server asked about
    allowed = {"teacher": ArraySpec((n, k), "float32")}
    if p.EXPERTS in c:
        experts = len({name.split(".", 1)[0] for name in c[p.EXPERTS]})
        allowed["experts"] = ArraySpec((experts, n, k), "float32")
        allowed["expert-weights"] = ArraySpec((experts,), "float32")
    return _send(message, site, "logits", content, Allowed("logits", p.LOGITS_RECORD, allowed))
