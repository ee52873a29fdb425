"""The clinical (BD) phase in the federation (in-process, through the phase machinery): three sites whose training
slides miss clinical data for 0 / 50 / 100 %, the handshake's suppressed clinical sums, `rounds.clinical` rounds
of the two-weight FedAvg, the egress ledger, resume mid-phase, and the BD model in every site's bundle."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedslide.client.synth.clinical import COLUMNS, clinical_rows
from fedslide.common.config.base import ConfigError
from fedslide.common.config.federation import FederationConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.clinical_model import CLINICAL_MODEL_FILE, ClinicalModel, build_bd
from fedslide.common.distillation.data import load_sites
from fedslide.common.evaluation.clinical_column import clinical_table
from fedslide.common.metrics import classification_metrics
from fedslide.common.features import feature_path, read_feature_file
from fedslide.common.federation import phases as ph
from fedslide.common.federation.clinical_phase import MULTI_PREFIX
from fedslide.server.checkpoint import Checkpoint
from fedslide.server.protocol import plan
from fedslide.deploy.study.clinical_missingness import clinical_missingness
from tests.feature_sites import D, ENCODER, make_site
from tests.test_federation import Crash, crash_at_train_reply, federate, tiny_config

RUN = "bd"
MISSING = (0.0, 0.5, 1.0)  # of each split's slides, per site
SUPPRESS = 3
BD = {"enabled": True, "hidden_dim": 8, "attention_dim": 4, "dropout": 0.0, "batch_size": 4}
ROUNDS = {"adapter": 1, "teacher": 2, "baseline": 1, "student": 1, "clinical": 2}


def _config(root: Path, run_id: str, **extra: Any) -> FederationConfig:
    return tiny_config(
        root, run_id, suppress_below=SUPPRESS, clinical=BD, rounds=ROUNDS, kd={"lambda_expert": 0.0}, **extra
    )


def _write_clinical(site: Path, missing: float, seed: int, key: str) -> None:
    """clinical.csv of the site (keyed by `key`), `missing` of each split's rows all NA."""
    with (site / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(seed)
    out = []
    for split in ("train", "val", "test"):
        part = [r for r in rows if r["split"] == split]
        cells = clinical_rows([int(r["label"] == "pos") for r in part], missing, rng)
        out += [[r[key], *c] for r, c in zip(part, cells)]
    with (site / "clinical.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key, *COLUMNS])
        writer.writerows(out)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("bd-sites")
    out = []
    for i, missing in enumerate(MISSING, start=1):
        site = make_site(root, f"site{i}", {"train": 8, "val": 4, "test": 4}, seed=i)
        _write_clinical(site, missing, seed=i, key="patient_id" if i == 2 else "slide_id")
        out.append(site)
    return out


@pytest.fixture(scope="module")
def run(sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return federate(sites, _config(tmp_path_factory.mktemp("bd-run"), RUN))


def _ledger(site: Path, run_id: str = RUN) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (site / "runs" / run_id / "egress.jsonl").read_text().splitlines()]


def _bd_names() -> set[str]:
    cfg = FederationConfig(clinical=BD).clinical
    return set(build_bd(D, cfg, 2).state_dict())


def test_the_switch_is_off_by_default_and_the_phase_runs_after_the_student() -> None:
    off = FederationConfig()
    assert not off.clinical.enabled and ph.CLINICAL not in plan(off)
    phases = plan(FederationConfig(clinical={"enabled": True}))
    assert phases[phases.index(ph.STUDENT) + 1] is ph.CLINICAL
    assert ph.ALL.index(ph.CLINICAL) > ph.ALL.index(ph.STUDENT)


def test_the_schema_travels_in_the_run_config() -> None:
    cfg = FederationConfig(
        clinical={
            "enabled": True,
            "variables": [
                {"kind": "numeric", "name": "ki67", "unit": "%", "min": 0, "max": 100},
                {"kind": "categorical", "name": "her2", "values": ["0", "1+", "2+", "3+"]},
            ],
            "missing-tokens": ["", "n/a"],
        }
    )
    flat = cfg.to_run_config()
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())  # Flower's run config: scalars
    back = FederationConfig.from_run_config(flat)
    assert back.clinical == cfg.clinical and back.clinical.encoded_dim == 5
    with pytest.raises(ConfigError, match="epochs"):  # local epochs come from rounds.clinical-local-epochs
        FederationConfig.from_run_config({**flat, "clinical.epochs": 3})
    with pytest.raises(ConfigError, match="variables"):
        FederationConfig.from_run_config({**flat, "clinical.variables": "[{"})


@pytest.mark.slow
def test_bd_federation_with_0_50_100_percent_missing(run: tuple[Any, Any], sites: list[Path]) -> None:
    result, grid = run
    dim = result.fed.cfg.clinical.encoded_dim
    # handshake: the clinical sums of the training slides with a complete row; site3 has none (released as zeros)
    counts = [
        int(r.content.array_records["stats"][ph.CLINICAL_COUNTS].numpy()[0])
        for r in grid.received
        if "stats" in r.content.array_records and ph.CLINICAL_COUNTS in r.content.array_records["stats"]
    ]
    assert sorted(counts) == [0, 4, 8]
    ckpt = Checkpoint(result.run_dir)
    done = ckpt.phase_done(ph.CLINICAL.name)
    assert done is not None and done["rounds"] == ROUNDS["clinical"]
    # the clinical rounds' replies: n-clinical 8 / 4 / 0; the 100 % site never moves multi.*, so its round-2 reply
    # carries the round-1 global multi.* = the 8:4 average of the other two sites (its weight is 0)
    replies = [r for r in grid.received if r.metadata.message_type == "train" and ph.N_CLINICAL in _metrics(r)]
    assert len(replies) == 3 * ROUNDS["clinical"]
    by_round = [
        {int(_metrics(r)[ph.N_CLINICAL]): r.content.array_records["arrays"] for r in replies[k : k + 3]} for k in (0, 3)
    ]
    assert all(set(r) == {8, 4, 0} for r in by_round)
    multi = [k for k in by_round[0][8] if k.startswith(MULTI_PREFIX)]
    assert multi
    for key in multi:
        want = (8 * by_round[0][8][key].numpy().astype(np.float64) + 4 * by_round[0][4][key].numpy()) / 12
        np.testing.assert_allclose(by_round[1][0][key].numpy(), want, rtol=1e-5, atol=1e-6, err_msg=key)
    assert not np.array_equal(by_round[0][0]["single.prompt"].numpy(), by_round[1][0]["single.prompt"].numpy())
    # every site's bundle carries the same global BD model with the pooled normalisation (12 slides: 8 + 4)
    bundles = [StudentBundle.load(site / "runs" / RUN / "student_bundle") for site in sites]
    assert all(b.clinical is not None for b in bundles)
    first = bundles[0].clinical
    assert first is not None and first.stats.count == 12 and first.stats.mean.shape == (dim,)
    for bundle in bundles[1:]:
        assert bundle.clinical is not None
        for key, value in first.model.state_dict().items():
            assert torch.equal(value, bundle.clinical.model.state_dict()[key]), key
        assert (sites[0] / "runs" / RUN / "student_bundle" / "clinical.pt").is_file()
    # prediction: a complete row goes through the multi-modal branch, a missing one through the single-modal one
    low = read_feature_file(feature_path(sites[0], ENCODER, "low", "site1_test_1"), load_tokens=True)
    tokens = None if low.tokens is None else torch.from_numpy(low.tokens)
    instances = bundles[0].student_instances(torch.from_numpy(low.features), tokens)[0]
    row = np.array([60.0, 20.0, 0, 0, 1, 0, 1])
    p_multi, branch_multi = first.predict(instances, row)
    p_single, branch_single = first.predict(instances, None)
    assert (branch_multi, branch_single) == ("multi", "single")
    assert not torch.allclose(p_multi, p_single)


def _metrics(reply: Message) -> Any:
    return next(iter(reply.content.metric_records.values()))


@pytest.mark.slow
def test_the_egress_ledger_holds_exactly_the_declared_clinical_arrays(run: tuple[Any, Any], sites: list[Path]) -> None:
    names = _bd_names()
    dim = FederationConfig(clinical=BD).clinical.encoded_dim
    for site in sites:
        ledger = _ledger(site)
        handshake = {a["name"]: a["shape"] for a in ledger[0]["arrays"]}
        assert ledger[0]["phase"] == ph.HANDSHAKE.name
        assert handshake == {ph.CLINICAL_SUMS: [dim], ph.CLINICAL_SQUARES: [dim], ph.CLINICAL_COUNTS: [1]}
        clinical = [e for e in ledger if e["phase"] == ph.CLINICAL.name]
        assert len(clinical) == ROUNDS["clinical"] + 1  # the rounds and the final model's validation
        for entry in clinical:
            arrays = {a["name"] for a in entry["arrays"]}
            assert arrays in (names, set()), arrays - names  # train replies: the BD arrays; validation: none
            assert all(ph.CLINICAL.allows_metric(m.split(".", 1)[1]) for m in entry["metrics"]), entry["metrics"]
        elsewhere = {a["name"] for e in ledger if e["phase"] != ph.CLINICAL.name for a in e["arrays"]}
        assert not elsewhere & names and not elsewhere & {"slide.", "multi.", "single."}


@pytest.mark.slow
def test_a_crash_in_clinical_round_2_resumes_to_the_uninterrupted_result(
    run: tuple[Any, Any], sites: list[Path], tmp_path: Path
) -> None:
    reference, _ = run
    crashed = _config(tmp_path / "crash", "bd-crash")
    before = 3 * (ROUNDS["adapter"] + max(ROUNDS["teacher"], ROUNDS["baseline"]) + ROUNDS["student"])
    with pytest.raises(Crash):
        federate(sites, crashed, crash_at_train_reply(before + 3 + 1))  # the first reply of clinical round 2
    ckpt = Checkpoint(tmp_path / "crash" / "runs" / "bd-crash")
    assert ckpt.state["current"] == {**ckpt.state["current"], "phase": ph.CLINICAL.name, "round": 1}
    trained = {"replies": 0}

    def count(node: int, reply: Message) -> Message:
        trained["replies"] += reply.metadata.message_type == "train"
        return reply

    resumed, _ = federate(sites, crashed.model_copy(update={"resume": True}), count)
    assert trained["replies"] == 3 * (ROUNDS["clinical"] - 1)  # clinical round 2 only
    want = Checkpoint(reference.run_dir).load_arrays(f"{ph.CLINICAL.name}.final")
    got = Checkpoint(resumed.run_dir).load_arrays(f"{ph.CLINICAL.name}.final")
    assert want is not None and got is not None and set(want) == set(got)
    for key in want:
        if key.endswith("score.bias"):  # a softmax ignores it (see tests/test_federation.py::_assert_same_models)
            continue
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-5, err_msg=key)


@pytest.mark.slow
def test_the_loso_clinical_missingness_column(run: tuple[Any, Any], sites: list[Path]) -> None:
    """The held-out site's BD AUC with 0 / 50 / 80 / 100 % of its clinical rows removed, and the report's table."""
    data = load_sites([sites[1]], ENCODER)  # site2: patient-keyed table, half its test rows missing
    slides = [s for s in data.slides if s.split in ("val", "test")]
    column = clinical_missingness(sites[1] / "runs" / RUN / "student_bundle", sites[1], slides)
    assert column is not None and column["n"] == 8 and column["with_clinical"] == 4
    assert set(column["auc"]) == {"0", "50", "80", "100"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in column["auc"].values())
    assert clinical_missingness(sites[1] / "runs" / RUN / "student_bundle", sites[1], []) is None
    header, rows = clinical_table({"site2": {"federated": {"clinical_missingness": column}}, "site1": {}})
    assert len(rows) == 1 and rows[0][:2] == ["site2", "4 / 8"] and len(header) == len(rows[0])
    # with every row removed the BD model reads every slide through the single-modal branch, as with no table
    bundle = StudentBundle.load(sites[1] / "runs" / RUN / "student_bundle")
    assert bundle.clinical is not None
    single = [
        bundle.clinical.predict(bundle.student_instances(torch.from_numpy(s.low.features), _tokens(s))[0], None)[0]
        for s in slides
    ]
    probs = np.stack([p.double().numpy() for p in single])
    want = classification_metrics(np.array([s.label for s in slides]), probs)["auc"]
    assert column["auc"]["100"] == pytest.approx(want)


def _tokens(slide: Any) -> torch.Tensor | None:
    return None if slide.low.tokens is None else torch.from_numpy(slide.low.tokens)


@pytest.mark.slow
def test_the_run_writes_the_bd_model_and_its_metrics(run: tuple[Any, Any], sites: list[Path]) -> None:
    result, _ = run
    # models/clinical.pt: the checkpoint's final BD model with the pooled normalisation, in the manifest
    path = result.run_dir / "models" / CLINICAL_MODEL_FILE
    model = ClinicalModel.load(path)
    final = Checkpoint(result.run_dir).load_arrays(f"{ph.CLINICAL.name}.final")
    assert final is not None and set(final) == set(model.model.state_dict())
    for key, value in model.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), final[key].numpy(), err_msg=key)
    bundled = StudentBundle.load(sites[0] / "runs" / RUN / "student_bundle").clinical
    assert bundled is not None and np.array_equal(model.stats.mean, bundled.stats.mean)
    manifest = json.loads((result.run_dir / "models" / "manifest.json").read_text())
    assert manifest[ph.BD_MODEL]["file"] == f"models/{CLINICAL_MODEL_FILE}"
    assert manifest[ph.BD_MODEL]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "student" in manifest  # the other models stay listed
    # metrics.json: the sites' BD rows with the clinical data as recorded and without
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    rows = {row["model"]: row for row in metrics["rows"]}
    assert rows["bd_clinical"]["n"] == rows["bd_no_clinical"]["n"] == 12
    bd, bare = metrics["models"]["bd_clinical"], metrics["models"]["bd_no_clinical"]
    assert bd["with_clinical"] == {"site1": 4, "site2": 2, "site3": 0}  # test slides with a row: 0 / 50 / 100 % missing
    assert bare["per_site"]["site3"] == bd["per_site"]["site3"]  # no rows: both read the single-modal branch
    assert bare["per_site"]["site1"]["brier"] != bd["per_site"]["site1"]["brier"]
    # they are the bundle's predictions: site1's bd_clinical brier recomputed from its bundle and clinical.csv
    data = load_sites([sites[0]])
    table = bundled.read_table(sites[0] / "clinical.csv")
    bundle = StudentBundle.load(sites[0] / "runs" / RUN / "student_bundle")
    labels, probs = [], []
    for i in data.split("test"):
        s = data.slides[i]
        low = s.low
        tokens = None if low.tokens is None else torch.from_numpy(low.tokens)
        instances = bundle.student_instances(torch.from_numpy(low.features), tokens)[0]
        probs.append(bundled.predict(instances, table.lookup([s.slide_id])[0])[0].double().numpy())
        labels.append(s.label)
    want = classification_metrics(np.array(labels), np.stack(probs))["brier"]
    assert bd["per_site"]["site1"]["brier"] == pytest.approx(want, rel=1e-5, abs=1e-6)
