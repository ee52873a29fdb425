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
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Strategy
from sklearn.cluster import KMeans

from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.distillation.clustering import update_centroids
from fedslide.common.distillation.student import starts_from_teacher
from fedslide.common.federation import protocol as p
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
from fedslide.server.checkpoint import Checkpoint
from fedslide.server.grid import FederationGrid
from fedslide.server.privacy import dp_strategy, make_accountant
from fedslide.server.strategies import BestRounds, ExpertsFedAvg, FederationError, Group, PhaseStrategy, UpdateValidator

log = logging.getLogger(__name__)

ENCODER_KEYS = ("encoder-name", "encoder-hash", "encoder-dim", "token-grid", "child-grid")


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

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def base_config(self, phase: str, **extra: Any) -> dict[str, Any]:
        """Config entries of every message of a phase."""
        assert self.facts is not None or phase == "handshake"
        base: dict[str, Any] = {"run-id": self.run_id, "phase": phase, "server-round": self.grid.server_round}
        if self.facts is not None:
            base.update(self.facts.to_config())
        return {**base, **extra}

    def query(self, message_type: str, phase: str, records: dict[str, ArrayRecord], **config: Any) -> list[Message]:
        """Send one message per admitted site; the usable replies (at least min-nodes, else FederationError)."""
        self.grid.phase = phase
        content = RecordDict({p.CONFIG: ConfigRecord(self.base_config(phase, **config)), **records})
        nodes = sorted(self.grid.get_node_ids())
        messages = [Message(content=content, dst_node_id=n, message_type=message_type) for n in nodes]
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout) if not r.has_error()]
        if len(replies) < min(self.cfg.min_nodes, max(len(nodes), 1)) or not replies:
            raise FederationError(f"phase {phase}: {len(replies)} usable repl(ies) from {len(nodes)} site(s), "
                                  f"fewer than min-nodes = {self.cfg.min_nodes}; see the absent nodes in the log")
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
    saved = fed.ckpt.state.get("handshake")
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
        return
    nodes = wait_for_nodes(fed.grid, max(fed.cfg.min_nodes, fed.cfg.expected_nodes), wait_timeout)
    candidates: dict[int, SiteInfo] = {}
    for node, reply in _ask_sites(fed, nodes).items():
        if reply.has_error():
            fed.refused.append({"node": node, "reason": f"handshake failed at the site: {reply.error.reason}"})
            continue
        candidates[node] = _site_info(node, reply)
    if not candidates:
        raise FederationError(f"handshake: no site answered ({len(nodes)} connected); refused: {fed.refused}")
    identities = Counter(tuple(str(s.encoder[k]) for k in ENCODER_KEYS) for s in candidates.values())
    reference = _reference_encoder(fed.cfg, candidates, identities)
    for node, info in sorted(candidates.items()):
        ident = tuple(str(info.encoder[k]) for k in ENCODER_KEYS)
        if ident != reference:
            diff = {k: (info.encoder[k], ref) for k, ref in zip(ENCODER_KEYS, reference) if str(info.encoder[k]) != ref}
            fed.refused.append({"node": node, "site": info.name,
                                "reason": "encoder differs from the federation's: " + ", ".join(
                                    f"{k} {got!r} (federation: {want!r})" for k, (got, want) in diff.items())})
            log.warning("handshake: refused site %s (node %d): %s", info.name, node, fed.refused[-1]["reason"])
            continue
        (fed.eval_sites if info.name in fed.cfg.eval_only_sites else fed.sites)[node] = info
    if len(fed.sites) < fed.cfg.min_nodes:
        raise FederationError(f"handshake: {len(fed.sites)} site(s) admitted, min-nodes = {fed.cfg.min_nodes}; "
                              f"refused: {fed.refused}")
    classes = sorted({c for s in [*fed.sites.values(), *fed.eval_sites.values()] for c in s.classes})
    if len(classes) < 2:
        raise FederationError(f"handshake: the sites' labels have {len(classes)} class(es) {classes}; need at least 2")
    first = next(iter(fed.sites.values()))
    fed.facts = p.Facts(tuple(classes), int(first.encoder["encoder-dim"]), int(first.encoder["token-grid"]),
                        int(first.encoder["child-grid"]), str(first.encoder["encoder-name"]))
    fed.grid.admitted = set(fed.sites)
    _commit_handshake(fed)
    log.info("handshake: admitted %s; refused %d", ", ".join(s.name for s in fed.sites.values()), len(fed.refused))


def _ask_sites(fed: Federation, nodes: list[int]) -> dict[int, Message]:
    """The handshake query to `nodes`; their replies by node."""
    fed.grid.phase = "handshake"
    content = RecordDict({p.CONFIG: ConfigRecord({"run-id": fed.run_id, "phase": "handshake"})})
    messages = [Message(content=content, dst_node_id=n, message_type=p.HANDSHAKE) for n in nodes]
    replies = fed.grid.send_and_receive(messages, timeout=fed.cfg.round_timeout)
    return {int(r.metadata.src_node_id): r for r in replies}


def _site_info(node: int, reply: Message) -> SiteInfo:
    site, counts = reply.content[p.SITE], reply.content[p.METRICS]
    encoder = {k: site.get(k) for k in ("encoder-name", "encoder-hash")}
    encoder.update({k: int(counts[k]) for k in ("encoder-dim", "token-grid", "child-grid")})
    return SiteInfo(node, str(site["site-name"]), {k: int(v) for k, v in counts.items()}, encoder,
                    [str(c) for c in site["classes"]])


def _commit_handshake(fed: Federation) -> None:
    assert fed.facts is not None
    fed.ckpt.commit(handshake={"facts": fed.facts.to_dict(), "refused": fed.refused,
                               "sites": {str(n): vars(s) for n, s in fed.sites.items()},
                               "eval_sites": {str(n): vars(s) for n, s in fed.eval_sites.items()}})


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
def _inner_strategy(fed: Federation, phase: str, min_nodes: int) -> Strategy:
    cfg = fed.cfg
    if phase == "student" and cfg.student_server_momentum > 0 and (fed.accountant is not None or cfg.aggregation != "mean"):
        log.warning("phase student: student-server-momentum %g not applied: %s keeps its own update",
                    cfg.student_server_momentum, "DP" if fed.accountant is not None else f"aggregation = {cfg.aggregation}")
    if fed.accountant is not None:  # every weights release is noised and accounted (equal site weights)
        return dp_strategy(cfg, len(fed.sites), min_nodes, fed.accountant)
    common = {"fraction_evaluate": 0.0, "min_train_nodes": min_nodes, "min_available_nodes": min_nodes}
    if phase == "experts":
        return ExpertsFedAvg(**common)
    if phase == "adapter":
        return FedAvg(**common)
    if phase == "student" and cfg.student_server_momentum > 0 and cfg.aggregation == "mean":
        return FedAvgM(server_momentum=cfg.student_server_momentum, **common)  # FedProx's mu travels in the config
    if cfg.aggregation == "median":
        return FedMedian(**common)
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trim_fraction, **common)
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    return FedAvg(**common)


def weights_phase(
    fed: Federation, phase: str, make_initial: Callable[[], ArrayRecord], rounds: int,
    extra: dict[str, ArrayRecord] | None = None, groups: dict[str, Group] | None = None, **config: Any,
) -> ArrayRecord:
    """Federated rounds of one model (or packed experts); returns the best-validated global arrays."""
    done = fed.ckpt.phase_done(phase)
    if done is not None:
        final = fed.ckpt.load_arrays(f"{phase}.final")
        if final is not None:
            fed.curves[phase] = done.get("history", [])
            return final
    start = time.perf_counter()
    tracker = BestRounds(groups or {"": Group()})
    min_nodes = min(fed.cfg.min_nodes, len(fed.sites))
    inner = _inner_strategy(fed, phase, min_nodes)
    initial, start_round = make_initial(), 0
    current = fed.ckpt.state.get("current")
    if current and current.get("phase") == phase:
        saved = fed.ckpt.load_arrays(f"{phase}.current")
        if saved is not None:
            initial, start_round = saved, int(current["round"])
            tracker.restore(current.get("tracker", {}), fed.ckpt.load_arrays(f"{phase}.best"))
            momentum = fed.ckpt.load_arrays(f"{phase}.momentum")
            if isinstance(inner, FedAvgM) and momentum is not None:
                inner.momentum_vector = momentum.to_numpy_ndarrays()
            log.info("phase %s: resuming after round %d", phase, start_round)
    fed.grid.phase = phase
    strategy = PhaseStrategy(inner, phase, tracker, fed.validator, min_nodes, extra, round_offset=start_round)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        fed.ckpt.save_arrays(f"{phase}.current", arrays)
        if isinstance(inner, FedAvgM) and inner.momentum_vector is not None:  # the server optimizer's state
            fed.ckpt.save_arrays(f"{phase}.momentum", ArrayRecord(dict(zip(arrays.keys(), map(Array, inner.momentum_vector)))))
        fed.ckpt.save_arrays(f"{phase}.best", tracker.best_arrays(arrays))
        fed.ckpt.commit(current={"phase": phase, "round": start_round + server_round, "tracker": tracker.state()},
                        accountant=fed.accountant.state_dict() if fed.accountant is not None else None)
        return None

    final = initial
    remaining = rounds - start_round
    if remaining > 0:
        result = strategy.start(fed.grid, initial, num_rounds=remaining, timeout=fed.cfg.round_timeout,
                                train_config=ConfigRecord(fed.base_config(phase, **{"round-offset": start_round}, **config)),
                                evaluate_fn=checkpoint)
        final = result.arrays if result.arrays is not None else initial
    # validate the last global model too (the train replies validated each round's incoming model)
    fed.grid.server_round = rounds
    replies = fed.query(p.EVALUATE, phase, {p.ARRAYS: final, **(extra or {})}, **config)
    tracker.observe(rounds, final, [r.content for r in replies])
    best = tracker.best_arrays(final)
    fed.ckpt.save_arrays(f"{phase}.final", best)
    fed.curves[phase] = tracker.history
    fed.timings[phase] = round(time.perf_counter() - start, 3)
    fed.ckpt.finish_phase(phase, {"best": tracker.best, "history": tracker.history, "rounds": rounds,
                                  "seconds": fed.timings[phase]})
    log.info("phase %s: done, best %s", phase, tracker.best)
    return best


def teacher_and_baseline(fed: Federation, t_cfg: ModelConfig, s_cfg: ModelConfig) -> tuple[ArrayRecord, ArrayRecord]:
    """The high-res teacher and the low-res baseline, trained in the same messages (one round trip per round for
    both; each model kept at its own best round, and trained for its own number of rounds)."""
    seed, rounds = fed.cfg.seed, fed.cfg.rounds

    def initial() -> ArrayRecord:
        return pack_models({"teacher": to_record(new_model(t_cfg, seed + 2)),
                            "baseline": to_record(new_model(s_cfg, seed + 100))})

    groups = {name: Group(f"{name}.", f"val-loss-{name}", f"val-n-{name}") for name in ("teacher", "baseline")}
    models = unpack_models(weights_phase(fed, "teacher", initial, max(rounds.teacher, rounds.baseline), groups=groups))
    if set(models) != set(groups):
        raise FederationError(
            f"{fed.run_dir / 'checkpoint'}: the teacher phase's arrays are grouped as {sorted(models)[:4]}, expected "
            f"{sorted(groups)}; this run was checkpointed by an earlier fedslide (teacher and baseline in separate "
            "phases) and cannot be resumed: start it again under a new run id")
    _save_rejections(fed)
    return models["teacher"], models["baseline"]


# ---- phase 3: federated k-means ---------------------------------------------------------------------
def _stats(replies: list[Message]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(r.content[p.STATS]["sums"].numpy(), r.content[p.STATS]["counts"].numpy()) for r in replies]


def federated_kmeans(fed: Federation, teacher: ArrayRecord) -> tuple[np.ndarray, list[int]]:
    """Centroids from per-site cluster sums/counts only: local k-means seeds, then Lloyd iterations."""
    done = fed.ckpt.phase_done("clusters")
    saved = fed.ckpt.load_arrays("clusters.centroids")
    if done is not None and saved is not None:
        return saved["centroids"].numpy(), list(done["sizes"])
    start = time.perf_counter()
    c = fed.cfg.clusters.num_clusters
    tfp = fingerprint(teacher)
    replies = fed.query(p.CLUSTER_INIT, "cluster-init", {p.TEACHER: teacher}, **{"teacher-fingerprint": tfp})
    rows, weights = [], []
    for sums, counts in _stats(replies):
        keep = counts > 0
        rows.append(sums[keep] / counts[keep, None])
        weights.append(counts[keep])
    seeds, seed_weights = np.concatenate(rows), np.concatenate(weights).astype(float)
    if len(seeds) < c:
        raise FederationError(f"federated k-means: only {len(seeds)} site cluster(s) above the suppression threshold "
                              f"({fed.cfg.min_count}) for {c} clusters; lower clusters.num-clusters")
    centroids = KMeans(n_clusters=c, n_init=fed.cfg.clusters.n_init, random_state=fed.cfg.seed).fit(
        seeds, sample_weight=seed_weights).cluster_centers_
    history = []
    sizes = [0] * c
    for iteration in range(fed.cfg.rounds.cluster_iterations):
        fed.grid.server_round = iteration + 1
        replies = fed.query(p.CLUSTER_STATS, "cluster-stats", {p.CENTROIDS: _centroid_record(centroids)},
                            **{"teacher-fingerprint": tfp})
        stats = _stats(replies)
        new = update_centroids(stats, previous=centroids)
        shift = float(np.abs(new - centroids).max())
        sizes = np.sum([n for _, n in stats], axis=0).astype(int).tolist()
        history.append({"iteration": iteration + 1, "shift": shift, "sizes": sizes})
        centroids = new
        if shift < 1e-6:
            break
    fed.ckpt.save_arrays("clusters.centroids", _centroid_record(centroids))
    fed.timings["clusters"] = round(time.perf_counter() - start, 3)
    fed.ckpt.finish_phase("clusters", {"sizes": sizes, "history": history, "seconds": fed.timings["clusters"]})
    return centroids, sizes


def _centroid_record(centroids: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"centroids": Array(np.asarray(centroids, dtype=np.float64))})


# ---- the whole run ----------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What the run produced at the server."""

    run_dir: Path
    models: dict[str, ArrayRecord]
    evaluation: list[Message]
    fed: Federation


def run_federation(grid: Grid, cfg: FederationConfig, run_dir: Path) -> RunResult:
    """Run (or resume) every phase; returns the final models and the sites' evaluation replies."""
    ckpt = Checkpoint(run_dir)
    if ckpt.exists and not cfg.resume:
        raise FederationError(f"{run_dir} already holds a run; pass resume = true (--resume {run_dir.name}) "
                              "to continue it, or choose another run id")
    fed = Federation(cfg, FederationGrid(grid), run_dir, ckpt,
                     UpdateValidator(cfg.max_update_norm, cfg.update_norm_factor))
    fed.validator.rejections.extend(_rejections(ckpt))
    handshake(fed)
    fed.accountant = make_accountant(cfg, len(fed.sites), ckpt.state.get("accountant"))
    facts = fed.facts
    assert facts is not None
    seed = cfg.seed
    t_cfg, s_cfg = teacher_config(cfg, facts), student_config(cfg, facts)
    from_teacher = starts_from_teacher(cfg.kd.student_init, cfg.kd.student_input, s_cfg, t_cfg)  # fails before training
    adapter = weights_phase(fed, "adapter", lambda: to_record(new_adapter(cfg, facts, seed + 1)), cfg.rounds.adapter)
    _save_rejections(fed)
    teacher, baseline = teacher_and_baseline(fed, t_cfg, s_cfg)
    tfp = fingerprint(teacher)
    experts = centroids = None
    if cfg.kd.lambda_expert > 0:
        centroids, _ = federated_kmeans(fed, teacher)
        c = cfg.clusters.num_clusters

        def initial_experts() -> ArrayRecord:
            start = teacher if cfg.experts.init == "teacher" else to_record(new_model(t_cfg, seed + 3))
            return pack_experts([start] * c)

        groups = {str(i): Group(f"expert-{i}.", f"val-loss-{i}", f"val-n-{i}") for i in range(c)}
        experts = weights_phase(fed, "experts", initial_experts, cfg.rounds.experts,
                                extra={p.CENTROIDS: _centroid_record(centroids)}, groups=groups,
                                **{"teacher-fingerprint": tfp, "proximal-mu": cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0})
        _save_rejections(fed)
    if cfg.mode == "logits":
        from fedslide.server.logits_mode import distil_from_logits

        student = distil_from_logits(fed, teacher, experts, adapter, centroids, tfp)
    else:
        if fed.ckpt.phase_done("kd-cache") is None or fed.ckpt.load_arrays("student.final") is None:
            records = {p.TEACHER: teacher, p.ADAPTER: adapter}
            if experts is not None and centroids is not None:
                records.update({p.EXPERTS: experts, p.CENTROIDS: _centroid_record(centroids)})
            fed.query(p.KD_CACHE, "kd-cache", records, **{"teacher-fingerprint": tfp})
            if fed.ckpt.phase_done("kd-cache") is None:  # a resumed student phase keeps its current round
                fed.ckpt.finish_phase("kd-cache", {})
        student = weights_phase(fed, "student", lambda: teacher if from_teacher else to_record(new_model(s_cfg, seed + 100)),
                                cfg.rounds.student, **{"proximal-mu": cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0})
        _save_rejections(fed)
    models = {"adapter": adapter, "teacher": teacher, "baseline": baseline, "student": student}
    if experts is not None:
        models["experts"] = experts
    evaluation = final_evaluation(fed, {p.TEACHER: teacher, p.STUDENT: student, p.BASELINE: baseline, p.ADAPTER: adapter})
    return RunResult(run_dir, models, evaluation, fed)


def final_evaluation(fed: Federation, records: dict[str, ArrayRecord]) -> list[Message]:
    """Push the final models to every training and evaluation-only site; their metrics (test split, or all
    slides of an evaluation-only site)."""
    fed.grid.server_round = 0
    fed.grid.admitted = set(fed.sites) | set(fed.eval_sites)
    fed.grid.phase = p.FINAL
    messages = []
    connected = set(fed.grid.get_node_ids())
    for node in sorted(connected):
        split = "all" if node in fed.eval_sites else "test"
        config = ConfigRecord(fed.base_config(p.FINAL, **{"eval-split": split}))
        messages.append(Message(content=RecordDict({p.CONFIG: config, **records}), dst_node_id=node,
                                message_type=p.EVALUATE))
    replies = [r for r in fed.grid.send_and_receive(messages, timeout=fed.cfg.round_timeout) if not r.has_error()]
    fed.grid.admitted = set(fed.sites)
    if not replies:
        raise FederationError("final evaluation: no site replied")
    return replies


def _rejections(ckpt: Checkpoint) -> list[Any]:
    from fedslide.server.strategies import Rejection

    return [Rejection(**r) for r in ckpt.state.get("rejections", [])]


def _save_rejections(fed: Federation) -> None:
    fed.ckpt.commit(rejections=[vars(r) for r in fed.validator.rejections])
