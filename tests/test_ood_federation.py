"""Federated OOD statistics end to end (in-process federation): the sites' sums at the handshake (suppressed below
suppress-below), the server's pooled statistics equal to the centralized fit, sent with the evaluation, and each
site's bundle carrying them with a threshold set on its own validation slides."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.ood import OODStats, OODSums, slide_embeddings
from fedslide.common.features import feature_path, read_feature_file
from fedslide.common.federation import phases as ph
from fedslide.common.federation.ood_stats import (
    federated_ood,
    ood_from_record,
    ood_record,
    ood_sums_arrays,
    ood_sums_from_record,
)
from tests.feature_sites import D, ENCODER, make_site
from tests.test_federation import federate, tiny_config

RUN = "ood"
SUPPRESS = 4  # site3 has 3 training slides: its release is withheld


def _low_bags(site: Path, split: str) -> list[np.ndarray]:
    with (site / "labels.csv").open() as handle:
        ids = [row["slide_id"] for row in csv.DictReader(handle) if row["split"] == split]
    return [read_feature_file(feature_path(site, ENCODER, "low", sid)).features for sid in ids]


def test_wire_round_trip_and_refusals() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, D))
    release = OODSums(x.sum(0), np.square(x).sum(0), 6)
    back = ood_sums_from_record(ArrayRecord(ood_sums_arrays(release)), D)
    np.testing.assert_array_equal(back.sums, release.sums)
    assert back.slides == 6
    with pytest.raises(ValueError, match="shape"):
        ood_sums_from_record(ArrayRecord(ood_sums_arrays(release)), D + 1)
    stats = federated_ood([ArrayRecord(ood_sums_arrays(release))], D, min_slides=4)
    np.testing.assert_allclose(stats.mean, OODStats.fit(x).mean)
    np.testing.assert_allclose(ood_from_record(ood_record(stats), D).var, stats.var)
    with pytest.raises(ValueError, match="withheld"):  # one release of 6 slides under a floor of 7 counts for nothing
        federated_ood([ArrayRecord(ood_sums_arrays(release))], D, min_slides=7)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, list[Path]]:
    root = tmp_path_factory.mktemp("ood-sites")
    sites = [
        make_site(root, "site1", {"train": 8, "val": 4, "test": 4}, seed=1),
        make_site(root, "site2", {"train": 8, "val": 4, "test": 4}, seed=2),
        make_site(root, "site3", {"train": 3, "val": 2, "test": 3}, seed=3),
    ]
    cfg = tiny_config(tmp_path_factory.mktemp("ood-run"), RUN, suppress_below=SUPPRESS, ood_stats=True)
    assert not FederationConfig().ood_stats  # opt-in
    result, grid = federate(sites, cfg)
    return result, grid, sites


@pytest.mark.slow
def test_federated_ood_equals_centralized_and_reaches_the_bundles(run: tuple[Any, Any, list[Path]]) -> None:
    result, _, sites = run
    assert result.fed.ood is not None
    pooled = ood_from_record(result.fed.ood, D)
    central = OODStats.fit(slide_embeddings(_low_bags(sites[0], "train") + _low_bags(sites[1], "train")))
    np.testing.assert_allclose(pooled.mean, central.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(pooled.var, central.var, rtol=1e-6, atol=1e-12)
    assert pooled.slides == 16  # site3's 3 training slides are withheld
    for site in sites:
        bundle = StudentBundle.load(site / "runs" / RUN / "student_bundle")
        assert bundle.ood is not None and bundle.ood.source == "federated"
        np.testing.assert_allclose(bundle.ood.mean, pooled.mean)
        val = slide_embeddings(_low_bags(site, "val"))
        assert bundle.ood.threshold == pytest.approx(float(np.quantile(pooled.scores(val), 0.99)))
        assert bundle.ood.val_slides == len(val)


@pytest.mark.slow
def test_handshake_egress_carries_the_ood_sums_suppressed(run: tuple[Any, Any, list[Path]]) -> None:
    _, _, sites = run
    for site, withheld in zip(sites, (False, False, True)):
        ledger = [json.loads(line) for line in (site / "runs" / RUN / "egress.jsonl").read_text().splitlines()]
        handshake = [e for e in ledger if e["phase"] == ph.HANDSHAKE.name]
        arrays = {a["name"]: a for a in handshake[0]["arrays"]}
        assert arrays[ph.OOD_SUMS]["shape"] == [D] and arrays[ph.OOD_COUNTS]["shape"] == [1]
        later = {a["name"] for e in ledger if e["phase"] != ph.HANDSHAKE.name for a in e["arrays"]}
        assert not later & {ph.OOD_SUMS, ph.OOD_SQUARES, ph.OOD_COUNTS}
    _, grid, _ = run
    counts = sorted(
        int(r.content.array_records["stats"][ph.OOD_COUNTS].numpy()[0])
        for r in grid.received
        if r.content.array_records.get("stats") is not None and ph.OOD_COUNTS in r.content.array_records["stats"]
    )
    assert counts == [0, 8, 8]  # site3's release withheld as a whole
