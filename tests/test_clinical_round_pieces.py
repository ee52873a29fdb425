"""The federated clinical (BD) phase's pieces in process: handshake sums -> pooled normalisation, site rounds with
0 / 50 / 100 % missing clinical data, the two-weight FedAvg, and the egress declaration of exactly the BD arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from fedslide.client.clinical_round import SiteClinicalData, bd_record, clinical_round
from fedslide.client.synth.clinical import write_clinical
from fedslide.common.clinical import load_clinical, pooled_clinical_stats, site_clinical_sums
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.distillation.clinical_model import build_bd
from fedslide.common.federation import protocol as p
from fedslide.common.federation.clinical_phase import CLINICAL, N_CLINICAL, check_clinical_reply
from fedslide.common.federation.clinical_sums import clinical_sums_from_record, clinical_sums_record
from fedslide.common.flower_compat import restamped, set_server_task_identity
from fedslide.server.clinical_strategy import ClinicalFedAvg

D = 8
MISSING = (0.0, 0.5, 1.0)
CFG = ClinicalConfig(hidden_dim=8, attention_dim=4, epochs=2, batch_size=4, dropout=0.0)


def _site(tmp_path: Path, index: int, missing: float, n: int = 12) -> SiteClinicalData:
    rng = np.random.default_rng(index)
    labels = np.arange(n) % 2
    bags = [(rng.normal(size=(int(rng.integers(3, 7)), D)) + 0.8 * y).astype(np.float32) for y in labels]
    ids = [f"s{index}_{i}" for i in range(n)]
    path = tmp_path / f"clinical{index}.csv"
    write_clinical(path, ids, labels.tolist(), missing, rng, "slide_id")
    raw = load_clinical(path, CFG).lookup(ids)
    return SiteClinicalData(bags, labels, raw)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are made as the ServerApp's process makes them (restored after the test)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))
    set_server_task_identity(11)


def _reply(node: int, content: RecordDict) -> Message:
    sent = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    return restamped(Message(content, reply_to=sent), src_node_id=node)


@pytest.mark.slow
def test_a_federation_with_0_50_100_percent_missing_clinical_data(tmp_path: Path) -> None:
    sites = [_site(tmp_path, i, m) for i, m in enumerate(MISSING)]
    assert [s.with_clinical for s in sites] == [12, 6, 0]
    # handshake: each site's suppressed sums; the server pools what was released
    releases = [
        clinical_sums_from_record(clinical_sums_record(site_clinical_sums(s.raw, 3)), CFG.encoded_dim) for s in sites
    ]
    assert [r.slides for r in releases] == [12, 6, 0]
    stats = pooled_clinical_stats(releases, 3)
    assert stats.count == 18
    model = build_bd(D, CFG, 2)
    sent = bd_record(model)
    strategy = ClinicalFedAvg(fraction_evaluate=0.0)
    for server_round in (1, 2):
        contents = [clinical_round(sent, s, stats, CFG, D, 2, seed=10 * server_round + i) for i, s in enumerate(sites)]
        metrics = [c.metric_records[p.METRICS] for c in contents]
        assert [m[N_CLINICAL] for m in metrics] == [12, 6, 0] and [m["num-examples"] for m in metrics] == [12] * 3
        arrays = [c.array_records[p.ARRAYS] for c in contents]
        # the site without clinical data trains the single-modal branch and the prompt, never the multi-modal one
        assert not np.array_equal(arrays[2]["single.prompt"].numpy(), sent["single.prompt"].numpy())
        for name in (k for k in sent if k.startswith("multi.")):
            assert np.array_equal(arrays[2][name].numpy(), sent[name].numpy()), name
        merged, _ = strategy.aggregate_train(server_round, [_reply(n + 1, c) for n, c in enumerate(contents)])
        assert merged is not None and set(merged) == set(sent)
        for name in merged:
            w = np.array([12.0, 6.0, 0.0]) if name.startswith("multi.") else np.ones(3)
            want = sum(wi * a[name].numpy().astype(np.float64) for wi, a in zip(w, arrays)) / w.sum()
            np.testing.assert_allclose(merged[name].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)
        sent = merged


def test_without_any_clinical_data_the_multi_branch_stays_as_sent(tmp_path: Path) -> None:
    sites = [_site(tmp_path, i, 1.0, n=6) for i in range(2)]
    stats = pooled_clinical_stats([site_clinical_sums(_site(tmp_path, 9, 0.0).raw)])
    sent = bd_record(build_bd(D, CFG, 2))
    contents = [clinical_round(sent, s, stats, CFG, D, 2, seed=i) for i, s in enumerate(sites)]
    merged, _ = ClinicalFedAvg(fraction_evaluate=0.0).aggregate_train(
        1, [_reply(n + 1, c) for n, c in enumerate(contents)]
    )
    assert merged is not None
    assert all(np.array_equal(merged[k].numpy(), sent[k].numpy()) for k in sent if k.startswith("multi."))
    assert not np.array_equal(merged["single.prompt"].numpy(), sent["single.prompt"].numpy())


@pytest.mark.parametrize("shared", [True, False])
def test_the_clinical_phase_admits_exactly_the_bd_arrays(shared: bool) -> None:
    names = set(bd_record(build_bd(D, CFG.model_copy(update={"shared_slide_encoder": shared}), 2)).keys())
    assert names and all(CLINICAL.allows_array(n) for n in names)
    for other in ("adapter.net.0.weight", "student.head.weight", "clinical-sums", "features", "multi", "teacher.x"):
        assert not CLINICAL.allows_array(other), other
    metrics = {"num-examples", N_CLINICAL, "train-loss", "seconds"}
    assert all(CLINICAL.allows_metric(m) for m in metrics) and not CLINICAL.allows_metric("auc")
    check_clinical_reply(names, names, metrics)
    with pytest.raises(ValueError, match=r"not declared: arrays \['student.w'\]"):
        check_clinical_reply(names, names | {"student.w"}, metrics)
    with pytest.raises(ValueError, match=r"metrics \['age-mean'\]"):
        check_clinical_reply(names, names, metrics | {"age-mean"})
    with pytest.raises(ValueError, match="missing"):
        check_clinical_reply(names, names - {min(n for n in names if n.startswith("single."))}, metrics)


def test_bd_metrics_of_a_one_class_split_leave_only_finite_values() -> None:
    """A site whose evaluated slides hold one class has no AUC: the metric is dropped, not sent as NaN (the egress
    check refuses non-finite metrics, which would lose the site's whole final evaluation)."""
    from fedslide.client.clinical_site import bd_metric_values
    from fedslide.common.federation import phases as ph

    labels = np.zeros(4, dtype=np.int64)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.7, 0.3]])
    out = bd_metric_values(ph.BD_EVALUATED[0], labels, probs, 10)
    assert out and all(np.isfinite(v) for v in out.values())
    assert f"{ph.BD_EVALUATED[0]}.auc" not in out and out[f"{ph.BD_EVALUATED[0]}.n"] == 4
    assert f"{ph.BD_EVALUATED[0]}.acc" in out
