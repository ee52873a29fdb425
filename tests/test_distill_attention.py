"""LRMIL stage 2's attention terms: teacher attention mapped onto the student's instances, attention KD and the
top-k/bottom-k instance loss against hand computations, the switches, the refusals, and a distill run with them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedslide.client.inference.zoom import region_relevance, select_above
from fedslide.client.tiling import PairedGrid
from fedslide.common.config.base import ConfigError
from fedslide.common.config.distill import KDConfig
from fedslide.common.config.model import MODEL_NAMES, ModelConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.distillation.losses import (
    INSTANCE_HEAD,
    CachedKDLoss,
    attention_kl,
    distillation_loss,
    instance_loss,
    topk_instances,
)
from fedslide.common.distillation.stages import KDTargets, guided_attention, kd_loss
from fedslide.common.distillation.student import ATTENTION_MODELS, INSTANCE_EMBEDDING_MODELS, _probe, attention_kd_width
from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.training.data import BagBatch
from tests.feature_sites import D, make_site
from tests.test_distillation import _run_cli


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _hand_kl(student: list[float], guided: list[float], t: float) -> float:
    """KL(softmax(g/T) ‖ softmax(s/T)) / n · T² (the reference's batchmean over n instances)."""
    p, q = _softmax(np.array(guided) / t), _softmax(np.array(student) / t)
    return float((p * np.log(p / q)).sum() / len(student) * t * t)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_guided_attention_takes_the_mean_or_max_of_each_patch_s_children() -> None:
    parent = torch.tensor([0, 0, 1, 1, 1])
    child = torch.tensor([0, 3, 0, 1, 2])
    teacher = torch.tensor([1.0, 3.0, -2.0, 0.0, 5.0])
    mean = guided_attention(teacher, parent, child, 3, 0, "mean")
    maxed = guided_attention(teacher, parent, child, 3, 0, "max")
    assert mean[:2].tolist() == [2.0, 1.0] and maxed[:2].tolist() == [3.0, 5.0]
    assert math.isnan(mean[2]) and math.isnan(maxed[2])  # patch 2 has no 20x child
    tokens = guided_attention(teacher, parent, child, 3, 4, "mean")  # token k = patch k // 4, slot k % 4
    want = {0: 1.0, 3: 3.0, 4: -2.0, 5: 0.0, 6: 5.0}
    assert tokens.shape == (12,)
    for k in range(12):
        assert tokens[k].item() == want[k] if k in want else math.isnan(tokens[k])


def test_attention_kl_matches_hand_computation() -> None:
    s, g = [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]
    for t in (1.0, 2.0):
        assert attention_kl(torch.tensor(s), torch.tensor(g), t).item() == pytest.approx(_hand_kl(s, g, t), rel=1e-5)
    assert attention_kl(torch.tensor(s), torch.tensor(s) + 7.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_topk_and_bottomk_selection_and_instance_loss() -> None:
    guided = torch.tensor([0.5, -1.0, 3.0, 2.0, -2.0, 0.0])
    top, bottom = topk_instances(guided, 2)
    assert top.tolist() == [2, 3] and bottom.tolist() == [4, 1]
    assert [t.tolist() for t in topk_instances(guided[:3], 4)] == [[2], [1]]  # k <= n // 2
    assert topk_instances(guided[:1], 4)[0].numel() == 0
    head = nn.Linear(1, 2)  # logits [0, f]: CE(target 1) = softplus(-f), CE(target 0) = softplus(f)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [1.0]]))
        head.bias.zero_()
    f = [0.3, -0.7, 1.1, 0.2, -0.4, 0.9]
    got = instance_loss(torch.tensor(f)[:, None], guided, head, 2).item()
    want = (_softplus(-f[2]) + _softplus(-f[3]) + _softplus(f[4]) + _softplus(f[1])) / 4
    assert got == pytest.approx(want, rel=1e-6)


class _Fixed(MILModel):
    """Returns given attention and instance embeddings (one bag per row); logits from a learnable bias."""

    attention_pooling = True

    def __init__(self, attention: torch.Tensor, inst: torch.Tensor) -> None:
        super().__init__()
        self.attention, self.inst = attention, inst
        self.bias = nn.Parameter(torch.tensor([0.2, -0.1]))

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor | None = None, coords: torch.Tensor | None = None
    ) -> MILOutput:
        b = features.shape[0]
        return MILOutput(
            logits=self.bias.expand(b, 2),
            embedding=features.mean(1),
            attention=self.attention,
            instance_embedding=self.inst,
        )


def _batch(n: list[int], indices: list[int]) -> BagBatch:
    width = max(n)
    mask = torch.arange(width)[None] < torch.tensor(n)[:, None]
    return BagBatch(torch.zeros(len(n), width, 1), mask, None, torch.tensor([1, 0]), torch.tensor(indices))


def test_attention_terms_in_the_student_loss_match_hand_computation() -> None:
    # bag A (slide 2): 3 instances, the last without a 20x child; bag B (slide 0): 2 instances
    s_a, s_b = [0.1, 0.6, 0.3], [0.25, 0.75]
    attention = torch.tensor([s_a, [*s_b, 0.0]])
    inst = torch.tensor([[[0.5], [-0.2], [9.0]], [[0.4], [0.8], [0.0]]])
    targets = [torch.tensor([1.0, -1.0]), None, torch.tensor([0.0, 2.0, float("nan")])]
    kd = KDConfig(lambda_base=0.0, lambda_expert=0.0, lambda_attention=0.7, lambda_instance=0.3, instance_k=4)
    kd_targets = KDTargets(torch.zeros(3, 2), None, torch.full((3,), -1))
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [1.0]]))
        head.bias.zero_()
    loss = kd_loss(kd, kd_targets, None, attention=targets, head=head)
    model = _Fixed(attention, inst)
    batch = _batch([3, 2], [2, 0])
    with loss.attached(model):
        assert getattr(model, INSTANCE_HEAD) is head
        logits = model(batch.features, batch.mask).logits
        terms = loss.batch_terms(logits, batch)
    assert not hasattr(model, INSTANCE_HEAD) and INSTANCE_HEAD not in model.state_dict()
    kl_a = _hand_kl([math.log(0.1), math.log(0.6)], [0.0, 2.0], 1.0)  # the childless instance is left out
    kl_b = _hand_kl([math.log(0.25), math.log(0.75)], [1.0, -1.0], 1.0)
    inst_a = (_softplus(0.2) + _softplus(0.5)) / 2  # top = instance 1 (f = -0.2, target 1), bottom = instance 0
    inst_b = (_softplus(-0.4) + _softplus(0.8)) / 2  # top = instance 0, bottom = instance 1
    assert terms.attention is not None and terms.instance is not None
    assert terms.attention.item() == pytest.approx((kl_a + kl_b) / 2, rel=1e-5)
    assert terms.instance.item() == pytest.approx((inst_a + inst_b) / 2, rel=1e-5)
    ce = nn.functional.cross_entropy(logits, batch.labels).item()
    assert terms.total.item() == pytest.approx(ce + 0.7 * terms.attention.item() + 0.3 * terms.instance.item())
    with pytest.raises(ValueError, match="slide 1 has no teacher attention"):
        with loss.attached(model):
            loss(model(batch.features, batch.mask).logits, _batch([3, 2], [2, 1]))
    with pytest.raises(ValueError, match="3 student instances but teacher attention for 2"):
        with loss.attached(model):
            loss(model(batch.features, batch.mask).logits, _batch([3, 2], [0, 2]))


def test_terms_off_leave_the_loss_as_today() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 2), torch.tensor([1, 0])
    teacher, experts = torch.randn(3, 2), torch.randn(2, 3, 2)
    targets = KDTargets(teacher, experts, torch.tensor([0, 1, 0]))
    attention = [torch.randn(3), torch.randn(2), None]
    batch = _batch([3, 2], [0, 1])
    want = distillation_loss(logits, labels, teacher[:2], experts[:, :2].permute(1, 0, 2), 2.0).total
    assert KDConfig().lambda_attention == 0 and KDConfig().lambda_instance == 0  # off by default
    for kd in (KDConfig(), KDConfig(lambda_attention=1.0, lambda_instance=1.0)):
        given = attention if kd.lambda_attention == 0 else None  # terms off, or no teacher attention given
        loss = kd_loss(kd, targets, None, attention=given)
        assert loss.guidance is None
        assert torch.equal(loss(logits, batch), want)
        assert torch.equal(CachedKDLoss(teacher, experts, 2.0, cluster=targets.cluster)(logits, batch), want)


def test_students_without_attention_are_refused_when_the_terms_are_on() -> None:
    def cfg(name: str) -> ModelConfig:
        return ModelConfig(name=name, in_dim=D, num_classes=2, hidden_dim=16)

    teacher = cfg("abmil_gated")
    on = KDConfig(lambda_attention=1.0, lambda_instance=1.0)
    with pytest.raises(
        ConfigError,
        match=r"kd.lambda-attention = 1.0 and kd.lambda-instance = 1.0 need a student.*"
        r"student transmil has none.*set kd.lambda-attention = 0 and kd.lambda-instance = 0",
    ):
        attention_kd_width(on, cfg("transmil"), teacher, None)
    with pytest.raises(ConfigError, match=r"need a teacher.*teacher mean has none"):
        attention_kd_width(KDConfig(lambda_attention=1.0), teacher, cfg("mean"), None)
    with pytest.raises(ConfigError, match=r"kd.instance-features = 'embedding'.*student longmil does not"):
        attention_kd_width(KDConfig(lambda_instance=1.0), cfg("longmil"), teacher, None)
    with pytest.raises(ConfigError, match=r"training.max-instances = 64 subsamples"):
        attention_kd_width(on, teacher, teacher, 64)
    off = KDConfig()
    assert attention_kd_width(off, cfg("transmil"), cfg("mean"), 64) is None
    assert attention_kd_width(on, teacher, teacher, None) == 16  # the student's hidden width
    assert attention_kd_width(on.model_copy(update={"instance_features": "input"}), cfg("longmil"), teacher, None) == D


def test_attention_model_lists_match_the_models() -> None:
    for name in MODEL_NAMES:
        attention, width = _probe(ModelConfig(name=name, in_dim=D, num_classes=2, hidden_dim=16))
        assert attention == (name in ATTENTION_MODELS), name
        assert (width is not None) == (name in INSTANCE_EMBEDDING_MODELS), name


def test_distill_with_attention_terms_in_process(tmp_path: Path) -> None:
    """The smallest distill run with the terms on (max child mapping) and off: only the KD students change."""
    sites = [make_site(tmp_path, "site0", {"train": 6, "val": 2, "test": 2}, seed=5)]
    common = ["kd.lambda-expert=0", "training.epochs=2"]
    on, off = tmp_path / "on", tmp_path / "off"
    assert _run_cli(sites, on, [*common, "kd.attention-agg=max", "kd.lambda-attention=1", "kd.lambda-instance=1"]) == 0
    assert _run_cli(sites, off, common) == 0  # the defaults: both terms off
    kd = json.loads((on / "metrics.json").read_text())["kd"]
    assert kd["lambda_attention"] == 1.0 and kd["attention_agg"] == "max" and kd["lambda_instance"] == 1.0
    for directory, changed in (("lrmil_student", True), ("baseline_low", False)):
        a, b = (StudentBundle.load(d / directory).student.state_dict() for d in (on, off))
        assert not any(INSTANCE_HEAD in k for k in a)  # the instance head stays out of the bundle
        gap = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert (gap > 1e-6) == changed, directory


def test_zoom_threshold_keeps_exactly_the_regions_above_it() -> None:
    lows = np.array([[0, 0], [16, 0], [32, 0], [48, 0], [64, 0]], dtype=np.int64)
    parents = np.array([0, 1, 2, 2, 4])  # low patch 3 has no kept high-res child
    highs = lows[parents] + np.array([[0, 0], [4, 0], [0, 4], [4, 4], [0, 0]])
    grid = PairedGrid(4, lows, 16.0, np.ones(5), highs, 4.0, parents, np.array([0, 1, 4, 5, 0]), np.ones(5))
    scores = np.array([0.0, 0.5, 1.0, 3.0, 2.0])  # relevance 0, 1/6, 1/3, 1, 2/3
    np.testing.assert_allclose(region_relevance(scores), [0.0, 1 / 6, 1 / 3, 1.0, 2 / 3])
    assert select_above(scores, grid, 0.3).tolist() == [2, 4]  # 3 passes but has no children
    assert select_above(scores, grid, 1 / 3).tolist() == [4]  # strictly above
    assert select_above(scores, grid, 0.0).tolist() == [1, 2, 4]
    assert select_above(scores, grid, 0.0, k=2).tolist() == [2, 4]  # the 2 most relevant of those
    assert select_above(scores, grid, 0.9).tolist() == []
    assert region_relevance(np.full(3, 0.2)).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"zoom threshold must lie in \[0, 1\), got 1.0"):
        select_above(scores, grid, 1.0)
