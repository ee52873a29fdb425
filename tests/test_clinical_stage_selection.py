"""Epoch selection of the centralised BD stage (`fedslide distill --clinical`) on validation AUC read as at
inference, through the Flower-free loop it shares with the bench (`common.training.bd_fit`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslide.common.clinical import pooled_clinical_stats, site_clinical_sums
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.distillation.clinical_model import ClinicalModel, build_bd
from fedslide.common.distillation.clinical_stage import ValidationSlides, train_bd
from fedslide.common.metrics import roc_auc
from fedslide.common.training.bd_fit import bd_auc, bd_probs

CFG = ClinicalConfig(hidden_dim=8, attention_dim=4, dropout=0.25, epochs=8, batch_size=4, lr=3e-3)
D = 6


def _slides(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Bags of 2-6 instances with a weak label shift, and raw clinical rows (half of them missing)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    bags = [rng.normal(size=(int(rng.integers(2, 7)), D)).astype(np.float32) + 0.4 * y for y in labels]
    raw = np.column_stack(
        [
            rng.normal(60, 10, n) + 5 * labels,
            rng.normal(20, 5, n),
            *np.eye(3)[rng.integers(0, 3, n)].T,
            labels,
            1 - labels,
        ]
    ).astype(np.float64)
    raw[rng.permutation(n)[: n // 2]] = np.nan
    return bags, labels, raw


@pytest.mark.slow  # 15-27 s on the shared 2-core machine
def test_the_selected_epoch_is_the_best_validation_auc_and_its_state_is_kept() -> None:
    bags, labels, raw = _slides(24, 0)
    vb, vl, vr = _slides(12, 1)
    stats = pooled_clinical_stats([site_clinical_sums(raw)])
    torch.manual_seed(0)
    model = build_bd(D, CFG, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    selection = train_bd(model, bags, labels, raw, stats, CFG, seed=3, val=ValidationSlides(vb, vl, vr))
    history = np.asarray(selection.history)
    assert len(history) == CFG.epochs and selection.best == int(np.argmax(history))  # first of ties
    assert selection.best < CFG.epochs - 1, "the toy run should peak before its last epoch (else the test is void)"
    assert bd_auc(model, vb, vl, vr, stats) == pytest.approx(history[selection.best])
    # the kept state is the one the same run reaches after best + 1 epochs (scoring draws no random numbers)
    again = build_bd(D, CFG, 2)
    again.load_state_dict(start)
    short = CFG.model_copy(update={"epochs": selection.best + 1})
    plain = train_bd(again, bags, labels, raw, stats, short, seed=3)
    assert plain.history == () and plain.best == selection.best
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, again.state_dict()[key], msg=key)


def test_validation_reads_slides_as_prediction_does() -> None:
    bags, labels, raw = _slides(10, 2)
    stats = pooled_clinical_stats([site_clinical_sums(raw)])
    torch.manual_seed(1)
    model = build_bd(D, CFG, 2)
    batched = bd_probs(model, bags, raw, stats, batch_size=4)
    deployed = ClinicalModel(model, CFG, stats, D, 2)
    one_by_one = np.stack([deployed.predict(torch.from_numpy(b), r)[0].double().numpy() for b, r in zip(bags, raw)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    # the multi-modal branch reads the slides with a row: removing the rows changes their probabilities only
    bare = bd_probs(model, bags, np.full_like(raw, np.nan), stats)
    have = ~np.isnan(raw).any(axis=1)
    np.testing.assert_allclose(bare[~have], batched[~have], rtol=1e-6)
    assert not np.allclose(bare[have], batched[have])
    assert bd_auc(model, bags, labels, raw, stats) == pytest.approx(roc_auc(labels, batched))


def test_without_a_scorable_validation_split_the_last_epoch_is_kept() -> None:
    bags, labels, raw = _slides(12, 4)
    stats = pooled_clinical_stats([site_clinical_sums(raw)])
    one_class = ValidationSlides(bags[:3:2], labels[:3:2], raw[:3:2])  # labels 0, 0: AUC undefined
    torch.manual_seed(2)
    model = build_bd(D, CFG, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    selection = train_bd(model, bags, labels, raw, stats, CFG, seed=5, val=one_class)
    assert selection.best == -1 and all(np.isnan(selection.history))
    again = build_bd(D, CFG, 2)
    again.load_state_dict(start)
    train_bd(again, bags, labels, raw, stats, CFG, seed=5)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, again.state_dict()[key], msg=key)
