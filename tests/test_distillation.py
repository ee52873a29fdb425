"""Distillation pipeline: KD loss, cross-resolution adapter alignment, constrained clustering, experts,
logit cache, student bundle and an end-to-end `fedslide distill` run on tiny synthetic feature files."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.distill import AdapterConfig, DistillConfig, MILTrainingConfig
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.preprocess import PreprocessConfig, TilingConfig, TissueConfig
from fedslide.common.distillation.adapter import AdapterSpec, build_adapter
from fedslide.common.distillation.bundle import BundleMeta, BundleMismatchError, StudentBundle
from fedslide.common.distillation.cache import LogitCache, model_fingerprint
from fedslide.common.distillation.clustering import (
    balanced_kmeans,
    cluster_statistics,
    constrained_assignment,
    size_bounds,
    squared_distances,
    update_centroids,
)
from fedslide.common.distillation.crossres import (
    PatchPairs,
    child_targets,
    collect_pairs,
    evaluate_adapter,
    fit_adapter,
)
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.experts import train_experts
from fedslide.common.distillation.losses import CachedKDLoss, distillation_loss, regression_loss
from fedslide.common.distillation.mil import slide_outputs
from fedslide.common.distillation.pipeline import bundle_meta
from fedslide.common.distillation.student import starts_from_teacher
from fedslide.common.features import preprocess_attrs, read_feature_file
from fedslide.common.metrics import classification_metrics
from fedslide.common.models.registry import build_model
from fedslide.common.training.cohort import Cohort, Slide
from fedslide.common.training.errors import FeatureDataError
from tests.feature_sites import D, ENCODER, GRID, HASH, SLOTS, make_site, tiny


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p_logits: np.ndarray, q_logits: np.ndarray, t: float) -> float:
    p, q = _np_softmax(p_logits / t), _np_softmax(q_logits / t)
    return float((p * np.log(p / q)).sum(axis=-1).mean() * t * t)


def test_kd_loss_matches_hand_computation() -> None:
    s = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])
    t = np.array([[2.0, 0.0, -1.0], [-0.5, 1.5, 0.5]])
    e = np.array([[[0.5, 0.5, 0.0], [1.0, -1.0, 0.3]], [[0.0, 2.0, -2.0], [0.2, 0.1, 0.0]]])  # [B, E, K]
    y = np.array([0, 1])
    T, lb, le = 2.0, 0.7, 1.3
    ce = float(-np.log(_np_softmax(s)[np.arange(2), y]).mean())
    kl_t = _np_kl(t, s, T)
    kl_e = [_np_kl(e[:, i], s, T) for i in range(2)]
    expected = ce + lb * kl_t + le / 2 * sum(kl_e)
    tt = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    terms = distillation_loss(tt(s), torch.tensor(y), tt(t), tt(e), T, lb, le)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-9)
    assert terms.base.item() == pytest.approx(kl_t, rel=1e-9)
    assert terms.expert.item() == pytest.approx(sum(kl_e) / 2, rel=1e-9)
    assert terms.total.item() == pytest.approx(expected, rel=1e-9)
    assert kl_t > 0.01 and min(kl_e) > 0.01  # the check above is not vacuous

    # student == teacher == experts: only CE is left
    same = distillation_loss(tt(s), torch.tensor(y), tt(s), tt(np.stack([s, s], 1)), T, lb, le)
    assert same.base.item() == pytest.approx(0.0, abs=1e-12)
    assert same.expert.item() == pytest.approx(0.0, abs=1e-12)
    assert same.total.item() == pytest.approx(ce, rel=1e-9)

    # turning a term off removes exactly that term
    no_base = distillation_loss(tt(s), torch.tensor(y), tt(t), tt(e), T, 0.0, le)
    assert no_base.total.item() == pytest.approx(ce + le / 2 * sum(kl_e), rel=1e-9)
    no_expert = distillation_loss(tt(s), torch.tensor(y), tt(t), None, T, lb, le)
    assert no_expert.total.item() == pytest.approx(ce + lb * kl_t, rel=1e-9)


def test_cached_kd_loss_looks_up_slides_and_own_expert() -> None:
    torch.manual_seed(0)
    n, c, k = 5, 3, 2
    teacher, experts = torch.randn(n, k), torch.randn(c, n, k)
    cluster = torch.tensor([2, 0, 1, 1, 0])
    idx = torch.tensor([3, 0])
    logits, labels = torch.randn(2, k), torch.tensor([1, 0])
    all_terms = CachedKDLoss(teacher, experts, 3.0, 1.0, 1.0, "all", cluster).terms(logits, labels, idx)
    want_all = distillation_loss(logits, labels, teacher[idx], experts[:, idx].permute(1, 0, 2), 3.0)
    assert all_terms.total.item() == pytest.approx(want_all.total.item(), rel=1e-6)
    own_terms = CachedKDLoss(teacher, experts, 3.0, 1.0, 1.0, "own", cluster).terms(logits, labels, idx)
    own = torch.stack([experts[1, 3], experts[2, 0]])[:, None]  # slide 3 -> cluster 1, slide 0 -> cluster 2
    want_own = distillation_loss(logits, labels, teacher[idx], own, 3.0)
    assert own_terms.expert.item() == pytest.approx(want_own.expert.item(), rel=1e-6)
    assert own_terms.expert.item() != pytest.approx(all_terms.expert.item(), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# cross-resolution adapter
# ---------------------------------------------------------------------------------------------
def test_child_targets_place_each_high_patch_at_its_parent_and_slot() -> None:
    high = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    parent, child = torch.tensor([1, 0, 1, 1]), torch.tensor([5, 0, 0, 15])
    targets, mask = child_targets(2, high, parent, child, SLOTS)
    assert targets.shape == (2, SLOTS, 3) and mask.sum() == 4
    for k in range(4):
        assert torch.equal(targets[parent[k], child[k]], high[k]) and mask[parent[k], child[k]]
    assert not mask[0, 5] and torch.all(targets[~mask] == 0)
    with pytest.raises(ValueError, match="child slots"):
        child_targets(2, high, parent, torch.tensor([5, 0, 0, 16]), SLOTS)


def test_masked_children_do_not_count() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(3, SLOTS, D), torch.randn(3, SLOTS, D)
    mask = torch.rand(3, SLOTS) > 0.3
    garbage = target.clone()
    garbage[~mask] = 1e6
    for kind in ("mse", "cosine", "mse+cosine"):
        assert regression_loss(pred, garbage, mask, kind).item() == pytest.approx(
            regression_loss(pred, target, mask, kind).item(), rel=1e-6
        )
        assert regression_loss(pred, garbage, torch.ones_like(mask), kind).item() != pytest.approx(
            regression_loss(pred, target, mask, kind).item(), rel=1e-3
        )


def _mirrored(p: PatchPairs) -> PatchPairs:
    """The same pairs with token (row, col) paired with child (row, GRID-1-col): no slot keeps its child."""
    perm = torch.tensor([(s // GRID) * GRID + GRID - 1 - s % GRID for s in range(SLOTS)])
    return PatchPairs(p.inputs, p.targets[:, perm], p.mask[:, perm] & p.mask, p.pooled)


def test_adapter_learns_token_to_child_alignment(tmp_path: Path) -> None:
    torch.manual_seed(0)
    site = make_site(tmp_path, "s1", {"train": 24, "val": 4}, seed=1)
    data = load_sites([site])
    train = collect_pairs([data.slides[i] for i in data.split("train")], True, SLOTS)
    val = collect_pairs([data.slides[i] for i in data.split("val")], True, SLOTS)
    assert 0 < val.mask.float().mean() < 1  # some children missing, masked
    cfg = AdapterConfig(hidden_dim=64, dropout=0.0, loss="mse", epochs=25, patience=0, batch_size=32, lr=1e-2)
    adapter = build_adapter(AdapterSpec(D, D, 64, SLOTS))
    fit = fit_adapter(adapter, train, val, cfg, seed=0)
    right = evaluate_adapter(adapter, val, cfg)
    wrong = evaluate_adapter(adapter, _mirrored(val), cfg)
    assert right["cosine"] > 0.9, right
    assert right["cosine_unadapted"] < 0.5  # the mapping had to be learned
    assert wrong["cosine"] < 0.5 and wrong["mse"] > 5 * right["mse"], (right, wrong)
    assert fit.val["cosine"] == pytest.approx(right["cosine"])

    # an adapter trained on a permuted pairing does not fit the true pairing
    bad = build_adapter(AdapterSpec(D, D, 64, SLOTS))
    fit_adapter(bad, _mirrored(train), None, cfg.model_copy(update={"epochs": 10}), seed=0)
    misfit = evaluate_adapter(bad, val, cfg)
    assert misfit["cosine"] < 0.5 and misfit["mse"] > 5 * right["mse"], misfit


# ---------------------------------------------------------------------------------------------
# size-constrained clustering and federated statistics
# ---------------------------------------------------------------------------------------------
def _blobs(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    sizes = [14, 4, 4]
    return np.concatenate([c + rng.normal(scale=0.5, size=(n, 2)) for c, n in zip(centres, sizes)])


def test_constrained_kmeans_respects_sizes() -> None:
    x = _blobs()
    lo, hi = size_bounds(len(x), 3, 0.8, 1.2, 2)
    assert (lo, hi) == (5, 9)
    result = balanced_kmeans(x, 3, lo, hi, seed=0)
    assert all(lo <= s <= hi for s in result.sizes) and sum(result.sizes) == len(x)
    # plain k-means would keep the big blob whole: the constraint did something
    from sklearn.cluster import KMeans

    plain = np.bincount(KMeans(3, n_init=10, random_state=0).fit_predict(x))
    assert plain.max() > hi


def test_constrained_assignment_is_optimal() -> None:
    rng = np.random.default_rng(3)
    cost = rng.random((7, 2))
    got = constrained_assignment(cost, 3, 4)
    best = min(
        (sum(cost[i, a] for i, a in enumerate(assign)), assign)
        for assign in itertools.product(range(2), repeat=7)
        if 3 <= sum(assign) <= 4
    )
    assert sum(cost[i, a] for i, a in enumerate(got)) == pytest.approx(best[0])
    assert 3 <= np.bincount(got, minlength=2).min()


def test_cluster_statistics_suppress_small_counts_and_federate() -> None:
    x = _blobs(1)
    centroids = np.array([[0.5, 0.5], [5.0, 0.0], [0.0, 5.0]])
    sums, counts = cluster_statistics(x, centroids)
    assert counts.tolist() == [14, 4, 4]
    suppressed_sums, suppressed = cluster_statistics(x, centroids, min_count=5)
    assert suppressed.tolist() == [14, 0, 0] and np.all(suppressed_sums[1:] == 0)
    np.testing.assert_allclose(suppressed_sums[0], sums[0])

    # federated: per-site stats aggregate to exactly the centralised update
    sites = np.split(np.random.default_rng(0).permutation(len(x)), [5, 13])
    per_site = [cluster_statistics(x[s], centroids) for s in sites]
    nearest = squared_distances(x, centroids).argmin(1)
    central = np.stack([x[nearest == c].mean(0) for c in range(3)])
    np.testing.assert_allclose(update_centroids(per_site), central, rtol=1e-12)
    np.testing.assert_allclose(update_centroids([cluster_statistics(x, centroids)]), central, rtol=1e-12)
    # a cluster nobody reports keeps its previous centroid
    kept = update_centroids([cluster_statistics(x, centroids, min_count=5)], previous=centroids)
    np.testing.assert_allclose(kept[1:], centroids[1:])


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------
def _toy_cohort(n: int, seed: int = 0) -> Cohort:
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    bags = {f"s{i}": (rng.normal(size=(5, D)).astype(np.float32) + labels[i], None) for i in range(n)}
    slides = [Slide(f"s{i}", labels[i], f"p{i}", None, Path(f"s{i}.h5"), 5) for i in range(n)]
    return Cohort(slides=slides, classes=("neg", "pos"), feature_dim=D, has_coords=False, encoder_attrs={}, bags=bags)


def test_experts_train_only_on_their_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedslide.common.distillation.mil as mil

    cohort = _toy_cohort(12)
    train = np.arange(10)
    val = np.array([10, 11])
    assignment = (cohort.labels[train] == 1).astype(int)  # cluster 0 = all negatives, cluster 1 = positives
    seen: list[list[int]] = []

    class Recording(mil.BagDataset):
        def __init__(self, c, indices, max_instances=None):
            seen.append([int(i) for i in indices])
            super().__init__(c, indices, max_instances)

    monkeypatch.setattr(mil, "BagDataset", Recording)
    cfg = MILTrainingConfig(epochs=15, lr=1e-2, batch_size=2, early_stopping_patience=0, scheduler="none")
    teacher = build_model(tiny())
    experts = train_experts(
        teacher,
        lambda: build_model(tiny()),
        cohort,
        train,
        assignment,
        val,
        cfg,
        torch.device("cpu"),
        seed=0,
        init="scratch",
        val_assignment=np.array([0, 1]),
    )
    assert [e.train_indices.tolist() for e in experts] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    # datasets built, in order: expert 0 train, expert 0 val, expert 1 train, expert 1 val
    assert seen == [[0, 2, 4, 6, 8], [10], [1, 3, 5, 7, 9], [11]]
    # each expert saw one class only, so it predicts that class everywhere
    for e in experts:
        logits, _ = slide_outputs(e.model, cohort, range(12), torch.device("cpu"))
        assert (logits.argmax(1) == e.cluster).all()


# ---------------------------------------------------------------------------------------------
# federated local rounds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["cosine", "step"])
def test_federated_rounds_continue_the_centralized_lr_schedule(scheduler: str) -> None:
    from fedslide.common.training.loop import make_optimizer, make_scheduler

    cfg = MILTrainingConfig(epochs=6, lr=1e-2, scheduler=scheduler, step_size=2, step_gamma=0.5)
    param = [torch.nn.Parameter(torch.zeros(1))]
    reference_opt = torch.optim.AdamW(param, lr=cfg.lr)
    reference = (
        torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=6)
        if scheduler == "cosine"
        else torch.optim.lr_scheduler.StepLR(reference_opt, step_size=2, gamma=0.5)
    )
    expected = []
    for _ in range(6):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    federated = []
    for round_index in range(3):  # 3 rounds x 2 local epochs, a fresh optimizer each round
        optimizer = make_optimizer(param, cfg)
        schedule = make_scheduler(optimizer, cfg, first_epoch=2 * round_index, total_epochs=6)
        for _ in range(2):
            federated.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
    assert federated == pytest.approx(expected, rel=1e-12)
    assert len(set(federated)) > 2  # the schedule moved


def test_local_epochs_at_the_end_of_the_schedule_leave_the_model_as_it_was() -> None:
    from fedslide.common.distillation.mil import train_epochs

    cohort = _toy_cohort(8)
    cfg = MILTrainingConfig(lr=1e-2, batch_size=2, scheduler="cosine")
    moved = []
    for schedule in (None, (4, 4)):  # constant LR; the cosine curve's end (LR 0)
        model = build_model(tiny())
        before = [p.detach().clone() for p in model.parameters()]
        train_epochs(model, cohort, np.arange(8), cfg, torch.device("cpu"), 1, seed=0, schedule=schedule)
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
    assert moved == [True, False]


# ---------------------------------------------------------------------------------------------
# logit cache
# ---------------------------------------------------------------------------------------------
def test_logits_are_cached_and_invalidated_when_the_teacher_changes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cohort = _toy_cohort(4)
    model = build_model(tiny())
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    keys = [s.slide_id for s in cohort.slides]
    path = tmp_path / "cache" / "logits.pt"

    def get(cache: LogitCache) -> torch.Tensor:
        return cache.get_or_compute(
            "teacher",
            model_fingerprint(model),
            keys,
            lambda: slide_outputs(model, cohort, range(4), torch.device("cpu"))[0],
        )

    first = get(LogitCache(path))
    assert len(calls) == 4
    second_cache = LogitCache(path)  # a later run: reads the file
    second = get(second_cache)
    assert len(calls) == 4 and second_cache.hits == 1 and torch.equal(first, second)
    with torch.no_grad():
        next(model.parameters()).add_(0.5)  # the teacher changed
    third_cache = LogitCache(path)
    third = get(third_cache)
    assert len(calls) == 8 and third_cache.misses == 1 and not torch.allclose(first, third)
    # other slides: recomputed too
    LogitCache(path).get_or_compute(
        "teacher",
        model_fingerprint(model),
        keys[:2],
        lambda: slide_outputs(model, cohort, range(2), torch.device("cpu"))[0],
    )
    assert len(calls) == 10
    assert torch.load(path, weights_only=True)["format"].startswith("fedslide")


# ---------------------------------------------------------------------------------------------
# bundle checks
# ---------------------------------------------------------------------------------------------
def _bundle(student_input: str = "tokens") -> StudentBundle:
    torch.manual_seed(0)
    meta = BundleMeta(
        ENCODER,
        HASH,
        D,
        f"fp-{ENCODER}-{HASH}",
        2.0,
        256,
        0.5,
        256,
        GRID,
        GRID,
        student_input,
        ["neg", "pos"],
        {},
        {"low-mpp": 2.0},
    )
    adapter = None if student_input == "raw" else build_adapter(AdapterSpec(D, D, 8, SLOTS))
    return StudentBundle(meta, adapter, build_model(tiny()), build_model(tiny()), tiny(), tiny())


def test_bundle_refuses_features_of_another_encoder(tmp_path: Path) -> None:
    bundle = _bundle()
    bundle.save(tmp_path / "b")
    loaded = StudentBundle.load(tmp_path / "b")
    site = make_site(tmp_path, "other", {"test": 1}, seed=0, encoder="vit_uni", weights_hash="ffee00112233")
    attrs = read_feature_file(next((site / "features" / "vit_uni" / "low").glob("*.h5"))).attrs
    with pytest.raises(BundleMismatchError) as info:
        loaded.check_features(attrs)
    message = str(info.value)
    assert "vit_uni" in message and "ffee00112233" in message and ENCODER in message and HASH[:12] in message
    ok = make_site(tmp_path, "same", {"test": 1}, seed=0)
    loaded.check_features(read_feature_file(next((ok / "features" / ENCODER / "low").glob("*.h5"))).attrs)
    with pytest.raises(BundleMismatchError, match="µm/px"):
        loaded.check_features(
            {
                **attrs,
                "encoder_name": ENCODER,
                "encoder_weights_hash": HASH,
                "encoder_fingerprint": f"fp-{ENCODER}-{HASH}",
                "target_mpp": 1.0,
            }
        )
    with pytest.raises(BundleMismatchError, match="fingerprint"):
        loaded.check_features({**attrs, "encoder_name": ENCODER, "encoder_weights_hash": HASH})
    with pytest.raises(BundleMismatchError, match="tokens"):
        loaded.student_instances(torch.randn(3, D), None)
    with pytest.raises(BundleMismatchError, match="dim"):
        loaded.student_instances(torch.randn(3, D + 1), torch.randn(3, SLOTS, D + 1))


def test_bundle_instances_and_round_trip(tmp_path: Path) -> None:
    bundle = _bundle()
    feats, toks = torch.randn(3, D), torch.randn(3, SLOTS, D)
    coords = torch.tensor([[0, 0], [1024, 0], [0, 1024]])
    inst, low, slot = bundle.student_instances(feats, toks)
    assert inst.shape == (3 * SLOTS, D) and low.tolist() == [i // SLOTS for i in range(48)]
    assert slot.tolist() == list(range(SLOTS)) * 3
    torch.testing.assert_close(inst[SLOTS + 5], bundle.adapter.adapt_tokens(toks)[1, 5], rtol=1e-5, atol=1e-6)
    bundle.save(tmp_path / "b")
    loaded = StudentBundle.load(tmp_path / "b")
    p1, a1, _, _ = bundle.predict_low(feats, toks, coords)
    p2, a2, l2, s2 = loaded.predict_low(feats, toks, coords)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(a1, a2)
    assert p2.sum().item() == pytest.approx(1.0) and a2.shape == (48,) and l2.shape == s2.shape == (48,)
    probs, att = loaded.predict_high(torch.randn(7, D))
    assert probs.shape == (2,) and att.shape == (7,)
    for name in ("adapter.pt", "student.pt", "teacher.pt"):
        torch.load(tmp_path / "b" / name, weights_only=True)
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["meta"]["student_input"] == "tokens"
    pooled = _bundle("pooled")
    inst, low, slot = pooled.student_instances(feats, toks)
    torch.testing.assert_close(inst, pooled.adapter.adapt_tokens(toks).mean(1))
    assert low.tolist() == [0, 1, 2] and slot.tolist() == [0, 0, 0]
    raw = _bundle("raw")
    inst, _, _ = raw.student_instances(feats, None)
    assert torch.equal(inst, feats)


def test_sites_with_different_encoders_are_refused(tmp_path: Path) -> None:
    a = make_site(tmp_path, "a", {"train": 2, "val": 2}, seed=0)
    b = make_site(tmp_path, "b", {"train": 2}, seed=1, weights_hash="0000deadbeef")
    with pytest.raises(FeatureDataError, match="different encoders") as info:
        load_sites([a, b])
    assert HASH in str(info.value) and "0000deadbeef" in str(info.value)


def test_bundle_records_the_preprocessing_the_feature_files_record(tmp_path: Path) -> None:
    """A site that preprocessed with other thresholds gets a bundle with its own, not the passed config's."""
    ours = (TissueConfig(min_saturation=40, remove_pen=False), TilingConfig(min_tissue_low=0.6, min_tissue_high=0.7))
    attrs = preprocess_attrs(ours[0].to_toml_dict(), ours[1].to_toml_dict())
    site = make_site(tmp_path, "own", {"train": 2, "val": 2}, seed=0, attrs=attrs)
    meta = bundle_meta(load_sites([site]), "tokens", PreprocessConfig(), {"role": "federated_student"})
    assert meta.tissue == ours[0].to_toml_dict() and meta.tiling == ours[1].to_toml_dict()
    assert "preprocess-by-site" not in meta.extra
    # sites that preprocessed differently: the config stands in at the top and each site's record is kept
    other = make_site(tmp_path, "other", {"train": 2, "val": 2}, seed=1)
    fallback = PreprocessConfig(tiling={"min_tissue_low": 0.2})
    mixed = bundle_meta(load_sites([site, other]), "tokens", fallback, {})
    assert mixed.tiling == fallback.tiling.to_toml_dict() and mixed.tissue == fallback.tissue.to_toml_dict()
    assert mixed.extra["preprocess-by-site"] == {
        "own": {"tissue": ours[0].to_toml_dict(), "tiling": ours[1].to_toml_dict()},
        "other": None,
    }


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
SMALL = [
    "adapter.hidden-dim=32",
    "adapter.epochs=4",
    "adapter.batch-size=64",
    "teacher.hidden-dim=16",
    "teacher.attention-dim=8",
    "student.hidden-dim=16",
    "student.attention-dim=8",
    "training.epochs=4",
    "training.lr=0.005",
    "training.batch-size=2",
    "training.early-stopping-patience=0",
    "clusters.num-clusters=2",
    "clusters.n-init=2",
    "device=cpu",
]


def _run_cli(sites: list[Path], out: Path, extra: list[str] = ()) -> int:
    from fedslide.common.distillation.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["distill", "--sites", *map(str, sites), "--out", str(out), "--no-progress"]
    for item in [*SMALL, *extra]:
        argv += ["--set", item]
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.slow
def test_distill_end_to_end(tmp_path: Path) -> None:
    sites = [make_site(tmp_path, f"site{i}", {"train": 6, "val": 2, "test": 3}, seed=10 + i) for i in range(2)]
    out = tmp_path / "run"
    assert _run_cli(sites, out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["model"] for r in metrics["rows"]] == [
        "teacher_high",
        "baseline_low",
        "lrmil_student",
        "lrmil_dd_student",
    ]
    for row in metrics["rows"]:
        assert row["n"] == 6
        for key in ("auc", "acc", "balanced_acc", "f1", "brier", "ece"):
            assert isinstance(row[key], float), (row["model"], key)
    assert (
        sum(metrics["clusters"]["sizes"]) == 12 and min(metrics["clusters"]["sizes"]) >= metrics["clusters"]["min_size"]
    )
    assert 0 < metrics["adapter"]["val_cosine"] <= 1 and metrics["adapter"]["val_loss"] > 0
    assert metrics["models"]["lrmil_student"]["instances_per_slide"] == pytest.approx(
        SLOTS * metrics["models"]["baseline_low"]["instances_per_slide"]
    )
    assert (out / "cache" / "logits.pt").is_file() and metrics["cache"]["misses"] == 4  # teacher, embedding, 2 experts
    assert set(metrics["timings"]) >= {"adapter", "teacher", "experts", "total"}

    # the bundle reproduces the pipeline's test metrics from the raw low-res files alone
    data = load_sites(sites)
    for name, directory in (
        ("lrmil_dd_student", "student"),
        ("lrmil_student", "lrmil_student"),
        ("baseline_low", "baseline_low"),
    ):
        bundle = StudentBundle.load(out / directory)
        labels, probs = [], []
        for i in data.split("test"):
            s = data.slides[i]
            bundle.check_features(s.low.attrs)
            p, att, low, _ = bundle.predict_low(
                torch.from_numpy(s.low.features), torch.from_numpy(s.low.tokens), torch.from_numpy(s.low.coords)
            )
            assert int(low.max()) == len(s.low) - 1 and att.shape == low.shape
            labels.append(s.label)
            probs.append(p.double().numpy())
        got = classification_metrics(np.array(labels), np.stack(probs))
        want = metrics["models"][name]["test"]
        assert got["brier"] == pytest.approx(want["brier"], rel=1e-5, abs=1e-7), name
    teacher = StudentBundle.load(out / "student")
    s = data.slides[int(data.split("test")[0])]
    assert teacher.predict_high(torch.from_numpy(s.high.features))[0].shape == (2,)

    # same seed, same run directory: identical results, and the teacher/expert logits come from the cache
    assert _run_cli(sites, out) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["rows"] == metrics["rows"]
    assert again["cache"] == {**metrics["cache"], "hits": 4, "misses": 0}


def test_distill_without_tokens_uses_pooled_adapter(tmp_path: Path) -> None:
    sites = [make_site(tmp_path, "site0", {"train": 8, "val": 2, "test": 2}, seed=3, tokens=False)]
    out = tmp_path / "run"
    assert _run_cli(sites, out, ["kd.lambda-expert=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kd"]["student_input"] == "pooled" and metrics["adapter"]["uses_tokens"] is False
    assert metrics["rows"][3].get("skipped") and metrics["rows"][2]["auc"] is not None
    bundle = StudentBundle.load(out / "student")
    assert bundle.meta.token_grid == 0 and bundle.meta.student_input == "pooled"
    inst, _, _ = bundle.student_instances(torch.randn(3, D), None)
    assert inst.shape == (3, D)


def test_student_init_follows_the_teacher_only_where_it_can() -> None:
    same = ModelConfig(name="abmil_gated", in_dim=D, num_classes=2, hidden_dim=16, dropout=0.5)
    teacher = ModelConfig(
        name="abmil_gated", in_dim=D, num_classes=2, hidden_dim=16, dropout=0.0
    )  # dropout: no weights
    wider = ModelConfig(name="abmil_gated", in_dim=D, num_classes=2, hidden_dim=32)
    assert starts_from_teacher("auto", "tokens", same, teacher) and starts_from_teacher("teacher", "raw", same, teacher)
    assert not starts_from_teacher("auto", "raw", same, teacher)  # raw low features are not in the teacher's space
    assert not starts_from_teacher("scratch", "tokens", same, teacher)
    assert not starts_from_teacher("auto", "tokens", wider, teacher)
    state = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match=r"kd.student-init = 'teacher'.*hidden-dim 32.*hidden-dim 16"):
        starts_from_teacher("teacher", "tokens", wider, teacher)
    assert torch.equal(torch.random.get_rng_state(), state)  # building the models to compare them drew nothing


@pytest.mark.parametrize("init", ["auto", "scratch"])
def test_kd_students_start_from_the_teacher(tmp_path: Path, init: str) -> None:
    sites = [make_site(tmp_path, "site0", {"train": 6, "val": 2, "test": 2}, seed=5)]
    out = tmp_path / "run"
    # a vanishing learning rate: whatever the students start from is what they end with
    assert _run_cli(sites, out, [f"kd.student-init={init}", "kd.lambda-expert=0", "training.lr=1e-12"]) == 0
    assert json.loads((out / "metrics.json").read_text())["kd"]["student_init"] == (
        "teacher" if init == "auto" else "scratch"
    )
    for directory in ("lrmil_student", "baseline_low"):
        bundle = StudentBundle.load(out / directory)
        student, teacher = bundle.student.state_dict(), bundle.teacher.state_dict()
        gap = max(float((student[k] - teacher[k]).abs().max()) for k in teacher)
        if init == "auto" and directory == "lrmil_student":
            assert gap < 1e-6
        else:  # scratch, and the labels-only baseline always
            assert gap > 1e-2


def test_config_defaults_and_errors() -> None:
    cfg = load_config(DistillConfig, overrides=["teacher.hidden-dim=64"])
    assert cfg.teacher.name == "abmil_gated" and cfg.teacher.hidden_dim == 64
    assert cfg.kd.expert_kd == "all" and cfg.kd.lambda_base == 1.0 and cfg.clusters.num_clusters == 3
    with pytest.raises(Exception, match="kd.expert-kd"):
        load_config(DistillConfig, section=None, overrides=["kd.expert-kd=mine"])


def test_defaults_toml_distill_section_matches_the_model() -> None:
    defaults = Path(__file__).resolve().parents[1] / "configs" / "defaults.toml"
    assert "[distill]" in defaults.read_text()
    assert load_config(DistillConfig, path=defaults, section="distill") == DistillConfig()
