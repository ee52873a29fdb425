"""FedAvg of the bidirectional-distillation (BD) model: the multi-modal branch (`multi.`) averaged with each
site's clinical-slide count (`n-clinical`), every other array (shared slide encoder, single-modal branch, prompt)
with its training-slide count (`num-examples`), so a site without clinical data contributes the single-modal
branch and the prompt only. (Zhang et al., BIBM 2023, federated as issue 34 asks: both branches and the prompt
by FedAvg.)"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.clinical_phase import MULTI_PREFIX, N_CLINICAL
from fedslide.common.flower_compat import aggregate_arrayrecords, checked_replies


class ClinicalFedAvg(FedAvg):
    """FedAvg with two weights per reply: `n-clinical` for `multi.` arrays, `num-examples` for the others; when no
    site has clinical data the `multi.` arrays stay as sent (every reply carries them unchanged)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = checked_replies(self, replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        merged: dict[str, Array] = {}
        for is_multi, weight_key in ((True, N_CLINICAL), (False, ph.NUM_EXAMPLES)):
            parts = []
            for content in contents:
                metrics = next(iter(content.metric_records.values()))
                arrays = content.array_records[p.ARRAYS]
                sub = ArrayRecord({k: v for k, v in arrays.items() if k.startswith(MULTI_PREFIX) == is_multi})
                parts.append((sub, p.number(metrics, weight_key, 0.0)))
            if not len(parts[0][0]):
                continue
            if sum(w for _, w in parts) <= 0:  # nobody trained these arrays: keep what was sent
                merged.update(parts[0][0].items())
                continue
            records = [RecordDict({"a": sub, "m": MetricRecord({"w": w})}) for sub, w in parts if w > 0]
            merged.update(aggregate_arrayrecords(records, "w").items())
        return ArrayRecord(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)
