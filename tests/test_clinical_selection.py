"""Validation split and model selection for the slide + clinical models (issue 34, part 1): patient-level
stratified hold-out, validation AUC read the way inference reads, best-epoch / best-round restore and early
stopping, centralised and federated."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslide.client.synth.clinical import write_clinical
from fedslide.common.clinical import load_clinical, present_mask
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.metrics import roc_auc
from fedslide.common.models.bimodal import BidirectionalMIL
from fedslide.common.training.bidirectional import (
    ClinicalBags,
    TrainSettings,
    build,
    centralised_stats,
    federate,
    federated_validation_auc,
    subset,
    train_selected,
    validation_auc,
    validation_split,
)

CFG = ClinicalConfig(hidden_dim=8, attention_dim=4)


def _site(tmp_path: Path, name: str, n: int, missingness: float, seed: int) -> ClinicalBags:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).tolist()
    bags = [rng.normal(size=(int(rng.integers(3, 7)), 6)).astype(np.float32) + 0.5 * y for y in labels]
    ids = [f"{name}_{i}" for i in range(n)]
    write_clinical(tmp_path / f"{name}.csv", ids, labels, missingness, rng, key="slide_id")
    return ClinicalBags.from_lists(bags, labels, load_clinical(tmp_path / f"{name}.csv", CFG).lookup(ids))


def test_subset_keeps_the_chosen_slides_and_trims_padding(tmp_path: Path) -> None:
    bags = _site(tmp_path, "a", 10, 0.5, 0)
    part = subset(bags, [7, 2])
    assert part.labels.tolist() == [bags.labels[7].item(), bags.labels[2].item()]
    np.testing.assert_array_equal(part.raw, bags.raw[[7, 2]])
    assert part.features.shape[1] == int(bags.mask[[7, 2]].sum(1).max())
    torch.testing.assert_close(part.features[0][part.mask[0]], bags.features[7][bags.mask[7]])
    with pytest.raises(ValueError, match="at least one slide"):
        subset(bags, [])


def test_validation_split_is_disjoint_stratified_and_keeps_patients_together(tmp_path: Path) -> None:
    bags = _site(tmp_path, "a", 40, 0.0, 1)
    bags = ClinicalBags(bags.features, bags.mask, bags.labels, np.arange(40, dtype=np.float64)[:, None])  # row ids
    train, val = validation_split(bags, 0.2, seed=3)
    assert len(train) == 32 and len(val) == 8
    assert set(train.raw[:, 0]).isdisjoint(val.raw[:, 0]) and len(set(train.raw[:, 0]) | set(val.raw[:, 0])) == 40
    assert val.labels.sum().item() == 4  # stratified: half tumour, as the site
    patients = [f"p{i // 4}" for i in range(40)]  # four slides per patient
    train, val = validation_split(bags, 0.2, seed=3, groups=patients)
    held = {patients[int(i)] for i in val.raw[:, 0]}
    assert held and held.isdisjoint({patients[int(i)] for i in train.raw[:, 0]})
    with pytest.raises(ValueError, match="fraction"):
        validation_split(bags, 1.0, seed=0)
    with pytest.raises(ValueError, match="patient id per slide"):
        validation_split(bags, 0.2, seed=0, groups=patients[:-1])


def test_bd_validation_auc_reads_the_branch_inference_reads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bags = _site(tmp_path, "a", 20, 0.0, 2)
    stats = centralised_stats([bags])
    model = build("bd", 6, CFG)
    assert isinstance(model, BidirectionalMIL)
    with torch.no_grad():  # make the two branches disagree
        for param in model.multi.parameters():
            param.normal_(0.0, 1.0)
    model.eval()
    from fedslide.common.clinical import encode

    z, present = encode(bags.raw, stats, "mean")
    with torch.no_grad():
        out = model(bags.features, bags.mask, torch.from_numpy(z), torch.from_numpy(present))
    y = bags.labels.numpy()
    multi_auc = roc_auc(y, torch.softmax(out.multi, -1).numpy())
    single_auc = roc_auc(y, torch.softmax(out.single, -1).numpy())
    assert multi_auc != pytest.approx(single_auc)
    assert validation_auc(model, "bd", bags, stats) == pytest.approx(multi_auc)
    hidden = bags.hide_clinical(1.0, np.random.default_rng(0))
    assert validation_auc(model, "bd", hidden, stats) == pytest.approx(single_auc)


@pytest.mark.parametrize("kind", ["bd", "zero-fill", "slide-only"])
def test_train_selected_restores_the_best_epoch_and_stops_early(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    bags = _site(tmp_path, "a", 24, 0.5, 3)
    val = _site(tmp_path, "v", 12, 0.5, 4)
    stats = centralised_stats([bags])
    settings = TrainSettings(epochs=5, batch_size=8, lr=3e-2)
    initial = build(kind, 6, CFG)  # type: ignore[arg-type]
    chosen = train_selected(copy.deepcopy(initial), kind, bags, val, stats, CFG, settings, seed=0)  # type: ignore[arg-type]
    assert len(chosen.history) == 5
    assert chosen.history[chosen.best] == max(chosen.history)
    assert validation_auc(chosen.model, kind, val, stats) == pytest.approx(max(chosen.history))  # type: ignore[arg-type]
    stopped = train_selected(initial, kind, bags, val, stats, CFG, settings, seed=0, patience=1)  # type: ignore[arg-type]
    assert len(stopped.history) <= stopped.best + 2
    assert stopped.history == chosen.history[: len(stopped.history)]  # same run, cut short


def test_federated_validation_auc_weights_sites_and_skips_one_class_sites(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = _site(tmp_path, "a", 10, 0.0, 5), _site(tmp_path, "b", 30, 1.0, 6)
    one_class = subset(b, np.flatnonzero(b.labels.numpy() == 1))
    stats = centralised_stats([a])
    model = build("bd", 6, CFG)
    auc_a, auc_b = validation_auc(model, "bd", a, stats), validation_auc(model, "bd", b, stats)
    expected = (10 * auc_a + 30 * auc_b) / 40
    assert federated_validation_auc(model, "bd", [a, b, one_class], stats) == pytest.approx(expected)
    assert np.isnan(federated_validation_auc(model, "bd", [one_class], stats))


def test_federate_returns_the_best_validation_round(tmp_path: Path) -> None:
    sites = [_site(tmp_path, "full", 12, 0.0, 7), _site(tmp_path, "none", 12, 1.0, 8)]
    vals = [_site(tmp_path, "vfull", 8, 0.0, 9), _site(tmp_path, "vnone", 8, 1.0, 10)]
    assert int(present_mask(vals[1].raw).sum()) == 0
    settings = TrainSettings(epochs=1, batch_size=4, lr=3e-2)
    plain = federate("bd", sites, CFG, rounds=3, settings=settings, seed=0)
    assert plain.best_round is None and plain.val_history == ()
    result = federate("bd", sites, CFG, rounds=3, settings=settings, seed=0, val_sets=vals)
    assert len(result.val_history) == 3 and result.best_round is not None
    assert result.val_history[result.best_round] == max(result.val_history)
    score = federated_validation_auc(result.model, "bd", vals, result.stats)
    assert score == pytest.approx(max(result.val_history))
    if result.best_round == 2:  # the last round won: the plain run ends on the same weights
        for x, y in zip(plain.model.state_dict().values(), result.model.state_dict().values()):
            torch.testing.assert_close(x, y)


def test_window_selects_the_end_of_the_best_run_of_validation_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bags, val = _site(tmp_path, "a", 24, 0.5, 11), _site(tmp_path, "v", 12, 0.5, 12)
    stats = centralised_stats([bags])
    settings = TrainSettings(epochs=5, batch_size=8, lr=3e-2)
    chosen = train_selected(build("bd", 6, CFG), "bd", bags, val, stats, CFG, settings, seed=0, window=3)
    means = [float(np.mean(chosen.history[i - 2 : i + 1])) for i in range(2, 5)]
    assert chosen.best == 2 + int(np.argmax(means))
    assert validation_auc(chosen.model, "bd", val, stats) == pytest.approx(chosen.history[chosen.best])
    with pytest.raises(ValueError, match="window"):
        train_selected(build("bd", 6, CFG), "bd", bags, val, stats, CFG, settings, seed=0, window=0)
