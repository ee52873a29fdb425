"""The federation protocol with the real ServerApp/ClientApp code, run in-process (server.local_grid.LocalGrid).

Three tiny sites of paired feature files; every message is deep-copied as the wire would. Covers the
whole run and its outputs, the egress policy and ledger (nothing but weights, cluster statistics and
metrics leaves a site), resume after a server crash, a site that drops out mid-round, a site with
another encoder refused at the handshake, and invalid updates rejected before aggregation.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files
from flwr.common.config import flatten_dict, get_fab_config
from packaging.requirements import Requirement

from fedslide.client.client_app import app as client_app
from fedslide.common.config.base import ConfigError
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.egress import Allowed, ArraySpec, EgressViolation, check_reply, weights_reply
from fedslide.common.features import preprocess_attrs
from fedslide.deploy.federate import preflight
from fedslide.common.flower_app import APP_FOLDERS, app_manifest, stage_app
from fedslide.server.checkpoint import Checkpoint
from fedslide.server.local_grid import FIRST_NODE, LocalGrid
from fedslide.server.server_app import run
from fedslide.server.strategies import FederationError
from tests.feature_sites import D, make_site

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0}


def tiny_config(root: Path, run_id: str, **extra: Any) -> FederationConfig:
    rounds = {
        "adapter": 2,
        "teacher": 3,
        "experts": 2,
        "baseline": 2,
        "student": 3,
        "cluster_iterations": 3,
        "local_epochs": 1,
        "adapter_local_epochs": 1,
    }
    rounds.update(extra.pop("rounds", {}))
    training = {"lr": 1e-2, **extra.pop("training", {})}
    return FederationConfig(
        run_id=run_id,
        runs_dir=root / "runs",
        seed=0,
        rounds=rounds,
        teacher=TINY_MODEL,
        student=TINY_MODEL,
        adapter={"hidden_dim": 16},
        clusters={"num_clusters": 2},
        training=training,
        **extra,
    )


# site2 preprocessed with its own thresholds (its feature files record them); the others with the defaults
SITE2_PREPROCESS = PreprocessConfig(
    tissue={"min_saturation": 30}, tiling={"min_tissue_low": 0.4, "min_tissue_high": 0.6}
)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("fed-sites")
    recorded = {2: preprocess_attrs(SITE2_PREPROCESS.tissue.to_toml_dict(), SITE2_PREPROCESS.tiling.to_toml_dict())}
    return [
        make_site(root, f"site{i}", {"train": 8, "val": 4, "test": 4}, seed=i, attrs=recorded.get(i))
        for i in range(1, 4)
    ]


def federate(
    sites: list[Path], cfg: FederationConfig, hook: Any = None, first_node: int = FIRST_NODE
) -> tuple[Any, LocalGrid]:
    grid = LocalGrid(client_app, [{"site-dir": str(s)} for s in sites], cfg.to_run_config(), first_node=first_node)
    grid.reply_hook = hook
    return run(grid, FederationConfig.from_run_config(cfg.to_run_config())), grid


@pytest.fixture(scope="module")
def full_run(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LocalGrid]:
    return federate(sites, tiny_config(tmp_path_factory.mktemp("fed-run"), "full"))


def test_full_run_writes_metrics_models_and_site_bundles(full_run: tuple[Any, LocalGrid], sites: list[Path]) -> None:
    result, _ = full_run
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["schema"] == "fedslide.federation.metrics/1"
    assert [s["name"] for s in metrics["sites"]] == ["site1", "site2", "site3"]
    for model in ("teacher_high", "student_low", "baseline_low"):
        overall = metrics["models"][model]["overall"]
        assert overall["n"] == 12 and 0.0 <= overall["auc"] <= 1.0
        assert set(metrics["models"][model]["per_site"]) == {"site1", "site2", "site3"}
    # the toy task is easy at high resolution: a teacher that learned nothing would sit near 0.5
    assert metrics["models"]["teacher_high"]["overall"]["auc"] >= 0.9
    comm = metrics["communication"]["per_phase"]
    assert set(comm) == {
        "handshake",
        "adapter",
        "teacher",
        "cluster-init",
        "cluster-stats",
        "experts",
        "kd-cache",
        "student",
        "final",
    }  # the baseline trains in the teacher phase's messages
    for phase in comm:
        assert comm[phase]["up"] > 0 and comm[phase]["down"] > 0, phase
    manifest = json.loads((result.run_dir / "models" / "manifest.json").read_text())
    assert set(manifest) == {"adapter", "teacher", "experts", "baseline", "student"}
    both = manifest["teacher"]["serialized_bytes"] + manifest["baseline"]["serialized_bytes"]
    assert comm["teacher"]["model_bytes"] == both <= comm["teacher"]["max_upload_per_site_round"]  # + names, metrics
    # teacher: 3 rounds, baseline: 2; the baseline comes back unchanged from round 3, so its global model and
    # validation loss stay those of round 2
    curve = metrics["learning_curves"]["teacher"]
    assert [h["round"] for h in curve] == [0, 1, 2, 3]
    assert curve[3]["val_loss_teacher"] != pytest.approx(curve[2]["val_loss_teacher"], abs=1e-6)
    assert curve[3]["val_loss_baseline"] == pytest.approx(curve[2]["val_loss_baseline"], abs=1e-6)
    report = (result.run_dir / "report.md").read_text()
    assert report.count("\n| student_low |") == 1
    for site in sites:  # how fine the AUCs can be, from the sites' own test labels
        labels = [line.split(",") for line in (site / "labels.csv").read_text().splitlines()[1:]]
        per_class = [sum(1 for row in labels if row[2] == "test" and row[1] == c) for c in metrics["classes"]]
        resolution = metrics["auc_resolution"][site.name]
        assert resolution["slides_per_class"] == per_class and resolution["pairs"] == per_class[0] * per_class[1]
        assert f"{site.name} {per_class[0]} × {per_class[1]} slides per class" in report
    assert (result.run_dir / "plots" / "learning_curves.png").stat().st_size > 1000
    for site in sites:  # pushed back: every site keeps adapter + student as a bundle it can predict with
        bundle = site / "runs" / "full" / "student_bundle"
        assert (bundle / "bundle.json").is_file() and (bundle / "adapter.pt").is_file()
        # ... that tiles as the site preprocessed: its own recorded thresholds, else the defaults
        meta = json.loads((bundle / "bundle.json").read_text())["meta"]
        own = SITE2_PREPROCESS if site.name == "site2" else PreprocessConfig()
        assert (meta["tissue"], meta["tiling"]) == (own.tissue.to_toml_dict(), own.tiling.to_toml_dict()), site.name


def test_nothing_but_weights_statistics_and_metrics_left_any_site(
    full_run: tuple[Any, LocalGrid], sites: list[Path]
) -> None:
    result, grid = full_run
    slide_ids = {line.split(",")[0] for s in sites for line in (s / "labels.csv").read_text().splitlines()[1:]}
    manifest = json.loads((result.run_dir / "models" / "manifest.json").read_text())
    # on the wire each model is one flat float32 array of all its parameters (`params`); packed models are prefixed
    sizes = {
        "params": {manifest[m]["parameters"] for m in ("adapter", "student")},
        "teacher.params": {manifest["teacher"]["parameters"]},
        "baseline.params": {manifest["baseline"]["parameters"]},
        **{
            f"expert-{c}.params": {manifest["teacher"]["parameters"]}
            for c in range(result.fed.cfg.clusters.num_clusters)
        },
    }
    statistics = {"sums", "counts", "ood-sums", "ood-squares", "ood-counts"}  # cluster and low-res feature statistics
    assert grid.received, "no replies recorded"
    for reply in grid.received:
        text = json.dumps(
            {name: dict(rec) for name, rec in reply.content.items() if isinstance(rec, (ConfigRecord, MetricRecord))},
            default=str,
        )
        assert not any(sid in text for sid in slide_ids)
        for name, record in reply.content.array_records.items():
            assert set(record) <= set(sizes) | statistics, name
            for key in set(record) & set(sizes):
                assert record[key].dtype == "float32" and len(record[key].shape) == 1, key
                assert record[key].shape[0] in sizes[key], (key, record[key].shape)
    phases_seen = set()
    for site in sites:
        ledger = [json.loads(line) for line in (site / "runs" / "full" / "egress.jsonl").read_text().splitlines()]
        phases_seen |= {e["phase"] for e in ledger}
        raw = (site / "runs" / "full" / "egress.jsonl").read_text()
        assert not any(sid in raw for sid in slide_ids)
        for entry in ledger:
            assert {a["name"] for a in entry["arrays"]} <= set(sizes) | statistics
            assert entry["bytes"] > 0
    assert phases_seen == {
        "handshake",
        "adapter",
        "teacher",
        "cluster-init",
        "cluster-stats",
        "experts",
        "kd-cache",
        "student",
        "evaluate",
    }


def test_egress_policy_refuses_anything_else() -> None:
    model = ArrayRecord({"w": Array(np.zeros((4, 3), np.float32))})
    allowed = weights_reply("teacher", model)
    check_reply(RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": 3, "val-loss": 0.5})}), allowed)
    leaks = [
        RecordDict({"arrays": ArrayRecord({"w": model["w"], "features": Array(np.zeros((7, 3), np.float32))})}),
        RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((5, 3), np.float32))})}),  # not the model's shape
        RecordDict({"coords": ArrayRecord({"xy": Array(np.zeros((7, 2), np.int64))})}),
        RecordDict({"metrics": MetricRecord({"TCGA-AB-1234": 1.0})}),  # a slide id as a metric name
        RecordDict({"site": ConfigRecord({"slide-ids": ["a", "b"]})}),
    ]
    for content in leaks:
        with pytest.raises(EgressViolation):
            check_reply(content, allowed)
    stats = Allowed(
        "cluster-stats", "stats", {"sums": ArraySpec((2, 3), "float64"), "counts": ArraySpec((2,), "int64")}
    )
    with pytest.raises(EgressViolation, match="allowed only"):
        check_reply(
            RecordDict(
                {"stats": ArrayRecord({"sums": Array(np.zeros((9, 3))), "counts": Array(np.zeros(2, np.int64))})}
            ),
            stats,
        )


def test_a_model_travels_as_one_flat_array_and_comes_back_exactly() -> None:
    """One array per model on the wire (each array is one or more objects Flower moves by a request of its own);
    the files people open keep one array per state-dict tensor."""
    import torch

    from fedslide.common.config.model import ModelConfig
    from fedslide.common.federation.models import PARAMS_KEY, load_record, named_record, to_record
    from fedslide.common.models.registry import build_model

    def model() -> torch.nn.Module:
        return build_model(ModelConfig(name="abmil_gated", in_dim=D, num_classes=2, **TINY_MODEL))

    torch.manual_seed(0)
    sent = model()
    record = to_record(sent)
    state = sent.state_dict()
    assert list(record) == [PARAMS_KEY] and len(state) > 4
    assert record[PARAMS_KEY].dtype == "float32" and tuple(record[PARAMS_KEY].shape) == (
        sum(v.numel() for v in state.values()),
    )
    received = load_record(model(), record)
    assert all(torch.equal(state[k], v) for k, v in received.state_dict().items())
    named = named_record(model(), record)
    assert list(named) == list(state) and all(np.array_equal(named[k].numpy(), state[k].numpy()) for k in state)

    with_counter = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # an int64 buffer
    with_counter(torch.randn(5, 3))
    record = to_record(with_counter)
    assert sorted(record) == ["1.num_batches_tracked", PARAMS_KEY] and record["1.num_batches_tracked"].dtype == "int64"
    copy = load_record(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), record)
    assert int(copy[1].num_batches_tracked) == 1 and torch.equal(copy[1].running_mean, with_counter[1].running_mean)

    other = build_model(ModelConfig(name="abmil_gated", in_dim=D, num_classes=2, **{**TINY_MODEL, "hidden_dim": 8}))
    with pytest.raises(ValueError, match=r"'params' is float32\(\d+,\); ABMIL\w* needs float32\(\d+,\)"):
        load_record(other, to_record(sent))
    with pytest.raises(ValueError, match=r"extra arrays \['w'\], missing \['params'\]"):
        load_record(model(), ArrayRecord({"w": Array(np.zeros(3, np.float32))}))


@pytest.mark.slow
def test_site_with_another_encoder_is_refused_at_handshake(sites: list[Path], tmp_path: Path) -> None:
    other = make_site(tmp_path, "site4", {"train": 6, "val": 2, "test": 2}, seed=9, weights_hash="ffff0000")
    result, _ = federate(
        [*sites, other],
        tiny_config(
            tmp_path, "enc", kd={"lambda_expert": 0.0}, rounds={"teacher": 1, "student": 1, "baseline": 1, "adapter": 1}
        ),
    )
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert [s["name"] for s in metrics["sites"]] == ["site1", "site2", "site3"]
    assert len(metrics["refused"]) == 1 and metrics["refused"][0]["site"] == "site4"
    assert "encoder-hash 'ffff0000'" in metrics["refused"][0]["reason"]
    assert not (other / "runs" / "enc" / "kd_cache.pt").exists()  # it took no further part


def _final_models(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in ("adapter", "teacher", "baseline", "student"):
        with np.load(run_dir / "models" / f"{name}.npz") as data:
            out[name] = {k: data[k] for k in data.files}
    return out


def _assert_same_models(a: Path, b: Path, atol: float) -> None:
    """Equal parameters, except the bias of attention scores: a softmax ignores it, so its gradient is
    zero up to rounding noise, which Adam's normalised step turns into lr-sized jitter."""
    ma, mb = _final_models(a), _final_models(b)
    for name in ma:
        for key in ma[name]:
            if key.endswith("score.bias"):
                continue
            np.testing.assert_allclose(ma[name][key], mb[name][key], atol=atol, err_msg=f"{name}.{key}")


@pytest.mark.slow
def test_invalid_updates_are_rejected_and_change_nothing(sites: list[Path], tmp_path: Path) -> None:
    no_experts = {"kd": {"lambda_expert": 0.0}}
    clean, _ = federate(sites, tiny_config(tmp_path / "clean", "robust", **no_experts))
    # three more sites (copies of the honest ones' data) whose weight updates are NaN, x1000, or wrongly shaped
    copies = []
    for i, site in enumerate(sites, start=1):
        copies.append(tmp_path / "bad" / f"bad{i}")
        shutil.copytree(site, copies[-1], ignore=shutil.ignore_patterns("runs"))
    bad_nodes = {FIRST_NODE + 3: "nan", FIRST_NODE + 4: "scaled", FIRST_NODE + 5: "shape"}

    def corrupt(node: int, reply: Message) -> Message:
        if (
            node not in bad_nodes
            or reply.has_error()
            or "arrays" not in reply.content.array_records
            or reply.metadata.message_type != "train"
        ):
            return reply
        arrays = dict(reply.content["arrays"].items())
        key = sorted(arrays)[0]
        value = arrays[key].numpy()
        kind = bad_nodes[node]
        if kind == "nan":
            value = np.full_like(value, np.nan)
            arrays[key] = Array(value)
        elif kind == "scaled":
            arrays = {k: Array(v.numpy() * 1000.0) for k, v in arrays.items()}
        else:
            arrays[key] = Array(np.zeros((*value.shape[:-1], value.shape[-1] + 1), value.dtype))
        reply.content["arrays"] = ArrayRecord(arrays)
        return reply

    attacked, _ = federate([*sites, *copies], tiny_config(tmp_path / "attacked", "robust", **no_experts), corrupt)
    metrics = json.loads((attacked.run_dir / "metrics.json").read_text())
    reasons = {r["node"]: r["reason"] for r in metrics["rejections"]}
    assert set(reasons) == set(bad_nodes)
    assert "NaN" in reasons[FIRST_NODE + 3] and "median" in reasons[FIRST_NODE + 4]
    assert "expected float32" in reasons[FIRST_NODE + 5]
    rounds = tiny_config(tmp_path, "x").rounds
    teacher_phase = max(rounds.teacher, rounds.baseline)  # the baseline trains in the teacher phase's messages
    assert len(metrics["rejections"]) == 3 * (rounds.adapter + teacher_phase + rounds.student)
    _assert_same_models(clean.run_dir, attacked.run_dir, atol=1e-5)
    before = json.loads((clean.run_dir / "metrics.json").read_text())["models"]
    for model in ("teacher_high", "student_low", "baseline_low"):
        for site in ("site1", "site2", "site3"):
            assert metrics["models"][model]["per_site"][site]["loss"] == pytest.approx(
                before[model]["per_site"][site]["loss"], abs=1e-4
            )


class Crash(RuntimeError):
    """Stands in for the server process being killed."""


def crash_at_train_reply(n: int) -> Any:
    """A reply hook that kills the server at the n-th train reply (1-based)."""
    seen = {"train": 0}

    def crash(node: int, reply: Message) -> Message:
        seen["train"] += reply.metadata.message_type == "train"
        if seen["train"] == n:
            raise Crash("server killed")
        return reply

    return crash


def crash_in_teacher_round_2() -> Any:
    """A reply hook that kills the server after adapter rounds 1-2 and teacher round 1 (3 sites)."""
    return crash_at_train_reply(3 * 3 + 1)


@pytest.mark.slow
def test_resume_after_a_crash_gives_the_uninterrupted_result(sites: list[Path], tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "ref", "resume")
    reference, _ = federate(sites, cfg)
    crashed = tiny_config(tmp_path / "crash", "resume")
    with pytest.raises(Crash):
        federate(sites, crashed, crash_in_teacher_round_2())
    state = json.loads((tmp_path / "crash" / "runs" / "resume" / "checkpoint" / "state.json").read_text())
    assert state["current"]["phase"] == "teacher" and state["current"]["round"] == 1
    with pytest.raises(Exception, match="already holds a run"):
        federate(sites, crashed)
    resumed, _ = federate(sites, crashed.model_copy(update={"resume": True}))
    # float32 rounding: the restarted sites' replies may be summed in another order (a resume bug shows as ≫ 1e-5)
    _assert_same_models(reference.run_dir, resumed.run_dir, atol=1e-5)


@pytest.mark.slow
def test_student_server_momentum_moves_the_student_and_survives_a_resume(sites: list[Path], tmp_path: Path) -> None:
    """FedAvgM's momentum in the student phase changes the student; a crash in student round 2 resumes with the
    momentum of round 1, so the result equals the uninterrupted run's."""
    reference, _ = federate(sites, tiny_config(tmp_path / "ref", "momentum"))
    plain, _ = federate(sites, tiny_config(tmp_path / "plain", "momentum", student_server_momentum=0.0))
    with (
        np.load(reference.run_dir / "models" / "student.npz") as a,
        np.load(plain.run_dir / "models" / "student.npz") as b,
    ):
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a.files) > 1e-3
    crashed = tiny_config(tmp_path / "crash", "momentum")
    r = crashed.rounds
    before_student = 3 * (r.adapter + max(r.teacher, r.baseline) + r.experts + 1)  # the crash: student round 2
    with pytest.raises(Crash):
        federate(sites, crashed, crash_at_train_reply(before_student + 1))
    ckpt = Checkpoint(tmp_path / "crash" / "runs" / "momentum")
    assert ckpt.state["current"]["phase"] == "student" and ckpt.state["current"]["round"] == 1
    assert ckpt.load_arrays("student.momentum") is not None
    trained = {"replies": 0}

    def count(node: int, reply: Message) -> Message:
        trained["replies"] += reply.metadata.message_type == "train"
        return reply

    resumed, _ = federate(sites, crashed.model_copy(update={"resume": True}), count)
    assert trained["replies"] == 3 * (r.student - 1)  # student rounds 2.. only, not the phase again
    _assert_same_models(reference.run_dir, resumed.run_dir, atol=1e-6)
    last = [Checkpoint(run.run_dir).load_arrays("student.current") for run in (reference, resumed)]  # not only the best
    for key, array in last[0].items():
        if key.endswith("score.bias"):  # see _assert_same_models
            continue
        np.testing.assert_allclose(last[1][key].numpy(), array.numpy(), atol=1e-6, err_msg=key)


def test_resume_refuses_a_checkpoint_with_a_separate_baseline_phase(sites: list[Path], tmp_path: Path) -> None:
    """Runs checkpointed before the teacher phase carried the baseline saved an unpacked teacher: refused, clearly."""
    crashed = tiny_config(tmp_path, "old")
    with pytest.raises(Crash):
        federate(sites, crashed, crash_in_teacher_round_2())
    ckpt = Checkpoint(tmp_path / "runs" / "old")
    packed = ckpt.load_arrays("teacher.current")
    assert packed is not None
    ckpt.save_arrays(
        "teacher.final",
        ArrayRecord({k.removeprefix("teacher."): v for k, v in packed.items() if k.startswith("teacher.")}),
    )
    ckpt.finish_phase("teacher", {"history": []})
    with pytest.raises(FederationError, match=r"checkpointed by an earlier fedslide .* new run id"):
        federate(sites, crashed.model_copy(update={"resume": True}))


@pytest.mark.slow
def test_resume_finds_sites_that_came_back_under_new_node_ids(sites: list[Path], tmp_path: Path) -> None:
    """SuperNodes restarted without authentication get new node ids: the resumed run matches them by site name."""
    reference, _ = federate(sites, tiny_config(tmp_path / "ref", "renamed"))
    crashed = tiny_config(tmp_path / "crash", "renamed")
    with pytest.raises(Crash):
        federate(sites, crashed, crash_in_teacher_round_2())
    resumed, grid = federate(sites[::-1], crashed.model_copy(update={"resume": True}), first_node=501)
    _assert_same_models(reference.run_dir, resumed.run_dir, atol=1e-5)  # sites averaged in another order
    state = json.loads((tmp_path / "crash" / "runs" / "renamed" / "checkpoint" / "state.json").read_text())
    assert {int(n): s["name"] for n, s in state["handshake"]["sites"].items()} == {
        501: "site3",
        502: "site2",
        503: "site1",
    }
    assert {m.metadata.src_node_id for m in grid.received} == {501, 502, 503}


@pytest.mark.slow
def test_a_site_missing_a_round_is_recorded_and_used_again(sites: list[Path], tmp_path: Path) -> None:
    calls = {"n": 0}

    def drop(node: int, reply: Message) -> Message | None:
        if reply.metadata.message_type == "train" and node == FIRST_NODE + 2:
            calls["n"] += 1
            if calls["n"] == 3:  # its 3rd training reply (teacher round 1) never arrives
                return None
        return reply

    result, _ = federate(sites, tiny_config(tmp_path, "drop", kd={"lambda_expert": 0.0}), drop)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["missing"] == [
        {"phase": "teacher", "round": 1, "nodes": [FIRST_NODE + 2], "reasons": {str(FIRST_NODE + 2): "timeout"}}
    ]
    uploads = result.fed.grid.uploads
    assert any(u["phase"] == "teacher" and u["round"] == 2 and u["node"] == FIRST_NODE + 2 for u in uploads)


def test_too_few_sites_left_fails_loudly(sites: list[Path], tmp_path: Path) -> None:
    def silence(node: int, reply: Message) -> Message | None:
        return None if node != FIRST_NODE and reply.metadata.message_type == "train" else reply

    with pytest.raises(Exception, match="fewer than min-nodes = 2"):
        federate(sites, tiny_config(tmp_path, "few"), silence)


def test_run_config_in_pyproject_is_the_federation_config() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedslide.server.server_app:app",
        "clientapp": "fedslide.client.client_app:app",
    }
    flat = flatten_dict(app["config"])
    assert FederationConfig.from_run_config(flat) == FederationConfig()
    every_key = FederationConfig().to_run_config()
    assert set(every_key) <= set(flat), sorted(set(every_key) - set(flat))


def test_run_config_overrides_choose_an_architecture_and_its_options() -> None:
    # `flwr run -c key=value` overrides only keys the app declares: every architecture's options are declared ("")
    declared = flatten_dict(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    overrides = {"teacher.name": "transmil", "teacher.layers": 4, "student.name": "s4mil", "student.state-dim": 8}
    assert set(overrides) <= set(declared)
    cfg = FederationConfig.from_run_config({**declared, **overrides})
    assert (cfg.teacher.name, cfg.teacher.options.layers, cfg.student.options.state_dim) == ("transmil", 4, 8)
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    assert set(cfg.to_run_config()) <= set(declared)
    with pytest.raises(
        ConfigError, match="unknown key 'teacher.window' .*for model 'transmil'; allowed keys here: .*layers"
    ):
        FederationConfig.from_run_config({**declared, **overrides, "teacher.window": 64})


@pytest.mark.slow
def test_the_app_bundled_from_its_staged_copy_is_the_app(tmp_path: Path) -> None:
    # `fedslide federate` hands `flwr run` a copy of the app's folders laid out as the `fedslide` package (Flower
    # would otherwise list every file of the source tree, virtual environment included): the FAB holds each source
    # file under its import name, and nothing else but settings files and the manifest
    staged = stage_app(REPO, tmp_path / "app")
    assert stage_app(REPO, tmp_path / "app") == staged  # made again from scratch
    assert not list(staged.rglob("__pycache__")) and len(collect_files(staged)) < len(collect_files(REPO))  # no caches

    fab = _fab_contents(staged)
    code = {name: data for name, data in fab.items() if name.startswith("fedslide/")}
    assert len(code) > 100 and "fedslide/client/client_app.py" in code
    assert all(data == (REPO / name.removeprefix("fedslide/")).read_bytes() for name, data in code.items())
    sources = {
        f"fedslide/{p.relative_to(REPO)}"
        for folder in APP_FOLDERS
        for p in (REPO / folder).rglob("*")
        if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
    }
    assert set(code) == sources
    assert set(fab) - set(code) == {"pyproject.toml", ".info/CONTENT"}


def _fab_contents(app: Path) -> dict[str, bytes]:
    """Every file of the FAB Flower's own builder makes from `app` (what `flwr run APP` submits)."""
    fab, _ = build_fab_from_files(collect_files(app))
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        return {name: z.read(name) for name in z.namelist()}


def test_the_manifest_of_an_installed_fedslide_is_the_projects() -> None:
    # a wheel has no pyproject.toml: `fedslide federate` writes the app's manifest, which must say what ours says
    ours, written = tomllib.loads((REPO / "pyproject.toml").read_text()), tomllib.loads(app_manifest())
    for key in ("name", "version", "description", "license"):
        assert written["project"][key] == ours["project"][key], key
    assert [Requirement(r) for r in written["project"]["dependencies"]] == [  # as pip reads them
        Requirement(r) for r in ours["project"]["dependencies"]
    ]
    app, ours_app = written["tool"]["flwr"]["app"], ours["tool"]["flwr"]["app"]
    assert {k: app[k] for k in ("publisher", "fab-include", "components")} == {
        k: ours_app[k] for k in ("publisher", "fab-include", "components")
    }
    assert flatten_dict(app["config"]) == flatten_dict(ours_app["config"])


@pytest.mark.slow
def test_an_installed_fedslide_submits_the_same_app(tmp_path: Path) -> None:
    # a wheel of this project, unpacked as site-packages beside others' files: no pyproject.toml (until now
    # `flwr run` refused the staged copy: "Failed to load Flower App configuration") and the settings files
    # packaged (until now `fedslide demo` found no configs/demo.toml)
    source, wheels, site_packages = tmp_path / "source", tmp_path / "wheels", tmp_path / "site-packages"
    for folder in ("server", "client", "common", "deploy", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    with zipfile.ZipFile(next(wheels.glob("fedslide-*.whl"))) as wheel:
        wheel.extractall(site_packages)
    assert not (site_packages / "pyproject.toml").exists()
    for name in ("demo.toml", "defaults.toml"):
        assert (site_packages / "fedslide" / "configs" / name).read_bytes() == (REPO / "configs" / name).read_bytes()
    shutil.copytree(REPO / "tests", site_packages / "other_package")
    (site_packages / "README.md").write_text("someone else's\n")
    (site_packages / "other.toml").write_text("[tool.other]\n")

    staged = stage_app(site_packages / "fedslide", tmp_path / "app")
    assert sorted(p.name for p in staged.iterdir()) == ["fedslide", "pyproject.toml"]
    assert sorted(p.name for p in (staged / "fedslide").iterdir()) == [
        "client",
        "common",
        "configs",
        "deploy",
        "server",
    ]
    from_source, installed = _fab_contents(stage_app(REPO, tmp_path / "source-app")), _fab_contents(staged)
    assert set(installed) == set(from_source) and len(installed) > 100  # code and settings files, nothing else
    differ = {name for name in installed if installed[name] != from_source[name]}
    assert differ == {"pyproject.toml", ".info/CONTENT"}, differ  # the manifest, and the bundle's list of hashes
    fab_config = [
        get_fab_config(build_fab_from_files(collect_files(app))[0])  # validates
        for app in (tmp_path / "source-app", staged)
    ]
    assert fab_config[1]["tool"]["flwr"]["app"]["components"] == fab_config[0]["tool"]["flwr"]["app"]["components"]
    run_config = [flatten_dict(c["tool"]["flwr"]["app"]["config"]) for c in fab_config]
    assert run_config[1] == run_config[0] and FederationConfig.from_run_config(run_config[1]) == FederationConfig()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rounds.teacherr": 3}, "unknown key 'rounds.teacherr'"),
        ({"rounds.teacher": "many"}, "invalid value for 'rounds.teacher': 'many'"),
        ({"min-nodes": 0}, "invalid value for 'min-nodes': 0"),
        ({"mode": "logits"}, "proxy-dir"),
        ({"training.teacher-epochs": 40}, "teacher-epochs: not used by a federated run; .*rounds.local-epochs"),
        ({"adapter.epochs": 30, "adapter.patience": 3}, "'adapter' .from run config.: epochs, patience: not used"),
    ],
)
def test_bad_run_config_is_refused_with_key_and_value(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        FederationConfig.from_run_config(config)


def test_preflight_refuses_bad_sites_before_anything_starts(sites: list[Path], tmp_path: Path) -> None:
    cfg = FederationConfig()
    empty = tmp_path / "empty"
    empty.mkdir()
    single = tmp_path / "single"
    shutil.copytree(sites[0], single, ignore=shutil.ignore_patterns("runs"))
    rows = (single / "labels.csv").read_text().splitlines()
    (single / "labels.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if ",neg," in r]) + "\n")
    unknown = tmp_path / "unknown"
    shutil.copytree(sites[1], unknown, ignore=shutil.ignore_patterns("runs"))
    with (unknown / "labels.csv").open("a") as handle:
        handle.write("NOT-A-SLIDE,pos,train,p9\n")
    with pytest.raises(ConfigError) as err:
        preflight([sites[2], empty, single, unknown, tmp_path / "missing"], cfg)
    text = str(err.value)
    assert f"{empty}: " in text and "labels.csv" in text
    assert "only one class ('neg')" in text
    assert "NOT-A-SLIDE" in text
    assert f"{tmp_path / 'missing'}: no such site directory" in text
    assert str(sites[2]) + ":" not in text  # the good site is not blamed


@pytest.mark.slow
def test_logits_mode_sends_only_logits_on_the_proxy_cohort(sites: list[Path], tmp_path: Path) -> None:
    proxy = make_site(tmp_path, "proxy", {"train": 10, "val": 4, "test": 2}, seed=7)
    cfg = tiny_config(tmp_path, "logits", mode="logits", proxy_dir=proxy, proxy_epochs=5)
    result, grid = federate(sites, cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "logits" and metrics["models"]["student_low"]["overall"]["n"] == 12
    logit_replies = [r for r in grid.received if "logits" in r.content.array_records]
    assert len(logit_replies) == 3
    for reply in logit_replies:
        record = reply.content["logits"]
        assert set(record) == {"teacher", "experts", "expert-weights"}
        assert tuple(record["teacher"].shape) == (16, 2) and tuple(record["experts"].shape) == (2, 16, 2)
    assert not any(
        r.metadata.message_type == "train" and "student" in json.dumps(str(r.content)) for r in grid.received
    )
    assert "student" not in metrics["communication"]["per_phase"]  # no weights round for the student
    up = metrics["communication"]["per_phase"]["logits"]["max_upload_per_site_round"]
    assert up < 16 * 2 * 4 * 3 + 1500  # logits (teacher + 2 experts) plus names and metrics, not a model
    assert metrics["learning_curves"]["student"]


@pytest.mark.slow
def test_differential_privacy_noises_every_release_and_reports_epsilon(sites: list[Path], tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, "dp", dp_noise_multiplier=1.0, dp_clipping_norm=0.5, dp_delta=1e-5, cluster_noise_std=0.01
    )
    result, _ = federate(sites, cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    privacy = metrics["privacy"]
    r = cfg.rounds
    assert privacy["enabled"] and privacy["releases"] == r.adapter + max(r.teacher, r.baseline) + r.experts + r.student
    # Gaussian mechanism with σ = 1 composed 10 times: ε(δ = 1e-5) is large but finite (a smaller σ would give more)
    assert 5.0 < privacy["epsilon"] < 100.0 and privacy["delta"] == 1e-5
    assert "ε =" in (result.run_dir / "report.md").read_text()
    quieter, _ = federate(sites, tiny_config(tmp_path / "q", "dp", dp_noise_multiplier=4.0, dp_clipping_norm=0.5))
    assert json.loads((quieter.run_dir / "metrics.json").read_text())["privacy"]["epsilon"] < privacy["epsilon"]


def test_defaults_toml_federation_section_matches_the_model() -> None:
    from fedslide.common.config.base import load_config

    assert load_config(FederationConfig, REPO / "configs" / "defaults.toml", "federation") == FederationConfig()
    from fedslide.common.config.evaluate import EvaluateConfig

    assert load_config(EvaluateConfig, REPO / "configs" / "defaults.toml", "evaluate") == EvaluateConfig()
    demo = load_config(FederationConfig, REPO / "configs" / "demo.toml", "federation")
    assert demo.rounds.teacher == 5 and demo.clusters.num_clusters == 2  # the demo's own sizes load cleanly


@pytest.mark.slow
def test_an_evaluation_only_site_trains_nothing_and_reports_on_all_its_slides(
    sites: list[Path], tmp_path: Path
) -> None:
    held_out = make_site(tmp_path, "site4", {"train": 4, "val": 2, "test": 2}, seed=11)
    cfg = tiny_config(
        tmp_path,
        "loso",
        eval_only_sites=["site4"],
        kd={"lambda_expert": 0.0},
        rounds={"adapter": 1, "teacher": 2, "baseline": 1, "student": 1},
    )
    assert cfg.to_run_config()["eval-only-sites"] == "site4"
    result, _ = federate([*sites, held_out], cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert [(s["name"], s["role"]) for s in metrics["sites"]][-1] == ("site4", "eval-only")
    assert metrics["models"]["student_low"]["held_out"]["n"] == 8  # every labelled slide of the held-out site
    assert metrics["models"]["student_low"]["overall"]["n"] == 12  # the training sites' test slides only
    ledger = [
        json.loads(line)["phase"] for line in (held_out / "runs" / "loso" / "egress.jsonl").read_text().splitlines()
    ]
    assert ledger == ["handshake", "evaluate"]
    predictions = (held_out / "runs" / "loso" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 9 and predictions[0].startswith("slide_id,patient_id,split,label,teacher_high_p0")


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean"])
@pytest.mark.slow
def test_robust_aggregation_is_selectable(
    sites: list[Path], tmp_path: Path, aggregation: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(
        tmp_path,
        aggregation,
        aggregation=aggregation,
        kd={"lambda_expert": 0.0},
        rounds={"adapter": 1, "teacher": 2, "baseline": 1, "student": 1},
    )
    with caplog.at_level(logging.WARNING, logger="fedslide.server.protocol"):
        result, _ = federate(sites, cfg)
    assert f"student-server-momentum 0.5 not applied: aggregation = {aggregation}" in caplog.text  # said, not silent
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["config"]["aggregation"] == aggregation
    assert metrics["models"]["teacher_high"]["overall"]["auc"] >= 0.9  # the robust aggregate learned the task
    curve = [h["val_loss_teacher"] for h in metrics["learning_curves"]["teacher"]]
    assert len(curve) == 3 and curve[-1] < curve[0]


@pytest.mark.parametrize("init", ["auto", "scratch"])
@pytest.mark.slow
def test_the_student_starts_from_the_federated_teacher(sites: list[Path], tmp_path: Path, init: str) -> None:
    # a vanishing learning rate: the final student is what its phase started from
    cfg = tiny_config(
        tmp_path,
        init,
        kd={"lambda_expert": 0.0, "student_init": init},
        training={"lr": 1e-12},
        rounds={"adapter": 1, "teacher": 1, "baseline": 1, "student": 1},
    )
    result, _ = federate(sites, cfg)
    models = {name: np.load(result.run_dir / "models" / f"{name}.npz") for name in ("teacher", "student", "baseline")}
    for name in ("student", "baseline"):
        assert models[name].files == models["teacher"].files
        gap = max(float(np.abs(models[name][k] - models["teacher"][k]).max()) for k in models["teacher"].files)
        if init == "auto" and name == "student":
            assert gap < 1e-6
        else:  # scratch, and the labels-only baseline always
            assert gap > 1e-2


def test_each_site_draws_its_own_shuffles_and_dropout_masks(sites: list[Path], tmp_path: Path) -> None:
    """The same weights trained on the same slides under two site names: a site's round is reproducible, and another
    site's round does not replay its random draws (bag order, dropout masks)."""
    import torch

    from fedslide.client.local_phases import train_model
    from fedslide.client.site_run import SiteRun
    from fedslide.common.federation.models import new_model, teacher_config
    from fedslide.common.federation.protocol import Facts

    cfg = tiny_config(tmp_path, "seeds", training={"batch_size": 1})
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"dropout": 0.5})})
    facts = Facts(("neg", "pos"), D, 1, 1, "toy")

    def trained(name: str) -> torch.Tensor:
        site = SiteRun(site_dir=sites[0], run_dir=tmp_path / name, cfg=cfg, name=name, facts=facts)
        model = new_model(teacher_config(cfg, facts), cfg.seed)
        train_model(site, model, site.high_cohort(), server_round=1, seed_offset=2)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first, again, other = trained("site1"), trained("site1"), trained("site2")
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_a_client_app_process_does_not_import_scikit_learn_or_scipy() -> None:
    """Flower starts a fresh ClientApp process per message: scikit-learn + SciPy would add ~1 s to each
    (they load lazily, in the phases that use them)."""
    import subprocess
    import sys

    code = (
        "import sys, client.client_app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'skimage', 'joblib'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
