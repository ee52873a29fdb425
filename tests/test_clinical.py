"""Clinical tables and bidirectional distillation (issue 34, part 1): schema errors, encoding, BD losses against
hand computations, branch routing, synthetic tables and per-site missingness in an in-process federation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedslide.client.synth.clinical import clinical_rows, write_clinical, write_site_clinical
from fedslide.common.clinical import (
    ClinicalDataError,
    encode,
    load_clinical,
    pooled_clinical_stats,
    present_mask,
    site_clinical_sums,
)
from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.federation.clinical_sums import clinical_sums_allowed
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.config.synth import SynthConfig
from fedslide.common.egress import EgressViolation, check_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.models.bimodal import BDOutput, BidirectionalMIL, bd_losses
from fedslide.common.training.bidirectional import ClinicalBags, TrainSettings, federate, fedavg

CFG = ClinicalConfig()
HEADER = "slide_id,age,tumour_size,grade,er_status\n"


def _write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "clinical.csv"
    path.write_text(header + body)
    return path


# ---- schema and loading ------------------------------------------------------------------------------------------
def test_load_encodes_numeric_and_one_hot_and_marks_missing_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, "s1,60,12.5,3,positive\ns2,NA,,NA,NA\ns3,45,20,1,NA\n")
    table = load_clinical(path, CFG)
    assert table.key == "slide_id" and table.ids == ("s1", "s2", "s3")
    np.testing.assert_array_equal(table.raw[0], [60.0, 12.5, 0, 0, 1, 0, 1])
    assert present_mask(table.raw).tolist() == [True, False, False]  # a partly recorded row counts as missing
    looked = table.lookup(["s3", "s1", "unknown"])
    assert present_mask(looked).tolist() == [False, True, False]


def test_patient_keyed_table_is_looked_up_through_patients(tmp_path: Path) -> None:
    path = _write(tmp_path, "p1,60,12.5,3,positive\n", header=HEADER.replace("slide_id", "patient_id"))
    table = load_clinical(path, CFG)
    raw = table.lookup(["a", "b"], {"a": "p1", "b": "p2"})
    assert present_mask(raw).tolist() == [True, False]
    with pytest.raises(ClinicalDataError, match="patient_id"):
        table.lookup(["a"])


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "s1,130,12,1,positive\n",
            r"row 2, column 'age': value '130' is not allowed; allowed: a number in \[18, 100\] years",
        ),
        ("s1,60,12,1,positive\ns2,60,abc,1,positive\n", r"row 3, column 'tumour_size': value 'abc'.*\[0, 200\] mm"),
        ("s1,60,12,4,positive\n", r"row 2, column 'grade': value '4' is not allowed; allowed: one of '1', '2', '3'"),
        ("s1,60,12,1,weak\n", r"column 'er_status': value 'weak'.*'negative', 'positive'"),
        ("s1,60,12,1,positive\ns1,61,12,1,positive\n", r"row 3, column 'slide_id': id 's1' appears twice"),
        ("s1,60,12,1\n", r"row 2: 4 cells, the header has 5"),
    ],
)
def test_bad_cells_name_file_row_column_value_and_allowed(tmp_path: Path, body: str, expected: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ClinicalDataError, match=expected) as info:
        load_clinical(path, CFG)
    assert str(path) in str(info.value)


def test_bad_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClinicalDataError, match="first column is 'id'"):
        load_clinical(_write(tmp_path, "", header="id,age\n"), CFG)
    with pytest.raises(ClinicalDataError, match=r"unknown: \['bmi'\]; missing: \['er_status'\]"):
        load_clinical(_write(tmp_path, "", header="slide_id,age,tumour_size,grade,bmi\n"), CFG)


def test_schema_config_from_toml_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text(
        "[clinical]\nvariables = [\n"
        '  { kind = "numeric", name = "psa", unit = "ng/mL", min = 0.0, max = 1000.0 },\n'
        '  { kind = "categorical", name = "stage", values = ["I", "II", "III"] },\n]\n'
    )
    cfg = load_config(ClinicalConfig, path, section="clinical")
    assert cfg.encoded_dim == 4
    path.write_text(
        '[clinical]\nvariables = [{ kind = "numeric", name = "psa", unit = "ng/mL", min = 5.0, max = 1.0 }]\n'
    )
    with pytest.raises(ConfigError, match="min 5.0 is larger than max 1.0"):
        load_config(ClinicalConfig, path, section="clinical")
    path.write_text('[clinical]\nvariables = [{ kind = "categorical", name = "slide_id", values = ["a", "b"] }]\n')
    with pytest.raises(ConfigError, match="slide_id"):
        load_config(ClinicalConfig, path, section="clinical")


def test_a_shared_config_file_may_hold_the_clinical_section(tmp_path: Path) -> None:
    from fedslide.common.config.dump import defaults_toml
    from fedslide.common.config.predict import PredictConfig

    path = tmp_path / "site.toml"
    path.write_text(
        '[predict]\nbatch-size = 8\n\n[clinical]\nvariables = [{ kind = "numeric", name = "psa", unit = "ng/mL", min = 0.0, max = 9.0 }]\n'
    )
    assert load_config(PredictConfig, path, section="predict").batch_size == 8  # another stage reads the same file
    assert load_config(ClinicalConfig, path, section="clinical").variables[0].name == "psa"
    defaults = tmp_path / "defaults.toml"
    defaults.write_text(defaults_toml())  # the dumped [clinical] table is valid TOML and round-trips
    assert load_config(ClinicalConfig, defaults, section="clinical") == ClinicalConfig()


def test_encode_zero_and_mean_fill() -> None:
    raw = np.array([[50.0, 10.0, 1, 0, 0, 1, 0], [70.0, 30.0, 0, 1, 0, 0, 1], [np.nan] * 7])
    stats = pooled_clinical_stats([site_clinical_sums(raw)])
    np.testing.assert_allclose(stats.mean[:2], [60.0, 20.0])
    z_mean, present = encode(raw, stats, "mean")
    z_zero, _ = encode(raw, stats, "zero")
    assert present.tolist() == [True, True, False]
    np.testing.assert_allclose(z_mean[0, :2], [-1.0, -1.0], atol=1e-6)
    np.testing.assert_array_equal(z_mean[2], 0.0)
    np.testing.assert_allclose(z_zero[2, :2], [-6.0, -2.0], atol=1e-6)  # raw zeros: (0 - 60) / 10, (0 - 20) / 10


# ---- BD: losses and routing --------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_bd_losses_match_hand_computation() -> None:
    multi = np.array([[2.0, -1.0], [0.5, 0.3], [9.0, 9.0]])
    single = np.array([[0.1, 0.4], [-1.0, 1.0], [0.0, 2.0]])
    labels = np.array([0, 1, 1])
    present = np.array([True, True, False])
    out = BDOutput(torch.tensor(multi), torch.tensor(single, requires_grad=True), torch.tensor(present))
    t, w1, w2 = 2.0, 0.7, 0.3
    got = bd_losses(out, torch.tensor(labels), t, w1, w2)

    def ce(z: np.ndarray, y: np.ndarray) -> float:
        return float(-_log_softmax(z)[np.arange(len(y)), y].mean())

    def kd(teacher: np.ndarray, student: np.ndarray) -> float:
        pt, ls = _log_softmax(teacher / t), _log_softmax(student / t)
        return float((np.exp(pt) * (pt - ls)).sum(axis=1).mean() * t * t)

    hand = {
        "ce-single": ce(single, labels),
        "ce-multi": ce(multi[present], labels[present]),
        "kd-m2s": kd(multi[present], single[present]),
        "kd-s2m": kd(single[present], multi[present]),
    }
    hand["total"] = hand["ce-single"] + hand["ce-multi"] + w1 * hand["kd-m2s"] + w2 * hand["kd-s2m"]
    for name, value in hand.items():
        assert float(got[name].detach()) == pytest.approx(value, rel=1e-9), name
    # the teacher side of each KL is detached: kd-m2s sends no gradient into the multi-modal logits
    multi_t = torch.tensor(multi, requires_grad=True)
    single_t = torch.tensor(single, requires_grad=True)
    bd_losses(BDOutput(multi_t, single_t, torch.tensor(present)), torch.tensor(labels), t, 1.0, 0.0)[
        "kd-m2s"
    ].backward()
    assert multi_t.grad is None and single_t.grad is not None


def test_no_clinical_in_batch_gives_zero_multimodal_terms() -> None:
    out = BDOutput(torch.randn(2, 2), torch.randn(2, 2, requires_grad=True), torch.tensor([False, False]))
    got = {k: v.detach() for k, v in bd_losses(out, torch.tensor([0, 1]), 2.0, 1.0, 1.0).items()}
    assert float(got["ce-multi"]) == float(got["kd-m2s"]) == float(got["kd-s2m"]) == 0.0
    assert float(got["total"]) == pytest.approx(float(got["ce-single"]))


@pytest.mark.parametrize("shared", [True, False])
def test_prompt_is_used_only_when_clinical_data_is_missing(shared: bool) -> None:
    torch.manual_seed(0)
    model = BidirectionalMIL(8, CFG.encoded_dim, hidden_dim=16, attention_dim=8, shared_slide_encoder=shared).eval()
    x, clinical = torch.randn(4, 5, 8), torch.randn(4, CFG.encoded_dim)
    present = torch.tensor([True, False, True, False])
    with torch.no_grad():
        before = model(x, None, clinical, present)
        torch.testing.assert_close(before.logits[present], before.multi[present])
        torch.testing.assert_close(before.logits[~present], before.single[~present])
        model.prompt.add_(1.0)
        changed_prompt = model(x, None, clinical, present).logits
        junk = clinical.clone()
        junk[~present] = 1e3  # what a missing row holds never matters
        changed_missing = model(x, None, junk, present).logits
    torch.testing.assert_close(changed_prompt[present], before.logits[present])
    assert not torch.allclose(changed_prompt[~present], before.logits[~present])
    torch.testing.assert_close(changed_missing, changed_prompt)


# ---- synthetic tables --------------------------------------------------------------------------------------------
def test_synth_clinical_rows_carry_partial_signal_and_missingness(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(2000) % 2
    rows = clinical_rows(labels.tolist(), 0.25, rng)
    missing = np.array([row[0] == "NA" for row in rows])
    assert missing.sum() == 500
    age = np.array([float(row[0]) for row, m in zip(rows, missing) if not m])
    y = labels[~missing]
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(y, age)
    assert 0.6 < auc < 0.8  # real but partial signal
    write_site_clinical(tmp_path, ["p1", "p2", "p3", "p4"], ["tumor", "normal", "tumor", "normal"], 0.5, (0, 1, 8))
    table = load_clinical(tmp_path / "clinical.csv", CFG)
    assert table.key == "patient_id" and int(present_mask(table.raw).sum()) == 2
    with pytest.raises(ConfigError, match="clinical-missingness"):
        load_config(SynthConfig, None, values={"out_dir": "x"}, overrides=["clinical-missingness=[0.5, 1.5]"])


# ---- federation --------------------------------------------------------------------------------------------------
def _site(tmp_path: Path, name: str, n: int, missingness: float, seed: int) -> ClinicalBags:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).tolist()
    bags = [rng.normal(size=(int(rng.integers(3, 7)), 6)).astype(np.float32) + y for y in labels]
    ids = [f"{name}_{i}" for i in range(n)]
    write_clinical(tmp_path / f"{name}.csv", ids, labels, missingness, rng, key="slide_id")
    return ClinicalBags.from_lists(bags, labels, load_clinical(tmp_path / f"{name}.csv", CFG).lookup(ids))


def test_release_is_declared_in_the_egress_policy() -> None:
    dim = CFG.encoded_dim
    for name in (ph.CLINICAL_SUMS, ph.CLINICAL_SQUARES, ph.CLINICAL_COUNTS):
        assert ph.HANDSHAKE.allows_array(name)
    bad = RecordDict({p.STATS: ArrayRecord({ph.CLINICAL_SUMS: Array(np.zeros(dim + 1))})})
    with pytest.raises(EgressViolation):
        check_reply(bad, clinical_sums_allowed(dim))


def test_per_site_missingness_in_an_in_process_federation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    sites = [
        _site(tmp_path, "full", 12, 0.0, 1),
        _site(tmp_path, "half", 12, 0.5, 2),
        _site(tmp_path, "none", 12, 1.0, 3),
        _site(tmp_path, "few", 12, 0.75, 4),  # 3 slides with clinical data: below suppress-below, withheld
    ]
    assert [int(present_mask(s.raw).sum()) for s in sites] == [12, 6, 0, 3]
    cfg = ClinicalConfig(hidden_dim=8, attention_dim=4)
    result = federate("bd", sites, cfg, rounds=2, settings=TrainSettings(epochs=1, batch_size=4), seed=0, min_slides=4)
    assert result.released == (12, 6, 0, 0)
    pooled = np.concatenate([sites[0].raw, sites[1].raw[present_mask(sites[1].raw)]])
    np.testing.assert_allclose(result.stats.mean, pooled.mean(0), rtol=1e-5)
    assert result.stats.count == 18
    bags = ClinicalBags.from_lists(
        [b[m].numpy() for s in sites for b, m in zip(s.features, s.mask)],
        [int(y) for s in sites for y in s.labels],
        np.concatenate([s.raw for s in sites]),
    )
    from fedslide.common.training.bidirectional import predict

    probs = predict(result.model, "bd", bags, result.stats)
    assert probs.shape == (48, 2) and np.isfinite(probs).all()


def test_fedavg_weights_the_multimodal_branch_by_slides_with_clinical_data() -> None:
    a = {"multi.w": torch.tensor([1.0]), "single.w": torch.tensor([1.0])}
    b = {"multi.w": torch.tensor([9.0]), "single.w": torch.tensor([4.0])}
    # site b has no clinical data: weight 0 for the multi-modal branch, its slides for the rest
    out = fedavg([a, b], [{"multi.w": 10.0, "single.w": 10.0}, {"multi.w": 0.0, "single.w": 30.0}])
    assert float(out["multi.w"]) == 1.0
    assert float(out["single.w"]) == pytest.approx((10 * 1 + 30 * 4) / 40)
    assert math.isfinite(float(out["single.w"]))


def test_synth_cohort_writes_per_site_missingness(tmp_path: Path) -> None:
    from fedslide.client.synth.cohort import generate_cohort

    cfg = SynthConfig(
        out_dir=tmp_path,
        sites=3,
        slides_per_site=4,
        seed=3,
        slide_size_um=(300.0, 320.0),
        paired_patient_fraction=0.0,
        clinical_missingness=[0.0, 0.5, 1.0],
        progress=False,
    )
    site_dirs = generate_cohort(cfg)
    present = [int(present_mask(load_clinical(d / "clinical.csv", CFG).raw).sum()) for d in site_dirs]
    assert present == [4, 2, 0]
    again = generate_cohort(cfg)  # the same cohort is kept, its settings match
    assert again == site_dirs
