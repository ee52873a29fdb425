"""VIB task-specific fine-tuning: the IB mask's sparsity, sparse back-propagation through the selected instances
only, the test-time top-k, a tiny end-to-end fine-tune + re-encode, and the egress policy of its federated rounds."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import nn

from fedslide.client.encoders import PatchEncoder
from fedslide.client.vib_finetune import VIBTrainer, run_vib_site, site_bags, select_site, vib_round
from fedslide.common.config.vib import VIBConfig
from fedslide.common.distillation.vib import (
    VIBSelector,
    info_loss,
    relaxed_mask,
    select_instances,
    sparse_bag,
    top_k,
    vib_loss,
)
from fedslide.client.site_run import STAGE1_ENCODER, STAGE1_RECORD
from fedslide.common.config.federation import FederationConfig
from fedslide.client.inference import ModelDirError, load_bundle, predict_slides
from fedslide.client.inference.model import encoder_config
from fedslide.common.config.base import ConfigError
from fedslide.common.config.predict import PredictConfig
from fedslide.common.distillation.data import load_sites
from fedslide.common.distillation.bundle import (
    ENCODER_FILE,
    BundleMismatchError,
    StudentBundle,
    file_sha256,
    find_encoder_weights,
)
from fedslide.common.egress import EgressViolation, arrays_reply, check_reply, specs_of, weights_reply
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.deploy.cli import main
from fedslide.deploy.federate import LaunchOptions, run_consortium
from fedslide.server.checkpoint import Checkpoint
from tests.feature_sites import tiny_student_bundle
from tests.test_federation import federate, tiny_config

# ---------------------------------------------------------------- the bottleneck


def test_info_loss_is_the_squared_gap_of_the_mean_keep_probability() -> None:
    s = torch.tensor([0.0, 2.0, -1.0])
    expected = (float(torch.sigmoid(s).mean()) - 0.1) ** 2
    assert float(info_loss(s, 0.1)) == pytest.approx(expected)


def test_rate_term_pulls_the_mean_mask_down() -> None:
    torch.manual_seed(0)
    selector = VIBSelector(16, 2, 32, 16, rate=0.1)
    with torch.no_grad():
        selector.instance.bias.fill_(2.0)  # start near keep-everything: mean sigmoid ≈ 0.88
    bags = [torch.randn(40, 16)]
    with torch.no_grad():
        before = float(torch.sigmoid(torch.cat([selector(b).mask_logits for b in bags])).mean())
    opt = torch.optim.SGD(selector.parameters(), lr=3.0)
    for _ in range(20):
        for bag in bags:  # bag_weight 0: the IB term alone
            loss = vib_loss(selector(bag), torch.tensor(1), bag_weight=0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(torch.sigmoid(torch.cat([selector(b).mask_logits for b in bags])).mean())
    assert before > 0.8
    assert after == pytest.approx(0.1, abs=0.02)


def test_relaxed_mask_is_differentiable_and_bounded() -> None:
    torch.manual_seed(0)
    s = torch.randn(50, requires_grad=True)
    m = relaxed_mask(s, rate=0.1, tau=0.1, samples=10)
    assert m.shape == (50,)
    assert float(m.detach().min()) >= 0.0 and float(m.detach().max()) <= 2.0 / 1.1 + 1e-6
    m.sum().backward()
    assert s.grad is not None and bool(torch.isfinite(s.grad).all()) and float(s.grad.abs().sum()) > 0


def test_top_k_is_kept_at_test_time_and_everything_is_masked_in_training() -> None:
    torch.manual_seed(0)
    selector = VIBSelector(8, 3, 16, 8, keep=5)
    x = torch.randn(30, 8)
    selector.train()
    train = selector(x)
    assert train.kept.tolist() == list(range(30)) and train.attention.shape == (30,)
    selector.eval()
    out = selector(x)
    expected = torch.topk(out.mask_logits, 5).indices
    assert out.kept.tolist() == expected.tolist() and out.attention.shape == (5,)
    h = selector.encoder(x[expected])  # the logits see the kept instances only
    att = torch.softmax(selector.scorer(h[None])[0, 0], 0)
    assert torch.allclose(out.logits, selector.classifier(att @ h), atol=1e-6)
    chosen = select_instances(selector, x, bag_size=3)
    assert len(chosen) == 3 and set(chosen.tolist()) <= set(expected.tolist())
    assert chosen.tolist() == sorted(chosen.tolist())
    assert selector.training is False
    assert top_k(torch.tensor([3.0, 1.0]), 1024).tolist() == [0, 1]  # fewer instances than keep: all


def test_gradients_reach_the_encoder_only_through_selected_instances() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(4, 3, bias=False)
    pixels = torch.randn(6, 4)
    frozen = encoder(pixels).detach()
    selected = torch.tensor([1, 4])
    weights = torch.randn(6, 3)

    bag = sparse_bag(encoder, pixels, selected, frozen)
    assert bag.shape == (6, 3)
    (bag * weights).sum().backward()
    assert encoder.weight.grad is not None
    by_hand = sum(torch.outer(weights[i], pixels[i]) for i in selected.tolist())  # d/dW Σ_i w_i·(W x_i)
    assert torch.allclose(encoder.weight.grad, by_hand, atol=1e-6)
    full = sum(torch.outer(weights[i], pixels[i]) for i in range(6))
    assert not torch.allclose(encoder.weight.grad, full, atol=1e-3)

    encoder.weight.grad = None  # the unselected pixels do not matter to the gradient
    other = pixels.clone()
    other[[0, 2, 3, 5]] = torch.randn(4, 4) * 10
    (sparse_bag(encoder, other, selected, frozen) * weights).sum().backward()
    assert torch.allclose(encoder.weight.grad, by_hand, atol=1e-5)

    counted: list[int] = []  # the reference code's bag: the selected rows only, the rest never encoded

    def counting(x: torch.Tensor) -> torch.Tensor:
        counted.append(len(x))
        return encoder(x)

    assert sparse_bag(counting, pixels, selected).shape == (2, 3) and counted == [2]


@pytest.mark.parametrize("enabled", [True, False])
def test_selected_patches_are_hed_jittered_at_each_step_when_enabled(effnet: PatchEncoder, enabled: bool) -> None:
    cfg = VIBConfig.model_validate({"stain": {"enabled": enabled, "sigma": 0.2, "bias": 0.05}, "progress": False})
    trainer = VIBTrainer(effnet, 2, cfg, torch.device("cpu"))
    seen: list[torch.Tensor] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # what the encoder is given, without running it
        seen.append(pixels.clone())
        return torch.zeros(len(pixels), effnet.dim, requires_grad=True)

    trainer.encode = encode  # type: ignore[method-assign]
    pixels = torch.randint(60, 200, (3, 3, 32, 32), dtype=torch.uint8)
    trainer.step(pixels, 1)
    assert seen[0].dtype == torch.uint8 and seen[0].shape == pixels.shape
    assert (not torch.equal(seen[0], pixels)) is enabled


# ---------------------------------------------------------------- a site: fine-tune, re-encode, federated round


@pytest.fixture(scope="module")
def vib_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two synthetic sites of 6 small slides (real pixels), preprocessed with EfficientNet-Lite0."""
    root = tmp_path_factory.mktemp("vib-cohort")
    argv = ["synth", "--out", str(root), "--sites", "2", "--slides-per-site", "6", "--seed", "3", "--no-progress"]
    assert main([*argv, "--set", "slide-size-um=[600.0, 700.0]"]) == 0
    sites = sorted(d for d in root.iterdir() if d.is_dir())
    for site in sites:
        assert main(["preprocess", "--site", str(site), "--no-progress", "--batch-size", "16", "--workers", "0"]) == 0
    return sites


@pytest.fixture(scope="module")
def vib_site(vib_sites: list[Path]) -> Path:
    return vib_sites[0]


def tiny_vib(**kw: object) -> VIBConfig:
    base = {
        "keep": 6,
        "bag_size": 3,
        "hidden_dim": 16,
        "attention_dim": 8,
        "selector_epochs": 2,
        "trainable": "last-n",
        "last_n": 1,
        "epochs": 1,
        "lr": 1e-3,
        "progress": False,
        "encoder": {"device": "cpu", "batch_size": 16, "num_workers": 0},
    }
    return VIBConfig.model_validate({**base, **kw})


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_tiny_end_to_end_fine_tune_and_reencode(vib_site: Path, tmp_path: Path) -> None:
    cfg = tiny_vib(output=str(tmp_path / "vib"))
    result, reencoded = run_vib_site(vib_site, cfg)
    assert Path(result.weights).is_file() and not result.skipped
    bags = site_bags(vib_site, cfg)
    per_slide = [min(cfg.bag_size, len(b.features)) for b in bags.bags]
    assert result.selected == sum(per_slide) < result.instances
    assert result.patches_forward_backward == cfg.epochs * sum(per_slide)  # only the selected patches are encoded
    assert reencoded is not None and reencoded.slides["high"] == reencoded.slides["low"] > 0
    name = f"{cfg.encoder.name}-vib-{result.weights_hash[:12]}"
    assert reencoded.features == name
    for level in ("high", "low"):
        for src in sorted((vib_site / "features" / cfg.encoder.name / level).glob("*.h5")):
            out = vib_site / "features" / name / level / src.name
            with h5py.File(src, "r") as a, h5py.File(out, "r") as b:
                for key in ("coords", "parent", "child") if level == "high" else ("coords",):
                    np.testing.assert_array_equal(a[key][()], b[key][()])
                assert b.attrs["encoder_weights_hash"] == result.weights_hash
                assert b.attrs["resolution"] == level
                assert a["features"].shape == b["features"].shape
                assert not np.allclose(a["features"][()], b["features"][()], atol=1e-4)  # the encoder moved
    again, _ = run_vib_site(vib_site, cfg)
    assert again.skipped and again.weights_hash == result.weights_hash


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_federated_vib_round_sends_exactly_the_trainable_arrays(vib_site: Path, effnet: PatchEncoder) -> None:
    cfg = tiny_vib()
    site = site_bags(vib_site, cfg)
    select_site(site, cfg, seed=0)
    trainer = VIBTrainer(effnet, len(site.classes), cfg, torch.device("cpu"))
    start = trainer.trainable_arrays()
    arrays, metrics = vib_round(site, trainer, start, epochs=1)
    assert set(arrays) == set(start) and metrics["patches"] == sum(
        len(b.pixels) for b in site.bags if b.pixels is not None
    )
    upload = sum(a.size for a in arrays.values())
    assert upload == trainer.trainable_numel() <= 1.05 * trainer.trainable_numel()
    assert any(not np.allclose(arrays[k], start[k]) for k in arrays)
    # the egress policy of the federated rounds: the encoder's trainable parameters and the head, nothing else
    sent = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    for allowed in (weights_reply(ph.PIXEL_STAGE1.name, sent), arrays_reply(ph.PIXEL_STAGE1_INIT.name, specs_of(sent))):
        check_reply(RecordDict({p.ARRAYS: sent, p.METRICS: MetricRecord({ph.NUM_EXAMPLES: 3})}), allowed)
        for extra in (
            {"features": Array(np.zeros((7, 1280), np.float32))},  # instance features
            {"selected": Array(np.zeros(3, np.int64))},  # the site's selection
            {"coords": Array(np.zeros((3, 2), np.int64))},
        ):
            with pytest.raises(EgressViolation):
                check_reply(RecordDict({p.ARRAYS: ArrayRecord({**dict(sent.items()), **extra})}), allowed)


VIB_FEDERATED = {
    "keep": 6,
    "bag_size": 3,
    "hidden_dim": 16,
    "attention_dim": 8,
    "selector_epochs": 2,
    "trainable": "last-n",
    "last_n": 1,
    "lr": 1e-3,
    "encoder": {"device": "cpu", "batch_size": 16, "num_workers": 0},
}


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_federated_vib_objective_runs_to_the_end_on_the_reencoded_features(
    vib_sites: list[Path], tmp_path: Path, effnet: PatchEncoder
) -> None:
    cfg = tiny_config(
        tmp_path,
        "vib",
        pixel_stage1=True,
        pixel_stage1_objective="vib",
        vib=VIB_FEDERATED,
        rounds={"pixel_stage1": 2, "pixel_stage1_local_epochs": 1, "teacher": 2, "student": 2},
        kd={"lambda_expert": 0.0},
        training={"batch_size": 2},
        device="cpu",
    )
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    result, _ = federate(vib_sites, cfg)
    ckpt = Checkpoint(Path(result.run_dir))
    init = ckpt.load_arrays(f"{ph.PIXEL_STAGE1_INIT.name}.arrays")
    final = ckpt.load_arrays(f"{ph.PIXEL_STAGE1.name}.final")
    assert init is not None and final is not None and list(init) == list(final)
    assert {k.split(".")[0] for k in final} == {"encoder", "head"}
    assert any(not np.array_equal(init[k].numpy(), final[k].numpy()) for k in final)
    trainable = sum(int(np.prod(final[k].shape)) for k in final)
    hashes = set()
    for site in vib_sites:
        run = site / "runs" / "vib"
        record = json.loads((run / STAGE1_RECORD).read_text())
        assert record["objective"] == "vib" and record["features"] == f"{effnet.name}-vib-{record['weights_hash'][:12]}"
        hashes.add(record["weights_hash"])
        for level in ("high", "low"):
            files = sorted((site / "features" / record["features"] / level).glob("*.h5"))
            assert files and all(
                h5py.File(f, "r").attrs["encoder_weights_hash"] == record["weights_hash"] for f in files
            )
        # the teacher and student read the re-encoded files: the bundle names the VIB-fine-tuned encoder and
        # carries it (encoder.pt) as the encoder of both levels
        bundle = StudentBundle.load(run / "student_bundle")
        assert bundle.meta.encoder_weights_hash == record["weights_hash"] and not bundle.meta.low_finetuned
        assert bundle.meta.extra["encoder_finetuned"] == "vib"
        assert bundle.encoder_weights is not None and file_sha256(bundle.encoder_weights) == record["weights_hash"]
        ledger = [json.loads(line) for line in (run / "egress.jsonl").read_text().splitlines()]
        sent = [e for e in ledger if e["phase"] == ph.PIXEL_STAGE1.name and e["arrays"]]
        assert len(sent) == 2 and all({a["name"] for a in e["arrays"]} == set(final) for e in sent)
        for entry in sent:  # the upload is the trainable parameters (float32), nothing more
            assert sum(int(np.prod(a["shape"])) for a in entry["arrays"]) <= 1.05 * trainable
        assert not any(e.get("error") for e in ledger)
        # the selection (and so the labels fine-tuned on) covers the run's training split only, never val or test
        selection = torch.load(run / "pixel_stage1" / "vib_selection.pt", weights_only=True)
        data = load_sites([site], effnet.name, seed=cfg.seed, carving=cfg.carve)
        assert set(selection["slides"]) == {data.slides[int(i)].slide_id for i in data.split("train")}
    assert len(hashes) == 1
    # predict from the bundle alone (no --weights): both levels are encoded with the VIB-fine-tuned encoder
    bundle_dir = vib_sites[0] / "runs" / "vib" / "student_bundle"
    slide = sorted((vib_sites[0] / "slides").iterdir())[0]
    for resolution in ("low", "high"):
        out = tmp_path / f"predict-{resolution}"
        run = predict_slides([slide], bundle_dir, out, _predict_cfg(resolution=resolution))
        assert not run.failures and len(run.predictions) == 1
        assert run.encoder["weights_hash"] == record["weights_hash"]
    with pytest.raises(BundleMismatchError, match=effnet.weights_hash[:12]):  # the frozen encoder is refused
        predict_slides([slide], bundle_dir, tmp_path / "frozen", _predict_cfg(), encoder=effnet)


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_real_process_federation_with_the_vib_objective(vib_sites: list[Path], tmp_path: Path) -> None:
    """SuperLink + one SuperNode per site as separate processes on loopback (TLS, node authentication, warm
    SuperExecs): VIB pixel stage 1 (one round), then every phase on both re-encoded levels, and the evaluation."""
    cfg = tiny_config(
        tmp_path,
        "vib-processes",
        pixel_stage1=True,
        pixel_stage1_objective="vib",
        vib=VIB_FEDERATED,
        threads=1,
        rounds={
            "pixel_stage1": 1,
            "pixel_stage1_local_epochs": 1,
            "adapter": 1,
            "teacher": 1,
            "baseline": 1,
            "student": 1,
        },
        kd={"lambda_expert": 0.0},
        training={"batch_size": 2},
        device="cpu",
    )
    run_dir = run_consortium(vib_sites, cfg, LaunchOptions(tmp_path / "work", timeout=900.0))
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert {ph.PIXEL_STAGE1.name, ph.PIXEL_STAGE1_REENCODE.name, "teacher", "student"} <= set(state["phases"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {r["model"] for r in metrics["rows"]} >= {"teacher_high", "student_low"}
    hashes = set()
    for site in vib_sites:
        run = site / "runs" / "vib-processes"
        record = json.loads((run / STAGE1_RECORD).read_text())
        assert record["objective"] == "vib" and record["weights_hash"] == file_sha256(run / STAGE1_ENCODER)
        assert record["features"] == f"{cfg.vib.encoder.name}-vib-{record['weights_hash'][:12]}"
        hashes.add(record["weights_hash"])
        for level in ("high", "low"):
            files = sorted((site / "features" / record["features"] / level).glob("*.h5"))
            assert files and all(
                h5py.File(f, "r").attrs["encoder_weights_hash"] == record["weights_hash"] for f in files
            )
        bundle = StudentBundle.load(run / "student_bundle")
        assert bundle.meta.encoder_weights_hash == record["weights_hash"] and bundle.meta.extra["encoder_finetuned"]
        assert bundle.encoder_weights is not None and file_sha256(bundle.encoder_weights) == record["weights_hash"]
        ledger = [json.loads(line) for line in (run / "egress.jsonl").read_text().splitlines()]
        assert not any(e.get("error") for e in ledger)
        assert {ph.PIXEL_STAGE1_INIT.name, ph.PIXEL_STAGE1.name, ph.PIXEL_STAGE1_REENCODE.name, "evaluate"} <= {
            e["phase"] for e in ledger
        }
        sent = [e for e in ledger if e["phase"] == ph.PIXEL_STAGE1.name and e["arrays"]]
        assert sent and all({a["name"].split(".")[0] for a in e["arrays"]} == {"encoder", "head"} for e in sent)
    assert len(hashes) == 1  # every site holds the same global encoder


def _predict_cfg(**kw: object) -> PredictConfig:
    return PredictConfig.model_validate(
        {"num_workers": 0, "batch_size": 16, "progress": False, "heatmaps": False, **kw}
    )


def test_bundle_carries_the_encoder_of_both_levels_and_predict_uses_it(tmp_path: Path) -> None:
    weights = tmp_path / "vib.pt"
    torch.save({"w": torch.ones(3)}, weights)
    encoder = SimpleNamespace(name="efficientnet_lite0", dim=8, fingerprint=None, weights_hash=file_sha256(weights))
    plain = tiny_student_bundle(encoder, ["a", "b"])
    parts = (plain.meta, plain.adapter, plain.student, plain.teacher, plain.student_config, plain.teacher_config)
    StudentBundle(*parts, encoder_weights=weights).save(tmp_path / "b")
    assert (tmp_path / "b" / ENCODER_FILE).read_bytes() == weights.read_bytes()
    bundle = load_bundle(tmp_path / "b")
    assert bundle.encoder_weights == tmp_path / "b" / ENCODER_FILE
    # both levels; another --weights file is refused (tests/test_finetuned_folders.py)
    for resolution in ("high", "low"):
        assert encoder_config(bundle, _predict_cfg(), resolution).weights == tmp_path / "b" / ENCODER_FILE
    plain.save(tmp_path / "plain")  # a bundle without it: predict.encoder-weights as before
    assert encoder_config(load_bundle(tmp_path / "plain"), _predict_cfg(), "high").weights is None
    torch.save({"w": torch.zeros(3)}, weights)
    with pytest.raises(BundleMismatchError, match=encoder.weights_hash[:12]):
        StudentBundle(*parts, encoder_weights=weights)
    (tmp_path / "b" / ENCODER_FILE).write_bytes(weights.read_bytes())  # swapped file: refused on load
    with pytest.raises(ModelDirError, match=encoder.weights_hash[:12]):
        load_bundle(tmp_path / "b")


def test_distill_finds_the_vib_weights_a_site_holds_for_its_bundle(tmp_path: Path) -> None:
    weights = tmp_path / "site2" / "vib" / "efficientnet_lite0.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, weights)
    encoder = SimpleNamespace(name="efficientnet_lite0", dim=8, fingerprint=None, weights_hash=file_sha256(weights))
    meta = tiny_student_bundle(encoder, ["a", "b"]).meta
    sites = [tmp_path / "site1", tmp_path / "site2"]
    assert find_encoder_weights(meta, sites) == weights  # the pipeline passes it as the bundle's encoder.pt
    torch.save({"w": torch.zeros(3)}, weights)  # other weights than the features were made with: not taken
    assert find_encoder_weights(meta, sites) is None


@pytest.mark.parametrize("key", ["standardize", "ood-stats"])
def test_vib_objective_refuses_handshake_statistics_of_the_frozen_features(key: str) -> None:
    run_config = {"pixel-stage1": True, "pixel-stage1-objective": "vib", key: True}
    with pytest.raises(ConfigError, match=f"{key} = true with pixel-stage1-objective = 'vib'"):
        FederationConfig.from_run_config(run_config)
    FederationConfig.from_run_config({**run_config, "pixel-stage1-objective": "lrmil"})  # lrmil: as before
    FederationConfig.from_run_config({**run_config, "pixel-stage1": False})  # no pixel stage 1: objective unused


def test_cli_vib_refuses_lrmil_only_flags_and_a_missing_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["finetune", str(tmp_path), "--method", "vib", "--layers", "early"]) == 2
    assert "--layers" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "nowhere"), "--method", "vib"]) == 2
    with pytest.raises(ValueError, match="epochs: not used by a federated run"):
        FederationConfig(vib={"epochs": 2})
