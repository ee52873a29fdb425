"""The federation, phase by phase (DESIGN.md phases 0-5), driven through a Flower Grid.

handshake -> adapter (FedAvg) -> teacher and low-res baseline (FedAvg/FedProx, both in every message) ->
federated k-means (sums/counts) -> experts (all C per message) -> student (weights mode: local KD + FedAvg;
logits mode: server-side KD on the proxy cohort) -> push-back and evaluation at every site. Every phase and
round is checkpointed; with `resume` a run continues from its checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedProx, Strategy
from sklearn.cluster import KMeans

from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.distillation.clustering import update_centroids
from fedslide.common.distillation.student import starts_from_teacher
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.feature_stats import federated_stats, stats_record
from fedslide.common.federation.ood_stats import federated_ood, ood_record
from fedslide.common.federation.temperature import pick_temperature
from fedslide.common.federation.models import (
    fingerprint,
    new_adapter,
    new_model,
    pack_experts,
    pack_models,
    student_config,
    teacher_config,
    to_record,
    unpack_models,
)
from fedslide.common.flower_compat import fedavgm_momentum, set_fedavgm_momentum
from fedslide.common.seeds import SEED_OFFSETS
from fedslide.common.training.labels import class_order
from fedslide.server import clinical_step
from fedslide.server.checkpoint import Checkpoint
from fedslide.server.clinical_strategy import ClinicalFedAvg
from fedslide.server.grid import FederationGrid
from fedslide.server.privacy import dp_strategy, make_accountant
from fedslide.server.strategies import (
    BestRounds,
    ExpertsFedAvg,
    FederationError,
    Group,
    PhaseStrategy,
    RoundError,
    TrimmedMean,
    UpdateValidator,
    trim_count,
)

log = logging.getLogger(__name__)

ENCODER_KEYS = (ph.ENCODER_NAME, ph.ENCODER_HASH, ph.ENCODER_DIM, ph.TOKEN_GRID, ph.CHILD_GRID)


@dataclass
class SiteInfo:
    """A site as the server knows it: node id, name and counts from the handshake."""

    node: int
    name: str
    counts: dict[str, int]
    encoder: dict[str, Any]
    classes: list[str]


@dataclass
class Federation:
    """State of one run at the server."""

    cfg: FederationConfig
    grid: FederationGrid
    run_dir: Path
    ckpt: Checkpoint
    validator: UpdateValidator
    facts: p.Facts | None = None
    sites: dict[int, SiteInfo] = field(default_factory=dict)  # training sites
    eval_sites: dict[int, SiteInfo] = field(default_factory=dict)  # evaluation-only (held-out) sites
    refused: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    accountant: Any = None  # server.privacy's RDP accountant when DP is on
    timings: dict[str, float] = field(default_factory=dict)
    standardize: ArrayRecord | None = None  # the pooled standardisation sent to the sites (`standardize = true`)
    ood: ArrayRecord | None = None  # the pooled OOD statistics sent with the evaluation (`ood-stats = true`)
    clinical_norm: ArrayRecord | None = None  # the pooled clinical normalisation (`clinical.enabled`)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def with_standardize(self, phase: ph.Phase, records: dict[str, ArrayRecord]) -> dict[str, ArrayRecord]:
        """`records` plus the pooled standardisation when the run has one and the phase declares it."""
        if self.standardize is None or ph.STANDARDIZE not in phase.sends:
            return records
        return {**records, ph.STANDARDIZE: self.standardize}

    def base_config(self, phase: ph.Phase, **extra: Any) -> dict[str, Any]:
        """Config entries of every message of a phase (`extra`: the config keys it declares)."""
        assert self.facts is not None or phase is ph.HANDSHAKE
        phase.check_sent((), extra)
        base: dict[str, Any] = {ph.RUN_ID: self.run_id, ph.PHASE: phase.phase, ph.SERVER_ROUND: self.grid.server_round}
        if self.facts is not None:
            base.update(self.facts.to_config())
        return {**base, **extra}

    def query(
        self,
        phase: ph.Phase,
        records: dict[str, ArrayRecord],
        config: dict[str, Any] | None = None,
        validate: bool = False,
    ) -> list[Message]:
        """Send one message of the phase (with `validate`, a weights phase's validation) per admitted site; the
        usable replies (at least min-nodes, else FederationError)."""
        self.grid.phase = phase.phase
        records = self.with_standardize(phase, records)
        phase.check_sent(records)
        content = RecordDict({p.CONFIG: ConfigRecord(self.base_config(phase, **(config or {}))), **records})
        nodes = sorted(self.grid.get_node_ids())
        message_type = ph.EVALUATE if validate else phase.message_type
        messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in nodes]
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout) if not r.has_error()]
        if len(replies) < min(self.cfg.min_nodes, max(len(nodes), 1)) or not replies:
            raise FederationError(
                f"phase {phase.name}: {len(replies)} usable repl(ies) from {len(nodes)} site(s), "
                f"fewer than min-nodes = {self.cfg.min_nodes}; see the absent nodes in the log"
            )
        return replies


# ---- phase 0 ----------------------------------------------------------------------------------------
def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """Node ids once `wanted` are connected (or whatever is connected when `timeout` runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def handshake(fed: Federation, wait_timeout: float = 120.0) -> None:
    """Ask every connected site for counts and encoder identity; admit those that agree with the majority."""
    saved = fed.ckpt.state.get(ph.HANDSHAKE.checkpoint)
    if saved:
        fed.facts = p.Facts.from_dict(saved["facts"])
        fed.sites = {int(n): SiteInfo(**s) for n, s in saved["sites"].items()}
        fed.eval_sites = {int(n): SiteInfo(**s) for n, s in saved.get("eval_sites", {}).items()}
        fed.refused = saved["refused"]
        known = {**fed.sites, **fed.eval_sites}
        connected = wait_for_nodes(fed.grid, len(known), wait_timeout)
        if not set(known) <= set(connected):
            _readmit_by_name(fed, [n for n in connected if n not in known])
        fed.grid.admitted = set(fed.sites)
        fed.standardize = fed.ckpt.load_arrays(STANDARDIZE_KEY)
        fed.ood = fed.ckpt.load_arrays(OOD_KEY)
        clinical_step.resume_clinical(fed)
        if fed.cfg.standardize and fed.standardize is None:
            raise FederationError(
                f"standardize = true but the checkpoint of {fed.run_dir} holds no pooled statistics (the run began "
                "with standardize = false); resume it with standardize = false"
            )
        return
    replies: dict[int, Message] = {}
    nodes = wait_for_nodes(fed.grid, max(fed.cfg.min_nodes, fed.cfg.expected_nodes), wait_timeout)
    candidates: dict[int, SiteInfo] = {}
    for node, reply in _ask_sites(fed, nodes).items():
        if reply.has_error():
            fed.refused.append({"node": node, "reason": f"handshake failed at the site: {reply.error.reason}"})
            continue
        candidates[node] = _site_info(node, reply)
        replies[node] = reply
    if not candidates:
        raise FederationError(f"handshake: no site answered ({len(nodes)} connected); refused: {fed.refused}")
    identities = Counter(tuple(str(s.encoder[k]) for k in ENCODER_KEYS) for s in candidates.values())
    reference = _reference_encoder(fed.cfg, candidates, identities)
    for node, info in sorted(candidates.items()):
        ident = tuple(str(info.encoder[k]) for k in ENCODER_KEYS)
        if ident != reference:
            diff = {k: (info.encoder[k], ref) for k, ref in zip(ENCODER_KEYS, reference) if str(info.encoder[k]) != ref}
            fed.refused.append(
                {
                    "node": node,
                    "site": info.name,
                    "reason": "encoder differs from the federation's: "
                    + ", ".join(f"{k} {got!r} (federation: {want!r})" for k, (got, want) in diff.items()),
                }
            )
            log.warning("handshake: refused site %s (node %d): %s", info.name, node, fed.refused[-1]["reason"])
            continue
        (fed.eval_sites if info.name in fed.cfg.eval_only_sites else fed.sites)[node] = info
    if len(fed.sites) < fed.cfg.min_nodes:
        raise FederationError(
            f"handshake: {len(fed.sites)} site(s) admitted, min-nodes = {fed.cfg.min_nodes}; refused: {fed.refused}"
        )
    classes = list(class_order(c for s in [*fed.sites.values(), *fed.eval_sites.values()] for c in s.classes))
    if fed.cfg.classes is not None:  # the configured label map: its order, and no site label outside it
        everyone = [*fed.sites.values(), *fed.eval_sites.values()]
        outside = {s.name: sorted(set(s.classes) - set(fed.cfg.classes)) for s in everyone}
        if any(outside.values()):
            raise FederationError(
                "handshake: labels outside federation.classes "
                f"({', '.join(fed.cfg.classes)}): " + "; ".join(f"site {k}: {v}" for k, v in outside.items() if v)
            )
        classes = list(fed.cfg.classes)
    if len(classes) < 2:
        raise FederationError(f"handshake: the sites' labels have {len(classes)} class(es) {classes}; need at least 2")
    first = next(iter(fed.sites.values()))
    fed.facts = p.Facts(
        tuple(classes),
        int(first.encoder[ph.ENCODER_DIM]),
        int(first.encoder[ph.TOKEN_GRID]),
        int(first.encoder[ph.CHILD_GRID]),
        str(first.encoder[ph.ENCODER_NAME]),
    )
    fed.grid.admitted = set(fed.sites)
    if fed.cfg.standardize:
        _pool_standardize(fed, replies)
    if fed.cfg.ood_stats and not fed.cfg.pixel_stage1:
        _pool_ood(fed, replies)
    if fed.cfg.clinical.enabled:
        clinical_step.pool_clinical(fed, replies)
    _commit_handshake(fed)
    log.info("handshake: admitted %s; refused %d", ", ".join(s.name for s in fed.sites.values()), len(fed.refused))


STANDARDIZE_KEY = "standardize"  # the checkpoint's arrays of the pooled standardisation


def _pool_standardize(fed: Federation, replies: dict[int, Message]) -> None:
    """The training sites' feature sums pooled into one mean/sd (a release of fewer than suppress-below slides
    counts for nothing), kept in the checkpoint and sent in the later phases that declare it."""
    assert fed.facts is not None
    records = []
    for node, info in sorted(fed.sites.items()):
        record = replies[node].content.array_records.get(p.STATS)
        if record is None:
            raise FederationError(f"handshake: site {info.name} sent no feature sums with standardize = true")
        records.append(record)
    try:
        stats = federated_stats(records, fed.facts.feature_dim, fed.cfg.min_count)
    except ValueError as exc:
        raise FederationError(f"handshake: standardize = true, but {exc}") from None
    fed.standardize = stats_record(stats)
    fed.ckpt.save_arrays(STANDARDIZE_KEY, fed.standardize)
    log.info("handshake: standardisation pooled over %d instances of %d site(s)", stats.count, len(records))


OOD_KEY = "ood"  # the checkpoint's arrays of the pooled OOD statistics


def _pool_ood(fed: Federation, replies: dict[int, Message]) -> None:
    """The training sites' OOD sums pooled (a release of fewer than suppress-below slides counts for nothing), kept
    in the checkpoint and sent with the evaluation; without any usable release the bundles carry no OOD score."""
    assert fed.facts is not None
    records = []
    for node, info in sorted(fed.sites.items()):
        record = replies[node].content.array_records.get(p.STATS)
        if record is None or ph.OOD_SUMS not in record:
            log.warning("handshake: site %s sent no OOD sums; its slides do not count in the OOD statistics", info.name)
            continue
        records.append(record)
    try:
        stats = federated_ood(records, fed.facts.feature_dim, fed.cfg.min_count)
    except ValueError as exc:
        log.warning("handshake: no OOD statistics (the bundles will carry no OOD score): %s", exc)
        return
    fed.ood = ood_record(stats)
    fed.ckpt.save_arrays(OOD_KEY, fed.ood)
    log.info("handshake: OOD statistics pooled over %d training slides", stats.slides)


def _ask_sites(fed: Federation, nodes: list[int]) -> dict[int, Message]:
    """The handshake query to `nodes`; their replies by node."""
    fed.grid.phase = ph.HANDSHAKE.phase
    content = RecordDict({p.CONFIG: ConfigRecord({ph.RUN_ID: fed.run_id, ph.PHASE: ph.HANDSHAKE.phase})})
    messages = [Message(content=content, dst_node_id=n, message_type=ph.HANDSHAKE.message_type) for n in nodes]
    replies = fed.grid.send_and_receive(messages, timeout=fed.cfg.round_timeout)
    return {int(r.metadata.src_node_id): r for r in replies}


def _site_info(node: int, reply: Message) -> SiteInfo:
    site, counts = reply.content.config_records[p.SITE], reply.content.metric_records[p.METRICS]
    encoder = {k: site.get(k) for k in (ph.ENCODER_NAME, ph.ENCODER_HASH)}
    encoder.update({k: p.integer(counts, k) for k in (ph.ENCODER_DIM, ph.TOKEN_GRID, ph.CHILD_GRID)})
    return SiteInfo(
        node, str(site[ph.SITE_NAME]), {k: p.integer(counts, k) for k in counts}, encoder, p.strings(site, ph.CLASSES)
    )


def _commit_handshake(fed: Federation) -> None:
    assert fed.facts is not None
    fed.ckpt.commit(
        **{
            ph.HANDSHAKE.checkpoint: {
                "facts": fed.facts.to_dict(),
                "refused": fed.refused,
                "sites": {str(n): vars(s) for n, s in fed.sites.items()},
                "eval_sites": {str(n): vars(s) for n, s in fed.eval_sites.items()},
            }
        }
    )


def _readmit_by_name(fed: Federation, unknown: list[int]) -> None:
    """On resume, sites whose SuperNodes came back under new node ids (restarted without authentication, or a
    lost SuperLink database): ask the unknown nodes who they are and move each admitted site to its new id
    when its name and encoder identity match the checkpoint. Sites not found keep their old id (missing)."""
    by_name = {info.name: node for node, info in {**fed.sites, **fed.eval_sites}.items()}
    moved = []
    for node, reply in _ask_sites(fed, unknown).items():
        if reply.has_error():
            log.warning("resume: node %d did not answer the handshake: %s", node, reply.error.reason)
            continue
        info = _site_info(node, reply)
        old = by_name.get(info.name)
        if old is None:
            log.warning("resume: node %d (site %s) was not part of this run; not admitted", node, info.name)
            continue
        table = fed.sites if old in fed.sites else fed.eval_sites
        if any(str(info.encoder[k]) != str(table[old].encoder[k]) for k in ENCODER_KEYS):
            log.warning("resume: site %s (node %d) now reports another encoder; not admitted", info.name, node)
            continue
        del table[old]
        table[node] = info
        moved.append(f"{info.name}: node {old} -> {node}")
    if moved:
        log.info("resume: sites matched by name under new node ids: %s", "; ".join(moved))
        _commit_handshake(fed)


def _reference_encoder(cfg: FederationConfig, candidates: dict[int, SiteInfo], identities: Counter) -> tuple[str, ...]:
    if cfg.encoder:  # the run names the encoder folder; sites whose files say another encoder name are refused
        named = [i for i in identities if i[0] == cfg.encoder]
        if named:
            return max(named, key=lambda i: identities[i])
    return identities.most_common(1)[0][0]


# ---- weights phases ---------------------------------------------------------------------------------
def _inner_strategy(fed: Federation, phase: ph.Phase, min_nodes: int) -> Strategy:
    cfg = fed.cfg
    if (
        phase is ph.STUDENT
        and cfg.student_server_momentum > 0
        and (fed.accountant is not None or cfg.aggregation != "mean")
    ):
        log.warning(
            "phase student: student-server-momentum %g not applied: %s keeps its own update",
            cfg.student_server_momentum,
            "DP" if fed.accountant is not None else f"aggregation = {cfg.aggregation}",
        )
    if fed.accountant is not None:  # every weights release is noised and accounted (equal site weights)
        return dp_strategy(cfg, len(fed.sites), min_nodes, fed.accountant)
    common: dict[str, Any] = {"fraction_evaluate": 0.0, "min_train_nodes": min_nodes, "min_available_nodes": min_nodes}
    if phase is ph.EXPERTS:
        return ExpertsFedAvg(cfg.aggregation, cfg.trim_fraction, **common)
    if phase is ph.CLINICAL and cfg.aggregation == "mean":  # `multi.` by clinical slides, the rest by slides
        return ClinicalFedAvg(**common)
    if phase is ph.STUDENT and cfg.student_server_momentum > 0 and cfg.aggregation == "mean":
        return FedAvgM(server_momentum=cfg.student_server_momentum, **common)  # FedProx's mu travels in the config
    if cfg.aggregation == "median":
        return FedMedian(**common)
    if cfg.aggregation == "trimmed-mean":
        trim_count(len(fed.sites), cfg.trim_fraction)  # refused before any round when too few sites were admitted
        return TrimmedMean(cfg.trim_fraction, **common)
    if phase in (ph.ADAPTER, ph.PIXEL_STAGE1):  # no proximal term in these local steps
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    return FedAvg(**common)


def weights_phase(
    fed: Federation,
    declared: ph.Phase,
    make_initial: Callable[[], ArrayRecord],
    rounds: int,
    extra: dict[str, ArrayRecord] | None = None,
    members: int = 0,
    config: dict[str, Any] | None = None,
) -> ArrayRecord:
    """Federated rounds of a weights phase's model(s) (`members`: how many numbered ones, e.g. experts; `config`:
    the phase's own config entries); returns the global arrays of each model's best-validated round (the phase's
    declared best-round groups)."""
    phase, config = declared.name, config or {}
    done = fed.ckpt.phase_done(phase)
    if done is not None:
        final = fed.ckpt.load_arrays(f"{phase}.final")
        if final is not None:
            fed.curves[phase] = done.get("history", [])
            return final
    start = time.perf_counter()
    tracker = BestRounds(
        {name: Group(g.prefix, g.loss_key, g.n_key) for name, g in declared.best_groups(members).items()},
        robust=fed.cfg.aggregation != "mean",
    )
    min_nodes = min(fed.cfg.min_nodes, len(fed.sites))
    inner = _inner_strategy(fed, declared, min_nodes)
    initial, start_round = make_initial(), 0
    current = fed.ckpt.state.get("current")
    if current and current.get("phase") == phase:
        saved = fed.ckpt.load_arrays(f"{phase}.current")
        if saved is not None:
            initial, start_round = saved, int(current["round"])
            tracker.restore(current.get("tracker", {}), fed.ckpt.load_arrays(f"{phase}.best"))
            momentum = fed.ckpt.load_arrays(f"{phase}.momentum")
            if isinstance(inner, FedAvgM) and momentum is not None:
                set_fedavgm_momentum(inner, momentum.to_numpy_ndarrays())
            log.info("phase %s: resuming after round %d", phase, start_round)
    fed.grid.phase = phase
    extra = fed.with_standardize(declared, extra or {}) or None
    declared.check_sent([p.ARRAYS, *(extra or {})])
    strategy = PhaseStrategy(
        inner,
        phase,
        tracker,
        fed.validator,
        min_nodes,
        extra,
        round_offset=start_round,
        site_counts={node: int(info.counts.get(ph.split_count("train"), 0)) for node, info in fed.sites.items()},
    )

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        fed.ckpt.save_arrays(f"{phase}.current", arrays)
        momentum = fedavgm_momentum(inner) if isinstance(inner, FedAvgM) else None  # the server optimizer's state
        if momentum is not None:
            fed.ckpt.save_arrays(f"{phase}.momentum", ArrayRecord(dict(zip(arrays.keys(), map(Array, momentum)))))
        fed.ckpt.save_arrays(f"{phase}.best", tracker.best_arrays(arrays))
        fed.ckpt.commit(
            current={"phase": phase, "round": start_round + server_round, "tracker": tracker.state()},
            accountant=fed.accountant.state_dict() if fed.accountant is not None else None,
        )
        return None

    final = initial
    remaining = rounds - start_round
    if remaining > 0:
        result = strategy.start(
            fed.grid,
            initial,
            num_rounds=remaining,
            timeout=fed.cfg.round_timeout,
            train_config=ConfigRecord(fed.base_config(declared, **{ph.ROUND_OFFSET: start_round}, **config)),
            evaluate_fn=checkpoint,
        )
        final = result.arrays if result.arrays is not None else initial
    # validate the last global model too (the train replies validated each round's incoming model)
    fed.grid.server_round = rounds
    replies = fed.query(declared, {p.ARRAYS: final, **(extra or {})}, config, validate=True)
    tracker.observe(rounds, final, [r.content for r in replies])
    best = tracker.best_arrays(final)
    fed.ckpt.save_arrays(f"{phase}.final", best)
    fed.curves[phase] = tracker.history
    fed.timings[phase] = round(time.perf_counter() - start, 3)
    fed.ckpt.finish_phase(
        phase, {"best": tracker.best, "history": tracker.history, "rounds": rounds, "seconds": fed.timings[phase]}
    )
    log.info("phase %s: done, best %s", phase, tracker.best)
    return best


def teacher_and_baseline(fed: Federation, t_cfg: ModelConfig, s_cfg: ModelConfig) -> tuple[ArrayRecord, ArrayRecord]:
    """The high-res teacher and the low-res baseline, trained in the same messages (one round trip per round for
    both; each model kept at its own best round, and trained for its own number of rounds)."""
    seed, rounds = fed.cfg.seed, fed.cfg.rounds

    def initial() -> ArrayRecord:
        return pack_models(
            {
                p.TEACHER: to_record(new_model(t_cfg, seed + SEED_OFFSETS.teacher)),
                p.BASELINE: to_record(new_model(s_cfg, seed + SEED_OFFSETS.student)),
            }
        )

    models = unpack_models(weights_phase(fed, ph.TEACHER, initial, max(rounds.teacher, rounds.baseline)))
    if set(models) != set(ph.TEACHER.members):
        raise FederationError(
            f"{fed.run_dir / 'checkpoint'}: the teacher phase's arrays are grouped as {sorted(models)[:4]}, expected "
            f"{sorted(ph.TEACHER.members)}; this run was checkpointed by an earlier fedslide (teacher and baseline in "
            "separate phases) and cannot be resumed: start it again under a new run id"
        )
    _save_rejections(fed)
    return models[p.TEACHER], models[p.BASELINE]


# ---- phase 3: federated k-means ---------------------------------------------------------------------
def _stats_problem(sums: np.ndarray, counts: np.ndarray, n_train: int, shape: tuple[int, int] | None) -> str | None:
    """Why a site's cluster sums/counts cannot be used, or None."""
    if sums.ndim != 2 or counts.shape != (sums.shape[0],):
        return f"sums {sums.shape} and counts {counts.shape} do not pair up"
    if shape is not None and tuple(sums.shape) != shape:
        return f"sums {sums.shape}, expected {shape}"
    if not np.isfinite(sums).all() or not np.isfinite(counts).all():
        return "sums or counts hold NaN/Inf"
    if (counts < 0).any() or (counts != np.round(counts)).any() or counts.sum() > n_train:
        return f"counts {counts.tolist()} are not whole numbers in [0, {n_train}] (its training slides)"
    return None


def _stats(
    fed: Federation, phase: ph.Phase, replies: list[Message], shape: tuple[int, int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The sites' valid cluster sums and counts (finite, `shape` when given, counts whole and within the site's
    training slides from the handshake); the others are rejected; FederationError when fewer than min-nodes stay."""
    out = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        record = reply.content.array_records[p.STATS]
        sums, counts = record[ph.SUMS].numpy(), record[ph.COUNTS].numpy()
        n_train = fed.sites[node].counts.get(ph.split_count("train"), 0) if node in fed.sites else 0
        reason = _stats_problem(sums, counts, n_train, shape)
        if reason is None:
            out.append((sums, counts))
        else:
            fed.validator.reject(phase.name, fed.grid.server_round, node, f"cluster statistics: {reason}")
    if len(out) < min(fed.cfg.min_nodes, len(fed.sites)) or not out:
        raise FederationError(
            f"phase {phase.name}: {len(out)} valid cluster statistics of {len(replies)} repl(ies), fewer than "
            f"min-nodes = {fed.cfg.min_nodes}; see the rejections"
        )
    return out


def federated_kmeans(fed: Federation, teacher: ArrayRecord) -> tuple[np.ndarray, list[int]]:
    """Centroids from per-site cluster sums/counts only: local k-means seeds, then Lloyd iterations."""
    step = ph.CLUSTER_INIT.checkpoint
    done = fed.ckpt.phase_done(step)
    saved = fed.ckpt.load_arrays(f"{step}.centroids")
    if done is not None and saved is not None:
        return saved[ph.CENTROIDS].numpy(), list(done["sizes"])
    start = time.perf_counter()
    c = fed.cfg.clusters.num_clusters
    tfp = fingerprint(teacher)
    replies = fed.query(ph.CLUSTER_INIT, {p.TEACHER: teacher}, {ph.TEACHER_FINGERPRINT: tfp})
    rows, weights = [], []
    for sums, counts in _stats(fed, ph.CLUSTER_INIT, replies):
        keep = counts > 0
        rows.append(sums[keep] / counts[keep, None])
        weights.append(counts[keep])
    seeds, seed_weights = np.concatenate(rows), np.concatenate(weights).astype(float)
    if len(seeds) < c:
        raise FederationError(
            f"federated k-means: only {len(seeds)} site cluster(s) above the suppression threshold "
            f"({fed.cfg.min_count}) for {c} clusters; lower clusters.num-clusters"
        )
    centroids = (
        KMeans(n_clusters=c, n_init=fed.cfg.clusters.n_init, random_state=fed.cfg.seed)
        .fit(seeds, sample_weight=seed_weights)
        .cluster_centers_
    )
    history = []
    sizes = [0] * c
    for iteration in range(fed.cfg.rounds.cluster_iterations):
        fed.grid.server_round = iteration + 1
        replies = fed.query(ph.CLUSTER_STATS, {p.CENTROIDS: _centroid_record(centroids)}, {ph.TEACHER_FINGERPRINT: tfp})
        stats = _stats(fed, ph.CLUSTER_STATS, replies, tuple(centroids.shape))
        new = update_centroids(stats, previous=centroids)
        shift = float(np.abs(new - centroids).max())
        sizes = np.sum([n for _, n in stats], axis=0).astype(int).tolist()
        history.append({"iteration": iteration + 1, "shift": shift, "sizes": sizes})
        centroids = new
        if shift < 1e-6:
            break
    fed.ckpt.save_arrays(f"{step}.centroids", _centroid_record(centroids))
    fed.timings[step] = round(time.perf_counter() - start, 3)
    fed.ckpt.finish_phase(step, {"sizes": sizes, "history": history, "seconds": fed.timings[step]})
    return centroids, sizes


def _centroid_record(centroids: np.ndarray) -> ArrayRecord:
    return ArrayRecord({ph.CENTROIDS: Array(np.asarray(centroids, dtype=np.float64))})


# ---- the whole run ----------------------------------------------------------------------------------
@dataclass
class RunModels:
    """The global models as the server steps produce them, and what later steps read."""

    t_cfg: ModelConfig
    s_cfg: ModelConfig
    from_teacher: bool  # the student starts from the teacher's weights
    low_encoder: ArrayRecord | None = None  # pixel stage 1's global trainable 5x encoder parameters
    adapter: ArrayRecord | None = None
    teacher: ArrayRecord | None = None
    baseline: ArrayRecord | None = None
    tfp: str = ""  # the teacher's fingerprint
    centroids: np.ndarray | None = None
    experts: ArrayRecord | None = None
    student: ArrayRecord | None = None
    clinical: ArrayRecord | None = None  # the BD model (`clinical.enabled`)
    temperatures: dict[str, float] = field(default_factory=dict)  # CALIBRATED_MODELS' picked T (`calibrate`)
    evaluation: list[Message] = field(default_factory=list)

    def records(self) -> dict[str, ArrayRecord]:
        """The run's models by name (the experts only when trained)."""
        out = {p.ADAPTER: self.adapter, p.TEACHER: self.teacher, p.BASELINE: self.baseline, p.STUDENT: self.student}
        if self.experts is not None:
            out[p.EXPERTS] = self.experts
        return {k: v for k, v in out.items() if v is not None}


def _mu(cfg: FederationConfig) -> float:
    return cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0


def _stage1_initial(fed: Federation) -> ArrayRecord:
    """The phase's initial global encoder arrays: the lowest node's reply to pixel-stage1-init (kept in the
    checkpoint); every other site must name the same arrays with the same shapes and dtypes."""
    key = f"{ph.PIXEL_STAGE1_INIT.name}.arrays"
    saved = fed.ckpt.load_arrays(key)
    if saved is not None:
        return saved
    fed.grid.server_round = 0
    replies = sorted(fed.query(ph.PIXEL_STAGE1_INIT, {}), key=lambda r: int(r.metadata.src_node_id))
    first = replies[0].content.array_records.get(p.ARRAYS)
    for reply in replies:
        record = reply.content.array_records.get(p.ARRAYS)
        reason = "no arrays" if record is None or first is None else fed.validator.problem(first, record)
        if reason is not None:
            node = int(reply.metadata.src_node_id)
            name = fed.sites[node].name if node in fed.sites else str(node)
            raise FederationError(
                f"phase {ph.PIXEL_STAGE1_INIT.name}: site {name}'s trainable encoder arrays differ from site "
                f"{fed.sites[int(replies[0].metadata.src_node_id)].name}'s ({reason}); every site must run the same "
                "encoder with the same finetune.trainable settings"
            )
    assert first is not None
    fed.ckpt.save_arrays(key, first)
    return first


def pixel_stage1_step(fed: Federation, run: RunModels) -> None:
    """Federated LRMIL stage 1 on pixels: the trainable 5x encoder parameters start from one site's, train for
    rounds.pixel-stage1 FedAvg rounds (the configured strategy wrappers, validation and DP as in every weights phase),
    and go back to every site, which keeps the global encoder and re-encodes its 5x features with it."""
    encoder = weights_phase(
        fed, ph.PIXEL_STAGE1, lambda: _stage1_initial(fed), fed.cfg.rounds.pixel_stage1, config={ph.PROXIMAL_MU: 0.0}
    )
    _save_rejections(fed)
    run.low_encoder = encoder
    step = ph.PIXEL_STAGE1_REENCODE.checkpoint
    if fed.ckpt.phase_done(step) is None:
        start = time.perf_counter()
        fed.grid.server_round = 0
        fed.grid.admitted = set(fed.sites) | set(fed.eval_sites)  # held-out sites evaluate on the same 5x encoder
        try:
            replies = fed.query(ph.PIXEL_STAGE1_REENCODE, {p.ARRAYS: encoder})
        finally:
            fed.grid.admitted = set(fed.sites)
        fed.timings[step] = round(time.perf_counter() - start, 3)
        everyone = {**fed.sites, **fed.eval_sites}
        reencoded = {
            everyone[node].name: p.integer(r.content.metric_records[p.METRICS], ph.REENCODED)
            for r in replies
            if (node := int(r.metadata.src_node_id)) in everyone
        }
        missing = sorted(info.name for node, info in everyone.items() if info.name not in reencoded)
        if missing:  # a site that evaluates on features of another 5x encoder would report wrong figures
            log.warning("phase %s: sites %s did not re-encode their 5x features", step, ", ".join(missing))
        fed.ckpt.finish_phase(step, {"reencoded": reencoded, "seconds": fed.timings[step]})


def adapter_step(fed: Federation, run: RunModels) -> None:
    """FedAvg rounds of the cross-resolution adapter."""
    cfg = fed.cfg
    assert fed.facts is not None
    facts = fed.facts
    run.adapter = weights_phase(
        fed, ph.ADAPTER, lambda: to_record(new_adapter(cfg, facts, cfg.seed + SEED_OFFSETS.adapter)), cfg.rounds.adapter
    )
    _save_rejections(fed)


def teacher_step(fed: Federation, run: RunModels) -> None:
    """The teacher and the low-res baseline (see teacher_and_baseline)."""
    run.teacher, run.baseline = teacher_and_baseline(fed, run.t_cfg, run.s_cfg)
    run.tfp = fingerprint(run.teacher)


def clusters_step(fed: Federation, run: RunModels) -> None:
    """Federated k-means on the teacher's outputs (cluster-init, then cluster-stats iterations)."""
    assert run.teacher is not None
    run.centroids, _ = federated_kmeans(fed, run.teacher)
    _save_rejections(fed)


def experts_step(fed: Federation, run: RunModels) -> None:
    """All C experts per message, each kept at its own best round."""
    cfg, c = fed.cfg, fed.cfg.clusters.num_clusters
    assert run.teacher is not None and run.centroids is not None
    teacher = run.teacher

    def initial_experts() -> ArrayRecord:
        start = (
            teacher
            if cfg.experts.init == "teacher"
            else to_record(new_model(run.t_cfg, cfg.seed + SEED_OFFSETS.experts_init))
        )
        return pack_experts([start] * c)

    run.experts = weights_phase(
        fed,
        ph.EXPERTS,
        initial_experts,
        cfg.rounds.experts,
        extra={p.CENTROIDS: _centroid_record(run.centroids)},
        members=c,
        config={ph.TEACHER_FINGERPRINT: run.tfp, ph.PROXIMAL_MU: _mu(cfg)},
    )
    _save_rejections(fed)


def kd_cache_step(fed: Federation, run: RunModels) -> None:
    """Weights mode: every site caches the teacher's (and experts') logits and the adapted bags."""
    if fed.ckpt.phase_done(ph.KD_CACHE.checkpoint) is None or fed.ckpt.load_arrays(f"{ph.STUDENT.name}.final") is None:
        assert run.teacher is not None and run.adapter is not None
        records = {p.TEACHER: run.teacher, p.ADAPTER: run.adapter}
        if run.experts is not None and run.centroids is not None:
            records.update({p.EXPERTS: run.experts, p.CENTROIDS: _centroid_record(run.centroids)})
        fed.query(ph.KD_CACHE, records, {ph.TEACHER_FINGERPRINT: run.tfp})
        if fed.ckpt.phase_done(ph.KD_CACHE.checkpoint) is None:  # a resumed student phase keeps its current round
            fed.ckpt.finish_phase(ph.KD_CACHE.checkpoint, {})


def student_step(fed: Federation, run: RunModels) -> None:
    """Weights mode: local KD rounds of the student and FedAvg."""
    cfg, teacher = fed.cfg, run.teacher
    assert teacher is not None

    def initial() -> ArrayRecord:
        return teacher if run.from_teacher else to_record(new_model(run.s_cfg, cfg.seed + SEED_OFFSETS.student))

    run.student = weights_phase(fed, ph.STUDENT, initial, cfg.rounds.student, config={ph.PROXIMAL_MU: _mu(cfg)})
    _save_rejections(fed)


def logits_step(fed: Federation, run: RunModels) -> None:
    """Logits mode: the sites' logits on the proxy cohort; the student distilled at the server."""
    from fedslide.server.logits_mode import distil_from_logits  # the proxy cohort's loading, only in this mode

    assert run.teacher is not None and run.adapter is not None
    run.student = distil_from_logits(fed, run.teacher, run.experts, run.adapter, run.centroids, run.tfp)


def calibrate_step(fed: Federation, run: RunModels) -> None:
    """The final teacher's and student's temperatures: the grid value of the least val NLL summed over the sites."""
    done = fed.ckpt.phase_done(ph.CALIBRATE.checkpoint)
    if done is not None:
        run.temperatures = dict(done["temperatures"])
        return
    assert run.teacher is not None and run.student is not None and run.adapter is not None
    fed.grid.server_round = 0
    replies = fed.query(ph.CALIBRATE, {p.TEACHER: run.teacher, p.STUDENT: run.student, p.ADAPTER: run.adapter})
    records = [r.content.metric_records[p.METRICS] for r in replies]
    metrics = [{key: p.number(record, key) for key in record} for record in records]
    run.temperatures = {model: pick_temperature(metrics, model) for model in ph.CALIBRATED_MODELS}
    val_n = sum(int(m.get(ph.VAL_N, 0)) for m in metrics)
    fed.ckpt.finish_phase(ph.CALIBRATE.checkpoint, {"temperatures": run.temperatures, "val_n": val_n})
    log.info("phase calibrate: temperatures %s from %d val slide(s)", run.temperatures, val_n)


def evaluation_step(fed: Federation, run: RunModels) -> None:
    """The final models pushed to every site and evaluated there (with the calibrated temperatures, if any)."""
    records = {p.TEACHER: run.teacher, p.STUDENT: run.student, p.BASELINE: run.baseline, p.ADAPTER: run.adapter}
    keys = {"teacher_high": ph.TEACHER_TEMPERATURE, "student_low": ph.STUDENT_TEMPERATURE}
    config = {keys[model]: t for model, t in run.temperatures.items()}
    records.update(clinical_step.evaluation_records(fed, run))
    run.evaluation = final_evaluation(fed, {k: v for k, v in records.items() if v is not None}, config)


ServerStep = Callable[[Federation, RunModels], None]
# the server step that drives each phase (the handshake runs before the models exist: `handshake`)
SERVER_STEPS: dict[ph.Phase, ServerStep] = {
    ph.PIXEL_STAGE1_INIT: pixel_stage1_step,
    ph.PIXEL_STAGE1: pixel_stage1_step,
    ph.PIXEL_STAGE1_REENCODE: pixel_stage1_step,
    ph.ADAPTER: adapter_step,
    ph.TEACHER: teacher_step,
    ph.CLUSTER_INIT: clusters_step,
    ph.CLUSTER_STATS: clusters_step,
    ph.EXPERTS: experts_step,
    ph.KD_CACHE: kd_cache_step,
    ph.STUDENT: student_step,
    ph.LOGITS: logits_step,
    ph.CLINICAL: clinical_step.clinical_step,
    ph.CALIBRATE: calibrate_step,
    ph.EVALUATION: evaluation_step,
}


def plan(cfg: FederationConfig) -> list[ph.Phase]:
    """The phases a run goes through after the handshake, in order (a phase's server step runs once)."""
    phases = [ph.PIXEL_STAGE1] if cfg.pixel_stage1 else []  # its step drives init, rounds and re-encoding
    phases += [ph.ADAPTER, ph.TEACHER]
    if cfg.kd.lambda_expert > 0:
        phases += [ph.CLUSTER_INIT, ph.EXPERTS]  # the clusters step drives cluster-init and cluster-stats
    phases += [ph.LOGITS] if cfg.mode == "logits" else [ph.KD_CACHE, ph.STUDENT]
    phases += [ph.CLINICAL] if cfg.clinical.enabled else []
    phases += [ph.CALIBRATE] if cfg.calibrate else []
    return [*phases, ph.EVALUATION]


@dataclass
class RunResult:
    """What the run produced at the server."""

    run_dir: Path
    models: dict[str, ArrayRecord]
    evaluation: list[Message]
    fed: Federation
    clinical: ArrayRecord | None = None  # the final BD model (`clinical.enabled`)


def run_federation(grid: Grid, cfg: FederationConfig, run_dir: Path) -> RunResult:
    """Run (or resume) every phase; returns the final models and the sites' evaluation replies."""
    ckpt = Checkpoint(run_dir)
    if ckpt.exists and not cfg.resume:
        raise FederationError(
            f"{run_dir} already holds a run; pass resume = true (--resume {run_dir.name}) "
            "to continue it, or choose another run id"
        )
    fed = Federation(
        cfg, FederationGrid(grid), run_dir, ckpt, UpdateValidator(cfg.max_update_norm, cfg.update_norm_factor)
    )
    fed.validator.rejections.extend(_rejections(ckpt))
    fed.validator.round_errors.extend(RoundError(**r) for r in ckpt.state.get("round_errors", []))
    handshake(fed)
    fed.accountant = make_accountant(cfg, len(fed.sites), ckpt.state.get("accountant"))
    assert fed.facts is not None
    t_cfg, s_cfg = teacher_config(cfg, fed.facts), student_config(cfg, fed.facts)
    from_teacher = starts_from_teacher(cfg.kd.student_init, cfg.kd.student_input, s_cfg, t_cfg)  # fails before training
    run = RunModels(t_cfg, s_cfg, from_teacher)
    for phase in plan(cfg):
        SERVER_STEPS[phase](fed, run)
    return RunResult(run_dir, run.records(), run.evaluation, fed, run.clinical)


def final_evaluation(
    fed: Federation, records: dict[str, ArrayRecord], extra: dict[str, Any] | None = None
) -> list[Message]:
    """Push the final models to every training and evaluation-only site; their metrics (test split, or all
    slides of an evaluation-only site). `extra`: more declared config entries (the temperatures)."""
    fed.grid.server_round = 0
    fed.grid.admitted = set(fed.sites) | set(fed.eval_sites)
    fed.grid.phase = ph.EVALUATION.phase
    records = fed.with_standardize(ph.EVALUATION, records)
    if fed.ood is not None:
        records = {**records, ph.OOD: fed.ood}
    ph.EVALUATION.check_sent(records)
    messages = []
    connected = set(fed.grid.get_node_ids())
    for node in sorted(connected):
        split = "all" if node in fed.eval_sites else "test"
        config = ConfigRecord(fed.base_config(ph.EVALUATION, **{ph.EVAL_SPLIT: split}, **(extra or {})))
        messages.append(
            Message(
                content=RecordDict({p.CONFIG: config, **records}),
                dst_node_id=node,
                message_type=ph.EVALUATION.message_type,
            )
        )
    replies = [r for r in fed.grid.send_and_receive(messages, timeout=fed.cfg.round_timeout) if not r.has_error()]
    fed.grid.admitted = set(fed.sites)
    if not replies:
        raise FederationError("final evaluation: no site replied")
    return replies


def _rejections(ckpt: Checkpoint) -> list[Any]:
    from fedslide.server.strategies import Rejection

    return [Rejection(**r) for r in ckpt.state.get("rejections", [])]


def _save_rejections(fed: Federation) -> None:
    fed.ckpt.commit(
        rejections=[vars(r) for r in fed.validator.rejections],
        round_errors=[vars(r) for r in fed.validator.round_errors],
    )
