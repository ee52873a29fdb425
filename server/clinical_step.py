"""The server's side of the federated clinical (BD) phase (`[federation.clinical] enabled = true`).

At the handshake the training sites' clinical sums are pooled into the BD model's input normalisation (a release of
fewer than suppress-below slides counts for nothing; kept in the checkpoint). After the student phase the BD model
(`common.models.bimodal.BidirectionalMIL` on the student's instances) trains for rounds.clinical rounds through
`server.protocol.weights_phase` (checkpoints, resume mid-phase, update validation, best round by validation loss),
aggregated by `server.clinical_strategy.ClinicalFedAvg`, and goes to every site with the final evaluation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from flwr.app import ArrayRecord, Message

from fedslide.common.clinical import pooled_clinical_stats
from fedslide.common.distillation.clinical_model import build_bd
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.clinical_phase import bd_record
from fedslide.common.federation.clinical_sums import clinical_sums_from_record
from fedslide.common.federation.feature_stats import stats_record
from fedslide.common.seeds import SEED_OFFSETS
from fedslide.server.strategies import FederationError

if TYPE_CHECKING:
    from fedslide.server.protocol import Federation, RunModels

log = logging.getLogger(__name__)

CLINICAL_NORM_KEY = "clinical-norm"  # the checkpoint's arrays of the pooled clinical normalisation


def pool_clinical(fed: Federation, replies: dict[int, Message]) -> None:
    """The training sites' clinical sums pooled into the BD model's input normalisation, kept in the checkpoint;
    FederationError when no site released any (each below suppress-below slides with a complete row)."""
    dim = fed.cfg.clinical.encoded_dim
    releases = []
    for node, info in sorted(fed.sites.items()):
        record = replies[node].content.array_records.get(p.STATS)
        if record is None or ph.CLINICAL_SUMS not in record:
            raise FederationError(f"handshake: site {info.name} sent no clinical sums with clinical.enabled = true")
        try:
            releases.append(clinical_sums_from_record(record, dim))
        except ValueError as exc:
            raise FederationError(f"handshake: site {info.name}'s clinical sums: {exc}") from None
    usable = [r for r in releases if r.slides >= max(fed.cfg.min_count, 1)]
    if not usable:
        raise FederationError(
            "handshake: clinical.enabled = true, but no site released clinical sums (each has fewer than "
            f"suppress-below = {fed.cfg.min_count} training slides with a complete clinical.csv row); add clinical "
            "tables or set clinical.enabled = false"
        )
    stats = pooled_clinical_stats(usable, fed.cfg.min_count)
    fed.clinical_norm = stats_record(stats)
    fed.ckpt.save_arrays(CLINICAL_NORM_KEY, fed.clinical_norm)
    log.info("handshake: clinical normalisation pooled over %d slides of %d site(s)", stats.count, len(usable))


def resume_clinical(fed: Federation) -> None:
    """On resume: the pooled clinical normalisation from the checkpoint (FederationError when the run began
    without it)."""
    fed.clinical_norm = fed.ckpt.load_arrays(CLINICAL_NORM_KEY)
    if fed.cfg.clinical.enabled and fed.clinical_norm is None:
        raise FederationError(
            f"clinical.enabled = true but the checkpoint of {fed.run_dir} holds no clinical normalisation (the run "
            "began with clinical.enabled = false); resume it with clinical.enabled = false"
        )


def clinical_step(fed: Federation, run: RunModels) -> None:
    """rounds.clinical FedAvg rounds of the BD model on the sites' student instances (sent with the final adapter
    and the pooled normalisation); `multi.` weighted by each site's clinical slides (`ClinicalFedAvg`)."""
    from fedslide.server.protocol import weights_phase  # the protocol imports this module

    assert fed.facts is not None and run.adapter is not None and fed.clinical_norm is not None
    cfg, facts = fed.cfg, fed.facts
    in_dim = int(run.s_cfg.in_dim)  # the width of the student's instances, which the BD model reads

    def initial() -> ArrayRecord:
        torch.manual_seed(cfg.seed + SEED_OFFSETS.student)
        return bd_record(build_bd(in_dim, cfg.clinical, len(facts.classes)))

    run.clinical = weights_phase(
        fed,
        ph.CLINICAL,
        initial,
        cfg.rounds.clinical,
        extra={p.ADAPTER: run.adapter, ph.CLINICAL_NORM: fed.clinical_norm},
    )


def evaluation_records(fed: Federation, run: RunModels) -> dict[str, ArrayRecord]:
    """The final evaluation's BD records (none when the run has no BD model)."""
    if run.clinical is None or fed.clinical_norm is None:
        return {}
    return {ph.BD_MODEL: run.clinical, ph.CLINICAL_NORM: fed.clinical_norm}
