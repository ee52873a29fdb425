"""Logits mode of the student phase: sites send only teacher/expert logits on the coordinating site's proxy
cohort; the server averages them and distils the low-res student on the proxy cohort itself."""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedslide.common.device import resolve_device
from fedslide.common.distillation.adapter import build_adapter
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.losses import CachedKDLoss
from fedslide.common.distillation.mil import train_selected, with_epochs
from fedslide.common.distillation.stages import student_input
from fedslide.common.distillation.student import starts_from_teacher, student_bags
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.models import (
    adapter_spec,
    load_record,
    new_model,
    pack_bags,
    student_config,
    teacher_config,
    to_record,
)
from fedslide.common.seeds import SEED_OFFSETS
from fedslide.common.training.loop import class_weights
from fedslide.server.strategies import FederationError, robust_combine


def _valid_logits(fed, replies: list[Message], n: int, k: int) -> list[Message]:  # noqa: ANN001
    """The replies whose logits are finite and [n, k] (experts [C, n, k]) and whose n-train is within the site's
    handshake count; the others are rejected (FederationError when fewer than min-nodes stay)."""
    out = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        record = reply.content.array_records.get(p.LOGITS_RECORD)
        n_train = fed.sites[node].counts.get(ph.split_count("train"), 0) if node in fed.sites else 0
        said = p.number(reply.content[p.METRICS], ph.N_TRAIN, -1.0)
        reason = None
        if record is None or ph.TEACHER_LOGITS not in record:
            reason = "no teacher logits"
        elif not 0 <= said <= n_train:
            reason = f"n-train = {said:g} outside [0, {n_train}] (its handshake count)"
        else:
            for key, array in record.items():
                a = array.numpy()
                wrong_shape = key != ph.EXPERT_WEIGHTS and a.shape[-2:] != (n, k)
                if wrong_shape or not np.isfinite(a).all():
                    reason = f"logits {key!r} {a.shape} are not finite [.., {n}, {k}]"
                    break
        if reason is None:
            out.append(reply)
        else:
            fed.validator.reject(ph.LOGITS.name, 0, node, reason)
    if len(out) < min(fed.cfg.min_nodes, len(fed.sites)) or not out:
        raise FederationError(f"phase logits: {len(out)} valid repl(ies) of {len(replies)}; see the rejections")
    return out


def _weighted(
    replies: list[Message], key: str, weights: list[np.ndarray], method: str = "mean", trim_fraction: float = 0.2
) -> np.ndarray:
    stack = np.stack([r.content.array_records[p.LOGITS_RECORD][key].numpy() for r in replies]).astype(np.float64)
    if method != "mean":  # robust: coordinate-wise over the sites, whatever each says it holds
        return robust_combine(stack, method, trim_fraction)
    w = np.stack(weights).astype(np.float64)  # [sites] or [sites, C]
    while w.ndim < stack.ndim:
        w = w[..., None]
    total = w.sum(axis=0)
    mean = (stack * w).sum(axis=0) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, mean, stack.mean(axis=0))  # nobody trained it: plain mean of the global model's logits


def distil_from_logits(
    fed, teacher: ArrayRecord, experts: ArrayRecord | None, adapter: ArrayRecord, centroids: np.ndarray | None, tfp: str
) -> ArrayRecord:  # noqa: ANN001
    """Collect the sites' logits on the proxy cohort, average them, train the student at the server."""
    step = ph.LOGITS.checkpoint  # the student's step, as in weights mode
    done = fed.ckpt.phase_done(step)
    saved = fed.ckpt.load_arrays(f"{step}.final")
    if done is not None and saved is not None:
        fed.curves[step] = done.get("history", [])
        return saved
    cfg, facts = fed.cfg, fed.facts
    start = time.perf_counter()
    data = load_sites([cfg.proxy_dir], cfg.encoder, seed=cfg.seed, classes=facts.classes, carving=cfg.carve)
    if data.feature_dim != facts.feature_dim or data.token_grid != facts.token_grid:
        raise FederationError(
            f"proxy cohort {cfg.proxy_dir}: features of dim {data.feature_dim} / token grid "
            f"{data.token_grid}, the sites' are {facts.feature_dim} / {facts.token_grid}"
        )
    records = {p.TEACHER: teacher, p.PROXY: pack_bags([s.high.features for s in data.slides])}
    if experts is not None and centroids is not None:
        records[p.EXPERTS] = experts
        records[p.CENTROIDS] = ArrayRecord({ph.CENTROIDS: Array(np.asarray(centroids, dtype=np.float64))})
    fed.grid.server_round = 0
    replies = fed.query(ph.LOGITS, records, {ph.TEACHER_FINGERPRINT: tfp})
    replies = _valid_logits(fed, replies, len(data.slides), len(facts.classes))
    robust = {"method": cfg.aggregation, "trim_fraction": cfg.trim_fraction}
    n_train = [np.asarray(p.number(r.content.metric_records[p.METRICS], ph.N_TRAIN)) for r in replies]
    teacher_logits = torch.from_numpy(_weighted(replies, ph.TEACHER_LOGITS, n_train, **robust)).float()
    expert_logits = None
    if p.EXPERTS in records and all(ph.EXPERT_LOGITS in r.content[p.LOGITS_RECORD] for r in replies):
        weights = [r.content.array_records[p.LOGITS_RECORD][ph.EXPERT_WEIGHTS].numpy() for r in replies]
        expert_logits = torch.from_numpy(_weighted(replies, ph.EXPERT_LOGITS, weights, **robust)).float()
    adapter_model = load_record(build_adapter(adapter_spec(cfg, facts)), adapter).eval()
    mode = student_input(cfg.kd.student_input, data.has_tokens)
    cohort = data.cohort(student_bags(adapter_model, data, mode))
    train, val = data.split("train"), data.split("val")
    kd = cfg.kd
    class_weight = class_weights(data.labels[train], len(facts.classes), cfg.training.class_weighting)
    loss = CachedKDLoss(
        teacher_logits,
        expert_logits,
        kd.temperature,
        kd.lambda_base,
        kd.lambda_expert if expert_logits is not None else 0.0,
        "all",
        None,
        class_weight,
    )
    s_cfg, t_cfg = student_config(cfg, facts), teacher_config(cfg, facts)
    model = new_model(s_cfg, cfg.seed + SEED_OFFSETS.student)
    if starts_from_teacher(kd.student_init, mode, s_cfg, t_cfg):
        load_record(model, teacher)
    fit = train_selected(
        model,
        cohort,
        train,
        val,
        with_epochs(cfg.training, cfg.proxy_epochs),
        resolve_device(cfg.device),
        cfg.seed + SEED_OFFSETS.student,
        loss,
        description="student (proxy)",
    )
    student = to_record(model.cpu())
    history = [{"round": h.epoch, "train_loss": h.train_loss, "val_loss": h.val_loss} for h in fit.history]
    fed.ckpt.save_arrays(f"{step}.final", student)
    fed.curves[step] = history
    fed.timings[step] = round(time.perf_counter() - start, 3)
    fed.ckpt.finish_phase(
        step,
        {
            "history": history,
            "best": {"": {"round": fit.best_epoch, "loss": fit.best_score}},
            "proxy_slides": len(data.slides),
            "seconds": fed.timings[step],
        },
    )
    return student
