"""The federated clinical (BD) phase's declaration and the site's check of its reply before release.

A weights phase after the student phase (`phases.CLINICAL`, registered in `phases.ALL`): the sites train the
bidirectional-distillation model (`common.models.bimodal.BidirectionalMIL`) on their student instances and clinical
rows, and reply with exactly its arrays (the shared slide encoder `slide.`, the multi-modal branch `multi.`, the
single-modal branch and prompt `single.`) plus their training-slide count, clinical-slide count, the incoming
model's validation loss and their training loss. The server averages `multi.` with the clinical-slide counts and
everything else with the training-slide counts (`server.clinical_strategy`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedslide.common.federation.phases import BD_ARRAYS, CLINICAL, N_CLINICAL
from fedslide.common.models.bimodal import BidirectionalMIL

__all__ = ["BD_ARRAYS", "CLINICAL", "MULTI_PREFIX", "N_CLINICAL", "bd_record", "check_clinical_reply", "load_bd_record"]

MULTI_PREFIX = "multi."  # BD arrays trained only by slides with clinical data


def check_clinical_reply(sent: set[str], arrays: set[str], metrics: set[str]) -> None:
    """ValueError unless a clinical reply carries exactly the arrays it was sent, each a BD array, and only the
    declared metrics (the site's check before release)."""
    bad_arrays = sorted(name for name in arrays if not CLINICAL.allows_array(name))
    bad_metrics = sorted(name for name in metrics if not CLINICAL.allows_metric(name))
    if arrays != sent or bad_arrays or bad_metrics:
        declared = [pattern.replace("\\", "") for pattern in CLINICAL.metrics]  # re.escape'd names
        raise ValueError(
            f"phase {CLINICAL.name}: the reply may carry exactly the BD arrays it was sent and the metrics "
            f"{declared}; not declared: arrays {bad_arrays}, metrics {bad_metrics}; not sent: "
            f"{sorted(arrays - sent)}; missing: {sorted(sent - arrays)}"
        )


def bd_record(model: BidirectionalMIL) -> ArrayRecord:
    """The model's state as an ArrayRecord (state-dict names)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})


def load_bd_record(model: BidirectionalMIL, record: ArrayRecord) -> None:
    """Load an ArrayRecord of the model's state (strict: every name, no other)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v.numpy())) for k, v in record.items()})
