"""Federated pixel-level LRMIL stage 1: the egress policy of its phases, and an in-process federation that runs
it to the end (init, FedAvg rounds of the trainable 5x encoder parameters, re-encoding, the student on the
re-encoded features)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedslide.client.encoders import PatchEncoder, build_encoder
from fedslide.client.encoders.base import sha256_file
from fedslide.client.local_phases import _load_encoder_record, encoder_record
from fedslide.client.lowres_finetune import Stage1Trainer, finetuned_feature_path
from fedslide.client.site_run import STAGE1_ENCODER, STAGE1_RECORD
from fedslide.common.config.base import ConfigError
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.finetune import FederatedFinetuneConfig
from fedslide.common.config.preprocess import EncoderConfig
from fedslide.common.distillation.bundle import StudentBundle
from fedslide.common.egress import Allowed, EgressViolation, arrays_reply, check_reply, specs_of, weights_reply
from fedslide.common.features import read_feature_file
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.deploy.cli import main
from fedslide.deploy.federate import LaunchOptions, run_consortium
from fedslide.server.checkpoint import Checkpoint
from fedslide.server.protocol import plan
from tests.test_federation import Crash, crash_at_train_reply, federate, tiny_config

pytestmark = pytest.mark.usefixtures("two_threads")

ENC = "efficientnet_lite0"
FINETUNE = {
    "trainable": "last-n",
    "last_n": 1,
    "layers": ["early", "last"],
    "batch_size": 2,
    "max_patches": 4,
    "max_patches_per_slide": 2,
    "lr": 0.01,
    "encoder": {"device": "cpu", "batch_size": 16, "num_workers": 0},
}


def _trainer(effnet: PatchEncoder, **kw: Any) -> Stage1Trainer:
    return Stage1Trainer(effnet, FederatedFinetuneConfig.model_validate({**FINETUNE, **kw}), torch.device("cpu"))


# ---------------------------------------------------------------- the phases' declarations and egress


def test_stage1_is_off_by_default_and_runs_first_when_on() -> None:
    assert ph.PIXEL_STAGE1 not in plan(FederationConfig())
    on = plan(FederationConfig(pixel_stage1=True))
    assert on[0] is ph.PIXEL_STAGE1 and on[1] is ph.ADAPTER
    with pytest.raises(ValueError, match="epochs: not used by a federated run"):
        FederationConfig(finetune={"epochs": 2})
    with pytest.raises(ValueError, match="update-bn-stats"):
        FederationConfig(finetune={"update_bn_stats": True})
    cfg = FederationConfig(pixel_stage1=True, finetune={"layers": ["early", -1], "trainable": "lora"})
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg  # lists travel comma-separated


def test_egress_admits_exactly_the_trainable_encoder_arrays(effnet: PatchEncoder) -> None:
    trainer = _trainer(effnet)
    sent = encoder_record(trainer)
    trainable = set(trainer.trainable_arrays())
    assert {k.removeprefix(ph.ENCODER_PREFIX) for k in sent} == trainable
    assert 0 < len(trainable) < len(dict(effnet.named_parameters()))
    frozen = next(n for n, _ in effnet.named_parameters() if n not in trainable)
    metrics = MetricRecord({ph.NUM_EXAMPLES: 3, ph.TRAIN_LOSS: 0.5, ph.VAL_LOSS: 0.4, ph.VAL_N: 4})
    for allowed in (weights_reply(ph.PIXEL_STAGE1.name, sent), arrays_reply(ph.PIXEL_STAGE1_INIT.name, specs_of(sent))):
        check_reply(RecordDict({p.ARRAYS: sent, p.METRICS: MetricRecord({ph.NUM_EXAMPLES: 3})}), allowed)
        one = next(iter(sent))
        leaks = {
            "a frozen parameter": {f"{ph.ENCODER_PREFIX}{frozen}": Array(np.zeros(3, np.float32))},
            "a feature array": {"features": Array(np.zeros((7, 1280), np.float32))},
            "a flat model": {"params": Array(np.zeros(5, np.float32))},
        }
        for what, extra in leaks.items():
            with pytest.raises(EgressViolation, match="arrays not"):
                check_reply(RecordDict({p.ARRAYS: ArrayRecord({**dict(sent.items()), **extra})}), allowed)
        dropped = ArrayRecord({k: v for k, v in sent.items() if k != one})
        with pytest.raises(EgressViolation, match="arrays missing"):
            check_reply(RecordDict({p.ARRAYS: dropped}), allowed)
    check_reply(RecordDict({p.ARRAYS: sent, p.METRICS: metrics}), weights_reply(ph.PIXEL_STAGE1.name, sent))
    # a name outside `encoder.*` is refused even where a (misbuilt) allowance lists it
    odd = ArrayRecord({"coords": Array(np.zeros((7, 2), np.int64))})
    with pytest.raises(EgressViolation, match="not declared"):
        check_reply(RecordDict({p.ARRAYS: odd}), Allowed(ph.PIXEL_STAGE1_INIT.name, p.ARRAYS, specs_of(odd)))
    # re-encoding sends counts only
    check_reply(
        RecordDict({p.METRICS: MetricRecord({ph.REENCODED: 4, ph.SECONDS: 1.0})}),
        Allowed(ph.PIXEL_STAGE1_REENCODE.name),
    )
    with pytest.raises(EgressViolation, match="array record"):
        check_reply(RecordDict({p.ARRAYS: sent}), Allowed(ph.PIXEL_STAGE1_REENCODE.name, p.ARRAYS, specs_of(sent)))


def test_site_refuses_encoder_arrays_other_than_its_trainable_ones(effnet: PatchEncoder) -> None:
    trainer = _trainer(effnet)
    sent = encoder_record(trainer)
    frozen = next(n for n, _ in effnet.named_parameters() if n not in trainer.trainable_arrays())
    shape = tuple(dict(effnet.named_parameters())[frozen].shape)
    grown = ArrayRecord({**dict(sent.items()), f"{ph.ENCODER_PREFIX}{frozen}": Array(np.zeros(shape, np.float32))})
    with pytest.raises(ConfigError, match="extra"):
        _load_encoder_record(trainer, grown)
    with pytest.raises(ConfigError, match="not encoder parameters"):
        _load_encoder_record(trainer, ArrayRecord({**dict(sent.items()), "features": Array(np.zeros(3, np.float32))}))
    # the arrays received land in the trainable parameters, the frozen ones stay
    name = next(iter(sent))
    moved = ArrayRecord({k: Array(v.numpy() + (1.0 if k == name else 0.0)) for k, v in sent.items()})
    _load_encoder_record(trainer, moved)
    params = dict(trainer.student.named_parameters())
    key = name.removeprefix(ph.ENCODER_PREFIX)
    torch.testing.assert_close(params[key].detach(), dict(effnet.named_parameters())[key].detach() + 1.0)
    torch.testing.assert_close(params[frozen].detach(), dict(effnet.named_parameters())[frozen].detach())


# ---------------------------------------------------------------- an in-process federation with stage 1


@pytest.fixture(scope="module")
def slide_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two synthetic sites of 6 small slides (real pixels), preprocessed with EfficientNet-Lite0."""
    root = tmp_path_factory.mktemp("stage1-cohort")
    argv = ["synth", "--out", str(root), "--sites", "2", "--slides-per-site", "6", "--seed", "5", "--no-progress"]
    assert main([*argv, "--set", "slide-size-um=[600.0, 700.0]"]) == 0
    sites = sorted(d for d in root.iterdir() if d.is_dir())
    for site in sites:
        assert main(["preprocess", "--site", str(site), "--no-progress", "--batch-size", "16", "--workers", "0"]) == 0
    return sites


def stage1_config(root: Path, run_id: str, **extra: Any) -> FederationConfig:
    """The federation's tiny settings with pixel stage 1 on (2 rounds, last layer trainable, 4 patches a site)."""
    rounds = {"pixel_stage1": 2, "pixel_stage1_local_epochs": 1, "teacher": 2, "student": 2, **extra.pop("rounds", {})}
    return tiny_config(
        root,
        run_id,
        pixel_stage1=True,
        finetune=FINETUNE,
        rounds=rounds,
        kd={"lambda_expert": 0.0},
        training={"batch_size": 2},
        device="cpu",
        **extra,
    )


@pytest.fixture(scope="module")
def stage1_run(slide_sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole in-process run with pixel stage 1 on; its run directory at the server."""
    result, _ = federate(slide_sites, stage1_config(tmp_path_factory.mktemp("stage1-run"), "stage1"))
    return Path(result.run_dir)


@pytest.mark.slow
def test_federated_stage1_runs_to_the_end_and_the_student_reads_its_features(
    stage1_run: Path, slide_sites: list[Path], effnet: PatchEncoder
) -> None:
    ckpt = Checkpoint(stage1_run)
    init = ckpt.load_arrays(f"{ph.PIXEL_STAGE1_INIT.name}.arrays")
    final = ckpt.load_arrays(f"{ph.PIXEL_STAGE1.name}.final")
    assert init is not None and final is not None and list(init) == list(final)
    assert all(k.startswith(ph.ENCODER_PREFIX) for k in final)
    assert any(not np.array_equal(init[k].numpy(), final[k].numpy()) for k in final)  # the global encoder moved
    assert ckpt.phase_done(ph.PIXEL_STAGE1_REENCODE.name) is not None
    trainable = {k.removeprefix(ph.ENCODER_PREFIX) for k in final}

    base = effnet.state_dict()
    hashes = set()
    for site in slide_sites:
        run = site / "runs" / "stage1"
        weights = run / STAGE1_ENCODER
        record = json.loads((run / STAGE1_RECORD).read_text())
        assert record == {"weights_hash": sha256_file(weights), "features": f"{ENC}-ft-{sha256_file(weights)[:12]}"}
        hashes.add(record["weights_hash"])
        # only the configured parameters changed, and they hold the global arrays
        tuned = build_encoder(EncoderConfig(weights=weights))
        state = tuned.state_dict()
        changed = {k for k, v in state.items() if not torch.equal(v, base[k])}
        assert changed and changed <= trainable
        for k in trainable:
            np.testing.assert_array_equal(state[k].numpy(), final[f"{ph.ENCODER_PREFIX}{k}"].numpy())
        # every 5x file re-encoded under the fine-tuned hash
        lows = sorted((site / "features" / ENC / "low").glob("*.h5"))
        assert lows
        for low in lows:
            new = read_feature_file(finetuned_feature_path(site, ENC, record["weights_hash"], low.stem))
            assert new.attrs["encoder_weights_hash"] == record["weights_hash"]
            assert new.attrs["finetuned_from_weights_hash"] == effnet.weights_hash
        # the later phases read them: the site's bundle names the fine-tuned 5x encoder and carries its file
        bundle = StudentBundle.load(run / "student_bundle")
        assert bundle.meta.low_encoder_weights_hash == record["weights_hash"]
        assert bundle.meta.encoder_weights_hash == effnet.weights_hash
        assert (
            bundle.low_encoder_weights is not None and sha256_file(bundle.low_encoder_weights) == record["weights_hash"]
        )
        ledger = [json.loads(line) for line in (run / "egress.jsonl").read_text().splitlines()]
        sent = [e for e in ledger if e["phase"] == ph.PIXEL_STAGE1.name and e["arrays"]]
        assert len(sent) == 2 and all({a["name"] for a in e["arrays"]} == set(final) for e in sent)
        assert not any(e.get("error") for e in ledger)
    assert len(hashes) == 1  # every site holds the same global encoder


@pytest.mark.slow
def test_real_process_federation_with_the_finetuned_encoder_in_the_loop(
    slide_sites: list[Path], tmp_path: Path
) -> None:
    """SuperLink + one SuperNode per site (TLS, node authentication, warm SuperExecs): stage 1, then every phase
    on the re-encoded 5x features, and the final evaluation."""
    cfg = stage1_config(
        tmp_path,
        "stage1-processes",
        threads=1,
        rounds={"pixel_stage1": 1, "adapter": 1, "teacher": 1, "baseline": 1, "student": 1},
    )
    run_dir = run_consortium(slide_sites, cfg, LaunchOptions(tmp_path / "work", timeout=900.0))
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert {ph.PIXEL_STAGE1.name, ph.PIXEL_STAGE1_REENCODE.name, "student"} <= set(state["phases"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {r["model"] for r in metrics["rows"]} >= {"teacher_high", "student_low"}
    for site in slide_sites:
        run = site / "runs" / "stage1-processes"
        record = json.loads((run / STAGE1_RECORD).read_text())
        bundle = StudentBundle.load(run / "student_bundle")
        assert bundle.meta.low_encoder_weights_hash == record["weights_hash"] == sha256_file(run / STAGE1_ENCODER)
        phases = [json.loads(line) for line in (run / "egress.jsonl").read_text().splitlines()]
        assert not any(e.get("error") for e in phases)
        assert {ph.PIXEL_STAGE1_INIT.name, ph.PIXEL_STAGE1.name, ph.PIXEL_STAGE1_REENCODE.name, "evaluate"} <= {
            e["phase"] for e in phases
        }


@pytest.mark.slow
def test_stage1_resumes_mid_phase_with_the_uninterrupted_result(
    stage1_run: Path, slide_sites: list[Path], tmp_path: Path
) -> None:
    cfg = stage1_config(tmp_path, "stage1-resume")
    with pytest.raises(Crash):  # killed at the first reply of round 2 (two sites)
        federate(slide_sites, cfg, crash_at_train_reply(3))
    state = json.loads((tmp_path / "runs" / "stage1-resume" / "checkpoint" / "state.json").read_text())
    assert state["current"]["phase"] == ph.PIXEL_STAGE1.name and state["current"]["round"] == 1
    with pytest.raises(Crash):  # resumed: round 2, validation and re-encoding; stopped at the adapter's first reply
        federate(slide_sites, cfg.model_copy(update={"resume": True}), crash_at_train_reply(3))
    resumed = Checkpoint(tmp_path / "runs" / "stage1-resume").load_arrays(f"{ph.PIXEL_STAGE1.name}.final")
    reference = Checkpoint(stage1_run).load_arrays(f"{ph.PIXEL_STAGE1.name}.final")
    assert resumed is not None and reference is not None and list(resumed) == list(reference)
    for key in reference:  # float32 rounding: the restarted sites' replies may be summed in another order
        np.testing.assert_allclose(resumed[key].numpy(), reference[key].numpy(), atol=1e-6, err_msg=key)
    for site in slide_sites:
        ledger = (site / "runs" / "stage1-resume" / "egress.jsonl").read_text().splitlines()
        rounds = [json.loads(line)["round"] for line in ledger if json.loads(line)["phase"] == ph.PIXEL_STAGE1.name]
        assert rounds.count(1) == 1  # round 1 was not trained again


@pytest.mark.slow
def test_an_evaluation_only_site_reencodes_with_the_global_encoder(slide_sites: list[Path], tmp_path: Path) -> None:
    """A held-out site trains nothing in stage 1 but re-encodes its 5x files with the global encoder, so the final
    evaluation feeds the student the features it was trained on."""
    trainer, held_out = slide_sites
    cfg = stage1_config(tmp_path, "stage1-heldout", min_nodes=1, eval_only_sites=[held_out.name])
    federate(slide_sites, cfg)
    records = {s.name: json.loads((s / "runs" / "stage1-heldout" / STAGE1_RECORD).read_text()) for s in slide_sites}
    assert records[trainer.name] == records[held_out.name]
    ledger = [
        json.loads(line) for line in (held_out / "runs" / "stage1-heldout" / "egress.jsonl").read_text().splitlines()
    ]
    phases = [e["phase"] for e in ledger]
    assert ph.PIXEL_STAGE1.name not in phases and ph.PIXEL_STAGE1_INIT.name not in phases
    assert ph.PIXEL_STAGE1_REENCODE.name in phases and "evaluate" in phases
    bundle = StudentBundle.load(held_out / "runs" / "stage1-heldout" / "student_bundle")
    assert bundle.meta.low_encoder_weights_hash == records[held_out.name]["weights_hash"]
